"""Bumped HTTP/1.1 relayed by bumper itself: the common case, without mitmproxy's HTTP machinery.

Below the client's TLS, mitmproxy runs four layers for an HTTP/1 connection (HttpLayer, Http1Server,
HttpStream, Http1Client) and passes every request through them as a dozen events and commands, each
routed by type through the layers between. That machinery was 30% of bumper's CPU per keep-alive
request (py-spy, bench workload 2). This layer does the common case in one place: a whole request
in hand, a whole response in hand, each parsed with mitmproxy's own parsers into a real HTTPFlow, the
same hooks in the same order (run where they are raised, as dispatch.in_place runs HttpStream's), and
each message sent in one write.

It acts only on complete messages it can prove mitmproxy would handle the plain way, and hands the
connection to bumper's HttpLayer for everything else, before it has done anything with the message
in question, so that the rest is exactly what bumper did before:
- a request that is not plain (a parse error, Transfer-Encoding, Upgrade, Expect, CONNECT, a head over
  --max-header-bytes, an ambiguous head, a body over the streaming threshold) or that the client ends
  half-sent: the successor gets the bytes as they came, from the request's first byte;
- a response that is not plain (an interim or 101 status, Transfer-Encoding or a body only the close
  delimits, a body over the streaming threshold, an invalid head, more than --max-headers fields, a
  head that did not come whole in the first read) or that the upstream ends half-sent: the successor
  is set up as mitmproxy's layers stand with the request sent and the response awaited
  (`_awaiting_response`), and gets the response's bytes as they came;
- an upstream connection that is gone before a request: the successor connects a new one, verified as
  the first was.
Once handed over, the connection stays with the successor.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from mitmproxy import flow, http
from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.net.http.validate import validate_headers
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HTTPMode,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
    validate_request,
)
from mitmproxy.utils import human

from bumper.proxy import httpstream, replies
from bumper.proxy.dispatch import AddonManager, in_place
from bumper.proxy.h2flow import Reading
from bumper.proxy.limits import Limits

# The end of a message head (RFC 9112, 2.2: a bare LF is accepted as a line end).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# The stream mitmproxy's Http1Server numbers a connection's first request with.
_FIRST_STREAM = 1
# What mitmproxy's HTTP/1 layer words an upstream's close before its response with; here, for the one
# case the successor cannot take: the upstream gone while a hook was waiting.
_SERVER_CLOSED = "server closed connection"


def relays(context: Context) -> bool:
    """Whether a bumped connection's HTTP goes to the relay: HTTP/1 on the client leg (h2 stays with
    mitmproxy's layers and h2flow), and no option that changes how mitmproxy's layers keep bodies."""
    options = context.options
    return (
        context.client.alpn != b"h2"
        and not options.body_size_limit
        and not options.store_streamed_bodies
        and human.parse_size(options.stream_large_bodies) is not None
    )


def _lines(head: bytes) -> list[bytes]:
    return [line.removesuffix(b"\r") for line in head.split(b"\n")]


def _streamed(message: http.Message, body: bytes, flw: http.HTTPFlow, side: str) -> bytes:
    """BODY through MESSAGE's stream callable, if it has one, as mitmproxy streams a body that came in
    one read (the data, then the end); the bytes counted as streamed (httpstream.body_bytes)."""
    stream = message.stream
    if not callable(stream):
        out = body
    else:
        out = b"".join(httpstream.chunks_of(stream(body)) if body else []) + b"".join(httpstream.chunks_of(stream(b"")))
    httpstream.count_streamed(flw, side, body)
    return out


class _NotPlain(Exception):
    """The message at hand is not one the relay takes: the HTTP layer's, from its first byte."""


def _request_head(lines: list[bytes]) -> tuple[http.Request, int | None]:
    request = http1.read_request_head(lines)
    return request, http1.expected_http_body_size(request)


def _whole[M: http.Message](
    buf: bytearray,
    max_head: int,
    wait_for_head: bool,
    parse: Callable[[list[bytes]], tuple[M, int | None]],
    plain: Callable[[M, int], bool],
) -> tuple[M, bytes] | None:
    """The message at the start of BUF, parsed and PLAIN by its body size (neither chunked nor until
    the close), taken out of BUF with its body once it is whole; None while it is not. _NotPlain for one
    the relay must not take: a head that does not parse, one over MAX_HEAD, or one not whole when
    not WAIT_FOR_HEAD."""
    end = _HEAD_END.search(buf, 0, max_head + 4)
    if end is None:
        if wait_for_head and len(buf) <= max_head and buf[:1] not in (b"\r", b"\n"):  # not leading blank lines
            return None
        raise _NotPlain
    try:
        message, size = parse(_lines(bytes(buf[: end.start()])))
    except ValueError:
        raise _NotPlain from None
    if size is None or not plain(message, size):
        raise _NotPlain
    if len(buf) < end.end() + size:
        return None  # the body is still coming, within what PLAIN allows
    body = bytes(buf[end.end() : end.end() + size])
    del buf[: end.end() + size]
    return message, body


