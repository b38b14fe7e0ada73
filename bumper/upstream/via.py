"""Upstream connections through a relay (the policy's `via:`): made where every upstream connection
is made, in the event loop's create_connection (resolve.ResolvingEventLoop), so that everything above
the socket (the TLS to the upstream, a spliced tunnel's bytes, HTTP) runs unchanged over the relayed
stream, and everything else (SNI, verification, policy, logs) keeps the destination the client named.

Which connection goes through which relay is said by the proxy's server_connect hook, which runs in
the task that then opens the connection: route() marks it there, routed() finds it here.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from bumper.certs.owncert import OwnCertificate
from bumper.policy.relays import Relay, Scheme, connect_request
from bumper.upstream.tls import UpstreamTrust

Connect = Callable[..., Awaitable[tuple[asyncio.Transport, asyncio.BaseProtocol]]]
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")
# The SSL contexts of the relays in use: one per relay as the policy states it (reloads keep equal ones).
_MAX_CONTEXTS = 64


class RelayFailed(OSError):
    """The relay could not be reached, failed its verification, or refused the tunnel; the text says
    which relay and why (the client's 502 and the log line quote it)."""


@dataclass(frozen=True)
class Route:
    relay: Relay
    tunnel: bool  # CONNECT host:port through the relay; False: a plain http:// request, sent to it in absolute form


# The connection the running task is opening, and its route: one task opens one upstream connection.
_ROUTE: contextvars.ContextVar[tuple[str, int, Route] | None] = contextvars.ContextVar("route", default=None)


def route(host: str, port: int, how: Route) -> None:
    """The connection to HOST:PORT this task is about to open goes HOW."""
    _ROUTE.set((host, port, how))


def routed(host: str, port: int) -> Route | None:
    marked = _ROUTE.get()
    return marked[2] if marked is not None and marked[:2] == (host, port) else None


class _Answer(asyncio.Protocol):
    """The relay's answer to CONNECT: its head, held to MAX_HEAD bytes, and whatever follows it."""

    def __init__(self, relay: Relay, max_head: int) -> None:
        self.relay = relay
        self.max_head = max_head
        self.buffer = bytearray()
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            self.head.set_result(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
        elif len(self.buffer) > self.max_head:
            self.head.set_exception(
                RelayFailed(f"relay {self.relay}: its answer to CONNECT is over {self.max_head} bytes")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            why = _said(exc) if exc else "closed the connection before answering CONNECT"
            self.head.set_exception(RelayFailed(f"relay {self.relay}: {why}"))


def refusal(relay: Relay, head: bytes, host: str, port: int) -> str | None:
    """Why the relay's answer HEAD refuses the tunnel to HOST:PORT, or None for a 2xx."""
    status = _STATUS_LINE.match(head.split(b"\r\n", 1)[0])
    if status is None:
        return f"relay {relay}: not an HTTP answer to CONNECT"
    code = int(status[1])
    if 200 <= code < 300:
        return None
    reason = (status[2] or b"").decode("latin-1")[:100]
    hint = " (check the relay's auth:)" if code == 407 else ""
    return f"relay {relay} refused CONNECT {host}:{port}: {code} {reason}{hint}"


def _said(e: BaseException) -> str:
    """E in a few words: OpenSSL's reason for a TLS error (an alert from the relay: certificate
    required, unknown ca), the system's for a socket error (Connection refused)."""
    if isinstance(e, ssl.SSLError):
        return f"TLS failed: {(e.reason or str(e)).lower().replace('_', ' ')}"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e)


class Dialer:
    """Opens connections through relays, each within TIMEOUT seconds: its TCP connection, its TLS
    (verified: the relay's own `ca:`, else the system store and --upstream-ca), and its answer to CONNECT."""

    def __init__(self, trust: UpstreamTrust, timeout: float, max_head: int) -> None:
        self.trust = trust
        self.timeout = timeout
        self.max_head = max_head
        self._contexts: dict[Relay, ssl.SSLContext] = {}

    async def open(
        self, connect: Connect, protocol_factory: Callable[[], asyncio.BaseProtocol], how: Route, host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """A stream to HOST:PORT through HOW's relay, handed to PROTOCOL_FACTORY's protocol. CONNECT
        opens the relay's connection (the proxy-loop check applies to it, the destinations check does
        not: a relay is the operator's choice)."""
        relay = how.relay
        answer = _Answer(relay, self.max_head)
        tls: dict[str, Any] = {}
        if relay.scheme is Scheme.HTTPS:
            tls = {"ssl": self.context(relay), "server_hostname": relay.host, "ssl_handshake_timeout": self.timeout}
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await connect(lambda: answer, relay.host, relay.port, **tls)
                if how.tunnel:
                    transport.write(connect_request(relay, host, port))
                    head = await answer.head
                    if why := refusal(relay, head, host, port):
                        raise RelayFailed(why)
        except BaseException as e:
            if transport is not None:
                transport.abort()
            if isinstance(e, TimeoutError):
                raise RelayFailed(f"relay {relay}: no answer within {self.timeout:g}s (--upstream-timeout)") from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise RelayFailed(f"relay {relay}: its certificate failed verification: {e.verify_message}") from None
            if isinstance(e, OSError) and not isinstance(e, RelayFailed):
                raise RelayFailed(f"relay {relay}: {_said(e)}") from None
            raise
        protocol = protocol_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if answer.buffer and isinstance(protocol, asyncio.Protocol):
            protocol.data_received(bytes(answer.buffer))
        return transport, protocol

    def context(self, relay: Relay) -> ssl.SSLContext:
        context = self._contexts.get(relay)
        if context is None:
            if len(self._contexts) >= _MAX_CONTEXTS:
                self._contexts.clear()
            context = self._contexts[relay] = relay_context(relay, self.trust)
        return context


def relay_context(relay: Relay, trust: UpstreamTrust) -> ssl.SSLContext:
    """TLS towards RELAY: verified as an upstream is (its name, a trusted chain), TLS 1.2 at least,
    HTTP/1.1 by ALPN (a proxy speaks it), and its client certificate where it has one."""
    if relay.cas:
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in relay.cas)
        context = ssl.create_default_context(cadata=pem)
    else:
        context = ssl.create_default_context()
        for path in trust.extra_ca_files:
            context.load_verify_locations(path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if relay.client_cert is not None:
        _load_client_cert(context, relay.client_cert)
    return context


def _load_client_cert(context: ssl.SSLContext, own: OwnCertificate) -> None:
    """Python's ssl loads a certificate and key from files only: a private file, gone once read."""
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in own.chain) + own.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, name = tempfile.mkstemp(prefix="bumper-relay-", suffix=".pem")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        context.load_cert_chain(name)
    finally:
        os.unlink(name)
