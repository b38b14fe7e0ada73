"""Hostile upstream certificates through the live proxy (issue 15, section 2): names of string types
cryptography cannot read, embedded NULs, thousands of SANs, huge certificates and chains, v1
certificates, negative serials, critical unknown extensions, RSA-8192 and the mirrored defects.
Each is tried with curl directly (trusting the tests' root) and through bumper (trusting bumper's
CA): bumper never writes a traceback (conftest), never hangs, and never makes one look more trusted
than it is directly. Most are served exactly as directly.

With BUMPER_HOSTILE_TABLE=PATH, the module writes the table of what the client saw each way and
bumper's log line to PATH (docs/mimics.md, "Hostile certificates", shows one).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tests import pki
from tests.conftest import Bumper, Pki, Upstream, start_with_policy
from tests.test_mirroring import MIRRORED
from tests.test_trust import log_field

CN, ORG = NameOID.COMMON_NAME.dotted_string, NameOID.ORGANIZATION_NAME.dotted_string
SAN_OID = x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME


def odd_subject(host: str, tag: int | bytes) -> bytes:
    """A subject whose organization is a string of TAG, which cryptography cannot read."""
    return pki.raw_name((ORG, tag, b"hostile strings"), (CN, 0x0C, host.encode()))


def with_subject(tag: int | bytes) -> Callable[[pki.Authority, str], pki.Leaf]:
    def make(root: pki.Authority, host: str) -> pki.Leaf:
        leaf = root.leaf(host)
        return pki.Leaf(leaf.key, pki.reissued(leaf.cert, root, subject=odd_subject(host, tag)), root)

    return make


def behind_an_odd_intermediate(root: pki.Authority, host: str) -> pki.Leaf:
    """An intermediate whose subject (and so the leaf's issuer) holds an ObjectDescriptor."""
    intermediate = root.intermediate("odd intermediate")
    name = odd_subject("odd intermediate", 7)
    odd = pki.Authority(intermediate.key, pki.reissued(intermediate.cert, root, subject=name))
    leaf = intermediate.leaf(host)  # then named as issued by the odd one, which has the same key
    return pki.Leaf(leaf.key, pki.reissued(leaf.cert, odd, issuer_name=name), odd, chain=(odd.cert,))


def raw_san(*dns_names: bytes) -> x509.UnrecognizedExtension:
    """A SAN of dNSNames written as bytes: cryptography will not write a NUL into one."""
    body = b"".join(pki.tlv(0x82, name) for name in dns_names)
    return x509.UnrecognizedExtension(SAN_OID, pki.tlv(0x30, body))


def nul_in_names(root: pki.Authority, host: str) -> pki.Leaf:
    nul_name = host.encode() + b"\x00.evil.test"
    leaf = root.leaf(extra=((raw_san(nul_name), False),))
    subject = pki.raw_name((ORG, 0x0C, b"bumper tests"), (CN, 0x0C, nul_name))
    return pki.Leaf(leaf.key, pki.reissued(leaf.cert, root, subject=subject), root)


def many_sans(count: int) -> Callable[[pki.Authority, str], pki.Leaf]:
    def make(root: pki.Authority, host: str) -> pki.Leaf:
        names = [x509.DNSName(f"n{i}.filler.test") for i in range(count)] + [x509.DNSName(host)]
        return root.leaf(subject=pki.name(host), extra=((x509.SubjectAlternativeName(names), False),))

    return make


def huge(size: int) -> Callable[[pki.Authority, str], pki.Leaf]:
    """A leaf carrying SIZE bytes in a non-critical extension nobody knows."""

    def make(root: pki.Authority, host: str) -> pki.Leaf:
        padding = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.7"), pki.tlv(0x04, bytes(size)))
        return root.leaf(host, extra=((padding, False),))

    return make


def deep_chain(depth: int) -> Callable[[pki.Authority, str], pki.Leaf]:
    """A leaf DEPTH - 1 intermediates below the root, each sent by the upstream."""

    def make(root: pki.Authority, host: str) -> pki.Leaf:
        issuer, sent = root, []
        for n in range(depth - 1):
            key = pki.ec_key()
            cert = (
                x509.CertificateBuilder()
                .subject_name(pki.name(f"intermediate {n}"))
                .issuer_name(issuer.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(pki.NOW - pki.DAY)
                .not_valid_after(pki.NOW + 300 * pki.DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
                .sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
            )
            issuer = pki.Authority(key, cert)
            sent.insert(0, cert)
        leaf = issuer.leaf(host)
        return pki.Leaf(leaf.key, leaf.cert, issuer, chain=tuple(sent))

    return make


def v1(root: pki.Authority, host: str) -> pki.Leaf:
    leaf = root.leaf(host)
    return pki.Leaf(leaf.key, pki.reissued(leaf.cert, root, v1=True), root)


def negative_serial(root: pki.Authority, host: str) -> pki.Leaf:
    leaf = root.leaf(host)
    return pki.Leaf(leaf.key, pki.reissued(leaf.cert, root, serial=-0x1234), root)


def empty_rdn(root: pki.Authority, host: str) -> pki.Leaf:
    """A subject with an empty RDN (SET OF nothing): not X.501, but sound DER, which OpenSSL takes."""
    name = pki.raw_name((CN, 0x0C, host.encode()))
    odd = pki.tlv(0x30, pki.contents(name) + b"\x31\x00")
    leaf = root.leaf(host)
    return pki.Leaf(leaf.key, pki.reissued(leaf.cert, root, subject=odd), root)


def indefinite_length_subject(root: pki.Authority, host: str) -> pki.Leaf:
    """A subject SEQUENCE of indefinite length (BER, not DER): OpenSSL takes it, cryptography cannot
    load the certificate at all, so there is nothing bumper can copy."""
    name = pki.raw_name((CN, 0x0C, host.encode()))
    ber = b"\x30\x80" + pki.contents(name) + b"\x00\x00"
    leaf = root.leaf(host)
    raw = pki.RawCertificate(pki.reissued_der(leaf.cert, root, subject=ber))
    return pki.Leaf(leaf.key, raw, root)  # type: ignore[arg-type]


SAME = "same"  # the client sees through bumper exactly what it sees directly
REFUSED = "refused"  # refused both ways, not alike: refused through bumper
BAD_CERT = "bad_cert"  # nothing bumper can copy: verify=bad_cert, and the client sees an unknown issuer


@dataclass(frozen=True)
class Case:
    host: str
    make: Callable[[pki.Authority, str], pki.Leaf]
    expect: str = SAME
    max_time: int = 20


CASES: dict[str, Case] = {
    "subject string of tag 7 (ObjectDescriptor)": Case("tag7.hostile.test", with_subject(7)),
    "subject string of tag 13 (RELATIVE-OID)": Case("tag13.hostile.test", with_subject(13)),
    "subject string of tag 29 (CHARACTER STRING)": Case("tag29.hostile.test", with_subject(29)),
    "intermediate subject of tag 7": Case("odd-issuer.hostile.test", behind_an_odd_intermediate),
    "subject with an empty RDN": Case("empty-rdn.hostile.test", empty_rdn),
    "subject of indefinite length (BER)": Case("ber.hostile.test", indefinite_length_subject, BAD_CERT),
    "NUL in the CN and the SAN dNSName": Case("nul.hostile.test", nul_in_names),
    "3000 SANs": Case("many.hostile.test", many_sans(3000)),
    "50 KB leaf": Case("big.hostile.test", huge(50_000)),
    "110 KB leaf (over OpenSSL's 100 KiB certificate list)": Case("huge.hostile.test", huge(110_000), REFUSED),
    "20-deep chain": Case("deep.hostile.test", deep_chain(20)),
    "v1 leaf": Case("v1.hostile.test", v1),
    "negative serial": Case("negative.hostile.test", negative_serial),
    "RSA-8192 leaf": Case(
        "rsa8192.hostile.test", lambda root, host: root.leaf(host, key=pki.rsa_key(8192)), max_time=90
    ),
    **{case: Case(host, make) for case, (host, make, *_) in MIRRORED.items()},
}


@pytest.fixture(scope="module")
def table() -> Iterator[dict[str, tuple[str, str, str]]]:
    rows: dict[str, tuple[str, str, str]] = {}
    yield rows
    path = os.environ.get("BUMPER_HOSTILE_TABLE")
    if path and rows:
        lines = [
            "| case | curl directly | curl through bumper | bumper's log line (from action=) |",
            "|---|---|---|---|",
            *(f"| {case} | {direct} | {proxied} | `{line}` |" for case, (direct, proxied, line) in rows.items()),
        ]
        Path(path).write_text("\n".join(lines) + "\n")


def curl_outcome(args: list[str], url: str, max_time: int) -> tuple[int, str, str, str]:
    """curl's exit code, ssl_verify_result, local port and error message."""
    r = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", str(max_time), "-w", "%{ssl_verify_result} %{local_port}",
         *args, url],
        capture_output=True, text=True, timeout=max_time + 20,
    )  # fmt: skip
    verify_result, port = r.stdout.split()
    return r.returncode, verify_result, port, r.stderr.strip().split("\n")[0].removeprefix("curl: ")


def shown(code: int, verify_result: str, error: str) -> str:
    return "exit 0 (served)" if code == 0 else f"exit {code}, verify {verify_result}: {error}".replace("|", "\\|")


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_upstream_is_never_more_trusted_than_directly(
    case: str, start_upstream, bumper: Bumper, test_pki: Pki, table: dict[str, tuple[str, str, str]]
) -> None:
    spec = CASES[case]
    upstream: Upstream = start_upstream(spec.make(test_pki.root, spec.host), host=spec.host)
    resolve = f"{spec.host}:{upstream.port}:127.0.0.1"
    direct = curl_outcome(["--cacert", str(test_pki.root_pem), "--resolve", resolve], upstream.url("/"), spec.max_time)
    proxied = curl_outcome(["--cacert", str(bumper.ca_pem), "-x", bumper.proxy], upstream.url("/"), spec.max_time)
    line = bumper.connection_line(int(proxied[2]))
    assert not [x for x in bumper.process.lines[bumper.process.test_start :] if "Warning" in x]  # one line, no noise
    table[case] = (
        shown(direct[0], direct[1], direct[3]),
        shown(proxied[0], proxied[1], proxied[3]),
        line[line.index("action=") :],
    )
    if direct[0] != 0:
        assert proxied[0] != 0, "served through bumper, refused directly"
    if spec.expect == SAME:
        assert proxied[:2] == direct[:2]
    elif spec.expect == REFUSED:
        assert direct[0] != 0 and proxied[0] != 0
    else:
        assert (proxied[:2], log_field(line, "verify")) == ((60, "20"), "bad_cert")


def test_a_certificate_nothing_can_copy_is_spliced_under_splice_on_error(
    start_upstream, start_bumper, test_pki: Pki, tmp_path: Path
) -> None:
    """The splice probe reads the chain as the bumped leg does (PeerChain): `bad_cert` too, so the
    client gets the upstream's own certificate and decides as it would directly (it is served)."""
    spec = CASES["subject of indefinite length (BER)"]
    upstream = start_upstream(spec.make(test_pki.root, "ber-splice.hostile.test"), host="ber-splice.hostile.test")
    proxy = start_with_policy(start_bumper, tmp_path, "on_upstream_error: splice\n")
    resolve = f"{upstream.host}:{upstream.port}:127.0.0.1"
    direct = curl_outcome(["--cacert", str(test_pki.root_pem), "--resolve", resolve], upstream.url("/"), 20)
    spliced = curl_outcome(["--cacert", str(test_pki.root_pem), "-x", proxy.proxy], upstream.url("/"), 20)
    assert direct[:2] == spliced[:2] == (0, "0")
    line = proxy.connection_line(int(spliced[2]))
    assert (log_field(line, "action"), log_field(line, "verify")) == ("splice", "bad_cert")
