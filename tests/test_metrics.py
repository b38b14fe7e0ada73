"""/metrics on the admin listener: after known traffic through bumper (started by its CLI with
--admin), each counter moves by exactly what happened, as the connection's log line tells it; the
mimic cache's results across a restart; the handshake and mint histograms; the key pool's gauge."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bumper.proxy.metrics import Outcome, outcome_of
from bumper.proxy.state import ConnectionState
from tests import pki
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, curl, curl_direct, open_tunnel, start_with_policy

Sample = tuple[str, frozenset[tuple[str, str]]]
DAY = pki.datetime.timedelta(days=1)

POLICY = (
    "rules:\n"
    "  - name: spliced\n"
    "    match: {sni: [splice.upstream.test]}\n"
    "    action: splice\n"
    "  - name: blocked\n"
    "    match: {sni: [blocked.upstream.test]}\n"
    "    action: block\n"
    "  - name: filtered\n"
    "    match: {sni: [filtered.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - block:\n"
    "          urls: ['filtered.upstream.test/secret/*']\n"
    "          reason: not here\n"
    "  - name: broken\n"
    "    match: {sni: [broken.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - boom: {hook: response}\n"
)
FIXTURE_ADDONS = Path(__file__).with_name("addons_fixture")


class Admin:
    """bumper with --admin, and what its /metrics says."""

    def __init__(self, bumper: Bumper) -> None:
        self.bumper = bumper
        self.url = f"{bumper.admin}/metrics"

    def scrape(self) -> dict[Sample, float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def moved(self, action: Callable[[], object]) -> dict[Sample, float]:
        """Every sample that ACTION changed, by how much (new samples from 0)."""
        before = self.scrape()
        action()
        after = self.scrape()
        return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}


ADMIN = ("--admin", "127.0.0.1:0")


def start_admin(start_bumper, ca_dir: Path | None = None) -> Admin:
    return Admin(start_bumper(*ADMIN, ca_dir=ca_dir))


def of(moved: dict[Sample, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of NAME that moved, by their labels."""
    return {labels: value for (sample, labels), value in moved.items() if sample == name}


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def field(line: str, name: str) -> str:
    match = re.search(rf" {name}=(\S+)", line)
    assert match, line
    return match.group(1)


