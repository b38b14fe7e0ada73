"""Reverse listeners (`--listen reverse:URL@HOST:PORT`) and seed 001's four TLS modes, end to end with
curl and httpx: terminate (https -> http), re-encrypt (https -> https), originate (http -> https),
and passthrough by SNI (an SNI listener whose rule splices)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUMPER, Bumper, Pki, Upstream, curl_direct, lab_policy, listening_socket

FRONT = "front.test"  # the name clients use for the front end
ADDRESSES = {"terminate": "127.0.0.2", "re-encrypt": "127.0.0.3", "passthrough": "127.0.0.4"}
POLICY = """
default: bump
rules:
  - name: passthrough
    match: {sni: ["pass.upstream.test"], listener: [sni]}
    action: splice
"""


@dataclass
class Front:
    bumper: Bumper
    ports: dict[str, int]  # mode -> the listener's port


@pytest.fixture(scope="module")
def front(
    start_bumper: Callable[..., Bumper],
    upstream: Upstream,
    plain_http_origin: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Front:
    path = tmp_path_factory.mktemp("reverse") / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper(
        "--policy", str(path),
        "--listen", f"reverse:http://127.0.0.1:{plain_http_origin}@{ADDRESSES['terminate']}:0",
        "--listen", f"reverse:https://{upstream.host}:{upstream.port}@{ADDRESSES['re-encrypt']}:0",
        "--listen", f"sni:{upstream.port}@{ADDRESSES['passthrough']}:0",
    )  # fmt: skip
    ports = {}
    for mode, what in (("terminate", "reverse"), ("re-encrypt", "reverse"), ("passthrough", "sni")):
        address = ADDRESSES[mode].replace(".", r"\.")
        ports[mode] = int(bumper.process.wait_for_line(rf"bumper: {what} listening on {address}:(\d+)").group(1))
    ports["originate"] = ports["re-encrypt"]
    ADDRESSES["originate"] = ADDRESSES["re-encrypt"]
    return Front(bumper, ports)


def curl(front: Front, mode: str, scheme: str = "https", name: str = FRONT, cacert: Path | None = None) -> str:
    cacert = cacert or front.bumper.ca_pem
    result = curl_direct(ADDRESSES[mode], front.ports[mode], name, cacert, scheme=scheme)
    assert result.returncode == 0, result.stderr + front.bumper.process.log
    return result.stdout


def test_terminate_https_to_a_plain_http_origin(front: Front) -> None:
    assert curl(front, "terminate") == "plain hello"


def test_re_encrypt_https_to_an_https_backend(front: Front) -> None:
    assert curl(front, "re-encrypt") == "hello from upstream"


def test_originate_plain_http_to_an_https_backend(front: Front) -> None:
    assert curl(front, "originate", scheme="http") == "hello from upstream"


def test_passthrough_by_sni(front: Front, test_pki: Pki) -> None:
    """Spliced: the client verifies the backend's own certificate, end to end."""
    assert curl(front, "passthrough", name="pass.upstream.test", cacert=test_pki.root_pem) == "hello from upstream"


@pytest.mark.parametrize(
    ("mode", "scheme", "name", "body"),
    [
        ("terminate", "https", FRONT, "plain hello"),
        ("re-encrypt", "https", FRONT, "hello from upstream"),
        ("originate", "http", FRONT, "hello from upstream"),
        ("passthrough", "https", "pass.upstream.test", "hello from upstream"),
    ],
)
def test_httpx_in_each_mode(front: Front, test_pki: Pki, mode: str, scheme: str, name: str, body: str) -> None:
    """httpx, which resolves nothing here: the address in the URL, the name in Host and the SNI.
    Spliced (passthrough), it verifies the backend's own certificate; otherwise bumper's, for NAME."""
    url = f"{scheme}://{ADDRESSES[mode]}:{front.ports[mode]}/"
    cafile = test_pki.root_pem if mode == "passthrough" else front.bumper.ca_pem
    with httpx.Client(verify=ssl.create_default_context(cafile=cafile)) as client:
        response = client.get(url, headers={"host": name}, extensions={"sni_hostname": name})
    assert (response.status_code, response.text) == (200, body)


