"""How long anything may wait and how much any client may hold: bumper's limits, as plain data.

bumper/proxy/connlimits.py enforces the deadlines and connection counts; the protocol layers
(bumper/proxy/layers.py, httpstream.py) the sizes and the HTTP/2 limits. Every limit that fires
ends the connection's one log line with `outcome=limit: ...`, naming the setting to change.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# File descriptors kept free of client and upstream connections: the CA directory, the mimic
# cache, the addons' files, the key worker's pipes, the listening sockets.
FD_RESERVE = 64


def _limit(default: Any, flag: str, metavar: str, help: str, anchor: str) -> Any:
    return field(default=default, metadata={"flag": flag, "metavar": metavar, "help": help, "anchor": anchor})


@dataclass(frozen=True)
class Limits:
    """Every limit, with its command-line flag and its anchor in Envoy's and HAProxy's defaults
    (docs/limits.md is written from the same table)."""

    request_timeout: float = _limit(
        10.0, "--request-timeout", "SECONDS",
        "time a new connection has to send its first complete request head, CONNECT or plain http:// (slowloris)",
        "HAProxy timeout http-request (10s in its shipped configurations); Envoy request_headers_timeout (off)",
    )  # fmt: skip
    client_hello_timeout: float = _limit(
        15.0, "--client-hello-timeout", "SECONDS",
        "time from the CONNECT's 200 to the client's complete ClientHello",
        "Envoy listener_filters_timeout (15s, the TLS inspector's wait for the ClientHello)",
    )  # fmt: skip
    upstream_timeout: float = _limit(
        10.0, "--upstream-timeout", "SECONDS",
        "time for the upstream's TCP connect, and again for its TLS handshake",
        "Envoy cluster connect_timeout (5s); HAProxy timeout connect (5s to 10s in its shipped configurations)",
    )  # fmt: skip
    idle_timeout: int = _limit(
        600, "--idle-timeout", "SECONDS",
        "time a connection (tunnel, spliced or bumped, or keep-alive) may pass without a byte either way",
        "Envoy idle_timeout (1h) and tcp_proxy idle_timeout (1h); HAProxy timeout client/tunnel (1m/1h typical)",
    )  # fmt: skip
    upstream_idle_timeout: float = _limit(
        10.0, "--upstream-idle-timeout", "SECONDS",
        "time an upstream connection may stay open with no request on it; the client's connection"
        " stays, and its next request opens a new upstream connection (0: kept as long as the client's)",
        "Squid server_idle_pconn_timeout (1m); Envoy cluster idle_timeout (1h); nginx keepalive_timeout"
        " upstream (60s); Apache KeepAliveTimeout, the upstream's own side (5s)",
    )  # fmt: skip
    max_header_bytes: int = _limit(
        60 * 1024, "--max-header-bytes", "BYTES",
        "request line and headers of one request, HTTP/1 and HTTP/2 (the CONNECT line included),"
        " and an upstream's HTTP/1 response head",
        "Envoy max_request_headers_kb (60 KiB); HAProxy tune.bufsize less tune.maxrewrite (15 KiB)",
    )  # fmt: skip
    max_headers: int = _limit(
        100, "--max-headers", "N",
        "header fields in one request, HTTP/1 and HTTP/2, and in an upstream's HTTP/1 response",
        "Envoy max_headers_count (100, both ways); HAProxy tune.http.maxhdr (101, both ways)",
    )  # fmt: skip
    response_head_timeout: float = _limit(
        10.0, "--response-head-timeout", "SECONDS",
        "time from the first byte of an upstream's HTTP/1 response head to its end (a slowloris upstream)",
        "the request head's --request-timeout (HAProxy timeout http-request, 10s); Envoy and HAProxy: none of"
        " their own (Envoy's route timeout, 15s, bounds the whole response; HAProxy's timeout server each read)",
    )  # fmt: skip
    websocket_max_message: int = _limit(
        16 * 1024 * 1024, "--websocket-max-message", "BYTES",
        "one WebSocket message, which bumper assembles before it relays it (close code 1009 above it)",
        "uvicorn ws_max_size and hypercorn websocket_max_message_size (16 MiB); Envoy and HAProxy relay"
        " frames and have none",
    )  # fmt: skip
    max_client_hello_bytes: int = _limit(
        64 * 1024, "--max-client-hello-bytes", "BYTES",
        "size of the client's ClientHello, however many TLS records carry it",
        "Envoy tls_inspector (64 KiB); HAProxy tune.bufsize (16 KiB)",
    )  # fmt: skip
    h2_max_streams: int = _limit(
        100, "--h2-max-streams", "N",
        "concurrent HTTP/2 streams a client may open on one connection (SETTINGS_MAX_CONCURRENT_STREAMS)",
        "HAProxy tune.h2.fe.max-concurrent-streams (100); Envoy max_concurrent_streams (2^31-1, 100 at the edge)",
    )  # fmt: skip
    h2_max_resets: int = _limit(
        100, "--h2-max-resets", "N",
        "HTTP/2 streams a client may reset before their response ends, once they are more than half "
        "of its streams (rapid reset, CVE-2023-44487)",
        "Envoy premature-reset check (more than half of the streams, checked after 500)",
    )  # fmt: skip
    h2_hpack_table_bytes: int = _limit(
        4096, "--h2-hpack-table-bytes", "BYTES",
        "HPACK dynamic table the client's encoder may use (SETTINGS_HEADER_TABLE_SIZE)",
        "Envoy hpack_table_size (4096); HAProxy tune.h2.header-table-size (4096)",
    )  # fmt: skip
    max_client_connections: int = _limit(
        512, "--max-client-connections", "N",
        "connections open at once from one client address; more are closed at once",
        "Envoy and HAProxy: none by default (HAProxy: a stick table and tcp-request connection reject)",
    )  # fmt: skip
    max_connections: int = _limit(
        0, "--max-connections", "N",
        "client connections open at once; at this many, new ones wait in the listen backlog "
        "(0: half the file-descriptor limit, which bumper raises to its hard limit at start)",
        "HAProxy maxconn (computed from ulimit -n); Envoy global_downstream_max_connections (none)",
    )  # fmt: skip

    def with_fd_limit(self, soft: int) -> Limits:
        """Each client connection can hold two descriptors (itself and its upstream)."""
        if self.max_connections > 0:
            return self
        return dataclasses.replace(self, max_connections=max(1, (soft - FD_RESERVE) // 2))


def flags() -> Iterator[dataclasses.Field[Any]]:
    """The limits, each with its flag, for the command line and the docs."""
    yield from dataclasses.fields(Limits)


# Linux's default ceiling on a process's open files (fs.nr_open).
_LINUX_NR_OPEN = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, as HAProxy and Envoy's packaging do; the new soft
    limit. A process cannot raise its hard limit: that is the operator's (`ulimit -Hn`, LimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _LINUX_NR_OPEN  # Linux refuses an unlimited RLIMIT_NOFILE
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have
    return hard if soft == resource.RLIM_INFINITY else min(soft, hard)


# The log wording: `limit: WHAT (--FLAG)`, the setting to change always last, in brackets.
LIMIT = "limit: "


def timed_out(what: str, seconds: float, flag: str) -> str:
    return f"{LIMIT}{what} within {seconds:g}s ({flag})"


def too_many(what: str, flag: str) -> str:
    return f"{LIMIT}{what} ({flag})"
