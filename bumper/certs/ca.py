"""The local certificate authority: its files in DIR, creating them once, loading and checking them.

Layout of DIR (0700; every file bumper writes there is 0600, certificates too: whoever hands the CA
to clients copies it out with `bumper ca export` or `bundle`, and nothing in DIR is for other users):
  ca.pem       the CA certificate clients must trust
  ca.der       the same certificate in DER, for clients that want it
  ca.key       its private key, PKCS#8 PEM, unencrypted
With an issuing intermediate (`bumper ca init --intermediate`), the intermediate signs the mimics
and ca.key is only needed to make it, so it can be kept offline:
  issuing.pem  the intermediate, signed by ca.pem, sent to clients after every mimic
  issuing.key  its private key
And always, made on first need and never exported:
  untrusted.pem, untrusted.key  a CA no client trusts, which signs the mimics of upstreams that
                                failed verification, so that clients reject them as they would
                                have rejected the upstream
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from bumper.certs import der, keys
from bumper.errors import ConfigError

CERT_FILE = "ca.pem"
DER_FILE = "ca.der"
KEY_FILE = "ca.key"
ISSUING_CERT_FILE = "issuing.pem"
ISSUING_KEY_FILE = "issuing.key"
UNTRUSTED_CERT_FILE = "untrusted.pem"
UNTRUSTED_KEY_FILE = "untrusted.key"
FILE_MODE = 0o600  # of every file bumper writes in DIR

PEM_MARKER = b"-----BEGIN "  # anywhere: PEM files may start with text, as openssl x509 -text writes them

CA_LIFETIME = datetime.timedelta(days=3650)
ISSUING_LIFETIME = datetime.timedelta(days=5 * 365)
# Backdate notBefore a little so clients whose clocks lag still accept a fresh CA.
CLOCK_SKEW = datetime.timedelta(hours=1)

log = logging.getLogger("bumper.ca")


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate  # the certificate that signs mimics: the root, or the issuing intermediate
    key: keys.PrivateKey
    directory: Path
    root: x509.Certificate | None = None  # the root clients trust, when it is not `cert` itself
    chain: tuple[x509.Certificate, ...] = ()  # sent to clients after each mimic
    # The AKI every certificate this CA signs carries, computed once.
    authority_key_identifier: x509.AuthorityKeyIdentifier = field(init=False, repr=False)

    def __post_init__(self) -> None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        object.__setattr__(self, "authority_key_identifier", aki)

    @functools.cached_property
    def subject_der(self) -> bytes:
        """The subject of `cert` as its own DER: a mimic's issuer, byte for byte (der.MalformedDER
        when it is not a sound Name)."""
        return der.parse_tbs(self.cert.tbs_certificate_bytes).subject

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def trust_anchor(self) -> x509.Certificate:
        """The certificate clients must trust (ca.pem)."""
        return self.root or self.cert

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex, as openssl and browsers print it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(ca: CertificateAuthority) -> str:
    lines = _describe_cert("CA certificate", ca.cert_path, ca.trust_anchor)
    if ca.root is not None:
        lines += _describe_cert("issuing CA", ca.directory / ISSUING_CERT_FILE, ca.cert)
    untrusted = ca.directory / UNTRUSTED_CERT_FILE
    if untrusted.exists():
        title = "untrusted CA (signs mimics of upstreams that failed verification; never trust it)"
        lines += _describe_cert(title, untrusted, _load_cert(untrusted))
    return "\n".join(lines)


def _describe_cert(title: str, path: Path, cert: x509.Certificate) -> list[str]:
    return [
        f"{title}  {path}",
        f"  subject      {cert.subject.rfc4514_string()}",
        f"  SHA-256      {fingerprint(cert)}",
        f"  not before   {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        f"  not after    {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        f"  key          {keys.describe(cert.public_key())}",
    ]


def trust_instructions(ca: CertificateAuthority, listen: str | None) -> str:
    """What to do with a new CA; LISTEN: the explicit proxy's address, if bumper has one."""
    pem = ca.cert_path
    proxy = f"-x http://{listen} " if listen else ""
    return "\n".join(
        [
            f"bumper: created a new CA in {ca.directory}/. Clients must trust {pem}:",
            f"  curl     curl {proxy}--cacert {pem} https://example.com/",
            f"  Debian   cp {pem} /usr/local/share/ca-certificates/bumper.crt && update-ca-certificates",
            f"  browser  import {pem} as a certificate authority "
            f"(Chromium/NSS: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n bumper -i {pem})",
        ]
    )


