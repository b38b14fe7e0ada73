"""The memory budget (--max-memory) and the overload manager, after Envoy's: bumper's RSS is read
every CHECK_INTERVAL, and at rising shares of the budget it stops accepting new connections, then
shrinks what it can (the mimic memory cache, a collection and a heap trim, keep-alive off), then
resets the connections holding the most memory. Each step is logged when it is entered and when it
is left; it is left only once the RSS is LEAVE_MARGIN under where it was entered, so that a reading
hovering at a threshold does not flap.

Why these thresholds. The default budget is half the memory limit, so even 100% of it leaves the
other half for what the kernel charges bumper besides its heap (socket buffers, the page cache, the
key worker). 80%: refusing new work hurts nobody already served, so it comes first and early. 90%:
shrinking costs the hit rate and a collection's pause. 95%: a reset loses a client's transfer, so it
comes last, with 5% left for the collection that follows it. Between two readings a fast client
adds some 10 MiB: the steps are far enough apart for each to be seen on its way up.

The decisions (`decide`, `victims`, `default_budget`) are plain functions over plain data; the
addon only reads the RSS and each connection's estimate, and applies them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from mitmproxy import http

from bumper.certs.mimicstore import MimicStore
from bumper.policy.binder import parse_size
from bumper.proxy.connlimits import ConnectionLimits
from bumper.proxy.limits import LIMIT
from bumper.proxy.reclaim import Reclaim, rss_bytes
from bumper.proxy.state import ConnectionState, ConnectionStates

log = logging.getLogger("bumper")

CHECK_INTERVAL = 0.1  # seconds between two readings: /proc/self/statm costs microseconds, a fast
# client on loopback fills 10 MiB in that time
LEAVE_MARGIN = 0.05  # of the budget: a step is left this far under the share that entered it
MIN_RESET_BYTES = 256 << 10  # a connection holding less is not worth a reset: it would free nothing
SHRUNK_MIMIC_CACHE = 4  # the mimic memory cache is cut to this fraction of its size while shrinking
MiB = 1 << 20


class Action(StrEnum):
    """Envoy's overload actions bumper takes, by the gauge's label (docs/limits.md)."""

    STOP_ACCEPTING = "stop_accepting"  # Envoy's stop_accepting_connections
    SHRINK = "shrink"  # shrink_heap, and disable_http_keepalive
    RESET = "reset"  # reset_high_memory_stream


@dataclass(frozen=True)
class Threshold:
    action: Action
    share: float  # of the budget at which the action is entered

    @property
    def leave(self) -> float:
        return self.share - LEAVE_MARGIN


THRESHOLDS = (
    Threshold(Action.STOP_ACCEPTING, 0.80),
    Threshold(Action.SHRINK, 0.90),
    Threshold(Action.RESET, 0.95),
)

# What each action's lines say when it is entered, and when it is left.
TOLD = {
    Action.STOP_ACCEPTING: ("new connections wait", "accepting new connections again"),
    Action.SHRINK: ("shrinking the mimic cache and the heap, keep-alive off", "mimic cache and keep-alive back"),
    Action.RESET: ("resetting the connections holding the most memory", "no more resets"),
}


def decide(
    reading: int, budget: int, active: frozenset[Action], thresholds: Sequence[Threshold] = THRESHOLDS
) -> frozenset[Action]:
    """The actions in force at READING bytes of a BUDGET, ACTIVE ones before: entered at their share,
    kept until the reading is under their share less LEAVE_MARGIN."""
    if budget <= 0:
        return frozenset()
    share = reading / budget
    return frozenset(t.action for t in thresholds if share >= t.share or (t.action in active and share >= t.leave))


def victims(held: Iterable[tuple[str, int]], excess: int, least: int = MIN_RESET_BYTES) -> list[str]:
    """Which connections to reset, from HELD (an id and the bytes it holds): the largest first, until
    their bytes cover EXCESS (at least one), none holding under LEAST."""
    chosen: list[str] = []
    freed = 0
    for key, size in sorted(held, key=lambda pair: pair[1], reverse=True):
        if size < least or (chosen and freed >= excess):
            break
        chosen.append(key)
        freed += size
    return chosen


# The default budget: half the cgroup's memory limit, or of the machine's memory.

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_limit(proc_cgroup: str, read: Callable[[str], str | None]) -> int | None:
    """The memory limit of the cgroup in PROC_CGROUP (/proc/self/cgroup's text), read with READ
    (a path under /sys/fs/cgroup: its text, or None when absent): cgroup v2's memory.max, else v1's
    memory.limit_in_bytes. None when there is none ("max", or v1's huge number)."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, the unified hierarchy
            text = read(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
        elif "memory" in controllers.split(","):
            text = read(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes")
            if text is None:  # a container sees its own cgroup at the root
                text = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        else:
            continue
        if text is not None and text.strip().isdigit() and int(text) < UNLIMITED:
            return int(text)
    return None


def mem_total(meminfo: str) -> int:
    """MemTotal from /proc/meminfo's text, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal in /proc/meminfo")


def default_budget(proc_cgroup: str, meminfo: str, read: Callable[[str], str | None]) -> tuple[int, str]:
    """Half the cgroup's memory limit, else half the machine's memory; and where it came from."""
    limit = cgroup_limit(proc_cgroup, read)
    if limit is not None:
        return limit // 2, f"half the cgroup's memory limit of {limit // MiB} MiB"
    total = mem_total(meminfo)
    return total // 2, f"half the machine's {total // MiB} MiB"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def system_default_budget() -> tuple[int, str]:
    """default_budget of this process, from /proc and /sys/fs/cgroup."""
    return default_budget(_read("/proc/self/cgroup") or "", _read("/proc/meminfo") or "", _read)


def parse_budget(text: str) -> int:
    """--max-memory: a size (512MiB, 2g), or 0 or off: no budget. Raises ValueError."""
    if text.strip().lower() == "off":
        return 0
    return parse_size(text)


def below_start(budget: int, rss: int) -> bool:
    """Whether BUDGET is so small that bumper's RSS at start, RSS, is already past the first step."""
    return budget > 0 and rss >= THRESHOLDS[0].share * budget


# What a connection holds: an estimate from what mitmproxy's objects show.


def layers_under(root: Any) -> Iterator[Any]:
    """ROOT and every layer under it: the wrappers' child layer (`layer`, `child_layer`, SyncHooks'
    `child`, or the layer
    whose method `_handle_event` became: a mode's layer hands its events on so), an HTTP layer's
    streams and connection layers (docs/architecture.md, internals)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        layer = todo.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        todo += [getattr(layer, name, None) for name in ("layer", "child_layer", "child")]
        todo.append(getattr(getattr(layer, "_handle_event", None), "__self__", None))
        todo += getattr(layer, "streams", {}).values()
        todo += getattr(layer, "connections", {}).values()


def _body(message: http.Message | None) -> int:
    """A message's body, when mitmproxy holds it whole (not streamed)."""
    if message is None or message.stream or message.data.content is None:
        return 0
    return len(message.data.content)


def _held_by_layer(layer: Any) -> int:
    held = 0
    # HttpStream's bodies, HTTP/1's head, the relay's messages (h1relay)
    for name in ("request_body_buf", "response_body_buf", "buf", "client_buf", "server_buf"):
        with contextlib.suppress(TypeError):
            held += len(getattr(layer, name, b""))
    for ws in (getattr(layer, "client_ws", None), getattr(layer, "server_ws", None)):  # a WebSocket message
        if ws is not None:
            held += sum(map(len, ws.frame_buf))
    h2 = getattr(layer, "h2_conn", None)  # HTTP/2: what waits for the peer's window, by stream
    for queue in getattr(h2, "stream_buffers", {}).values():
        held += sum(len(chunk.data) for chunk in queue)
    flow = getattr(layer, "flow", None)
    if isinstance(flow, http.HTTPFlow):
        held += _body(flow.request) + _body(flow.response)
    return held


def held_by(handler: Any) -> int:
    """An estimate of the bytes a connection holds: its layers' buffers, the bodies its flows hold
    whole, and what its transports have yet to write."""
    held = sum(_held_by_layer(layer) for layer in layers_under(handler.layer))
    for io in handler.transports.values():
        transport = getattr(io.writer, "transport", None)
        if transport is not None:
            held += transport.get_write_buffer_size()
    return held


class Overload:
    """The addon: reads the RSS every CHECK_INTERVAL and applies what `decide` says."""

    def __init__(
        self,
        budget: int,
        states: ConnectionStates,
        limits: ConnectionLimits,
        reclaim: Reclaim,
        mimics: MimicStore,
        proxyserver: Any,
        rss: Callable[[], int] = rss_bytes,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.budget = budget
        self.states = states
        self.limits = limits
        self.reclaim = reclaim
        self.mimics = mimics
        self.mimic_bytes = mimics.max_bytes  # the configured size, back once shrinking ends
        self.proxyserver = proxyserver
        self.rss = rss
        self.interval = interval
        self.active: frozenset[Action] = frozenset()
        self.resets = 0  # connections reset for memory: bumper_overload_resets_total
        self._reset_last = False  # connections were reset at the last reading: their memory is still to free
        self._task: asyncio.Task[None] | None = None

    def refusing(self) -> bool:
        """Whether new connections wait: what /readyz says (bumper.proxy.admin.Readiness)."""
        return Action.STOP_ACCEPTING in self.active

    def running(self) -> None:
        if self.budget > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if Action.SHRINK in self.active and flow.response is not None and not flow.response.is_http2:
            flow.response.headers["connection"] = "close"  # the client's next request opens a new connection

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError):  # /proc unreadable: nothing to go by this time
                self.check()

    def check(self) -> None:
        reading = self.rss()
        now = decide(reading, self.budget, self.active)
        for threshold in THRESHOLDS:  # entered from the first step up
            if threshold.action in now - self.active:
                self._tell(f"over {threshold.share:.0%}", reading, TOLD[threshold.action][0])
                self._enter(threshold.action)
        for threshold in reversed(THRESHOLDS):  # and left from the last down
            if threshold.action in self.active - now:
                self._tell(f"under {threshold.leave:.0%}", reading, TOLD[threshold.action][1])
                self._leave(threshold.action)
        self.active = now
        if self._reset_last:
            # What the reset connections held is freed by a collection once they have closed; until
            # then no more resets, which the memory still held would make look needed.
            self._reset_last = False
            self.reclaim.collect()
        elif Action.RESET in now:
            self._reset_last = self._reset(reading)
        elif Action.SHRINK in now:
            self.reclaim.collect_if_allowed()

    def _tell(self, where: str, reading: int, what: str) -> None:
        log.warning(
            f"bumper: overload: memory {reading // MiB} MiB, {where} of --max-memory {self.budget // MiB} MiB: {what}"
        )

    def _enter(self, action: Action) -> None:
        if action is Action.STOP_ACCEPTING:
            self.limits.overloaded(True)
        elif action is Action.SHRINK:
            self.mimics.resize(self.mimic_bytes // SHRUNK_MIMIC_CACHE)

    def _leave(self, action: Action) -> None:
        if action is Action.STOP_ACCEPTING:
            self.limits.overloaded(False)
        elif action is Action.SHRINK:
            self.mimics.resize(self.mimic_bytes)

    def _reset(self, reading: int) -> bool:
        """Reset the connections holding the most, until what they hold covers the excess over the
        reset step's leave share; whether there was any."""
        by_id: dict[str, ConnectionState] = {}
        for state in self.states:
            handler = self.proxyserver.connections.get(state.conn.id)
            state.memory = held_by(handler) if handler is not None else 0
            by_id[state.conn.id] = state
        excess = reading - int(THRESHOLDS[-1].leave * self.budget)
        chosen = victims(((key, state.memory) for key, state in by_id.items()), excess)
        for client_id in chosen:
            state = by_id[client_id]
            reason = (
                f"{LIMIT}memory over {THRESHOLDS[-1].share:.0%} of --max-memory {self.budget // MiB} MiB: "
                f"reset, holding {state.memory // 1024} KiB, the most"
            )
            log.warning(f"bumper: overload: resetting {state.client}, which holds {state.memory // 1024} KiB")
            self.resets += 1
            self.limits.close_client(state.conn, reason)
        return bool(chosen)
