"""--upstream-idle-timeout: the upstream leg of an idle keep-alive connection is closed, the client's
stays, and its next request goes out on a new upstream connection, verified as the first was.

The upstream's /peer names the address and port each request came from: a new port is a new upstream
connection. The waits below only let a timeout of 1 s pass; nothing is timed."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from OpenSSL import SSL
from websockets.sync.client import connect as websocket_connect

from bumper.upstream.tls import drop_record_buffers
from tests.conftest import Bumper, Pki, Upstream, client_tls_context
from tests.hostile_peers import HostileServer, tunnel
from tests.pki import rsa_key, self_signed_leaf

QUICK = "1"  # seconds
PAST_IT = 2.5  # a wait past QUICK, with room for a loaded machine


@pytest.fixture(scope="module")
def quick(start_bumper: Callable[..., Bumper]) -> Bumper:
    return start_bumper("--upstream-idle-timeout", QUICK)


def response(tls: ssl.SSLSocket, host: str, path: str) -> tuple[bytes, bytes]:
    """One HTTP/1.1 keep-alive request on TLS: the response's status line and body (Content-Length)."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, body
        body += chunk
    return lines[0], body


def get(tls: ssl.SSLSocket, host: str, path: str) -> bytes:
    status, body = response(tls, host, path)
    assert status.startswith(b"HTTP/1.1 200"), (status, body)
    return body


def the_connection_line(bumper: Bumper) -> str:
    """The one connection line this test's client connection made."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in bumper.process.lines[bumper.process.test_start :] if " CONNECT " in line]
        if lines:
            time.sleep(0.2)  # a second one would be a second client connection: let it show
            lines = [line for line in bumper.process.lines[bumper.process.test_start :] if " CONNECT " in line]
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.05)
    raise AssertionError("no connection line")


def test_http1_next_request_goes_out_on_a_new_upstream_connection(quick: Bumper, upstream: Upstream) -> None:
    with tunnel(quick, upstream.host, upstream.port) as tls:
        first = get(tls, upstream.host, "/peer")
        assert get(tls, upstream.host, "/peer") == first  # within the timeout: the same upstream connection
        time.sleep(PAST_IT)
        second = get(tls, upstream.host, "/peer")
        assert second != first
        assert get(tls, upstream.host, "/peer") == second
        port = tls.getsockname()[1]
    line = quick.connection_line(port)
    assert "requests=4 " in line and "verify=trusted " in line and line.endswith("outcome=ok"), line


def test_requests_closer_than_the_timeout_keep_the_upstream_connection(quick: Bumper, upstream: Upstream) -> None:
    """The connection's one timer, armed at the first request's end, fires while requests keep coming
    (each gap under the timeout, the whole run over it) and moves on to the last one's end instead of
    closing the upstream leg; once they stop, it closes it."""
    with tunnel(quick, upstream.host, upstream.port) as tls:
        first = get(tls, upstream.host, "/peer")
        requests = 1
        started = time.monotonic()
        while time.monotonic() - started < 3 * float(QUICK):  # bounded: three timeouts' worth of requests
            time.sleep(0.3)
            assert get(tls, upstream.host, "/peer") == first
            requests += 1
        time.sleep(PAST_IT)
        assert get(tls, upstream.host, "/peer") != first
        port = tls.getsockname()[1]
    # Its line written before the next test starts looking for its own.
    line = quick.connection_line(port)
    assert f"requests={requests + 1} " in line and line.endswith("outcome=ok"), line


def test_http2_next_request_goes_out_on_a_new_upstream_connection(quick: Bumper, upstream: Upstream) -> None:
    context = client_tls_context(quick.ca_pem)
    with httpx.Client(proxy=quick.proxy, verify=context, http2=True, timeout=30) as client:
        first = client.get(upstream.url("/peer"))
        assert first.http_version == "HTTP/2"
        time.sleep(PAST_IT)
        second = client.get(upstream.url("/peer"))
        assert second.status_code == 200 and second.http_version == "HTTP/2"
        assert second.text != first.text
    # One client connection for both (httpx kept it): its line counts both requests.
    line = the_connection_line(quick)
    assert "requests=2 " in line and line.endswith("outcome=ok"), line


def test_zero_keeps_the_upstream_connection(start_bumper: Callable[..., Bumper], upstream: Upstream) -> None:
    bumper = start_bumper("--upstream-idle-timeout", "0")
    try:
        with tunnel(bumper, upstream.host, upstream.port) as tls:
            first = get(tls, upstream.host, "/peer")
            time.sleep(PAST_IT)
            assert get(tls, upstream.host, "/peer") == first
    finally:
        bumper.process.stop()


def test_a_websocket_is_not_an_idle_connection(quick: Bumper, upstream: Upstream) -> None:
    """After its 101, a connection is the WebSocket's: a quiet one keeps its upstream."""
    context = client_tls_context(quick.ca_pem)
    url = f"wss://{upstream.host}:{upstream.port}/ws"
    with websocket_connect(url, ssl=context, proxy=quick.proxy, open_timeout=15) as ws:
        ws.send("before")
        assert ws.recv(timeout=15) == "before"
        time.sleep(PAST_IT)
        ws.send("after")
        assert ws.recv(timeout=15) == "after"


