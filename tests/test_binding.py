"""Names are bound to the addresses they lead to (issue 21, part 1): a client that CONNECTs to one
address and names an allowed site in its SNI reaches that site, or nothing; IP addresses in forms no
browser sends are refused; a request inside a tunnel names the tunnel's site or is refused."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from bumper.policy import names
from bumper.policy import rules as policy
from bumper.policy.rules import Action
from tests.conftest import BUMPER, Bumper, Pki, Upstream, lab_policy, open_tunnel, start_with_policy

ALLOWED = "x.allowed.example"
POLICY = """
default: block
rules:
  - name: allowed
    match: {sni: ["*.allowed.example"]}
    action: bump
"""


@pytest.fixture(scope="module")
def allowed(start_upstream: Callable[..., Upstream], test_pki: Pki) -> Upstream:
    """The site the rule allows, which its name leads to (bumper's --resolve)."""
    return start_upstream(test_pki.root.leaf(ALLOWED))


@pytest.fixture(scope="module")
def secret(start_upstream: Callable[..., Upstream]) -> Upstream:
    """Another server the client can name by address: an internal service, say."""
    return start_upstream()


def binding_bumper(
    start_bumper: Callable[..., Bumper], directory: Path, allowed: Upstream, mode: str | None, policy: str = POLICY
) -> Bumper:
    path = directory / "policy.yaml"
    path.write_text(lab_policy(policy + (f"bind_names: {mode}\n" if mode else "")))
    return start_bumper("--policy", str(path), "--resolve", f"{ALLOWED}=127.0.0.1:{allowed.port}")


def get(tls: ssl.SSLSocket, target: str, host: str) -> bytes:
    """GET TARGET with Host: HOST over TLS, and the whole response (the server closes after it)."""
    tls.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    response = b""
    while chunk := tls.recv(65536):
        response += chunk
    return response


def spoofed_get(bumper: Bumper, port: int, sni: str) -> tuple[bytes, bytes, int]:
    """CONNECT 127.0.0.1:PORT, then a ClientHello naming SNI, from a client that ignores certificate
    errors (what an exfiltration tool does): the CONNECT reply, the response (b"" if none) and the
    client's port."""
    sock, reply = open_tunnel(bumper, "127.0.0.1", port)
    client_port = sock.getsockname()[1]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=sni) as tls:
            response = get(tls, "/", sni)
    except (ssl.SSLError, OSError):
        response = b""
    finally:
        sock.close()
    return reply, response, client_port


def test_resolve_connects_to_the_names_own_address(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream, secret: Upstream
) -> None:
    """The default: the tunnel goes where the name leads, not to the address the client gave."""
    bumper = binding_bumper(start_bumper, tmp_path, allowed, mode=None)
    seen_allowed, seen_secret = allowed.requests, secret.requests
    reply, response, client_port = spoofed_get(bumper, secret.port, ALLOWED)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert response.startswith(b"HTTP/1.1 200") and b"hello from upstream" in response, response
    assert secret.requests == seen_secret  # the address the client gave got nothing
    assert allowed.wait_for_requests(seen_allowed + 1)
    line = bumper.connection_line(client_port)
    assert (
        f"CONNECT 127.0.0.1:{secret.port} listener=explicit@127.0.0.1:{bumper.port} user=- sni={ALLOWED} action=bump"
        in line
    )
    assert line.endswith("outcome=ok")
    assert (
        f"CONNECT 127.0.0.1:{secret.port} with SNI {ALLOWED} went to 127.0.0.1:{allowed.port}, the name's own"
        " address, not the one the client gave (bind_names: resolve)" in bumper.process.log
    )


