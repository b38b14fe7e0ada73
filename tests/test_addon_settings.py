"""Addon settings and addon chains in policy files, without sockets: bumper.policy.binder fills a
dataclass (an addon's Settings, or the policy file's shape) from YAML and says FILE:LINE:COLUMN for
every problem; bumper.policy.load reads a bump rule's `addons:` (names, settings, on_error, timeout);
bumper.inspect.loading builds the registry."""

from __future__ import annotations

import ipaddress
import math
import re
import textwrap
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from bumper_addons.access_log import AccessLogSettings
from bumper_addons.block import BlockSettings
from bumper_addons.dlp import DlpSettings
from bumper_addons.headers import Edits, HeadersSettings
from bumper_addons.upload_limit import UploadLimitSettings

from bumper.addon import Addon, Bytes
from bumper.errors import ConfigError
from bumper.inspect.loading import load_registry
from bumper.policy import binder
from bumper.policy import rules as policy
from bumper.policy.binder import Check, HostPattern, Network, Noun, OneOrMore, PortRange, Problems
from bumper.policy.load import load as load_policy
from bumper.policy.rules import AddonSpec, OnError

FIXTURE_ADDONS = Path(__file__).with_name("addons_fixture")
SHIPPED = ("access_log", "block", "dlp", "headers", "upload_limit")


# binder.build on its own: a YAML node in, a dataclass or "LINE:COLUMN: where: message" lines out


@dataclass(frozen=True)
class Inner:
    host: str
    port: int = 443

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")


@dataclass(frozen=True)
class Every:
    name: str
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    size: Bytes = Bytes(1024)
    mode: Literal["fast", "careful"] = "fast"
    maybe: int | None = None
    tags: tuple[str, ...] = ()
    limits: dict[str, Bytes] = field(default_factory=dict)
    inner: Inner | None = None
    inners: tuple[Inner, ...] = ()


@dataclass(frozen=True)
class AllDefaults:
    size: Bytes = Bytes(10)
    names: tuple[str, ...] = ("a",)


@dataclass(frozen=True)
class Checked:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")


def build(cls: type[Any], text: str | None, **options: Any) -> tuple[Any, list[str]]:
    errors: list[str] = []

    def add_error(node: yaml.Node, where: str, message: str) -> None:
        mark = node.start_mark
        errors.append(f"{mark.line + 1}:{mark.column + 1}: {where}: {message}")

    node = None if text is None else yaml.compose(textwrap.dedent(text), Loader=yaml.SafeLoader)
    return binder.build(cls, node, "s", add_error, **options), errors


def test_every_field_type_is_filled_from_yaml() -> None:
    built, errors = build(
        Every,
        """
        name: probe
        count: 12
        ratio: 2
        enabled: yes
        size: 10m
        mode: careful
        maybe: 7
        tags: [a, b]
        limits: {"*.example.com": 512k, other.test: 2048}
        inner: {host: h.test}
        inners: [{host: a.test, port: 8443}, {host: b.test}]
        """,
    )
    assert errors == []
    assert built == Every(
        name="probe",
        count=12,
        ratio=2.0,
        enabled=True,
        size=Bytes(10 * 1024**2),
        mode="careful",
        maybe=7,
        tags=("a", "b"),
        limits={"*.example.com": Bytes(512 * 1024), "other.test": Bytes(2048)},
        inner=Inner("h.test"),
        inners=(Inner("a.test", 8443), Inner("b.test")),
    )
    assert type(built.ratio) is float and type(built.count) is int


@pytest.mark.parametrize("text", [None, "null", "~", ""], ids=["absent", "null", "tilde", "empty"])
def test_no_settings_means_every_default(text: str | None) -> None:
    assert build(AllDefaults, text) == (AllDefaults(), [])


def test_shorthands_a_scalar_for_a_tuple_and_null_for_an_optional() -> None:
    built, errors = build(Every, "name: 123\ntags: only\nmaybe: null\ninner: ~\n")
    assert errors == []
    assert (built.name, built.tags, built.maybe, built.inner) == ("123", ("only",), None, None)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("512k", 512 * 1024),
        ("10m", 10 * 1024**2),
        ("10M", 10 * 1024**2),
        ("1g", 1024**3),
        ("10 MiB", 10 * 1024**2),
        ("2KB", 2048),
    ],
)
def test_sizes(text: str, size: int) -> None:
    built, errors = build(Every, f"name: x\nsize: {text}\n")
    assert errors == [] and built.size == size