def load_or_create(directory: Path, now: datetime.datetime | None = None) -> tuple[CertificateAuthority, bool]:
    """Load the CA in DIR, or create one when DIR exists and holds neither file. Returns (ca, created).

    A directory that does not exist is more often a typo than a wish for a new root CA, which
    every client would then have to trust: `bumper ca init` makes one there on purpose."""
    if not directory.exists():
        raise ConfigError(
            f"--ca {directory}: no such directory; create a CA there with: bumper ca init --ca {directory}"
        )
    if not (directory / CERT_FILE).exists() and not (directory / KEY_FILE).exists():
        return create(directory, now), True
    return load(directory, now), False


def load(directory: Path, now: datetime.datetime | None = None) -> CertificateAuthority:
    """Load and check the CA in DIR; every problem is a ConfigError naming the file."""
    now = now or _utcnow()
    issuing_cert, issuing_key = directory / ISSUING_CERT_FILE, directory / ISSUING_KEY_FILE
    if issuing_cert.exists() or issuing_key.exists():
        return _load_with_intermediate(directory, now)
    cert, key = _load_pair(directory / CERT_FILE, directory / KEY_FILE, now)
    return CertificateAuthority(cert=cert, key=key, directory=directory)


def _load_with_intermediate(directory: Path, now: datetime.datetime) -> CertificateAuthority:
    root_path = directory / CERT_FILE
    if not root_path.exists():
        raise ConfigError(f"{root_path}: missing; {directory / ISSUING_CERT_FILE} needs the root it chains to")
    if (directory / KEY_FILE).exists():  # the root key may be kept offline; if it is here, it must fit
        _load_pair(root_path, directory / KEY_FILE, now)
    root = _load_cert(root_path)
    _check_is_ca(root, root_path)
    _check_validity(root, root_path, now)
    cert_path = directory / ISSUING_CERT_FILE
    cert, key = _load_pair(cert_path, directory / ISSUING_KEY_FILE, now)
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{cert_path}: not issued by the CA in {root_path}") from None
    return CertificateAuthority(cert=cert, key=key, directory=directory, root=root, chain=(cert,))


def untrusted(directory: Path, now: datetime.datetime | None = None) -> CertificateAuthority:
    """The untrusted CA in DIR, made the first time it is needed. It is never exported. A DIR that
    cannot take it (full, read-only) gets one for this run only, as no client trusts it anyway:
    upstreams that fail verification still get a mimic that fails the client's check."""
    cert_path, key_path = directory / UNTRUSTED_CERT_FILE, directory / UNTRUSTED_KEY_FILE
    now = now or _utcnow()
    if not cert_path.exists() and not key_path.exists():
        key = keys.P256.generate()  # made on the event loop at first need: an EC key takes no time
        name = _ca_name("bumper UNTRUSTED CA, never trust it")
        cert = _ca_cert(key, name, key, None, now, CA_LIFETIME)
        written: list[Path] = []
        try:
            for path, data in ((key_path, _pem_key(key)), (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
                _write_new(path, data)
                written.append(path)
        except OSError as e:
            for path in written:  # a key without its certificate would stop the next start
                path.unlink(missing_ok=True)
            log.warning(
                "%s: cannot write the untrusted CA (%s): one made for this run signs meanwhile", directory, e.strerror
            )
        return CertificateAuthority(cert=cert, key=key, directory=directory)
    cert, key = _load_pair(cert_path, key_path, now)
    return CertificateAuthority(cert=cert, key=key, directory=directory)


def on_disk_problem(ca: CertificateAuthority) -> str | None:
    """How CA's files now differ from CA as it was loaded (changed, gone, unreadable), or None when
    they still hold it. bumper keeps signing with the loaded CA either way: a CA swapped or broken
    under a running proxy must not take effect half-way, nor stop it."""
    signing_cert, signing_key = (ISSUING_CERT_FILE, ISSUING_KEY_FILE) if ca.root else (CERT_FILE, KEY_FILE)
    try:
        for path, loaded in {ca.cert_path: ca.trust_anchor, ca.directory / signing_cert: ca.cert}.items():
            if _load_cert(path) != loaded:
                return f"{path}: no longer the CA certificate bumper loaded"
        key_path = ca.directory / signing_key
        if _spki(_load_key(key_path).public_key()) != _spki(ca.key.public_key()):
            return f"{key_path}: no longer the key of the CA bumper loaded"
    except ConfigError as e:
        return str(e)
    return None


def _load_pair(cert_path: Path, key_path: Path, now: datetime.datetime) -> tuple[x509.Certificate, keys.PrivateKey]:
    if not key_path.exists():
        raise ConfigError(f"{key_path}: missing; {cert_path} is there without its private key")
    if not cert_path.exists():
        raise ConfigError(f"{cert_path}: missing; {key_path} is there without its certificate")
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"{key_path}: does not match the certificate in {cert_path}")
    _check_is_ca(cert, cert_path)
    _check_validity(cert, cert_path, now)
    _warn_if_key_readable_by_others(key_path)
    return cert, key


def create(
    directory: Path,
    now: datetime.datetime | None = None,
    key_spec: keys.KeySpec = keys.RSA2048,
    intermediate: bool = False,
) -> CertificateAuthority:
    """Create a new CA in DIR (with an issuing intermediate if asked). Never replaces a file."""
    for name in (CERT_FILE, KEY_FILE, DER_FILE, ISSUING_CERT_FILE, ISSUING_KEY_FILE):
        if (directory / name).exists():
            raise ConfigError(f"{directory / name}: already exists; bumper never overwrites CA files")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot create the CA directory: {e.strerror}") from None
    now = now or _utcnow()
    key = key_spec.generate()
    cert = _ca_cert(key, _ca_name("bumper CA"), key, None, now, CA_LIFETIME)
    files = [
        (KEY_FILE, _pem_key(key)),
        (CERT_FILE, cert.public_bytes(serialization.Encoding.PEM)),
        (DER_FILE, cert.public_bytes(serialization.Encoding.DER)),
    ]
    authority = CertificateAuthority(cert=cert, key=key, directory=directory)
    if intermediate:
        issuing_key = key_spec.generate()
        issuing = _ca_cert(issuing_key, _ca_name("bumper issuing CA"), key, cert, now, ISSUING_LIFETIME)
        files += [
            (ISSUING_KEY_FILE, _pem_key(issuing_key)),
            (ISSUING_CERT_FILE, issuing.public_bytes(serialization.Encoding.PEM)),
        ]
        authority = CertificateAuthority(issuing, issuing_key, directory, root=cert, chain=(issuing,))
    try:
        for name, data in files:
            _write_new(directory / name, data)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot write the CA files: {e.strerror}") from None
    return authority


def exported(ca: CertificateAuthority, encoding: str) -> bytes:
    """The CA certificate clients trust (never a key), as PEM or DER."""
    return ca.trust_anchor.public_bytes(serialization.Encoding.DER if encoding == "der" else serialization.Encoding.PEM)


def export(ca: CertificateAuthority, destination: Path, encoding: str) -> None:
    """Write exported(CA) to DESTINATION."""
    try:
        destination.write_bytes(exported(ca, encoding))
    except OSError as e:
        raise ConfigError(f"{destination}: cannot write: {e.strerror}") from None


def _ca_name(title: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bumper"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{title} ({socket.gethostname()[:40]})"),
        ]
    )


