"""bumper's addon API: mitmproxy's addon model, narrowed to what policy chains need.

An addon is a class with a `name`, a `Settings` dataclass that the policy fills, and hooks as
methods. The mitmproxy hooks it may define take an `http.HTTPFlow`:

    requestheaders, request, responseheaders, response, error,
    websocket_start, websocket_message, websocket_end

and tls_clienthello(data), which runs once the policy has decided on the ClientHello. Hooks may
be coroutines. bumper adds its own:

    request_data(flow, chunk) -> bytes       each piece of the request body, as it streams;
    response_data(flow, chunk) -> bytes      b"" marks the end (return what you held back)
    connection_bumped(conn: ConnectionInfo)  the client's handshake is done: the decision, the
                                             upstream's certificate and its verification are known
    connection_end(conn: ConnectionInfo)     once per client connection: bumped, spliced or blocked
    reopen()                                 on SIGUSR1 (log rotation)
    done()                                   when bumper shuts down

An addon refuses a request by raising `Refuse(reason)` from any flow hook; bumper answers with a
page naming the addon and a reference id, and nothing more of the request goes upstream. Any
other exception, or a hook over its time budget, is the addon failing: see docs/addons.md.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mitmproxy import http
from mitmproxy.net.http import url

from bumper.policy.binder import FILLED_BY_BUMPER, Bytes
from bumper.proxy import replies
from bumper.proxy.authority import parse_authority
from bumper.proxy.httpstream import RESPONSE_DELIVERED, RESPONSE_SENT, abort, aborted, body_bytes, respond_early
from bumper.proxy.state import ConnectionState as ConnectionInfo

log = logging.getLogger("bumper.addons")

# Called where bumper cannot await: plain functions only.
SYNC_HOOKS = ("request_data", "response_data", "reopen", "done")
__all__ = [
    "Addon", "Bytes", "ConnectionInfo", "Refuse", "Refusal",
    "aborted", "body_bytes", "connection_info", "logged_url", "refuse", "refusal_of", "worker_number",
]  # fmt: skip

# flow.metadata keys
CONNECTION = "bumper.connection"  # the flow's ConnectionInfo
REFUSAL = "bumper.refusal"  # the Refusal that answered the flow, if one did
LOGGED_URL = "bumper.logged_url"  # the URL as logs may show it, when an addon found a secret in it


@dataclass(frozen=True)
class NoSettings:
    pass


WORKER = "worker"  # what a worker_number() field is filled in as


def worker_number() -> Any:
    """A Settings field for the number of the worker process running the addon (--workers: 1..N;
    None in a lone bumper), as its log lines say `"worker": N`: filled in by bumper as it starts the
    addon, never read from a policy file."""
    return field(default=None, metadata={FILLED_BY_BUMPER: WORKER})


class Addon:
    """Subclass, set `name` (and `Settings`, `blocks`), define hooks."""

    name: ClassVar[str]
    Settings: ClassVar[type[Any]] = NoSettings
    # Addons that exist to block fail closed by default, observers fail open.
    blocks: ClassVar[bool] = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @classmethod
    def blocks_with(cls, settings: Any) -> bool:
        """Whether these settings make the addon block (so that it fails closed by default)."""
        return cls.blocks


class Refuse(Exception):
    """Raised by a hook: answer the request with STATUS and a page saying REASON."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Refusal:
    addon: str
    reason: str
    status: int
    ref: str = field(default_factory=lambda: secrets.token_hex(6))


def refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
    """Answer FLOW with REFUSAL's page; if its response is already streaming, cut it off."""
    if flow.metadata.get(RESPONSE_DELIVERED):
        log.warning("addon %s refused flow %s after its response was delivered: too late to stop (%s)",
                    refusal.addon, flow.id, refusal.reason)  # fmt: skip
        return
    flow.metadata[REFUSAL] = refusal
    if (state := connection_info(flow)) is not None:
        # The connection's log line names the first refusal, unless something failed before it.
        state.refuse(f"blocked by {refusal.addon}: {refusal.reason}", refusal.addon)
    if flow.metadata.get(RESPONSE_SENT):
        abort(flow, f"refused by addon {refusal.addon}: {refusal.reason}")
        return
    reply = replies.addon_refusal(refusal.addon, refusal.reason, refusal.status, refusal.ref)
    respond_early(flow, reply.response(flow.request))


def connection_info(flow: http.HTTPFlow) -> ConnectionInfo | None:
    info = flow.metadata.get(CONNECTION)
    return info if isinstance(info, ConnectionInfo) else None


def refusal_of(flow: http.HTTPFlow) -> Refusal | None:
    refusal = flow.metadata.get(REFUSAL)
    return refusal if isinstance(refusal, Refusal) else None


def logged_url(flow: http.HTTPFlow) -> str:
    """FLOW's URL as logs may show it: with any secret an addon found in it masked."""
    return str(flow.metadata.get(LOGGED_URL) or pretty_url(flow.request))


def pretty_url(request: http.Request) -> str:
    """mitmproxy's Request.pretty_url, with the Host header read through the cache every request of
    a connection shares."""
    host_header = request.host_header
    if request.first_line_format == "authority" or not host_header:
        return request.pretty_url
    host, port = parse_authority(host_header)
    return url.unparse(request.scheme, host, port or url.default_port(request.scheme) or 443, request.path)
