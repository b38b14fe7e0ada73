"""Minting a mimic: a certificate that copies the upstream leaf but is signed by bumper's CA.

The mimic differs from the upstream certificate only in issuer, key material, serial and
signature. Everything here is a plain function over cryptography objects: no sockets, no state.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from bumper.certs import der, keys
from bumper.certs.ca import CertificateAuthority

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

_DROPPED = frozenset(oid.dotted_string for oid in DROPPED_EXTENSIONS)
_KEY_USAGE = ExtensionOID.KEY_USAGE.dotted_string
_COPIED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
PLACEHOLDER_SKEW = datetime.timedelta(hours=1)
PLACEHOLDER_LIFETIME = datetime.timedelta(days=1)


class UnmimicableCertificate(ValueError):
    """The upstream certificate cannot be read well enough to copy it."""


@dataclass(frozen=True)
class KeyChoice:
    spec: keys.KeySpec
    fell_back: bool  # True when the upstream's key type cannot be mirrored


def upstream_key_spec(upstream: x509.Certificate) -> keys.KeySpec | None:
    try:
        return keys.KeySpec.of(upstream.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def choose_key_spec(upstream: x509.Certificate, fallback: keys.KeySpec) -> KeyChoice:
    """Same algorithm and strength as the upstream's key, or FALLBACK when it cannot be mirrored."""
    spec = upstream_key_spec(upstream)
    return KeyChoice(spec, False) if spec is not None else KeyChoice(fallback, True)


def signature_hash(
    upstream: x509.Certificate, ca: CertificateAuthority
) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The upstream's hash when it is SHA-256/384/512, else SHA-256; Ed25519 CAs take none."""
    if isinstance(ca.key, ed25519.Ed25519PrivateKey):
        return None
    try:
        algorithm = upstream.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):  # unknown or broken signature parameters: ours to choose
        algorithm = None
    return algorithm if isinstance(algorithm, _COPIED_HASHES) else hashes.SHA256()


def validity(upstream: x509.Certificate, ca: CertificateAuthority) -> tuple[datetime.datetime, datetime.datetime]:
    """The upstream's validity, clamped into the CA's own: a mimic never outlives its issuer."""
    ca_from, ca_until = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    not_before = min(max(upstream.not_valid_before_utc, ca_from), ca_until)
    not_after = max(min(upstream.not_valid_after_utc, ca_until), not_before)
    return not_before, not_after


def copied_extensions(
    upstream: x509.Certificate, refit_for: keys.PrivateKey | None = None
) -> list[tuple[x509.ExtensionType, bool]]:
    """Every upstream extension but the dropped ones, byte for byte, each with its criticality.

    With REFIT_FOR (a key of another type than the upstream's), keyUsage loses the bits that key
    cannot honour; otherwise nothing is re-encoded.
    """
    try:
        raw = der.extensions(upstream.tbs_certificate_bytes)
    except der.MalformedDER as e:
        raise UnmimicableCertificate(f"malformed extensions: {e}") from None
    kept: list[tuple[x509.ExtensionType, bool]] = []
    seen: set[str] = set()
    for ext in raw:
        if ext.oid in seen:
            raise UnmimicableCertificate(f"extension {ext.oid} appears twice")
        seen.add(ext.oid)
        if ext.oid in _DROPPED:
            continue
        value: x509.ExtensionType = x509.UnrecognizedExtension(x509.ObjectIdentifier(ext.oid), ext.value)
        if ext.oid == _KEY_USAGE and refit_for is not None:
            value = fit_key_usage(key_usage(ext.value), refit_for)
        kept.append((value, ext.critical))
    return kept


def key_usage(value: bytes) -> x509.KeyUsage:
    """Decode a keyUsage extension value (a BIT STRING, RFC 5280 4.2.1.3)."""
    try:
        bits = der.bit_string_bits(value)
    except der.MalformedDER as e:
        raise UnmimicableCertificate(f"malformed keyUsage: {e}") from None
    agreement = 4 in bits
    return x509.KeyUsage(
        digital_signature=0 in bits,
        content_commitment=1 in bits,
        key_encipherment=2 in bits,
        data_encipherment=3 in bits,
        key_agreement=agreement,
        key_cert_sign=5 in bits,
        crl_sign=6 in bits,
        encipher_only=agreement and 7 in bits,
        decipher_only=agreement and 8 in bits,
    )


def fit_key_usage(usage: x509.KeyUsage, key: keys.PrivateKey) -> x509.KeyUsage:
    """For a fallback key: keyEncipherment only fits RSA, keyAgreement never RSA or Ed25519, and a
    non-RSA key must be allowed to sign, or no TLS handshake could use it."""
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
    try:
        subject = upstream.subject
        subject.rfc4514_string()  # decodes every attribute: fails here, not half way through signing
    except ValueError as e:
        raise UnmimicableCertificate(f"unreadable subject: {e}") from None
    mirrored = keys.KeySpec.of(key.public_key()) == upstream_key_spec(upstream)
    not_before, not_after = validity(upstream, ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for value, critical in copied_extensions(upstream, None if mirrored else key):
        builder = builder.add_extension(value, critical=critical)
    builder = builder.add_extension(ca.authority_key_identifier, critical=False)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(ca.key, signature_hash(upstream, ca))


def mint_placeholder(name: str, ca: CertificateAuthority, key: keys.PrivateKey) -> x509.Certificate:
    """A certificate of bumper's own for NAME, used only to show a block page over TLS: it copies
    nothing from an upstream that failed verification, so it vouches for nothing but the page."""
    now = datetime.datetime.now(datetime.UTC)
    try:
        general_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        general_name = x509.DNSName(name)
    not_before = max(now - PLACEHOLDER_SKEW, ca.cert.not_valid_before_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(max(min(now + PLACEHOLDER_LIFETIME, ca.cert.not_valid_after_utc), not_before))
        .add_extension(x509.SubjectAlternativeName([general_name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca.key, None if isinstance(ca.key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
