"""The access_log addon: one JSON line per HTTP exchange and one per client connection (bumped,
spliced or blocked), to a file (0600, reopened on SIGUSR1) or stdout, turned on by --access-log or
named in a policy rule; every documented field present and right."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from mitmproxy.test import tutils

from bumper.addon import pretty_url
from bumper.clock import iso_utc
from tests.conftest import (
    ANY_PORT_POLICY,
    BUMPER,
    Bumper,
    Pki,
    Process,
    Upstream,
    client_tls_context,
    curl,
    open_tunnel,
    start_with_policy,
)

MIB = 1024 * 1024
CONNECTION_FIELDS = [
    "client", "listener", "user", "via", "connect_host", "sni", "upstream", "rule", "action", "upstream_sha256",
    "upstream_issuer", "verify",
    "mimic_sha256", "client_tls_version", "client_cipher", "upstream_tls_version", "upstream_cipher", "alpn",
    "upstream_connect_ms", "upstream_tls_ms", "client_tls_ms",
]  # fmt: skip
HTTP_KEYS = {
    "type", "time", "id", *CONNECTION_FIELDS, "method", "url", "url_normalized", "status", "bytes_up", "bytes_down",
    "request_ms", "blocked_by", "reason", "ref", "error",
}  # fmt: skip
CONNECTION_KEYS = {"type", "time", "id", *CONNECTION_FIELDS, "requests", "truncated", "duration_ms", "outcome"}
HIGH_PORT = 65000  # outside this module's policy ports, and above Linux's ephemeral ports (tests' upstreams)
POLICY = (
    "ports: ['1-61000']\n"
    "default: bump\n"
    "rules:\n"
    "  - name: refused-host\n"
    "    match: {host: [evil.test]}\n"
    "    action: block\n"
    "  - name: spliced\n"
    "    match: {sni: [splice.upstream.test]}\n"
    "    action: splice\n"
    "  - name: refused-sni\n"
    "    match: {sni: [refused.upstream.test]}\n"
    "    action: block\n"
    "  - name: filtered\n"
    "    match: {sni: [filtered.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - block: {urls: ['filtered.upstream.test/admin/*'], reason: no admin pages}\n"
    "  - name: inspected\n"
    "    match: {sni: [inspected.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - dlp: {action: block, scan: [body], responses: true}\n"
    "  - name: limited\n"
    "    match: {sni: [limited.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - upload_limit: {max_bytes: 100k}\n"
)


class AccessLog:
    """The JSON lines of an access log file, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        """The one entry that MATCH picks, once it is there (and no second one shows up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.entries() if match(e)]
            if found:
                time.sleep(0.1)  # a second line for the same thing would be a bug: let it show
                found = [e for e in self.entries() if match(e)]
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no matching entry in {self.path}:\n" + "\n".join(map(str, self.entries())))

    def http(self, client_port: int, url: str | None = None) -> dict[str, Any]:
        client = f"127.0.0.1:{client_port}"
        return self.wait(lambda e: e["type"] == "http" and e["client"] == client and url in (None, e["url"]))

    def connection(self, client_port: int) -> dict[str, Any]:
        client = f"127.0.0.1:{client_port}"
        return self.wait(lambda e: e["type"] == "connection" and e["client"] == client)

    def of_client(self, client_port: int) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["client"] == f"127.0.0.1:{client_port}"]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access-log")


@pytest.fixture(scope="module")
def logged(start_bumper, log_dir: Path) -> tuple[Bumper, AccessLog]:
    """bumper with --access-log FILE and a policy that bumps, splices and blocks."""
    path = log_dir / "access.jsonl"
    policy = log_dir / "policy.yaml"
    policy.write_text(POLICY)
    return start_bumper("--policy", str(policy), "--access-log", str(path)), AccessLog(path)


def sha256_hex(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


@dataclass
class Exchange:
    """One request through a CONNECT tunnel, as the client saw it."""

    der: bytes  # the leaf it was shown
    response: bytes
    client_port: int
    tls_version: str
    cipher: str


def request_over_tls(
    bumper: Bumper, host: str, port: int, target: str, context: ssl.SSLContext, version: ssl.TLSVersion | None = None
) -> Exchange:
    sock, reply = open_tunnel(bumper, host, port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    if version is not None:
        context.minimum_version = context.maximum_version = version
    with context.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        cipher = tls.cipher()
        assert cipher is not None
        return Exchange(der, response, tls.getsockname()[1], str(tls.version()), cipher[0])


def assert_iso_time_now(value: str) -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value), value
    when = datetime.fromisoformat(value)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 120


def assert_ms(value: Any) -> None:
    assert isinstance(value, int | float) and 0 <= value < 30_000, value


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_a_bumped_request_has_every_field_right(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, test_pki: Pki, version: ssl.TLSVersion
) -> None:
    bumper, log = logged
    context = client_tls_context(bumper.ca_pem, alpn=["http/1.1"])
    seen = request_over_tls(bumper, upstream.host, upstream.port, "/echo?fields", context, version)
    assert seen.response.endswith(b"\r\n\r\nfields")
    client_port = seen.client_port

    entry = log.http(client_port)
    assert HTTP_KEYS <= set(entry)  # every documented field (new ones may be added)
    assert entry["type"] == "http"
    assert_iso_time_now(entry["time"])
    assert re.fullmatch(r"[0-9a-f-]{36}", entry["id"])
    assert entry["client"] == f"127.0.0.1:{client_port}"
    assert entry["listener"] == f"explicit@127.0.0.1:{bumper.port}"
    assert (entry["connect_host"], entry["sni"]) == ("upstream.test", "upstream.test")
    assert entry["upstream"] == f"127.0.0.1:{upstream.port}"
    assert (entry["rule"], entry["action"], entry["verify"]) == ("default", "bump", "trusted")
    assert entry["upstream_sha256"] == upstream.leaf.cert.fingerprint(hashes.SHA256()).hex()
    assert entry["upstream_issuer"] == test_pki.root.cert.subject.rfc4514_string()
    assert entry["mimic_sha256"] == sha256_hex(seen.der)  # the certificate this client was shown
    assert entry["mimic_sha256"] != entry["upstream_sha256"]
    assert (entry["client_tls_version"], entry["client_cipher"]) == (seen.tls_version, seen.cipher)
    assert (
        entry["client_tls_version"] == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
    )
    assert entry["upstream_tls_version"] == "TLSv1.3"  # the upstream's own choice: bumper offers it 1.3
    assert isinstance(entry["upstream_cipher"], str) and entry["upstream_cipher"]
    assert entry["alpn"] == "http/1.1"
    for name in ("upstream_connect_ms", "upstream_tls_ms", "client_tls_ms", "request_ms"):
        assert_ms(entry[name])
    assert (entry["method"], entry["url"], entry["status"]) == (
        "GET",
        f"https://upstream.test:{upstream.port}/echo?fields",
        200,
    )
    assert entry["url_normalized"] == entry["url"]  # nothing to normalize in it
    assert (entry["bytes_up"], entry["bytes_down"]) == (0, len("fields"))
    assert [entry[k] for k in ("blocked_by", "reason", "ref", "error")] == [None] * 4

    conn = log.connection(client_port)
    assert CONNECTION_KEYS <= set(conn)
    assert {k: conn[k] for k in CONNECTION_FIELDS if not k.endswith("_ms")} == {
        k: entry[k] for k in CONNECTION_FIELDS if not k.endswith("_ms")
    }
    assert conn["id"] != entry["id"]
    assert_iso_time_now(conn["time"])
    assert conn["time"] <= entry["time"]  # the connection began before its request
    assert (conn["requests"], conn["outcome"]) == (1, "ok")
    assert_ms(conn["duration_ms"])
    assert len(log.of_client(client_port)) == 2


def curl_port(bumper: Bumper, url: str, *args: str) -> tuple[str, int]:
    r = curl(bumper, url, *args, "-w", "\n%{local_port}")
    assert r.returncode == 0, r.stderr
    body, _, port = r.stdout.rpartition("\n")
    return body, int(port)


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
@pytest.mark.parametrize("size", [1000, 3 * MIB + 17], ids=["small", "3mib"])
def test_bytes_up_and_down_are_the_bodies_sent_and_received(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, tmp_path: Path, http: str, size: int
) -> None:
    bumper, log = logged
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(size))
    url = upstream.url("/upload")
    body, port = curl_port(bumper, url, http, "--data-binary", f"@{payload}")
    assert json.loads(body)["length"] == size
    entry = log.http(port, url)
    assert (entry["method"], entry["status"]) == ("POST", 200)
    assert (entry["bytes_up"], entry["bytes_down"]) == (size, len(body))
    assert entry["alpn"] == ("h2" if http == "--http2" else "http/1.1")

    url = upstream.url(f"/bytes/{size}")
    body, port = curl_port(bumper, url, http, "-o", str(tmp_path / "download"))
    assert (tmp_path / "download").stat().st_size == size
    entry = log.http(port, url)
    assert (entry["method"], entry["status"], entry["bytes_up"], entry["bytes_down"]) == ("GET", 200, 0, size)


def test_a_spliced_connection_gets_a_connection_line(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, test_pki: Pki
) -> None:
    bumper, log = logged
    context = client_tls_context(test_pki.root_pem, alpn=["http/1.1"])  # the real root: no mimic here
    seen = request_over_tls(bumper, "splice.upstream.test", upstream.port, "/", context)
    assert seen.response.endswith(b"hello from upstream")
    assert sha256_hex(seen.der) == upstream.leaf.cert.fingerprint(hashes.SHA256()).hex()
    client_port = seen.client_port
    conn = log.connection(client_port)
    assert CONNECTION_KEYS <= set(conn)
    assert (conn["action"], conn["rule"], conn["sni"], conn["connect_host"]) == (
        "splice",
        "spliced",
        "splice.upstream.test",
        "splice.upstream.test",
    )
    assert conn["upstream"] == f"127.0.0.1:{upstream.port}"
    assert [conn[k] for k in ("mimic_sha256", "client_tls_version", "client_cipher", "alpn")] == [None] * 4
    assert conn["outcome"] == "ok" and conn["requests"] == 0  # bumper never saw the requests inside
    assert_ms(conn["duration_ms"])
    assert len(log.of_client(client_port)) == 1  # no http lines: nothing was decrypted


def test_a_connection_blocked_by_sni_gets_a_connection_line(
    logged: tuple[Bumper, AccessLog], upstream: Upstream
) -> None:
    bumper, log = logged
    r = curl(bumper, f"https://refused.upstream.test:{upstream.port}/", "-w", "%{local_port}")
    assert r.returncode != 0
    conn = log.connection(int(r.stdout))
    assert CONNECTION_KEYS <= set(conn)
    assert (conn["action"], conn["rule"], conn["sni"], conn["requests"]) == (
        "block",
        "refused-sni",
        "refused.upstream.test",
        0,
    )
    assert conn["outcome"] == "blocked by policy rule 'refused-sni'"
    assert conn["mimic_sha256"] is None
    assert len(log.of_client(int(r.stdout))) == 1


@pytest.mark.parametrize(
    ("host", "rule", "outcome"),
    [
        ("evil.test", "refused-host", "blocked by policy rule 'refused-host'"),
        ("upstream.test", "clients/ports", f"port {HIGH_PORT} is not in the policy's ports"),
    ],
    ids=["by-rule", "by-port"],
)
def test_a_connect_refused_at_connect_time_gets_a_connection_line(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, host: str, rule: str, outcome: str
) -> None:
    bumper, log = logged
    port = upstream.port if rule == "refused-host" else HIGH_PORT
    sock, reply = open_tunnel(bumper, host, port)
    assert reply.startswith(b"HTTP/1.1 403"), reply
    client_port = sock.getsockname()[1]
    sock.close()
    conn = log.connection(client_port)
    assert CONNECTION_KEYS <= set(conn)
    assert (conn["action"], conn["rule"], conn["connect_host"], conn["outcome"]) == ("block", rule, host, outcome)
    assert (conn["requests"], conn["sni"], conn["upstream"], conn["mimic_sha256"]) == (0, None, None, None)
    assert [e["type"] for e in log.of_client(client_port)] == ["connection"]


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_refusal_by_an_addon_has_the_pages_reference(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, http: str
) -> None:
    bumper, log = logged
    url = f"https://filtered.upstream.test:{upstream.port}/admin/users?id=3"
    body, port = curl_port(bumper, url, http, "-H", "Accept: application/json")
    page = json.loads(body)
    assert page["addon"] == "block"
    entry = log.http(port, url)
    assert entry["ref"] == page["reference"]
    assert (entry["status"], entry["blocked_by"], entry["reason"]) == (403, "block", page["error"])
    assert page["error"] == "no admin pages (URL filtered.upstream.test/admin/*)"
    assert (entry["rule"], entry["action"], entry["error"]) == ("filtered", "bump", None)
    assert entry["bytes_down"] == len(body)  # the page itself
    passed = log.http(curl_port(bumper, f"https://filtered.upstream.test:{upstream.port}/ok")[1])
    assert [passed[k] for k in ("blocked_by", "reason", "ref", "status")] == [None, None, None, 200]


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_response_cut_off_mid_stream_has_no_status_and_says_why(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, http: str
) -> None:
    bumper, log = logged
    url = f"https://inspected.upstream.test:{upstream.port}/echo?4111111111111111"  # /echo sends a card back
    r = curl(bumper, url, http, "-w", "%{local_port}")
    assert r.returncode != 0  # the headers went, the body was withheld: the response is cut off
    entry = log.http(int(r.stdout), url)
    assert (entry["status"], entry["blocked_by"]) == (None, "dlp")
    assert entry["reason"] == "the response body holds what looks like a secret (card)"
    assert re.fullmatch(r"[0-9a-f]{12}", entry["ref"]) and entry["error"]


@pytest.mark.parametrize(
    "args",
    [("--http1.1",), ("--http2",), ("--http1.1", "-H", "Transfer-Encoding: chunked")],
    ids=["declared-h1", "declared-h2", "chunked"],
)
def test_a_request_refused_while_its_body_streams_is_logged_with_its_reference(
    logged: tuple[Bumper, AccessLog], upstream: Upstream, tmp_path: Path, args: tuple[str, ...]
) -> None:
    bumper, log = logged
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 300 * 1024)
    url = f"https://limited.upstream.test:{upstream.port}/upload"
    body, port = curl_port(bumper, url, *args, "--data-binary", f"@{payload}", "-H", "Accept: application/json")
    page = json.loads(body)
    entry = log.http(port, url)
    assert (entry["status"], entry["blocked_by"], entry["ref"]) == (413, "upload_limit", page["reference"])
    assert entry["reason"] == page["error"] == "request body over the upload limit of 100k"
    assert entry["bytes_down"] == len(body)


def test_the_file_is_created_readable_by_its_owner_only(logged: tuple[Bumper, AccessLog], upstream: Upstream) -> None:
    bumper, log = logged
    _, port = curl_port(bumper, upstream.url("/"))
    log.http(port)
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_sigusr1_reopens_the_file_after_logrotate_moved_it(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    bumper = start_bumper("--access-log", str(path))
    log = AccessLog(path)
    _, first = curl_port(bumper, upstream.url("/?before"))
    log.http(first), log.connection(first)  # both lines written before the move
    rotated = tmp_path / "access.jsonl.1"
    path.rename(rotated)
    bumper.process.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)  # the signal is handled on bumper's event loop: let it run
    _, second = curl_port(bumper, upstream.url("/?after"))
    assert log.http(second)["url"] == upstream.url("/?after")
    log.connection(second)
    old = AccessLog(rotated).entries()
    assert {e["client"] for e in old} == {f"127.0.0.1:{first}"} and len(old) == 2
    assert {e["client"] for e in log.entries()} == {f"127.0.0.1:{second}"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert "Traceback" not in bumper.process.log


def test_sigusr1_without_a_move_keeps_appending(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    bumper = start_bumper("--access-log", str(path))
    log = AccessLog(path)
    _, first = curl_port(bumper, upstream.url("/"))
    log.connection(first)
    bumper.process.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    _, second = curl_port(bumper, upstream.url("/"))
    log.connection(second)
    assert [e["type"] for e in log.entries()] == ["http", "connection", "http", "connection"]


def test_an_access_log_named_in_a_rule_writes_to_its_path(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "rule-access.jsonl"
    bumper = start_with_policy(
        start_bumper,
        tmp_path,
        "rules:\n"
        "  - name: audited\n"
        "    match: {sni: [audited.upstream.test]}\n"
        "    action: bump\n"
        "    addons:\n"
        f"      - access_log: {{path: '{path}'}}\n",
    )
    log = AccessLog(path)
    url = f"https://audited.upstream.test:{upstream.port}/echo?audited"
    body, port = curl_port(bumper, url)
    assert body == "audited"
    entry = log.http(port, url)
    assert (entry["rule"], entry["action"], entry["status"], entry["bytes_down"]) == ("audited", "bump", 200, 7)
    conn = log.connection(port)
    assert (conn["rule"], conn["requests"], conn["outcome"]) == ("audited", 1, "ok")
    _, other = curl_port(bumper, f"https://other.upstream.test:{upstream.port}/")  # the default rule: no addons
    bumper.connection_line(other)  # bumper is done with that connection
    assert log.of_client(other) == []
    assert path.stat().st_mode & 0o777 == 0o600
    assert "Traceback" not in bumper.process.log


@pytest.fixture
def stdout_bumper(test_pki: Pki, tmp_path: Path) -> Iterator[tuple[Bumper, list[str]]]:
    """bumper with --access-log -, its stdout collected line by line (conftest's start_bumper drops stdout),
    in a time zone far from UTC (UTC+14), where a local time would show."""
    (tmp_path / "ca").mkdir()
    args = [
        BUMPER, "--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--resolve", "*.test=127.0.0.1",
        "--upstream-ca", str(test_pki.root_pem), "--policy", str(ANY_PORT_POLICY), "--access-log", "-",
    ]  # fmt: skip
    env = {**os.environ, "TZ": "LINT-14"}  # POSIX TZ: a zone named LINT, 14 hours east of UTC
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    stdout: list[str] = []

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stdout.append(line.rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    process = Process(proc)
    try:
        port = int(process.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1))
        yield Bumper(process, port, tmp_path / "ca"), stdout
    finally:
        process.stop()


def test_access_log_to_stdout(stdout_bumper: tuple[Bumper, list[str]], upstream: Upstream) -> None:
    bumper, stdout = stdout_bumper
    body, port = curl_port(bumper, upstream.url("/echo?stdout"))
    assert body == "stdout"
    bumper.connection_line(port)
    deadline = time.monotonic() + 10
    while len(stdout) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    entries = [json.loads(line) for line in stdout]  # nothing but JSON lines on stdout
    assert [(e["type"], e["client"]) for e in entries] == [
        ("http", f"127.0.0.1:{port}"),
        ("connection", f"127.0.0.1:{port}"),
    ]
    assert entries[0]["url"] == upstream.url("/echo?stdout") and entries[0]["bytes_down"] == 6
    assert HTTP_KEYS <= set(entries[0]) and CONNECTION_KEYS <= set(entries[1])
    assert not any(line.startswith("{") for line in bumper.process.lines)  # and none on stderr


def test_both_logs_write_one_utc_clock(stdout_bumper: tuple[Bumper, list[str]], upstream: Upstream) -> None:
    """The stderr log's lines and the access log's times: the same notation, in UTC with its zone."""
    bumper, stdout = stdout_bumper
    _, port = curl_port(bumper, upstream.url("/"))
    line = bumper.connection_line(port)
    deadline = time.monotonic() + 10
    while len(stdout) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)

    times = [line.split(" ", 1)[0], *(json.loads(entry)["time"] for entry in stdout)]

    assert len(times) == 3, stdout
    for value in times:
        assert_iso_time_now(value)
        assert datetime.fromisoformat(value).utcoffset() == timedelta(0), value


@pytest.mark.parametrize(
    "host_header", [None, "", "site.test", "Site.Test:8443", "[::1]:99", "bücher.example", "a b", "a:b:c", "host:99999"]
)
@pytest.mark.parametrize("scheme,port", [("https", 443), ("http", 80), ("https", 8443)])
def test_the_logged_url_is_mitmproxys_pretty_url(host_header: str | None, scheme: str, port: int) -> None:
    """The log reads each Host header through a shared cache; what it writes must not change."""
    request = tutils.treq(scheme=scheme.encode(), host=b"origin.test", port=port, path=b"/p?q=1", authority=b"")
    request.headers.pop("Host", None)
    if host_header is not None:
        request.headers["Host"] = host_header
    assert pretty_url(request) == pretty_url(request) == request.pretty_url
    connect = tutils.treq(method=b"CONNECT", authority=b"origin.test:443", path=b"")
    assert pretty_url(connect) == connect.pretty_url == "origin.test:443"


def test_times_are_written_as_datetime_writes_them() -> None:
    """bumper.clock.iso_utc stands in for datetime.isoformat on every line: same rounding, same text."""
    rng = random.Random(8)
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)]
    stamps += [s + f for s in (1_764_700_000.0, 0.0) for f in (0.0, 0.0004995, 0.0005, 0.9994999, 0.9995, 0.9999996)]
    for stamp in stamps:
        expected = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert iso_utc(stamp) == expected, stamp


def test_an_issuer_cryptography_cannot_read_is_logged_as_its_der(
    logged: tuple[Bumper, AccessLog], start_upstream, test_pki: Pki
) -> None:
    """An intermediate whose subject holds an ObjectDescriptor: the leaf's issuer, which the access
    log names, is written as DER instead of failing the addon."""
    from tests.test_hostile import behind_an_odd_intermediate, odd_subject

    bumper, log = logged
    upstream = start_upstream(behind_an_odd_intermediate(test_pki.root, "odd.upstream.test"), host="odd.upstream.test")
    _, client_port = curl_port(bumper, upstream.url("/"))
    assert log.http(client_port)["upstream_issuer"] == "DER " + odd_subject("odd intermediate", 7).hex()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of its own (the test runs as root), to be filled up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        # Lazily: bumper, stopped at the end of the session, may still hold the file open.
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_drops_whole_lines_with_one_warning_and_bumper_keeps_serving(
    start_bumper, upstream: Upstream, small_disk: Path
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * 52 * 1024)  # room left for a dozen lines or so
    path = small_disk / "access.jsonl"
    bumper = start_bumper("--access-log", str(path))
    full = "access log: cannot write"
    # Requests until the disk is full (a flush at most FLUSH_DELAY after its lines), and well past it.
    for _ in range(30):
        r = curl(bumper, upstream.url("/[1-10]"), "-o", "/dev/null", "-w", "%{http_code} ")
        assert r.stdout.split() == ["200"] * 10, r.stderr  # served throughout
        if full in bumper.process.log:
            break
    else:
        raise AssertionError(f"the disk never filled up: {os.statvfs(small_disk)}")
    time.sleep(0.3)  # lines dropped, not kept for later
    r = curl(bumper, upstream.url("/[1-10]"), "-o", "/dev/null", "-w", "%{http_code} ")
    assert r.stdout.split() == ["200"] * 10, r.stderr
    time.sleep(0.3)
    assert sum(full in line for line in bumper.process.lines) == 1, bumper.process.log  # one warning, not one a line
    filler.unlink()  # room again: the next lines are written, and what was lost is said once
    r = curl(bumper, upstream.url("/after"))
    assert r.stdout == "hello from upstream", r.stderr
    match = bumper.process.wait_for_line(r"access log: (\d+) lines lost \(ENOSPC\); .* written again")
    assert int(match.group(1)) >= 20
    deadline = time.monotonic() + 10
    while '"/after"' not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = path.read_text()
    assert text.endswith("\n")
    entries = [json.loads(line) for line in text.splitlines()]  # no line split, none glued to a half line
    assert entries[-1]["type"] == "connection" and entries[-2]["url"].endswith("/after")
    assert "Traceback" not in bumper.process.log


def test_a_workers_number_is_written_after_the_connections_fields() -> None:
    """`"worker": N` where it has always been, given to each line by its writer (no process-wide setting)."""
    from bumper.proxy.records import json_line

    assert json_line({"type": "x"}, '"client":"c"', {"z": 1}, 2) == '{"type":"x","client":"c","worker":2,"z":1}\n'
    assert json_line({"type": "x"}, '"client":"c"', {"z": 1}) == '{"type":"x","client":"c","z":1}\n'


def test_a_half_line_that_cannot_be_cut_back_is_ended_before_the_next_line(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a full disk took the beginning of a line and the file cannot be cut back to the last whole
    line (another worker appended since, or stdout is a terminal: here ftruncate refuses), the next
    write starts with a newline: the half line stands alone, and no line is glued onto it."""
    import asyncio

    from bumper_addons import access_log

    filler = small_disk / "filler"
    filler.write_bytes(b"x" * 60 * 1024)
    path = small_disk / "access.jsonl"
    log = access_log.AccessLog(access_log.AccessLogSettings(path=str(path)))

    def refused(fd: int, length: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(access_log.os, "ftruncate", refused)

    async def write(lines: list[str]) -> None:
        for line in lines:
            log._write(line)
        log._flushed()

    asyncio.run(write([json.dumps({"n": n, "pad": "y" * 1500}) + "\n" for n in range(10)]))
    lines = path.read_text().split("\n")
    assert [json.loads(line)["n"] for line in lines[:-1]] == [0, 1] and lines[-1].startswith('{"n": 2')  # the half
    filler.unlink()
    asyncio.run(write([json.dumps({"n": "after"}) + "\n"]))
    lines = path.read_text().split("\n")
    assert lines[2].startswith('{"n": 2') and json.loads(lines[3]) == {"n": "after"} and lines[4:] == [""]
    log.done()
