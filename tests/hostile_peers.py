"""The hostile-peer suite's instrument (issue 22): what one hostile client or upstream costs bumper.

Each case runs one hostile peer against a bumper started through its CLI, while a good client keeps
asking for small responses through the same bumper, and reports bumper's memory (RSS from
/proc/PID/status: the baseline, the peak over it, and what is left over it a while after the hostile
connection closed), how long the hostile connection lived, the good client's p99, and whether bumper
wrote a traceback. tests/test_hostile_peers.py runs the cases (a bounded subset in `./test`, all of
them at full size with `make hostile`) and writes the table.

Every loop here is bounded in count and in time, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import wsproto
import wsproto.events
import wsproto.extensions

from tests.conftest import WS_READING, Bumper, Upstream, client_tls_context, listening_socket, open_tunnel

MiB = 1 << 20
KiB = 1 << 10

# How often bumper's RSS is sampled (VmHWM catches a peak between two samples).
SAMPLE_INTERVAL = 0.05
# The good client: one small request on a new bumped connection this often, each cut off after this long.
GOOD_INTERVAL = 0.1
GOOD_TIMEOUT = 5.0
GOOD_MAX_REQUESTS = 5000
GOOD_MIN_REQUESTS = 20


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for {pid}")


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: 5 to clear_refs), so that it holds this case's peak."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


class Sampler:
    """bumper's RSS every SAMPLE_INTERVAL, in the background, until stopped (at most an hour)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 3600
        while not self._stop.wait(SAMPLE_INTERVAL) and time.monotonic() < deadline:
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> int:
        """The peak RSS (KiB) since the start: the samples' and the kernel's high-water mark."""
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError, AssertionError):
            self.peak = max(self.peak, rss_kib(self.pid, "VmHWM"))
        return self.peak


