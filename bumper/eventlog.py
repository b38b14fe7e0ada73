"""One human-readable log line per client connection: who, where to, what bumper did, how it ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks
from mitmproxy.utils import human

from bumper.policy import Decision
from bumper.trust import Verdict

log = logging.getLogger("bumper.conn")


@dataclass
class ConnectionRecord:
    """What bumper knows of one client connection: for this log, the access log and addons."""

    client: str
    kind: str = "CONNECT"  # or HTTP: a plain-HTTP proxy request, no tunnel
    target: str = "-"  # host:port from the CONNECT request or the plain request's URL
    sni: str = "-"
    action: str = "-"
    rule: str = "-"
    verify: str = "-"  # "trusted" or the reason code the upstream failed verification with
    upstream_sha256: str = "-"  # the upstream leaf's SHA-256 fingerprint, upper-case hex
    requests: int = 0
    error: str | None = None  # the first thing that went wrong, if anything did
    decision: Decision | None = None
    conn: connection.Client | None = None
    server: connection.Server | None = None  # the upstream connection, once one was opened

    def decided(self, decision: Decision) -> None:
        self.decision = decision
        self.action, self.rule = decision.action, decision.rule

    def verified(self, verdict: Verdict, fingerprint: str) -> None:
        self.verify = verdict.reason or "trusted"
        self.upstream_sha256 = fingerprint.replace(":", "")

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    @property
    def connect_host(self) -> str | None:
        """The host the client named: in CONNECT, or in a plain-HTTP request's URL."""
        return self.target.rpartition(":")[0].strip("[]") or None if self.target != "-" else None

    def outcome(self) -> str:
        if self.error:
            return self.error
        if self.target == "-" and self.requests == 0:
            return "no valid request (malformed, or none before the client closed)"
        if self.verify not in ("trusted", "-") and self.requests:
            # The client went on past a mimic that failed its check (curl -k), or a rule allowed it.
            return f"ok, served although the upstream failed verification ({self.verify})"
        return "ok"

    def line(self) -> str:
        return (
            f"{self.client} {self.kind} {self.target} sni={self.sni} action={self.action} rule={self.rule} "
            f"verify={self.verify} upstream_sha256={self.upstream_sha256} requests={self.requests} "
            f"outcome={self.outcome()}"
        )


class ConnectionLog:
    def __init__(self) -> None:
        self.records: dict[str, ConnectionRecord] = {}
        # Told of every record as its connection ends (the addons' connection_end).
        self.on_end: list[Callable[[ConnectionRecord], Awaitable[None] | None]] = []

    def record(self, client_id: str) -> ConnectionRecord | None:
        return self.records.get(client_id)

    def client_connected(self, client: connection.Client) -> None:
        self.records[client.id] = ConnectionRecord(client=human.format_address(client.peername), conn=client)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if record := self.records.get(data.client.id):
            record.server = data.server

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if record := self.records.get(flow.client_conn.id):
            record.target = f"{flow.request.host}:{flow.request.port}"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        record = self.records.get(flow.client_conn.id)
        if record and is_plain_proxy_request(flow) and record.target == "-":
            record.kind, record.target = "HTTP", f"{flow.request.host}:{flow.request.port}"

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if record := self.records.get(data.client.id):
            record.fail(f"upstream connect failed: {data.server.error}")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if record := self.records.get(data.context.client.id):
            record.sni = data.client_hello.sni or "-"

    def tls_failed_server(self, data: tls.TlsData) -> None:
        if record := self.records.get(data.context.client.id):
            record.fail(f"upstream TLS failed: {short_reason(data.conn.error or 'unknown')}")

    def tls_failed_client(self, data: tls.TlsData) -> None:
        if record := self.records.get(data.context.client.id):
            record.fail(f"client TLS failed: {short_reason(data.conn.error or 'unknown')}")

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.request.method != "CONNECT" and (record := self.records.get(flow.client_conn.id)):
            record.requests += 1

    def error(self, flow: http.HTTPFlow) -> None:
        if record := self.records.get(flow.client_conn.id):
            record.fail(f"HTTP error: {flow.error.msg if flow.error else 'unknown'}")

    def client_disconnected(self, client: connection.Client) -> Awaitable[Any] | None:
        record = self.records.pop(client.id, None)
        if record is None:
            return None
        if client.error:
            record.fail(client.error)
        log.info(record.line())
        # Each callback runs now; those that have to wait finish together.
        waiting = [pending for ended in self.on_end if (pending := ended(record)) is not None]
        return asyncio.gather(*waiting) if waiting else None


def is_plain_proxy_request(flow: http.HTTPFlow) -> bool:
    """A request sent to the proxy in the clear (GET http://...), not one inside a bumped tunnel."""
    return not flow.client_conn.tls and flow.request.method != "CONNECT"


def short_reason(error: str) -> str:
    """mitmproxy's error text, said plainly: no hex dump of an unparseable ClientHello, and no
    guess about trust where the handshake failed on what the two sides offered."""
    if error.startswith("Cannot parse ClientHello"):
        return "Cannot parse ClientHello"
    if "no shared cipher" in error:
        return "no cipher suite in common (bumper accepts only forward-secret AEAD suites)"
    if "unsupported protocol" in error or "tls_version_client_min" in error:
        return "no TLS version in common (bumper accepts TLS 1.2 and 1.3)"
    return error
