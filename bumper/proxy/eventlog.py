"""One human-readable log line per client connection: who, where to, what bumper did, how it ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import connection

from bumper.proxy.state import ConnectionState, ConnectionStates

log = logging.getLogger("bumper.conn")


class ConnectionLog:
    """Added after bumper's other addons: their client_disconnected hooks still see the connection's
    state, and then this one writes its line, tells on_end, and forgets it."""

    def __init__(self, states: ConnectionStates) -> None:
        self.states = states
        # Told of every state as its connection ends (the addons' connection_end, learned pinning).
        self.on_end: list[Callable[[ConnectionState], Awaitable[None] | None]] = []

    def client_disconnected(self, client: connection.Client) -> Awaitable[Any] | None:
        state = self.states.pop(client.id)
        if state is None:
            return None
        if client.error:
            state.fail(client.error)
        log.info(state.line())
        # Each callback runs now; those that have to wait finish together.
        waiting = [pending for ended in self.on_end if (pending := ended(state)) is not None]
        return asyncio.gather(*waiting) if waiting else None
