"""Applies the policy at its decision points: the CONNECT request, plain HTTP requests and the ClientHello."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable

from mitmproxy import connection, http, tls

from bumper.policy import names
from bumper.policy.pinning import LearnedPins
from bumper.policy.rules import Action, Address, Decision, Mismatch, OnUpstreamError, name_mismatch
from bumper.policy.source import PolicySource
from bumper.proxy import replies
from bumper.proxy.authority import parse_authority
from bumper.proxy.state import BY_POLICY, ConnectionStates, is_plain_proxy_request, probed
from bumper.upstream.probe import UpstreamProbe

log = logging.getLogger("bumper.policy")
# The decision for a name that is no valid internationalised name (names.idna_problem).
BAD_NAME = Decision(Action.BLOCK, "names")


def client_address(client: connection.Client) -> Address | None:
    try:
        return ipaddress.ip_address(client.peername[0])
    except (TypeError, ValueError, IndexError):
        return None


class PolicyEnforcer:
    def __init__(
        self, source: PolicySource, states: ConnectionStates, pins: LearnedPins, probe: UpstreamProbe | None = None
    ) -> None:
        self.source = source
        self.states = states
        self.pins = pins  # (client, SNI) pairs learned pinning splices
        self.probe = probe  # for rules whose on_upstream_error is splice

    def http_connect(self, flow: http.HTTPFlow) -> None:
        policy = self.source.policy
        client, port = client_address(flow.client_conn), flow.request.port
        if why := policy.refusal(client, port):
            return self._refuse(flow, Decision(Action.BLOCK, "clients/ports"), "CONNECT to", why)
        if why := names.idna_problem(flow.request.host):
            return self._refuse(flow, BAD_NAME, "CONNECT to", why)
        # Refuse before any upstream connection when the CONNECT host alone decides `block`.
        decision = policy.decide_at_connect(flow.request.host, client, port)
        if decision is not None and decision.action is Action.BLOCK:
            self._refuse(flow, decision, "CONNECT to")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn.tls:
            if state := self.states.of(flow.client_conn.id):
                state.spoke = True
            return self._check_names(flow)
        # Plain-HTTP proxy requests have no ClientHello: the request's host is all there is to match.
        if not is_plain_proxy_request(flow):
            return
        policy = self.source.policy
        client = client_address(flow.client_conn)
        if why := policy.refusal(client, flow.request.port, connect=False):
            return self._refuse(flow, Decision(Action.BLOCK, "clients/ports"), "request to", why)
        if why := names.idna_problem(flow.request.host):
            return self._refuse(flow, BAD_NAME, "request to", why)
        decision = policy.decide(flow.request.host, None, client, flow.request.port)
        if decision.action is Action.BLOCK:
            self._refuse(flow, decision, "request to")
        elif state := self.states.of(flow.client_conn.id):
            state.decided(decision)

    def _check_names(self, flow: http.HTTPFlow) -> None:
        """In a bumped connection, CONNECT host, SNI and Host must name one site."""
        assert flow.server_conn.address is not None
        connect_host, sni = flow.server_conn.address[0], flow.client_conn.sni
        host_header = parse_authority(flow.request.host_header or "")[0] or None
        if not name_mismatch(connect_host, sni, host_header):
            return
        names_seen = f"CONNECT {connect_host}, SNI {sni or '-'}, Host {host_header or '-'}"
        if self.source.policy.mismatch is Mismatch.LOG:
            log.warning(
                "%s: names disagree (%s); relayed, as the policy's mismatch: log says",
                flow.client_conn.peername,
                names_seen,
            )
            return
        flow.response = replies.names_disagree(names_seen).response(flow.request)
        if state := self.states.of(flow.client_conn.id):
            state.refuse(f"names disagree ({names_seen})", BY_POLICY)

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, what: str, why: str = "") -> None:
        """A 403 for a rule's block, or for WHY (a client or port outside the policy's)."""
        reason = why or f"blocked by policy rule {decision.rule!r}"
        flow.response = replies.refused(what, flow.request, f"refused: {why}" if why else reason).response(flow.request)
        if state := self.states.of(flow.client_conn.id):
            state.decided(decision)
            state.refuse(reason, BY_POLICY)

    def tls_clienthello(self, data: tls.ClientHelloData) -> Awaitable[None] | None:
        context = data.context
        assert context.server.address is not None
        host, port = context.server.address[:2]
        sni = data.client_hello.sni
        if sni and (why := names.idna_problem(sni)):
            self._block(data, BAD_NAME, f"SNI {why}")
            return None
        decision = self.source.policy.decide(host, sni, client_address(context.client), port)
        if (
            decision.action is Action.BUMP
            and decision.on_upstream_error is OnUpstreamError.SPLICE
            and self.probe is not None
        ):
            return self._probe_first(data, decision, host, port)  # only this decision has to wait
        self._apply(data, decision)
        return None

    async def _probe_first(self, data: tls.ClientHelloData, decision: Decision, host: str, port: int) -> None:
        """on_upstream_error: splice: the upstream's verdict, before the client's handshake, decides."""
        assert self.probe is not None
        hello = data.client_hello
        # As the bumped leg will ask (TlsProvider.tls_start_server): the client's SNI (or the CONNECT host) in
        # A-labels, its ALPN offers, the rule's TLS floor.
        name, floor = names.normalize(hello.sni or host), decision.upstream_tls_min
        verdict = await self.probe.verdict(host, port, name, floor, hello.alpn_protocols)
        if verdict is not None and not verdict.trusted:
            decision = Decision(Action.SPLICE, decision.rule, decision.on_upstream_error)
            if state := self.states.of(data.context.client.id):
                state.verified(probed(verdict))
        self._apply(data, decision)

    def _apply(self, data: tls.ClientHelloData, decision: Decision) -> None:
        context = data.context
        state = self.states.of(context.client.id)
        sni, address = data.client_hello.sni, context.client.peername[0] if context.client.peername else None
        if (
            decision.action is Action.BUMP
            and decision.learn_pinning
            and sni
            and address
            and self.pins.pinned(address, sni)
        ):
            decision = dataclasses.replace(decision, action=Action.SPLICE, rule=f"{decision.rule} (learned pinning)")
        if decision.action is Action.BLOCK:
            return self._block(data, decision, f"blocked by policy rule {decision.rule!r}")
        if state:
            state.decided(decision)
        if decision.action is Action.SPLICE:
            data.ignore_connection = True

    def _block(self, data: tls.ClientHelloData, decision: Decision, reason: str) -> None:
        """No handshake for this client: mitmproxy closes it, and the log says REASON."""
        data.context.client.error = reason
        if state := self.states.of(data.context.client.id):
            state.decided(decision)
            state.refuse(reason, BY_POLICY)