@pytest.mark.parametrize("text", ["1.5m", "-1", "10x", "m", "ten", "'10 m b x'", "[1]"])
def test_bad_sizes_are_reported_at_the_value(text: str) -> None:
    built, errors = build(Every, f"name: x\nsize: {text}\n")
    assert built is None
    if text.startswith("["):
        assert errors == ["2:7: s.size: expected a single value, not a list or mapping"]
    else:
        shown = text.strip("'")
        assert errors == [f"2:7: s.size: bad size {shown!r} (use bytes, or 512k, 10m, 1g)"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("count: 1.5", "2:8: s.count: expected a number, not '1.5'"),
        ("count: true", "2:8: s.count: expected a number, not 'true'"),
        ("count: [1]", "2:8: s.count: expected a single value, not a list or mapping"),
        ("ratio: fast", "2:8: s.ratio: expected a number, not 'fast'"),
        ("enabled: 1", "2:10: s.enabled: expected true or false, not '1'"),
        ("enabled: 'true'", "2:10: s.enabled: expected true or false, not 'true'"),
        ("mode: quick", "2:7: s.mode: unknown value 'quick' (expected one of: fast, careful)"),
        ("maybe: seven", "2:8: s.maybe: expected a number, not 'seven'"),
        ("tags: {a: 1}", "2:7: s.tags: expected a single value, not a list or mapping"),
        ("limits: [a]", "2:9: s.limits: expected a mapping"),
        ("limits: {a.test: lots}", "2:18: s.limits.a.test: bad size 'lots' (use bytes, or 512k, 10m, 1g)"),
        ("inner: h.test", "2:8: s.inner: expected a mapping of settings (host, port)"),
    ],
)
def test_a_bad_value_is_reported_at_its_line_and_column(line: str, error: str) -> None:
    assert build(Every, f"name: x\n{line}\n") == (None, [error])


def test_every_problem_is_reported_at_once() -> None:
    built, errors = build(
        Every,
        """
        count: many
        colour: red
        tags: [ok, [nested], {also: bad}]
        inner: {port: 80, scheme: https}
        """,
    )
    assert built is None
    assert errors == [
        "2:8: s.count: expected a number, not 'many'",
        "3:1: s.colour: unknown setting (expected one of: name, count, ratio, enabled, size, mode, maybe, tags, "
        "limits, inner, inners)",
        "4:12: s.tags: expected a single value, not a list or mapping",
        "4:22: s.tags: expected a single value, not a list or mapping",
        "5:19: s.inner.scheme: unknown setting (expected one of: host, port)",
        "5:8: s.inner.host: missing",
        "2:1: s.name: missing",
    ]


def test_a_missing_field_is_reported_at_the_mapping() -> None:
    assert build(Every, "\n\ncount: 3\n") == (None, ["3:1: s.name: missing"])


def test_post_init_errors_are_reported_at_their_mapping() -> None:
    assert build(Checked, "high: 3\nlow: 5\n") == (None, ["1:1: s: low (5) is above high (3)"])
    built, errors = build(Every, "name: x\ninners:\n  - {host: a.test}\n  - {host: b.test, port: 0}\n")
    assert built is None
    assert errors == ["4:5: s.inners[1]: port 0 is out of range"]


def test_errors_inside_nested_dataclasses_keep_their_position() -> None:
    built, errors = build(Every, "name: x\ninner:\n  host: h.test\n  port: high\n  path: /\n")
    assert built is None
    assert errors == [
        "4:9: s.inner.port: expected a number, not 'high'",
        "5:3: s.inner.path: unknown setting (expected one of: host, port)",
    ]


def test_a_required_field_with_a_bad_value_is_reported_once_not_also_as_missing() -> None:
    """`name: [a]` is there, only wrong: one error, at the value."""
    assert build(Every, "name: [a]\n") == (None, ["1:7: s.name: expected a single value, not a list or mapping"])
    assert build(Every, "name: x\ninner: {host: [a]}\n") == (
        None,
        ["2:15: s.inner.host: expected a single value, not a list or mapping"],
    )


def test_a_type_bumper_cannot_fill_is_the_addons_own_mistake() -> None:
    @dataclass(frozen=True)
    class Odd:
        items: list[str] = field(default_factory=list)

    assert build(Odd, None) == (Odd(), [])  # the default is fine
    with pytest.raises(TypeError, match=r"s\.items: bumper cannot fill a setting of type list\[str\]"):
        build(Odd, "items: a")


def test_every_bad_value_in_a_dict_setting_is_reported() -> None:
    """Like tuples, which report every bad item, and like the rest of the file."""
    built, errors = build(Every, "name: x\nlimits: {a.test: lots, b.test: heaps}\n")
    assert built is None
    assert errors == [
        "2:18: s.limits.a.test: bad size 'lots' (use bytes, or 512k, 10m, 1g)",
        "2:32: s.limits.b.test: bad size 'heaps' (use bytes, or 512k, 10m, 1g)",
    ]


