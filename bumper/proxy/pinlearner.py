"""Feeds learned pinning (policy.pinning.LearnedPins) from what clients do with the mimic."""

from __future__ import annotations

import logging

from mitmproxy import tls

from bumper.policy.pinning import LearnedPins, is_rejection
from bumper.policy.rules import Action
from bumper.proxy.state import ConnectionState, ConnectionStates

log = logging.getLogger("bumper.policy")


class PinLearner:
    """With a rule's learn_pinning: a client that rejects the mimic for a name (its handshake fails
    with an alert that says so, or it closes without a single request) has that name spliced for a
    while, so an app that pins the real certificate keeps working (PolicyEnforcer asks `pins`)."""

    def __init__(self, pins: LearnedPins, states: ConnectionStates) -> None:
        self.pins = pins
        self.states = states

    def done(self) -> None:
        self.pins.close()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        state = self.states.of(data.context.client.id)
        if state is not None and is_rejection(str(data.conn.error)):
            self._learn(state, str(data.conn.error))

    def connection_ended(self, state: ConnectionState) -> None:
        """ConnectionLog.on_end: a client that completed its handshake and closed without a request."""
        # (state.hello: a handshake bumper decided on, not only a relay listener's own)
        if state.hello and state.conn.tls_established and not state.spoke:
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
