"""Minting mimics of certificates bumper did not make up itself: the real-world and hand-crafted
certificates of the cryptography-vectors package, random upstreams drawn by hypothesis, and
deliberately broken encodings.

Every mimic is checked field by field against an oracle written here without bumper.mimic's or
bumper.der's help: the subject (same DER) and SAN (same DER, same criticality) are copied; the
validity is clamped into the CA's (a mimic never outlives its CA); every extension but the dropped
ones is copied in order with its criticality and its very DER, including extensions cryptography
cannot parse, and keyUsage is re-encoded (fitted to the mimic's key) only when the key fell back;
AKI and SKI are bumper's and come last; the issuer is the CA; the serial is fresh, positive and at
most 20 octets; the key mirrors the upstream's type and strength or falls back to P-256; the
signature hash is the upstream's SHA-256/384/512, else SHA-256; the CA's signature verifies.
An upstream is refused with mimic.UnmimicableCertificate naming the reason, never another
exception, exactly when its issuer or subject is not a sound Name (SEQUENCE OF SET OF SEQUENCE
{ OID, any value }: a subject cryptography cannot decode, with an attribute of a string type it does
not know, is copied all the same), its extension list is not sound DER, an extension OID appears
twice, or a keyUsage that must be refitted is not a sound BIT STRING. A weak RSA key (1024 to 2047
bits) is mirrored with one of its size, and a SHA-1 signature with SHA-1.

Mimic keys are made once per key type (mimic_key) and handed to mimic.mint directly.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import random
import string
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cryptography
import cryptography_vectors
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bumper.certs import ca as ca_files
from bumper.certs import keys, mimic
from bumper.certs.ca import CertificateAuthority
from bumper.certs.keypool import PooledKey
from bumper.certs.mimicstore import MimicStore
from tests import pki
from tests.test_mimic import UNKNOWN_OID, key_usage, make_upstream, san, sct_list_extension, spki, upstream_issuer

# Some vectors are deliberately odd (negative serials, NULL signature parameters): cryptography
# warns about them on every access, which is not what these tests are about.
pytestmark = [
    pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning"),  # 8-letter countries
]

UTC = datetime.UTC

# The issue's list, written out again so that a change to bumper's own list shows up here.
DROPPED = frozenset(
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
MIRRORED_RSA_SIZES = (2048, 3072, 4096, 8192)
MIRRORED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MIRRORABLE_SPECS = tuple(
    [keys.KeySpec("rsa", size=n) for n in (*MIRRORED_RSA_SIZES, 1024, 2047)]  # weak ones with keys of their own
    + [keys.KeySpec("ec", curve=c) for c in MIRRORED_CURVES]
    + [keys.KeySpec("ed25519")]
)
UNCAPPED = keys.KeyCap(rsa_bits=max(MIRRORED_RSA_SIZES), curve=MIRRORED_CURVES[-1])
MAX_SERIAL_BITS = 20 * 8 - 1  # 20 content octets of a positive DER INTEGER


@functools.cache
def mimic_key(spec: keys.KeySpec) -> keys.PrivateKey:
    """One mimic key per key type for the whole module (RSA-8192 alone takes seconds to make)."""
    return spec.generate()


# --- raw DER: what the certificate really says, not what cryptography re-encodes --------------


class UnsoundDER(ValueError):
    """The oracle's own verdict: this is not a DER encoding (mimic.mint must refuse it)."""


