"""mitmproxy's HTTP layer, with what an inspecting proxy needs that stock mitmproxy lacks.

1. Answering a request before its body is read (a 403 from policy, a 413 from upload_limit)
   without buffering the body: stock mitmproxy buffers the whole upload first, and when that
   upload is large enough to be streamed it fails with "Can't set a response and enable
   streaming at the same time". Here the body is read and dropped, then the answer is sent.
2. Stopping a body that is already streaming (a DLP match, a limit passed mid-upload): the
   upstream request is reset, and the client gets the refusal once its upload ends; a response
   stopped mid-stream is cut off (HTTP/1: the connection closes; h2: the stream is reset).
3. bumper's own answer (bumper/proxy/replies.py) wherever mitmproxy's layer would send the client
   its HTML error page: a request head it cannot parse, a request without a destination, an
   upstream it cannot connect to or that sends no valid response.
4. Truncation passed on: an HTTP/1 body that only the connection's end delimits, ended by an
   upstream without TLS close_notify, is a failed response (mitmproxy takes it as complete); and
   an HTTP/1 client whose response is cut off gets its connection closed without close_notify, so
   that it can tell, as it could talking to the upstream itself.

Addons ask for these with `respond_early` and `abort` and never touch the layers.
"""

from __future__ import annotations

import copy
import html
import ipaddress
import re
import time

