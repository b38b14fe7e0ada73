"""example_tag: a small, real bumper addon to copy when you write your own (see docs/addons.md).

On each bumped request that its policy rule runs it on, it:

- refuses requests whose path is under one of `refuse_paths`, with bumper's refusal page (403 by
  default), before anything of the request goes upstream;
- tags every other request with a header (`X-Bumper-Rule: <the policy rule's name>` by default), so
  that the upstream, or a log behind it, can tell inspected traffic from the rest;
- when a client connection with refused requests ends, logs one line saying how many.

To try it, name it in a bump rule and start bumper with `--addons docs/examples`:

    rules:
      - name: inspect
        match:
          host: ["*.example.com"]
        action: bump
        addons:
          - example_tag:
              refuse_paths: [/admin, /debug]

To make it yours: copy this file into a directory of your own, rename the class, `name` and the
settings class, keep the hooks you need and delete the rest. Every Addon subclass in a file that
bumper loads must have a `name` of its own.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from mitmproxy import http

from bumper.addon import Addon, ConnectionInfo, Refuse, connection_info
from bumper.policy import urls

# Log through a child of "bumper.addons": bumper's own log set-up (stderr, its time format, -v)
# then applies, and the lines can be told apart by their text.
log = logging.getLogger("bumper.addons.example_tag")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a valid header name (RFC 9110 token)


@dataclass(frozen=True)
class ExampleTagSettings:
    """What a policy rule may set under `example_tag:`. bumper fills it from the YAML and checks every
    value against its type before the policy is accepted: a wrong type, an unknown key or a ValueError
    from __post_init__ is reported as FILE:LINE:COLUMN by `bumper policy check`, and bumper refuses
    to start (or keeps the policy in force, on a reload).

    Give every field a default, so that `- example_tag` alone, with no settings, is a valid entry.
    frozen=True: one instance of the addon is shared by every rule that names it with equal settings
    (and survives a policy reload), so settings must not change under it.
    """

    header: str = "X-Bumper-Rule"
    value: str = ""  # the header's value; empty: the name of the policy rule that bumped the connection
    refuse_paths: tuple[str, ...] = ()  # path prefixes, matched a segment at a time: /admin, not /administrator
    reason: str = "this path is not allowed through the proxy"  # shown on the refusal page and in the log
    status: int = 403

    def __post_init__(self) -> None:
        # A ValueError here is how a bad value reaches `bumper policy check`, with its line and column.
        if not _TOKEN.fullmatch(self.header):
            raise ValueError(f"bad header name {self.header!r}")
        if any(c in self.value for c in "\r\n\0"):
            raise ValueError(f"header value {self.value!r} holds a line break or NUL")
        for path in self.refuse_paths:
            if not path.startswith("/"):
                raise ValueError(f"refuse_paths: {path!r} must start with /")
        if not 400 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP error status (400-599)")


class ExampleTag(Addon):
    name = "example_tag"  # what policy rules write; unique among every addon bumper loads
    Settings = ExampleTagSettings

    @classmethod
    def blocks_with(cls, settings: ExampleTagSettings) -> bool:
        # With paths to refuse, this addon enforces something: if it fails (raises, or overruns its
        # time budget), the request is answered with a 502 instead of passing uninspected
        # (fail-closed). Without, it only tags, and a failure lets the request through (fail-open).
        # A policy can override either with `on_error:`.
        return bool(settings.refuse_paths)

    def __init__(self, settings: ExampleTagSettings) -> None:
        # bumper creates the instance when a connection first needs it, not at start-up. If this
        # raises, bumper logs `addon example_tag cannot start` once, fails each of its flows as
        # on_error says, and never retries: open files or connections lazily, in a hook, instead.
        super().__init__(settings)
        # Per-connection state, by client connection id. It is dropped in connection_end, or it
        # would grow for as long as bumper runs.
        self._refused: dict[str, int] = {}

    # Hooks. Each is optional: bumper calls only the ones a class defines. Plain functions are fine
    # for quick work like this; anything that waits on I/O must be `async def`, because a plain
    # function holds up every connection of the proxy while it runs.

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """The request line and headers are in; the body is not. The cheapest place to refuse:
        nothing has gone upstream yet, and bumper drops the body instead of forwarding it."""
        if prefix := self._refused_prefix(flow.request.path):
            client = flow.client_conn.id
            self._refused[client] = self._refused.get(client, 0) + 1
            # bumper answers with a page naming this addon, the reason and a reference id (the
            # access log's `ref`). Later addons in the chain do not see the request.
            raise Refuse(f"{self.settings.reason} ({prefix})", self.settings.status)
        # connection_info: what bumper knows of the connection (rule, SNI, verification...).
        # It is None only for flows that did not come through bumper's proxy (a unit test's).
        info = connection_info(flow)
        value = self.settings.value or (info.rule if info and info.rule else "-")
        flow.request.headers[self.settings.header] = value  # replaces any the client sent

    def _refused_prefix(self, target: str) -> str | None:
        """The refused prefix TARGET is under, or None. Matched on every way a server may read the
        target (urls.readings): `/%61dmin`, `/pub/../admin` and `//admin` are /admin to most servers,
        and the client chooses how to write it. The request itself goes on as the client sent it."""
        for reading in urls.readings(target):
            path = reading.partition("?")[0]
            for prefix in self.settings.refuse_paths:
                if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                    return prefix
        return None

    def connection_end(self, conn: ConnectionInfo) -> None:
        """Once per client connection whose rule runs this addon, after bumper's own log line."""
        refused = self._refused.pop(conn.conn.id, 0)
        if refused:
            log.info(
                "example_tag: %s %s %s: %d request%s refused (rule %s)",
                conn.client, conn.kind, conn.target, refused, "" if refused == 1 else "s", conn.rule,
            )  # fmt: skip

    # More hooks an addon may define (see docs/addons.md for when each runs):
    #   request(flow)              the whole request; flow.request.content only if it was buffered
    #   responseheaders(flow)      the upstream's status and headers; its body is still to come
    #   response(flow)             the whole response; flow.response.content only if buffered
    #   error(flow)                the flow failed (upstream gone, protocol error, client gone)
    #   request_data(flow, chunk) -> bytes, response_data(flow, chunk) -> bytes
    #                              each piece of a body as it streams; b"" marks the end. Plain
    #                              functions only. Defining one streams every body of the chain.
    #   websocket_start/websocket_message/websocket_end(flow)
    #   tls_clienthello(data), connection_bumped(conn)
    #   reopen()                   SIGUSR1: reopen your files after log rotation
    #   done()                     bumper is shutting down: close what you opened
