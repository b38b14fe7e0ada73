"""mitmproxy's master with a hook dispatcher that does per event only what an event needs.

Stock mitmproxy 11, on every hook of every flow (requestheaders, request, responseheaders, ...):
walks every addon and its children looking the hook up by name, enters a generator-based context
manager per addon, rebuilds the hook's argument list from dataclass fields, and then does all of
it a second time for an `update` hook that only its UI listens to. Profiling bumper on keep-alive
traffic put that dispatch among the largest costs per request.

Here each hook's handlers are looked up once (and again only when addons are added or removed),
the arguments are read once per event, and `update` is sent only if an addon listens to it. What
an addon sees is unchanged: the same handlers, in the same order, with the same error handling
(an exception is logged as "Addon error" and the next handler runs; AddonHalt stops the event).
"""

from __future__ import annotations

import collections
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, master
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context

logger = logging.getLogger("mitmproxy.addonmanager")

Handler = Callable[..., Any]


class AddonManager(addonmanager.AddonManager):
    def __init__(self, m: master.Master) -> None:
        super().__init__(m)
        self._handlers: dict[str, list[Handler]] = {}

    def register(self, addon: Any) -> Any:
        self._handlers.clear()
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        self._handlers.clear()
        super().remove(addon)

    def clear(self) -> None:
        self._handlers.clear()
        super().clear()

    def handlers(self, name: str) -> list[Handler]:
        """The callables for hook NAME, in chain order, children after their parent."""
        found = self._handlers.get(name)
        if found is None:
            found = self._handlers[name] = [
                func
                for addon in self.chain
                for a in addonmanager.traverse([addon])
                if callable(func := getattr(a, name, None)) and not isinstance(func, types.ModuleType)
            ]
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        rest = self._run(self.handlers(event.name), _args(event))
        if rest is not None:
            await rest

    def _run(self, handlers: list[Handler], args: list[Any], start: int = 0) -> Awaitable[None] | None:
        """Call HANDLERS from START on, as far as they go without waiting: None when all are done,
        else an awaitable for the rest (from the first handler that returned one)."""
        for i in range(start, len(handlers)):
            try:
                result = handlers[i](*args)
                if result is not None and inspect.isawaitable(result):
                    return self._run_rest(result, handlers, args, i + 1)
            except Exception as e:
                if _halts(e):
                    return None
        return None

    async def _run_rest(self, pending: Awaitable[Any], handlers: list[Handler], args: list[Any], start: int) -> None:
        try:
            await pending
        except Exception as e:
            if _halts(e):
                return
        rest = self._run(handlers, args, start)
        if rest is not None:
            await rest

    def start_hook(self, hook: commands.StartHook) -> Awaitable[None] | None:
        """What mitmproxy's connection handler awaits for HOOK in a task of its own (handle_lifecycle,
        then waiting for an intercepted flow), run now: None if it is all done, else an awaitable
        for the rest."""
        rest = self._lifecycle(hook)
        message = _args(hook)[0]
        if isinstance(message, flow.Flow) and (rest is not None or message.intercepted):
            return self._until_resumed(rest, message)
        return rest

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        rest = event.rest if isinstance(event, _Rest) else self._lifecycle(event)
        if rest is not None:
            await rest

    def _lifecycle(self, event: hooks.Hook) -> Awaitable[None] | None:
        """handle_lifecycle as far as it goes without waiting: the handlers, then `update` for a flow
        if an addon listens to it."""
        args = _args(event)
        rest = self._run(self.handlers(event.name), args)
        if isinstance(args[0], flow.Flow) and self.handlers(hooks.UpdateHook.name):
            return self._then_update(rest, args[0])
        return rest

    async def _then_update(self, rest: Awaitable[None] | None, message: flow.Flow) -> None:
        if rest is not None:
            await rest
        await self.trigger_event(hooks.UpdateHook([message]))

    async def _until_resumed(self, rest: Awaitable[None] | None, message: flow.Flow) -> None:
        if rest is not None:
            await rest
        await message.wait_for_resume()


