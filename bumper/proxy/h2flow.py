"""HTTP/2 flow control on both legs: bumper takes from a peer only what the other leg has passed on.

mitmproxy opens a 2 GiB window to both peers and acknowledges DATA the moment it arrives, so an
HTTP/2 client that keeps its window shut while the upstream sends has bumper hold the whole body in
h2's per-stream send buffers (issue 22: +568 MiB for 512 MiB). Here each HTTP/2 leg announces a
bounded window, and the DATA it receives is acknowledged (WINDOW_UPDATE) only for the bytes the
other leg no longer holds: sent to its peer, or handed to its transport, whose own back-pressure
(mitmproxy stops reading while a transport's write buffer is full) covers an HTTP/1 other leg. What a
leg holds for a stream is then at most that stream's window, and for all its streams the
connection's window: the peer cannot send more unacknowledged DATA than that (h2 refuses it, a
FLOW_CONTROL_ERROR).

The credit is carried by the HTTP layer, which knows both legs of a stream (bumper.proxy.httpstream
.HttpLayer): after each event it asks every HTTP/2 leg that holds unacknowledged bytes to release
what the other leg has passed on since (ReleaseCredit), through the leg's own layer stack, so an
upstream connection's TLS beneath the HTTP layer encrypts the WINDOW_UPDATE.

An HTTP/1 leg has no window to close: where it feeds an HTTP/2 leg's send buffer (an HTTP/1 upstream's
response to an HTTP/2 client, an HTTP/1 client's upload to an HTTP/2 upstream) past PAUSE_AT, bumper
stops reading its socket (Reading) until the buffer is under it again. Where an HTTP/2 leg feeds an
HTTP/1 one, mitmproxy's own back-pressure holds: it reads no connection while a transport's write
buffer is full, and the DATA is acknowledged once written there.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

import h2.config
import h2.settings
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import Client, Connection
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import RequestData, ResponseData
from mitmproxy.proxy.layers.http._http2 import Http2Connection
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

# The windows bumper announces to each HTTP/2 peer, per stream and per connection: what a peer may send
# before bumper's acknowledgement, so what one leg holds when the other does not take it. A stream's
# window is its speed limit over a path's round trip (8 MiB: 80 MiB/s on a 100 ms path), a connection's
# what one client may make bumper hold each way. Chrome announces 6 MiB and 15 MiB; Envoy bounds its
# buffers at 1 MiB a connection but opens windows of up to 256 MiB. Measured here (256 MiB through h2
# on loopback, Python peers, the client's windows 16 MiB): as many MiB/s as with mitmproxy's 2 GiB
# windows, where 4 MiB a stream lost about a quarter; a client with shut windows holds bumper to 16 MiB
# a connection each way, under issue 22's 64.
STREAM_WINDOW = 8 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# What an HTTP/2 leg's send buffer may hold for one stream whose other leg is HTTP/1 (no window to
# close): past it, bumper stops reading the HTTP/1 connection until the HTTP/2 peer has taken it
# (and past CONNECTION_WINDOW for all the leg's streams, every HTTP/1 connection feeding one).
PAUSE_AT = STREAM_WINDOW
# RFC 9113 6.9.2: a connection starts with this window, whatever SETTINGS say.
_INITIAL_CONNECTION_WINDOW = 65535


class BoundedH2Connection(BufferedH2Connection):
    """mitmproxy's buffered h2 connection with bumper's windows, and received DATA held rather than
    acknowledged at once: `acknowledge_received_data` (which mitmproxy calls for every DATA frame)
    counts the bytes in `held`, and `release` acknowledges them once the other leg has passed them on."""

    def __init__(self, config: h2.config.H2Configuration, local_settings: h2.settings.Settings) -> None:
        super().__init__(config)
        # The settings the layer already made to the connection it replaces (enable_push, bumper's limits).
        self.local_settings = local_settings
        self.local_settings.initial_window_size = STREAM_WINDOW
        self.local_settings.acknowledge()  # as mitmproxy does: the first SETTINGS frame carries them
        self.held: collections.Counter[int] = collections.Counter()

    def initiate_connection(self) -> None:
        super(BufferedH2Connection, self).initiate_connection()  # not mitmproxy's 2 GiB connection window
        self.increment_flow_control_window(CONNECTION_WINDOW - _INITIAL_CONNECTION_WINDOW)

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        self.held[stream_id] += acknowledged_size

    def release(self, stream_id: int, still_held: int) -> None:
        """Acknowledge what STREAM_ID's received bytes exceed STILL_HELD, the bytes of it the other leg
        has not passed on yet (padding and what the other leg dropped are acknowledged with the rest)."""
        free = self.held[stream_id] - still_held
        if free <= 0:
            return
        if free == self.held[stream_id]:
            del self.held[stream_id]
        else:
            self.held[stream_id] = still_held
        super().acknowledge_received_data(free, stream_id)

    def buffered(self, stream_id: int) -> int:
        """The bytes of STREAM_ID waiting for the peer's window."""
        return sum(len(chunk.data) for chunk in self.stream_buffers.get(stream_id, ()))


