"""HTTP/2 flow control through bumper (bumper/proxy/h2flow.py, issue 22): bumper takes from a peer
only what the other leg has passed on, whichever legs speak HTTP/2.

Real sockets throughout: h2 clients written with the h2 library through bumper's CONNECT, the tests'
upstream (hypercorn: h2 when the client offers it, as bumper mirrors ALPN), and an HTTP/1.1-only
upstream here that counts what it could send.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from bumper.proxy.h2flow import CONNECTION_WINDOW, PAUSE_AT, STREAM_WINDOW
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, open_tunnel, read_head, tcp_server
from tests.hostile_peers import HostileServer, h2_sends_body, rss_kib
from tests.upstream import pattern_bytes

MiB = 1024 * 1024
HOST = "flow.hostile.test"
FRONT = "front.test"  # the name an h2 client gives the reverse listener
FRONT_ADDRESS = "127.0.0.7"  # beside the proxy listener at 127.0.0.1


def socket_buffers() -> int:
    """What the kernel may buffer on one TCP connection's way, its sender's and its receiver's socket
    buffers at their largest (autotuned): an HTTP/1 upstream gets that far past what bumper read."""
    return sum(int(Path(f"/proc/sys/net/ipv4/tcp_{kind}").read_text().split()[2]) for kind in ("rmem", "wmem"))


@dataclass
class H2Client:
    """An HTTP/2 client on TLS through bumper: WINDOW (its initial stream window) and whether it
    acknowledges the DATA it reads are its to choose."""

    tls: ssl.SSLSocket
    host: str
    window: int | None = None
    conn: h2.connection.H2Connection = field(init=False)
    bodies: dict[int, bytearray] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    reset: set[int] = field(default_factory=set)
    uploads: dict[int, bytes] = field(default_factory=dict)  # what each stream has still to send

    def __post_init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if self.window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.flush()

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.tls.sendall(data)

    def request(self, path: str, body: bytes | None = None) -> int:
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST" if body is not None else "GET"), (":scheme", "https")]
        headers += [(":authority", self.host), (":path", path)]
        if body is not None:
            headers.append(("content-length", str(len(body))))
            self.uploads[stream] = body
        self.conn.send_headers(stream, headers, end_stream=body is None)
        self.bodies[stream] = bytearray()
        self._send_uploads()
        self.flush()
        return stream

    def _send_uploads(self) -> None:
        for stream, rest in list(self.uploads.items()):
            while rest and (
                size := min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
            ):
                self.conn.send_data(stream, rest[:size])
                rest = rest[size:]
            self.uploads[stream] = rest
            if not rest:
                self.conn.end_stream(stream)
                del self.uploads[stream]

    def pump(self, done: Callable[[], bool], seconds: float, ack: bool = True, pause: float = 0.0) -> None:
        """Read and answer until DONE() or SECONDS pass; ACK: acknowledge the DATA read (else the
        windows stay as they are); PAUSE: sleep that long after each read (a slow reader)."""
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            self.tls.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.tls.recv(65536)
            except TimeoutError:
                return
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    if ack:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.reset.add(event.stream_id)
            self._send_uploads()
            self.flush()
            if pause:
                time.sleep(pause)


def h2_tunnel(bumper: Bumper, host: str, port: int) -> ssl.SSLSocket:
    sock, reply = open_tunnel(bumper, host, port, timeout=30)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    tls = client_tls_context(bumper.ca_pem, alpn=["h2"]).wrap_socket(sock, server_hostname=host)
    assert tls.selected_alpn_protocol() == "h2"
    return tls


@dataclass
class Http1Front:
    """An HTTP/1.1 origin (plain http: no h2 to offer) behind a bumper of its own, a reverse listener
    whose clients speak h2 to bumper: GET /bytes/N answers N pattern bytes, counting in `sent` what
    it could hand to its socket; POST /upload the body's length and SHA-256."""

    bumper: Bumper
    port: int  # the reverse listener's
    sent: list[int]

    def tunnel(self) -> ssl.SSLSocket:
        sock = socket.create_connection((FRONT_ADDRESS, self.port), timeout=30)
        tls = client_tls_context(self.bumper.ca_pem, alpn=["h2"]).wrap_socket(sock, server_hostname=FRONT)
        assert tls.selected_alpn_protocol() == "h2"
        return tls


