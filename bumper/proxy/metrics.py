"""Prometheus metrics for --admin's /metrics: what bumper did with its connections, how its upstreams
verified, how its mimics came, how long handshakes took, what the policy and the addons did.

Most figures already exist as plain state: each connection's ConnectionState, and tallies the
components keep themselves (MimicStore.lookups, UpstreamVerifier.results, PolicySource.reloads,
AddonRunner.errors and refusals, KeyPool.sizes). A custom collector reads them when /metrics is
scraped, so that a request pays for no Prometheus call (only the two histograms are observed as
they happen: a handshake and a mint take milliseconds anyway); the pure packages never import
prometheus_client (import-linter checks it). This addon adds what only a hook can see: each
connection's end (counted once its log line is written, so the two always agree), each request, and
the handshake times. It exists only with --admin: without a scraper, counting is work for nobody.

Labels hold no host or user names: a label value is a listener, an action, an outcome class, a
reason code, a key type or an addon and hook name, all bounded by bumper's configuration."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum

from mitmproxy import http, tls
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as Total
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bumper.certs import mimicstore, trust
from bumper.certs.mimicstore import MimicStore
from bumper.inspect.chain import AddonRunner
from bumper.policy import source as policy_source
from bumper.policy.source import PolicySource
from bumper.proxy.eventlog import ConnectionLog
from bumper.proxy.layers import relay_handshake
from bumper.proxy.limits import LIMIT
from bumper.proxy.overload import Action, Overload
from bumper.proxy.proxyauth import BY_AUTH
from bumper.proxy.state import BY_POLICY, ConnectionState, ConnectionStates
from bumper.proxy.upstreamerror import BY_UPSTREAM_ERROR
from bumper.upstream.sessions import UpstreamSessions
from bumper.upstream.verifier import VERIFIED, UpstreamVerifier

NONE = "none"  # a label whose value is not known: a connection that never got as far as a decision


class Outcome(StrEnum):
    """How a connection ended, in a few classes (the log line's outcome is free text, a label must
    not be): docs/metrics.md says what each covers."""

    OK = "ok"
    NO_REQUEST = "no_request"  # the client closed without sending anything bumper could use
    BLOCKED = "blocked"  # the policy refused it (a rule, destinations:, a client certificate, on_upstream_error)
    REFUSED = "refused"  # an inspection addon refused a request on it
    UNAUTHENTICATED = "unauthenticated"  # --proxy-auth answered 407
    TIMEOUT = "timeout"  # one of bumper's timeouts (--idle-timeout, --request-timeout, ...)
    LIMIT = "limit"  # one of bumper's other limits (--max-header-bytes, --max-connections, ...)
    UPSTREAM_ERROR = "upstream_error"  # the upstream could not be reached, or its TLS or its body failed
    CLIENT_ERROR = "client_error"  # the client's TLS or its request was not acceptable
    HTTP_ERROR = "http_error"  # an HTTP exchange broke off (a peer closed in the middle of a message)
    ERROR = "error"  # anything else (an addon that failed closed, say)


# The beginnings of ConnectionState.error that bumper writes itself, by the class they fall in.
_BY_PREFIX: tuple[tuple[str, Outcome], ...] = (
    ("upstream ", Outcome.UPSTREAM_ERROR),  # connect failed, TLS failed, truncated
    ("client TLS failed", Outcome.CLIENT_ERROR),
    ("relay TLS failed", Outcome.CLIENT_ERROR),
    ("client certificate", Outcome.CLIENT_ERROR),
    ("not HTTP", Outcome.CLIENT_ERROR),
    ("not TLS", Outcome.CLIENT_ERROR),
    ("bad request", Outcome.CLIENT_ERROR),
    ("ambiguous request", Outcome.CLIENT_ERROR),
    ("HTTP/2 protocol error", Outcome.CLIENT_ERROR),
    ("not a proxy request", Outcome.CLIENT_ERROR),  # a request for the proxy itself (GET /)
    ("HTTP error", Outcome.HTTP_ERROR),
    (LIMIT, Outcome.LIMIT),
)
_BY_REFUSER = {BY_POLICY: Outcome.BLOCKED, BY_UPSTREAM_ERROR: Outcome.BLOCKED, BY_AUTH: Outcome.UNAUTHENTICATED}
_BUMPER = "bumper"  # ConnectionState.refused_by for bumper's own refusals: their text says which class


def outcome_of(state: ConnectionState) -> Outcome:
    """The class of STATE's outcome: who refused it, else what its first failure says."""
    error = state.error
    if error is None:
        return Outcome.NO_REQUEST if state.target is None and state.requests == 0 else Outcome.OK
    by = state.refused_by
    if by is not None and by != _BUMPER:
        return _BY_REFUSER.get(by, Outcome.REFUSED)  # anyone else who refuses is an addon
    if "-timeout)" in error:  # bumper's timeouts name their flag: (--upstream-timeout)
        return Outcome.TIMEOUT
    return next((outcome for prefix, outcome in _BY_PREFIX if error.startswith(prefix)), Outcome.ERROR)


