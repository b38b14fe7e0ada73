"""What bumper answers a client itself: every kind of answer through the real proxy, in plain text,
JSON and HTML by the client's Accept header, and never mitmproxy's own page."""

from __future__ import annotations

import contextlib
import html
import json
import re
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from tests import pki
from tests.conftest import Bumper, Pki, Upstream, listening_socket, tcp_server

ADDONS_FIXTURE = Path(__file__).with_name("addons_fixture")
REFUSED_PORT = 65535  # outside the policy's ports
FORMATS = {"text": None, "json": "application/json", "html": "text/html"}
CONTENT_TYPES = {"text": "text/plain; charset=utf-8", "json": "application/json", "html": "text/html; charset=utf-8"}
REFERENCE = "[0-9a-f]{{12}}"  # a regular expression, braces doubled for the cases' format()

POLICY = f"""\
ports: ['1-{REFUSED_PORT - 1}']
default: bump
rules:
  - name: no-evil
    match: {{host: [evil.test]}}
    action: block
  - name: guarded
    match: {{sni: [selfsigned.test]}}
    action: bump
    on_upstream_error: block
  - name: refusing
    match: {{sni: [refused.upstream.test]}}
    action: bump
    addons:
      - block: {{domains: [refused.upstream.test], reason: not here}}
  - name: failing
    match: {{sni: [failing.upstream.test]}}
    action: bump
    addons:
      - boom: {{on_error: fail-closed}}
"""


@dataclass(frozen=True)
class Answer:
    version: str  # HTTP/1.1, HTTP/2
    status: int
    headers: dict[str, str]  # lower-case names
    body: str
    raw: str  # everything the client received, heads included


@dataclass(frozen=True)
class Expected:
    status: int
    heading: str
    fields: dict[str, str]  # each a regular expression the whole value must match; `error` first


@pytest.fixture(scope="module")
def house(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    policy = tmp_path_factory.mktemp("replies") / "policy.yaml"
    policy.write_text(POLICY)
    return start_bumper("--policy", str(policy), "--addons", str(ADDONS_FIXTURE))


@pytest.fixture(scope="module")
def selfsigned(start_upstream) -> Upstream:
    return start_upstream(pki.self_signed_leaf("selfsigned.test"), host="selfsigned.test")


@pytest.fixture(scope="module")
def closed_port() -> int:
    s = listening_socket()
    port = s.getsockname()[1]
    s.close()  # nobody listens here now
    return port


@pytest.fixture(scope="module")
def silent_origin() -> Iterator[int]:
    """A plain-HTTP origin that reads the request and closes without an answer."""

    def handle(conn: socket.socket) -> None:
        read_head(conn)

    yield from tcp_server(handle, max_connections=100)


def read_head(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
        data += chunk


def read_h2_request(conn: socket.socket) -> None:
    """Read h2 frames until the client's HEADERS frame (type 1) has arrived."""
    data = conn.recv(65536)
    offset = 24  # the client's connection preface
    while True:
        while len(data) < offset + 9 and (chunk := conn.recv(65536)):
            data += chunk
        if len(data) < offset + 9 or data[offset + 3] == 1:
            return
        offset += 9 + int.from_bytes(data[offset : offset + 3])


READERS = {"http/1.1": read_head, "h2": read_h2_request}


@pytest.fixture(scope="module")
def silent_upstream(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], int]]:
    """TLS upstreams for *.upstream.test, one per ALPN protocol (http/1.1, h2) by its port, that read
    the request and close without an answer."""
    cert, key = test_pki.root.leaf("*.upstream.test").write(tmp_path_factory.mktemp("silent"), "silent")

    def silent(alpn: str, read: Callable[[socket.socket], None]) -> contextlib.AbstractContextManager[int]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols([alpn])

        def handle(conn: socket.socket) -> None:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    read(tls)
            except OSError:
                pass  # a client that gave up: the next one is what counts

        return contextlib.contextmanager(tcp_server)(handle, 100)

    with contextlib.ExitStack() as servers:
        ports = {alpn: servers.enter_context(silent(alpn, read)) for alpn, read in READERS.items()}
        yield ports.__getitem__


def parse(raw: bytes) -> Answer:
    """The last response in RAW: curl -i shows the CONNECT's answer (and any 100 Continue) first."""
    text = raw.decode()
    rest = text
    while True:
        head, _, body = rest.partition("\r\n\r\n")
        if not body.startswith("HTTP/"):
            break
        rest = body
    status_line, *header_lines = head.split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    version, status = status_line.split()[:2]
    return Answer(version, int(status), headers, body, text)


def through_curl(bumper: Bumper, url: str, accept: str | None, *args: str, proxy: bool = True) -> Answer:
    accept_args = ["-H", f"Accept: {accept}"] if accept else []  # none: curl's own, */*
    proxy_args = ["-x", bumper.proxy, "--cacert", str(bumper.ca_pem)] if proxy else []
    r = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "30", *proxy_args, *accept_args, *args, url],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return parse(r.stdout)