@dataclass
class ReleaseCredit(events.Event):
    """From the HTTP layer to an HTTP/2 leg: for each stream (the leg's own ids) with held bytes, how
    many of them the other leg still holds."""

    still_held: dict[int, int] = field(default_factory=dict)


class CreditCarrier:
    """A mixin for the HTTP layer that carries the credit (credit_events, overfull_sources): whether any
    of its connections has an HTTP/2 leg yet. Both walks find nothing to do without one, and on an
    HTTP/1-only connection (nearly all of bumper's traffic) they cost 2-3% of bumper's CPU per request
    (py-spy, bench workload 2, keep-alive c=10: credit_events 2.9% and overfull_sources 1.7%), for every
    event of every request. A leg sets the flag as it is made and never clears it (a closed HTTP/2
    leg may still hold credit to release)."""

    has_h2_leg = False


class FlowControlled(Http2Connection):
    """A mixin for mitmproxy's HTTP/2 connection layers: a BoundedH2Connection instead of mitmproxy's
    (`bounded`, the same object as `h2_conn`), and ReleaseCredit answered with the WINDOW_UPDATEs it frees."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)  # type: ignore[call-arg]  # the Http2Server/Http2Client of the MRO take one
        self.bounded = BoundedH2Connection(self.h2_conf, self.h2_conn.local_settings)
        self.h2_conn = self.bounded
        # The HTTP layer above (on the context's stack, as it made this leg or the HttpClient that did).
        for above in reversed(context.layers):
            if isinstance(above, CreditCarrier):
                above.has_h2_leg = True
                break

    @property
    def closed(self) -> bool:
        """Whether mitmproxy has closed this leg (close_connection sets `done`, which takes no
        event of bumper's: an AssertionError inside mitmproxy, and the connection hung)."""
        return self._handle_event == self.done

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ReleaseCredit):
            for stream_id, still_held in event.still_held.items():
                self.bounded.release(stream_id, still_held)
            if data := self.h2_conn.data_to_send():
                yield commands.SendData(self.conn, data)
            return
        yield from super()._handle_event(event)


class Http2Client(FlowControlled, http_layers.Http2Client):
    """mitmproxy's HTTP/2 upstream side, flow-controlled (FlowControlled). mitmproxy makes this layer
    by the name `Http2Client` in its HTTP package, in two places; build_master puts this class there
    (docs/architecture.md, internals)."""


def h2_leg(top: layer.Layer | http_layers.HttpStream | None) -> FlowControlled | None:
    """The HTTP/2 layer at the bottom of a connection's stack in the HTTP layer's `connections`: the
    layer itself (the client's), or beneath mitmproxy's HttpClient and an upstream's TLS."""
    while top is not None and not isinstance(top, FlowControlled | http_layers.HttpStream):
        top = getattr(top, "child_layer", None)
    return top if isinstance(top, FlowControlled) else None


def _queued(events_: collections.abc.Iterable[events.Event]) -> int:
    return sum(len(e.data) for e in events_ if isinstance(e, RequestData | ResponseData))


