"""Session resumption (issue 19), on both legs, through the real CLI with real clients.

Client leg: a client resumes its session with bumper (Python ssl sessions, openssl s_client
-sess_out/-sess_in), TLS 1.3 tickets and TLS 1.2 alike, but only where the full handshake would have
shown it the same mimic; and a resuming client still waits for the upstream's verification (server-
first). The ticket key: derived from a secret and the time, the same in every worker.

Upstream leg: bumper resumes its own sessions to an upstream it verified, per name, address and
chain, observed at an upstream of the test's own (Python ssl, which says whether each handshake
resumed: SSLSocket.session_reused).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL

from bumper.proxy.tlsprovider import TicketKeys, client_context
from bumper.upstream import hidden, resumption
from bumper.upstream.sessions import UpstreamSessions
from bumper.upstream.tls import UpstreamTrust
from bumper.upstream.verifier import PeerChain, UpstreamVerifier
from tests import pki
from tests.conftest import (
    Bumper,
    Pki,
    Upstream,
    client_tls_context,
    curl,
    listening_socket,
    open_tunnel,
    read_head,
    tcp_server,
)

TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2
# The client's ways to resume: a TLS 1.3 ticket, a TLS 1.2 ticket, a TLS 1.2 session id (no tickets).
CLIENT_WAYS = pytest.mark.parametrize(
    ("version", "tickets"), [(TLS13, True), (TLS12, True), (TLS12, False)], ids=["tls1.3", "tls1.2", "tls1.2-id"]
)


def resuming_client(bumper: Bumper, version: ssl.TLSVersion, tickets: bool = True) -> ssl.SSLContext:
    context = client_tls_context(bumper.ca_pem, version)
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


# --- an upstream that tells whether bumper resumed its session ---


@dataclass
class ResumingUpstream:
    """A Python ssl server answering every request with whether its handshake resumed a session
    (`reused=True`), on PORT; `serve(leaf)` makes it a new upstream (new certificate, key and ticket
    key) on the same port."""

    port: int
    directory: Path
    version: ssl.TLSVersion
    context: ssl.SSLContext = field(init=False)
    reused: list[bool] = field(default_factory=list)

    def serve(self, leaf: pki.Leaf) -> None:
        cert, key = leaf.write(self.directory, f"resuming-{len(self.reused)}-{id(leaf)}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.maximum_version = self.version
        context.load_cert_chain(cert, key)
        self.context = context

    def handle(self, sock: socket.socket) -> None:
        try:
            with self.context.wrap_socket(sock, server_side=True) as tls:
                self.reused.append(bool(tls.session_reused))
                body = f"reused={tls.session_reused}".encode()
                while read_head(tls):  # keep-alive, until the other side closes
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (ssl.SSLError, OSError):
            pass  # a client that refused the certificate

    def url(self, host: str) -> str:
        return f"https://{host}:{self.port}/"


@pytest.fixture(params=[TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def resuming(request: pytest.FixtureRequest, test_pki: Pki) -> Iterator[ResumingUpstream]:
    upstream = ResumingUpstream(0, test_pki.directory, request.param)
    upstream.serve(test_pki.root.leaf("resume.test", "*.resume.test"))
    server = listening_socket()
    upstream.port = server.getsockname()[1]
    for _ in tcp_server(upstream.handle, max_connections=50, server=server, concurrent=True):
        yield upstream


def fetch(bumper: Bumper, url: str) -> str:
    r = curl(bumper, url)
    assert r.returncode == 0, r.stderr
    return r.stdout


# --- the upstream leg ---


def test_bumper_resumes_its_session_with_an_upstream_it_verified(bumper: Bumper, resuming: ResumingUpstream) -> None:
    """The first connection is a full handshake; each next client connection's upstream leg resumes."""
    url = resuming.url("one.resume.test")
    assert [fetch(bumper, url) for _ in range(3)] == ["reused=False", "reused=True", "reused=True"]
    assert resuming.reused == [False, True, True]


