"""The mitmproxy and pyOpenSSL insides bumper leans on, pinned (docs/architecture.md, "What bumper takes
from mitmproxy's insides").

bumper overrides some of mitmproxy's methods, copies parts of others, and reads the wording of its
errors. A new mitmproxy release that changes any of them could break bumper without one failing
request to show it. So the source of each is pinned here by its hash: an upgrade that changes one
fails this test, naming it, and someone reads the change and bumper's use of it before updating
the hash.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bumper_addons
import pytest
from mitmproxy import version
from OpenSSL import SSL

import bumper
from tests.conftest import BUMPER, Bumper

ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"

# Each mitmproxy name, the first 16 hex digits of its source's SHA-256 in the mitmproxy release
# pyproject.toml allows, and where bumper depends on it.
PINNED: dict[str, tuple[str, str]] = {
    # HttpStream: bumper's subclass answers early and cuts bodies off (bumper/proxy/httpstream.py)
    "mitmproxy.proxy.layers.http.HttpStream.start_request_stream": ("46f03368a2a54362", "overridden"),
    "mitmproxy.proxy.layers.http.HttpStream.state_stream_request_body": ("c98f7f715cef7cfa", "overridden, end copied"),
    "mitmproxy.proxy.layers.http.HttpStream.start_response_stream": ("b0de9e9a5ee27276", "overridden"),
    "mitmproxy.proxy.layers.http.HttpStream.state_stream_response_body": ("3fb6320300d3ddd5", "overridden, copied"),
    "mitmproxy.proxy.layers.http.HttpStream.handle_protocol_error": ("59fc3b2eeeabf63a", "overridden"),
    "mitmproxy.proxy.layers.http.HttpStream._handle_event": ("e3cbfef7310ae81f", "wrapped: its hooks run in place"),
    "mitmproxy.proxy.layers.http.HttpStream.send_response": ("d581bc106152e369", "called mid-state"),
    "mitmproxy.proxy.layers.http.HttpStream.flow_done": ("ad9969744785c572", "called"),
    "mitmproxy.proxy.layers.http.HttpLayer.make_stream": ("654959c6e74548e1", "overridden, copied"),
    "mitmproxy.proxy.context.Context.fork": ("cad9374a0689f10a", "replicated by make_stream"),
    # bumper's answers instead of mitmproxy's error pages (bumper/proxy/httpstream.py, bumper/proxy/replies.py)
    "mitmproxy.proxy.layers.http.HttpLayer.event_to_child": ("1095f6e1581d1780", "overridden"),
    "mitmproxy.proxy.layers.http.HttpLayer._handle_event": (
        "6ba31883cc7a06b3",
        "keeps Http1/2Server; Http1/2Client by name",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Server.read_headers": ("3fe0945216bcf7bc", "overridden, page read"),
    "mitmproxy.proxy.layers.http._http1.Http1Server.send": ("cc218a1337c0f5cf", "overridden: CutOff; page replicated"),
    # The upstream's response head limit: bumper's Http1Client, put where these make it by name
    "mitmproxy.proxy.layers.http._http1.Http1Client.read_headers": ("415454c5fa8b5981", "overridden: head size"),
    "mitmproxy.proxy.layers.http.HttpClient._handle_event": ("bc1cae775a49a4fe", "makes Http1/2Client by name"),
    # and its deadline: a RequestWakeup, which HttpLayer routes back to the layer that asked (command_sources)
    "mitmproxy.proxy.layers.http._http1.Http1Connection._handle_event": ("2ac8db3e43ae743f", "extended: Wakeup"),
    # The WebSocket message limit: bumper's WebsocketLayer, put where HttpStream.flow_done makes it by name
    "mitmproxy.proxy.layers.websocket.WebsocketLayer.relay_messages": ("2d451252c7287da0", "assembled path: extended"),
    "mitmproxy.proxy.layers.websocket.WebsocketLayer.start": ("8445ad1cfb2fcca5", "extended: its deflate bounded"),
    # wsproto, under it: permessage-deflate's inflating bounded (bumper.proxy.websocket.BoundedDeflate)
    "wsproto.extensions.PerMessageDeflate.frame_inbound_payload_data": ("93bc8692346aa787", "overridden"),
    "wsproto.connection.Connection.__init__": ("2aa4c1439d32bd59", "its _proto's extensions read"),
    "wsproto.frame_protocol.FrameProtocol.__init__": ("037e847db237d081", "its extensions read"),
    "wsproto.connection.Connection.events": ("e4d77be0bfef1af2", "turns an extension's CloseReason into a close"),
    "mitmproxy.proxy.layers.websocket.WebsocketConnection.send2": ("f33f2c236db2bec9", "called to stream"),
    "mitmproxy.proxy.layers.websocket.WebsocketConnection.__init__": ("f77a8c21ac12e55f", "its frame_buf read"),
    "mitmproxy.proxy.layers.http._http2.Http2Connection._handle_event": ("7fc814a8a507f234", "its error page replaced"),
    "mitmproxy.proxy.layers.http._base.format_error": ("26271a67770fbaf1", "its paragraph read"),
    "mitmproxy.proxy.layers.http.ErrorCode.http_status_code": ("4c08deb71c963636", "called"),
    "mitmproxy.proxy.layers.http.HttpStream.check_invalid": ("ef0a126eef45d903", "error wording read"),
    # The HTTP/1 relay (bumper/proxy/h1relay.py): what it replicates of HttpStream and Http1Server/Client,
    # and the state it sets them in when it hands a connection over with a response awaited
    "mitmproxy.proxy.layers.http.HttpStream.state_consume_request_body": (
        "45459c1bbd8bdb1a",
        "replicated; its end state set",
    ),
    "mitmproxy.proxy.layers.http.HttpStream.state_wait_for_response_headers": ("10e32e91b2948164", "replicated; set"),
    "mitmproxy.proxy.layers.http.HttpStream.check_body_size": ("236ca0a7b9fd4f69", "what the relay leaves to it"),
    "mitmproxy.proxy.layers.http.validate_request": ("e7cec257ce91b7c5", "called"),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.mark_done": ("dc5ed395ce4f0763", "replicated"),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.wait": ("c99d0494a840a2b6", "set as Http1Server's state"),
    "mitmproxy.proxy.layers.http._http1.Http1Server.__init__": ("508efbb58d5dead1", "its first stream id"),
    "mitmproxy.proxy.layers.http._http1.Http1Server.mark_done": ("94fd7ea388c88671", "the state it leaves, set"),
    "mitmproxy.proxy.layers.http._http1.Http1Client.send": ("35d961e20d481204", "the state it leaves, set"),
    # TLS layers: close_notify and alerts (bumper/proxy/layers.py)
    "mitmproxy.proxy.layers.tls.TLSLayer.send_close": ("d9b1161f42db9992", "overridden"),
    "mitmproxy.proxy.layers.tls.TLSLayer.tls_interact": ("62d6d57d43dd1a2e", "called"),
    "mitmproxy.proxy.layers.tls.TLSLayer.start_tls": ("3878cd7c942a58ba", "extended: alert before its close"),
    "mitmproxy.proxy.layers.tls.TLSLayer.on_handshake_error": ("affcdcce93e86080", "overridden"),
    "mitmproxy.proxy.layers.tls.ServerTLSLayer.on_handshake_error": ("fd53d44a5dee8d8a", "overridden"),
    "mitmproxy.proxy.layers.tls.ClientTLSLayer.on_handshake_error": ("04a3a2530293d19b", "overridden; wording read"),
    "mitmproxy.proxy.layers.tls.TLSLayer.receive_handshake_data": ("721fe6313c0979fe", "error wording read"),
    "mitmproxy.proxy.layers.tls.ClientTLSLayer.receive_handshake_data": ("a0ee021f92f6d0ff", "error wording read"),
    # Truncation passed on (bumper/proxy/layers.py ServerTLSLayer, bumper/proxy/httpstream.py)
    "mitmproxy.proxy.layers.tls.TLSLayer.receive_close": ("244aa237c481fc55", "overridden, copied"),
    "mitmproxy.proxy.tunnel.TunnelLayer.receive_close": ("3685ccbd51e03918", "replicated with UncleanClose"),
    "mitmproxy.proxy.layers.tls.TLSLayer.receive_data": ("85c0e6b656c324e5", "close_notify: RECEIVED_SHUTDOWN"),
    "mitmproxy.proxy.tunnel.TunnelLayer._handle_command": ("11ede598b3b37965", "passes CutOff to send_close"),
    "mitmproxy.proxy.layers.http.HttpStream.state_consume_response_body": ("5323db61dfc7e2e1", "compared"),
    # A CONNECT connected after its ClientHello (bind_names: resolve; bumper/proxy/httpstream.py, enforce.py)
    "mitmproxy.proxy.layers.http.HttpStream.handle_connect_regular": ("ae920a52067801dc", "overridden: eager copied"),
    # Listener modes (bumper/proxy/layers.py NextLayer, listeners.py, state.py; docs/modes.md)
    "mitmproxy.proxy.layers.modes.HttpProxy._handle_event": ("8147a0c98455987c", "an SNI listener's pass-through"),
    "mitmproxy.proxy.layers.modes.DestinationKnown.finish_start": ("91f47432073a2bf6", "lazy: no connect at start"),
    "mitmproxy.proxy.layers.modes.TransparentProxy._handle_event": ("613cabc6639df9e8", "the layer bumper follows"),
    "mitmproxy.proxy.layers.modes.ReverseProxy._handle_event": ("c24268c5e5cd49db", "sets the upstream and its SNI"),
    "mitmproxy.proxy.layers.http.HttpStream.state_wait_for_request_headers": (
        "3706d5d5ce01dcd4",
        "reverse Host; overridden: origin-form on the proxy port",
    ),
    "mitmproxy.proxy.layers.http.HttpStream.mode": ("b6809921b43ba0df", "read: the proxy port's layer is regular"),
    "mitmproxy.proxy.layers.http.HttpStream.handle_connect_finish": ("eb3a0054cb5b716e", "called"),
    "mitmproxy.proxy.layers.tls.ClientTLSLayer.start_server_tls": ("ecb12045d0984a01", "opens it after the hook"),
    "mitmproxy.proxy.layers.tls.ServerTLSLayer.event_to_child": ("72ccc54bbf633c15", "lets that open through"),
    # The relay listener: TLS inside bumper's own TLS, told apart by the layer stack (bumper/proxy/layers.py)
    "mitmproxy.proxy.layers.tls.ClientTLSLayer.__init__": ("6cae807276e6400e", "TLS-over-TLS: inner attributes"),
    "mitmproxy.proxy.layer.NextLayer.__init__": ("b270467e818faea9", "not in context.layers"),
    "mitmproxy.proxy.tunnel.TunnelLayer.__init__": ("f1db39b66512ba69", "its NextLayer shares its context"),
    # Limits in the protocol layers (bumper/proxy/httpstream.py, layers.py; docs/limits.md)
    "mitmproxy.proxy.layers.http._http1.Http1Connection.read_body": (
        "aece271029af36e4",
        "overridden: 400 before close; an unclean close",
    ),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.done": ("7c8d996749eb1500", "the state after a refusal"),
    "mitmproxy.proxy.layers.http._http2.Http2Server._handle_event": ("7282fa18e70a3eaa", "overridden"),
    "mitmproxy.proxy.layers.http._http2.Http2Server.handle_h2_event": ("d24a023c678de6ce", "overridden"),
    "mitmproxy.proxy.layers.http._http2.Http2Connection.handle_h2_event": (
        "f6b6a52b12548102",
        "its stream bookkeeping; acknowledge_received_data held",
    ),
    "mitmproxy.proxy.layers.http._http2.Http2Connection.protocol_error": ("461f5e7de9c9b687", "called"),
    "mitmproxy.proxy.layers.http._http2.Http2Connection.close_connection": ("44b76ed198e7916a", "sets done, compared"),
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.__init__": ("73fce8e17f54112a", "its settings pattern"),
    # HTTP/2 flow control: bounded windows, DATA acknowledged once the other leg passed it on (bumper/proxy/h2flow.py)
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.initiate_connection": (
        "96af41e63f2d65bc",
        "overridden: its 2 GiB window skipped",
    ),
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.send_data": ("eeb7918d96b19708", "stream_buffers read"),
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.stream_window_updated": (
        "3be939b870a5f8e4",
        "drains stream_buffers",
    ),
    "mitmproxy.proxy.layers.http._http_h2.BufferedH2Connection.receive_data": (
        "1ebc3cf9b6b1e3d6",
        "WINDOW_UPDATE drains, a reset pops stream_buffers",
    ),
    "mitmproxy.proxy.layers.http._http2.Http2Connection.__init__": ("1614b5711609de26", "its h2_conn replaced"),
    "mitmproxy.proxy.layers.http._http2.Http2Client.__init__": ("e4b5d0162e44ceaa", "its local settings kept"),
    "mitmproxy.proxy.layers.http._http2.Http2Client._handle_event": (
        "02de05a5b89f087b",
        "our_stream_id, their_stream_id, stream_queue read",
    ),
    "mitmproxy.proxy.layer.Layer.handle_event": (
        "fd88b0fb09ceddbb",
        "its _paused_event_queue read, a LazyQueue; a blocking command names the layer that waits (dispatch.in_place)",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.handle_connection": (
        "95c3f93e9824e527",
        "reads through the transport bumper pauses; cancelled when idle: CLOSED, popped",
    ),
    "mitmproxy.proxy.server.ConnectionHandler.drain_writers": ("6b57434604561e3e", "HTTP/1 legs' back-pressure"),
    # Deadlines, idle log line, connection counts (bumper/proxy/connlimits.py)
    "mitmproxy.proxy.server.TimeoutWatchdog.watch": ("eee8e7085dba9250", "its callback replaced"),
    "mitmproxy.proxy.server.ConnectionHandler.on_timeout": ("0d1e6b0aa6e41173", "replicated by _close"),
    "mitmproxy.proxy.server.ConnectionHandler.__init__": ("ffb8e6c9e6c6d020", "tcp_timeout, transports"),
    "mitmproxy.proxy.mode_servers.ServerInstance.handle_stream": (
        "21eea06f208c752e",
        "registered by client.id; original destination as sockname",
    ),
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance.listen": (
        "7670a9038b44170d",
        "_servers: asyncio servers; binds with asyncio.start_server(handler, host, port) (workers.InheritingLoop)",
    ),
    # --workers: a worker serves the socket its supervisor bound (bumper/proxy/workers.py)
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance._start": (
        "f96507081fa6236b",
        "listens on the mode's own host and port (workers.InheritingLoop matches them)",
    ),
    "mitmproxy.addons.proxyserver.Proxyserver.register_connection": ("d79bb91554a8bda2", "connections read"),
    # The hook dispatcher (bumper/proxy/dispatch.py)
    "mitmproxy.addonmanager.AddonManager.register": ("01ddcca314eebbd3", "overridden"),
    "mitmproxy.addonmanager.AddonManager.remove": ("2e93aab2204a39f6", "overridden"),
    "mitmproxy.addonmanager.AddonManager.clear": ("5fd484329fa05882", "overridden"),
    "mitmproxy.addonmanager.AddonManager.trigger_event": ("b763c59bc4992e33", "overridden"),
    "mitmproxy.addonmanager.AddonManager.handle_lifecycle": ("38c97e792d1db5b7", "overridden"),
    "mitmproxy.addonmanager.safecall": ("f2052c18340e99b0", "replicated by dispatch._halts"),
    "mitmproxy.addonmanager.traverse": ("bad3d9f88bdf9269", "called"),
    "mitmproxy.master.Master.__init__": ("8e2a46cc1aca56ca", "addons replaced after it"),
    "mitmproxy.master.Master._asyncio_exception_handler": ("822415006521e79e", "private, wrapped, installed by serve"),
    "mitmproxy.proxy.server.ConnectionHandler.hook_task": ("9ac7970160526268", "what SyncHooks does in place"),
    "mitmproxy.proxy.layer.Layer._handle_event": ("1a704a031407036d", "implemented by SyncHooks and Refuse"),
    "mitmproxy.hooks.Hook.__init_subclass__": ("09b689277643e8f3", "registers dispatch._Rest by its name"),
    # Listening and the stock addons bumper replaces (proxy/master.py, proxy/tlsprovider.py, proxy/layers.py)
    "mitmproxy.addons.proxyserver.Servers.update": ("e653c1bdfa8cf352", "its error log parsed"),
    # The drain on SIGTERM closes the listeners, not the connections (proxy/drain.py)
    "mitmproxy.addons.proxyserver.Servers.__iter__": ("734080786465671d", "the listeners to close"),
    "mitmproxy.proxy.mode_servers.ServerInstance.stop": ("9cbc64edbed13119", "called by the drain"),
    "mitmproxy.proxy.mode_servers.AsyncioServerInstance._stop": ("73df3f7e7fb2d941", "closes without wait_closed"),
    "mitmproxy.addons.tlsconfig.alpn_select_callback": ("41a266755820fa37", "used"),
    "mitmproxy.addons.tlsconfig.AppData": ("88cb35fe3ca564af", "used"),
    "mitmproxy.addons.tlsconfig.TlsConfig.tls_start_client": ("d3093c897eeafc2f", "replaced by TlsProvider"),
    "mitmproxy.addons.tlsconfig.TlsConfig.tls_start_server": ("2e2dc9c25670cf64", "replaced by TlsProvider"),
    "mitmproxy.addons.next_layer.NextLayer.next_layer": ("d277fef31bbe9519", "replaced by layers.NextLayer"),
    "mitmproxy.http.Request.pretty_url": ("22587ae7fe2a8eab", "replicated by addon.pretty_url"),
    # What a crash in the proxy core logs, which eventlog.proxy_core_crashes lets through as one line
    "mitmproxy.proxy.server.ConnectionHandler.handle_client": ("01f1b7cc991c4711", "its crash message read"),
    "mitmproxy.proxy.server.ConnectionHandler.server_event": ("a2b42657ebe8bf6d", "its crash message read"),
    # Where upstream connections are made and refused (upstream/resolve.py, proxy/state.py)
    # Also cancelled by connlimits (--upstream-timeout): the reason becomes its error text.
    "mitmproxy.proxy.server.ConnectionHandler.open_connection": ("5e0b3cbaf7a4030a", "its connect checked, error read"),
    "mitmproxy.addons.proxyserver.Proxyserver.server_connect": ("1fc787ebda12ea02", "its loop check reworded"),
    "mitmproxy.net.http.url.parse_authority": ("d8338265c05d8491", "decodes a CONNECT host to Unicode"),
    # What a connection holds, estimated by the overload manager (bumper/proxy/overload.py held_by)
    "mitmproxy.proxy.layers.http.HttpLayer.__init__": ("1ece202e595d103e", "streams, connections walked"),
    "mitmproxy.proxy.layers.http.HttpStream.__init__": ("9892a5f6b47b7b7b", "body buffers read"),
    "mitmproxy.proxy.layers.http._http1.Http1Connection.__init__": ("8763ca2559caa640", "buf read"),
    "mitmproxy.proxy.layers.websocket.WebsocketLayer.__init__": ("567c253482a9dd73", "client_ws, server_ws read"),
    # An idle connection's upstream leg closed and forgotten (bumper/proxy/upstreamidle.py)
    "mitmproxy.proxy.layers.http.HttpLayer.get_connection": ("1aa1c63e3175766c", "skips closed; connections read"),
    "mitmproxy.proxy.tunnel.TunnelLayer._handle_event": ("00676a887c456cec", "CLOSED after ConnectionClosed"),
    "mitmproxy.proxy.layers.tls.TLSLayer.send_data": ("35a29a1b0b0cb184", "never on a closed tls, now None"),
    # Each layer's held events in a LazyQueue (bumper/proxy/lightlayers.py)
    "mitmproxy.proxy.layer.Layer.__init__": ("fd5121f4df9d0eba", "its collections.deque() replaced"),
    "mitmproxy.proxy.layer.Layer._Layer__continue": ("1b275367b37bed01", "the queue's bool, popleft"),
    "mitmproxy.proxy.layers.http.HttpStream.check_killed": ("368cad352d1e82b6", "iterates the queue"),
    # Header lookups in one pass (bumper/proxy/headerlookup.py): what `get` and `in` went through
    "mitmproxy.http.Headers.get_all": ("367b3317bc2ba45c", "replicated: bytes names, values decoded"),
    "mitmproxy.http.Headers._kconv": ("dd59639eb7c46701", "replicated: lower()"),
    "mitmproxy.http.Headers._reduce_values": ("d808a4075a1f266d", "replicated: joined with ', '"),
    "mitmproxy.coretypes.multidict._MultiDict.__getitem__": ("482e7414c932e3e8", "replicated: KeyError on none"),
    "mitmproxy.coretypes.multidict._MultiDict.get_all": ("5bff03c1afa25bb7", "replicated: every field compared"),
}

# pyOpenSSL has no public call for these: host name checks and OpenSSL's verify error codes.
OPENSSL_LIB = (
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set_hostflags",
    "X509_VERIFY_PARAM_set1_host",
    "X509_VERIFY_PARAM_set1_ip",
    "X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS",
    "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT",
    "X509_verify_cert_error_string",
    "X509_V_ERR_CERT_HAS_EXPIRED",
    "X509_V_ERR_HOSTNAME_MISMATCH",
    # An idle client leg's memory BIOs swapped for new ones (bumper/upstream/tls.py drop_record_buffers)
    "BIO_get_mem_data",
    "BIO_new",
    "BIO_s_mem",
    "BIO_free",
    "SSL_set_bio",
    # The upstream leg's sessions (bumper/upstream/sessions.py) and resumed handshakes counted
    "SSL_set_session",
    "SSL_get_session",
    "SSL_session_reused",
    "SSL_SESSION_free",
    "i2d_SSL_SESSION",
    "SSL_SESS_CACHE_NO_INTERNAL_STORE",
)


def resolve(qualname: str) -> Any:
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        if isinstance(obj, property):
            return obj.fget
        return obj.func if isinstance(obj, functools.cached_property) else obj
    raise ImportError(qualname)


def source_hash(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("qualname", sorted(PINNED))
def test_the_mitmproxy_source_bumper_builds_on_is_unchanged(qualname: str) -> None:
    pinned, use = PINNED[qualname]
    try:
        found = source_hash(resolve(qualname))
    except (ImportError, AttributeError):
        pytest.fail(f"{qualname} ({use} by bumper) is gone in mitmproxy {version.VERSION}")
    assert found == pinned, (
        f"{qualname} changed in this mitmproxy ({use} by bumper): read the change and bumper's use of it "
        f"(docs/architecture.md), then pin {found!r} here"
    )


def bumper_modules() -> list[Any]:
    return [
        importlib.import_module(info.name)
        for package in (bumper, bumper_addons)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
        if not info.name.endswith("__main__")
    ]


def test_every_mitmproxy_method_bumper_overrides_is_pinned() -> None:
    """A new override of a mitmproxy method that nobody pinned would go unguarded."""
    unpinned = []
    for module in bumper_modules():
        for cls in vars(module).values():
            if not inspect.isclass(cls) or not cls.__module__.startswith(("bumper", "bumper_addons")):
                continue
            for name, value in vars(cls).items():
                if not callable(value):
                    continue
                for base in cls.__mro__[1:]:
                    if base.__module__.startswith("mitmproxy") and name in vars(base) and not name.startswith("__"):
                        if not any(p.endswith(f".{base.__qualname__}.{name}") for p in PINNED):
                            unpinned.append(f"{cls.__module__}.{cls.__qualname__}.{name} overrides {base.__qualname__}")
                        break
    assert not unpinned, "\n".join(unpinned)


def test_every_pinned_internal_is_in_the_architecture_doc() -> None:
    doc = ARCHITECTURE.read_text()
    missing = [q for q in PINNED if ".".join(q.split(".")[-2:]) not in doc]
    assert not missing, f"docs/architecture.md does not list: {missing}"


@pytest.mark.parametrize("symbol", OPENSSL_LIB)
def test_the_raw_openssl_calls_bumper_makes_exist(symbol: str) -> None:
    assert hasattr(SSL._lib, symbol), f"pyOpenSSL's bindings no longer have {symbol}"  # type: ignore[attr-defined]


def test_mitmproxy_still_words_a_client_rejecting_the_certificate_as_bumper_reads_it() -> None:
    """pinning.is_rejection and state.short_reason read these phrases out of mitmproxy's errors."""
    client_tls = inspect.getsource(resolve("mitmproxy.proxy.layers.tls.ClientTLSLayer"))
    any_tls = inspect.getsource(resolve("mitmproxy.proxy.layers.tls.TLSLayer.receive_handshake_data"))
    for phrase in ("Cannot parse ClientHello", "disconnected during the handshake"):
        assert phrase in client_tls, phrase
    for phrase in ("unknown ca", "bad certificate"):
        assert re.search(rf"alert {phrase}", any_tls), phrase


