"""bumper/proxy/reclaim.py's decision: when a full collection and a heap trim are worth their pause
(the suite's test_memory_comes_back_after_the_close shows the memory coming back through the proxy)."""

from __future__ import annotations

from bumper.proxy.reclaim import Reclaim

MiB = 1 << 20


def test_collects_only_after_growth_and_follows_the_rss() -> None:
    readings = iter([100 * MiB, 120 * MiB, 90 * MiB, 125 * MiB, 200 * MiB, 180 * MiB, 190 * MiB, 215 * MiB, 150 * MiB])
    collections: list[int] = []
    reclaim = Reclaim(rss=lambda: next(readings), growth=32 * MiB)
    reclaim.trim = lambda: collections.append(reclaim.floor)
    reclaim.floor = reclaim.rss()  # 100: as at start
    reclaim.reclaim()  # 120: +20, not yet
    reclaim.reclaim()  # 90: the floor follows it down
    assert (collections, reclaim.floor) == ([], 90 * MiB)
    reclaim.reclaim()  # 125: +35 over 90, collected; 200 is what is left (still in use)
    assert (len(collections), reclaim.floor) == (1, 200 * MiB)
    reclaim.reclaim()  # 180
    reclaim.reclaim()  # 190: +10 over 180, in use memory is not collected again and again
    assert (len(collections), reclaim.floor) == (1, 180 * MiB)
    reclaim.reclaim()  # 215: +35, collected; 150 left
    assert (len(collections), reclaim.floor) == (2, 150 * MiB)
