"""Where mimics come from: the memory LRU, then the disk cache, then minting with a pooled key."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import crypto

from bumper.certs import ca as ca_files
from bumper.certs import keys, mimic, trust
from bumper.certs.ca import CertificateAuthority, fingerprint
from bumper.certs.keypool import KeyPool, PooledKey, load_own_key
from bumper.certs.mimicdb import MimicStoreBackend, StoredMimic, too_large

log = logging.getLogger("bumper.mimic")

DEFAULT_MAX_BYTES = 32 * 1024**2
# What a mimic costs in memory besides its certificate and key DER: measured (RSS over 400 mimics
# of EC upstreams with certificates of 0.7, 4.7 and 60.7 KB) at 11.9 KB plus 3 times the
# certificate's DER each: cryptography's Certificate keeps the DER, pyOpenSSL's X509 a parsed copy
# and its encoding, and the dataclass, its fingerprint and the LRU's entry the rest. About 16 KB for
# a usual 1.5 KB certificate, so the default 32 MiB holds some 2,000 mimics, and 192 KB for a 60 KB one.
# Checked against RSS: 300 mimics of distinct 60 KB certificates count 56.2 MiB and grow RSS 55.1 MiB;
# under the default cap 172 stay, counting 31.9 MiB, RSS +32.1 MiB.
ENTRY_OVERHEAD = 12 * 1024
DER_COPIES = 3
TOLD_CERTIFICATES = 1024  # upstream certificates whose key lines were logged, remembered (100 KB at most)

# How each certificate asked of the store came: MimicStore.lookups' keys.
MEMORY_HIT = "memory_hit"  # from the memory LRU, or from a mint another connection had already started
DISK_HIT = "disk_hit"
MINTED = "minted"
LOOKUPS = (MEMORY_HIT, DISK_HIT, MINTED)


@dataclass(frozen=True)
class Mimic:
    cert: x509.Certificate
    key: keys.PrivateKey
    fingerprint: str
    # pyOpenSSL forms, converted once because every handshake that serves this mimic needs them.
    openssl_cert: crypto.X509
    openssl_key: crypto.PKey
    # It mirrors a weakness (a weak RSA key, a SHA-1 signature) that OpenSSL's default security
    # level refuses to serve: the client's TLS context for it allows them (tlsprovider).
    weak: bool = False
    # What it costs in the memory cache (memory_bytes): counted once, when it is made.
    size: int = 0

    @classmethod
    def of(cls, cert: x509.Certificate, key: PooledKey) -> Mimic:
        """Raises mimic.UnmimicableCertificate when OpenSSL cannot load CERT: its bytes are the
        upstream's, which OpenSSL could not have loaded either (in `bumper mimic`, say)."""
        try:
            openssl_cert = crypto.X509.from_cryptography(cert)
        except crypto.Error as e:
            raise mimic.UnmimicableCertificate(f"OpenSSL cannot read it: {_openssl_reason(e)}") from None
        weak = mimic.mirrors_a_weakness(cert)
        size = memory_bytes(len(cert.public_bytes(serialization.Encoding.DER)), len(_key_der(key.key)))
        return cls(cert, key.key, fingerprint(cert), openssl_cert, key.openssl, weak, size)

    def stored(self) -> StoredMimic:
        return StoredMimic(self.cert.public_bytes(serialization.Encoding.DER), _key_der(self.key))


def memory_bytes(cert_der: int, key_der: int) -> int:
    """What a mimic whose certificate and key take CERT_DER and KEY_DER bytes costs in memory
    (ENTRY_OVERHEAD says how it was measured). A pooled key, shared by many mimics, is counted in
    each: the cap errs on the safe side."""
    return ENTRY_OVERHEAD + DER_COPIES * cert_der + key_der


