"""One object per client connection holding everything bumper knows about it, as Squid's ServerBump
does for a bumped one: bumper's addons read and write it instead of keeping dictionaries of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from mitmproxy import connection, http, tls
from mitmproxy.proxy import mode_specs, server_hooks
from mitmproxy.utils import human

from bumper.certs.clientcert import ClientIdentity
from bumper.certs.trust import UpstreamVerdict, Verdict
from bumper.policy import destinations
from bumper.policy.relays import Relay
from bumper.policy.rules import Action, Decision, ListenerMode, ListenerRef
from bumper.proxy.httpstream import TRUNCATED, aborted, body_bytes
from bumper.proxy.layers import relay_handshake
from bumper.proxy.limits import LIMIT
from bumper.proxy.listeners import Listener
from bumper.proxy.replies import Reply, without_option_advice
from bumper.upstream.tls import client_certificate_requested

# ConnectionState.refused_by for what the policy refused.
BY_POLICY = "policy"
# What mitmproxy's Proxyserver.server_connect sets for a connection to one of its listening addresses.
SELF_CONNECT = "Request destination unknown. Unable to figure out where this request should be forwarded to."
# ConnectionState.decision for a connection refused by the policy's `destinations:`.
DESTINATIONS = Decision(Action.BLOCK, "destinations")


class Kind(StrEnum):
    CONNECT = "CONNECT"  # a CONNECT tunnel
    HTTP = "HTTP"  # a plain http:// request sent to the proxy, no tunnel
    TLS = "TLS"  # TLS to an SNI or transparent listener: no CONNECT, the SNI names the site


@dataclass
class ConnectionState:
    """What bumper knows of one client connection: the policy's decision, the upstream's verdict,
    what was refused and by whom, bytes, and the names involved. Missing values are None; the log
    line writes them as `-`."""

    conn: connection.Client
    client: str  # the client's address and port, as the log line shows it
    listener: ListenerRef | None = None  # the listener it came in on
    user: str | None = None  # the proxy user its credentials named (--proxy-auth), once they were checked
    kind: Kind = Kind.CONNECT
    target: str | None = None  # host:port from the CONNECT request or the plain request's URL
    sni: str | None = None
    decision: Decision | None = None
    upstream: UpstreamVerdict | None = None  # the verdict on the upstream's certificate
    blocked: Reply | None = None  # on_upstream_error: block: every request gets this 502
    hello: bool = False  # the client's whole ClientHello arrived (not a relay listener's own: the one inside)
    spoke: bool = False  # the client sent a request after its handshake (learned pinning asks)
    requests: int = 0  # HTTP responses sent to the client
    bytes_up: int = 0  # HTTP body bytes from the client to the upstream
    bytes_down: int = 0  # and back
    truncated: int = 0  # responses whose body the upstream ended without close_notify (the cut passed on)
    client_cert_asked: bool = False  # the upstream sent a CertificateRequest
    client_identity: ClientIdentity | None = None  # the client's certificate, where a rule required one
    relay_client_cert: ClientIdentity | None = None  # a relay listener's client's certificate (--client-ca)
    error: str | None = None  # the first thing that went wrong, if anything did
    refused_by: str | None = None  # who refused the connection or a request on it: policy, an addon...
    server: connection.Server | None = None  # the upstream connection, once one was opened
    # bind_names: resolve: the name (SNI, or a redirected request's Host) whose address the connection
    # went to, and the address:port the client gave
    bound: tuple[str, str] | None = None
    relay: Relay | None = None  # the relay (via:) the upstream connection goes through
    # When (time.monotonic) its ClientHello was complete, and its upstream TLS handshake began: where
    # --admin's handshake times start (bumper.proxy.metrics sets them; None without --admin).
    hello_at: float | None = None
    upstream_tls_at: float | None = None
    # The bytes it held (its buffers, the bodies held whole, its unwritten output) when the overload
    # manager last looked, under memory pressure only (bumper.proxy.overload.held_by).
    memory: int = 0
    # Its requests begun and not ended, when the last of them ended (the event loop's clock), and the
    # timer that closes its upstream connections once none is open for --upstream-idle-timeout
    # (bumper.proxy.upstreamidle).
    open_requests: int = 0
    idle_since: float = 0.0
    upstream_idle_timer: asyncio.TimerHandle | None = None

    @property
    def action(self) -> Action | None:
        return self.decision.action if self.decision else None

    @property
    def rule(self) -> str | None:
        return self.decision.rule if self.decision else None

    @property
    def verify(self) -> str | None:
        """`trusted`, the reason code the upstream failed verification with, or None: not verified."""
        return (self.upstream.verdict.reason or "trusted") if self.upstream else None

    @property
    def upstream_sha256(self) -> str | None:
        """The upstream leaf's SHA-256 fingerprint, upper-case hex."""
        return self.upstream.fingerprint if self.upstream else None

    @property
    def connect_host(self) -> str | None:
        """The host the client named: in CONNECT, or in a plain-HTTP request's URL."""
        return self.target.rpartition(":")[0].strip("[]") or None if self.target else None

    def decided(self, decision: Decision) -> None:
        self.decision = decision

    def verified(self, verdict: UpstreamVerdict) -> None:
        self.upstream = verdict

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def refuse(self, reason: str, by: str) -> None:
        """Record a refusal and who made it; the first failure stays the outcome."""
        self.fail(reason)
        self.refused_by = self.refused_by or by

    def outcome(self) -> str:
        if self.error:
            return self.error
        if self.target is None and self.requests == 0:
            return "no valid request (malformed, or none before the client closed)"
        if self.verify not in ("trusted", None) and self.requests:
            # The client went on past a mimic that failed its check (curl -k), or a rule allowed it.
            return f"ok, served although the upstream failed verification ({self.verify})"
        return "ok"

    @property
    def via(self) -> str | None:
        """The name of the relay the upstream connection goes through, or None: straight to the upstream."""
        return self.relay.name if self.relay else None

    @property
    def listener_name(self) -> str | None:
        """MODE@ADDRESS, the address the connection reached: `explicit@127.0.0.1:8080`."""
        return f"{self.listener.mode}@{self.listener.local}" if self.listener else None

    def line(self) -> str:
        return (
            f"{self.client} {self.kind} {_dash(self.target)} listener={_dash(self.listener_name)} "
            f"user={_dash(self.user)} {f'via={self.via} ' if self.via else ''}{self._client_cert()}"
            f"sni={_dash(self.sni)} action={_dash(self.action)} "
            f"rule={_dash(self.rule)} verify={_dash(self.verify)} upstream_sha256={_dash(self.upstream_sha256)} "
            f"requests={self.requests} outcome={self.outcome()}"
        )

    def _client_cert(self) -> str:
        """`client_cert=CN ` for a relay client that presented one: who, in one word (the log line is
        split on spaces, and a certificate's name is the client's to choose)."""
        if self.relay_client_cert is None:
            return ""
        name = self.relay_client_cert.common_name or self.relay_client_cert.subject
        return f"client_cert={''.join(c if c.isprintable() and c != ' ' else f'\\x{ord(c):02x}' for c in name)} "


