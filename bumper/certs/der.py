"""Reading a certificate's extensions as the exact DER bytes the upstream's CA wrote.

cryptography parses extensions all or nothing and re-encodes what it copies (a UserNotice turns
into UTF8String, say). A mimic should carry the upstream's extensions byte for byte, including
ones no library knows, so bumper walks the TBSCertificate itself (RFC 5280, section 4.1):

    TBSCertificate ::= SEQUENCE { version [0], serialNumber, signature, issuer, validity, subject,
        subjectPublicKeyInfo, issuerUniqueID [1] OPTIONAL, subjectUniqueID [2] OPTIONAL,
        extensions [3] EXPLICIT SEQUENCE OF Extension OPTIONAL }
    Extension ::= SEQUENCE { extnID OBJECT IDENTIFIER, critical BOOLEAN DEFAULT FALSE,
        extnValue OCTET STRING }
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE, BOOLEAN, OCTET_STRING, OBJECT_IDENTIFIER, BIT_STRING = 0x30, 0x01, 0x04, 0x06, 0x03
EXTENSIONS_TAG = 0xA3  # [3] EXPLICIT, constructed


class MalformedDER(ValueError):
    pass


@dataclass(frozen=True)
class RawExtension:
    oid: str  # dotted form
    critical: bool
    value: bytes  # the contents of extnValue: the extension's own DER


def read(data: bytes, offset: int) -> tuple[int, int, int]:
    """The TLV at OFFSET: (tag, start of its contents, end of its contents)."""
    if offset + 2 > len(data):
        raise MalformedDER("truncated")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
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
    found = []
    while start < end:
        tag, value_start, value_end = read(data, start)
        found.append((tag, value_start, value_end))
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


def extensions(tbs_certificate: bytes) -> list[RawExtension]:
    """The extensions of a DER TBSCertificate, in order, exactly as encoded."""
    tag, start, end = read(tbs_certificate, 0)
    if tag != SEQUENCE:
        raise MalformedDER("TBSCertificate is not a SEQUENCE")
    wrapper = next(((s, e) for t, s, e in children(tbs_certificate, start, end) if t == EXTENSIONS_TAG), None)
    if wrapper is None:
        return []
    tag, start, end = read(tbs_certificate, wrapper[0])
    if tag != SEQUENCE:
        raise MalformedDER("extensions are not a SEQUENCE")
    return [_extension(tbs_certificate, s, e, t) for t, s, e in children(tbs_certificate, start, end)]


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
