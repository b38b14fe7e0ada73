"""Relays (issue 17): a rule's `via:` sends its connections through a parent proxy, over plain HTTP
(a corporate proxy) or TLS (another bumper's relay listener): spliced, bumped, and plain http://."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from bumper.errors import ConfigError
from bumper.policy import load
from bumper.policy.relays import Credentials, Relay, Scheme, connect_request
from bumper.upstream.via import refusal
from tests import pki
from tests.conftest import (
    Bumper,
    Pki,
    Upstream,
    curl,
    curl_direct,
    lab_policy,
    listening_socket,
    open_tunnel,
    pipe,
    read_head,
    start_with_policy,
    tcp_server,
)


def relayed_policy(relays: str, action: str = "splice", via: str = "corp") -> str:
    return f"""
relays:
{relays}
rules:
  - name: through {via}
    match: {{host: ["*.test"]}}
    action: {action}
    via: {via}
"""


@dataclass
class Parent:
    """A parent proxy written here, as simple as a corporate one: it answers CONNECT (407 without the
    credentials it wants, if it wants some), then relays bytes to the named host on loopback; a plain
    request in absolute form it forwards whole. It records the head of every request it got."""

    port: int = 0
    credentials: str | None = None  # "user:password"
    tls: ssl.SSLContext | None = None  # an HTTPS proxy: TLS first
    heads: list[str] = field(default_factory=list)
    handshakes: list[str] = field(default_factory=list)  # the TLS handshakes' outcomes: "ok" or the error

    def handle(self, conn: socket.socket) -> None:
        if self.tls is not None:
            tls = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as e:
                self.handshakes.append(str(e))
                with socket.socket(fileno=tls.detach()) as raw:
                    _linger(raw)
                return
            conn = tls
            self.handshakes.append("ok")
        data = read_head(conn)
        if b"\r\n\r\n" not in data:
            return
        head, _, rest = data.partition(b"\r\n\r\n")
        text = head.decode()
        self.heads.append(text)
        wanted = (
            self.credentials and f"proxy-authorization: basic {base64.b64encode(self.credentials.encode()).decode()}"
        )
        if wanted and wanted.lower() not in text.lower():
            conn.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"
            )
            return
        method, target, _ = text.split("\r\n")[0].split(" ")
        if method == "CONNECT":
            port = int(target.rpartition(":")[2])
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute form: http://host:port/path
            port = int(target.split("/")[2].rpartition(":")[2])
            rest = head.replace(target.encode(), b"/" + target.split("/", 3)[3].encode(), 1) + b"\r\n\r\n" + rest
        with socket.create_connection(("127.0.0.1", port), timeout=10) as upstream:
            upstream.sendall(rest)
            pipe(conn, upstream)


def _linger(conn: socket.socket) -> None:
    """Close as a proxy does after a refused handshake: what the client sent after its part (its
    CONNECT) is read first, so that the close is no TCP reset, which would discard the alert sent."""
    try:
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except OSError:
        pass


def serve_parent(parent: Parent) -> Iterator[Parent]:
    server = tcp_server(parent.handle, max_connections=200, concurrent=True)
    parent.port = next(server)
    yield parent
    next(server, None)  # stops it


@pytest.fixture(scope="module")
def parent() -> Iterator[Parent]:
    yield from serve_parent(Parent())


@pytest.fixture(scope="module")
def auth_parent() -> Iterator[Parent]:
    yield from serve_parent(Parent(credentials="svc:s3cret pass"))


def via_bumper(start_bumper: Callable[..., Bumper], directory: Path, relays: str, action: str = "splice") -> Bumper:
    return start_with_policy(start_bumper, directory, relayed_policy(relays, action))


# --- the policy file ------------------------------------------------------------------------------


def check(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(text))
    with pytest.raises(ConfigError) as e:
        load.load(path)
    return str(e.value)


def test_relays_load_into_rules(tmp_path: Path, test_pki: Pki) -> None:
    (tmp_path / "corp.pass").write_text("s3cret\n")
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(relayed_policy(f"""
  b: {{url: "https://relay-b.example.test:8443", ca: {test_pki.root_pem}}}
  corp: {{url: "http://proxy.corp.example:3128", auth: {{user: svc, password_file: {tmp_path / "corp.pass"}}}}}
