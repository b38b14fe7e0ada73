"""recorder: one JSON line per hook call to `path`, naming the hook, its `label` and the client port,
so tests can tell which addons ran on which connection and request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from bumper.addon import Addon, ConnectionInfo


@dataclass(frozen=True)
class RecorderSettings:
    path: str
    label: str = "recorder"


class Recorder(Addon):
    name = "recorder"
    Settings = RecorderSettings

    def _write(self, hook: str, client: Any, **extra: Any) -> None:
        port = client.peername[1] if client is not None and client.peername else None
        line = {"label": self.settings.label, "hook": hook, "client_port": port, **extra}
        with open(self.settings.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._write("requestheaders", flow.client_conn, path=flow.request.path, flow=flow.id)

    def request(self, flow: http.HTTPFlow) -> None:
        self._write("request", flow.client_conn, path=flow.request.path, flow=flow.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._write("responseheaders", flow.client_conn, path=flow.request.path, flow=flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._write("response", flow.client_conn, path=flow.request.path, flow=flow.id)

    def connection_bumped(self, conn: ConnectionInfo) -> None:
        self._write("connection_bumped", conn.conn, action=conn.action, rule=conn.rule)

    def connection_end(self, conn: ConnectionInfo) -> None:
        state = {
            field: getattr(conn, field)
            for field in ("kind", "target", "sni", "verify", "spoke", "requests", "bytes_up", "bytes_down", "error",
                          "refused_by")
        }  # fmt: skip
        self._write("connection_end", conn.conn, action=conn.action, rule=conn.rule, state=state)
