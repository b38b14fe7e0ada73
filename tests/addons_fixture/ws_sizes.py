"""ws_sizes: reads whole WebSocket messages, writing each one's size and direction to `path`, so
tests can tell that bumper assembled them (an addon with a `websocket_message` hook)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mitmproxy import http

from bumper.addon import Addon


@dataclass(frozen=True)
class WsSizesSettings:
    path: str


class WsSizes(Addon):
    name = "ws_sizes"
    Settings = WsSizesSettings

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        kept = len(flow.websocket.messages)
        message = flow.websocket.messages[-1]
        with open(self.settings.path, "a") as f:
            f.write(json.dumps({"size": len(message.content), "from_client": message.from_client, "kept": kept}) + "\n")
