"""Handing the CA to clients: `bumper ca bundle` (the system's roots plus the CA, for SSL_CERT_FILE)
and `bumper ca export --format pem|der|k8s-configmap`, through the real console script, with the
bundle used by real clients (curl, Python's urllib) through a running bumper.
"""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from bumper.certs import ca as ca_files
from tests import pki
from tests.conftest import BUMPER, Bumper, Upstream

TIMEOUT = 30
KEY_MARKER = b"PRIVATE KEY"
# OpenSSL's own default roots file: what bumper reads with SSL_CERT_FILE unset, as run() calls it.
OPENSSL_ROOTS = Path(ssl.get_default_verify_paths().openssl_cafile)
NEEDS_SYSTEM_ROOTS = pytest.mark.skipif(
    not OPENSSL_ROOTS.is_file(), reason=f"no system roots at {OPENSSL_ROOTS} (the ca-certificates package)"
)


def run(*args: str | Path, env: dict[str, str] | None = None, umask: int = -1) -> subprocess.CompletedProcess[bytes]:
    """The real `bumper` (its outputs go to the session's key audit), SSL_CERT_FILE unset unless ENV sets it."""
    base = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    return subprocess.run(
        [BUMPER, *map(str, args)],
        capture_output=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**base, **(env or {})},
        umask=umask,
    )


def certificates(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():  # a system root may have a negative serial
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_pem_x509_certificates(data)


def ca_cert(ca_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())


def assert_one_error_line(result: subprocess.CompletedProcess[bytes], *named: str) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bumper: "), stderr
    for text in named:
        assert text in lines[0], lines[0]
    assert result.stdout == b""
    return lines[0]


@pytest.fixture
def lab_roots(tmp_path: Path) -> tuple[Path, list[x509.Certificate]]:
    """A roots file of two test roots, for SSL_CERT_FILE: a known system store."""
    roots = [pki.Authority.root(f"lab root {i}").cert for i in range(2)]
    path = tmp_path / "roots.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots))
    return path, roots


# --- bumper ca bundle -----------------------------------------------------------------------------


@NEEDS_SYSTEM_ROOTS
def test_bundle_holds_every_system_root_then_the_ca(ca_dir: Path) -> None:
    system = OPENSSL_ROOTS

    result = run("ca", "bundle", "--ca", ca_dir)

    assert (result.returncode, result.stderr) == (0, b"")
    assert KEY_MARKER not in result.stdout
    bundle = certificates(result.stdout)
    system_roots = certificates(Path(system).read_bytes())
    assert len(system_roots) > 0
    assert bundle == [*system_roots, ca_cert(ca_dir)]


def test_bundle_follows_ssl_cert_file_and_writes_0644_atomically(
    ca_dir: Path, tmp_path: Path, lab_roots: tuple[Path, list[x509.Certificate]]
) -> None:
    roots_file, roots = lab_roots
    out_dir = tmp_path / "trust"
    out_dir.mkdir()
    out = out_dir / "bundle.pem"
    out.write_bytes(b"the old bundle\n")
    old_inode = out.stat().st_ino

    result = run("ca", "bundle", "--ca", ca_dir, "--out", out, env={"SSL_CERT_FILE": str(roots_file)}, umask=0o077)

    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert certificates(data) == [*roots, ca_cert(ca_dir)]
    assert KEY_MARKER not in data + result.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # whatever the umask: it holds no key
    assert out.stat().st_ino != old_inode  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in out_dir.iterdir()) == ["bundle.pem"]  # no temporary file left
    assert "3 certificates" in result.stdout.decode() and "no private key" in result.stdout.decode()
    assert ca_files.load(ca_dir).fingerprint in result.stdout.decode()


@pytest.mark.parametrize("out", [[], ["--out", "-"]], ids=["no---out", "--out--"])
def test_bundle_to_stdout_is_the_pem_alone(
    ca_dir: Path, tmp_path: Path, lab_roots: tuple[Path, list[x509.Certificate]], out: list[str]
) -> None:
    roots_file, roots = lab_roots

    result = subprocess.run(
        [BUMPER, "ca", "bundle", "--ca", str(ca_dir), *out],
        capture_output=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "SSL_CERT_FILE": str(roots_file)},
    )

    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [*roots, ca_cert(ca_dir)])
    assert not (tmp_path / "-").exists()