def test_a_session_for_one_name_is_never_offered_to_another(bumper: Bumper, resuming: ResumingUpstream) -> None:
    """Two names on the same address, port and certificate: the upstream would accept the session of
    one for the other, had bumper offered it."""
    assert fetch(bumper, resuming.url("a.resume.test")) == "reused=False"
    assert fetch(bumper, resuming.url("b.resume.test")) == "reused=False"
    assert fetch(bumper, resuming.url("b.resume.test")) == "reused=True"
    assert fetch(bumper, resuming.url("a.resume.test")) == "reused=True"


def test_a_changed_upstream_is_verified_again(bumper: Bumper, resuming: ResumingUpstream, test_pki: Pki) -> None:
    """A new upstream on the same port (new key, certificate and ticket key) refuses the session
    kept: the full handshake that follows verifies the new chain, and fails it when it does not verify."""
    url = resuming.url("changed.resume.test")
    assert [fetch(bumper, url) for _ in range(2)] == ["reused=False", "reused=True"]
    resuming.serve(test_pki.root.leaf("changed.resume.test"))
    assert fetch(bumper, url) == "reused=False"  # trusted: a full handshake, verified
    assert fetch(bumper, url) == "reused=True"
    resuming.serve(pki.self_signed_leaf("changed.resume.test"))
    r = curl(bumper, url, "-w", "%{local_port}")
    assert r.returncode == 60, r  # the mimic of a self-signed certificate: the client's own check fails it
    assert " verify=self_signed " in bumper.connection_line(int(r.stdout))
    resuming.serve(test_pki.root.leaf("changed.resume.test"))
    assert fetch(bumper, url) == "reused=False"  # the failed upstream's session was not kept


def test_a_later_upstream_connection_of_a_bumped_client_is_verified_in_full(
    start_bumper, resuming: ResumingUpstream
) -> None:
    """After --upstream-idle-timeout closed a keep-alive client's upstream leg, its next request needs
    a new upstream connection, which must verify as the first did before the request goes out
    (OpenSSL fails it on any error, tls.refuse_verify_errors): no session is offered to it."""
    bumper = start_bumper("--upstream-idle-timeout", "1")
    host = "again.resume.test"
    assert fetch(bumper, resuming.url(host)) == "reused=False"
    sock, reply = open_tunnel(bumper, host, resuming.port)
    assert b" 200 " in reply.split(b"\r\n")[0], reply
    with client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname=host) as tls:
        bodies = []
        for pause in (0, 3):
            time.sleep(pause)  # past the idle timeout
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = read_head(tls)
            assert b" 200 " in head.split(b"\r\n")[0], head
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < int(re.search(rb"(?i)content-length: (\d+)", head).group(1)):  # type: ignore[union-attr]
                body += tls.recv(65536)
            bodies.append(body.decode())
    assert bodies == ["reused=True", "reused=False"]


# --- the client leg ---


def tls_client(
    bumper: Bumper, host: str, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSocket, bytes]:
    """A TLS connection through bumper to HOST:PORT, offering SESSION, after one request (a TLS 1.3
    ticket comes after the handshake: read with the response); and the leaf bumper showed."""
    sock, reply = open_tunnel(bumper, host, port)
    assert b" 200 " in reply.split(b"\r\n")[0], reply
    tls = context.wrap_socket(sock, server_hostname=host, session=session)
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    while tls.recv(65536):
        pass
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return tls, der


@CLIENT_WAYS
def test_a_client_resumes_its_session_with_bumper(
    bumper: Bumper, upstream: Upstream, version: ssl.TLSVersion, tickets: bool
) -> None:
    context = resuming_client(bumper, version, tickets)
    first, mimic = tls_client(bumper, upstream.host, upstream.port, context)
    assert not first.session_reused and first.session is not None
    second, again = tls_client(bumper, upstream.host, upstream.port, context, first.session)
    assert second.session_reused and again == mimic
    first.close()
    second.close()


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_resumes_with_sess_out_and_sess_in(
    bumper: Bumper, upstream: Upstream, version: str, tmp_path: Path
) -> None:
    session = tmp_path / "session.pem"
    target = ["-proxy", f"127.0.0.1:{bumper.port}", "-connect", f"{upstream.host}:{upstream.port}"]
    common = ["openssl", "s_client", *target, "-servername", upstream.host, "-CAfile", str(bumper.ca_pem), version]
    request = f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n"

    def run(*args: str) -> str:
        r = subprocess.run([*common, *args, "-ign_eof"], input=request, capture_output=True, text=True, timeout=30)
        return r.stdout

    first = run("-sess_out", str(session))
    assert re.search(r"^New, TLSv1\.[23]", first, re.M), first
    assert "Verify return code: 0 (ok)" in first
    second = run("-sess_in", str(session))
    assert re.search(r"^Reused, TLSv1\.[23]", second, re.M), second


