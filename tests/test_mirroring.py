"""The same error as direct, for every failure (issue 15, section 3): an upstream whose certificate
a client refuses directly for a weak RSA key (66), a SHA-1 signature (68), an untrusted root sent in
the chain (19) or an unknown critical extension (34) is refused through bumper with the same error,
and where a client accepts it directly (a lowered security level), it accepts the mimic too.

Each case is tried with two real clients, curl and Python's ssl, directly (trusting the tests' root)
and through a live bumper (trusting bumper's CA)."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from bumper.certs import keys
from tests import pki
from tests.conftest import Bumper, Pki, Upstream, open_tunnel
from tests.test_trust import curl_verdict, log_field

UNKNOWN_CRITICAL = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.34"), b"\x05\x00")


def _sha1_leaf(root: pki.Authority, host: str) -> pki.Leaf:
    leaf = root.leaf(host)
    return pki.Leaf(leaf.key, pki.resigned_with_sha1(leaf.cert, root), root)


def _sends_an_unknown_root(root: pki.Authority, host: str) -> pki.Leaf:
    stranger = pki.Authority.root("a root nobody trusts, sent by the upstream")
    leaf = stranger.leaf(host)
    return pki.Leaf(leaf.key, leaf.cert, stranger, chain=(stranger.cert,))


# case: (host, the upstream's leaf, OpenSSL's error directly, verify= reason, accepted at SECLEVEL 0)
MIRRORED: dict[str, tuple[str, Callable[[pki.Authority, str], pki.Leaf], int, str, bool]] = {
    "rsa-1024": ("rsa1024.test", lambda root, host: root.leaf(host, key=pki.rsa_key(1024)), 66, "weak_key", True),
    "sha1-signed": ("sha1.mirror.test", _sha1_leaf, 68, "weak_signature", True),
    "unknown-root-sent": ("rootsent.test", _sends_an_unknown_root, 19, "unknown_issuer", False),
    "unknown-critical-extension": (
        "critical.test",
        lambda root, host: root.leaf(host, extra=((UNKNOWN_CRITICAL, True),)),
        34,
        "other",
        False,
    ),
}


@pytest.fixture(scope="module")
def mirrored(start_upstream, test_pki: Pki) -> dict[str, Upstream]:
    return {case: start_upstream(make(test_pki.root, host), host=host) for case, (host, make, *_) in MIRRORED.items()}


def python_handshake(sock: socket.socket, cafile: Path, host: str, seclevel: int | None = None) -> tuple[int, bytes]:
    """Python's verify_code for a handshake over SOCK (0: verified) and, when it verified, the
    response to one GET. SECLEVEL lowers OpenSSL's security level, as an old client would."""
    context = ssl.create_default_context(cafile=str(cafile))
    if seclevel is not None:
        context.set_ciphers(f"DEFAULT:@SECLEVEL={seclevel}")
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
            return 0, response
    except ssl.SSLCertVerificationError as e:
        return e.verify_code, b""


def direct_socket(upstream: Upstream) -> socket.socket:
    return socket.create_connection(("127.0.0.1", upstream.port), timeout=15)


@pytest.mark.parametrize("case", list(MIRRORED))
def test_curl_is_refused_with_the_error_it_gets_directly(
    case: str, mirrored: dict[str, Upstream], bumper: Bumper, test_pki: Pki
) -> None:
    _, _, code, reason, _ = MIRRORED[case]
    upstream = mirrored[case]
    resolve = f"{upstream.host}:{upstream.port}:127.0.0.1"
    direct = curl_verdict(["--cacert", str(test_pki.root_pem), "--resolve", resolve], upstream.url("/"))
    proxied = curl_verdict(["--cacert", str(bumper.ca_pem), "-x", bumper.proxy], upstream.url("/"))
    assert direct[:2] == (60, str(code))
    assert proxied[:2] == direct[:2]
    assert log_field(bumper.connection_line(int(proxied[2])), "verify") == reason


