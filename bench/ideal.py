"""The ideal bumping relay: how fast a Python data path for bumped HTTP/1.1 could be, on one core.

A bound, not a proxy. bench/run.py runs it as the contenders `ideal` (--mode parse) and `ideal-bare`
(--mode bare) next to bumper and stock mitmproxy, so that what a bumper-owned data path could reach is
measured in the same run as what bumper does (bench/README.md, "The ceiling: what a Python data path can
do").

What it does, and everything a bumping proxy must do on this path: an explicit proxy (CONNECT only);
server-first, the upstream's TLS handshake done and verified before the CONNECT is answered (against
--upstream-ca only, the host name checked as bumper checks it, SNI set), then the client's handshake, then
an HTTP/1.1 keep-alive relay between the two TLS legs, each a pyOpenSSL connection over memory BIOs as
mitmproxy drives them, one request at a time. It resumes its own upstream sessions per host and port, and
its client leg issues session tickets, so the resuming workload (1r) resumes on both legs as with bumper.
--mode parse also parses each head with mitmproxy's HTTP/1 parser, frames the bodies with mitmproxy's
rules, builds mitmproxy's connection objects for each connection and an HTTPFlow for each request, and
re-assembles the heads from the parsed objects: the least a data path that hands addons mitmproxy's flows
must do. --mode bare relays the heads as they came, framed by a scan of their fields.

What it does not do: mint (the client leg presents --cert, the origin's own leaf: the client trusts the
origin's root, so this is a mimic-cache hit at no cost at all), policy, hooks, addons, logging, streaming
(bodies are held whole, up to Limits.max_body), chunked or close-delimited bodies, 1xx responses, upgrades,
more than one request in flight (a pipelined request waits its turn), HTTP/2, plain http, reconnecting an upstream
that closed. What it does not handle it refuses: the connection is closed (one line on stderr), never left
hanging. Every buffer has a byte limit and every wait a deadline, checked once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import certs, connection, http
from mitmproxy.net.http import http1
from OpenSSL import SSL

from bumper.proxy import headerlookup, httpstream
from bumper.proxy.tlsprovider import CLIENT_CIPHERS
from bumper.upstream.sessions import UpstreamSessions
from bumper.upstream.tls import UPSTREAM_CIPHERS, expect_hostname

READ = 65536  # bytes asked of OpenSSL per recv/bio_read, as mitmproxy asks
SWEEP = 1.0  # seconds between two looks at the deadlines
MAX_SESSIONS = 1000  # upstream sessions kept (one per host and port)
END = b"\r\n\r\n"
# A refused connection's answer, by the state it was in: only before the CONNECT's 200 can the client read one.
ANSWER = {
    "connect": b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    "upstream": b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
}
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class Refused(Exception):
    """Something the relay does not handle, or a limit passed: the connection is closed, the reason logged."""


@dataclass(frozen=True)
class Limits:
    max_head: int = 64 * 1024  # a request or response head, the CONNECT's included
    max_body: int = 1 << 20  # a request or response body, held whole
    upstream_timeout: float = 10.0  # TCP connect and TLS handshake with the upstream, before the 200
    handshake_timeout: float = 10.0  # the client's TLS handshake, from the 200
    response_timeout: float = 30.0  # a whole response, from the request sent
    idle_timeout: float = 60.0  # a whole request, from the connection's start or the last response


@dataclass(frozen=True)
class Framing:
    """How a message's body ends and whether the connection ends after it."""

    length: int
    close: bool


@dataclass(frozen=True)
class Message:
    """A whole request or response, as it came."""

    head: bytes
    body: bytes
    framing: Framing


# --- framing: the fields a relay must read, in either mode ------------------------------------------


def head_of(buf: bytearray, max_head: int, what: str) -> bytes | None:
    """The head at the start of BUF, its blank line included; None while it is incomplete. Refused over MAX_HEAD
    bytes (searched only that far: a body behind the head is not scanned)."""
    end = buf.find(END, 0, max_head)
    if end >= 0:
        return bytes(buf[: end + len(END)])
    if len(buf) >= max_head:
        raise Refused(f"{what} over {max_head} bytes")
    return None