import h2.errors
import h2.events
import h2.exceptions
from hpack.exceptions import InvalidTableSizeError
from mitmproxy import flow, http
from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import (
    DropStream,
    ErrorCode,
    HttpErrorHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    ReceiveHttp,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.utils import human

from bumper.proxy import replies
from bumper.proxy.dispatch import AddonManager, in_place
from bumper.proxy.h2flow import CreditCarrier, FlowControlled, Reading, credit_events, overfull_sources
from bumper.proxy.limits import Limits, timed_out, too_many

# flow.metadata keys
EARLY = "bumper.early_response"  # the flow was answered by bumper, not (or no longer) by the upstream
RESPONSE_SENT = "bumper.response_sent"  # the upstream's response headers went to the client
RESPONSE_DELIVERED = "bumper.response_delivered"  # and its whole streamed body: too late to stop it
ABORTED = "bumper.aborted"  # why a streamed response body was cut off
STREAMED = "bumper.streamed"  # {"request": bytes, "response": bytes} of bodies that were streamed
# on a CONNECT: the upstream is reached after the ClientHello, whose SNI may decide where it is (bind_names)
DEFER_CONNECT = "bumper.defer_connect"

# How a response the upstream cut off is named: the error, and the log line's outcome.
TRUNCATED = "upstream truncated"
_CLOSE_DELIMITED_CUT = (
    f"{TRUNCATED}: the connection ended without TLS close_notify inside a body only its end delimits"
    " (no Content-Length, not chunked)"
)


class UncleanClose(events.ConnectionClosed):
    """The peer ended a TLS connection without close_notify (a TCP FIN or reset): what the TLS layer
    (layers.ServerTLSLayer) tells the HTTP layer instead of a plain ConnectionClosed."""


class CutOff(commands.CloseConnection):
    """Close a client connection whose response was cut off: without TLS close_notify
    (layers._TLSAlerts), so that the client cannot take what it got for the whole response."""


def respond_early(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer FLOW with RESPONSE instead of the upstream: whatever body is still to come, the
    client's or the upstream's, is read and dropped, never forwarded or kept in memory. Works from
    requestheaders, request, a request stream and responseheaders."""
    flow.response = response
    flow.metadata[EARLY] = True
    # A client waiting for "100 Continue" is not asked for the body it would only have dropped.
    flow.request.headers.pop("expect", None)
    # Both routed through the start_*_stream methods below, which discard instead of streaming.
    if not flow.request.stream:
        flow.request.stream = True
    response.stream = True


def abort(flow: http.HTTPFlow, reason: str) -> None:
    """Cut off FLOW's response body, which is already streaming to the client."""
    flow.metadata[ABORTED] = reason


def aborted(flow: http.HTTPFlow) -> bool:
    """Whether FLOW's response was cut off after its head: by a refusal or an addon failure, or by the
    upstream (a body shorter than announced, truncated, a stream reset). Its response hook never ran."""
    return bool(flow.metadata.get(ABORTED))


def body_bytes(flow: http.HTTPFlow, side: str) -> int:
    """The bytes of FLOW's request or response body (SIDE) that went through bumper."""
    message = flow.request if side == "request" else flow.response
    if message is None:
        return 0
    streamed = flow.metadata.get(STREAMED, {})
    if side in streamed:
        return int(streamed[side])
    return len(message.raw_content or b"")


def count_streamed(flow: http.HTTPFlow, side: str, data: bytes) -> None:
    counts = flow.metadata.setdefault(STREAMED, {})
    counts[side] = counts.get(side, 0) + len(data)


def chunks_of(produced: bytes | list[bytes] | object) -> list[bytes]:
    if isinstance(produced, bytes):
        return [produced] if produced else []
    return list(produced)  # type: ignore[call-overload]


# The error of a request for the proxy itself, on its way from HttpStream to HttpLayer's answer.
FOR_THE_PROXY = "a request for the proxy itself"


def for_the_proxy(request: http.Request) -> str:
    """The log line's outcome for REQUEST, sent to the proxy port without a host: its method only,
    as the path may hold what the client would not want logged."""
    return f"not a proxy request: {request.method} for the proxy itself (no host in the request target)"


class HttpStream(http_layers.HttpStream):
    # The client has this stream's response headers: from then on an error can only cut it off.
    client_has_response = False

    def __init__(self, context: Context, stream_id: int, hooks: AddonManager) -> None:
        super().__init__(context, stream_id)
        self.hooks = hooks

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        return (yield from in_place(super()._handle_event(event), self.hooks))

    def handle_connect_regular(self) -> layer.CommandGenerator[None]:
        # bumper runs mitmproxy with the `lazy` connection strategy (a transparent or SNI listener's
        # destination is known only at the ClientHello) and connects a CONNECT's upstream here, before
        # the 200, as `eager` would: server-first, and a 502 for an upstream it cannot reach. A
        # deferred CONNECT is connected by its TLS layer once the ClientHello is read, to the address
        # the policy set by then.
        if not self.flow.response and not self.flow.metadata.get(DEFER_CONNECT):
            err = yield commands.OpenConnection(self.context.server)
            if err:  # replies.ConnectReplies words it
                self.flow.response = http.Response.make(502, f"cannot connect: {err}")
        self.child_layer = layer.NextLayer(self.context)
        yield from self.handle_connect_finish()

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        request = event.request
        if self.mode is http_layers.HTTPMode.regular and not request.host and not event.replay_flow:
            # `GET /` on the proxy port: a request for the proxy itself (a browser or curl pointed at
            # it as at a web server), not one to forward, which names its host (absolute-form, RFC 9112
            # 3.2.2). mitmproxy would forward it to its Host header, or send a 502 page without one;
            # HttpLayer answers it with a 400 that says where bumper's own pages are.
            self.flow = http.HTTPFlow(self.context.client, self.context.server)
            self.flow.request = request
            self.context.client.error = self.context.client.error or for_the_proxy(request)
            error = ResponseProtocolError(self.stream_id, FOR_THE_PROXY, ErrorCode.DESTINATION_UNKNOWN)
            yield SendHttp(error, self.context.client)
            self.client_state = self.state_errored
            return
        yield from super().state_wait_for_request_headers(event)

    def start_request_stream(self) -> layer.CommandGenerator[None]:
        if self.flow.response is not None:
            self.client_state = self.state_discard_request_body
            return
        yield from super().start_request_stream()

    def state_stream_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestTrailers):
            self.flow.request.trailers = event.trailers
            return
        if not isinstance(event, RequestData | RequestEndOfMessage):
            return (yield from super().state_stream_request_body(event))
        stream = self.flow.request.stream
        data = event.data if isinstance(event, RequestData) else b""
        count_streamed(self.flow, "request", data)
        chunks = chunks_of(stream(data)) if callable(stream) else ([data] if data else [])
        if self.flow.metadata.get(EARLY):  # refused while streaming: the upstream must not get the rest
            return (yield from self._refuse_after_streaming(ended=isinstance(event, RequestEndOfMessage)))
        for chunk in chunks:
            yield SendHttp(RequestData(self.stream_id, chunk), self.context.server)
        if isinstance(event, RequestData):
            return
        # The end, as the parent does it, but a refusal from the request hook still stops the upstream.
        self.flow.request.timestamp_end = time.time()
        yield HttpRequestHook(self.flow)
        if self.flow.metadata.get(EARLY):
            return (yield from self._refuse_after_streaming(ended=True))
        self.client_state = self.state_done
        if self.flow.request.trailers:
            yield SendHttp(RequestTrailers(self.stream_id, self.flow.request.trailers), self.context.server)
        yield SendHttp(event, self.context.server)
        if self.server_state == self.state_done:
            yield from self.flow_done()

    def _refuse_after_streaming(self, ended: bool) -> layer.CommandGenerator[None]:
        """The upstream has part of the body: reset its request, then answer once the client is done."""
        reset = RequestProtocolError(self.stream_id, "refused by bumper", ErrorCode.GENERIC_CLIENT_ERROR)
        yield SendHttp(reset, self.context.server)
        self.server_state = self.state_errored
        self.client_state = self.state_discard_request_body
        if ended:
            yield from self._send_early_response()

    def state_discard_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestEndOfMessage):
            yield from self._send_early_response()

    def _send_early_response(self) -> layer.CommandGenerator[None]:
        assert self.flow.response is not None
        self.flow.request.timestamp_end = time.time()
        self.client_state = self.state_done
        self.flow.response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()

    def start_response_stream(self) -> layer.CommandGenerator[None]:
        if self.flow.metadata.get(EARLY):  # refused at responseheaders: drain the upstream's body
            self.server_state = self.state_discard_response_body
            return
        self.flow.metadata[RESPONSE_SENT] = True
        yield from super().start_response_stream()

    def state_discard_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseEndOfMessage):
            yield from self.send_response()

    def state_stream_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.flow.metadata.get(ABORTED):
            return
        if not isinstance(event, ResponseData | ResponseEndOfMessage):
            return (yield from super().state_stream_response_body(event))
        assert self.flow.response is not None
        stream = self.flow.response.stream
        data = event.data if isinstance(event, ResponseData) else b""
        count_streamed(self.flow, "response", data)
        chunks = chunks_of(stream(data)) if callable(stream) else ([data] if data else [])
        if reason := self.flow.metadata.get(ABORTED):
            cut_off = ResponseProtocolError(self.stream_id, reason, ErrorCode.GENERIC_SERVER_ERROR)
            reset = RequestProtocolError(self.stream_id, reason, ErrorCode.GENERIC_CLIENT_ERROR)
            yield SendHttp(cut_off, self.context.client)
            yield SendHttp(reset, self.context.server)
            self.client_state = self.server_state = self.state_errored
            self.flow.error = flow.Error(reason)
            yield HttpErrorHook(self.flow)
            self.flow.live = False
            yield DropStream(self.stream_id)
            return
        for chunk in chunks:
            yield SendHttp(ResponseData(self.stream_id, chunk), self.context.client)
        if isinstance(event, ResponseEndOfMessage):
            self.flow.metadata[RESPONSE_DELIVERED] = True
            yield from self.send_response(already_streamed=True)

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError) and self.flow_refused_upstream():
            return  # the upstream going away is our doing; the client gets the refusal instead
        if isinstance(event, ResponseProtocolError) and self.server_state in (
            self.state_consume_response_body,
            self.state_stream_response_body,
        ):
            abort(self.flow, event.message)  # the upstream's response failed after its head
        yield from super().handle_protocol_error(event)

    def flow_refused_upstream(self) -> bool:
        return hasattr(self, "flow") and bool(self.flow.metadata.get(EARLY)) and self.server_state == self.state_errored


