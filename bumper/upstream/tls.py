"""The upstream leg's TLS: which roots, versions and ciphers bumper verifies upstreams with, and the
host name check. Shared by the bumped connection's upstream handshake and the splice probe, so that
both verify alike."""

from __future__ import annotations

import ipaddress
import os
import ssl
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from OpenSSL import SSL, crypto

from bumper.certs import trust
from bumper.certs.ca import load_pem_certificates
from bumper.certs.owncert import OwnCertificate
from bumper.errors import ConfigError
from bumper.policy import names

# Towards upstreams: forward-secret AEAD first, CBC only with ECDHE; never anything that
# would lower a client's security (no RC4, 3DES, DES, NULL, anonymous, export, PSK, SRP...).
# SECLEVEL=2 makes OpenSSL refuse RSA keys under 2048 bits and SHA-1 signatures.
UPSTREAM_CIPHERS = (
    "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:"
    "!aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!CAMELLIA:!IDEA:!SEED:!DSS"
)

# Only for upstreams a rule names, that speak nothing newer than TLS 1.0 or 1.1: OpenSSL 3 needs
# SECLEVEL 0 for those, and they need CBC suites. Still no RC4, 3DES, export, NULL or anonymous.
LEGACY_UPSTREAM_CIPHERS = (
    "@SECLEVEL=0:ECDHE+AES:DHE+AES:RSA+AES:!aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!DSS"
)
# The versions a rule or option may name, as OpenSSL numbers them.
TLS_VERSIONS = {
    "1.0": SSL.TLS1_VERSION, "1.1": SSL.TLS1_1_VERSION, "1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION,
}  # fmt: skip

# pyOpenSSL's raw OpenSSL bindings: hostname checking has no public pyOpenSSL API.
_lib: Any = SSL._lib  # type: ignore[attr-defined,unused-ignore]
_ffi: Any = SSL._ffi  # type: ignore[attr-defined,unused-ignore]
# Host name checks as browsers do them: no partial wildcards, never the subject CN.
_HOSTFLAGS = _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | getattr(_lib, "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT", 0)


@dataclass(frozen=True)
class UpstreamTrust:
    """Roots for verifying upstreams: the system store plus any --upstream-ca files."""

    extra_ca_files: tuple[Path, ...] = ()

    def all_files(self) -> list[Path]:
        """The system bundle (as OpenSSL finds it, SSL_CERT_FILE included) and the extra files."""
        system = system_roots_file()
        return [*([system] if system else []), *self.extra_ca_files]

    def check(self) -> None:
        for path in self.extra_ca_files:
            load_pem_certificates(path, f"--upstream-ca {path}")


def system_roots_file() -> Path | None:
    """The system's roots file as OpenSSL finds it (SSL_CERT_FILE, else its default), if it exists:
    what upstream_context's set_default_verify_paths loads, and what `bumper ca bundle` copies."""
    system = ssl.get_default_verify_paths().cafile
    return Path(system) if system else None