@pytest.fixture
def two_upstreams(start_upstream, test_pki: Pki) -> tuple[Upstream, Upstream]:
    """Two upstreams with certificates of their own (so two different mimics), each for its name."""
    one = start_upstream(test_pki.root.leaf("one.test"), host="one.test")
    two = start_upstream(test_pki.root.leaf("two.test"), host="two.test")
    return one, two


@CLIENT_WAYS
def test_a_session_from_one_mimic_does_not_resume_on_another(
    bumper: Bumper, two_upstreams: tuple[Upstream, Upstream], version: ssl.TLSVersion, tickets: bool
) -> None:
    """A client that offers host A's session on host B gets a full handshake and B's mimic: a session
    resumes only where the full handshake would have shown the same certificate."""
    one, two = two_upstreams
    context = resuming_client(bumper, version, tickets)
    first, mimic_one = tls_client(bumper, one.host, one.port, context)
    other, mimic_two = tls_client(bumper, two.host, two.port, context, first.session)
    assert not other.session_reused
    assert mimic_two != mimic_one
    assert x509.load_der_x509_certificate(mimic_two).subject.rfc4514_string() == "CN=two.test,O=bumper tests"
    first.close()
    other.close()


@CLIENT_WAYS
def test_after_the_upstream_certificate_changes_the_session_does_not_resume(
    bumper: Bumper, resuming: ResumingUpstream, test_pki: Pki, version: ssl.TLSVersion, tickets: bool
) -> None:
    host = "client.resume.test"
    context = resuming_client(bumper, version, tickets)
    first, mimic = tls_client(bumper, host, resuming.port, context)
    second, same = tls_client(bumper, host, resuming.port, context, first.session)
    assert second.session_reused and same == mimic
    resuming.serve(test_pki.root.leaf(host))  # a new certificate: a new mimic
    third, new = tls_client(bumper, host, resuming.port, context, second.session)
    assert not third.session_reused and new != mimic
    for s in (first, second, third):
        s.close()


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_a_resuming_client_still_waits_for_the_upstreams_verification(
    bumper: Bumper, resuming: ResumingUpstream, version: ssl.TLSVersion
) -> None:
    """bumper is server-first: a client that offers a good session still gets its upstream verified
    before its handshake completes, and an upstream that now fails verification fails it as on a
    full handshake."""
    host = "verify.resume.test"
    context = client_tls_context(bumper.ca_pem, version)
    first, _ = tls_client(bumper, host, resuming.port, context)
    resuming.serve(pki.self_signed_leaf(host))
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
        tls_client(bumper, host, resuming.port, context, first.session)
    first.close()


# --- the ticket key ---


def test_the_ticket_key_is_the_same_for_the_same_secret_and_epoch() -> None:
    secret = b"s" * 32
    key = resumption.ticket_key(secret, 7)
    assert len(key) == hidden.TICKET_KEY_BYTES == 80
    assert key == resumption.ticket_key(secret, 7)
    assert key != resumption.ticket_key(secret, 8)
    assert key != resumption.ticket_key(b"t" * 32, 7)
    assert key[:16] != resumption.ticket_key(secret, 8)[:16]  # the key name too: an old ticket is told apart
    period = resumption.TICKET_PERIOD
    assert resumption.ticket_epoch(0) == 0
    assert resumption.ticket_epoch(period - 0.001) == 0
    assert resumption.ticket_epoch(period) == 1
    assert resumption.ticket_epoch(1_800_000_000.0) == 1_800_000_000 // int(period)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ticket_keys(secret: bytes, clock: Clock) -> TicketKeys:
    """TicketKeys as a worker starts them: SECRET as the secret of the clock's day."""
    return TicketKeys(resumption.TicketSecret(resumption.ticket_day(clock.now), secret), clock)


