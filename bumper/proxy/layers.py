"""Which protocol layer comes next: bumper's replacement for mitmproxy's stock NextLayer addon.

On the explicit proxy, CONNECT tunnels must carry TLS: the stack is HTTP proxy -> CONNECT ->
server TLS + client TLS (server first) -> HTTP; anything else inside a tunnel is refused rather
than passed through, since an inspection gateway that tunnels whatever it cannot read is no
gateway. On the other listeners the stack starts at the TLS layers (transparent: plain HTTP too;
SNI: the ClientHello's name is the destination) or, on a reverse listener, at the client's TLS or
plain HTTP, with the upstream's TLS beneath for an https:// upstream (docs/architecture.md). A relay
listener is the explicit proxy inside TLS of bumper's own: relay TLS -> HTTP proxy -> CONNECT -> ...,
TLS inside TLS (mitmproxy's ClientTLSLayer keeps the inner session's attributes on the one Client). So
where a connection is (inside a tunnel, inside the TLS bumper decides on) is read from the layer
stack, never from client.tls, which the relay's own TLS sets too.
"""

from __future__ import annotations

from collections.abc import Mapping

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers, mode_specs
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.tunnel import TunnelState
from OpenSSL import SSL

from bumper.proxy.dispatch import AddonManager, SyncHooks
from bumper.proxy.h1relay import Http1Relay, relays
from bumper.proxy.h2flow import Reading
from bumper.proxy.httpstream import CutOff, HttpLayer, UncleanClose
from bumper.proxy.limits import Limits, too_many
from bumper.proxy.listeners import SNI_PENDING, Listener, Mode

# starts_like_tls_record needs this many bytes to decide.
_TLS_RECORD_PREFIX = 3


class _TLSAlerts:
    """Ends TLS as RFC 8446 (6) asks, where stock mitmproxy 11 just drops the TCP connection:
    a close_notify before closing an open session, and OpenSSL's fatal alert (handshake_failure,
    protocol_version, ...) when a handshake fails. Strict clients read a bare close as truncation,
    and scanners mistake a silent close for acceptance. Except after a cut-off response (CutOff): then
    the missing close_notify is what tells the client."""

    def send_close(self, command: commands.CloseConnection) -> layer.CommandGenerator[None]:
        session_open = self.tls is not None and self.tunnel_state is TunnelState.OPEN  # type: ignore[attr-defined]
        if session_open and not isinstance(command, CutOff):
            try:
                self.tls.shutdown()  # type: ignore[attr-defined]
            except SSL.Error:
                pass  # the peer is gone or the session broken: nothing to notify
            yield from self.tls_interact()  # type: ignore[attr-defined]
        yield from super().send_close(command)  # type: ignore[misc]

    def on_handshake_error(self, err: str) -> layer.CommandGenerator[None]:
        if self.tls is not None:  # type: ignore[attr-defined]
            yield from self.tls_interact()  # type: ignore[attr-defined]
        yield from super().on_handshake_error(err)  # type: ignore[misc]


class ServerTLSLayer(_TLSAlerts, layers.ServerTLSLayer):
    """Tells its child whether the upstream's TCP close came after its close_notify: mitmproxy's
    ConnectionClosed is the same for both, and only the HTTP layer knows whether a body was cut."""

    def receive_close(self) -> layer.CommandGenerator[None]:
        if self.tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN:
            return  # receive_data passed the close_notify on as a ConnectionClosed already
        yield from self.event_to_child(UncleanClose(self.conn))


# A fatal access_denied alert (RFC 8446 6.2), in a TLS 1.2 record as any version's ClientHello accepts:
# "access control was applied, and the sender decided not to proceed".
ACCESS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])


class ClientTLSLayer(_TLSAlerts, layers.ClientTLSLayer):
    """Holds the ClientHello to a size limit, and reads its records once each: mitmproxy parses the
    whole buffer again on every read, so a ClientHello cut into thousands of one-byte records
    (which OpenSSL accepts, and so does bumper) would cost time quadratic in its size."""

    def __init__(self, context: Context, limits: Limits) -> None:
        super().__init__(context)
        self.max_hello = limits.max_client_hello_bytes
        self._scan = _HelloScan()

    def start_tls(self) -> layer.CommandGenerator[None]:
        for command in super().start_tls():
            if isinstance(command, commands.CloseConnection) and self.tls is None:
                # bumper refused the handshake (the policy, or an upstream that failed): say so in
                # TLS, where mitmproxy only closes and the client reads a truncated handshake.
                yield commands.SendData(self.conn, ACCESS_DENIED)
            yield command

    def receive_handshake_data(self, data: bytes) -> layer.CommandGenerator[tuple[bool, str | None]]:
        if self.client_hello_parsed:
            return (yield from super().receive_handshake_data(data))
        if len(self.recv_buffer) + len(data) > self.max_hello:
            return False, too_many(f"ClientHello over {self.max_hello} bytes", "--max-client-hello-bytes")
        self.recv_buffer.extend(data)
        if not self._scan.complete(self.recv_buffer):
            return False, None  # as mitmproxy answers an incomplete ClientHello
        return (yield from super().receive_handshake_data(b""))  # parses all that was received, once


