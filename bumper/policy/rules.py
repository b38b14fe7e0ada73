"""Policies: which connections are bumped, spliced or blocked. Pure data and functions: the model and
the decision. bumper.policy.load reads a policy file into it.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509

from bumper.certs import clientcert
from bumper.certs.clientcert import ClientIdentity
from bumper.certs.owncert import OwnCertificate
from bumper.policy import names
from bumper.policy.destinations import DEFAULT as DEFAULT_DESTINATIONS
from bumper.policy.destinations import Destinations
from bumper.policy.relays import Relay

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Action(StrEnum):
    """What the policy does with a connection."""

    BUMP = "bump"  # decrypt, inspect, re-encrypt
    SPLICE = "splice"  # relay the bytes untouched
    BLOCK = "block"  # refuse


class OnUpstreamError(StrEnum):
    """What a bumped connection does when the upstream's certificate fails verification."""

    MIMIC = "mimic"  # a mimic that fails the client's own check as the upstream's would have
    BLOCK = "block"  # a 502 page for every request
    ALLOW = "allow"  # bumper's own certificate: trusted anyway (named hosts only)
    SPLICE = "splice"  # probed before the client's handshake, and passed through


class ListenerMode(StrEnum):
    """How a listener's clients reach bumper (bumper.proxy.listeners)."""

    EXPLICIT = "explicit"  # configured with a proxy: CONNECT and plain http://
    TRANSPARENT = "transparent"  # redirected by the kernel
    SNI = "sni"  # sent straight to bumper by DNS: the SNI names the destination
    REVERSE = "reverse"  # a front end for one fixed upstream
    RELAY = "relay"  # an HTTPS proxy: TLS to bumper, then CONNECT and plain http:// inside, as explicit


@dataclass(frozen=True)
class ListenerRef:
    """The listener a connection came in on, as rules match it: its mode, its address as --listen
    gave it, and the address the connection reached (for a wildcard listener, one of this host's)."""

    mode: ListenerMode
    address: str
    local: str

    def named_by(self, entry: str) -> bool:
        return entry in (self.mode, self.address, self.local)


def listener_entry(text: str) -> str:
    """A rule's `listener:` entry: a mode, or HOST:PORT in the form ListenerRef holds addresses."""
    text = text.strip()
    if text == "proxy":  # the explicit listener's name before there were other modes
        return ListenerMode.EXPLICIT
    if text in ListenerMode.__members__.values():
        return text
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if sep and names.is_ip_address(host):
        return names.host_port(host, names.parse_port(port, lowest=0))
    modes = ", ".join(ListenerMode)
    raise ValueError(f"unknown listener {text!r} (expected one of: {modes}, or HOST:PORT)")


class OnError(StrEnum):
    """What an inspection addon's failure does to the flow."""

    FAIL_OPEN = "fail-open"
    FAIL_CLOSED = "fail-closed"


class BindNames(StrEnum):
    """Where a connection goes when a rule matched it on a name (the SNI) but the client gave an IP
    address (CONNECT to an address; a transparent connection's original destination): both are the
    client's choice, so a name alone must not open the way to any address (SNI spoofing)."""

    RESOLVE = "resolve"  # to the name's own address (DNS or --resolve), not the client's
    STRICT = "strict"  # to the client's address only if the name resolves to it; else refused
    CLIENT = "client"  # to the client's address, whatever the name: for labs


class Mismatch(StrEnum):
    """What a bumped request whose CONNECT host, SNI and Host disagree gets."""

    BLOCK = "block"
    LOG = "log"


DEFAULT_ADDON_TIMEOUT = 1.0  # seconds a hook may take before it counts as failed
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]
# Who may use the proxy, like Squid's `localnet`: loopback, private, CGNAT and link-local ranges.
LOCALNET: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
        "::1/128", "fc00::/7", "fe80::/10",
    )
)  # fmt: skip
# Where CONNECT may go without a `ports:` key, like Squid's `SSL_ports`; and a plain http:// request.
SSL_PORTS: tuple[PortRange, ...] = ((443, 443), (8443, 8443))
HTTP_PORTS: tuple[PortRange, ...] = ((80, 80),)


@dataclass(frozen=True)
class AddonSpec:
    """One entry of a rule's addon chain: which addon, its checked settings, and what a failure does."""

    name: str
    settings: Any
    on_error: OnError = OnError.FAIL_OPEN
    timeout: float = DEFAULT_ADDON_TIMEOUT

    @functools.cached_property
    def key(self) -> tuple[str, str]:
        """Equal for entries that name one addon with equal settings, in any rule or reload."""
        return self.name, repr(self.settings)


