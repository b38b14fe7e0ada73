"""Reading a certificate's names and extensions as the exact DER bytes the upstream's CA wrote, and
writing a TBSCertificate around such bytes.

cryptography parses names and extensions all or nothing and re-encodes what it copies (a
UserNotice turns into UTF8String, say), and some well-formed names it cannot read at all (an
attribute value of a string type it does not know: ObjectDescriptor, RELATIVE-OID, CHARACTER
STRING...). A mimic carries the upstream's subject and extensions byte for byte, including ones no
library knows, so bumper walks the TBSCertificate itself (RFC 5280, section 4.1):

    TBSCertificate ::= SEQUENCE { version [0], serialNumber, signature, issuer, validity, subject,
        subjectPublicKeyInfo, issuerUniqueID [1] OPTIONAL, subjectUniqueID [2] OPTIONAL,
        extensions [3] EXPLICIT SEQUENCE OF Extension OPTIONAL }
    Name ::= SEQUENCE OF RelativeDistinguishedName
    RelativeDistinguishedName ::= SET OF SEQUENCE { type OBJECT IDENTIFIER, value ANY }
    Extension ::= SEQUENCE { extnID OBJECT IDENTIFIER, critical BOOLEAN DEFAULT FALSE,
        extnValue OCTET STRING }

Everything here raises MalformedDER, and nothing else, on input that is not such a structure.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

SEQUENCE, SET, BOOLEAN, INTEGER, OCTET_STRING, OBJECT_IDENTIFIER, BIT_STRING = 0x30, 0x31, 0x01, 0x02, 0x04, 0x06, 0x03
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18
VERSION_TAG = 0xA0  # [0] EXPLICIT, constructed
EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT, constructed
_HIGH_TAG = 0x1F
_MAX_TAG_OCTETS = 4  # tag numbers up to 2**28: more is no certificate's


class MalformedDER(ValueError):
    pass


@dataclass(frozen=True)
class RawExtension:
    oid: str  # dotted form
    critical: bool
    value: bytes  # the contents of extnValue: the extension's own DER


@dataclass(frozen=True)
class Tbs:
    """What a mimic copies from, or compares in, a TBSCertificate: exact DER, never re-encoded."""

    issuer: bytes  # the whole Name, tag and length included
    subject: bytes
    extensions: tuple[RawExtension, ...]


def read(data: bytes, offset: int) -> tuple[int, int, int]:
    """The TLV at OFFSET: (tag, start of its contents, end of its contents). A tag in the high-tag-number
    form is given as its first octet (which no low tag number shares)."""
    if offset + 2 > len(data):
        raise MalformedDER("truncated")
    tag = data[offset]
    start = offset + 1
    if tag & _HIGH_TAG == _HIGH_TAG:
        more = 0
        while start < len(data) and data[start] & 0x80:
            start, more = start + 1, more + 1
        if more >= _MAX_TAG_OCTETS or start >= len(data):
            raise MalformedDER("bad tag")
        start += 1
    if start >= len(data):
        raise MalformedDER("truncated")
    length = data[start]
    start += 1
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise MalformedDER("bad length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise MalformedDER("truncated")
    return tag, start, end


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    return [(tag, value_start, value_end) for _, tag, value_start, value_end in elements(data, start, end)]


def elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs between START and END: (offset of the TLV, tag, start and end of its contents)."""
    found = []
    while start < end:
        tag, value_start, value_end = read(data, start)
        if value_end > end:
            raise MalformedDER("a value runs past its container")
        found.append((start, tag, value_start, value_end))
        start = value_end
    return found


def decode_oid(body: bytes) -> str:
    if not body or body[-1] & 0x80:
        raise MalformedDER("bad object identifier")
    arcs, value = [], 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def parse_tbs(tbs_certificate: bytes) -> Tbs:
    """The issuer, subject and extensions of a DER TBSCertificate, exactly as encoded; MalformedDER
    when its structure, its names or its extension list are not sound, or an extension appears twice."""
    fields = _fields(tbs_certificate)
    issuer, subject = (_name(tbs_certificate, *fields[i]) for i in (2, 4))
    extensions: tuple[RawExtension, ...] = ()
    for _, t, s, e in fields[6:]:
        if t == EXTENSIONS_TAG:
            extensions = _extension_list(tbs_certificate, s, e)
    return Tbs(issuer, subject, extensions)


def names(tbs_certificate: bytes) -> tuple[bytes, bytes]:
    """The issuer and subject of a DER TBSCertificate as their own DER, read from its outer fields
    alone (a tenth of parse_tbs's time: trust.py compares names on every connection)."""
    fields = _fields(tbs_certificate)
    return tuple(tbs_certificate[fields[i][0] : fields[i][3]] for i in (2, 4))  # type: ignore[return-value]


def _fields(tbs_certificate: bytes) -> list[tuple[int, int, int, int]]:
    """The TBSCertificate's fields after the version (elements), checked for their types up to the key."""
    tag, start, end = read(tbs_certificate, 0)
    if tag != SEQUENCE or end != len(tbs_certificate):
        raise MalformedDER("TBSCertificate is not one SEQUENCE")
    fields = elements(tbs_certificate, start, end)
    if fields and fields[0][1] == VERSION_TAG:
        fields = fields[1:]
    if [f[1] for f in fields[:6]] != [INTEGER, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE, SEQUENCE]:
        raise MalformedDER("TBSCertificate lacks fields or has them of the wrong types")
    return fields