def _dash(value: str | None) -> str:
    return "-" if value is None else value


def probed(verdict: Verdict) -> UpstreamVerdict:
    """A verdict from the splice probe: no certificate of this connection's to sign or fingerprint."""
    return UpstreamVerdict(verdict, None, None)


class ConnectionStates:
    """Creates each client connection's ConnectionState and records what mitmproxy's hooks tell of it.
    Added before bumper's other addons, so theirs can rely on the state; ConnectionLog, added last,
    forgets it once the connection's line is written."""

    def __init__(self, listeners: Mapping[str, Listener] | None = None) -> None:
        self._states: dict[str, ConnectionState] = {}
        self._listeners = listeners or {}  # bumper's listeners, by the mode mitmproxy runs them with

    def of(self, client_id: str) -> ConnectionState | None:
        return self._states.get(client_id)

    def __len__(self) -> int:
        """The client connections open: what a drain waits for (bumper.proxy.drain)."""
        return len(self._states)

    def __iter__(self) -> Iterator[ConnectionState]:
        """The open connections' states: what /metrics reads when it is scraped (bumper.proxy.metrics)."""
        return iter(self._states.values())

    def pop(self, client_id: str) -> ConnectionState | None:
        return self._states.pop(client_id, None)

    def client_connected(self, client: connection.Client) -> None:
        listener = self._listeners.get(client.proxy_mode.full_spec)
        ref = listener.ref(client) if listener else None
        state = self._states[client.id] = ConnectionState(client, human.format_address(client.peername), ref)
        if ref is not None and ref.mode not in (ListenerMode.EXPLICIT, ListenerMode.RELAY):
            state.kind = Kind.TLS  # until a plain-HTTP request says otherwise
        if ref is not None and ref.mode is ListenerMode.TRANSPARENT:
            state.target = human.format_address(client.sockname)  # the original destination
        elif ref is not None and ref.mode is ListenerMode.REVERSE:
            assert isinstance(client.proxy_mode, mode_specs.ReverseMode)
            state.target = human.format_address(client.proxy_mode.address)  # the fixed upstream

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if state := self._states.get(data.client.id):
            state.server = data.server
        if data.server.error == SELF_CONNECT and data.server.address:
            # mitmproxy's own proxy-loop check (Proxyserver.server_connect, which runs first) caught a
            # connection to the listening address by name: bumper's refusal says so, as for the loops
            # its own check catches after DNS (resolve.ResolvingEventLoop).
            data.server.error = destinations.loop_refusal(human.format_address(data.server.address))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if state := self._states.get(flow.client_conn.id):
            state.target = f"{flow.request.host}:{flow.request.port}"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self._states.get(flow.client_conn.id)
        if state and is_plain_proxy_request(flow, state):
            state.kind = Kind.HTTP
            state.target = state.target or f"{flow.request.host}:{flow.request.port}"

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if not (state := self._states.get(data.client.id)):
            return
        error = data.server.error or "unknown"
        if refusal := destinations.refusal_in(error):  # the loop's destination check (resolve.ResolvingEventLoop)
            state.decided(DESTINATIONS)
            state.refuse(refusal, BY_POLICY)
        else:
            state.fail(f"upstream connect failed: {error}")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if relay_handshake(data.context):
            return  # bumper's own: the SNI that counts is the one inside
        if state := self._states.get(data.context.client.id):
            state.sni = data.client_hello.sni
            state.hello = True
            if state.listener and state.listener.mode is ListenerMode.SNI:
                assert data.context.server.address is not None
                state.kind, state.target = Kind.TLS, f"{state.sni or '-'}:{data.context.server.address[1]}"

    def tls_failed_server(self, data: tls.TlsData) -> None:
        if state := self._states.get(data.context.client.id):
            error = data.conn.error or "unknown"
            state.client_cert_asked |= data.ssl_conn is not None and client_certificate_requested(data.ssl_conn)
            state.fail(f"upstream TLS failed: {short_reason(error)}{_without_client_cert(state)}")

    def tls_established_server(self, data: tls.TlsData) -> None:
        # TLS 1.3: an upstream that wanted a client certificate and got none says so only after its
        # handshake, when the first request fails.
        if (state := self._states.get(data.context.client.id)) and data.ssl_conn is not None:
            state.client_cert_asked |= client_certificate_requested(data.ssl_conn)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        if state := self._states.get(data.context.client.id):
            if relay_handshake(data.context) and "peer did not return a certificate" in (data.conn.error or ""):
                state.fail("client certificate required by --client-ca")
            elif relay_handshake(data.context):
                state.fail(f"relay TLS failed: {short_reason(data.conn.error or 'unknown')}")
            elif not state.hello and "disconnected during the handshake" in (data.conn.error or ""):
                # mitmproxy's guess about trust cannot apply: nothing was shown to the client yet.
                state.fail("client TLS failed: the client closed before its ClientHello was complete")
            else:
                state.fail(f"client TLS failed: {short_reason(data.conn.error or 'unknown')}")

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.request.method != "CONNECT" and (state := self._states.get(flow.client_conn.id)):
            state.requests += 1
            self._count(state, flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if state := self._states.get(flow.client_conn.id):
            message = without_option_advice(flow.error.msg) if flow.error else "unknown"
            # A limit of bumper's, or a truncation, says itself what happened, as outcomes on other paths do.
            if message.startswith((LIMIT, TRUNCATED)):
                state.fail(message)
            else:  # a TLS 1.3 upstream refuses a missing client certificate only after its handshake
                state.fail(f"HTTP error: {message}{_without_client_cert(state)}")
            if message.startswith(TRUNCATED):
                state.truncated += 1
            if flow.response is None or aborted(flow):  # else its response hook counted it
                self._count(state, flow)

    @staticmethod
    def _count(state: ConnectionState, flow: http.HTTPFlow) -> None:
        state.bytes_up += body_bytes(flow, "request")
        state.bytes_down += body_bytes(flow, "response")


def _without_client_cert(state: ConnectionState) -> str:
    """What the outcome adds when an upstream that asked for a client certificate got none."""
    if not state.client_cert_asked or (state.decision is not None and state.decision.client_cert is not None):
        return ""
    return " (the upstream asked for a client certificate: give the rule one with client_cert:)"


def is_plain_proxy_request(flow: http.HTTPFlow, state: ConnectionState) -> bool:
    """A request sent to the proxy as it is (GET http://..., or redirected plain HTTP), not one
    inside TLS bumper decided on. (Not client.tls: a relay listener's own TLS sets it too.)"""
    return not state.hello and flow.request.method != "CONNECT"


def short_reason(error: str) -> str:
    """mitmproxy's error text, said plainly: no hex dump of an unparseable ClientHello, and no
    guess about trust where the handshake failed on what the two sides offered."""
    if error.startswith("Cannot parse ClientHello"):
        return "Cannot parse ClientHello"
    if (limit := error.find("(limit: ")) >= 0:  # bumper's own, inside mitmproxy's guess about trust
        return error[limit + 1 : -1]
    if "peer did not return a certificate" in error:
        return "no client certificate, and the rule requires one (match: client_cert)"
    if "no shared cipher" in error:
        return "no cipher suite in common (bumper accepts only forward-secret AEAD suites)"
    if "unsupported protocol" in error or "tls_version_client_min" in error:
        return "no TLS version in common (bumper accepts TLS 1.2 and 1.3)"
    return error
