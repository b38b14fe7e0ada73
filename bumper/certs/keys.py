"""Key types: what kind of key a certificate has, and making a new one of the same kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# The curves a mimic can mirror; others fall back (see KeySpec.of).
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
}
_CURVE_LABELS = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_RSA_SIZES = (2048, 3072, 4096, 8192)
# Weak RSA keys are mirrored too (a mimic key as weak as the upstream's, for that mimic alone), so that
# a client refuses the mimic for its key as it would refuse the upstream's: from the least size
# cryptography makes up to the least size OpenSSL's default security level accepts.
_WEAK_RSA_SIZES = range(1024, 2048)

Algorithm = Literal["rsa", "ec", "ed25519"]


@dataclass(frozen=True)
class KeySpec:
    """A key algorithm and its strength: RSA with a modulus size, EC with a curve, or Ed25519."""

    algorithm: Algorithm
    size: int = 0  # RSA modulus bits
    curve: str = ""  # EC curve name as cryptography spells it

    def __str__(self) -> str:
        if self.algorithm == "rsa":
            return f"RSA-{self.size}"
        if self.algorithm == "ec":
            return f"EC {_CURVE_LABELS.get(self.curve, self.curve)}"
        return "Ed25519"

    @property
    def label(self) -> str:
        """The type in one lower-case word, as --fallback-key takes it: rsa2048, p256, ed25519."""
        if self.algorithm == "rsa":
            return f"rsa{self.size}"
        if self.algorithm == "ec":
            return _CURVE_LABELS.get(self.curve, self.curve).lower().replace("-", "")
        return "ed25519"

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """Read a key type as a user writes it: rsa2048, RSA-4096, p256, EC-P384, ed25519."""
        spec = _BY_NAME.get(text.strip().lower().replace("-", "").replace("_", ""))
        if spec is None:
            raise ValueError(f"unknown key type {text!r} (one of: {', '.join(_NAMES)})")
        return spec

    @classmethod
    def of(cls, public_key: object) -> KeySpec | None:
        """The spec of an existing public key, or None when bumper cannot mint a key like it."""
        if isinstance(public_key, rsa.RSAPublicKey):
            return cls("rsa", size=public_key.key_size) if public_key.key_size in _RSA_SIZES else None
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return cls("ec", curve=public_key.curve.name) if public_key.curve.name in _CURVES else None
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            return cls("ed25519")
        return None

    @property
    def weak(self) -> bool:
        """A key below the strength OpenSSL's default security level accepts (mirror_spec)."""
        return self.algorithm == "rsa" and self.size in _WEAK_RSA_SIZES

    def generate(self) -> PrivateKey:
        if self.algorithm == "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=self.size)
        if self.algorithm == "ec":
            return ec.generate_private_key(_CURVES[self.curve]())
        return ed25519.Ed25519PrivateKey.generate()


def mirror_spec(public_key: object) -> KeySpec | None:
    """The spec of a mimic key that mirrors PUBLIC_KEY, a weak RSA key included; None when there is none."""
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size in _WEAK_RSA_SIZES:
        return KeySpec("rsa", size=public_key.key_size)
    return KeySpec.of(public_key)


def describe(public_key: object) -> str:
    """A short human label for any public key, mirrorable or not."""
    spec = KeySpec.of(public_key)
    if spec is not None:
        return str(spec)
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    return type(public_key).__name__.lstrip("_")


P256 = KeySpec("ec", curve="secp256r1")
RSA2048 = KeySpec("rsa", size=2048)
_CURVE_ORDER = tuple(_CURVES)  # weakest first


@dataclass(frozen=True)
class KeyCap:
    """The strongest mimic key bumper makes, per algorithm (--max-mimic-key).

    Every client handshake that serves a mimic signs with its key: measured, a connection to an
    RSA-8192 mimic cost bumper 45.7 ms of CPU, 6 times one to an RSA-2048 mimic (7.8 ms) and 4
    times one to the capped RSA-4096 (11.6 ms), so an upstream with a needlessly strong key would
    let one site amplify the load on the gateway (docs/mimics.md#key-cap). A stronger upstream key
    gets a mimic key at the cap; a weaker one is mirrored as it is. Ed25519 has one strength and is
    never capped."""

    rsa_bits: int = 4096
    curve: str = "secp384r1"

    def exceeds(self, spec: KeySpec) -> bool:
        if spec.algorithm == "rsa":
            return spec.size > self.rsa_bits
        if spec.algorithm == "ec":
            return _CURVE_ORDER.index(spec.curve) > _CURVE_ORDER.index(self.curve)
        return False

    def capped(self, spec: KeySpec) -> KeySpec:
        """SPEC, or the cap of its algorithm when SPEC is stronger."""
        if not self.exceeds(spec):
            return spec
        return KeySpec("rsa", size=self.rsa_bits) if spec.algorithm == "rsa" else KeySpec("ec", curve=self.curve)

    @property
    def label(self) -> str:
        """As --max-mimic-key takes it: rsa4096,p384."""
        return f"{KeySpec('rsa', size=self.rsa_bits).label},{KeySpec('ec', curve=self.curve).label}"

    @classmethod
    def parse(cls, text: str) -> KeyCap:
        """One RSA size and one curve, comma-separated (rsa4096,p384); an algorithm left out keeps
        its default cap."""
        rsa_bits: int | None = None
        curve: str | None = None
        for part in text.split(","):
            spec = KeySpec.parse(part)  # ValueError names the unknown type
            if spec.algorithm == "rsa" and rsa_bits is None:
                rsa_bits = spec.size
            elif spec.algorithm == "ec" and curve is None:
                curve = spec.curve
            elif spec.algorithm == "ed25519":
                raise ValueError("ed25519 has a single strength and is never capped (give an RSA size, a curve)")
            else:
                raise ValueError(f"{part.strip()!r}: one cap per algorithm (e.g. rsa4096,p384)")
        default = cls()
        return cls(default.rsa_bits if rsa_bits is None else rsa_bits, default.curve if curve is None else curve)


DEFAULT_CAP = KeyCap()


_NAMES = [f"rsa{n}" for n in _RSA_SIZES] + ["p256", "p384", "p521", "ed25519"]
_BY_NAME: dict[str, KeySpec] = {f"rsa{n}": KeySpec("rsa", size=n) for n in _RSA_SIZES}
for _name, _label in _CURVE_LABELS.items():
    _spec = KeySpec("ec", curve=_name)
    _short = _label.lower().replace("-", "")
    _BY_NAME.update({_name: _spec, _short: _spec, "ec" + _short: _spec})
_BY_NAME["ed25519"] = KeySpec("ed25519")
