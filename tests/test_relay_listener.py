"""The relay listener (`--listen relay@HOST:PORT`): an HTTPS proxy, as curl's `--proxy https://` speaks
it. bumper's own TLS first (a certificate from its CA for the name asked, or --tls-cert's), then the
explicit proxy inside it: CONNECT decided, bumped or spliced, plain http:// requests; with
--client-ca, only clients with a certificate from that CA (mTLS between relays, issue 17)."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests import pki
from tests.conftest import BUMPER, Bumper, Pki, Upstream, client_tls_context, lab_policy
from tests.test_cli import assert_config_error
from tests.test_limits import closed_within
from tests.test_proxy_auth import bcrypt_hash

RELAY = "127.0.0.9"  # the relay listener without --client-ca
MTLS_RELAY = "127.0.0.10"  # the one with --client-ca and its own certificate (--tls-cert)
MTLS_RELAY_NAME = "relay-b.example"  # its certificate's name (outside *.test, which the tests resolve to 127.0.0.1)
# An allow-list: the relay's own handshake (SNI relay.test, or none) is no connection the policy
# decides, so it is not refused by `default: block`.
POLICY = """
default: block
rules:
  - name: no-evil
    match: {host: [evil.upstream.test]}
    action: block
  - name: bank
    match: {sni: [bank.upstream.test, vault.upstream.test]}
    action: splice
  - name: inspected
    match: {host: [upstream.test, 127.0.0.1]}
    action: bump
    addons:
      - headers: {response: {set: {X-Inspected: by-the-relay}}}
"""


@dataclass
class Relay:
    bumper: Bumper
    port: int
    address: str
    name: str | None = None  # the proxy's name in its URL (resolving to ADDRESS); None: the address

    @property
    def proxy(self) -> str:
        return f"https://{self.name or self.address}:{self.port}"


def relay_port(bumper: Bumper, address: str) -> int:
    return int(
        bumper.process.wait_for_line(rf"bumper: relay listening on {address.replace('.', '[.]')}:(\d+)").group(1)
    )


@pytest.fixture(scope="module")
def relay(start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory) -> Relay:
    path = tmp_path_factory.mktemp("relay") / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper("--policy", str(path), "--listen", f"relay@{RELAY}:0")
    return Relay(bumper, relay_port(bumper, RELAY), RELAY)


@pytest.fixture(scope="module")
def relay_ca() -> pki.Authority:
    """The CA whose certificates the mTLS relay takes (its clients: other relays)."""
    return pki.Authority.root("relay client CA")


@pytest.fixture(scope="module")
def own_server_cert(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mTLS relay's own certificate (chain and key in one file), from the tests' root."""
    directory = tmp_path_factory.mktemp("relay-own")
    cert, key = test_pki.root.leaf(MTLS_RELAY_NAME).write(directory, "relay-b")
    combined = directory / "relay-b-combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    combined.chmod(0o600)
    return combined


