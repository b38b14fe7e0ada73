"""`bumper mimic --ca DIR CERT.pem`: the proxy's own minting, from the command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from bumper.certs import ca as ca_files
from tests import pki
from tests.conftest import BUMPER

AIA = x509.AuthorityInformationAccess(
    [
        x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier("http://i.test/ca")
        )
    ]
)


def bumper_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUMPER, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def upstream_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, x509.Certificate]:
    root = pki.Authority.root("real-world root")
    leaf = root.leaf("shop.test", "*.shop.test", key=pki.ec_key(), extra=((AIA, False),))
    path = tmp_path_factory.mktemp("upstream") / "upstream.pem"
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf.cert, root.cert)))
    return path, leaf.cert


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mimic-ca") / "ca"
    ca_files.create(directory, now=pki.NOW - pki.DAY)
    return directory


def test_prints_the_mimic_pem(ca_dir: Path, upstream_file: tuple[Path, x509.Certificate]) -> None:
    path, upstream = upstream_file
    result = bumper_cli("mimic", "--ca", ca_dir, path)
    assert result.returncode == 0, result.stderr
    (made,) = x509.load_pem_x509_certificates(result.stdout.encode())
    made.verify_directly_issued_by(ca_files.load(ca_dir).cert)
    assert made.subject == upstream.subject
    san = x509.SubjectAlternativeName
    assert made.extensions.get_extension_for_class(san) == upstream.extensions.get_extension_for_class(san)
    with pytest.raises(x509.ExtensionNotFound):
        made.extensions.get_extension_for_class(x509.AuthorityInformationAccess)


def test_text_shows_both_side_by_side(ca_dir: Path, upstream_file: tuple[Path, x509.Certificate]) -> None:
    result = bumper_cli("mimic", "--ca", ca_dir, upstream_file[0], "--text")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert rows["subject"].endswith("(same)")
    assert rows["subjectAltName"].endswith("(same)") and "DNS:*.shop.test" in rows["subjectAltName"]
    assert rows["authorityInfoAccess"].rstrip().endswith("-")  # dropped
    assert "bumper CA" in rows["issuer"] and "real-world root" in rows["issuer"]


def test_with_an_intermediate_the_chain_follows(tmp_path: Path, upstream_file: tuple[Path, x509.Certificate]) -> None:
    ca_files.create(tmp_path / "ca", now=pki.NOW - pki.DAY, intermediate=True)
    result = bumper_cli("mimic", "--ca", tmp_path / "ca", upstream_file[0])
    made, issuing = x509.load_pem_x509_certificates(result.stdout.encode())
    assert issuing == x509.load_pem_x509_certificate((tmp_path / "ca" / "issuing.pem").read_bytes())
    made.verify_directly_issued_by(issuing)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a certificate\n", "not a PEM certificate file"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM certificate file"),
        (None, "cannot read"),
    ],
    ids=["garbage", "broken-pem", "missing"],
)
def test_unparseable_input_is_one_line_and_exit_2(
    ca_dir: Path, tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "input.pem"
    if content is not None:
        path.write_bytes(content)
    result = bumper_cli("mimic", "--ca", ca_dir, path)
    assert result.returncode == 2
    assert result.stderr == f"bumper: {path}: {message}" + result.stderr.split(message, 1)[1]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_no_ca_is_one_line_and_exit_2(tmp_path: Path, upstream_file: tuple[Path, x509.Certificate]) -> None:
    result = bumper_cli("mimic", "--ca", tmp_path / "none", upstream_file[0])
    assert (result.returncode, result.stderr.count("\n")) == (2, 1)
    assert "holds no CA" in result.stderr
    assert not (tmp_path / "none").exists()  # nothing was created


def test_text_shows_extensions_cryptography_cannot_read(ca_dir: Path, tmp_path: Path) -> None:
    """A SAN with an x400Address is copied verbatim; --text shows it as DER instead of failing."""
    import cryptography_vectors

    der = cryptography_vectors.open_vector_file("x509/san_x400address.der", "rb").read()
    path = tmp_path / "x400.pem"
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    result = bumper_cli("mimic", "--ca", ca_dir, path, "--text")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert " DER 30" in rows["subjectAltName"] and rows["subjectAltName"].endswith("(same)")
