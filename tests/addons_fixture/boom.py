"""boom: raises RuntimeError in the one hook its settings name (a broken addon, for isolation tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mitmproxy import http

from bumper.addon import Addon

Hook = Literal["requestheaders", "request", "responseheaders", "response", "request_data", "response_data"]


@dataclass(frozen=True)
class BoomSettings:
    hook: Hook = "requestheaders"


class Boom(Addon):
    name = "boom"
    Settings = BoomSettings

    def _maybe_fail(self, hook: str) -> None:
        if self.settings.hook == hook:
            raise RuntimeError(f"boom in {hook}")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._maybe_fail("requestheaders")

    def request(self, flow: http.HTTPFlow) -> None:
        self._maybe_fail("request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._maybe_fail("responseheaders")

    def response(self, flow: http.HTTPFlow) -> None:
        self._maybe_fail("response")

    def request_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        self._maybe_fail("request_data")
        return chunk

    def response_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        self._maybe_fail("response_data")
        return chunk
