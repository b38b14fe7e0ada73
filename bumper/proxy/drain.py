"""SIGTERM: a graceful stop, as a service manager or an orchestrator asks for one. The listening
sockets close at once (a load balancer's next connection goes to another replica), the connections
open then finish what they do for up to --drain-timeout seconds, and bumper exits 0. A second SIGTERM,
or SIGINT (Ctrl-C), stops at once. SIGINT alone keeps its meaning: stop now (bumper.stopping)."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, http, master
from mitmproxy.addons import proxyserver
from mitmproxy.utils import asyncio_utils

from bumper import sdnotify
from bumper.proxy.state import ConnectionStates

log = logging.getLogger("bumper")

DEFAULT_TIMEOUT = 30.0


def started_line(open_connections: int, timeout: float) -> str:
    """The line a drain starts with: how much is left to finish, and for how long at most."""
    return (
        f"SIGTERM: draining, no new connections; {open_connections} open, cut after {timeout:g}s "
        "(--drain-timeout; SIGTERM or Ctrl-C again: stop now)"
    )


def ended_line(left: int, timeout: float) -> str:
    """The line a drain ends with: whether every connection finished, or how many were cut."""
    if left == 0:
        return "drained: every connection finished"
    return f"drain timed out after {timeout:g}s (--drain-timeout): {left} connection{'s' * (left != 1)} cut"


class Drain:
    """The drain, a mitmproxy addon: it hears of every connection's end, so the drain ends as soon as
    the last one does instead of polling. `draining` is what a readiness check reads: True from the
    first SIGTERM on."""

    def __init__(
        self, m: master.Master, server: proxyserver.Proxyserver, states: ConnectionStates, timeout: float
    ) -> None:
        self.master = m
        self.server = server
        self.states = states
        self.timeout = timeout
        self.draining = False
        self._finished = asyncio.Event()

    def sigterm(self) -> None:
        """SIGTERM's handler once the proxy serves: the first starts the drain, a second stops now."""
        if self.draining:
            self.master.shutdown()
            return
        self.draining = True
        asyncio_utils.create_task(self._drain(), name="bumper drain", keep_ref=True)

    async def _drain(self) -> None:
        for instance in list(self.server.servers):
            try:
                await instance.stop()
            except Exception as e:  # a listener that will not close must not keep the proxy from stopping
                log.warning("drain: cannot close the listener %s: %s", instance.mode.full_spec, e)
        open_connections = len(self.states)
        log.info("%s", started_line(open_connections, self.timeout))
        sdnotify.stopping(f"draining {open_connections} connections")
        if open_connections:
            try:
                await asyncio.wait_for(self._finished.wait(), self.timeout)
            except TimeoutError:
                pass
        log.info("%s", ended_line(len(self.states), self.timeout))
        self.master.shutdown()

    def client_disconnected(self, client: connection.Client) -> None:
        """After ConnectionLog, which forgets the connection's state: the count is then what is left."""
        if self.draining and not len(self.states):
            self._finished.set()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """While draining, an HTTP/1 client is told to close its connection after this response, so
        that an idle keep-alive connection does not hold the drain to its timeout."""
        if self.draining and flow.response is not None and flow.request.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"