""")))  # fmt: skip
    rule = load.load(path).rules[0]
    assert rule.via is not None and rule.via.name == "corp" and rule.via.scheme is Scheme.HTTP
    assert (rule.via.host, rule.via.port) == ("proxy.corp.example", 3128)
    assert rule.via.auth == Credentials("svc", "s3cret")
    assert "s3cret" not in repr(rule.via)  # never in a log line that prints the relay


@pytest.mark.parametrize(
    ("relays", "where", "error"),
    [
        ('  corp: {url: "socks5://p.example:1080"}', "relays.corp.url", "the scheme is http:// or https://"),
        ('  corp: {url: "http://p.example"}', "relays.corp.url", "give a host and a port"),
        ('  corp: {url: "http://user:pw@p.example:3128"}', "relays.corp.url", "credentials go in auth:"),
        ('  corp: {url: "http://p.example:3128", ca: /nonexistent.pem}', "relays.corp.ca", "cannot read"),
        (
            '  corp: {url: "http://p.example:3128", auth: {user: svc, password_file: /nonexistent.pass}}',
            "relays.corp.auth.password_file",
            "cannot read",
        ),
        ('  corp: {url: "http://p.example:3128", colour: red}', "relays.corp.colour", "unknown key"),
        ('  other: {url: "http://p.example:3128"}', "rules[0].via", "unknown relay 'corp' (relays: other)"),
    ],
)
def test_bad_relays_are_reported_at_their_line(tmp_path: Path, relays: str, where: str, error: str) -> None:
    message = check(tmp_path, relayed_policy(relays))
    assert f"{tmp_path / 'policy.yaml'}:" in message and f": {where}: " in message and error in message, message


def test_an_unknown_via_is_reported_with_the_relays_own_problems(tmp_path: Path) -> None:
    """Every problem at once: a relay entry that is wrong does not hide a rule naming another."""
    message = check(tmp_path, relayed_policy('  b: {url: "ftp://p.example:21"}'))
    assert "relays.b.url: bad relay URL" in message and "rules[0].via: unknown relay 'corp' (relays: b)" in message


def test_an_http_relay_takes_no_tls_settings(tmp_path: Path, test_pki: Pki) -> None:
    message = check(tmp_path, relayed_policy(f'  corp: {{url: "http://p.example:3128", ca: {test_pki.root_pem}}}'))
    assert "relays.corp.ca: an http:// relay is spoken to in the clear: ca needs https://" in message


def test_via_is_for_bump_and_splice(tmp_path: Path) -> None:
    message = check(tmp_path, relayed_policy('  corp: {url: "http://p.example:3128"}', action="block"))
    assert "rules[0].via: a blocked connection goes nowhere" in message


def test_connect_request_and_answers() -> None:
    relay = Relay("corp", Scheme.HTTP, "p.example", 3128, auth=Credentials("svc", "pw"))
    assert connect_request(relay, "::1", 443) == (
        b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic c3ZjOnB3\r\n\r\n"
    )
    assert refusal(relay, b"HTTP/1.1 200 Connection established", "a.test", 443) is None
    assert refusal(relay, b"HTTP/1.0 407 Proxy Authentication Required\r\nX: y", "a.test", 443) == (
        "relay corp (http://p.example:3128) refused CONNECT a.test:443: 407 Proxy Authentication Required"
        " (check the relay's auth:)"
    )
    assert "not an HTTP answer" in (refusal(relay, b"SSH-2.0-OpenSSH", "a.test", 443) or "")


# --- through a plain parent proxy -----------------------------------------------------------------


def test_splice_via_a_parent_proxy(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, upstream: Upstream, test_pki: Pki
) -> None:
    """Spliced: the client sees the upstream's own certificate, the parent sees `CONNECT host:port`."""
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{parent.port}"}}')
    before = len(parent.heads)
    r = curl(a, upstream.url("/hello"), "--cacert", str(test_pki.root_pem), "-w", "\n%{local_port}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello from upstream"), r.stdout
    assert parent.heads[before].startswith(f"CONNECT upstream.test:{upstream.port} HTTP/1.1\r\n")
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]))
    assert " via=corp " in line and "action=splice" in line and line.endswith("outcome=ok"), line


def test_bump_via_a_parent_proxy(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, upstream: Upstream
) -> None:
    """Bumped: bumper's own TLS to the upstream runs inside the tunnel, verified as ever."""
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{parent.port}"}}', action="bump")
    r = curl(a, upstream.url("/hello"), "-w", "\n%{local_port}")
    assert r.returncode == 0 and r.stdout.startswith("hello from upstream"), r.stderr
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]))
    assert " via=corp " in line and "action=bump" in line and "verify=trusted" in line, line


def test_plain_http_via_a_parent_proxy_goes_in_absolute_form(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, plain_http_origin: int
) -> None:
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{parent.port}"}}')
    before = len(parent.heads)
    r = curl(a, f"http://plain.test:{plain_http_origin}/page", "-w", "\n%{local_port}")
    assert r.returncode == 0 and r.stdout.startswith("plain hello"), r.stderr
    assert parent.heads[before].startswith(f"GET http://plain.test:{plain_http_origin}/page HTTP/1.1\r\n")
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]), kind="HTTP")
    assert " via=corp " in line, line


