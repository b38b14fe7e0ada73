"""Minting a mimic: a certificate that copies the upstream leaf but is signed by bumper's CA.

The mimic differs from the upstream certificate only in issuer, key material, serial and
signature. Everything here is a plain function over cryptography objects: no sockets, no state.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
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
_AKI = ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string
_SKI = ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string
# SHA-1 too: a SHA-1-signed upstream gets a SHA-1-signed mimic, so that a client refuses it (or, with
# SHA-1 allowed, accepts it) as it would the upstream's certificate. MD5 and SHA-224 are not copied.
_COPIED_HASHES = (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)
Hash = hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512
# AlgorithmIdentifier DER of each signature bumper makes: RSA PKCS#1 v1.5 (NULL parameters), ECDSA
# and Ed25519 (none), by hash.
_RSA_OIDS = {"sha1": "1.2.840.113549.1.1.5", "sha256": "1.2.840.113549.1.1.11",
             "sha384": "1.2.840.113549.1.1.12", "sha512": "1.2.840.113549.1.1.13"}  # fmt: skip
_ECDSA_OIDS = {"sha1": "1.2.840.10045.4.1", "sha256": "1.2.840.10045.4.3.2",
               "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}  # fmt: skip
_RSA_ALGORITHMS = {h: der.tlv(der.SEQUENCE, der.encode_oid(oid), b"\x05\x00") for h, oid in _RSA_OIDS.items()}
_ECDSA_ALGORITHMS = {h: der.tlv(der.SEQUENCE, der.encode_oid(oid)) for h, oid in _ECDSA_OIDS.items()}
_ED25519_ALGORITHM = der.tlv(der.SEQUENCE, der.encode_oid("1.3.101.112"))
PLACEHOLDER_SKEW = datetime.timedelta(hours=1)
PLACEHOLDER_LIFETIME = datetime.timedelta(days=1)


class UnmimicableCertificate(ValueError):
    """The upstream certificate cannot be read well enough to copy it."""


@dataclass(frozen=True)
class KeyChoice:
    spec: keys.KeySpec
    fell_back: bool  # True when the upstream's key type cannot be mirrored
    # A weak key (RSA below 2048 bits) mirrored with a key made for this mimic alone: never pooled,
    # so that a key nobody should trust is never shared with another upstream's mimic.
    fresh: bool = False
    # The upstream's key when it is stronger than --max-mimic-key: SPEC is then the cap.
    capped_from: keys.KeySpec | None = None


def upstream_key_spec(upstream: x509.Certificate) -> keys.KeySpec | None:
    """The spec of the key a mimic of UPSTREAM gets to mirror its key, weak RSA included; None when
    it cannot be mirrored."""
    try:
        return keys.mirror_spec(upstream.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def choose_key_spec(
    upstream: x509.Certificate, fallback: keys.KeySpec, mirror_weak: bool = True, cap: keys.KeyCap = keys.DEFAULT_CAP
) -> KeyChoice:
    """Same algorithm and strength as the upstream's key, or FALLBACK when it cannot be mirrored, or
    CAP's key of that algorithm when the upstream's is stronger (keys.KeyCap says why).

    Without MIRROR_WEAK a weak key falls back too: a mimic the client refuses for its issuer anyway
    (untrusted, self-signed) gains nothing from a key made for it alone, and an upstream must not
    make bumper generate a key per certificate it makes up."""
    spec = upstream_key_spec(upstream)
    if spec is None or (spec.weak and not mirror_weak):
        return KeyChoice(fallback, True)
    if cap.exceeds(spec):
        return KeyChoice(cap.capped(spec), False, capped_from=spec)
    return KeyChoice(spec, False, fresh=spec.weak)


def signature_hash(upstream: x509.Certificate, ca: CertificateAuthority) -> Hash | None:
    """The upstream's hash when it is SHA-1 or SHA-256/384/512, else SHA-256; Ed25519 CAs take none."""
    if isinstance(ca.key, ed25519.Ed25519PrivateKey):
        return None
    try:
        algorithm = upstream.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):  # unknown or broken signature parameters: ours to choose
        algorithm = None
    return algorithm if isinstance(algorithm, _COPIED_HASHES) else hashes.SHA256()


def mirrored_weaknesses(upstream: x509.Certificate, ca: CertificateAuthority) -> frozenset[str]:
    """The weaknesses of UPSTREAM (trust.MIRRORABLE) that its mimic signed by CA carries: a weak
    RSA key (mirrored with a weak key of its own) and a SHA-1 signature (unless CA is Ed25519)."""
    spec = upstream_key_spec(upstream)
    found = {"weak_key"} if spec is not None and spec.weak else set()
    if isinstance(signature_hash(upstream, ca), hashes.SHA1):
        found.add("weak_signature")
    return frozenset(found)


