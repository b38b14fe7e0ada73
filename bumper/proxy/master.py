"""bumper's own mitmproxy master, with exactly the addons bumping needs, and its run loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from mitmproxy import master, options
from mitmproxy.addons import proxyserver
from mitmproxy.connection import Address
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket as websocket_layers
from mitmproxy.proxy.mode_servers import ServerInstance
from mitmproxy.utils import asyncio_utils, human

from bumper import sdnotify, stopping
from bumper.addon import Addon
from bumper.certs import ca as ca_files
from bumper.certs import distribution, keys, mimic
from bumper.certs.keypool import KeyPool, PoolSettings
from bumper.certs.mimicdb import DB_FILE, FailSafeMimicStore, SqliteMimicStore
from bumper.certs.mimicdb import DEFAULT_MAX_BYTES as DEFAULT_DB_BYTES
from bumper.certs.mimicstore import DEFAULT_MAX_BYTES as DEFAULT_MEMORY_BYTES
from bumper.certs.mimicstore import MimicStore
from bumper.errors import ConfigError
from bumper.inspect.chain import AddonRunner
from bumper.policy.htpasswd import Users
from bumper.policy.names import host_port
from bumper.policy.pinning import LearnedPins, SharedLearnedPins
from bumper.policy.rules import LAB, AddonSpec, ClientCertRequirement, OnError, Policy
from bumper.policy.source import PolicySource
from bumper.proxy import dispatch, h2flow, headerlookup, httpstream, lightlayers, websocket
from bumper.proxy.admin import (
    AdminConfig,
    AdminServer,
    Readiness,
    Route,
    metrics_route,
    onboarding_routes,
    probe_routes,
)
from bumper.proxy.cawatch import CaWatch
from bumper.proxy.connlimits import ConnectionLimits, out_of_descriptors
from bumper.proxy.drain import DEFAULT_TIMEOUT as DEFAULT_DRAIN_TIMEOUT
from bumper.proxy.drain import Drain
from bumper.proxy.enforce import PolicyEnforcer
from bumper.proxy.eventlog import ConnectionLog
from bumper.proxy.layers import NextLayer
from bumper.proxy.limits import Limits
from bumper.proxy.listeners import Listener, Mode
from bumper.proxy.metrics import Metrics
from bumper.proxy.overload import MiB, Overload, below_start
from bumper.proxy.pinlearner import PinLearner
from bumper.proxy.proxyauth import Authenticator, ProxyAuth
from bumper.proxy.reclaim import Reclaim, rss_bytes
from bumper.proxy.replies import ConnectReplies
from bumper.proxy.state import ConnectionStates
from bumper.proxy.tlsprovider import ClientTls, TicketKeys, TlsProvider
from bumper.proxy.upstreamerror import UpstreamErrorPages
from bumper.proxy.upstreamidle import UpstreamIdle
from bumper.stopping import BARE
from bumper.upstream import aia
from bumper.upstream.probe import UpstreamProbe
from bumper.upstream.resolve import Egress, Override, ResolvingEventLoop
from bumper.upstream.resumption import SecretHandover
from bumper.upstream.tls import UpstreamTrust, system_roots
from bumper.upstream.verifier import UpstreamVerifier
from bumper.upstream.via import Dialer

log = logging.getLogger("bumper")

# Bodies above this size are streamed, not buffered, so memory stays bounded on large transfers.
STREAM_BODIES_OVER = "1m"


@dataclass(frozen=True)
class MimicSettings:
    memory_bytes: int = DEFAULT_MEMORY_BYTES  # 0: none kept in memory
    db_bytes: int = DEFAULT_DB_BYTES  # 0: no disk cache
    key_max_uses: int = PoolSettings.max_uses
    key_max_age: float = PoolSettings.max_age
    fallback_key: keys.KeySpec = keys.P256
    key_cap: keys.KeyCap = keys.DEFAULT_CAP  # --max-mimic-key


@dataclass(frozen=True)
class ProxyConfig:
    ca_dir: Path
    listeners: tuple[Listener, ...]
    trust: UpstreamTrust
    client_ca: ClientCertRequirement | None = None  # --client-ca: what relay listeners' clients present
    resolve: tuple[Override, ...] = ()
    policy: Policy = LAB
    policy_path: Path | None = None  # reloaded on SIGHUP and when it changes
    mimics: MimicSettings = MimicSettings()
    fetch_issuers: bool = True  # complete chains that lack an intermediate (AIA caIssuers)
    client_tls: ClientTls = ClientTls()
    addons: Mapping[str, type[Addon]] = field(default_factory=dict)  # what policy rules may name
    always: tuple[AddonSpec, ...] = ()  # addons on all traffic, whatever the policy says (--access-log)
    limits: Limits = Limits()
    users: Users | None = None  # --proxy-auth: the explicit listeners ask for a user's password
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # SIGTERM: seconds open connections may take to finish
    admin: AdminConfig | None = None  # --admin: probes, metrics and the onboarding page (bumper.proxy.admin)
    max_memory: int = 0  # --max-memory, bytes: the overload manager's budget (bumper.proxy.overload); 0: none
    max_memory_default: str | None = None  # where the default budget came from; None: --max-memory gave it
    # What the session ticket keys derive from: the supervisor's chain of secrets at the day it started
    # this worker, the same in every worker, so that a client resumes on any (tlsprovider.TicketKeys);
    # taken once, so that the configuration does not keep a day's secret past its day. None: a random
    # one of this process's own.
    ticket_secret: SecretHandover | None = None
    pins_db: Path | None = None  # --workers: learned pinning shared by the workers (SharedLearnedPins)
    worker: int | None = None  # --workers: this worker's number, for the addons' settings that ask (worker_number)


def access_log(addons: Mapping[str, type[Addon]], path: str, log_secrets: bool = False) -> tuple[AddonSpec, ...]:
    """--access-log PATH: the access_log addon on every connection (--log-secrets: credentials kept)."""
    try:
        settings = addons["access_log"].Settings(path=path, log_secrets=log_secrets)
    except ValueError as e:
        raise ConfigError(f"--access-log: {e}") from None
    return (AddonSpec("access_log", settings, on_error=OnError.FAIL_OPEN),)


def mimic_store(config: ProxyConfig, authority: ca_files.CertificateAuthority) -> MimicStore:
    settings = config.mimics
    disk = (
        FailSafeMimicStore(SqliteMimicStore(config.ca_dir / DB_FILE, settings.db_bytes))
        if settings.db_bytes > 0
        else None
    )
    pool = KeyPool(PoolSettings(max_uses=settings.key_max_uses, max_age=settings.key_max_age))
    return MimicStore(authority, pool, disk, settings.fallback_key, settings.memory_bytes, key_cap=settings.key_cap)


def build_master(config: ProxyConfig, authority: ca_files.CertificateAuthority) -> master.Master:
    # mitmproxy makes its HTTP/1 upstream layer by this name, where bumper cannot reach in otherwise
    # (httpstream.Http1Client: the response head's size limit).
    http_layers.Http1Client = httpstream.Http1Client  # type: ignore[misc]
    # and its HTTP/2 one (bumper.proxy.h2flow: flow control on the upstream leg).
    http_layers.Http2Client = h2flow.Http2Client  # type: ignore[misc]
    # and its WebSocket layer by this one (bumper.proxy.websocket: frames streamed, or messages bounded).
    websocket_layers.WebsocketLayer = websocket.WebsocketLayer  # type: ignore[misc]
    m = dispatch.Master(options.Options(), with_termlog=False)
    listeners = {listener.mitmproxy_mode(): listener for listener in config.listeners}
    states = ConnectionStates(listeners)
    connection_log = ConnectionLog(states)
    mimics = mimic_store(config, authority)
    own_cas = [authority.trust_anchor, authority.cert]
    # One verifier for the bumped upstream leg and the splice probe: they cannot disagree.
    verifier = UpstreamVerifier(
        config.trust,
        lambda: [*own_cas, mimics.untrusted().cert],
        aia.IssuerFetcher() if config.fetch_issuers else None,
        lambda leaf: mimic.mirrored_weaknesses(leaf, authority),
    )
    source = PolicySource(config.policy, config.policy_path, config.addons)
    pins = PinLearner(SharedLearnedPins(config.pins_db) if config.pins_db else LearnedPins(), states)
    connection_log.on_end.append(pins.connection_ended)
    runner = AddonRunner(config.addons, connection_log, config.always, config.worker)
    source.on_reload.append(runner.policy_reloaded)
    lightlayers.install()  # before the first connection's layers
    headerlookup.install()
    server = proxyserver.Proxyserver()
    limits = ConnectionLimits(config.limits, states, server)
    reclaim = Reclaim()
    overload = Overload(config.max_memory, states, limits, reclaim, mimics, server)
    m.addons.add(
        server,
        NextLayer(m.addons, config.limits, listeners, h2flow.Reading(server)),
        states,  # first: every other addon finds the connection's state
        limits,  # before the policy: a refused client costs nothing more
        UpstreamIdle(config.limits.upstream_idle_timeout, states, server),
        source,
        CaWatch(authority),
        reclaim,  # memory back after a burst
        overload,  # --max-memory
        # Before the enforcer: the policy sees only authenticated requests, and their user.
        *([ProxyAuth(Authenticator(config.users), states)] if config.users else []),
        # Before TlsProvider, whose hooks then see the connection's decision.
        PolicyEnforcer(source, states, pins.pins, UpstreamProbe(verifier), config.limits.upstream_timeout),
        pins,
        ConnectReplies(),
        UpstreamErrorPages(states),
        runner,  # after the enforcer and the error pages: it skips what they refused
        TlsProvider(
            mimics,
            verifier,
            states,
            config.client_tls,
            config.listeners,
            config.client_ca,
            TicketKeys(config.ticket_secret.take() if config.ticket_secret else None),
        ),
        connection_log,  # the others' client_disconnected still see the state it then forgets
        Drain(m, server, states, config.drain_timeout),  # after it: the states left are the connections open
        # Only with --admin: without a scraper, counting would be work for nobody. After TlsProvider:
        # the upstream leg's time includes the verdict.
        *([Metrics(states, connection_log, mimics, verifier, source, runner, overload)] if config.admin else []),
    )
    m.options.update(
        mode=[listener.mitmproxy_mode() for listener in config.listeners],
        # Upstreams are connected when their destination is known: a CONNECT's before its 200
        # (httpstream.HttpStream.handle_connect_regular), the others' at the ClientHello, before the
        # client's handshake (server-first, TlsProvider), or at the first plain-HTTP request.
        connection_strategy="lazy",
        stream_large_bodies=STREAM_BODIES_OVER,
        ssl_insecure=False,
        tcp_timeout=config.limits.idle_timeout,  # mitmproxy's idle watchdog; ConnectionLimits logs it
    )
    return m


async def serve(
    config: ProxyConfig,
    authority: ca_files.CertificateAuthority,
    announce_new_ca: bool = False,
    worker_ready: Callable[[], None] | None = None,
) -> None:
    """Run the proxy until it stops. A worker (--workers, bumper.proxy.workers) tells WORKER_READY
    instead of announcing itself: its supervisor prints the listening lines once every worker is up."""
    m = build_master(config, authority)
    _check_budget(config, m.addons.get("overload"))
    loop = asyncio.get_running_loop()
    # From here on a stop lets the start-up steps finish, then m.done() closes the key worker and
    # the mimic cache: an interrupt in the middle of a step would leave them to the interpreter's exit.
    for sig in stopping.SIGNALS:
        loop.add_signal_handler(sig, m.shutdown)
    if stopping.signalled():  # a stop whose KeyboardInterrupt Python swallowed (stopping.install)
        m.shutdown()
    with (
        asyncio_utils.install_exception_handler(out_of_descriptors(m._asyncio_exception_handler)),
        asyncio_utils.set_eager_task_factory(),
    ):
        server = m.addons.get("proxyserver")
        with _captured_errors("mitmproxy.addons.proxyserver") as errors:
            ok = await server.setup_servers()
        if not ok:
            failed = [f" {listener}" for listener in config.listeners if _instance(server, listener).last_exception]
            raise ConfigError(f"--listen{failed[0] if failed else ''}: {_listen_failure(errors)}")
        overload: Overload = m.addons.get("overload")
        readiness = Readiness(lambda: m.addons.get("drain").draining, overload.refusing)
        admin = AdminServer(config.admin) if config.admin else None
        admin_address = await admin.start() if admin else None
        if admin and config.admin and config.admin.unix:  # a worker's, for its supervisor alone
            admin.routes = {**probe_routes(readiness), **metrics_route(m.addons.get("metrics").registry)}
            admin_address = None
        elif admin and admin_address:  # its pages name its address, known once it is bound (port 0)
            admin.routes = admin_routes(
                m, readiness, authority, admin_address, _proxy_address(config.listeners, server)
            )
            m.addons.get("nextlayer").admin = admin_address
        # Relays (via:) are verified as upstreams are, and answer within the upstream's timeout.
        dialer = Dialer(config.trust, config.limits.upstream_timeout, config.limits.max_header_bytes)
        _check_destinations(loop, m, [*server.listen_addrs(), *([admin_address] if admin_address else [])], dialer)
        try:
            await m.running()  # before the listening line: who reads it may rely on a started proxy
            # From here SIGTERM drains (bumper.proxy.drain); start-up has no connections to wait for.
            # Before the announcement: a SIGHUP sent as soon as systemd hears READY (ExecReload) must
            # find its handler, or its default action ends the process.
            loop.add_signal_handler(signal.SIGTERM, m.addons.get("drain").sigterm)
            loop.add_signal_handler(signal.SIGHUP, _reload, m)
            loop.add_signal_handler(signal.SIGUSR1, m.addons.get("addonrunner").reopen)
            if worker_ready is not None and not m.should_exit.is_set():
                readiness.listening()
                worker_ready()
            elif not m.should_exit.is_set():  # a proxy stopped during start-up has nothing to announce
                _announce(config.listeners, server, authority if announce_new_ca else None)
                if admin_address:
                    log.info(f"bumper: admin listening on {host_port(*admin_address)}", extra=BARE)
                readiness.listening()
                sdnotify.ready(_status(server))
            await m.should_exit.wait()
        finally:
            if admin:
                await admin.stop()
            await m.done()


def _check_budget(config: ProxyConfig, overload: Overload) -> None:
    """A --max-memory that bumper's RSS at start is past the first step of is a configuration error; a
    default budget that small (a tight cgroup) is no budget, with one line saying so."""
    if not below_start(config.max_memory, rss := rss_bytes()):
        return
    if config.max_memory_default is None:
        raise ConfigError(
            f"--max-memory {config.max_memory // MiB}MiB: bumper uses {rss // MiB} MiB at start already, past the "
            f"80% at which it stops accepting; give it at least {rss * 2 // MiB}MiB, or off"
        )
    log.warning(
        f"bumper: no memory budget: the default, {config.max_memory // MiB} MiB ({config.max_memory_default}), "
        f"is below what bumper uses at start ({rss // MiB} MiB); set --max-memory"
    )
    overload.budget = 0


def admin_routes(
    m: master.Master,
    readiness: Readiness,
    authority: ca_files.CertificateAuthority,
    admin: tuple[str, int],
    proxy: tuple[str, int] | None,
) -> dict[str, Route]:
    """What the admin listener at ADMIN serves: probes, metrics, and the CA's page naming ADMIN and PROXY."""
    return {
        **probe_routes(readiness),
        **metrics_route(m.addons.get("metrics").registry),
        **onboarding_routes(authority.trust_anchor, admin, proxy, onboarding_bundle(authority)),
    }


