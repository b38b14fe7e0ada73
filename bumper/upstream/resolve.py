"""--resolve NAME=ADDRESS: upstream host names mapped to addresses without DNS, as curl does."""

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

    @classmethod
    def parse(cls, spec: str) -> Override:
        name, sep, address = spec.partition("=")
        if not sep or not names.valid_pattern(names.normalize(name)):
            raise ConfigError(f"--resolve {spec!r}: expected NAME=ADDRESS, e.g. *.example.test=127.0.0.1")
        if not names.is_ip_address(address):
            raise ConfigError(f"--resolve {spec!r}: {address!r} is not an IP address")
        return cls(names.normalize(name), address)


def lookup(overrides: tuple[Override, ...], host: str) -> str | None:
    """The address of the first override that matches HOST, or None to use DNS."""
    for override in overrides:
        if names.host_matches(override.pattern, host):
            return override.address
    return None


class ResolvingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose name lookups honour the overrides first, as curl's --resolve does.

    Overriding at the resolver, not in the proxy's connection objects, keeps the host name
    everywhere else (SNI, certificate verification, flows, logs); only the socket sees the address.
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
        address = lookup(self.overrides, host) if host else None
        return await super().getaddrinfo(address or host, port, family=family, type=type, proto=proto, flags=flags)