def through_socket(bumper: Bumper, request: str, accept: str | None) -> Answer:
    """REQUEST (its head, without the blank line) sent as is: for CONNECT, whose answer's body curl
    does not show, and for requests no client would send."""
    head = request + (f"\r\nAccept: {accept}" if accept else "") + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        sock.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        length = int(re.search(rb"\r\ncontent-length: *(\d+)", data, re.I)[1])  # type: ignore[index]
        while len(data.partition(b"\r\n\r\n")[2]) < length and (chunk := sock.recv(65536)):
            data += chunk
    return parse(data)


FILE_PATH = re.compile(r"(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]*")


def check(answer: Answer, expected: Expected, fmt: str) -> None:
    assert answer.status == expected.status, answer.raw
    assert answer.headers["content-type"] == CONTENT_TYPES[fmt], answer.raw
    assert answer.headers["cache-control"] == "no-store", answer.raw
    assert "mitmproxy" not in answer.raw.lower()
    # Nothing of bumper's insides: no traceback, no file of the machine (a URL's path is no file).
    assert "Traceback" not in answer.raw and not FILE_PATH.search(answer.body), answer.body
    if fmt == "json":
        said = json.loads(answer.body)
    elif fmt == "html":
        assert answer.body.startswith("<!doctype html>") and f"<h1>{expected.heading}</h1>" in answer.body
        rows = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", answer.body)
        said = {name: html.unescape(value) for name, value in rows}
    else:
        first, *lines = answer.body.splitlines()
        assert first.startswith("bumper: "), answer.body
        said = {"error": first.removeprefix("bumper: "), **dict(line.split(": ", 1) for line in lines)}
    assert list(said) == list(expected.fields), answer.body  # these, in this order
    for name, pattern in expected.fields.items():
        assert re.fullmatch(pattern, said[name]), (name, said[name], pattern)


@dataclass(frozen=True)
class Case:
    """One kind of answer. ASK is a URL for curl, or else a request head for a raw socket; it, ERROR
    and FIELDS take the lab's values ({closed} ...). ERROR is said exactly, but for a trailing "…",
    which stands for any rest; FIELDS are regular expressions."""

    ask: str
    status: int
    heading: str
    error: str
    fields: dict[str, str] = field(default_factory=dict)
    curl_args: tuple[str, ...] = ()
    through_proxy: bool = True