def good_request(bumper: Bumper, upstream: Upstream) -> None:
    """One small request on a new bumped connection: CONNECT, TLS, GET /, the whole answer."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port, timeout=GOOD_TIMEOUT)
    with sock:
        assert reply.startswith(b"HTTP/1.1 200"), reply
        with client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname=upstream.host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello from upstream"), data[:200]


class GoodClient:
    """A loop of small requests through bumper beside the hostile peer: their latencies, failures
    counting as GOOD_TIMEOUT."""

    def __init__(self, bumper: Bumper, upstream: Upstream) -> None:
        self.bumper, self.upstream = bumper, upstream
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(GOOD_MAX_REQUESTS):
            if self._stop.is_set():
                return
            start = time.monotonic()
            try:
                good_request(self.bumper, self.upstream)
                self.latencies.append(time.monotonic() - start)
            except (OSError, AssertionError) as e:
                self.failures.append(f"{type(e).__name__}: {e}"[:200])
                self.latencies.append(max(GOOD_TIMEOUT, time.monotonic() - start))
            self._stop.wait(GOOD_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(GOOD_TIMEOUT * 3)

    @property
    def p99(self) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]


# Hostile upstreams: a TLS server whose answer to each request head is the case's.


@dataclass
class HostileServer:
    """A TLS server on 127.0.0.1 for *.hostile.test: each connection (in a thread of its own, at most
    MAX_CONNECTIONS) has its request head read, then ANSWER(tls). What its sending came to is kept."""

    cert: Path
    key: Path
    answer: Callable[[ssl.SSLSocket], None]
    max_connections: int = 400
    alpn: str = "http/1.1"  # h2: ANSWER gets the connection as it is, to speak HTTP/2 on
    outcomes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.cert, self.key)
        self.context.set_alpn_protocols([self.alpn])
        self.sock = listening_socket()
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        handled = 0
        while handled < self.max_connections and not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(30)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
            handled += 1

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn, self.context.wrap_socket(conn, server_side=True) as tls:
                data = b""
                while self.alpn != "h2" and b"\r\n\r\n" not in data and len(data) < MiB and (chunk := tls.recv(65536)):
                    data += chunk
                self.answer(tls)
            self.outcomes.append("sent all")
        except (OSError, ValueError) as e:
            self.outcomes.append(f"cut off: {type(e).__name__}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# The hostile side of each case. Each gets the Lab and returns (seconds the hostile connection lived,
# what the hostile peer saw).


@dataclass
class Lab:
    bumper: Bumper
    upstream: Upstream  # the good client's upstream (tests/upstream.py: HTTP/1.1, h2, WebSocket echo on /ws)
    # The same server in a process of its own, for the hostile peer: its work (echoing 256 MiB) must
    # not slow the good client's upstream, whose answers measure bumper.
    target: Upstream
    hostile_server: Callable[[Callable[[ssl.SSLSocket], None]], HostileServer]
    full: bool  # the sizes; else the bounded ones ./test runs

    def size(self, full: int, bounded: int) -> int:
        return full if self.full else bounded


def tunnel(bumper: Bumper, host: str, port: int, alpn: list[str] | None = None) -> ssl.SSLSocket:
    """A TLS connection through BUMPER to HOST:PORT, the handshake done."""
    sock, reply = open_tunnel(bumper, host, port, timeout=30)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return client_tls_context(bumper.ca_pem, alpn=alpn).wrap_socket(sock, server_hostname=host)


def read_until_closed(sock: ssl.SSLSocket, seconds: float, limit: int = 64 * MiB) -> bytes:
    """What SOCK got until it closed, SECONDS passed or LIMIT bytes came (the rest read and dropped)."""
    deadline = time.monotonic() + seconds
    kept = b""
    total = 0
    while time.monotonic() < deadline and total < limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        total += len(chunk)
        if len(kept) < 4096:
            kept += chunk
    return kept


def first_line(data: bytes) -> str:
    return data.partition(b"\r\n")[0].decode(errors="replace")[:80] or "(closed, nothing)"


def get_from_hostile(
    lab: Lab, answer: Callable[[ssl.SSLSocket], None], host: str, seconds: float, limit: int = 64 * MiB
) -> tuple[float, bytes]:
    """GET / from a hostile upstream that ANSWERS so, through a tunnel to HOST: how long until the
    connection closed (at most SECONDS), and what the client got (at most LIMIT bytes)."""
    server = lab.hostile_server(answer)
    start = time.monotonic()
    with tunnel(lab.bumper, host, server.port) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = read_until_closed(tls, seconds, limit=limit)
    return time.monotonic() - start, got


def endless_response_head(lab: Lab) -> tuple[float, str]:
    cap = lab.size(1024 * MiB, 16 * MiB)

    def answer(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
        for _ in range(cap // len(line)):
            tls.sendall(line)

    seconds, got = get_from_hostile(lab, answer, "head.hostile.test", 120)
    return seconds, f"client got `{first_line(got)}`"


def endless_request_head(lab: Lab) -> tuple[float, str]:
    cap = lab.size(256 * MiB, 16 * MiB)
    with tunnel(lab.bumper, lab.target.host, lab.target.port) as tls:
        start = time.monotonic()
        sent = 0
        tls.settimeout(30)
        with contextlib.suppress(OSError):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: upstream.test\r\nX-Endless: ")
            chunk = b"a" * (64 * KiB)
            while sent < cap:
                tls.sendall(chunk)
                sent += len(chunk)
        got = read_until_closed(tls, 30)
    return time.monotonic() - start, f"sent {sent // MiB} MiB, got `{first_line(got)}`"


def h2_sends_body(tls: ssl.SSLSocket, size: int, sent: list[int], then_goes: bool = False) -> None:
    """An HTTP/2 upstream's answer to its first request: SIZE bytes, as fast as its peer's windows allow
    (bumper's own are 2 GiB), counted in SENT[-1]; THEN_GOES: then a GOAWAY and gone, the stream
    unended (an upstream that dies in the middle of a response)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    stream = None
    while stream is None and (data := tls.recv(65536)):
        stream = next((e.stream_id for e in conn.receive_data(data) if isinstance(e, h2.events.RequestReceived)), None)
    if stream is None:
        return
    conn.send_headers(stream, [(":status", "200"), ("content-length", str(size))])
    sent.append(0)
    chunk = b"z" * 16384
    while sent[-1] < size:
        window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size, len(chunk), size - sent[-1])
        if window <= 0:  # wait for a WINDOW_UPDATE
            if not (data := tls.recv(65536)):
                return
            conn.receive_data(data)
            continue
        conn.send_data(stream, chunk[:window])
        sent[-1] += window
        tls.sendall(conn.data_to_send())
    if then_goes:
        conn.close_connection()
        tls.sendall(conn.data_to_send())
        return
    conn.end_stream(stream)
    tls.sendall(conn.data_to_send())
    # Open until bumper closes (30 s at most): a close with bumper's frames unread would be a reset,
    # and bumper would lose what it had not read yet.
    tls.settimeout(30)
    while tls.recv(65536):
        pass


