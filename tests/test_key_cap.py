"""--max-mimic-key: an upstream key stronger than the cap gets a mimic key at the cap (every client
handshake signs with it), a weaker one is still mirrored; the cap's parsing, its keyUsage, the disk
cache under a lower cap, `bumper mimic`, and a live RSA-8192 upstream through bumper."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from bumper.certs import ca as ca_files
from bumper.certs import keys, mimic
from bumper.certs.keypool import KeyPool, PoolSettings
from bumper.certs.mimicdb import DB_FILE, SqliteMimicStore
from bumper.certs.mimicstore import MimicStore
from tests import pki
from tests.conftest import BUMPER, UPSTREAM_HOST, Pki
from tests.test_cli import assert_config_error
from tests.test_mimic_cache import served_leaf

RSA4096, RSA8192 = keys.KeySpec("rsa", size=4096), keys.KeySpec("rsa", size=8192)
P384, P521 = keys.KeySpec("ec", curve="secp384r1"), keys.KeySpec("ec", curve="secp521r1")
UNCAPPED = keys.KeyCap(rsa_bits=8192, curve="secp521r1")


@pytest.fixture(scope="module")
def issuer() -> pki.Authority:
    return pki.Authority.root("upstream issuing CA")


def leaf(issuer: pki.Authority, key: object, *usage: str) -> x509.Certificate:
    """A leaf for KEY, with a critical keyUsage of the USAGE flags when any are given."""
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = ()
    if usage:
        flags = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        extra = ((x509.KeyUsage(**{**flags, **dict.fromkeys(usage, True)}), True),)
    return issuer.leaf("capped.test", key=key, extra=extra).cert


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


# --- the cap, pure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rsa4096,p384", keys.KeyCap(4096, "secp384r1")),
        ("RSA-3072, P-256", keys.KeyCap(3072, "secp256r1")),
        ("p521", keys.KeyCap(4096, "secp521r1")),  # an algorithm left out keeps its default
        ("rsa8192", keys.KeyCap(8192, "secp384r1")),
    ],
)
def test_the_cap_is_read_one_per_algorithm(text: str, expected: keys.KeyCap) -> None:
    assert keys.KeyCap.parse(text) == expected
    assert keys.KeyCap.parse(expected.label) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("rsa4096,rsa2048", "one cap per algorithm"),
        ("p384,p256", "one cap per algorithm"),
        ("ed25519", "never capped"),
        ("dsa", "unknown key type"),
        ("", "unknown key type"),
    ],
)
def test_a_bad_cap_says_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        keys.KeyCap.parse(text)


@pytest.mark.parametrize(
    ("upstream", "expected", "capped"),
    [
        pytest.param(lambda: pki.rsa8192_key(), RSA4096, RSA8192, id="RSA-8192"),
        pytest.param(lambda: pki.ec_key(ec.SECP521R1()), P384, P521, id="P-521"),
        pytest.param(lambda: pki.rsa_key(4096), RSA4096, None, id="RSA-4096"),
        pytest.param(lambda: pki.ec_key(ec.SECP384R1()), P384, None, id="P-384"),
        pytest.param(lambda: pki.rsa_key(1024), keys.KeySpec("rsa", size=1024), None, id="RSA-1024-weak"),
    ],
)
def test_a_key_above_the_cap_gets_the_cap_and_a_weaker_one_is_mirrored(
    issuer: pki.Authority, upstream: object, expected: keys.KeySpec, capped: keys.KeySpec | None
) -> None:
    cert = leaf(issuer, upstream())  # type: ignore[operator]
    choice = mimic.choose_key_spec(cert, keys.P256)
    assert (choice.spec, choice.capped_from, choice.fell_back) == (expected, capped, False)
    assert choice.fresh == expected.weak  # a weak key is still made for its mimic alone
    uncapped = mimic.choose_key_spec(cert, keys.P256, cap=UNCAPPED)
    assert uncapped.spec == (capped or expected) and uncapped.capped_from is None


def test_a_lower_cap_applies_to_both_algorithms(issuer: pki.Authority) -> None:
    cap = keys.KeyCap.parse("rsa2048,p256")
    assert mimic.choose_key_spec(leaf(issuer, pki.rsa_key(3072)), keys.P256, cap=cap).spec == keys.RSA2048
    assert mimic.choose_key_spec(leaf(issuer, pki.ec_key(ec.SECP384R1())), keys.P256, cap=cap).spec == keys.P256


# --- minting under the cap ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> ca_files.CertificateAuthority:
    return ca_files.create(tmp_path_factory.mktemp("cap") / "ca", now=pki.NOW - 365 * pki.DAY)


@pytest.mark.parametrize(
    ("upstream_key", "usage", "expected"),
    [
        pytest.param(
            lambda: pki.rsa8192_key(), ("digital_signature", "key_encipherment"), RSA4096, id="RSA-8192-encipherment"
        ),
        pytest.param(lambda: pki.ec_key(ec.SECP521R1()), ("digital_signature", "key_agreement"), P384, id="P-521"),
        # Not even digitalSignature: a key of the upstream's algorithm copies its keyUsage as it is,
        # as a mirrored key does (only a fallback key of another algorithm has it refitted).
        pytest.param(lambda: pki.ec_key(ec.SECP521R1()), ("key_agreement",), P384, id="P-521-agreement-only"),
    ],
)
def test_a_capped_mimic_keeps_the_upstream_key_usage(
    authority: ca_files.CertificateAuthority,
    issuer: pki.Authority,
    runner: asyncio.Runner,
    upstream_key: object,
    usage: tuple[str, ...],
    expected: keys.KeySpec,
) -> None:
    upstream = leaf(issuer, upstream_key(), *usage)  # type: ignore[operator]
    store = MimicStore(authority, KeyPool(PoolSettings(warm=())))
    try:
        made = runner.run(store.get(upstream))
    finally:
        store.close()
    assert keys.KeySpec.of(made.cert.public_key()) == expected
    mine, theirs = (c.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE) for c in (made.cert, upstream))
    assert mine.value.public_bytes() == theirs.value.public_bytes() and mine.critical


def test_a_disk_cached_mimic_above_the_cap_is_minted_again(
    tmp_path: Path, issuer: pki.Authority, runner: asyncio.Runner
) -> None:
    """Made under a higher cap (or before there was one), it is never served: a lower cap holds at once."""
    ca = ca_files.create(tmp_path / "ca", now=pki.NOW - pki.DAY)
    upstream = leaf(issuer, pki.ec_key(ec.SECP521R1()))

    def served(cap: keys.KeyCap) -> tuple[keys.KeySpec | None, dict[str, int]]:
        store = MimicStore(ca, KeyPool(PoolSettings(warm=())), SqliteMimicStore(tmp_path / DB_FILE), key_cap=cap)
        try:
            made = runner.run(store.get(upstream))
        finally:
            store.close()
        return keys.KeySpec.of(made.cert.public_key()), dict(store.lookups)

    assert served(UNCAPPED) == (P521, {"minted": 1})
    assert served(UNCAPPED) == (P521, {"disk_hit": 1})
    assert served(keys.DEFAULT_CAP) == (P384, {"minted": 1})
    assert served(keys.DEFAULT_CAP) == (P384, {"disk_hit": 1})


def test_the_cap_is_logged_once_per_certificate_even_when_nothing_is_cached(
    authority: ca_files.CertificateAuthority,
    issuer: pki.Authority,
    runner: asyncio.Runner,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With --mimic-cache 0 (or a mimic too large to keep) every connection mints: the line stays one."""
    caplog.set_level(logging.INFO, logger="bumper.mimic")
    capped, other = leaf(issuer, pki.ec_key(ec.SECP521R1())), leaf(issuer, pki.ec_key(ec.SECP521R1()))
    store = MimicStore(authority, KeyPool(PoolSettings(warm=())), max_bytes=0)
    try:
        for upstream in (capped, capped, capped, other):
            runner.run(store.get(upstream))
    finally:
        store.close()
    assert store.lookups["minted"] == 4
    lines = [r.getMessage() for r in caplog.records if "is above --max-mimic-key" in r.getMessage()]
    assert [line.split(" of the certificate ")[1][:95] for line in lines] == [
        ca_files.fingerprint(capped),
        ca_files.fingerprint(other),
    ]
    assert lines[0].endswith("is above --max-mimic-key rsa4096,p384; the mimic uses EC P-384")


