"""Seed 000 end to end: client -> relay A (explicit listener) -> a firewall that lets one SNI out -> relay
B (relay listener, mTLS required) -> a service with its own CA. Spliced, nothing is decrypted at A or B
and the client verifies the service itself; bumped, A's addons act; plain http:// goes through too."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from mitmproxy.proxy.layers.tls import parse_client_hello

from tests import pki
from tests.conftest import Bumper, Pki, Upstream, lab_policy, pipe, tcp_server

RELAY_NAME = "relay-b.example.test"  # the one SNI the firewall lets out
SERVICE = "private.service.example.test"  # behind B, with its own CA
HELLO_LIMIT = 16384


@dataclass
class Firewall:
    """Reads each connection's ClientHello and passes it on to B only if its SNI is RELAY_NAME; every
    other connection is dropped. It records every SNI it saw (None: no ClientHello it could read)."""

    target: tuple[str, int]  # B
    port: int = 0
    seen: list[str | None] = field(default_factory=list)

    def handle(self, conn: socket.socket) -> None:
        data = b""
        hello = None
        while len(data) < HELLO_LIMIT and (chunk := conn.recv(4096)):
            data += chunk
            try:
                hello = parse_client_hello(data)
            except ValueError:
                break
            if hello is not None:
                break
        sni = hello.sni if hello else None
        self.seen.append(sni)
        if sni != RELAY_NAME:
            return  # dropped
        with socket.create_connection(self.target, timeout=10) as b:
            b.sendall(data)
            pipe(conn, b)


@dataclass
class Sites:
    b: Bumper
    firewall: Firewall
    service: Upstream
    service_ca: Path
    relay_ca: Path  # what B's certificate chains to
    a_client_cert: Path
    directory: Path
    start_bumper: Callable[..., Bumper]
    a: Bumper | None = None  # the splicing A most tests share

    def start_a(self, rule: str, client_cert: bool = True, port: int | None = None) -> Bumper:
        """A (explicit listener) whose policy sends RULE's connections via B, through the firewall
        (or to PORT, where B is not)."""
        cert = f"\n    client_cert: {self.a_client_cert}" if client_cert else ""
        path = self.directory / f"a-{len(list(self.directory.glob('a-*.yaml')))}.yaml"
        path.write_text(lab_policy(f"""
relays:
  b:
    url: https://{RELAY_NAME}:{port or self.firewall.port}
    ca: {self.relay_ca}{cert}
rules:
{rule}
"""))  # fmt: skip
        return self.start_bumper(
            "--policy", str(path), "--resolve", f"{RELAY_NAME}=127.0.0.1:{port or self.firewall.port}",
            "--upstream-ca", str(self.service_ca),
        )  # fmt: skip


SPLICE_VIA_B = """
  - name: private services through B
    match: {sni: ["*.service.example.test"]}
    action: splice
    via: b
"""


@pytest.fixture(scope="module")
def service_ca() -> pki.Authority:
    return pki.Authority.root("private services CA")


@pytest.fixture(scope="module")
def sites(
    start_bumper: Callable[..., Bumper],
    start_upstream: Callable[..., Upstream],
    service_ca: pki.Authority,
    test_pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Sites]:
    directory = tmp_path_factory.mktemp("seed000")
    service = start_upstream(service_ca.leaf(SERVICE), host=SERVICE)
    service_ca_pem = service_ca.write_cert(directory / "service-ca.pem")
    # B: the relay listener, its certificate from the test root for the relay's name, mTLS from A only.
    relays_ca = pki.Authority.root("customer relays CA")
    a_cert, a_key = relays_ca.leaf("relay-a", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)).write(directory, "relay-a")
    (directory / "a-client.pem").write_bytes(a_cert.read_bytes() + a_key.read_bytes())
    (directory / "a-client.pem").chmod(0o600)
    b_cert, b_key = test_pki.root.leaf(RELAY_NAME).write(directory, "relay-b")
    (directory / "relay-b.pem").write_bytes(b_cert.read_bytes() + b_key.read_bytes())
    b_policy = directory / "b.yaml"
    b_policy.write_text(lab_policy("""
default: block
rules:
  - name: customer services
    match: {sni: ["*.service.example.test"], listener: [relay]}
    action: splice
  - name: customer plain http
    match: {host: ["*.service.example.test"], listener: [relay]}
    action: bump
