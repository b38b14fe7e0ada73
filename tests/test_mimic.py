"""Unit tests of minting mimics (bumper.mimic, bumper.mimicstore, bumper.keys): no sockets.

Upstream certificates are built here with cryptography, issued by a tests/pki.py root; the
mimicking CA is a real bumper CA made by bumper.ca.create in a temporary directory.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, ExtensionOID, NameOID

from bumper.certs import ca as ca_files
from bumper.certs import keys, mimic, trust
from bumper.certs.ca import CertificateAuthority
from bumper.certs.mimicstore import Mimic, MimicStore
from tests import pki

DAY = pki.DAY
ExtensionSpec = tuple[x509.ExtensionType, bool]  # (value, critical)
UpstreamKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey


# --- building upstream certificates -------------------------------------------------------------


@functools.cache
def upstream_issuer() -> pki.Authority:
    """The (real-world) CA that issued the upstream certificates: never bumper's."""
    return pki.Authority.root("upstream issuing CA")


@functools.cache
def default_upstream_key() -> rsa.RSAPrivateKey:
    return pki.rsa_key(2048)


def make_upstream(
    *extensions: ExtensionSpec,
    subject: x509.Name | None = None,
    key: UpstreamKey | None = None,
    signature_hash: hashes.HashAlgorithm | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    """An upstream leaf carrying exactly EXTENSIONS (no defaults), issued by upstream_issuer() with SHA-256
    unless SIGNATURE_HASH says otherwise."""
    issuer = upstream_issuer()
    key = key or default_upstream_key()
    signature_hash = signature_hash or hashes.SHA256()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else pki.name("upstream.test"))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or pki.NOW - DAY)
        .not_valid_after(not_after or pki.NOW + 90 * DAY)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    if isinstance(signature_hash, hashes.SHA1):
        return pki.resigned_with_sha1(builder.sign(issuer.key, hashes.SHA256()), issuer)  # type: ignore[arg-type]
    return builder.sign(issuer.key, signature_hash)  # type: ignore[arg-type]


def san(*names: x509.GeneralName, critical: bool = False) -> ExtensionSpec:
    return x509.SubjectAlternativeName(list(names)), critical


def key_usage(critical: bool = True, **flags: bool) -> ExtensionSpec:
    fields = (
        "digital_signature content_commitment key_encipherment data_encipherment key_agreement "
        "key_cert_sign crl_sign encipher_only decipher_only"
    ).split()
    return x509.KeyUsage(**{f: flags.get(f, False) for f in fields}), critical


def sct_list_extension() -> x509.UnrecognizedExtension:
    """A well-formed embedded SCT list (one SCT), as a CT-logged certificate carries."""
    sct = (
        b"\x00"  # v1
        + bytes(range(32))  # log id
        + struct.pack(">Q", 1_700_000_000_000)  # timestamp
        + b"\x00\x00"  # no extensions
        + b"\x04\x03"  # sha256, ecdsa
        + struct.pack(">H", 8)
        + b"\x30\x06\x02\x01\x01\x02\x01\x01"  # signature
    )
    entries = struct.pack(">H", len(sct)) + sct
    tls_list = struct.pack(">H", len(entries)) + entries
    return x509.UnrecognizedExtension(
        ExtensionOID.PRECERT_SIGNED_CERTIFICATE_TIMESTAMPS, b"\x04" + bytes([len(tls_list)]) + tls_list
    )


def spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension:
    return cert.extensions.get_extension_for_oid(oid)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """bumper's CA, made a year ago so that upstream validities fall well inside its own."""
    return ca_files.create(tmp_path_factory.mktemp("mimic") / "ca", now=pki.NOW - 365 * DAY)


class SyncStore:
    """A MimicStore driven from synchronous tests, on the test's one event loop."""

    def __init__(self, store: SyncStore, runner: asyncio.Runner) -> None:
        self.store, self.runner = store, runner

    @property
    def ca(self) -> CertificateAuthority:
        return self.store.ca

    def get(self, upstream: x509.Certificate, mode: trust.Signing = trust.Signing.CA) -> Mimic:
        return self.runner.run(self.store.get(upstream, mode))


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture
def store(authority: CertificateAuthority, runner: asyncio.Runner) -> SyncStore:
    return SyncStore(MimicStore(authority), runner)


@pytest.fixture(scope="module")
def mimic_key() -> ec.EllipticCurvePrivateKey:
    return pki.ec_key()