@pytest.fixture(scope="module")
def mtls_relay(
    start_bumper: Callable[..., Bumper],
    relay_ca: pki.Authority,
    own_server_cert: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Relay:
    directory = tmp_path_factory.mktemp("mtls-relay")
    path = directory / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper(
        "--policy", str(path),
        "--listen", f"relay@{MTLS_RELAY}:0",
        "--tls-cert", f"{MTLS_RELAY}:0={own_server_cert}",
        "--client-ca", str(relay_ca.write_cert(directory / "relay-ca.pem")),
    )  # fmt: skip
    return Relay(bumper, relay_port(bumper, MTLS_RELAY), MTLS_RELAY, MTLS_RELAY_NAME)


def curl_relay(relay: Relay, url: str, proxy_ca: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """curl to URL through RELAY as its HTTPS proxy (trusting PROXY_CA for the proxy), printing its
    local port last, failed or not."""
    resolve = ["--resolve", f"{relay.name}:{relay.port}:{relay.address}"] if relay.name else []
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "30", *resolve, "--proxy", relay.proxy, "--proxy-cacert", str(proxy_ca),
            *args, "-w", "\n%{local_port}", url,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def split(result: subprocess.CompletedProcess[str]) -> tuple[str, int]:
    """The body curl printed and its local port."""
    body, port = result.stdout.rsplit("\n", 1)
    return body, int(port)


def test_bumped_through_the_relay(relay: Relay, upstream: Upstream, tmp_path: Path) -> None:
    """The client trusts bumper's CA for both the proxy and the bumped site: the inner TLS is a mimic,
    and the rule's addons see the requests."""
    ca, headers = relay.bumper.ca_pem, tmp_path / "headers"
    result = curl_relay(relay, upstream.url(), ca, "--cacert", str(ca), "-D", str(headers))
    body, port = split(result)
    assert body == "hello from upstream", result.stderr + relay.bumper.process.log
    assert "x-inspected: by-the-relay" in headers.read_text().lower()
    line = relay.bumper.connection_line(port)
    assert (
        f" CONNECT upstream.test:{upstream.port} listener=relay@{RELAY}:{relay.port} user=- sni=upstream.test " in line
    )
    assert "action=bump rule=inspected verify=trusted" in line and line.endswith("outcome=ok"), line


def test_spliced_through_the_relay(relay: Relay, upstream: Upstream, test_pki: Pki) -> None:
    """A splice rule inside the relay: the upstream's own certificate reaches the client, which
    trusts only the upstream's root for the site (and bumper's CA for the proxy)."""
    url = f"https://bank.upstream.test:{upstream.port}/"
    result = curl_relay(relay, url, relay.bumper.ca_pem, "--cacert", str(test_pki.root_pem))
    body, port = split(result)
    assert body == "hello from upstream", result.stderr
    assert "sni=bank.upstream.test action=splice rule=bank" in relay.bumper.connection_line(port)


def test_plain_http_through_the_relay(relay: Relay, plain_http_origin: int, tmp_path: Path) -> None:
    """`GET http://...` inside the relay's TLS: a plain proxy request, decided by its host."""
    headers = tmp_path / "headers"
    result = curl_relay(relay, f"http://127.0.0.1:{plain_http_origin}/", relay.bumper.ca_pem, "-D", str(headers))
    body, port = split(result)
    assert body == "plain hello", result.stderr
    assert "x-inspected: by-the-relay" in headers.read_text().lower()
    line = relay.bumper.connection_line(port, kind="HTTP")
    assert f"listener=relay@{RELAY}:{relay.port} user=- sni=- action=bump rule=inspected" in line, line
    assert line.endswith("outcome=ok"), line


def test_a_block_rule_inside_the_relay_answers_403(relay: Relay, upstream: Upstream) -> None:
    ca = relay.bumper.ca_pem
    result = curl_relay(relay, f"https://evil.upstream.test:{upstream.port}/", ca, "--cacert", str(ca))
    assert result.returncode != 0 and "403" in result.stderr, result.stderr
    line = relay.bumper.connection_line(split(result)[1])
    assert "action=block rule=no-evil" in line and "outcome=blocked by policy rule 'no-evil'" in line, line


def test_the_relay_shows_a_certificate_for_the_name_asked(relay: Relay) -> None:
    """By SNI a certificate from bumper's CA for that name, with http/1.1 (CONNECT's) as ALPN."""
    context = client_tls_context(relay.bumper.ca_pem, alpn=["h2", "http/1.1"])
    with socket.create_connection((RELAY, relay.port), timeout=15) as sock:
        with context.wrap_socket(sock, server_hostname="relay.test") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["relay.test"]


def test_plain_http_inside_a_tunnel_is_refused_as_on_the_explicit_listener(
    relay: Relay, plain_http_origin: int
) -> None:
    """A tunnel carries TLS, inside the relay as on the explicit listener: plain HTTP goes as
    `GET http://...`, which the policy sees, not through a CONNECT."""
    context = client_tls_context(relay.bumper.ca_pem)
    with socket.create_connection((RELAY, relay.port), timeout=15) as sock:
        port = sock.getsockname()[1]
        with context.wrap_socket(sock, server_hostname=RELAY) as tls:
            tls.sendall(f"CONNECT 127.0.0.1:{plain_http_origin} HTTP/1.1\r\n\r\n".encode())
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
            tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert tls.recv(4096) == b""
    line = relay.bumper.connection_line(port)
    assert line.endswith("outcome=not TLS: the client sent non-TLS data inside the CONNECT tunnel"), line


def test_non_tls_bytes_to_the_relay_are_refused(relay: Relay) -> None:
    """A client that speaks plain HTTP to the relay port: closed without an answer, one log line."""
    with socket.create_connection((RELAY, relay.port), timeout=15) as sock:
        sock.sendall(b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n")
        assert sock.recv(4096) == b""
        port = sock.getsockname()[1]
    line = relay.bumper.connection_line(port, kind="CONNECT -")
    assert line.endswith("outcome=not TLS: a relay listener takes TLS only (an HTTPS proxy: --proxy https://)"), line


def test_the_request_deadline_runs_through_the_relays_own_handshake(start_bumper: Callable[..., Bumper]) -> None:
    """A client that completes the relay's TLS and then says nothing is closed at --request-timeout:
    the relay's own ClientHello ends no deadline (the CONNECT's ClientHello inside would)."""
    bumper = start_bumper("--listen", f"relay@{RELAY}:0", "--request-timeout", "1")
    context = client_tls_context(bumper.ca_pem)
    with socket.create_connection((RELAY, relay_port(bumper, RELAY)), timeout=15) as sock:
        port = sock.getsockname()[1]
        with context.wrap_socket(sock, server_hostname=RELAY) as tls:
            assert closed_within(tls, 5) == b""
    line = bumper.connection_line(port, kind="CONNECT -")
    assert line.endswith("outcome=limit: no complete request within 1s (--request-timeout)"), line


# -- --client-ca: mTLS between relays ----------------------------------------------------------------


def client_cert(authority: pki.Authority, name: str, directory: Path, **validity: object) -> list[str]:
    cert, key = authority.leaf(name, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), **validity).write(directory, name)  # type: ignore[arg-type]
    return ["--proxy-cert", str(cert), "--proxy-key", str(key)]


def test_a_relay_client_with_the_right_certificate_is_served(
    mtls_relay: Relay, relay_ca: pki.Authority, upstream: Upstream, test_pki: Pki, tmp_path: Path
) -> None:
    """Its own certificate (--tls-cert, from the tests' root) for the proxy; the client's named in the line."""
    ca = mtls_relay.bumper.ca_pem
    args = client_cert(relay_ca, "relay-a.test", tmp_path)
    result = curl_relay(mtls_relay, upstream.url(), test_pki.root_pem, "--cacert", str(ca), *args)
    body, port = split(result)
    assert body == "hello from upstream", result.stderr + mtls_relay.bumper.process.log
    line = mtls_relay.bumper.connection_line(port)
    assert f"listener=relay@{MTLS_RELAY}:{mtls_relay.port} user=- client_cert=relay-a.test sni=upstream.test " in line
    assert line.endswith("outcome=ok"), line


def test_a_relay_client_without_a_certificate_is_refused(mtls_relay: Relay, test_pki: Pki, upstream: Upstream) -> None:
    result = curl_relay(mtls_relay, upstream.url(), test_pki.root_pem)
    assert result.returncode != 0 and "alert" in result.stderr, result.stderr
    line = mtls_relay.bumper.connection_line(split(result)[1], kind="CONNECT -")
    assert line.endswith("outcome=client certificate required by --client-ca"), line


@pytest.mark.parametrize("which", ["another CA", "expired"])
def test_a_relay_client_with_a_wrong_certificate_is_refused(
    mtls_relay: Relay, relay_ca: pki.Authority, test_pki: Pki, upstream: Upstream, tmp_path: Path, which: str
) -> None:
    if which == "expired":
        args = client_cert(
            relay_ca, "relay-a.test", tmp_path, not_before=pki.NOW - 30 * pki.DAY, not_after=pki.NOW - pki.DAY
        )
    else:
        args = client_cert(pki.Authority.root("another CA"), "relay-a.test", tmp_path)
    result = curl_relay(mtls_relay, upstream.url(), test_pki.root_pem, *args)
    assert result.returncode != 0 and "alert" in result.stderr, result.stderr
    line = mtls_relay.bumper.connection_line(split(result)[1], kind="CONNECT -")
    assert "outcome=client certificate CN=relay-a.test,O=bumper tests does not chain to --client-ca (" in line, line
    assert "client_cert=" not in line


# -- configuration errors -----------------------------------------------------------------------------


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUMPER, "--ca", str(tmp_path / "ca"), *args], capture_output=True, text=True, timeout=60)


