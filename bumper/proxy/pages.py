"""The pages bumper answers with instead of the upstream's: HTML, JSON or plain text, by Accept."""

from __future__ import annotations

import html
import json

from mitmproxy import http


def render(heading: str, fields: dict[str, str], accept: str) -> tuple[bytes, str]:
    """The body and its content type, as the client's Accept header prefers."""
    if "application/json" in accept:
        return json.dumps(fields).encode() + b"\n", "application/json"
    if "text/html" in accept:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields.items())
        body = f"<!doctype html><title>bumper: {html.escape(heading)}</title><h1>{html.escape(heading)}</h1>"
        return f"{body}<table>{rows}</table>\n".encode(), "text/html; charset=utf-8"
    return "".join(f"{k}: {v}\n" for k, v in fields.items()).encode(), "text/plain; charset=utf-8"


def response(status: int, heading: str, fields: dict[str, str], request: http.Request) -> http.Response:
    body, content_type = render(heading, fields, request.headers.get("accept", ""))
    return http.Response.make(status, body, {"content-type": content_type, "cache-control": "no-store"})
