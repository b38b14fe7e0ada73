"""Bumped HTTP/1.1 through bumper's own relay (bumper/proxy/h1relay.py), and what it hands over to the
HTTP layer: real clients on one keep-alive connection, each case followed by a plain request that
must still be answered. Everything else of HTTP/1 (limits, truncation, addons, refusals) runs through
the relay in the rest of the suite (an upstream closed between requests: test_upstream_idle)."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from collections.abc import Iterator

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow

from bumper.proxy import overload
from bumper.proxy.h1relay import Http1Relay, relays
from bumper.proxy.limits import Limits
from bumper.proxy.master import STREAM_BODIES_OVER
from tests.conftest import Bumper, Upstream, client_tls_context, open_tunnel

PLAIN = "hello from upstream"


@pytest.fixture
def tls(bumper: Bumper, upstream: Upstream) -> Iterator[ssl.SSLSocket]:
    """A bumped HTTP/1.1 connection to the upstream."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    with client_tls_context(bumper.ca_pem, alpn=["http/1.1"]).wrap_socket(sock, server_hostname=upstream.host) as s:
        yield s


def request(host: str, path: str, method: str = "GET", body: bytes = b"", *headers: str) -> bytes:
    """A request head with HEADERS (a Content-Length for a POST, unless they name one), then BODY."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    if method == "POST" and not any(h.lower().startswith("content-length") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reader:
    """Responses off one connection, framed by Content-Length or chunked encoding."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the connection closed"
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *fields = head.decode().split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                self._take(2)
            self._take(2)  # no trailers
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body


def test_requests_on_one_connection_are_each_answered_and_counted(
    bumper: Bumper, upstream: Upstream, tls: ssl.SSLSocket
) -> None:
    reader = Reader(tls)
    for i in range(5):
        tls.sendall(request(upstream.host, f"/echo?{i}"))
        assert reader.response()[::2] == (200, str(i).encode())
    port = tls.getsockname()[1]
    tls.sendall(request(upstream.host, "/", "GET", b"", "Connection: close"))
    assert reader.response()[::2] == (200, PLAIN.encode())
    assert bumper.connection_line(port).endswith(" requests=6 outcome=ok")


def test_pipelined_requests_are_answered_in_order(upstream: Upstream, tls: ssl.SSLSocket) -> None:
    tls.sendall(b"".join(request(upstream.host, f"/echo?{name}") for name in ("first", "second", "third")))
    reader = Reader(tls)
    assert [reader.response()[2] for _ in range(3)] == [b"first", b"second", b"third"]


def test_a_post_body_reaches_the_upstream_whole(upstream: Upstream, tls: ssl.SSLSocket) -> None:
    body = bytes(range(256)) * 1000
    tls.sendall(request(upstream.host, "/upload", "POST", body))
    status, _, answer = Reader(tls).response()
    assert status == 200
    assert json.loads(answer) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_a_chunked_response_is_handed_over_and_the_connection_goes_on(upstream: Upstream, tls: ssl.SSLSocket) -> None:
    """The upstream streams /bytes/N without a length (chunked): the HTTP layer takes the connection."""
    reader = Reader(tls)
    tls.sendall(request(upstream.host, "/"))
    assert reader.response()[2] == PLAIN.encode()
    tls.sendall(request(upstream.host, "/bytes/300000"))
    status, headers, body = reader.response()
    assert (status, headers["transfer-encoding"], len(body)) == (200, "chunked", 300000)
    assert hashlib.sha256(body).hexdigest() == headers["x-sha256"]
    tls.sendall(request(upstream.host, "/echo?after"))
    assert reader.response()[2] == b"after"


def test_a_request_that_expects_100_continue_is_handed_over(upstream: Upstream, tls: ssl.SSLSocket) -> None:
    body = b"x" * 5000
    tls.sendall(request(upstream.host, "/upload", "POST", b"", "Expect: 100-continue", f"Content-Length: {len(body)}"))
    reader = Reader(tls)
    assert reader.response()[0] == 100
    tls.sendall(body)
    status, _, answer = reader.response()
    assert (status, json.loads(answer)["length"]) == (200, len(body))
    tls.sendall(request(upstream.host, "/echo?after"))
    assert reader.response()[2] == b"after"


def test_a_request_over_the_streaming_threshold_is_handed_over(upstream: Upstream, tls: ssl.SSLSocket) -> None:
    body = b"y" * (1024 * 1024 + 1)  # over master.STREAM_BODIES_OVER: streamed, not held by the relay
    tls.sendall(request(upstream.host, "/upload", "POST", body))
    status, _, answer = Reader(tls).response()
    assert (status, json.loads(answer)["sha256"]) == (200, hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize(
    ("alpn", "setting", "relayed"),
    [
        (b"http/1.1", {}, True),
        (None, {}, True),  # no ALPN: HTTP/1.1
        (b"h2", {}, False),  # HTTP/2 stays with mitmproxy's layers (and h2flow)
        (b"http/1.1", {"body_size_limit": "10m"}, False),  # options the relay would have to honour
        (b"http/1.1", {"store_streamed_bodies": True}, False),
        (b"http/1.1", {"stream_large_bodies": None}, False),
    ],
)
def test_the_relay_takes_http1_with_bumpers_body_options_only(
    alpn: bytes | None, setting: dict[str, object], relayed: bool
) -> None:
    client = tflow.tclient_conn()
    client.alpn = alpn
    with taddons.context(Proxyserver()) as tctx:  # the addon that declares the body options
        tctx.configure(Proxyserver(), stream_large_bodies=STREAM_BODIES_OVER)
        tctx.options.update(**setting)
        assert relays(context.Context(client, tctx.options)) is relayed


def test_what_the_relay_holds_counts_towards_the_memory_budget() -> None:
    """The overload manager's walk (overload.held_by) finds the relay's buffers: a request body on its
    way, a response not yet whole."""
    client = tflow.tclient_conn()
    with taddons.context(Proxyserver()) as tctx:
        tctx.configure(Proxyserver(), stream_large_bodies=STREAM_BODIES_OVER)
        relay = Http1Relay(context.Context(client, tctx.options), Limits(), hooks=None)  # no hook runs here
    relay.client_buf.extend(b"x" * 700_000)
    relay.server_buf.extend(b"y" * 300_000)
    assert sum(map(overload._held_by_layer, overload.layers_under(relay))) == 1_000_000
