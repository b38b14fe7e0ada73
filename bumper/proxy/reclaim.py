"""Memory back to the system once what held it is gone (issue 22: "memory comes back").

A closed connection's objects (mitmproxy's layers, its context, the flow and its bodies or
WebSocket messages) refer to each other in cycles, which only Python's cyclic collector frees, and
its oldest generation runs only after enough new long-lived objects: a quiet proxy can keep a
closed connection's hundreds of MiB for minutes. Even freed, glibc keeps the heap's top and its
arenas until asked to trim. So a timer looks at bumper's RSS every few seconds, and when it has grown
by RECLAIM_GROWTH since the last look that reclaimed, collects and trims: at most one full collection
per interval, and none while the RSS holds steady (a busy proxy's steady state).

WebSocket messages are not kept either: mitmproxy appends every message to the flow for the
connection's life (its UI shows them); bumper's addons see the current one, `messages[-1]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Callable

from mitmproxy import http

log = logging.getLogger("bumper")

RECLAIM_INTERVAL = 5.0  # seconds between two looks at the RSS
RECLAIM_GROWTH = 32 << 20  # bytes of RSS growth since the last reclaim that call for the next

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set (the second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), which hands freed heap pages back; nothing where there is none (musl)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return lambda: None

    def trimmed() -> None:
        trim(0)

    return trimmed


def due(rss: int, floor: int, growth: int = RECLAIM_GROWTH) -> bool:
    """Whether RSS has grown enough over FLOOR (the RSS after the last reclaim, or the lowest seen
    since) to be worth a full collection."""
    return rss - floor >= growth


class Reclaim:
    def __init__(
        self, rss: Callable[[], int] = rss_bytes, interval: float = RECLAIM_INTERVAL, growth: int = RECLAIM_GROWTH
    ) -> None:
        self.rss = rss
        self.interval = interval
        self.growth = growth
        self.trim = _malloc_trim()
        self.floor = 0
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        self.floor = self.rss()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            del flow.websocket.messages[:-1]  # relayed already: only the current one is anyone's to see

    def reclaim(self) -> None:
        """Collect and trim if the RSS calls for it; the floor follows the RSS down, and up to what is
        left after a reclaim (memory still in use is not reclaimed again and again)."""
        rss = self.rss()
        if not due(rss, self.floor, self.growth):
            self.floor = min(self.floor, rss)
            return
        gc.collect()
        self.trim()
        self.floor = self.rss()
        log.debug("bumper: memory: RSS %d MiB, %d MiB after a collection", rss >> 20, self.floor >> 20)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError):  # /proc unreadable: nothing to go by this time
                self.reclaim()
