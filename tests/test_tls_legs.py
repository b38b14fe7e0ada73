"""TLS on both legs: the upstream leg never offers less than a modern client would, and the client
leg offers only TLS 1.2 and 1.3 with strong ciphers."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.proxy.layers.tls import parse_client_hello

from tests.conftest import Bumper, Upstream, client_tls_context, curl, open_tunnel, start_with_policy, tcp_server

SUPPORTED_VERSIONS = 43
TLS12, TLS13 = 0x0303, 0x0304
# What would lower the NDSS 2017 grade below A, by the words in OpenSSL's cipher names.
WEAK_MARKERS = ("RC4", "DES", "NULL", "ADH", "AECDH", "EXP", "IDEA", "SEED", "CAMELLIA", "PSK", "SRP", "MD5", "anon")


def cipher_names() -> dict[int, str]:
    """Every cipher suite this OpenSSL knows, by its TLS code point."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return {c["id"] & 0xFFFF: c["name"] for c in context.get_ciphers()}


@pytest.fixture
def recording_upstream() -> Iterator[tuple[int, list[bytes]]]:
    """An 'upstream' that records the ClientHello bumper sends it, then hangs up."""
    hellos: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        data = b""
        conn.settimeout(5)
        while len(data) < 5 or len(data) < 5 + struct.unpack("!H", data[3:5])[0]:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        hellos.append(data)

    for port in tcp_server(handle):
        yield port, hellos


def test_upstream_leg_offers_tls13_and_only_strong_ciphers(bumper: Bumper, recording_upstream) -> None:
    port, hellos = recording_upstream
    curl(bumper, f"https://recorder.test:{port}/")
    assert len(hellos) == 1
    hello = parse_client_hello(hellos[0])
    assert hello is not None and hello.sni == "recorder.test"
    versions_ext = dict(hello.extensions)[SUPPORTED_VERSIONS]
    versions = {struct.unpack("!H", versions_ext[i : i + 2])[0] for i in range(1, len(versions_ext), 2)}
    assert TLS13 in versions and versions <= {TLS12, TLS13} | {v for v in versions if v & 0x0F0F == 0x0A0A}
    names = cipher_names()
    offered = [names[c] for c in hello.cipher_suites if c in names]
    assert offered, hello.cipher_suites
    weak = [n for n in offered if any(marker in n for marker in WEAK_MARKERS)]
    assert weak == []
    assert {"TLS_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"} <= set(offered)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_client_leg_refuses_tls_below_12(bumper: Bumper, upstream: Upstream, version: ssl.TLSVersion) -> None:
    sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
    context = client_tls_context(bumper.ca_pem, version)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="ALERT"):  # a TLS alert, not a silent close
        context.wrap_socket(sock, server_hostname=upstream.host)


def test_client_leg_refuses_weak_ciphers(bumper: Bumper, upstream: Upstream) -> None:
    sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
    port = sock.getsockname()[1]
    context = client_tls_context(bumper.ca_pem, ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0")  # static RSA, CBC, 3DES: no forward secrecy
    with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):  # an alert, not a silent close
        context.wrap_socket(sock, server_hostname=upstream.host)
    assert bumper.connection_line(port).endswith(
        "outcome=client TLS failed: no cipher suite in common (bumper accepts only forward-secret AEAD suites)"
    )


def test_client_leg_refuses_every_non_aead_cipher(bumper: Bumper, upstream: Upstream) -> None:
    """All TLS 1.2 suites OpenSSL knows that are not AEAD (every CBC, RC4, NULL... suite) at once:
    bumper must find none it accepts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    non_aead = [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3" and not c["aead"]]
    assert len(non_aead) > 50  # the list is real
    sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
    client = client_tls_context(bumper.ca_pem, ssl.TLSVersion.TLSv1_2)
    client.set_ciphers(":".join(non_aead) + ":@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):
        client.wrap_socket(sock, server_hostname=upstream.host)


@pytest.mark.skipif(
    shutil.which("testssl") is None, reason="needs testssl (Debian: testssl.sh; ./test installs it as root)"
)
def test_testssl_finds_nothing_on_the_client_leg(bumper: Bumper, upstream: Upstream, tmp_path: Path) -> None:
    """testssl.sh, through bumper as its proxy (the SNI names the upstream, the tunnel goes to its IP).

    --ssl-native: testssl 3.0's own socket checks open a second, direct connection to the target
    even with --proxy (its fd_socket reopens the descriptor), so they would test the upstream, not
    bumper; with openssl doing every check, all of them go through the proxy."""
    report = tmp_path / "testssl.json"
    subprocess.run(
        ["testssl", "--ssl-native", "--quiet", "--color", "0", "--warnings", "off",
         "--proxy", f"127.0.0.1:{bumper.port}", "--ip", "127.0.0.1", "-p", "-U",
         "--jsonfile", str(report), f"{upstream.host}:{upstream.port}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    findings = {f["id"]: f for f in json.loads(report.read_text())}
    offered = {p: findings[p]["finding"] for p in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3")}
    assert [p for p, text in offered.items() if text.startswith("offered")] == ["TLS1_2", "TLS1_3"], offered
    vulnerable = {i: f["finding"] for i, f in findings.items() if "VULNERABLE" in f["finding"].upper()
                  and "NOT VULNERABLE" not in f["finding"].upper()}  # fmt: skip
    assert vulnerable == {}
    assert len(findings) > 20  # testssl really ran its checks


def test_client_leg_can_require_tls13(start_bumper, upstream: Upstream) -> None:
    strict = start_bumper("--client-tls-min", "1.3")
    assert curl(strict, upstream.url("/"), "--tls-max", "1.2").returncode == 35  # handshake refused
    assert curl(strict, upstream.url("/"), "--tlsv1.3").stdout == "hello from upstream"


def test_tls_below_12_upstream_only_where_a_rule_names_the_host(start_bumper, start_upstream, tmp_path: Path) -> None:
    legacy = start_upstream(tls="1.1", host="legacy.upstream.test")
    default = start_bumper()
    r = curl(default, legacy.url("/"), "-w", "%{local_port}")
    assert r.returncode != 0
    assert "outcome=upstream TLS failed" in default.connection_line(int(r.stdout))
    allowing = start_with_policy(
        start_bumper,
        tmp_path,
        "rules:\n  - name: old-erp\n    match: {sni: [legacy.upstream.test]}\n    action: bump\n"
        '    upstream_tls_min: "1.1"\n',
    )
    r = curl(allowing, legacy.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr  # the client leg stays TLS 1.2+


def test_a_rule_can_hold_upstreams_to_tls13(start_bumper, start_upstream, tmp_path: Path) -> None:
    """A stricter floor needs no exact names: a glob rule holds its upstreams to TLS 1.3, others keep 1.2."""
    only12 = start_upstream(tls="1.2", host="tls12.upstream.test")
    strict = start_with_policy(
        start_bumper,
        tmp_path,
        "rules:\n  - name: modern\n    match: {sni: ['*.upstream.test']}\n    action: bump\n"
        '    upstream_tls_min: "1.3"\n',
    )
    r = curl(strict, only12.url("/"), "-w", "%{local_port}")
    assert r.returncode != 0 and "hello from upstream" not in r.stdout
    line = strict.connection_line(int(r.stdout))
    assert "rule=modern" in line and "outcome=upstream TLS failed" in line, line
    (tmp_path / "default").mkdir()
    default = start_with_policy(start_bumper, tmp_path / "default", "default: bump\n")
    r = curl(default, only12.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
