"""An issuing intermediate signs the mimics, so the root key can be kept offline."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from bumper.certs import ca as ca_files
from tests.conftest import BUMPER, Upstream, client_tls_context, curl, open_tunnel


def bumper_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUMPER, *map(str, args)], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def offline_root_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("intermediate") / "ca"
    result = bumper_cli("ca", "init", "--intermediate", "--ca", directory)
    assert result.returncode == 0, result.stderr
    assert "move it offline" in result.stdout and "issuing CA" in result.stdout
    (directory / "ca.key").rename(directory.parent / "root.key.offline")  # the root key leaves the proxy
    return directory


def test_init_makes_a_root_and_an_issuing_intermediate(offline_root_dir: Path) -> None:
    root = x509.load_pem_x509_certificate((offline_root_dir / "ca.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((offline_root_dir / "issuing.pem").read_bytes())
    issuing.verify_directly_issued_by(root)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    assert issuing.not_valid_after_utc <= root.not_valid_after_utc
    assert stat.S_IMODE((offline_root_dir / "issuing.key").stat().st_mode) == 0o600
    assert not (offline_root_dir / "ca.key").exists()


def test_show_lists_both_and_export_writes_the_root(offline_root_dir: Path, tmp_path: Path) -> None:
    shown = bumper_cli("ca", "show", "--ca", offline_root_dir).stdout
    assert "CA certificate" in shown and "issuing CA" in shown and "issuing.pem" in shown
    assert bumper_cli("ca", "export", "--ca", offline_root_dir, tmp_path / "out.pem").returncode == 0
    assert (tmp_path / "out.pem").read_bytes() == (offline_root_dir / "ca.pem").read_bytes()


def test_mimics_are_signed_by_the_intermediate_and_sent_with_it(
    start_bumper, upstream: Upstream, offline_root_dir: Path
) -> None:
    bumper = start_bumper(ca_dir=offline_root_dir)
    # curl trusts only the root: it succeeds only if bumper sends the intermediate after the mimic.
    r = curl(bumper, upstream.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
    sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
    with client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname=upstream.host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    issuing = x509.load_pem_x509_certificate((offline_root_dir / "issuing.pem").read_bytes())
    x509.load_der_x509_certificate(der).verify_directly_issued_by(issuing)


def test_an_intermediate_from_another_root_is_a_config_error(tmp_path: Path) -> None:
    ca_files.create(tmp_path / "one", intermediate=True)
    ca_files.create(tmp_path / "two")
    (tmp_path / "two" / "issuing.pem").write_bytes((tmp_path / "one" / "issuing.pem").read_bytes())
    (tmp_path / "two" / "issuing.key").write_bytes((tmp_path / "one" / "issuing.key").read_bytes())
    (tmp_path / "two" / "issuing.key").chmod(0o600)
    result = bumper_cli("--ca", tmp_path / "two", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"bumper: {tmp_path / 'two' / 'issuing.pem'}: not issued by the CA in {tmp_path / 'two' / 'ca.pem'}\n"
    )
