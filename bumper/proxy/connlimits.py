"""The limits mitmproxy's layers have no place for: deadlines, the idle timeout's log line, the
header count, and connection counts with the accept loop paused at the maximum."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks

from bumper.proxy import replies
from bumper.proxy.httpstream import respond_early
from bumper.proxy.layers import relay_handshake
from bumper.proxy.limits import Limits, timed_out, too_many
from bumper.proxy.state import ConnectionStates

log = logging.getLogger("bumper")

# Seconds between two "new connections wait" lines.
PAUSE_LOG_INTERVAL = 60.0


class ConnectionLimits:
    """The deadlines, the idle timeout's log line, the header count, and the connection counts.

    Its timers are per connection, not per request: a keep-alive request costs one dictionary pop.
    It reaches into mitmproxy's connection handler to close a connection from a timer, as mitmproxy's
    own idle watchdog does (docs/architecture.md, "What bumper takes from mitmproxy's insides")."""

    def __init__(
        self, limits: Limits, states: ConnectionStates, proxyserver: Any, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits.with_fd_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.clock = clock
        self._last_told = -PAUSE_LOG_INTERVAL
        self._told = False
        self.states = states
        self.proxyserver = proxyserver
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # by client or server connection id
        self._per_address: dict[str, int] = {}
        self._open = 0
        # Two reasons to stop accepting, each with its own lines: max_connections open (_full), and
        # the overload manager's (bumper.proxy.overload). Accepting resumes when neither holds.
        self._full = False
        self._overloaded = False

    # Connection counts, and the deadline for the first request.

    def client_connected(self, client: connection.Client) -> None:
        address = client.peername[0]
        self._per_address[address] = count = self._per_address.get(address, 0) + 1
        self._open += 1
        if count > self.limits.max_client_connections:
            client.error = too_many(
                f"{self.limits.max_client_connections} connections already open from {address}",
                "--max-client-connections",
            )
            return
        if self._open > self.limits.max_connections:  # accepted in the burst before the pause took hold
            client.error = too_many(f"{self.limits.max_connections} connections already open", "--max-connections")
            return
        if self._open >= self.limits.max_connections:
            self._pause()
        handler = self.proxyserver.connections.get(client.id)
        if handler is None:
            return
        watchdog = handler.timeout_watchdog
        watchdog.callback = self._on_idle(client, watchdog.callback)
        seconds = self.limits.request_timeout
        reason = timed_out("no complete request", seconds, "--request-timeout")
        self._arm(client.id, seconds, lambda: self.close_client(client, reason))

    def client_disconnected(self, client: connection.Client) -> None:
        self._disarm(client.id)
        address = client.peername[0]
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]
        self._open -= 1
        if self._full and self._open < self.limits.max_connections:
            self._resume()

    def _on_idle(
        self, client: connection.Client, close: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        def idle() -> Awaitable[None]:
            if state := self.states.of(client.id):
                state.fail(f"limit: no data either way for {self.limits.idle_timeout}s (--idle-timeout)")
            return close()

        return idle

    # The request head: its deadline ends, and its header count is checked.

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)
        self._count_headers(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        seconds = self.limits.client_hello_timeout
        self._arm(
            client.id,
            seconds,
            lambda: self.close_client(client, timed_out("no ClientHello", seconds, "--client-hello-timeout")),
        )

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not relay_handshake(data.context):  # a relay's own TLS: the deadline runs on to the CONNECT
            self._disarm(data.context.client.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self._deadlines:  # only the first request of a connection has a deadline
            self._disarm(flow.client_conn.id)
        self._count_headers(flow)

    def _count_headers(self, flow: http.HTTPFlow) -> None:
        if len(flow.request.headers.fields) > self.limits.max_headers:
            self._refuse(flow, too_many(f"more than {self.limits.max_headers} header fields", "--max-headers"), 431)

    def _refuse(self, flow: http.HTTPFlow, reason: str, status: int) -> None:
        if state := self.states.of(flow.client_conn.id):
            state.fail(reason)
        response = replies.bad_request(reason, status).response(flow.request)
        if flow.request.method == "CONNECT":
            flow.response = response
            return
        if not flow.request.is_http2:
            response.headers["connection"] = "close"
        respond_early(flow, response)

    # The upstream: its TCP connect, then its TLS handshake, each within upstream_timeout.

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._arm_upstream(data.client, data.server, "no TCP connection to the upstream")

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._disarm(data.server.id)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._disarm(data.server.id)

    def tls_start_server(self, data: tls.TlsData) -> None:
        self._arm_upstream(data.context.client, data.context.server, "no TLS handshake with the upstream")

    def tls_established_server(self, data: tls.TlsData) -> None:
        self._disarm(data.context.server.id)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._disarm(data.context.server.id)

    def _arm_upstream(self, client: connection.Client, server: connection.Server, what: str) -> None:
        reason = timed_out(what, self.limits.upstream_timeout, "--upstream-timeout")
        self._arm(server.id, self.limits.upstream_timeout, lambda: self._close(client, server, reason))

    # Timers, and closing a connection from one.

    def _arm(self, key: str, seconds: float, expire: Callable[[], None]) -> None:
        self._disarm(key)
        self._deadlines[key] = asyncio.get_running_loop().call_later(seconds, self._fire, key, expire)

    def _fire(self, key: str, expire: Callable[[], None]) -> None:
        self._deadlines.pop(key, None)
        expire()

    def _disarm(self, key: str) -> None:
        if timer := self._deadlines.pop(key, None):
            timer.cancel()

    def close_client(self, client: connection.Client, reason: str) -> None:
        """End CLIENT's connection now, REASON its outcome (a timer's, or the overload manager's reset)."""
        self._close(client, client, reason)

    def _close(self, client: connection.Client, conn: connection.Connection, reason: str) -> None:
        """Record REASON as the connection's outcome, then end CONN (the client's connection, or one
        of its upstream ones) by cancelling the task that reads it, as mitmproxy's idle timeout does."""
        if state := self.states.of(client.id):
            state.fail(reason)
        handler = self.proxyserver.connections.get(client.id)
        io = handler.transports.get(conn) if handler is not None else None
        if io is not None and io.handler is not None:
            io.handler.cancel(reason)

    # Accepting: paused while max_connections are open, as HAProxy does at maxconn.

    def _listeners(self) -> Iterator[asyncio.Server]:
        for instance in self.proxyserver.servers:
            yield from (s for s in instance._servers if isinstance(s, asyncio.Server))

    def overloaded(self, on: bool) -> None:
        """The overload manager's reason to stop accepting, set or cleared: it logs its own lines."""
        was = self._full or self._overloaded
        self._overloaded = on
        if on and not was:
            self._stop_accepting()
        elif not on and not self._full:
            self._start_accepting()

    def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self._listeners():
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
            server._serving = False  # type: ignore[attr-defined] # so that _start_serving adds the readers back

    def _start_accepting(self) -> None:
        for server in self._listeners():
            server._start_serving()  # type: ignore[attr-defined] # nothing when it serves already

    def _pause(self) -> None:
        if self._full:
            return
        if not self._overloaded:
            self._stop_accepting()
        self._full = True
        # At the limit under load, every close resumes and the next accept pauses: one pair of lines
        # a minute says so, not one per connection.
        now = self.clock()
        self._told = now - self._last_told >= PAUSE_LOG_INTERVAL
        if self._told:
            self._last_told = now
            log.warning(
                f"bumper: {too_many(f'{self.limits.max_connections} connections open', '--max-connections')}: "
                "new connections wait until one closes"
            )

    def _resume(self) -> None:
        if not self._overloaded:
            self._start_accepting()
        self._full = False
        if self._told:
            log.warning("bumper: accepting connections again")


def out_of_descriptors(handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]) -> Callable[..., None]:
    """asyncio's exception handler, with one line instead of a traceback when accept() runs out of
    file descriptors or memory: asyncio itself then pauses accepting for a second and tries again."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning(
                f"bumper: limit: cannot accept a connection: {context.get('exception')} "
                f"(open files limit {soft}: raise `ulimit -n`, or lower --max-connections); retrying in 1s"
            )
            return
        handler(loop, context)

    return handle
