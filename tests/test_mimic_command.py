"""`bumper mimic --ca DIR CERT.pem`: the proxy's own minting, from the command line."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

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
        (b"not a certificate\n", "not a certificate file (neither PEM nor DER)"),
        (b"0\x82\x01\x00 a truncated DER SEQUENCE", "not a certificate file (neither PEM nor DER)"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM certificate file"),
        (None, "cannot read"),
    ],
    ids=["garbage", "broken-der", "broken-pem", "missing"],
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


def text_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """--text output by field: (upstream, mimic), each value's lines joined again (at spaces)."""
    header, *lines = stdout.splitlines()
    upstream_at, mimic_at = header.index("upstream"), header.index("mimic")
    rows: dict[str, tuple[str, str]] = {}
    field = ""
    for line in lines:
        field = line[:upstream_at].strip() or field  # a value's next lines leave the field empty
        upstream, mimic = rows.get(field, ("", ""))
        rows[field] = (f"{upstream} {line[upstream_at:mimic_at].strip()}".strip(), f"{mimic} {line[mimic_at:]}".strip())
    return rows


def without_fresh_values(text: str) -> list[str]:
    """--text output without the rows that differ on every run: the mimic's serial and its new key's id."""
    return [line for line in text.splitlines() if line.split()[0] not in ("serial", "subjectKeyIdentifier")]


def test_der_input_gives_the_same_mimic_as_pem(
    ca_dir: Path, tmp_path: Path, upstream_file: tuple[Path, x509.Certificate]
) -> None:
    pem_path, upstream = upstream_file
    der_path = tmp_path / "upstream.der"
    der_path.write_bytes(upstream.public_bytes(serialization.Encoding.DER))

    from_pem = bumper_cli("mimic", "--ca", ca_dir, pem_path, "--text")
    from_der = bumper_cli("mimic", "--ca", ca_dir, der_path, "--text")
    as_pem = bumper_cli("mimic", "--ca", ca_dir, der_path)

    assert (from_pem.returncode, from_der.returncode, as_pem.returncode) == (0, 0, 0), from_der.stderr
    assert "shop.test" in from_der.stdout
    assert without_fresh_values(from_der.stdout) == without_fresh_values(from_pem.stdout)
    (made,) = x509.load_pem_x509_certificates(as_pem.stdout.encode())
    assert made.subject == upstream.subject


def many_extensions() -> tuple[tuple[x509.ExtensionType, bool], ...]:
    """One of most extension types cryptography parses, each with values of every kind it holds."""
    dv, custom = x509.ObjectIdentifier("2.23.140.1.2.1"), x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")
    notice = x509.UserNotice(x509.NoticeReference("Example CA", [1, 2]), "for testing only")
    return (
        (x509.KeyUsage(True, False, True, False, False, False, False, False, False), True),
        (
            x509.CertificatePolicies(
                [x509.PolicyInformation(dv, None), x509.PolicyInformation(custom, ["https://cps.test/", notice])]
            ),
            False,
        ),
        (
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint([x509.UniformResourceIdentifier("http://crl.test/a.crl")], None, None, None),
                    x509.DistributionPoint(
                        [x509.UniformResourceIdentifier("http://crl.test/b.crl")],
                        None,
                        frozenset({x509.ReasonFlags.key_compromise, x509.ReasonFlags.ca_compromise}),
                        [x509.DirectoryName(pki.name("CRL issuer"))],
                    ),
                ]
            ),
            False,
        ),
        (
            x509.IssuerAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
                    x509.IPAddress(ipaddress.ip_network("2001:db8::/32")),
                    x509.RFC822Name("ca@example.test"),
                    x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4")),
                    x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03upn"),
                ]
            ),
            False,
        ),
        (x509.TLSFeature([x509.TLSFeatureType.status_request]), False),
        (x509.InhibitAnyPolicy(0), False),
        (x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None), True),
        (x509.PrivateKeyUsagePeriod(pki.NOW - pki.DAY, pki.NOW + pki.DAY), False),
        (x509.MSCertificateTemplate(x509.ObjectIdentifier("1.3.6.1.4.1.311.21.8.1"), 100, None), False),
        (x509.OCSPNoCheck(), False),
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.2"), b"\x05\x00"), False),
    )


