"""bumper's hook dispatcher, without sockets: handlers run on the spot as far as they can, and what
has to wait (an async handler, an intercepted flow) goes on later in the same order. The real-traffic
side (every hook of every addon, through the proxy's CLI) is in test_addon_api and the addon tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import pytest
from mitmproxy import exceptions, options
from mitmproxy.proxy import commands, context, events, layer
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from bumper.proxy import dispatch


class Recorder:
    """Addons that append what they saw to one shared list."""

    def __init__(self, seen: list[str], name: str, behaviour: str = "sync") -> None:
        self.seen, self.name, self.behaviour = seen, name, behaviour

    def request(self, flow: Any) -> Awaitable[None] | None:
        if self.behaviour == "async":
            return self._later()
        self.seen.append(self.name)
        if self.behaviour == "raise":
            raise RuntimeError(f"{self.name} broke")
        if self.behaviour == "halt":
            raise exceptions.AddonHalt
        if self.behaviour == "intercept":
            flow.intercept()
        return None

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.seen.append(self.name)


def manager(*addons: Any) -> dispatch.AddonManager:
    m = dispatch.Master(options.Options())
    m.addons.add(*addons)
    return m.addons


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_synchronous_handlers_are_done_when_start_hook_returns() -> None:
    async def go() -> list[str]:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a"), Recorder(seen, "b"))
        assert addons.start_hook(HttpRequestHook(tflow.tflow())) is None
        return seen

    assert run(go()) == ["a", "b"]


def test_an_async_handler_defers_itself_and_every_later_handler_in_order() -> None:
    async def go() -> tuple[list[str], list[str]]:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a"), Recorder(seen, "b", "async"), Recorder(seen, "c"))
        rest = addons.start_hook(HttpRequestHook(tflow.tflow()))
        before = list(seen)
        assert rest is not None
        await rest
        return before, seen

    before, after = run(go())
    assert before == ["a"]  # "c" must not run before "b" is done
    assert after == ["a", "b", "c"]


def test_a_failing_handler_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[str]:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a", "raise"), Recorder(seen, "b"))
        assert addons.start_hook(HttpRequestHook(tflow.tflow())) is None
        return seen

    with caplog.at_level(logging.ERROR):
        assert run(go()) == ["a", "b"]
    assert "Addon error: a broke" in caplog.text


def test_addon_halt_stops_the_later_handlers() -> None:
    async def go() -> list[str]:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a", "halt"), Recorder(seen, "b"))
        assert addons.start_hook(HttpRequestHook(tflow.tflow())) is None
        return seen

    assert run(go()) == ["a"]


def test_an_intercepted_flow_completes_its_hook_only_once_resumed() -> None:
    async def go() -> None:
        seen: list[str] = []
        flow = tflow.tflow()
        addons = manager(Recorder(seen, "a", "intercept"))
        rest = addons.start_hook(HttpRequestHook(flow))
        assert rest is not None
        waiting = asyncio.ensure_future(rest)
        await asyncio.sleep(0.01)
        assert not waiting.done()
        flow.resume()
        await asyncio.wait_for(waiting, 5)

    run(go())


class AsksOnce(layer.Layer):
    """A layer that raises one `request` hook on Start and logs once the hook is complete."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield HttpRequestHook(tflow.tflow())
            yield commands.Log("hook complete")


def top_layer(addons: dispatch.AddonManager) -> tuple[dispatch.SyncHooks, context.Context]:
    ctx = context.Context(tflow.tclient_conn(), options.Options())
    child = AsksOnce(ctx)
    return dispatch.SyncHooks(ctx, child, addons), ctx


def messages(cmds: list[commands.Command]) -> list[str]:
    return [c.message for c in cmds if isinstance(c, commands.Log)]


