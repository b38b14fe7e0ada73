"""The dlp addon: its pure helpers (Luhn, issuer prefixes, masking, find, redact), the streaming
scanner across chunk boundaries, and live traffic through bumper: block, alert and redact in the
query string, the headers and the body, a secret deep in a large streamed upload, the scan cap,
responses, and the secret never showing in bumper's own log."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bumper_addons.dlp import OVERLAP, Dlp, DlpSettings, find, luhn_ok, masked, redact
from mitmproxy.test import tflow

from bumper.addon import Refuse, logged_url
from tests.conftest import Bumper, Upstream, client_tls_context, curl
from tests.recording import Recorder

KIB, MIB = 1024, 1024 * 1024
CARD = "4111111111111111"
CARD_SPACED = "5555 5555 5555 4444"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PEM_HEADER = "-----BEGIN RSA PRIVATE KEY-----"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
TICKET = "TKT-123456"
TICKET_REGEX = "TKT-[0-9]{6}"
# name: (secret, the kind dlp reports it as)
SECRETS = {
    "card": (CARD, "card"),
    "card-spaced": (CARD_SPACED, "card"),
    "aws_key": (AWS_KEY, "aws_key"),
    "private_key": (PEM_HEADER, "private_key"),
    "jwt": (JWT, "jwt"),
    "custom": (TICKET, "ticket"),
}
# What must never be in bumper's log: the secrets (a PEM header is no secret, and dlp logs it).
NEVER_LOGGED = [CARD, CARD_SPACED, CARD_SPACED.replace(" ", ""), AWS_KEY, JWT, TICKET, JWT.split(".")[2]]


def with_check_digit(prefix: str, length: int) -> str:
    """A number of LENGTH digits starting with PREFIX whose last digit makes the Luhn sum right."""
    body = (prefix + "0" * length)[: length - 1]
    return next(body + d for d in "0123456789" if luhn_ok((body + d).encode()))


# Unit tests: the pure helpers


@pytest.mark.parametrize(
    "number",
    ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "3530111333300000",
     "30569309025904", "2223003122003222", "4222222222222", "79927398713"],
)  # fmt: skip
def test_luhn_accepts_valid_numbers(number: str) -> None:
    assert luhn_ok(number.encode())


@pytest.mark.parametrize("number", ["4111111111111112", "5555555555554440", "79927398710", "1234567812345678"])
def test_luhn_rejects_invalid_numbers(number: str) -> None:
    assert not luhn_ok(number.encode())


def kinds(data: str, **settings: Any) -> list[str]:
    return [f.kind for f in find(DlpSettings(**settings).patterns(), data.encode())]


@pytest.mark.parametrize(
    ("prefix", "length"),
    [("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("22", 16), ("27", 16), ("34", 15), ("37", 15),
     ("6011", 16), ("65", 16), ("644", 16), ("649", 16), ("62", 16), ("35", 16), ("300", 14), ("305", 14),
     ("36", 14), ("38", 14)],
)  # fmt: skip
def test_cards_with_a_known_issuer_prefix_are_found(prefix: str, length: int) -> None:
    number = with_check_digit(prefix, length)
    assert kinds(f"pay {number} now", detect=("card",)) == ["card"]


@pytest.mark.parametrize("prefix", ["0", "1", "7", "8", "9", "50", "56", "59", "21", "28", "33", "306", "39", "60"])
def test_luhn_valid_numbers_without_an_issuer_prefix_are_not_cards(prefix: str) -> None:
    number = with_check_digit(prefix, 16)
    assert luhn_ok(number.encode())
    assert kinds(f"order {number}", detect=("card",)) == []


def test_what_is_not_a_card() -> None:
    assert kinds("4111111111111112", detect=("card",)) == []  # Luhn fails
    assert kinds(with_check_digit("4", 12), detect=("card",)) == []  # too short
    assert kinds(with_check_digit("4", 20), detect=("card",)) == []  # too long: never a 19-digit slice of it
    assert kinds(f"9{CARD}", detect=("card",)) == []  # inside a longer number
    assert kinds(f"{CARD}0", detect=("card",)) == []
    assert kinds("4111 1111 1111 1111", detect=("card",)) == ["card"]  # grouped
    assert kinds("4111-1111-1111-1111", detect=("card",)) == ["card"]
    assert kinds("4111  1111 1111 1111", detect=("card",)) == []  # two separators in a row: not one number


def test_the_other_detectors() -> None:
    assert kinds(f"key={AWS_KEY}&x") == ["aws_key"]
    assert kinds("ASIAIOSFODNN7EXAMPLE ABIAIOSFODNN7EXAMPLE ACCAIOSFODNN7EXAMPLE") == ["aws_key"] * 3
    assert kinds(f"X{AWS_KEY}") == [] and kinds(f"{AWS_KEY}X") == []  # part of a longer token
    assert kinds("AKIAIOSFODNN7EXAMPL") == []  # one character short
    for header in ("-----BEGIN PRIVATE KEY-----", PEM_HEADER, "-----BEGIN OPENSSH PRIVATE KEY-----",
                   "-----BEGIN ENCRYPTED PRIVATE KEY-----"):  # fmt: skip
        assert kinds(f"{header}\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n") == ["private_key"], header
    assert kinds("-----BEGIN PUBLIC KEY-----\n-----BEGIN CERTIFICATE-----") == []
    assert kinds(f"Authorization: Bearer {JWT}") == ["jwt"]
    assert kinds(f"x{JWT}") == []  # not at a token's start
    assert kinds("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0") == []  # no signature
    assert kinds(f"ref {TICKET}", custom={"ticket": TICKET_REGEX}) == ["ticket"]
    assert kinds(f"ref {TICKET}", detect=(), custom={"ticket": TICKET_REGEX}) == ["ticket"]
    assert kinds(f"{CARD} {AWS_KEY}", detect=("aws_key",)) == ["aws_key"]  # only what detect names


@pytest.mark.parametrize(("name", "secret_and_kind"), SECRETS.items(), ids=list(SECRETS))
def test_masked_never_holds_the_secret(name: str, secret_and_kind: tuple[str, str]) -> None:
    secret, kind = secret_and_kind
    shown = masked(kind, secret.encode())
    if kind == "private_key":
        assert shown == secret  # the PEM header is the match, and it is no secret; the key after it is not shown
        return
    assert secret not in shown and secret.replace(" ", "") not in shown
    if kind == "card":
        digits = secret.replace(" ", "")
        assert shown == "*" * (len(digits) - 4) + digits[-4:]
    else:
        assert shown == f"{secret[:4]}{'*' * (len(secret) - 4)} ({len(secret)} chars)"
    # No run of the secret longer than four characters survives.
    plain = secret.replace(" ", "")
    assert not any(plain[i : i + 5] in shown for i in range(len(plain) - 4))


def test_find_reports_each_secret_with_its_place_and_redact_overwrites_exactly_it() -> None:
    data = f"card={CARD}&key={AWS_KEY}\n{PEM_HEADER}\nAuthorization: Bearer {JWT}\nref {TICKET}.".encode()
    patterns = DlpSettings(custom={"ticket": TICKET_REGEX}).patterns()
    findings = sorted(find(patterns, data), key=lambda f: f.start)
    expected = [("card", CARD), ("aws_key", AWS_KEY), ("private_key", PEM_HEADER), ("jwt", JWT), ("ticket", TICKET)]
    assert [(f.kind, data[f.start : f.end].decode()) for f in findings] == expected
    assert [f.excerpt for f in findings] == [masked(k, s.encode()) for k, s in expected]
    out = redact(data, findings)
    assert len(out) == len(data)
    wanted = data
    for _, secret in expected:
        wanted = wanted.replace(secret.encode(), b"*" * len(secret))
    assert out == wanted
    assert redact(data, []) == data


def test_bad_custom_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="custom pattern 'card' has the name of a built-in one"):
        DlpSettings(custom={"card": "x"})
    with pytest.raises(ValueError, match="custom pattern 'broken': bad regex"):
        DlpSettings(custom={"broken": "(("})


# Unit tests: the streaming scanner, through the addon's own data hooks and a minimal flow


def feed(dlp: Dlp, pieces: list[bytes], side: str = "request") -> tuple[bytes, Refuse | None]:
    """PIECES through the data hook as bumper streams them (b"" marks the end): what was passed on,
    and the refusal if there was one."""
    flow = tflow.tflow(resp=True)
    hook = dlp.request_data if side == "request" else dlp.response_data
    out = b""
    for piece in [*pieces, b""]:
        try:
            out += hook(flow, piece)
        except Refuse as e:
            return out, e
    return out, None


def dlp_addon(action: str, **settings: Any) -> Dlp:
    return Dlp(DlpSettings(action=action, custom={"ticket": TICKET_REGEX}, **settings))  # type: ignore[arg-type]


def split_points(start: int, secret: str) -> range:
    """Every cut from two bytes before the secret to two bytes after it."""
    return range(start - 2, start + len(secret) + 3)


@pytest.mark.parametrize("lead", [10, OVERLAP + 1000], ids=["short-lead", "long-lead"])
@pytest.mark.parametrize(("name", "secret_and_kind"), SECRETS.items(), ids=list(SECRETS))
def test_block_stops_a_secret_split_across_two_chunks_before_any_of_it_is_passed_on(
    name: str, secret_and_kind: tuple[str, str], lead: int
) -> None:
    secret, kind = secret_and_kind
    body = b" " * lead + secret.encode() + b" " * 40
    for cut in split_points(lead, secret):
        out, refused = feed(dlp_addon("block"), [body[:cut], body[cut:]])
        assert refused is not None, f"cut at {cut}: not refused"
        assert f"({kind})" in refused.reason
        assert out == body[: len(out)] and len(out) <= lead, f"cut at {cut}: passed on {len(out)} bytes"


@pytest.mark.parametrize("lead", [10, OVERLAP + 1000], ids=["short-lead", "long-lead"])
@pytest.mark.parametrize(("name", "secret_and_kind"), SECRETS.items(), ids=list(SECRETS))
def test_redact_overwrites_a_secret_split_across_two_chunks(
    name: str, secret_and_kind: tuple[str, str], lead: int
) -> None:
    secret, _ = secret_and_kind
    body = b" " * lead + secret.encode() + b" " * 40
    wanted = b" " * lead + b"*" * len(secret) + b" " * 40
    for cut in split_points(lead, secret):
        out, refused = feed(dlp_addon("redact"), [body[:cut], body[cut:]])
        assert refused is None and out == wanted, f"cut at {cut}"


@pytest.mark.parametrize(("name", "secret_and_kind"), SECRETS.items(), ids=list(SECRETS))
def test_alert_passes_a_split_secret_unchanged_and_reports_it_once(
    name: str, secret_and_kind: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    secret, kind = secret_and_kind
    lead = OVERLAP + 1000
    body = b"x " * (lead // 2) + secret.encode() + b" " * 40
    for cut in split_points(lead, secret):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bumper.addons.dlp"):
            out, refused = feed(dlp_addon("alert"), [body[:cut], body[cut:]])
        assert refused is None and out == body, f"cut at {cut}"
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1, (cut, messages)
        assert f": {kind} {masked(kind, secret.encode())} in the request body (alert)" in messages[0]
        assert kind == "private_key" or secret not in messages[0]


@pytest.mark.parametrize(("name", "secret_and_kind"), SECRETS.items(), ids=list(SECRETS))
def test_a_secret_fed_one_byte_at_a_time_is_still_caught(name: str, secret_and_kind: tuple[str, str]) -> None:
    secret, _ = secret_and_kind
    body = b"lead " + secret.encode() + b" tail"
    out, refused = feed(dlp_addon("block"), [body[i : i + 1] for i in range(len(body))])
    assert refused is not None and len(out) <= 5
    out, refused = feed(dlp_addon("redact"), [body[i : i + 1] for i in range(len(body))])
    assert out == b"lead " + b"*" * len(secret) + b" tail"


def test_many_chunks_many_secrets_each_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    parts = [b"a " * 3000, CARD.encode(), b" b " * 2000, AWS_KEY.encode(), b" c " * 2000, JWT.encode(), b" d" * 10]
    body = b"".join(parts)
    for size in (100, 1000, 4096, 5000, 65536):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bumper.addons.dlp"):
            out, refused = feed(dlp_addon("alert"), [body[i : i + size] for i in range(0, len(body), size)])
        assert refused is None and out == body
        # One line per piece scanned: several findings in one piece share a line.
        reported = [kind for r in caplog.records for kind in re.findall(r"\b(card|aws_key|jwt) ", r.getMessage())]
        assert sorted(reported) == ["aws_key", "card", "jwt"], (size, reported)


def test_the_scan_stops_at_max_body_unless_over_cap_blocks(caplog: pytest.LogCaptureFixture) -> None:
    body = b" " * 5000 + CARD.encode() + b" " * 100
    pieces = [body[i : i + 100] for i in range(0, len(body), 100)]
    with caplog.at_level(logging.WARNING, logger="bumper.addons.dlp"):
        out, refused = feed(dlp_addon("block", max_body=1000, over_cap="pass"), pieces)
    assert refused is None and out == body and not caplog.records  # past the cap: passed unscanned
    out, refused = feed(dlp_addon("alert", max_body=1000, over_cap="block"), pieces)
    assert refused is not None and "over the DLP scan limit of 1000 bytes" in refused.reason
    assert len(out) <= 1000
    early = b" " * 100 + CARD.encode() + b" " * 5000
    out, refused = feed(dlp_addon("block", max_body=1000), [early[i : i + 100] for i in range(0, len(early), 100)])
    assert refused is not None and len(out) <= 100  # within the cap: scanned


def test_responses_are_scanned_only_when_asked() -> None:
    body = b"here: " + CARD.encode()
    out, refused = feed(dlp_addon("block"), [body], side="response")
    assert refused is None and out == body
    out, refused = feed(dlp_addon("block", responses=True), [body], side="response")
    assert refused is not None and out == b""
    out, refused = feed(dlp_addon("redact", responses=True, scan=("url",)), [body], side="response")
    assert refused is None and out == body  # scan without body: bodies pass


def test_headers_and_query_string_in_requestheaders() -> None:
    dlp = dlp_addon("redact")
    flow = tflow.tflow()
    flow.request.path = f"/pay?card={CARD}&n=1"
    flow.request.headers["x-key"] = AWS_KEY
    dlp.requestheaders(flow)
    assert flow.request.path == f"/pay?card={'*' * 16}&n=1"
    assert flow.request.headers["x-key"] == "*" * len(AWS_KEY)
    flow = tflow.tflow()
    flow.request.headers["authorization"] = f"Bearer {JWT}"
    with pytest.raises(Refuse, match=r"the request header authorization holds what looks like a secret \(jwt\)"):
        dlp_addon("block").requestheaders(flow)


@pytest.mark.parametrize("target", [f"/pay/{CARD}?n=1", f"/pay/{CARD}"], ids=["with-query", "without-query"])
def test_scan_url_covers_the_path_with_or_without_a_query_string(target: str) -> None:
    """scan: url is the request target; a card in the path must not pass just because no "?" follows."""
    flow = tflow.tflow()
    flow.request.path = target
    with pytest.raises(Refuse, match=r"\(card\)"):
        dlp_addon("block").requestheaders(flow)


ESCAPED_CARD = "%34%31" + CARD[2:]  # the card to any server, the first two digits escaped
ESCAPED_KEY = "%41" + AWS_KEY[1:]


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (f"/pay?card={ESCAPED_CARD}", "card"),
        (f"/k/{ESCAPED_KEY}", "aws_key"),
        ("/pay?c=5555%205555%205555%204444", "card"),
    ],
    ids=["escaped-digits", "escaped-key", "escaped-spaces"],
)
def test_scan_url_reads_a_secret_however_it_is_escaped(target: str, kind: str) -> None:
    flow = tflow.tflow()
    flow.request.path = target
    with pytest.raises(Refuse, match=rf"\({kind}\)"):
        dlp_addon("block").requestheaders(flow)


def test_redact_masks_an_escaped_secret_in_the_urls_normal_form() -> None:
    """Unreserved escapes decoded is the same URL to every server (RFC 3986): masked in that form."""
    flow = tflow.tflow()
    flow.request.path = f"/pay/%7Eme?card={ESCAPED_CARD}&n=%2F"
    dlp_addon("redact").requestheaders(flow)
    assert flow.request.path == f"/pay/~me?card={'*' * len(CARD)}&n=%2F"
    assert CARD not in logged_url(flow) and "%34%31" not in logged_url(flow)


def test_redact_refuses_a_secret_only_a_lenient_reading_shows() -> None:
    """`%20` decoded is a different URL: the secret cannot be masked where the client put it."""
    flow = tflow.tflow()
    flow.request.path = "/pay?c=5555%205555%205555%204444"
    with pytest.raises(Refuse, match="in a form that cannot be masked"):
        dlp_addon("redact").requestheaders(flow)
    assert "5555" not in logged_url(flow).partition("?")[2]


def test_a_secret_as_sent_and_another_escaped_are_both_masked_in_the_log() -> None:
    flow = tflow.tflow()
    flow.request.path = f"/pay?a={CARD}&b={ESCAPED_KEY}"
    dlp_addon("alert").requestheaders(flow)
    assert flow.request.path == f"/pay?a={CARD}&b={ESCAPED_KEY}"  # alert changes nothing
    logged = logged_url(flow)
    assert CARD not in logged and AWS_KEY[1:] not in logged, logged


# Live: real traffic through bumper

POLICY = "default: bump\nrules:\n" + "".join(
    f"  - name: dlp-{name}\n"
    f"    match: {{sni: [{name}.upstream.test]}}\n"
    "    action: bump\n"
    "    addons:\n"
    f"      - dlp: {settings}\n"
    for name, settings in [
        ("block", f"{{action: block, custom: {{ticket: '{TICKET_REGEX}'}}, max_body: 8m}}"),
        ("alert", "{action: alert}"),
        ("redact", "{action: redact, max_body: 8m}"),
        ("capblock", "{action: block, max_body: 64k, over_cap: block}"),
        ("cappass", "{action: block, max_body: 64k, over_cap: pass}"),
        ("responses", "{action: block, scan: [body], responses: true}"),
        ("respredact", "{action: redact, scan: [body], responses: true}"),
    ]
)
STATUS_MARK = "\n--status--"
URL_PLACE = "(?:URL|query string)"  # how dlp names the request target in its reasons and log lines


@pytest.fixture(scope="module")
def dlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dlp")


@pytest.fixture(scope="module")
def inspecting(start_bumper, dlp_dir: Path) -> Bumper:
    """bumper with the dlp rules, and --access-log DIR/access.jsonl."""
    policy = dlp_dir / "policy.yaml"
    policy.write_text("ports: ['1-65535']\n" + POLICY)
    return start_bumper("--policy", str(policy), "--access-log", str(dlp_dir / "access.jsonl"))


@pytest.fixture(autouse=True)
def secrets_stay_out_of_the_log(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "inspecting" in request.fixturenames:
        log = request.getfixturevalue("inspecting").process.log
        assert "Traceback" not in log
        leaked = [s for s in NEVER_LOGGED if s in log]
        assert not leaked, f"bumper logged {leaked}"


def fetch(bumper: Bumper, url: str, *args: str) -> tuple[int, str]:
    r = curl(bumper, url, *args, "-w", STATUS_MARK + "%{http_code}")
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.rpartition(STATUS_MARK)
    return int(status), body


def assert_nothing_arrived(bumper: Bumper, recorder: Recorder, prefix: str) -> None:
    """No request for PREFIX reached the upstream: checked once a later request has reached it."""
    sentinel = f"/sentinel-{time.monotonic_ns()}"
    assert fetch(bumper, recorder.url(host="plain.upstream.test", target=sentinel))[0] == 200
    assert recorder.got(sentinel)
    time.sleep(0.2)
    assert recorder.got(prefix, timeout=0) == []


def dlp_lines(bumper: Bumper, host: str, count: int = 1, timeout: float = 10) -> list[str]:
    """The addon's lines about HOST written during this test, once there are COUNT: bumper may write
    them a moment after the client has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        new = bumper.process.lines[bumper.process.test_start :]
        lines = [line for line in new if "dlp: flow " in line and f" to {host}: " in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_block_a_card_in_the_query_string(inspecting: Bumper, recorder: Recorder, http: str) -> None:
    target = f"/query-block{http}?card={CARD}"
    status, body = fetch(
        inspecting, recorder.url(host="block.upstream.test", target=target), http, "-H", "Accept: application/json"
    )
    assert status == 403
    page = json.loads(body)
    assert page["addon"] == "dlp"
    assert re.fullmatch(rf"the request {URL_PLACE} holds what looks like a secret \(card\)", page["error"]), page
    assert_nothing_arrived(inspecting, recorder, f"/query-block{http}")


@pytest.mark.parametrize(
    ("header", "kind"),
    [(f"X-Card: {CARD_SPACED}", "card"), (f"Authorization: Bearer {JWT}", "jwt"), (f"X-Key: {AWS_KEY}", "aws_key")],
    ids=["card", "jwt", "aws_key"],
)
def test_block_a_secret_in_a_header(inspecting: Bumper, recorder: Recorder, header: str, kind: str) -> None:
    name = header.split(":")[0].lower()
    status, body = fetch(
        inspecting, recorder.url(host="block.upstream.test", target=f"/header-block-{kind}"), "-H", header
    )
    assert status == 403
    assert f"bumper: the request header {name} holds what looks like a secret ({kind})" in body
    assert_nothing_arrived(inspecting, recorder, f"/header-block-{kind}")


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
@pytest.mark.parametrize(("secret", "kind"), [(CARD, "card"), (TICKET, "ticket"), (PEM_HEADER, "private_key")])
def test_block_a_secret_in_a_post_body(
    inspecting: Bumper, recorder: Recorder, http: str, secret: str, kind: str
) -> None:
    target = f"/body-block-{kind}{http}"
    status, body = fetch(
        inspecting, recorder.url(host="block.upstream.test", target=target), http, "--data-binary", f"note: {secret}\n"
    )
    assert status == 403
    assert f"bumper: the request body holds what looks like a secret ({kind})" in body
    for record in recorder.got(target):  # the request may have begun upstream; its body never got there
        assert record.ended and not record.complete and secret.encode() not in record.body, record
    line = dlp_lines(inspecting, "block.upstream.test")[-1]
    assert line.endswith(f": {kind} {masked(kind, secret.encode())} in the request body (block)")


def test_a_card_in_the_path_is_caught(inspecting: Bumper, recorder: Recorder) -> None:
    """scan: url is the whole URL: a card in the path, with no query string, is caught like one in the query."""
    status, _ = fetch(inspecting, recorder.url(host="block.upstream.test", target=f"/path-card/{CARD}"))
    assert status == 403
    assert_nothing_arrived(inspecting, recorder, "/path-card/")


@pytest.mark.parametrize("host", ["block", "alert"])
def test_the_access_log_has_a_secret_found_in_the_url_masked(
    inspecting: Bumper, dlp_dir: Path, recorder: Recorder, host: str
) -> None:
    target = f"/logged-{host}?card={CARD}&n=1"
    r = curl(
        inspecting, recorder.url(target, f"{host}.upstream.test"), "-w", STATUS_MARK + "%{http_code} %{local_port}"
    )
    status, port = r.stdout.rpartition(STATUS_MARK)[2].split()
    assert status == ("403" if host == "block" else "200"), r.stdout
    client = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        lines = (dlp_dir / "access.jsonl").read_text().splitlines()
        entries = [json.loads(line) for line in lines if client in line]
        if any(e["type"] == "http" for e in entries) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    (entry,) = [e for e in entries if e["type"] == "http"]
    assert entry["url"] == recorder.url(f"/logged-{host}?card={'*' * len(CARD)}&n=1", f"{host}.upstream.test")
    assert not [line for line in lines if client in line and CARD in line]


def test_alert_passes_and_logs_masked(inspecting: Bumper, upstream: Upstream) -> None:
    url = f"https://alert.upstream.test:{upstream.port}/echo?card={CARD}"
    status, body = fetch(inspecting, url, "-H", f"X-Key: {AWS_KEY}")
    assert (status, body) == (200, f"card={CARD}")  # responses are not scanned: the echo comes back whole
    lines = dlp_lines(inspecting, "alert.upstream.test", 2)[-2:]
    flow_id = r"[0-9a-f-]{36}"
    assert re.search(
        rf"dlp: flow {flow_id} to alert\.upstream\.test: card \*{{12}}1111 in the request {URL_PLACE} \(alert\)$",
        lines[0],
    ), lines
    assert re.search(
        rf"dlp: flow {flow_id} to alert\.upstream\.test: aws_key AKIA\*{{16}} \(20 chars\) "
        r"in the request header x-key \(alert\)$",
        lines[1],
    ), lines


def test_alert_passes_a_body_whole(inspecting: Bumper, upstream: Upstream) -> None:
    data = f"token={JWT}&ref={CARD}"
    status, body = fetch(inspecting, f"https://alert.upstream.test:{upstream.port}/echo", "--data-binary", data)
    assert (status, body) == (200, data)
    # The JWT is reported as soon as it is seen whole; the card, at the very end, once the body ends.
    lines = "\n".join(dlp_lines(inspecting, "alert.upstream.test", 2)[-2:])
    assert f"jwt {masked('jwt', JWT.encode())} in the request body (alert)" in lines
    assert "card ************1111 in the request body (alert)" in lines


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_redact_the_query_string(inspecting: Bumper, upstream: Upstream, http: str) -> None:
    status, body = fetch(inspecting, f"https://redact.upstream.test:{upstream.port}/echo?card={CARD}&n=1", http)
    assert (status, body) == (200, f"card={'*' * len(CARD)}&n=1")


def test_an_escaped_secret_in_the_url_is_caught(inspecting: Bumper, recorder: Recorder, upstream: Upstream) -> None:
    status, _ = fetch(inspecting, recorder.url(host="block.upstream.test", target=f"/escaped-card?c={ESCAPED_CARD}"))
    assert status == 403
    assert_nothing_arrived(inspecting, recorder, "/escaped-card")
    redacted = fetch(inspecting, f"https://redact.upstream.test:{upstream.port}/echo?card={ESCAPED_CARD}&n=1")
    assert redacted == (200, f"card={'*' * len(CARD)}&n=1")


def test_redact_a_header(inspecting: Bumper, upstream: Upstream) -> None:
    url = f"https://redact.upstream.test:{upstream.port}/headers"
    status, body = fetch(inspecting, url, "-H", f"X-Card: {CARD_SPACED}", "-H", "X-Other: fine")
    assert status == 200
    headers = json.loads(body)
    assert ["x-card", "*" * len(CARD_SPACED)] in headers and ["x-other", "fine"] in headers


def test_redact_keeps_the_other_values_of_a_repeated_header(inspecting: Bumper, upstream: Upstream) -> None:
    url = f"https://redact.upstream.test:{upstream.port}/headers"
    status, body = fetch(inspecting, url, "--http1.1", "-H", "X-Note: first", "-H", f"X-Note: card {CARD}")
    assert status == 200
    notes = [value for name, value in json.loads(body) if name == "x-note"]
    assert notes == ["first", f"card {'*' * len(CARD)}"]


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_redact_a_body(inspecting: Bumper, upstream: Upstream, http: str) -> None:
    data = f"ref={CARD}&key={AWS_KEY}&t={JWT}"
    wanted = data
    for secret in (CARD, AWS_KEY, JWT):
        wanted = wanted.replace(secret, "*" * len(secret))
    status, body = fetch(inspecting, f"https://redact.upstream.test:{upstream.port}/echo", http, "--data-binary", data)
    assert (status, body) == (200, wanted)
    status, body = fetch(
        inspecting, f"https://redact.upstream.test:{upstream.port}/upload", http, "--data-binary", data
    )
    assert json.loads(body) == {"length": len(data), "sha256": hashlib.sha256(wanted.encode()).hexdigest()}


FILLER = b"lorem ipsum dolor sit amet, consectetur adipiscing elit; "  # no digits, no token starts


def big_body(size: int, offset: int, secret: str) -> bytes:
    body = bytearray((FILLER * (size // len(FILLER) + 1))[:size])
    body[offset : offset + len(secret)] = secret.encode()
    body[offset - 1 : offset] = b" "
    body[offset + len(secret) : offset + len(secret) + 1] = b" "
    return bytes(body)


OFFSETS = [64 * KIB - 7, 16 * KIB * 100 - 3, 4 * MIB - 10, 5 * MIB - 64]  # across likely chunk boundaries


@pytest.mark.parametrize("offset", OFFSETS)
def test_a_secret_deep_in_a_5mib_upload_is_blocked_before_it_goes_upstream(
    inspecting: Bumper, recorder: Recorder, tmp_path: Path, offset: int
) -> None:
    path = tmp_path / "upload"
    path.write_bytes(big_body(5 * MIB, offset, AWS_KEY))
    target = f"/big-block-{offset}"
    status, body = fetch(
        inspecting, recorder.url(host="block.upstream.test", target=target), "--data-binary", f"@{path}"
    )
    assert status == 403 and "(aws_key)" in body, body
    for record in recorder.got(target):
        assert record.ended and not record.complete, record.target
        assert len(record.body) <= offset and AWS_KEY.encode() not in record.body


@pytest.mark.parametrize("http2", [False, True], ids=["chunked", "h2"])
def test_a_secret_deep_in_a_streamed_upload_of_unknown_length_is_redacted(
    inspecting: Bumper, upstream: Upstream, http2: bool
) -> None:
    offset = 3 * MIB + 16 * KIB - 5
    data = big_body(5 * MIB, offset, CARD)
    wanted = data.replace(CARD.encode(), b"*" * len(CARD))

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 10_000):  # pieces that do not line up with anything
            yield data[i : i + 10_000]

    context = client_tls_context(inspecting.ca_pem)
    with httpx.Client(proxy=inspecting.proxy, verify=context, http2=http2, timeout=60) as client:
        r = client.post(f"https://redact.upstream.test:{upstream.port}/upload", content=pieces())
    assert r.status_code == 200
    assert r.json() == {"length": len(data), "sha256": hashlib.sha256(wanted).hexdigest()}


def test_over_cap_block_refuses_bodies_past_the_scan_limit(
    inspecting: Bumper, recorder: Recorder, tmp_path: Path
) -> None:
    clean = tmp_path / "clean"
    clean.write_bytes((FILLER * 3000)[: 100 * KIB])
    status, body = fetch(
        inspecting, recorder.url(host="capblock.upstream.test", target="/cap-declared"), "--data-binary", f"@{clean}"
    )
    assert status == 403 and "request body over the DLP scan limit of 65536 bytes" in body, body
    assert_nothing_arrived(inspecting, recorder, "/cap-declared")  # known from Content-Length: refused at once
    status, body = fetch(
        inspecting,
        recorder.url(host="capblock.upstream.test", target="/cap-chunked"),
        "--http1.1", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{clean}",
    )  # fmt: skip
    assert status == 403 and "request body over the DLP scan limit" in body, body
    for record in recorder.got("/cap-chunked"):
        assert not record.complete and len(record.body) <= 64 * KIB
    small = tmp_path / "small"
    small.write_bytes((FILLER * 3000)[: 60 * KIB])
    status, body = fetch(
        inspecting, recorder.url(host="capblock.upstream.test", target="/cap-small"), "--data-binary", f"@{small}"
    )
    assert status == 200 and json.loads(body)["length"] == 60 * KIB


def test_over_cap_pass_lets_the_rest_through_unscanned(inspecting: Bumper, recorder: Recorder, tmp_path: Path) -> None:
    late = tmp_path / "late"
    late.write_bytes(big_body(256 * KIB, 200 * KIB, CARD))  # far past the 64k cap
    status, body = fetch(
        inspecting, recorder.url(host="cappass.upstream.test", target="/cap-pass-late"), "--data-binary", f"@{late}"
    )
    assert status == 200, body
    (record,) = recorder.got("/cap-pass-late")
    assert record.complete and bytes(record.body) == late.read_bytes()
    early = tmp_path / "early"
    early.write_bytes(big_body(256 * KIB, 10 * KIB, CARD))  # within the cap: scanned, blocked
    status, body = fetch(
        inspecting, recorder.url(host="cappass.upstream.test", target="/cap-pass-early"), "--data-binary", f"@{early}"
    )
    assert status == 403 and "(card)" in body


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_responses_true_stops_a_secret_the_upstream_sends(inspecting: Bumper, upstream: Upstream, http: str) -> None:
    # scan: [body] only, so the query string goes up unscanned and /echo sends the card back down.
    url = f"https://responses.upstream.test:{upstream.port}/echo?{CARD}"
    r = curl(inspecting, url, http)
    assert r.returncode != 0  # cut off: the headers had gone, the body is withheld
    assert CARD not in r.stdout
    line = dlp_lines(inspecting, "responses.upstream.test")[-1]
    assert line.endswith(f": card {'*' * 12}1111 in the response body (block)")


def test_responses_true_redacts_what_the_upstream_sends(inspecting: Bumper, upstream: Upstream) -> None:
    status, body = fetch(inspecting, f"https://respredact.upstream.test:{upstream.port}/echo?k={AWS_KEY}&c={CARD}")
    assert (status, body) == (200, f"k={'*' * len(AWS_KEY)}&c={'*' * len(CARD)}")


def test_traffic_without_secrets_passes_every_rule(inspecting: Bumper, upstream: Upstream) -> None:
    for host in ("block", "alert", "redact", "capblock", "cappass", "responses", "respredact"):
        status, body = fetch(inspecting, f"https://{host}.upstream.test:{upstream.port}/echo?order=12345&q=hello")
        assert (status, body) == (200, "order=12345&q=hello"), host