def test_client_ca_without_a_relay_listener_is_a_configuration_error(tmp_path: Path, relay_ca: pki.Authority) -> None:
    ca = relay_ca.write_cert(tmp_path / "relay-ca.pem")
    assert_config_error(
        run(tmp_path, "--listen", "127.0.0.1:0", "--client-ca", str(ca)), "--client-ca", "no relay listener"
    )


def test_a_bad_client_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    result = run(tmp_path, "--listen", f"relay@{RELAY}:0", "--client-ca", str(bad))
    assert_config_error(result, "--client-ca", str(bad))
    result = run(tmp_path, "--listen", f"relay@{RELAY}:0", "--client-ca", str(tmp_path / "missing.pem"))
    assert_config_error(result, "--client-ca", "missing.pem", "cannot read")


# -- end to end: bumper A's relays: through this relay listener (issue 17's seed 000, in short) ---------


def test_bumper_a_relays_through_the_relay_listener(
    start_bumper: Callable[..., Bumper],
    mtls_relay: Relay,
    relay_ca: pki.Authority,
    upstream: Upstream,
    test_pki: Pki,
    tmp_path: Path,
) -> None:
    """A's `via: b` to this relay (verified by its own certificate's CA, with A's client certificate):
    spliced at A and B, the client verifies the upstream's own certificate; bumped at A (spliced at
    B), the client verifies A's mimic. B names A by its certificate."""
    cert, key = relay_ca.leaf("relay-a.test", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)).write(tmp_path, "a")
    (tmp_path / "a.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    policy = f"""
relays:
  b: {{url: "https://{MTLS_RELAY_NAME}:{mtls_relay.port}", ca: {test_pki.root_pem}, client_cert: {tmp_path / "a.pem"}}}
rules:
  - name: private
    match: {{sni: [bank.upstream.test]}}
    action: splice
    via: b
  - name: inspected
    match: {{sni: [vault.upstream.test]}}
    action: bump
    via: b
"""
    (tmp_path / "a.yaml").write_text(lab_policy(policy))
    a = start_bumper(
        "--policy", str(tmp_path / "a.yaml"), "--resolve", f"{MTLS_RELAY_NAME}={MTLS_RELAY}:{mtls_relay.port}"
    )  # fmt: skip
    for name, cacert, action in (("bank", test_pki.root_pem, "splice"), ("vault", a.ca_pem, "bump")):
        url = f"https://{name}.upstream.test:{upstream.port}/"
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", a.proxy, "--cacert", str(cacert), "-w", "\n%{local_port}", url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        body, port = split(result)
        assert body == "hello from upstream", result.stderr + a.process.log + mtls_relay.bumper.process.log
        assert f"via=b sni={name}.upstream.test action={action}" in a.connection_line(port)
        # B's line, once A's connection to it ends: A's CONNECT, its name from A's client certificate.
        at_b = re.escape(
            f" CONNECT {name}.upstream.test:{upstream.port} listener=relay@{MTLS_RELAY}:{mtls_relay.port} "
        )
        seen = mtls_relay.bumper.process.wait_for_line(at_b + ".*", timeout=10).group(0)
        assert f"client_cert=relay-a.test sni={name}.upstream.test action=splice rule=bank" in seen, seen


def test_a_relay_client_resuming_its_session_shows_its_certificate_again(
    mtls_relay: Relay, relay_ca: pki.Authority, test_pki: Pki, plain_http_origin: int, tmp_path: Path
) -> None:
    """A client that offers to resume its session (as browsers and curl do) gets a full handshake, not
    an internal error: its certificate is checked by --client-ca, and named in the line, each time."""
    cert, key = relay_ca.leaf("relay-a.test", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)).write(tmp_path, "a")
    context = client_tls_context(test_pki.root_pem)
    context.load_cert_chain(cert, key)
    session = None
    for _ in range(2):
        with socket.create_connection((MTLS_RELAY, mtls_relay.port), timeout=15) as sock:
            port = sock.getsockname()[1]
            with context.wrap_socket(sock, server_hostname=MTLS_RELAY_NAME, session=session) as tls:
                tls.sendall(f"GET http://127.0.0.1:{plain_http_origin}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                assert tls.recv(4096).startswith(b"HTTP/1.1 200")
                assert not tls.session_reused
                session = tls.session
        line = mtls_relay.bumper.connection_line(port, kind="HTTP")
        assert " client_cert=relay-a.test " in line and line.endswith("outcome=ok"), line


def test_proxy_auth_asks_on_the_relay_listener_too(
    start_bumper: Callable[..., Bumper], upstream: Upstream, plain_http_origin: int, tmp_path: Path
) -> None:
    """--proxy-auth on a relay as on the explicit listener: 407 without credentials, for a CONNECT and
    a plain request; the user in the line with them."""
    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt_hash('wonderland')}\n")
    bumper = start_bumper("--listen", f"relay@{RELAY}:0", "--proxy-auth", str(users))
    relay = Relay(bumper, relay_port(bumper, RELAY), RELAY)
    ca, alice = bumper.ca_pem, ("--proxy-user", "alice:wonderland")
    cases = (
        (upstream.url(), "CONNECT", "CONNECT tunnel failed, response 407", "hello from upstream"),
        (f"http://127.0.0.1:{plain_http_origin}/", "HTTP", "bumper: proxy authentication required", "plain hello"),
    )
    for url, kind, told, body in cases:
        refused = curl_relay(relay, url, ca, "--cacert", str(ca))
        assert told in refused.stdout + refused.stderr, refused
        line = bumper.connection_line(split(refused)[1], kind=kind)
        assert " user=- " in line and "outcome=proxy authentication failed: " in line, line
        result = curl_relay(relay, url, ca, "--cacert", str(ca), *alice)
        assert split(result)[0] == body, result.stderr
        assert f"listener=relay@{RELAY}:{relay.port} user=alice " in bumper.connection_line(split(result)[1], kind=kind)


def test_a_request_for_the_relay_itself_gets_the_proxy_ports_400(relay: Relay) -> None:
    """`curl https://RELAY/`: an HTTPS proxy opened as a web site. The answer names the relay as an
    https:// proxy, inside its TLS, as the explicit listener's does."""
    r = subprocess.run(
        [
            "curl", "-sS", "--max-time", "30", "--cacert", str(relay.bumper.ca_pem),
            "-w", "\n%{http_code} %{local_port}", f"https://{relay.address}:{relay.port}/",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.rpartition("\n")
    code, port = status.split()
    assert code == "400", r.stdout
    assert body.startswith(
        "bumper: not a proxy request: this port is a proxy; ask it for absolute URLs "
        f"(curl -x https://{relay.address}:{relay.port} https://example.com/)\n"
    ), body
    line = relay.bumper.connection_line(int(port))
    assert line.endswith(" outcome=not a proxy request: GET for the proxy itself (no host in the request target)")