def h2_zero_window(lab: Lab, body: int | None = None, connections: int = 1) -> tuple[float, str]:
    """An HTTP/2 client that announces a zero stream window and never opens it, while the upstream
    (HTTP/2: bumper mirrors its ALPN to the client) sends a large BODY as fast as bumper takes it; on
    CONNECTIONS such connections at once, each to an upstream connection of its own."""
    body = body or lab.size(512 * MiB, 64 * MiB)
    hold = lab.size(20, 4)
    sent: list[int] = []
    server = lab.hostile_server(lambda tls: h2_sends_body(tls, body, sent), alpn="h2")
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        clients = []
        for _ in range(connections):
            tls = stack.enter_context(tunnel(lab.bumper, "window.hostile.test", server.port, alpn=["h2"]))
            assert tls.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            conn.send_headers(
                1,
                [(":method", "GET"), (":scheme", "https"), (":authority", "window.hostile.test"), (":path", "/")],
                end_stream=True,
            )
            tls.sendall(conn.data_to_send())
            clients.append((tls, conn))
        deadline = time.monotonic() + hold
        while clients and time.monotonic() < deadline:  # reads what comes, acknowledges no DATA: the window stays shut
            readable, _, _ = select.select([tls for tls, _ in clients], [], [], max(0.01, deadline - time.monotonic()))
            for tls, conn in list(clients):
                if tls not in readable:
                    continue
                if not (data := tls.recv(65536)):
                    clients.remove((tls, conn))
                    continue
                conn.receive_data(data)
                if out := conn.data_to_send():
                    tls.sendall(out)
    lived = time.monotonic() - start
    time.sleep(1)  # what the upstream had sent when the client left
    each = f" on each of {connections} connections" if connections > 1 else ""
    return lived, f"held {hold}s; the upstream sent {max(sent, default=0) // MiB} MiB of {body // MiB}{each}"


def ws_connect(
    bumper: Bumper, upstream: Upstream, extensions: list[wsproto.extensions.Extension] | None = None
) -> tuple[ssl.SSLSocket, wsproto.WSConnection]:
    """A WebSocket through BUMPER to UPSTREAM's echo (/ws), its handshake done, with the EXTENSIONS
    offered all agreed."""
    tls = tunnel(bumper, upstream.host, upstream.port, alpn=["http/1.1"])
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    tls.sendall(ws.send(wsproto.events.Request(host=upstream.host, target="/ws", extensions=extensions or [])))
    tls.settimeout(10)
    while True:
        data = tls.recv(65536)
        assert data, "closed before the WebSocket handshake's answer"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                assert len(event.extensions) == len(extensions or []), event.extensions
                return tls, ws
            raise AssertionError(f"WebSocket handshake refused: {event}")


