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

import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, master

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
        args = _args(event)
        for func in self.handlers(event.name):
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:  # as mitmproxy's safecall: one addon's error is logged, the next runs
                logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        message = _args(event)[0]
        if isinstance(message, flow.Flow) and self.handlers(hooks.UpdateHook.name):
            await self.trigger_event(hooks.UpdateHook([message]))


_FIELDS: dict[type, tuple[str, ...]] = {}


def _args(event: hooks.Hook) -> list[Any]:
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in fields(event))  # type: ignore[arg-type]
    return [getattr(event, n) for n in names]


class Master(master.Master):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert not self.addons.chain, "replaced before any addon is added"
        self.addons = AddonManager(self)
