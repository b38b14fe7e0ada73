"""bumper's certificate provider: it replaces mitmproxy's stock TlsConfig addon.

Server-first: on every ClientHello the upstream handshake completes (and is verified) before the
client's, so the mimic can be minted from the upstream's real certificate. Unlike stock mitmproxy,
the mimic never uses the CA's key as its leaf key and never gains names (SNI, server IP) that the
upstream certificate does not carry. SSL contexts are built once, not per connection.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from mitmproxy import certs, connection, tls
from mitmproxy.addons.tlsconfig import AppData, alpn_select_callback
from OpenSSL import SSL, crypto

from bumper import aia, trust
from bumper.ca import fingerprint, load_pem_certificates
from bumper.errors import ConfigError
from bumper.eventlog import ConnectionLog
from bumper.mimic import UnmimicableCertificate
from bumper.mimicstore import Mimic, MimicStore
from bumper.policy import Decision
from bumper.upstreamerror import BlockedUpstream, UpstreamErrorPages

log = logging.getLogger("bumper.tls")

# Mozilla "intermediate" (TLS 1.2 part; TLS 1.3 suites are all strong and on by default).
CLIENT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
# Towards upstreams: forward-secret AEAD first, CBC only with ECDHE; never anything that
# would lower a client's security (no RC4, 3DES, DES, NULL, anonymous, export, PSK, SRP...).
# SECLEVEL=2 makes OpenSSL refuse RSA keys under 2048 bits and SHA-1 signatures.
UPSTREAM_CIPHERS = (
    "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:"
    "!aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!CAMELLIA:!IDEA:!SEED:!DSS"
)

# pyOpenSSL's raw OpenSSL bindings: hostname checking has no public pyOpenSSL API.
_lib: Any = SSL._lib  # type: ignore[attr-defined]
# Host name checks as browsers do them: no partial wildcards, never the subject CN.
_HOSTFLAGS = _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | getattr(_lib, "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT", 0)


@dataclass(frozen=True)
class UpstreamTrust:
    """Roots for verifying upstreams: the system store plus any --upstream-ca files."""

    extra_ca_files: tuple[Path, ...] = ()

    def all_files(self) -> list[Path]:
        """The system bundle (as OpenSSL finds it, SSL_CERT_FILE included) and the extra files."""
        system = ssl.get_default_verify_paths().cafile
        return [*([Path(system)] if system else []), *self.extra_ca_files]

    def check(self) -> None:
        for path in self.extra_ca_files:
            load_pem_certificates(path, f"--upstream-ca {path}")


# Only for upstreams a rule names, that speak nothing newer than TLS 1.0 or 1.1: OpenSSL 3 needs
# SECLEVEL 0 for those, and they need CBC suites. Still no RC4, 3DES, export, NULL or anonymous.
LEGACY_UPSTREAM_CIPHERS = (
    "@SECLEVEL=0:ECDHE+AES:DHE+AES:RSA+AES:!aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!DSS"
)
_VERSIONS = {"1.0": SSL.TLS1_VERSION, "1.1": SSL.TLS1_1_VERSION, "1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


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


def upstream_context(trust: UpstreamTrust, min_version: str = "1.2") -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # see client_context
    context.set_min_proto_version(_VERSIONS[min_version])
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    legacy = _VERSIONS[min_version] < SSL.TLS1_2_VERSION
    context.set_cipher_list((LEGACY_UPSTREAM_CIPHERS if legacy else UPSTREAM_CIPHERS).encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    # Every verification error is recorded, not fatal: the handshake completes so that bumper can
    # classify the failure and act on it (trust.py). Nothing is trusted on the way: a connection
    # without a verdict, or with a failed one, never gets a trusted mimic unless its defects are
    # ones the mimic carries to the client itself.
    context.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    context.set_default_verify_paths()
    for path in trust.extra_ca_files:
        context.load_verify_locations(str(path))
    return context


def client_context(chain: tuple[x509.Certificate, ...] = (), settings: ClientTls | None = None) -> SSL.Context:
    """Towards clients; CHAIN (the issuing intermediates) follows every mimic."""
    settings = settings or ClientTls()
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    # An idle connection keeps no TLS record buffers (about 34 KiB for each of its two legs),
    # as nginx and Squid do: memory per idle bumped connection is the figure that scales.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    for cert in chain:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
    context.set_min_proto_version(_VERSIONS[settings.min_version])
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_cipher_list(settings.ciphers.encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_alpn_select_callback(alpn_select_callback)  # type: ignore[arg-type]
    return context


def _record_verify_error(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
    if not ok:
        conn.get_app_data().append(trust.VerifyError(code, depth))
    return True


def expect_hostname(conn: SSL.Connection, name: str) -> None:
    """Send NAME as SNI (unless it is an IP address) and make OpenSSL verify the certificate covers it."""
    param = _lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    _lib.X509_VERIFY_PARAM_set_hostflags(param, _HOSTFLAGS)
    try:
        ip = ipaddress.ip_address(name).packed
    except ValueError:
        host = name.encode("idna")
        conn.set_tlsext_host_name(host)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, host, len(host))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))
    SSL._openssl_assert(ok == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class UpstreamVerdict:
    verdict: trust.Verdict
    signing: str  # trust.SIGN_*: how the mimic for this connection is signed
    fingerprint: str  # the upstream leaf's SHA-256


class UpstreamVerifier:
    """How bumper verifies an upstream, for both who ask: the bumped upstream leg (TlsProvider) and
    the probe of `on_upstream_error: splice` (probe.py). One context per TLS floor, one host name
    check, one recording of errors, one classification and one AIA fetcher (with its cache): the
    two cannot reach different verdicts on the same upstream."""

    def __init__(
        self,
        roots: UpstreamTrust,
        own_cas: Callable[[], Sequence[x509.Certificate]],
        issuers: aia.IssuerFetcher | None = None,
    ) -> None:
        self._roots = roots
        self._own_cas = own_cas  # bumper's CAs, the untrusted one too: never trusted upstream
        self._issuers = issuers  # completes chains that lack an intermediate; None: off
        self._aia_roots = aia.load_roots(roots.all_files()) if issuers else []
        self._contexts = {"1.2": upstream_context(roots)}  # by the lowest TLS version a rule allows

    def connection(self, name: str, min_version: str, alpn_offers: Sequence[bytes]) -> SSL.Connection:
        """A client connection to an upstream that should be NAME, its errors recorded in its app data."""
        context = self._contexts.get(min_version)
        if context is None:
            context = self._contexts[min_version] = upstream_context(self._roots, min_version)
        conn = SSL.Connection(context)
        conn.set_app_data([])  # the verification errors, filled by _record_verify_error
        expect_hostname(conn, name)
        if alpn_offers:  # the server may choose its certificate by ALPN too
            conn.set_alpn_protos(list(alpn_offers))
        conn.set_connect_state()
        return conn

    def fetches_issuer(self, errors: Sequence[trust.VerifyError], chain: Sequence[x509.Certificate]) -> bool:
        """Whether the verdict waits for an AIA fetch: a missing issuer, and fetching is on."""
        return self._missing(errors, chain) is not None

    def _missing(self, errors: Sequence[trust.VerifyError], chain: Sequence[x509.Certificate]) -> int | None:
        missing = trust.missing_issuer(errors)
        return missing if missing is not None and self._issuers is not None and missing < len(chain) else None

    async def judge_completed(
        self, errors: list[trust.VerifyError], chain: list[x509.Certificate], name: str
    ) -> UpstreamVerdict:
        """The verdict, after fetching the missing issuer of an incomplete chain (if fetches_issuer)."""
        missing = self._missing(errors, chain)
        if missing is not None:
            assert self._issuers is not None
            fetched = await self._issuers.issuers(chain[missing])
            if fetched and aia.verifies_with(chain[0], [*chain[1:], *fetched], self._aia_roots, name):
                errors, chain = [], [*chain, *fetched]  # own CA and weakness checks still apply, in judge
        return self.judge(errors, chain)

    def judge(self, errors: list[trust.VerifyError], chain: list[x509.Certificate]) -> UpstreamVerdict:
        """The verdict on a chain (leaf first) and the errors OpenSSL recorded while verifying it."""
        verdict = trust.classify(errors, chain, self._own_cas())
        return UpstreamVerdict(verdict, trust.signing_mode(errors, verdict), fingerprint(chain[0]) if chain else "-")


class TlsProvider:
    def __init__(
        self,
        mimics: MimicStore,
        verifier: UpstreamVerifier,
        connections: ConnectionLog,
        decisions: Callable[[str], Decision | None],
        pages: UpstreamErrorPages,
        client_tls: ClientTls | None = None,
    ) -> None:
        self.mimics = mimics
        self.verifier = verifier  # shared with the splice probe
        self.connections = connections
        self.decisions = decisions  # the policy's decision for a client connection
        self.pages = pages
        self._client_ctx = client_context(mimics.ca.chain, client_tls)
        self._verdicts: dict[str, UpstreamVerdict] = {}  # by client connection id, until its handshake

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # Server-first, unless the connection is spliced or refused (client.error set by bumper).
        data.establish_server_tls_first = not data.ignore_connection and data.context.client.error is None

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        server = tls_start.conn
        assert isinstance(server, connection.Server) and server.address
        client = tls_start.context.client
        # The name the client asked for; the CONNECT host when the client sent no SNI.
        server.sni = server.sni or client.sni or server.address[0]
        if not server.alpn_offers:
            server.alpn_offers = tuple(client.alpn_offers)
        decision = self.decisions(client.id)
        min_version = decision.upstream_tls_min if decision else "1.2"
        tls_start.ssl_conn = self.verifier.connection(server.sni, min_version, server.alpn_offers)

    async def _certificate_for(
        self, client: connection.Client, server: connection.Server, upstream: x509.Certificate, found: UpstreamVerdict
    ) -> Mimic:
        """What the client is shown, by the verdict and the rule's on_upstream_error."""
        verdict = found.verdict
        decision = self.decisions(client.id)
        action = decision.on_upstream_error if decision else "mimic"
        if verdict.trusted or action == "mimic":
            return await self.mimics.get(upstream, found.signing)
        rule = decision.rule if decision else "default"
        name = str(server.sni)
        if action == "allow":
            # The operator trusts this named host anyway: bumper's own certificate for the name,
            # since a copy would carry the very defect (dates, names) the rule overrides.
            log.warning(
                "%s: upstream certificate failed verification (%s: %s), trusted anyway by rule %r",
                name, verdict.reason, verdict.detail, rule,
            )  # fmt: skip
        else:  # block: bumper's own certificate for the name, then a 502 page for every request
            fingerprint_hex = found.fingerprint.replace(":", "")  # as the log line writes it
            self.pages.block(client.id, BlockedUpstream(name, str(verdict.reason), fingerprint_hex, verdict.detail))
            if record := self.connections.record(client.id):
                record.fail(f"upstream certificate failed verification ({verdict.reason}): blocked by rule {rule!r}")
        return await self.mimics.placeholder(name)

    def _refuse(self, client: connection.Client, reason: str) -> None:
        """No TLS context for the client: mitmproxy closes the connection. The reason goes to the
        log now, before mitmproxy's own "connection closed early" can take its place."""
        client.error = reason
        if record := self.connections.record(client.id):
            record.fail(reason)

    def tls_established_server(self, data: tls.TlsData) -> Awaitable[None] | None:
        assert data.ssl_conn is not None
        errors: list[trust.VerifyError] = data.ssl_conn.get_app_data()
        chain = [c._cert for c in data.conn.certificate_list]  # mitmproxy's Cert wraps cryptography's
        if self.verifier.fetches_issuer(errors, chain):
            return self._fetch_issuer_first(data, errors, chain)  # only this verdict has to wait
        self._keep(data, self.verifier.judge(errors, chain))
        return None

    async def _fetch_issuer_first(
        self, data: tls.TlsData, errors: list[trust.VerifyError], chain: list[x509.Certificate]
    ) -> None:
        """An upstream that sent an incomplete chain: its missing issuer, fetched by AIA, may complete it."""
        self._keep(data, await self.verifier.judge_completed(errors, chain, str(data.conn.sni)))

    def _keep(self, data: tls.TlsData, found: UpstreamVerdict) -> None:
        self._verdicts[data.context.client.id] = found
        if record := self.connections.record(data.context.client.id):
            record.verified(found.verdict, found.fingerprint)

    def client_disconnected(self, client: connection.Client) -> None:
        self._verdicts.pop(client.id, None)

    def running(self) -> None:
        self.mimics.start()

    def done(self) -> None:
        self.mimics.close()

    async def tls_start_client(self, tls_start: tls.TlsData) -> None:
        client = tls_start.conn
        assert isinstance(client, connection.Client)
        server = tls_start.context.server
        if client.error:
            return  # refused (by policy): no handshake, the connection is closed
        if not server.tls_established or not server.certificate_list:
            # Nothing verified to mimic: refusing the client is the only honest answer.
            return self._refuse(client, f"upstream TLS failed: {server.error or 'no certificate'}")
        found = self._verdicts.pop(client.id, None)
        if found is None:
            return self._refuse(client, "upstream TLS failed: no verification verdict")  # fail closed
        upstream = server.certificate_list[0]._cert  # mitmproxy's Cert wraps a cryptography certificate
        try:
            made = await self._certificate_for(client, server, upstream, found)
        except UnmimicableCertificate as e:
            return self._refuse(client, f"cannot mimic the upstream certificate: {e}")
        conn = SSL.Connection(self._client_ctx)
        conn.use_certificate(made.openssl_cert)
        conn.use_privatekey(made.openssl_key)
        conn.set_app_data(AppData(client_alpn=None, server_alpn=server.alpn, http2=True))
        conn.set_accept_state()
        client.mitmcert = certs.Cert(made.cert)
        tls_start.ssl_conn = conn
