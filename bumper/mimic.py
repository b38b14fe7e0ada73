"""Minting a mimic: a certificate that copies the upstream leaf but is signed by bumper's CA.

The mimic differs from the upstream certificate only in issuer, key material, serial and
signature. Everything here is a plain function over cryptography objects: no sockets, no state.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from bumper import keys
from bumper.ca import CertificateAuthority

# Extensions that would make the mimic claim something bumper cannot stand behind:
# revocation and CT data of the upstream's CA, OCSP must-staple (bumper cannot staple for its
# own CA), and the upstream's key identifiers (bumper writes those for its own keys).
DROPPED_EXTENSIONS = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
        ExtensionOID.FRESHEST_CRL,
        ExtensionOID.PRECERT_SIGNED_CERTIFICATE_TIMESTAMPS,
        ExtensionOID.PRECERT_POISON,
        ExtensionOID.SIGNED_CERTIFICATE_TIMESTAMPS,
        ExtensionOID.TLS_FEATURE,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    }
)

_COPIED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class UnmimicableCertificate(ValueError):
    """The upstream certificate cannot be read well enough to copy it."""


@dataclass(frozen=True)
class KeyChoice:
    spec: keys.KeySpec
    fell_back: bool  # True when the upstream's key type cannot be mirrored


def choose_key_spec(upstream: x509.Certificate, fallback: keys.KeySpec) -> KeyChoice:
    """Same algorithm and strength as the upstream's key, or FALLBACK when it cannot be mirrored."""
    try:
        spec = keys.KeySpec.of(upstream.public_key())
    except (ValueError, UnsupportedAlgorithm):
        spec = None
    return KeyChoice(spec, False) if spec is not None else KeyChoice(fallback, True)


def signature_hash(
    upstream: x509.Certificate, ca: CertificateAuthority
) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The upstream's hash when it is SHA-256/384/512, else SHA-256; Ed25519 CAs take none."""
    if isinstance(ca.key, ed25519.Ed25519PrivateKey):
        return None
    try:
        algorithm = upstream.signature_hash_algorithm
    except UnsupportedAlgorithm:  # an unknown signature OID: the hash is ours to choose
        algorithm = None
    return algorithm if isinstance(algorithm, _COPIED_HASHES) else hashes.SHA256()


def validity(upstream: x509.Certificate, ca: CertificateAuthority) -> tuple[datetime.datetime, datetime.datetime]:
    """The upstream's validity, clamped into the CA's own: a mimic never outlives its issuer."""
    not_before = max(upstream.not_valid_before_utc, ca.cert.not_valid_before_utc)
    not_after = min(upstream.not_valid_after_utc, ca.cert.not_valid_after_utc)
    return not_before, max(not_before, not_after)


def copied_extensions(upstream: x509.Certificate, key: keys.PrivateKey) -> list[x509.Extension]:
    """Every upstream extension except the dropped ones, each with its criticality."""
    try:
        extensions = list(upstream.extensions)
    except ValueError as e:
        raise UnmimicableCertificate(f"unreadable extensions: {e}") from None
    kept = []
    for ext in extensions:
        if ext.oid in DROPPED_EXTENSIONS:
            continue
        if isinstance(ext.value, x509.KeyUsage):
            ext = x509.Extension(ext.oid, ext.critical, fit_key_usage(ext.value, key))
        kept.append(ext)
    return kept


def fit_key_usage(usage: x509.KeyUsage, key: keys.PrivateKey) -> x509.KeyUsage:
    """keyEncipherment only makes sense for RSA keys; keyAgreement never for RSA or Ed25519."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    key_agreement = usage.key_agreement and not is_rsa and not isinstance(key, ed25519.Ed25519PrivateKey)
    return x509.KeyUsage(
        digital_signature=usage.digital_signature or not is_rsa,
        content_commitment=usage.content_commitment,
        key_encipherment=usage.key_encipherment and is_rsa,
        data_encipherment=usage.data_encipherment and is_rsa,
        key_agreement=key_agreement,
        key_cert_sign=usage.key_cert_sign,
        crl_sign=usage.crl_sign,
        encipher_only=usage.encipher_only if key_agreement else False,
        decipher_only=usage.decipher_only if key_agreement else False,
    )


def mint(upstream: x509.Certificate, ca: CertificateAuthority, key: keys.PrivateKey) -> x509.Certificate:
    """The mimic of UPSTREAM for the private KEY (never the CA's key, never the upstream's)."""
    not_before, not_after = validity(upstream, ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(upstream.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in copied_extensions(upstream, key):
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(ca.authority_key_identifier, critical=False)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(ca.key, signature_hash(upstream, ca))