# the kinds a policy file needs, on their own


class Colour(StrEnum):
    RED = "red"
    DARK_BLUE = "dark-blue"


@dataclass(frozen=True)
class PolicyKinds:
    colour: Annotated[Colour, Noun("colour")] = Colour.RED
    shade: Colour | None = None
    nets: OneOrMore[Network] = ()
    ports: OneOrMore[PortRange] = ()
    hosts: OneOrMore[HostPattern] = ()
    wait: Annotated[float, binder.seconds("wait", above=0, most=5)] = 1.0
    maybe: tuple[str, ...] = ("default",)


def test_policy_kinds_are_filled_from_yaml() -> None:
    built, errors = build(
        PolicyKinds,
        r"""
        colour: dark-blue
        shade: red
        nets: [10.1.0.0/16, 192.0.2.7, "2001:db8::/32", 10.2.3.4/8]
        ports: [443, 8000-8999, 65535]
        hosts: [Example.COM., "*.b.test", 'regex:(www|api)\.C\.test']
        wait: 5
        maybe:
        """,
    )
    assert errors == []
    assert built == PolicyKinds(
        colour=Colour.DARK_BLUE,
        shade=Colour.RED,
        nets=tuple(map(ipaddress.ip_network, ["10.1.0.0/16", "192.0.2.7/32", "2001:db8::/32", "10.0.0.0/8"])),
        ports=((443, 443), (8000, 8999), (65535, 65535)),
        hosts=("example.com", "*.b.test", r"regex:(www|api)\.C\.test"),  # a regex as written
        wait=5.0,
        maybe=(),  # null: the empty list
    )
    assert type(built.colour) is Colour


def test_one_item_alone_is_a_list_of_one() -> None:
    built, errors = build(PolicyKinds, "nets: 10.0.0.1\nports: 8000-8080\nhosts: a.test\n")
    assert errors == []
    assert built.nets == (ipaddress.ip_network("10.0.0.1/32"),)
    assert (built.ports, built.hosts) == (((8000, 8080),), ("a.test",))


CIDR_HINT = "(use 10.0.0.0/8, 2001:db8::/32 or one address)"
PORT_HINT = "(use 443 or a range such as 8000-8999)"
NAME_HINT = "(use example.com, *.example.com or regex:...)"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("colour: blue", "1:9: s.colour: unknown colour 'blue' (expected one of: red, dark-blue)"),
        ("colour: RED", "1:9: s.colour: unknown colour 'RED' (expected one of: red, dark-blue)"),
        ("shade: [red]", "1:8: s.shade: expected a single value, not a list or mapping"),
        ("shade: dark_blue", "1:8: s.shade: unknown value 'dark_blue' (expected one of: red, dark-blue)"),
        ("nets: [10.0.0.0/33]", f"1:8: s.nets: bad CIDR '10.0.0.0/33' {CIDR_HINT}"),
        ("nets: [office]", f"1:8: s.nets: bad CIDR 'office' {CIDR_HINT}"),
        ("nets: [[10.0.0.0/8]]", "1:8: s.nets: expected a single value, not a list or mapping"),
        ("ports: [0]", f"1:9: s.ports: bad port '0' {PORT_HINT}"),
        ("ports: [65536]", f"1:9: s.ports: bad port '65536' {PORT_HINT}"),
        ("ports: [9000-8000]", f"1:9: s.ports: bad port '9000-8000' {PORT_HINT}"),
        ("ports: [8000-]", f"1:9: s.ports: bad port '8000-' {PORT_HINT}"),
        ("ports: [https]", f"1:9: s.ports: bad port 'https' {PORT_HINT}"),
        ("hosts: ['bad*glob.test']", f"1:9: s.hosts: bad name, glob or regex 'bad*glob.test' {NAME_HINT}"),
        ("hosts: ['*']", f"1:9: s.hosts: bad name, glob or regex '*' {NAME_HINT}"),
        ("hosts: ['a..test']", f"1:9: s.hosts: bad name, glob or regex 'a..test' {NAME_HINT}"),
        ("hosts: ['regex:((']", f"1:9: s.hosts: bad name, glob or regex 'regex:((' {NAME_HINT}"),
        ("nets: []", "1:7: s.nets: empty list: name at least one, or leave the key out"),
        ("hosts: ~", "1:8: s.hosts: empty list: name at least one, or leave the key out"),
        ("wait: 0", "1:7: s.wait: bad wait '0' (seconds, more than 0, at most 5)"),
        ("wait: 5.5", "1:7: s.wait: bad wait '5.5' (seconds, more than 0, at most 5)"),
        ("wait: .inf", "1:7: s.wait: bad wait '.inf' (seconds, more than 0, at most 5)"),
        ("wait: {s: 1}", "1:7: s.wait: expected a single value, not a list or mapping"),
    ],
)
def test_a_bad_policy_kind_is_reported_at_its_value(line: str, error: str) -> None:
    assert build(PolicyKinds, line + "\n") == (None, [error])


