"""tagger: appends `x-chain: TAG` to the request and the response, to show the order a chain runs in."""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from bumper.addon import Addon


@dataclass(frozen=True)
class TaggerSettings:
    tag: str


class Tagger(Addon):
    name = "tagger"
    Settings = TaggerSettings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.request.headers.add("x-chain", self.settings.tag)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.response.headers.add("x-chain", self.settings.tag)
