"""The local certificate authority: its files in DIR, creating them once, loading and checking them.

Layout of DIR (0700):
  ca.pem  the CA certificate clients must trust (0644)
  ca.der  the same certificate in DER, for clients that want it (0644)
  ca.key  its private key, PKCS#8 PEM, unencrypted (0600)
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from bumper import keys
from bumper.errors import ConfigError

CERT_FILE = "ca.pem"
DER_FILE = "ca.der"
KEY_FILE = "ca.key"

CA_LIFETIME = datetime.timedelta(days=3650)
# Backdate notBefore a little so clients whose clocks lag still accept a fresh CA.
CLOCK_SKEW = datetime.timedelta(hours=1)

log = logging.getLogger("bumper.ca")


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: keys.PrivateKey
    directory: Path
    # The AKI every certificate this CA signs carries, computed once.
    authority_key_identifier: x509.AuthorityKeyIdentifier = field(init=False, repr=False)

    def __post_init__(self) -> None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        object.__setattr__(self, "authority_key_identifier", aki)

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex, as openssl and browsers print it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(ca: CertificateAuthority) -> str:
    cert = ca.cert
    return "\n".join(
        [
            f"CA certificate  {ca.cert_path}",
            f"  subject      {cert.subject.rfc4514_string()}",
            f"  SHA-256      {ca.fingerprint}",
            f"  not before   {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
            f"  not after    {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            f"  key          {keys.describe(cert.public_key())}",
        ]
    )


def trust_instructions(ca: CertificateAuthority, listen: str) -> str:
    pem = ca.cert_path
    return "\n".join(
        [
            f"bumper: created a new CA in {ca.directory}/. Clients must trust {pem}:",
            f"  curl     curl -x http://{listen} --cacert {pem} https://example.com/",
            f"  Debian   cp {pem} /usr/local/share/ca-certificates/bumper.crt && update-ca-certificates",
            f"  browser  import {pem} as a certificate authority "
            f"(Chromium/NSS: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n bumper -i {pem})",
        ]
    )


def load_or_create(directory: Path, now: datetime.datetime | None = None) -> tuple[CertificateAuthority, bool]:
    """Load the CA in DIR, or create one when DIR holds neither file. Returns (ca, created)."""
    if not (directory / CERT_FILE).exists() and not (directory / KEY_FILE).exists():
        return create(directory, now), True
    return load(directory, now), False


def load(directory: Path, now: datetime.datetime | None = None) -> CertificateAuthority:
    """Load and check the CA in DIR; every problem is a ConfigError naming the file."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not key_path.exists():
        raise ConfigError(f"{key_path}: missing; {cert_path} is there without its private key")
    if not cert_path.exists():
        raise ConfigError(f"{cert_path}: missing; {key_path} is there without its certificate")
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"{key_path}: does not match the certificate in {cert_path}")
    _check_is_ca(cert, cert_path)
    _check_validity(cert, cert_path, now or _utcnow())
    _warn_if_key_readable_by_others(key_path)
    return CertificateAuthority(cert=cert, key=key, directory=directory)


def create(
    directory: Path, now: datetime.datetime | None = None, key_spec: keys.KeySpec = keys.RSA2048
) -> CertificateAuthority:
    """Create a new CA in DIR. Refuses to replace either file that already exists."""
    for name in (CERT_FILE, KEY_FILE, DER_FILE):
        if (directory / name).exists():
            raise ConfigError(f"{directory / name}: already exists; bumper never overwrites CA files")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot create the CA directory: {e.strerror}") from None
    key = key_spec.generate()
    cert = _self_signed_ca_cert(key, now or _utcnow())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_new(directory / KEY_FILE, key_pem, 0o600)
        _write_new(directory / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_new(directory / DER_FILE, cert.public_bytes(serialization.Encoding.DER), 0o644)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot write the CA files: {e.strerror}") from None
    return CertificateAuthority(cert=cert, key=key, directory=directory)


def export(ca: CertificateAuthority, destination: Path, encoding: str) -> None:
    """Write the CA certificate (never a key) to DESTINATION as PEM or DER."""
    enc = serialization.Encoding.DER if encoding == "der" else serialization.Encoding.PEM
    try:
        destination.write_bytes(ca.cert.public_bytes(enc))
    except OSError as e:
        raise ConfigError(f"{destination}: cannot write: {e.strerror}") from None


def _self_signed_ca_cert(key: keys.PrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bumper"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"bumper CA ({socket.gethostname()[:40]})"),
        ]
    )
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, None if _is_ed25519(key) else hashes.SHA256())
    )


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate (corrupt or wrong file)") from None


def _load_key(path: Path) -> keys.PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the key is encrypted; bumper needs it unencrypted (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key (corrupt or wrong file)") from None
    if keys.KeySpec.of(key.public_key()) is None:
        raise ConfigError(f"{path}: unsupported CA key type {keys.describe(key.public_key())}")
    return key  # type: ignore[return-value]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(f"{path}: not a CA certificate (basicConstraints CA:TRUE is missing)")


def _check_validity(cert: x509.Certificate, path: Path, now: datetime.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise ConfigError(
            f"{path}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"move the old files away and let bumper create a new CA"
        )
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"{path}: the CA is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _warn_if_key_readable_by_others(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s: mode %04o lets other users read the CA key; run: chmod 600 %s", path, mode, path)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ed25519(key: object) -> bool:
    return isinstance(key, keys.ed25519.Ed25519PrivateKey)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