def test_every_bad_item_of_a_list_is_reported() -> None:
    built, errors = build(PolicyKinds, 'nets: [10.0.0.0/8, 300.0.0.0/8, "::1", x]\nports: [443, 0]\n')
    assert built is None
    assert errors == [
        f"1:20: s.nets: bad CIDR '300.0.0.0/8' {CIDR_HINT}",
        f"1:40: s.nets: bad CIDR 'x' {CIDR_HINT}",
        f"2:14: s.ports: bad port '0' {PORT_HINT}",
    ]


def test_keys_are_named_by_the_callers_noun() -> None:
    assert build(Inner, "host: h\nhots: h\n", noun="key") == (
        None,
        ["2:1: s.hots: unknown key (expected one of: host, port)"],
    )
    assert build(Inner, "[h]", noun="key") == (None, ["1:1: s: expected a mapping of keys (host, port)"])


def _even(n: int) -> None:
    if n % 2:
        raise ValueError(f"{n} is odd")


@dataclass(frozen=True)
class Window:
    low: Annotated[int, Check(_even)] = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise Problems({"low": f"above high ({self.high})", "high": f"below low ({self.low})"})


def test_checks_report_at_the_value_and_problems_at_their_keys() -> None:
    assert build(Window, "low: 3\nhigh: x\n") == (
        None,
        ["1:6: s.low: 3 is odd", "2:7: s.high: expected a number, not 'x'"],
    )
    assert build(Window, "high: 2\nlow: 4\n") == (None, ["2:6: s.low: above high (2)", "1:7: s.high: below low (4)"])
    assert build(Window, "\nhigh: -2\n") == (None, ["2:1: s.low: above high (-2)", "2:7: s.high: below low (0)"])


@dataclass(frozen=True)
class Tag:
    text: str


@dataclass(frozen=True)
class Tagged:
    tags: tuple[Tag, ...] = ()


def test_a_callers_own_kind_binds_its_nodes_and_its_items_are_numbered() -> None:
    seen: list[str] = []

    def tag(node: yaml.Node, where: str) -> Tag:
        if not isinstance(node, yaml.ScalarNode) or not str(node.value).startswith("#"):
            seen.append(f"{node.start_mark.line + 1}:{node.start_mark.column + 1}: {where}: not a #tag")
            raise binder.Invalid
        return Tag(str(node.value))

    assert build(Tagged, "tags: ['#a', '#b']", kinds={Tag: tag}) == (Tagged((Tag("#a"), Tag("#b"))), [])
    assert build(Tagged, "tags: ['#a', b, [c]]", kinds={Tag: tag}) == (None, [])
    assert seen == ["1:14: s.tags[1]: not a #tag", "1:17: s.tags[2]: not a #tag"]


# policy.load: a bump rule's `addons:`


class Observer(Addon):
    name = "observer"

    @dataclass(frozen=True)
    class Settings:
        label: str = "seen"
        sample: float = 1.0


class Blocker(Addon):
    name = "blocker"
    blocks = True


class Needy(Addon):
    """An addon with a required setting."""

    name = "needy"

    @dataclass(frozen=True)
    class Settings:
        target: str
        limit: Bytes = Bytes(100)


class Sometimes(Addon):
    """Blocks (and so fails closed by default) only when its settings say so."""

    name = "sometimes"

    @dataclass(frozen=True)
    class Settings:
        enforce: bool = False

    @classmethod
    def blocks_with(cls, settings: Any) -> bool:
        return bool(settings.enforce)


class Strict(Addon):
    """An addon whose defaults fail its own check: naming it without settings is an error."""

    name = "strict"

    @dataclass(frozen=True)
    class Settings:
        ratio: float = 0.0

        def __post_init__(self) -> None:
            if not self.ratio > 0:
                raise ValueError("ratio must be above 0")


TEST_ADDONS: dict[str, type[Addon]] = {c.name: c for c in (Observer, Blocker, Needy, Sometimes, Strict)}