def scan_fields(head: bytes) -> tuple[bytes, int, bool]:
    """HEAD's start line, its Content-Length (-1 without), and whether it says Connection: close or is not
    HTTP/1.1. Refused for what the relay does not handle: Transfer-Encoding, conflicting lengths, a field
    that could be read two ways (whitespace before the colon, obs-fold)."""
    if head.count(b"\n") != head.count(b"\r\n"):
        raise Refused("a bare LF in a head")
    lines = head[: -len(END)].split(b"\r\n")
    start = lines[0]
    length = -1
    close = not (start.endswith(b" HTTP/1.1") or start.startswith(b"HTTP/1.1 "))
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise Refused(f"a header line it does not take: {line[:80]!r}")
        name = name.lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise Refused(f"Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise Refused("a Transfer-Encoding body (chunked): not handled")
        elif name == b"connection":
            tokens = [t.strip().lower() for t in value.split(b",")]
            if b"upgrade" in tokens:
                raise Refused("an upgrade (WebSocket, h2c): not handled")
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
    return start, length, close


def bare_request(head: bytes) -> Framing:
    start, length, close = scan_fields(head)
    if not start.startswith(b"GET ") and not start.startswith(b"POST ") and not start.startswith(b"PUT "):
        raise Refused(f"a request it does not relay: {start[:80]!r}")  # HEAD (no body), CONNECT, upgrades...
    return Framing(max(length, 0), close)


def bare_response(head: bytes) -> Framing:
    start, length, close = scan_fields(head)
    status = start[9:12]
    if status in (b"204", b"304"):
        return Framing(0, close)
    if status[:1] == b"1" or length < 0:
        raise Refused(f"a response it does not relay (1xx, or a body the close delimits): {start[:80]!r}")
    return Framing(length, close)


class Parsed:
    """--mode parse, one per connection: mitmproxy's Client and Server objects for it (each with its uuid4, as
    mitmproxy makes them; the Server with the upstream's chain as cryptography certificates, as mitmproxy keeps it)
    and the HTTPFlow of the request in flight, built from heads parsed and framed by mitmproxy's HTTP/1 code and
    re-assembled from the parsed objects: the least a data path that hands addons mitmproxy's flows does."""

    __slots__ = ("client", "server", "flow")

    def __init__(self, client: connection.Client, server: connection.Server) -> None:
        self.client = client
        self.server = server
        self.flow: http.HTTPFlow | None = None

    def request(self, head: bytes) -> Framing:
        """A new flow for the request HEAD; its framing."""
        try:
            request = http1.read_request_head(head[: -len(END)].split(b"\r\n"))
            length = http1.expected_http_body_size(request)
        except ValueError as e:
            raise Refused(f"bad request head: {e}") from None
        if length is None or length < 0 or request.method not in ("GET", "POST", "PUT"):
            raise Refused(f"a request it does not relay: {request.method} with body size {length}")
        if "upgrade" in request.headers:
            raise Refused("an upgrade (WebSocket, h2c): not handled")
        if why := httpstream.ambiguous(request):  # bumper's smuggling check, run on every HTTP/1 request
            raise Refused(f"ambiguous request: {why}")
        self.flow = http.HTTPFlow(self.client, self.server)
        self.flow.request = request
        return Framing(length, bool(http1.connection_close(request.http_version, request.headers)))

    def request_bytes(self, body: bytes) -> bytes:
        """The request in flight with its BODY, as it goes upstream."""
        assert self.flow is not None
        request = self.flow.request
        request.data.content = body
        request.timestamp_end = time.time()
        return bytes(http1.assemble_request_head(request)) + body

    def response(self, head: bytes) -> Framing:
        """The response head HEAD to the request in flight; its framing."""
        assert self.flow is not None
        try:
            response = http1.read_response_head(head[: -len(END)].split(b"\r\n"))
            length = http1.expected_http_body_size(self.flow.request, response)
        except ValueError as e:
            raise Refused(f"bad response head: {e}") from None
        if length is None or length < 0 or response.status_code < 200:
            raise Refused(f"a response it does not relay: {response.status_code} with body size {length}")
        self.flow.response = response
        return Framing(length, bool(http1.connection_close(response.http_version, response.headers)))

    def response_bytes(self, body: bytes) -> bytes:
        """The response in flight with its BODY, as it goes to the client."""
        assert self.flow is not None and self.flow.response is not None
        response = self.flow.response
        response.data.content = body
        response.timestamp_end = time.time()
        return bytes(http1.assemble_response_head(response)) + body


# --- TLS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    cert: Path  # the chain the client leg presents (the origin's own leaf)
    key: Path
    upstream_ca: Path  # the only roots the upstream leg trusts
    resolve: str  # the address every CONNECT host name is reached at, as bumper's --resolve '*.bench.test=...'
    parse: bool
    limits: Limits


def _context(method: int, ciphers: str) -> SSL.Context:
    """A leg as bumper sets both up by default: TLS 1.2-1.3, CIPHERS, no compression or renegotiation, no record
    buffers kept while idle."""
    context = SSL.Context(method)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_cipher_list(ciphers.encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    return context


def client_context(settings: Settings) -> SSL.Context:
    """The client leg as bumper's (bumper/proxy/tlsprovider.py client_context), serving --cert; session tickets on
    (OpenSSL's default), so a resuming client resumes."""
    context = _context(SSL.TLS_SERVER_METHOD, CLIENT_CIPHERS)
    context.use_certificate_chain_file(str(settings.cert))
    context.use_privatekey_file(str(settings.key))
    context.check_privatekey()
    return context


def upstream_context(settings: Settings) -> SSL.Context:
    """The upstream leg as bumper's (bumper/upstream/tls.py upstream_context), except that a verification
    error fails the handshake at once (bumper records it and decides after) and the only roots are
    --upstream-ca."""
    context = _context(SSL.TLS_CLIENT_METHOD, UPSTREAM_CIPHERS)
    context.set_verify(SSL.VERIFY_PEER)
    context.load_verify_locations(str(settings.upstream_ca))
    return context


class Leg:
    """One TLS connection driven over memory BIOs, as mitmproxy drives each of its TLS connections."""

    __slots__ = ("conn", "established", "peer_closed")

    def __init__(self, conn: SSL.Connection) -> None:
        self.conn = conn
        self.established = False
        self.peer_closed = False  # close_notify received

    def take(self, data: bytes) -> bytes:
        """Feed DATA from the peer; the plaintext now readable. SSL.Error on a failed handshake or a bad record."""
        if data:
            self.conn.bio_write(data)
        if not self.established:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunks.append(self.conn.recv(READ))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.peer_closed = True
                break
        return b"".join(chunks)

    def outgoing(self) -> bytes:
        """The TLS records to send (handshake, data, alerts)."""
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(READ))
            except SSL.WantReadError:
                return b"".join(chunks)

    def close_notify(self) -> bytes:
        if self.established and not self.peer_closed:
            try:
                self.conn.shutdown()
            except SSL.Error:
                pass
        return self.outgoing()


# --- the relay --------------------------------------------------------------------------------------


class Ideal:
    """The process: settings, the two TLS contexts, the upstream sessions, the live connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.client_ctx = client_context(settings)
        self.upstream_ctx = upstream_context(settings)
        if settings.parse:
            # Header lookups in one pass, as bumper runs mitmproxy (stock: 4-6 µs each, a dozen per request).
            headerlookup.install()
        # Only sessions of upstreams verified as host:port, so resuming never skips a verification a new name
        # would need. Insertion order is age: the oldest goes first past MAX_SESSIONS.
        self.sessions: dict[tuple[str, int], SSL.Session] = {}
        self.live: set[Relay] = set()
        self.upstream_handshakes = 0
        self.upstream_resumed = 0

    def keep_session(self, key: tuple[str, int], session: SSL.Session | None) -> None:
        if session is None:
            return
        self.sessions.pop(key, None)
        self.sessions[key] = session
        if len(self.sessions) > MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]

    async def sweep(self) -> None:
        """Close every connection whose deadline has passed; once a second, so no wait costs a timer."""
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            for relay in [r for r in self.live if r.deadline < now]:
                relay.refuse(f"timed out {relay.waiting}")


def log(message: str) -> None:
    print(f"ideal: {message}", file=sys.stderr, flush=True)


class Upstream(asyncio.Protocol):
    """The upstream leg of one Relay."""

    def __init__(self, relay: Relay, host: str, port: int) -> None:
        self.relay = relay
        self.key = (host, port)
        conn = SSL.Connection(relay.ideal.upstream_ctx)
        conn.set_connect_state()
        expect_hostname(conn, host)  # SNI, and OpenSSL checks the certificate covers HOST
        if session := relay.ideal.sessions.get(self.key):
            conn.set_session(session)
        self.leg = Leg(conn)
        self.transport: asyncio.Transport | None = None
        self.kept_session = False
        relay.upstream = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.relay.closed:  # the client went, or its deadline passed, while this connected
            transport.close()
            return
        self.leg.take(b"")
        transport.write(self.leg.outgoing())

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        was_established = self.leg.established
        try:
            try:
                plain = self.leg.take(data)
            except SSL.Error as e:
                raise Refused(f"upstream TLS: {e}") from None
            if out := self.leg.outgoing():
                self.transport.write(out)  # type: ignore[union-attr]
            if not was_established and self.leg.established:
                relay.ideal.upstream_handshakes += 1
                relay.ideal.upstream_resumed += UpstreamSessions.reused(self.leg.conn)
                relay.upstream_ready()
            if plain:
                relay.from_upstream(plain)
        except Refused as e:
            relay.refuse(str(e))
            return
        if self.leg.peer_closed:
            relay.upstream_gone()

    def response_done(self) -> None:
        """The upstream's TLS 1.3 tickets arrive after its handshake: its session is taken once one response
        has come, so that the next connection to it can resume."""
        if not self.kept_session:
            self.kept_session = True
            self.relay.ideal.keep_session(self.key, self.leg.conn.get_session())

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_gone()


class Relay(asyncio.Protocol):
    """One client connection and its upstream leg: CONNECT, upstream first, the client's handshake, requests."""

    def __init__(self, ideal: Ideal) -> None:
        self.ideal = ideal
        self.limits = ideal.limits
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # the CONNECT head, then the client's plaintext not yet relayed
        self.early = bytearray()  # TLS bytes the client sent before the 200
        self.leg: Leg | None = None
        self.upstream: Upstream | None = None
        self.ubuf = bytearray()  # the upstream's plaintext not yet relayed
        self.state = "connect"
        self.waiting = "for the CONNECT"
        self.deadline = time.monotonic() + self.limits.idle_timeout
        self.in_flight: Framing | None = None  # the request sent upstream, awaiting its response
        self.parsed: Parsed | None = None  # --mode parse
        self.opening: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ideal.live.add(self)

    # -- the client's bytes

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == "connect":
                self._connect_head(data)
            elif self.leg is None:  # waiting for the upstream: the client sent its ClientHello early
                self.early += data
                if len(self.early) > self.limits.max_head:
                    raise Refused("client data before the CONNECT's answer over the head limit")
            else:
                self._from_client(data)
        except Refused as e:
            self.refuse(str(e))

    def _connect_head(self, data: bytes) -> None:
        self.buf += data
        head = head_of(self.buf, self.limits.max_head, "CONNECT head")
        if head is None:
            return
        rest = self.buf[len(head) :]
        self.buf = bytearray()
        self.early += rest
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"CONNECT" or not parts[2].startswith(b"HTTP/1."):
            raise Refused(f"not a CONNECT: {head[:80]!r}")  # plain http is not relayed
        host, colon, port = parts[1].decode("ascii", "replace").rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise Refused(f"CONNECT to {parts[1][:80]!r}")
        self._await("upstream", f"for the upstream {host}:{port}", self.limits.upstream_timeout)
        # Held: the loop keeps only a weak reference to a task.
        self.opening = asyncio.get_running_loop().create_task(self._open_upstream(host.strip("[]"), int(port)))

    async def _open_upstream(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Upstream(self, host, port), self.ideal.settings.resolve, port)
        except (OSError, ValueError, SSL.Error) as e:  # ValueError: a name that is no host name (expect_hostname)
            self.refuse(f"cannot connect to {host}:{port}: {e}")

    def upstream_ready(self) -> None:
        """The upstream's handshake is done and verified: now the client gets its 200, then its handshake."""
        if self.closed or self.transport is None or self.upstream is None:
            return
        if self.ideal.settings.parse:
            host, port = self.upstream.key
            client = connection.Client(
                peername=self.transport.get_extra_info("peername"),
                sockname=self.transport.get_extra_info("sockname"),
                timestamp_start=time.time(),
            )
            server = connection.Server(address=(host, port), sni=host)
            # As mitmproxy's TLS layer keeps the upstream's chain (and bumper's access log reads it).
            chain = self.upstream.leg.conn.get_peer_cert_chain() or []
            server.certificate_list = [certs.Cert.from_pyopenssl(cert) for cert in chain]
            self.parsed = Parsed(client, server)
        conn = SSL.Connection(self.ideal.client_ctx)
        conn.set_accept_state()
        self.leg = Leg(conn)
        self._await("handshake", "for the client's TLS handshake", self.limits.handshake_timeout)
        self.transport.write(ESTABLISHED)
        if self.early:
            early, self.early = bytes(self.early), bytearray()
            self._from_client(early)

    def _from_client(self, data: bytes) -> None:
        assert self.leg is not None and self.transport is not None
        try:
            plain = self.leg.take(data)
        except SSL.Error as e:
            raise Refused(f"client TLS: {e}") from None
        if out := self.leg.outgoing():
            self.transport.write(out)
        if self.state == "handshake" and self.leg.established:
            self._await("request", "for a request", self.limits.idle_timeout)
        if plain:
            self.buf += plain
            if len(self.buf) > self.limits.max_head + self.limits.max_body:
                raise Refused("client data over the head and body limits")
            if self.state == "request":
                self._relay_request()
        if self.leg.peer_closed:
            self.close()

    def _await(self, state: str, waiting: str, timeout: float) -> None:
        """Now in STATE, waiting (as a timeout's log line says) for WAITING, at most TIMEOUT seconds."""
        self.state = state
        self.waiting = waiting
        self.deadline = time.monotonic() + timeout

    def _take_message(self, buf: bytearray, what: str, frame: Callable[[bytes], Framing]) -> Message | None:
        """The whole message (WHAT: request or response) at the start of BUF, taken out of it; None while it is
        incomplete. FRAME reads its head."""
        head = head_of(buf, self.limits.max_head, f"{what} head")
        if head is None:
            return None
        framing = frame(head)
        if framing.length > self.limits.max_body:
            raise Refused(f"{what} body of {framing.length} bytes over the body limit")
        stop = len(head) + framing.length
        if len(buf) < stop:
            return None
        body = bytes(buf[len(head) : stop])
        del buf[:stop]
        return Message(head, body, framing)

    def _relay_request(self) -> None:
        """The next whole request in self.buf, if there is one, to the upstream."""
        parsed = self.parsed
        request = self._take_message(self.buf, "request", parsed.request if parsed is not None else bare_request)
        if request is None:
            return
        upstream = self.upstream
        if upstream is None or upstream.transport is None or upstream.leg.peer_closed:
            raise Refused("a request after the upstream closed (no reconnect here)")
        message = parsed.request_bytes(request.body) if parsed is not None else request.head + request.body
        upstream.leg.conn.sendall(message)
        upstream.transport.write(upstream.leg.outgoing())
        self.in_flight = request.framing
        self._await("response", "for the upstream's response", self.limits.response_timeout)

    # -- the upstream's bytes

    def from_upstream(self, plain: bytes) -> None:
        if self.state != "response":
            raise Refused(f"upstream data while {self.waiting}")
        self.ubuf += plain
        if len(self.ubuf) > self.limits.max_head + self.limits.max_body:
            raise Refused("upstream data over the head and body limits")
        self._relay_response()

    def _relay_response(self) -> None:
        parsed = self.parsed
        response = self._take_message(self.ubuf, "response", parsed.response if parsed is not None else bare_response)
        if response is None:
            return
        if self.ubuf:
            raise Refused("upstream data after its response")
        assert self.leg is not None and self.transport is not None and self.upstream is not None
        self.upstream.response_done()
        message = parsed.response_bytes(response.body) if parsed is not None else response.head + response.body
        self.leg.conn.sendall(message)
        self.transport.write(self.leg.outgoing())
        request, self.in_flight = self.in_flight, None
        if response.framing.close or (request is not None and request.close):
            self.close()
            return
        self._await("request", "for a request", self.limits.idle_timeout)
        if self.buf:
            self._relay_request()

    def upstream_gone(self) -> None:
        if self.state in ("upstream", "response"):
            self.refuse(f"the upstream closed while {self.waiting}")
        elif self.state == "request" and self.buf:
            self.refuse("the upstream closed with a request waiting")

    # -- flow control: a client that does not read its responses. One request is in flight at a time, so the
    # upstream's send buffer holds one request at most; the client's holds the responses it has not read, and
    # while it is full no more requests are read (nor the response in flight).

    def pause_writing(self) -> None:
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is not None:
                transport.pause_reading()  # idempotent, and nothing on a closing transport

    def resume_writing(self) -> None:
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is not None:
                transport.resume_reading()

    # -- the end

    def refuse(self, reason: str) -> None:
        """Close, logging REASON; a client still waiting for the CONNECT's answer gets a 400 or a 502."""
        if self.closed:
            return
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log(f"closed {peer}: {reason}")
        if self.transport is not None and (answer := ANSWER.get(self.state)):
            self.transport.write(answer)
        self.close()

    def close(self) -> None:
        """Both legs closed, each with close_notify if its handshake was done; what was written is sent first."""
        if self.closed:
            return
        self.closed = True
        self.ideal.live.discard(self)
        for leg, transport in (
            (self.leg, self.transport),
            (self.upstream.leg if self.upstream else None, self.upstream.transport if self.upstream else None),
        ):
            if transport is None:
                continue
            if leg is not None and (out := leg.close_notify()):
                transport.write(out)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()


async def serve(settings: Settings) -> None:
    ideal = Ideal(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Relay(ideal), settings.host, settings.port)
    sweeper = loop.create_task(ideal.sweep())
    host, port = server.sockets[0].getsockname()[:2]
    log(f"listening on {host}:{port} (mode {'parse' if settings.parse else 'bare'})")
    try:
        await stop.wait()
    finally:
        sweeper.cancel()
        server.close()
        for relay in list(ideal.live):
            relay.close()
        log(f"stopped: {ideal.upstream_handshakes} upstream handshakes, {ideal.upstream_resumed} of them resumed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any; the line on stderr says)")
    p.add_argument("--cert", type=Path, required=True, help="the chain the client leg presents (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its key (PEM)")
    p.add_argument("--upstream-ca", type=Path, required=True, help="the only roots upstreams are verified with")
    p.add_argument("--resolve", default="127.0.0.1", help="the address every CONNECT host is reached at")
    p.add_argument("--mode", choices=("bare", "parse"), default="parse")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen {args.listen!r}: HOST:PORT")  # exits 2
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--upstream-ca", args.upstream_ca)):
        if not path.is_file():
            p.error(f"{option} {path}: no such file")
    settings = Settings(
        host, int(port), args.cert, args.key, args.upstream_ca, args.resolve, args.mode == "parse", Limits()
    )
    try:
        asyncio.run(serve(settings))
    except (OSError, SSL.Error) as e:
        print(f"ideal: cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
