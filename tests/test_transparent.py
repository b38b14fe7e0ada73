"""Transparent interception (`--listen transparent@HOST:PORT`) with the kernel's own redirection: a
client namespace routes through a gateway namespace, whose nftables REDIRECT sends its HTTPS to
bumper; bumper reads the original destination from the socket (SO_ORIGINAL_DST).

    client ns  10.201.0.2 --veth--> 10.201.0.1  gateway ns
    curl https://upstream.test/                  nft: iifname veth tcp dport 443 redirect to :8443
      (upstream.test = 10.202.0.1)               bumper transparent@0.0.0.0:8443
                                                 upstream 10.202.0.1:443 (on the gateway's loopback)

Nothing is routed out of either namespace: a check that failed could reach nothing else."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    BUMPER,
    START_TIMEOUT,
    STARTED_BUMPERS,
    UPSTREAM_SCRIPT,
    Bumper,
    Pki,
    Process,
    answering,
    tcp_server,
)
from tests.netns import Netns, ip, namespace

UPSTREAM_ADDRESS = "10.202.0.1"  # the site's real address, as the client's DNS gives it
OTHER_ADDRESS = "10.202.0.2"  # another server a client could dial, naming the site in its Host header
LISTEN_PORT = 8443
POLICY = """
default: block
destinations: {allow: ["10.202.0.0/24"]}
rules:
  - name: pass-through
    match: {sni: ["splice.upstream.test"]}
    action: splice
  - name: inspected
    match: {sni: ["*.upstream.test", "upstream.test"], listener: [transparent]}
    action: bump
"""


@dataclass
class Gateway:
    client: Netns
    gateway: Netns
    bumper: Bumper


@pytest.fixture(scope="module")
def redirected(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if shutil.which("nft") is None:
        pytest.skip("needs nftables' nft (apt-get install nftables)")
    directory = tmp_path_factory.mktemp("transparent")
    with namespace("bumper-gw") as gw, namespace("bumper-client") as client:
        veth_gw, veth_client = f"g{gw.name[-8:]}", f"c{gw.name[-8:]}"
        ip("link", "add", veth_gw, "netns", gw.name, "type", "veth", "peer", "name", veth_client, "netns", client.name)
        ip("-n", gw.name, "addr", "add", "10.201.0.1/24", "dev", veth_gw)
        ip("-n", gw.name, "link", "set", veth_gw, "up")
        ip("-n", gw.name, "addr", "add", f"{UPSTREAM_ADDRESS}/32", "dev", "lo")
        ip("-n", gw.name, "addr", "add", f"{OTHER_ADDRESS}/32", "dev", "lo")
        ip("-n", client.name, "addr", "add", "10.201.0.2/24", "dev", veth_client)
        ip("-n", client.name, "link", "set", veth_client, "up")
        ip("-n", client.name, "route", "add", "default", "via", "10.201.0.1")
        rules = (
            "table ip bumper {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat;\n"
            f'    iifname "{veth_gw}" tcp dport {{ 80, 443 }} redirect to :{LISTEN_PORT}\n'
            "  }\n"
            "}\n"
        )
        nft = gw.run("nft", "-f", "-", input=rules)
        if "not supported" in nft.stderr:
            pytest.skip(f"the kernel refuses nftables in a namespace: {nft.stderr.strip()}")
        assert nft.returncode == 0, nft.stderr
        upstream = start_upstream_inside(gw, test_pki, directory)
        site, other = plain_server(gw, UPSTREAM_ADDRESS, b"plain site"), plain_server(gw, OTHER_ADDRESS, b"other")
        try:
            with site, other:
                yield Gateway(client, gw, start_bumper_inside(gw, test_pki, directory))
        finally:
            upstream.stop()


def start_upstream_inside(gw: Netns, test_pki: Pki, directory: Path) -> Process:
    cert, key = test_pki.root.leaf("upstream.test", "*.upstream.test").write(directory, "upstream")
    with gw.inside():
        sock = socket.create_server((UPSTREAM_ADDRESS, 443))
    proc = subprocess.Popen(
        [sys.executable, str(UPSTREAM_SCRIPT), "--fd", str(sock.fileno()), "--cert", str(cert), "--key", str(key)],
        pass_fds=[sock.fileno()], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sock.close()
    return Process(proc)


@contextmanager
def plain_server(gw: Netns, address: str, body: bytes) -> Iterator[int]:
    """A plain-HTTP server on ADDRESS:80 in the gateway namespace, answering BODY to every request."""
    with gw.inside():
        server = socket.create_server((address, 80))
    yield from tcp_server(answering(body), max_connections=100, server=server)


def start_bumper_inside(gw: Netns, test_pki: Pki, directory: Path) -> Bumper:
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    ca_dir = directory / "ca"
    ca_dir.mkdir()
    argv = [
        "ip", "netns", "exec", gw.name, BUMPER, "--ca", str(ca_dir), "--listen", f"transparent@0.0.0.0:{LISTEN_PORT}",
        "--upstream-ca", str(test_pki.root_pem), "--resolve", f"*.upstream.test={UPSTREAM_ADDRESS}",
        "--resolve", f"upstream.test={UPSTREAM_ADDRESS}", "--policy", str(policy),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    process = Process(proc)
    STARTED_BUMPERS.append(process)
    process.wait_for_line(rf"transparent listening on 0\.0\.0\.0:{LISTEN_PORT}", START_TIMEOUT)
    return Bumper(process, LISTEN_PORT, ca_dir)


def curl_in_client(gateway: Gateway, name: str, cacert: Path) -> subprocess.CompletedProcess[str]:
    """curl from the client namespace to https://NAME/, NAME resolving to the site's real address."""
    return gateway.client.run(
        "curl", "-sS", "--max-time", "20", "--resolve", f"{name}:443:{UPSTREAM_ADDRESS}", "--cacert", str(cacert),
        "-w", "\n%{local_port}", f"https://{name}/",
    )  # fmt: skip