@dataclass(frozen=True)
class ClientCertRequirement:
    """A rule's `match: client_cert:`: the clients of the connections it bumps must present a
    certificate that chains to one of CAS, with a DNS name (or commonName) among NAMES and a URI
    among URIS when those are given. It is asked for in the client's handshake, after the rule matched
    on the ClientHello: a client that fails it is refused, not tried against later rules."""

    cas: tuple[x509.Certificate, ...]
    names: tuple[str, ...] = ()  # host patterns, as `sni:` takes them
    uris: tuple[str, ...] = ()  # globs on URI subjectAltNames (spiffe://cluster.local/ns/*/sa/*)
    issuer: str = "the rule's CA"  # where CAS were configured, as a refusal names them (or --client-ca)

    def check(self, chain: list[x509.Certificate], now: datetime.datetime) -> ClientIdentity | str:
        """The client's identity, or why CHAIN does not meet the requirement."""
        found = clientcert.verify(self.cas, chain, now, self.issuer)
        if isinstance(found, str):
            return found
        if self.names and not any(names.host_matches(p, n) for p in self.names for n in found.dns_names):
            return f"client certificate {found.subject} names none of {', '.join(self.names)}"
        if self.uris and not any(fnmatch.fnmatchcase(u, p) for p in self.uris for u in found.uris):
            return f"client certificate {found.subject} has no URI like {', '.join(self.uris)}"
        return found


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    sni: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    client: tuple[Network, ...] = ()
    port: tuple[PortRange, ...] = ()
    listener: tuple[str, ...] = ()
    user: tuple[str, ...] = ()  # proxy users (--proxy-auth): matches only authenticated connections
    on_upstream_error: OnUpstreamError | None = None  # None: the policy's own
    upstream_tls_min: str = "1.2"  # "1.0" to "1.3"; below 1.2 only for hosts the rule names exactly
    learn_pinning: bool = False  # splice (client, SNI) pairs whose client rejected the mimic
    addons: tuple[AddonSpec, ...] = ()  # the chain run on bumped traffic, in order
    client_cert: OwnCertificate | None = None  # presented to upstreams that ask for a client certificate
    client_cert_required: ClientCertRequirement | None = None  # asked of the clients (match: client_cert)
    via: Relay | None = None  # the relay its connections go through; None: straight to the upstream

    def needs_sni(self) -> bool:
        return bool(self.sni)

    def matches(
        self,
        connect_host: str,
        sni: str | None,
        client: Address | None = None,
        port: int = 443,
        listener: ListenerRef | None = None,
        user: str | None = None,
    ) -> bool:
        if self.user and user not in self.user:
            return False
        if self.host and not any(names.host_matches(p, connect_host) for p in self.host):
            return False
        if self.client and (client is None or not any(client in net for net in self.client)):
            return False
        if self.port and not in_ranges(port, self.port):
            return False
        if self.listener and (listener is None or not any(listener.named_by(e) for e in self.listener)):
            return False
        name = sni or connect_host
        return not self.sni or any(names.host_matches(p, name) for p in self.sni)


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str  # the rule's name, or "default"
    on_upstream_error: OnUpstreamError = OnUpstreamError.MIMIC
    upstream_tls_min: str = "1.2"
    learn_pinning: bool = False
    addons: tuple[AddonSpec, ...] = ()
    by_sni: bool = False  # the rule matched on the client's SNI: bind_names applies
    client_cert: OwnCertificate | None = None
    client_cert_required: ClientCertRequirement | None = None
    via: Relay | None = None


def bound_name(decision: Decision, connect_host: str, sni: str | None) -> str | None:
    """The name a connection must lead to (bind_names), or None: the SNI that DECISION's rule matched
    on, when the client gave an IP address for it to go to."""
    if not (decision.by_sni and sni and names.is_ip_address(connect_host)):
        return None
    name = names.normalize(sni)
    return None if name == names.normalize(connect_host) else name


def strict_refusal(name: str, target: tuple[str, int], resolved: Sequence[tuple[str, int]]) -> str | None:
    """bind_names: strict: why a connection to TARGET (address, port) for NAME, which RESOLVED to those
    (address, port) pairs (--resolve may name a port), is refused; None when the name leads there."""
    wanted = (names.normalize(target[0]), target[1])
    if any((names.normalize(address), port) == wanted for address, port in resolved):
        return None
    where = f"it resolves to {', '.join(names.host_port(*a) for a in resolved)}" if resolved else "it does not resolve"
    return f"SNI {name}: name does not lead to {names.host_port(*wanted)} ({where}; bind_names: strict)"


def name_mismatch(connect_host: str, sni: str | None, *request_names: str | None) -> bool:
    """Whether a bumped request's names disagree (domain fronting, tunnelling): the CONNECT host
    (unless it is an IP address, when the SNI alone names the site), the SNI, and the names the
    request gives (its Host header, :authority, the host of an absolute-form target)."""
    seen = {names.normalize(n) for n in (sni, *request_names) if n}
    if not names.is_ip_address(connect_host):
        seen.add(names.normalize(connect_host))
    return len(seen) > 1


def in_ranges(port: int, ranges: tuple[PortRange, ...]) -> bool:
    return any(low <= port <= high for low, high in ranges)