# --- subject and names --------------------------------------------------------------------------

FULL_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Berlin"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Berlin"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example GmbH"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Web Ops"),
        x509.NameAttribute(NameOID.COMMON_NAME, "www.example.test"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "HRB 12345"),
    ]
)
MULTI_VALUED_RDN = x509.Name(
    [
        x509.RelativeDistinguishedName(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                x509.NameAttribute(NameOID.COMMON_NAME, "multi.example.test"),
            ]
        )
    ]
)


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(pki.name("upstream.test"), id="O-CN"),
        pytest.param(FULL_SUBJECT, id="C-ST-L-O-OU-CN-serialNumber"),
        pytest.param(MULTI_VALUED_RDN, id="multi-valued-RDN"),
        pytest.param(x509.Name([]), id="empty"),
    ],
)
def test_subject_is_copied_exactly(store: SyncStore, subject: x509.Name) -> None:
    upstream = make_upstream(san(x509.DNSName("upstream.test"), critical=len(subject) == 0), subject=subject)

    made = store.get(upstream).cert

    assert made.subject.public_bytes() == upstream.subject.public_bytes()
    assert made.subject.public_bytes() == subject.public_bytes()


ALL_NAME_KINDS = (
    x509.DNSName("upstream.test"),
    x509.DNSName("*.upstream.test"),
    x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
    x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
    x509.UniformResourceIdentifier("https://upstream.test/"),
    x509.RFC822Name("admin@upstream.test"),
)


@pytest.mark.parametrize("critical", [False, True], ids=["non-critical", "critical"])
@pytest.mark.parametrize(
    "names",
    [
        pytest.param(ALL_NAME_KINDS, id="dns-wildcard-ipv4-ipv6-uri-email"),
        pytest.param((x509.IPAddress(ipaddress.ip_address("127.0.0.1")),), id="single-ip"),
    ],
)
def test_san_is_copied_exactly(store: SyncStore, names: tuple[x509.GeneralName, ...], critical: bool) -> None:
    upstream = make_upstream(san(*names, critical=critical))

    copied = extension(store.get(upstream).cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    original = extension(upstream, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)

    assert copied.critical is critical
    assert copied.value.public_bytes() == original.value.public_bytes()
    assert list(copied.value) == list(names)  # same names, same order, none added


def test_no_names_are_added_when_the_upstream_has_no_san(store: SyncStore) -> None:
    upstream = make_upstream(subject=pki.name("cn-only.upstream.test"))

    made = store.get(upstream).cert

    with pytest.raises(x509.ExtensionNotFound):
        made.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert made.subject == upstream.subject


# --- issuer, signature, key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream_key",
    [
        pytest.param(default_upstream_key, id="RSA-2048-like-the-CA"),
        pytest.param(pki.ec_key, id="EC-P256"),
    ],
)
def test_issued_and_signed_by_the_ca_with_a_key_of_its_own(
    store: SyncStore, authority: CertificateAuthority, upstream_key: object
) -> None:
    upstream = make_upstream(san(x509.DNSName("upstream.test")), key=upstream_key())  # type: ignore[operator]

    made = store.get(upstream)

    assert made.cert.issuer.public_bytes() == authority.cert.subject.public_bytes()
    made.cert.verify_directly_issued_by(authority.cert)  # raises when the signature does not verify
    with pytest.raises(ValueError):
        made.cert.verify_directly_issued_by(upstream_issuer().cert)
    mimic_spki = spki(made.cert.public_key())
    assert mimic_spki != spki(authority.cert.public_key())
    assert mimic_spki != spki(upstream.public_key())
    assert mimic_spki == spki(made.key.public_key())  # the key served is the one certified


def test_mint_certifies_the_key_it_is_given(
    authority: CertificateAuthority, mimic_key: ec.EllipticCurvePrivateKey
) -> None:
    made = mimic.mint(make_upstream(), authority, mimic_key)

    made.verify_directly_issued_by(authority.cert)
    assert spki(made.public_key()) == spki(mimic_key.public_key())


