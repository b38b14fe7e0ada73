"""The admin listener (--admin HOST:PORT): what operators and their tools ask of bumper, apart from
the traffic it carries: /healthz and /readyz for probes, /metrics for Prometheus, and the CA's
onboarding page.

It is a separate socket, never the proxy's: the proxy's port is reachable by every client of the
gateway, and an egress gateway's clients must not read its metrics or probe its state. A
non-loopback address is refused unless --admin-allow names the networks that may connect; every
other peer gets a 403. The server is small on purpose: GET and HEAD only, one request per connection,
a request head of at most 8 KiB read within 10 s, at most 32 connections at a time: a peer costs
it a bounded amount of memory whatever it sends."""

from __future__ import annotations

import asyncio
import http
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import h11
from cryptography import x509
from prometheus_client import CollectorRegistry, exposition

from bumper.certs import distribution, onboarding
from bumper.errors import ConfigError
from bumper.policy import names

log = logging.getLogger("bumper.admin")

MAX_HEAD_BYTES = 8 * 1024  # a probe's or a scraper's request is a few hundred bytes
REQUEST_TIMEOUT = 10.0  # seconds to read a request and write its answer: Prometheus' default scrape timeout
MAX_CONNECTIONS = 32  # a scraper, a couple of probes and a browser need a handful
REFUSAL_LOG_INTERVAL = 60.0  # seconds: one line for a flood of refused peers, not one per connection

Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class AdminConfig:
    """--admin HOST:PORT and --admin-allow CIDR: where the admin listener binds, and who may connect
    besides loopback."""

    host: str
    port: int
    allow: tuple[Network, ...] = ()
    # A worker's private admin (bumper.proxy.workers): a Unix socket, 0600 in a 0700 directory, that
    # only the supervisor reads; host and port are then unused.
    unix: str | None = None

    @classmethod
    def parse(cls, spec: str, allow: list[str]) -> AdminConfig:
        """--admin SPEC with its --admin-allow networks, or ConfigError. A non-loopback address (the
        unspecified 0.0.0.0 and :: included) needs --admin-allow: a pod's or a host's admin port is
        never open to the world by a typo."""
        host, sep, port = spec.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host:
            raise ConfigError(f"--admin {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
        if host == "localhost":
            host = "127.0.0.1"
        if not names.is_ip_address(host):
            raise ConfigError(f"--admin {spec!r}: {host!r} is not an IP address")
        try:
            number = names.parse_port(port, lowest=0)  # 0: any free port, announced in the log
        except ValueError as e:
            raise ConfigError(f"--admin {spec!r}: {e}") from None
        networks = tuple(_network(text) for text in allow)
        if not ip_address(host).is_loopback and not networks:
            raise ConfigError(
                f"--admin {spec}: not a loopback address; name the networks that may reach it with "
                "--admin-allow CIDR (e.g. --admin-allow 10.0.0.0/8)"
            )
        return cls(host, number, networks)

    def admits(self, peer: IPv4Address | IPv6Address) -> bool:
        """Whether PEER may use the admin listener: loopback always, others only from --admin-allow."""
        if isinstance(peer, IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return peer.is_loopback or any(peer in network for network in self.allow)


def _network(text: str) -> Network:
    try:
        return ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"--admin-allow {text!r}: expected a network, e.g. 10.0.0.0/8 or fd00::/8") from None


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    headers: Mapping[str, str]  # lower-case names


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode() + b"\n")


# A page made at once, or one that has to wait (the supervisor's, which asks every worker).
Route = Callable[[Request], Response | Awaitable[Response]]

# Every answer: no page of the admin listener is framed, sniffed or cached on the way.
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
)


async def answer(routes: Mapping[str, Route], request: Request) -> Response:
    """The response to REQUEST: its route's, or 404/405."""
    route = routes.get(request.path)
    if route is None:
        return Response.text(404, f"not found: {request.path[:100]!r}; this is bumper's admin listener")
    if request.method not in ("GET", "HEAD"):
        return Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
    response = route(request)
    return await response if inspect.isawaitable(response) else response


class Readiness:
    """What /readyz says: not ready until the proxy's listeners are bound and its CA loaded (serve()
    says so with `listening()`), and not ready again from the first SIGTERM on, so that a load
    balancer stops sending new connections while the open ones drain; nor while the overload manager
    keeps new connections waiting (bumper.proxy.overload): the balancer sends them elsewhere meanwhile."""

    def __init__(self, draining: Callable[[], bool], overloaded: Callable[[], bool] = lambda: False) -> None:
        self._draining = draining
        self._overloaded = overloaded
        self._listening = False

    def listening(self) -> None:
        self._listening = True

    def why_not(self) -> str | None:
        if self._draining():
            return "draining (SIGTERM)"
        if not self._listening:
            return "starting"
        if self._overloaded():
            return "overloaded (memory over 80% of --max-memory: new connections wait)"
        return None