def test_resolve_binds_a_spliced_tunnel_too(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream, secret: Upstream, test_pki: Pki
) -> None:
    """Spliced, nothing is decrypted: the client's own TLS reaches the name's server, which it verifies."""
    bumper = binding_bumper(start_bumper, tmp_path, allowed, None, POLICY.replace("action: bump", "action: splice"))
    seen_secret = secret.requests
    sock, reply = open_tunnel(bumper, "127.0.0.1", secret.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    client_port = sock.getsockname()[1]
    context = ssl.create_default_context(cafile=str(test_pki.root_pem))  # the real site's CA, not bumper's
    with context.wrap_socket(sock, server_hostname=ALLOWED) as tls:
        response = get(tls, "/", ALLOWED)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert secret.requests == seen_secret
    assert "action=splice rule=allowed" in bumper.connection_line(client_port)


def test_resolve_an_honest_client_is_served_without_a_note(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream
) -> None:
    bumper = binding_bumper(start_bumper, tmp_path, allowed, mode="resolve")
    reply, response, client_port = spoofed_get(bumper, allowed.port, ALLOWED)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert bumper.connection_line(client_port).endswith("outcome=ok")
    assert "went to" not in bumper.process.log


def test_resolve_a_name_that_does_not_resolve_is_refused(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream, secret: Upstream
) -> None:
    bumper = binding_bumper(start_bumper, tmp_path, allowed, mode=None)
    seen_secret = secret.requests
    reply, response, client_port = spoofed_get(bumper, secret.port, "gone.allowed.example")
    assert not response.startswith(b"HTTP/1.1 200"), response
    assert secret.requests == seen_secret
    line = bumper.connection_line(client_port)
    assert "outcome=upstream connect failed" in line, line


def test_strict_refuses_a_name_that_does_not_lead_to_the_address(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream, secret: Upstream
) -> None:
    bumper = binding_bumper(start_bumper, tmp_path, allowed, mode="strict")
    seen_secret = secret.requests
    reply, response, client_port = spoofed_get(bumper, secret.port, ALLOWED)
    assert response == b""  # no handshake: a close
    assert secret.requests == seen_secret
    line = bumper.connection_line(client_port)
    assert "action=block rule=allowed" in line
    assert line.endswith(
        f"outcome=SNI {ALLOWED}: name does not lead to 127.0.0.1:{secret.port}"
        f" (it resolves to 127.0.0.1:{allowed.port}; bind_names: strict)"
    ), line
    # An honest client, whose address is the name's, is served.
    reply, response, client_port = spoofed_get(bumper, allowed.port, ALLOWED)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert bumper.connection_line(client_port).endswith("outcome=ok")


def test_a_connect_that_waits_for_the_sni_still_obeys_destinations(
    start_bumper: Callable[..., Bumper], tmp_path: Path, upstream: Upstream
) -> None:
    """bind_names: resolve connects only after the ClientHello, but an address the policy's
    `destinations:` refuses is refused at the CONNECT, as when bumper connects at once."""
    path = tmp_path / "policy.yaml"
    path.write_text("ports: ['1-65535']\n" + POLICY)  # no destinations: loopback is refused
    bumper = start_bumper("--policy", str(path))
    seen = upstream.requests
    reply, client_port = connect_reply(bumper, "127.0.0.1", upstream.port)
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert f"destination 127.0.0.1:{upstream.port} refused by policy (loopback;".encode() in reply
    line = bumper.connection_line(client_port)
    assert "action=block rule=destinations" in line and "outcome=destination 127.0.0.1" in line
    assert upstream.requests == seen


def test_client_goes_where_the_client_said_and_policy_check_warns(
    start_bumper: Callable[..., Bumper], tmp_path: Path, allowed: Upstream, secret: Upstream
) -> None:
    """bind_names: client is the old behaviour, for labs: the spoofed SNI reaches the other server."""
    bumper = binding_bumper(start_bumper, tmp_path, allowed, mode="client")
    seen_secret = secret.requests
    reply, response, client_port = spoofed_get(bumper, secret.port, ALLOWED)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert secret.wait_for_requests(seen_secret + 1)
    assert "bind_names: client: a client that names an allowed SNI reaches any address" in bumper.process.log
    checked = subprocess.run(
        [BUMPER, "policy", "check", str(tmp_path / "policy.yaml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0
    warning, ok = checked.stdout.splitlines()[-2:]
    assert ok == "OK"
    assert warning.startswith(f"{tmp_path / 'policy.yaml'}:") and ": bind_names: warning: a client" in warning


def test_bind_names_off_is_no_mode(tmp_path: Path) -> None:
    """YAML reads `off` as false: the key takes only the three words."""
    path = tmp_path / "policy.yaml"
    path.write_text("bind_names: off\n")
    checked = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    assert checked.stdout.startswith(f"{path}:1:13: bind_names: ")
    assert "resolve, strict, client" in checked.stdout


# -- IP addresses in one form ---------------------------------------------------------------------------

BLOCK_LOOPBACK = """
default: bump
rules:
  - name: no loopback
    match: {host: ["127.0.0.1"]}
    action: block
"""


def connect_reply(bumper: Bumper, host: str, port: int) -> tuple[bytes, int]:
    """bumper's whole reply to CONNECT HOST:PORT, body included, and the client's port."""
    sock, reply = open_tunnel(bumper, host, port)
    client_port = sock.getsockname()[1]
    with sock:
        length = int(reply.partition(b"content-length: ")[2].partition(b"\r\n")[0] or 0)
        while len(reply.partition(b"\r\n\r\n")[2]) < length and (chunk := sock.recv(65536)):
            reply += chunk
    return reply, client_port


@pytest.fixture(scope="module")
def loopback_blocked(start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("policy"), BLOCK_LOOPBACK)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.000.000.001"])
def test_ipv4_forms_no_browser_sends_are_refused(loopback_blocked: Bumper, upstream: Upstream, host: str) -> None:
    seen = upstream.requests
    reply, client_port = connect_reply(loopback_blocked, host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b"is 127.0.0.1 in a form no browser sends (shortened, decimal, octal or hex): write 127.0.0.1" in reply
    assert upstream.requests == seen
    assert "action=block rule=names" in loopback_blocked.connection_line(client_port)


@pytest.mark.parametrize("host", ["[::ffff:127.0.0.1]", "[::FFFF:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]"])
def test_ipv4_mapped_ipv6_matches_as_ipv4(loopback_blocked: Bumper, upstream: Upstream, host: str) -> None:
    reply, _ = connect_reply(loopback_blocked, host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert b"blocked by policy rule 'no loopback'" in reply


def test_plain_http_with_a_decimal_address_is_refused(loopback_blocked: Bumper) -> None:
    with socket.create_connection(("127.0.0.1", loopback_blocked.port), timeout=10) as sock:
        sock.sendall(b"GET http://2130706433:80/ HTTP/1.1\r\nHost: 2130706433\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply


def test_rule_entries_in_a_form_no_browser_sends_are_policy_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - match: {host: ['127.1']}\n    action: block\ndefault: bump\n")
    checked = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    assert checked.stdout.strip() == (
        f"{path}:2:20: rules[0].match.host: bad address '127.1': 127.0.0.1 in a form no browser sends"
        " (shortened, decimal, octal or hex): write 127.0.0.1"
    )


# -- requests inside a tunnel name the tunnel's site ---------------------------------------------------

BLOCK_OTHER = """
default: bump
rules:
  - name: no other
    match: {host: ["other.test"]}
    action: block
"""


@pytest.fixture(scope="module")
def other_blocked(start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("policy"), BLOCK_OTHER)


def bumped(bumper: Bumper, upstream: Upstream, alpn: list[str] | None = None) -> tuple[ssl.SSLSocket, int]:
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    context = ssl.create_default_context(cafile=str(bumper.ca_pem))
    if alpn:
        context.set_alpn_protocols(alpn)
    client_port = sock.getsockname()[1]
    return context.wrap_socket(sock, server_hostname=upstream.host), client_port


@pytest.mark.parametrize("target", ["http://other.test/secret", "https://other.test/secret"])
def test_an_absolute_form_request_for_another_site_is_refused(
    other_blocked: Bumper, upstream: Upstream, target: str
) -> None:
    seen = upstream.requests
    tls, client_port = bumped(other_blocked, upstream)
    with tls:
        response = get(tls, target, upstream.host)
    assert response.startswith(b"HTTP/1.1 403"), response
    assert upstream.requests == seen
    line = other_blocked.connection_line(client_port)
    assert f"Host {upstream.host}, target other.test)" in line, line


@pytest.mark.parametrize(("authority", "host"), [("other.test", None), ("other.test", "upstream.test")])
def test_an_h2_authority_for_another_site_is_refused(
    other_blocked: Bumper, upstream: Upstream, authority: str, host: str | None
) -> None:
    """:authority alone gets the 403 of a name disagreement; with a Host header that disagrees, the
    h2 library refuses the whole connection (PROTOCOL_ERROR). Either way the upstream sees nothing."""
    seen = upstream.requests
    tls, client_port = bumped(other_blocked, upstream, alpn=["h2"])
    assert tls.selected_alpn_protocol() == "h2"
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", "/secret")]
    conn.send_headers(1, headers + ([("host", host)] if host else []), end_stream=True)
    answer = None
    with tls:
        tls.sendall(conn.data_to_send())
        while answer is None and (data := tls.recv(65536)):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.ConnectionTerminated):
                    answer = f"GOAWAY {event.error_code!r}".encode()
            tls.sendall(conn.data_to_send())
    assert answer == (b"GOAWAY <ErrorCodes.PROTOCOL_ERROR: 1>" if host else b"403")
    assert upstream.requests == seen


# -- the pure cores -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
    ],
)
def test_ipv4_form_problem_names_the_address(host: str, canonical: str) -> None:
    assert names.ipv4_form_problem(host) == (
        f"{host!r} is {canonical} in a form no browser sends (shortened, decimal, octal or hex): write {canonical}"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "example.com", "1e100.net", "::1", "fe80::1", "xn--bcher-kva.example"])
def test_ipv4_form_problem_leaves_names_and_canonical_addresses_alone(host: str) -> None:
    assert names.ipv4_form_problem(host) is None


@pytest.mark.parametrize("host", ["example.123", "1.2.3.4.5", "256.0.0.1", "a.0x"])
def test_a_host_that_ends_in_a_number_must_be_an_address(host: str) -> None:
    assert names.ipv4_form_problem(host) == f"{host!r} ends in a number but is no IPv4 address in dotted-quad form"


@pytest.mark.parametrize(
    ("host", "normalized"),
    [("[::ffff:127.0.0.1]", "127.0.0.1"), ("::FFFF:7f00:1", "127.0.0.1"), ("[2001:DB8:0::1]", "2001:db8::1")],
)
def test_ipv6_literals_are_compared_in_one_form(host: str, normalized: str) -> None:
    assert names.normalize(host) == normalized
    assert names.host_matches(normalized, host)


def test_only_a_rule_on_the_sni_binds_an_address_to_a_name() -> None:
    by_sni = policy.Decision(Action.BUMP, "allowed", by_sni=True)
    assert policy.bound_name(by_sni, "10.0.0.5", "X.Allowed.Example.") == "x.allowed.example"
    assert policy.bound_name(by_sni, "rec.example", "x.allowed.example") is None  # a name: mismatch's business
    assert policy.bound_name(by_sni, "10.0.0.5", None) is None
    assert policy.bound_name(policy.Decision(Action.BUMP, "default"), "10.0.0.5", "x.allowed.example") is None


def test_strict_refusal_compares_addresses_and_ports() -> None:
    name = "x.allowed.example"
    assert policy.strict_refusal(name, ("10.0.0.5", 443), [("10.0.0.5", 443), ("10.0.0.6", 443)]) is None
    assert policy.strict_refusal(name, ("::ffff:10.0.0.5", 443), [("10.0.0.5", 443)]) is None
    assert policy.strict_refusal(name, ("10.0.0.5", 443), [("10.0.0.6", 443), ("2001:db8::1", 443)]) == (
        "SNI x.allowed.example: name does not lead to 10.0.0.5:443"
        " (it resolves to 10.0.0.6:443, [2001:db8::1]:443; bind_names: strict)"
    )
    assert policy.strict_refusal(name, ("10.0.0.5", 443), []) == (
        "SNI x.allowed.example: name does not lead to 10.0.0.5:443 (it does not resolve; bind_names: strict)"
    )