def test_text_shows_readable_values_never_python_reprs(ca_dir: Path, tmp_path: Path) -> None:
    root = pki.Authority.root("policy root")
    leaf = root.leaf(
        "many.test",
        eku=(ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier("1.3.6.1.4.1.99999.3")),
        extra=((AIA, False), *many_extensions()),
    )
    path = tmp_path / "many.pem"
    path.write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))

    result = bumper_cli("mimic", "--ca", ca_dir, path, "--text")

    assert result.returncode == 0, result.stderr
    for repr_mark in ("<", ">", "Object", "b'", 'b"', "datetime", "Name(", " object at "):
        assert repr_mark not in result.stdout, f"{repr_mark!r} in:\n{result.stdout}"
    upstream = {field: values[0] for field, values in text_rows(result.stdout).items()}
    assert upstream["keyUsage"] == "critical digital_signature, key_encipherment"
    assert upstream["extendedKeyUsage"] == "serverAuth, 1.3.6.1.4.1.99999.3"
    assert upstream["authorityInfoAccess"] == "caIssuers URI:http://i.test/ca"
    assert upstream["certificatePolicies"] == (
        "CA/B domain-validated, 1.3.6.1.4.1.99999.1 [https://cps.test/, "
        "(notice_reference=(organization=Example CA, notice_numbers=[1, 2]), explicit_text=for testing only)]"
    )
    assert upstream["cRLDistributionPoints"] == (
        "URI:http://crl.test/a.crl, (full_name=[URI:http://crl.test/b.crl], reasons=[ca_compromise, "
        "key_compromise], crl_issuer=[dirName:CN=CRL issuer,O=bumper tests])"
    )
    assert upstream["issuerAltName"] == (
        "IP:192.0.2.1, IP:2001:db8::/32, email:ca@example.test, RID:1.2.3.4, "
        "otherName:1.3.6.1.4.1.311.20.2.3:0c0375706e"
    )
    assert upstream["TLSFeature"] == "status_request"
    assert upstream["inhibitAnyPolicy"] == "skip_certs=0"
    assert upstream["policyConstraints"] == "critical require_explicit_policy=0"
    assert upstream["privateKeyUsagePeriod"] == (
        f"not_before={pki.NOW - pki.DAY:%Y-%m-%d %H:%M:%S} UTC, not_after={pki.NOW + pki.DAY:%Y-%m-%d %H:%M:%S} UTC"
    )
    assert upstream["msCertificateTemplate"] == "template_id=1.3.6.1.4.1.311.21.8.1, major_version=100"
    assert upstream["OCSPNoCheck"] == "OCSPNoCheck"
    assert upstream["1.3.6.1.4.1.99999.2"] == "DER 0500"
    assert upstream["basicConstraints"] == "critical CA:FALSE"


def test_an_rsa_upstream_never_ends_in_a_traceback(ca_dir: Path, tmp_path: Path) -> None:
    """The mimic's RSA key came from a worker process whose shutdown raced the exit: now and then
    `OSError: Bad file descriptor` and a traceback, more often on a busy machine."""
    path = tmp_path / "rsa.pem"
    path.write_bytes(
        pki.Authority.root().leaf("rsa.test", key=pki.rsa_key()).cert.public_bytes(serialization.Encoding.PEM)
    )

    for _ in range(5):
        result = bumper_cli("mimic", "--ca", ca_dir, path)

        assert (result.returncode, result.stderr) == (0, "")
        (made,) = x509.load_pem_x509_certificates(result.stdout.encode())
        assert isinstance(made.public_key(), rsa.RSAPublicKey)


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


@pytest.mark.parametrize("tag", [7, 13, 29], ids=["ObjectDescriptor", "RELATIVE-OID", "CHARACTER-STRING"])
def test_a_subject_cryptography_cannot_read_is_copied_byte_for_byte(ca_dir: Path, tmp_path: Path, tag: int) -> None:
    """Found as an attacker would: these ended in a traceback. Now the mimic carries the very bytes."""
    root = pki.Authority.root()
    subject = pki.raw_name(("2.5.4.10", tag, b"hostile strings"), ("2.5.4.3", 0x0C, b"odd.test"))
    upstream = pki.reissued(root.leaf("odd.test").cert, root, subject=subject)
    path = tmp_path / "odd.der"
    path.write_bytes(upstream.public_bytes(serialization.Encoding.DER))

    result = bumper_cli("mimic", "--ca", ca_dir, path)
    text = bumper_cli("mimic", "--ca", ca_dir, path, "--text")

    assert result.returncode == 0, result.stderr
    (made,) = x509.load_pem_x509_certificates(result.stdout.encode())
    assert subject in made.tbs_certificate_bytes
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("subject "))
    block = [lines[start], *itertools.takewhile(lambda line: line.startswith(" "), lines[start + 1 :])]
    words = " ".join(block).split()
    assert words[:2] == ["subject", "DER"] and "(same)" in words  # shown as its DER, and the mimic's alike
    assert "".join(w for w in words[2:] if w != "(same)") == subject.hex()


@pytest.mark.parametrize(
    ("tag", "reason"),
    [(b"\x69", "mstring not universal"), (b"\x1f\x69", "mstring wrong tag"), (3, "invalid bit string bits left")],
    ids=["application-9-constructed", "universal-105-high-tag", "BIT-STRING"],
)
def test_a_subject_openssl_cannot_read_is_one_line_and_exit_2(
    ca_dir: Path, tmp_path: Path, tag: int | bytes, reason: str
) -> None:
    root = pki.Authority.root()
    subject = pki.raw_name(("2.5.4.10", tag, b"hostile strings"), ("2.5.4.3", 0x0C, b"odd.test"))
    path = tmp_path / "odd.der"
    path.write_bytes(pki.reissued_der(root.leaf("odd.test").cert, root, subject=subject))

    result = bumper_cli("mimic", "--ca", ca_dir, path)

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"bumper: {path}: cannot mimic this certificate: OpenSSL cannot read it: {reason}\n"