def load(tmp_path: Path, text: str, addons: dict[str, type[Addon]] | None = None) -> policy.Policy:
    path = tmp_path / "policy.yaml"
    text = textwrap.dedent(text)
    path.write_text(text + ("" if "default:" in text else "\ndefault: bump\n"))  # last: lines keep their numbers
    return load_policy(path, TEST_ADDONS if addons is None else addons)


def errors_of(tmp_path: Path, text: str, addons: dict[str, type[Addon]] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, addons)
    prefix = f"{tmp_path / 'policy.yaml'}:"
    lines = str(e.value).splitlines()
    assert all(line.startswith(prefix) for line in lines), lines
    return [line.removeprefix(prefix) for line in lines]


def chain(tmp_path: Path, entries: str, addons: dict[str, type[Addon]] | None = None) -> tuple[AddonSpec, ...]:
    """The chain of a one-rule policy whose `addons:` list is ENTRIES (YAML, indented for the list)."""
    text = "rules:\n  - name: r\n    action: bump\n    addons:\n" + textwrap.indent(textwrap.dedent(entries), "      ")
    return load(tmp_path, text, addons).rules[0].addons


def test_a_chain_keeps_its_order_settings_and_bumpers_keys(tmp_path: Path) -> None:
    assert chain(
        tmp_path,
        """
        - observer
        - blocker
        - observer: {label: second, on_error: fail-closed, timeout: 0.25}
        - needy: {target: t.test, limit: 2k}
        - sometimes: {enforce: true}
        - sometimes:
        """,
    ) == (
        AddonSpec("observer", Observer.Settings(), OnError.FAIL_OPEN, 1.0),
        AddonSpec("blocker", Blocker.Settings(), OnError.FAIL_CLOSED, 1.0),
        AddonSpec("observer", Observer.Settings(label="second"), OnError.FAIL_CLOSED, 0.25),
        AddonSpec("needy", Needy.Settings("t.test", Bytes(2048)), OnError.FAIL_OPEN, 1.0),
        AddonSpec("sometimes", Sometimes.Settings(enforce=True), OnError.FAIL_CLOSED, 1.0),
        AddonSpec("sometimes", Sometimes.Settings(), OnError.FAIL_OPEN, 1.0),
    )


def test_the_decision_carries_the_matching_rules_chain(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        rules:
          - name: watched
            match: {sni: ["*.watched.test"]}
            action: bump
            addons: [observer, blocker]
          - name: bank
            match: {sni: [bank.test]}
            action: splice
        """,
    )
    watched = loaded.decide("www.watched.test", "www.watched.test")
    assert watched.rule == "watched" and [s.name for s in watched.addons] == ["observer", "blocker"]
    assert loaded.decide("bank.test", "bank.test").addons == ()
    assert loaded.decide("other.test", "other.test").addons == ()


def test_every_shipped_addon_with_its_settings(tmp_path: Path) -> None:
    rules = chain(
        tmp_path,
        """
        - access_log: {path: ACCESS_LOG}
        - block: {domains: ["*.ads.test", evil.test], urls: ["shop.test/admin/*"], reason: not here}
        - dlp: {detect: [card, jwt], custom: {ticket: "TCK-[0-9]{6}"}, max_body: 2m, timeout: 5}
        - headers:
            request: {set: {x-proxy: bumper}, remove: [x-debug]}
            response: {add: {x-inspected: "yes"}}
            keep_authorization_for: ["*.corp.test"]
        - upload_limit: {max_bytes: 10m, hosts: {"*.files.test": 1g}, on_error: fail-open}
        """.replace("ACCESS_LOG", str(tmp_path / "access.jsonl")),
        load_registry(),
    )
    assert rules == (
        AddonSpec("access_log", AccessLogSettings(str(tmp_path / "access.jsonl")), OnError.FAIL_OPEN, 1.0),
        AddonSpec(
            "block",
            BlockSettings(domains=("*.ads.test", "evil.test"), urls=("shop.test/admin/*",), reason="not here"),
            OnError.FAIL_CLOSED,
            1.0,
        ),
        AddonSpec(
            "dlp",
            DlpSettings(detect=("card", "jwt"), custom={"ticket": "TCK-[0-9]{6}"}, max_body=Bytes(2 * 1024**2)),
            OnError.FAIL_OPEN,
            5.0,
        ),
        AddonSpec(
            "headers",
            HeadersSettings(
                request=Edits(set={"x-proxy": "bumper"}, remove=("x-debug",)),
                response=Edits(add={"x-inspected": "yes"}),
                keep_authorization_for=("*.corp.test",),
            ),
            OnError.FAIL_OPEN,
            1.0,
        ),
        AddonSpec(
            "upload_limit",
            UploadLimitSettings(max_bytes=Bytes(10 * 1024**2), hosts={"*.files.test": Bytes(1024**3)}),
            OnError.FAIL_OPEN,
            1.0,
        ),
    )


@pytest.mark.parametrize(
    ("entry", "on_error"),
    [
        ("block", "fail-closed"),
        ("upload_limit", "fail-closed"),
        ("dlp", "fail-open"),  # action: alert, the default, only observes
        ("dlp: {action: alert}", "fail-open"),
        ("dlp: {action: block}", "fail-closed"),
        ("dlp: {action: redact}", "fail-closed"),  # failing open would let the secret through
        ("dlp: {over_cap: block}", "fail-closed"),
        ("headers", "fail-open"),
        ("access_log", "fail-open"),
        ("block: {on_error: fail-open}", "fail-open"),
        ("dlp: {action: block, on_error: fail-open}", "fail-open"),
        ("headers: {on_error: fail-closed}", "fail-closed"),
    ],
)
def test_blocking_addons_fail_closed_by_default_and_observers_open(tmp_path: Path, entry: str, on_error: str) -> None:
    (spec,) = chain(tmp_path, f"- {entry}\n", load_registry())
    assert spec.on_error == on_error


def test_the_fixture_addons_defaults(tmp_path: Path) -> None:
    registry = load_registry([FIXTURE_ADDONS])
    specs = chain(tmp_path, "- stopper\n- resp_refuser\n- tagger: {tag: t}\n- boom\n- slow_async\n", registry)
    assert [s.on_error for s in specs] == ["fail-closed", "fail-closed", "fail-open", "fail-open", "fail-open"]


def test_unknown_addons_and_settings_are_reported_with_line_and_column(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        rules:
          - name: r
            action: bump
            addons:
              - observer: {label: x, colour: red}
              - nope
              - needy: {limit: lots}
              - blocker: {anything: 1}
        """,
    )
    known = "blocker, needy, observer, sometimes, strict"
    assert errors == [
        "6:30: rules[0].addons[0].observer.colour: unknown setting (expected one of: label, sample)",
        f"7:9: rules[0].addons[1]: unknown addon 'nope' (known: {known})",
        "8:24: rules[0].addons[2].needy.limit: bad size 'lots' (use bytes, or 512k, 10m, 1g)",
        "8:9: rules[0].addons[2].needy.target: missing",
        "9:19: rules[0].addons[3].blocker.anything: unknown setting (expected none)",
    ]


