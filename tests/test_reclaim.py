"""bumper/proxy/reclaim.py's decision: when a full collection and a heap trim are worth their pause
(test_hostile_peers.py's test_memory_comes_back_after_the_close shows the memory coming back through
the proxy)."""

from __future__ import annotations

from bumper.proxy.reclaim import Reclaim, allowed_after, due

MiB = 1 << 20


def test_due_after_a_close_well_over_the_floor_when_the_last_collection_allows() -> None:
    assert due(200 * MiB, 100 * MiB, closed=True, now=10.0, allowed_at=10.0)
    assert not due(200 * MiB, 100 * MiB, closed=False, now=10.0, allowed_at=10.0)  # nothing became garbage
    assert not due(120 * MiB, 100 * MiB, closed=True, now=10.0, allowed_at=10.0)  # not worth the pause
    assert not due(200 * MiB, 100 * MiB, closed=True, now=9.0, allowed_at=10.0)  # too soon after the last


def test_collections_take_at_most_a_hundredth_of_the_time() -> None:
    assert allowed_after(100.0, took=0.002) == 105.0  # a quick one: the interval
    assert allowed_after(100.0, took=0.5) == 150.0  # a slow one (a million objects): 100 times its pause


def test_the_floor_follows_the_rss_down_and_the_memory_left_after_a_collection() -> None:
    readings = iter([100, 90, 200, 150, 170, 120])
    clock = iter([0.0, 5.0, 10.0, 10.0, 15.0, 20.0])
    trims: list[int] = []
    reclaim = Reclaim(rss=lambda: next(readings) * MiB, clock=lambda: next(clock), growth=32 * MiB)
    reclaim.trim = lambda: trims.append(1)
    reclaim.reclaim()  # 100 at 0 s, no close: the floor is 100
    reclaim.reclaim()  # 90: it follows down
    assert (trims, reclaim.floor) == ([], 90 * MiB)
    reclaim.closed = True
    reclaim.reclaim()  # 200 at 10 s, a close: collected, 150 left (still in use), the floor stays 90
    assert (trims, reclaim.floor, reclaim.closed, reclaim.allowed_at) == ([1], 90 * MiB, False, 15.0)
    reclaim.reclaim()  # 170 at 15 s: no close since
    reclaim.closed = True
    reclaim.reclaim()  # 120 at 20 s: a close, but only 30 MiB over the floor
    assert trims == [1]
