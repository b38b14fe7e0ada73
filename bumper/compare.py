"""An upstream certificate and its mimic side by side, field by field (for `bumper mimic --text`)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID

from bumper import keys

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
        Row(
            "not before",
            f"{upstream.not_valid_before_utc:%Y-%m-%d %H:%M:%S}",
            f"{mimic.not_valid_before_utc:%Y-%m-%d %H:%M:%S}",
        ),
        Row(
            "not after",
            f"{upstream.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
            f"{mimic.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
        ),
        Row("key", _key(upstream), _key(mimic)),
        Row("signature", _signature(upstream), _signature(mimic)),
    ]
    upstream_ext = {e.oid: e for e in upstream.extensions}
    mimic_ext = {e.oid: e for e in mimic.extensions}
    for oid in [*upstream_ext, *(o for o in mimic_ext if o not in upstream_ext)]:
        rows.append(Row(_oid_name(oid), _extension(upstream_ext.get(oid)), _extension(mimic_ext.get(oid))))
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


def _extension(ext: x509.Extension | None) -> str:
    if ext is None:
        return ABSENT
    critical = "critical " if ext.critical else ""
    if ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        value = ", ".join(_general_name(n) for n in ext.value)
    elif ext.oid == ExtensionOID.EXTENDED_KEY_USAGE:
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