def test_unknown_addon_lists_the_real_registry(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons: [blokc]\n", load_registry())
    assert errors == [f"3:14: rules[0].addons[0]: unknown addon 'blokc' (known: {', '.join(SHIPPED)})"]


def test_shipped_addons_settings_errors(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        """
        rules:
          - action: bump
            addons:
              - block: {domains: ["bad*glob.test"]}
              - dlp: {action: shout, detect: [card, ssn]}
              - dlp: {custom: {t: "(["}}
              - dlp: {custom: {card: "[0-9]+"}}
              - headers: {request: {set: {"bad header": x}}}
              - upload_limit: {hosts: {"*.a.test": 1q}}
        """,
        load_registry(),
    )
    assert errors == [
        "5:9: rules[0].addons[0].block: bad name, glob or regex 'bad*glob.test' "
        "(use example.com, *.example.com or regex:...)",
        "6:23: rules[0].addons[1].dlp.action: unknown value 'shout' (expected one of: alert, block, redact)",
        "6:45: rules[0].addons[1].dlp.detect: unknown value 'ssn' (expected one of: card, aws_key, private_key, jwt)",
        "7:9: rules[0].addons[2].dlp: custom pattern 't': bad regex: unterminated character set at position 1",
        "8:9: rules[0].addons[3].dlp: custom pattern 'card' has the name of a built-in one",
        "9:28: rules[0].addons[4].headers.request: bad header name 'bad header'",
        "10:44: rules[0].addons[5].upload_limit.hosts.*.a.test: bad size '1q' (use bytes, or 512k, 10m, 1g)",
    ]


def test_post_init_errors_are_reported_at_the_addons_name(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons:\n      - strict: {ratio: -1}\n")
    assert errors == ["4:9: rules[0].addons[0].strict: ratio must be above 0"]


def test_an_addon_named_bare_with_a_required_setting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """`- needy` alone gives no settings: the missing one is reported at the name, as for `- needy: {}`."""
    assert errors_of(tmp_path, "rules:\n  - action: bump\n    addons:\n      - needy: {}\n") == [
        "4:9: rules[0].addons[0].needy.target: missing"
    ]
    assert errors_of(tmp_path, "rules:\n  - action: bump\n    addons:\n      - needy\n") == [
        "4:9: rules[0].addons[0].needy.target: missing"
    ]


def test_an_addon_named_bare_whose_defaults_fail_its_check_is_an_error_not_a_crash(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "rules:\n  - action: bump\n    addons: [strict]\n") == [
        "3:14: rules[0].addons[0].strict: ratio must be above 0"
    ]


@pytest.mark.parametrize("action", ["splice", "block"])
def test_addons_only_on_bump_rules(tmp_path: Path, action: str) -> None:
    errors = errors_of(tmp_path, f"rules:\n  - name: r\n    action: {action}\n    addons: [observer]\n")
    assert errors == [f"4:13: rules[0].addons: addons run on decrypted traffic only; this rule's action is {action}"]


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("observer: {on_error: maybe}", "5:30: rules[0].addons[0].observer.on_error: unknown value 'maybe' "
         "(expected one of: fail-open, fail-closed)"),
        ("observer: {timeout: 0}", "5:29: rules[0].addons[0].observer.timeout: bad timeout '0' "
         "(seconds, more than 0, at most 60)"),
        ("observer: {timeout: -1}", "5:29: rules[0].addons[0].observer.timeout: bad timeout '-1' "
         "(seconds, more than 0, at most 60)"),
        ("observer: {timeout: 61}", "5:29: rules[0].addons[0].observer.timeout: bad timeout '61' "
         "(seconds, more than 0, at most 60)"),
        ("observer: {timeout: soon}", "5:29: rules[0].addons[0].observer.timeout: bad timeout 'soon' "
         "(seconds, more than 0, at most 60)"),
        ("observer: {timeout: .nan}", "5:29: rules[0].addons[0].observer.timeout: bad timeout '.nan' "
         "(seconds, more than 0, at most 60)"),
        ("observer: {label: a, label: b}", "5:30: rules[0].addons[0].observer.label: repeated key"),
        ("{observer: {}, blocker: {}}", "5:9: rules[0].addons[0]: expected an addon name, or one name mapped to "
         "its settings"),
        ("[observer]", "5:9: rules[0].addons[0]: expected an addon name, or one name mapped to its settings"),
        ("observer: [label, x]", "5:19: rules[0].addons[0].observer: expected a mapping of settings (label, sample)"),
    ],
)  # fmt: skip
def test_bad_addon_entries(tmp_path: Path, entry: str, error: str) -> None:
    errors = errors_of(tmp_path, f"rules:\n  - name: r\n    action: bump\n    addons:\n      - {entry}\n")
    assert len(errors) == 1 and errors[0].startswith(error), errors


