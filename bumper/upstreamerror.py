"""The `block` action for upstreams that fail verification: every request gets a 502 page that
says why, and nothing is sent upstream."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

from mitmproxy import connection, http


@dataclass(frozen=True)
class BlockedUpstream:
    host: str
    reason: str  # trust.REASONS
    fingerprint: str  # the upstream leaf's SHA-256
    detail: str = ""


def page(blocked: BlockedUpstream, accept: str) -> tuple[bytes, str]:
    """The 502 body and its content type, as the client's Accept header prefers."""
    fields = {
        "error": "upstream certificate failed verification",
        "host": blocked.host,
        "reason": blocked.reason,
        "detail": blocked.detail,
        "upstream_sha256": blocked.fingerprint,
    }
    if "application/json" in accept:
        return json.dumps(fields).encode() + b"\n", "application/json"
    if "text/html" in accept:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields.items())
        body = f"<!doctype html><title>bumper: blocked</title><h1>Blocked by bumper</h1><table>{rows}</table>\n"
        return body.encode(), "text/html; charset=utf-8"
    text = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return text.encode(), "text/plain; charset=utf-8"


class UpstreamErrorPages:
    def __init__(self) -> None:
        self._blocked: dict[str, BlockedUpstream] = {}  # by client connection id

    def block(self, client_id: str, blocked: BlockedUpstream) -> None:
        self._blocked[client_id] = blocked

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        blocked = self._blocked.get(flow.client_conn.id)
        if blocked is not None:
            body, content_type = page(blocked, flow.request.headers.get("accept", ""))
            flow.response = http.Response.make(502, body, {"content-type": content_type})

    def client_disconnected(self, client: connection.Client) -> None:
        self._blocked.pop(client.id, None)
