"""An addon's settings dataclass, filled from its YAML mapping in a policy file and checked on the way:
every problem is reported against the YAML node it came from, so `bumper policy check` can say
FILE:LINE:COLUMN for it.

Field types understood: str, int, float, bool, Bytes (a size: 1048576, "512k", "10m", "1g"),
Literal[...], X | None, tuple[X, ...], dict[str, X] and nested dataclasses. A dataclass's own
__post_init__ may raise ValueError to reject a value; its message is reported at the mapping.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, NewType

import yaml

# A size in bytes; the policy also takes "512k", "10m", "1g".
Bytes = NewType("Bytes", int)
AddError = Callable[[yaml.Node, str, str], None]
_SIZE = re.compile(r"(\d+)\s*([kmg]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


_START = yaml.ScalarNode("tag:yaml.org,2002:null", "", start_mark=yaml.Mark("", 0, 0, 0, "", 0))


class _Invalid(Exception):
    """A value already reported; the caller drops it."""


def parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (use bytes, or 512k, 10m, 1g)")
    return int(m[1]) * _UNITS[m[2].lower()]


def build(
    cls: type[Any], node: yaml.Node | None, where: str, add_error: AddError, at: yaml.Node | None = None
) -> Any | None:
    """An instance of dataclass CLS from NODE (None: every field's default), or None when NODE is
    invalid. Problems without a node of their own (a missing setting) are reported AT."""
    try:
        return _dataclass(cls, node, where, add_error, at or _START)
    except _Invalid:
        return None


def _dataclass(cls: type[Any], node: yaml.Node | None, where: str, add_error: AddError, at: yaml.Node) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    items: list[tuple[yaml.Node, yaml.Node]] = []
    if node is not None and not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        if not isinstance(node, yaml.MappingNode):
            add_error(node, where, f"expected a mapping of settings ({', '.join(fields) or 'none'})")
            raise _Invalid
        items = node.value
    values: dict[str, Any] = {}
    seen: set[str] = set()
    failed = _repeated(items, where, add_error)
    for key_node, value in items:
        key = str(key_node.value)
        seen.add(key)
        if key not in fields:
            known = ", ".join(fields) or "this addon has no settings"
            add_error(key_node, f"{where}.{key}", f"unknown setting (expected one of: {known})")
            failed = True
            continue
        try:
            values[key] = _value(hints[key], value, f"{where}.{key}", add_error)
        except _Invalid:
            failed = True
    for name, f in fields.items():
        if name not in seen and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            add_error(node or at, f"{where}.{name}", "missing")
            failed = True
    if failed:
        raise _Invalid
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        add_error(node or at, where, str(e))
        raise _Invalid from None


def _repeated(items: list[tuple[yaml.Node, yaml.Node]], where: str, add_error: AddError) -> bool:
    """YAML keeps the last of repeated keys without a word; in a policy that hides a mistake."""
    seen: set[str] = set()
    found = False
    for key_node, _ in items:
        if key_node.value in seen:
            add_error(key_node, f"{where}.{key_node.value}", "repeated key")
            found = True
        seen.add(key_node.value)
    return found


def _value(tp: Any, node: yaml.Node, where: str, add_error: AddError) -> Any:
    def fail(message: str) -> typing.NoReturn:
        add_error(node, where, message)
        raise _Invalid

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, node, where, add_error)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, node, where, add_error, node)  # type: ignore[arg-type]
    if origin is tuple:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        results, failed = [], False
        for item in items:
            try:
                results.append(_value(args[0], item, where, add_error))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid
        return tuple(results)
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            fail("expected a mapping")
        entries, failed = {}, _repeated(node.value, where, add_error)
        for k, v in node.value:
            try:
                entries[str(k.value)] = _value(args[1], v, f"{where}.{k.value}", add_error)
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid
        return entries
    if not isinstance(node, yaml.ScalarNode):
        fail("expected a single value, not a list or mapping")
    text, tag = str(node.value), node.tag
    if origin is Literal:
        for choice in args:  # Literal["a", "b"], or of numbers: Literal[1, 2]
            if text == str(choice):
                return choice
        fail(f"{text!r} is not one of: {', '.join(map(str, args))}")
    if tp is Bytes:
        try:
            return parse_size(text)
        except ValueError as e:
            fail(str(e))
    if tp is bool:
        if not tag.endswith(":bool"):
            fail(f"expected true or false, not {text!r}")
        return text.lower() in ("true", "yes", "on")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            fail(f"expected a number, not {text!r}")
    if tp is str:
        return text
    raise TypeError(f"{where}: bumper cannot fill a setting of type {tp!r}")  # the addon's own mistake
