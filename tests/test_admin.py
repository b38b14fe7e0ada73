"""The admin listener (--admin): probes, the metrics endpoint's framing, who may connect, and what a
peer costs it. The metrics' values are tests/test_metrics.py's, the onboarding page
tests/test_onboarding.py's."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import netns as namespaces
from tests.conftest import BUMPER, STARTED_BUMPERS, Bumper, Process, Upstream, curl, open_tunnel, start_with_policy
from tests.netns import Netns

TIMEOUT = 30


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """METHOD URL with http.client: status, headers (lower-case names), body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        conn.request(method, parts.path or "/", headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def admin_bumper(start_bumper) -> Bumper:
    return start_bumper("--admin", "127.0.0.1:0")


def test_healthz_and_readyz_answer_200_once_listening(admin_bumper: Bumper) -> None:
    assert get(admin_bumper.admin + "/healthz")[::2] == (200, b"ok\n")
    assert get(admin_bumper.admin + "/readyz")[::2] == (200, b"ready\n")


def test_metrics_speak_prometheus_text_and_openmetrics_by_accept(admin_bumper: Bumper) -> None:
    status, headers, _ = get(admin_bumper.admin + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    status, headers, body = get(
        admin_bumper.admin + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_every_answer_is_closed_uncached_and_unsniffed(admin_bumper: Bumper) -> None:
    _, headers, _ = get(admin_bumper.admin + "/healthz")
    assert headers["connection"] == "close"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"


def test_unknown_paths_are_404_and_other_methods_405(admin_bumper: Bumper) -> None:
    status, _, body = get(admin_bumper.admin + "/nope")
    assert status == 404 and b"admin listener" in body
    status, headers, _ = get(admin_bumper.admin + "/healthz", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_head_answers_the_headers_without_a_body(admin_bumper: Bumper) -> None:
    status, headers, body = get(admin_bumper.admin + "/healthz", method="HEAD")
    assert (status, headers["content-length"], body) == (200, "3", b"")


def test_curl_reads_the_probes(admin_bumper: Bumper) -> None:
    r = subprocess.run(
        ["curl", "-sS", "--fail", admin_bumper.admin + "/readyz"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0 and r.stdout == "ready\n", r.stderr


def test_an_oversized_request_head_is_closed_and_others_are_served_meanwhile(admin_bumper: Bumper) -> None:
    """A peer that sends nothing holds one of the 32 connections until the 10 s timeout, and one that
    sends a head without end is closed at 8 KiB: neither keeps /healthz from answering."""
    address = urlsplit(admin_bumper.admin)
    with (
        socket.create_connection((address.hostname, address.port), timeout=TIMEOUT) as silent,
        socket.create_connection((address.hostname, address.port), timeout=TIMEOUT) as endless,
    ):
        endless.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 16384)
        assert get(admin_bumper.admin + "/healthz")[0] == 200
        try:
            assert endless.recv(4096) == b""
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: a reset, as good as a close
        silent.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # still served when it does speak
        assert silent.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_proxy_does_not_carry_clients_to_its_admin_listener(start_bumper, tmp_path: Path) -> None:
    """Even with loopback allowed by the policy: the admin port is one of bumper's own listening
    addresses, never a destination."""
    bumper = start_with_policy(start_bumper, tmp_path, "default: bump\n", "--admin", "127.0.0.1:0")
    port = urlsplit(bumper.admin).port
    assert port is not None
    sock, reply = open_tunnel(bumper, "127.0.0.1", port)
    with sock:
        client_port = sock.getsockname()[1]
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert "bumper's own listening address" in bumper.connection_line(client_port)
    r = curl(bumper, f"http://127.0.0.1:{port}/metrics", "-w", "\n%{http_code}")
    assert r.stdout.endswith("\n403"), r.stdout
    assert "bumper_" not in r.stdout


# Readiness during the drain.


def test_readyz_is_503_while_draining_and_healthz_stays_200(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--admin", "127.0.0.1:0", "--drain-timeout", "60")
    admin = bumper.admin
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)  # keeps the drain going
    with sock:
        assert reply.startswith(b"HTTP/1.1 200"), reply
        bumper.process.proc.send_signal(signal.SIGTERM)
        bumper.process.wait_for_line(r"SIGTERM: draining")
        assert get(admin + "/readyz")[::2] == (503, b"not ready: draining (SIGTERM)\n")
        assert get(admin + "/healthz")[0] == 200
    assert bumper.process.proc.wait(TIMEOUT) == 0, bumper.process.log


# Configuration errors: exit 2, one line.


def run(*args: str, ca_dir: Path) -> subprocess.CompletedProcess[str]:
    ca_dir.mkdir(exist_ok=True)
    return subprocess.run(
        [BUMPER, "--ca", str(ca_dir), "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--admin", "0.0.0.0:9090"], "--admin 0.0.0.0:9090: not a loopback address; name the networks"),
        (["--admin", "[::]:9090"], "not a loopback address"),
        (["--admin", "admin.example:9090"], "'admin.example' is not an IP address"),
        (["--admin", "9090"], "expected HOST:PORT"),
        (["--admin", "127.0.0.1:99999"], "out of range"),
        (["--admin", "127.0.0.1:0", "--admin-allow", "10.0.0.0/33"], "--admin-allow '10.0.0.0/33': expected a network"),
        (["--admin-allow", "10.0.0.0/8"], "--admin-allow: without --admin"),
    ],
)
def test_a_bad_admin_option_is_a_configuration_error(tmp_path: Path, args: list[str], message: str) -> None:
    r = run(*args, ca_dir=tmp_path / "ca")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_admin_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("--admin", f"127.0.0.1:{port}", ca_dir=tmp_path / "ca")
    assert r.returncode == 2, r.stderr
    assert f"--admin 127.0.0.1:{port}: " in r.stderr and "in use" in r.stderr
    assert "Traceback" not in r.stderr


# Who may connect: in a namespace whose loopback carries other addresses, so that peers come from
# outside 127.0.0.0/8 and no packet can leave.

ALLOWED, OTHER = "10.0.0.1", "192.168.1.1"


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    with namespaces.namespace("bumper-admin") as ns:
        for address in (ALLOWED, OTHER):
            namespaces.ip("-n", ns.name, "addr", "add", f"{address}/32", "dev", "lo")
        yield ns


def get_from(source: str, port: int, path: str) -> bytes:
    """GET PATH from SOURCE's address to the admin listener at SOURCE:PORT (the caller is in the namespace)."""
    with socket.create_connection((source, port), timeout=TIMEOUT, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply


def test_only_loopback_and_admin_allow_may_connect(netns: Netns, tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    argv = ["ip", "netns", "exec", netns.name, BUMPER, "--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0"]
    argv += ["--admin", "0.0.0.0:0", "--admin-allow", "10.0.0.0/24"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    process = Process(proc)
    STARTED_BUMPERS.append(process)
    try:
        port = int(process.wait_for_line(r"bumper: admin listening on 0\.0\.0\.0:(\d+)").group(1))
        with netns.inside():
            assert get_from(ALLOWED, port, "/healthz").startswith(b"HTTP/1.1 200 OK")
            assert get_from("127.0.0.1", port, "/healthz").startswith(b"HTTP/1.1 200 OK")
            refused = get_from(OTHER, port, "/metrics")
        assert refused.startswith(b"HTTP/1.1 403 Forbidden"), refused
        assert b"bumper_" not in refused
        process.wait_for_line(rf"admin: refused {OTHER}, not in --admin-allow")
    finally:
        process.stop()
