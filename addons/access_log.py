"""access_log: one JSON line per HTTP exchange and one per client connection (bumped, spliced or
blocked), to a file or stdout. The field names are a stable interface: docs/addons.md lists them."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from mitmproxy import connection, http
from mitmproxy.utils import human

from bumper.addon import Addon, ConnectionInfo, aborted, body_bytes, connection_info, logged_url, refusal_of
from bumper.certs.ca import fingerprint
from bumper.certs.compare import name_text
from bumper.clock import iso_utc
from bumper.policy import redact, urls


@dataclass(frozen=True)
class AccessLogSettings:
    path: str = "-"  # a file (appended to, created 0600) or - for stdout
    # Credentials (secret-looking URL parameters, a URL's password) are masked unless true: for labs.
    log_secrets: bool = False

    def __post_init__(self) -> None:
        if self.path == "-":
            return
        target = Path(self.path)
        if target.is_dir():
            raise ValueError(f"{self.path} is a directory")
        writable = os.access(target, os.W_OK) if target.exists() else os.access(target.parent, os.W_OK | os.X_OK)
        if not writable:
            raise ValueError(f"cannot write {self.path}: no such directory, or no permission")


FLUSH_DELAY = 0.1  # seconds a line may wait in the buffer


class AccessLog(Addon):
    name = "access_log"
    Settings = AccessLogSettings

    def __init__(self, settings: AccessLogSettings) -> None:
        super().__init__(settings)
        self._file: IO[str] | None = None
        self._flush: asyncio.TimerHandle | None = None
        # The JSON of the fields every request of a connection shares: by client id, then upstream
        # connection and the policy's verdict on it.
        self._shared: dict[str, dict[tuple[str | None, ...], str]] = {}

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(exchange(flow, self._connection_json(flow), self.settings.log_secrets))

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or aborted(flow):
            self._write(exchange(flow, self._connection_json(flow), self.settings.log_secrets))

    def connection_end(self, conn: ConnectionInfo) -> None:
        self._shared.pop(conn.conn.id, None)
        self._write(connection_line(conn, self.settings.log_secrets))

    def _connection_json(self, flow: http.HTTPFlow) -> str:
        """The connection's fields of FLOW's line, as JSON: built once per connection and upstream,
        since every request on them repeats them (the policy's verdict is part of the key)."""
        conn = connection_info(flow)
        client, server = flow.client_conn, flow.server_conn
        if server.timestamp_tcp_setup is None:  # not connected (yet): nothing fixed to keep
            return connection_json(conn, client, server)
        key = (server.id, conn.connect_host, conn.rule, conn.action, conn.verify, conn.user) if conn else (server.id,)
        by_connection = self._shared.setdefault(client.id, {})
        text = by_connection.get(key)
        if text is None:
            text = by_connection[key] = connection_json(conn, client, server)
        return text

    def reopen(self) -> None:
        """SIGUSR1, after logrotate moved the file: the next line starts a new one."""
        self.done()

    def done(self) -> None:
        self._flushed()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def _write(self, line: str) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(line)
        # Written out within FLUSH_DELAY, not line by line: one write for many busy requests.
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flushed)

    def _flushed(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._file is not None:
            self._file.flush()

    def _open(self) -> IO[str]:
        if self.settings.path == "-":
            return sys.stdout
        # URLs and client addresses are personal data: readable by the proxy's user only.
        fd = os.open(self.settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")


def exchange(flow: http.HTTPFlow, connection_fields: str, log_secrets: bool = False) -> str:
    request, response = flow.request, flow.response
    shown = _shown(log_secrets)
    refusal = refusal_of(flow)
    ended = (response.timestamp_end if response and response.timestamp_end else None) or time.time()
    head = {"type": "http", "time": _iso(request.timestamp_start), "id": flow.id, "connection": flow.client_conn.id}
    shown_url = str if log_secrets else redact.url
    logged = shown_url(logged_url(flow))
    tail = {
        "method": request.method,
        "url": logged,
        # What URL rules matched on (as the upstream reads it), next to what was sent: from the logged
        # URL, so that what an addon masked in one stays masked in the other.
        "url_normalized": shown_url(urls.normalize(logged)),
        "status": response.status_code if response and not aborted(flow) else None,
        "bytes_up": body_bytes(flow, "request"),
        "bytes_down": body_bytes(flow, "response"),
        "request_ms": _ms(request.timestamp_start, ended),
        "blocked_by": refusal.addon if refusal else None,
        "reason": refusal.reason if refusal else None,
        "ref": refusal.ref if refusal else None,
        "error": shown(flow.error.msg) if flow.error else None,
    }
    return _line(head, connection_fields, tail)


def connection_line(conn: ConnectionInfo, log_secrets: bool = False) -> str:
    client = conn.conn
    head = {"type": "connection", "time": _iso(client.timestamp_start), "id": client.id}
    tail = {
        "requests": conn.requests,
        "truncated": conn.truncated,
        "duration_ms": _ms(client.timestamp_start, client.timestamp_end or time.time()),
        "outcome": _shown(log_secrets)(conn.outcome()),  # an error may quote the request
    }
    return _line(head, connection_json(conn, client, conn.server), tail)


def _shown(log_secrets: bool) -> Callable[[str], str]:
    """What a free-text field (an error, an outcome) may show."""
    return str if log_secrets else redact.text


def _line(head: dict[str, Any], connection_fields: str, tail: dict[str, Any]) -> str:
    """One JSON object: HEAD's fields, the connection's (already JSON, without braces), TAIL's."""
    return f"{_json(head)[:-1]},{connection_fields},{_json(tail)[1:]}\n"


_json = json.JSONEncoder(separators=(",", ":")).encode


def connection_json(conn: ConnectionInfo | None, client: connection.Client, server: connection.Server | None) -> str:
    """The fields a line shares with every line of its connection, as JSON members (no braces)."""
    tls = tls_fields(client, server)
    fields = {
        "client": tls["client"],
        "listener": conn.listener_name if conn else None,
        "user": conn.user if conn else None,
        "via": conn.via if conn else None,
        "connect_host": conn.connect_host if conn else None,
        "sni": client.sni,
        "upstream": tls["upstream"],
        "rule": conn.rule if conn else None,
        "action": conn.action if conn else None,
        "upstream_sha256": tls["upstream_sha256"],
        "upstream_issuer": tls["upstream_issuer"],
        "verify": conn.verify if conn else None,
        **{k: v for k, v in tls.items() if k not in _SHARED_FIRST},
    }
    return _json(fields)[1:-1]


_SHARED_FIRST = ("client", "upstream", "upstream_sha256", "upstream_issuer")


def tls_fields(client: connection.Client, server: connection.Server | None) -> dict[str, Any]:
    """The fields fixed once both handshakes are done: the same for every request on them."""
    upstream_cert = server.certificate_list[0] if server and server.certificate_list else None
    bumped = client.tls_established and client.mitmcert is not None
    return {
        "client": human.format_address(client.peername),
        "upstream": human.format_address(server.peername) if server and server.peername else None,
        "upstream_sha256": _sha256(upstream_cert.to_cryptography()) if upstream_cert else None,
        "upstream_issuer": _issuer(upstream_cert.to_cryptography()) if upstream_cert else None,
        "mimic_sha256": _sha256(client.mitmcert.to_cryptography()) if bumped and client.mitmcert else None,
        "client_tls_version": client.tls_version if bumped else None,
        "client_cipher": client.cipher if bumped else None,
        "upstream_tls_version": server.tls_version if server and server.tls_established else None,
        "upstream_cipher": server.cipher if server and server.tls_established else None,
        "alpn": client.alpn.decode(errors="replace") if bumped and client.alpn else None,
        "upstream_connect_ms": _ms(server.timestamp_start, server.timestamp_tcp_setup) if server else None,
        "upstream_tls_ms": _ms(server.timestamp_tcp_setup, server.timestamp_tls_setup) if server else None,
        # Server-first: the client's handshake resumes once the upstream's is done.
        "client_tls_ms": _ms(server.timestamp_tls_setup, client.timestamp_tls_setup) if server and bumped else None,
    }


# Every request of a connection names the same two certificates: work them out once.
@functools.lru_cache(maxsize=4096)
def _sha256(cert: x509.Certificate) -> str:
    return fingerprint(cert).replace(":", "").lower()


@functools.lru_cache(maxsize=4096)
def _issuer(cert: x509.Certificate) -> str:
    return name_text(cert, "issuer")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)  # the same clock as bumper's stderr log


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
