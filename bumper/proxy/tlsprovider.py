"""bumper's certificate provider: it replaces mitmproxy's stock TlsConfig addon.

Server-first: on every ClientHello the upstream handshake completes (and is verified) before the
client's, so the mimic can be minted from the upstream's real certificate. Unlike stock mitmproxy,
the mimic never uses the CA's key as its leaf key and never gains names (SNI, server IP) that the
upstream certificate does not carry. SSL contexts are built once, not per connection.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from mitmproxy import certs, connection, tls
from mitmproxy.addons.tlsconfig import AppData, alpn_select_callback
from OpenSSL import SSL, crypto

from bumper.certs import trust
from bumper.certs.clientcert import ClientIdentity
from bumper.certs.mimic import UnmimicableCertificate
from bumper.certs.mimicstore import Mimic, MimicStore
from bumper.certs.owncert import OwnCertificate
from bumper.certs.trust import UpstreamVerdict
from bumper.errors import ConfigError
from bumper.policy import names
from bumper.policy.rules import ClientCertRequirement, ListenerMode, OnUpstreamError
from bumper.proxy import replies
from bumper.proxy.layers import relay_handshake
from bumper.proxy.listeners import Listener
from bumper.proxy.state import BY_POLICY, ConnectionState, ConnectionStates
from bumper.proxy.upstreamerror import BY_UPSTREAM_ERROR
from bumper.upstream import hidden, resumption
from bumper.upstream.tls import TLS_VERSIONS
from bumper.upstream.verifier import PeerChain, UpstreamVerifier

log = logging.getLogger("bumper.tls")

# Mozilla "intermediate" (TLS 1.2 part; TLS 1.3 suites are all strong and on by default).
CLIENT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


@dataclass(frozen=True)
class ClientTls:
    """The client leg: TLS 1.2 and 1.3 with Mozilla's "intermediate" suites unless told otherwise."""

    min_version: str = "1.2"
    ciphers: str = CLIENT_CIPHERS

    def check(self) -> None:
        try:
            SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(self.ciphers.encode())
        except SSL.Error:
            raise ConfigError(f"--client-ciphers {self.ciphers!r}: OpenSSL accepts none of these suites") from None


