"""The `block` action for upstreams that fail verification: every request gets a 502 page that
says why, and nothing is sent upstream."""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import connection, http

from bumper import pages
from bumper.httpstream import respond_early


@dataclass(frozen=True)
class BlockedUpstream:
    host: str
    reason: str  # trust.REASONS
    fingerprint: str  # the upstream leaf's SHA-256
    detail: str = ""


def fields(blocked: BlockedUpstream) -> dict[str, str]:
    return {
        "error": "upstream certificate failed verification",
        "host": blocked.host,
        "reason": blocked.reason,
        "detail": blocked.detail,
        "upstream_sha256": blocked.fingerprint,
    }


class UpstreamErrorPages:
    def __init__(self) -> None:
        self._blocked: dict[str, BlockedUpstream] = {}  # by client connection id

    def block(self, client_id: str, blocked: BlockedUpstream) -> None:
        self._blocked[client_id] = blocked

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        blocked = self._blocked.get(flow.client_conn.id)
        if blocked is not None:
            respond_early(flow, pages.response(502, "Blocked by bumper", fields(blocked), flow.request))

    def client_disconnected(self, client: connection.Client) -> None:
        self._blocked.pop(client.id, None)
