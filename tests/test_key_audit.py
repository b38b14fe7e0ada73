"""The key audit (tests/key_audit.py) finds a leaked key in each form a leak would take, and nothing
in outputs that only carry certificates: it is what makes the whole run's check worth having."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bumper.certs import ca as ca_files
from bumper.certs.mimicdb import SqliteMimicStore, StoredMimic
from tests import key_audit


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ca_files.CertificateAuthority]:
    tree = tmp_path_factory.mktemp("audit")
    return tree, ca_files.create(tree / "ca")


def _leaks(tree: Path, output: bytes) -> list[str]:
    return key_audit.leaks(key_audit.collect(tree), [("bumper", output)], tree)


def test_the_ca_key_file_itself_is_no_leak_and_the_certificate_is_none(
    made: tuple[Path, ca_files.CertificateAuthority],
) -> None:
    tree, authority = made
    assert key_audit.collect(tree).keys == 1
    assert _leaks(tree, (tree / "ca" / "ca.pem").read_bytes() + (tree / "ca" / "ca.der").read_bytes()) == []


def test_the_public_key_at_any_alignment_is_none(made: tuple[Path, ca_files.CertificateAuthority]) -> None:
    """A certificate's PEM (as in a browser's netlog) carries the public key, which the key's own PEM
    holds too: a line of it may match one of the key's lines, and is no leak."""
    tree, authority = made
    spki = authority.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert _leaks(tree, b"\n".join(base64.b64encode(b"\0" * shift + spki) for shift in range(3))) == []


def _forms(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    numbers = key.private_numbers()
    secret = numbers.private_value if isinstance(numbers, ec.EllipticCurvePrivateNumbers) else numbers.d
    return {
        "pem in a log line": b"2026-12-07T00:00:00.000Z loaded " + pkcs8.replace(b"\n", b"\\n"),
        "base64 of the DER": b"key=" + base64.b64encode(der),
        "hex of the secret": f"secret {secret:X}".encode(),
        "repr of the numbers": repr(numbers).encode() + f" d={secret}".encode(),
    }


@pytest.mark.parametrize("form", ["pem in a log line", "base64 of the DER", "hex of the secret", "repr of the numbers"])
def test_a_ca_key_in_an_output_is_found(made: tuple[Path, ca_files.CertificateAuthority], form: str) -> None:
    tree, authority = made
    assert isinstance(authority.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    assert _leaks(tree, _forms(authority.key)[form])


def test_a_ca_key_copied_to_another_file_is_found(made: tuple[Path, ca_files.CertificateAuthority]) -> None:
    tree, _ = made
    copy = tree / "access.log"
    copy.write_bytes((tree / "ca" / "ca.key").read_bytes())
    try:
        assert [line.split(":")[0] for line in _leaks(tree, b"")] == [str(copy)]
    finally:
        copy.unlink()


def test_a_mimic_key_from_the_cache_is_found(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    db = SqliteMimicStore(tmp_path / key_audit.MIMIC_DB)
    db.put(b"\0" * 32, "mode", "ca", StoredMimic(b"cert", der))
    db.close()

    assert key_audit.collect(tmp_path).keys == 1
    assert _leaks(tmp_path, _forms(key)["hex of the secret"])
