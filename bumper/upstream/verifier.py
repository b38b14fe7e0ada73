"""How bumper judges an upstream's certificate: one verifier for the bumped upstream leg and the
splice probe, so that the two can never reach different verdicts on the same upstream."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography import x509
from OpenSSL import SSL

from bumper.certs import trust
from bumper.certs.ca import fingerprint
from bumper.certs.trust import UpstreamVerdict
from bumper.upstream import aia
from bumper.upstream.tls import UpstreamTrust, expect_hostname, upstream_context


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
    ) -> None:
        self._roots = roots
        # The weaknesses of a leaf its mimic carries (mimic.mirrored_weaknesses); None: none.
        self._mirrors = mirrors
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
        leaf = fingerprint(chain[0]).replace(":", "") if chain else None
        mirrored = self._mirrors(chain[0]) if self._mirrors and chain and verdict.reason in trust.MIRRORABLE else ()
        signing = trust.signing_mode(errors, verdict, mirrored)
        return UpstreamVerdict(verdict, signing, leaf, trust.sends_root(errors, signing))
