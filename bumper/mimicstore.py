"""Where mimics come from: keys per key type, minting, and an in-memory LRU of finished mimics."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto

from bumper import keys, mimic
from bumper.ca import CertificateAuthority, fingerprint

log = logging.getLogger("bumper.mimic")

DEFAULT_CAPACITY = 10_000


@dataclass(frozen=True)
class Mimic:
    cert: x509.Certificate
    key: keys.PrivateKey
    fingerprint: str
    # pyOpenSSL forms, converted once because every handshake that serves this mimic needs them.
    openssl_cert: crypto.X509
    openssl_key: crypto.PKey


class KeyPool:
    """One private key per key type, made on first use and shared by the mimics of that type."""

    def __init__(self) -> None:
        self._keys: dict[keys.KeySpec, keys.PrivateKey] = {}

    def key_for(self, spec: keys.KeySpec) -> keys.PrivateKey:
        key = self._keys.get(spec)
        if key is None:
            key = self._keys[spec] = spec.generate()
        return key


class MimicStore:
    def __init__(
        self,
        ca: CertificateAuthority,
        fallback: keys.KeySpec = keys.P256,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.ca = ca
        self.fallback = fallback
        self.capacity = capacity
        self.pool = KeyPool()
        self._cache: OrderedDict[bytes, Mimic] = OrderedDict()

    def get(self, upstream: x509.Certificate) -> Mimic:
        """The mimic for UPSTREAM, from the cache or freshly minted. Raises mimic.UnmimicableCertificate."""
        cache_key = upstream.fingerprint(hashes.SHA256())
        hit = self._cache.get(cache_key)
        if hit is not None:
            self._cache.move_to_end(cache_key)
            return hit
        made = self._mint(upstream)
        self._cache[cache_key] = made
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return made

    def _mint(self, upstream: x509.Certificate) -> Mimic:
        choice = mimic.choose_key_spec(upstream, self.fallback)
        if choice.fell_back:
            log.info(
                "upstream key %s of %s cannot be mirrored; the mimic uses %s",
                _describe_key(upstream),
                upstream.subject.rfc4514_string() or "(empty subject)",
                choice.spec,
            )
        key = self.pool.key_for(choice.spec)
        cert = mimic.mint(upstream, self.ca, key)
        return Mimic(
            cert=cert,
            key=key,
            fingerprint=fingerprint(cert),
            openssl_cert=crypto.X509.from_cryptography(cert),
            openssl_key=crypto.PKey.from_cryptography_key(key),
        )


def _describe_key(cert: x509.Certificate) -> str:
    try:
        return keys.describe(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "of an unknown algorithm"