@pytest.fixture
def http1_front(start_bumper: Callable[..., Bumper]) -> Iterator[Http1Front]:
    sent: list[int] = []

    def handle(conn: socket.socket) -> None:
        head, _, body = read_head(conn).partition(b"\r\n\r\n")
        if not head:
            return
        if length := re.search(rb"(?i)content-length: *(\d+)", head):
            while len(body) < int(length[1]) and (chunk := conn.recv(65536)):
                body += chunk
            answer = f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            return
        size = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        mine = len(sent)  # this connection's count (others send at the same time)
        sent.append(0)
        data = pattern_bytes(size)
        try:
            for start in range(0, size, 65536):
                conn.sendall(data[start : start + 65536])
                sent[mine] += len(data[start : start + 65536])
            conn.recv(1)  # until bumper closes
        except OSError:
            pass  # bumper closed it while it was sending: the test reads `sent`

    for origin in tcp_server(handle, max_connections=20, concurrent=True):
        bumper = start_bumper("--listen", f"reverse:http://127.0.0.1:{origin}@{FRONT_ADDRESS}:0")
        port = int(bumper.process.wait_for_line(r"bumper: reverse listening on 127\.0\.0\.7:(\d+)").group(1))
        yield Http1Front(bumper, port, sent)


def test_a_shut_window_holds_the_h2_upstream_to_bumpers_window(bumper: Bumper, test_pki: Pki, tmp_path: Path) -> None:
    """An h2 client announces a zero window and never opens it while an h2 upstream sends 64 MiB as
    fast as bumper's windows allow: the upstream gets to send one stream window, bumper's RSS stays
    where it was, and the shut stream does not stop another one on the same connection."""
    cert, key = test_pki.root.leaf("*.hostile.test").write(tmp_path, "h2")
    sent: list[int] = []
    server = HostileServer(cert, key, lambda tls: h2_sends_body(tls, 64 * MiB, sent), alpn="h2")
    try:
        pid = bumper.process.proc.pid
        before = rss_kib(pid)
        with h2_tunnel(bumper, HOST, server.port) as tls:
            client = H2Client(tls, HOST, window=0)
            client.request("/")
            client.pump(lambda: False, 3.0, ack=False)
            assert sent and sent[-1] <= STREAM_WINDOW, sent  # before: all 64 MiB
            assert rss_kib(pid) - before < 16 * 1024, (before, rss_kib(pid))  # KiB; before: +64 MiB
    finally:
        server.close()
    assert not client.ended


def test_a_shut_window_stops_reading_an_http1_upstream(http1_front: Http1Front) -> None:
    """The same with an HTTP/1.1 upstream, which has no window: bumper stops reading it once the h2
    client's stream holds its bound, so the upstream's socket fills and it can send no more."""
    pid = http1_front.bumper.process.proc.pid
    before = rss_kib(pid)
    with http1_front.tunnel() as tls:
        client = H2Client(tls, FRONT, window=0)
        client.request(f"/bytes/{64 * MiB}")
        client.pump(lambda: False, 3.0, ack=False)
        sent = http1_front.sent
        assert sent and sent[-1] <= PAUSE_AT + socket_buffers() + MiB, sent  # and a read or two
        assert rss_kib(pid) - before < 16 * 1024, (before, rss_kib(pid))
        client.conn.increment_flow_control_window(CONNECTION_WINDOW)
        client.conn.increment_flow_control_window(64 * MiB, stream_id=1)
        client.flush()  # the window opens: the rest comes, intact
        client.pump(lambda: 1 in client.ended, 60)
    assert bytes(client.bodies[1]) == pattern_bytes(64 * MiB)


def test_shut_streams_to_http1_upstreams_share_a_bound(http1_front: Http1Front) -> None:
    """Five shut streams, each to an HTTP/1.1 upstream connection of its own (one connection a request,
    as HTTP/1 does not multiplex; mitmproxy opens five at once to one address): bumper stops reading
    every one of them once the client's streams hold a connection window together, not a stream's
    bound each."""
    pid = http1_front.bumper.process.proc.pid
    before = rss_kib(pid)
    with http1_front.tunnel() as tls:
        client = H2Client(tls, FRONT, window=0)
        for _ in range(5):
            client.request(f"/bytes/{16 * MiB}")
        client.pump(lambda: False, 4.0, ack=False)
        grown = (rss_kib(pid) - before) * 1024
        assert len(http1_front.sent) == 5, http1_front.sent
        assert grown < CONNECTION_WINDOW + 8 * MiB, grown / MiB  # each stream's bound: 5 * 8 MiB and more


