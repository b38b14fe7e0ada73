"""How bumper judges an upstream's certificate: one verifier for the bumped upstream leg and the
splice probe, so that the two can never reach different verdicts on the same upstream."""

from __future__ import annotations

import datetime
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL, crypto

from bumper.certs import trust
from bumper.certs.ca import fingerprint
from bumper.certs.owncert import OwnCertificate
from bumper.certs.trust import UpstreamVerdict
from bumper.upstream import aia
from bumper.upstream.sessions import UpstreamSessions
from bumper.upstream.tls import UpstreamTrust, expect_hostname, refuse_verify_errors, upstream_context

# UpstreamVerifier.results' key for a trusted upstream; the others are trust.REASONS.
VERIFIED = "ok"


@dataclass(frozen=True)
class PeerChain:
    """The chain an upstream sent, leaf first, as cryptography reads it. mitmproxy's TLS layer
    leaves out of `Server.certificate_list` any certificate cryptography cannot parse (an indefinite
    length that OpenSSL takes, say), which would make an intermediate pass for the leaf: the
    verifier reads the chain from OpenSSL itself, and such a chain is `bad_cert`."""

    certificates: list[x509.Certificate]
    unreadable: int | None = None  # the depth of the first certificate cryptography cannot read
    leaf_sha256: str | None = None  # the leaf's SHA-256 (upper-case hex), read or not

    @classmethod
    def of(cls, conn: SSL.Connection, parsed: Sequence[x509.Certificate] = ()) -> PeerChain:
        """The chain CONN received. PARSED: the same chain as already parsed (mitmproxy's
        `certificate_list`); when it holds every certificate, nothing is read a second time."""
        sent = conn.get_peer_cert_chain() or []
        if parsed and len(parsed) == len(sent):
            return cls(list(parsed))
        certificates: list[x509.Certificate] = []
        unreadable, leaf_sha256 = None, None
        for depth, cert in enumerate(sent):
            der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
            if depth == 0:
                leaf_sha256 = hashlib.sha256(der).hexdigest().upper()
            try:
                certificates.append(x509.load_der_x509_certificate(der))
            except (ValueError, x509.InvalidVersion):
                unreadable = depth if unreadable is None else unreadable
        return cls(certificates, unreadable, leaf_sha256)


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
        mirrors: Callable[[x509.Certificate], frozenset[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._roots = roots
        # The weaknesses of a leaf its mimic carries (mimic.mirrored_weaknesses); None: none.
        self._mirrors = mirrors
        self._own_cas = own_cas  # bumper's CAs, the untrusted one too: never trusted upstream
        self._issuers = issuers  # completes chains that lack an intermediate; None: off
        self._aia_roots = aia.load_roots(roots.all_files()) if issuers else []
        self._clock = clock
        # The sessions of the upstreams verified, resumed by the bumped leg's next connections.
        self.sessions = UpstreamSessions(clock)
        # By the lowest TLS version a rule allows, and the client certificate it presents.
        self._contexts: dict[tuple[str, str | None], SSL.Context] = {}
        self._resumes = False  # whether sessions can be kept (hidden's functions found)
        self._context("1.2", None)
        # Each verdict reached, by its reason code (VERIFIED when trusted): read by --admin's /metrics.
        self.results: Counter[str] = Counter()

    def connection(
        self,
        name: str,
        min_version: str,
        alpn_offers: Sequence[bytes],
        client_cert: OwnCertificate | None = None,
        strict: bool = False,
        peer: tuple[str, int] | None = None,
    ) -> SSL.Connection:
        """A client connection to an upstream that should be NAME, its errors recorded in its app data;
        with CLIENT_CERT for an upstream that asks for a client certificate; STRICT: a verification
        error fails the handshake (tls.refuse_verify_errors). PEER, the address and port connected:
        the session kept for the same upstream is resumed (not for STRICT: that connection must be
        verified by OpenSSL itself), and this one's kept once verified (`judged`)."""
        conn = SSL.Connection(self._context(min_version, client_cert))
        conn.set_app_data([])  # the verification errors, filled by _record_verify_error
        expect_hostname(conn, name)
        if alpn_offers:  # the server may choose its certificate by ALPN too
            conn.set_alpn_protos(list(alpn_offers))
        if strict:
            refuse_verify_errors(conn)
        elif peer is not None and self._resumes:
            fingerprint = client_cert.fingerprint if client_cert else None
            self.sessions.connection(conn, (name, peer[0], peer[1], min_version, fingerprint))
        conn.set_connect_state()
        return conn

    def _context(self, min_version: str, client_cert: OwnCertificate | None) -> SSL.Context:
        which = (min_version, client_cert.fingerprint if client_cert else None)
        context = self._contexts.get(which)
        if context is None:
            context = self._contexts[which] = upstream_context(self._roots, min_version, client_cert)
            self._resumes = self.sessions.watch(context)
        return context

    def errors_of(self, conn: SSL.Connection, peer: PeerChain) -> list[trust.VerifyError]:
        """What OpenSSL recorded while verifying CONN's upstream; for a resumed session, which
        OpenSSL does not verify again, what its chain's dates say now (the rest held when it was kept)."""
        errors: list[trust.VerifyError] = conn.get_app_data()
        if self.sessions.reused(conn):
            now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
            errors.extend(trust.validity_errors(peer.certificates, now))
        return errors

    def judged(
        self, conn: SSL.Connection, errors: Sequence[trust.VerifyError], found: UpstreamVerdict, peer: PeerChain
    ) -> None:
        """CONN's verdict FOUND: its session is kept only when OpenSSL recorded no error at all
        (ERRORS: not even one an AIA fetch made good) and the verdict is trusted."""
        self.sessions.verdict(conn, found.verdict.trusted and not errors, peer.certificates)

    def fetches_issuer(self, errors: Sequence[trust.VerifyError], peer: PeerChain) -> bool:
        """Whether the verdict waits for an AIA fetch: a missing issuer, and fetching is on."""
        return peer.unreadable is None and self._missing(errors, peer.certificates) is not None

    def _missing(self, errors: Sequence[trust.VerifyError], chain: Sequence[x509.Certificate]) -> int | None:
        missing = trust.missing_issuer(errors)
        return missing if missing is not None and self._issuers is not None and missing < len(chain) else None

    async def judge_completed(self, errors: list[trust.VerifyError], peer: PeerChain, name: str) -> UpstreamVerdict:
        """The verdict, after fetching the missing issuer of an incomplete chain (if fetches_issuer)."""
        if peer.unreadable is not None:
            return self.judge(errors, peer)
        chain = peer.certificates
        missing = self._missing(errors, chain)
        if missing is not None:
            assert self._issuers is not None
            fetched = await self._issuers.issuers(chain[missing])
            if fetched and aia.verifies_with(chain[0], [*chain[1:], *fetched], self._aia_roots, name):
                errors, chain = [], [*chain, *fetched]  # own CA and weakness checks still apply, in judge
        return self.judge(errors, PeerChain(chain))

    def judge(self, errors: list[trust.VerifyError], peer: PeerChain) -> UpstreamVerdict:
        """The verdict on a chain (leaf first) and the errors OpenSSL recorded while verifying it."""
        found = self._judge(errors, peer)
        self.results[found.verdict.reason or VERIFIED] += 1
        return found

    def _judge(self, errors: list[trust.VerifyError], peer: PeerChain) -> UpstreamVerdict:
        if peer.unreadable is not None:
            detail = f"a certificate cryptography cannot read (depth {peer.unreadable})"
            return UpstreamVerdict(trust.Verdict("bad_cert", detail), trust.Signing.UNTRUSTED, peer.leaf_sha256)
        chain = peer.certificates
        verdict = trust.classify(errors, chain, self._own_cas())
        leaf = peer.leaf_sha256 or (fingerprint(chain[0]).replace(":", "") if chain else None)
        mirrored = self._mirrors(chain[0]) if self._mirrors and chain and verdict.reason in trust.MIRRORABLE else ()
        signing = trust.signing_mode(errors, verdict, mirrored)
        return UpstreamVerdict(verdict, signing, leaf, trust.sends_root(errors, signing))
