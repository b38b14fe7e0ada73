"""Memory back to the system once what held it is gone (issue 22: "memory comes back").

A closed connection's objects (mitmproxy's layers, its context, the flow and its bodies, buffers
and WebSocket messages) refer to each other in cycles, which only Python's cyclic collector frees, and
its oldest generation runs only after enough new long-lived objects: a quiet proxy kept a closed
connection's 500 MiB for minutes. Even freed, glibc keeps the heap's pages until asked to trim. So,
every few seconds, if a connection has closed since the last look and the RSS is RECLAIM_GROWTH or
more over the lowest it has been after a collection, bumper runs a full collection and trims the
heap. A collection's pause grows with the objects alive (the objects made at start-up are frozen
out of it), so the next one waits at least a hundred times as long as the last took: collections
cost at most 1% of the time, however busy the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import time
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.proxy import server_hooks

log = logging.getLogger("bumper")

RECLAIM_INTERVAL = 5.0  # seconds between two looks at the RSS
RECLAIM_GROWTH = 32 << 20  # bytes of RSS over the floor that are worth a collection
RECLAIM_SHARE = 0.01  # of the time, at most, spent collecting

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


def due(rss: int, floor: int, closed: bool, now: float, allowed_at: float, growth: int = RECLAIM_GROWTH) -> bool:
    """Whether a full collection is worth its pause: a connection closed (what it held may be garbage
    now), the RSS is GROWTH over FLOOR (the lowest it has been after a collection), and the last
    collection's share of the time allows another (ALLOWED_AT)."""
    return closed and now >= allowed_at and rss - floor >= growth


def allowed_after(now: float, took: float, interval: float = RECLAIM_INTERVAL, share: float = RECLAIM_SHARE) -> float:
    """When the next collection may run, after one that TOOK seconds ended at NOW."""
    return now + max(interval, took / share)


class Reclaim:
    def __init__(
        self,
        rss: Callable[[], int] = rss_bytes,
        clock: Callable[[], float] = time.monotonic,
        interval: float = RECLAIM_INTERVAL,
        growth: int = RECLAIM_GROWTH,
    ) -> None:
        self.rss = rss
        self.clock = clock
        self.interval = interval
        self.growth = growth
        self.trim = _malloc_trim()
        self.floor = sys.maxsize  # none before the proxy runs (or a test's first look)
        self.closed = False  # a client or upstream connection closed since the last collection
        self.allowed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        gc.freeze()  # what start-up made lives as long as the process: no collection need look at it
        self.floor = self.rss()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def client_disconnected(self, client: connection.Client) -> None:
        self.closed = True

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        # An upstream leg closed under a client that stays (--upstream-idle-timeout): its TLS state is
        # half of what an idle connection held. Left to the heap, a thousand idle connections whose
        # upstream legs closed kept their 111 KiB each of RSS (bench workload 5).
        self.closed = True

    def reclaim(self) -> None:
        """Collect and trim if it is due; the floor follows the RSS down."""
        rss, now = self.rss(), self.clock()
        if not due(rss, self.floor, self.closed, now, self.allowed_at, self.growth):
            self.floor = min(self.floor, rss)
            return
        self._collect(rss, now)

    def collect_if_allowed(self) -> None:
        """Collect and trim whether or not a connection closed, if the share of the time allows it:
        the overload manager's shrink step (bumper.proxy.overload)."""
        if self.clock() >= self.allowed_at:
            self.collect()

    def collect(self) -> None:
        """Collect and trim now, whatever the share: what frees the connections the overload manager
        has just reset."""
        self._collect(self.rss(), self.clock())

    def _collect(self, rss: int, now: float) -> None:
        gc.collect()
        self.trim()
        after, ended = self.rss(), self.clock()
        self.closed = False
        self.floor = min(self.floor, after)
        self.allowed_at = allowed_after(ended, ended - now, self.interval)
        log.debug("bumper: memory: RSS %d MiB, %d MiB after a collection of %.3fs", rss >> 20, after >> 20, ended - now)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError):  # /proc unreadable: nothing to go by this time
                self.reclaim()