def test_sync_hooks_completes_a_synchronous_hook_within_the_same_event() -> None:
    async def go() -> None:
        seen: list[str] = []
        top, ctx = top_layer(manager(Recorder(seen, "a")))
        out = list(top.handle_event(events.Start()))
        assert seen == ["a"]
        assert messages(out) == ["hook complete"]
        assert not any(isinstance(c, commands.StartHook) for c in out)  # nothing left for a task
        assert top not in ctx.layers  # the layers below see the same stack as without it

    run(go())


def test_sync_hooks_hands_a_waiting_hook_to_mitmproxy_and_resumes_the_layer_below_after_it() -> None:
    async def go() -> None:
        seen: list[str] = []
        top, _ = top_layer(manager(Recorder(seen, "a", "async"), Recorder(seen, "b")))
        out = list(top.handle_event(events.Start()))
        deferred = [c for c in out if isinstance(c, commands.StartHook)]
        assert len(deferred) == 1 and messages(out) == []
        hook = deferred[0]
        assert hook.blocking and hook.blocking is not True  # the layer below waits, not SyncHooks
        (rest,) = hook.args()
        await rest  # what mitmproxy's hook task does, through handle_lifecycle
        assert seen == ["a", "b"]
        assert messages(list(top.handle_event(events.HookCompleted(hook)))) == ["hook complete"]

    run(go())


class AsksInPlace(AsksOnce):
    """AsksOnce, its hooks run where it raises them (as bumper's HttpStream runs a request's)."""

    def __init__(self, ctx: context.Context, addons: dispatch.AddonManager) -> None:
        super().__init__(ctx)
        self.addons = addons

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        return (yield from dispatch.in_place(super()._handle_event(event), self.addons))


class Wraps(layer.Layer):
    """A layer that passes its child's commands up with in_place, as a CONNECT's stream passes its
    tunnel's."""

    def __init__(self, ctx: context.Context, child: layer.Layer, addons: dispatch.AddonManager) -> None:
        super().__init__(ctx)
        self.child, self.addons = child, addons

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        return (yield from dispatch.in_place(self.child.handle_event(event), self.addons))


def test_in_place_answers_a_layers_own_hook_without_the_hook_leaving_the_layer() -> None:
    async def go() -> None:
        seen: list[str] = []
        ctx = context.Context(tflow.tclient_conn(), options.Options())
        out = list(AsksInPlace(ctx, manager(Recorder(seen, "a"))).handle_event(events.Start()))
        assert seen == ["a"]
        assert messages(out) == ["hook complete"]
        assert not any(isinstance(c, commands.StartHook) for c in out)

    run(go())


def test_in_place_sends_a_waiting_hook_up_as_a_rest_the_layer_itself_waits_for() -> None:
    async def go() -> None:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a", "async"), Recorder(seen, "b"))
        ctx = context.Context(tflow.tclient_conn(), options.Options())
        asks = AsksInPlace(ctx, addons)
        top = dispatch.SyncHooks(ctx, asks, addons)
        out = list(top.handle_event(events.Start()))
        deferred = [c for c in out if isinstance(c, commands.StartHook)]
        assert len(deferred) == 1 and messages(out) == []
        assert deferred[0].blocking is asks  # SyncHooks passed it on untouched
        (rest,) = deferred[0].args()
        await rest
        assert seen == ["a", "b"]
        assert messages(list(top.handle_event(events.HookCompleted(deferred[0])))) == ["hook complete"]

    run(go())


def test_in_place_leaves_the_hook_of_a_layer_below_to_sync_hooks() -> None:
    """The layer below waits for its hook's completion as an event: answered in place, it would
    never come."""

    async def go() -> None:
        seen: list[str] = []
        addons = manager(Recorder(seen, "a"))
        ctx = context.Context(tflow.tclient_conn(), options.Options())
        top = dispatch.SyncHooks(ctx, Wraps(ctx, AsksOnce(ctx), addons), addons)
        out = list(top.handle_event(events.Start()))
        assert seen == ["a"]
        assert messages(out) == ["hook complete"]

    run(go())