# --- validity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before_shift, after_shift, expect_ca_before, expect_ca_after",
    [
        # shifts of the upstream's notBefore / notAfter relative to the CA's own
        pytest.param(+10, -10, False, False, id="inside-the-CA"),
        pytest.param(+10, +100, False, True, id="outlives-the-CA"),
        pytest.param(-10, -10, True, False, id="predates-the-CA"),
        pytest.param(-10, +100, True, True, id="both"),
    ],
)
def test_validity_is_copied_and_clamped_to_the_ca(
    store: SyncStore,
    authority: CertificateAuthority,
    before_shift: int,
    after_shift: int,
    expect_ca_before: bool,
    expect_ca_after: bool,
) -> None:
    ca_before, ca_after = authority.cert.not_valid_before_utc, authority.cert.not_valid_after_utc
    upstream = make_upstream(
        not_before=ca_before + before_shift * DAY,
        not_after=ca_after + after_shift * DAY,
    )

    made = store.get(upstream).cert

    assert made.not_valid_before_utc == (ca_before if expect_ca_before else upstream.not_valid_before_utc)
    assert made.not_valid_after_utc == (ca_after if expect_ca_after else upstream.not_valid_after_utc)
    assert made.not_valid_after_utc <= ca_after


def test_validity_of_an_ordinary_upstream_is_copied_to_the_second(store: SyncStore) -> None:
    upstream = make_upstream(not_before=pki.NOW - 3 * DAY, not_after=pki.NOW + 47 * DAY)

    made = store.get(upstream).cert

    assert (made.not_valid_before_utc, made.not_valid_after_utc) == (
        upstream.not_valid_before_utc,
        upstream.not_valid_after_utc,
    )


# --- key types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key, expected",
    [
        pytest.param(lambda: pki.rsa_key(2048), keys.KeySpec("rsa", size=2048), id="RSA-2048"),
        pytest.param(lambda: pki.rsa_key(3072), keys.KeySpec("rsa", size=3072), id="RSA-3072"),
        pytest.param(lambda: pki.rsa_key(4096), keys.KeySpec("rsa", size=4096), id="RSA-4096"),
        pytest.param(lambda: pki.ec_key(ec.SECP256R1()), keys.KeySpec("ec", curve="secp256r1"), id="P-256"),
        pytest.param(lambda: pki.ec_key(ec.SECP384R1()), keys.KeySpec("ec", curve="secp384r1"), id="P-384"),
        pytest.param(lambda: pki.ec_key(ec.SECP521R1()), keys.KeySpec("ec", curve="secp521r1"), id="P-521"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, keys.KeySpec("ed25519"), id="Ed25519"),
    ],
)
def test_key_type_is_mirrored(
    authority: CertificateAuthority, runner: asyncio.Runner, make_key: object, expected: keys.KeySpec
) -> None:
    """Under a --max-mimic-key that caps nothing (test_key_cap.py has the cap)."""
    upstream = make_upstream(key_usage(digital_signature=True), key=make_key())  # type: ignore[operator]
    uncapped = keys.KeyCap(rsa_bits=8192, curve="secp521r1")

    made = SyncStore(MimicStore(authority, key_cap=uncapped), runner).get(upstream)

    public_key = made.cert.public_key()
    assert keys.KeySpec.of(public_key) == expected
    if isinstance(public_key, rsa.RSAPublicKey):
        assert public_key.key_size == expected.size
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        assert public_key.curve.name == expected.curve
    else:
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
    assert mimic.choose_key_spec(upstream, keys.P256, cap=uncapped) == mimic.KeyChoice(expected, fell_back=False)


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: dsa.generate_private_key(2048), id="DSA-2048"),
        pytest.param(lambda: pki.rsa_key(2560), id="RSA-2560"),
        pytest.param(lambda: pki.ec_key(ec.SECP256K1()), id="secp256k1"),
    ],
)
def test_unmirrorable_key_falls_back_to_p256_with_key_usage_fitted(store: SyncStore, make_key: object) -> None:
    upstream = make_upstream(
        key_usage(digital_signature=True, key_encipherment=True, data_encipherment=True),
        key=make_key(),  # type: ignore[operator]
    )

    made = store.get(upstream)

    public_key = made.cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    usage = extension(made.cert, ExtensionOID.KEY_USAGE)
    assert usage.critical is True
    assert usage.value.digital_signature is True
    assert usage.value.key_encipherment is False  # meaningless for an EC key
    assert usage.value.data_encipherment is False
    assert mimic.choose_key_spec(upstream, keys.P256).fell_back is True
    made.cert.verify_directly_issued_by(store.ca.cert)


