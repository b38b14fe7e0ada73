"""Every limit through the live proxy: it fires on a hostile client or upstream, the connection ends
with one log line naming the limit and its setting, and a good client is served meanwhile.

Timeouts are configured small (a second or two), so no test sleeps long."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import resource
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hpack
import httpx
import pytest
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from tests.conftest import (
    ANY_PORT_POLICY,
    BUMPER,
    STARTED_BUMPERS,
    Bumper,
    Pki,
    Process,
    Upstream,
    client_tls_context,
    curl,
    lab_policy,
    open_tunnel,
    tcp_server,
)
from tests.test_bad_input import read_http_response, run_next_to_good_requests

ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1


@pytest.fixture(scope="module")
def quick(start_bumper: Callable[..., Bumper]) -> Bumper:
    """bumper with every limit small enough to fire within a test."""
    return start_bumper(
        "--request-timeout", "1", "--client-hello-timeout", "1", "--upstream-timeout", "1",
        "--h2-max-streams", "5", "--h2-max-resets", "10", "--max-headers", "20",
        "--max-header-bytes", "8k", "--max-client-hello-bytes", "8k", "--response-head-timeout", "1",
    )  # fmt: skip


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What SOCK received until bumper closed it, which must happen within SECONDS."""
    deadline = time.monotonic() + seconds
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"bumper did not close the connection within {seconds}s; got {data[:300]!r}") from None
        if not chunk:
            return data
        data += chunk


def bumped(bumper: Bumper, upstream: Upstream) -> ssl.SSLSocket:
    """A TLS connection through BUMPER's tunnel to UPSTREAM, the handshake done."""
    raw, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return client_tls_context(bumper.ca_pem).wrap_socket(raw, server_hostname=upstream.host)


def run_and_serve(bumper: Bumper, upstream: Upstream, bad: Callable[[], int]) -> int:
    """Run BAD (it returns its client port) while a good client is served, and once more after."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bad_port = pool.submit(bad)
        r = curl(bumper, upstream.url("/"))
        assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
        port = bad_port.result(timeout=30)
    r = curl(bumper, upstream.url("/"))
    assert r.returncode == 0, r.stderr
    return port


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
def test_idle_connection(
    start_bumper: Callable[..., Bumper], upstream: Upstream, recording_tcp: tuple[int, list[bytes]], kind: str
) -> None:
    idle = start_bumper("--idle-timeout", "1")

    def bad() -> int:
        if kind == "bumped tunnel":
            sock = bumped(idle, upstream)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
        else:  # the upstream keeps its side open for two seconds
            sock = socket.create_connection(("127.0.0.1", idle.port))
            sock.sendall(f"GET http://plain.test:{recording_tcp[0]}/ HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed_within(sock, 4)  # nothing more either way: closed after a second
        return sock.getsockname()[1]

    port = run_and_serve(idle, upstream, bad)
    line = idle.connection_line(port, kind="CONNECT" if kind == "bumped tunnel" else "HTTP")
    assert line.endswith("requests=1 outcome=limit: no data either way for 1s (--idle-timeout)")


# Sizes and counts


def huge_head(target: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: upstream.test\r\n".encode() + b"X-Big: " + b"a" * 20000 + extra


@pytest.mark.parametrize("where", ["CONNECT line", "plain http head", "head in a bumped tunnel"])
def test_request_head_over_the_size_limit(quick: Bumper, upstream: Upstream, where: str) -> None:
    before = upstream.requests

    def bad() -> int:
        if where == "head in a bumped tunnel":
            sock = bumped(quick, upstream)
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


HostileUpstream = Callable[[Callable[[ssl.SSLSocket], None]], tuple[int, list[str]]]


@pytest.fixture
def hostile_upstream(test_pki: Pki, tmp_path: Path) -> Iterator[HostileUpstream]:
    """HTTPS upstreams (*.upstream.test) that read a request head, then answer it with ANSWER(tls);
    what became of each answer's sending is recorded ("sent all", or "cut off: ..." once bumper closed)."""
    cert, key = test_pki.root.leaf("*.upstream.test").write(tmp_path, "hostile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    servers = contextlib.ExitStack()

    def start(answer: Callable[[ssl.SSLSocket], None]) -> tuple[int, list[str]]:
        outcome: list[str] = []

        def handle(conn: socket.socket) -> None:
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := tls.recv(4096)):
                        data += chunk
                    answer(tls)
                outcome.append("sent all")
            except OSError as e:
                outcome.append(f"cut off: {e}")

        servers_iter = tcp_server(handle)
        servers.callback(lambda: next(servers_iter, None))
        return next(servers_iter), outcome

    with servers:
        yield start


