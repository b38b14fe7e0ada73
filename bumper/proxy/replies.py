"""Everything bumper answers a client itself, instead of an upstream: CONNECT refusals, policy and
addon refusals, upstream failures, and its own wording of the errors mitmproxy's HTTP layer would
answer with an HTML page of its own.

Every answer is one `Reply`, rendered by the request's Accept header: a JSON object for
`application/json`, an HTML table for `text/html`, plain text otherwise. The plain text starts
with `bumper: ` and the error, so whoever reads it knows the proxy answered, not the site; a reply
with more to say adds `key: value` lines.
"""

from __future__ import annotations

import dataclasses
import html
import json
from typing import ClassVar

from mitmproxy import http
from mitmproxy.proxy.layers.http import ErrorCode
from mitmproxy.utils import human

from bumper.policy import destinations

BLOCKED = "Blocked by bumper"

# mitmproxy's advice about options bumper has no way to set, at the end of its validation errors.
_OPTION_ADVICE = " Disable the validate_inbound_headers option to skip this security check."


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer of bumper's own. The fields after `heading` are what the client is told: `error`
    always, the others where they apply, in this order."""

    status: int
    heading: str  # the HTML page's title and heading
    error: str
    host: str | None = None
    reason: str | None = None
    detail: str | None = None
    upstream_sha256: str | None = None
    addon: str | None = None
    reference: str | None = None
    admin: str | None = None

    _NOT_SAID: ClassVar[tuple[str, ...]] = ("status", "heading")

    def fields(self) -> dict[str, str]:
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if f.name not in self._NOT_SAID and (value := getattr(self, f.name)) is not None
        }

    def render(self, accept: str) -> tuple[bytes, str]:
        """The body and its content type, as the client's Accept header prefers."""
        fields = self.fields()
        if "application/json" in accept:
            return json.dumps(fields).encode() + b"\n", "application/json"
        if "text/html" in accept:
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields.items())
            heading = html.escape(self.heading)
            page = f"<!doctype html><title>bumper: {heading}</title><h1>{heading}</h1><table>{rows}</table>\n"
            return page.encode(), "text/html; charset=utf-8"
        lines = [f"bumper: {fields.pop('error')}", *(f"{k}: {v}" for k, v in fields.items())]
        return "".join(f"{line}\n" for line in lines).encode(), "text/plain; charset=utf-8"

    def response(self, request: http.Request | None) -> http.Response:
        """The reply as an answer to REQUEST (None: a request too broken to read its Accept)."""
        body, content_type = self.render(request.headers.get("accept", "") if request else "")
        return http.Response.make(self.status, body, {"content-type": content_type, "cache-control": "no-store"})


def _target(request: http.Request) -> str:
    return human.format_address((request.host, request.port))


def refused(what: str, request: http.Request, reason: str) -> Reply:
    """The policy refused a CONNECT or a plain-HTTP request (WHAT: "CONNECT to", "request to")."""
    return Reply(403, BLOCKED, f"{what} {_target(request)} {reason}")


def destination_refused(reason: str) -> Reply:
    """The policy's `destinations:` refused every address the host resolved to: REASON names one, and why."""
    return Reply(403, BLOCKED, reason)


def names_disagree(names_seen: str) -> Reply:
    return Reply(403, BLOCKED, f"request refused: names disagree ({names_seen})")


def cannot_connect(request: http.Request, reason: str) -> Reply:
    return Reply(502, "Cannot connect", f"cannot connect to {_target(request)}: {reason}")


def upstream_blocked(host: str, reason: str, fingerprint: str, detail: str) -> Reply:
    """on_upstream_error: block: the 502 every request on the connection gets. REASON is one of
    trust.REASONS, FINGERPRINT the upstream leaf's SHA-256."""
    return Reply(
        502,
        BLOCKED,
        "upstream certificate failed verification",
        host=host,
        reason=reason,
        detail=detail,
        upstream_sha256=fingerprint,
    )


def addon_refusal(addon: str, reason: str, status: int, reference: str) -> Reply:
    """An addon refused the request (a 4xx), or failed with on_error: fail-closed (a 5xx)."""
    heading = BLOCKED if status < 500 else "Inspection failed"
    return Reply(status, heading, reason, addon=addon, reference=reference)


# The challenge of a 407: Basic, the one scheme --proxy-auth takes.
PROXY_AUTHENTICATE = 'Basic realm="bumper"'


def auth_required(request: http.Request) -> http.Response:
    """407 for a request without valid proxy credentials. It does not say what was wrong with them
    (unknown user, wrong password): that would tell a guesser which user names exist; the log says."""
    reply = Reply(407, "Proxy authentication required", "proxy authentication required")
    response = reply.response(request)
    response.headers["Proxy-Authenticate"] = PROXY_AUTHENTICATE
    return response


def auth_unavailable(request: http.Request) -> http.Response:
    """503 when the credentials could not be checked now (too many checks under way): not a 407,
    which would make a browser ask its user for a password that may well be right."""
    reply = Reply(503, "Busy", "too many proxy password checks under way; try again")
    response = reply.response(request)
    response.headers["retry-after"] = "1"
    return response


def bad_request(message: str, status: int = 400) -> Reply:
    return Reply(status, "Bad request", f"bad request: {message}")


def for_the_proxy(proxy: str, admin: str | None) -> Reply:
    """A request sent to the proxy port as to a web server (`GET /`): what the port is for, and where
    bumper's own pages are (ADMIN, the admin listener's URL), or how to get them."""
    pages = "the CA onboarding page, /healthz, /metrics"
    return Reply(
        400,
        "Not a proxy request",
        f"not a proxy request: this port is a proxy; ask it for absolute URLs (curl -x {proxy} https://example.com/)",
        admin=f"{admin} ({pages})" if admin else f"off (start bumper with --admin HOST:PORT for {pages})",
    )


def protocol_error(code: ErrorCode, message: str, request: http.Request) -> Reply | None:
    """What bumper answers where mitmproxy's HTTP layer would answer REQUEST with its own error page
    (CODE and MESSAGE are the layer's); None where mitmproxy sends no page (a kill, a cancel)."""
    status = code.http_status_code()
    if status is None:
        return None
    message = without_option_advice(message)
    if code is ErrorCode.CONNECT_FAILED:
        if refusal := destinations.refusal_in(message):
            return destination_refused(refusal)
        return cannot_connect(request, message)
    if status < 500:
        return bad_request(message, status)
    return Reply(status, "No valid response", f"no valid response from {_target(request)}: {message}")


def without_option_advice(message: str) -> str:
    """mitmproxy's validation error, without its advice about an option bumper does not have."""
    return message.removesuffix(_OPTION_ADVICE)


class ConnectReplies:
    """The answer to a CONNECT that cannot become a tunnel."""

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's own 502 text gives advice about its options; say plainly what failed instead.
        if flow.response is not None and flow.response.status_code == 502:
            reason = flow.server_conn.error or "cannot connect"
            refusal = destinations.refusal_in(reason)
            reply = destination_refused(refusal) if refusal else cannot_connect(flow.request, reason)
            flow.response = reply.response(flow.request)
