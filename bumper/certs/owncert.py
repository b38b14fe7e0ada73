"""A listener's own certificate (`--tls-cert HOST:PORT=FILE.pem`): what a real front end serves, in
place of one from bumper's CA. FILE holds the certificate, its intermediates and its private key,
in PEM, in any order (as nginx's and HAProxy's combined files do)."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PublicKeyTypes

from bumper.certs import ca, keys
from bumper.errors import ConfigError

_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.DOTALL)


@dataclass(frozen=True)
class OwnCertificate:
    chain: tuple[x509.Certificate, ...]  # the certificate first, then its intermediates
    key: keys.PrivateKey = field(repr=False, compare=False)  # the certificate's: compared through it

    @property
    def fingerprint(self) -> str:
        return ca.fingerprint(self.chain[0])


def load(path: Path, now: datetime.datetime | None = None) -> OwnCertificate:
    """FILE's certificate chain and key, checked: they belong together and the certificate is valid
    now. Every problem is a ConfigError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        chain = tuple(x509.load_pem_x509_certificates(data))
    except (ValueError, x509.InvalidVersion):
        raise ConfigError(
            f"{path}: no PEM certificate in it (expected the certificate, its chain and its key)"
        ) from None
    blocks = [m.group(0) for m in _KEY_BLOCK.finditer(data)]
    if len(blocks) != 1:
        raise ConfigError(f"{path}: expected one PEM private key beside the certificates, found {len(blocks)}")
    key = ca.pem_private_key(blocks[0], path)
    if _public(key.public_key()) != _public(chain[0].public_key()):
        raise ConfigError(f"{path}: the private key does not belong to the first certificate")
    now = now or datetime.datetime.now(datetime.UTC)
    if not chain[0].not_valid_before_utc <= now <= chain[0].not_valid_after_utc:
        raise ConfigError(
            f"{path}: the certificate is not valid now (valid {chain[0].not_valid_before_utc:%Y-%m-%d}"
            f" to {chain[0].not_valid_after_utc:%Y-%m-%d})"
        )
    return OwnCertificate(chain, key)


def _public(key: CertificatePublicKeyTypes | PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
