"""The policy's `destinations:`: bumper connects only where an egress gateway should, checked on the
address it actually connects to. Loopback cases run on this machine's loopback; private and link-local
ones inside a network namespace of their own, with no route out, so that no packet can leave even if a
check failed."""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from bumper.policy import destinations
from bumper.policy.destinations import Destinations, embedded, proxy_loop
from tests import netns as namespaces
from tests import pki
from tests.conftest import (
    BUMPER,
    START_TIMEOUT,
    STARTED_BUMPERS,
    Bumper,
    Pki,
    Process,
    Upstream,
    curl,
    lab_policy,
    open_tunnel,
    start_with_policy,
)
from tests.netns import Netns

DEFAULT = "default: bump\nports: ['1-65535']\ndestinations: {}\n"  # the default destinations, any port
LOOP = "bumper's own listening address, a proxy loop: no destinations: allow lifts it"
OUTCOME = re.compile(r"outcome=destination \S+ refused by policy \((.+)\)$")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# The pure check.


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
        ("192.168.1.1", "private"), ("fd00::1", "unique local (private)"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"), ("2001:db8::1", "documentation"), ("198.18.0.1", "benchmarking"),
        ("::ffff:127.0.0.1", "loopback 127.0.0.1 inside"),
        ("::ffff:169.254.169.254", "link-local 169.254.169.254 inside"),
        ("64:ff9b::a00:1", "private 10.0.0.1 inside"), ("2002:7f00:1::1", "loopback 127.0.0.1 inside"),
        ("::7f00:1", "IPv4-compatible (deprecated)"),
    ],
)  # fmt: skip
def test_the_default_refuses_what_an_egress_gateway_has_no_business_reaching(address: str, why: str) -> None:
    refusal = destinations.DEFAULT.refusal(ip(address), 443)
    assert refusal is not None and destinations.refusal_in(f"Connection killed: {refusal}") == refusal
    assert refusal.startswith(f"destination {address}:443 " if ":" not in address else f"destination [{address}]:443 ")
    assert f"({why}; internal ranges need the policy's destinations: allow)" in refusal


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "172.32.0.1", "8.8.8.8"]
)
def test_the_default_lets_public_addresses_through(address: str) -> None:
    assert destinations.DEFAULT.refusal(ip(address), 443) is None


def test_allow_lifts_the_default_and_deny_wins() -> None:
    check = Destinations(
        allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8")),
        deny=(ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("93.184.0.0/16")),
    )
    assert check.refusal(ip("10.1.2.3"), 80) is None
    assert check.refusal(ip("::ffff:127.0.0.1"), 80) is None  # judged by the IPv4 address inside
    assert check.refusal(ip("10.9.0.1"), 80) == "destination 10.9.0.1:80 refused by policy (in its destinations: deny)"
    assert check.refusal(ip("93.184.215.14"), 443) is not None  # deny refuses public ranges too
    assert check.refusal(ip("::ffff:10.9.0.1"), 80) is not None
    assert check.refusal(ip("192.168.1.1"), 80) is not None  # what allow does not list stays refused


def test_embedded_ipv4_addresses() -> None:
    assert embedded(ip("::ffff:1.2.3.4")) == (ip("1.2.3.4"),)
    assert embedded(ip("64:ff9b::1.2.3.4")) == (ip("1.2.3.4"),)
    assert embedded(ip("2002:102:304::1")) == (ip("1.2.3.4"),)
    assert ip("10.0.0.1") in embedded(ip("2001:0:4136:e378:8000:63bf:f5ff:fffe"))  # Teredo's obfuscated client
    assert embedded(ip("1.2.3.4")) == embedded(ip("2606:2800::1")) == ()