def _halts(e: Exception) -> bool:
    """As mitmproxy's safecall: AddonHalt stops the event, OptionsError goes to the caller, any other
    error of one addon is logged and the next handler runs."""
    if isinstance(e, exceptions.AddonHalt):
        return True
    if isinstance(e, exceptions.OptionsError):
        raise e
    logger.error(f"Addon error: {e}", exc_info=True)
    return False


@dataclass
class _Rest(commands.StartHook):
    """The part of a hook that has to wait (an async handler, an intercepted flow), handed to
    mitmproxy's connection handler to run in a task like any hook. Its completion is HOOK's when
    SyncHooks made it for a layer below that waits for HOOK; without a HOOK, the layer that yielded
    it waits for this command itself (in_place)."""

    rest: Awaitable[None]
    name = "bumper_hook_rest"

    def __post_init__(self) -> None:
        self.hook: commands.StartHook | None = None


def in_place(produced: layer.CommandGenerator[None], dispatcher: AddonManager) -> layer.CommandGenerator[None]:
    """PRODUCED, a layer's commands, with its hooks run on the spot: a hook whose handlers are all done
    is answered at once, never leaving the layer, and one that has to wait leaves as a _Rest the layer
    waits for. SyncHooks at the root runs the same hooks the same way, but a hook that reaches it has
    climbed every layer between, and its completion comes back down through them all: for an HTTP
    request's four hooks (requestheaders, request, responseheaders, response) inside a bumped CONNECT
    tunnel, eight trips through about ten layers. Run where the request's stream raises them, they
    cut the Python calls per keep-alive request by 14% (cProfile, bench workload 2, c=10: 2,786 to
    2,404)."""
    reply = None
    while True:
        try:
            command = produced.send(reply)
        except StopIteration:
            return
        reply = None
        # A hook of a layer below (a CONNECT stream's tunnel) names that layer as blocking: SyncHooks' to run.
        if (
            isinstance(command, commands.StartHook)
            and not isinstance(command, _Rest)
            and not isinstance(command.blocking, layer.Layer)
        ):
            rest = dispatcher.start_hook(command)
            if rest is None:
                continue  # done: a hook's reply is None
            command = _Rest(rest)
        reply = yield command


class SyncHooks(layer.Layer):
    """Runs the hooks of the layers below it on the spot, where stock mitmproxy starts an asyncio
    task per hook (four per HTTP request at least) and feeds its completion back as a new event
    from the event loop. Hooks whose handlers all return without waiting complete before the event
    that raised them is done; the others go to mitmproxy's task as before. It takes no place in
    the context's layer stack: the layers below see the same parents as without it."""

    def __init__(self, context: Context, child: layer.Layer, dispatcher: AddonManager) -> None:
        super().__init__(context)
        self.context.layers.remove(self)
        self.child = child
        self.dispatcher = dispatcher

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.HookCompleted) and isinstance(event.command, _Rest) and event.command.hook:
            event = events.HookCompleted(event.command.hook)
        queue = collections.deque([event])
        while queue:
            for command in self.child.handle_event(queue.popleft()):
                if not isinstance(command, commands.StartHook) or isinstance(command, _Rest):  # _Rest: in_place's
                    yield command
                    continue
                rest = self.dispatcher.start_hook(command)
                if rest is not None:
                    deferred = _Rest(rest)
                    deferred.hook = command
                    deferred.blocking = command.blocking  # the layer below that waits, never True here
                    yield deferred
                elif command.blocking:
                    queue.append(events.HookCompleted(command))


_FIELDS: dict[type, tuple[str, ...]] = {}


def _args(event: hooks.Hook) -> list[Any]:
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in fields(event))  # type: ignore[arg-type]
    return [getattr(event, n) for n in names]


class Master(master.Master):
    addons: AddonManager

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert not self.addons.chain, "replaced before any addon is added"
        self.addons = AddonManager(self)
