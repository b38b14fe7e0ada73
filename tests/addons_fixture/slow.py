"""slow_async and slow_sync: a requestheaders hook that takes `seconds`, the first awaiting (it can
be cancelled at its budget), the second busy-waiting (it cannot: it is judged when it returns)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mitmproxy import http

from bumper.addon import Addon


@dataclass(frozen=True)
class SlowSettings:
    seconds: float = 2.0


class SlowAsync(Addon):
    name = "slow_async"
    Settings = SlowSettings

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(self.settings.seconds)
        flow.request.headers["x-slow-async"] = "finished"  # never seen upstream when cancelled


class SlowSync(Addon):
    name = "slow_sync"
    Settings = SlowSettings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        deadline = time.monotonic() + self.settings.seconds
        while time.monotonic() < deadline:
            pass
