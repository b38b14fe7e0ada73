"""The hostile-peer suite (issue 22): each case of the issue's table against a bumper of its own,
started through its CLI with the default settings, beside a good client (tests/hostile_peers.py
measures; docs/limits.md shows the table and what each target means).

`./test` runs the bounded subset: the cases bumper already meets the targets on, at sizes that keep
the whole under two minutes, with a short settle. `make hostile` (BUMPER_HOSTILE_FULL=1) runs every
case at the issue's sizes with the 30 s settle, and writes the table to BUMPER_HOSTILE_TABLE (default:
bench/results/hostile-<UTC time>.md); a case that misses a target fails there, and the table says by
how much.

Targets: the peak at most +64 MiB over the baseline, within 64 MiB of it after the close, the good
client's p99 under 1 s with none of its requests failing, and no traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import hostile_peers
from tests.conftest import Bumper, Pki, Upstream
from tests.hostile_peers import CASES, HEADER, HostileServer, Lab, MiB, Row

FULL = hostile_peers.full_run()
SETTLE = 30.0 if FULL else 1.0
# Where bumper misses a target today (issue 22's work still to do): these run in `make hostile` only,
# where they fail until fixed, and the table shows the numbers.
MISSES: set[str] = set()
# Idle bumped keep-alive connections held at once for their cost (the N).
IDLE_CONNECTIONS = 200

ROWS: list[str] = []
# A full case moves hundreds of MiB and waits 30 s after: more than pytest's default timeout here.
pytestmark = pytest.mark.timeout(900 if FULL else 120)


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    if not ROWS:
        return
    text = f"{HEADER}\n" + "\n".join(ROWS) + "\n"
    print(f"\n{text}")
    if FULL:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        default = Path(__file__).parents[1] / "bench" / "results" / f"hostile-{stamp}.md"
        out = Path(os.environ.get("BUMPER_HOSTILE_TABLE", default))
        out.write_text(text)
        print(f"(also in {out})")


@pytest.fixture
def hostile_server(test_pki: Pki, tmp_path: Path) -> Iterator[Callable[..., HostileServer]]:
    cert, key = test_pki.root.leaf("*.hostile.test").write(tmp_path, "hostile")
    servers: list[HostileServer] = []

    def start(answer: Callable[..., None], alpn: str = "http/1.1") -> HostileServer:
        servers.append(HostileServer(cert, key, answer, alpn=alpn))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def selected() -> list[str]:
    return [name for name in CASES if FULL or name not in MISSES]


@pytest.mark.parametrize("name", selected())
def test_hostile_peer(
    name: str,
    start_bumper: Callable[..., Bumper],
    upstream: Upstream,
    start_upstream: Callable[..., Upstream],
    hostile_server: Callable[..., HostileServer],
) -> None:
    case = CASES[name]
    settings = (*(() if FULL else case.bumper_args), *case.settings)
    if case.headroom:
        budget = hostile_peers.baseline_rss(start_bumper, upstream, *settings) + case.headroom
        settings = (*settings, "--max-memory", str(budget))
    bumper = start_bumper(*settings)
    target = start_upstream()
    lab = Lab(bumper, upstream, target, hostile_server, FULL)
    try:
        row: Row = hostile_peers.measure(lab, case, SETTLE)
    finally:
        bumper.process.stop()  # its memory back to the machine before the next case
        target.process.stop()
    ROWS.append(row.markdown())
    assert row.ok(), row.markdown()


def test_idle_connection_cost(start_bumper: Callable[..., Bumper], upstream: Upstream) -> None:
    """The issue's target is 50 KiB per idle bumped keep-alive connection (101 KiB when it was filed):
    recorded in the table, and held here to what it is now (bench/README.md, workload 5, tracks it
    against other proxies). Measured once the upstream legs are closed (--upstream-idle-timeout,
    shortened here: the connections are held 3 s)."""
    bumper = start_bumper("--upstream-idle-timeout", "0.1")
    try:
        kib = hostile_peers.idle_connection_cost(bumper, upstream, IDLE_CONNECTIONS if FULL else 50, hold=3)
    finally:
        bumper.process.stop()
    ROWS.append(
        f"| an idle bumped keep-alive connection (N={IDLE_CONNECTIONS if FULL else 50}), its upstream leg "
        f"closed by --upstream-idle-timeout | 101 KiB each | | {kib:.0f} KiB each | | | | | target 50 KiB |"
    )
    assert kib < 80, kib  # 99 to 114 before bumper closed idle upstream legs


def test_idle_connection_cost_after_a_download(start_bumper: Callable[..., Bumper], upstream: Upstream) -> None:
    """Each connection downloads 256 KiB before it goes idle: an OpenSSL memory BIO keeps the largest
    buffer it held, so each kept about 390 KiB until bumper swapped the idle client leg's BIOs and
    closed the upstream leg (281 KiB with the upstream leg closed alone)."""
    # The timeout short enough that few connections hold their download's buffers (about 280 KiB
    # each) at once: the RSS keeps the heap's high-water mark that those set.
    bumper = start_bumper("--upstream-idle-timeout", "0.1")
    count = IDLE_CONNECTIONS if FULL else 50
    try:
        kib = hostile_peers.idle_connection_cost(bumper, upstream, count, hold=3, download=256 * 1024)
    finally:
        bumper.process.stop()
    ROWS.append(
        f"| an idle bumped keep-alive connection after a 256 KiB download (N={count}), its upstream leg closed "
        f"| (not in the issue) | | {kib:.0f} KiB each (about 390 KiB without the timeout) | | | | | |"
    )
    assert kib < 200, kib  # 281 with the upstream leg closed but the client leg's BIOs kept


def test_memory_comes_back_after_the_close(
    start_bumper: Callable[..., Bumper], upstream: Upstream, hostile_server: Callable[..., HostileServer]
) -> None:
    """Sixteen HTTP/2 clients that keep their windows shut while the upstream sends: bumper holds what
    each upstream may send before its window closes (a stream's window, bumper.proxy.h2flow), so the
    RSS peaks far over the baseline, and it is back within 64 MiB of it 10 s after the close. The
    closed connections' objects are cycles Python's collector would leave for minutes, and glibc would
    keep the pages they freed (bumper/proxy/reclaim.py)."""
    bumper = start_bumper()
    lab = Lab(bumper, upstream, upstream, hostile_server, FULL)  # its hostile server is its own
    case = hostile_peers.Case(
        "16 shut HTTP/2 windows", lambda lab: hostile_peers.h2_zero_window(lab, 16 * MiB, connections=16)
    )
    try:
        row = hostile_peers.measure(lab, case, 10.0)
    finally:
        bumper.process.stop()
    assert row.peak_kib > 80 * 1024, row.markdown()  # the burst did cost memory: the test can tell
    assert row.after_kib <= 64 * 1024, row.markdown()