def sends_endless_head(tls: ssl.SSLSocket) -> None:
    """A response head that never ends (4 MiB of header lines at most)."""
    tls.sendall(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    for _ in range(4 * 1024):
        tls.sendall(line)


def trickles_head(tls: ssl.SSLSocket) -> None:
    """Slowloris: a small response head, a byte every 0.1 s (40 bytes: 4 s, past the 1 s limit)."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: 1\r\n\r\n":
        tls.sendall(bytes([byte]))
        time.sleep(0.1)


def sends_many_fields(tls: ssl.SSLSocket) -> None:
    """30 header fields (the limit is 20), well within the byte limit."""
    fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(29))
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields + b"\r\nhi")


def refused_response_head(
    quick: Bumper, upstream: Upstream, port: int, outcome: list[str], reason: str, cut_off: bool = True
) -> None:
    """A request to the hostile upstream on PORT gets bumper's 502 naming REASON while a good client is
    served, the connection's log line ends with it, and (CUT_OFF) the upstream's sending was cut off."""

    def bad() -> int:
        sock, reply = open_tunnel(quick, "hostile.upstream.test", port)
        client_port = sock.getsockname()[1]
        assert reply.startswith(b"HTTP/1.1 200")
        tls = client_tls_context(quick.ca_pem).wrap_socket(sock, server_hostname="hostile.upstream.test")
        tls.sendall(b"GET / HTTP/1.1\r\nHost: hostile.upstream.test\r\n\r\n")
        answer = read_http_response(tls)
        assert answer.startswith(b"HTTP/1.1 502") and reason.encode() in answer, answer
        return client_port

    line = run_next_to_good_requests(quick, upstream, bad)
    assert f"outcome={reason}" in line, line
    if not cut_off:
        return
    deadline = time.monotonic() + 10
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome and outcome[0].startswith("cut off"), outcome


def test_upstream_response_head_over_the_size_limit(
    quick: Bumper, upstream: Upstream, hostile_upstream: HostileUpstream
) -> None:
    """mitmproxy would buffer the head without end; bumper closes the upstream at the limit."""
    port, outcome = hostile_upstream(sends_endless_head)
    reason = "limit: upstream response head over 8192 bytes (--max-header-bytes)"
    refused_response_head(quick, upstream, port, outcome, reason)


def test_slowloris_upstream_response_head(quick: Bumper, upstream: Upstream, hostile_upstream: HostileUpstream) -> None:
    """mitmproxy waits for a head as long as its bytes keep coming; bumper gives it --response-head-timeout
    from its first byte."""
    port, outcome = hostile_upstream(trickles_head)
    reason = "limit: no complete response head from the upstream within 1s (--response-head-timeout)"
    refused_response_head(quick, upstream, port, outcome, reason)


def test_too_many_fields_in_the_upstream_response(
    quick: Bumper, upstream: Upstream, hostile_upstream: HostileUpstream
) -> None:
    port, outcome = hostile_upstream(sends_many_fields)
    reason = "limit: more than 20 header fields in the upstream's response (--max-headers)"
    refused_response_head(quick, upstream, port, outcome, reason, cut_off=False)  # it had sent all it had


def test_trickled_response_head_within_the_limit_is_served(
    quick: Bumper, upstream: Upstream, hostile_upstream: HostileUpstream
) -> None:
    """The deadline runs from the head's first byte to its end, once per response: two heads, each
    trickled over 0.6 s, on one keep-alive connection (1.2 s in all, past the 1 s limit), are both served."""

    def trickles_two(tls: ssl.SSLSocket) -> None:
        for i in range(2):
            if i:  # the second request
                data = b""
                while b"\r\n\r\n" not in data and (chunk := tls.recv(4096)):
                    data += chunk
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            for piece in (head[:10], head[10:20], head[20:30], head[30:]):
                tls.sendall(piece)
                time.sleep(0.15)
            tls.sendall(b"ok")

    port, _ = hostile_upstream(trickles_two)
    sock, reply = open_tunnel(quick, "slow.upstream.test", port)
    assert reply.startswith(b"HTTP/1.1 200")
    tls = client_tls_context(quick.ca_pem).wrap_socket(sock, server_hostname="slow.upstream.test")
    for _ in range(2):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: slow.upstream.test\r\n\r\n")
        answer = read_http_response(tls)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nok"), answer
    tls.close()


@pytest.mark.parametrize("where", ["CONNECT", "plain http", "bumped tunnel"])
def test_too_many_header_fields(quick: Bumper, upstream: Upstream, where: str) -> None:
    before = upstream.requests
    fields = "".join(f"X-{i}: {i}\r\n" for i in range(30))

    def bad() -> int:
        if where == "bumped tunnel":
            sock = bumped(quick, upstream)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n{fields}\r\n".encode())
        else:
            sock = socket.create_connection(("127.0.0.1", quick.port))
            target = f"{upstream.host}:{upstream.port}" if where == "CONNECT" else "http://plain.test:1/"
            method = "CONNECT" if where == "CONNECT" else "GET"
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {upstream.host}\r\n{fields}\r\n".encode())
        reply = read_http_response(sock)
        assert reply.startswith(b"HTTP/1.1 431"), reply
        assert b"limit: more than 20 header fields (--max-headers)" in reply
        port = sock.getsockname()[1]
        sock.close()
        return port

    port = run_and_serve(quick, upstream, bad)
    line = quick.connection_line(port, kind="HTTP" if where == "plain http" else "CONNECT")
    assert "outcome=limit: more than 20 header fields (--max-headers)" in line
    assert upstream.requests == before + 2


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
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)


# HTTP/2: real frames from a client written with h2's own frame and HPACK libraries


def h2_through(bumper: Bumper, upstream: Upstream) -> tuple[ssl.SSLSocket, int]:
    """A TLS connection through BUMPER to UPSTREAM that has spoken the HTTP/2 preface; its client port."""
    raw, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    port = raw.getsockname()[1]
    sock = client_tls_context(bumper.ca_pem, alpn=["h2"]).wrap_socket(raw, server_hostname=upstream.host)
    assert sock.selected_alpn_protocol() == "h2"
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return sock, port


def get(encoder: hpack.Encoder, stream_id: int, end_stream: bool = True, **extra: str) -> HeadersFrame:
    frame = HeadersFrame(stream_id)
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "upstream.test"), (":path", "/")]
    frame.data = encoder.encode([*headers, *extra.items()])
    frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame


def goaway(sock: ssl.SSLSocket, timeout: float = 5) -> int | None:
    """The error code of the GOAWAY bumper sends before it closes SOCK; None if it sends none."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while chunk := sock.recv(65536):
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + (length := int.from_bytes(buf[:3])):
                kind, payload, buf = buf[3], buf[9 : 9 + length], buf[9 + length :]
                if kind == GoAwayFrame.type:
                    return int.from_bytes(payload[4:8])
    except (ConnectionResetError, ssl.SSLError):
        pass
    return None


def h2_flood(
    bumper: Bumper, upstream: Upstream, frames: Callable[[hpack.Encoder], list[Frame]], code: int = ENHANCE_YOUR_CALM
) -> Callable[[], int]:
    def bad() -> int:
        sock, port = h2_through(bumper, upstream)
        try:
            sock.sendall(b"".join(frame.serialize() for frame in frames(hpack.Encoder())))
        except OSError:
            pass  # closed while the flood was still going out
        assert goaway(sock) == code
        return port

    return bad


def test_h2_too_many_concurrent_streams(quick: Bumper, upstream: Upstream) -> None:
    opened = lambda enc: [get(enc, 2 * i + 1, end_stream=False) for i in range(6)]  # noqa: E731
    bad = h2_flood(quick, upstream, opened, code=PROTOCOL_ERROR)
    line = run_next_to_good_requests(quick, upstream, bad)
    assert line.endswith("outcome=limit: more than 5 concurrent HTTP/2 streams (--h2-max-streams)")


def test_h2_rapid_reset(quick: Bumper, upstream: Upstream) -> None:
    """CVE-2023-44487: streams opened and reset at once, the upstream left to do the work."""

    def frames(enc: hpack.Encoder) -> list[Frame]:
        out: list[Frame] = []
        for i in range(30):
            reset = RstStreamFrame(2 * i + 1)
            reset.error_code = 0x8  # CANCEL
            out += [get(enc, 2 * i + 1), reset]
        return out

    line = run_next_to_good_requests(quick, upstream, h2_flood(quick, upstream, frames))
    assert "outcome=limit: the client reset 10 of its " in line
    assert line.endswith("HTTP/2 streams (rapid reset) (--h2-max-resets)")


def test_h2_continuation_flood(quick: Bumper, upstream: Upstream) -> None:
    """A header block that never ends, in CONTINUATION frames: cut off at the header size limit."""

    def frames(enc: hpack.Encoder) -> list[Frame]:
        first = get(enc, 1)
        first.flags.discard("END_HEADERS")
        more = []
        for _ in range(10):
            frame = ContinuationFrame(1)
            frame.data = b"\x00" * 4000
            more.append(frame)
        return [first, *more]

    line = run_next_to_good_requests(quick, upstream, h2_flood(quick, upstream, frames))
    assert line.endswith("outcome=limit: HTTP/2 header block over 8192 bytes (--max-header-bytes)")


def test_h2_header_list_over_the_size_limit(quick: Bumper, upstream: Upstream) -> None:
    bad = h2_flood(quick, upstream, lambda enc: [get(enc, 1, x_big="a" * 10000)])
    line = run_next_to_good_requests(quick, upstream, bad)
    assert line.endswith("outcome=limit: HTTP/2 header list over 8192 bytes (--max-header-bytes)")


def test_h2_hpack_table_over_the_size_limit(quick: Bumper, upstream: Upstream) -> None:
    def frames(enc: hpack.Encoder) -> list[Frame]:
        enc.header_table_size = 1 << 20  # announced in the block: more than bumper's 4096
        return [get(enc, 1)]

    def bad() -> int:
        sock, port = h2_through(quick, upstream)
        sock.sendall(b"".join(frame.serialize() for frame in frames(hpack.Encoder())))
        assert goaway(sock) == PROTOCOL_ERROR  # h2's own GOAWAY for a header block it cannot decode
        return port

    line = run_next_to_good_requests(quick, upstream, bad)
    assert line.endswith("outcome=limit: HPACK table over 4096 bytes (--h2-hpack-table-bytes)")


# Connections: per client address, in total, and file descriptors


def idle_connections(bumper: Bumper, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", bumper.port), source_address=(source, 0))
        socks.append(sock)
    return socks


def curl_from(bumper: Bumper, upstream: Upstream, source: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["curl", "-sS", "--max-time", "30", "--interface", source, "-x", bumper.proxy, "--cacert",
         str(bumper.ca_pem), upstream.url("/")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_connections_per_client_address(start_bumper: Callable[..., Bumper], upstream: Upstream) -> None:
    bumper = start_bumper("--max-client-connections", "3")
    held = idle_connections(bumper, 3)
    try:
        refused = socket.create_connection(("127.0.0.1", bumper.port))
        port = refused.getsockname()[1]
        assert closed_within(refused, 5) == b""
        # Another client address is served meanwhile.
        good = curl_from(bumper, upstream, "127.0.0.2")
        assert good.communicate(timeout=60) == ("hello from upstream", "")
    finally:
        for sock in held:
            sock.close()
    line = bumper.connection_line(port)
    assert line.endswith("outcome=limit: 3 connections already open from 127.0.0.1 (--max-client-connections)")
    assert curl(bumper, upstream.url("/")).returncode == 0  # and 127.0.0.1 again, once they closed


def test_connections_in_total_pause_accepting(start_bumper: Callable[..., Bumper], upstream: Upstream) -> None:
    """At --max-connections bumper stops accepting: a new client waits in the listen backlog, and is
    served as soon as a connection closes, as HAProxy does at maxconn."""
    bumper = start_bumper("--max-connections", "3", "--request-timeout", "60")
    held = idle_connections(bumper, 3)
    try:
        bumper.process.wait_for_line(r"limit: 3 connections open \(--max-connections\): new connections wait")
        waiting = curl_from(bumper, upstream, "127.0.0.2")
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1.5)  # accepted by the kernel, not yet by bumper
        held.pop().close()
        assert waiting.communicate(timeout=60) == ("hello from upstream", "")
        bumper.process.wait_for_line(r"bumper: accepting connections again")
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def start_with_fd_limit(test_pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Bumper]]:
    """bumper under a hard RLIMIT_NOFILE, as `ulimit -Hn` or systemd's LimitNOFILE= would set it."""
    started: list[Process] = []

    def start(nofile: int, *extra: str, soft: int | None = None) -> Bumper:
        def limited() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft or nofile, nofile))

        ca_dir = tmp_path / f"ca{len(started)}"
        ca_dir.mkdir()
        args = [
            BUMPER,
            "--ca",
            str(ca_dir),
            "--listen",
            "127.0.0.1:0",
            "--resolve",
            "*.test=127.0.0.1",
            "--upstream-ca",
            str(test_pki.root_pem),
            "--policy",
            str(ANY_PORT_POLICY),
            "--request-timeout",
            "60",
        ]
        proc = subprocess.Popen([*args, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, preexec_fn=limited)  # fmt: skip
        process = Process(proc)
        started.append(process)
        STARTED_BUMPERS.append(process)  # its tracebacks fail the test, as for every bumper
        port = int(process.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1))
        return Bumper(process, port, ca_dir)

    yield start
    for process in started:
        process.stop()


