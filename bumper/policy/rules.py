"""Policies: which connections are bumped, spliced or blocked. Pure data and functions.

A policy file is YAML:

    default: bump            # bump | splice | block
    on_upstream_error: mimic # mimic | block | splice, when the upstream's certificate fails verification
    rules:                   # ordered; the first rule that matches decides
      - name: banking
        match:
          sni: ["*.bank.example", "bank.example"]
        action: splice
      - name: legacy-intranet
        match:
          sni: [old.intranet.example]
        action: bump
        on_upstream_error: allow   # only where a rule names its hosts exactly

`match` keys: `sni` (the name in the ClientHello; the CONNECT host when there is none) and `host`
(the CONNECT host). Each takes exact names and `*.` globs; every key given must match, any entry
of a key may.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from bumper.errors import ConfigError
from bumper.policy import binder as settings
from bumper.policy import names

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


class OnError(StrEnum):
    """What an inspection addon's failure does to the flow."""

    FAIL_OPEN = "fail-open"
    FAIL_CLOSED = "fail-closed"


class Mismatch(StrEnum):
    """What a bumped request whose CONNECT host, SNI and Host disagree gets."""

    BLOCK = "block"
    LOG = "log"


ACTIONS = tuple(Action)
UPSTREAM_ERROR_ACTIONS = tuple(OnUpstreamError)
MATCH_KEYS = ("sni", "host", "client", "port", "listener")
# bumper has one listener today, the explicit proxy; rules can already name it for later modes.
LISTENERS = ("proxy",)
RULE_KEYS = ("name", "match", "action", "on_upstream_error", "upstream_tls_min", "learn_pinning", "addons")
ON_ERROR = tuple(OnError)
# Keys of an addon's entry that are bumper's, not the addon's settings.
ADDON_KEYS = ("on_error", "timeout")
DEFAULT_ADDON_TIMEOUT = 1.0  # seconds a hook may take before it counts as failed
UPSTREAM_TLS_VERSIONS = ("1.0", "1.1", "1.2")
TOP_KEYS = ("default", "on_upstream_error", "clients", "ports", "mismatch", "rules")
MISMATCH_ACTIONS = tuple(Mismatch)
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
# Where CONNECT may go, like Squid's `SSL_ports`.
SSL_PORTS: tuple[PortRange, ...] = ((443, 443), (8443, 8443))


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
class Rule:
    name: str
    action: Action
    sni: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    client: tuple[Network, ...] = ()
    port: tuple[PortRange, ...] = ()
    listener: tuple[str, ...] = ()
    on_upstream_error: OnUpstreamError | None = None  # None: the policy's own
    upstream_tls_min: str = "1.2"  # below 1.2 only for hosts the rule names exactly
    learn_pinning: bool = False  # splice (client, SNI) pairs whose client rejected the mimic
    addons: tuple[AddonSpec, ...] = ()  # the chain run on bumped traffic, in order

    def names_hosts_exactly(self) -> bool:
        patterns = (*self.sni, *self.host)
        return bool(patterns) and not any(p.startswith(("*.", names.REGEX_PREFIX)) for p in patterns)

    def needs_sni(self) -> bool:
        return bool(self.sni)

    def matches(self, connect_host: str, sni: str | None, client: Address | None = None, port: int = 443) -> bool:
        if self.host and not any(names.host_matches(p, connect_host) for p in self.host):
            return False
        if self.client and (client is None or not any(client in net for net in self.client)):
            return False
        if self.port and not in_ranges(port, self.port):
            return False
        if self.listener and "proxy" not in self.listener:
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