def test_a_parent_that_wants_credentials_gets_them(
    start_bumper: Callable[..., Bumper], tmp_path: Path, auth_parent: Parent, upstream: Upstream, test_pki: Pki
) -> None:
    (tmp_path / "corp.pass").write_text("s3cret pass\n")
    auth = f"auth: {{user: svc, password_file: {tmp_path / 'corp.pass'}}}"
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{auth_parent.port}", {auth}}}')
    r = curl(a, upstream.url("/hello"), "--cacert", str(test_pki.root_pem))
    assert r.returncode == 0 and r.stdout.startswith("hello from upstream"), r.stderr
    expected = base64.b64encode(b"svc:s3cret pass").decode()
    assert f"Proxy-Authorization: Basic {expected}" in auth_parent.heads[-1]
    assert "s3cret" not in a.process.log


def test_a_parent_that_refuses_gives_a_502_with_its_answer(
    start_bumper: Callable[..., Bumper], tmp_path: Path, auth_parent: Parent, upstream: Upstream
) -> None:
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{auth_parent.port}"}}')
    r = curl(a, upstream.url("/hello"), "-w", "%{http_connect} %{local_port}")
    assert r.returncode != 0 and r.stdout.startswith("502 "), (r.stdout, r.stderr)
    line = a.connection_line(int(r.stdout.split()[1]))
    assert f"refused CONNECT upstream.test:{upstream.port}: 407 Proxy Authentication Required" in line, line


def test_a_relay_that_is_down_gives_a_502_with_the_reason(
    start_bumper: Callable[..., Bumper], tmp_path: Path, upstream: Upstream
) -> None:
    closed = listening_socket()
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{port}"}}')
    sock, reply = open_tunnel(a, "upstream.test", upstream.port)
    client_port = sock.getsockname()[1]
    with sock:
        length = int(reply.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
        while len(reply.partition(b"\r\n\r\n")[2]) < length and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 502"), reply
    assert f"relay corp (http://127.0.0.1:{port})".encode() in reply and b"Connection refused" in reply, reply
    line = a.connection_line(client_port)
    assert " via=corp " in line and "outcome=upstream connect failed: relay corp" in line, line


def test_a_relay_that_never_answers_times_out(
    start_bumper: Callable[..., Bumper], tmp_path: Path, upstream: Upstream
) -> None:
    """A relay that accepts and says nothing costs a bounded wait: --upstream-timeout."""
    silent = listening_socket()  # the kernel accepts; nobody reads
    try:
        path = tmp_path / "policy.yaml"
        path.write_text(lab_policy(relayed_policy(f'  corp: {{url: "http://127.0.0.1:{silent.getsockname()[1]}"}}')))
        a = start_bumper("--policy", str(path), "--upstream-timeout", "1")
        r = curl(a, upstream.url("/hello"), "-w", "%{http_connect}", timeout=30)
        assert r.stdout.startswith("502"), (r.stdout, r.stderr)
    finally:
        silent.close()


def test_curl_cannot_tell_a_relayed_splice_from_a_direct_one(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, upstream: Upstream, test_pki: Pki
) -> None:
    """The bytes pass untouched: the client verifies the upstream's own certificate, its issuer ours."""
    a = via_bumper(start_bumper, tmp_path, f'  corp: {{url: "http://127.0.0.1:{parent.port}"}}')
    r = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "30", "-x", a.proxy, "--cacert", str(test_pki.root_pem), upstream.url()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "issuer: O=bumper tests; CN=bumper test root" in r.stderr, r.stderr


def test_an_sni_that_routes_elsewhere_than_its_tunnel_is_refused(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, upstream: Upstream
) -> None:
    """The tunnel was opened through the relay the CONNECT host's rule names (before the 200); an SNI
    whose rule routes straight (or via another relay) would get bytes meant for a different path."""
    a = start_with_policy(start_bumper, tmp_path, f"""
relays:
  corp: {{url: "http://127.0.0.1:{parent.port}"}}
rules:
  - name: direct
    match: {{sni: [other.test]}}
    action: bump
  - name: through corp
    match: {{sni: ["*.test"]}}
    action: splice
    via: corp
""")  # fmt: skip
    sock, reply = open_tunnel(a, "upstream.test", upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    client_port = sock.getsockname()[1]
    with sock, pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
        ssl.create_default_context().wrap_socket(sock, server_hostname="other.test")
    line = a.connection_line(client_port)
    assert (
        "action=block rule=direct " in line
        and "outcome=SNI other.test is routed straight to the upstream, but the tunnel for CONNECT upstream.test"
        " went via corp (names must agree)"
        in line
    ), line


def test_an_sni_listener_routes_through_a_relay(
    start_bumper: Callable[..., Bumper], tmp_path: Path, parent: Parent, upstream: Upstream, test_pki: Pki
) -> None:
    """Where the ClientHello names the destination, the connection opens after it, through the relay."""
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(relayed_policy(f'  corp: {{url: "http://127.0.0.1:{parent.port}"}}')))
    a = start_bumper("--policy", str(path), "--listen", f"sni:{upstream.port}@127.0.0.2:0")
    port = int(a.process.wait_for_line(r"bumper: sni listening on 127\.0\.0\.2:(\d+)").group(1))
    before = len(parent.heads)
    r = curl_direct("127.0.0.2", port, "www.upstream.test", test_pki.root_pem, "-w", "\n%{local_port}")
    assert r.stdout.startswith("hello from upstream"), r.stderr
    assert parent.heads[before].startswith(f"CONNECT www.upstream.test:{upstream.port} HTTP/1.1\r\n")
    line = a.connection_line(int(r.stdout.rsplit("\n", 1)[1]), kind="TLS", client="127.0.0.1")
    assert " via=corp " in line and "action=splice" in line, line


RELAY = "relay.test"


@pytest.fixture(scope="module")
def relay_ca() -> pki.Authority:
    """The CA of the relays' own certificates: not the upstreams' test root."""
    return pki.Authority.root("relays CA")


@pytest.fixture(scope="module")
def clients_ca() -> pki.Authority:
    return pki.Authority.root("relay clients CA")


@pytest.fixture(scope="module")
def tls_parent(
    relay_ca: pki.Authority, clients_ca: pki.Authority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Parent]:
    """An HTTPS proxy for RELAY that requires a client certificate from CLIENTS_CA."""
    directory = tmp_path_factory.mktemp("tls-parent")
    cert, key = relay_ca.leaf(RELAY).write(directory, "relay")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=clients_ca.write_cert(directory / "clients-ca.pem"))
    yield from serve_parent(Parent(tls=context))