def test_the_open_files_limit_is_raised_to_the_hard_limit_at_start(
    start_with_fd_limit: Callable[..., Bumper],
) -> None:
    bumper = start_with_fd_limit(4096, soft=100)
    limits = Path(f"/proc/{bumper.process.proc.pid}/limits").read_text()
    assert re.search(r"Max open files +4096 +4096 ", limits), limits


def test_the_connection_limit_follows_the_file_descriptor_limit(
    start_with_fd_limit: Callable[..., Bumper], upstream: Upstream
) -> None:
    """With 100 descriptors and no --max-connections, bumper takes (100 - 64) / 2 = 18 connections
    and then pauses accepting, rather than running out of descriptors."""
    bumper = start_with_fd_limit(100)
    held = idle_connections(bumper, 25)
    try:
        bumper.process.wait_for_line(r"limit: 18 connections open \(--max-connections\)")
        for sock in held[:10]:
            sock.close()
        r = curl(bumper, upstream.url("/"))
        assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in bumper.process.log


def test_running_out_of_file_descriptors_pauses_accepting(
    start_with_fd_limit: Callable[..., Bumper], upstream: Upstream
) -> None:
    """A --max-connections above what the descriptors allow: accept() fails with EMFILE, bumper says
    so in one line (asyncio pauses accepting for a second), and serves again once clients leave."""
    bumper = start_with_fd_limit(100, "--max-connections", "1000")
    held = idle_connections(bumper, 120)
    try:
        bumper.process.wait_for_line(r"limit: cannot accept a connection: \[Errno 24\] Too many open files")
    finally:
        for sock in held:
            sock.close()
    r = curl(bumper, upstream.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
    assert "Traceback" not in bumper.process.log


# Request smuggling: what an upstream could read differently is refused with a 400, never forwarded

_POST = b"POST / HTTP/1.1\r\nHost: H\r\n"
_GET = b"GET / HTTP/1.1\r\nHost: H\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
SMUGGLING = {
    "Content-Length and Transfer-Encoding": _POST + b"Content-Length: 4\r\n" + _CHUNKED + b"\r\n0\r\n\r\n",
    "two Content-Lengths": _POST + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "a Content-Length list": _POST + b"Content-Length: 4, 4\r\n\r\nabcd",
    "a signed Content-Length": _POST + b"Content-Length: +3\r\n\r\nabc",
    "obs-fold": _GET + b"X-A: a\r\n b\r\n\r\n",
    "a bare CR in a value": _GET + b"X-A: a\r" + _CHUNKED + b"\r\n",
    "a NUL in a value": _GET + b"X-A: a\x00b\r\n\r\n",
    "Transfer-Encoding: chunked, identity": _POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding: xchunked": _POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "two Transfer-Encodings": _POST + _CHUNKED + _CHUNKED + b"\r\n0\r\n\r\n",
    "Transfer-Encoding in HTTP/1.0": b"POST / HTTP/1.0\r\nHost: H\r\n" + _CHUNKED + b"\r\n0\r\n\r\n",
    "whitespace before the colon": _POST + b"Content-Length : 3\r\n\r\nabc",
    "two Host headers": _GET + b"Host: other.test\r\n\r\n",
    "an invalid chunk size": _POST + _CHUNKED + b"\r\nzz\r\nabc\r\n0\r\n\r\n",
}


REFUSED_AT_PARSE = {"obs-fold", "a bare CR in a value", "a NUL in a value", "two Host headers"}


@pytest.fixture(scope="module")
def recording_tcp() -> Iterator[tuple[int, list[bytes]]]:
    """A plain-HTTP upstream that keeps every byte it receives, and answers each head with a 200."""
    received: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        conn.settimeout(2)
        try:
            while data := conn.recv(65536):
                received.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass

    for port in tcp_server(handle, max_connections=100):
        yield port, received


@pytest.mark.parametrize("case", sorted(SMUGGLING))
@pytest.mark.parametrize("where", ["plain http", "bumped tunnel"])
def test_request_smuggling_is_refused(
    quick: Bumper, upstream: Upstream, recording_tcp: tuple[int, list[bytes]], case: str, where: str
) -> None:
    plain_port, plain_received = recording_tcp
    before = (upstream.requests, len(plain_received))
    raw = SMUGGLING[case]

    def bad() -> int:
        if where == "plain http":
            sock = socket.create_connection(("127.0.0.1", quick.port))
            request = raw.replace(b" / ", f" http://plain.test:{plain_port}/ ".encode(), 1)
        else:
            sock = bumped(quick, upstream)
            request = raw
        port = sock.getsockname()[1]
        sock.sendall(request.replace(b"Host: H", f"Host: {upstream.host}".encode()))
        reply = closed_within(sock, 5)
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert b"\r\n\r\nbumper: bad request: " in reply
        return port

    port = run_and_serve(quick, upstream, bad)
    # bumper's own checks refuse the head as it is parsed: no valid request was read, `CONNECT -`.
    kind = "HTTP" if where == "plain http" and case not in REFUSED_AT_PARSE else "CONNECT"
    log_line = quick.connection_line(port, kind=kind)
    assert "outcome=" in log_line and "outcome=ok" not in log_line and "validate_inbound_headers" not in log_line
    assert (upstream.requests, len(plain_received)) == (before[0] + 2, before[1])  # only the good requests


def test_h2_too_many_header_fields_is_a_431_on_its_stream(quick: Bumper, upstream: Upstream) -> None:
    """The stream is answered, the connection goes on: the next request on it is served."""
    context = client_tls_context(quick.ca_pem)
    with httpx.Client(proxy=quick.proxy, verify=context, http2=True, timeout=30) as client:
        refused = client.get(upstream.url("/"), headers={f"x-{i}": str(i) for i in range(30)})
        served = client.get(upstream.url("/"))
    assert (refused.http_version, refused.status_code) == ("HTTP/2", 431)
    assert refused.text == "bumper: bad request: limit: more than 20 header fields (--max-headers)\n"
    assert (served.status_code, served.text) == (200, "hello from upstream")


def test_idle_spliced_tunnel(
    start_bumper: Callable[..., Bumper], upstream: Upstream, test_pki: Pki, tmp_path: Path
) -> None:
    """A spliced tunnel is relayed byte for byte, and the idle timeout still ends it."""
    policy = tmp_path / "splice.yaml"
    policy.write_text(lab_policy("default: splice\n"))
    splicing = start_bumper("--policy", str(policy), "--idle-timeout", "1")
    direct_trust = ssl.create_default_context(cafile=str(test_pki.root_pem))

    def bad() -> int:
        raw, reply = open_tunnel(splicing, upstream.host, upstream.port)
        assert reply.startswith(b"HTTP/1.1 200")
        port = raw.getsockname()[1]
        sock = direct_trust.wrap_socket(raw, server_hostname=upstream.host)  # the upstream's own certificate
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed_within(sock, 4)
        return port

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bad_port = pool.submit(bad)
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", splicing.proxy, "--cacert", str(test_pki.root_pem),
             upstream.url("/")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
        port = bad_port.result(timeout=30)
    line = splicing.connection_line(port)
    assert " action=splice " in line
    assert line.endswith("outcome=limit: no data either way for 1s (--idle-timeout)")