class RelayTLSLayer(ClientTLSLayer):
    """A relay listener's own TLS: bumper is the server the client asked for (an HTTPS proxy), so its
    handshake is no connection to decide. The hooks it raises tell by relay_handshake."""


def relay_handshake(context: Context) -> bool:
    """Whether a TLS hook's CONTEXT is a relay listener's own handshake, not one bumper decides on."""
    return isinstance(context.layers[-1], RelayTLSLayer)


class _HelloScan:
    """Walks the TLS records of a ClientHello as they arrive, each one once."""

    def __init__(self) -> None:
        self.offset = 0  # where the next record starts
        self.head = b""  # the handshake message's first four bytes: its type and length
        self.content = 0  # handshake bytes received

    def complete(self, buf: bytearray) -> bool:
        """Whether BUF holds the whole ClientHello, or something mitmproxy should judge now (a record
        that is not a handshake record)."""
        while self.offset + 5 <= len(buf):
            if buf[self.offset] != 0x16:
                return True
            length = int.from_bytes(buf[self.offset + 3 : self.offset + 5])
            end = self.offset + 5 + length
            if end > len(buf):
                return False
            if len(self.head) < 4:
                self.head += bytes(buf[self.offset + 5 : self.offset + 5 + 4 - len(self.head)])
            self.content += length
            self.offset = end
            if len(self.head) == 4 and self.content >= int.from_bytes(self.head[1:4]) + 4:
                return True
        return False


class Refuse(layer.Layer):
    """Closes the client connection (and with it the upstream one), recording why."""

    def __init__(self, context: Context, reason: str) -> None:
        super().__init__(context)
        self.reason = reason

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            self.context.client.error = self.context.client.error or self.reason
            yield commands.CloseConnection(self.context.client)


