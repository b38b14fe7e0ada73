"""What a client is told when its CONNECT cannot become a tunnel."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.utils import human


class ConnectReplies:
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 text gives advice about its options; say plainly what failed instead.
        if flow.response is not None and flow.response.status_code == 502:
            target = human.format_address((flow.request.host, flow.request.port))
            reason = flow.server_conn.error or "cannot connect"
            flow.response = http.Response.make(
                502,
                f"bumper: cannot connect to {target}: {reason}\n",
                {"content-type": "text/plain; charset=utf-8"},
            )
