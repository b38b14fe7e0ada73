"""Learning pinned clients: a client that rejects the mimic for a name (an app that pins the real
certificate) gets that name spliced for a while, instead of failing on every connection."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_TTL = 3600.0  # seconds a learned pair is spliced
DEFAULT_CAPACITY = 10_000  # pairs remembered at most; the oldest go first

# How mitmproxy words a client's rejection of the certificate it was shown.
_REJECTIONS = ("unknown ca", "bad certificate", "certificate unknown", "disconnected during the handshake")


def is_rejection(error: str) -> bool:
    return any(text in error.lower() for text in _REJECTIONS)


class LearnedPins:
    def __init__(
        self, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def remember(self, client: str, sni: str) -> None:
        self._until[(client, sni)] = self._clock() + self.ttl
        self._until.move_to_end((client, sni))
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def pinned(self, client: str, sni: str) -> bool:
        until = self._until.get((client, sni))
        if until is None:
            return False
        if until < self._clock():
            del self._until[(client, sni)]
            return False
        return True
