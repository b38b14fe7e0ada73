"""Every limit through the live proxy: it fires on a hostile client or upstream, the connection ends
with one log line naming the limit and its setting, and a good client is served meanwhile.

Timeouts are configured small (a second or two), so no test sleeps long."""

from __future__ import annotations

import concurrent.futures
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, RstStreamFrame

from tests.conftest import Bumper, Upstream, client_tls_context, curl, open_tunnel, tcp_server
from tests.test_bad_input import read_http_response, read_until_closed, run_next_to_good_requests

ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def quick(start_bumper: Callable[..., Bumper]) -> Bumper:
    """bumper with every limit small enough to fire within a test."""
    return start_bumper(
        "--request-timeout", "1", "--client-hello-timeout", "1", "--upstream-timeout", "1",
        "--h2-max-streams", "5", "--h2-max-resets", "10", "--max-headers", "20",
        "--max-header-bytes", "8k", "--max-client-hello-bytes", "8k",
    )  # fmt: skip


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What SOCK received until bumper closed it, which must happen within SECONDS."""
    sock.settimeout(seconds)
    data = read_until_closed(sock)
    sock.settimeout(None)
    try:
        assert sock.recv(1) == b"", "still open"
    except (ConnectionResetError, TimeoutError) as e:
        assert not isinstance(e, TimeoutError), "bumper did not close the connection in time"
    return data


# Deadlines


def test_slowloris_request_head(quick: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock = socket.create_connection(("127.0.0.1", quick.port))
        for byte in b"CONNECT upstream.test:":  # a byte at a time, never a whole request
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        closed_within(sock, 3)
        return sock.getsockname()[1]

    line = run_next_to_good_requests(quick, upstream, bad)
    assert "CONNECT - " in line
    assert line.endswith("outcome=limit: no complete request within 1s (--request-timeout)")


def test_no_client_hello(quick: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock, reply = open_tunnel(quick, upstream.host, upstream.port)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.sendall(b"\x16\x03")  # not even enough to tell TLS
        closed_within(sock, 3)
        return sock.getsockname()[1]

    line = run_next_to_good_requests(quick, upstream, bad)
    assert f"CONNECT {upstream.host}:{upstream.port} " in line
    assert line.endswith("outcome=limit: no ClientHello within 1s (--client-hello-timeout)")


@pytest.fixture
def silent_upstream() -> Iterator[int]:
    """An upstream that accepts the connection, reads the ClientHello, and never answers."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass

    yield from tcp_server(handle)


def test_upstream_that_never_finishes_the_tls_handshake(
    quick: Bumper, upstream: Upstream, silent_upstream: int
) -> None:
    def bad() -> int:
        sock, reply = open_tunnel(quick, "silent.test", silent_upstream)
        port = sock.getsockname()[1]
        assert reply.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        with pytest.raises(OSError):
            client_tls_context(quick.ca_pem).wrap_socket(sock, server_hostname="silent.test")
        assert time.monotonic() - started < 4  # the upstream would have held it 5s
        return port

    line = run_next_to_good_requests(quick, upstream, bad)
    assert "outcome=limit: no TLS handshake with the upstream within 1s (--upstream-timeout)" in line


