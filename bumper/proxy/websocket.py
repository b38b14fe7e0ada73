"""mitmproxy's WebSocket layer with a bound on the message it assembles.

mitmproxy joins a message's frames (and a frame's pieces, as they arrive) into one buffer per
direction before its `websocket_message` hook, and relays the message only once it is whole: a peer
that sends one endless message, in fragments or in one frame, would cost bumper memory without end.
Over `--websocket-max-message` both sides get a close with code 1009 (message too big, RFC 6455
7.4.1) and the connection ends with `outcome=limit: WebSocket message over N bytes (...)`.

It also keeps that buffer's last piece a bytearray: mitmproxy appends each piece with `+=` to a
bytes object, which copies everything so far each time (a 256 MiB frame in 64 KiB pieces: terabytes
copied).

mitmproxy makes this layer by the name `WebsocketLayer` in its websocket module; build_master puts
this class there (docs/architecture.md, internals).
"""

from __future__ import annotations

import time

import wsproto.events
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import websocket
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import CloseReason

from bumper.proxy.httpstream import layer_limits
from bumper.proxy.limits import too_many

_CAN_CLOSE = {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}


class WebsocketLayer(websocket.WebsocketLayer):
    def __init__(self, context: Context, flow: http.HTTPFlow) -> None:
        super().__init__(context, flow)
        self.max_message = layer_limits(context).websocket_max_message

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        for ws in (self.client_ws, self.server_ws):
            if not isinstance(ws.frame_buf[-1], bytearray):  # appended to in place from here on
                ws.frame_buf[-1] = bytearray(ws.frame_buf[-1])  # type: ignore[call-overload]
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            return
        for ws in (self.client_ws, self.server_ws):
            if sum(map(len, ws.frame_buf)) > self.max_message:
                yield from self._too_big()
                return

    def _too_big(self) -> layer.CommandGenerator[None]:
        reason = too_many(f"WebSocket message over {self.max_message} bytes", "--websocket-max-message")
        self.context.client.error = self.context.client.error or reason
        close = wsproto.events.CloseConnection(code=CloseReason.MESSAGE_TOO_BIG, reason="message too big")
        for ws in (self.server_ws, self.client_ws):
            ws.frame_buf = [b""]
            if ws.state in _CAN_CLOSE:
                yield ws.send2(close)
            yield commands.CloseConnection(ws.conn)
        assert self.flow.websocket is not None
        self.flow.websocket.timestamp_end = time.time()
        self.flow.websocket.close_code = CloseReason.MESSAGE_TOO_BIG
        self.flow.websocket.close_reason = reason
        yield websocket.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done