def extensions(tbs_certificate: bytes) -> list[RawExtension]:
    """The extensions of a DER TBSCertificate, in order, exactly as encoded."""
    return list(parse_tbs(tbs_certificate).extensions)


def _name(data: bytes, offset: int, tag: int, start: int, end: int) -> bytes:
    """The whole Name at OFFSET after checking its structure; the attribute values are any TLV (a
    mimic copies them, it never reads them)."""
    for rdn_tag, rdn_start, rdn_end in children(data, start, end):
        if rdn_tag != SET:  # an empty one is sound DER, if not X.501: OpenSSL takes it, so it is copied
            raise MalformedDER("a name's RDN is not a SET")
        for attr_tag, attr_start, attr_end in children(data, rdn_start, rdn_end):
            parts = children(data, attr_start, attr_end) if attr_tag == SEQUENCE else []
            if len(parts) != 2 or parts[0][0] != OBJECT_IDENTIFIER:
                raise MalformedDER("a name attribute is not SEQUENCE { OID, value }")
            decode_oid(data[parts[0][1] : parts[0][2]])
    return data[offset:end]


def _extension_list(data: bytes, start: int, end: int) -> tuple[RawExtension, ...]:
    inner = children(data, start, end)
    if len(inner) != 1 or inner[0][0] != SEQUENCE:
        raise MalformedDER("extensions are not a SEQUENCE")
    found = tuple(_extension(data, s, e, t) for t, s, e in children(data, inner[0][1], inner[0][2]))
    seen: set[str] = set()
    for ext in found:
        if ext.oid in seen:
            raise MalformedDER(f"extension {ext.oid} appears twice")
        seen.add(ext.oid)
    return found


def _extension(data: bytes, start: int, end: int, tag: int) -> RawExtension:
    if tag != SEQUENCE:
        raise MalformedDER("an extension is not a SEQUENCE")
    fields = children(data, start, end)
    if len(fields) == 2:
        (oid_tag, oid_start, oid_end), (value_tag, value_start, value_end) = fields
        critical = False
    elif len(fields) == 3 and fields[1][0] == BOOLEAN and fields[1][2] - fields[1][1] == 1:
        (oid_tag, oid_start, oid_end), flag, (value_tag, value_start, value_end) = fields
        critical = data[flag[1]] != 0
    else:
        raise MalformedDER("an extension has the wrong fields")
    if oid_tag != OBJECT_IDENTIFIER or value_tag != OCTET_STRING:
        raise MalformedDER("an extension has the wrong field types")
    return RawExtension(decode_oid(data[oid_start:oid_end]), critical, data[value_start:value_end])


def bit_string_bits(value: bytes) -> set[int]:
    """The numbers of the bits set in a DER BIT STRING (bit 0 is the most significant)."""
    tag, start, end = read(value, 0)
    if tag != BIT_STRING or end != len(value) or end == start:
        raise MalformedDER("not a single BIT STRING")
    unused, body = value[start], value[start + 1 : end]
    if unused > 7 or (unused and not body) or (body and body[-1] & ((1 << unused) - 1)):
        raise MalformedDER("bad unused bits in a BIT STRING")
    return {i * 8 + j for i, byte in enumerate(body) for j in range(8) if byte & (0x80 >> j)}


# --- writing ----------------------------------------------------------------------------------


def _header(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def tlv(tag: int, *contents: bytes) -> bytes:
    body = b"".join(contents)
    return bytes([tag]) + _header(len(body)) + body


def encode_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return tlv(OBJECT_IDENTIFIER, bytes(out))


def integer(value: int) -> bytes:
    """A DER INTEGER (two's complement, minimal)."""
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def time(moment: datetime.datetime) -> bytes:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5), in UTC, to the second."""
    moment = moment.astimezone(datetime.UTC)
    if 1950 <= moment.year < 2050:
        return tlv(UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(GENERALIZED_TIME, f"{moment.year:04d}{moment:%m%d%H%M%S}Z".encode())


def extension(oid: str, critical: bool, value: bytes) -> bytes:
    """An Extension; critical FALSE is left out, as DER wants a DEFAULT value to be."""
    return tlv(SEQUENCE, encode_oid(oid), b"\x01\x01\xff" if critical else b"", tlv(OCTET_STRING, value))


def tbs_certificate(
    serial: int,
    signature_algorithm: bytes,
    issuer: bytes,
    validity: tuple[datetime.datetime, datetime.datetime],
    subject: bytes,
    public_key_info: bytes,
    extension_list: Sequence[bytes],
) -> bytes:
    """A v3 TBSCertificate of the given parts (names, algorithm, key and extensions already DER)."""
    return tlv(
        SEQUENCE,
        b"\xa0\x03\x02\x01\x02",  # [0] EXPLICIT version v3
        integer(serial),
        signature_algorithm,
        issuer,
        tlv(SEQUENCE, time(validity[0]), time(validity[1])),
        subject,
        public_key_info,
        tlv(EXTENSIONS_TAG, tlv(SEQUENCE, *extension_list)) if extension_list else b"",
    )


def certificate(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    return tlv(SEQUENCE, tbs, signature_algorithm, tlv(BIT_STRING, b"\x00", signature))