@pytest.mark.parametrize("case", list(MIRRORED))
def test_python_is_refused_with_the_error_it_gets_directly(
    case: str, mirrored: dict[str, Upstream], bumper: Bumper, test_pki: Pki
) -> None:
    _, _, code, _, _ = MIRRORED[case]
    upstream = mirrored[case]
    direct = python_handshake(direct_socket(upstream), test_pki.root_pem, upstream.host)
    tunnel, _ = open_tunnel(bumper, upstream.host, upstream.port)
    assert python_handshake(tunnel, bumper.ca_pem, upstream.host) == direct == (code, b"")


@pytest.mark.parametrize("case", list(MIRRORED))
def test_a_client_that_accepts_it_directly_accepts_the_mimic_and_no_other(
    case: str, mirrored: dict[str, Upstream], bumper: Bumper, test_pki: Pki
) -> None:
    """At OpenSSL's security level 0 a weak key and a SHA-1 signature pass, directly and through
    bumper alike; an untrusted root or an unknown critical extension fail at every level, both ways."""
    _, _, code, _, accepted = MIRRORED[case]
    upstream = mirrored[case]
    direct_code, direct_response = python_handshake(direct_socket(upstream), test_pki.root_pem, upstream.host, 0)
    tunnel, _ = open_tunnel(bumper, upstream.host, upstream.port)
    proxied_code, proxied_response = python_handshake(tunnel, bumper.ca_pem, upstream.host, 0)
    assert direct_code == proxied_code == (0 if accepted else code)
    if accepted:
        assert direct_response.endswith(b"hello from upstream") and proxied_response.endswith(b"hello from upstream")


def served_chain(bumper: Bumper, upstream: Upstream) -> list[x509.Certificate]:
    """The certificates bumper serves for UPSTREAM, leaf first, as a client that checks nothing sees them."""
    tunnel, _ = open_tunnel(bumper, upstream.host, upstream.port)
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)  # pyOpenSSL: Python 3.12's ssl cannot show an unverified chain
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    conn = SSL.Connection(context, tunnel)
    conn.set_tlsext_host_name(upstream.host.encode())
    conn.set_connect_state()
    deadline = time.monotonic() + 15
    while True:  # the tunnel has a timeout, which pyOpenSSL treats as non-blocking
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            assert select.select([tunnel], [], [], max(0.0, deadline - time.monotonic()))[0], "handshake timed out"
    chain = [cert.to_cryptography() for cert in conn.get_peer_cert_chain() or []]
    conn.close()
    tunnel.close()
    return chain


def test_the_mimic_of_a_weak_key_has_a_weak_key_of_its_own(mirrored: dict[str, Upstream], bumper: Bumper) -> None:
    """RSA-1024, made for this mimic: not the upstream's key, not any other mimic's."""
    weak = served_chain(bumper, mirrored["rsa-1024"])[0]
    others = [served_chain(bumper, mirrored[case])[0] for case in ("sha1-signed", "unknown-critical-extension")]
    assert keys.describe(weak.public_key()) == "RSA-1024"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    upstream_key = mirrored["rsa-1024"].leaf.cert.public_key().public_bytes(der, spki)
    assert weak.public_key().public_bytes(der, spki) != upstream_key
    assert all(weak.public_key().public_bytes(der, spki) != o.public_key().public_bytes(der, spki) for o in others)


def test_an_unknown_root_sent_upstream_is_answered_with_bumpers_untrusted_root(
    mirrored: dict[str, Upstream], bumper: Bumper
) -> None:
    chain = served_chain(bumper, mirrored["unknown-root-sent"])
    untrusted = x509.load_pem_x509_certificate((bumper.ca_dir / "untrusted.pem").read_bytes())
    assert chain[1:] == [untrusted]
    chain[0].verify_directly_issued_by(untrusted)
    # a trusted upstream still gets the usual chain: the mimic alone
    assert len(served_chain(bumper, mirrored["unknown-critical-extension"])) == 1


def test_an_unknown_critical_extension_is_copied_critical(mirrored: dict[str, Upstream], bumper: Bumper) -> None:
    mimic = served_chain(bumper, mirrored["unknown-critical-extension"])[0]
    copied = mimic.extensions.get_extension_for_oid(UNKNOWN_CRITICAL.oid)
    assert (copied.critical, copied.value.value) == (True, UNKNOWN_CRITICAL.value)
    assert "bumper CA" in mimic.issuer.rfc4514_string()  # the trusted CA: the extension alone fails it