def connection_line(gateway: Gateway, client_port: int) -> str:
    return gateway.bumper.connection_line(client_port, kind="TLS", client="10.201.0.2")


def test_a_redirected_connection_is_bumped(redirected: Gateway) -> None:
    result = curl_in_client(redirected, "www.upstream.test", redirected.bumper.ca_pem)  # bumper's CA: a mimic
    body, client_port = result.stdout.rsplit("\n", 1)
    assert body == "hello from upstream", result.stderr
    line = connection_line(redirected, int(client_port))
    assert (
        f" TLS {UPSTREAM_ADDRESS}:443 listener=transparent@0.0.0.0:{LISTEN_PORT} user=- sni=www.upstream.test" in line
    )
    assert "action=bump rule=inspected verify=trusted" in line and line.endswith("outcome=ok")


def test_a_redirected_connection_is_spliced(redirected: Gateway, test_pki: Pki) -> None:
    result = curl_in_client(redirected, "splice.upstream.test", test_pki.root_pem)  # the site's own certificate
    body, client_port = result.stdout.rsplit("\n", 1)
    assert body == "hello from upstream", result.stderr
    assert "action=splice rule=pass-through" in connection_line(redirected, int(client_port))


def test_a_redirected_connection_is_blocked(redirected: Gateway) -> None:
    result = curl_in_client(redirected, "other.example", redirected.bumper.ca_pem)
    assert result.returncode != 0
    assert "alert access denied" in result.stderr, result.stderr
    line = redirected.bumper.process.wait_for_line(r".* sni=other\.example .*", 10).group(0)
    assert f" TLS {UPSTREAM_ADDRESS}:443 " in line and "action=block rule=default" in line


def curl_plain(gateway: Gateway, address: str, host: str) -> subprocess.CompletedProcess[str]:
    """curl from the client namespace: http://ADDRESS/ with Host: HOST."""
    return gateway.client.run(
        "curl", "-sS", "--max-time", "20", "-H", f"Host: {host}", "-w", "\n%{http_code} %{local_port}",
        f"http://{address}/",
    )  # fmt: skip


def test_plain_http_is_decided_by_its_host_header(redirected: Gateway) -> None:
    result = curl_plain(redirected, UPSTREAM_ADDRESS, "www.upstream.test")
    body, meta = result.stdout.rsplit("\n", 1)
    assert (body, meta.split()[0]) == ("plain site", "200"), result.stderr
    line = redirected.bumper.connection_line(int(meta.split()[1]), kind="HTTP", client="10.201.0.2")
    assert f" HTTP {UPSTREAM_ADDRESS}:80 listener=transparent@0.0.0.0:{LISTEN_PORT} " in line
    assert "action=bump rule=inspected" in line
    blocked = curl_plain(redirected, UPSTREAM_ADDRESS, "other.example")
    assert blocked.stdout.rsplit("\n", 1)[1].split()[0] == "403"


def test_plain_http_naming_an_allowed_site_reaches_that_site_not_the_address_dialled(redirected: Gateway) -> None:
    """bind_names: resolve: Host www.upstream.test sent to another server's address reaches the site."""
    result = curl_plain(redirected, OTHER_ADDRESS, "www.upstream.test")
    body, meta = result.stdout.rsplit("\n", 1)
    assert (body, meta.split()[0]) == ("plain site", "200"), result.stderr
    assert (
        f"10.201.0.2:{meta.split()[1]}: HTTP {OTHER_ADDRESS}:80 with Host www.upstream.test went to"
        f" {UPSTREAM_ADDRESS}:80, the name's own address, not the one the client gave (bind_names: resolve)"
    ) in redirected.bumper.process.log