def name_mismatch(connect_host: str, sni: str | None, host_header: str | None) -> bool:
    """Whether a bumped request's names disagree (domain fronting, tunnelling): the CONNECT host
    (unless it is an IP address, when the SNI alone names the site), the SNI and the Host header."""
    seen = {names.normalize(n) for n in (sni, host_header) if n}
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
    ports: tuple[PortRange, ...] = SSL_PORTS
    mismatch: Mismatch = Mismatch.BLOCK  # when CONNECT host, SNI and Host disagree in a bumped connection

    def refusal(self, client: Address | None, port: int | None) -> str | None:
        """Why a request from CLIENT is refused before any rule is read, or None: every client must be
        in `clients`, and a CONNECT's PORT (None for plain HTTP) in `ports`."""
        if client is None or not any(client in net for net in self.clients):
            return f"client {client} is not in the policy's clients"
        if port is not None and not in_ranges(port, self.ports):
            return f"port {port} is not in the policy's ports"
        return None

    def decide(self, connect_host: str, sni: str | None, client: Address | None = None, port: int = 443) -> Decision:
        decision = self._first_match(connect_host, sni, client, port)
        if decision.action is Action.SPLICE and sni and not names.is_ip_address(connect_host):
            # A spliced tunnel is never inspected, so both names must earn it: an allow-listed SNI
            # inside a CONNECT to a host that is not (domain fronting) is blocked.
            as_connect = self._first_match(connect_host, connect_host, client, port)
            if as_connect.action is not Action.SPLICE:
                return Decision(Action.BLOCK, f"{decision.rule} (SNI {sni} spliced, CONNECT host {connect_host} not)")
        return decision

    @functools.cached_property
    def _index(self) -> RuleIndex:
        return RuleIndex(self.rules)

    def _first_match(self, connect_host: str, sni: str | None, client: Address | None, port: int) -> Decision:
        for i in self._index.candidates(connect_host, sni or connect_host):
            if self.rules[i].matches(connect_host, sni, client, port):
                return self._by(self.rules[i])
        return Decision(self.default, "default", self.on_upstream_error)

    def decide_at_connect(self, connect_host: str, client: Address | None = None, port: int = 443) -> Decision | None:
        """The decision when only the CONNECT host is known, or None when it hangs on the SNI: the
        first rule that matches, unless a rule that needs the SNI comes before it."""
        first_sni_rule = self._index.first_sni_rule
        for i in self._index.candidates(connect_host, connect_host):
            if i > first_sni_rule:
                break
            if not self.rules[i].needs_sni() and self.rules[i].matches(connect_host, None, client, port):
                return self._by(self.rules[i])
        if first_sni_rule < len(self.rules):
            return None
        return Decision(self.default, "default", self.on_upstream_error)

    def _by(self, rule: Rule) -> Decision:
        return Decision(
            rule.action, rule.name, rule.on_upstream_error or self.on_upstream_error, rule.upstream_tls_min,
            rule.learn_pinning, rule.addons,
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


class _Errors:
    """Collects every problem in a policy file as FILE:LINE:COLUMN: key: what is wrong."""

    def __init__(self, path: Path, addons: Mapping[str, Any]) -> None:
        self.path = path
        self.addons = addons
        self.messages: list[str] = []

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        mark = node.start_mark
        self.messages.append(f"{self.path}:{mark.line + 1}:{mark.column + 1}: {key}: {message}")


def load(path: Path, addons: Mapping[str, Any] | None = None) -> Policy:
    """Read and check a policy file; every problem found is reported at once in one ConfigError.
    ADDONS: the addon classes rules may name, by name (bumper.addonload)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    errors = _Errors(path, addons or {})
    policy = _policy(root, errors) if root is not None else Policy()
    if errors.messages:
        raise ConfigError("\n".join(errors.messages))
    return policy


def _duplicates(node: yaml.MappingNode, where: str, errors: _Errors) -> None:
    """YAML keeps the last of repeated keys without a word; in a policy that hides a mistake."""
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.value in seen:
            errors.add(key_node, f"{where}{key_node.value}", "repeated key")
        seen.add(key_node.value)


def _policy(root: yaml.Node, errors: _Errors) -> Policy:
    if not isinstance(root, yaml.MappingNode):
        errors.add(root, "policy", "expected a mapping with `default` and `rules`")
        return Policy()
    _duplicates(root, "", errors)
    default, on_upstream_error, rules = Action.BUMP, OnUpstreamError.MIMIC, []
    clients, ports, mismatch = LOCALNET, SSL_PORTS, Mismatch.BLOCK
    for key_node, value in root.value:
        key = key_node.value
        if key == "mismatch":
            mismatch = Mismatch(_choice(value, key, errors, MISMATCH_ACTIONS, "block"))
        elif key == "clients":
            clients = _networks(value, key, errors)
        elif key == "ports":
            ports = _ports(value, key, errors)
        elif key == "default":
            default = _action(value, "default", errors)
        elif key == "on_upstream_error":
            on_upstream_error = _upstream_error_action(value, key, errors)
            if on_upstream_error is OnUpstreamError.ALLOW:
                errors.add(value, key, "allow is only for rules that name their hosts exactly")
        elif key == "rules":
            if not isinstance(value, yaml.SequenceNode):
                errors.add(value, "rules", "expected a list of rules")
                continue
            rules = [_rule(node, i, errors) for i, node in enumerate(value.value)]
        else:
            errors.add(key_node, key, f"unknown key (expected one of: {', '.join(TOP_KEYS)})")
    return Policy(default, tuple(r for r in rules if r is not None), on_upstream_error, clients, ports, mismatch)


def _rule(node: yaml.Node, index: int, errors: _Errors) -> Rule | None:
    where = f"rules[{index}]"
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, where, "expected a mapping with name, match and action")
        return None
    _duplicates(node, f"{where}.", errors)
    fields: dict[str, yaml.Node] = {}
    for key_node, value in node.value:
        if key_node.value not in RULE_KEYS:
            errors.add(key_node, f"{where}.{key_node.value}", f"unknown key (expected one of: {', '.join(RULE_KEYS)})")
        fields[key_node.value] = value
    if "action" not in fields:
        errors.add(node, f"{where}.action", "missing")
        return None
    name = fields["name"].value if "name" in fields and isinstance(fields["name"], yaml.ScalarNode) else where
    action = _action(fields["action"], f"{where}.action", errors)
    patterns = _match(fields.get("match"), f"{where}.match", errors)
    rule = Rule(
        name=str(name),
        action=action,
        sni=patterns.get("sni", ()),  # type: ignore[arg-type]
        host=patterns.get("host", ()),  # type: ignore[arg-type]
        client=patterns.get("client", ()),  # type: ignore[arg-type]
        port=patterns.get("port", ()),  # type: ignore[arg-type]
        listener=patterns.get("listener", ()),  # type: ignore[arg-type]
    )
    if "on_upstream_error" in fields:
        node_value = fields["on_upstream_error"]
        on_error = _upstream_error_action(node_value, f"{where}.on_upstream_error", errors)
        if on_error is OnUpstreamError.ALLOW and not rule.names_hosts_exactly():
            errors.add(
                node_value, f"{where}.on_upstream_error", "allow needs a match that names its hosts exactly, no globs"
            )
        rule = dataclasses.replace(rule, on_upstream_error=on_error)
    if "learn_pinning" in fields:
        node_value = fields["learn_pinning"]
        learn = _choice(node_value, f"{where}.learn_pinning", errors, ("true", "false"), "false", "value")
        rule = dataclasses.replace(rule, learn_pinning=learn == "true")
    if "upstream_tls_min" in fields:
        node_value = fields["upstream_tls_min"]
        version = _choice(node_value, f"{where}.upstream_tls_min", errors, UPSTREAM_TLS_VERSIONS, "1.2", "version")
        if version != "1.2" and not rule.names_hosts_exactly():
            errors.add(node_value, f"{where}.upstream_tls_min", "below 1.2 needs a match that names its hosts exactly")
        rule = dataclasses.replace(rule, upstream_tls_min=version)
    if "addons" in fields:
        if action is not Action.BUMP:
            errors.add(
                fields["addons"],
                f"{where}.addons",
                f"addons run on decrypted traffic only; this rule's action is {action}",
            )
        rule = dataclasses.replace(rule, addons=_addons(fields["addons"], f"{where}.addons", errors))
    return rule


def _addons(node: yaml.Node, where: str, errors: _Errors) -> tuple[AddonSpec, ...]:
    """`- name` or `- name: {settings, on_error, timeout}`, in chain order."""
    specs = []
    for i, item in enumerate(_items(node, where, errors)):
        here = f"{where}[{i}]"
        if isinstance(item, yaml.ScalarNode):
            name_node, body = item, None
        elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            name_node, body = item.value[0]
        else:
            errors.add(item, here, "expected an addon name, or one name mapped to its settings")
            continue
        name = str(name_node.value)
        cls = errors.addons.get(name)
        if cls is None:
            known = ", ".join(sorted(errors.addons)) or "none loaded"
            errors.add(name_node, here, f"unknown addon {name!r} (known: {known})")
            continue
        on_error, timeout = None, DEFAULT_ADDON_TIMEOUT
        if isinstance(body, yaml.MappingNode):
            own = [(k, v) for k, v in body.value if k.value in ADDON_KEYS]
            _duplicates(yaml.MappingNode(body.tag, own), f"{here}.{name}.", errors)  # settings: settings.build
            body = yaml.MappingNode(body.tag, [(k, v) for k, v in body.value if k.value not in ADDON_KEYS])
            body.start_mark = name_node.start_mark
            for key_node, value in own:
                if key_node.value == "on_error":
                    where_on_error = f"{here}.{name}.on_error"
                    on_error = OnError(_choice(value, where_on_error, errors, ON_ERROR, "fail-closed", "value"))
                else:
                    timeout = _seconds(value, f"{here}.{name}.timeout", errors)
        config = settings.build(cls.Settings, body, f"{here}.{name}", errors.add, at=name_node)
        if config is not None:
            on_error = on_error or (OnError.FAIL_CLOSED if cls.blocks_with(config) else OnError.FAIL_OPEN)
            specs.append(AddonSpec(name, config, on_error, timeout))
    return tuple(specs)


def _seconds(node: yaml.Node, where: str, errors: _Errors) -> float:
    try:
        value = float(node.value) if isinstance(node, yaml.ScalarNode) else 0.0
    except ValueError:
        value = 0.0
    if not 0 < value <= 60:
        shown = repr(node.value) if isinstance(node, yaml.ScalarNode) else "a list or mapping"
        errors.add(node, where, f"bad timeout {shown} (seconds, more than 0, at most 60)")
        return DEFAULT_ADDON_TIMEOUT
    return value


def _match(node: yaml.Node | None, where: str, errors: _Errors) -> dict[str, tuple[object, ...]]:
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, where, f"expected a mapping of {', '.join(MATCH_KEYS)}")
        return {}
    _duplicates(node, f"{where}.", errors)
    found: dict[str, tuple[object, ...]] = {}
    for key_node, value in node.value:
        key = key_node.value
        if key == "client":
            found[key] = _networks(value, f"{where}.{key}", errors)
        elif key == "port":
            found[key] = _ports(value, f"{where}.{key}", errors)
        elif key in ("sni", "host"):
            found[key] = _patterns(value, f"{where}.{key}", errors)
        elif key == "listener":
            found[key] = tuple(
                _choice(item, f"{where}.{key}", errors, LISTENERS, "proxy", "listener")
                for item in _items(value, f"{where}.{key}", errors)
            )
        else:
            errors.add(key_node, f"{where}.{key}", f"unknown key (expected one of: {', '.join(MATCH_KEYS)})")
    return found


def _items(node: yaml.Node, where: str, errors: _Errors) -> list[yaml.Node]:
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not items:  # an empty list would quietly match everything
        errors.add(node, where, "empty list: name at least one, or leave the key out")
    return items


def _patterns(node: yaml.Node, where: str, errors: _Errors) -> tuple[str, ...]:
    patterns = []
    for item in _items(node, where, errors):
        text = str(item.value) if isinstance(item, yaml.ScalarNode) else ""
        pattern = text if text.startswith(names.REGEX_PREFIX) else names.normalize(text)
        if not names.valid_pattern(pattern):
            errors.add(item, where, f"bad name, glob or regex {text!r} (use example.com, *.example.com or regex:...)")
        patterns.append(pattern)
    return tuple(patterns)


def _networks(node: yaml.Node, where: str, errors: _Errors) -> tuple[Network, ...]:
    networks = []
    for item in _items(node, where, errors):
        try:
            networks.append(ipaddress.ip_network(str(item.value), strict=False))
        except ValueError:
            errors.add(item, where, f"bad CIDR {item.value!r} (use 10.0.0.0/8, 2001:db8::/32 or one address)")
    return tuple(networks)


def _ports(node: yaml.Node, where: str, errors: _Errors) -> tuple[PortRange, ...]:
    ranges = []
    for item in _items(node, where, errors):
        low, _, high = str(item.value).partition("-")
        if low.isdigit() and (not high or high.isdigit()) and 1 <= int(low) <= int(high or low) <= 65535:
            ranges.append((int(low), int(high or low)))
        else:
            errors.add(item, where, f"bad port {item.value!r} (use 443 or a range such as 8000-8999)")
    return tuple(ranges)


def _action(node: yaml.Node, where: str, errors: _Errors) -> Action:
    return Action(_choice(node, where, errors, ACTIONS, "block"))


def _upstream_error_action(node: yaml.Node, where: str, errors: _Errors) -> OnUpstreamError:
    return OnUpstreamError(_choice(node, where, errors, UPSTREAM_ERROR_ACTIONS, "block"))


def _choice(
    node: yaml.Node, where: str, errors: _Errors, choices: Sequence[str], invalid: str, what: str = "action"
) -> str:
    if isinstance(node, yaml.ScalarNode) and node.value in choices:
        return str(node.value)
    errors.add(node, where, f"unknown {what} {getattr(node, 'value', node)!r} (expected one of: {', '.join(choices)})")
    return invalid  # never reached by a running proxy: the file is rejected