"""))  # fmt: skip
    b = start_bumper(
        "--policy", str(b_policy), "--listen", "relay@127.0.0.3:0",
        "--tls-cert", f"127.0.0.3:0={directory / 'relay-b.pem'}",
        "--client-ca", str(relays_ca.write_cert(directory / "relays-ca.pem")),
        "--upstream-ca", str(service_ca_pem),
    )  # fmt: skip
    b_port = int(b.process.wait_for_line(r"bumper: relay listening on 127\.0\.0\.3:(\d+)").group(1))
    firewall = Firewall(("127.0.0.3", b_port))
    server = tcp_server(firewall.handle, max_connections=200, concurrent=True)
    firewall.port = next(server)
    sites = Sites(
        b, firewall, service, service_ca_pem, test_pki.root_pem, directory / "a-client.pem", directory, start_bumper
    )
    sites.a = sites.start_a(SPLICE_VIA_B)
    yield sites
    next(server, None)  # stops the firewall


def curl_via(a: Bumper, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-x", a.proxy, *args, "-w", "\n%{local_port}", url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_spliced_tls_crosses_the_firewall_inside_the_relays_tls(sites: Sites) -> None:
    before = len(sites.firewall.seen)
    assert sites.a is not None
    r = curl_via(sites.a, f"https://{SERVICE}:{sites.service.port}/", "--cacert", str(sites.service_ca), "-v")
    body, client_port = r.stdout.rsplit("\n", 1)
    assert body == "hello from upstream", r.stderr
    # The client verified the service's own certificate: nothing was decrypted at A or B.
    assert "issuer: O=bumper tests; CN=private services CA" in r.stderr, r.stderr
    # The firewall saw only the relay's name.
    assert sites.firewall.seen[before:] == [RELAY_NAME]
    line = sites.a.connection_line(int(client_port))
    assert " via=b " in line and "action=splice" in line and line.endswith("outcome=ok"), line
    b_line = sites.b.process.wait_for_line(rf"CONNECT {SERVICE}:{sites.service.port} listener=relay@127\.0\.0\.3")
    assert "action=splice" in b_line.string, b_line.string


def test_a_client_naming_the_service_directly_is_dropped_by_the_firewall(sites: Sites) -> None:
    """What the seed's operator saw before: TLS with the service's own SNI does not get out."""
    with socket.create_connection(("127.0.0.1", sites.firewall.port), timeout=10) as sock:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ssl.create_default_context(cafile=str(sites.service_ca)).wrap_socket(sock, server_hostname=SERVICE)
    assert sites.firewall.seen[-1] == SERVICE


def test_bumped_at_a_through_b_carries_as_addons_effects(sites: Sites) -> None:
    """Bumped: decrypted and inspected at A (its addons act), re-encrypted to the service through B,
    which passes A's TLS on untouched (its rule splices): A verified the service's own certificate."""
    a = sites.start_a("""
  - name: inspected, then through B
    match: {sni: ["*.service.example.test"]}
    action: bump
    via: b
    addons:
      - headers: {response: {set: {x-inspected-by: relay-a}}}
      - block: {urls: ["*.service.example.test/secret*"]}
""")  # fmt: skip
    before = len(sites.firewall.seen)
    r = curl_via(a, f"https://{SERVICE}:{sites.service.port}/", "--cacert", str(a.ca_pem), "-i")
    head, client_port = r.stdout.rsplit("\n", 1)
    assert "x-inspected-by: relay-a" in head.lower() and head.endswith("hello from upstream"), r.stderr
    line = a.connection_line(int(client_port))
    assert " via=b " in line and "action=bump" in line and "verify=trusted" in line, line
    r = curl_via(a, f"https://{SERVICE}:{sites.service.port}/secret", "--cacert", str(a.ca_pem), "-i")
    assert "\nHTTP/2 403 " in r.stdout and "blocked by policy" in r.stdout, r.stdout  # after the CONNECT's 200
    assert set(sites.firewall.seen[before:]) == {RELAY_NAME}


def test_plain_http_goes_through_b(sites: Sites, plain_http_origin: int) -> None:
    a = sites.start_a("""
  - name: plain services through B
    match: {host: ["*.service.example.test"]}
    action: bump
    via: b
""")  # fmt: skip
    r = curl_via(a, f"http://plain.service.example.test:{plain_http_origin}/")
    body, client_port = r.stdout.rsplit("\n", 1)
    assert body == "plain hello", r.stderr
    assert " via=b " in a.connection_line(int(client_port), kind="HTTP")
    sites.b.process.wait_for_line(rf"HTTP plain\.service\.example\.test:{plain_http_origin} listener=relay@")


def test_a_without_its_client_certificate_is_refused_by_b(sites: Sites) -> None:
    a = sites.start_a(SPLICE_VIA_B, client_cert=False)
    r = curl_via(a, f"https://{SERVICE}:{sites.service.port}/", "--cacert", str(sites.service_ca))
    assert r.returncode != 0 and "CONNECT tunnel failed, response 502" in r.stderr, r.stderr
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]))
    # B's alert (certificate required), or the reset of B's close when A's CONNECT was already on its
    # way: TLS 1.3 ends the client's side of the handshake before the server has checked it.
    outcome = f"outcome=upstream connect failed: relay b (https://{RELAY_NAME}:{sites.firewall.port}): "
    assert outcome + "TLS failed: tlsv13 alert certificate required" in line or outcome + "Connection reset" in line
    sites.b.process.wait_for_line(
        r"listener=relay@127\.0\.0\.3:\d+ .*outcome=client certificate required by --client-ca"
    )


def test_b_down_gives_a_clean_502(sites: Sites) -> None:
    nothing = socket.socket()
    nothing.bind(("127.0.0.1", 0))
    port = nothing.getsockname()[1]
    nothing.close()  # nobody listens there
    a = sites.start_a(SPLICE_VIA_B, port=port)
    r = curl_via(a, f"https://{SERVICE}:{sites.service.port}/", "--cacert", str(sites.service_ca))
    assert "CONNECT tunnel failed, response 502" in r.stderr, r.stderr
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]))
    assert f"relay b (https://{RELAY_NAME}:{port}): Connection refused" in line, line