def mirrors_a_weakness(made: x509.Certificate) -> bool:
    """Whether MADE, a mimic, carries a weak RSA key or a SHA-1 signature (mirrored_weaknesses)."""
    spec = upstream_key_spec(made)
    try:
        sha1 = isinstance(made.signature_hash_algorithm, hashes.SHA1)
    except (ValueError, UnsupportedAlgorithm):
        sha1 = False
    return sha1 or (spec is not None and spec.weak)


def validity(upstream: x509.Certificate, ca: CertificateAuthority) -> tuple[datetime.datetime, datetime.datetime]:
    """The upstream's validity, clamped into the CA's own: a mimic never outlives its issuer."""
    ca_from, ca_until = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    not_before = min(max(upstream.not_valid_before_utc, ca_from), ca_until)
    not_after = max(min(upstream.not_valid_after_utc, ca_until), not_before)
    return not_before, not_after


def readable(upstream: x509.Certificate) -> der.Tbs:
    """What a mimic copies from UPSTREAM, or UnmimicableCertificate saying why it cannot be copied."""
    try:
        return der.parse_tbs(upstream.tbs_certificate_bytes)
    except der.MalformedDER as e:
        raise UnmimicableCertificate(f"malformed certificate: {e}") from None


def copied_extensions(parts: der.Tbs, refit_for: keys.PrivateKey | None = None) -> list[der.RawExtension]:
    """Every upstream extension but the dropped ones, byte for byte, each with its criticality.

    With REFIT_FOR (a key of another type than the upstream's), keyUsage loses the bits that key
    cannot honour; otherwise nothing is re-encoded.
    """
    kept = []
    for ext in parts.extensions:
        if ext.oid in _DROPPED:
            continue
        if ext.oid == _KEY_USAGE and refit_for is not None:
            ext = der.RawExtension(ext.oid, ext.critical, fit_key_usage(key_usage(ext.value), refit_for).public_bytes())
        kept.append(ext)
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
    """The mimic of UPSTREAM for the private KEY (never the CA's key, never the upstream's).

    The TBSCertificate is written here, not by cryptography's builder: the subject and the
    extensions go in as the upstream's own DER, which cryptography could not always read (a name
    attribute of a string type it does not know), and the issuer as the signer's subject DER."""
    parts = readable(upstream)
    try:
        issuer = ca.subject_der
    except der.MalformedDER as e:  # a self-signed mimic's signer is the upstream itself
        raise UnmimicableCertificate(f"malformed issuer: {e}") from None
    public_key = key.public_key()
    # A key of the upstream's algorithm (mirrored, or capped by --max-mimic-key) honours the
    # upstream's keyUsage as it is: only a key of another algorithm needs it refitted.
    upstream_spec, own_spec = upstream_key_spec(upstream), keys.mirror_spec(public_key)
    same_kind = upstream_spec is not None and own_spec is not None and own_spec.algorithm == upstream_spec.algorithm
    copied = copied_extensions(parts, None if same_kind else key)
    extensions = [der.extension(e.oid, e.critical, e.value) for e in copied]
    extensions.append(der.extension(_AKI, False, ca.authority_key_identifier.public_bytes()))
    extensions.append(der.extension(_SKI, False, x509.SubjectKeyIdentifier.from_public_key(public_key).public_bytes()))
    algorithm_hash = signature_hash(upstream, ca)
    algorithm = _algorithm(ca.key, algorithm_hash)
    tbs = der.tbs_certificate(
        x509.random_serial_number(),
        algorithm,
        issuer,
        validity(upstream, ca),
        parts.subject,
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        extensions,
    )
    return x509.load_der_x509_certificate(der.certificate(tbs, algorithm, _sign(ca.key, tbs, algorithm_hash)))


def signed_by(cert: x509.Certificate, signer: x509.Certificate) -> bool:
    """Whether SIGNER issued CERT (names and signature), as a mimic is signed: with SHA-1 too, which
    cryptography's own verify_directly_issued_by no longer accepts."""
    try:
        cert.verify_directly_issued_by(signer)
        return True
    except (TypeError, InvalidSignature):
        return False
    except ValueError:  # a SHA-1 signature, or names cryptography cannot read
        pass
    try:
        if readable(cert).issuer != readable(signer).subject:
            return False
        key = signer.public_key()
        algorithm_hash = cert.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey) and algorithm_hash is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm_hash)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm_hash is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm_hash))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (ValueError, UnsupportedAlgorithm, InvalidSignature):
        return False
    return True


def _algorithm(key: keys.PrivateKey, algorithm_hash: Hash | None) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey) or algorithm_hash is None:
        return _ED25519_ALGORITHM
    table = _RSA_ALGORITHMS if isinstance(key, rsa.RSAPrivateKey) else _ECDSA_ALGORITHMS
    return table[algorithm_hash.name]


def _sign(key: keys.PrivateKey, data: bytes, algorithm_hash: Hash | None) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    assert algorithm_hash is not None
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), algorithm_hash)
    return key.sign(data, ec.ECDSA(algorithm_hash))


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