class Http1Relay(layer.Layer):
    """One bumped HTTP/1.1 connection's requests, relayed while they are plain (module docstring), then
    its successor's: bumper's HttpLayer, which it hands every later event."""

    def __init__(self, context: Context, limits: Limits, hooks: AddonManager, reading: Reading | None = None) -> None:
        super().__init__(context)
        self.limits = limits
        self.hooks = hooks
        self.reading = reading
        stream_over = human.parse_size(context.options.stream_large_bodies)
        assert stream_over is not None  # relays() checked
        self.max_body = stream_over  # a body over it is streamed: the successor's
        self.client_buf = bytearray()  # the request being read (overload.held_by counts both)
        self.server_buf = bytearray()  # the response being read
        self.flow: http.HTTPFlow | None = None  # the request sent upstream, its response awaited
        self.child_layer: httpstream.HttpLayer | None = None  # the successor, once handed over

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.child_layer is not None:
            return (yield from self.child_layer.handle_event(event))
        yield from in_place(self._relay(event), self.hooks)

    def _relay(self, event: events.Event) -> layer.CommandGenerator[None]:
        client, server = self.context.client, self.context.server
        if isinstance(event, events.DataReceived):
            (self.client_buf if event.connection is client else self.server_buf).extend(event.data)
            if event.connection is client and self.flow is None:
                yield from self._request()
            elif event.connection is client and len(self.client_buf) > self.limits.max_header_bytes + self.max_body:
                yield from self._hand_over_response()  # pipelined past a whole request: held as mitmproxy holds it
            elif event.connection is server and self.flow is not None:
                yield from self._response()
            elif event.connection is server:  # nothing was asked: as mitmproxy's Http1Client, close
                yield commands.Log(f"Unexpected data from server: {bytes(self.server_buf)!r}")
                self.server_buf.clear()
                yield commands.CloseConnection(server)
        elif isinstance(event, events.ConnectionClosed):
            if event.connection is server and self.flow is None:
                if server.state & ConnectionState.CAN_WRITE:
                    yield commands.CloseConnection(server)  # the next request connects anew (the successor)
            elif event.connection is server:
                yield from self._hand_over_response(event)
            elif self.flow is not None:  # the client left while its response was awaited
                yield from self._hand_over_response(event)
            elif self.client_buf.strip():  # a request cut short: the successor words it
                yield from self._hand_over(event)
            elif client.state is not ConnectionState.CLOSED:  # not closed by the relay already (a cut-off)
                yield commands.CloseConnection(client)

    def _hand_over(self, *then: events.Event) -> layer.CommandGenerator[None]:
        """Hand the connection to bumper's HttpLayer, with the request bytes buffered and THEN."""
        successor = self._successor()
        yield from successor.handle_event(events.Start())
        yield from self._replay(successor, self.context.client, self.client_buf, *then)

    def _hand_over_response(self, *then: events.Event) -> layer.CommandGenerator[None]:
        """Hand the connection to bumper's HttpLayer while the response to the request the relay sent
        is awaited: the response bytes buffered, and THEN."""
        assert self.flow is not None
        successor = self._successor()
        yield from successor.handle_event(events.Start())
        yield from _awaiting_response(successor, self.flow)
        yield from self._replay(successor, self.context.server, self.server_buf)
        yield from self._replay(successor, self.context.client, self.client_buf, *then)
        self.flow = None

    def _successor(self) -> httpstream.HttpLayer:
        self.child_layer = httpstream.HttpLayer(
            self.context, HTTPMode.transparent, self.limits, self.hooks, reading=self.reading
        )
        return self.child_layer

    @staticmethod
    def _replay(
        successor: layer.Layer, connection: Connection, buf: bytearray, *then: events.Event
    ) -> layer.CommandGenerator[None]:
        if buf:
            data = bytes(buf)
            buf.clear()
            yield from successor.handle_event(events.DataReceived(connection, data))
        for event in then:
            yield from successor.handle_event(event)

    def _request(self) -> layer.CommandGenerator[None]:
        """The request in CLIENT_BUF, once it is all there: relayed, or handed over."""
        try:
            taken = _whole(self.client_buf, self.limits.max_header_bytes, True, _request_head, self._plain_request)
        except _NotPlain:
            return (yield from self._hand_over())
        if taken is not None:
            yield from self._exchange(*taken)

    def _plain_request(self, request: http.Request, size: int) -> bool:
        headers = request.headers
        server = self.context.server
        return (
            0 <= size <= self.max_body
            and request.method != "CONNECT"
            and "transfer-encoding" not in headers
            and "upgrade" not in headers
            and "expect" not in headers
            and not httpstream.ambiguous(request)
            and validate_request(HTTPMode.transparent, request, self.context.options.validate_inbound_headers) is None
            and server.connected
            and server.alpn != b"h2"
        )

    def _exchange(self, request: http.Request, body: bytes) -> layer.CommandGenerator[None]:
        """REQUEST, whole, through the hooks as mitmproxy's HttpStream raises them, then upstream."""
        server = self.context.server
        flw = http.HTTPFlow(self.context.client, server)
        flw.request = request
        flw.live = True
        assert server.address
        request.data.host, request.data.port = server.address[0], server.address[1]
        request.scheme = "https" if server.tls else "http"
        yield HttpRequestHeadersHook(flw)
        if (yield from self._killed(flw)):
            return
        if request.stream and body and flw.response is not None:
            # Answered before its body (respond_early): the body is dropped, and no request hook runs.
            request.timestamp_end = time.time()
            return (yield from self._answer(flw))
        if request.stream and body:  # streamed by an addon's choice: passed on, not kept (as HttpStream)
            body = _streamed(request, body, flw, "request")
            if flw.metadata.get(httpstream.EARLY):  # refused by the callable: nothing goes upstream
                request.timestamp_end = time.time()
                return (yield from self._answer(flw))
        else:
            request.data.content = body
        request.timestamp_end = time.time()
        yield HttpRequestHook(flw)
        if (yield from self._killed(flw)):
            return
        if flw.response is not None:  # answered by an addon (a refusal, an upload limit)
            return (yield from self._answer(flw))
        if not server.state & ConnectionState.CAN_WRITE:  # gone while a hook waited
            return (yield from self._upstream_gone(flw))
        self.flow = flw
        sent = body if request.stream else (request.raw_content or b"")
        yield commands.SendData(server, http1.assemble_request_head(request) + sent)

    def _answer(self, flw: http.HTTPFlow) -> layer.CommandGenerator[None]:
        """An addon's response instead of the upstream's, as HttpStream sends one."""
        assert flw.response is not None
        flw.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(flw)
        if (yield from self._killed(flw)):
            return
        yield from self._respond(flw)

    def _upstream_gone(self, flw: http.HTTPFlow) -> layer.CommandGenerator[None]:
        flw.error = flow.Error(_SERVER_CLOSED)
        yield HttpErrorHook(flw)
        flw.live = False
        reply = replies.protocol_error(httpstream.ErrorCode.GENERIC_SERVER_ERROR, _SERVER_CLOSED, flw.request)
        assert reply is not None
        response = httpstream.instead_of_mitmproxys(reply, flw.request)
        yield commands.SendData(self.context.client, http1.assemble_response(response))
        yield commands.CloseConnection(self.context.client)

    def _killed(self, flw: http.HTTPFlow, error_hook: bool = True) -> layer.CommandGenerator[bool]:
        """As HttpStream.check_killed: a flow an addon killed ends here, its client closed unanswered."""
        if not (flw.error and flw.error.msg == flow.Error.KILLED_MESSAGE):
            return False
        if error_hook:
            yield HttpErrorHook(flw)
        flw.live = False
        yield commands.CloseConnection(self.context.client)
        return True

    def _response(self) -> layer.CommandGenerator[None]:
        """The response in SERVER_BUF, once it is all there: relayed, or handed over. A head that did
        not come whole in the first read is handed over at once: the HTTP layer times it
        (--response-head-timeout)."""
        flw = self.flow
        assert flw is not None

        def head(lines: list[bytes]) -> tuple[http.Response, int | None]:
            response = http1.read_response_head(lines)
            return response, http1.expected_http_body_size(flw.request, response)

        try:
            taken = _whole(self.server_buf, self.limits.max_header_bytes, False, head, self._plain_response)
        except _NotPlain:
            return (yield from self._hand_over_response())
        if taken is not None:
            self.flow = None
            yield from self._deliver(flw, *taken)

    def _plain_response(self, response: http.Response, size: int) -> bool:
        if not 0 <= size <= self.max_body:
            return False
        if response.status_code < 200 or "transfer-encoding" in response.headers:
            return False
        if len(response.headers.fields) > self.limits.max_headers:
            return False
        if self.context.options.validate_inbound_headers:
            try:
                validate_headers(response)
            except ValueError:
                return False
        return True

    def _deliver(self, flw: http.HTTPFlow, response: http.Response, body: bytes) -> layer.CommandGenerator[None]:
        """RESPONSE, whole, through the hooks as HttpStream raises them, then to the client."""
        flw.response = response
        yield HttpResponseHeadersHook(flw)
        if (yield from self._killed(flw)):
            return
        if flw.metadata.get(httpstream.EARLY):  # refused at responseheaders: the upstream's body is dropped
            return (yield from self._respond(flw))
        response = flw.response
        if not response.stream or not body:  # as HttpStream: an empty body is never streamed
            response.data.content = body
            return (yield from self._respond(flw))
        # Streamed by an addon's choice, as HttpStream streams a body that came in one read: the head
        # goes first, then the body through the addon's callable, then the response hook.
        flw.metadata[httpstream.RESPONSE_SENT] = True
        head = http1.assemble_response_head(response)
        out = _streamed(response, body, flw, "response")
        if reason := flw.metadata.get(httpstream.ABORTED):  # cut off: the client has the head only
            yield commands.SendData(self.context.client, head)
            yield httpstream.CutOff(self.context.client)
            yield commands.CloseConnection(self.context.server)
            flw.error = flow.Error(reason)
            yield HttpErrorHook(flw)
            flw.live = False
            return
        yield commands.SendData(self.context.client, head + out)
        flw.metadata[httpstream.RESPONSE_DELIVERED] = True
        response.timestamp_end = time.time()
        yield HttpResponseHook(flw)
        if not (yield from self._killed(flw, error_hook=False)):
            yield from self._done(flw)

    def _respond(self, flw: http.HTTPFlow) -> layer.CommandGenerator[None]:
        """As HttpStream.send_response: the response hook, then the response (as the hook left it) in
        one write."""
        assert flw.response is not None
        flw.response.timestamp_end = time.time()
        yield HttpResponseHook(flw)
        if (yield from self._killed(flw, error_hook=False)):
            return
        response = flw.response
        yield commands.SendData(
            self.context.client, http1.assemble_response_head(response) + (response.raw_content or b"")
        )
        yield from self._done(flw)

    def _done(self, flw: http.HTTPFlow) -> layer.CommandGenerator[None]:
        """FLOW answered: the connection ends if either side said so (as Http1Connection.mark_done), else
        the next request, if the client sent it already."""
        flw.live = False
        request, response = flw.request, flw.response
        assert response is not None
        if http1.connection_close(request.http_version, request.headers) or http1.connection_close(
            response.http_version, response.headers
        ):
            yield commands.CloseConnection(self.context.client)
            if self.context.server.state & ConnectionState.CAN_WRITE:
                yield commands.CloseConnection(self.context.server)
            return
        if self.client_buf:
            yield from self._request()


def _awaiting_response(successor: httpstream.HttpLayer, flw: http.HTTPFlow) -> layer.CommandGenerator[None]:
    """Set SUCCESSOR's layers as mitmproxy's stand once FLOW's request went upstream and its response
    is awaited: the client's Http1Server waiting, a stream whose request is done, and an Http1Client
    reading the response head (docs/architecture.md, mitmproxy's insides)."""
    client, server = successor.context.client, successor.context.server
    reader = successor.connections[client]
    assert isinstance(reader, httpstream.Http1Server)
    reader.request, reader.request_done = flw.request, True
    reader.state = reader.wait
    yield from successor.make_stream(_FIRST_STREAM)
    stream = successor.streams[_FIRST_STREAM]
    assert isinstance(stream, httpstream.HttpStream)
    stream.flow = flw
    stream.client_state = stream.state_done
    stream.server_state = stream.state_wait_for_response_headers
    upstream = httpstream.Http1Client(successor.context.fork())
    successor.connections[server] = upstream
    yield from upstream.handle_event(events.Start())
    upstream.stream_id, upstream.request, upstream.request_done = _FIRST_STREAM, flw.request, True
