"""Test certificates: a root for the local upstreams and leaves of any shape the tests need."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


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
