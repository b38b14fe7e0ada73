"""Upstream trust: classifying why an upstream certificate chain is not trusted. Pure functions.

OpenSSL verifies the chain during the upstream handshake (system store plus --upstream-ca, the SNI as
the expected name, SECLEVEL 2) and reports every error it meets instead of aborting; `classify`
turns those errors, plus the checks OpenSSL does not make, into one reason code that logs and
policies use. bumper's own CA is never a trust anchor upstream: a chain through it is
`unknown_issuer`, which also stops a proxy loop from trusting itself.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL

from bumper.certs import der

REASONS = (
    "expired",
    "not_yet_valid",
    "self_signed",
    "unknown_issuer",
    "hostname_mismatch",
    "weak_key",
    "weak_signature",
    "bad_eku",
    "bad_chain",
    "bad_cert",
    "other",
)

_lib: Any = SSL._lib  # type: ignore[attr-defined,unused-ignore]
_ffi: Any = SSL._ffi  # type: ignore[attr-defined,unused-ignore]

# OpenSSL's X509_V_ERR_* codes; the three "too weak" codes (stable since 1.1.0) are not in the binding.
_REASON_BY_CODE: dict[int, str] = {
    _lib.X509_V_ERR_CERT_HAS_EXPIRED: "expired",
    _lib.X509_V_ERR_CERT_NOT_YET_VALID: "not_yet_valid",
    _lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "self_signed",
    _lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN: "unknown_issuer",
    _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT: "unknown_issuer",
    _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unknown_issuer",
    _lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unknown_issuer",
    _lib.X509_V_ERR_HOSTNAME_MISMATCH: "hostname_mismatch",
    _lib.X509_V_ERR_IP_ADDRESS_MISMATCH: "hostname_mismatch",
    66: "weak_key",  # X509_V_ERR_EE_KEY_TOO_SMALL
    67: "weak_key",  # X509_V_ERR_CA_KEY_TOO_SMALL
    68: "weak_signature",  # X509_V_ERR_CA_MD_TOO_WEAK
    _lib.X509_V_ERR_INVALID_PURPOSE: "bad_eku",
    _lib.X509_V_ERR_INVALID_CA: "bad_chain",
    _lib.X509_V_ERR_PATH_LENGTH_EXCEEDED: "bad_chain",
    _lib.X509_V_ERR_CERT_SIGNATURE_FAILURE: "bad_chain",
    _lib.X509_V_ERR_PERMITTED_VIOLATION: "bad_chain",
    _lib.X509_V_ERR_EXCLUDED_VIOLATION: "bad_chain",
    _lib.X509_V_ERR_INVALID_NON_CA: "bad_chain",
    _lib.X509_V_ERR_KEYUSAGE_NO_CERTSIGN: "bad_chain",
}
_UNHANDLED_CRITICAL_EXTENSION = _lib.X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION

_MISSING_ISSUER = frozenset(
    {_lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE}
)
_MIN_RSA_BITS = 2048
_MIN_EC_BITS = 256
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)


@dataclass(frozen=True)
class VerifyError:
    """One error OpenSSL reported while verifying the chain."""

    code: int  # X509_V_ERR_*
    depth: int  # 0 is the leaf

    @property
    def text(self) -> str:
        return str(_ffi.string(_lib.X509_verify_cert_error_string(self.code)).decode())


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # one of REASONS, or None: trusted
    detail: str = ""

    @property
    def trusted(self) -> bool:
        return self.reason is None


TRUSTED = Verdict(None)


@dataclass(frozen=True)
class UpstreamVerdict:
    """The verdict on one connection's upstream, with what the mimic needs from it."""

    verdict: Verdict
    signing: Signing | None  # how the mimic is signed; None for the splice probe's verdict (no mimic)
    fingerprint: str | None  # the upstream leaf's SHA-256, upper-case hex; None when there was no leaf
    # The upstream sent a self-signed root nobody trusts: bumper's untrusted CA follows the mimic, so
    # that the client meets one too ("self-signed certificate in certificate chain", not "unable to
    # get local issuer certificate").
    sends_root: bool = False


def reason_for(code: int) -> str:
    return _REASON_BY_CODE.get(code, "other")


def classify(
    errors: Sequence[VerifyError], chain: Sequence[x509.Certificate], own_cas: Iterable[x509.Certificate] = ()
) -> Verdict:
    """The verdict on an upstream chain (leaf first) from OpenSSL's errors, in the order it met
    them (the order a client meets them too), and bumper's own checks."""
    if not chain:
        return Verdict("other", "no certificate")
    parsed = []
    for depth, cert in enumerate(chain):
        try:
            parsed.append(_names(cert))
        except der.MalformedDER as e:  # no names to compare, nothing to copy: failed, whatever OpenSSL said
            return Verdict("bad_cert", f"malformed certificate: {e} (depth {depth})")
    if _through_own_ca(chain, parsed, list(own_cas)):
        return Verdict("unknown_issuer", "issued by bumper's own CA, which is never trusted upstream")
    if errors:
        first = errors[0]
        return Verdict(reason_for(first.code), f"{first.text} (depth {first.depth})")
    return _weakness(chain, parsed) or TRUSTED


