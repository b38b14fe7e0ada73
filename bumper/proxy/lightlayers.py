"""Each mitmproxy layer's queue of events held while it waits (a hook, a connection), allocated when
the first event is held rather than with the layer.

An idle bumped connection nests about ten layers, and an empty collections.deque takes 760 bytes:
7 KiB of every idle connection for queues that are empty but for the moments a layer waits
(bench/README.md, "Where an idle connection's memory goes"). mitmproxy's Layer.__init__ makes the
queue with `collections.deque()`, reading `collections` from its module: install() points that
name at a namespace whose deque is LazyQueue (docs/architecture.md, mitmproxy's insides)."""

from __future__ import annotations

import collections
import types
from collections.abc import Iterator
from typing import Any

from mitmproxy.proxy import layer


class LazyQueue:
    """The part of collections.deque a layer's held events use, with no deque until one is held,
    and none again once they are all taken."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: collections.deque[Any] | None = None

    def append(self, item: Any) -> None:
        if self._queue is None:
            self._queue = collections.deque()
        self._queue.append(item)

    def popleft(self) -> Any:
        if self._queue is None:
            raise IndexError("pop from an empty queue")
        item = self._queue.popleft()
        if not self._queue:
            self._queue = None
        return item

    def __bool__(self) -> bool:
        return self._queue is not None

    def __len__(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def __iter__(self) -> Iterator[Any]:
        return iter(self._queue if self._queue is not None else ())


def install() -> None:
    """Every layer made from now on holds its events in a LazyQueue."""
    layer.collections = types.SimpleNamespace(deque=LazyQueue)  # type: ignore[assignment]