def system_roots() -> tuple[Path, list[x509.Certificate]]:
    """The system's roots (system_roots_file's) and their file, or a ConfigError saying where
    OpenSSL looked. A root the system trusts may break RFC 5280 (a negative serial): still read."""
    system = system_roots_file()
    if system is None:
        hint = "install ca-certificates, or point SSL_CERT_FILE at a PEM file of roots"
        raise ConfigError(f"no system roots to bundle: no file at {system_roots_missing()} ({hint})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return system, load_pem_certificates(system, f"system roots {system}")


def system_roots_missing() -> str:
    """Where OpenSSL looked for the system's roots and found no file, for an error message."""
    paths = ssl.get_default_verify_paths()
    if configured := os.environ.get(paths.openssl_cafile_env):
        return f"{paths.openssl_cafile_env}={configured}"
    return f"{paths.openssl_cafile} (OpenSSL's default; {paths.openssl_cafile_env} is not set)"


def upstream_context(
    trust: UpstreamTrust, min_version: str = "1.2", client_cert: OwnCertificate | None = None
) -> SSL.Context:
    """Towards upstreams; CLIENT_CERT (chain and key) for upstreams that ask for one (a rule's client_cert)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if client_cert is not None:
        context.use_certificate(crypto.X509.from_cryptography(client_cert.chain[0]))
        for cert in client_cert.chain[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        context.use_privatekey(crypto.PKey.from_cryptography_key(client_cert.key))
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections keep no record buffers: see client_context
    context.set_min_proto_version(TLS_VERSIONS[min_version])
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    legacy = TLS_VERSIONS[min_version] < SSL.TLS1_2_VERSION
    context.set_cipher_list((LEGACY_UPSTREAM_CIPHERS if legacy else UPSTREAM_CIPHERS).encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    # Every verification error is recorded, not fatal: the handshake completes so that bumper can
    # classify the failure and act on it (trust.py). Nothing is trusted on the way: a connection
    # without a verdict, or with a failed one, never gets a trusted mimic unless its defects are
    # ones the mimic carries to the client itself.
    context.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    context.set_info_callback(_note_certificate_request)
    context.set_default_verify_paths()
    for path in trust.extra_ca_files:
        context.load_verify_locations(str(path))
    return context


# The upstream connections whose server sent a CertificateRequest: it asked for a client certificate.
_ASKED: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()


def _note_certificate_request(conn: SSL.Connection, where: int, ret: int) -> None:
    if where & SSL.SSL_CB_LOOP and b"certificate request" in conn.get_state_string():
        _ASKED.add(conn)


def client_certificate_requested(conn: SSL.Connection) -> bool:
    """Whether CONN's upstream asked for a client certificate (sent a CertificateRequest)."""
    return conn in _ASKED


def _record_verify_error(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
    if not ok:
        conn.get_app_data().append(trust.VerifyError(code, depth))
    return True


def refuse_verify_errors(conn: SSL.Connection) -> None:
    """Make a verification error fail CONN's handshake, where the context only records it: for an
    upstream connection that must verify as the one before it did, since no request may reach an
    upstream bumper has not verified. Except a missing issuer, which an AIA fetch may complete:
    the verdict, after the handshake, decides that one."""
    conn.set_verify(SSL.VERIFY_PEER, _refuse_verify_error)


def _refuse_verify_error(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
    _record_verify_error(conn, cert, code, depth, ok)
    return bool(ok) or trust.missing_issuer([trust.VerifyError(code, depth)]) is not None


def expect_hostname(conn: SSL.Connection, name: str) -> None:
    """Send NAME as SNI (unless it is an IP address) and make OpenSSL verify the certificate covers it."""
    param = _lib.SSL_get0_param(conn._ssl)
    _lib.X509_VERIFY_PARAM_set_hostflags(param, _HOSTFLAGS)
    try:
        ip = ipaddress.ip_address(name).packed
    except ValueError:
        host = names.normalize(name).encode()  # A-labels (UTS #46), as the certificate names it
        conn.set_tlsext_host_name(host)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, host, len(host))
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))
    SSL._openssl_assert(ok == 1)


def drop_record_buffers(conn: SSL.Connection) -> bool:
    """Give CONN, idle, a new pair of memory BIOs and free the old: whether it did. mitmproxy drives
    every TLS connection through two memory BIOs, and an OpenSSL memory BIO keeps the largest buffer
    it ever held: after one 64 KiB body, about 150 KiB per bumped connection for as long as it lives
    (SSL_MODE_RELEASE_BUFFERS frees OpenSSL's own record buffers, not these). Only when both are
    empty: bytes in either would be lost."""
    into, out = conn._into_ssl, conn._from_ssl
    if into is None or out is None:
        return False  # a socket-backed connection: no memory BIOs
    pending = _ffi.new("char **")
    if _lib.BIO_get_mem_data(into, pending) or _lib.BIO_get_mem_data(out, pending):
        return False
    new_into, new_out = _lib.BIO_new(_lib.BIO_s_mem()), _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:  # out of memory: keep the old pair
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(conn._ssl, new_into, new_out)  # frees the old pair
    conn._into_ssl, conn._from_ssl = new_into, new_out
    return True
