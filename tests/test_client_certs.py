"""Upstreams that ask for a client certificate: a rule's `client_cert: FILE.pem` (the certificate, its
chain and key) is presented to them; without one, the log says the upstream asked for one."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests import pki
from tests.conftest import Bumper, Pki, curl, start_with_policy, tcp_server


@pytest.fixture(scope="module")
def client_ca() -> pki.Authority:
    """The CA the mTLS upstream takes client certificates from (not bumper's, not the tests' root)."""
    return pki.Authority.root("mesh client CA")


@pytest.fixture(scope="module", params=["1.2", "1.3"])
def mtls_upstream(
    request: pytest.FixtureRequest, test_pki: Pki, client_ca: pki.Authority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """An upstream (TLS 1.2 or 1.3) that requires a client certificate from CLIENT_CA and answers with
    the subject of the one it got."""
    directory = tmp_path_factory.mktemp("mtls")
    cert, key = test_pki.root.leaf("mtls.test").write(directory, "server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca.write_cert(directory / "client-ca.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    version = ssl.TLSVersion.TLSv1_2 if request.param == "1.2" else ssl.TLSVersion.TLSv1_3
    context.minimum_version = context.maximum_version = version

    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                subject = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
                body = f"hello {subject}".encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (ssl.SSLError, OSError):
            pass  # a client without a certificate: refused by the handshake

    yield from tcp_server(handle, max_connections=20)


def client_cert_file(client_ca: pki.Authority, directory: Path) -> Path:
    leaf = client_ca.leaf("bumper-egress", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    cert, key = leaf.write(directory, "client")
    combined = directory / "client-combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    combined.chmod(0o600)
    return combined


def test_a_rule_presents_its_client_certificate(
    start_bumper: Callable[..., Bumper], mtls_upstream: int, client_ca: pki.Authority, tmp_path: Path
) -> None:
    policy = f"""
default: bump
rules:
  - name: mesh
    match: {{sni: ["mtls.test"]}}
    action: bump
    client_cert: {client_cert_file(client_ca, tmp_path)}
"""
    bumper = start_with_policy(start_bumper, tmp_path, policy)
    result = curl(bumper, f"https://mtls.test:{mtls_upstream}/")
    assert result.stdout == "hello bumper-egress", result.stderr


def test_without_one_the_log_says_the_upstream_asked(
    start_bumper: Callable[..., Bumper], mtls_upstream: int, tmp_path: Path
) -> None:
    bumper = start_with_policy(start_bumper, tmp_path, "default: bump\n")
    result = curl(bumper, f"https://mtls.test:{mtls_upstream}/")
    assert "hello" not in result.stdout
    lines = [line for line in bumper.process.lines if " mtls.test:" in line and "outcome=" in line]
    assert lines, bumper.process.log
    assert lines[-1].endswith(" (the upstream asked for a client certificate: give the rule one with client_cert:)")


def test_client_cert_is_checked_with_the_policy(tmp_path: Path, client_ca: pki.Authority) -> None:
    from bumper.errors import ConfigError
    from bumper.policy.load import load

    path = tmp_path / "policy.yaml"
    cert_only = tmp_path / "cert-only.pem"
    cert_only.write_bytes(client_cert_file(client_ca, tmp_path).read_bytes().split(b"-----BEGIN PRIVATE KEY")[0])
    path.write_text(
        "default: bump\nrules:\n"
        f"  - match: {{sni: [a.test]}}\n    action: bump\n    client_cert: {cert_only}\n"
        f"  - match: {{sni: [b.test]}}\n    action: splice\n    client_cert: {client_cert_file(client_ca, tmp_path)}\n"
    )
    with pytest.raises(ConfigError) as e:
        load(path)
    first, second = str(e.value).splitlines()
    assert first.startswith(f"{path}:5:18: rules[0].client_cert: {cert_only}: expected one PEM private key")
    assert second == (
        f"{path}:8:18: rules[1].client_cert: only a bumped connection has bumper's own upstream handshake;"
        " this rule's action is splice"
    )