def _key_der(key: keys.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class MimicStore:
    def __init__(
        self,
        ca: CertificateAuthority,
        pool: KeyPool | None = None,
        disk: MimicStoreBackend | None = None,
        fallback: keys.KeySpec = keys.P256,
        max_bytes: int = DEFAULT_MAX_BYTES,
        untrusted: Callable[[], CertificateAuthority] | None = None,
        key_cap: keys.KeyCap = keys.DEFAULT_CAP,
    ) -> None:
        """MAX_BYTES caps the memory cache (Mimic.size; 0: none kept); KEY_CAP the mimic keys
        (--max-mimic-key)."""
        self.ca = ca
        # The untrusted CA is made on first need (functools.cache: once).
        self.untrusted = functools.cache(untrusted or (lambda: ca_files.untrusted(ca.directory)))
        self.pool = pool or KeyPool()
        self.disk = disk
        self.fallback = fallback
        self.max_bytes = max_bytes
        self.key_cap = key_cap
        self._memory: OrderedDict[tuple[bytes, str], Mimic] = OrderedDict()
        self.memory_bytes = 0  # the sum of the memory cache's Mimic.size
        self._told: OrderedDict[bytes, None] = OrderedDict()  # _first_told
        self._minting: dict[tuple[bytes, str], asyncio.Future[Mimic]] = {}
        # One mint per turn of the event loop: when a key many connections waited for arrives,
        # 200 back-to-back signatures would otherwise stall every other connection for ~130 ms.
        self._turn = asyncio.Lock()
        # Plain tallies for --admin's /metrics, read when scraped (bumper.proxy.metrics): an increment
        # per certificate costs nothing next to a handshake, and keeps this package free of Prometheus.
        self.lookups: Counter[str] = Counter()
        # Told how many seconds each mint took, the wait for its key included.
        self.on_mint: list[Callable[[float], None]] = []

    def start(self) -> None:
        """Once the proxy is up: make the usual keys, and forget cached mimics of a previous CA."""
        self.pool.warm()
        if self.disk is not None and (dropped := self.disk.forget_other_cas(self.ca.fingerprint)):
            log.info("dropped %d cached mimics signed by a previous CA", dropped)

    def close(self) -> None:
        self.pool.close()
        if self.disk is not None:
            self.disk.close()

    async def get(
        self, upstream: x509.Certificate, mode: trust.Signing = trust.Signing.CA, sha256: bytes | None = None
    ) -> Mimic:
        """The mimic of UPSTREAM, signed as MODE says. Raises mimic.UnmimicableCertificate. SHA256 is
        UPSTREAM's fingerprint when the caller has it already: with cryptography 50 it costs about as
        much as the whole memory-cache hit (8 us of 8.3 in bench/mint.py)."""
        cache_key = (sha256 or upstream.fingerprint(hashes.SHA256()), mode)
        hit = self._memory.get(cache_key)
        if hit is not None:
            self._memory.move_to_end(cache_key)
            self.lookups[MEMORY_HIT] += 1
            return hit
        pending = self._minting.get(cache_key)
        if pending is None:  # one mint per upstream certificate, however many connections wait for it
            pending = self._minting[cache_key] = asyncio.ensure_future(self._load_or_mint(upstream, cache_key))
            pending.add_done_callback(lambda _: self._minting.pop(cache_key, None))
        else:  # the mint under way serves this connection too: one mint paid, as for a cache hit
            self.lookups[MEMORY_HIT] += 1
        return await asyncio.shield(pending)

    async def placeholder(self, name: str, mode: trust.Signing = trust.Signing.CA) -> Mimic:
        """bumper's own certificate for NAME (mimic.mint_placeholder), cached like the mimics. Signed
        by the untrusted CA (MODE UNTRUSTED) for an upstream whose certificate cannot be copied."""
        cache_key = (name.encode(), f"placeholder-{mode}")
        hit = self._memory.get(cache_key)
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        if hit is None or hit.cert.not_valid_after_utc < soon:  # they live a day: renew before expiry
            started = time.monotonic()
            pooled = await self.pool.key_for(self.fallback)
            hit = Mimic.of(mimic.mint_placeholder(name, self._signer(mode), pooled.key), pooled)
            self._minted(started)
            self._remember(cache_key, hit)
        else:
            self.lookups[MEMORY_HIT] += 1
        return hit

    def _minted(self, started: float) -> None:
        """One more certificate minted, STARTED (time.monotonic) ago."""
        self.lookups[MINTED] += 1
        if self.on_mint:
            took = time.monotonic() - started
            for observe in self.on_mint:
                observe(took)

    def _remember(self, cache_key: tuple[bytes, str], made: Mimic) -> None:
        """Into the memory LRU, the least recently used out past max_bytes; a mimic far larger than
        the rest (mimicdb.too_large) is served but not kept."""
        self._forget(cache_key)
        if too_large(made.size, self.max_bytes):
            return
        self._memory[cache_key] = made
        self.memory_bytes += made.size
        self.resize(self.max_bytes)

    def resize(self, max_bytes: int) -> None:
        """Cap the memory cache at MAX_BYTES from now on, the least recently used out at once: the
        overload manager shrinks it under memory pressure and gives its size back afterwards."""
        self.max_bytes = max_bytes
        while self.memory_bytes > self.max_bytes:
            self._forget(next(iter(self._memory)))

    def _forget(self, cache_key: tuple[bytes, str]) -> None:
        gone = self._memory.pop(cache_key, None)
        if gone is not None:
            self.memory_bytes -= gone.size

    async def _load_or_mint(self, upstream: x509.Certificate, cache_key: tuple[bytes, str]) -> Mimic:
        made = self._from_disk(cache_key)
        if made is not None:
            self.lookups[DISK_HIT] += 1
        else:
            started = time.monotonic()
            made = await self._mint(upstream, trust.Signing(cache_key[1]), cache_key[0])
            self._minted(started)
            if self.disk is not None:
                made = self._claimed(self.disk, cache_key, made)
        self._remember(cache_key, made)
        return made

    def _claimed(self, disk: MimicStoreBackend, cache_key: tuple[bytes, str], made: Mimic) -> Mimic:
        """MADE stored, or the mimic another process (--workers) minted for the same upstream at the
        same moment and stored first: every worker then shows the same mimic for it, as one process
        does, and a client's session resumes on any of them (its session is bound to the mimic).
        Without this two workers that both minted at a cold start served different mimics for as
        long as their memory kept them: half the resumptions failed (bench workload 1r, 47%)."""
        ours = made.stored()
        stored = disk.claim(*cache_key, self.ca.fingerprint, ours)
        if stored.cert_der == ours.cert_der:
            return made
        theirs = self._loaded(stored, trust.Signing(cache_key[1]))
        if theirs is None:  # a row no longer good to serve (a CA or --max-mimic-key since): ours replaces it
            disk.put(*cache_key, self.ca.fingerprint, ours)
            return made
        return theirs

    def _from_disk(self, cache_key: tuple[bytes, str]) -> Mimic | None:
        if self.disk is None:
            return None
        stored = self.disk.get(*cache_key, self.ca.fingerprint)
        return None if stored is None else self._loaded(stored, trust.Signing(cache_key[1]))

    def _loaded(self, stored: StoredMimic, mode: trust.Signing) -> Mimic | None:
        """STORED, if it can be read and is still good to serve."""
        try:
            cert = x509.load_der_x509_certificate(stored.cert_der)
            key = PooledKey.of(load_own_key(stored.key_der))
        except (ValueError, UnsupportedAlgorithm):
            log.warning("unreadable entry in the mimic cache; minting again")
            return None
        return Mimic.of(cert, key) if self._still_good(cert, mode) else None

    def _still_good(self, cert: x509.Certificate, mode: trust.Signing) -> bool:
        """A cached mimic is served only if the current signer made it, it does not outlive it, and
        its key is within the current --max-mimic-key (a mimic made before the cap, or under a higher
        one, is minted again)."""
        spec = mimic.upstream_key_spec(cert)
        if spec is not None and self.key_cap.exceeds(spec):
            return False
        signer = cert if mode == trust.Signing.SELF else self._signer(mode).cert
        if not mimic.signed_by(cert, signer):
            return False
        now = datetime.datetime.now(datetime.UTC)
        return cert.not_valid_after_utc <= signer.not_valid_after_utc and now <= signer.not_valid_after_utc

    def _first_told(self, sha256: bytes) -> bool:
        """Whether the key lines about the upstream certificate SHA256 are yet to be logged: once
        per certificate among the last TOLD_CERTIFICATES, not once per mint (with --mimic-cache 0,
        or for a mimic too large to keep, that would be once per connection)."""
        if sha256 in self._told:
            self._told.move_to_end(sha256)
            return False
        self._told[sha256] = None
        if len(self._told) > TOLD_CERTIFICATES:
            self._told.popitem(last=False)
        return True

    def _signer(self, mode: trust.Signing) -> CertificateAuthority:
        return self.untrusted() if mode == trust.Signing.UNTRUSTED else self.ca

    async def _mint(self, upstream: x509.Certificate, mode: trust.Signing, sha256: bytes) -> Mimic:
        # A weak key is mirrored only where it is the defect the client must meet (a mimic of bumper's CA).
        choice = mimic.choose_key_spec(upstream, self.fallback, mirror_weak=mode == trust.Signing.CA, cap=self.key_cap)
        unmirrorable = choice.fell_back and mimic.upstream_key_spec(upstream) is None
        # Said once: a mimic minted again (evicted, too large to keep) says nothing new.
        if (unmirrorable or choice.capped_from) and self._first_told(sha256):
            if unmirrorable:
                log.info(
                    "upstream key %s of the certificate %s cannot be mirrored; the mimic uses %s",
                    _describe_key(upstream),
                    fingerprint(upstream),
                    choice.spec,
                )
            else:
                log.info(
                    "upstream key %s of the certificate %s is above --max-mimic-key %s; the mimic uses %s",
                    choice.capped_from,
                    fingerprint(upstream),
                    self.key_cap.label,
                    choice.spec,
                )
        # A weak key is made for this mimic alone (KeyChoice.fresh); it lives on only in its caches.
        pooled = await (self.pool.fresh(choice.spec) if choice.fresh else self.pool.key_for(choice.spec))
        if mode == trust.Signing.SELF:
            # Self-signed like the upstream: the mimic's own key signs, under the upstream's name.
            signer = CertificateAuthority(cert=upstream, key=pooled.key, directory=self.ca.directory)
        else:
            signer = self._signer(mode)
        async with self._turn:
            await asyncio.sleep(0)  # hold the turn across a loop iteration, so that the others queue
            return Mimic.of(mimic.mint(upstream, signer, pooled.key), pooled)


def _openssl_reason(error: crypto.Error) -> str:
    """The innermost reason of an OpenSSL error: what it met first."""
    reasons = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return str(reasons[0][2]) if reasons and len(reasons[0]) > 2 else str(error)


def _describe_key(cert: x509.Certificate) -> str:
    try:
        return keys.describe(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "of an unknown algorithm"