def server_context(keys: TicketKeys, leaf: pki.Leaf) -> SSL.Context:
    context = keys.add(client_context())
    context.use_certificate(leaf.cert)
    context.use_privatekey(leaf.key)  # type: ignore[arg-type]
    return context


CLIENT = SSL.Context(SSL.TLS_CLIENT_METHOD)  # pyOpenSSL resumes a session only in the context it came from
CLIENT12 = SSL.Context(SSL.TLS_CLIENT_METHOD)
CLIENT12.set_max_proto_version(SSL.TLS1_2_VERSION)
CLIENT12.set_options(SSL.OP_NO_TICKET)  # a session id only: OpenSSL gives a client that takes tickets none


def handshake(server: SSL.Context, session: SSL.Session | None = None, bound: bytes = b"AB") -> SSL.Connection:
    """A client's handshake with SERVER over memory BIOs, offering SESSION, bound as bumper binds
    it (BOUND: a mimic's fingerprint)."""
    client = SSL.Connection(CLIENT)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    conn = SSL.Connection(server)
    assert hidden.set_session_id_context(conn, resumption.session_id_context(b"mimic", bound))
    conn.set_accept_state()
    return pump(client, conn)


def pump(client: SSL.Connection, conn: SSL.Connection) -> SSL.Connection:
    """CLIENT's handshake with CONN over memory BIOs, and one record after it (with which a TLS 1.3
    ticket arrives)."""
    for _ in range(20):
        for sender, receiver in ((client, conn), (conn, client)):
            try:
                sender.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                while data := sender.bio_read(65536):
                    receiver.bio_write(data)
            except SSL.WantReadError:
                pass
    conn.send(b"x")
    client.bio_write(conn.bio_read(65536))
    assert client.recv(1) == b"x"
    return client


def reused(conn: SSL.Connection) -> bool:
    return UpstreamSessions.reused(conn)


def test_two_workers_with_the_same_secret_resume_each_others_sessions(test_pki: Pki) -> None:
    """Two processes' client contexts, as two workers make them from the same secret: a session one
    gave resumes on the other (TLS 1.3 ticket: what a client whose next connection reaches the other
    worker offers); with another secret, it does not."""
    leaf = test_pki.root.leaf("worker.test")
    clock = Clock(1_800_000_000.0)
    one, two, other = ticket_keys(b"k" * 32, clock), ticket_keys(b"k" * 32, clock), ticket_keys(b"x" * 32, clock)
    contexts = [server_context(keys, leaf) for keys in (one, two, other)]
    for keys in (one, two, other):
        keys.current()
    first = handshake(contexts[0])
    assert not reused(first)
    assert reused(handshake(contexts[1], first.get_session()))
    assert not reused(handshake(contexts[2], first.get_session()))


def test_the_ticket_key_rotates_with_the_epoch(test_pki: Pki) -> None:
    """At the epoch's end every context gets the next key; a ticket of the epoch before then makes a
    full handshake (OpenSSL holds one key)."""
    clock = Clock(1_800_000_000.0)
    keys = ticket_keys(b"k" * 32, clock)
    context = server_context(keys, test_pki.root.leaf("rotate.test"))
    keys.current()
    epoch = resumption.ticket_epoch(clock.now)
    assert hidden.ticket_key(context) == resumption.ticket_key(b"k" * 32, epoch)
    first = handshake(context)
    clock.now += resumption.TICKET_PERIOD
    keys.current()
    assert hidden.ticket_key(context) == resumption.ticket_key(b"k" * 32, epoch + 1)
    assert not reused(handshake(context, first.get_session()))