BLOCKED, UNREACHABLE, NO_ANSWER, BAD = "Blocked by bumper", "Cannot connect", "No valid response", "Bad request"
CONNECT_FAILED = "cannot connect to nobody.test:{closed}: [Errno 111] Connect call failed …"
SMUGGLING = (
    "bad request: Received message with both transfer-encoding and content-length headers from client, "
    "refusing to prevent request smuggling attacks."  # without mitmproxy's advice about its options
)
NOT_A_PROXY_REQUEST = "Not a proxy request"
FOR_THE_PROXY = (
    "not a proxy request: this port is a proxy; ask it for absolute URLs "
    "(curl -x http://127.0.0.1:{proxy} https://example.com/)"
)
ADMIN_OFF = re.escape("off (start bumper with --admin HOST:PORT for the CA onboarding page, /healthz, /metrics)")
CASES = {
    "connect-blocked-by-a-rule": Case(
        "CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443",
        403, BLOCKED, "CONNECT to evil.test:443 blocked by policy rule 'no-evil'",
    ),
    "connect-to-a-port-outside-the-policys": Case(
        f"CONNECT upstream.test:{REFUSED_PORT} HTTP/1.1",
        403, BLOCKED,
        f"CONNECT to upstream.test:{REFUSED_PORT} refused: port {REFUSED_PORT} is not in the policy's ports",
    ),
    "connect-to-a-refused-destination": Case(
        "CONNECT 0.0.0.0:{closed} HTTP/1.1", 403, BLOCKED,
        "destination 0.0.0.0:{closed} refused by policy (unspecified; internal ranges need the policy's "
        "destinations: allow)",
    ),
    "http-to-a-refused-destination": Case(
        "http://0.0.0.0:{closed}/", 403, BLOCKED,
        "destination 0.0.0.0:{closed} refused by policy (unspecified; internal ranges need the policy's "
        "destinations: allow)",
    ),
    "connect-to-nobody": Case("CONNECT nobody.test:{closed} HTTP/1.1", 502, UNREACHABLE, CONNECT_FAILED),
    "http-blocked-by-a-rule": Case(
        "http://evil.test:{origin}/", 403, BLOCKED, "request to evil.test:{origin} blocked by policy rule 'no-evil'"
    ),
    "http-to-nobody": Case("http://nobody.test:{closed}/", 502, UNREACHABLE, CONNECT_FAILED),
    "http-origin-without-an-answer": Case(
        "http://plain.test:{origin}/", 502, NO_ANSWER,
        "no valid response from plain.test:{origin}: server closed connection",
    ),
    "http-to-the-proxy-itself": Case(
        "http://127.0.0.1:{proxy}/", 403, BLOCKED,
        "destination 127.0.0.1:{proxy} refused by policy (bumper's own listening address, a proxy loop: "
        "no destinations: allow lifts it)",
    ),
    "a-request-for-the-proxy-itself": Case(
        "http://127.0.0.1:{proxy}/", 400, NOT_A_PROXY_REQUEST, FOR_THE_PROXY, {"admin": ADMIN_OFF}, through_proxy=False
    ),
    "a-body-that-cannot-be-framed": Case(
        "POST http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nContent-Length: x",
        400, BAD, "bad request: invalid content-length header: 'x'",
    ),
    "no-destination": Case("GET / HTTP/1.1", 400, NOT_A_PROXY_REQUEST, FOR_THE_PROXY, {"admin": ADMIN_OFF}),
    "could-smuggle-another-request": Case(
        "POST http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3",
        400, BAD, SMUGGLING,
    ),
    "names-disagree": Case(
        "https://upstream.test:{port}/", 403, BLOCKED,
        "request refused: names disagree (CONNECT upstream.test, SNI upstream.test, Host hidden.test)",
        curl_args=("-H", "Host: hidden.test"),
    ),
    "upstream-certificate-blocked": Case(
        "https://selfsigned.test:{selfsigned}/", 502, BLOCKED, "upstream certificate failed verification",
        {"host": "selfsigned\\.test", "reason": "self_signed", "detail": ".+", "upstream_sha256": "{sha256}"},
    ),
    "addon-refusal": Case(
        "https://refused.upstream.test:{port}/", 403, BLOCKED, "not here (domain refused.upstream.test)",
        {"addon": "block", "reference": REFERENCE},
    ),
    "addon-failure": Case(
        "https://failing.upstream.test:{port}/", 502, "Inspection failed", "addon boom failed",
        {"addon": "boom", "reference": REFERENCE},
    ),
    "bumped-http1-upstream-without-an-answer": Case(
        "https://silent.upstream.test:{h1}/", 502, NO_ANSWER,
        "no valid response from silent.upstream.test:{h1}: server closed connection",
    ),
    "bumped-h2-upstream-without-an-answer": Case(
        "https://silent.upstream.test:{h2}/", 502, NO_ANSWER,
        "no valid response from silent.upstream.test:{h2}: peer closed connection",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def lab(
    house: Bumper,
    upstream: Upstream,
    selfsigned: Upstream,
    closed_port: int,
    silent_origin: int,
    silent_upstream: Callable[[str], int],
) -> dict[str, object]:
    """The values the cases name."""
    return {
        "proxy": house.port,
        "port": upstream.port,
        "selfsigned": selfsigned.port,
        "sha256": selfsigned.leaf.cert.fingerprint(hashes.SHA256()).hex().upper(),
        "closed": closed_port,
        "origin": silent_origin,
        "h1": silent_upstream("http/1.1"),
        "h2": silent_upstream("h2"),
    }


def ask(house: Bumper, case: Case, lab: dict[str, object], accept: str | None) -> Answer:
    what = case.ask.format(**lab)
    if what.startswith(("http://", "https://")):
        return through_curl(house, what, accept, *case.curl_args, proxy=case.through_proxy)
    return through_socket(house, what, accept)


def expected(case: Case, lab: dict[str, object]) -> Expected:
    said = case.error.format(**lab)
    pattern = re.escape(said.removesuffix("…")) + ".*" if said.endswith("…") else re.escape(said)
    fields = {name: value.format(**lab) for name, value in case.fields.items()}
    return Expected(case.status, case.heading, {"error": pattern, **fields})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CASES)
def test_every_answer_in_every_format(house: Bumper, lab: dict[str, object], name: str, fmt: str) -> None:
    case = CASES[name]
    check(ask(house, case, lab, FORMATS[fmt]), expected(case, lab), fmt)


def test_a_request_line_that_is_not_http_gets_plain_text(house: Bumper) -> None:
    """No Accept header can be read from it."""
    answer = through_socket(house, "GARBAGE", "application/json")
    check(answer, Expected(400, BAD, {"error": re.escape("bad request: Bad HTTP request line: b'GARBAGE'")}), "text")


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("connect-")])
def test_a_connect_refusal_is_one_line(house: Bumper, lab: dict[str, object], name: str) -> None:
    """What raw clients show their users of a CONNECT's answer."""
    assert ask(house, CASES[name], lab, None).body.count("\n") == 1


@pytest.mark.parametrize(
    "name",
    [
        "http-to-nobody",
        "http-origin-without-an-answer",
        "no-destination",
        "a-request-for-the-proxy-itself",
        "could-smuggle-another-request",
    ],
)
def test_instead_of_mitmproxys_page_http1_connections_end(house: Bumper, lab: dict[str, object], name: str) -> None:
    """As they did after mitmproxy's page: what else the client sent on the connection is no next request."""
    assert ask(house, CASES[name], lab, None).headers["connection"] == "close"


@pytest.mark.parametrize("version", ["http1", "h2"])
def test_the_answer_comes_in_the_clients_http_version(house: Bumper, lab: dict[str, object], version: str) -> None:
    """bumper speaks to the client as the upstream chose (ALPN): its answer too."""
    answer = ask(house, CASES[f"bumped-{version}-upstream-without-an-answer"], lab, None)
    assert answer.version == {"http1": "HTTP/1.1", "h2": "HTTP/2"}[version]