def ws_events(tls: ssl.SSLSocket, ws: wsproto.WSConnection, seconds: float) -> Iterator[wsproto.events.Event]:
    """The WebSocket events that arrive within SECONDS (until the connection closes)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tls.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = tls.recv(256 * KiB)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            return
        ws.receive_data(data or None)
        yield from ws.events()
        if not data:
            return


@dataclass
class WsReply:
    """What came back for one WebSocket message: its size, its pieces (when kept), or the close sent
    instead; a pong counts as the message (its payload)."""

    size: int = 0
    pieces: list[bytes | str] = field(default_factory=list)
    close: wsproto.events.CloseConnection | None = None

    @property
    def closed(self) -> str:
        return f", closed {self.close.code}" if self.close else ""

    def data(self) -> bytes | str:
        text = bool(self.pieces) and isinstance(self.pieces[0], str)
        return ("" if text else b"").join(self.pieces)  # type: ignore[attr-defined]


def ws_reply(tls: ssl.SSLSocket, ws: wsproto.WSConnection, seconds: float, keep: bool = False) -> WsReply:
    """The next whole message from the other end within SECONDS (its pieces too if KEEP), or the close
    it sent instead."""
    reply = WsReply()
    for event in ws_events(tls, ws, seconds):
        if isinstance(event, wsproto.events.Message):
            reply.size += len(event.data)
            if keep:
                reply.pieces.append(event.data)
            if event.message_finished:
                break
        elif isinstance(event, wsproto.events.CloseConnection):
            reply.close = event
            break
        elif isinstance(event, wsproto.events.Pong):
            reply.pieces.append(bytes(event.payload))
            break
    return reply


def ws_fragmented_message(lab: Lab) -> tuple[float, str]:
    return ws_message_in_fragments(lab, lab.size(64 * MiB, 8 * MiB), lab.size(4096, 512))


def ws_message_in_fragments(lab: Lab, size: int, fragments: int) -> tuple[float, str]:
    piece = b"f" * (size // fragments)
    tls, ws = ws_connect(lab.bumper, lab.target)
    start = time.monotonic()
    with tls:
        with contextlib.suppress(OSError):
            for i in range(fragments):
                tls.sendall(ws.send(wsproto.events.BytesMessage(piece, message_finished=i == fragments - 1)))
        reply = ws_reply(tls, ws, 60)
    return (
        time.monotonic() - start,
        f"{size // MiB} MiB in {fragments} fragments; echoed {reply.size // MiB} MiB{reply.closed}",
    )


def ws_many_messages(lab: Lab) -> tuple[float, str]:
    count = lab.size(300, 60)  # 60: kept on the flow, as mitmproxy does, both ways they would pass 64 MiB
    message = b"m" * MiB
    tls, ws = ws_connect(lab.bumper, lab.target)
    start = time.monotonic()
    echoed, closed = 0, ""
    with tls:
        for _ in range(count):
            try:
                tls.sendall(ws.send(wsproto.events.BytesMessage(message)))
            except OSError:
                closed = ", closed while sending"
                break
            reply = ws_reply(tls, ws, 30)
            echoed += reply.size
            closed = reply.closed
            if closed or reply.size < len(message):
                break
    return time.monotonic() - start, f"{count} messages of 1 MiB; {echoed // MiB} echoed{closed}"


def ws_one_big_frame(lab: Lab) -> tuple[float, str]:
    size = lab.size(256 * MiB, 32 * MiB)
    tls, ws = ws_connect(lab.bumper, lab.target)
    start = time.monotonic()
    outcome = ""
    with tls:
        # The frame's header (FIN, binary; masked, 64-bit length; a mask of zeros), then its payload
        # in pieces: the client holds no 256 MiB buffer.
        header = bytes([0x82, 0xFF]) + size.to_bytes(8, "big") + b"\x00\x00\x00\x00"
        try:
            tls.sendall(header)
            chunk = b"b" * MiB
            for _ in range(size // len(chunk)):
                tls.sendall(chunk)
        except OSError as e:
            outcome = f"closed while sending ({type(e).__name__})"
        reply = ws_reply(tls, ws, 60)
        if reply.close:
            outcome = outcome or f"closed {reply.close.code} {reply.close.reason}"
        outcome = outcome or f"echoed {reply.size // MiB} MiB"
    return time.monotonic() - start, f"one {size // MiB} MiB frame: {outcome}"


def ws_compression_bomb(lab: Lab) -> tuple[float, str]:
    """permessage-deflate: 256 MiB of zeros, about 255 KB on the wire."""
    size = lab.size(256 * MiB, 64 * MiB)
    tls, ws = ws_connect(lab.bumper, lab.target, [wsproto.extensions.PerMessageDeflate()])
    start = time.monotonic()
    with tls:
        wire = ws.send(wsproto.events.BytesMessage(bytes(size)))
        with contextlib.suppress(OSError):
            tls.sendall(wire)
        reply = ws_reply(tls, ws, 60)
    outcome = f"closed {reply.close.code}" if reply.close else f"echoed {reply.size // MiB} MiB"
    return time.monotonic() - start, f"{size // MiB} MiB in {len(wire) // 1024} KiB; {outcome}"


def ws_message_never_ends(lab: Lab) -> tuple[float, str]:
    """A WebSocket message that never ends, its fragments as fast as bumper takes them, under a memory
    budget: the overload manager resets the connection holding the most before the budget is spent."""
    cap = lab.size(1024 * MiB, 256 * MiB)
    piece = b"n" * MiB
    tls, ws = ws_connect(lab.bumper, lab.target)
    start = time.monotonic()
    sent = 0
    with tls:
        try:
            while sent < cap:
                tls.sendall(ws.send(wsproto.events.BytesMessage(piece, message_finished=False)))
                sent += len(piece)
        except OSError as e:
            return time.monotonic() - start, f"reset after {sent // MiB} MiB sent ({type(e).__name__})"
        gone = read_until_closed(tls, 10) == b""
    return time.monotonic() - start, f"{sent // MiB} MiB sent, {'then closed' if gone else 'never reset'}"


def baseline_rss(start_bumper: Callable[..., Bumper], upstream: Upstream, *settings: str) -> int:
    """The RSS (bytes) of a bumper started with SETTINGS and no memory budget, its good path warm:
    what a case's budget is set against."""
    bumper = start_bumper(*settings, "--max-memory", "off")
    try:
        for _ in range(5):
            good_request(bumper, upstream)
        time.sleep(0.5)
        return rss_kib(bumper.process.proc.pid) * 1024
    finally:
        bumper.process.stop()