def test_bundle_names_the_ca_once_when_the_system_already_trusts_it(ca_dir: Path, tmp_path: Path) -> None:
    roots_file = tmp_path / "roots.pem"
    other = pki.Authority.root("another root").cert.public_bytes(serialization.Encoding.PEM)
    roots_file.write_bytes((ca_dir / "ca.pem").read_bytes() + other)  # installed by update-ca-certificates

    result = run("ca", "bundle", "--ca", ca_dir, env={"SSL_CERT_FILE": str(roots_file)})

    assert result.returncode == 0, result.stderr
    assert result.stdout == roots_file.read_bytes()
    reported = run("ca", "bundle", "--ca", ca_dir, "--out", tmp_path / "b.pem", env={"SSL_CERT_FILE": str(roots_file)})
    assert "2 certificates" in reported.stdout.decode() and "already among them" in reported.stdout.decode()


def test_bundle_of_a_ca_with_an_intermediate_holds_the_root_only(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert run("ca", "init", "--intermediate", "--ca", ca_dir).returncode == 0
    roots_file = tmp_path / "roots.pem"
    roots_file.write_bytes(pki.Authority.root().cert.public_bytes(serialization.Encoding.PEM))

    result = run("ca", "bundle", "--ca", ca_dir, env={"SSL_CERT_FILE": str(roots_file)})

    assert result.returncode == 0, result.stderr
    bundle = certificates(result.stdout)
    assert bundle[-1] == ca_cert(ca_dir)
    assert x509.load_pem_x509_certificate((ca_dir / "issuing.pem").read_bytes()) not in bundle


def test_with_an_intermediate_the_fingerprints_named_are_the_roots(tmp_path: Path) -> None:
    """What the bundle's message and the ConfigMap's comment name is what they hold: ca.pem, not the
    issuing CA (CertificateAuthority.fingerprint, the signing CA's)."""
    ca_dir = tmp_path / "ca"
    assert run("ca", "init", "--intermediate", "--ca", ca_dir).returncode == 0
    roots_file = tmp_path / "roots.pem"
    roots_file.write_bytes(pki.Authority.root().cert.public_bytes(serialization.Encoding.PEM))
    root = ca_files.fingerprint(ca_cert(ca_dir))
    issuing = ca_files.fingerprint(x509.load_pem_x509_certificate((ca_dir / "issuing.pem").read_bytes()))

    bundle = run("ca", "bundle", "--ca", ca_dir, "--out", tmp_path / "b.pem", env={"SSL_CERT_FILE": str(roots_file)})
    configmap = run("ca", "export", "--ca", ca_dir, "--format", "k8s-configmap", "-")

    assert bundle.stdout.decode().endswith(f"bumper's CA {root}\n") and issuing not in bundle.stdout.decode()
    assert configmap.stdout.decode().startswith(
        f"# bumper's CA certificate for client pods (never a key); SHA-256 {root}\n"
    )


def test_curl_with_the_bundle_works_through_bumper(
    bumper: Bumper, upstream: Upstream, tmp_path: Path, lab_roots: tuple[Path, list[x509.Certificate]]
) -> None:
    roots_file, _ = lab_roots
    bundle = tmp_path / "bundle.pem"
    assert (
        run("ca", "bundle", "--ca", bumper.ca_dir, "--out", bundle, env={"SSL_CERT_FILE": str(roots_file)}).returncode
        == 0
    )

    def curl_with(cacert: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-x", bumper.proxy, "--cacert", str(cacert), upstream.url("/bundle")],
            capture_output=True,
            text=True,
            timeout=60,
        )

    with_bundle = curl_with(bundle)
    assert with_bundle.returncode == 0, with_bundle.stderr
    assert "hello" in with_bundle.stdout
    without_ca = curl_with(roots_file)  # the same roots but bumper's CA: the mimic is not trusted
    assert without_ca.returncode == 60, without_ca.stderr


@NEEDS_SYSTEM_ROOTS
def test_python_with_ssl_cert_file_set_to_the_bundle_works_through_bumper(
    bumper: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    assert run("ca", "bundle", "--ca", bumper.ca_dir, "--out", bundle).returncode == 0
    client = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).status)"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "ssl_cert_file")}

    result = subprocess.run(
        [sys.executable, "-c", client, upstream.url("/python")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "HTTPS_PROXY": bumper.proxy, "SSL_CERT_FILE": str(bundle)},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "200\n"


# Node 20 has no proxy support of its own: CONNECT through bumper, then TLS over the tunnel, with
# Node's default roots plus NODE_EXTRA_CA_CERTS, which Node reads once at start-up.
NODE_CLIENT = """
const http = require("http"), tls = require("tls");
const [proxyPort, host, port] = process.argv.slice(1);
const req = http.request({host: "127.0.0.1", port: proxyPort, method: "CONNECT", path: `${host}:${port}`});
req.on("connect", (res, socket) => {
  const conn = tls.connect({socket, servername: host}, () => {
    conn.write(`GET /node HTTP/1.1\\r\\nHost: ${host}\\r\\nConnection: close\\r\\n\\r\\n`);
  });
  let reply = "";
  conn.on("data", (d) => { reply += d; });
  conn.on("end", () => { console.log(reply.split("\\r\\n")[0]); });
  conn.on("error", (e) => { console.error(e.code); process.exit(3); });
});
req.on("error", (e) => { console.error(e.message); process.exit(4); });
req.setTimeout(30000, () => { console.error("timeout"); process.exit(5); });
req.end();
"""


@pytest.mark.parametrize("extra", ["ca.pem", "bundle", None])
def test_node_with_node_extra_ca_certs_works_through_bumper(
    bumper: Bumper,
    upstream: Upstream,
    tmp_path: Path,
    lab_roots: tuple[Path, list[x509.Certificate]],
    extra: str | None,
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    roots_file, _ = lab_roots
    extra_file = tmp_path / "extra.pem"
    if extra == "ca.pem":
        assert run("ca", "export", "--ca", bumper.ca_dir, extra_file).returncode == 0
    elif extra == "bundle":
        bundle = run("ca", "bundle", "--ca", bumper.ca_dir, "--out", extra_file, env={"SSL_CERT_FILE": str(roots_file)})
        assert bundle.returncode == 0
    else:  # the lab roots without bumper's CA: Node must refuse the mimic
        shutil.copyfile(roots_file, extra_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}

    result = subprocess.run(
        [node, "-e", NODE_CLIENT, str(bumper.port), upstream.host, str(upstream.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "NODE_EXTRA_CA_CERTS": str(extra_file)},
    )

    if extra is None:
        assert (result.returncode, result.stderr.strip()) == (3, "UNABLE_TO_VERIFY_LEAF_SIGNATURE"), result
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("HTTP/1.1 200 ")


@pytest.mark.parametrize("content", [None, b"no certificates in here\n"], ids=["missing", "empty"])
def test_bundle_without_system_roots_is_a_configuration_error(
    ca_dir: Path, tmp_path: Path, content: bytes | None
) -> None:
    roots_file = tmp_path / "roots.pem"
    if content is not None:
        roots_file.write_bytes(content)

    result = run("ca", "bundle", "--ca", ca_dir, "--out", tmp_path / "b.pem", env={"SSL_CERT_FILE": str(roots_file)})

    line = assert_one_error_line(result, str(roots_file))
    assert "system roots" in line
    assert not (tmp_path / "b.pem").exists()


def test_bundle_into_a_missing_directory_is_a_configuration_error(
    ca_dir: Path, tmp_path: Path, lab_roots: tuple[Path, list[x509.Certificate]]
) -> None:
    out = tmp_path / "no-such-dir" / "b.pem"

    result = run("ca", "bundle", "--ca", ca_dir, "--out", out, env={"SSL_CERT_FILE": str(lab_roots[0])})

    assert_one_error_line(result, str(out), "cannot write")


def test_bundle_without_a_ca_is_a_configuration_error(tmp_path: Path) -> None:
    result = run("ca", "bundle", "--ca", tmp_path)

    assert_one_error_line(result, str(tmp_path), "holds no CA")
    assert list(tmp_path.iterdir()) == []


# --- bumper ca export --format ----------------------------------------------------------------------


def test_der_export_round_trips(ca_dir: Path, tmp_path: Path) -> None:
    der = tmp_path / "ca.crt"

    result = run("ca", "export", "--ca", ca_dir, "--format", "der", der)

    assert result.returncode == 0, result.stderr
    assert KEY_MARKER not in der.read_bytes()
    back = subprocess.run(
        ["openssl", "x509", "-inform", "der", "-in", str(der), "-outform", "pem"], capture_output=True, timeout=TIMEOUT
    )
    assert back.returncode == 0, back.stderr
    assert back.stdout == (ca_dir / "ca.pem").read_bytes()


def configmap_of(data: bytes) -> dict[str, object]:
    assert KEY_MARKER not in data
    document = yaml.safe_load(data)
    assert isinstance(document, dict)
    return document


def test_configmap_holds_the_ca_as_ca_pem(ca_dir: Path) -> None:
    result = run("ca", "export", "--ca", ca_dir, "--format", "k8s-configmap", "-")

    assert (result.returncode, result.stderr) == (0, b"")
    document = configmap_of(result.stdout)
    assert document["apiVersion"] == "v1"
    assert document["kind"] == "ConfigMap"
    assert document["metadata"] == {
        "name": "bumper-ca",
        "namespace": "default",
        "labels": {"app.kubernetes.io/name": "bumper", "app.kubernetes.io/component": "ca"},
    }
    assert document["data"] == {"ca.pem": (ca_dir / "ca.pem").read_text()}


def test_configmap_to_a_file_with_a_name_and_namespace(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bumper-ca.yaml"
    name, namespace = "egress.bumper-ca-v2", "n" * 63  # a subdomain may have dots; a label may be 63 long

    result = run(
        "ca", "export", "--ca", ca_dir, "--format", "k8s-configmap", "--name", name, "--namespace", namespace, out,
        umask=0o077,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert f"{namespace}/{name}" in result.stdout.decode()
    document = configmap_of(out.read_bytes())
    metadata = document["metadata"]
    assert isinstance(metadata, dict)
    assert (metadata["name"], metadata["namespace"]) == (name, namespace)
    assert document["data"] == {"ca.pem": (ca_dir / "ca.pem").read_text()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_kubectl_reads_the_configmap(ca_dir: Path, tmp_path: Path) -> None:
    """kubectl's own decoder, offline (kustomize needs no cluster): the manifest is what `kubectl apply` reads."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    assert run("ca", "export", "--ca", ca_dir, "--format", "k8s-configmap", tmp_path / "ca.yaml").returncode == 0
    (tmp_path / "kustomization.yaml").write_text("resources: [ca.yaml]\n")

    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, timeout=60)

    assert result.returncode == 0, result.stderr
    document = configmap_of(result.stdout)
    assert document["kind"] == "ConfigMap"
    assert document["data"] == {"ca.pem": (ca_dir / "ca.pem").read_text()}


@pytest.mark.parametrize(
    "option, value",
    [
        ("--name", "Bumper-CA"),
        ("--name", "bumper_ca"),
        ("--name", "-bumper"),
        ("--name", "bumper-"),
        ("--name", "a..b"),
        ("--name", ""),
        ("--name", "a" * 254),
        ("--namespace", "team.apps"),  # a label: no dots
        ("--namespace", "a" * 64),
        ("--namespace", "Default"),
        ("--namespace", "ns\nkind: Secret"),  # no YAML injection through a name
    ],
)
def test_bad_names_are_usage_errors(ca_dir: Path, tmp_path: Path, option: str, value: str) -> None:
    result = run("ca", "export", "--ca", ca_dir, "--format", "k8s-configmap", f"{option}={value}", tmp_path / "cm.yaml")

    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and "DNS-1123" in stderr and option in stderr
    assert list(tmp_path.iterdir()) == [ca_dir]


def test_name_without_the_configmap_format_is_a_configuration_error(ca_dir: Path, tmp_path: Path) -> None:
    result = run("ca", "export", "--ca", ca_dir, "--name", "bumper-ca", tmp_path / "out.pem")

    assert_one_error_line(result, "--name", "k8s-configmap")
    assert list(tmp_path.iterdir()) == [ca_dir]