def client_context(chain: tuple[x509.Certificate, ...] = (), settings: ClientTls | None = None) -> SSL.Context:
    """Towards clients; CHAIN (the issuing intermediates) follows every mimic."""
    settings = settings or ClientTls()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    # An idle connection keeps no TLS record buffers (about 34 KiB for each of its two legs),
    # as nginx and Squid do: memory per idle bumped connection is the figure that scales.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    for cert in chain:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
    context.set_min_proto_version(TLS_VERSIONS[settings.min_version])
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_cipher_list(settings.ciphers.encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_alpn_select_callback(alpn_select_callback)
    return context


def _block_requests(state: ConnectionState, host: str, found: UpstreamVerdict, why: str = "") -> None:
    """Every request of STATE's connection gets the 502 that says HOST failed verification (FOUND)."""
    verdict = found.verdict
    state.blocked = replies.upstream_blocked(host, str(verdict.reason), found.fingerprint or "-", verdict.detail)
    state.refuse(f"upstream certificate failed verification ({verdict.reason}){why}", BY_UPSTREAM_ERROR)


class ClientCertCheck:
    """OpenSSL's verify callback for a client certificate a rule requires: OpenSSL hands it the
    chain one certificate at a time, top first (its own verdicts are ignored: the client context
    trusts no CA); at the leaf, the rule's requirement decides, and the connection's state hears why.
    Returning False fails the handshake with an alert."""

    def __init__(self, required: ClientCertRequirement, state: ConnectionState) -> None:
        self.required = required
        self.state = state
        self.chain: dict[int, x509.Certificate] = {}

    def __call__(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        self.chain[depth] = cert.to_cryptography()
        if depth > 0:
            return True
        # Its session never resumes (TlsProvider._serve): out of the cache before it is added,
        # where it would only hold the client's chain until pushed out (OpenSSL caches no session
        # taken out of it, which marks it not resumable).
        hidden.forget_session(conn)
        found = self.required.check([self.chain[d] for d in sorted(self.chain)], datetime.datetime.now(datetime.UTC))
        if isinstance(found, str):
            self.refused(found)
            return False
        self.verified(found)
        return True

    def refused(self, why: str) -> None:
        self.state.refuse(f"client certificate refused: {why}", BY_POLICY)

    def verified(self, found: ClientIdentity) -> None:
        if self.state.client_identity is None:  # OpenSSL may ask again about the leaf: said once
            self.state.client_identity = found
            log.info("%s: client certificate %s", self.state.client, found.subject)


class RelayClientCheck(ClientCertCheck):
    """The same check for a relay listener's own handshake (--client-ca): the outcome names the
    option, and the identity is the relay client's, apart from any a rule asks for inside."""

    def refused(self, why: str) -> None:
        self.state.refuse(why, "bumper")

    def verified(self, found: ClientIdentity) -> None:
        self.state.relay_client_cert = found


def own_context(certificate: OwnCertificate, settings: ClientTls | None) -> SSL.Context:
    """Towards a reverse listener's clients: its own certificate, chain and key (--tls-cert)."""
    context = client_context(certificate.chain[1:], settings)
    context.use_certificate(crypto.X509.from_cryptography(certificate.chain[0]))
    context.use_privatekey(crypto.PKey.from_cryptography_key(certificate.key))
    context.check_privatekey()
    return context


def relay_context(context: SSL.Context) -> SSL.Context:
    """CONTEXT, for a relay listener's own TLS only, without session resumption: a resumed session
    skips the client's certificate, which --client-ca must see (and which the log names) on every
    connection; and OpenSSL fails a resumption outright where it verifies peers without a session id
    context. A relay's clients are few and long-lived: a full handshake each costs little."""
    return no_resumption(context)


def no_resumption(context: SSL.Context) -> SSL.Context:
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    return context


# Sessions a client context keeps for TLS 1.2 session ids (a few hundred bytes each): only of clients
# that take no tickets (OpenSSL gives the others no session id), served from it on the worker that
# made it.
SERVER_SESSIONS = 8192


class TicketKeys:
    """The session ticket key of bumper's client contexts: derived from the day's secret and the
    time (resumption.ticket_key), the same in every worker given the same chain of secrets, and set
    again on every context when its epoch ends. The secret moves on with the day and the day
    before's is dropped (resumption.current_secret). Without hidden's functions: OpenSSL's own key,
    and no resumption at all (`resumes`), since a session could not be bound to its mimic."""

    def __init__(self, secret: resumption.TicketSecret | None, clock: Callable[[], float] = time.time) -> None:
        # One worker alone: a chain of its own, started at random.
        self._secret = secret or resumption.new_secret(clock())
        self._clock = clock
        self._epoch: int | None = None
        self._key = b""
        self._contexts: list[SSL.Context] = []
        self.resumes = hidden.FUNCTIONS is not None
        if not self.resumes:
            log.warning("session resumption is off (full handshakes on both legs): %s", hidden.MISSING)

    def add(self, context: SSL.Context) -> SSL.Context:
        """CONTEXT, which serves clients, with the current key (without resumption, if none can be set)."""
        if not self.resumes:
            return no_resumption(context)
        self._contexts.append(context)
        hidden.set_session_cache_size(context, SERVER_SESSIONS)
        if self._key:
            hidden.set_ticket_key(context, self._key)
        return context

    def current(self) -> None:
        """The current epoch's key on every context: cheap when the epoch has not changed."""
        now = self._clock()
        epoch = resumption.ticket_epoch(now)
        if epoch == self._epoch or not self.resumes:
            return
        self._secret = resumption.current_secret(self._secret, now)
        self._epoch, self._key = epoch, resumption.ticket_key(self._secret.secret, epoch)
        if not all([hidden.set_ticket_key(context, self._key) for context in self._contexts]):
            # Still safe (sessions stay bound to their mimics), but a client resumes only on the
            # worker that gave it its ticket.
            log.warning("session tickets are per worker: OpenSSL refused the shared ticket key")


class TlsProvider:
    def __init__(
        self,
        mimics: MimicStore,
        verifier: UpstreamVerifier,
        states: ConnectionStates,
        client_tls: ClientTls | None = None,
        listeners: tuple[Listener, ...] = (),
        client_ca: ClientCertRequirement | None = None,
        tickets: TicketKeys | None = None,
    ) -> None:
        self.mimics = mimics
        self.verifier = verifier  # shared with the splice probe
        self.states = states
        self._client_tls = client_tls or ClientTls()
        self._client_ca = client_ca  # what relay listeners' clients must present (--client-ca)
        self.tickets = tickets or TicketKeys(None)
        self.tickets.current()
        # Listeners with a certificate of their own (--tls-cert): its context, by listener address.
        self._own_contexts: dict[str, SSL.Context] = {}
        self._own_bound: dict[str, tuple[bytes, ...]] = {}  # their sessions' binding (_serve's BOUND)
        for listener in listeners:
            if listener.certificate is not None:
                own = own_context(listener.certificate, client_tls)
                self._own_bound[listener.address] = (b"own", listener.certificate.fingerprint.encode())
                self._own_contexts[listener.address] = (
                    relay_context(own) if listener.mode is ListenerMode.RELAY else self.tickets.add(own)
                )
        # Relay listeners' own TLS without --tls-cert: bumper's certificate for the name asked, in a
        # context apart from the mimics', whose sessions must not resume there.
        self._relay_context = relay_context(client_context(mimics.ca.chain, client_tls))
        # By (sends the untrusted root, serves a weak mimic); the usual one now, the others on first need.
        self._client_contexts = {(False, False): self.tickets.add(client_context(mimics.ca.chain, client_tls))}

    def _context_for(self, sends_root: bool, made: Mimic) -> SSL.Context:
        """The client context for a mimic: the usual one, or one that sends bumper's untrusted root
        after it, for an upstream that sent an untrusted root of its own (UpstreamVerdict.sends_root),
        or one that lets OpenSSL serve a mimic as weak as the upstream's certificate (Mimic.weak):
        security level 0, the same cipher suites. The client's own security level decides, as
        it would have directly."""
        which = (sends_root, made.weak)
        context = self._client_contexts.get(which)
        if context is None:
            chain = (self.mimics.untrusted().cert,) if sends_root else self.mimics.ca.chain
            settings = self._client_tls
            if made.weak:
                settings = dataclasses.replace(settings, ciphers=f"{settings.ciphers}:@SECLEVEL=0")
            context = self._client_contexts[which] = self.tickets.add(client_context(chain, settings))
        return context

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # Server-first, unless the connection is spliced or refused (client.error set by bumper).
        data.establish_server_tls_first = (
            not data.ignore_connection
            and data.context.client.error is None
            and data.context.server.tls
            and not relay_handshake(data.context)
        )  # (a reverse listener's http:// upstream has no TLS to establish; a relay's own TLS has no upstream)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server) and server.address
        client = tls_start.context.client
        # The name the client asked for; the CONNECT host when the client sent no SNI. In A-labels
        # (UTS #46): mitmproxy decodes a CONNECT host to Unicode, and certificates name A-labels.
        server.sni = names.normalize(server.sni or client.sni or server.address[0])
        if not server.alpn_offers:
            server.alpn_offers = tuple(client.alpn_offers)
        state = self.states.of(client.id)
        decision = state.decision if state else None
        if state and client.mitmcert is None:
            state.upstream = None  # only this handshake's verdict may decide the client's certificate
        # A later upstream connection of a bumped client (the one before was closed: by the upstream,
        # or after --upstream-idle-timeout): the client trusts the mimic it was shown, so an upstream
        # that was trusted then must verify now, before the request that opened it goes out.
        shown = state.upstream if state else None
        strict = client.mitmcert is not None and shown is not None and shown.verdict.trusted
        min_version = decision.upstream_tls_min if decision else "1.2"
        client_cert = decision.client_cert if decision else None
        peer = (str(server.peername[0]), int(server.peername[1])) if server.peername else None
        tls_start.ssl_conn = self.verifier.connection(
            server.sni, min_version, server.alpn_offers, client_cert, strict, peer
        )

    async def _certificate_for(
        self,
        state: ConnectionState,
        server: connection.Server,
        upstream: x509.Certificate | None,
        found: UpstreamVerdict,
    ) -> Mimic:
        """What the client is shown, by the verdict and the rule's on_upstream_error."""
        verdict = found.verdict
        decision = state.decision
        action = decision.on_upstream_error if decision else OnUpstreamError.MIMIC
        if verdict.reason == "bad_cert" and action is OnUpstreamError.MIMIC:
            # Nothing that can be copied: bumper's own certificate for the name, from the untrusted
            # CA, which the client refuses as an unknown issuer.
            return await self.mimics.placeholder(str(server.sni), trust.Signing.UNTRUSTED)
        if verdict.trusted or action is OnUpstreamError.MIMIC:
            assert found.signing is not None and upstream is not None
            # The verdict fingerprinted this very leaf (the first of the same certificate list).
            sha256 = bytes.fromhex(found.fingerprint) if found.fingerprint else None
            return await self.mimics.get(upstream, found.signing, sha256)
        rule = decision.rule if decision else "default"
        name = str(server.sni)
        if action is OnUpstreamError.ALLOW:
            # The operator trusts this named host anyway: bumper's own certificate for the name,
            # since a copy would carry the very defect (dates, names) the rule overrides.
            log.warning(
                "%s: upstream certificate failed verification (%s: %s), trusted anyway by rule %r",
                name, verdict.reason, verdict.detail, rule,
            )  # fmt: skip
        else:  # block: bumper's own certificate for the name, then a 502 page for every request
            _block_requests(state, name, found, f": blocked by rule {rule!r}")
        return await self.mimics.placeholder(name)

    async def _front_end(self, tls_start: tls.TlsData, state: ConnectionState) -> None:
        """A reverse listener's client: bumper's own certificate for the name it asked for, not a
        mimic: the upstream is the operator's, not the client's choice. An https:// upstream that
        failed verification gets the client a 502 for every request; one that cannot be reached, the
        502 of each request's own connect."""
        client, server = tls_start.context.client, tls_start.context.server
        assert server.address is not None
        name = names.normalize(client.sni or server.address[0])  # the name the client asked for
        found = state.upstream
        if found is not None and not found.verdict.trusted:
            _block_requests(state, str(server.sni), found)
        own = self._own_contexts.get(state.listener.address) if state.listener else None
        if own is not None:
            assert state.listener is not None
            return self._serve(tls_start, own, bound=self._own_bound[state.listener.address])
        made = await self.mimics.placeholder(name)
        self._serve(tls_start, self._context_for(False, made), made, bound=(b"mimic", made.fingerprint.encode()))

    async def _relay_front(self, tls_start: tls.TlsData, state: ConnectionState) -> None:
        """A relay listener's own TLS: bumper is the HTTPS proxy the client asked for, so it shows
        the listener's own certificate (--tls-cert) or one from its CA for the name asked (without
        SNI: the listener's address); HTTP/1.1 only, where CONNECT is spoken; and with --client-ca,
        the client's certificate is required."""
        assert state.listener is not None
        client = tls_start.context.client
        check = RelayClientCheck(self._client_ca, state) if self._client_ca is not None else None
        own = self._own_contexts.get(state.listener.address)
        if own is not None:
            return self._serve(tls_start, own, http2=False, check=check)
        made = await self.mimics.placeholder(names.normalize(client.sni or client.sockname[0]))
        self._serve(tls_start, self._relay_context, made, http2=False, check=check)
        client.mitmcert = None  # no mimic: the access log's mimic_sha256 is the bumped TLS's, inside

    def _serve(
        self,
        tls_start: tls.TlsData,
        context: SSL.Context,
        made: Mimic | None = None,
        http2: bool = True,
        check: ClientCertCheck | None = None,
        bound: tuple[bytes, ...] = (),
    ) -> None:
        """The client's handshake, in CONTEXT, with MADE (None: the context's own certificate); ALPN
        by the upstream's, else h2 or HTTP/1 (HTTP2: whether h2); CHECK the client's certificate (by
        default, as the connection's rule requires). BOUND: what the certificate shown depends on
        (the mimic's fingerprint, the chain after it), to which the client's session is bound:
        OpenSSL resumes it only where the full handshake would have shown the same (none: a
        relay's own context, which resumes nothing)."""
        client, server = tls_start.context.client, tls_start.context.server
        conn = SSL.Connection(context)
        if made is not None:
            conn.use_certificate(made.openssl_cert)
            conn.use_privatekey(made.openssl_key)
            client.mitmcert = certs.Cert(made.cert)
        conn.set_app_data(AppData(client_alpn=None, server_alpn=server.alpn, http2=http2))
        state = self.states.of(client.id)
        required = state.decision.client_cert_required if state and state.decision else None
        if check is None and state is not None and required is not None:
            check = ClientCertCheck(required, state)
        if check is not None:
            conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
            # A resumed session would skip the certificate, which must be checked (its dates too)
            # and named in the log on every connection: a session id context of this connection's
            # own, which no session of another one has.
            bound = (b"once", secrets.token_bytes(16))
        if bound:
            hidden.set_session_id_context(conn, resumption.session_id_context(*bound))
        conn.set_accept_state()
        tls_start.ssl_conn = conn

    def _refuse(self, client: connection.Client, reason: str) -> None:
        """No TLS context for the client: mitmproxy closes the connection. The reason goes to the
        log now, before mitmproxy's own "connection closed early" can take its place."""
        client.error = reason
        if state := self.states.of(client.id):
            state.refuse(reason, "bumper")

    def tls_established_server(self, data: tls.TlsData) -> Awaitable[None] | None:
        assert data.ssl_conn is not None
        # OpenSSL's chain: certificate_list leaves out what cryptography cannot parse.
        peer = PeerChain.of(data.ssl_conn, [c.to_cryptography() for c in data.conn.certificate_list])
        errors = self.verifier.errors_of(data.ssl_conn, peer)
        if self.verifier.fetches_issuer(errors, peer):
            return self._fetch_issuer_first(data, errors, peer)  # only this verdict has to wait
        self._keep(data, errors, peer, self.verifier.judge(errors, peer))
        return None

    async def _fetch_issuer_first(self, data: tls.TlsData, errors: list[trust.VerifyError], peer: PeerChain) -> None:
        """An upstream that sent an incomplete chain: its missing issuer, fetched by AIA, may complete it."""
        self._keep(data, errors, peer, await self.verifier.judge_completed(errors, peer, str(data.conn.sni)))

    def _keep(
        self, data: tls.TlsData, errors: list[trust.VerifyError], peer: PeerChain, found: UpstreamVerdict
    ) -> None:
        assert data.ssl_conn is not None
        self.verifier.judged(data.ssl_conn, errors, found, peer)
        if state := self.states.of(data.context.client.id):
            state.verified(found)

    def running(self) -> None:
        self.mimics.start()

    def done(self) -> None:
        self.mimics.close()
        self.verifier.sessions.close()

    async def tls_start_client(self, tls_start: tls.TlsData) -> None:
        client = tls_start.conn
        assert isinstance(client, connection.Client)
        server = tls_start.context.server
        if client.error:
            return  # refused (by policy): no handshake, the connection is closed
        self.tickets.current()
        state = self.states.of(client.id)
        if state is not None and relay_handshake(tls_start.context):
            return await self._relay_front(tls_start, state)
        if state is not None and state.listener is not None and state.listener.mode is ListenerMode.REVERSE:
            return await self._front_end(tls_start, state)
        if not server.tls_established:
            return self._refuse(client, f"upstream TLS failed: {server.error or 'no certificate'}")
        found = state.upstream if state else None
        if state is None or found is None or found.signing is None:
            return self._refuse(client, "upstream TLS failed: no verification verdict")  # fail closed
        bad_cert = found.verdict.reason == "bad_cert"  # nothing to copy: answered without the upstream's leaf
        if not server.certificate_list and not bad_cert:
            # Nothing verified to mimic: refusing the client is the only honest answer.
            return self._refuse(client, "upstream TLS failed: no certificate")
        upstream = None if bad_cert else server.certificate_list[0].to_cryptography()
        try:
            made = await self._certificate_for(state, server, upstream, found)
        except UnmimicableCertificate as e:
            # Nothing bumper can copy (its walker, stricter than the verdict's, refused it): the
            # upstream fails verification as bad_cert, and is answered like any other failure.
            found = dataclasses.replace(
                found, verdict=trust.Verdict("bad_cert", f"cannot copy the certificate: {e}"), sends_root=False
            )
            state.verified(found)
            made = await self._certificate_for(state, server, None, found)
        bound = (b"mimic", made.fingerprint.encode(), b"root" if found.sends_root else b"")
        self._serve(tls_start, self._context_for(found.sends_root, made), made, bound=bound)