def test_chains_started_on_different_days_agree_from_the_later_day_on() -> None:
    """The ticket keys' secret moves on one way, a day at a time: a worker started by the supervisor
    days later (the day's secret handed over) and one that has run since the first day hold the same
    secret, and so make the same ticket keys; no clock takes it back a day."""
    start, day = 1_800_000_000.0, resumption.TICKET_DAY
    first = resumption.new_secret(start)  # the supervisor's, at start-up
    assert first.day == resumption.ticket_day(start) and resumption.new_secret(start).secret != first.secret
    restarted = resumption.current_secret(first, start + 3 * day)  # what a worker started on day 3 gets
    assert restarted.day == first.day + 3 and restarted.secret != first.secret
    running = first
    for n in range(1, 6):  # the first worker, through five days
        running = resumption.current_secret(running, start + n * day)
    caught_up = resumption.current_secret(restarted, start + 5 * day)
    assert caught_up == running and caught_up.day == first.day + 5
    epoch = resumption.ticket_epoch(start + 5 * day)
    assert resumption.ticket_key(caught_up.secret, epoch) == resumption.ticket_key(running.secret, epoch)
    assert resumption.ticket_key(first.secret, epoch) != resumption.ticket_key(running.secret, epoch)
    assert resumption.current_secret(restarted, start + 3 * day + 3600) is restarted  # the same day
    assert resumption.current_secret(restarted, start) is restarted  # a clock set back: no day back
    assert first.secret.hex() not in repr(first)


def test_the_ticket_keys_drop_the_day_befores_secret(test_pki: Pki) -> None:
    """Whoever reads a worker's memory on a day must find no secret of a day before: the handover
    (in the configuration and the setup, which live as long as the process) gives it up once, and
    at the day's end TicketKeys holds the next day's secret instead (counted references)."""
    clock = Clock(1_800_000_000.0)
    secret = os.urandom(32)  # an object of this test's own: its references are counted
    handover = resumption.SecretHandover(resumption.TicketSecret(resumption.ticket_day(clock.now), secret))
    keys = TicketKeys(handover.take(), clock)
    assert handover.take() is None
    context = server_context(keys, test_pki.root.leaf("days.test"))
    keys.current()
    assert hidden.ticket_key(context) == resumption.ticket_key(secret, resumption.ticket_epoch(clock.now))
    held = sys.getrefcount(secret)
    clock.now += resumption.TICKET_DAY
    keys.current()
    assert sys.getrefcount(secret) == held - 1  # only this test holds it now
    tomorrow = resumption.current_secret(
        resumption.TicketSecret(resumption.ticket_day(clock.now) - 1, secret), clock.now
    )
    assert hidden.ticket_key(context) == resumption.ticket_key(tomorrow.secret, resumption.ticket_epoch(clock.now))


def test_a_session_is_bound_to_what_the_full_handshake_would_show(test_pki: Pki) -> None:
    """Over memory BIOs: the same binding resumes, another does not (a TLS 1.3 ticket presented to a
    connection bound to another mimic)."""
    keys = ticket_keys(b"k" * 32, Clock(1_800_000_000.0))
    context = server_context(keys, test_pki.root.leaf("bound.test"))
    keys.current()
    first = handshake(context)
    assert reused(handshake(context, first.get_session()))
    assert not reused(handshake(context, first.get_session(), bound=b"AC"))
    assert resumption.session_id_context(b"ab", b"c") != resumption.session_id_context(b"a", b"bc")


def test_an_upstream_session_is_not_resumed_once_its_chain_has_expired(test_pki: Pki) -> None:
    """The upstream leg with an injected clock, over memory BIOs: a kept session resumes; a resumed
    handshake's verdict is reached from the session's chain at the current time (OpenSSL verifies
    nothing again), so a certificate expired since is caught; and once the chain has expired, the
    session is no longer offered."""
    leaf = test_pki.root.leaf("expire.test")
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate(leaf.cert)
    server.use_privatekey(leaf.key)  # type: ignore[arg-type]
    clock = Clock(leaf.cert.not_valid_after_utc.timestamp() - 60)
    verifier = UpstreamVerifier(UpstreamTrust((test_pki.root_pem,)), lambda: [], clock=clock)

    def connect(later: float = 0.0) -> tuple[SSL.Connection, str | None]:
        conn = verifier.connection("expire.test", "1.2", (), peer=("127.0.0.1", 443))
        accepted = SSL.Connection(server)
        accepted.set_accept_state()
        pump(conn, accepted)
        clock.now += later
        peer = PeerChain.of(conn)
        errors = verifier.errors_of(conn, peer)
        found = verifier.judge(errors, peer)
        verifier.judged(conn, errors, found, peer)
        return conn, found.verdict.reason

    first, reason = connect()
    assert not reused(first) and reason is None and len(verifier.sessions) == 1
    second, reason = connect()
    assert reused(second) and reason is None
    third, reason = connect(later=120)  # resumed a minute before, judged a minute after the leaf expired
    assert reused(third) and reason == "expired"
    assert len(verifier.sessions) == 0  # a failed verdict drops its upstream's session
    clock.now -= 120
    connect()
    clock.now += 120
    fourth, _ = connect()
    assert not reused(fourth)  # past the chain's dates: not offered