def test_a_weak_rsa_key_is_mirrored_with_a_key_of_its_own(store: SyncStore) -> None:
    """An RSA-1024 upstream gets an RSA-1024 mimic, so that a client refuses it for its key as it
    would the upstream's; the key is made for that mimic alone, never shared like the pool's."""
    weak = [make_upstream(key=pki.rsa_key(1024)) for _ in range(2)]
    strong = [make_upstream(key=pki.rsa_key(2048)) for _ in range(2)]

    weak_mimics = [store.get(upstream).cert for upstream in weak]
    strong_mimics = [store.get(upstream).cert for upstream in strong]

    assert [keys.describe(m.public_key()) for m in weak_mimics] == ["RSA-1024", "RSA-1024"]
    assert spki(weak_mimics[0].public_key()) != spki(weak_mimics[1].public_key())
    assert spki(strong_mimics[0].public_key()) == spki(strong_mimics[1].public_key())  # pooled, as before
    assert mimic.choose_key_spec(weak[0], keys.P256) == mimic.KeyChoice(keys.KeySpec("rsa", size=1024), False, True)
    assert store.get(weak[0]).cert is weak_mimics[0]  # cached with its key, like any mimic


@pytest.mark.parametrize("mode", [trust.Signing.UNTRUSTED, trust.Signing.SELF])
def test_a_weak_key_is_not_mirrored_where_the_issuer_fails_the_client_anyway(store: SyncStore, mode: str) -> None:
    """An upstream that fails for its issuer gets a pooled fallback key: a key made per certificate
    would let anyone make bumper generate RSA keys at will, for a client that refuses the mimic anyway."""
    weak = [make_upstream(key=pki.rsa_key(1024)) for _ in range(2)]

    made = [store.get(upstream, trust.Signing(mode)).cert for upstream in weak]

    assert [keys.describe(m.public_key()) for m in made] == ["EC P-256", "EC P-256"]
    assert spki(made[0].public_key()) == spki(made[1].public_key())


@pytest.mark.parametrize(
    "make_key, upstream_flags, expected_flags",
    [
        pytest.param(
            lambda: pki.rsa_key(2048),
            dict(digital_signature=True, key_encipherment=True),
            dict(digital_signature=True, key_encipherment=True),
            id="RSA-keeps-keyEncipherment",
        ),
        pytest.param(
            pki.ec_key,
            dict(digital_signature=True, key_agreement=True),
            dict(digital_signature=True, key_agreement=True),
            id="EC-keeps-keyAgreement",
        ),
        pytest.param(
            ed25519.Ed25519PrivateKey.generate,
            dict(digital_signature=True, key_agreement=True, key_encipherment=True),
            dict(digital_signature=True, key_agreement=True, key_encipherment=True),
            id="Ed25519-odd-bits-copied-as-they-are",
        ),
        pytest.param(
            pki.ec_key,
            dict(key_agreement=True),
            dict(key_agreement=True),
            id="EC-keyAgreement-only-is-not-widened",
        ),
    ],
)
def test_key_usage_of_a_mirrored_key_is_copied_unchanged(
    store: SyncStore, make_key: object, upstream_flags: dict[str, bool], expected_flags: dict[str, bool]
) -> None:
    upstream = make_upstream(key_usage(**upstream_flags), key=make_key())  # type: ignore[operator]

    usage = extension(store.get(upstream).cert, ExtensionOID.KEY_USAGE).value

    assert usage == key_usage(**expected_flags)[0]


# --- extensions ---------------------------------------------------------------------------------

UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1.2.3")
DROPPED = (
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.FRESHEST_CRL,
    ExtensionOID.PRECERT_SIGNED_CERTIFICATE_TIMESTAMPS,
    ExtensionOID.TLS_FEATURE,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
)


