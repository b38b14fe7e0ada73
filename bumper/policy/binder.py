"""Typed dataclasses bound from YAML nodes: the policy file (bumper.policy.load) and each addon's
settings in it, through the same code. Every problem is reported against the YAML node it came from,
so that `bumper policy check` can say FILE:LINE:COLUMN for it, and every problem is reported, not
only the first.

Field types understood:

    str, int, float, bool
    Bytes                   a size: 1048576, "512k", "10m", "1g"
    Literal[...], a StrEnum one of its values; Annotated[..., Noun("action")] names it in the error
    X | None                X, or null
    tuple[X, ...]           a list of X, or one X alone; null is the empty list
    OneOrMore[X]            the same, and empty is an error (an empty match would match everything)
    dict[str, X]            a mapping
    a dataclass             a mapping of its fields, by name; every key must be one of them, once
    Network, PortRange, HostPattern, seconds(...), and any Annotated[T, Parsed(parse)]
    the caller's own kinds  build(kinds={T: bind}): BIND turns the node into a T

Annotated[T, Check(check)] runs CHECK on the value. A dataclass's own __post_init__ may raise
ValueError to reject a value, reported at its mapping, or Problems, reported at the keys it names:
that is where checks across fields go.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, NewType, NoReturn, TypeVar

import yaml

from bumper.policy import names

# A size in bytes; the policy also takes "512k", "10m", "1g".
Bytes = NewType("Bytes", int)
AddError = Callable[[yaml.Node, str, str], None]
# A caller's own kind: the value for a node (and its path), or Invalid once the problem is reported.
Bind = Callable[[yaml.Node, str], Any]
_SIZE = re.compile(r"(\d+)\s*([kmg]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_PORTS = re.compile(r"([0-9]+)(?:-([0-9]+))?")


# A field's metadata key: bumper fills the field in itself (bumper.addon.worker_number), a policy
# file cannot set it.
FILLED_BY_BUMPER = "bumper.filled_in"


_START = yaml.ScalarNode("tag:yaml.org,2002:null", "", start_mark=yaml.Mark("", 0, 0, 0, "", 0))


class Invalid(Exception):
    """A value already reported; the caller drops it."""


class Problems(ValueError):
    """Raised by a bound dataclass's __post_init__: what is wrong, by the key whose value is at fault
    (reported at the mapping when the key is absent)."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems.items()))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Noun:
    """What a choice is called in its error: "unknown action 'x' (expected one of: ...)"."""

    word: str


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A scalar PARSE turns into the value from its text; PARSE's ValueError says what is wrong."""

    parse: Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class Check:
    """CHECK's ValueError rejects the bound value, at its node."""

    check: Callable[[Any], None]


class _NonEmpty:
    """An empty list is an error: in a policy's match it would quietly match everything."""


_T = TypeVar("_T")
OneOrMore = Annotated[tuple[_T, ...], _NonEmpty]  # a list of at least one, or one alone


def parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (use bytes, or 512k, 10m, 1g)")
    return int(m[1]) * _UNITS[m[2].lower()]


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR {text!r} (use 10.0.0.0/8, 2001:db8::/32 or one address)") from None


def _port_range(text: str) -> tuple[int, int]:
    m = _PORTS.fullmatch(text)
    if m and 1 <= int(m[1]) <= int(m[2] or m[1]) <= 65535:
        return int(m[1]), int(m[2] or m[1])
    raise ValueError(f"bad port {text!r} (use 443 or a range such as 8000-8999)")


def seconds(what: str, above: float, most: float) -> Parsed:
    """A number of seconds, more than ABOVE and at most MOST; WHAT names it in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan  # outside any bounds
        if not above < value <= most:
            raise ValueError(f"bad {what} {text!r} (seconds, more than {above:g}, at most {most:g})")
        return value

    return Parsed(parse)


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, Parsed(_network)]  # a CIDR, or one address
PortRange = Annotated[tuple[int, int], Parsed(_port_range)]  # 443, or 8000-8999
HostPattern = Annotated[str, Parsed(names.checked_pattern)]  # example.com, *.example.com, regex:..., normalized


def build[T](
    cls: type[T],
    node: yaml.Node | None,
    where: str,
    add_error: AddError,
    at: yaml.Node | None = None,
    *,
    noun: str = "setting",
    kinds: Mapping[Any, Bind] | None = None,
) -> T | None:
    """An instance of dataclass CLS from NODE (None: every field's default), or None when NODE is
    invalid. WHERE is NODE's path in errors ("" at the top); problems without a node of their own (a
    missing key) are reported AT. NOUN is what the mapping's keys are called ("unknown setting")."""
    try:
        return _Binder(add_error, noun, kinds or {}).dataclass(cls, node, where, at or _START)
    except Invalid:
        return None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


# Each dataclass's fields by YAML key and their types, looked up once: a policy may have 10,000 rules.
_FIELDS: dict[type[Any], tuple[dict[str, dataclasses.Field[Any]], dict[str, Any]]] = {}


def _fields(cls: type[Any]) -> tuple[dict[str, dataclasses.Field[Any]], dict[str, Any]]:
    if cls not in _FIELDS:
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get(FILLED_BY_BUMPER)}
        _FIELDS[cls] = fields, typing.get_type_hints(cls, include_extras=True)
    return _FIELDS[cls]