def _tlv(data: bytes, i: int, limit: int | None = None) -> tuple[int, int, int]:
    """(tag byte, start of contents, end) of the DER element at I, which must end by LIMIT."""
    limit = len(data) if limit is None else limit
    try:
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:  # high tag number form
            while data[i] & 0x80:
                i += 1
            i += 1
        length = data[i]
        i += 1
        if length & 0x80:
            octets = length & 0x7F
            if not 0 < octets <= len(data) - i:
                raise UnsoundDER("bad length octets")
            length = int.from_bytes(data[i : i + octets], "big")
            i += octets
    except IndexError:
        raise UnsoundDER("truncated header") from None
    if i + length > limit:
        raise UnsoundDER("contents run past their enclosing element")
    return tag, i, i + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, contents start, end) of each element between START and END."""
    found = []
    while start < end:
        tag, contents, element_end = _tlv(data, start, end)
        found.append((tag, start, contents, element_end))
        start = element_end
    return found


def _oid(contents: bytes) -> str:
    if not contents or contents[-1] & 0x80:
        raise UnsoundDER("bad OBJECT IDENTIFIER")
    arcs, value = [], 0
    for byte in contents:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


@dataclass(frozen=True)
class RawTbs:
    issuer: bytes  # the whole Name TLV
    subject: bytes
    spki: bytes
    extensions: tuple[tuple[str, bool, bytes], ...]  # (dotted OID, critical, extnValue contents)

    def extension(self, oid: x509.ObjectIdentifier) -> tuple[bool, bytes] | None:
        found = [(critical, value) for dotted, critical, value in self.extensions if dotted == oid.dotted_string]
        assert len(found) <= 1, oid
        return found[0] if found else None


def sound_name(name: bytes) -> None:
    """Raises UnsoundDER unless NAME is SEQUENCE OF SET OF SEQUENCE { OID, one element }."""
    tag, start, end = _tlv(name, 0)
    if tag != 0x30 or end != len(name):
        raise UnsoundDER("a Name is not one SEQUENCE")
    for rdn_tag, _, rdn_start, rdn_end in _children(name, start, end):
        if rdn_tag != 0x31:
            raise UnsoundDER("an RDN is not a SET")
        for attribute_tag, _, attribute_start, attribute_end in _children(name, rdn_start, rdn_end):
            parts = _children(name, attribute_start, attribute_end) if attribute_tag == 0x30 else []
            if len(parts) != 2 or parts[0][0] != 0x06:
                raise UnsoundDER("an attribute is not SEQUENCE { OID, value }")
            _oid(name[parts[0][2] : parts[0][3]])


def signed_by_ca(made: x509.Certificate, ca: CertificateAuthority) -> None:
    """The CA's signature on MADE verifies (SHA-1 too, which verify_directly_issued_by refuses)."""
    assert made.issuer == ca.cert.subject
    public_key = ca.cert.public_key()
    algorithm = made.signature_hash_algorithm
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(made.signature, made.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(made.signature, made.tbs_certificate_bytes, ec.ECDSA(algorithm))
    else:
        made.verify_directly_issued_by(ca.cert)


def raw_tbs(cert: x509.Certificate) -> RawTbs:
    """CERT's TBSCertificate as written. Raises UnsoundDER when its extensions are not a sound
    SEQUENCE OF Extension ::= SEQUENCE { OID, BOOLEAN (one octet) OPTIONAL, OCTET STRING }."""
    tbs = cert.tbs_certificate_bytes
    _, start, end = _tlv(tbs, 0)
    fields = _children(tbs, start, end)
    if fields[0][0] == 0xA0:  # [0] version, absent in v1 certificates
        fields = fields[1:]
    element = lambda n: tbs[fields[n][1] : fields[n][3]]  # noqa: E731
    extensions = []
    for tag, _, contents, field_end in fields[6:]:
        if tag != 0xA3:  # issuerUniqueID / subjectUniqueID
            continue
        seq_tag, seq_start, seq_end = _tlv(tbs, contents, field_end)
        if seq_tag != 0x30 or seq_end != field_end:
            raise UnsoundDER("[3] does not hold exactly one SEQUENCE")
        for ext_tag, _, ext_start, ext_end in _children(tbs, seq_start, seq_end):
            parts = _children(tbs, ext_start, ext_end)
            tags = [part[0] for part in parts]
            if ext_tag != 0x30 or tags not in ([0x06, 0x04], [0x06, 0x01, 0x04]):
                raise UnsoundDER(f"an extension is {ext_tag:#x} of {[hex(t) for t in tags]}")
            if len(parts) == 3 and parts[1][3] - parts[1][2] != 1:
                raise UnsoundDER("critical is not a one-octet BOOLEAN")
            critical = len(parts) == 3 and tbs[parts[1][2] : parts[1][3]] != b"\x00"
            extensions.append((_oid(tbs[parts[0][2] : parts[0][3]]), critical, tbs[parts[-1][2] : parts[-1][3]]))
    return RawTbs(element(2), element(4), element(5), tuple(extensions))


# --- the oracle ---------------------------------------------------------------------------------

KEY_USAGE_BITS = (
    "digital_signature content_commitment key_encipherment data_encipherment key_agreement "
    "key_cert_sign crl_sign encipher_only decipher_only"
).split()
# The keyUsage bits that mean something for each kind of mimic key.
FITTING_BITS = {
    "rsa": {"digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_cert_sign",
            "crl_sign"},
    "ec": {"digital_signature", "content_commitment", "key_agreement", "key_cert_sign", "crl_sign",
           "encipher_only", "decipher_only"},
    "ed25519": {"digital_signature", "content_commitment", "key_cert_sign", "crl_sign"},
}  # fmt: skip
DROPPED_DOTTED = frozenset(oid.dotted_string for oid in DROPPED)
KEY_USAGE = ExtensionOID.KEY_USAGE.dotted_string


def key_kind(key: keys.PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    return "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "ed25519"


def usage_bits(usage: x509.KeyUsage) -> set[str]:
    bits = set()
    for bit in KEY_USAGE_BITS:
        if bit in ("encipher_only", "decipher_only") and not usage.key_agreement:
            continue  # undefined without keyAgreement: cryptography raises on access
        if getattr(usage, bit):
            bits.add(bit)
    return bits


def key_usage_value_bits(value: bytes) -> set[str]:
    """The named bits of a keyUsage extnValue (RFC 5280 4.2.1.3: KeyUsage ::= BIT STRING), read
    strictly: one DER BIT STRING and nothing after it, 0-7 unused bits (none without a content
    octet), all of them zero. Bits past decipherOnly name nothing and are ignored. Raises UnsoundDER."""
    tag, start, end = _tlv(value, 0)
    if tag != 0x03 or end != len(value):
        raise UnsoundDER("keyUsage is not exactly one BIT STRING")
    if end == start:
        raise UnsoundDER("a BIT STRING without its unused-bits octet")
    unused, body = value[start], value[start + 1 : end]
    if unused > 7 or (unused and not body) or (body and body[-1] & ((1 << unused) - 1)):
        raise UnsoundDER(f"{unused} unused bits in {body.hex()!r}")
    return {name for n, name in enumerate(KEY_USAGE_BITS) if n < 8 * len(body) and body[n // 8] & 0x80 >> n % 8}


def expected_usage_bits(upstream_bits: set[str], key: keys.PrivateKey) -> set[str]:
    """For a fallback key only: the upstream's bits less those that do not fit KEY, and
    digitalSignature for every non-RSA key (it signs the handshake)."""
    kind = key_kind(key)
    bits = upstream_bits & FITTING_BITS[kind]
    if kind != "rsa":
        bits.add("digital_signature")
    if "key_agreement" not in bits:
        bits -= {"encipher_only", "decipher_only"}
    return bits


def refitted_key_usage(value: bytes, key: keys.PrivateKey) -> bytes:
    """The extnValue a fallback mimic's keyUsage must carry for the upstream's VALUE."""
    fitted = expected_usage_bits(key_usage_value_bits(value), key)
    return x509.KeyUsage(**{bit: bit in fitted for bit in KEY_USAGE_BITS}).public_bytes()


def expected_key_spec(upstream: x509.Certificate) -> tuple[keys.KeySpec, bool]:
    """(the mimic's key type, whether that is the P-256 fallback)."""
    try:
        public_key = upstream.public_key()
    except Exception:  # an unknown or broken key is as unmirrorable as an exotic one
        return keys.P256, True
    if isinstance(public_key, rsa.RSAPublicKey) and (
        public_key.key_size in MIRRORED_RSA_SIZES or 1024 <= public_key.key_size < 2048
    ):
        return keys.KeySpec("rsa", size=public_key.key_size), False
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in MIRRORED_CURVES:
        return keys.KeySpec("ec", curve=public_key.curve.name), False
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return keys.KeySpec("ed25519"), False
    return keys.P256, True


def expected_hash(upstream: x509.Certificate, ca: CertificateAuthority) -> type[hashes.HashAlgorithm] | None:
    if isinstance(ca.key, ed25519.Ed25519PrivateKey):
        return None
    try:
        algorithm = upstream.signature_hash_algorithm
    except Exception:  # unknown OID or unreadable parameters: the hash is bumper's to choose
        algorithm = None
    copied = hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512
    return type(algorithm) if isinstance(algorithm, copied) else hashes.SHA256


def expected_validity(upstream: x509.Certificate, ca: CertificateAuthority) -> tuple[datetime.datetime, ...]:
    """Both ends clamped into the CA's validity, notAfter never before notBefore: even an upstream
    that starts after the CA expires gets a mimic that ends with the CA."""
    low, high = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    not_before = min(max(upstream.not_valid_before_utc, low), high)
    not_after = min(max(upstream.not_valid_after_utc, not_before), high)
    return not_before, not_after


def unreadable_part(upstream: x509.Certificate) -> str | None:
    """'subject' or 'extension' when cryptography cannot read that part of UPSTREAM (it parses lazily).
    An unreadable extension is no reason to refuse: bumper copies extensions without parsing them."""
    try:
        upstream.subject.public_bytes()
    except Exception:
        return "subject"
    try:
        list(upstream.extensions)
    except Exception:
        return "extension"
    return None


def expected_refusal(upstream: x509.Certificate) -> str | None:
    """What UnmimicableCertificate must say (lower-cased) when mint must refuse UPSTREAM, in the
    order mint finds it, or None when it must be mimicked."""
    try:
        raw = raw_tbs(upstream)
        sound_name(raw.issuer)
        sound_name(raw.subject)
    except UnsoundDER:
        return "malformed certificate"
    extensions = raw.extensions
    refit = expected_key_spec(upstream)[1]
    seen = set()
    for oid, _, value in extensions:
        if oid in seen:
            return f"extension {oid} appears twice"
        seen.add(oid)
        if oid == KEY_USAGE and refit:
            try:
                key_usage_value_bits(value)
            except UnsoundDER:
                return "malformed keyusage"
    return None


def check_mint(upstream: x509.Certificate, ca: CertificateAuthority) -> x509.Certificate | None:
    """Mint UPSTREAM's mimic and check it field by field; None when it is rightly unmimicable."""
    spec, fell_back = expected_key_spec(upstream)
    weak = spec.algorithm == "rsa" and spec.size < 2048  # a key of its own, never the pool's
    # Mirroring itself, under a --max-mimic-key that caps nothing (test_key_cap.py has the cap).
    assert mimic.choose_key_spec(upstream, keys.P256, cap=UNCAPPED) == mimic.KeyChoice(spec, fell_back, fresh=weak)
    key = mimic_key(spec)
    refusal = expected_refusal(upstream)
    if refusal is not None:
        with pytest.raises(mimic.UnmimicableCertificate) as raised:
            mimic.mint(upstream, ca, key)
        assert refusal in str(raised.value).lower(), f"the reason should say {refusal!r}: {raised.value}"
        return None
    made = mimic.mint(upstream, ca, key)
    assert_faithful(upstream, made, ca, key)
    return made


def assert_faithful(
    upstream: x509.Certificate, made: x509.Certificate, ca: CertificateAuthority, key: keys.PrivateKey
) -> None:
    up_raw, made_raw, ca_raw = raw_tbs(upstream), raw_tbs(made), raw_tbs(ca.cert)
    fell_back = expected_key_spec(upstream)[1]

    assert made.version is x509.Version.v3
    # subject: the very same DER (and the same Name, where cryptography can read it)
    assert made_raw.subject == up_raw.subject
    if unreadable_part(upstream) != "subject":
        assert made.subject == upstream.subject
    # issuer: the CA, in the CA's own DER
    assert made_raw.issuer == ca_raw.subject
    # serial: fresh, positive, at most 20 octets
    assert 0 < made.serial_number
    assert made.serial_number.bit_length() <= MAX_SERIAL_BITS
    assert made.serial_number != upstream.serial_number
    # validity: clamped into the CA's
    assert (made.not_valid_before_utc, made.not_valid_after_utc) == expected_validity(upstream, ca)
    assert ca.cert.not_valid_before_utc <= made.not_valid_before_utc <= made.not_valid_after_utc
    assert made.not_valid_after_utc <= ca.cert.not_valid_after_utc
    # key: the one handed to mint, never the upstream's
    assert made_raw.spki == spki(key.public_key())
    assert made_raw.spki != up_raw.spki
    assert keys.mirror_spec(made.public_key()) == expected_key_spec(upstream)[0]

    # extensions: the upstream's in order, less the dropped ones, each with its criticality and its
    # very DER (keyUsage refitted for a fallback key), then bumper's AKI and SKI
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    expected = [
        (oid, critical, refitted_key_usage(value, key) if oid == KEY_USAGE and fell_back else value)
        for oid, critical, value in up_raw.extensions
        if oid not in DROPPED_DOTTED
    ] + [
        (ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string, False,
         x509.AuthorityKeyIdentifier(ca_ski.digest, None, None).public_bytes()),
        (ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string, False,
         x509.SubjectKeyIdentifier.from_public_key(key.public_key()).public_bytes()),
    ]  # fmt: skip
    assert list(made_raw.extensions) == expected
    # what cryptography can read of the upstream's extensions it reads the same in the mimic's
    if unreadable_part(upstream) is None:
        kept = [e for e in upstream.extensions if e.oid not in DROPPED]
        made_extensions = list(made.extensions)
        assert [e.oid for e in made_extensions] == [e.oid for e in kept] + [
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ]
        for original, copy in zip(kept, made_extensions, strict=False):
            assert copy.critical is original.critical, original.oid
            if isinstance(original.value, x509.KeyUsage) and fell_back:
                assert usage_bits(copy.value) <= usage_bits(original.value) | {"digital_signature"}
            else:
                assert copy.value == original.value, original.oid

    # SAN: the same DER with the same criticality, or absent when the upstream has none
    assert made_raw.extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME) == up_raw.extension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME
    )

    # signed by the CA, with the upstream's hash when it is one bumper copies
    expected_algorithm = expected_hash(upstream, ca)
    if expected_algorithm is None:
        assert made.signature_hash_algorithm is None
    else:
        assert type(made.signature_hash_algorithm) is expected_algorithm
    signed_by_ca(made, ca)


def test_bumper_drops_exactly_the_issues_extensions() -> None:
    assert mimic.DROPPED_EXTENSIONS == DROPPED


# --- cryptography-vectors -----------------------------------------------------------------------
#
# Every file under cryptography_vectors/x509 that cryptography loads as one or more certificates
# (PEM bundles or DER): about 530 files from x509/, custom/, custom/ca/, ed25519/, ed448/ and
# PKITS_data/certs/; the whole set mints in a few seconds, so no subset is needed. The rest are CRLs,
# CSRs, OCSP messages, PKCS#12/#7 files, keys, or the certificates in VECTORS_REJECTED_AT_LOAD.

VECTORS_ROOT = Path(cryptography_vectors.__file__).parent / "x509"
# Before CA_CREATED the vectors' notBefore is clamped up, after CA_CREATED + 10 years their notAfter
# down: PKITS (2010-2030) takes both, recent real-world certificates neither.
CA_CREATED = datetime.datetime(2015, 6, 1, tzinfo=UTC)

# Vectors bumper must refuse (UnmimicableCertificate), with what the reason must say.
VECTORS_UNMIMICABLE = {
    "custom/two_basic_constraints.pem": "extension 2.5.29.19 appears twice",
}
# Subjects cryptography cannot read (not UTF-8, a long-form length, an attribute value of an
# application tag), sound DER all the same: bumper copies them byte for byte.
VECTORS_UNREADABLE_SUBJECTS_COPIED = (
    "custom/invalid_utf8_common_name.pem",
    "custom/long-form-name-attribute.pem",
    "custom/name_attribute_unsupported_tag.pem",
)
# Sound extension DER that cryptography cannot parse: bumper copies it without parsing it.
VECTORS_UNPARSABLE_EXTENSIONS_COPIED = (
    "badssl-sct-anonymous-sig.der",  # SCTs: dropped
    "badssl-sct-none-hash.der",
    "custom/cp_invalid.pem",
    "custom/cp_invalid2.der",
    "custom/empty-eku.pem",
    "custom/inhibit_any_policy_negative.pem",
    "custom/invalid-sct-length.der",
    "custom/invalid-sct-version.der",
    "custom/malformed-ian.pem",
    "custom/malformed-san.pem",
    "custom/nc_invalid_ip4_netmask.der",
    "custom/nc_invalid_ip_netmask.pem",
    "custom/nc_ip_invalid_length.pem",
    "san_edipartyname.der",
    "san_x400address.der",
    "wosign-bc-invalid.pem",
)
# cryptography re-encodes CertificatePolicies from its parsed form: a UserNotice's organization
# (IA5String) and explicitText (VisibleString, BMPString) come out as UTF8String. bumper copies the
# upstream's DER instead, so these must come out byte for byte all the same.
VECTORS_POLICY_REENCODED = (
    "PKITS_data/certs/P1anyPolicyMapping1to2CACert.crt",
    "PKITS_data/certs/UserNoticeQualifierTest15EE.crt",
    "PKITS_data/certs/UserNoticeQualifierTest16EE.crt",
    "PKITS_data/certs/UserNoticeQualifierTest17EE.crt",
    "PKITS_data/certs/UserNoticeQualifierTest18EE.crt",
    "PKITS_data/certs/UserNoticeQualifierTest19EE.crt",
    "PKITS_data/certs/ValidPolicyMappingTest12EE.crt",
    "accvraiz1.pem",
    "belgian-eid-invalid-visiblestring.pem",
    "custom/cp_user_notice_no_explicit_text.pem",
    "custom/cp_user_notice_with_explicit_text.pem",
    "custom/cp_user_notice_with_notice_reference.pem",
)
# Certificates cryptography refuses to load at all: they never reach bumper.
VECTORS_REJECTED_AT_LOAD = (
    "badasn1time.pem",  # a malformed UTCTime
    "custom/invalid_version.pem",  # version 4
    "ed25519/ed25519-rfc8410.pem",
    "PKITS_data/certs/DSAParametersInheritedCACert.crt",  # DSA key without its parameters
    "PKITS_data/certs/ValidDSAParameterInheritanceTest5EE.crt",
)


def _load_file(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]


@functools.cache
def vector_certificates() -> dict[str, tuple[x509.Certificate, ...]]:
    """Relative path -> the certificates in that file, for every file that holds any."""
    found = {}
    for path in sorted(VECTORS_ROOT.rglob("*")):
        if not path.is_file():
            continue
        try:
            certs = _load_file(path)
        except Exception:  # CRLs, CSRs, keys, PKCS#12, OCSP, ... and the rejected ones
            continue
        found[path.relative_to(VECTORS_ROOT).as_posix()] = tuple(certs)
    return found


# Vectors on which bumper is known to break the oracle (strict xfail): none at the moment.
VECTOR_BUGS: dict[str, str] = {}


def vector_params(bugs: dict[str, str]) -> list:
    return [
        pytest.param(rel, id=rel, marks=[pytest.mark.xfail(strict=True, reason=bugs[rel])] if rel in bugs else [])
        for rel in vector_certificates()
    ]


@pytest.fixture(scope="module")
def vector_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return ca_files.create(tmp_path_factory.mktemp("vectors") / "ca", now=CA_CREATED)


def test_vectors_match_the_installed_cryptography() -> None:
    # The vectors are released in lockstep with cryptography; the expectations below are for that pair.
    assert cryptography_vectors.__version__.split(".")[0] == cryptography.__version__.split(".")[0], (
        f"cryptography-vectors {cryptography_vectors.__version__} with cryptography {cryptography.__version__}"
    )


def test_vectors_cover_every_directory_and_key_type(vector_ca: CertificateAuthority) -> None:
    vectors = vector_certificates()
    certs = [cert for file_certs in vectors.values() for cert in file_certs]
    assert len(vectors) > 500

    directories = {str(PurePosixPath(rel).parent) for rel in vectors}
    assert directories == {".", "custom", "custom/ca", "ed25519", "ed448", "PKITS_data/certs"}

    mirrored = Counter(str(spec) for spec, fell_back in map(expected_key_spec, certs) if not fell_back)
    assert set(mirrored) == {"RSA-1024", "RSA-2048", "RSA-4096", "EC P-256", "EC P-384", "Ed25519"}
    fallbacks = Counter(
        describe_key(cert) for cert in certs if expected_key_spec(cert)[1]
    )  # RSA-512, DSA, Ed448, GOST, an unknown OID, explicit-curve EC
    assert {"RSA-512", "DSAPublicKey", "Ed448PublicKey", "unreadable"} <= set(fallbacks)

    # The CA's validity cuts the vectors' both ways, and some fall wholly inside it.
    clamped = Counter(
        (
            cert.not_valid_before_utc < vector_ca.cert.not_valid_before_utc,
            cert.not_valid_after_utc > vector_ca.cert.not_valid_after_utc,
        )
        for cert in certs
    )
    assert all(clamped[case] for case in [(True, True), (True, False), (False, True), (False, False)]), clamped

    # Bad extensions of every kind, all sound DER: bumper copies them without parsing them.
    unreadable = {rel for rel, file_certs in vectors.items() if "extension" in map(unreadable_part, file_certs)}
    assert unreadable - set(VECTORS_UNMIMICABLE) == set(VECTORS_UNPARSABLE_EXTENSIONS_COPIED)
    subjects = {rel for rel, file_certs in vectors.items() if "subject" in map(unreadable_part, file_certs)}
    assert subjects == set(VECTORS_UNREADABLE_SUBJECTS_COPIED)
    refused = {
        rel: reason for rel, file_certs in vectors.items() for reason in map(expected_refusal, file_certs) if reason
    }
    assert refused == VECTORS_UNMIMICABLE


def describe_key(cert: x509.Certificate) -> str:
    try:
        return keys.describe(cert.public_key())
    except Exception:
        return "unreadable"


@pytest.mark.parametrize("rel", vector_params(VECTOR_BUGS))
def test_vector_is_mimicked_field_by_field(rel: str, vector_ca: CertificateAuthority) -> None:
    for upstream in vector_certificates()[rel]:
        check_mint(upstream, vector_ca)


@pytest.mark.parametrize("rel", VECTORS_POLICY_REENCODED)
def test_vector_policies_are_ones_cryptography_would_re_encode(rel: str) -> None:
    """What makes these vectors worth copying verbatim: through cryptography they would change."""

    def re_encoded(upstream: x509.Certificate) -> bool:
        policies = upstream.extensions.get_extension_for_class(x509.CertificatePolicies)
        return raw_tbs(upstream).extension(policies.oid) != (policies.critical, policies.value.public_bytes())

    assert any(map(re_encoded, vector_certificates()[rel]))


@pytest.mark.parametrize("rel", vector_params(VECTOR_BUGS))
def test_vector_extension_bytes_are_copied_verbatim(rel: str, vector_ca: CertificateAuthority) -> None:
    """Each copied extension (keyUsage too, unless the key fell back) carries the upstream's DER, also
    where cryptography cannot parse it."""
    for upstream in vector_certificates()[rel]:
        if expected_refusal(upstream) is not None:
            continue
        spec, fell_back = expected_key_spec(upstream)
        made = raw_tbs(mimic.mint(upstream, vector_ca, mimic_key(spec)))
        for oid, critical, value in raw_tbs(upstream).extensions:
            if oid in DROPPED_DOTTED or (oid == KEY_USAGE and fell_back):
                continue
            assert made.extension(x509.ObjectIdentifier(oid)) == (critical, value), oid


@pytest.mark.parametrize("rel", VECTORS_REJECTED_AT_LOAD)
def test_vector_rejected_by_cryptography_never_reaches_bumper(rel: str) -> None:
    assert rel not in vector_certificates()
    with pytest.raises((ValueError, x509.InvalidVersion)):
        _load_file(VECTORS_ROOT / rel)


# --- hypothesis: random upstreams ---------------------------------------------------------------

HYPOTHESIS_CA_TYPES = ("rsa2048", "p384", "ed25519")
CA_LIFETIME_SECONDS = int(ca_files.CA_LIFETIME.total_seconds())
YEAR = 365 * 86400


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertificateAuthority]:
    """bumper CAs of three key types, all made at CA_CREATED."""
    base = tmp_path_factory.mktemp("cas")
    return {
        name: ca_files.create(base / name, now=CA_CREATED, key_spec=keys.KeySpec.parse(name))
        for name in HYPOTHESIS_CA_TYPES
    }


@pytest.fixture(scope="module")
def current_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA made a year ago, so that make_upstream's validity (around now) falls inside it."""
    return ca_files.create(tmp_path_factory.mktemp("current") / "ca", now=pki.NOW - 365 * pki.DAY)


def _fake_rsa_public_key(bits: int) -> rsa.RSAPublicKey:
    """An RSA public key of exactly BITS bits without the cost of finding primes: upstream
    certificates only carry the public half, and nothing here ever uses it."""
    modulus = random.Random(bits).getrandbits(bits) | 1 << bits - 1 | 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


UPSTREAM_KEY_MAKERS: dict[str, Callable[[], object]] = {
    **{f"RSA-{n}": functools.partial(_fake_rsa_public_key, n) for n in (*MIRRORED_RSA_SIZES, 1024, 2047)},
    "EC P-256": lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
    "EC P-384": lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
    "EC P-521": lambda: ec.generate_private_key(ec.SECP521R1()).public_key(),
    "Ed25519": lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
    # unmirrorable: the mimic falls back to P-256
    "RSA-768": functools.partial(_fake_rsa_public_key, 768),
    "RSA-2560": functools.partial(_fake_rsa_public_key, 2560),
    "EC secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()).public_key(),
    "EC secp224r1": lambda: ec.generate_private_key(ec.SECP224R1()).public_key(),
    "Ed448": lambda: ed448.Ed448PrivateKey.generate().public_key(),
}


@functools.cache
def upstream_public_key(label: str) -> object:
    return UPSTREAM_KEY_MAKERS[label]()


class PublicKeyOnly:
    """What make_upstream needs of a key: its public half."""

    def __init__(self, public_key: object) -> None:
        self._public_key = public_key

    def public_key(self) -> object:
        return self._public_key


PRINTABLE = string.ascii_letters + string.digits + " '()+,-./:=?"
TEXT_ATTRIBUTE_OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.STREET_ADDRESS,
    NameOID.POSTAL_CODE,
    NameOID.SERIAL_NUMBER,
    NameOID.TITLE,
    NameOID.GIVEN_NAME,
    NameOID.SURNAME,
    NameOID.BUSINESS_CATEGORY,
    NameOID.ORGANIZATION_IDENTIFIER,
    NameOID.EMAIL_ADDRESS,
    NameOID.DOMAIN_COMPONENT,
    NameOID.USER_ID,
    x509.ObjectIdentifier("1.3.6.1.4.1.55555.7.1"),  # an attribute nobody knows
]

