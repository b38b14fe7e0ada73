"""Fuzzing the DER copier and mimic minting (issue 15, section 5), seeded with the certificates of the
cryptography-vectors package.

The property, for any bytes: bumper's DER walker (der.parse_tbs, der.names, der.bit_string_bits) raises
nothing but der.MalformedDER; and for any certificate cryptography loads from them, the verdict
(trust.classify) raises nothing, minting (mimic.mint, MimicStore's Mimic.of) raises nothing but
mimic.UnmimicableCertificate, which the proxy answers as it answers any certificate it cannot copy,
`bumper mimic --text` (compare) raises nothing, and a minted mimic carries the upstream's subject DER
and every kept extension's DER, in order, with its criticality.

Two engines drive it:
- hypothesis, in tests/test_fuzz.py (a bounded, derandomized run inside ./test), mutating the
  vectors field by field;
- atheris (coverage-guided, libFuzzer), by running this module: `make fuzz` runs it for FUZZ_SECONDS,
  ./test for a fixed number of runs with a fixed seed. libFuzzer's flags pass through, e.g.
  `python -m tests.fuzz_certs -runs=2000 -seed=1` from the top of the repository; a crash leaves its
  input in -artifact_prefix.

Whatever either finds becomes a regression case in tests/test_fuzz.py.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from tests import pki

# bumper itself is imported inside the functions: run as a script, atheris must instrument it first.


def _vectors_root() -> Path:
    import cryptography_vectors

    return Path(cryptography_vectors.__file__).parent / "x509"


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """The DER of every certificate in cryptography-vectors' x509 directory that cryptography loads."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(_vectors_root().rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            try:
                if b"-----BEGIN" in data:
                    certs = x509.load_pem_x509_certificates(data)
                else:
                    certs = [x509.load_der_x509_certificate(data)]
            except Exception:  # noqa: BLE001 (CRLs, keys, CSRs...: not seeds)
                continue
            found += [c.public_bytes(serialization.Encoding.DER) for c in certs]
    return tuple(found)


def spliced(seed: bytes, field: int, contents: bytes) -> bytes:
    """SEED's certificate with the contents of one TBSCertificate field (FIELD, modulo their number)
    replaced by CONTENTS, every length around it fixed up, the field's tag kept: a mutation that
    cryptography still loads far more often than a byte flipped at random."""
    certificate = pki.elements(pki.contents(seed))
    fields = pki.elements(pki.contents(certificate[0]))
    n = field % len(fields)
    fields[n] = pki.tlv(fields[n][0], contents)
    return pki.tlv(0x30, pki.tlv(0x30, b"".join(fields)) + b"".join(certificate[1:]))


class Harness:
    """The property, with a CA and mimic keys made once."""

    def __init__(self) -> None:
        from bumper.certs import ca as ca_files
        from bumper.certs import keys, mimic

        self.dropped = frozenset(oid.dotted_string for oid in mimic.DROPPED_EXTENSIONS)
        self._directory = tempfile.TemporaryDirectory(prefix="bumper-fuzz-")
        self.ca = ca_files.create(Path(self._directory.name) / "ca", key_spec=keys.P256)
        self.keys = {"rsa": keys.RSA2048.generate(), "ec": keys.P256.generate()}

    def check(self, data: bytes) -> None:
        from bumper.certs import der

        for walk in (der.parse_tbs, der.names, der.bit_string_bits):
            try:
                walk(data)
            except der.MalformedDER:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                cert = x509.load_der_x509_certificate(data)
            except (ValueError, x509.InvalidVersion):
                return
            self.check_certificate(cert)

    def check_certificate(self, upstream: x509.Certificate) -> None:
        from bumper.certs import compare, der, mimic, trust
        from bumper.certs.keypool import PooledKey
        from bumper.certs.mimicstore import Mimic

        try:
            parts: der.Tbs | None = der.parse_tbs(upstream.tbs_certificate_bytes)
        except der.MalformedDER:
            parts = None
        verdict = trust.classify([], [upstream])
        assert verdict.reason != "bad_cert" or parts is None, verdict  # no names to compare, none to copy
        choice = mimic.choose_key_spec(upstream, mimic.keys.P256)
        key = self.keys["rsa" if choice.spec.algorithm == "rsa" else "ec"]
        try:
            made = mimic.mint(upstream, self.ca, key)
        except mimic.UnmimicableCertificate:
            return
        assert parts is not None
        copy = der.parse_tbs(made.tbs_certificate_bytes)
        assert copy.subject == parts.subject
        assert copy.issuer == self.ca.subject_der
        refit = mimic.keys.mirror_spec(key.public_key()) != mimic.upstream_key_spec(upstream)
        kept = [e for e in parts.extensions if e.oid not in self.dropped]
        assert [e.oid for e in copy.extensions] == [e.oid for e in kept] + [_AKI, _SKI]
        for original, copied in zip(kept, copy.extensions, strict=False):
            assert copied.critical == original.critical
            assert copied.value == original.value or (refit and original.oid == _KEY_USAGE)
        try:
            Mimic.of(made, PooledKey.of(key))
        except mimic.UnmimicableCertificate:
            pass
        compare.render(compare.compare(upstream, made))


_AKI = ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string
_SKI = ExtensionOID.SUBJECT_KEY_IDENTIFIER.dotted_string
_KEY_USAGE = ExtensionOID.KEY_USAGE.dotted_string


def main() -> None:
    """atheris: the corpus is the vectors; each input is checked as it is, and spliced into a seed."""
    import atheris

    with atheris.instrument_imports(include=["bumper"]):
        from bumper.certs import compare, der, mimic, trust  # noqa: F401 (instrumented for coverage)
    harness = Harness()
    corpus = tempfile.mkdtemp(prefix="bumper-fuzz-corpus-")
    for n, seed in enumerate(seeds()):
        Path(corpus, f"{n:04d}.der").write_bytes(seed)

    def one_input(data: bytes) -> None:
        harness.check(data)
        if len(data) > 3:  # two octets pick the seed, one its field, the rest is that field's new contents
            harness.check(spliced(pool[int.from_bytes(data[:2], "big") % len(pool)], data[2], data[3:]))

    pool = seeds()
    atheris.Setup([*sys.argv, corpus], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