@pytest.mark.parametrize("leg", ["h2", "http1"])
def test_a_slow_h2_client_gets_a_large_body_intact(
    bumper: Bumper, upstream: Upstream, http1_front: Http1Front, leg: str
) -> None:
    """A client that reads 64 KiB at a time with a pause, on small windows: bumper passes the body
    on as the client takes it, whole, from an h2 upstream and from an HTTP/1.1 one."""
    size = 24 * MiB
    host = upstream.host if leg == "h2" else FRONT
    with h2_tunnel(bumper, host, upstream.port) if leg == "h2" else http1_front.tunnel() as tls:
        client = H2Client(tls, host, window=256 * 1024)
        stream = client.request(f"/bytes/{size}")
        client.pump(lambda: stream in client.ended, 120, pause=0.002)
    assert hashlib.sha256(client.bodies[stream]).digest() == hashlib.sha256(pattern_bytes(size)).digest()


@pytest.mark.parametrize("leg", ["h2", "http1"])
def test_an_h2_upload_arrives_intact(bumper: Bumper, upstream: Upstream, http1_front: Http1Front, leg: str) -> None:
    """An upload larger than bumper's windows, from an h2 client, reaches an h2 and an HTTP/1.1
    upstream whole: bumper opens the client's windows as the upstream takes the body."""
    body = pattern_bytes(2 * CONNECTION_WINDOW + 12345)
    host = upstream.host if leg == "h2" else FRONT
    with h2_tunnel(bumper, host, upstream.port) if leg == "h2" else http1_front.tunnel() as tls:
        client = H2Client(tls, host)
        stream = client.request("/upload", body)
        client.pump(lambda: stream in client.ended, 60)
    answer = bytes(client.bodies[stream])
    assert str(len(body)).encode() in answer and hashlib.sha256(body).hexdigest().encode() in answer, answer


def test_a_stream_reset_while_its_data_waits(bumper: Bumper, upstream: Upstream) -> None:
    """The client resets a stream whose DATA waits in bumper for its shut window: what bumper held
    for it is given back, so the connection's window does not shrink, and the next streams on the
    same connection get their bodies whole (more than the connection's window in all)."""
    with h2_tunnel(bumper, upstream.host, upstream.port) as tls:
        client = H2Client(tls, upstream.host, window=0)
        shut = client.request(f"/bytes/{8 * MiB}")
        client.pump(lambda: False, 1.0, ack=False)
        client.conn.reset_stream(shut, h2.errors.ErrorCodes.CANCEL)
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024 * 1024})
        client.conn.increment_flow_control_window(16 * MiB)
        client.flush()
        streams = [client.request(f"/bytes/{2 * MiB}") for _ in range(3)]
        client.pump(lambda: client.ended.issuperset(streams), 30)
    assert all(bytes(client.bodies[stream]) == pattern_bytes(2 * MiB) for stream in streams)


def test_a_connection_closed_while_bumper_holds_credit(bumper: Bumper, upstream: Upstream) -> None:
    """The client leaves while bumper holds the upstream's DATA unacknowledged: the upstream
    connection is closed with it (no traceback: the conftest checks), and bumper serves the next."""
    with h2_tunnel(bumper, upstream.host, upstream.port) as tls:
        client = H2Client(tls, upstream.host, window=0)
        client.request(f"/bytes/{8 * MiB}")
        client.pump(lambda: False, 1.0, ack=False)
    with h2_tunnel(bumper, upstream.host, upstream.port) as tls:
        client = H2Client(tls, upstream.host)
        stream = client.request(f"/bytes/{6 * MiB}")
        client.pump(lambda: stream in client.ended, 30)
    assert bytes(client.bodies[stream]) == pattern_bytes(6 * MiB)


def test_an_upstream_gone_while_bumper_holds_its_credit(bumper: Bumper, test_pki: Pki, tmp_path: Path) -> None:
    """An h2 upstream sends 1 MiB and goes (GOAWAY, closed) while the client's window is shut, so
    bumper still holds that DATA unacknowledged: the closed leg gets no credit (before, mitmproxy's
    closed layer took bumper's ReleaseCredit as a crash, an internal error the conftest fails on, and
    the client's connection hung); the client hears that its stream ended or was reset."""
    cert, key = test_pki.root.leaf("*.hostile.test").write(tmp_path, "h2-gone")
    sent: list[int] = []
    server = HostileServer(cert, key, lambda tls: h2_sends_body(tls, MiB, sent, then_goes=True), alpn="h2")
    try:
        with h2_tunnel(bumper, HOST, server.port) as tls:
            client = H2Client(tls, HOST, window=0)
            stream = client.request("/")
            client.pump(lambda: False, 2.0, ack=False)
            assert sent == [MiB]
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB})
            client.conn.increment_flow_control_window(4 * MiB)
            client.flush()
            client.pump(lambda: stream in client.ended | client.reset, 15)
            assert stream in client.ended | client.reset, (len(client.bodies[stream]), client.ended, client.reset)
    finally:
        server.close()
