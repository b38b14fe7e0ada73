"""The DER copier and mimic minting under fuzzers (tests/fuzz_certs.py says the property): a bounded,
deterministic run of each inside ./test; `make fuzz` runs atheris for longer. What they found is kept
below as regression cases."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bumper.certs import compare, mimic
from tests import pki
from tests.fuzz_certs import Harness, seeds, spliced

REPOSITORY = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def harness() -> Harness:
    return Harness()


def test_the_seeds_are_the_vectors() -> None:
    assert len(seeds()) > 500


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A vector with one TBSCertificate field's contents mutated (spliced keeps every length right,
    so cryptography mostly still loads it): bytes flipped, cut, inserted, or a whole TLV dropped in."""
    seed = draw(st.sampled_from(seeds()))
    field = draw(st.integers(0, 10))
    fields = pki.elements(pki.contents(pki.elements(pki.contents(seed))[0]))
    contents = bytearray(pki.contents(fields[field % len(fields)]))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(contents)))
        match draw(st.sampled_from(["flip", "cut", "insert", "tlv"])):
            case "flip" if contents:
                contents[min(at, len(contents) - 1)] ^= draw(st.integers(1, 255))
            case "cut":
                del contents[at : at + draw(st.integers(1, 8))]
            case "insert":
                contents[at:at] = draw(st.binary(min_size=1, max_size=8))
            case _:
                tag = draw(st.integers(0, 255))
                contents[at:at] = bytes([tag]) + pki.tlv(0, draw(st.binary(max_size=16)))[1:]
    return spliced(seed, field, bytes(contents))


@settings(max_examples=400, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated())
def test_hypothesis_mutated_vectors_keep_the_property(harness: Harness, data: bytes) -> None:
    harness.check(data)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(data=st.binary(max_size=512))
def test_hypothesis_any_bytes_keep_the_property(harness: Harness, data: bytes) -> None:
    harness.check(data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris has no wheel for this Python")
def test_atheris_bounded_run_finds_nothing(tmp_path: Path) -> None:
    """libFuzzer, coverage-guided, with a fixed seed and number of runs: the same inputs every time."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_certs", "-runs=4000", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 4000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


# --- what the fuzzers found --------------------------------------------------------------------


def bit_string_attribute() -> x509.Certificate:
    """A name attribute of type BIT STRING whose OID is not x500UniqueIdentifier: cryptography raises
    TypeError (not ValueError) on reading such a name, in a subject or a directoryName alike."""
    root = pki.Authority.root()
    subject = pki.raw_name(("2.5.4.11", 0x03, b"\x00odd"), ("2.5.4.3", 0x0C, b"bits.test"))
    return pki.reissued(root.leaf("bits.test").cert, root, subject=subject)


def test_found_a_bit_string_name_attribute_is_shown_not_raised(harness: Harness) -> None:
    upstream = bit_string_attribute()
    with pytest.raises(TypeError):
        upstream.subject  # noqa: B018 (what made `bumper mimic --text` fail)
    made = mimic.mint(upstream, harness.ca, harness.keys["rsa"])
    rows = {row.field: row for row in compare.compare(upstream, made)}
    assert rows["subject"].upstream.startswith("DER 30") and rows["subject"].mimic == compare.SAME
    harness.check_certificate(upstream)


def test_found_a_directory_name_with_a_bit_string_attribute_is_shown_not_raised(harness: Harness) -> None:
    inner = pki.raw_name(("2.5.4.11", 0x03, b"\x00odd"))
    san = x509.UnrecognizedExtension(x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, pki.tlv(0x30, pki.tlv(0xA4, inner)))
    upstream = pki.Authority.root().leaf(extra=((san, False),)).cert
    with pytest.raises(TypeError):
        list(upstream.extensions)
    made = mimic.mint(upstream, harness.ca, harness.keys["rsa"])
    rows = {row.field: row for row in compare.compare(upstream, made)}
    assert rows["subjectAltName"].upstream.startswith("DER ") and rows["subjectAltName"].mimic == compare.SAME
    harness.check_certificate(upstream)


def test_found_an_invalid_version_is_not_a_certificate(harness: Harness) -> None:
    """Version 18: cryptography raises InvalidVersion, which is no ValueError."""
    der = bytearray(pki.Authority.root().leaf("v.test").cert.public_bytes(pki.serialization.Encoding.DER))
    at = der.index(b"\xa0\x03\x02\x01\x02")
    der[at + 4] = 18
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_certificate(bytes(der))
    harness.check(bytes(der))
