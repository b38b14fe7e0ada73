"""The JSON records of a client connection that both logs write: the access log's "type":"connection"
line (addons/access_log.py) and, with --log-format json, the connection log on stderr. One copy, so
that the two cannot drift apart in their field names."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from mitmproxy import connection
from mitmproxy.utils import human

from bumper.certs.ca import fingerprint
from bumper.certs.compare import name_text
from bumper.clock import iso_utc
from bumper.policy import redact
from bumper.proxy.state import ConnectionState


def connection_line(conn: ConnectionState, log_secrets: bool = False, worker: int | None = None) -> str:
    client = conn.conn
    head = {"type": "connection", "time": iso(client.timestamp_start), "id": client.id}
    tail = {
        "requests": conn.requests,
        "truncated": conn.truncated,
        "duration_ms": ms(client.timestamp_start, client.timestamp_end or time.time()),
        "outcome": free_text(log_secrets)(conn.outcome()),  # an error may quote the request
    }
    return json_line(head, connection_json(conn, client, conn.server), tail, worker)


def free_text(log_secrets: bool) -> Callable[[str], str]:
    """What a free-text field (an error, an outcome) may show."""
    return str if log_secrets else redact.text


def json_line(head: dict[str, Any], connection_fields: str, tail: dict[str, Any], worker: int | None = None) -> str:
    """One JSON object: HEAD's fields, the connection's (already JSON, without braces), WORKER's
    number (a worker process's, --workers: so that one access log written by several processes still
    says which served what; nothing in a lone process), TAIL's."""
    worker_member = "" if worker is None else f',"worker":{worker}'
    return f"{_json(head)[:-1]},{connection_fields}{worker_member},{_json(tail)[1:]}\n"


_json = json.JSONEncoder(separators=(",", ":")).encode


def connection_json(conn: ConnectionState | None, client: connection.Client, server: connection.Server | None) -> str:
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
        "upstream_connect_ms": ms(server.timestamp_start, server.timestamp_tcp_setup) if server else None,
        "upstream_tls_ms": ms(server.timestamp_tcp_setup, server.timestamp_tls_setup) if server else None,
        # Server-first: the client's handshake resumes once the upstream's is done.
        "client_tls_ms": ms(server.timestamp_tls_setup, client.timestamp_tls_setup) if server and bumped else None,
    }


# Every request of a connection names the same two certificates: work them out once.
@functools.lru_cache(maxsize=4096)
def _sha256(cert: x509.Certificate) -> str:
    return fingerprint(cert).replace(":", "").lower()


@functools.lru_cache(maxsize=4096)
def _issuer(cert: x509.Certificate) -> str:
    return name_text(cert, "issuer")


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)  # the same clock as bumper's stderr log


def ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