@pytest.fixture
def switching_upstream(test_pki: Pki, tmp_path: Path) -> Iterator[HostileServer]:
    """An upstream that closes each connection after one response (keep-alive announced), whose
    certificate the test can swap between connections."""
    cert, key = test_pki.root.leaf("switch.hostile.test").write(tmp_path, "trusted")

    def answer(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    server = HostileServer(cert, key, answer)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("defect", "reason"),
    [("self-signed", b"self-signed certificate"), ("RSA-1024", b"EE certificate key too weak")],
)
def test_a_new_upstream_connection_that_fails_verification_is_refused(
    quick: Bumper, switching_upstream: HostileServer, test_pki: Pki, tmp_path: Path, defect: str, reason: bytes
) -> None:
    """The client trusts the mimic of the certificate it was first shown: when a later upstream
    connection shows one that fails verification, its handshake fails and the client gets a 502, not
    that upstream's answer under the old mimic."""
    host = "switch.hostile.test"
    with tunnel(quick, host, switching_upstream.port) as tls:
        assert get(tls, host, "/") == b"hello"
        if defect == "self-signed":
            switching_upstream.context.load_cert_chain(*self_signed_leaf(host).write(tmp_path, "untrusted"))
        else:
            switching_upstream.context.set_ciphers("DEFAULT:@SECLEVEL=0")  # Python refuses to load the key otherwise
            switching_upstream.context.load_cert_chain(
                *test_pki.root.leaf(host, key=rsa_key(1024)).write(tmp_path, "weak")
            )
        time.sleep(PAST_IT)  # the first upstream connection closed: bumper has seen it
        status, body = response(tls, host, "/")
        port = tls.getsockname()[1]
    assert status.startswith(b"HTTP/1.1 502") and reason in body, (status, body)
    assert switching_upstream.outcomes.count("sent all") == 1  # the first connection's answer, and no other
    line = quick.connection_line(port)
    assert f"outcome=upstream TLS failed: Certificate verify failed: {reason.decode()}" in line, line


def _flush(source: SSL.Connection, sink: SSL.Connection) -> None:
    """What SOURCE wrote to its outgoing BIO, into SINK's incoming one."""
    with contextlib.suppress(SSL.WantReadError):
        sink.bio_write(source.bio_read(65536))


def test_an_idle_tls_connection_gets_new_buffers_and_goes_on(test_pki: Pki) -> None:
    """drop_record_buffers on a real TLS 1.3 pair over memory BIOs, as mitmproxy drives them: not
    while bytes wait in a BIO, and after it the session carries data both ways as before."""
    leaf = test_pki.root.leaf("idle.test")
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    server_ctx.use_certificate(leaf.cert)
    server_ctx.use_privatekey(leaf.key)
    server, client = SSL.Connection(server_ctx), SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(4):  # TLS 1.3: two flights each way at most
        for side, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                side.do_handshake()
            _flush(side, other)
    client.sendall(b"waiting")  # in the client's outgoing BIO
    assert not drop_record_buffers(client)
    _flush(client, server)
    assert server.recv(100) == b"waiting"
    _flush(server, client)  # its session tickets, which the client takes with its next read
    with contextlib.suppress(SSL.WantReadError):
        client.recv(100)
    assert drop_record_buffers(client) and drop_record_buffers(server)
    client.sendall(b"after")
    _flush(client, server)
    assert server.recv(100) == b"after"
    server.sendall(b"and back")
    _flush(server, client)
    assert client.recv(100) == b"and back"
