"""Truncation is never hidden (docs/security.md): an upstream that cuts a response off is seen as doing
so by a client through bumper, as it would be by the client talking to the upstream directly.

The upstream (tests/cutoff.py) ends each response as the path says. bumper buffers a body up to
1 MiB before it streams it: a body cut off within that reaches the client as bumper's 502 (nothing
was sent yet); one cut off later reaches it as the cut itself, a TLS close without close_notify
(HTTP/1.1) or a stream reset (h2). The clients are Python's ssl with ragged EOFs reported
(suppress_ragged_eofs=False), curl and openssl s_client.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import cutoff
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, open_tunnel, start_with_policy
from tests.test_access_log import AccessLog
from tests.test_dlp import CARD

HOST = "cut.upstream.test"
BUFFERED = 400_000  # cut off while bumper still buffers the body (below 1 MiB)
STREAMED = 3_000_000  # cut off after bumper started streaming it
TRUNCATED = (
    "outcome=upstream truncated: the connection ended without TLS close_notify inside a body only its end"
    " delimits (no Content-Length, not chunked)"
)


@pytest.fixture(scope="module")
def cut_upstream(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    cert, key = test_pki.root.leaf(f"*.{HOST.partition('.')[2]}").write(tmp_path_factory.mktemp("cutoff"), "cut")
    yield from cutoff.serve(cert, key)


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[int]:
    yield from cutoff.serve_plain()


@pytest.fixture(scope="module")
def logged(start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory) -> tuple[Bumper, AccessLog]:
    path = tmp_path_factory.mktemp("truncation-log") / "access.jsonl"
    return start_bumper("--access-log", str(path)), AccessLog(path)


@dataclass
class Seen:
    """What a client that checks for close_notify saw of one HTTP/1.1 response."""

    status: int
    body: bytes
    ending: str  # "close_notify", or "no close_notify" (Python's SSLEOFError)
    client_port: int


def fetch_through(bumper: Bumper, port: int, path: str) -> Seen:
    sock, reply = open_tunnel(bumper, HOST, port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return _fetch(sock, client_tls_context(bumper.ca_pem, alpn=["http/1.1"]), path)


def fetch_directly(root_pem: Path, port: int, path: str) -> Seen:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    return _fetch(sock, client_tls_context(root_pem, alpn=["http/1.1"]), path)


def _fetch(sock: socket.socket, context: ssl.SSLContext, path: str) -> Seen:
    client_port = sock.getsockname()[1]
    with context.wrap_socket(sock, server_hostname=HOST, suppress_ragged_eofs=False) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        data, ending = b"", "close_notify"
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except ssl.SSLEOFError:
            ending = "no close_notify"
    head, _, body = data.partition(b"\r\n\r\n")
    return Seen(int(head.split(b" ")[1]), body, ending, client_port)


def run_curl(bumper: Bumper, port: int, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-x", bumper.proxy, "--cacert", str(bumper.ca_pem), *args,
         "-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"https://{HOST}:{port}{path}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_body_cut_off_while_streaming_ends_without_close_notify(
    logged: tuple[Bumper, AccessLog], cut_upstream: int, test_pki: Pki
) -> None:
    """A close-delimited body that the upstream ends with a TCP FIN and no close_notify: the client
    sees what it sees directly, the bytes and then an EOF without close_notify; not a clean end."""
    bumper, access = logged
    path = f"/fin/{STREAMED}"
    direct = fetch_directly(test_pki.root_pem, cut_upstream, path)
    seen = fetch_through(bumper, cut_upstream, path)
    assert (direct.status, len(direct.body), direct.ending) == (200, STREAMED, "no close_notify")
    assert (seen.status, len(seen.body), seen.ending) == (200, STREAMED, "no close_notify")
    assert bumper.connection_line(seen.client_port).endswith(TRUNCATED)
    exchange = access.http(seen.client_port)
    assert (exchange["status"], exchange["bytes_down"]) == (None, STREAMED)
    assert exchange["error"] == TRUNCATED.removeprefix("outcome=")
    connection = access.connection(seen.client_port)
    assert (connection["truncated"], connection["outcome"]) == (1, TRUNCATED.removeprefix("outcome="))


def test_a_body_cut_off_before_any_of_it_was_sent_is_a_502(logged: tuple[Bumper, AccessLog], cut_upstream: int) -> None:
    """Cut off within the part bumper buffers: the client has nothing yet, and gets bumper's 502
    naming the truncation (curl too, which does not tell a missing close_notify from one)."""
    bumper, access = logged
    seen = fetch_through(bumper, cut_upstream, f"/fin/{BUFFERED}")
    assert (seen.status, seen.ending) == (502, "close_notify")  # the 502 itself is complete
    assert b"upstream truncated" in seen.body, seen.body
    assert bumper.connection_line(seen.client_port).endswith(TRUNCATED)
    assert access.connection(seen.client_port)["truncated"] == 1
    result = run_curl(bumper, cut_upstream, f"/fin/{BUFFERED}", "--http1.1")
    assert result.stdout.startswith("502 "), result


def test_a_reset_upstream_is_not_a_complete_body(logged: tuple[Bumper, AccessLog], cut_upstream: int) -> None:
    """A TCP reset: the kernel drops what bumper had not read yet, so how much arrives varies; the
    client sees the cut either way (a 502, or an EOF without close_notify)."""
    bumper, _ = logged
    seen = fetch_through(bumper, cut_upstream, f"/rst/{STREAMED}")
    assert (seen.status, seen.ending) in ((502, "close_notify"), (200, "no close_notify")), seen.status
    assert bumper.connection_line(seen.client_port).endswith(TRUNCATED)


@pytest.mark.parametrize("size", [BUFFERED, STREAMED])
def test_a_body_ended_with_close_notify_ends_cleanly(
    logged: tuple[Bumper, AccessLog], cut_upstream: int, size: int
) -> None:
    """No false alarm: close_notify, then the TCP close, is a close-delimited body's proper end."""
    bumper, access = logged
    seen = fetch_through(bumper, cut_upstream, f"/notify/{size}")
    assert (seen.status, len(seen.body), seen.ending) == (200, size, "close_notify")
    assert bumper.connection_line(seen.client_port).endswith(" requests=1 outcome=ok")
    assert access.connection(seen.client_port)["truncated"] == 0


