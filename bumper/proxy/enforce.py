"""Applies the policy at its decision points: the CONNECT request, plain HTTP requests and the ClientHello."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Awaitable

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks
from mitmproxy.utils import human

from bumper.policy import names
from bumper.policy.pinning import LearnedPins
from bumper.policy.relays import Relay
from bumper.policy.rules import (
    Action,
    Address,
    BindNames,
    Decision,
    ListenerMode,
    ListenerRef,
    Mismatch,
    OnUpstreamError,
    bound_name,
    name_mismatch,
    strict_refusal,
)
from bumper.policy.source import PolicySource
from bumper.proxy import replies
from bumper.proxy.authority import parse_authority
from bumper.proxy.httpstream import DEFER_CONNECT
from bumper.proxy.layers import relay_handshake
from bumper.proxy.state import (
    BY_POLICY,
    DESTINATIONS,
    ConnectionState,
    ConnectionStates,
    Kind,
    is_plain_proxy_request,
    probed,
)
from bumper.upstream import via
from bumper.upstream.probe import UpstreamProbe
from bumper.upstream.resolve import ResolvingEventLoop

log = logging.getLogger("bumper.policy")
# The decision for a name that is no valid internationalised name (names.idna_problem).
BAD_NAME = Decision(Action.BLOCK, "names")
# The decision for a client or a port outside the policy's `clients` and `ports`.
CLIENTS_PORTS = Decision(Action.BLOCK, "clients/ports")
# The decision for a ClientHello without SNI on an SNI listener.
NO_SNI = Decision(Action.BLOCK, "sni")
# Listeners whose TLS comes inside a CONNECT tunnel: the CONNECT's checks came first.
_CONNECT_MODES = (ListenerMode.EXPLICIT, ListenerMode.RELAY)


def _destination_refusal(host: str, port: int) -> str | None:
    """Why the destination check would refuse a connection to HOST (an IP address) on PORT, or None."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, ResolvingEventLoop):
        return None  # no check to ask (unit tests of the enforcer alone)
    return loop.egress.refusal(ipaddress.ip_address(host), port, operators=False)


def _rerouted(state: ConnectionState, decision: Decision, server: connection.Server) -> str | None:
    """Why a connection already opened (through STATE.relay, or straight) cannot take DECISION's route,
    or None: the SNI is routed differently than the CONNECT host the tunnel was opened for."""
    if server.timestamp_start is None:
        return None  # not connected yet: it goes where the decision says
    had, wants = (r.name if r else None for r in (state.relay, decision.via))
    if had == wants:
        return None
    return (
        f"SNI {state.sni} is routed {f'via {wants}' if wants else 'straight to the upstream'}, but the tunnel for"
        f" CONNECT {state.connect_host} went {f'via {had}' if had else 'straight'} (names must agree)"
    )


def _to_relay(flow: http.HTTPFlow, relay: Relay) -> None:
    """A plain http:// request, as a parent proxy takes it: in absolute form, with the relay's credentials."""
    flow.request.authority = human.format_address((flow.request.host, flow.request.port))
    if relay.auth is not None:
        flow.request.headers["Proxy-Authorization"] = relay.auth.header().decode()


def client_address(client: connection.Client) -> Address | None:
    try:
        return ipaddress.ip_address(client.peername[0])
    except (TypeError, ValueError, IndexError):
        return None


