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

from dataclasses import dataclass
from pathlib import Path

import yaml

from bumper import names
from bumper.errors import ConfigError

ACTIONS = ("bump", "splice", "block")
UPSTREAM_ERROR_ACTIONS = ("mimic", "block", "allow", "splice")
MATCH_KEYS = ("sni", "host")
RULE_KEYS = ("name", "match", "action", "on_upstream_error", "upstream_tls_min")
UPSTREAM_TLS_VERSIONS = ("1.0", "1.1", "1.2")
TOP_KEYS = ("default", "on_upstream_error", "rules")


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    sni: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    on_upstream_error: str | None = None  # None: the policy's own
    upstream_tls_min: str = "1.2"  # below 1.2 only for hosts the rule names exactly

    def names_hosts_exactly(self) -> bool:
        patterns = (*self.sni, *self.host)
        return bool(patterns) and not any(p.startswith("*.") for p in patterns)

    def needs_sni(self) -> bool:
        return bool(self.sni)

    def matches(self, connect_host: str, sni: str | None) -> bool:
        if self.host and not any(names.host_matches(p, connect_host) for p in self.host):
            return False
        name = sni or connect_host
        return not self.sni or any(names.host_matches(p, name) for p in self.sni)


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str  # the rule's name, or "default"
    on_upstream_error: str = "mimic"
    upstream_tls_min: str = "1.2"


@dataclass(frozen=True)
class Policy:
    default: str = "bump"
    rules: tuple[Rule, ...] = ()
    on_upstream_error: str = "mimic"

    def decide(self, connect_host: str, sni: str | None) -> Decision:
        decision = self._first_match(connect_host, sni)
        if decision.action == "splice" and sni and not names.is_ip_address(connect_host):
            # A spliced tunnel is never inspected, so both names must earn it: an allow-listed SNI
            # inside a CONNECT to a host that is not (domain fronting) is blocked.
            as_connect = self._first_match(connect_host, connect_host)
            if as_connect.action != "splice":
                return Decision("block", f"{decision.rule} (SNI {sni} spliced, CONNECT host {connect_host} not)")
        return decision

    def _first_match(self, connect_host: str, sni: str | None) -> Decision:
        for rule in self.rules:
            if rule.matches(connect_host, sni):
                return self._by(rule)
        return Decision(self.default, "default", self.on_upstream_error)

    def decide_at_connect(self, connect_host: str) -> Decision | None:
        """The decision when only the CONNECT host is known, or None when it hangs on the SNI."""
        for rule in self.rules:
            if rule.needs_sni():
                return None
            if rule.matches(connect_host, None):
                return self._by(rule)
        return Decision(self.default, "default", self.on_upstream_error)

    def _by(self, rule: Rule) -> Decision:
        return Decision(rule.action, rule.name, rule.on_upstream_error or self.on_upstream_error, rule.upstream_tls_min)


LAB = Policy()  # no --policy: bump everything


class _Errors:
    """Collects every problem in a policy file as FILE:LINE:COLUMN: key: what is wrong."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        mark = node.start_mark
        self.messages.append(f"{self.path}:{mark.line + 1}:{mark.column + 1}: {key}: {message}")


def load(path: Path) -> Policy:
    """Read and check a policy file; every problem found is reported at once in one ConfigError."""
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
    errors = _Errors(path)
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
    default, on_upstream_error, rules = "bump", "mimic", []
    for key_node, value in root.value:
        key = key_node.value
        if key == "default":
            default = _action(value, "default", errors)
        elif key == "on_upstream_error":
            on_upstream_error = _upstream_error_action(value, key, errors)
            if on_upstream_error == "allow":
                errors.add(value, key, "allow is only for rules that name their hosts exactly")
        elif key == "rules":
            if not isinstance(value, yaml.SequenceNode):
                errors.add(value, "rules", "expected a list of rules")
                continue
            rules = [_rule(node, i, errors) for i, node in enumerate(value.value)]
        else:
            errors.add(key_node, key, f"unknown key (expected one of: {', '.join(TOP_KEYS)})")
    return Policy(default, tuple(r for r in rules if r is not None), on_upstream_error)


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
    rule = Rule(name=str(name), action=action, sni=patterns.get("sni", ()), host=patterns.get("host", ()))
    if "on_upstream_error" in fields:
        node_value = fields["on_upstream_error"]
        on_error = _upstream_error_action(node_value, f"{where}.on_upstream_error", errors)
        if on_error == "allow" and not rule.names_hosts_exactly():
            errors.add(
                node_value, f"{where}.on_upstream_error", "allow needs a match that names its hosts exactly, no globs"
            )
        rule = Rule(rule.name, rule.action, rule.sni, rule.host, on_error)
    if "upstream_tls_min" in fields:
        node_value = fields["upstream_tls_min"]
        version = _choice(node_value, f"{where}.upstream_tls_min", errors, UPSTREAM_TLS_VERSIONS, "1.2", "version")
        if version != "1.2" and not rule.names_hosts_exactly():
            errors.add(node_value, f"{where}.upstream_tls_min", "below 1.2 needs a match that names its hosts exactly")
        rule = Rule(rule.name, rule.action, rule.sni, rule.host, rule.on_upstream_error, version)
    return rule


def _match(node: yaml.Node | None, where: str, errors: _Errors) -> dict[str, tuple[str, ...]]:
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, where, "expected a mapping of sni and/or host")
        return {}
    _duplicates(node, f"{where}.", errors)
    found: dict[str, tuple[str, ...]] = {}
    for key_node, value in node.value:
        key = key_node.value
        if key not in MATCH_KEYS:
            errors.add(key_node, f"{where}.{key}", f"unknown key (expected one of: {', '.join(MATCH_KEYS)})")
            continue
        items = value.value if isinstance(value, yaml.SequenceNode) else [value]
        if not items:  # an empty list would quietly match every name
            errors.add(value, f"{where}.{key}", "empty list: name at least one host, or leave the key out")
        patterns = []
        for item in items:
            pattern = names.normalize(str(item.value)) if isinstance(item, yaml.ScalarNode) else ""
            if not names.valid_pattern(pattern):
                errors.add(
                    item, f"{where}.{key}", f"bad name or glob {item.value!r} (use example.com or *.example.com)"
                )
            patterns.append(pattern)
        found[key] = tuple(patterns)
    return found


def _action(node: yaml.Node, where: str, errors: _Errors) -> str:
    return _choice(node, where, errors, ACTIONS, "block")


def _upstream_error_action(node: yaml.Node, where: str, errors: _Errors) -> str:
    return _choice(node, where, errors, UPSTREAM_ERROR_ACTIONS, "block")


def _choice(
    node: yaml.Node, where: str, errors: _Errors, choices: tuple[str, ...], invalid: str, what: str = "action"
) -> str:
    if isinstance(node, yaml.ScalarNode) and node.value in choices:
        return str(node.value)
    errors.add(node, where, f"unknown {what} {getattr(node, 'value', node)!r} (expected one of: {', '.join(choices)})")
    return invalid  # never reached by a running proxy: the file is rejected