def upstream_with_every_extension(flip: bool) -> x509.Certificate:
    """Kept extensions with mixed criticality (all flipped when FLIP), plus every dropped one."""
    crl = x509.DistributionPoint([x509.UniformResourceIdentifier("http://crl.test/ca.crl")], None, None, None)
    kept: list[ExtensionSpec] = [
        key_usage(critical=True, digital_signature=True, key_encipherment=True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.CertificatePolicies([x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.2.2"), None)]), False),
        (x509.UnrecognizedExtension(UNKNOWN_OID, b"\x0c\x05hello"), False),
        san(x509.DNSName("upstream.test")),
    ]
    if flip:
        kept = [(value, not critical) for value, critical in kept]
    issuer_key = upstream_issuer().key.public_key()  # type: ignore[attr-defined]
    dropped: list[ExtensionSpec] = [
        (
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier("http://ocsp.test/")
                    ),
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS,
                        x509.UniformResourceIdentifier("http://ca.test/ca.der"),
                    ),
                ]
            ),
            False,
        ),
        (x509.CRLDistributionPoints([crl]), False),
        (x509.FreshestCRL([crl]), False),
        (sct_list_extension(), False),
        (x509.TLSFeature([x509.TLSFeatureType.status_request]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False),
        (x509.SubjectKeyIdentifier.from_public_key(default_upstream_key().public_key()), False),
    ]
    return make_upstream(*kept, *dropped)