def _ca_cert(
    key: keys.PrivateKey,
    subject: x509.Name,
    signer_key: keys.PrivateKey,
    signer: x509.Certificate | None,  # None: self-signed
    now: datetime.datetime,
    lifetime: datetime.timedelta,
) -> x509.Certificate:
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, signer.not_valid_after_utc) if signer else now + lifetime)
        # An issuing intermediate may sign only leaves (pathlen 0).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0 if signer else None), critical=True)
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
    )
    if signer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer_key, None if _is_ed25519(signer_key) else hashes.SHA256())


def _pem_key(key: keys.PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_pem_certificates(path: Path, label: str = "") -> list[x509.Certificate]:
    """Every certificate in a PEM file, or a ConfigError naming LABEL (default: the path)."""
    label = label or str(path)
    return _pem_certificates(_read(path, label), label)


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or the one in a DER file, or a ConfigError naming the path."""
    data = _read(path)
    if PEM_MARKER in data:
        return _pem_certificates(data, str(path))
    try:
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion):
        raise ConfigError(f"{path}: not a certificate file (neither PEM nor DER)") from None


def _pem_certificates(data: bytes, label: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion):  # ValueError also for a file without any certificate
        raise ConfigError(f"{label}: not a PEM certificate file") from None


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate (corrupt or wrong file)") from None


def _load_key(path: Path) -> keys.PrivateKey:
    return pem_private_key(_read(path), path)


def pem_private_key(data: bytes, path: Path) -> keys.PrivateKey:
    """The unencrypted PEM private key in DATA (read from PATH), of a type bumper signs with."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the key is encrypted; bumper needs it unencrypted (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key (corrupt or wrong file)") from None
    if keys.KeySpec.of(key.public_key()) is None:
        raise ConfigError(f"{path}: unsupported key type {keys.describe(key.public_key())}")
    return key  # type: ignore[return-value]


def _read(path: Path, label: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{label or path}: cannot read: {e.strerror}") from None


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


def _write_new(path: Path, data: bytes) -> None:
    """Create PATH 0600 (whatever the umask) and write DATA; never replaces a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        path.unlink(missing_ok=True)  # just made, so ours: a full disk leaves no half-written file
        raise


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _is_ed25519(key: object) -> bool:
    return isinstance(key, ed25519.Ed25519PrivateKey)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
