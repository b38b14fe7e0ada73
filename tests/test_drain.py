"""SIGTERM drains: the listeners close at once, the connections open then finish (up to
--drain-timeout), bumper exits 0; a second SIGTERM or a Ctrl-C stops at once. Real clients through a
real bumper to the tests' upstream, and the signals sent as a service manager sends them."""

from __future__ import annotations

import hashlib
import http.client
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import BUMPER, Bumper, Upstream, client_tls_context, open_tunnel

TIMEOUT = 30
DRAINING = r"SIGTERM: draining, no new connections; (\d+) open"
DRAINED = "drained: every connection finished"
# A body far larger than every buffer between the upstream and the client (socket buffers, bumper's
# streaming above 1 MiB): while the client has read only its start, the download is in flight.
LARGE = 64 * 1024 * 1024


def tls_tunnel(bumper: Bumper, upstream: Upstream) -> ssl.SSLSocket:
    """A bumped TLS connection to UPSTREAM through BUMPER, trusting only bumper's CA."""
    raw, reply = open_tunnel(bumper, upstream.host, upstream.port, timeout=TIMEOUT)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return client_tls_context(bumper.ca_pem).wrap_socket(raw, server_hostname=upstream.host)


def get(sock: ssl.SSLSocket, upstream: Upstream, path: str) -> http.client.HTTPResponse:
    """Send GET PATH on SOCK, and the response once its head arrived (the body left to read)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {upstream.host}:{upstream.port}\r\n\r\n".encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def sigterm(bumper: Bumper) -> int:
    """SIGTERM to BUMPER; how many connections its drain line says are open."""
    bumper.process.proc.send_signal(signal.SIGTERM)
    return int(bumper.process.wait_for_line(DRAINING).group(1))


def exited(bumper: Bumper) -> str:
    """BUMPER's exit after a drain: code 0 and its last line; its log."""
    assert bumper.process.proc.wait(TIMEOUT) == 0, bumper.process.log
    bumper.process.wait_for_line("^bumper: stopped$")
    return bumper.process.log


@pytest.fixture
def draining(start_bumper) -> Iterator:
    """start_bumper with --drain-timeout SECONDS (each test's own bumper: the drain ends it)."""

    def start(seconds: str) -> Bumper:
        return start_bumper("--drain-timeout", seconds)

    yield start


def test_a_download_running_across_sigterm_completes_then_bumper_exits_0(draining, upstream: Upstream) -> None:
    bumper = draining("60")
    with tls_tunnel(bumper, upstream) as sock:
        response = get(sock, upstream, f"/bytes/{LARGE}")
        digest = hashlib.sha256(response.read(65536))

        assert sigterm(bumper) == 1
        while chunk := response.read(1 << 20):
            digest.update(chunk)

        assert digest.hexdigest() == response.getheader("x-sha256")
        assert bumper.process.proc.poll() is None  # the drain waits for the connection, not for the body
    log = exited(bumper)
    assert DRAINED in log
    assert "drain timed out" not in log
    assert f"CONNECT {upstream.host}:{upstream.port} " in log and "outcome=ok" in log


def test_new_connections_are_refused_while_draining(draining, upstream: Upstream) -> None:
    bumper = draining("60")
    with tls_tunnel(bumper, upstream) as sock:
        assert sigterm(bumper) == 1

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", bumper.port), timeout=TIMEOUT)

        assert get(sock, upstream, "/").read() == b"hello from upstream"  # the open one still served
    assert DRAINED in exited(bumper)


def test_a_keep_alive_client_is_told_to_close_after_its_next_response(draining, upstream: Upstream) -> None:
    """An idle keep-alive connection would hold the drain to its timeout: the response after SIGTERM
    says Connection: close, and the connection ends with it."""
    bumper = draining("600")  # more than the test's waits: only the close can end this drain in time
    with tls_tunnel(bumper, upstream) as sock:
        first = get(sock, upstream, "/")
        assert first.read() == b"hello from upstream"
        assert first.getheader("connection") is None
        assert sigterm(bumper) == 1

        second = get(sock, upstream, "/")

        assert second.read() == b"hello from upstream"
        assert second.getheader("connection") == "close"
        assert sock.recv(1) == b""  # bumper closed its side
    assert DRAINED in exited(bumper)


@pytest.mark.parametrize("seconds", ["1", "0"])
def test_a_connection_still_open_at_the_drain_timeout_is_cut_and_bumper_exits_0(
    draining, upstream: Upstream, seconds: str
) -> None:
    bumper = draining(seconds)
    with tls_tunnel(bumper, upstream) as sock:
        assert sigterm(bumper) == 1

        log = exited(bumper)

        assert f"drain timed out after {seconds}s (--drain-timeout): 1 connection cut" in log
        assert DRAINED not in log
        try:
            assert sock.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # cut without a close_notify: as good as an end


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_drain_stops_at_once(draining, upstream: Upstream, second: signal.Signals) -> None:
    bumper = draining("600")
    with tls_tunnel(bumper, upstream):
        assert sigterm(bumper) == 1

        bumper.process.proc.send_signal(second)

        log = exited(bumper)
    assert DRAINED not in log
    assert "drain timed out" not in log


def test_sigint_alone_stops_at_once_without_a_drain(draining, upstream: Upstream) -> None:
    bumper = draining("600")
    with tls_tunnel(bumper, upstream):
        bumper.process.proc.send_signal(signal.SIGINT)

        log = exited(bumper)
    assert "draining" not in log


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_bad_drain_timeout_is_a_configuration_error(tmp_path, value: str) -> None:
    result = subprocess.run(
        [BUMPER, "--ca", str(tmp_path), "--drain-timeout", value],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "--drain-timeout" in result.stderr
    assert "Traceback" not in result.stderr