class PolicyEnforcer:
    def __init__(
        self,
        source: PolicySource,
        states: ConnectionStates,
        pins: LearnedPins,
        probe: UpstreamProbe | None = None,
        lookup_timeout: float = 10.0,
    ) -> None:
        self.source = source
        self.states = states
        self.pins = pins  # (client, SNI) pairs learned pinning splices
        self.probe = probe  # for rules whose on_upstream_error is splice
        self.lookup_timeout = lookup_timeout  # seconds bind_names: strict waits for a name's addresses

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered before the policy (proxyauth: no valid credentials)
            return
        policy = self.source.policy
        host, client, port = flow.request.host, client_address(flow.client_conn), flow.request.port
        if why := policy.refusal(client, port):
            return self._refuse(flow, CLIENTS_PORTS, "CONNECT to", why)
        if why := names.idna_problem(host):
            return self._refuse(flow, BAD_NAME, "CONNECT to", why)
        if why := names.ipv4_form_problem(host):
            return self._refuse(flow, BAD_NAME, "CONNECT to", why, status=400)
        # Refuse before any upstream connection when the CONNECT host alone decides `block`.
        listener = self._listener(flow.client_conn)
        decision = policy.decide_at_connect(host, client, port, listener, self._user(flow))
        if decision is not None and decision.action is Action.BLOCK:
            return self._refuse(flow, decision, "CONNECT to")
        if policy.relays_used and (state := self.states.of(flow.client_conn.id)):
            # The tunnel is connected now, before the 200: through the relay the SNI will be routed to
            # if it names the CONNECT host, as an honest client's does (the ClientHello checks it).
            state.relay = (decision or policy.decide(host, host, client, port, listener, self._user(flow))).via
        if decision is None and policy.bind_names is BindNames.RESOLVE and names.is_ip_address(host):
            # A rule on the SNI may decide, and then the name's address is where the tunnel goes, not
            # this one: nothing is connected before the ClientHello (bind_names: resolve).
            if why := _destination_refusal(host, port):
                flow.response = replies.destination_refused(why).response(flow.request)
                if state := self.states.of(flow.client_conn.id):
                    state.decided(DESTINATIONS)
                    state.refuse(why, BY_POLICY)
                return
            flow.metadata[DEFER_CONNECT] = True

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = self.states.of(flow.client_conn.id)
        if state is None:
            return None
        if state.hello:  # inside TLS the policy decided on at its ClientHello
            state.spoke = True
            if state.listener and state.listener.mode is ListenerMode.REVERSE:
                return None  # the client names the front end; the upstream is the operator's
            self._check_names(flow)
            return None
        # Plain-HTTP proxy requests have no ClientHello: the request's host is all there is to match.
        if not is_plain_proxy_request(flow, state) or flow.response is not None:  # answered: proxyauth's 407
            return None
        policy = self.source.policy
        client, listener = client_address(flow.client_conn), self._listener(flow.client_conn)
        reverse = listener is not None and listener.mode is ListenerMode.REVERSE
        host, port = flow.request.host, flow.request.port
        if why := policy.refusal(client, None if reverse else port, connect=False):
            self._refuse(flow, CLIENTS_PORTS, "request to", why)
            return None
        # A redirected request goes to an address; its Host header names the site, as an SNI does.
        name = None
        if listener is not None and listener.mode is ListenerMode.TRANSPARENT:
            name = parse_authority(flow.request.headers.get("host", ""))[0] or None
        for named in (host, name):
            if named and (why := names.idna_problem(named)):
                self._refuse(flow, BAD_NAME, "request to", why)
                return None
            if named and (why := names.ipv4_form_problem(named)):
                self._refuse(flow, BAD_NAME, "request to", why, status=400)
                return None
        decision = policy.decide(host, name, client, port, listener, self._user(flow))
        if decision.action is Action.BLOCK:
            self._refuse(flow, decision, "request to")
            return None
        state.decided(decision)
        state.relay = decision.via
        if decision.via is not None:
            _to_relay(flow, decision.via)
        bound = bound_name(decision, host, name)
        if bound is None or policy.bind_names is BindNames.CLIENT:
            return None
        if policy.bind_names is BindNames.RESOLVE:
            flow.request.data.host = bound  # the request's connection goes where the name leads; Host unchanged
            state.bound = (bound, human.format_address((host, port)))
            return None
        return self._strictly_http(flow, decision, bound, host, port)

    async def _strictly_http(self, flow: http.HTTPFlow, decision: Decision, name: str, host: str, port: int) -> None:
        """bind_names: strict, for a redirected plain-HTTP request: to HOST only if its Host NAME leads there."""
        if why := strict_refusal(name, (host, port), await self._addresses(name, port)):
            self._refuse(flow, dataclasses.replace(decision, action=Action.BLOCK), "request to", why)

    def _listener(self, client: connection.Client) -> ListenerRef | None:
        state = self.states.of(client.id)
        return state.listener if state else None

    def _user(self, flow: http.HTTPFlow) -> str | None:
        state = self.states.of(flow.client_conn.id)
        return state.user if state else None

    def _check_names(self, flow: http.HTTPFlow) -> None:
        """In a bumped connection, CONNECT host, SNI and the request's names must name one site: its
        Host header, and the authority of an HTTP/2 request or of an absolute-form target
        (`GET http://other.example/` inside a tunnel to rec.example), which an upstream reads first."""
        assert flow.server_conn.address is not None
        connect_host, sni, request = flow.server_conn.address[0], flow.client_conn.sni, flow.request
        host_header = parse_authority(request.headers.get("host", ""))[0] or None
        authority = parse_authority(request.authority)[0] or None
        if not name_mismatch(connect_host, sni, host_header, authority):
            return
        names_seen = f"CONNECT {connect_host}, SNI {sni or '-'}, Host {host_header or authority or '-'}"
        if host_header and authority and authority != host_header:
            names_seen += f", target {authority}"
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

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, what: str, why: str = "", status: int = 403) -> None:
        """A 403 for a rule's block, or for WHY (a client or port outside the policy's; a 400 for a
        target no client should send)."""
        reason = why or f"blocked by policy rule {decision.rule!r}"
        reply = replies.refused(what, flow.request, f"refused: {why}" if why else reason)
        flow.response = dataclasses.replace(reply, status=status).response(flow.request)
        if state := self.states.of(flow.client_conn.id):
            state.decided(decision)
            state.refuse(reason, BY_POLICY)

    def tls_clienthello(self, data: tls.ClientHelloData) -> Awaitable[None] | None:
        context = data.context
        if relay_handshake(context):
            return None  # bumper's own TLS, to a relay listener: the CONNECT inside it is decided
        assert context.server.address is not None
        host, port = context.server.address[:2]
        sni = data.client_hello.sni
        if sni and (why := names.idna_problem(sni)):
            self._block(data, BAD_NAME, f"SNI {why}")
            return None
        listener = self._listener(context.client)
        if listener is not None and listener.mode is ListenerMode.SNI:
            if not sni:
                self._block(
                    data, NO_SNI, "no SNI: an SNI listener finds the destination by the name in the ClientHello"
                )
                return None
            host = names.normalize(sni)
            context.server.address = (host, port)
        policy = self.source.policy
        client = client_address(context.client)
        if listener is not None and listener.mode not in _CONNECT_MODES:
            # No CONNECT came before, whose check this is on the explicit listener. (A reverse
            # listener's upstream port is the operator's choice: only its clients are checked.)
            if why := policy.refusal(client, None if listener.mode is ListenerMode.REVERSE else port):
                self._block(data, CLIENTS_PORTS, f"refused: {why}")
                return None
        state = self.states.of(context.client.id)
        decision = policy.decide(host, sni, client, port, listener, state.user if state else None)
        name = bound_name(decision, host, sni) if decision.action is not Action.BLOCK else None
        if name is None or policy.bind_names is BindNames.CLIENT:
            return self._decided(data, decision, host, port)
        if policy.bind_names is BindNames.RESOLVE and context.server.timestamp_start is None:
            # The deferred CONNECT (http_connect): the tunnel goes where the name leads.
            context.server.address = (name, port)
            if state := self.states.of(context.client.id):
                state.bound = (name, human.format_address((host, port)))
            return self._decided(data, decision, name, port)
        # strict; or resolve for a tunnel already connected (the policy was reloaded since its CONNECT).
        return self._strictly(data, decision, name, host, port)

    def _decided(self, data: tls.ClientHelloData, decision: Decision, host: str, port: int) -> Awaitable[None] | None:
        if (
            decision.action is Action.BUMP
            and decision.on_upstream_error is OnUpstreamError.SPLICE
            and self.probe is not None
        ):
            return self._probe_first(data, decision, host, port)  # only this decision has to wait
        self._apply(data, decision)
        return None

    async def _strictly(self, data: tls.ClientHelloData, decision: Decision, name: str, host: str, port: int) -> None:
        """bind_names: strict: the connection goes to HOST only if NAME resolves to it."""
        if why := strict_refusal(name, (host, port), await self._addresses(name, port)):
            return self._block(data, dataclasses.replace(decision, action=Action.BLOCK), why)
        if (rest := self._decided(data, decision, host, port)) is not None:
            await rest

    async def _addresses(self, name: str, port: int) -> list[tuple[str, int]]:
        """NAME's addresses and ports, as a connection to it would find them (--resolve first, then DNS)."""
        loop = asyncio.get_running_loop()
        lookup = loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        try:
            answers = await asyncio.wait_for(lookup, self.lookup_timeout)
        except (OSError, TimeoutError):
            return []
        return sorted({(str(answer[4][0]), int(answer[4][1])) for answer in answers})

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.states.of(data.client.id)
        if state is None or state.relay is None or data.server.address is None:
            return
        host, port = data.server.address[:2]
        # A plain http:// request is sent to the relay itself (in absolute form, _to_relay); the
        # rest, tunnels, through a CONNECT.
        via.route(host, port, via.Route(state.relay, tunnel=state.kind is not Kind.HTTP))

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.states.of(data.client.id)
        if state is None or state.bound is None or not data.server.peername or state.relay is not None:
            return
        (name, given), reached = state.bound, human.format_address(data.server.peername)
        if reached != given:
            log.warning(
                "%s: %s %s with %s %s went to %s, the name's own address, not the one the client gave"
                " (bind_names: resolve)",
                state.client, state.kind, given, "Host" if state.kind is Kind.HTTP else "SNI", name, reached,
            )  # fmt: skip

    async def _probe_first(self, data: tls.ClientHelloData, decision: Decision, host: str, port: int) -> None:
        """on_upstream_error: splice: the upstream's verdict, before the client's handshake, decides."""
        assert self.probe is not None
        hello = data.client_hello
        # As the bumped leg will ask (TlsProvider.tls_start_server): the client's SNI (or the CONNECT host) in
        # A-labels, its ALPN offers, the rule's TLS floor.
        name, floor = names.normalize(hello.sni or host), decision.upstream_tls_min
        verdict = await self.probe.verdict(host, port, name, floor, hello.alpn_protocols, decision.client_cert)
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
        if state and (why := _rerouted(state, decision, context.server)):
            return self._block(data, dataclasses.replace(decision, action=Action.BLOCK), why)
        if state:
            state.decided(decision)
            state.relay = decision.via
        if decision.action is Action.SPLICE:
            data.ignore_connection = True

    def _block(self, data: tls.ClientHelloData, decision: Decision, reason: str) -> None:
        """No handshake for this client: mitmproxy closes it, and the log says REASON."""
        data.context.client.error = reason
        if state := self.states.of(data.context.client.id):
            state.decided(decision)
            state.refuse(reason, BY_POLICY)