def instead_of_mitmproxys(reply: replies.Reply, request: http.Request | None) -> http.Response:
    """REPLY as the answer where mitmproxy would send its error page, which ends an HTTP/1
    connection: the rest of a failed request may still be on its way, and is no next request."""
    response = reply.response(request)
    response.headers["connection"] = "close"  # h2 drops it: there the stream ends, not the connection
    return response


# How much of a parser's reason, which quotes the client's bytes, goes into the log line.
_LOGGED_REASON = 200
# The end of a request head, as h11's buffer finds it.
_BLANK_LINE = re.compile(rb"\n\r?\n")
# What a header value must not hold (RFC 9110, 5.5), and mitmproxy's HTTP/1 parser passes on: an
# obs-fold (a line break and a space), a bare CR, a NUL. An upstream could read each as a new line.
_UNSAFE_IN_VALUE = re.compile(rb"[\r\n\x00]")


def ambiguous(request: http.Request) -> str | None:
    """Why an upstream could read REQUEST's head differently than bumper did, or None. mitmproxy
    already refuses conflicting Content-Length and Transfer-Encoding, a duplicate Content-Length and
    an unknown Transfer-Encoding; these are what it lets through. One regex over all values: this
    runs for every HTTP/1 request."""
    fields = request.headers.fields
    if _UNSAFE_IN_VALUE.search(b"".join([value for _, value in fields])):
        name = next(name for name, value in fields if _UNSAFE_IN_VALUE.search(value))
        return f"a line break or NUL inside the value of {name.decode(errors='replace')!r} (obs-fold?)"
    if [name.lower() for name, _ in fields].count(b"host") > 1:
        return "more than one Host header"
    return None