def credit_events(http: layers.HttpLayer) -> layer.CommandGenerator[None]:
    """After each of the HTTP layer's events: each HTTP/2 leg holding received bytes releases what
    the other leg has passed on. A stream's bytes are still held while they wait in its HttpStream
    (paused on a hook), in an HTTP/2 upstream's queue of streams over its concurrency limit, or in
    the other leg's send buffer."""
    client_leg = h2_leg(http.connections.get(http.context.client))
    for top in list(http.connections.values()):
        leg = h2_leg(top)
        if leg is None or not leg.bounded.held or leg.closed:  # a closed leg sends no WINDOW_UPDATE
            continue
        still_held = {}
        for stream_id in leg.bounded.held:
            if leg is client_leg:  # an upload: the upstream leg passes it on
                stream = http.streams.get(stream_id)
                held = _queued(stream._paused_event_queue) if stream else 0
                upstream = h2_leg(http.connections.get(stream.context.server)) if stream else None
                if isinstance(upstream, Http2Client) and upstream.conn.connected:  # a closed one sends nothing more
                    ours = upstream.our_stream_id.get(stream_id)
                    queue = upstream.stream_queue.get(stream_id, ())
                    held += _queued(queue) if ours is None else upstream.bounded.buffered(ours)
            else:  # a download: the client's leg passes it on
                theirs = leg.their_stream_id.get(stream_id) if isinstance(leg, Http2Client) else None
                stream = http.streams.get(theirs) if theirs is not None else None
                held = _queued(stream._paused_event_queue) if stream else 0
                if client_leg is not None and theirs is not None:
                    held += client_leg.bounded.buffered(theirs)
            still_held[stream_id] = held
        yield from http.event_to_child(top, ReleaseCredit(still_held))


def overfull_sources(http: layers.HttpLayer) -> set[Connection]:
    """The HTTP/1 connections feeding an HTTP/2 leg's send buffer past its bounds: a stream's over
    PAUSE_AT, or any of its streams once they hold more than CONNECTION_WINDOW together (an HTTP/2
    client's streams to an HTTP/1 upstream each have a connection of their own, none with a window)."""
    sources: set[Connection] = set()
    client_leg = h2_leg(http.connections.get(http.context.client))
    for top in http.connections.values():
        leg = h2_leg(top)
        if leg is None or not leg.bounded.stream_buffers:
            continue
        buffered = {stream_id: leg.bounded.buffered(stream_id) for stream_id in leg.bounded.stream_buffers}
        full = sum(buffered.values()) > CONNECTION_WINDOW
        for stream_id, size in buffered.items():
            if size <= PAUSE_AT and not (full and size):
                continue
            if leg is client_leg:  # a response: its upstream feeds it
                stream = http.streams.get(stream_id)
                source: Connection | None = stream.context.server if stream else None
            else:  # an upload: the client feeds it
                source = http.context.client
            if source is not None and h2_leg(http.connections.get(source)) is None:
                sources.add(source)
    return sources


class Reading:
    """Stops and restarts reading a connection's socket, which a layer cannot do: mitmproxy reads each
    connection in a loop of its ConnectionHandler (the proxyserver's, by client id), through an asyncio
    transport. asyncio's StreamReader pauses and resumes the same transport for its own buffer's
    limit, and may resume one bumper paused: HttpLayer pauses again after the next read (64 KiB), so
    what an HTTP/2 send buffer holds stays within PAUSE_AT and a read or two."""

    def __init__(self, proxyserver: Proxyserver) -> None:
        self.proxyserver = proxyserver

    def hold(self, client: Client, paused: set[Connection], now: set[Connection]) -> set[Connection]:
        """Read none of NOW, and again those of PAUSED not in it; returns NOW."""
        handler = self.proxyserver.connections.get(client.id)
        if handler is None:
            return set()
        for conn in paused | now:
            io = handler.transports.get(conn)
            transport = getattr(io.writer, "transport", None) if io is not None else None
            if not isinstance(transport, asyncio.ReadTransport) or transport.is_closing():
                continue
            if conn not in now:
                transport.resume_reading()
            elif transport.is_reading():
                transport.pause_reading()
        return now
