"""The key-material audit of a whole test run (docs/ca.md): no private key bumper made, its CAs' or
its mimics', appears in anything bumper wrote outside the files that hold it on purpose.

Needles are what a leak would show: the base64 lines of the key's PEM (PKCS#8 and the traditional
form) that carry its private numbers, the hex of those numbers and the start of their decimal form
(a repr of the numbers).
Haystacks are bumper's outputs (stderr, stdout) and every other file in the run's temporary tree:
access logs, exports, policy files, pages the tests saved.
"""

from __future__ import annotations

import base64
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# Where bumper keeps keys on purpose (bumper.certs.ca, bumper.certs.mimicdb).
KEY_FILES = ("ca.key", "issuing.key", "untrusted.key")
MIMIC_DB = "mimics.sqlite"
_PEM_LINE = 64  # characters in a full base64 line of PEM
_HEX_PREFIX = 32  # hex digits of a private number that count as a leak
_DECIMAL_PREFIX = 40
_MAX_FILE_BYTES = 16 * 1024 * 1024  # bigger files in the tree are test data, not output

_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{%d,}" % _PEM_LINE)
_HEX_RUN = re.compile(rb"[0-9a-fA-F]{%d,}" % _HEX_PREFIX)
_DECIMAL_RUN = re.compile(rb"[0-9]{%d,}" % _DECIMAL_PREFIX)


@dataclass
class Needles:
    pem_lines: set[bytes] = field(default_factory=set)
    hex_prefixes: set[bytes] = field(default_factory=set)
    decimal_prefixes: set[bytes] = field(default_factory=set)
    keys: int = 0

    def add(self, key: object) -> None:
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            return  # Ed25519 CAs: the PEM lines below still cover them
        self.keys += 1
        numbers = list(_private_numbers(key))
        for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
            der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
            self.pem_lines.update(_secret_lines(der, numbers))
        for number in numbers:
            self.hex_prefixes.add(f"{number:x}"[:_HEX_PREFIX].encode())
            self.decimal_prefixes.add(str(number)[:_DECIMAL_PREFIX].encode())

    def found_in(self, data: bytes) -> str | None:
        """What in DATA is key material, or None."""
        for run in _BASE64_RUN.findall(data):
            for i in range(len(run) - _PEM_LINE + 1):
                if run[i : i + _PEM_LINE] in self.pem_lines:
                    return f"a PEM line of a private key: {run[i : i + 16].decode()}..."
        for pattern, width, needles, what in (
            (_HEX_RUN, _HEX_PREFIX, self.hex_prefixes, "hex"),
            (_DECIMAL_RUN, _DECIMAL_PREFIX, self.decimal_prefixes, "decimal"),
        ):
            for run in pattern.findall(data):
                run = run.lower()
                for i in range(len(run) - width + 1):
                    if run[i : i + width] in needles:
                        return f"a private number in {what}: {run[i : i + 12].decode()}..."
        return None


def _secret_lines(der: bytes, numbers: list[int]) -> Iterator[bytes]:
    """The full lines of the PEM of DER that carry a byte of a private number. The others hold
    only ASN.1 framing and the public key, which the key's certificate shows too (a netlog that
    lists the certificates seen would match them one time in three)."""
    spans = []
    for number in numbers:
        raw = number.to_bytes((number.bit_length() + 7) // 8)
        if (start := der.find(raw)) >= 0:
            spans.append((start, start + len(raw)))
    body = base64.b64encode(der)
    line_bytes = _PEM_LINE * 3 // 4  # DER bytes per line
    for i in range(0, len(body) // _PEM_LINE):
        first, last = i * line_bytes, (i + 1) * line_bytes
        if any(start < last and first < end for start, end in spans):
            yield body[i * _PEM_LINE : (i + 1) * _PEM_LINE]


def _private_numbers(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Iterator[int]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        yield key.private_numbers().private_value
    else:
        numbers = key.private_numbers()
        yield from (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)


def is_key_holder(path: Path) -> bool:
    return path.name in KEY_FILES or path.name.startswith(MIMIC_DB)


def collect(tree: Path) -> Needles:
    """The key material of every CA and mimic database bumper wrote under TREE."""
    needles = Needles()
    for path in tree.rglob("*"):
        if path.name in KEY_FILES:
            _add_pem(needles, path.read_bytes())
        elif path.name == MIMIC_DB:
            for (key_der,) in _mimic_keys(path):
                try:
                    needles.add(serialization.load_der_private_key(key_der, password=None))
                except ValueError:
                    continue
    return needles


def _add_pem(needles: Needles, data: bytes) -> None:
    try:
        needles.add(serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError):
        pass  # the tests' broken, encrypted or foreign CA files: not bumper's keys


def _mimic_keys(path: Path) -> list[tuple[bytes]]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT key FROM mimics").fetchall()
    except sqlite3.Error:
        return []  # a test's deliberately broken database


def leaks(needles: Needles, outputs: Iterable[tuple[str, bytes]], tree: Path) -> list[str]:
    """Every place in OUTPUTS (name, bytes) and in the files under TREE that shows key material."""
    found = [f"{name}: {what}" for name, data in outputs if (what := needles.found_in(data))]
    for path in sorted(tree.rglob("*")):
        if not path.is_file() or is_key_holder(path) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        if what := needles.found_in(path.read_bytes()):
            found.append(f"{path}: {what}")
    return found