def validity_errors(chain: Sequence[x509.Certificate], now: datetime.datetime) -> list[VerifyError]:
    """The errors OpenSSL would record for CHAIN's dates at NOW (an aware datetime): for a resumed
    upstream session, whose chain OpenSSL does not verify again, so that a certificate that has
    expired since is caught as on a full handshake."""
    errors = []
    for depth, cert in enumerate(chain):
        if now > cert.not_valid_after_utc:
            errors.append(VerifyError(_lib.X509_V_ERR_CERT_HAS_EXPIRED, depth))
        elif now < cert.not_valid_before_utc:
            errors.append(VerifyError(_lib.X509_V_ERR_CERT_NOT_YET_VALID, depth))
    return errors


def missing_issuer(errors: Sequence[VerifyError]) -> int | None:
    """The depth of the certificate whose issuer OpenSSL could not find (an incomplete chain), if any."""
    for error in errors:
        if error.code in _MISSING_ISSUER:
            return error.depth
    return None


def _through_own_ca(
    chain: Sequence[x509.Certificate], parsed: Sequence[_Names], own_cas: list[x509.Certificate]
) -> bool:
    """True when the chain holds or was signed by one of bumper's CAs, even if the machine's store
    trusts them (a lab that installed ca.pem system-wide must not trust its own mimics upstream)."""
    own = {ca.fingerprint(hashes.SHA256()) for ca in own_cas}
    for cert, (issuer, _) in zip(chain, parsed, strict=True):
        if cert.fingerprint(hashes.SHA256()) in own:
            return True
        for ca in own_cas:
            if issuer == ca.subject:  # bumper's CAs' names cryptography reads; an unreadable issuer is none of them
                try:
                    cert.verify_directly_issued_by(ca)
                    return True
                except (ValueError, TypeError, InvalidSignature):
                    pass
    return False


def _weakness(chain: Sequence[x509.Certificate], parsed: Sequence[_Names]) -> Verdict | None:
    """What SECLEVEL 2 lets through but the trust policy does not: EC below P-256, and MD5 or SHA-1
    signatures on any certificate but a self-signed root (whose signature nobody relies on)."""
    for depth, cert in enumerate(chain):
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            return Verdict("other", f"unreadable public key (depth {depth})")
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
            return Verdict("weak_key", f"RSA-{key.key_size} key (depth {depth})")
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < _MIN_EC_BITS:
            return Verdict("weak_key", f"EC {key.curve.name} key (depth {depth})")
        if parsed[depth][0] != parsed[depth][1] and isinstance(_hash_of(cert), _WEAK_HASHES):
            return Verdict("weak_signature", f"{_hash_of(cert).name} signature (depth {depth})")  # type: ignore[union-attr]
    return None


# A certificate's issuer and subject: as cryptography reads them (fast, and the same names however
# encoded), or as their DER where it cannot read them (a string type it does not know).
_Names = tuple[x509.Name, x509.Name] | tuple[bytes, bytes]


def _names(cert: x509.Certificate) -> _Names:
    """CERT's issuer and subject; der.MalformedDER when neither cryptography nor bumper's walker can read them."""
    try:
        return cert.issuer, cert.subject
    except (ValueError, TypeError):  # TypeError: a BIT STRING attribute other than x500UniqueIdentifier
        return der.names(cert.tbs_certificate_bytes)


def _hash_of(cert: x509.Certificate) -> hashes.HashAlgorithm | None:
    try:
        return cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None


# Defects the mimic carries by copying the upstream certificate: a client checking the mimic meets
# them just as it would have met them on the upstream's own certificate.
CARRIED_BY_THE_MIMIC = frozenset({"expired", "not_yet_valid", "hostname_mismatch", "bad_eku"})
# Weaknesses the mimic carries only when it mirrors them (mirrored_weaknesses): a weak RSA key, a
# SHA-1 signature.
MIRRORABLE = frozenset({"weak_key", "weak_signature"})


class Signing(StrEnum):
    """Who signs a connection's mimic (the mimic cache keeps one per upstream certificate and mode)."""

    CA = "ca"  # bumper's trusted CA: the upstream is trusted, or its only defects are carried
    SELF = "self"  # self-signed, as the upstream was
    UNTRUSTED = "untrusted"  # bumper's untrusted CA: the client sees an unknown issuer


def signing_mode(errors: Sequence[VerifyError], verdict: Verdict, mirrored: Iterable[str] = frozenset()) -> Signing:
    """How the `mimic` action signs, so the client's own check fails as it would have directly.

    MIRRORED names the weaknesses of the leaf (MIRRORABLE) its mimic carries. An unknown critical
    extension of the leaf is carried too (the mimic copies it, critical), though its reason is `other`."""
    if verdict.trusted:
        return Signing.CA
    if verdict.reason == "bad_cert" or any(e.depth > 0 for e in errors):
        return Signing.UNTRUSTED  # nothing to copy, or a defect above the leaf: the mimic, a leaf, cannot carry it
    defects = {reason_for(e.code) for e in errors if e.code != _UNHANDLED_CRITICAL_EXTENSION}
    if not (errors and errors[0].code == _UNHANDLED_CRITICAL_EXTENSION and verdict.reason == "other"):
        defects.add(str(verdict.reason))  # OpenSSL's first error, or bumper's own checks (own CA, weakness)
    carried = CARRIED_BY_THE_MIMIC | (MIRRORABLE & set(mirrored))
    if defects <= carried:
        return Signing.CA
    if defects <= carried | {"self_signed"}:
        return Signing.SELF
    return Signing.UNTRUSTED


def sends_root(errors: Sequence[VerifyError], signing: Signing) -> bool:
    """Whether the client is sent bumper's untrusted root with an UNTRUSTED mimic: the upstream sent
    an untrusted self-signed root too."""
    return signing is Signing.UNTRUSTED and any(e.code == _lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN for e in errors)