# --- the command line ---------------------------------------------------------------------------


def bumper_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUMPER, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_bumper_mimic_shows_the_capped_key_and_why(tmp_path: Path, issuer: pki.Authority) -> None:
    ca = tmp_path / "ca"
    ca_files.create(ca, now=pki.NOW - pki.DAY)
    path = tmp_path / "upstream.pem"
    path.write_bytes(leaf(issuer, pki.ec_key(ec.SECP521R1())).public_bytes(serialization.Encoding.PEM))

    result = bumper_cli("mimic", "--ca", ca, path, "--text")

    assert result.returncode == 0, result.stderr
    assert (
        "the upstream's EC P-521 key is above --max-mimic-key rsa4096,p384: the mimic's key is EC P-384"
        in result.stderr
    )
    assert "EC P-384" in result.stdout  # the key row of the side-by-side view
    uncapped = bumper_cli("mimic", "--ca", ca, path, "--max-mimic-key", "p521")
    assert uncapped.returncode == 0 and uncapped.stderr == ""
    made = x509.load_pem_x509_certificate(uncapped.stdout.encode())
    assert keys.KeySpec.of(made.public_key()) == P521


def test_a_fallback_key_above_the_cap_is_a_config_error(tmp_path: Path) -> None:
    result = bumper_cli("--ca", tmp_path / "ca", "--fallback-key", "rsa8192", "--listen", "127.0.0.1:0")
    line = assert_config_error(result)
    assert (
        line == "bumper: --fallback-key rsa8192 is above --max-mimic-key rsa4096,p384: lower the one or raise the other"
    )
    assert not (tmp_path / "ca").exists()


# --- live: an RSA-8192 upstream through bumper --------------------------------------------------


def test_an_rsa_8192_upstream_gets_an_rsa_4096_mimic(start_upstream, start_bumper, test_pki: Pki) -> None:
    upstream = start_upstream(test_pki.root.leaf(UPSTREAM_HOST, f"*.{UPSTREAM_HOST}", key=pki.rsa8192_key()))
    assert isinstance(key := upstream.leaf.cert.public_key(), rsa.RSAPublicKey) and key.key_size == 8192
    bumper = start_bumper()

    first, again = served_leaf(bumper, upstream), served_leaf(bumper, upstream)

    for served in (first, again):
        served_key = served.public_key()
        assert isinstance(served_key, rsa.RSAPublicKey) and served_key.key_size == 4096
        assert served.subject == upstream.leaf.cert.subject
    assert first == again
    fingerprint = upstream.leaf.cert.fingerprint(hashes.SHA256()).hex(":").upper()
    line = (
        f"upstream key RSA-8192 of the certificate {fingerprint} is above --max-mimic-key rsa4096,p384; "
        "the mimic uses RSA-4096"
    )
    assert bumper.process.log.count(line) == 1  # when it was minted, not per connection
