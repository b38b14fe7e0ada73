"""stopper: raises Refuse once more than `after` bytes of a body (the request's or the response's)
went through its data hook: a refusal in the middle of a streaming body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitmproxy import http

from bumper.addon import Addon, Bytes, Refuse


@dataclass(frozen=True)
class StopperSettings:
    after: Bytes = Bytes(1024**2)
    side: Literal["request", "response"] = "request"


class Stopper(Addon):
    name = "stopper"
    Settings = StopperSettings
    blocks = True

    def _count(self, flow: http.HTTPFlow, side: str, chunk: bytes) -> bytes:
        if side == self.settings.side:
            seen = flow.metadata[f"stopper.{side}"] = flow.metadata.get(f"stopper.{side}", 0) + len(chunk)
            if seen > self.settings.after:
                raise Refuse(f"more than {self.settings.after} bytes of the {side} body")
        return chunk

    def request_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        return self._count(flow, "request", chunk)

    def response_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        return self._count(flow, "response", chunk)