def h2_rapid_reset(lab: Lab) -> tuple[float, str]:
    count = lab.size(20000, 2000)
    before = lab.target.requests
    with tunnel(lab.bumper, lab.target.host, lab.target.port, alpn=["h2"]) as tls:
        start = time.monotonic()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", lab.target.host), (":path", "/")]
        goaway = "no GOAWAY"
        try:
            for i in range(count):
                stream = 2 * i + 1
                conn.send_headers(stream, headers, end_stream=True)
                conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                if i % 100 == 99:
                    tls.sendall(conn.data_to_send())
            tls.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        tls.settimeout(10)
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (data := tls.recv(65536)):
                events = conn.receive_data(data)
                if ended := [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]:
                    goaway = f"GOAWAY {ended[0].error_code!r}"
                    break
        lived = time.monotonic() - start
    lab.target.wait_for_requests(before + count, timeout=3)
    return lived, f"{count} streams; {goaway}; {lab.target.requests - before} reached the upstream"


def many_response_headers(lab: Lab) -> tuple[float, str]:
    count = lab.size(100_000, 100_000)

    def answer(tls: ssl.SSLSocket) -> None:
        fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(count))
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields + b"\r\nok")

    seconds, got = get_from_hostile(lab, answer, "fields.hostile.test", 60, limit=8 * MiB)
    return seconds, f"{count} fields; client got `{first_line(got)}`"