class NextLayer:
    def __init__(
        self,
        dispatcher: AddonManager,
        limits: Limits,
        listeners: Mapping[str, Listener] | None = None,
        reading: Reading | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.limits = limits
        self.reading = reading  # the HTTP layers' pausing of a connection's reads (bumper.proxy.h2flow)
        self.listeners = listeners or {}  # by the mode mitmproxy runs each with
        # The admin listener's address, which the proxy port's answer to `GET /` names: set by
        # master.serve once it is bound (--admin HOST:0 picks its port then).
        self.admin: tuple[str, int] | None = None

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        data, first, parent = nextlayer.data_client(), context.layers[0], context.layers[-1]
        if len(context.layers) == 1:  # what comes right after the listener's own layer
            top = self._first(context, data, first)
            if top is not None:
                nextlayer.layer = SyncHooks(context, top, self.dispatcher)
        elif isinstance(parent, RelayTLSLayer):
            # Inside the relay's own TLS: the explicit proxy's requests, CONNECT and plain http://.
            nextlayer.layer = HttpLayer(
                context, HTTPMode.regular, self.limits, self.dispatcher, self.admin, self.reading
            )
        elif (
            isinstance(parent, layers.ClientTLSLayer) and not isinstance(first, modes.ReverseProxy) and relays(context)
        ):
            # Bumped HTTP/1.1: bumper's own relay, which hands what it does not take to bumper's HttpLayer.
            nextlayer.layer = Http1Relay(context, self.limits, self.dispatcher, self.reading)
        elif isinstance(parent, layers.ClientTLSLayer) or isinstance(first, modes.ReverseProxy):
            # Decrypted (HTTP/1.1 or h2 by ALPN, HTTP/1.1 when the client offered none), or a reverse
            # listener's plain HTTP above the upstream's TLS.
            nextlayer.layer = HttpLayer(
                context, HTTPMode.transparent, self.limits, self.dispatcher, reading=self.reading
            )
        else:  # a CONNECT tunnel's
            nextlayer.layer = self._inside_tunnel(context, data)

    def _first(self, context: Context, data: bytes, first: layer.Layer) -> layer.Layer | None:
        if isinstance(first, modes.TransparentProxy):
            return self._redirected(context, data)
        if isinstance(first, modes.ReverseProxy):
            return self._reverse(context, data)
        listener = self.listeners.get(context.client.proxy_mode.full_spec)
        if listener is not None and listener.mode is Mode.SNI:
            return self._sni_gateway(context, data, listener.sni_port)
        if listener is not None and listener.mode is Mode.RELAY:
            return self._relay(context, data)
        return self._proxy_request(context, data)

    def _relay(self, context: Context, data: bytes) -> layer.Layer | None:
        """A relay listener: bumper's own TLS first (an HTTPS proxy, TlsProvider), the explicit
        proxy's requests inside it."""
        if len(data) < _TLS_RECORD_PREFIX:
            return None
        if not starts_like_tls_record(data):
            return Refuse(context, "not TLS: a relay listener takes TLS only (an HTTPS proxy: --proxy https://)")
        return RelayTLSLayer(context, self.limits)

    def _reverse(self, context: Context, data: bytes) -> layer.Layer | None:
        """A reverse listener: the client's TLS, if it speaks TLS, is terminated with bumper's own
        certificate for its name (TlsProvider); the upstream's, for an https:// upstream, is bumper's
        to verify. Plain HTTP is accepted too: originate (http -> https) and plain relaying."""
        if len(data) < _TLS_RECORD_PREFIX:
            return None
        spec = context.client.proxy_mode
        assert isinstance(spec, mode_specs.ReverseMode)
        # Made top down: each layer finds its parent in context.layers, in the order they were made.
        server_tls = ServerTLSLayer(context) if spec.scheme == "https" else None
        below: layer.Layer = (
            ClientTLSLayer(context, self.limits)
            if starts_like_tls_record(data)
            else HttpLayer(context, HTTPMode.transparent, self.limits, self.dispatcher, reading=self.reading)
        )
        if server_tls is None:
            return below
        server_tls.child_layer = below
        return server_tls

    def _proxy_request(self, context: Context, data: bytes) -> layer.Layer | None:
        if len(data) < _TLS_RECORD_PREFIX:
            return None  # wait for the first bytes
        if starts_like_tls_record(data):
            # A client configured with https:// for the proxy itself; it would wait forever.
            return Refuse(context, "not HTTP: the client opened TLS to the proxy port (use http:// for the proxy)")
        return HttpLayer(context, HTTPMode.regular, self.limits, self.dispatcher, self.admin, self.reading)

    def _redirected(self, context: Context, data: bytes) -> layer.Layer | None:
        """A connection the kernel redirected to a transparent listener, to its original destination
        (mitmproxy's TransparentProxy read it, SO_ORIGINAL_DST): TLS, or plain HTTP."""
        if len(data) < _TLS_RECORD_PREFIX:
            return None
        if starts_like_tls_record(data):
            return self._tls(context)
        return HttpLayer(context, HTTPMode.transparent, self.limits, self.dispatcher, reading=self.reading)

    def _sni_gateway(self, context: Context, data: bytes, port: int) -> layer.Layer | None:
        """TLS sent straight to bumper: the ClientHello's SNI is the destination, on PORT, which
        PolicyEnforcer.tls_clienthello sets once it has read it (nothing is connected before)."""
        if len(data) < _TLS_RECORD_PREFIX:
            return None
        if not starts_like_tls_record(data):
            return Refuse(context, "not TLS: an SNI listener takes TLS only")
        context.server.address = (SNI_PENDING, port)
        return self._tls(context)

    def _inside_tunnel(self, context: Context, data: bytes) -> layer.Layer | None:
        if len(data) < _TLS_RECORD_PREFIX:
            return None  # wait for more bytes
        if not starts_like_tls_record(data):
            return Refuse(context, "not TLS: the client sent non-TLS data inside the CONNECT tunnel")
        if not context.server.connected and context.server.timestamp_start is not None:
            # Its close was seen while no layer was listening; TLS towards it would wait forever.
            # (One never opened is a deferred CONNECT's: the TLS layer opens it after the ClientHello.)
            return Refuse(context, "upstream TLS failed: the upstream closed the connection before the handshake")
        return self._tls(context)

    def _tls(self, context: Context) -> layer.Layer:
        """Server TLS, then client TLS: the upstream's handshake first (server-first)."""
        server_tls = ServerTLSLayer(context)
        server_tls.child_layer = ClientTLSLayer(context, self.limits)
        return server_tls
