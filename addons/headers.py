"""headers: add, set or remove request and response headers; strip Authorization towards hosts
that are not on an allow-list (credentials sent only where they belong)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mitmproxy import http

from bumper.addon import Addon
from bumper.policy import names

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name


@dataclass(frozen=True)
class Edits:
    add: dict[str, str] = field(default_factory=dict)  # appended, next to any the message has
    set: dict[str, str] = field(default_factory=dict)  # replaces every one of that name
    remove: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (*self.add, *self.set, *self.remove):
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"bad header name {name!r}")
        for value in (*self.add.values(), *self.set.values()):
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header value {value!r} holds a line break or NUL")

    def apply(self, headers: http.Headers) -> None:
        for name in self.remove:
            headers.pop(name, None)
        for name, value in self.set.items():
            headers[name] = value
        for name, value in self.add.items():
            headers.add(name, value)


@dataclass(frozen=True)
class HeadersSettings:
    request: Edits = Edits()
    response: Edits = Edits()
    # When given, Authorization is removed from requests to every host not matching these patterns.
    keep_authorization_for: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.keep_authorization_for is not None:
            names.checked_patterns(self.keep_authorization_for)


class Headers(Addon):
    name = "headers"
    Settings = HeadersSettings

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        allowed = self.settings.keep_authorization_for
        if allowed is not None and not names.matches_any(allowed, flow.request.pretty_host):
            flow.request.headers.pop("authorization", None)
        self.settings.request.apply(flow.request.headers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            self.settings.response.apply(flow.response.headers)