def test_a_backend_that_is_down_is_a_502_with_the_reason(
    start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with listening_socket() as sock:  # a port nothing listens on, once this closes
        dead = sock.getsockname()[1]
    path = tmp_path_factory.mktemp("reverse-down") / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper("--policy", str(path), "--listen", f"reverse:https://down.test:{dead}@127.0.0.5:0")
    port = int(bumper.process.wait_for_line(r"bumper: reverse listening on 127\.0\.0\.5:(\d+)").group(1))
    result = curl_direct("127.0.0.5", port, FRONT, bumper.ca_pem, "-w", "\n%{http_code}")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "502", result.stderr
    assert f"bumper: cannot connect to down.test:{dead}: [Errno 111] Connect call failed" in body


def test_a_front_end_serves_its_own_certificate(
    start_bumper: Callable[..., Bumper], upstream: Upstream, test_pki: Pki, tmp_path: Path
) -> None:
    """--tls-cert: the front end's own chain and key, as a real site's front end has them."""
    cert, key = test_pki.root.leaf(FRONT).write(tmp_path, "front")
    combined = tmp_path / "front-combined.pem"
    combined.write_bytes(key.read_bytes() + cert.read_bytes())  # the key first: any order is read
    listen = "127.0.0.6:0"
    bumper = start_bumper(
        "--listen", f"reverse:https://{upstream.host}:{upstream.port}@{listen}", "--tls-cert", f"{listen}={combined}"
    )
    port = int(bumper.process.wait_for_line(r"bumper: reverse listening on 127\.0\.0\.6:(\d+)").group(1))
    result = curl_direct("127.0.0.6", port, FRONT, test_pki.root_pem)
    assert result.stdout == "hello from upstream", result.stderr


@pytest.mark.parametrize(
    ("listen", "tls_cert", "message"),
    [
        ("reverse:https://a.test@127.0.0.1:0", "127.0.0.1:9=CERT", "no --listen at 127.0.0.1:9"),
        ("sni@127.0.0.1:0", "127.0.0.1:0=CERT", "sni@127.0.0.1:0 serves mimics of the upstreams it bumps"),
        ("reverse:https://a.test@127.0.0.1:0", "127.0.0.1:0", "expected HOST:PORT=FILE.pem"),
        ("reverse:https://a.test@127.0.0.1:0", "127.0.0.1:0=CERT-ONLY", "expected one PEM private key beside"),
        ("reverse:https://a.test@127.0.0.1:0", "127.0.0.1:0=OTHER-KEY", "does not belong to the first certificate"),
    ],
)
def test_a_bad_tls_cert_is_a_configuration_error(
    test_pki: Pki, tmp_path: Path, listen: str, tls_cert: str, message: str
) -> None:
    cert, key = test_pki.root.leaf(FRONT).write(tmp_path, "front")
    _, other_key = test_pki.root.leaf(FRONT).write(tmp_path, "other")
    files = {
        "CERT-ONLY": cert.read_bytes(),
        "OTHER-KEY": cert.read_bytes() + other_key.read_bytes(),
        "CERT": cert.read_bytes() + key.read_bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    spec = tls_cert.replace("=", f"={tmp_path}/", 1) if "=" in tls_cert else tls_cert
    result = subprocess.run(
        [BUMPER, "--ca", str(tmp_path), "--listen", listen, "--tls-cert", spec],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bumper: --tls-cert ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_an_upstream_that_fails_verification_is_a_502_for_every_request(
    start_bumper: Callable[..., Bumper], upstream: Upstream
) -> None:
    """The upstream leg is verified as everywhere else: here bumper does not trust the upstream's CA."""
    bumper = start_bumper(
        "--listen", f"reverse:https://{upstream.host}:{upstream.port}@127.0.0.9:0", trust_test_root=False
    )
    port = int(bumper.process.wait_for_line(r"bumper: reverse listening on 127\.0\.0\.9:(\d+)").group(1))
    seen = upstream.requests
    result = curl_direct("127.0.0.9", port, FRONT, bumper.ca_pem, "-w", "\n%{http_code}")
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "502", result.stderr
    assert "upstream certificate failed verification" in body and "reason: unknown_issuer" in body
    assert upstream.requests == seen