def test_a_proxy_loop_is_refused_whatever_allow_says() -> None:
    listening = ((ip("127.0.0.1"), 8080), (ip("::"), 3128))
    local = {ip("127.0.0.1"), ip("10.0.0.5"), ip("::1")}.__contains__
    assert proxy_loop(ip("127.0.0.1"), 8080, listening, local) is not None
    assert proxy_loop(ip("::ffff:127.0.0.1"), 8080, listening, local) is not None
    assert proxy_loop(ip("127.0.0.1"), 8081, listening, local) is None  # another port: another service
    assert proxy_loop(ip("10.0.0.5"), 8080, listening, local) is None  # not the address 8080 listens on
    assert (
        proxy_loop(ip("10.0.0.5"), 3128, listening, local) is not None
    )  # the wildcard listener's port, any own address
    assert proxy_loop(ip("10.0.0.6"), 3128, listening, local) is None  # not this host's
    refusal = proxy_loop(ip("::1"), 3128, listening, local)
    assert refusal == f"destination [::1]:3128 refused by policy ({LOOP})"


def test_the_policy_file_reads_destinations(tmp_path: Path) -> None:
    from bumper.errors import ConfigError
    from bumper.policy.load import load

    path = tmp_path / "p.yaml"
    path.write_text("destinations:\n  allow: [10.0.0.0/8, '::1']\n  deny: 10.9.0.0/16\ndefault: bump\n")
    policy = load(path)
    assert policy.destinations == Destinations(
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")), (ipaddress.ip_network("10.9.0.0/16"),)
    )
    path.write_text("destinations:\n  allow: [10.0.0.0/33]\n  permit: []\ndefault: bump\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).splitlines() == [
        f"{path}:2:11: destinations.allow: bad CIDR '10.0.0.0/33' (use 10.0.0.0/8, 2001:db8::/32 or one address)",
        f"{path}:3:3: destinations.permit: unknown key (expected one of: allow, deny)",
    ]


# Loopback, through the live proxy: packets to loopback never leave the machine.


@dataclass
class Listener:
    """A TCP service that counts the connections it accepts and answers each with a small HTTP response."""

    sock: socket.socket
    accepted: list[bytes] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.accepted.append(conn.recv(4096))
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nreached\n")
                except OSError:
                    self.accepted.append(b"")