def test_mitmproxy_still_connects_and_words_a_proxy_loop_as_bumper_reads_it() -> None:
    """The destination check sits in the event loop's create_connection, which mitmproxy's
    open_connection reaches through asyncio.open_connection, and its refusal reaches the hooks as the
    error's text; a loop mitmproxy's own check catches first is reworded by its wording."""
    from bumper.proxy.state import SELF_CONNECT

    opening = inspect.getsource(resolve("mitmproxy.proxy.server.ConnectionHandler.open_connection"))
    assert "await asyncio.open_connection(" in opening and "err = str(e)" in opening
    # The server_connect hook runs first, in the same task: where via.route marks a relayed connection.
    assert opening.index("ServerConnectHook(") < opening.index("await asyncio.open_connection(")
    assert "create_task" not in opening
    looping = inspect.getsource(resolve("mitmproxy.addons.proxyserver.Proxyserver.server_connect"))
    assert all(part.strip() in looping for part in re.findall(r"[^.]+\.", SELF_CONNECT)), SELF_CONNECT


@pytest.mark.parametrize("checks", ["", "1"])
def test_the_proxy_runs_without_mitmproxys_debug_checks_unless_asked(
    start_bumper: Callable[..., Bumper], monkeypatch: pytest.MonkeyPatch, checks: str
) -> None:
    """The tests keep mitmproxy's `if __debug__` checks on (conftest); a user's bumper runs as `python -O`."""
    monkeypatch.setenv("BUMPER_DEBUG_CHECKS", checks)
    started = start_bumper()
    argv = Path(f"/proc/{started.process.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert (b"-O" in argv) is (checks == "")


def test_the_re_executed_proxy_never_imports_from_the_working_directory(tmp_path: Path) -> None:
    """bumper re-executes itself as `python -O -m bumper`: a `bumper/` in the directory it was started
    from (a checkout, a download folder) must not be what runs."""
    impostor = tmp_path / "bumper"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "__main__.py").write_text("import sys; print('impostor ran', file=sys.stderr); sys.exit(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "BUMPER_DEBUG_CHECKS"}
    r = subprocess.run(
        [BUMPER, "--ca", str(tmp_path / "ca"), "--policy", str(tmp_path / "missing.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # The installed bumper ran, after its re-exec: it read the options and refused the missing policy.
    assert (r.returncode, "impostor ran" in r.stderr) == (2, False), r.stderr
    assert "missing.yaml" in r.stderr


def test_the_asyncio_and_h2_insides_the_limits_use_are_there() -> None:
    """Not pinned by hash (they vary with the Python and h2 releases), but by what bumper relies on:
    pausing a listening asyncio.Server and starting it again (connlimits), asyncio's message when
    accept() runs out of descriptors, and where h2 keeps a header block still in CONTINUATION frames."""
    import asyncio.base_events
    import asyncio.selector_events

    from h2.frame_buffer import FrameBuffer

    start = inspect.getsource(asyncio.base_events.Server._start_serving)
    assert "if self._serving:" in start and "_start_serving(" in start
    accept = inspect.getsource(asyncio.selector_events.BaseSelectorEventLoop._accept_connection)
    assert "'socket.accept() out of system resource'" in accept
    assert FrameBuffer()._headers_buffer == []


def test_a_worker_loop_serves_the_inherited_socket_where_asyncio_start_server_binds() -> None:
    """mitmproxy binds a listener with asyncio.start_server(handler, host, port), which asks the
    running loop's create_server: workers.InheritingLoop hands it the supervisor's socket there, and
    asyncio's Server calls listen() on it as it starts serving."""
    import asyncio
    import socket

    from bumper.proxy.workers import InheritingLoop

    given = socket.socket()
    given.bind(("127.0.0.1", 0))  # bound, not listening: the server listens once it serves
    port, fd = given.getsockname()[1], given.fileno()

    async def bind() -> tuple[Any, ...]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):  # refused unless it listens
                pass
            return tuple(sock.fileno() for sock in server.sockets)
        finally:
            server.close()

    loop = InheritingLoop((), {("127.0.0.1", port): given})
    try:
        assert loop.run_until_complete(bind()) == (fd,)  # the very socket, not a new one
    finally:
        loop.close()


def test_layers_hold_their_events_in_a_lazy_queue() -> None:
    """lightlayers.install() reaches Layer.__init__ through the name it reads (`collections`), and the
    queue it makes behaves as the deque the layers use did."""
    from mitmproxy import options
    from mitmproxy.proxy import context, layer
    from mitmproxy.test import tflow

    from bumper.proxy import lightlayers

    lightlayers.install()
    made = layer.Layer(context.Context(tflow.tclient_conn(), options.Options()))
    queue = made._paused_event_queue
    assert isinstance(queue, lightlayers.LazyQueue) and not queue and list(queue) == []
    queue.append(1)
    queue.append(2)
    assert queue and len(queue) == 2 and list(queue) == [1, 2]
    assert queue.popleft() == 1 and queue.popleft() == 2
    assert not queue and queue._queue is None  # its deque gone with its last event
    with pytest.raises(IndexError):
        queue.popleft()


def test_header_lookups_answer_as_mitmproxys_did() -> None:
    """headerlookup.install() replaces Headers.get and `in` (Mapping's, through __getitem__ and get_all): over
    names in any case, as str and bytes, repeated, missing, and not UTF-8, both answer the same."""
    from collections.abc import Mapping

    from mitmproxy.http import Headers

    from bumper.proxy import headerlookup

    headers = Headers(
        [
            (b"Host", b"example.com"),
            (b"Set-Cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"X-Latin", "caf\xe9".encode("latin-1")),
            (b"Content-Length", b"12"),
        ]
    )
    keys: list[str | bytes] = ["host", "HOST", b"Host", "set-cookie", b"SET-COOKIE", "x-latin", "content-length"]
    keys += ["connection", b"transfer-encoding", "", "Hoſt"]
    expected = [(Mapping.get(headers, k), Mapping.get(headers, k, "-"), Mapping.__contains__(headers, k)) for k in keys]
    headerlookup.install()
    assert Headers.get is headerlookup.get and Headers.__contains__ is headerlookup.contains
    assert [(headers.get(k), headers.get(k, "-"), k in headers) for k in keys] == expected
    assert headers.get("set-cookie") == "a=1, b=2" and "Content-Length" in headers and "te" not in headers
    with pytest.raises(TypeError):
        headers.get(5)  # as mitmproxy's always_bytes refuses it


def test_pyopenssl_keeps_its_memory_bios_where_bumper_swaps_them() -> None:
    """drop_record_buffers replaces Connection._into_ssl and _from_ssl, the BIOs bio_write and
    bio_read use: a connection made over memory BIOs has them, one over a socket has None."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    assert conn._into_ssl is not None and conn._from_ssl is not None  # type: ignore[attr-defined]
    for method in ("bio_read", "bio_write"):
        assert "_from_ssl" in inspect.getsource(getattr(SSL.Connection, method)) or method == "bio_write"
    assert "_into_ssl" in inspect.getsource(SSL.Connection.bio_write)


def test_cryptographys_openssl_still_has_what_session_resumption_calls() -> None:
    """bumper/upstream/hidden.py finds OpenSSL functions pyOpenSSL does not bind in the symbol
    table of cryptography's extension: an upgrade that strips it, or links another OpenSSL, fails
    here (bumper itself would only warn and resume no client session). They are called on objects
    pyOpenSSL made: the same OpenSSL, or the ticket key would not read back as set
    (SSL_SESSION_is_resumable: tests/test_resumption.py, where no upstream session is kept without it)."""
    from bumper.upstream import hidden

    assert hidden.FUNCTIONS is not None, hidden.MISSING
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    key = bytes(range(80))
    assert hidden.set_ticket_key(context, key) and hidden.ticket_key(context) == key
    assert hidden.set_session_id_context(SSL.Connection(context), b"x" * 32)
    assert not hidden.set_session_id_context(SSL.Connection(context), b"x" * 33)  # OpenSSL's own limit holds
    assert hidden.on_new_session(SSL.Context(SSL.TLS_CLIENT_METHOD), hidden.NEW_SESSION_CB(lambda ssl, session: 0))
