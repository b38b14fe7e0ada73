"""Reading a policy file: its YAML bound to the dataclasses below (the file's shape) by
bumper.policy.binder, then turned into a rules.Policy. Every problem is reported at once, as
FILE:LINE:COLUMN: key: what is wrong.

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

    destinations:            # the upstream addresses bumper may connect to (see policy.destinations)
      allow: [10.20.0.0/16]

    relays:                  # parent proxies rules send connections through (see policy.relays)
      corp: {url: "http://proxy.corp.example:3128"}

`match` keys: `sni` (the name in the ClientHello; the CONNECT host when there is none), `host` (the
CONNECT host), `client`, `port`, `listener` and `user` (a proxy user, with --proxy-auth). Every key
given must match, any entry of a key may.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cryptography import x509

from bumper.certs import ca as ca_files
from bumper.certs import owncert
from bumper.certs.owncert import OwnCertificate
from bumper.errors import ConfigError
from bumper.policy import binder, htpasswd, names, relays
from bumper.policy.binder import Check, HostPattern, Network, Noun, OneOrMore, Parsed, PortRange
from bumper.policy.destinations import Destinations
from bumper.policy.relays import Credentials, Relay, Scheme
from bumper.policy.rules import (
    DEFAULT_ADDON_TIMEOUT,
    LOCALNET,
    Action,
    AddonSpec,
    BindNames,
    ClientCertRequirement,
    Mismatch,
    OnError,
    OnUpstreamError,
    Policy,
    Rule,
    listener_entry,
)

_ACTION = Noun("action")  # "unknown action 'x' (expected one of: ...)"
LEGACY_TLS = ("1.0", "1.1")  # upstream TLS floors below the default: for hosts a rule names exactly


def _cas(text: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(ca_files.load_pem_certificates(Path(text)))
    except ConfigError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class ClientCertKey:
    """`match: client_cert:`: what the clients of the connections a rule bumps must present."""

    ca: Annotated[tuple[x509.Certificate, ...], Parsed(_cas)]  # a PEM file of the CAs it must chain to
    names: OneOrMore[HostPattern] = ()  # its DNS names or commonName: one must match
    uris: OneOrMore[str] = ()  # its URI subjectAltNames (spiffe://...): one must match, * as a glob


@dataclass(frozen=True)
class Match:
    """A rule's `match:`."""

    sni: OneOrMore[HostPattern] = ()
    host: OneOrMore[HostPattern] = ()
    client: OneOrMore[Network] = ()
    port: OneOrMore[PortRange] = ()
    # A mode (explicit, transparent, sni, reverse, relay) or a listener's HOST:PORT: the listeners themselves
    # are known only at run time (--listen), so any address is accepted here.
    listener: OneOrMore[Annotated[str, Parsed(listener_entry)]] = ()
    client_cert: ClientCertKey | None = None  # checked in the client's handshake, not at the ClientHello
    # Proxy users (--proxy-auth): the htpasswd file is the command line's, so any name is accepted here.
    user: OneOrMore[Annotated[str, Parsed(htpasswd.user_name)]] = ()


def _client_cert(text: str) -> OwnCertificate:
    """A rule's client_cert: the certificate, its chain and its key, in one PEM file."""
    try:
        return owncert.load(Path(text))
    except ConfigError as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True, kw_only=True)