@pytest.mark.parametrize("flip", [False, True], ids=["as-usual", "criticality-flipped"])
def test_extensions_copied_or_dropped(store: SyncStore, authority: CertificateAuthority, flip: bool) -> None:
    upstream = upstream_with_every_extension(flip)
    assert {e.oid for e in upstream.extensions} >= set(DROPPED)  # the upstream really has them all

    made = store.get(upstream).cert

    upstream_kept = [e for e in upstream.extensions if e.oid not in DROPPED]
    for ext in upstream_kept:
        copy = extension(made, ext.oid)
        assert copy.critical is ext.critical, ext.oid
        assert copy.value.public_bytes() == ext.value.public_bytes(), ext.oid
    assert sorted(e.oid.dotted_string for e in made.extensions) == sorted(
        [e.oid.dotted_string for e in upstream_kept]
        + [ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string, ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string]
    )

    aki = extension(made, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ca_ski = extension(authority.cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert aki.critical is False
    assert aki.value.key_identifier == ca_ski.digest
    assert aki.value != extension(upstream, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    ski = extension(made, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert ski.critical is False
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(made.public_key())
    assert ski.value != extension(upstream, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value


def test_unknown_extension_bytes_survive_verbatim(store: SyncStore) -> None:
    unknown = x509.UnrecognizedExtension(UNKNOWN_OID, b"\x30\x03\x02\x01\x2a")
    upstream = make_upstream((unknown, True))

    copy = extension(store.get(upstream).cert, UNKNOWN_OID)

    assert copy.critical is True
    assert isinstance(copy.value, x509.UnrecognizedExtension)
    assert copy.value.value == b"\x30\x03\x02\x01\x2a"


# --- serial and signature hash ------------------------------------------------------------------


def test_serial_is_positive_random_and_at_most_20_octets(
    authority: CertificateAuthority, mimic_key: ec.EllipticCurvePrivateKey
) -> None:
    upstream = make_upstream()
    serials = [mimic.mint(upstream, authority, mimic_key).serial_number for _ in range(32)]

    for serial in serials:
        assert serial > 0
        assert serial.bit_length() // 8 + 1 <= 20  # DER length of a positive INTEGER's content
    assert len(set(serials)) == len(serials)
    assert upstream.serial_number not in serials


@pytest.mark.parametrize(
    "upstream_hash, expected",
    [
        pytest.param(hashes.SHA256(), hashes.SHA256, id="SHA-256"),
        pytest.param(hashes.SHA384(), hashes.SHA384, id="SHA-384"),
        pytest.param(hashes.SHA512(), hashes.SHA512, id="SHA-512"),
        pytest.param(hashes.SHA224(), hashes.SHA256, id="SHA-224-to-SHA-256"),
        pytest.param(hashes.SHA1(), hashes.SHA1, id="SHA-1-mirrored"),
    ],
)
def test_signature_hash_follows_the_upstream(
    store: SyncStore, upstream_hash: hashes.HashAlgorithm, expected: type[hashes.HashAlgorithm]
) -> None:
    upstream = make_upstream(signature_hash=upstream_hash)
    assert type(upstream.signature_hash_algorithm) is type(upstream_hash)

    made = store.get(upstream).cert

    assert type(made.signature_hash_algorithm) is expected
    assert mimic.signed_by(made, store.ca.cert)


def test_ed25519_ca_signs_without_a_hash(tmp_path: Path, runner: asyncio.Runner) -> None:
    authority = ca_files.create(tmp_path / "ca", key_spec=keys.KeySpec("ed25519"))

    made = SyncStore(MimicStore(authority), runner).get(make_upstream(signature_hash=hashes.SHA384())).cert

    assert made.signature_hash_algorithm is None
    made.verify_directly_issued_by(authority.cert)


# --- MimicStore ---------------------------------------------------------------------------------


def test_store_caches_per_upstream(store: SyncStore) -> None:
    first, second = make_upstream(), make_upstream()

    a = store.get(first)

    assert store.get(first) is a
    b = store.get(second)
    assert b is not a
    assert b.cert.serial_number != a.cert.serial_number
    assert b.fingerprint != a.fingerprint
    assert a.fingerprint == ca_files.fingerprint(a.cert)
    assert b.key is a.key  # one key per key type, shared by the mimics of that type


def test_store_evicts_the_least_recently_used_past_its_bytes(
    authority: CertificateAuthority, runner: asyncio.Runner
) -> None:
    """The memory cache holds what fits in max_bytes, as Mimic.size counts it, and forgets the least
    recently used first."""
    ups = [make_upstream(subject=pki.name(f"lru{i}.test"), key=pki.ec_key()) for i in range(80)]
    entry = SyncStore(MimicStore(authority), runner).get(ups[0]).size
    # Sizes differ by a few bytes (serials, signatures): room for 64 or so.
    store = SyncStore(MimicStore(authority, max_bytes=64 * entry + entry // 2), runner)
    first = store.get(ups[0])
    for up in ups[1:]:
        store.get(up)
        assert store.get(ups[0]) is first  # used after every other: never the least recently used
        assert store.store.memory_bytes == sum(m.size for m in store.store._memory.values())
        assert store.store.memory_bytes <= store.store.max_bytes
    assert 60 <= len(store.store._memory) <= 65
    assert store.get(ups[-1]) is store.get(ups[-1])
    again = store.get(ups[1])  # the least recently used went first
    assert again.cert.subject == pki.name("lru1.test") and store.store.lookups["minted"] == 81


def test_a_mimic_above_a_64th_of_the_memory_cache_is_served_not_kept(
    authority: CertificateAuthority, runner: asyncio.Runner
) -> None:
    large = make_upstream(
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"x" * 60_000), False),
        key=pki.ec_key(),
    )
    small = make_upstream(key=pki.ec_key())
    store = SyncStore(MimicStore(authority, max_bytes=4 * 1024**2), runner)  # a 64th: 64 KiB
    made = store.get(large)
    assert made.size > 64 * 1024 and made.cert.subject == large.subject
    assert store.get(large) is not made  # minted again: never kept
    kept = store.get(small)
    assert store.get(small) is kept and store.store.memory_bytes == kept.size
    off = SyncStore(MimicStore(authority, max_bytes=0), runner)  # --mimic-cache 0
    assert off.get(small) is not off.get(small) and off.store.memory_bytes == 0


# --- keys.KeySpec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rsa2048", keys.KeySpec("rsa", size=2048)),
        ("RSA-4096", keys.KeySpec("rsa", size=4096)),
        ("p256", keys.KeySpec("ec", curve="secp256r1")),
        ("EC-P384", keys.KeySpec("ec", curve="secp384r1")),
        ("ed25519", keys.KeySpec("ed25519")),
    ],
)
def test_keyspec_parse_accepts(text: str, expected: keys.KeySpec) -> None:
    assert keys.KeySpec.parse(text) == expected


@pytest.mark.parametrize("text", ["dsa", "rsa1024", "secp256k1", ""])
def test_keyspec_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="unknown key type"):
        keys.KeySpec.parse(text)


def test_the_overload_manager_shrinks_the_memory_cache_and_gives_its_size_back(
    authority: CertificateAuthority, runner: asyncio.Runner
) -> None:
    """resize (bumper.proxy.overload's shrink step): the least recently used go at once, the most
    recently used stay, and the size given back fills again."""
    ups = [make_upstream(subject=pki.name(f"shrink{i}.test"), key=pki.ec_key()) for i in range(16)]
    store = SyncStore(MimicStore(authority), runner)
    made = [store.get(up) for up in ups]
    full = store.store.max_bytes
    store.store.resize(4 * made[0].size + made[0].size // 2)
    assert list(store.store._memory.values()) == made[-4:]
    assert store.store.memory_bytes == sum(m.size for m in made[-4:])
    store.store.resize(full)
    assert store.get(ups[0]) is not made[0]  # gone while shrunk: minted again, and kept again
    assert len(store.store._memory) == 5