def https_relay(tmp_path: Path, port: int, ca: pki.Authority, client: pki.Authority | None) -> str:
    ca_pem = ca.write_cert(tmp_path / "relay-ca.pem")
    entry = f'  corp: {{url: "https://{RELAY}:{port}", ca: {ca_pem}'
    if client is not None:
        cert, key = client.leaf("bumper-a", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)).write(tmp_path, "a")
        (tmp_path / "a-client.pem").write_bytes(cert.read_bytes() + key.read_bytes())
        entry += f", client_cert: {tmp_path / 'a-client.pem'}"
    return entry + "}"


def start_https_via(start_bumper: Callable[..., Bumper], tmp_path: Path, relays: str, port: int) -> Bumper:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(relayed_policy(relays)))
    return start_bumper("--policy", str(path), "--resolve", f"{RELAY}=127.0.0.1:{port}")


def test_an_https_relay_is_verified_and_given_the_client_certificate(
    start_bumper: Callable[..., Bumper],
    tmp_path: Path,
    tls_parent: Parent,
    relay_ca: pki.Authority,
    clients_ca: pki.Authority,
    upstream: Upstream,
    test_pki: Pki,
) -> None:
    a = start_https_via(
        start_bumper, tmp_path, https_relay(tmp_path, tls_parent.port, relay_ca, clients_ca), tls_parent.port
    )
    r = curl(a, upstream.url("/hello"), "--cacert", str(test_pki.root_pem))
    assert r.returncode == 0 and r.stdout.startswith("hello from upstream"), r.stderr
    assert tls_parent.handshakes[-1] == "ok"
    assert tls_parent.heads[-1].startswith(f"CONNECT upstream.test:{upstream.port} HTTP/1.1")


@pytest.mark.parametrize(
    ("case", "outcome"),
    [
        ("no client certificate", "TLS failed: tlsv13 alert certificate required"),
        ("another CA", "its certificate failed verification: unable to get local issuer certificate"),
    ],
)
def test_an_https_relay_that_fails_gives_a_502_naming_why(
    start_bumper: Callable[..., Bumper],
    tmp_path: Path,
    tls_parent: Parent,
    relay_ca: pki.Authority,
    clients_ca: pki.Authority,
    upstream: Upstream,
    case: str,
    outcome: str,
) -> None:
    ca = pki.Authority.root("someone else") if case == "another CA" else relay_ca
    client = None if case == "no client certificate" else clients_ca
    a = start_https_via(start_bumper, tmp_path, https_relay(tmp_path, tls_parent.port, ca, client), tls_parent.port)
    r = curl(a, upstream.url("/hello"), "-w", "%{http_connect} %{local_port}")
    assert r.stdout.startswith("502 "), (r.stdout, r.stderr)
    line = a.connection_line(int(r.stdout.split()[1]))
    assert f"outcome=upstream connect failed: relay corp (https://{RELAY}:{tls_parent.port}): {outcome}" in line, line
