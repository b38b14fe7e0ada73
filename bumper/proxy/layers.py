"""Which protocol layer comes next: bumper's replacement for mitmproxy's stock NextLayer addon.

bumper is an explicit HTTP proxy whose CONNECT tunnels must carry TLS. The stack is always
HTTP proxy -> CONNECT -> server TLS + client TLS (server first) -> HTTP; anything else inside a
tunnel is refused rather than passed through, since an inspection gateway that tunnels whatever
it cannot read is no gateway.
"""

from __future__ import annotations

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.tunnel import TunnelState
from OpenSSL import SSL

from bumper.proxy.dispatch import AddonManager, SyncHooks
from bumper.proxy.httpstream import HttpLayer

# starts_like_tls_record needs this many bytes to decide.
_TLS_RECORD_PREFIX = 3


class _TLSAlerts:
    """Ends TLS as RFC 8446 (6) asks, where stock mitmproxy 11 just drops the TCP connection:
    a close_notify before closing an open session, and OpenSSL's fatal alert (handshake_failure,
    protocol_version, ...) when a handshake fails. Strict clients read a bare close as truncation,
    and scanners mistake a silent close for acceptance."""

    def send_close(self, command: commands.CloseConnection) -> layer.CommandGenerator[None]:
        if self.tls is not None and self.tunnel_state is TunnelState.OPEN:  # type: ignore[attr-defined]
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
    pass


class ClientTLSLayer(_TLSAlerts, layers.ClientTLSLayer):
    pass


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
    def __init__(self, dispatcher: AddonManager) -> None:
        self.dispatcher = dispatcher

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        context = nextlayer.context
        if len(context.layers) == 1 and isinstance(context.layers[0], modes.HttpProxy):
            top = self._proxy_request(context, nextlayer.data_client())
            if top is not None:
                nextlayer.layer = SyncHooks(context, top, self.dispatcher)
        elif context.client.tls:
            # Decrypted: HTTP/1.1 or h2 by ALPN, HTTP/1.1 when the client offered none.
            nextlayer.layer = HttpLayer(context, HTTPMode.transparent)
        else:
            nextlayer.layer = self._inside_tunnel(context, nextlayer.data_client())

    @staticmethod
    def _proxy_request(context: Context, data: bytes) -> layer.Layer | None:
        if len(data) < _TLS_RECORD_PREFIX:
            return None  # wait for the first bytes
        if starts_like_tls_record(data):
            # A client configured with https:// for the proxy itself; it would wait forever.
            return Refuse(context, "not HTTP: the client opened TLS to the proxy port (use http:// for the proxy)")
        return HttpLayer(context, HTTPMode.regular)

    @staticmethod
    def _inside_tunnel(context: Context, data: bytes) -> layer.Layer | None:
        if len(data) < _TLS_RECORD_PREFIX:
            return None  # wait for more bytes
        if not starts_like_tls_record(data):
            return Refuse(context, "not TLS: the client sent non-TLS data inside the CONNECT tunnel")
        if not context.server.connected:
            # Its close was seen while no layer was listening; TLS towards it would wait forever.
            return Refuse(context, "upstream TLS failed: the upstream closed the connection before the handshake")
        server_tls = ServerTLSLayer(context)
        server_tls.child_layer = ClientTLSLayer(context)
        return server_tls