name_attributes = st.one_of(
    st.builds(
        x509.NameAttribute,
        st.sampled_from([NameOID.COUNTRY_NAME, NameOID.JURISDICTION_COUNTRY_NAME]),
        st.text(string.ascii_uppercase, min_size=2, max_size=2),
    ),
    st.builds(x509.NameAttribute, st.sampled_from(TEXT_ATTRIBUTE_OIDS), st.text(PRINTABLE, min_size=1, max_size=40)),
)
relative_names = st.lists(name_attributes, min_size=1, max_size=3, unique_by=lambda a: (a.oid, a.value)).map(
    x509.RelativeDistinguishedName
)
subjects = st.lists(relative_names, max_size=6).map(x509.Name)  # the empty subject included

ldh_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"  # R-LDH labels are for A-labels only
)
a_labels = st.builds(  # IDN labels as certificates carry them: xn--...
    lambda head, accented, tail: (head + accented + tail).encode("idna").decode("ascii"),
    st.text("abcdeknorstz", max_size=6),
    st.sampled_from("äöüéèñçøåłž"),
    st.text("abcdeknorstzäöüéñ", max_size=6),
)
hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(st.one_of(ldh_labels, a_labels), min_size=1, max_size=3),
    st.sampled_from(["test", "example", "com", "xn--p1ai", "co.uk"]),
)
general_names = st.one_of(
    hostnames.map(x509.DNSName),
    hostnames.map(lambda host: x509.DNSName("*." + host)),
    st.ip_addresses(v=4).map(x509.IPAddress),
    st.ip_addresses(v=6).map(x509.IPAddress),
    st.builds(
        lambda host, port, path: x509.UniformResourceIdentifier(f"https://{host}{port}/{path}"),
        hostnames,
        st.sampled_from(["", ":8443"]),
        st.text(string.ascii_lowercase + string.digits + "-._~/", max_size=12),
    ),
    st.builds(
        lambda local, host: x509.RFC822Name(f"{local}@{host}"),
        st.text(string.ascii_lowercase + string.digits + ".+_-", min_size=1, max_size=12).filter(
            lambda local: not local.startswith(".") and not local.endswith(".") and ".." not in local
        ),
        hostnames,
    ),
)
san_sets = st.tuples(st.lists(general_names, min_size=1, max_size=8, unique=True), st.booleans()) | st.none()


