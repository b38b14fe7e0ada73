"""Where upstream connections go: --resolve NAME=ADDRESS[:PORT], upstream host names mapped to addresses
without DNS, as curl's --resolve does, and with a port also to another port, as curl's --connect-to
does; and the policy's `destinations:`, checked on every address a connection is made to."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bumper.errors import ConfigError
from bumper.policy import destinations, names
from bumper.policy.destinations import Address, Destinations
from bumper.upstream import via
from bumper.upstream.via import Dialer

# One answer of getaddrinfo, as typeshed spells it (IPv4 and IPv6 apart).
IPv6Address = tuple[str, int, int, int] | tuple[int, bytes]
AddressInfo = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[Literal[socket.AddressFamily.AF_INET6], socket.SocketKind, int, str, IPv6Address]
)


@dataclass(frozen=True)
class Override:
    pattern: str
    address: str
    port: int | None = None  # None: the port the client asked for

    @classmethod
    def parse(cls, spec: str) -> Override:
        name, sep, target = spec.partition("=")
        if not sep or not names.valid_pattern(names.normalize_pattern(name)):
            raise ConfigError(f"--resolve {spec!r}: expected NAME=ADDRESS[:PORT], e.g. *.example.test=127.0.0.1")
        address, port = _split_port(target)
        if not names.is_ip_address(address):
            raise ConfigError(f"--resolve {spec!r}: {address!r} is not an IP address")
        try:
            return cls(
                names.normalize_pattern(name), address, None if port is None else names.parse_port(port, lowest=1)
            )
        except ValueError as e:
            raise ConfigError(f"--resolve {spec!r}: {e}") from None


def _split_port(target: str) -> tuple[str, str | None]:
    """ADDRESS and PORT of ADDRESS:PORT or [IPV6]:PORT; an address alone (IPv6 too) has no port."""
    if target.startswith("["):
        address, bracket, rest = target[1:].partition("]")
        if not bracket:
            return target, None  # not an IP address either
        return address, rest.removeprefix(":") if rest else None
    if target.count(":") == 1:
        address, _, port = target.partition(":")
        return address, port
    return target, None


def lookup(overrides: tuple[Override, ...], host: str) -> Override | None:
    """The first override that matches HOST, or None to use DNS."""
    for override in overrides:
        if names.host_matches(override.pattern, host):
            return override
    return None


class DestinationRefused(OSError):
    """A connection the destination check refused; its text is the refusal (destinations.refusal_in)."""


def is_local(address: Address) -> bool:
    """Whether ADDRESS is one of this host's own: the kernel binds a socket only to those."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(address), 0))
        except OSError:
            return False
    return True


@dataclass
class Egress:
    """What every upstream connection is checked against: the policy's `destinations:` (the one in
    force, reloads included) and bumper's own listening sockets (set once they are bound)."""

    destinations: Callable[[], Destinations] = lambda: destinations.DEFAULT
    listening: tuple[tuple[Address, int], ...] = ()
    local: Callable[[Address], bool] = field(default=is_local)

    def refusal(self, address: Address, port: int, operators: bool) -> str | None:
        """Why bumper may not connect to ADDRESS:PORT, or None. OPERATORS: the address is a --resolve
        mapping's, the operator's own choice, which only the proxy-loop check still applies to."""
        loop = destinations.proxy_loop(address, port, self.listening, self.local)
        return loop or (None if operators else self.destinations().refusal(address, port))


# The (host, port) whose connection the running task is making, and whether the address is the operator's
# (a relay's): the lookup create_connection makes for it is the one getaddrinfo checks. A context
# variable, as it belongs to that one task.
_CONNECTING: contextvars.ContextVar[tuple[str, int, bool] | None] = contextvars.ContextVar("connecting", default=None)


def _ip_address(host: str) -> Address | None:
    return ipaddress.ip_address(host) if names.is_ip_address(host) else None  # a name: no exception per connection