def slowloris_upstream(lab: Lab) -> tuple[float, str]:
    """An upstream that sends its response head a byte a second (at most 60 s)."""
    delay = lab.size(10, 2) / 10  # the bounded run starts bumper with --response-head-timeout 2

    def answer(tls: ssl.SSLSocket) -> None:
        for byte in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-Slow: " + b"s" * 50 + b"\r\n\r\nok")[:60]:
            tls.sendall(bytes([byte]))
            time.sleep(delay)

    seconds, got = get_from_hostile(lab, answer, "slow.hostile.test", 90)
    return seconds, f"a byte every {delay:g}s; client got `{first_line(got)}`"


@dataclass(frozen=True)
class Case:
    name: str  # as the table says it
    run: Callable[[Lab], tuple[float, str]]
    then: str = ""  # what bumper did when issue 22 was filed
    bumper_args: tuple[str, ...] = ()  # for the bounded run only
    settings: tuple[str, ...] = ()  # for every run: what the case is about
    headroom: int = 0  # above 0: bumper runs with --max-memory its baseline (baseline_rss) plus this


CASES = {
    "endless-response-head": Case(
        "upstream sends an endless response header",
        endless_response_head,
        "RSS peak +2.3 GiB, still +1.3 GiB 8 s later; the client waited 79 s",
    ),
    "endless-request-head": Case(
        "client sends an endless request header inside a bumped tunnel (256 MiB, no newline)",
        endless_request_head,
        "RSS +630 MiB, never closed",
    ),
    "h2-zero-window": Case(
        "HTTP/2 client keeps its window at zero while the upstream sends 512 MiB",
        h2_zero_window,
        "RSS +640 MiB, not returned after the close",
    ),
    "ws-fragments": Case(
        "WebSocket: one 64 MiB message in 4,096 fragments", ws_fragmented_message, "RSS +143 MiB, not returned"
    ),
    "ws-messages": Case("WebSocket: 300 messages of 1 MiB", ws_many_messages, "RSS +234 MiB, not returned"),
    "ws-big-frame": Case("WebSocket: one 256 MiB frame", ws_one_big_frame, "the connection broke (EOF)"),
    "ws-compression-bomb": Case(
        "WebSocket: 256 MiB of zeros compressed (permessage-deflate)",
        ws_compression_bomb,
        "(not in the issue) inflated in one piece: RSS +241 MiB",
    ),
    "h2-rapid-reset": Case(
        "HTTP/2 rapid reset: 20,000 HEADERS + RST_STREAM",
        h2_rapid_reset,
        "all 20,000 requests forwarded upstream, 10 s of CPU, no GOAWAY",
    ),
    "memory-budget": Case(
        "memory budget exhausted: a WebSocket message that never ends, --max-memory baseline + 48 MiB",
        ws_message_never_ends,
        "(not in the issue) no budget: the message grew until --websocket-max-message",
        settings=(*WS_READING, "--websocket-max-message", "2g"),  # assembled: an addon reads messages
        headroom=48 * MiB,
    ),
    "many-response-headers": Case("100,000 response headers", many_response_headers, "11 s for one response"),
    "slowloris-upstream": Case(
        "upstream sends its response head a byte a second",
        slowloris_upstream,
        "(not in the issue) the client waited as long as the bytes came",
        ("--response-head-timeout", "2"),
    ),
}


