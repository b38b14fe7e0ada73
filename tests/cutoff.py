"""An HTTPS upstream that ends its responses the ways a truncating (or honest) server does, under the
tests' control: the request path says how. bumper must pass each ending on so that a client can tell
a cut-off body from a complete one (docs/security.md, "Truncation is never hidden").

    /ENDING/SIZE    a 200 whose body is SIZE pattern bytes, framed and ended as ENDING says:
      fin           no Content-Length, not chunked (the body ends with the connection), then a TCP
                    FIN without TLS close_notify: truncated, and only the missing close_notify says so
      rst           the same, ended with a TCP reset (SO_LINGER 0)
      notify        the same, ended with close_notify, then FIN: a complete close-delimited body
      short         Content-Length: 2 * SIZE, SIZE bytes sent, then close_notify and FIN
      chunked       chunked, one chunk announced at 2 * SIZE, SIZE bytes of it sent, then close_notify

HTTP/2 (ALPN h2) answers any request with its headers and SIZE bytes of DATA (SIZE from the path's
last segment; sent as bumper's flow-control windows open), then resets the stream
(RST_STREAM INTERNAL_ERROR).

serve_plain: the same HTTP/1.1 answers in clear text (plain http, where a FIN is all there is).
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events

from tests.conftest import tcp_server
from tests.upstream import pattern_bytes

_TIMEOUT = 10.0


def serve(cert: Path, key: Path) -> Iterator[int]:
    """Yields the port of a cut-off upstream with the certificate CERT, until the test ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])

    def handle(conn: socket.socket) -> None:
        conn.settimeout(_TIMEOUT)
        try:
            tls = context.wrap_socket(conn, server_side=True)
            if tls.selected_alpn_protocol() == "h2":
                _reset_h2_stream(tls)
            else:
                _answer_http1(tls)
        except OSError:
            pass  # the client (bumper) went away first: nothing to end

    yield from tcp_server(handle, max_connections=100)


def serve_plain() -> Iterator[int]:
    """Yields the port of a cut-off upstream in clear text (HTTP/1.1 only), until the test ends."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(_TIMEOUT)
        try:
            _answer_http1(conn)
        except OSError:
            pass

    yield from tcp_server(handle, max_connections=100)


def _answer_http1(tls: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
        head += chunk
    _, ending, size = head.split(b" ", 2)[1].decode().split("/")
    body = pattern_bytes(int(size))
    if ending == "short":
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * len(body)) + body)
    elif ending == "chunked":
        tls.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (2 * len(body)) + body)
    else:
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n" + body)
    if ending == "fin":
        tls.shutdown(socket.SHUT_RDWR)  # a TCP FIN; no close_notify: Python sends it only in unwrap()
    elif ending == "rst":
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif isinstance(tls, ssl.SSLSocket):
        try:
            tls.unwrap()  # close_notify; then waits for the peer's, which bumper sends as it closes
        except (OSError, ssl.SSLError):
            pass  # the peer closed without answering: ours went out all the same
    tls.close()


def _reset_h2_stream(tls: ssl.SSLSocket) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    pending: dict[int, bytes] = {}  # what each stream has still to send before its reset
    while data := tls.recv(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                pending[event.stream_id] = pattern_bytes(int(path.rsplit(b"/", 1)[1]))
                conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/octet-stream")])
        for stream_id, body in list(pending.items()):  # as far as bumper's windows allow (a WINDOW_UPDATE: more)
            while body and (size := min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)):
                conn.send_data(stream_id, body[:size])
                body = body[size:]
            pending[stream_id] = body
            if not body:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                del pending[stream_id]
        tls.sendall(conn.data_to_send())
    tls.close()
