"""An upstream certificate and its mimic side by side, field by field (for `bumper mimic --text`)."""

from __future__ import annotations

import datetime
import enum
import itertools
import textwrap
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509.certificate_transparency import SignedCertificateTimestamp

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
        Row("subject", name_text(upstream, "subject"), name_text(mimic, "subject")),
        Row("issuer", name_text(upstream, "issuer"), name_text(mimic, "issuer")),
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
    """Two columns WIDTH wide; a longer value goes on over the next lines, so that two values that
    differ never look alike."""
    field_width = max(len(r.field) for r in rows)
    lines = [f"{'field':<{field_width}}  {'upstream':<{width}}  mimic"]
    for r in rows:
        wrapped = itertools.zip_longest(_wrap(r.upstream, width), _wrap(r.mimic, width), fillvalue="")
        for i, (upstream, mimic) in enumerate(wrapped):
            lines.append(f"{r.field if i == 0 else '':<{field_width}}  {upstream:<{width}}  {mimic}".rstrip())
    return "\n".join(lines)


def name_text(cert: x509.Certificate, part: str) -> str:
    """CERT's subject or issuer (PART) as RFC 4514 text, or as `DER` and its hex where cryptography
    cannot read it (an attribute of a string type it does not know): shown, never a traceback."""
    try:
        return (cert.subject if part == "subject" else cert.issuer).rfc4514_string() or "(empty)"
    except (ValueError, TypeError):  # TypeError: a BIT STRING attribute other than x500UniqueIdentifier
        pass
    try:
        tbs = der.parse_tbs(cert.tbs_certificate_bytes)
    except der.MalformedDER:
        return "(malformed)"
    return f"DER {(tbs.subject if part == 'subject' else tbs.issuer).hex()}"


def _time(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"  # cryptography's naive datetimes are UTC too


def _key(cert: x509.Certificate) -> str:
    try:
        return keys.describe(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return "unknown algorithm"


def _signature(cert: x509.Certificate) -> str:
    return _oid_name(cert.signature_algorithm_oid)


# Names for OIDs that cryptography prints as "Unknown OID", but certificates often carry.
OID_NAMES = {
    "2.5.29.32.0": "anyPolicy",
    "2.23.140.1.1": "CA/B EV",
    "2.23.140.1.2.1": "CA/B domain-validated",
    "2.23.140.1.2.2": "CA/B organization-validated",
    "2.23.140.1.2.3": "CA/B individual-validated",
}


def _oid_name(oid: x509.ObjectIdentifier) -> str:
    name = oid._name  # cryptography's own table; it has no public one
    return OID_NAMES.get(oid.dotted_string, oid.dotted_string) if name == "Unknown OID" else name


def _extensions(cert: x509.Certificate) -> dict[str, str]:
    """Each extension by dotted OID, in order, as text: parsed where cryptography can read the
    certificate's extensions, else as the raw DER that bumper copies (der.py)."""
    try:
        return {e.oid.dotted_string: _extension(e) for e in cert.extensions}
    # contents cryptography does not read; TypeError: a BIT STRING attribute in a directoryName
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
        return {
            e.oid: f"{'critical ' if e.critical else ''}DER {e.value.hex()}"
            for e in der.extensions(cert.tbs_certificate_bytes)
        }


def _extension(ext: x509.Extension[x509.ExtensionType]) -> str:
    critical = "critical " if ext.critical else ""
    return f"{critical}{_text(ext.value)}"


def _text(value: object, nested: bool = False) -> str:
    """VALUE, from cryptography's extension classes, as a person reads it: OIDs by name or dotted,
    bytes in hex, times in UTC, flags by name; never a Python repr. A list or object inside another
    is bracketed."""
    match value:
        case bool() | int() | str() | IPv4Address() | IPv6Address() | IPv4Network() | IPv6Network():
            return str(value)  # before Iterable: a network iterates over its addresses
        case bytes():
            return value.hex(":")
        case datetime.datetime():
            return _time(value)
        case enum.Enum():
            return value.name
        case x509.ObjectIdentifier():
            return _oid_name(value)
        case x509.Name() | x509.RelativeDistinguishedName():
            return value.rfc4514_string()
        case x509.GeneralName():
            return _general_name(value)
        case hashes.HashAlgorithm():
            return value.name
        case x509.SubjectKeyIdentifier():
            return value.digest.hex(":")
        case x509.AuthorityKeyIdentifier() if value.key_identifier is not None:
            return value.key_identifier.hex(":")  # the issuer name and serial, if there, add nothing to compare
        case x509.BasicConstraints(ca=False):
            return "CA:FALSE"
        case x509.BasicConstraints():
            return "CA:TRUE" + ("" if value.path_length is None else f", pathlen:{value.path_length}")
        case x509.PolicyInformation():
            qualifiers = f" [{_text(value.policy_qualifiers)}]" if value.policy_qualifiers else ""
            return _oid_name(value.policy_identifier) + qualifiers
        case x509.DistributionPoint(full_name=list() as names, relative_name=None, reasons=None, crl_issuer=None):
            return _text(names)  # the usual CRL URL alone
        case x509.AccessDescription():
            return f"{_oid_name(value.access_method)} {_general_name(value.access_location)}"
        case x509.UnrecognizedExtension():
            return f"DER {value.value.hex()}"
        case SignedCertificateTimestamp():  # which log, and when: what a person compares
            return f"(log {value.log_id.hex()} at {_time(value.timestamp)})"
        case Iterable():  # SANs, key purposes, policies, distribution points, SCTs...
            items = [_text(item, nested=True) for item in value]
            if isinstance(value, Set):
                items.sort()  # a frozenset's order is not the certificate's
            text = ", ".join(items) or "(empty)"
            return f"[{text}]" if nested else text
    text = ", ".join(_fields(value)) or type(value).__name__  # PrecertPoison, OCSPNoCheck: presence alone
    return f"({text})" if nested else text


def _fields(value: object) -> Iterator[str]:
    """An object's set properties, in the order its class defines them: `name` for a true flag
    (keyUsage), `name=value` for the rest."""
    for name, attribute in vars(type(value)).items():
        if name.startswith("_") or not isinstance(attribute, property):
            continue
        try:
            field = getattr(value, name)
        except ValueError:  # keyUsage's encipher_only and decipher_only without key_agreement
            continue
        if field is True:
            yield name
        elif field is not None and field is not False and (isinstance(field, int) or field):  # not empty
            yield f"{name}={_text(field, nested=True)}"


def _general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.OtherName):
        return f"otherName:{_oid_name(name.type_id)}:{name.value.hex()}"
    kind = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
        x509.UniformResourceIdentifier: "URI",
        x509.DirectoryName: "dirName",
        x509.RegisteredID: "RID",
    }
    return f"{kind[type(name)]}:{_text(name.value)}"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]