class Http1Server(http_layers.Http1Server):
    """mitmproxy's HTTP/1 server side, answering a request head it cannot parse, and a request body
    whose framing is broken (a bad chunk size), with bumper's 400 where mitmproxy sends its page or
    closes without a word; and a head over the size limit with a 431 (mitmproxy buffers any size)."""

    def __init__(self, context: Context, limits: Limits) -> None:
        super().__init__(context)
        self.max_head = limits.max_header_bytes
        self.body_error: commands.SendData | None = None

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        # The buffer may hold a body after a head within the limit: only then is it searched.
        if len(self.buf) > self.max_head and not _BLANK_LINE.search(bytes(self.buf), 0, self.max_head + 2):
            reason = too_many(f"request head over {self.max_head} bytes", "--max-header-bytes")
            return (yield from self._refuse(reason, 431, None))
        for command in super().read_headers(event):
            # The only data it sends itself is its 400 page; a broken body's 400 is bumper's (read_body).
            if isinstance(command, commands.SendData) and command is not self.body_error:
                # The parser's reason is in the page only, as the paragraph of mitmproxy's format_error.
                reason = html.unescape(command.data.partition(b"<p>")[2].partition(b"</p>")[0].decode())
                # mitmproxy quotes the client's bytes (escaped): the log line keeps the start of them.
                said = reason if len(reason) <= _LOGGED_REASON else reason[:_LOGGED_REASON] + "…"
                self.context.client.error = self.context.client.error or f"bad request: {said}"
                # self.request: the head, if it parsed and only its body's framing is wrong.
                response = instead_of_mitmproxys(replies.bad_request(reason), self.request)
                command = commands.SendData(self.conn, http1.assemble_response(response))
            elif isinstance(command, ReceiveHttp) and isinstance(command.event, RequestHeaders):
                if why := ambiguous(command.event.request):  # smuggling: refused before any hook or upstream
                    yield from self._refuse(f"ambiguous request: {why}", 400, command.event.request)
                    return
            yield command

    def _refuse(self, reason: str, status: int, request: http.Request | None) -> layer.CommandGenerator[None]:
        """Answer and close, as mitmproxy does a head it cannot parse: the rest is not read."""
        self.context.client.error = self.context.client.error or reason
        response = instead_of_mitmproxys(replies.bad_request(reason, status), request)
        yield commands.SendData(self.conn, http1.assemble_response(response))
        yield commands.CloseConnection(self.conn)
        self.state = self.done

    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        close = None
        for command in super().read_body(event):
            if isinstance(command, commands.CloseConnection) and command.connection is self.conn:
                close = command  # held until the reason, which follows it
                continue
            if close is not None and isinstance(command, ReceiveHttp) and self._unanswered(command):
                assert isinstance(command.event, RequestProtocolError)
                reply = instead_of_mitmproxys(replies.bad_request(command.event.message), self.request)
                self.body_error = commands.SendData(self.conn, http1.assemble_response(reply))
                yield self.body_error
                yield close
                close = None
            yield command
        if close is not None:
            yield close

    def send(self, event: http_layers.HttpEvent) -> layer.CommandGenerator[None]:
        if not (isinstance(event, ResponseProtocolError) and self.response is not None):
            return (yield from super().send(event))
        for command in super().send(event):
            # The client has the head and part of the body: a close with close_notify would make a
            # body that only the connection's end delimits look complete.
            yield CutOff(self.conn) if isinstance(command, commands.CloseConnection) else command

    def _unanswered(self, command: ReceiveHttp) -> bool:
        """A request protocol error that nobody answered: no response yet (a refusal of the head may
        have been sent and the connection closed), and the client still there to read one."""
        return (
            isinstance(command.event, RequestProtocolError)
            and self.response is None
            and bool(self.conn.state & ConnectionState.CAN_WRITE)
        )


