"""The `block` action for upstreams that fail verification: every request gets a 502 page that
says why, and nothing is sent upstream."""

from __future__ import annotations

from mitmproxy import http

from bumper.proxy.httpstream import respond_early
from bumper.proxy.state import ConnectionStates

# ConnectionState.refused_by for connections on_upstream_error: block stopped.
BY_UPSTREAM_ERROR = "on_upstream_error"


class UpstreamErrorPages:
    def __init__(self, states: ConnectionStates) -> None:
        self.states = states

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.of(flow.client_conn.id)
        if state is not None and state.blocked is not None:
            respond_early(flow, state.blocked.response(flow.request))
