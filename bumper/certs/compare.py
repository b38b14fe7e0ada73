"""An upstream certificate and its mimic side by side, field by field (for `bumper mimic --text`)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID

from bumper.certs import der, keys

SAME = "(same)"
ABSENT = "-"


@dataclass(frozen=True)
class Row:
    field: str
    upstream: str
    mimic: str


def compare(upstream: x509.Certificate, mimic: x509.Certificate) -> list[Row]:
    rows = [
        Row("subject", upstream.subject.rfc4514_string() or "(empty)", mimic.subject.rfc4514_string() or "(empty)"),
        Row("issuer", upstream.issuer.rfc4514_string(), mimic.issuer.rfc4514_string()),
        Row("serial", f"{upstream.serial_number:#x}", f"{mimic.serial_number:#x}"),
        Row("not before", _time(upstream.not_valid_before_utc), _time(mimic.not_valid_before_utc)),
        Row("not after", _time(upstream.not_valid_after_utc), _time(mimic.not_valid_after_utc)),
        Row("key", _key(upstream), _key(mimic)),
        Row("signature", _signature(upstream), _signature(mimic)),
    ]
    upstream_ext, mimic_ext = _extensions(upstream), _extensions(mimic)
    for oid in [*upstream_ext, *(o for o in mimic_ext if o not in upstream_ext)]:
        rows.append(
            Row(_oid_name(x509.ObjectIdentifier(oid)), upstream_ext.get(oid, ABSENT), mimic_ext.get(oid, ABSENT))
        )
    return [Row(r.field, r.upstream, SAME if r.mimic == r.upstream else r.mimic) for r in rows]


def render(rows: list[Row], width: int = 60) -> str:
    field_width = max(len(r.field) for r in rows)
    lines = [f"{'field':<{field_width}}  {'upstream':<{width}}  mimic"]
    for r in rows:
        lines.append(f"{r.field:<{field_width}}  {_cut(r.upstream, width):<{width}}  {_cut(r.mimic, width)}")
    return "\n".join(lines)


def _time(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _key(cert: x509.Certificate) -> str:
    try:
        return keys.describe(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "unknown algorithm"


def _signature(cert: x509.Certificate) -> str:
    return _oid_name(cert.signature_algorithm_oid)


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = oid._name
    return oid.dotted_string if name == "Unknown OID" else name


def _extensions(cert: x509.Certificate) -> dict[str, str]:
    """Each extension by dotted OID, in order, as text: parsed where cryptography can read the
    certificate's extensions, else as the raw DER that bumper copies (der.py)."""
    try:
        return {e.oid.dotted_string: _extension(e) for e in cert.extensions}
    except (ValueError, x509.UnsupportedGeneralNameType):  # contents cryptography does not read
        return {
            e.oid: f"{'critical ' if e.critical else ''}DER {e.value.hex()}"
            for e in der.extensions(cert.tbs_certificate_bytes)
        }


def _extension(ext: x509.Extension[x509.ExtensionType]) -> str:
    critical = "critical " if ext.critical else ""
    if isinstance(ext.value, x509.SubjectAlternativeName):
        value = ", ".join(_general_name(n) for n in ext.value)
    elif isinstance(ext.value, x509.ExtendedKeyUsage):
        value = ", ".join(_oid_name(oid) for oid in ext.value)
    elif ext.oid in (ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
        digest = getattr(ext.value, "digest", None) or getattr(ext.value, "key_identifier", None) or b""
        value = digest.hex(":")
    else:
        value = repr(ext.value).removeprefix("<").removesuffix(">")
    return f"{critical}{value}"


def _general_name(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.RFC822Name: "email", x509.UniformResourceIdentifier: "URI"}
    return f"{kind.get(type(name), type(name).__name__)}:{name.value}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