# Seconds. A mint with a pooled key takes about a millisecond; one that waits for a new RSA key, up
# to a second or more. A handshake is a few milliseconds on loopback, hundreds across the world.
MINT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The mitmproxy addon behind /metrics, and the registry the admin listener serves. A registry
    of its own, not prometheus_client's global one: several proxies in one process (the tests')
    must not share counters."""

    def __init__(
        self,
        states: ConnectionStates,
        connection_log: ConnectionLog,
        mimics: MimicStore,
        verifier: UpstreamVerifier,
        source: PolicySource,
        runner: AddonRunner,
        overload: Overload | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.states = states
        self.overload = overload
        self.mimics = mimics
        self.verifier = verifier
        self.source = source
        self.runner = runner
        self.clock = clock
        # Connections that ended, by (listener, action, outcome); requests answered, by (listener, action).
        self.connections: Counter[tuple[str, str, Outcome]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        # Body bytes of the connections that ended; the open ones' are added when scraped.
        self.ended_up = 0
        self.ended_down = 0
        self.listeners: set[str] = set()  # every listener label seen: its active gauge stays, at 0
        self.registry = CollectorRegistry()
        handshake = Histogram(
            "bumper_handshake_seconds",
            "TLS handshakes: client, from the ClientHello to the finished handshake (the upstream's and "
            "the mimic included: server-first); upstream, from bumper's ClientHello to the verdict",
            ["leg"],
            registry=self.registry,
            buckets=HANDSHAKE_BUCKETS,
        )
        self.client_leg = handshake.labels("client")
        self.upstream_leg = handshake.labels("upstream")
        resumed = Total(
            "bumper_tls_resumed",
            "TLS handshakes that resumed a session: client, a client's with bumper; upstream, bumper's "
            "with an upstream (bumper_handshake_seconds_count: all handshakes)",
            ["leg"],
            registry=self.registry,
        )
        self.client_resumed = resumed.labels("client")
        self.upstream_resumed = resumed.labels("upstream")
        mint = Histogram(
            "bumper_mimic_mint_seconds",
            "Minting a mimic or a placeholder certificate, the wait for its key included",
            registry=self.registry,
            buckets=MINT_BUCKETS,
        )
        mimics.on_mint.append(mint.observe)
        connection_log.on_end.append(self.connection_ended)
        self.registry.register(_Collector(self))

    # mitmproxy hooks

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not relay_handshake(data.context) and (state := self.states.of(data.context.client.id)):
            state.hello_at = self.clock()

    def tls_start_server(self, data: tls.TlsData) -> None:
        if state := self.states.of(data.context.client.id):
            state.upstream_tls_at = self.clock()

    def tls_established_server(self, data: tls.TlsData) -> None:
        # Added after TlsProvider: its verdict (an AIA fetch too) is part of the upstream leg.
        if (state := self.states.of(data.context.client.id)) and state.upstream_tls_at is not None:
            self.upstream_leg.observe(self.clock() - state.upstream_tls_at)
        if data.ssl_conn is not None and UpstreamSessions.reused(data.ssl_conn):
            self.upstream_resumed.inc()

    def tls_established_client(self, data: tls.TlsData) -> None:
        if relay_handshake(data.context):
            return  # a relay listener's own TLS: the handshake that counts is the one inside
        if (state := self.states.of(data.context.client.id)) and state.hello_at is not None:
            self.client_leg.observe(self.clock() - state.hello_at)
        if data.ssl_conn is not None and UpstreamSessions.reused(data.ssl_conn):
            self.client_resumed.inc()

    def response(self, flow: http.HTTPFlow) -> None:
        # As ConnectionStates counts a connection's requests=, by the decision this request had
        # (a plain-HTTP connection's requests each have their own).
        if flow.request.method != "CONNECT" and (state := self.states.of(flow.client_conn.id)):
            self.requests[_listener(state), _action(state)] += 1

    # ConnectionLog.on_end: after the connection's line is written

    def connection_ended(self, state: ConnectionState) -> None:
        listener = _listener(state)
        self.listeners.add(listener)
        self.connections[listener, _action(state), outcome_of(state)] += 1
        self.ended_up += state.bytes_up
        self.ended_down += state.bytes_down

    # read when scraped

    def families(self) -> Iterator[Metric]:
        open_states = list(self.states)
        connections = CounterMetricFamily(
            "bumper_connections_total",
            "Client connections that ended, by listener, the policy's action and how they ended (the log line's)",
            labels=["listener", "action", "outcome"],
        )
        for (listener, action, outcome), count in sorted(self.connections.items()):
            connections.add_metric([listener, action, outcome], count)
        yield connections
        active = GaugeMetricFamily(
            "bumper_active_connections", "Client connections open now, by listener", labels=["listener"]
        )
        by_listener = Counter(_listener(state) for state in open_states)
        for listener in sorted(self.listeners | by_listener.keys()):
            active.add_metric([listener], by_listener[listener])
        yield active
        yield _counter(
            "bumper_requests_total",
            "HTTP requests answered to clients, by listener and the policy's action",
            ["listener", "action"],
            ((list(key), count) for key, count in sorted(self.requests.items())),
        )
        up = self.ended_up + sum(state.bytes_up for state in open_states)
        down = self.ended_down + sum(state.bytes_down for state in open_states)
        yield _counter(
            "bumper_bytes_total",
            "HTTP body bytes through bumper (bumped and plain HTTP; spliced tunnels are not seen): "
            "up, from clients to upstreams; down, back",
            ["direction"],
            [(["up"], up), (["down"], down)],
        )
        results = self.verifier.results
        yield _counter(
            "bumper_upstream_verify_total",
            "Upstream certificate verifications (bumped handshakes, splice probes), by result: ok or the reason code",
            ["result"],
            (([result], results[result]) for result in (VERIFIED, *trust.REASONS)),
        )
        lookups = self.mimics.lookups
        yield _counter(
            "bumper_mimic_cache_total",
            "Certificates shown to clients, by where they came from",
            ["result"],
            (([result], lookups[result]) for result in mimicstore.LOOKUPS),
        )
        cached = GaugeMetricFamily(
            "bumper_mimic_cache_bytes",
            "What the cached mimics cost, as counted against --mimic-cache (memory) and --mimic-db (disk)",
            labels=["store"],
        )
        cached.add_metric(["memory"], self.mimics.memory_bytes)
        if self.mimics.disk is not None:
            cached.add_metric(["disk"], self.mimics.disk.stored_bytes())
        yield cached
        reloads = self.source.reloads
        yield _counter(
            "bumper_policy_reloads_total",
            "Policy reloads (SIGHUP or a changed file), by result: ok, or error (the policy in force stays)",
            ["result"],
            (([result], reloads[result]) for result in (policy_source.RELOADED, policy_source.INVALID)),
        )
        yield _counter(
            "bumper_addon_errors_total",
            "Inspection addons' failures (an exception or an overrun time budget), by addon and hook",
            ["addon", "hook"],
            ((list(key), count) for key, count in sorted(self.runner.errors.items())),
        )
        yield _counter(
            "bumper_addon_refusals_total",
            "Requests (and WebSocket messages) inspection addons refused, by addon",
            ["addon"],
            (([addon], count) for addon, count in sorted(self.runner.refusals.items())),
        )
        keys = GaugeMetricFamily("bumper_keypool_keys", "Mimic keys ready to serve, by key type", labels=["type"])
        for key_type, count in sorted(self.mimics.pool.sizes().items()):
            keys.add_metric([key_type], count)
        yield keys
        if self.overload is not None:
            yield from _overload(self.overload)


def _overload(overload: Overload) -> Iterator[Metric]:
    """The memory budget's figures: the RSS read now, not at the overload manager's last look."""
    yield GaugeMetricFamily("bumper_memory_bytes", "bumper's resident memory (RSS)", value=overload.rss())
    yield GaugeMetricFamily(
        "bumper_memory_budget_bytes", "The overload manager's budget (--max-memory); 0: none", value=overload.budget
    )
    active = GaugeMetricFamily(
        "bumper_overload_actions_active",
        "1 while the overload manager's action is in force: stop_accepting, shrink, reset (docs/limits.md)",
        labels=["action"],
    )
    for action in Action:
        active.add_metric([action], int(action in overload.active))
    yield active
    yield _counter(
        "bumper_overload_resets_total",
        "Connections the overload manager reset because they held the most memory",
        [],
        [([], overload.resets)],
    )


def _listener(state: ConnectionState) -> str:
    return state.listener_name or NONE


def _action(state: ConnectionState) -> str:
    return str(state.action) if state.action is not None else NONE


def _counter(
    name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in samples:
        family.add_metric(values, count)
    return family


class _Collector(Collector):
    """prometheus_client's custom collector protocol: collect() runs at each scrape, on the event
    loop (the admin listener's), so the state it reads is never read half-updated."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics.families()
