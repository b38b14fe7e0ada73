"""resp_refuser: refuses at responseheaders, once the upstream has answered (paths under `prefix`)."""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from bumper.addon import Addon, Refuse


@dataclass(frozen=True)
class RespRefuserSettings:
    prefix: str = "/bytes/"
    status: int = 403


class RespRefuser(Addon):
    name = "resp_refuser"
    Settings = RespRefuserSettings
    blocks = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.path.startswith(self.settings.prefix):
            raise Refuse("the upstream's answer is not allowed", self.settings.status)