@dataclasses.dataclass(frozen=True)
class _Binder:
    add_error: AddError
    noun: str
    kinds: Mapping[Any, Bind]

    def fail(self, node: yaml.Node, where: str, message: str) -> NoReturn:
        self.add_error(node, where, message)
        raise Invalid

    def dataclass[T](self, cls: type[T], node: yaml.Node | None, where: str, at: yaml.Node) -> T:
        fields, hints = _fields(cls)
        items: list[tuple[yaml.Node, yaml.Node]] = []
        if node is not None and not _is_null(node):
            if not isinstance(node, yaml.MappingNode):
                self.fail(node, where, f"expected a mapping of {self.noun}s ({', '.join(fields) or 'none'})")
            items = node.value
        values: dict[str, Any] = {}
        given: dict[str, yaml.Node] = {}
        failed = self.repeated(items, where)
        for key_node, value in items:
            key = str(key_node.value)
            given[key] = value
            if key not in fields:
                known = f"one of: {', '.join(fields)}" if fields else "none"
                self.add_error(key_node, _join(where, key), f"unknown {self.noun} (expected {known})")
                failed = True
                continue
            try:
                values[key] = self.value(hints[key], value, _join(where, key))
            except Invalid:
                failed = True
        for name, f in fields.items():
            if name not in given and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.add_error(node or at, _join(where, name), "missing")
                failed = True
        if failed:
            raise Invalid
        try:
            return cls(**values)
        except Problems as e:
            for key, message in e.problems.items():
                self.add_error(given.get(key, node or at), _join(where, key), message)
            raise Invalid from None
        except (ValueError, TypeError) as e:
            self.fail(node or at, where, str(e))

    def repeated(self, items: list[tuple[yaml.Node, yaml.Node]], where: str) -> bool:
        """YAML keeps the last of repeated keys without a word; in a policy that hides a mistake."""
        seen: set[str] = set()
        found = False
        for key_node, _ in items:
            if key_node.value in seen:
                self.add_error(key_node, _join(where, key_node.value), "repeated key")
                found = True
            seen.add(key_node.value)
        return found

    def value(self, tp: Any, node: yaml.Node, where: str) -> Any:
        markers: tuple[Any, ...] = ()
        if typing.get_origin(tp) is Annotated:
            tp, markers = tp.__origin__, tp.__metadata__
        value = self.bare(tp, markers, node, where)
        for check in (m.check for m in markers if isinstance(m, Check)):
            try:
                check(value)
            except ValueError as e:
                self.fail(node, where, str(e))
        return value

    def bare(self, tp: Any, markers: tuple[Any, ...], node: yaml.Node, where: str) -> Any:
        """TP's value from NODE, before any Check."""
        if tp in self.kinds:
            return self.kinds[tp](node, where)
        parse = next((m.parse for m in markers if isinstance(m, Parsed)), parse_size if tp is Bytes else None)
        if parse is not None:
            return self.parsed(parse, node, where)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if _is_null(node) and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.value(inner[0], node, where)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp, node, where, node)
        if origin is tuple and args[1:] == (Ellipsis,):
            return self.items(args[0], _NonEmpty in markers, node, where)
        if origin is dict:
            return self.mapping(args[1], node, where)
        return self.scalar(tp, markers, node, where)

    def items(self, tp: Any, non_empty: bool, node: yaml.Node, where: str) -> tuple[Any, ...]:
        """A list, or one item alone; every bad item is reported, then the whole is dropped."""
        items = [] if _is_null(node) else node.value if isinstance(node, yaml.SequenceNode) else [node]
        if non_empty and not items:  # an empty list would quietly match everything
            self.fail(node, where, "empty list: name at least one, or leave the key out")
        # An item that is a mapping is named by its position, as the paths of its keys' errors need
        # one; a scalar's column is enough.
        bare = tp.__origin__ if typing.get_origin(tp) is Annotated else tp
        indexed = dataclasses.is_dataclass(bare) or bare in self.kinds
        results, failed = [], False
        for i, item in enumerate(items):
            try:
                results.append(self.value(tp, item, f"{where}[{i}]" if indexed else where))
            except Invalid:
                failed = True
        if failed:
            raise Invalid
        return tuple(results)

    def mapping(self, tp: Any, node: yaml.Node, where: str) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, where, "expected a mapping")
        entries, failed = {}, self.repeated(node.value, where)
        for k, v in node.value:
            try:
                entries[str(k.value)] = self.value(tp, v, _join(where, str(k.value)))
            except Invalid:
                failed = True
        if failed:
            raise Invalid
        return entries

    def parsed(self, parse: Callable[[str], Any], node: yaml.Node, where: str) -> Any:
        text = self.text(node, where)
        try:
            return parse(text)
        except ValueError as e:
            self.fail(node, where, str(e))

    def text(self, node: yaml.Node, where: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, where, "expected a single value, not a list or mapping")
        return str(node.value)

    def scalar(self, tp: Any, markers: tuple[Any, ...], node: yaml.Node, where: str) -> Any:
        text = self.text(node, where)
        if typing.get_origin(tp) is Literal or (isinstance(tp, type) and issubclass(tp, StrEnum)):
            choices = typing.get_args(tp) or tuple(tp)  # Literal["a", "b"] (or of numbers), or the enum's members
            for choice in choices:
                if text == str(choice):
                    return choice
            noun = next((m.word for m in markers if isinstance(m, Noun)), "value")
            self.fail(node, where, f"unknown {noun} {text!r} (expected one of: {', '.join(map(str, choices))})")
        if tp is bool:
            if not node.tag.endswith(":bool"):
                self.fail(node, where, f"expected true or false, not {text!r}")
            return text.lower() in ("true", "yes", "on")
        if tp in (int, float):
            try:
                return tp(text)
            except ValueError:
                self.fail(node, where, f"expected a number, not {text!r}")
        if tp is str:
            return text
        raise TypeError(f"{where}: bumper cannot fill a {self.noun} of type {tp!r}")  # the dataclass's own mistake