def numeric(
    host: str, port: bytes | str | int | None, family: int, type: int, proto: int, flags: int
) -> list[AddressInfo]:
    """getaddrinfo's answers for HOST, an IP address: with AI_NUMERICHOST the C library parses it and asks
    no resolver, so the call cannot block the event loop."""
    return socket.getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)


class ResolvingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose name lookups honour the overrides first, as curl's --resolve does, and whose
    every TCP connection (mitmproxy's upstream connections, the splice probe, AIA fetches) goes only
    to addresses the Egress check allows.

    Overriding at the resolver, not in the proxy's connection objects, keeps the host name and the
    port the client asked for everywhere else (SNI, certificate verification, policy, flows, logs);
    only the socket sees the address, and the override's port: every connection is made to the
    address a lookup returns, port included. The check sits there for the same reason: it sees the
    very answers the socket connects to, after DNS (no second lookup a rebinding name could answer
    differently), and an IP address the client named, which asyncio connects to without a lookup.
    """

    def __init__(
        self, overrides: tuple[Override, ...], egress: Egress | None = None, dialer: Dialer | None = None
    ) -> None:
        super().__init__()
        self.overrides = overrides
        self.egress = egress or Egress()
        self.dialer = dialer  # connections through relays (the policy's via:); None: there are none

    async def create_connection(  # type: ignore[override]  # typeshed spells out every keyword
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | None = None, port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:  # fmt: skip
        if host is None:  # a socket the caller connected itself (sock=)
            return await super().create_connection(protocol_factory, port=port, **kwargs)
        port = port or 0  # as asyncio reads a missing port
        if self.dialer is not None and (how := via.routed(host, port)) is not None:
            # The destination is the relay's to check; the relay's own address is the operator's choice.
            return await self.dialer.open(
                functools.partial(self._connect, operators=True), protocol_factory, how, host, port
            )
        return await self._connect(protocol_factory, host, port, operators=False, **kwargs)

    async def _connect(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, operators: bool, **kwargs: Any
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        address = _ip_address(host)
        if address is not None:  # asyncio connects to an IP address without asking getaddrinfo
            if why := self.egress.refusal(address, port, operators=operators):
                raise DestinationRefused(why)
            return await super().create_connection(protocol_factory, host, port, **kwargs)
        token = _CONNECTING.set((host, port, operators))
        try:
            return await super().create_connection(protocol_factory, host, port, **kwargs)
        finally:
            _CONNECTING.reset(token)

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[AddressInfo]:
        if isinstance(host, bytes):
            host = host.decode("idna")
        connecting = _CONNECTING.get()
        checked = host is not None and connecting is not None and connecting[:2] == (host, port)
        override = lookup(self.overrides, host) if host else None
        if override is not None:
            host, port = override.address, override.port or port
        elif host and not host.isascii():
            host = names.normalize(host)  # as compared: UTS #46, not the IDNA 2003 of Python's socket module
        if host and names.is_ip_address(host):
            # An address (an --resolve target, a CONNECT to an IP) needs no lookup: answered here, not by a
            # getaddrinfo in asyncio's thread pool (a thread hop per new upstream connection: 1.6% of bumper's
            # CPU on bench workload 1, one new connection per request, py-spy).
            answers = numeric(host, port, family, type, proto, flags)
        else:
            answers = await super().getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
        return self._allowed(answers, override is not None or connecting[2]) if checked and connecting else answers

    def _allowed(self, answers: list[AddressInfo], operators: bool) -> list[AddressInfo]:
        """The ANSWERS a connection may go to, or DestinationRefused saying why none may."""
        allowed, refusals = [], []
        for answer in answers:
            sockaddr = answer[4]
            why = self.egress.refusal(ipaddress.ip_address(sockaddr[0]), int(sockaddr[1]), operators)
            if why is None:
                allowed.append(answer)
            else:
                refusals.append(why)
        if refusals and not allowed:
            raise DestinationRefused(refusals[0])
        return allowed