def test_openssl_s_client_tells_a_truncated_body(bumper: Bumper, cut_upstream: int) -> None:
    """s_client (OpenSSL 3) fails on a TCP close without close_notify, and exits 0 after one."""

    def s_client(ending: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-ign_eof", "-quiet", "-connect", f"127.0.0.1:{cut_upstream}",
             "-proxy", f"127.0.0.1:{bumper.port}", "-servername", HOST, "-verify_hostname", HOST,
             "-CAfile", str(bumper.ca_pem), "-verify_return_error", "-alpn", "http/1.1"],
            input=f"GET /{ending}/{STREAMED} HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
            capture_output=True, text=True, errors="replace", timeout=60,
        )  # fmt: skip

    cut, whole = s_client("fin"), s_client("notify")
    assert cut.returncode != 0 and "unexpected eof" in cut.stderr, cut.stderr
    assert whole.returncode == 0, whole.stderr


@pytest.mark.parametrize(
    "ending,reason",
    [
        ("short", "peer closed connection without sending complete message body (received"),
        ("chunked", "peer closed connection without sending complete message body (incomplete chunked read)"),
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_shorter_than_its_framing_says(
    logged: tuple[Bumper, AccessLog], cut_upstream: int, ending: str, reason: str
) -> None:
    """Content-Length not reached, a chunk cut off (then close_notify): what already worked stays so.
    Buffered: a 502. Streamed: curl sees the framing fall short; Python sees no close_notify too."""
    bumper, access = logged
    buffered = fetch_through(bumper, cut_upstream, f"/{ending}/{BUFFERED}")
    assert buffered.status == 502 and reason.encode() in buffered.body, buffered.body
    streamed = fetch_through(bumper, cut_upstream, f"/{ending}/{STREAMED}")
    assert (streamed.status, streamed.ending) == (200, "no close_notify")
    assert reason in bumper.connection_line(streamed.client_port)
    assert reason in access.http(streamed.client_port)["error"]
    result = run_curl(bumper, cut_upstream, f"/{ending}/{STREAMED}", "--http1.1")
    assert result.returncode == 18, result  # CURLE_PARTIAL_FILE


def test_an_h2_stream_reset_reaches_the_client(bumper: Bumper, cut_upstream: int) -> None:
    """The upstream resets its h2 stream: buffered, the client gets a 502; streamed, a reset of its
    own stream (curl: 'HTTP/2 stream 1 was not closed cleanly')."""
    buffered = run_curl(bumper, cut_upstream, "/h2/10000", "--http2")
    assert buffered.stdout.startswith("502 "), buffered
    streamed = run_curl(bumper, cut_upstream, f"/h2/{STREAMED}", "--http2")
    assert streamed.returncode == 92 and "not closed cleanly" in streamed.stderr, streamed


def test_plain_http_passes_the_close_on(bumper: Bumper, plain_upstream: int) -> None:
    """Over plain http a close-delimited body ends with the connection, and nothing can tell a cut
    from the end: the client gets the bytes and the close, as it would directly, and outcome=ok."""
    sock = socket.create_connection(("127.0.0.1", bumper.port), timeout=15)
    client_port = sock.getsockname()[1]
    sock.sendall(f"GET http://{HOST}:{plain_upstream}/fin/{BUFFERED} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == BUFFERED
    assert bumper.connection_line(client_port, kind="HTTP").endswith(" requests=1 outcome=ok")


def test_a_response_bumper_cuts_off_ends_without_close_notify(
    start_bumper: Callable[..., Bumper], upstream: Upstream, tmp_path: Path
) -> None:
    """bumper's own cut-offs go the same way: dlp stops a response whose head the client already has."""
    host = "responses.upstream.test"
    policy = (
        "default: bump\n"
        "rules:\n"
        f"  - match: {{sni: [{host}]}}\n"
        "    action: bump\n"
        "    addons:\n"
        "      - dlp: {action: block, scan: [body], responses: true}\n"
    )
    bumper = start_with_policy(start_bumper, tmp_path, policy)
    sock, reply = open_tunnel(bumper, host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    context = client_tls_context(bumper.ca_pem, alpn=["http/1.1"])
    with context.wrap_socket(sock, server_hostname=host, suppress_ragged_eofs=False) as tls:
        tls.sendall(f"GET /echo?{CARD} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        with pytest.raises(ssl.SSLEOFError):
            while chunk := tls.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200") and CARD.encode() not in data