@dataclass(frozen=True)
class Policy:
    default: Action = Action.BUMP
    rules: tuple[Rule, ...] = ()
    on_upstream_error: OnUpstreamError = OnUpstreamError.MIMIC
    clients: tuple[Network, ...] = LOCALNET
    ports: tuple[PortRange, ...] | None = None  # None: SSL_PORTS for CONNECT, HTTP_PORTS for plain http://
    mismatch: Mismatch = Mismatch.BLOCK  # when CONNECT host, SNI and Host disagree in a bumped connection
    destinations: Destinations = DEFAULT_DESTINATIONS  # the addresses bumper may connect to
    bind_names: BindNames = BindNames.RESOLVE  # where a connection a rule matched by its SNI may go

    def refusal(self, client: Address | None, port: int | None, connect: bool = True) -> str | None:
        """Why a request from CLIENT to PORT is refused before any rule is read, or None: every client
        must be in `clients`, and every port, of a CONNECT (CONNECT) or a plain http:// request, in
        `ports`. PORT None: the operator chose it (a reverse listener's upstream)."""
        if client is None or not any(client in net for net in self.clients):
            return f"client {client} is not in the policy's clients"
        allowed = self.ports if self.ports is not None else SSL_PORTS if connect else HTTP_PORTS
        if port is not None and not in_ranges(port, allowed):
            return f"port {port} is not in the policy's ports"
        return None

    def decide(
        self,
        connect_host: str,
        sni: str | None,
        client: Address | None = None,
        port: int = 443,
        listener: ListenerRef | None = None,
        user: str | None = None,
    ) -> Decision:
        decision = self._first_match(connect_host, sni, client, port, listener, user)
        if decision.action is Action.SPLICE and sni and not names.is_ip_address(connect_host):
            # A spliced tunnel is never inspected, so both names must earn it: an allow-listed SNI
            # inside a CONNECT to a host that is not (domain fronting) is blocked.
            as_connect = self._first_match(connect_host, connect_host, client, port, listener, user)
            if as_connect.action is not Action.SPLICE:
                return Decision(Action.BLOCK, f"{decision.rule} (SNI {sni} spliced, CONNECT host {connect_host} not)")
        return decision

    @functools.cached_property
    def relays_used(self) -> bool:
        """Whether any rule sends connections through a relay (via:)."""
        return any(rule.via is not None for rule in self.rules)

    @functools.cached_property
    def _index(self) -> RuleIndex:
        return RuleIndex(self.rules)

    def _first_match(
        self,
        connect_host: str,
        sni: str | None,
        client: Address | None,
        port: int,
        listener: ListenerRef | None = None,
        user: str | None = None,
    ) -> Decision:
        for i in self._index.candidates(connect_host, sni or connect_host):
            if self.rules[i].matches(connect_host, sni, client, port, listener, user):
                return self._by(self.rules[i])
        return Decision(self.default, "default", self.on_upstream_error)

    def decide_at_connect(
        self,
        connect_host: str,
        client: Address | None = None,
        port: int = 443,
        listener: ListenerRef | None = None,
        user: str | None = None,
    ) -> Decision | None:
        """The decision when only the CONNECT host is known, or None when it hangs on the SNI: the
        first rule that matches, unless a rule that needs the SNI comes before it."""
        first_sni_rule = self._index.first_sni_rule
        for i in self._index.candidates(connect_host, connect_host):
            if i > first_sni_rule:
                break
            if not self.rules[i].needs_sni() and self.rules[i].matches(
                connect_host, None, client, port, listener, user
            ):
                return self._by(self.rules[i])
        if first_sni_rule < len(self.rules):
            return None
        return Decision(self.default, "default", self.on_upstream_error)

    def _by(self, rule: Rule) -> Decision:
        return Decision(
            rule.action, rule.name, rule.on_upstream_error or self.on_upstream_error, rule.upstream_tls_min,
            rule.learn_pinning, rule.addons, by_sni=rule.needs_sni(), client_cert=rule.client_cert,
            client_cert_required=rule.client_cert_required, via=rule.via,
        )  # fmt: skip


class RuleIndex:
    """Which rules could match a name, without scanning them all: exact names and `*.` suffixes are
    looked up by the name's own labels; rules with regexes or without names are always candidates.
    The candidates are then checked in order with Rule.matches, so the first match still wins."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.by_sni: dict[str, list[int]] = {}  # a name or "*.suffix" -> rules whose sni lists it
        self.by_host: dict[str, list[int]] = {}  # the same for rules that match on the host alone
        self.always: list[int] = []
        self.first_sni_rule = next((i for i, r in enumerate(rules) if r.needs_sni()), len(rules))
        for i, rule in enumerate(rules):
            patterns, index = (rule.sni, self.by_sni) if rule.sni else (rule.host, self.by_host)
            if not patterns or any(p.startswith(names.REGEX_PREFIX) for p in patterns):
                self.always.append(i)
                continue
            for pattern in patterns:
                index.setdefault(pattern, []).append(i)

    def candidates(self, connect_host: str, name: str) -> list[int]:
        found = set(self.always)
        for index, key in ((self.by_sni, name), (self.by_host, connect_host)):
            if not index:
                continue
            key = names.normalize(key)
            found.update(index.get(key, ()))
            labels = key.split(".")
            for start in range(1, len(labels)):  # www.bank.test -> *.bank.test, *.test
                found.update(index.get("*." + ".".join(labels[start:]), ()))
        return sorted(found)


LAB = Policy()  # no --policy: bump everything from local clients to the usual TLS ports