class RuleEntry:
    """One of `rules:`."""

    name: str | None = None  # None: rules[N]
    match: Match = Match()
    action: Annotated[Action, _ACTION]
    on_upstream_error: Annotated[OnUpstreamError, _ACTION] | None = None  # None: the policy's own
    upstream_tls_min: Annotated[Literal["1.0", "1.1", "1.2", "1.3"], Noun("version")] = "1.2"
    learn_pinning: bool = False
    addons: OneOrMore[AddonSpec] = ()  # `- name` or `- name: {settings..., on_error, timeout}`
    client_cert: Annotated[OwnCertificate, Parsed(_client_cert)] | None = None  # for upstreams that ask
    via: str | None = None  # a relay's name in `relays:`; checked against them in _load

    def __post_init__(self) -> None:
        # Checks across keys: they run once every key of the rule is valid, and each problem is
        # reported at the key at fault.
        exact = names.all_exact((*self.match.sni, *self.match.host))
        problems: dict[str, str] = {}
        if self.on_upstream_error is OnUpstreamError.ALLOW and not exact:
            problems["on_upstream_error"] = "allow needs a match that names its hosts exactly, no globs"
        if self.upstream_tls_min in LEGACY_TLS and not exact:  # a stricter floor (1.3) may cover globs
            problems["upstream_tls_min"] = "below 1.2 needs a match that names its hosts exactly"
        if self.match.client_cert is not None and self.action is not Action.BUMP:
            problems["match"] = (
                f"client_cert: only a bumped connection has a handshake bumper can ask for a client"
                f" certificate in; this rule's action is {self.action}"
            )
        if self.client_cert is not None and self.action is not Action.BUMP:
            problems["client_cert"] = (
                f"only a bumped connection has bumper's own upstream handshake; this rule's action is {self.action}"
            )
        if self.addons and self.action is not Action.BUMP:
            problems["addons"] = f"addons run on decrypted traffic only; this rule's action is {self.action}"
        if self.via is not None and self.action is Action.BLOCK:
            problems["via"] = "a blocked connection goes nowhere: via is for bump and splice"
        if self.via is not None and self.on_upstream_error is OnUpstreamError.SPLICE:
            problems["via"] = "on_upstream_error: splice probes the upstream directly, not through a relay"
        if problems:
            raise binder.Problems(problems)

    def rule(self, index: int, relays_by_name: Mapping[str, Relay]) -> Rule:
        m = self.match
        return Rule(
            self.name or f"rules[{index}]", self.action, sni=m.sni, host=m.host, client=m.client, port=m.port,
            listener=m.listener, user=m.user, on_upstream_error=self.on_upstream_error,
            upstream_tls_min=self.upstream_tls_min,
            learn_pinning=self.learn_pinning, addons=self.addons, client_cert=self.client_cert,
            client_cert_required=ClientCertRequirement(m.client_cert.ca, m.client_cert.names, m.client_cert.uris)
            if m.client_cert else None, via=relays_by_name[self.via] if self.via else None,
        )  # fmt: skip


def _user(text: str) -> None:
    if not text or ":" in text:
        raise ValueError("a user name, without a colon (Basic authentication joins user:password)")


def _password(text: str) -> str:
    """A relay's password_file: the password is its first line, never in the policy file itself."""
    try:
        password = Path(text).read_text().partition("\n")[0].rstrip("\r")
    except OSError as e:
        raise ValueError(f"{text}: cannot read: {e.strerror}") from None
    if not password:
        raise ValueError(f"{text}: empty (the password is the file's first line)")
    return password


@dataclass(frozen=True)
class AuthKey:
    """A relay's `auth:`: Basic proxy authentication, the password from a file of its own."""

    user: Annotated[str, Check(_user)]
    password_file: Annotated[str, Parsed(_password)] = dataclasses.field(repr=False)  # read: the password


@dataclass(frozen=True)
class RelayEntry:
    """One of `relays:`."""

    url: Annotated[tuple[Scheme, str, int], Parsed(relays.parse_url)]
    ca: Annotated[tuple[x509.Certificate, ...], Parsed(_cas)] | None = None  # None: system store + --upstream-ca
    client_cert: Annotated[OwnCertificate, Parsed(_client_cert)] | None = None
    auth: AuthKey | None = None

    def __post_init__(self) -> None:
        plain = self.url[0] is Scheme.HTTP
        problems = {
            key: f"an http:// relay is spoken to in the clear: {key} needs https://"
            for key, given in (("ca", self.ca), ("client_cert", self.client_cert))
            if plain and given is not None
        }
        if problems:
            raise binder.Problems(problems)

    def relay(self, name: str) -> Relay:
        scheme, host, port = self.url
        auth = Credentials(self.auth.user, self.auth.password_file) if self.auth else None
        return Relay(name, scheme, host, port, self.ca or (), self.client_cert, auth)


