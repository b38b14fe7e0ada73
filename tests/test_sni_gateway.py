"""The SNI gateway (`--listen sni[:PORT]@HOST:PORT`): clients send TLS straight to bumper, whose
ClientHello's name is the destination, as Envoy's sni_dynamic_forward_proxy does (seed 004)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Bumper, Pki, Upstream, curl, curl_direct, lab_policy

GATEWAY_HOST = "127.0.0.2"  # beside the explicit listener on 127.0.0.1: both take a free port
POLICY = """
default: block
rules:
  - name: pass-through
    match: {sni: ["splice.upstream.test"]}
    action: splice
  - name: wildcard egress
    match: {sni: ["*.test", "*.invalid"], listener: [sni]}
    action: bump
"""


@dataclass
class Gateway:
    bumper: Bumper
    port: int


@pytest.fixture(scope="module")
def gateway(
    start_bumper: Callable[..., Bumper], upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    path = tmp_path_factory.mktemp("sni") / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper("--policy", str(path), "--listen", f"sni:{upstream.port}@{GATEWAY_HOST}:0")
    port = int(bumper.process.wait_for_line(rf"bumper: sni listening on {GATEWAY_HOST}:(\d+)").group(1))
    return Gateway(bumper, port)


def curl_gateway(
    gateway: Gateway, name: str, *args: str, cacert: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """curl to https://NAME/ with NAME pointed at the gateway, as DNS would point it."""
    cacert = cacert or gateway.bumper.ca_pem
    return curl_direct(GATEWAY_HOST, gateway.port, name, cacert, "-w", "\n%{local_port} %{http_version}", *args)


def sni_line(gateway: Gateway, client_port: int) -> str:
    return gateway.bumper.connection_line(client_port, kind="TLS")


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_allowed_name_is_bumped(gateway: Gateway, upstream: Upstream, http: str) -> None:
    result = curl_gateway(gateway, "www.upstream.test", http)
    body, meta = result.stdout.rsplit("\n", 1)
    client_port, version = meta.split()
    assert body == "hello from upstream", result.stderr
    assert version == ("2" if http == "--http2" else "1.1")
    line = sni_line(gateway, int(client_port))
    assert f" TLS www.upstream.test:{upstream.port} listener=sni@{GATEWAY_HOST}:{gateway.port} " in line
    assert "action=bump rule=wildcard egress verify=trusted" in line and line.endswith("outcome=ok")


def test_another_rule_splices(gateway: Gateway, upstream: Upstream, test_pki: Pki) -> None:
    """Spliced: the client sees the upstream's own certificate, from the upstream's own CA."""
    result = curl_gateway(gateway, "splice.upstream.test", cacert=test_pki.root_pem)
    body, meta = result.stdout.rsplit("\n", 1)
    assert body == "hello from upstream", result.stderr
    line = sni_line(gateway, int(meta.split()[0]))
    assert "action=splice rule=pass-through" in line


def test_a_name_outside_the_allow_list_is_closed(gateway: Gateway) -> None:
    result = curl_gateway(gateway, "www.example.org")
    assert result.returncode != 0
    line = gateway.bumper.process.wait_for_line(r" TLS www\.example\.org:.*", 10).group(0)
    assert "action=block rule=default" in line


def test_no_sni_is_refused_with_an_alert(gateway: Gateway) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{GATEWAY_HOST}:{gateway.port}", "-noservername"],
        input="", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "alert access denied" in result.stderr, result.stderr
    line = gateway.bumper.process.wait_for_line(r" TLS -:.*", 10).group(0)
    assert line.endswith(
        "action=block rule=sni verify=- upstream_sha256=- requests=0 outcome=no SNI: an SNI listener finds the"
        " destination by the name in the ClientHello"
    ), gateway.bumper.process.log


def test_a_name_that_does_not_resolve_is_closed(gateway: Gateway) -> None:
    """`--resolve *.test` maps every .test name; .invalid ones never resolve (RFC 6761)."""
    result = curl_gateway(gateway, "gone.invalid")
    assert result.returncode != 0
    line = gateway.bumper.process.wait_for_line(r" TLS gone\.invalid:.*", 10).group(0)
    assert "action=bump rule=wildcard egress" in line
    assert "outcome=upstream connect failed: [Errno -2] Name or service not known" in line


def test_listeners_have_their_own_rules_and_one_reload_reaches_all(
    start_bumper: Callable[..., Bumper], upstream: Upstream, tmp_path: Path
) -> None:
    """Two listeners in one process, a rule for each; SIGHUP reloads the one policy both apply."""
    path = tmp_path / "policy.yaml"
    rules = """
default: block
rules:
  - name: proxy users
    match: {sni: ["a.upstream.test"], listener: [explicit]}
    action: bump
  - name: gateway users
    match: {sni: ["b.upstream.test"], listener: [sni]}
    action: bump
"""
    path.write_text(lab_policy(rules))
    bumper = start_bumper("--policy", str(path), "--listen", f"sni:{upstream.port}@127.0.0.7:0")
    gateway = Gateway(
        bumper, int(bumper.process.wait_for_line(r"bumper: sni listening on 127\.0\.0\.7:(\d+)").group(1))
    )

    def through_proxy(name: str) -> int:
        return curl(bumper, f"https://{name}:{upstream.port}/").returncode

    def through_gateway(name: str) -> int:
        return curl_direct("127.0.0.7", gateway.port, name, bumper.ca_pem).returncode

    assert (through_proxy("a.upstream.test"), through_proxy("b.upstream.test")) == (0, 35)
    assert (through_gateway("a.upstream.test"), through_gateway("b.upstream.test")) == (35, 0)
    swapped = rules.replace("[explicit]", "[LISTENER]").replace("[sni]", "[explicit]").replace("[LISTENER]", "[sni]")
    path.write_text(lab_policy(swapped))
    bumper.process.proc.send_signal(signal.SIGHUP)
    bumper.process.wait_for_line(r"policy reloaded from")
    assert (through_proxy("a.upstream.test"), through_proxy("b.upstream.test")) == (35, 0)
    assert (through_gateway("a.upstream.test"), through_gateway("b.upstream.test")) == (0, 35)