def test_a_timeout_that_is_not_a_scalar_is_reported_in_the_policys_terms(tmp_path: Path) -> None:
    """Not with PyYAML's node objects (`[ScalarNode(tag='tag:yaml.org,2002:int', value='1')]`)."""
    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons:\n      - observer: {timeout: [1]}\n")
    assert len(errors) == 1 and errors[0].startswith("4:29: rules[0].addons[0].observer.timeout: "), errors
    assert "Node(" not in errors[0], errors


def test_timeouts_within_bounds(tmp_path: Path) -> None:
    specs = chain(tmp_path, "- observer: {timeout: 60}\n- observer: {timeout: 0.05}\n- observer: {timeout: 2}\n")
    assert [s.timeout for s in specs] == [60.0, 0.05, 2.0]
    assert all(not math.isnan(s.timeout) for s in specs)


def test_an_empty_chain_is_an_error(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons: []\n")
    assert errors == ["3:13: rules[0].addons: empty list: name at least one, or leave the key out"]


def test_without_a_registry_every_addon_is_unknown(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons: [block]\n", {})
    assert errors == ["3:14: rules[0].addons[0]: unknown addon 'block' (known: none loaded)"]


def test_a_repeated_key_deep_in_settings_is_an_error(tmp_path: Path) -> None:
    """YAML keeps the last of repeated keys without a word; bumper reports it at the top of an
    addon's settings, and must deeper down as well (a nested dataclass, a dict setting)."""
    errors = errors_of(
        tmp_path,
        """
        rules:
          - action: bump
            addons:
              - headers: {request: {set: {x-a: "1"}, set: {x-b: "2"}}}
              - upload_limit: {hosts: {a.test: 1m, a.test: 1g}}
        """,
        load_registry(),
    )
    assert errors == [
        "5:46: rules[0].addons[0].headers.request.set: repeated key",
        "6:44: rules[0].addons[1].upload_limit.hosts.a.test: repeated key",
    ]


# the registry


def write_module(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


ADDON_MODULE = """
    from bumper.addon import Addon

    class {cls}(Addon):
        name = "{name}"
"""


def test_the_registry_has_the_shipped_addons_and_those_of_each_dir(tmp_path: Path) -> None:
    assert sorted(load_registry()) == list(SHIPPED)
    write_module(tmp_path / "more", "extra.py", ADDON_MODULE.format(cls="Extra", name="extra"))
    registry = load_registry([FIXTURE_ADDONS, tmp_path / "more"])
    fixture = ("boom", "recorder", "resp_refuser", "slow_async", "slow_sync", "stopper", "tagger", "ws_sizes")
    assert sorted(registry) == sorted((*SHIPPED, *fixture, "extra"))
    assert all(issubclass(cls, Addon) and cls.name == name for name, cls in registry.items())


def test_a_module_contributes_only_the_addons_it_defines(tmp_path: Path) -> None:
    """An Addon class imported from elsewhere (the base, a shipped one) is not registered again."""
    write_module(
        tmp_path / "d",
        "reuse.py",
        """
        from bumper.addon import Addon
        from bumper_addons.block import Block

        class Mine(Addon):
            name = "mine"
        """,
    )
    assert sorted(load_registry([tmp_path / "d"])) == sorted((*SHIPPED, "mine"))


@pytest.mark.parametrize(
    ("files", "error"),  # ERROR: a regular expression for the start of the message
    [
        ({"a.py": ADDON_MODULE.format(cls="A", name="block")}, "{d}/a.py: addon name 'block' is already taken by "
         "bumper_addons.block"),
        ({"a.py": ADDON_MODULE.format(cls="A", name="twin"), "b.py": ADDON_MODULE.format(cls="B", name="twin")},
         "{d}/b.py: addon name 'twin' is already taken by bumper_user_addons.a"),
        ({"a.py": "from bumper.addon import Addon\n\nclass Nameless(Addon):\n    pass\n"},
         "{d}/a.py: addon class Nameless has no `name`"),
        ({"a.py": "def broken(:\n"}, "--addons: {d}/a.py:1: cannot load: SyntaxError: "),
        ({"a.py": "import bumper_no_such_module\n"}, "--addons: {d}/a.py: cannot load: ModuleNotFoundError: "
         "No module named 'bumper_no_such_module'"),
        ({"a.py": "raise RuntimeError('not today')\n"}, "--addons: {d}/a.py: cannot load: RuntimeError: not today"),
        ({"a.py": "from bumper.addon import Addon\n\nclass Bad(Addon):\n    name = 'bad'\n"
                  "    async def request_data(self, flow, chunk):\n        return chunk\n"},
         "{d}/a.py: bad: request_data.* must be plain functions, not async"),
    ],
    ids=["taken-by-shipped", "twice-in-dir", "no-name", "syntax-error", "import-error", "raises", "async-data-hook"],
)  # fmt: skip
def test_registry_errors_are_one_line(tmp_path: Path, files: dict[str, str], error: str) -> None:
    directory = tmp_path / "d"
    for name, text in files.items():
        write_module(directory, name, text)
    with pytest.raises(ConfigError) as e:
        load_registry([directory])
    message = str(e.value)
    assert "\n" not in message and re.match(error.format(d=re.escape(str(directory))), message), message


def test_an_addons_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^--addons {tmp_path / 'missing'}: not a directory$"):
        load_registry([tmp_path / "missing"])
    (tmp_path / "file.py").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        load_registry([tmp_path / "file.py"])


def test_the_worker_number_is_filled_in_by_bumper_never_by_a_policy(tmp_path: Path) -> None:
    """access_log's `"worker": N` (--workers) comes from the process that runs it, for --access-log
    and a rule's access_log alike (the runner fills it in); a policy file cannot set it."""
    from bumper.inspect.chain import AddonRunner
    from bumper.proxy.eventlog import ConnectionLog
    from bumper.proxy.state import ConnectionStates

    errors = errors_of(tmp_path, "rules:\n  - action: bump\n    addons: [access_log: {worker: 3}]\n", load_registry())
    assert errors == [
        "3:27: rules[0].addons[0].access_log.worker: unknown setting (expected one of: path, log_secrets)"
    ]
    spec = AddonSpec("access_log", AccessLogSettings(path=str(tmp_path / "access.jsonl")))
    lone, second = (
        AddonRunner(load_registry(), ConnectionLog(ConnectionStates()), (), n)._instance(spec) for n in (None, 2)
    )
    assert lone.settings.worker is None and second.settings.worker == 2
    assert spec.settings.worker is None  # the spec stays as the policy and the command line made it
