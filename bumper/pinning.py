"""Learning pinned clients: a client that rejects the mimic for a name (an app that pins the real
certificate) gets that name spliced for a while, instead of failing on every connection."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from mitmproxy import tls

from bumper.policy import Action
from bumper.state import ConnectionState, ConnectionStates

log = logging.getLogger("bumper.policy")

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


class PinLearner:
    """With a rule's learn_pinning: a client that rejects the mimic for a name (its handshake fails
    with an alert that says so, or it closes without a single request) has that name spliced for a
    while, so an app that pins the real certificate keeps working (PolicyEnforcer asks `pins`)."""

    def __init__(self, pins: LearnedPins, states: ConnectionStates) -> None:
        self.pins = pins
        self.states = states

    def tls_failed_client(self, data: tls.TlsData) -> None:
        state = self.states.of(data.context.client.id)
        if state is not None and is_rejection(str(data.conn.error)):
            self._learn(state, str(data.conn.error))

    def connection_ended(self, state: ConnectionState) -> None:
        """ConnectionLog.on_end: a client that completed its handshake and closed without a request."""
        if state.conn.tls_established and not state.spoke:
            self._learn(state, "closed before any request")

    def _learn(self, state: ConnectionState, why: str) -> None:
        decision, client = state.decision, state.conn
        address = client.peername[0] if client.peername else None
        if decision is None or not decision.learn_pinning or decision.action is not Action.BUMP:
            return
        if not client.sni or address is None or self.pins.pinned(address, client.sni):
            return
        self.pins.remember(address, client.sni)
        log.info(
            "learned: %s rejects the mimic for %s (%s); spliced for %d s (rule %r)",
            address, client.sni, why, self.pins.ttl, decision.rule,
        )  # fmt: skip