def test_resumed_handshakes_are_counted_on_each_leg(start_bumper, resuming: ResumingUpstream) -> None:
    """bumper_tls_resumed_total{leg}: the upstream leg's second connection, the client's resumed one."""
    from tests.test_metrics import ADMIN, Admin, labels, of

    admin = Admin(start_bumper(*ADMIN))
    url = resuming.url("metrics.resume.test")
    moved = admin.moved(lambda: fetch(admin.bumper, url))
    assert of(moved, "bumper_tls_resumed_total") == {}
    moved = admin.moved(lambda: fetch(admin.bumper, url))
    assert of(moved, "bumper_tls_resumed_total") == {labels(leg="upstream"): 1}
    context = client_tls_context(admin.bumper.ca_pem, TLS13)
    first, _ = tls_client(admin.bumper, "metrics.resume.test", resuming.port, context)
    moved = admin.moved(lambda: tls_client(admin.bumper, "metrics.resume.test", resuming.port, context, first.session))
    assert of(moved, "bumper_tls_resumed_total") == {labels(leg="client"): 1, labels(leg="upstream"): 1}
    assert moved[("bumper_handshake_seconds_count", labels(leg="client"))] == 1


def cached(context: SSL.Context) -> int:
    """How many sessions CONTEXT's own cache holds (SSL_CTX_sess_number)."""
    assert hidden.FUNCTIONS is not None
    return hidden.FUNCTIONS.ctx_ctrl(hidden.pointer(context._context), 20, 0, None)  # type: ignore[attr-defined]


def test_a_session_that_never_resumes_leaves_the_cache(test_pki: Pki) -> None:
    """A TLS 1.2 session id (of a client without tickets) goes into the client context's cache
    (capped: tlsprovider.SERVER_SESSIONS); forget_session takes it out (ClientCertCheck calls it
    during the handshake, for a client certificate, whose session never resumes)."""
    from bumper.proxy.tlsprovider import SERVER_SESSIONS

    keys = ticket_keys(b"k" * 32, Clock(1_800_000_000.0))
    context = server_context(keys, test_pki.root.leaf("cache.test"))
    assert hidden.FUNCTIONS is not None
    assert hidden.FUNCTIONS.ctx_ctrl(hidden.pointer(context._context), 43, 0, None) == SERVER_SESSIONS  # type: ignore[attr-defined]
    client = SSL.Connection(CLIENT12)
    client.set_connect_state()
    conn = SSL.Connection(context)
    conn.set_accept_state()
    pump(client, conn)
    assert cached(context) == 1
    hidden.forget_session(conn)
    assert cached(context) == 0


def test_without_the_functions_nothing_resumes_and_start_up_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A cryptography whose extension names none of them (stripped): hidden finds nothing, and the
    client contexts resume nothing, since no session could be bound to its mimic; one warning."""
    stripped = tmp_path / "stripped.so"
    stripped.write_bytes(b"\x7fELF\x02\x01" + bytes(58))  # an ELF header, no sections
    assert hidden.symbols(stripped, (b"SSL_CTX_ctrl",)) == {}
    (tmp_path / "text").write_text("not ELF")
    assert hidden.symbols(tmp_path / "text", (b"SSL_CTX_ctrl",)) == {}
    monkeypatch.setattr(hidden, "FUNCTIONS", None)
    monkeypatch.setattr(hidden, "MISSING", "stripped.so names no SSL_CTX_ctrl")
    with caplog.at_level("WARNING", logger="bumper.tls"):
        keys = TicketKeys(None)
    assert [r.getMessage() for r in caplog.records] == [
        "session resumption is off (full handshakes on both legs): stripped.so names no SSL_CTX_ctrl"
    ]
    context = keys.add(client_context())
    assert context.get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert context.set_options(0) & SSL.OP_NO_TICKET
    keys.current()  # nothing to set, nothing logged
    assert len(caplog.records) == 1
