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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BUMPER, START_TIMEOUT, STARTED_BUMPERS, UPSTREAM_SCRIPT, Bumper, Pki, Process
from tests.netns import Netns, ip, namespace

UPSTREAM_ADDRESS = "10.202.0.1"  # the site's real address, as the client's DNS gives it
LISTEN_PORT = 8443
POLICY = f"""
default: block
destinations: {{allow: ["{UPSTREAM_ADDRESS}/32"]}}
rules:
  - name: pass-through
    match: {{sni: ["splice.upstream.test"]}}
    action: splice
  - name: inspected
    match: {{sni: ["*.upstream.test", "upstream.test"], listener: [transparent]}}
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
        try:
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
    assert f" TLS {UPSTREAM_ADDRESS}:443 listener=transparent@0.0.0.0:{LISTEN_PORT} sni=www.upstream.test" in line
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
    lines = [line for line in redirected.bumper.process.lines if "sni=other.example" in line]
    assert lines and f" TLS {UPSTREAM_ADDRESS}:443 " in lines[-1] and "action=block rule=default" in lines[-1]