@st.composite
def key_usages(draw: st.DrawFn) -> tuple[x509.KeyUsage, bool]:
    flags = {bit: draw(st.booleans()) for bit in KEY_USAGE_BITS if bit not in ("encipher_only", "decipher_only")}
    both = draw(st.sampled_from([(False, False), (True, False), (False, True)]))
    if flags["key_agreement"]:
        flags["encipher_only"], flags["decipher_only"] = both
    return key_usage(critical=draw(st.booleans()), **flags)


def _dropped_extensions() -> list[tuple[x509.ExtensionType, bool]]:
    uri = x509.UniformResourceIdentifier
    crl = x509.DistributionPoint([uri("http://crl.test/ca.crl")], None, None, None)
    sct = sct_list_extension()
    ocsp = x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP, uri("http://ocsp.test/"))
    return [
        (x509.AuthorityInformationAccess([ocsp]), False),
        (x509.CRLDistributionPoints([crl]), False),
        (x509.FreshestCRL([crl]), False),
        (sct, False),
        (x509.UnrecognizedExtension(ExtensionOID.SIGNED_CERTIFICATE_TIMESTAMPS, sct.value), False),
        (x509.PrecertPoison(), True),
        (x509.TLSFeature([x509.TLSFeatureType.status_request]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(upstream_issuer().key.public_key()), False),
        (x509.SubjectKeyIdentifier(b"\x01" * 20), False),
    ]


def _der(tag: int, *contents: bytes) -> bytes:
    body = b"".join(contents)
    assert len(body) < 0x80
    return bytes([tag, len(body)]) + body


# A UserNotice as CAs write it (IA5String organization, VisibleString explicitText), which
# cryptography would re-encode as UTF8String: only a byte-for-byte copy keeps it.
POLICIES_AS_CAS_WRITE_THEM = x509.UnrecognizedExtension(
    ExtensionOID.CERTIFICATE_POLICIES,
    _der(0x30, _der(0x30, _der(0x06, bytes.fromhex("6781 0c01 0201")), _der(0x30, _der(
        0x30,
        _der(0x06, bytes.fromhex("2b06 0105 0507 0202")),  # id-qt-unotice
        _der(0x30, _der(0x30, _der(0x16, b"Example CA"), _der(0x30, _der(0x02, b"\x01"))),
             _der(0x1A, b"Relying party terms")),
    )))),
)  # fmt: skip
KEPT_EXTENSIONS: list[x509.ExtensionType] = [
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    x509.BasicConstraints(ca=False, path_length=None),
    x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.2.1"), None)]),
    POLICIES_AS_CAS_WRITE_THEM,
    x509.UnrecognizedExtension(UNKNOWN_OID, b"\x0c\x05hello"),
]


@dataclass(frozen=True)
class Upstream:
    subject: x509.Name
    san: tuple[list[x509.GeneralName], bool] | None
    key_label: str
    extensions: list[tuple[x509.ExtensionType, bool]]
    signature_hash: hashes.HashAlgorithm
    not_before: datetime.datetime
    not_after: datetime.datetime

    def build(self) -> x509.Certificate:
        return make_upstream(
            *self.extensions,
            subject=self.subject,
            key=PublicKeyOnly(upstream_public_key(self.key_label)),  # type: ignore[arg-type]
            signature_hash=self.signature_hash,
            not_before=self.not_before,
            not_after=self.not_after,
        )


def ca_window() -> tuple[datetime.datetime, datetime.datetime]:
    """The validity every CA made at CA_CREATED has."""
    return CA_CREATED - ca_files.CLOCK_SKEW, CA_CREATED + ca_files.CA_LIFETIME


@st.composite
def validity_windows(draw: st.DrawFn) -> tuple[datetime.datetime, datetime.datetime]:
    """Upstream validities placed every way relative to the CA's."""
    low, high = ca_window()

    def seconds(least: int, most: int) -> datetime.timedelta:
        return datetime.timedelta(seconds=draw(st.integers(least, most)))

    where = draw(st.sampled_from(["inside", "starts before", "ends after", "spans", "wholly before", "wholly after"]))
    event(f"validity {where} the CA's")
    if where == "inside":
        not_before = low + seconds(0, CA_LIFETIME_SECONDS - 1)
        return not_before, not_before + seconds(1, int((high - not_before).total_seconds()))
    if where == "starts before":
        return low - seconds(1, 20 * YEAR), low + seconds(0, CA_LIFETIME_SECONDS)
    if where == "ends after":
        return low + seconds(0, CA_LIFETIME_SECONDS), high + seconds(1, 20 * YEAR)
    if where == "spans":
        return low - seconds(1, 20 * YEAR), high + seconds(1, 20 * YEAR)
    if where == "wholly after":
        not_before = high + seconds(1, 5 * YEAR)
        return not_before, not_before + seconds(1, 10 * YEAR)
    not_after = low - seconds(1, 5 * YEAR)
    return not_after - seconds(1, 10 * YEAR), not_after


@st.composite
def upstreams(draw: st.DrawFn, key_labels: list[str]) -> Upstream:
    not_before, not_after = draw(validity_windows())
    subject = draw(subjects)
    alt_names = draw(san_sets)
    extensions = [
        *([] if alt_names is None else [san(*alt_names[0], critical=alt_names[1])]),
        *draw(st.lists(key_usages(), max_size=1)),
        *[
            (ext, draw(st.booleans()))
            for ext in draw(st.lists(st.sampled_from(KEPT_EXTENSIONS), unique_by=lambda e: e.oid))
        ],
        *draw(st.lists(st.sampled_from(_dropped_extensions()), unique_by=lambda e: e[0].oid)),
    ]
    return Upstream(
        subject=subject,
        san=alt_names,
        key_label=draw(st.sampled_from(key_labels)),
        extensions=draw(st.permutations(extensions)),
        signature_hash=draw(
            st.sampled_from([hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA224(), hashes.SHA1()])
        ),
        not_before=not_before,
        not_after=not_after,
    )


def describe_case(case: Upstream, ca: CertificateAuthority) -> None:
    """What the example covers, for --hypothesis-show-statistics."""
    event(f"key {case.key_label}, CA {keys.describe(ca.key.public_key())}")
    event("empty subject" if len(case.subject) == 0 else f"subject of {len(case.subject.rdns)} RDNs")
    if case.san is None:
        event("no SAN")
    else:
        event(f"SAN critical={case.san[1]}")
        for name in case.san[0]:
            value = str(name.value)
            kind = type(name).__name__ + (" wildcard" if value.startswith("*.") else "")
            event(kind + (" IDN" if "xn--" in value else ""))


MIRRORABLE_BY_LABEL = {str(spec): spec for spec in MIRRORABLE_SPECS}
MIRRORABLE_LABELS = list(MIRRORABLE_BY_LABEL)
assert set(MIRRORABLE_LABELS) < set(UPSTREAM_KEY_MAKERS)
HYPOTHESIS_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(HYPOTHESIS_SETTINGS, max_examples=200)
@given(case=upstreams(MIRRORABLE_LABELS), ca_type=st.sampled_from(HYPOTHESIS_CA_TYPES))
def test_random_upstream_is_mimicked_field_by_field(
    cas: dict[str, CertificateAuthority], case: Upstream, ca_type: str
) -> None:
    upstream = case.build()
    describe_case(case, cas[ca_type])

    made = check_mint(upstream, cas[ca_type])

    assert made is not None
    assert made.subject.public_bytes() == case.subject.public_bytes()
    assert keys.mirror_spec(made.public_key()) == MIRRORABLE_BY_LABEL[case.key_label]
    if case.san is None:
        with pytest.raises(x509.ExtensionNotFound):
            made.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    else:
        names, critical = case.san
        copy = made.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert list(copy.value) == names
        assert copy.critical is critical


@settings(HYPOTHESIS_SETTINGS, max_examples=40)
@given(case=upstreams([label for label in UPSTREAM_KEY_MAKERS if label not in MIRRORABLE_LABELS]))
def test_random_upstream_with_an_unmirrorable_key_falls_back_to_p256(
    cas: dict[str, CertificateAuthority], case: Upstream
) -> None:
    upstream = case.build()
    describe_case(case, cas["rsa2048"])

    made = check_mint(upstream, cas["rsa2048"])

    assert made is not None
    assert keys.KeySpec.of(made.public_key()) == keys.P256
    assert mimic.choose_key_spec(upstream, keys.P256).fell_back is True


def test_upstream_starting_after_the_ca_expires(cas: dict[str, CertificateAuthority]) -> None:
    ca = cas["rsa2048"]
    ca_not_after = ca.cert.not_valid_after_utc
    upstream = make_upstream(not_before=ca_not_after + 10 * pki.DAY, not_after=ca_not_after + 100 * pki.DAY)

    made = check_mint(upstream, ca)

    assert made is not None
    assert made.not_valid_before_utc == made.not_valid_after_utc == ca_not_after  # never outlives its issuer


@pytest.mark.parametrize(
    ("label", "flags"),
    [
        pytest.param("EC P-256", dict(key_agreement=True), id="EC-keyAgreement-only-not-widened"),
        pytest.param("RSA-2048", dict(key_agreement=True, key_encipherment=True), id="RSA-keyAgreement-kept"),
        pytest.param("Ed25519", dict(key_encipherment=True, data_encipherment=True), id="Ed25519-odd-bits-kept"),
        pytest.param(
            "EC P-384", dict(key_agreement=True, decipher_only=True, crl_sign=True), id="EC-decipherOnly-kept"
        ),
    ],
)
def test_key_usage_of_a_mirrored_key_is_copied_as_it_is(
    current_ca: CertificateAuthority, label: str, flags: dict[str, bool]
) -> None:
    upstream = make_upstream(key_usage(**flags), key=PublicKeyOnly(upstream_public_key(label)))  # type: ignore[arg-type]
    assert expected_key_spec(upstream) == (MIRRORABLE_BY_LABEL[label], False)

    made = check_mint(upstream, current_ca)

    assert made is not None
    assert raw_tbs(made).extension(ExtensionOID.KEY_USAGE) == raw_tbs(upstream).extension(ExtensionOID.KEY_USAGE)
    assert made.extensions.get_extension_for_class(x509.KeyUsage).value == key_usage(**flags)[0]


# --- broken encodings ---------------------------------------------------------------------------
#
# Each corruption yields a certificate cryptography loads (it parses lazily; the extension list
# itself it checks at load, see LOAD_TIME_CORRUPTIONS) but cannot fully read, or one bumper must
# refuse. check_mint's oracle knows what follows: an unsound Name, an extension OID that
# appears twice, or a malformed keyUsage that must be refitted (fallback key) gives
# UnmimicableCertificate naming it; any other extension, whatever its bytes, is copied verbatim;
# an unreadable key falls back to P-256; an unreadable signature algorithm leaves the hash to
# bumper (SHA-256). Each corruption also says what it expects, to keep the oracle honest.

SAN_OID = ExtensionOID.SUBJECT_ALTERNATIVE_NAME
DER = serialization.Encoding.DER


def raw_extension(oid: x509.ObjectIdentifier, value: bytes, critical: bool = False) -> tuple[x509.ExtensionType, bool]:
    """An extension whose value bytes are exactly VALUE, whatever the OID says they should be."""
    return x509.UnrecognizedExtension(oid, value), critical


def swap_once(der: bytes, old: bytes, new: bytes) -> x509.Certificate:
    """DER with the one occurrence of OLD replaced by NEW (same length: no lengths to fix; the
    signature no longer verifies, which minting never checks)."""
    assert len(old) == len(new) and der.count(old) == 1, (old, der.count(old))
    return x509.load_der_x509_certificate(der.replace(old, new))


def duplicate_san() -> x509.Certificate:
    placeholder = x509.ObjectIdentifier("2.5.29.99")  # encodes as long as 2.5.29.17
    second = x509.SubjectAlternativeName([x509.DNSName("b.test")]).public_bytes()
    der = make_upstream(san(x509.DNSName("a.test")), raw_extension(placeholder, second)).public_bytes(DER)
    return swap_once(der, b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")


def duplicate_aia() -> x509.Certificate:
    """Two AIA extensions: one bumper would drop anyway, but a certificate that repeats one is not
    one to copy (RFC 5280 4.2)."""
    placeholder = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.99")  # encodes as long as id-pe-authorityInfoAccess
    uri = x509.UniformResourceIdentifier
    aia = [x509.AccessDescription(x509.AuthorityInformationAccessOID.OCSP, uri(f"http://ocsp{n}.test/")) for n in "12"]
    der = make_upstream(
        (x509.AuthorityInformationAccess([aia[0]]), False),
        raw_extension(placeholder, x509.AuthorityInformationAccess([aia[1]]).public_bytes()),
    ).public_bytes(DER)
    return swap_once(der, b"\x06\x08\x2b\x06\x01\x05\x05\x07\x01\x63", b"\x06\x08\x2b\x06\x01\x05\x05\x07\x01\x01")


def unmirrorable(*extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
    """An upstream whose key (RSA-768) the mimic cannot mirror, so that its keyUsage is refitted."""
    return make_upstream(*extensions, key=PublicKeyOnly(upstream_public_key("RSA-768")))  # type: ignore[arg-type]


def fallback_key_usage(value: bytes) -> Callable[[], x509.Certificate]:
    return lambda: unmirrorable(raw_extension(ExtensionOID.KEY_USAGE, value, critical=True))


def unknown_key_algorithm() -> x509.Certificate:
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
    return swap_once(make_upstream().public_bytes(DER), rsa_encryption, rsa_encryption[:-1] + b"\x7f")


def ec_point(mangle: Callable[[bytes], bytes]) -> Callable[[], x509.Certificate]:
    def make() -> x509.Certificate:
        public_key = upstream_public_key("EC P-256")
        point = public_key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        der = make_upstream(key=PublicKeyOnly(public_key)).public_bytes(DER)  # type: ignore[arg-type]
        return swap_once(der, point, mangle(point))

    return make


def unknown_signature_algorithm() -> x509.Certificate:
    sha256_with_rsa = bytes.fromhex("06092a864886f70d01010b")  # in the TBS and outside it
    der = make_upstream().public_bytes(DER)
    assert der.count(sha256_with_rsa) == 2
    return x509.load_der_x509_certificate(der.replace(sha256_with_rsa, sha256_with_rsa[:-1] + b"\x7f"))


def broken_subject() -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zzbrokenzz")])
    der = make_upstream(subject=subject).public_bytes(DER)
    return swap_once(der, b"zzbrokenzz", b"zz\xff\xfeokenzz")  # not UTF-8


def broken_subject_and_key() -> x509.Certificate:
    der = broken_subject().public_bytes(DER)
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    return swap_once(der, rsa_encryption, rsa_encryption[:-1] + b"\x7f")


@dataclass(frozen=True)
class Corruption:
    make: Callable[[], x509.Certificate]
    breaks: str  # what cryptography cannot read: "extension", "subject", "key", "signature algorithm" or "nothing"
    refused: str | None = None  # what UnmimicableCertificate must say, None when it must be mimicked
    # What MimicStore.get says besides: OpenSSL, which serves the mimic, cannot load what mint copied.
    # (An upstream never gets that far: its own handshake fails on the same bytes.)
    openssl_refuses: str | None = None


MALFORMED_KEY_USAGE = "malformed keyusage"
CORRUPTIONS = {
    # sound extension DER that cryptography cannot parse: copied verbatim
    "SAN-not-DER": Corruption(lambda: make_upstream(raw_extension(SAN_OID, b"garbage")), "extension"),
    "SAN-truncated": Corruption(lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x10\x82\x03abc")), "extension"),
    "SAN-trailing-bytes": Corruption(
        lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x05\x82\x03abc\x00\x00")), "extension"
    ),
    "SAN-empty-value": Corruption(lambda: make_upstream(raw_extension(SAN_OID, b"")), "extension"),
    "SAN-IP-of-5-octets": Corruption(
        lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x07\x87\x05\x0a\x00\x00\x01\x00")), "extension"
    ),
    "SAN-dNSName-not-IA5": Corruption(
        lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x05\x82\x03a\xffb", critical=True)), "extension"
    ),
    "SAN-x400Address": Corruption(
        lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x04\xa3\x02\x30\x00")), "extension"
    ),
    "SAN-ediPartyName": Corruption(
        lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x04\xa5\x02\x30\x00")), "extension"
    ),
    "keyUsage-9-unused-bits": Corruption(  # a mirrored key: keyUsage is copied, not read
        lambda: make_upstream(raw_extension(ExtensionOID.KEY_USAGE, b"\x03\x02\x09\x80", critical=True)), "extension"
    ),
    "basicConstraints-pathLen-without-CA": Corruption(
        lambda: make_upstream(raw_extension(ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x02\x01\x00")), "extension"
    ),
    "extendedKeyUsage-empty": Corruption(
        lambda: make_upstream(raw_extension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x30\x00")), "extension"
    ),
    # bumper drops it without reading it, though cryptography reads all extensions or none
    "AIA-not-DER": Corruption(
        lambda: make_upstream(raw_extension(ExtensionOID.AUTHORITY_INFORMATION_ACCESS, b"\x01")), "extension"
    ),
    "unknown-critical-extension-not-DER": Corruption(
        lambda: make_upstream(raw_extension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.9"), b"\xff\x00", True)),
        "nothing",
    ),
    "SAN-empty-sequence": Corruption(lambda: make_upstream(raw_extension(SAN_OID, b"\x30\x00")), "nothing"),
    # an extension OID twice: refused, whether bumper would copy or drop it
    "SAN-duplicated": Corruption(duplicate_san, "extension", "extension 2.5.29.17 appears twice"),
    "AIA-duplicated": Corruption(duplicate_aia, "extension", "extension 1.3.6.1.5.5.7.1.1 appears twice"),
    # keyUsage of a fallback key: refitted, so it must be a sound BIT STRING
    "keyUsage-refitted-for-a-fallback-key": Corruption(
        lambda: unmirrorable(key_usage(key_encipherment=True, key_agreement=True, encipher_only=True)), "nothing"
    ),
    "keyUsage-empty-BIT-STRING-fallback-key": Corruption(fallback_key_usage(b"\x03\x01\x00"), "nothing"),
    "keyUsage-not-a-BIT-STRING-fallback-key": Corruption(
        fallback_key_usage(b"\x04\x02\x07\x80"), "extension", MALFORMED_KEY_USAGE
    ),
    "keyUsage-no-unused-bits-octet-fallback-key": Corruption(
        fallback_key_usage(b"\x03\x00"), "extension", MALFORMED_KEY_USAGE
    ),
    "keyUsage-truncated-fallback-key": Corruption(
        fallback_key_usage(b"\x03\x05\x00\x80"), "extension", MALFORMED_KEY_USAGE
    ),
    "keyUsage-9-unused-bits-fallback-key": Corruption(
        fallback_key_usage(b"\x03\x02\x09\x80"), "extension", MALFORMED_KEY_USAGE
    ),
    "keyUsage-trailing-bytes-fallback-key": Corruption(
        fallback_key_usage(b"\x03\x02\x07\x80\x00"), "extension", MALFORMED_KEY_USAGE
    ),
    "keyUsage-padding-bit-set-fallback-key": Corruption(  # digitalSignature, and keyCertSign in the padding
        fallback_key_usage(b"\x03\x02\x03\x84"), "extension", MALFORMED_KEY_USAGE
    ),
    # the subject
    # sound DER: copied byte for byte
    "subject-not-UTF-8": Corruption(broken_subject, "subject", openssl_refuses="invalid utf8string"),
    "subject-not-UTF-8-and-unknown-key": Corruption(
        broken_subject_and_key, "subject", openssl_refuses="invalid utf8string"
    ),
    # the key and the signature algorithm: bumper's to choose
    "key-algorithm-unknown": Corruption(unknown_key_algorithm, "key"),
    "EC-point-all-zero": Corruption(ec_point(lambda p: b"\x04" + bytes(len(p) - 1)), "key"),
    "EC-point-off-the-curve": Corruption(ec_point(lambda p: p[:-1] + bytes([p[-1] ^ 1])), "key"),
    "signature-algorithm-unknown": Corruption(unknown_signature_algorithm, "signature algorithm"),
}
# Corruptions on which bumper is known to break the oracle (strict xfail): none at the moment.
# MimicStore.get must give exactly mint's outcome.
CORRUPTION_BUGS: dict[str, str] = {}


def corruption_params(bugs: dict[str, str]) -> list:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=bugs[name])] if name in bugs else [])
        for name in CORRUPTIONS
    ]


def assert_breaks(upstream: x509.Certificate, corruption: Corruption) -> None:
    """The corruption loads, breaks what it says it breaks and nothing else, and the oracle agrees
    on whether bumper must refuse it."""
    part = unreadable_part(upstream)
    assert part == (corruption.breaks if corruption.breaks in ("subject", "extension") else None)
    if corruption.breaks == "key":
        with pytest.raises((ValueError, UnsupportedAlgorithm)):
            upstream.public_key()
    if corruption.breaks == "signature algorithm":
        with pytest.raises(UnsupportedAlgorithm):
            upstream.signature_hash_algorithm  # noqa: B018
    assert expected_refusal(upstream) == corruption.refused


@pytest.mark.parametrize("name", corruption_params(CORRUPTION_BUGS))
def test_broken_upstream_is_unmimicable_or_mimicked(name: str, current_ca: CertificateAuthority) -> None:
    corruption = CORRUPTIONS[name]
    upstream = corruption.make()
    assert_breaks(upstream, corruption)

    made = check_mint(upstream, current_ca)

    assert (made is None) == (corruption.refused is not None)
    if corruption.breaks == "key":
        assert mimic.choose_key_spec(upstream, keys.P256) == mimic.KeyChoice(keys.P256, fell_back=True)
    if corruption.breaks == "signature algorithm":
        assert isinstance(made.signature_hash_algorithm, hashes.SHA256)  # type: ignore[union-attr]


class PrebuiltKeys:
    """A KeyPool stand-in that hands out the module's keys (no worker processes)."""

    async def key_for(self, spec: keys.KeySpec) -> PooledKey:
        return PooledKey.of(mimic_key(spec))

    def warm(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", corruption_params(CORRUPTION_BUGS))
def test_store_gives_broken_upstreams_a_reason_never_a_crash(
    name: str, current_ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    """MimicStore.get gives exactly what mint gives: the same mimic or the same refusal."""
    upstream = CORRUPTIONS[name].make()
    refusal = expected_refusal(upstream) or CORRUPTIONS[name].openssl_refuses
    store = MimicStore(current_ca, pool=PrebuiltKeys())  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="bumper.mimic")

    try:
        made = asyncio.run(store.get(upstream))
    except mimic.UnmimicableCertificate as e:
        assert refusal is not None, e
        assert refusal in str(e).lower()
    else:
        assert refusal is None
        assert_faithful(upstream, made.cert, current_ca, made.key)
    if expected_key_spec(upstream)[1]:
        assert "cannot be mirrored" in caplog.text
        assert upstream.fingerprint(hashes.SHA256()).hex(":").upper() in caplog.text  # not the subject


def _clobber_not_before(cert: x509.Certificate) -> bytes:
    """CERT's DER with letters where the year of its notBefore (a UTCTime) should be."""
    utc_time = b"\x17\x0d" + cert.not_valid_before_utc.strftime("%y%m%d%H%M%SZ").encode()
    der = cert.public_bytes(DER)
    assert der.count(utc_time) == 1
    return der.replace(utc_time, utc_time[:2] + b"xx" + utc_time[4:])


def _swap(cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
    der = cert.public_bytes(DER)
    assert der.count(old) == 1, old
    return der.replace(old, new)


# The extension list itself is checked at load: unsound extension DER (mimic's "malformed
# extensions") never reaches bumper from a loaded certificate. The base certificate carries one
# critical extension 1.3.6.1.4.1.55555.9 whose extnValue is AA BB.
LOAD_TIME_CORRUPTIONS: dict[str, Callable[[x509.Certificate], bytes]] = {
    "truncated": lambda cert: cert.public_bytes(DER)[:-10],
    "trailing-garbage": lambda cert: cert.public_bytes(DER) + b"\x00",
    "version-4": lambda cert: cert.public_bytes(DER).replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03", 1),
    "UTCTime-not-a-time": _clobber_not_before,
    "outer-SEQUENCE-tag-wrong": lambda cert: b"\x31" + cert.public_bytes(DER)[1:],
    "extnValue-not-an-OCTET-STRING": lambda cert: _swap(cert, b"\x04\x02\xaa\xbb", b"\x05\x02\xaa\xbb"),
    "extnValue-longer-than-its-extension": lambda cert: _swap(cert, b"\x04\x02\xaa\xbb", b"\x04\x03\xaa\xbb"),
    "critical-FALSE-spelled-out": lambda cert: _swap(cert, b"\x01\x01\xff\x04\x02", b"\x01\x01\x00\x04\x02"),
    "critical-not-a-BOOLEAN": lambda cert: _swap(cert, b"\x01\x01\xff\x04\x02", b"\x02\x01\xff\x04\x02"),
}


@pytest.mark.parametrize("corrupt", LOAD_TIME_CORRUPTIONS.values(), ids=LOAD_TIME_CORRUPTIONS.keys())
def test_corruptions_cryptography_rejects_at_load_never_reach_bumper(
    corrupt: Callable[[x509.Certificate], bytes],
) -> None:
    with pytest.raises((ValueError, x509.InvalidVersion)):
        x509.load_der_x509_certificate(
            corrupt(make_upstream(raw_extension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.9"), b"\xaa\xbb", True)))
        )
