"""The overload manager's decisions (bumper.proxy.overload), as plain functions, and its estimate of
what a connection holds over mitmproxy's layer objects: no sockets."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import h2.config
import pytest
from mitmproxy import connection, options
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection, SendH2Data

from bumper.proxy.overload import (
    Action,
    below_start,
    cgroup_limit,
    decide,
    default_budget,
    held_by,
    parse_budget,
    victims,
)

MiB = 1 << 20
BUDGET = 1000 * MiB
NONE: frozenset[Action] = frozenset()
ALL = frozenset(Action)


@pytest.mark.parametrize(
    ("share", "expected"),
    [
        (0.5, NONE),
        (0.79, NONE),
        (0.80, {Action.STOP_ACCEPTING}),
        (0.90, {Action.STOP_ACCEPTING, Action.SHRINK}),
        (0.95, ALL),
        (1.50, ALL),
    ],
)
def test_each_step_is_entered_at_its_share(share: float, expected: set[Action]) -> None:
    assert decide(int(share * BUDGET), BUDGET, NONE) == expected


def test_a_step_is_left_only_five_percent_under_where_it_was_entered() -> None:
    assert decide(int(0.93 * BUDGET), BUDGET, ALL) == ALL  # under 95%, over 90%: reset stays
    assert decide(int(0.89 * BUDGET), BUDGET, ALL) == {Action.STOP_ACCEPTING, Action.SHRINK}
    assert decide(int(0.76 * BUDGET), BUDGET, ALL) == {Action.STOP_ACCEPTING}
    assert decide(int(0.74 * BUDGET), BUDGET, ALL) == NONE


def test_hovering_at_a_threshold_does_not_flap() -> None:
    active = NONE
    seen = []
    for share in (0.80, 0.79, 0.80, 0.78, 0.81, 0.76):
        active = decide(int(share * BUDGET), BUDGET, active)
        seen.append(Action.STOP_ACCEPTING in active)
    assert seen == [True] * 6


def test_no_budget_no_action() -> None:
    assert decide(10**12, 0, ALL) == NONE


def test_the_largest_connections_are_reset_until_they_cover_the_excess() -> None:
    held = [("small", MiB), ("big", 40 * MiB), ("mid", 8 * MiB), ("tiny", 1000)]
    assert victims(held, 30 * MiB) == ["big"]
    assert victims(held, 45 * MiB) == ["big", "mid"]
    assert victims(held, 100 * MiB) == ["big", "mid", "small"]  # never one holding next to nothing


def test_at_least_one_is_reset_when_one_holds_enough() -> None:
    assert victims([("a", 2 * MiB)], 0) == ["a"]
    assert victims([("a", 1000)], 10 * MiB) == []
    assert victims([], 10 * MiB) == []


V2 = "0::/system.slice/bumper.service\n"
V1 = "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n"


def reader(contents: dict[str, str]) -> Callable[[str], str | None]:
    """What read() finds under /sys/fs/cgroup: CONTENTS by path, None elsewhere."""
    return contents.get


def test_cgroup_v2_memory_max() -> None:
    read = reader({"/sys/fs/cgroup/system.slice/bumper.service/memory.max": "536870912\n"})
    assert cgroup_limit(V2, read) == 512 * MiB


def test_cgroup_v2_without_a_limit() -> None:
    assert cgroup_limit(V2, reader({"/sys/fs/cgroup/system.slice/bumper.service/memory.max": "max\n"})) is None


def test_cgroup_v2_at_the_root_of_a_container() -> None:
    assert cgroup_limit("0::/\n", reader({"/sys/fs/cgroup/memory.max": "268435456\n"})) == 256 * MiB


def test_cgroup_v1_limit_and_its_huge_no_limit() -> None:
    path = "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"
    assert cgroup_limit(V1, reader({path: "1073741824\n"})) == 1024 * MiB
    assert cgroup_limit(V1, reader({path: "9223372036854771712\n"})) is None


def test_cgroup_v1_seen_from_inside_the_container() -> None:
    assert cgroup_limit(V1, reader({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "104857600"})) == 100 * MiB


MEMINFO = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n"


def test_the_default_is_half_the_cgroup_limit_else_half_the_machine() -> None:
    read = reader({"/sys/fs/cgroup/system.slice/bumper.service/memory.max": "536870912\n"})
    assert default_budget(V2, MEMINFO, read) == (256 * MiB, "half the cgroup's memory limit of 512 MiB")
    assert default_budget(V2, MEMINFO, reader({})) == (12288000 * 1024, "half the machine's 24000 MiB")


@pytest.mark.parametrize(("text", "expected"), [("512MiB", 512 * MiB), ("2g", 2048 * MiB), ("off", 0), ("0", 0)])
def test_budget_sizes(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1m", "12 parsecs", ""])
def test_bad_budget_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_budget(text)


def test_a_budget_bumper_is_past_at_start() -> None:
    assert below_start(100 * MiB, 80 * MiB)
    assert not below_start(200 * MiB, 80 * MiB)
    assert not below_start(0, 80 * MiB)  # no budget


def test_what_a_connection_holds_is_found_in_its_layers() -> None:
    """held_by, over mitmproxy's own layer objects: a body being buffered, an HTTP/2 stream's data
    waiting for the peer's window, a WebSocket message being assembled, each found under wrappers."""
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    context = Context(client, options.Options())
    stream = HttpStream(context, 1)
    stream.request_body_buf += b"b" * 1000
    h2_conn = BufferedH2Connection(h2.config.H2Configuration(client_side=False))
    h2_conn.stream_buffers[1].append(SendH2Data(b"h" * 500, False))
    ws = SimpleNamespace(client_ws=SimpleNamespace(frame_buf=[b"w" * 300, bytearray(b"w" * 20)]), server_ws=None)
    stream.child_layer = ws  # type: ignore[assignment]
    top = SimpleNamespace(child=SimpleNamespace(layer=SimpleNamespace(h2_conn=h2_conn, streams={1: stream})))
    assert held_by(SimpleNamespace(layer=top, transports={})) == 1000 + 500 + 320