def _reload(m: master.Master) -> None:
    """SIGHUP: the policy file and the proxy users' file again, and a look at the CA's files (the
    loaded CA stays in use). systemd hears of it, unless bumper is draining: it told systemd STOPPING=1,
    and READY=1 would take that back."""
    tell = not m.addons.get("drain").draining
    if tell:
        sdnotify.reloading()
    m.addons.get("policysource").reload()
    if (users := m.addons.get("proxyauth")) is not None:  # only with --proxy-auth
        users.reload()
    m.addons.get("cawatch").check()
    if tell:
        sdnotify.ready(_status(m.addons.get("proxyserver")))


def _status(server: proxyserver.Proxyserver) -> str:
    """What `systemctl status bumper` shows: where bumper listens."""
    return "listening on " + ", ".join(sorted({human.format_address(a) for a in server.listen_addrs()}))


def _check_destinations(
    loop: asyncio.AbstractEventLoop, m: master.Master, listening: list[Address], dialer: Dialer
) -> None:
    """Every upstream connection from here on obeys the policy's `destinations:` (the one in force,
    reloads included), never comes back to these LISTENING sockets, and goes through relays with
    DIALER (ResolvingEventLoop)."""
    if not isinstance(loop, ResolvingEventLoop):
        raise RuntimeError("bumper's proxy runs on its ResolvingEventLoop: the destination check lives there")
    source: PolicySource = m.addons.get("policysource")
    loop.egress = Egress(lambda: source.policy.destinations, tuple((ip_address(a[0]), a[1]) for a in listening))
    loop.dialer = dialer


