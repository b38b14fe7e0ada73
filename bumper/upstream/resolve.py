"""--resolve NAME=ADDRESS[:PORT]: upstream host names mapped to addresses without DNS, as curl's
--resolve does, and with a port also to another port, as curl's --connect-to does."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Literal

from bumper.errors import ConfigError
from bumper.policy import names

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
        if not sep or not names.valid_pattern(names.normalize(name)):
            raise ConfigError(f"--resolve {spec!r}: expected NAME=ADDRESS[:PORT], e.g. *.example.test=127.0.0.1")
        address, port = _split_port(target)
        if not names.is_ip_address(address):
            raise ConfigError(f"--resolve {spec!r}: {address!r} is not an IP address")
        try:
            return cls(names.normalize(name), address, None if port is None else names.parse_port(port, lowest=1))
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


class ResolvingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose name lookups honour the overrides first, as curl's --resolve does.

    Overriding at the resolver, not in the proxy's connection objects, keeps the host name and the
    port the client asked for everywhere else (SNI, certificate verification, policy, flows, logs);
    only the socket sees the address, and the override's port: every connection is made to the
    address a lookup returns, port included.
    """

    def __init__(self, overrides: tuple[Override, ...]) -> None:
        super().__init__()
        self.overrides = overrides

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
        override = lookup(self.overrides, host) if host else None
        if override is not None:
            host, port = override.address, override.port or port
        return await super().getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)
