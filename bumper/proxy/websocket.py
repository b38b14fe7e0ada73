"""mitmproxy's WebSocket layer, streaming frames through unless an addon needs whole messages.

mitmproxy joins a message's frames (and a frame's pieces, as they arrive) into one buffer per
direction before its `websocket_message` hook, and relays the message only once it is whole: a peer
that sends one endless message, in fragments or in one frame, would cost bumper memory without end.

So a WebSocket whose connection runs no addon with a `websocket_message` hook (the chain decides,
at `websocket_start`: `WHOLE_MESSAGES` in the flow's metadata) is streamed: each piece of a frame
goes on to the other side as it arrives, as a fragment of the same message (RFC 6455 5.4 lets an
intermediary re-fragment), and bumper holds no more of it than one read. Measured with the hostile
suite: a 64 MiB message in 4,096 fragments peaked +21 MiB assembled, a few MiB streamed.

Where an addon does need whole messages, they are assembled as mitmproxy does, up to
`--websocket-max-message`: over it both sides get a close with code 1009 (message too big, RFC 6455
7.4.1) and the connection ends with `outcome=limit: WebSocket message over N bytes (...)`. The
buffer's last piece is a bytearray (mitmproxy appends each piece with `+=` to a bytes object, which
copies everything so far each time: a 256 MiB frame in 64 KiB pieces, terabytes copied), and only
the message passing now stays on the flow (`messages[-1]`, what the addons see): mitmproxy keeps
every message until the connection closes.

Either way, permessage-deflate (RFC 7692) inflates each piece with a bound: a piece that would
inflate past `--websocket-max-message` closes both sides with 1009. zlib inflates up to 1032 times:
a 255 KB message of zeros became 256 MiB in one call, and bumper's RSS peaked +241 MiB.

mitmproxy makes this layer by the name `WebsocketLayer` in its websocket module; build_master puts
this class there (docs/architecture.md, internals). Messages injected through mitmproxy's API take
the assembled path; bumper injects none.
"""

from __future__ import annotations

import time
import zlib
from typing import cast

import wsproto.events
import wsproto.extensions
import wsproto.frame_protocol
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import websocket
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import CloseReason

from bumper.proxy.httpstream import layer_limits
from bumper.proxy.limits import too_many

WHOLE_MESSAGES = "bumper.websocket_whole_messages"  # flow.metadata: True when an addon reads messages

_CAN_CLOSE = {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}


class WebsocketLayer(websocket.WebsocketLayer):
    def __init__(self, context: Context, flow: http.HTTPFlow) -> None:
        super().__init__(context, flow)
        self.max_message = layer_limits(context).websocket_max_message
        self._handle_event = self.start  # mitmproxy's class attribute names its own `start`

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        for ws in (self.client_ws, self.server_ws):
            for extension in ws._proto.extensions:  # noqa: SLF001  (wsproto keeps them there)
                if type(extension) is wsproto.extensions.PerMessageDeflate:
                    extension.__class__ = BoundedDeflate  # negotiated already: same state, bounded inflate
                    cast(BoundedDeflate, extension).max_piece = self.max_message

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.ConnectionEvent) and not self.flow.metadata.get(WHOLE_MESSAGES):
            yield from self._stream(event)
        else:
            yield from self._assemble(event)

    def _stream(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        from_client = event.connection == self.context.client
        src, dst = (self.client_ws, self.server_ws) if from_client else (self.server_ws, self.client_ws)
        src.receive_data(event.data if isinstance(event, events.DataReceived) else None)
        for ws_event in src.events():
            if isinstance(ws_event, wsproto.events.Message):
                yield dst.send2(ws_event)  # a fragment of the same message: FIN only on its last piece
            elif isinstance(ws_event, (wsproto.events.Ping, wsproto.events.Pong)):
                yield dst.send2(ws_event)
            elif isinstance(ws_event, wsproto.events.CloseConnection):
                yield from self._close(ws_event, self._inflated_too_much() or ws_event.reason, from_client)
                return

    def _assemble(self, event: events.Event) -> layer.CommandGenerator[None]:
        for ws in (self.client_ws, self.server_ws):
            if not isinstance(ws.frame_buf[-1], bytearray):  # appended to in place from here on
                ws.frame_buf[-1] = bytearray(ws.frame_buf[-1])  # type: ignore[call-overload]
        assert self.flow.websocket is not None
        self.flow.websocket.messages.clear()  # relayed already: only the one passing now is anyone's to see
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self._inflated_too_much()
            return
        for ws in (self.client_ws, self.server_ws):
            if sum(map(len, ws.frame_buf)) > self.max_message:
                reason = self._too_big(f"WebSocket message over {self.max_message} bytes")
                close = wsproto.events.CloseConnection(code=CloseReason.MESSAGE_TOO_BIG, reason="message too big")
                yield from self._close(close, reason, closed_by_client=None)
                return

    def _too_big(self, what: str) -> str:
        reason = too_many(what, "--websocket-max-message")
        self.context.client.error = self.context.client.error or reason
        return reason

    def _inflated_too_much(self) -> str | None:
        """The limit line, if a compressed piece would have inflated past the limit (the close is wsproto's)."""
        for ws in (self.client_ws, self.server_ws):
            if any(getattr(extension, "overflowed", False) for extension in ws._proto.extensions):  # noqa: SLF001
                return self._too_big(f"WebSocket piece inflating past {self.max_message} bytes")
        return None

    def _close(
        self, close: wsproto.events.CloseConnection, reason: str | None, closed_by_client: bool | None
    ) -> layer.CommandGenerator[None]:
        """Close both sides with CLOSE (the peer's own, or bumper's), then end the flow."""
        for ws in (self.server_ws, self.client_ws):
            ws.frame_buf = [b""]
            if ws.state in _CAN_CLOSE:
                yield ws.send2(close)
            yield commands.CloseConnection(ws.conn)
        assert self.flow.websocket is not None
        self.flow.websocket.timestamp_end = time.time()
        self.flow.websocket.closed_by_client = closed_by_client
        self.flow.websocket.close_code = close.code
        self.flow.websocket.close_reason = reason
        yield websocket.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done


class BoundedDeflate(wsproto.extensions.PerMessageDeflate):
    """wsproto's permessage-deflate, inflating at most `max_piece` bytes out of one received piece: over
    that, wsproto closes with 1009 (it turns a CloseReason from an extension into a close)."""

    max_piece: int
    overflowed = False

    def frame_inbound_payload_data(
        self, proto: wsproto.frame_protocol.FrameDecoder | wsproto.frame_protocol.FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible or self._decompressor is None:
            return super().frame_inbound_payload_data(proto, data)
        try:
            inflated = self._decompressor.decompress(bytes(data), self.max_piece)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if self._decompressor.unconsumed_tail:
            self.overflowed = True
            return CloseReason.MESSAGE_TOO_BIG
        return inflated