@contextmanager
def listening(host: str, port: int = 0) -> Iterator[Listener]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    sock.settimeout(0.1)
    listener = Listener(sock)
    thread = threading.Thread(target=listener.serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.stop.set()
        thread.join(5)
        sock.close()


def refused_connect(bumper: Bumper, host: str, port: int) -> str:
    """CONNECT HOST:PORT through BUMPER: it must be a 403 naming the destinations key; its log line."""
    sock, reply = open_tunnel(bumper, host, port)
    with sock:
        client_port = sock.getsockname()[1]
        length = int(re.search(rb"content-length: (\d+)", reply).group(1))  # type: ignore[union-attr]
        while len(reply.partition(b"\r\n\r\n")[2]) < length and (chunk := sock.recv(4096)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert b"refused by policy" in reply and b"destinations" in reply, reply
    return bumper.connection_line(client_port)


def refused_http(bumper: Bumper, url: str) -> str:
    r = curl(bumper, url, "-w", "\n%{http_code} %{local_port}")
    body, meta = r.stdout.rsplit("\n", 1)
    status, client_port = meta.split()
    assert status == "403", r.stdout + r.stderr
    assert "refused by policy" in body and "destinations" in body, body
    return bumper.connection_line(int(client_port), kind="HTTP")


@pytest.fixture(scope="module")
def default_bumper(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("default"), DEFAULT)


@pytest.fixture(scope="module")
def lab_bumper(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("lab"), "default: bump\n")  # loopback allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "127.0.0.2"])
def test_connect_to_a_loopback_address_is_refused_by_default(default_bumper: Bumper, host: str) -> None:
    with listening("::1" if ":" in host and "ffff" not in host else "127.0.0.1") as service:
        target = f"[{host}]" if ":" in host else host
        line = refused_connect(default_bumper, target, service.port)
        assert f" CONNECT {host}:{service.port} " in line
        assert " action=block rule=destinations " in line, line
        assert OUTCOME.search(line), line
        assert service.accepted == []


def test_plain_http_to_loopback_is_refused_by_default(default_bumper: Bumper) -> None:
    with listening("127.0.0.1") as service:
        line = refused_http(default_bumper, f"http://127.0.0.1:{service.port}/admin")
        assert "outcome=destination 127.0.0.1:" in line and "(loopback;" in line, line
        assert service.accepted == []


def test_a_resolve_mapping_is_the_operators_and_allowed(default_bumper: Bumper, upstream: Upstream) -> None:
    """--resolve '*.test=127.0.0.1' maps the tests' upstream to loopback: the operator's own choice."""
    r = curl(default_bumper, upstream.url("/"))
    assert r.stdout == "hello from upstream", r.stderr


def test_with_loopback_allowed_it_is_reached(lab_bumper: Bumper) -> None:
    with listening("127.0.0.1") as service:
        r = curl(lab_bumper, f"http://127.0.0.1:{service.port}/")
        assert r.stdout == "reached\n", r.stderr
        assert len(service.accepted) == 1


def test_plain_http_obeys_the_policys_ports(start_bumper, tmp_path: Path) -> None:
    """As CONNECT does: with ports: [443], a plain request to a loopback service on another port is
    refused before any connection, even where destinations allow loopback."""
    only_443 = start_with_policy(start_bumper, tmp_path, "ports: ['443']\n")
    with listening("127.0.0.1") as service:
        r = curl(only_443, f"http://127.0.0.1:{service.port}/", "-w", "\n%{http_code} %{local_port}")
        body, meta = r.stdout.rsplit("\n", 1)
        status, client_port = meta.split()
        assert status == "403", r.stdout
        assert f"port {service.port} is not in the policy's ports" in body
        line = only_443.connection_line(int(client_port), kind="HTTP")
        assert f"outcome=port {service.port} is not in the policy's ports" in line
        assert service.accepted == []


def test_plain_http_obeys_the_policys_clients(start_bumper, tmp_path: Path) -> None:
    elsewhere = start_with_policy(start_bumper, tmp_path, "clients: [10.0.0.0/8]\n")
    with listening("127.0.0.1") as service:
        r = curl(elsewhere, f"http://127.0.0.1:{service.port}/", "-w", "\n%{http_code}")
        assert r.stdout.endswith("\n403") and "client 127.0.0.1 is not in the policy's clients" in r.stdout
        assert service.accepted == []


def test_without_ports_plain_http_may_reach_port_80_only(start_bumper, tmp_path: Path) -> None:
    """The default ports: 443 and 8443 for CONNECT, 80 for a plain http:// request."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: bump\ndestinations: {allow: [127.0.0.0/8]}\n")  # no ports: key
    default_ports = start_bumper("--policy", str(policy))
    with listening("127.0.0.1") as service:
        r = curl(default_ports, f"http://127.0.0.1:{service.port}/", "-w", "\n%{http_code}")
        assert r.stdout.endswith("\n403") and f"port {service.port} is not in the policy's ports" in r.stdout
        assert service.accepted == []


def test_a_reloaded_policy_changes_where_bumper_may_connect(start_bumper, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(DEFAULT)
    reloading = start_bumper("--policy", str(path))
    with listening("127.0.0.1") as service:
        url = f"http://127.0.0.1:{service.port}/"
        refused_http(reloading, url)
        path.write_text(lab_policy(""))  # loopback allowed
        reloading.process.proc.send_signal(signal.SIGHUP)
        reloading.process.wait_for_line("policy reloaded from", 10)
        assert curl(reloading, url).stdout == "reached\n"
        assert len(service.accepted) == 1


@pytest.mark.parametrize("kind", ["CONNECT", "HTTP"])
def test_a_connection_to_bumpers_own_listening_address_is_refused(lab_bumper: Bumper, kind: str) -> None:
    """A proxy loop, even where the policy allows loopback."""
    if kind == "CONNECT":
        line = refused_connect(lab_bumper, "127.0.0.1", lab_bumper.port)
    else:
        line = refused_http(lab_bumper, f"http://127.0.0.1:{lab_bumper.port}/")
    assert f"({LOOP})" in line, line


# Private and link-local ranges, in a network namespace without routes out.


# The namespace's own addresses, each with a service behind it in the tests.
PRIVATE, LINK_LOCAL, HOME_ROUTER, ULA = "10.0.0.1", "169.254.169.254", "192.168.1.1", "fd00::1"


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    with namespaces.namespace("bumper-dest") as ns:
        # The namespace's only interface is its loopback, and these addresses sit on it: the services
        # behind them are reachable from inside, and no packet has a way out.
        for address in (f"{PRIVATE}/32", f"{LINK_LOCAL}/32", f"{HOME_ROUTER}/32", f"{ULA}/128"):
            namespaces.ip("-n", ns.name, "addr", "add", address, "dev", "lo")
        ns.hosts.write_text(
            "127.0.0.1 localhost\n"
            f"{PRIVATE} intranet.example\n"  # a public-looking name that resolves inside: DNS rebinding's effect
            "127.0.0.1 loopback.example\n"
        )
        yield ns


def start_inside(netns: Netns, test_pki: Pki, ca_dir: Path, policy: Path, listen: str = "127.0.0.1:0") -> Bumper:
    """bumper through `ip netns exec`, so that its resolver reads the namespace's /etc/hosts."""
    ca_dir.mkdir(exist_ok=True)  # bumper makes a new CA only in a directory that exists
    argv = ["ip", "netns", "exec", netns.name, BUMPER, "--ca", str(ca_dir), "--listen", listen]
    argv += ["--upstream-ca", str(test_pki.root_pem), "--resolve", "*.test=127.0.0.1", "--policy", str(policy)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    process = Process(proc)
    STARTED_BUMPERS.append(process)  # stopped at the end of the session, tracebacks looked for
    port = int(process.wait_for_line(r"proxy listening on \S+:(\d+)", START_TIMEOUT).group(1))
    return Bumper(process, port, ca_dir)


@pytest.fixture(scope="module")
def inside_bumpers(netns: Netns, test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bumper]:
    """In the namespace: bumper with the default destinations, and one that allows 10.0.0.0/8."""
    started = {}
    for name, text in (("default", DEFAULT), ("allow-10", "destinations: {allow: [10.0.0.0/8]}\n")):
        directory = tmp_path_factory.mktemp(f"netns-{name}")
        policy = directory / "policy.yaml"
        policy.write_text(lab_policy(text))
        started[name] = start_inside(netns, test_pki, directory / "ca", policy)
    return started


@pytest.mark.parametrize("host", [PRIVATE, LINK_LOCAL, HOME_ROUTER, ULA])
def test_connect_to_a_private_or_link_local_address_is_refused(
    netns: Netns, inside_bumpers: dict[str, Bumper], host: str
) -> None:
    with netns.inside(), listening(host) as service:
        target = f"[{host}]" if ":" in host else host
        line = refused_connect(inside_bumpers["default"], target, service.port)
        assert " rule=destinations " in line and OUTCOME.search(line), line
        assert service.accepted == []


def test_the_cloud_metadata_service_is_not_reached_by_plain_http(
    netns: Netns, inside_bumpers: dict[str, Bumper]
) -> None:
    with netns.inside(), listening(LINK_LOCAL, 80) as metadata:
        line = refused_http(inside_bumpers["default"], f"http://{LINK_LOCAL}/latest/meta-data/")
        assert "outcome=destination 169.254.169.254:80 refused by policy (link-local;" in line, line
        assert metadata.accepted == []


def test_a_name_that_resolves_inside_is_refused_after_dns(netns: Netns, inside_bumpers: dict[str, Bumper]) -> None:
    """The check is on the address the name resolved to (the namespace's /etc/hosts, through the system
    resolver), as DNS rebinding would have it answer: not on the name."""
    with netns.inside(), listening(PRIVATE) as service:
        line = refused_connect(inside_bumpers["default"], "intranet.example", service.port)
        assert f" CONNECT intranet.example:{service.port} " in line
        assert f"outcome=destination {PRIVATE}:{service.port} refused by policy (private;" in line, line
        line = refused_http(inside_bumpers["default"], f"http://loopback.example:{service.port}/")
        assert "(loopback;" in line
        assert service.accepted == []


def test_allow_lists_the_internal_ranges_a_policy_needs(netns: Netns, inside_bumpers: dict[str, Bumper]) -> None:
    allowing = inside_bumpers["allow-10"]
    with netns.inside(), listening(PRIVATE) as service:
        sock, reply = open_tunnel(allowing, "intranet.example", service.port)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply
        r = curl(allowing, f"http://{PRIVATE}:{service.port}/")
        assert r.stdout == "reached\n", r.stderr
        assert len(service.accepted) == 2
        line = refused_connect(allowing, LINK_LOCAL, service.port)  # what allow does not list stays refused
        assert "(link-local;" in line


def test_a_wildcard_listener_refuses_its_port_on_every_own_address(netns: Netns, test_pki: Pki, tmp_path: Path) -> None:
    """Listening on 0.0.0.0, bumper's port on any address of this host is a proxy loop; inside the
    namespace, so that the wildcard listener is reachable from nowhere else."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(lab_policy("destinations: {allow: [10.0.0.0/8, 192.168.0.0/16]}\n"))
    with netns.inside():
        everywhere = start_inside(netns, test_pki, tmp_path / "ca", policy, listen="0.0.0.0:0")
        try:
            for host in (PRIVATE, HOME_ROUTER):
                line = refused_connect(everywhere, host, everywhere.port)
                assert f"({LOOP})" in line, line
        finally:
            everywhere.process.stop()


# AIA fetches: any upstream's certificate names the URL.


def test_an_aia_fetch_goes_to_ports_80_and_443_only(
    start_upstream, lab_bumper: Bumper, test_pki: Pki, tmp_path: Path
) -> None:
    """A leaf whose caIssuers URL points at a loopback service's port: never fetched, and the log says why,
    although the lab policy allows loopback."""
    with listening("127.0.0.1") as service:
        url = f"http://127.0.0.1:{service.port}/int.der"
        upstream = start_upstream(aia_leaf(test_pki, "aia-port.test", url), host="aia-port.test")
        r = curl(lab_bumper, upstream.url("/"), "-w", "%{ssl_verify_result} %{local_port}")
        verify_result, client_port = r.stdout.split()
        assert verify_result == "20"  # the chain stays incomplete
        assert " verify=unknown_issuer " in lab_bumper.connection_line(int(client_port))
        why = f"port {service.port} refused: caIssuers fetches go to ports 80 and 443 only"
        lab_bumper.process.wait_for_line(re.escape(f"caIssuers fetch of {url} failed: {why}"), 10)
        assert service.accepted == []


def test_an_aia_fetch_obeys_the_destinations(
    netns: Netns, inside_bumpers: dict[str, Bumper], start_upstream, test_pki: Pki
) -> None:
    url = f"http://{PRIVATE}/int.der"
    bumper = inside_bumpers["default"]
    with netns.inside(), listening(PRIVATE, 80) as issuer:
        upstream = start_upstream(aia_leaf(test_pki, "aia-private.test", url), host="aia-private.test")
        r = curl(bumper, upstream.url("/"), "-w", "%{ssl_verify_result}")
        assert r.stdout == "20", r.stderr
        bumper.process.wait_for_line(
            re.escape(f"caIssuers fetch of {url} failed: destination {PRIVATE}:80 refused by policy (private;"), 10
        )
        assert issuer.accepted == []


def aia_leaf(test_pki: Pki, host: str, url: str) -> pki.Leaf:
    """A leaf of an intermediate the upstream does not send, with URL as its caIssuers."""
    access = x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url))
    return test_pki.root.intermediate().leaf(host, extra=((x509.AuthorityInformationAccess([access]), False),))