class Http1Client(http_layers.Http1Client):
    """mitmproxy's HTTP/1 client side, with the upstream's response head held to the limits a client's
    request head has: its bytes, its header fields, and the time it takes once it has begun.
    mitmproxy buffers a head of any size ("FIXME: protect against header size DoS") and waits for it
    as long as bytes keep coming, so a hostile upstream would cost bumper memory without end, or hold
    a client by trickling its head a byte at a time. Over a limit, the upstream connection is closed
    and the client gets bumper's 502 naming the limit.

    mitmproxy makes this layer by the name `Http1Client` in its HTTP package, in two places; build_master
    puts this class there (docs/architecture.md, internals)."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        limits = layer_limits(context)
        self.max_head = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.head_timeout = limits.response_head_timeout
        # The deadline of the response head being read, requested at its first byte: a head that
        # arrives in one read (nearly all) costs no timer.
        self.head_deadline: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):  # only ours: mitmproxy's HTTP/1 layers request none
            if event.command is self.head_deadline and self.state == self.read_headers:
                what = "no complete response head from the upstream"
                yield from self._refuse_head(timed_out(what, self.head_timeout, "--response-head-timeout"))
            return
        yield from super()._handle_event(event)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        limit = self.max_head
        if (
            isinstance(event, events.DataReceived)
            and self.stream_id is not None
            and len(self.buf) > limit
            and not _BLANK_LINE.search(bytes(self.buf), 0, limit + 2)
        ):
            return (
                yield from self._refuse_head(
                    too_many(f"upstream response head over {limit} bytes", "--max-header-bytes")
                )
            )
        for command in super().read_headers(event):
            if isinstance(command, ReceiveHttp) and isinstance(command.event, ResponseHeaders):
                self.head_deadline = None  # the head is in (the body, even the next head, may follow in this read)
                if len(command.event.response.headers.fields) > self.max_headers:
                    what = f"more than {self.max_headers} header fields in the upstream's response"
                    return (yield from self._refuse_head(too_many(what, "--max-headers")))
            yield command
        if self.state == self.read_headers and self.buf and self.stream_id is not None and self.head_deadline is None:
            self.head_deadline = commands.RequestWakeup(self.head_timeout)
            yield self.head_deadline

    def _refuse_head(self, reason: str) -> layer.CommandGenerator[None]:
        assert self.stream_id is not None
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(ResponseProtocolError(self.stream_id, reason, ErrorCode.GENERIC_SERVER_ERROR))
        self.state = self.done

    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, UncleanClose) and self._until_close():
            # mitmproxy would end the body here, as complete: without close_notify, it may not be.
            if self.conn.state & ConnectionState.CAN_WRITE:
                yield commands.CloseConnection(self.conn)
            assert self.stream_id is not None
            yield ReceiveHttp(
                ResponseProtocolError(self.stream_id, _CLOSE_DELIMITED_CUT, ErrorCode.GENERIC_SERVER_ERROR)
            )
            self.state = self.done
            return
        yield from super().read_body(event)

    def _until_close(self) -> bool:
        """Whether the response's body is one only the connection's end delimits (RFC 9112, 6.3)."""
        return self.request is not None and http1.expected_http_body_size(self.request, self.response) == -1


# How many bytes coalesced joins into one write: a response head and a small body, not a large body
# copied to save one TLS record (the TLS layer cuts its records at 16 KiB anyway).
_COALESCE_BYTES = 16 * 1024


def coalesced(produced: layer.CommandGenerator[None]) -> layer.CommandGenerator[None]:
    """PRODUCED, with back-to-back SendData commands for one connection joined into one. mitmproxy's
    HTTP/1 layer sends a response's head and body as two SendData: each becomes a TLS record of its
    own, a trip up every layer above, and a write() system call. Joined, a keep-alive response costs
    one of each. Order is kept: any other command first sends what is held."""
    held: commands.SendData | None = None
    reply = None
    while True:
        try:
            command = produced.send(reply)
        except StopIteration:
            break
        reply = None
        if type(command) is commands.SendData:  # a subclass may be told apart by identity (Http1Server)
            if (
                held is not None
                and held.connection is command.connection
                and len(held.data) + len(command.data) <= _COALESCE_BYTES
            ):
                held = commands.SendData(held.connection, held.data + command.data)
                continue
            if held is not None:
                yield held
            held = command
            continue
        if held is not None:
            yield held
            held = None
        reply = yield command
    if held is not None:
        yield held


def layer_limits(context: Context) -> Limits:
    """The limits of the HttpLayer above a connection layer: it is on the context's layer stack."""
    return next(layer_.limits for layer_ in reversed(context.layers) if isinstance(layer_, HttpLayer))