@dataclass(frozen=True)
class DestinationsKey:
    """`destinations:`: the upstream addresses bumper may connect to (bumper.policy.destinations)."""

    allow: OneOrMore[Network] = ()  # internal ranges reachable after all
    deny: OneOrMore[Network] = ()  # ranges never reached; deny wins


def _not_allow(action: OnUpstreamError) -> None:
    if action is OnUpstreamError.ALLOW:
        raise ValueError("allow is only for rules that name their hosts exactly")


@dataclass(frozen=True)
class PolicyFile:
    """The file: the model's Policy, with rules as written."""

    # No default: an emptied or half-written file must not quietly turn `block` into `bump`.
    default: Annotated[Action, _ACTION]
    on_upstream_error: Annotated[OnUpstreamError, _ACTION, Check(_not_allow)] = OnUpstreamError.MIMIC
    clients: OneOrMore[Network] = LOCALNET
    ports: OneOrMore[PortRange] | None = None  # None: 443 and 8443 for CONNECT, 80 for plain http://
    mismatch: Annotated[Mismatch, _ACTION] = Mismatch.BLOCK
    bind_names: Annotated[BindNames, Noun("mode")] = BindNames.RESOLVE
    destinations: DestinationsKey = DestinationsKey()
    relays: dict[str, RelayEntry] = dataclasses.field(default_factory=dict)
    rules: tuple[RuleEntry, ...] = ()

    def policy(self) -> Policy:
        by_name = {name: entry.relay(name) for name, entry in self.relays.items()}
        rules = tuple(entry.rule(i, by_name) for i, entry in enumerate(self.rules))
        return Policy(
            self.default, rules, on_upstream_error=self.on_upstream_error, clients=self.clients, ports=self.ports,
            mismatch=self.mismatch, destinations=Destinations(self.destinations.allow, self.destinations.deny),
            bind_names=self.bind_names,
        )  # fmt: skip


@dataclass(frozen=True)
class AddonOptions:
    """bumper's own keys in an addon's entry, beside the addon's settings."""

    on_error: OnError | None = None  # None: fail-closed for an addon that blocks, fail-open for observers
    timeout: Annotated[float, binder.seconds("timeout", above=0, most=60)] = DEFAULT_ADDON_TIMEOUT


_OPTIONS = {f.name for f in dataclasses.fields(AddonOptions)}


