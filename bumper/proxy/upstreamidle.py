"""The upstream leg of an idle keep-alive connection, closed after --upstream-idle-timeout.

An idle bumped connection holds two TLS connections, and the upstream's is the one nobody waits on:
closing it frees its TLS state, its socket and its transport (bench/README.md, "Where an idle
connection's memory goes"), as Squid's server_idle_pconn_timeout (1 min) and Envoy's upstream
idle_timeout do. The client's connection, its mimic and its decision stay; its next request makes
mitmproxy's HTTP layer open a new upstream connection to the same address, which bumper verifies as
it did the first (TlsProvider, tls_established_server). This is what happens when an upstream closes
an idle keep-alive connection first, which HTTP/1 allows at any time.

Only between requests: the timer runs while no request of the connection is open (HTTP/2 counts its
streams), and never after a protocol upgrade (WebSocket) or a CONNECT, whose upstream connection
carries the tunnel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy import connection, http
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.layers.http import HttpClient
from mitmproxy.proxy.tunnel import TunnelState

from bumper.proxy.overload import layers_under
from bumper.proxy.state import ConnectionState, ConnectionStates
from bumper.upstream.tls import drop_record_buffers

# flow.metadata: this request is counted in its connection's open_requests (until its end is seen).
_OPEN = "bumper.upstream_idle.open"


class UpstreamIdle:
    """Closes a client connection's upstream connections SECONDS after its last request ended, if
    no other began meanwhile (0: never), and drops its own TLS connection's idle buffers. It ends
    them by cancelling the tasks that read them, as mitmproxy's idle watchdog and ConnectionLimits
    do (docs/architecture.md, mitmproxy's insides)."""

    def __init__(self, seconds: float, states: ConnectionStates, proxyserver: Any) -> None:
        self.seconds = seconds
        self.states = states
        self.proxyserver = proxyserver

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.of(flow.client_conn.id)
        if state is None or flow.request.method == "CONNECT":
            return
        # The timer stays armed: when it fires, it finds a request open and lets the request's end arm
        # it again (see _ended).
        state.open_requests += 1
        flow.metadata[_OPEN] = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if state := self.states.of(flow.client_conn.id):
            _disarm(state)  # a tunnel's upstream connection is the tunnel's own

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code == 101:
            return  # upgraded: the request stays open for as long as the connection lives
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        """One timer per connection, armed when none is and moved on when it fires early, rather than
        one armed at every request's end and cancelled at the next request's start: on keep-alive
        traffic that scheduling and cancelling was 2.2% of bumper's CPU (py-spy, bench workload 2,
        c=10), and the cancelled timers waited in the event loop's heap until their time."""
        state = self.states.of(flow.client_conn.id)
        if state is None or not flow.metadata.pop(_OPEN, False):
            return  # not counted, or its end already seen (an error after its response)
        state.open_requests -= 1
        if state.open_requests == 0 and self.seconds > 0:
            loop = asyncio.get_running_loop()
            state.idle_since = loop.time()
            if state.upstream_idle_timer is None:
                state.upstream_idle_timer = loop.call_at(state.idle_since + self.seconds, self._expired, state)

    def _expired(self, state: ConnectionState) -> None:
        """The timer's time: the connection has been idle for SECONDS, or a request came meanwhile
        (its end arms the timer again), or one came and ended (the timer moves to SECONDS after that)."""
        state.upstream_idle_timer = None
        if state.open_requests:
            return
        loop = asyncio.get_running_loop()
        due = state.idle_since + self.seconds
        if due > loop.time():
            state.upstream_idle_timer = loop.call_at(due, self._expired, state)
            return
        self._close_upstreams(state)

    def client_disconnected(self, client: connection.Client) -> None:
        if state := self.states.of(client.id):
            _disarm(state)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Drops what the client's layers keep of a closed upstream connection: mitmproxy's HTTP layer
        keeps every upstream connection it opened, closed or not, with its layers, and the TLS layer
        its OpenSSL object (its session, the upstream's chain: most of a leg's memory) for as long
        as the client's connection lives. Whoever closed it, bumper or the upstream."""
        handler = self.proxyserver.connections.get(data.client.id)
        if handler is not None:
            release(handler.layer, data.server)

    def _close_upstreams(self, state: ConnectionState) -> None:
        handler = self.proxyserver.connections.get(state.conn.id)
        if handler is None:
            return
        for conn, io in list(handler.transports.items()):
            if isinstance(conn, connection.Server) and io.handler is not None:
                io.handler.cancel("upstream idle")
        for found in layers_under(handler.layer):  # the client's TLS: its buffers from the last response
            if isinstance(found, layers.ClientTLSLayer) and found.tls is not None:
                drop_record_buffers(found.tls)


def _disarm(state: ConnectionState) -> None:
    if state.upstream_idle_timer is not None:
        state.upstream_idle_timer.cancel()
        state.upstream_idle_timer = None


def release(root: layer.Layer, server: connection.Server) -> None:
    """Forgets SERVER, closed, in the layers under ROOT: its TLS layer's OpenSSL object, and the HTTP
    layer's stack for it (HttpLayer.connections). Nothing reads either once the connection is closed:
    a next request opens a new connection (mitmproxy's HttpLayer.get_connection skips closed ones).
    The tunnel's entry in the proxy's own HTTP layer stays: it is the tunnel's. So do its
    certificates: the access log reads them."""
    if server.connected:
        return
    for found in list(layers_under(root)):
        if isinstance(found, layers.HttpLayer):
            if isinstance(found.connections.get(server), (layers.ServerTLSLayer, HttpClient)):
                del found.connections[server]
        elif isinstance(found, layers.ServerTLSLayer) and found.conn is server:
            if found.tunnel_state is TunnelState.CLOSED:
                found.tls = None  # type: ignore[assignment] # mitmproxy types it as always set
