"""Where bumper may connect: the `destinations:` policy key, checked on every address bumper is about to
connect to (after DNS), so that no client can make the gateway reach into its own network.

    destinations:
      allow: [10.20.0.0/16]      # internal ranges this gateway may reach after all
      deny: [203.0.113.0/24]     # public ranges it may not; deny wins over allow and the defaults

Without the key, bumper refuses what an egress gateway has no business reaching (INTERNAL): loopback,
link-local (cloud metadata at 169.254.169.254), unspecified, multicast, broadcast and reserved
addresses, the private ranges, CGNAT, documentation and benchmarking ranges. `allow` lifts that for
the ranges it lists. An IPv6 address that carries an IPv4 address a socket or a translator would reach
(IPv4-mapped, NAT64, 6to4, Teredo) is judged by that IPv4 address too. Connections that would come
back to bumper's own listening sockets (proxy loops) are refused whatever `allow` says.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The start of every refusal, and what the log's `outcome=` and the shells recognise it by.
PREFIX = "destination "
REFUSED = "refused by policy"

# Refused unless `allow` lists them: (range, why), the first that holds an address names it.
INTERNAL: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),  # "this network": 0.0.0.0 reaches the host itself
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("169.254.0.0/16", "link-local"),  # 169.254.169.254: cloud metadata
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("198.18.0.0/15", "benchmarking"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("100::/64", "discard-only"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits


def embedded(address: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses that connecting to ADDRESS reaches as well: an IPv4-mapped address is that IPv4
    address to a dual-stack socket; NAT64, 6to4 and Teredo addresses are translated or relayed to it."""
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # the Teredo server and the client behind it
    return tuple(found)


def _in(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in net for net in networks)


def _internal(address: Address) -> str | None:
    return next((why for net, why in INTERNAL if address in net), None)


def describe(address: Address, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}"


@dataclass(frozen=True)
class Destinations:
    """The policy's `destinations:`. ALLOW lifts the default refusal of internal ranges for the ranges it
    lists; DENY refuses its ranges whatever else says."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    def refusal(self, address: Address, port: int) -> str | None:
        """Why bumper may not connect to ADDRESS:PORT, or None."""
        judged = (address, *embedded(address))
        where = describe(address, port)
        for candidate in judged:
            if _in(candidate, self.deny):
                return f"{PREFIX}{where} {REFUSED} (in its destinations: deny)"
        for candidate in judged:
            why = _internal(candidate)
            if why is not None and not _in(candidate, self.allow):
                about = why if candidate == address else f"{why} {candidate} inside"
                return f"{PREFIX}{where} {REFUSED} ({about}; internal ranges need the policy's destinations: allow)"
        return None


DEFAULT = Destinations()


def proxy_loop(
    address: Address, port: int, listening: Sequence[tuple[Address, int]], local: Callable[[Address], bool]
) -> str | None:
    """Why connecting to ADDRESS:PORT would come back to one of bumper's own LISTENING sockets, or None:
    the same address and port, or the port of a wildcard listener on any address of this host (LOCAL
    tells whether an address is one). `allow` cannot lift it: a loop only ever exhausts the proxy."""
    judged = (address, *embedded(address))
    for own, own_port in listening:
        if own_port != port:
            continue
        for candidate in judged:
            if candidate == own or (own.is_unspecified and local(candidate)):
                return loop_refusal(describe(address, port))
    return None


def loop_refusal(where: str) -> str:
    """The refusal of a connection to WHERE (host:port), one of bumper's own listening addresses."""
    return f"{PREFIX}{where} {REFUSED} (bumper's own listening address, a proxy loop: no destinations: allow lifts it)"


_REFUSAL = re.compile(f"(?:^|: )({PREFIX}\\S+ {REFUSED} .*)", re.DOTALL)


def refusal_in(error: str) -> str | None:
    """The refusal of this module's that ERROR (a connection's error text, maybe after a prefix such as
    mitmproxy's "Connection killed: ") carries, or None."""
    found = _REFUSAL.search(error)
    return found.group(1) if found else None