@dataclass
class Row:
    case: str
    then: str
    baseline_kib: int
    peak_kib: int  # over the baseline
    after_kib: int  # over the baseline, SETTLE seconds after the hostile connection closed
    settle: float
    lived: float  # seconds the hostile connection lived
    p99: float  # the good client's, while the hostile peer ran
    good: int
    good_failed: int
    traceback: bool
    note: str

    def ok(self) -> bool:
        return (
            self.peak_kib <= 64 * 1024
            and self.after_kib <= 64 * 1024
            and self.p99 < 1.0
            and not self.good_failed
            and not self.traceback
        )

    def markdown(self) -> str:
        mib = lambda kib: f"{kib / 1024:+.0f} MiB"  # noqa: E731
        failed = f", {self.good_failed} failed" if self.good_failed else ""
        good = f"{self.p99 * 1000:.0f} ms ({self.good} requests{failed})"
        return (
            f"| {self.case} | {self.then} | {self.baseline_kib / 1024:.0f} MiB | {mib(self.peak_kib)} "
            f"| {mib(self.after_kib)} "
            f"| {self.lived:.1f} s | {good} | {'yes' if self.traceback else 'no'} | {self.note} |"
        )


HEADER = (
    "| case | what bumper did (issue 22) | now: baseline RSS | peak over baseline | after the close (+settle) "
    "| hostile connection lived | good client p99 | traceback | what the hostile peer saw |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def measure(lab: Lab, case: Case, settle: float) -> Row:
    """Run CASE beside the good client; bumper's RSS before, at the peak, and SETTLE s after the close."""
    pid = lab.bumper.process.proc.pid
    log_start = len(lab.bumper.process.lines)
    for _ in range(5):  # the good path warm: its mimic minted, its code paths run once
        good_request(lab.bumper, lab.upstream)
    time.sleep(0.5)
    baseline = rss_kib(pid)
    reset_peak(pid)
    sampler = Sampler(pid)
    good = GoodClient(lab.bumper, lab.upstream)
    try:
        lived, note = case.run(lab)
        # A p99 of a handful says nothing: a quick case leaves the good client a few more seconds.
        deadline = time.monotonic() + 5
        while len(good.latencies) < GOOD_MIN_REQUESTS and time.monotonic() < deadline:
            time.sleep(GOOD_INTERVAL)
    finally:
        good.stop()
        peak = sampler.stop()
    time.sleep(settle)
    after = rss_kib(pid)
    traceback = any("Traceback" in line for line in lab.bumper.process.lines[log_start:])
    return Row(
        case.name, case.then, baseline, peak - baseline, after - baseline, settle, lived, good.p99,
        len(good.latencies), len(good.failures), traceback, note,
    )  # fmt: skip


def idle_connection_cost(bumper: Bumper, upstream: Upstream, count: int, hold: float = 1.0, download: int = 0) -> float:
    """KiB of bumper's RSS per idle bumped keep-alive connection, after one request each (a small
    response, or DOWNLOAD bytes): (RSS with COUNT of them held HOLD seconds − RSS before) / COUNT,
    after 20 connections opened and closed first."""
    pid = bumper.process.proc.pid
    path, end = (f"/bytes/{download}", b"\r\n0\r\n\r\n") if download else ("/", b"hello from upstream")

    def connect() -> ssl.SSLSocket:
        tls = tunnel(bumper, upstream.host, upstream.port)
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
        data = b""
        while not data.endswith(end):
            chunk = tls.recv(65536)
            assert chunk, data[:200]
            data = data[-64:] + chunk  # only its end is looked at
        return tls

    for _ in range(20):
        connect().close()
    time.sleep(1)
    before = rss_kib(pid)
    held = [connect() for _ in range(count)]
    time.sleep(hold)
    after = rss_kib(pid)
    for tls in held:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())  # each still served
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")
        tls.close()
    return (after - before) / count


def full_run() -> bool:
    """`make hostile`: the issue's sizes and a 30 s settle; else the bounded subset of ./test."""
    return os.environ.get("BUMPER_HOSTILE_FULL") == "1"