def _proxy_address(listeners: tuple[Listener, ...], server: proxyserver.Proxyserver) -> tuple[str, int] | None:
    """The first explicit proxy's host and bound port (--listen HOST:0 picks one), or None: no explicit proxy."""
    for listener in listeners:
        ports = sorted({address[1] for address in _instance(server, listener).listen_addrs})
        if listener.mode is Mode.EXPLICIT and ports:
            return listener.host, ports[0]
    return None


def onboarding_bundle(authority: ca_files.CertificateAuthority) -> bytes | None:
    """The trust bundle the onboarding page offers (`bumper ca bundle`'s), or None, with one line saying
    why, when this host has no system roots to put in it (a slim image)."""
    try:
        _, roots = system_roots()
    except ConfigError as e:
        log.warning(f"admin: the onboarding page offers no trust bundle: {e}")
        return None
    return distribution.bundle(roots, authority)


def _instance(server: proxyserver.Proxyserver, listener: Listener) -> ServerInstance[Any]:
    """mitmproxy's server for LISTENER."""
    return server.servers[listener.mitmproxy_mode()]


def _announce(
    listeners: tuple[Listener, ...], server: proxyserver.Proxyserver, new_ca: ca_files.CertificateAuthority | None
) -> None:
    """One line per listening address: `bumper: proxy listening on HOST:PORT` for the explicit proxy
    (what clients are configured with), `bumper: MODE listening on HOST:PORT` for the others."""
    proxy = None
    for listener in listeners:
        instance = _instance(server, listener)
        what = "proxy" if listener.mode is Mode.EXPLICIT else str(listener.mode)
        for port in sorted({address[1] for address in instance.listen_addrs}):  # one port, maybe IPv4 and IPv6
            address = host_port(listener.host, port)
            log.info(f"bumper: {what} listening on {address}", extra=BARE)
            proxy = proxy or (address if listener.mode is Mode.EXPLICIT else None)
    if new_ca is not None:
        log.info(ca_files.trust_instructions(new_ca, proxy), extra=BARE)


def _listen_failure(errors: list[str]) -> str:
    """The OS's reason from mitmproxy's report, without its advice about options bumper lacks."""
    if not errors:
        return "cannot listen"
    first_line = errors[-1].splitlines()[0]
    return first_line.rpartition(": ")[2] or first_line


@contextmanager
def _captured_errors(logger_name: str) -> Iterator[list[str]]:
    """Collect what LOGGER_NAME reports at ERROR, to turn it into one ConfigError line."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
