"""Applies the policy at its two decision points: the CONNECT request and the ClientHello."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.utils import human

from bumper import names
from bumper.errors import ConfigError
from bumper.eventlog import ConnectionLog, is_plain_proxy_request
from bumper.pinning import LearnedPins, is_rejection
from bumper.policy import Address, Decision, Policy, name_mismatch
from bumper.policy import load as load_policy
from bumper.probe import UpstreamProbe

log = logging.getLogger("bumper.policy")

WATCH_INTERVAL = 1.0  # seconds between looks at the policy file


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def client_address(client: connection.Client) -> Address | None:
    try:
        return ipaddress.ip_address(client.peername[0])
    except (TypeError, ValueError, IndexError):
        return None


class PolicyEnforcer:
    def __init__(
        self,
        policy: Policy,
        connections: ConnectionLog,
        probe: UpstreamProbe | None = None,
        path: Path | None = None,
        addons: Mapping[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.addons = addons  # the addon classes a reloaded policy may name
        self.on_reload: list[Callable[[Policy], None]] = []
        self.path = path  # the policy file, reloaded on SIGHUP and when it changes
        self._watcher: asyncio.Task[None] | None = None
        self.connections = connections
        self.pins = LearnedPins()
        self._talked: set[str] = set()  # client connections that sent a request after their handshake
        self.probe = probe  # for rules whose on_upstream_error is splice
        self._decisions: dict[str, Decision] = {}  # by client connection id, once its ClientHello is read

    def running(self) -> None:
        if self.path is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.path))

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def reload(self) -> None:
        """A new policy for new connections; connections in flight keep the decisions they got.
        An invalid file changes nothing: the policy in force stays, and one line says why."""
        if self.path is None:
            return
        try:
            new = load_policy(self.path, self.addons)
        except ConfigError as e:
            problems = str(e).splitlines()
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            log.error("policy not reloaded, the one in force stays: %s%s", problems[0], more)
            return
        self.policy = new
        for reloaded in self.on_reload:
            reloaded(new)
        log.info("policy reloaded from %s: %d rules, default %s", self.path, len(new.rules), new.default)

    async def _watch(self, path: Path) -> None:
        seen = _stamp(path)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            stamp = _stamp(path)
            if stamp != seen:
                seen = stamp
                self.reload()

    def decision_for(self, client_id: str) -> Decision | None:
        return self._decisions.get(client_id)

    def client_disconnected(self, client: connection.Client) -> None:
        decision = self._decisions.pop(client.id, None)
        talked = client.id in self._talked
        self._talked.discard(client.id)
        if decision is not None and client.tls_established and not talked:
            self._learn(client, decision, "closed before any request")

    def tls_failed_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        decision = self._decisions.get(client.id)
        if decision is not None and is_rejection(str(data.conn.error)):
            self._learn(client, decision, str(data.conn.error))

    def _learn(self, client: connection.Client, decision: Decision, why: str) -> None:
        """With learn_pinning, a client that rejects the mimic for a name has it spliced for a while."""
        address = client.peername[0] if client.peername else None
        if not decision.learn_pinning or decision.action != "bump" or not client.sni or address is None:
            return
        if not self.pins.pinned(address, client.sni):
            self.pins.remember(address, client.sni)
            log.info(
                "learned: %s rejects the mimic for %s (%s); spliced for %d s (rule %r)",
                address, client.sni, why, self.pins.ttl, decision.rule,
            )  # fmt: skip

    def http_connect(self, flow: http.HTTPFlow) -> None:
        client, port = client_address(flow.client_conn), flow.request.port
        if why := self.policy.refusal(client, port):
            return self._refuse(flow, Decision("block", "clients/ports"), "CONNECT to", why)
        # Refuse before any upstream connection when the CONNECT host alone decides `block`.
        decision = self.policy.decide_at_connect(flow.request.host, client, port)
        if decision is not None and decision.action == "block":
            self._refuse(flow, decision, "CONNECT to")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn.tls:
            self._talked.add(flow.client_conn.id)
            return self._check_names(flow)
        # Plain-HTTP proxy requests have no ClientHello: the request's host is all there is to match.
        if not is_plain_proxy_request(flow):
            return
        client = client_address(flow.client_conn)
        if why := self.policy.refusal(client, None):
            return self._refuse(flow, Decision("block", "clients/ports"), "request to", why)
        decision = self.policy.decide(flow.request.host, None, client, flow.request.port)
        if decision.action == "block":
            self._refuse(flow, decision, "request to")
        elif record := self.connections.record(flow.client_conn.id):
            record.decided(decision)

    def _check_names(self, flow: http.HTTPFlow) -> None:
        """In a bumped connection, CONNECT host, SNI and Host must name one site."""
        assert flow.server_conn.address is not None
        connect_host, sni = flow.server_conn.address[0], flow.client_conn.sni
        host_header = names.parse_authority(flow.request.host_header or "")[0] or None
        if not name_mismatch(connect_host, sni, host_header):
            return
        names_seen = f"CONNECT {connect_host}, SNI {sni or '-'}, Host {host_header or '-'}"
        if self.policy.mismatch == "log":
            log.warning(
                "%s: names disagree (%s); relayed, as the policy's mismatch: log says",
                flow.client_conn.peername,
                names_seen,
            )
            return
        reason = f"names disagree ({names_seen})"
        flow.response = http.Response.make(
            403, f"bumper: request refused: {reason}\n", {"content-type": "text/plain; charset=utf-8"}
        )
        if record := self.connections.record(flow.client_conn.id):
            record.fail(reason)

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, what: str, reason: str = "") -> None:
        target = human.format_address((flow.request.host, flow.request.port))
        reason = reason or f"blocked by policy rule {decision.rule!r}"
        flow.response = http.Response.make(
            403, f"bumper: {what} {target} {reason}\n", {"content-type": "text/plain; charset=utf-8"}
        )
        if record := self.connections.record(flow.client_conn.id):
            record.decided(decision)
            record.fail(reason)

    def tls_clienthello(self, data: tls.ClientHelloData) -> Awaitable[None] | None:
        context = data.context
        assert context.server.address is not None
        host, port = context.server.address[:2]
        decision = self.policy.decide(host, data.client_hello.sni, client_address(context.client), port)
        if decision.action == "bump" and decision.on_upstream_error == "splice" and self.probe is not None:
            return self._probe_first(data, decision, host, port)  # only this decision has to wait
        self._apply(data, decision)
        return None

    async def _probe_first(self, data: tls.ClientHelloData, decision: Decision, host: str, port: int) -> None:
        """on_upstream_error: splice: the upstream's verdict, before the client's handshake, decides."""
        assert self.probe is not None
        hello = data.client_hello
        # As the bumped leg will ask: the client's SNI (or the CONNECT host) and ALPN offers, the rule's TLS floor.
        verdict = await self.probe.verdict(
            host, port, hello.sni or host, decision.upstream_tls_min, hello.alpn_protocols
        )
        if verdict is not None and not verdict.trusted:
            decision = Decision("splice", decision.rule, decision.on_upstream_error)
            if record := self.connections.record(data.context.client.id):
                record.verified(verdict, "-")
        self._apply(data, decision)

    def _apply(self, data: tls.ClientHelloData, decision: Decision) -> None:
        context = data.context
        record = self.connections.record(context.client.id)
        sni, address = data.client_hello.sni, context.client.peername[0] if context.client.peername else None
        if decision.action == "bump" and decision.learn_pinning and sni and address and self.pins.pinned(address, sni):
            decision = dataclasses.replace(decision, action="splice", rule=f"{decision.rule} (learned pinning)")
        self._decisions[context.client.id] = decision
        if record:
            record.decided(decision)
        if decision.action == "splice":
            data.ignore_connection = True
        elif decision.action == "block":
            context.client.error = f"blocked by policy rule {decision.rule!r}"
            if record:
                record.fail(context.client.error)
