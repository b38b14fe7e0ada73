"""Real clients accept bumper's mimics over real connections, trusting only bumper's CA.

curl, Python ssl, openssl s_client and headless Chromium (CA trusted through an NSS database), each
for an RSA-2048 leaf, a P-256 leaf and a wildcard leaf with 121 names, over TLS 1.3 and TLS 1.2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests import pki
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, curl, open_tunnel

RUN_TIMEOUT = 60.0
VERSIONS = ("1.3", "1.2")
PYTHON_VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}
ERR_CERT_AUTHORITY_INVALID = -202  # Chromium's net error for a chain to an untrusted root
BODY = "hello from upstream"


@dataclass(frozen=True)
class Kind:
    host: str  # the name clients ask for
    names: tuple[str, ...]  # the upstream leaf's DNS SANs
    key: Callable[[], object]


WILD_NAMES = tuple(f"n{i:03d}.wild.test" for i in range(120))
KINDS = {
    "rsa2048": Kind("rsa.test", ("rsa.test",), lambda: pki.rsa_key(2048)),
    "p256": Kind("p256.test", ("p256.test",), pki.ec_key),
    # The wildcard comes last, after 120 other names: only it covers the name asked for.
    "wildcard121": Kind("www.wild.test", (*WILD_NAMES, "*.wild.test"), pki.rsa_key),
}
CASES = [pytest.param(kind, version, id=f"{kind}-tls{version}") for kind in KINDS for version in VERSIONS]
# With an explicit proxy Chromium sends CONNECT name:port and never resolves NAME itself (bumper maps
# *.test), so it needs no --host-resolver-rules ("MAP * 127.0.0.1" changes nothing).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="module")
def upstreams(start_upstream: Callable[..., Upstream], test_pki: Pki) -> dict[tuple[str, str], Upstream]:
    """Each kind of leaf behind an upstream that speaks only TLS 1.3 and one that speaks only 1.2."""
    leaves = {name: test_pki.root.leaf(*kind.names, key=kind.key()) for name, kind in KINDS.items()}
    return {
        (name, version): start_upstream(leaves[name], tls=version, host=kind.host)
        for name, kind in KINDS.items()
        for version in VERSIONS
    }


def run(
    args: list[str], input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """ARGS to completion in a session of its own, so that nothing it forks (Chromium) outlives it."""
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=RUN_TIMEOUT)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def dns_names(cert: x509.Certificate) -> set[str]:
    return set(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


@pytest.mark.parametrize("kind,version", CASES)
def test_curl(bumper: Bumper, upstreams: dict[tuple[str, str], Upstream], kind: str, version: str) -> None:
    upstream = upstreams[kind, version]
    r = curl(bumper, upstream.url(), "-v", f"--tlsv{version}", "--tls-max", version, "-w", "\n%{ssl_verify_result}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rsplit("\n", 1) == [BODY, "0"]
    assert f"SSL connection using TLSv{version} " in r.stderr


@pytest.mark.parametrize("kind,version", CASES)
def test_python_ssl(bumper: Bumper, upstreams: dict[tuple[str, str], Upstream], kind: str, version: str) -> None:
    upstream = upstreams[kind, version]
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    context = client_tls_context(bumper.ca_pem, PYTHON_VERSIONS[version])
    with context.wrap_socket(sock, server_hostname=upstream.host) as tls:
        assert tls.version() == f"TLSv{version}"
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    mimic = x509.load_der_x509_certificate(der)
    assert dns_names(mimic) == dns_names(upstream.leaf.cert) == set(KINDS[kind].names)
    key, upstream_key = mimic.public_key(), upstream.leaf.cert.public_key()
    assert (type(key), key.key_size) == (type(upstream_key), upstream_key.key_size)  # type: ignore[union-attr]


@pytest.mark.parametrize("kind,version", CASES)
def test_openssl_s_client(bumper: Bumper, upstreams: dict[tuple[str, str], Upstream], kind: str, version: str) -> None:
    upstream = upstreams[kind, version]
    # -ign_eof: read the response to its end, not only until stdin's; bumper then ends TLS with
    # close_notify, so s_client exits 0 (it fails on a bare TCP close).
    r = run(
        [
            "openssl", "s_client", f"-tls{version.replace('.', '_')}", "-ign_eof",
            "-connect", f"127.0.0.1:{upstream.port}", "-proxy", f"127.0.0.1:{bumper.port}",
            "-servername", upstream.host, "-verify_hostname", upstream.host,
            "-CAfile", str(bumper.ca_pem), "-verify_return_error",
        ],
        input=f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, r.stderr
    assert f"New, TLSv{version}, Cipher is " in r.stdout
    assert set(re.findall(r"Protocol\s*: (\S+)", r.stdout)) == {f"TLSv{version}"}
    assert f"\n\n{BODY}" in r.stdout  # the body, after the headers (text mode turned CRLF into LF)


def chromium(
    bumper: Bumper, upstream: Upstream, home: Path, version: str, trust_ca: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Headless Chromium through bumper, in a throwaway profile: the DOM it shows for the upstream's
    page, and how each of its TLS handshakes in a tunnel to the upstream ended (from its NetLog)."""
    missing = [tool for tool in ("chromium", "certutil") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (Debian: chromium, libnss3-tools; ./test installs them as root)")
    nssdb = home / ".pki" / "nssdb"  # where Chromium on Linux reads user-trusted roots: $HOME/.pki/nssdb
    nssdb.mkdir(parents=True)
    certutil = ["certutil", "-d", f"sql:{nssdb}"]
    setup = [[*certutil, "-N", "--empty-password"]]
    if trust_ca:
        setup.append([*certutil, "-A", "-t", "C,,", "-n", "bumper", "-i", str(bumper.ca_pem)])
    for args in setup:
        r = run(args)
        assert r.returncode == 0, r.stderr
    netlog = home / "netlog.json"
    r = run(
        [
            "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={home / 'data'}", f"--proxy-server={bumper.proxy}",
            f"--ssl-version-min=tls{version}", f"--ssl-version-max=tls{version}", f"--log-net-log={netlog}",
            "--dump-dom", upstream.url(),
        ],
        env={**os.environ, "HOME": str(home)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, tls_handshakes(netlog, f"{upstream.host}:{upstream.port}")


def tls_handshakes(netlog: Path, authority: str) -> list[dict[str, Any]]:
    """The end of every SSL_CONNECT on a socket whose CONNECT tunnel went to AUTHORITY."""
    log = json.loads(netlog.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    end = log["constants"]["logEventPhase"]["PHASE_END"]
    by_source: defaultdict[int, list[tuple[str, int, dict[str, Any]]]] = defaultdict(list)
    for event in log["events"]:
        by_source[event["source"]["id"]].append((names[event["type"]], event["phase"], event.get("params") or {}))
    handshakes = []
    for events in by_source.values():
        tunnels = [params for name, _, params in events if name == "HTTP_TRANSACTION_SEND_TUNNEL_HEADERS"]
        if any(f"Host: {authority}" in params.get("headers", ()) for params in tunnels):
            handshakes += [params for name, phase, params in events if name == "SSL_CONNECT" and phase == end]
    return handshakes


@pytest.mark.parametrize("kind,version", CASES)
def test_chromium(
    bumper: Bumper, upstreams: dict[tuple[str, str], Upstream], kind: str, version: str, tmp_path: Path
) -> None:
    dom, handshakes = chromium(bumper, upstreams[kind, version], tmp_path, version, trust_ca=True)
    assert BODY in dom, dom
    assert handshakes and all(h.get("version") == f"TLS {version}" for h in handshakes), handshakes


def test_chromium_without_the_ca_refuses_the_mimic(
    bumper: Bumper, upstreams: dict[tuple[str, str], Upstream], tmp_path: Path
) -> None:
    """The negative control: the same run without the CA in the NSS database must fail, for that reason."""
    dom, handshakes = chromium(bumper, upstreams["p256", "1.3"], tmp_path, "1.3", trust_ca=False)
    assert BODY not in dom
    assert handshakes and all(h.get("net_error") == ERR_CERT_AUTHORITY_INVALID for h in handshakes), handshakes