@pytest.fixture
def unanswered_syn() -> Iterator[int]:
    """A port whose listen backlog is full: the kernel drops further SYNs, so a connect hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    yield port
    for s in [*fillers, server]:
        s.close()


def test_upstream_tcp_connect_that_hangs(quick: Bumper, upstream: Upstream, unanswered_syn: int) -> None:
    def bad() -> int:
        sock = socket.create_connection(("127.0.0.1", quick.port), timeout=10)
        sock.sendall(f"CONNECT hang.test:{unanswered_syn} HTTP/1.1\r\n\r\n".encode())
        reply = read_http_response(sock)
        assert reply.startswith(b"HTTP/1.1 502"), reply
        assert b"limit: no TCP connection to the upstream within 1s (--upstream-timeout)" in reply
        return sock.getsockname()[1]

    line = run_next_to_good_requests(quick, upstream, bad)
    assert "outcome=limit: no TCP connection to the upstream within 1s (--upstream-timeout)" in line


@pytest.mark.parametrize("kind", ["bumped tunnel", "keep-alive plain http"])
def test_idle_connection(start_bumper: Callable[..., Bumper], upstream: Upstream, kind: str) -> None:
    idle = start_bumper("--idle-timeout", "1")
    plain_port = None

    def bad() -> int:
        nonlocal plain_port
        if kind == "bumped tunnel":
            raw, reply = open_tunnel(idle, upstream.host, upstream.port)
            sock = client_tls_context(idle.ca_pem).wrap_socket(raw, server_hostname=upstream.host)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
        else:
            sock = socket.create_connection(("127.0.0.1", idle.port))
            sock.sendall(f"GET http://plain.test:{plain_port}/ HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed_within(sock, 4)  # nothing more either way: closed after a second
        return sock.getsockname()[1]

    def answer(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.settimeout(5)
        try:
            conn.recv(4096)  # held open until bumper closes it
        except OSError:
            pass

    servers = tcp_server(answer)
    plain_port = next(servers)
    try:
        line = run_next_to_good_requests_on(idle, upstream, bad, "HTTP" if kind != "bumped tunnel" else "CONNECT")
    finally:
        next(servers, None)
    assert line.endswith("requests=1 outcome=limit: no data either way for 1s (--idle-timeout)")


def run_next_to_good_requests_on(bumper: Bumper, upstream: Upstream, bad: Callable[[], int], kind: str) -> str:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bad_port = pool.submit(bad)
        r = curl(bumper, upstream.url("/"))
        assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
        port = bad_port.result(timeout=30)
    return bumper.connection_line(port, kind=kind)


# Sizes and counts


def huge_head(target: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: upstream.test\r\n".encode() + b"X-Big: " + b"a" * 20000 + extra


@pytest.mark.parametrize("where", ["CONNECT line", "plain http head", "head in a bumped tunnel"])
def test_request_head_over_the_size_limit(quick: Bumper, upstream: Upstream, where: str) -> None:
    before = upstream.requests

    def bad() -> int:
        if where == "head in a bumped tunnel":
            raw, _ = open_tunnel(quick, upstream.host, upstream.port)
            sock = client_tls_context(quick.ca_pem).wrap_socket(raw, server_hostname=upstream.host)
            sock.sendall(huge_head("/"))
        else:
            sock = socket.create_connection(("127.0.0.1", quick.port))
            if where == "CONNECT line":
                sock.sendall(b"CONNECT " + b"a" * 20000 + b".test:443 HTTP/1.1\r\n")
            else:
                sock.sendall(huge_head(upstream.url("/").replace("https", "http")))
        reply = closed_within(sock, 5)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert b"bumper: bad request: limit: request head over 8192 bytes (--max-header-bytes)" in reply
        return sock.getsockname()[1]

    line = run_next_to_good_requests(quick, upstream, bad)
    assert line.endswith("outcome=limit: request head over 8192 bytes (--max-header-bytes)")
    assert upstream.requests == before + 2  # only the good requests


@pytest.mark.parametrize("where", ["CONNECT", "plain http", "bumped tunnel"])
def test_too_many_header_fields(quick: Bumper, upstream: Upstream, where: str) -> None:
    before = upstream.requests
    fields = "".join(f"X-{i}: {i}\r\n" for i in range(30))

    def bad() -> int:
        if where == "bumped tunnel":
            raw, _ = open_tunnel(quick, upstream.host, upstream.port)
            sock = client_tls_context(quick.ca_pem).wrap_socket(raw, server_hostname=upstream.host)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n{fields}\r\n".encode())
        else:
            sock = socket.create_connection(("127.0.0.1", quick.port))
            target = f"{upstream.host}:{upstream.port}" if where == "CONNECT" else f"http://plain.test:1/"
            method = "CONNECT" if where == "CONNECT" else "GET"
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {upstream.host}\r\n{fields}\r\n".encode())
        reply = read_http_response(sock)
        assert reply.startswith(b"HTTP/1.1 431"), reply
        assert b"limit: more than 20 header fields (--max-headers)" in reply
        port = sock.getsockname()[1]
        sock.close()
        return port

    line = run_next_to_good_requests(quick, upstream, bad) if where != "plain http" else None
    if line is not None:
        assert "outcome=limit: more than 20 header fields (--max-headers)" in line
    else:
        port = run_and_serve(quick, upstream, bad)
        assert "outcome=limit: more than 20 header fields (--max-headers)" in quick.connection_line(port, kind="HTTP")
    assert upstream.requests == before + 2


def run_and_serve(bumper: Bumper, upstream: Upstream, bad: Callable[[], int]) -> int:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bad_port = pool.submit(bad)
        r = curl(bumper, upstream.url("/"))
        assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
        port = bad_port.result(timeout=30)
    r = curl(bumper, upstream.url("/"))
    assert r.returncode == 0, r.stderr
    return port


def test_client_hello_over_the_size_limit(quick: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock, _ = open_tunnel(quick, upstream.host, upstream.port)
        body = b"\x01" + (20000).to_bytes(3) + b"\x03\x03" + bytes(19996)  # claims a 20000-byte ClientHello
        for i in range(0, len(body), 4000):
            try:
                sock.sendall(b"\x16\x03\x01" + len(body[i : i + 4000]).to_bytes(2) + body[i : i + 4000])
            except OSError:
                break
        closed_within(sock, 5)
        return sock.getsockname()[1]

    line = run_next_to_good_requests(quick, upstream, bad)
    assert "outcome=client TLS failed: limit: ClientHello over 8192 bytes (--max-client-hello-bytes)" in line


def test_a_client_hello_fragmented_over_many_records_is_served(quick: Bumper, upstream: Upstream) -> None:
    """OpenSSL accepts a ClientHello cut into many TLS records, and so does bumper: one record per
    seven bytes here, each read at most once (bumper/proxy/layers.py, _HelloScan)."""

    def fragmented() -> int:
        sock, _ = open_tunnel(quick, upstream.host, upstream.port)
        port = sock.getsockname()[1]
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls_context(quick.ca_pem).wrap_bio(incoming, outgoing, server_hostname=upstream.host)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        assert hello[0] == 0x16
        content = hello[5:]
        for i in range(0, len(content), 7):
            sock.sendall(hello[:3] + len(content[i : i + 7]).to_bytes(2) + content[i : i + 7])
        pump_handshake(sock, tls, incoming, outgoing)
        tls.write(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        reply = b""
        while data := sock.recv(65536):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    reply += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello from upstream"), reply
        sock.close()
        return port

    line = run_next_to_good_requests(quick, upstream, fragmented)
    assert "sni=upstream.test action=bump" in line and line.endswith("requests=1 outcome=ok")


def pump_handshake(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    while True:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            if pending := outgoing.read():
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            incoming.write(data)
