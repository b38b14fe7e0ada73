"""Upstreams that ask for a client certificate: a rule's `client_cert: FILE.pem` (the certificate, its
chain and key) is presented to them; without one, the log says the upstream asked for one."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests import pki
from tests.conftest import Bumper, Pki, Upstream, curl, curl_direct, lab_policy, start_with_policy, tcp_server


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
    result = curl(bumper, f"https://mtls.test:{mtls_upstream}/", "-w", "\n%{local_port}")
    assert "hello" not in result.stdout
    line = bumper.connection_line(int(result.stdout.rsplit("\n", 1)[1]))
    assert line.endswith(" (the upstream asked for a client certificate: give the rule one with client_cert:)")


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


# -- clients that must present a certificate (match: client_cert) --------------------------------------

MESH_ADDRESS = "127.0.0.8"


@dataclass
class MeshGateway:
    bumper: Bumper
    port: int
    directory: Path


@pytest.fixture(scope="module")
def mesh_gateway(
    start_bumper: Callable[..., Bumper],
    upstream: Upstream,
    client_ca: pki.Authority,
    tmp_path_factory: pytest.TempPathFactory,
) -> MeshGateway:
    """An SNI gateway that serves only clients with a certificate from the mesh's CA, named *.mesh.test."""
    directory = tmp_path_factory.mktemp("mesh")
    mesh_ca = client_ca.write_cert(directory / "mesh-ca.pem")
    policy = f"""
default: block
rules:
  - name: mesh only
    match:
      sni: ["*.upstream.test"]
      listener: [sni]
      client_cert: {{ca: {mesh_ca}, names: ["*.mesh.test"]}}
    action: bump
"""
    path = directory / "policy.yaml"
    path.write_text(lab_policy(policy))
    bumper = start_bumper("--policy", str(path), "--listen", f"sni:{upstream.port}@{MESH_ADDRESS}:0")
    port = int(
        bumper.process.wait_for_line(rf"bumper: sni listening on {MESH_ADDRESS.replace('.', '[.]')}:(\d+)").group(1)
    )
    return MeshGateway(bumper, port, directory)


def mesh_client(authority: pki.Authority, name: str, directory: Path) -> tuple[Path, Path]:
    return authority.leaf(name, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)).write(directory, name)


def curl_mesh(gateway: MeshGateway, *cert: Path) -> subprocess.CompletedProcess[str]:
    name = "svc.upstream.test"
    args = ["--cert", str(cert[0]), "--key", str(cert[1])] if cert else []
    return curl_direct(MESH_ADDRESS, gateway.port, name, gateway.bumper.ca_pem, *args, "-w", "\n%{local_port}")


def mesh_line(gateway: MeshGateway, result: subprocess.CompletedProcess[str]) -> str:
    """The connection line of the client curl_mesh ran (curl prints its port, failed or not)."""
    return gateway.bumper.connection_line(int(result.stdout.rsplit("\n", 1)[1]), kind="TLS")


def test_a_mesh_client_with_the_right_certificate_is_served(
    mesh_gateway: MeshGateway, client_ca: pki.Authority, tmp_path: Path
) -> None:
    result = curl_mesh(mesh_gateway, *mesh_client(client_ca, "orders.mesh.test", tmp_path))
    body, client_port = result.stdout.rsplit("\n", 1)
    assert body == "hello from upstream", result.stderr
    assert mesh_line(mesh_gateway, result).endswith("outcome=ok")
    said = f"127.0.0.1:{client_port}: client certificate CN=orders.mesh.test,O=bumper tests"
    assert mesh_gateway.bumper.process.log.count(said) == 1


def test_a_client_without_a_certificate_is_refused(mesh_gateway: MeshGateway) -> None:
    result = curl_mesh(mesh_gateway)
    assert result.returncode != 0
    assert mesh_line(mesh_gateway, result).endswith(
        "outcome=client TLS failed: no client certificate, and the rule requires one (match: client_cert)"
    )


def test_a_client_certificate_from_another_ca_is_refused(mesh_gateway: MeshGateway, tmp_path: Path) -> None:
    stranger = pki.Authority.root("another CA")
    result = curl_mesh(mesh_gateway, *mesh_client(stranger, "orders.mesh.test", tmp_path))
    # TLS 1.3: curl's side of the handshake is over before bumper checks the certificate; bumper's alert
    # reaches curl, or, on a loaded machine, the close's reset overtakes it (errno 107). Refused either way.
    assert result.returncode != 0 and ("alert" in result.stderr or "errno 107" in result.stderr), result.stderr
    assert (
        "outcome=client certificate refused: client certificate CN=orders.mesh.test,O=bumper tests does not"
        " chain to the rule's CA (" in mesh_line(mesh_gateway, result)
    )


def test_a_client_certificate_with_another_name_is_refused(
    mesh_gateway: MeshGateway, client_ca: pki.Authority, tmp_path: Path
) -> None:
    result = curl_mesh(mesh_gateway, *mesh_client(client_ca, "intruder.example", tmp_path))
    assert result.returncode != 0
    assert mesh_line(mesh_gateway, result).endswith(
        "outcome=client certificate refused: client certificate CN=intruder.example,O=bumper tests names none"
        " of *.mesh.test"
    )


def test_match_client_cert_is_checked_with_the_policy(tmp_path: Path, client_ca: pki.Authority) -> None:
    from bumper.errors import ConfigError
    from bumper.policy.load import load

    ca = client_ca.write_cert(tmp_path / "mesh-ca.pem")
    path = tmp_path / "policy.yaml"
    path.write_text(
        "default: block\nrules:\n"
        f"  - match: {{client_cert: {{ca: {ca}}}}}\n    action: splice\n"
        f"  - match: {{client_cert: {{ca: {tmp_path / 'missing.pem'}, names: ['bad*name']}}}}\n    action: bump\n"
    )
    with pytest.raises(ConfigError) as e:
        load(path)
    problems = str(e.value).splitlines()
    assert problems[0].startswith(f"{path}:3:12: rules[0].match: client_cert: only a bumped connection has")
    assert f"rules[1].match.client_cert.ca: {tmp_path / 'missing.pem'}: cannot read" in problems[1]
    assert "rules[1].match.client_cert.names: bad name, glob or regex 'bad*name'" in problems[2]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_a_client_that_must_present_a_certificate_never_resumes(
    mesh_gateway: MeshGateway, client_ca: pki.Authority, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Its certificate is checked (its dates too) and named in the log on every connection: a session
    it offers makes a full handshake, which asks for the certificate again, and succeeds."""
    context = ssl.create_default_context(cafile=str(mesh_gateway.bumper.ca_pem))
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(*mesh_client(client_ca, "orders.mesh.test", tmp_path))
    session = None
    for _ in range(2):
        with socket.create_connection((MESH_ADDRESS, mesh_gateway.port), timeout=10) as sock:
            tls = context.wrap_socket(sock, server_hostname="svc.upstream.test", session=session)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: svc.upstream.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.endswith(b"hello from upstream") and not tls.session_reused
            port = tls.getsockname()[1]
            said = f"127.0.0.1:{port}: client certificate CN=orders.mesh.test"
            assert mesh_gateway.bumper.connection_line(port, kind="TLS").endswith("outcome=ok")
            assert said in mesh_gateway.bumper.process.log
            session = tls.session
            tls.close()