class _Errors:
    """Collects every problem in a policy file as FILE:LINE:COLUMN: key: what is wrong."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        mark = node.start_mark
        about = f"{key}: " if key else ""  # the whole file has no key
        self.messages.append(f"{self.path}:{mark.line + 1}:{mark.column + 1}: {about}{message}")


# What `bumper policy check` warns about: settings that are valid but give away a guarantee.
CLIENT_BINDING = (
    "warning: a client that names an allowed SNI reaches any address it gives (SNI spoofing): for labs only;"
    " the default, resolve, connects to the name's own address"
)


def load(path: Path, addons: Mapping[str, Any] | None = None) -> Policy:
    """Read and check a policy file; every problem found is reported at once in one ConfigError.
    ADDONS: the addon classes rules may name, by name (bumper.inspect.loading)."""
    return _load(path, addons)[0]


USER_MATCH = (
    "warning: matches only connections whose client gave a proxy user's password: bumper must run with"
    " --proxy-auth, and only its explicit listeners ask for one; elsewhere this rule never matches"
)


def check(path: Path, addons: Mapping[str, Any] | None = None) -> list[str]:
    """`bumper policy check`: load's ConfigError, or the file's warnings as FILE:LINE:COLUMN: key: warning."""
    policy, root = _load(path, addons)
    errors = _Errors(path)
    if policy.bind_names is BindNames.CLIENT:
        for key in _keys(root, "bind_names"):
            errors.add(key, "bind_names", CLIENT_BINDING)
    for index, rule in enumerate(_items(_value(root, "rules"))):
        for key in _keys(_value(rule, "match"), "user"):
            errors.add(key, f"rules[{index}].match.user", USER_MATCH)
    return errors.messages


def _keys(node: yaml.Node | None, name: str) -> list[yaml.Node]:
    """The key nodes NAME in NODE, a mapping (none if NODE is none)."""
    return [k for k, _ in node.value if k.value == name] if isinstance(node, yaml.MappingNode) else []


def _value(node: yaml.Node | None, name: str) -> yaml.Node | None:
    values = [v for k, v in node.value if k.value == name] if isinstance(node, yaml.MappingNode) else []
    return values[0] if values else None


def _items(node: yaml.Node | None) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _load(path: Path, addons: Mapping[str, Any] | None) -> tuple[Policy, yaml.Node | None]:
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
    if root is None:  # empty, or only comments: it states nothing, not "bump everything"
        raise ConfigError(f"{path}:1:1: empty policy file: a policy states at least default: bump, splice or block")
    errors = _Errors(path)
    kinds = {AddonSpec: functools.partial(_addon, addons or {}, errors.add)}
    bound = binder.build(PolicyFile, root, "", errors.add, noun="key", kinds=kinds)
    _check_vias(root, bound, errors)
    if bound is None or errors.messages:
        raise ConfigError("\n".join(errors.messages))
    return bound.policy(), root


def _check_vias(root: yaml.Node, bound: PolicyFile | None, errors: _Errors) -> None:
    """Each rule's `via:` names one of `relays:`, read from the file's nodes, so that it is reported
    with the file's other problems (a relay whose own entry is wrong is still named); and, once the
    file is bound, takes no on_upstream_error: splice from the policy."""
    if not isinstance(root, yaml.MappingNode):
        return
    top = {key.value: value for key, value in root.value}
    relays, rules = top.get("relays"), top.get("rules")
    known = [key.value for key, _ in relays.value] if isinstance(relays, yaml.MappingNode) else []
    entries = rules.value if isinstance(rules, yaml.SequenceNode) else [rules] if rules is not None else []
    for i, rule in enumerate(entries):
        via = next((v for k, v in rule.value if k.value == "via"), None) if isinstance(rule, yaml.MappingNode) else None
        if not isinstance(via, yaml.ScalarNode) or via.tag.endswith(":null"):
            continue  # absent or empty, or not a name: the binder says so
        if via.value not in known:
            listed = ", ".join(known) or "none: add a relays: section"
            errors.add(via, f"rules[{i}].via", f"unknown relay {via.value!r} (relays: {listed})")
        elif (
            bound is not None
            and bound.rules[i].on_upstream_error is None
            and bound.on_upstream_error is OnUpstreamError.SPLICE
        ):
            errors.add(via, f"rules[{i}].via", "the policy's on_upstream_error: splice probes the upstream directly,"
                       " not through a relay: give this rule on_upstream_error: mimic or block")  # fmt: skip


def _addon(registry: Mapping[str, Any], add_error: binder.AddError, item: yaml.Node, where: str) -> AddonSpec:
    """One entry of a rule's `addons:`. Its key is the addon's name, so it is no dataclass of its own:
    the name picks the addon's Settings, bound from the entry's keys but bumper's (AddonOptions)."""
    if isinstance(item, yaml.ScalarNode):
        name_node, body = item, None
    elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
        name_node, body = item.value[0]
    else:
        add_error(item, where, "expected an addon name, or one name mapped to its settings")
        raise binder.Invalid
    name = str(name_node.value)
    cls = registry.get(name)
    if cls is None:
        add_error(name_node, where, f"unknown addon {name!r} (known: {', '.join(sorted(registry)) or 'none loaded'})")
        raise binder.Invalid
    where = f"{where}.{name}"
    ours = None
    if isinstance(body, yaml.MappingNode):
        # Missing settings and the addon's own checks are reported at its name.
        ours = yaml.MappingNode(body.tag, [(k, v) for k, v in body.value if k.value in _OPTIONS])
        body = yaml.MappingNode(
            body.tag, [(k, v) for k, v in body.value if k.value not in _OPTIONS], start_mark=name_node.start_mark
        )
    options = binder.build(AddonOptions, ours, where, add_error, noun="key")
    settings = binder.build(cls.Settings, body, where, add_error, at=name_node)
    if options is None or settings is None:
        raise binder.Invalid
    on_error = options.on_error or (OnError.FAIL_CLOSED if cls.blocks_with(settings) else OnError.FAIL_OPEN)
    return AddonSpec(name, settings, on_error, options.timeout)