def probe_routes(readiness: Readiness) -> dict[str, Route]:
    """/healthz: the process answers; /readyz: it takes new connections."""

    def readyz(request: Request) -> Response:
        why_not = readiness.why_not()
        return Response.text(503, f"not ready: {why_not}") if why_not else Response.text(200, "ready")

    return {"/healthz": lambda request: Response.text(200, "ok"), "/readyz": readyz}


def metrics_route(registry: CollectorRegistry) -> dict[str, Route]:
    """/metrics in the format the scraper asks for (Prometheus text, or OpenMetrics by Accept)."""

    def metrics(request: Request) -> Response:
        encode, content_type = exposition.choose_encoder(request.headers.get("accept", ""))
        return Response(200, encode(registry), content_type)

    return {"/metrics": metrics}


def onboarding_routes(
    anchor: x509.Certificate, admin: tuple[str, int], proxy: tuple[str, int] | None, bundle: bytes | None
) -> dict[str, Route]:
    """`/`, the CA's onboarding page for ANCHOR, and its downloads (with BUNDLE, /bundle.pem), made once:
    the commands on the page name ADMIN and PROXY, the addresses bumper is bound to, never the request's
    Host header, which the client chooses. Each download is checked once more to hold no key."""
    page = onboarding.page(
        anchor, onboarding.reachable(*admin), onboarding.reachable(*proxy) if proxy else None, bundle is not None
    )
    answers = {"/": Response(200, page, onboarding.PAGE_TYPE, onboarding.PAGE_HEADERS)}
    for download in onboarding.downloads(anchor, bundle):
        body = distribution.check_public(download.body, download.path)
        answers[download.path] = Response(
            200, body, download.content_type, (("Content-Disposition", download.disposition),)
        )
    return {path: _always(response) for path, response in answers.items()}


def _always(response: Response) -> Route:
    return lambda request: response


class AdminServer:
    """The admin listener's socket and its connections."""

    def __init__(self, config: AdminConfig) -> None:
        self.config = config
        self.routes: Mapping[str, Route] = {}  # set once bound: the pages name the address
        self._server: asyncio.Server | None = None
        self._open = 0
        self._last_refusal_line = -REFUSAL_LOG_INTERVAL

    async def start(self) -> tuple[str, int]:
        """Bind, or ConfigError naming the OS's reason; the address bound (the real port for 0)."""
        if self.config.unix is not None:
            self._server = await asyncio.start_unix_server(self._connection, self.config.unix)
            os.chmod(self.config.unix, 0o600)
            return self.config.unix, 0
        try:
            self._server = await asyncio.start_server(self._connection, self.config.host, self.config.port)
        except OSError as e:
            raise ConfigError(
                f"--admin {names.host_port(self.config.host, self.config.port)}: {e.strerror or e}"
            ) from None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            await asyncio.wait_for(self._serve(reader, writer), REQUEST_TIMEOUT)
        except (TimeoutError, OSError, h11.ProtocolError):
            pass  # a slow, vanished or confused peer: nothing for it, nothing to log
        finally:
            self._open -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A worker's Unix socket has no peer address: its directory's mode is its access control.
        peer = None if self.config.unix is not None else ip_address(writer.get_extra_info("peername")[0])
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        request = await _read_request(conn, reader)
        if request is None:
            return
        if peer is None or self.config.admits(peer):
            try:
                response = await answer(self.routes, request)
            except Exception as e:  # a page that cannot be made is a 500 and one line, never a traceback
                log.error("admin: %s %s failed: %s: %s", request.method, request.path, type(e).__name__, e)
                response = Response.text(500, "internal error: see bumper's log")
        else:
            self._refused(peer)
            response = Response.text(403, "forbidden: this address is not in --admin-allow")
        writer.write(_encode(conn, request, response))
        await writer.drain()

    def _refused(self, peer: IPv4Address | IPv6Address) -> None:
        now = time.monotonic()
        if now - self._last_refusal_line >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_line = now
            log.warning(
                "admin: refused %s, not in --admin-allow (403; more refusals in the next %gs are not logged)",
                peer,
                REFUSAL_LOG_INTERVAL,
            )


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
    """The request's head, or None if the peer left first. h11 caps what it buffers at MAX_HEAD_BYTES."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(4096))
            continue
        if isinstance(event, h11.Request):
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers}
            target = event.target.decode("latin-1")
            return Request(event.method.decode("latin-1"), target.partition("?")[0], headers)
        return None  # the peer closed


def _encode(conn: h11.Connection, request: Request, response: Response) -> bytes:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
        *_SECURITY_HEADERS,
        *response.headers,
    ]
    reason = http.HTTPStatus(response.status).phrase
    out = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
    if request.method != "HEAD":
        out += conn.send(h11.Data(data=response.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")