class Http2Server(FlowControlled, http_layers.Http2Server):
    """mitmproxy's HTTP/2 server side with bumper's limits: the settings it announces (concurrent
    streams, header list size, HPACK table), a cap on a header block's bytes while its CONTINUATION
    frames arrive (h2 caps only their number), rapid reset (CVE-2023-44487) ended with a GOAWAY, and
    flow control (bumper.proxy.h2flow)."""

    def __init__(self, context: Context, limits: Limits) -> None:
        super().__init__(context)
        self.limits = limits
        conn = self.h2_conn
        conn.local_settings.max_concurrent_streams = limits.h2_max_streams
        conn.local_settings.max_header_list_size = limits.max_header_bytes
        conn.local_settings.header_table_size = limits.h2_hpack_table_bytes
        # Acknowledged at once, as mitmproxy does its own: the limits hold from the first frame.
        conn.local_settings.acknowledge()
        conn.decoder.max_header_list_size = limits.max_header_bytes
        conn.decoder.max_allowed_table_size = limits.h2_hpack_table_bytes
        self.opened = 0  # streams the client opened
        self.unanswered: set[int] = set()  # of those, the ones whose response has not ended
        self.early_resets = 0  # streams the client reset before their response ended

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseEndOfMessage | ResponseProtocolError):
            self.unanswered.discard(event.stream_id)
        yield from super()._handle_event(event)
        if isinstance(event, events.DataReceived) and (pending := self.h2_conn.incoming_buffer._headers_buffer):
            if sum(len(frame.data) for frame in pending) > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                yield from self._limit(too_many(f"HTTP/2 header block over {limit} bytes", "--max-header-bytes"))

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        # h2 has read every frame of the data before these events: a stream the client reset is
        # closed already, so mitmproxy's own bookkeeping cannot tell whether it was answered.
        if isinstance(event, h2.events.RequestReceived):
            self.opened += 1
            self.unanswered.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in self.unanswered:
            self.unanswered.discard(event.stream_id)
            self.early_resets += 1
            if self.early_resets >= self.limits.h2_max_resets and 2 * self.early_resets > self.opened:
                yield from self._limit(too_many(
                    f"the client reset {self.early_resets} of its {self.opened} HTTP/2 streams (rapid reset)",
                    "--h2-max-resets",
                ))  # fmt: skip
                return True
        elif isinstance(event, h2.exceptions.TooManyStreamsError):
            limit = self.limits.h2_max_streams
            reason = too_many(f"more than {limit} concurrent HTTP/2 streams", "--h2-max-streams")
            yield from self._limit(reason)
            return True
        elif isinstance(event, h2.exceptions.DenialOfServiceError):  # hpack: the header list is too large
            limit = self.limits.max_header_bytes
            yield from self._limit(too_many(f"HTTP/2 header list over {limit} bytes", "--max-header-bytes"))
            return True
        elif isinstance(event, h2.exceptions.ProtocolError) and isinstance(event.__cause__, InvalidTableSizeError):
            limit = self.limits.h2_hpack_table_bytes
            reason = too_many(f"HPACK table over {limit} bytes", "--h2-hpack-table-bytes")
            yield from self._limit(reason)
            return True
        elif isinstance(event, h2.exceptions.ProtocolError):
            self.context.client.error = self.context.client.error or f"HTTP/2 protocol error: {event}"
        return (yield from super().handle_h2_event(event))

    def _limit(self, reason: str) -> layer.CommandGenerator[None]:
        """Record REASON and end the connection with a GOAWAY: ENHANCE_YOUR_CALM where bumper found
        the abuse, the code h2 already sent where h2 found it (its errors close the connection)."""
        if self._handle_event == self.done:  # mitmproxy's protocol_error has closed it already
            return
        self.context.client.error = self.context.client.error or reason
        yield from self.protocol_error(reason, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


class HttpLayer(CreditCarrier, layers.HttpLayer):
    def __init__(
        self,
        context: Context,
        mode: http_layers.HTTPMode,
        limits: Limits,
        hooks: AddonManager,
        admin: tuple[str, int] | None = None,
        reading: Reading | None = None,
    ) -> None:
        super().__init__(context, mode)
        self.limits = limits
        self.hooks = hooks  # run where each request's stream raises them (dispatch.in_place)
        self.admin = admin  # the admin listener's address (--admin), which a request for the proxy is told
        self.reading = reading  # HTTP/1 connections paused while an HTTP/2 leg's buffer is full (h2flow)
        self.paused: set[Connection] = set()
        # mitmproxy's Start keeps a client connection layer that is already there; it would pick the
        # same by ALPN: h2, else HTTP/1 (bumper speaks no HTTP/3).
        if context.client.alpn == b"h2":
            self.connections[context.client] = Http2Server(context.fork(), limits)
        else:
            self.connections[context.client] = Http1Server(context.fork(), limits)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from coalesced(super()._handle_event(event))
        if not self.has_h2_leg:  # no HTTP/2 leg, so no credit to carry and no send buffer to bound
            return
        yield from credit_events(self)
        if self.reading is not None and ((overfull := overfull_sources(self)) or self.paused):
            self.paused = self.reading.hold(self.context.client, self.paused, overfull)

    def event_to_child(
        self, child: layer.Layer | http_layers.HttpStream, event: events.Event
    ) -> layer.CommandGenerator[None]:
        # Every response and error for the client passes here, on its way to the client's connection layer.
        if (
            isinstance(event, ResponseHeaders | ResponseProtocolError)
            and child is self.connections.get(self.context.client)
            and isinstance(stream := self.streams.get(event.stream_id), HttpStream)  # make_stream's, not dropped
        ):
            if isinstance(event, ResponseHeaders):
                # An interim answer (100 Continue) leaves room for the final one, bumper's included.
                status = event.response.status_code
                stream.client_has_response = stream.client_has_response or status >= 200 or status == 101
            elif response := self._instead_of_error_page(stream, event):
                return self._send_to_client(child, event.stream_id, response)
        return super().event_to_child(child, event)

    def _instead_of_error_page(self, stream: HttpStream, error: ResponseProtocolError) -> http.Response | None:
        """bumper's answer where mitmproxy's client connection layer would send its error page."""
        if stream.client_has_response or not self.context.client.state & ConnectionState.CAN_WRITE:
            return None  # no page: the connection is cut off, or gone
        if error.code is ErrorCode.DESTINATION_UNKNOWN and error.message == FOR_THE_PROXY:
            reply: replies.Reply | None = self._for_the_proxy()
        else:
            reply = replies.protocol_error(error.code, error.message, stream.flow.request)
        return instead_of_mitmproxys(reply, stream.flow.request) if reply else None

    def _for_the_proxy(self) -> replies.Reply:
        """The 400 for a request for the proxy itself, naming the addresses this client can reach: the
        proxy's as it connected to it, and the admin listener's (on that address too, if it is bound
        to every address). A relay listener's client talks TLS to the proxy (client.tls: in regular
        mode, only there)."""
        client = self.context.client
        local = client.sockname[0]
        proxy = f"{'https' if client.tls else 'http'}://{human.format_address(client.sockname)}"
        if self.admin is None:
            return replies.for_the_proxy(proxy, None)
        host, port = self.admin
        shown = local if ipaddress.ip_address(host).is_unspecified else host
        return replies.for_the_proxy(proxy, f"http://{human.format_address((shown, port))}/")

    def _send_to_client(
        self, connection: layer.Layer | http_layers.HttpStream, stream_id: int, response: http.Response
    ) -> layer.CommandGenerator[None]:
        for event in (
            ResponseHeaders(stream_id, response),
            ResponseData(stream_id, response.raw_content or b""),
            ResponseEndOfMessage(stream_id),
        ):
            yield from super().event_to_child(connection, event)
        if isinstance(connection, http_layers.Http1Server) and self.context.client.state & ConnectionState.CAN_WRITE:
            # As after mitmproxy's page: the rest of a failed request (smuggling, or an upload that
            # has nowhere to go) is not read.
            yield commands.CloseConnection(self.context.client)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        # Context.fork() builds a Server (uuid4 and all) only to replace it: a copy forks the same,
        # and this runs once per request.
        ctx = copy.copy(self.context)
        ctx.layers = self.context.layers.copy()
        self.streams[stream_id] = HttpStream(ctx, stream_id, self.hooks)
        yield from self.event_to_child(self.streams[stream_id], events.Start())