@pytest.fixture(scope="module")
def admin(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Admin:
    directory = tmp_path_factory.mktemp("metrics")
    return Admin(start_with_policy(start_bumper, directory, POLICY, *ADMIN, "--addons", str(FIXTURE_ADDONS)))


def run(admin: Admin, url: str, *args: str) -> tuple[dict[Sample, float], str]:
    """What fetching URL moved, and its connection's log line."""
    lines: list[str] = []

    def action() -> None:
        r = curl(admin.bumper, url, "-o", os.devnull, "-w", "%{local_port}", *args)
        lines.append(admin.bumper.connection_line(int(r.stdout)))

    return admin.moved(action), lines[0]


def connection_moved(moved: dict[Sample, float], line: str, outcome: Outcome) -> None:
    """The connection of LINE, and only it, was counted: on its listener, with its action, as OUTCOME."""
    listener, action = field(line, "listener"), field(line, "action").replace("-", "none")
    assert of(moved, "bumper_connections_total") == {labels(listener=listener, action=action, outcome=outcome): 1}
    requests = int(field(line, "requests"))
    expected = {labels(listener=listener, action=action): requests} if requests else {}
    assert of(moved, "bumper_requests_total") == expected


def test_a_bump_counts_its_connection_request_bytes_verdict_and_handshakes(admin: Admin, upstream: Upstream) -> None:
    moved, line = run(admin, upstream.url("/bytes/1234"))
    assert field(line, "action") == "bump" and field(line, "outcome") == "ok"
    connection_moved(moved, line, Outcome.OK)
    assert of(moved, "bumper_bytes_total") == {labels(direction="down"): 1234}
    assert of(moved, "bumper_upstream_verify_total") == {labels(result="ok"): 1}
    for leg in ("client", "upstream"):
        assert moved[("bumper_handshake_seconds_count", labels(leg=leg))] == 1
        assert moved[("bumper_handshake_seconds_sum", labels(leg=leg))] > 0
    # A mimic was shown: minted or from the cache, by what came before in this module.
    assert sum(of(moved, "bumper_mimic_cache_total").values()) == 1
    # The request body counts upwards.
    moved, line = run(admin, upstream.url("/echo"), "--data-binary", "x" * 300)
    connection_moved(moved, line, Outcome.OK)
    assert of(moved, "bumper_bytes_total") == {labels(direction="up"): 300, labels(direction="down"): 300}


def test_a_request_for_the_proxy_itself_is_a_client_error(admin: Admin) -> None:
    """`curl http://PROXY/` (no absolute URL): bumper's 400, counted as the client's error."""
    lines: list[str] = []

    def action() -> None:
        bumper = admin.bumper
        r = curl_direct(
            "127.0.0.1",
            bumper.port,
            "127.0.0.1",
            bumper.ca_pem,
            "-o",
            os.devnull,
            "-w",
            "%{http_code} %{local_port}",
            scheme="http",
        )
        status, client_port = r.stdout.split()
        assert status == "400", r.stdout + r.stderr
        lines.append(bumper.connection_line(int(client_port)))

    moved = admin.moved(action)
    assert "not a proxy request" in lines[0]
    connection_moved(moved, lines[0], Outcome.CLIENT_ERROR)


def test_a_splice_counts_its_connection_and_nothing_bumped(admin: Admin, upstream: Upstream) -> None:
    moved, line = run(admin, f"https://splice.upstream.test:{upstream.port}/")
    assert field(line, "action") == "splice"
    connection_moved(moved, line, Outcome.OK)
    for name in ("bumper_upstream_verify_total", "bumper_mimic_cache_total", "bumper_bytes_total"):
        assert of(moved, name) == {}, name
    assert ("bumper_handshake_seconds_count", labels(leg="client")) not in moved


def test_a_block_is_counted_as_blocked(admin: Admin, upstream: Upstream) -> None:
    moved, line = run(admin, f"https://blocked.upstream.test:{upstream.port}/")
    assert field(line, "action") == "block"
    connection_moved(moved, line, Outcome.BLOCKED)
    assert of(moved, "bumper_upstream_verify_total") == {}


def test_an_addon_refusal_is_counted_for_the_addon_and_the_connection(admin: Admin, upstream: Upstream) -> None:
    moved, line = run(admin, f"https://filtered.upstream.test:{upstream.port}/secret/x")
    assert field(line, "outcome") == "blocked"  # "blocked by block: not here"
    connection_moved(moved, line, Outcome.REFUSED)
    assert of(moved, "bumper_addon_refusals_total") == {labels(addon="block"): 1}
    assert of(moved, "bumper_addon_errors_total") == {}


def test_an_addon_error_is_counted_by_addon_and_hook(admin: Admin, upstream: Upstream) -> None:
    moved, line = run(admin, f"https://broken.upstream.test:{upstream.port}/")
    assert field(line, "outcome") == "ok"  # boom fails open: the flow goes on
    connection_moved(moved, line, Outcome.OK)
    assert of(moved, "bumper_addon_errors_total") == {labels(addon="boom", hook="response"): 1}
    assert of(moved, "bumper_addon_refusals_total") == {}


@pytest.fixture(scope="module")
def expired(start_upstream, test_pki: Pki) -> Upstream:
    leaf = test_pki.root.leaf("expired.test", not_before=pki.NOW - 90 * DAY, not_after=pki.NOW - DAY)
    return start_upstream(leaf, host="expired.test")


def test_a_failed_verification_is_counted_by_its_reason(admin: Admin, expired: Upstream) -> None:
    moved, line = run(admin, expired.url("/"))
    assert field(line, "verify") == "expired"
    connection_moved(moved, line, Outcome.CLIENT_ERROR)  # curl refuses the expired mimic, as it would the upstream
    assert of(moved, "bumper_upstream_verify_total") == {labels(result="expired"): 1}
    assert moved[("bumper_handshake_seconds_count", labels(leg="upstream"))] == 1
    assert ("bumper_handshake_seconds_count", labels(leg="client")) not in moved


def test_an_open_connection_is_active_until_it_ends(admin: Admin, upstream: Upstream) -> None:
    sock, reply = open_tunnel(admin.bumper, "upstream.test", upstream.port)
    try:
        assert reply.startswith(b"HTTP/1.1 200")
        listener = f"explicit@127.0.0.1:{admin.bumper.port}"
        assert admin.scrape()[("bumper_active_connections", labels(listener=listener))] == 1
    finally:
        client_port = sock.getsockname()[1]
        sock.close()
    admin.bumper.connection_line(client_port)
    assert admin.scrape()[("bumper_active_connections", labels(listener=listener))] == 0


def test_bytes_of_an_open_connection_count_before_it_ends(admin: Admin, upstream: Upstream) -> None:
    """A keep-alive connection's bytes show while it is open, and are not counted again at its end."""
    down = ("bumper_bytes_total", labels(direction="down"))
    sock, _ = open_tunnel(admin.bumper, "upstream.test", upstream.port)
    client_port = sock.getsockname()[1]
    with client_tls_context(admin.bumper.ca_pem).wrap_socket(sock, server_hostname="upstream.test") as tls:
        before = admin.scrape()[down]
        tls.sendall(b"GET /bytes/777 HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        received = b""
        while len(received.partition(b"\r\n\r\n")[2]) < 777:
            chunk = tls.recv(65536)
            assert chunk, received
            received += chunk
        assert admin.scrape()[down] == before + 777  # counted when its response was, the connection still open
    admin.bumper.connection_line(client_port)
    assert admin.scrape()[down] == before + 777


def _replace(path: Path, text: str) -> None:
    """One change the policy watcher sees once: a new file renamed over the old."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def test_policy_reloads_are_counted_by_result(admin: Admin) -> None:
    process = admin.bumper.process
    path = Path(process.proc.args[process.proc.args.index("--policy") + 1])
    good = path.read_text()

    def reloaded(how: Callable[[], object], marker: str) -> Callable[[], None]:
        """HOW makes bumper reload; the action is done once the log says MARKER once more."""

        def action() -> None:
            seen = process.log.count(marker)
            how()
            deadline = time.monotonic() + 10
            while process.log.count(marker) == seen:
                assert time.monotonic() < deadline, process.log
                time.sleep(0.05)

        return action

    moved = admin.moved(reloaded(lambda: process.proc.send_signal(signal.SIGHUP), "policy reloaded from"))
    assert of(moved, "bumper_policy_reloads_total") == {labels(result="ok"): 1}
    try:
        moved = admin.moved(reloaded(lambda: _replace(path, "default: maybe\n"), "policy not reloaded"))
        assert of(moved, "bumper_policy_reloads_total") == {labels(result="error"): 1}
    finally:
        reloaded(lambda: _replace(path, good), "policy reloaded from")()


def test_the_mimic_cache_mints_then_hits_memory_then_disk_after_a_restart(
    start_bumper, upstream: Upstream, ca_dir: Path
) -> None:
    first = start_admin(start_bumper, ca_dir=ca_dir)
    moved, _ = run(first, upstream.url("/"))
    assert of(moved, "bumper_mimic_cache_total") == {labels(result="minted"): 1}
    assert moved[("bumper_mimic_mint_seconds_count", frozenset())] == 1
    assert moved[("bumper_mimic_mint_seconds_sum", frozenset())] > 0
    # One mimic in each store: its certificate and key at least, under a 64th of each cap.
    cached = of(first.scrape(), "bumper_mimic_cache_bytes")
    assert 500 < cached[labels(store="memory")] < 32 * 1024**2 / 64
    assert 500 < cached[labels(store="disk")] < 256 * 1024**2 / 64
    moved, _ = run(first, upstream.url("/"))
    assert of(moved, "bumper_mimic_cache_total") == {labels(result="memory_hit"): 1}
    assert ("bumper_mimic_mint_seconds_count", frozenset()) not in moved
    assert not of(moved, "bumper_mimic_cache_bytes")  # a hit costs nothing more
    first.bumper.process.stop()

    again = start_admin(start_bumper, ca_dir=ca_dir)
    assert of(again.scrape(), "bumper_mimic_cache_bytes") == {  # the disk's rows, counted when opened
        labels(store="memory"): 0,
        labels(store="disk"): cached[labels(store="disk")],
    }
    moved, _ = run(again, upstream.url("/"))
    assert of(moved, "bumper_mimic_cache_total") == {labels(result="disk_hit"): 1}
    assert ("bumper_mimic_mint_seconds_count", frozenset()) not in moved
    assert of(again.scrape(), "bumper_mimic_cache_bytes") == cached


def test_every_metric_is_there_before_any_traffic(start_bumper) -> None:
    admin = start_admin(start_bumper)
    scraped = admin.scrape()
    names = {name for name, _ in scraped}
    for name in (
        "bumper_upstream_verify_total", "bumper_mimic_cache_total", "bumper_policy_reloads_total",
        "bumper_bytes_total", "bumper_handshake_seconds_count", "bumper_mimic_mint_seconds_count",
        "bumper_mimic_cache_bytes",
    ):  # fmt: skip
        assert name in names, name
    assert {labels for name, labels in scraped if name == "bumper_upstream_verify_total"} == {
        labels(result=r) for r in ("ok", "expired", "not_yet_valid", "self_signed", "unknown_issuer",
                                   "hostname_mismatch", "weak_key", "weak_signature", "bad_eku", "bad_chain",
                                   "bad_cert", "other")
    }  # fmt: skip
    # The key pool warms its usual types at start-up.
    deadline = time.monotonic() + 10
    while not all(admin.scrape().get(("bumper_keypool_keys", labels(type=t)), 0) >= 1 for t in ("rsa2048", "p256")):
        assert time.monotonic() < deadline, admin.scrape()
        time.sleep(0.1)


def _state(error: str | None, refused_by: str | None = None, target: str | None = "a.test:443") -> ConnectionState:
    state = ConnectionState(conn=None, client="127.0.0.1:1", target=target)  # type: ignore[arg-type]
    state.error, state.refused_by = error, refused_by
    return state


@pytest.mark.parametrize(
    ("error", "refused_by", "target", "expected"),
    [
        (None, None, "a.test:443", Outcome.OK),
        (None, None, None, Outcome.NO_REQUEST),
        ("blocked by policy rule 'x'", "policy", "a.test:443", Outcome.BLOCKED),
        (
            "upstream certificate failed verification (expired): blocked by rule 'x'",
            "on_upstream_error",
            "a",
            Outcome.BLOCKED,
        ),
        ("proxy authentication failed: no credentials", "proxy-auth", None, Outcome.UNAUTHENTICATED),
        ("blocked by dlp: a card number", "dlp", "a.test:443", Outcome.REFUSED),
        ("upstream connect failed: limit: connect within 10s (--upstream-timeout)", None, "a", Outcome.TIMEOUT),
        ("limit: no complete request within 10s (--request-timeout)", None, None, Outcome.TIMEOUT),
        ("limit: no data either way for 600s (--idle-timeout)", None, "a", Outcome.TIMEOUT),
        ("limit: request head over 65536 bytes (--max-header-bytes)", None, None, Outcome.LIMIT),
        ("upstream connect failed: [Errno 111] Connection refused", None, "a", Outcome.UPSTREAM_ERROR),
        ("upstream TLS failed: no certificate", "bumper", "a", Outcome.UPSTREAM_ERROR),
        ("client TLS failed: the client does not trust the proxy's certificate", None, "a", Outcome.CLIENT_ERROR),
        ("not TLS: the client sent non-TLS data inside the CONNECT tunnel", None, "a", Outcome.CLIENT_ERROR),
        ("bad request: Bad HTTP request line", None, None, Outcome.CLIENT_ERROR),
        (
            "not a proxy request: GET for the proxy itself (no host in the request target)",
            None,
            None,
            Outcome.CLIENT_ERROR,
        ),
        ("HTTP error: peer closed connection", None, "a", Outcome.HTTP_ERROR),
        ("addon dlp failed (fail-closed)", None, "a", Outcome.ERROR),
    ],
)
def test_outcome_classes(error: str | None, refused_by: str | None, target: str | None, expected: Outcome) -> None:
    assert outcome_of(_state(error, refused_by, target)) is expected


@pytest.mark.parametrize("admin", [None, "127.0.0.1:0"])
def test_the_metrics_addon_exists_only_with_admin(ca_dir: Path, admin: str | None) -> None:
    """Without --admin nothing counts for /metrics: the benchmark without it measures bumper without the cost."""
    from bumper.certs import ca as ca_files
    from bumper.proxy.admin import AdminConfig
    from bumper.proxy.listeners import Listener
    from bumper.proxy.master import ProxyConfig, build_master
    from bumper.upstream.tls import UpstreamTrust

    config = ProxyConfig(
        ca_dir,
        (Listener.parse("127.0.0.1:0"),),
        UpstreamTrust(),
        admin=AdminConfig.parse(admin, []) if admin else None,
    )

    async def built() -> bool:
        m = build_master(config, ca_files.load(ca_dir))  # mitmproxy's master wants a running loop
        try:
            return m.addons.get("metrics") is not None
        finally:
            await m.done()

    assert asyncio.run(built()) == (admin is not None)
