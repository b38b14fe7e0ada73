"""Test certificates: a root for the local upstreams and leaves of any shape the tests need."""

from __future__ import annotations

import base64
import datetime
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def rsa8192_key() -> rsa.RSAPrivateKey:
    """One RSA-8192 key per test process: making one takes seconds."""
    return rsa_key(8192)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def name(common_name: str, organization: str = "bumper tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass
class Authority:
    key: object
    cert: x509.Certificate

    @classmethod
    def root(cls, common_name: str = "bumper test root") -> Authority:
        key = rsa_key()
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
        extensions = (
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (usage, True),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        )
        return cls(key, _self_signed(key, name(common_name), 365 * DAY, extensions))

    def intermediate(
        self,
        common_name: str = "bumper test intermediate",
        ca: bool = True,
        extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    ) -> Authority:
        """An issuing CA below this one (pathlen 0); with CA=False, one that only pretends to be."""
        key = rsa_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 300 * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),  # type: ignore[attr-defined]
                critical=False,
            )
        )
        for ext, critical in extra:
            builder = builder.add_extension(ext, critical=critical)
        return Authority(key, builder.sign(self.key, hashes.SHA256()))  # type: ignore[arg-type]

    def leaf(
        self,
        *dns_names: str,
        key: object | None = None,
        subject: x509.Name | None = None,
        extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH,),
    ) -> Leaf:
        key = key or rsa_key()
        public_key = key.public_key()  # type: ignore[attr-defined]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject if subject is not None else name(dns_names[0] if dns_names else "leaf"))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 90 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),  # type: ignore[attr-defined]
                critical=False,
            )
        )
        if dns_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
            )
        for ext, critical in extra:
            builder = builder.add_extension(ext, critical=critical)
        return Leaf(key, builder.sign(self.key, hashes.SHA256()), self)  # type: ignore[arg-type]

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def _self_signed(
    key: rsa.RSAPrivateKey,
    subject: x509.Name,
    lifetime: datetime.timedelta,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + lifetime)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def self_signed_leaf(*dns_names: str) -> Leaf:
    """A server certificate that signs itself, as on an appliance nobody configured."""
    key = rsa_key()
    san = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names])
    cert = _self_signed(key, name(dns_names[0]), 90 * DAY, ((san, False),))
    return Leaf(key, cert, Authority(key, cert))


def resigned_with_sha1(cert: x509.Certificate, issuer: Authority) -> x509.Certificate:
    """CERT signed again with SHA-1: cryptography refuses to, OpenSSL still does, as old CAs did."""
    legacy = crypto.X509.from_cryptography(cert)
    legacy.sign(crypto.PKey.from_cryptography_key(issuer.key), "sha1")  # type: ignore[arg-type]
    return legacy.to_cryptography()


@dataclass
class Leaf:
    key: object
    cert: x509.Certificate
    issuer: Authority
    chain: tuple[x509.Certificate, ...] = ()  # intermediates the server sends after the leaf

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write CERT (leaf then issuer chain) and KEY files for a server."""
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain)))
        key_path.write_bytes(
            self.key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


# --- certificates cryptography's builder will not write: the TBSCertificate edited as DER, then signed ---


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = (
        bytes([n]) if n < 0x80 else bytes([0x80 | (n.bit_length() + 7) // 8]) + n.to_bytes((n.bit_length() + 7) // 8)
    )
    return bytes([tag]) + length + body


def elements(data: bytes) -> list[bytes]:
    """The TLVs of DATA (the contents of a SEQUENCE), each whole: the tests' own walk, low tags only."""
    found, i = [], 0
    while i < len(data):
        start, length = i, data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i : i + count])
            i += count
        i += length
        found.append(data[start:i])
    return found


def contents(element: bytes) -> bytes:
    length = element[1]
    return element[2 + (length & 0x7F if length & 0x80 else 0) :]


def raw_name(*attributes: tuple[str, int | bytes, bytes]) -> bytes:
    """A Name DER of one RDN per (dotted OID, tag (an int, or the tag octets), value contents)."""
    rdns = b""
    for oid, tag, value in attributes:
        tag_octets = bytes([tag]) if isinstance(tag, int) else tag
        body = tlv(0x06, _oid_body(oid)) + tag_octets + tlv(0, value)[1:]
        rdns += tlv(0x31, tlv(0x30, body))
    return tlv(0x30, rdns)


def _oid_body(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | arc & 0x7F)
        out += bytes(reversed(chunk))
    return bytes(out)


def reissued(cert: x509.Certificate, issuer: Authority, **changes: Any) -> x509.Certificate:
    """reissued_der, as cryptography loads it."""
    return x509.load_der_x509_certificate(reissued_der(cert, issuer, **changes))


def reissued_der(
    cert: x509.Certificate,
    issuer: Authority,
    *,
    subject: bytes | None = None,
    issuer_name: bytes | None = None,
    serial: int | None = None,
    v1: bool = False,
    sha1: bool = False,
) -> bytes:
    """CERT with its subject, issuer name, serial (any sign) or version replaced by hand, signed
    again by ISSUER (RSA, SHA-256 or SHA-1): a valid signature, so a client that trusts ISSUER's root
    trusts it. v1 drops the version field and the extensions. Returns DER, which cryptography may
    refuse to load (a BER length, say) where OpenSSL does not."""
    fields = elements(contents(cert.tbs_certificate_bytes))
    if fields[0][0] == 0xA0:
        fields = fields[1:]
    if serial is not None:
        fields[0] = tlv(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True))
    if issuer_name is not None:
        fields[2] = issuer_name
    if subject is not None:
        fields[4] = subject
    oid = "1.2.840.113549.1.1.5" if sha1 else "1.2.840.113549.1.1.11"
    fields[1] = algorithm_der = tlv(0x30, tlv(0x06, _oid_body(oid)) + b"\x05\x00")
    if v1:
        fields = fields[:6]
    else:
        fields = [b"\xa0\x03\x02\x01\x02", *fields]
    tbs = tlv(0x30, b"".join(fields))
    algorithm = hashes.SHA1() if sha1 else hashes.SHA256()
    signature = issuer.key.sign(tbs, padding.PKCS1v15(), algorithm)  # type: ignore[attr-defined]
    return tlv(0x30, tbs + algorithm_der + tlv(0x03, b"\x00" + signature))


@dataclass(frozen=True)
class RawCertificate:
    """A certificate as bytes, for a server to send, that cryptography cannot load (Leaf.write takes it)."""

    der: bytes

    def public_bytes(self, encoding: serialization.Encoding) -> bytes:
        if encoding is serialization.Encoding.DER:
            return self.der
        return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(self.der) + b"-----END CERTIFICATE-----\n"
