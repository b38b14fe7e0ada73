"""Request targets as the upstream will read them, for every rule and addon that matches URLs.

A block on `example.com/admin/*` is only as good as the reading of the path it is matched against:
`/%61dmin/x`, `/./admin/x`, `/pub/../admin/x` and `//admin/x` are all `/admin/x` to most servers,
`/admin%2fx` is to servers that decode an encoded slash (nginx, hypercorn), `/admin;/x` and
`/pub/..;/admin/x` are to Tomcat and Spring, which drop `;` path parameters, and `/pub\\..\\admin`
is to IIS. bumper cannot know which server is behind a name, so a pattern is matched against every
reading here (`readings`), and the request is refused if any matches; the request itself is
forwarded as the client sent it.

`canonical` is the one normal form of RFC 3986 section 6.2.2 (what the access log shows); the
lenient readings add what no RFC allows but servers do. Nothing here raises: a target is any string
a client sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bumper.policy import names

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What may stand unencoded in a path segment (RFC 3986 pchar without pct-encoded), and in a query.
_PCHAR = UNRESERVED | frozenset("!$&'()*+,;=:@")
_PATH_CHARS = _PCHAR | frozenset("/")
_QUERY_CHARS = _PCHAR | frozenset("/?")
_HEX = frozenset("0123456789abcdefABCDEF")
# A target whose every reading is itself: no escapes, no empty or parameter segments, no backslash,
# nothing to encode. Most requests are like this, and skip the work below. A segment that starts
# with a dot goes the long way (it may be `.` or `..`). Each segment starts at its own slash, so
# that the expression cannot backtrack.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)*/?")
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*")
# Percent-escapes decoded at most this often in a lenient reading: a server behind a server may
# decode again (`%252e` is `%2e`, then `.`); more rounds than this are not a reading anyone serves.
MAX_DECODE_ROUNDS = 4
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def canonical(target: str) -> str:
    """TARGET (path and query) in its RFC 3986 normal form: escapes of unreserved characters decoded,
    the others upper-case, what may not stand in a URI (spaces, non-ASCII, a `%` that starts no
    escape, a backslash) percent-encoded as UTF-8, and the dot segments of the path removed. The
    query keeps its order and its `+`; `;`, `%2F` and repeated slashes stay as they are."""
    path, mark, query = target.partition("?")
    if _plain(path, query):
        return target
    path = _encode(path, _PATH_CHARS)
    if path.startswith("/"):
        path = remove_dot_segments(path)
    return path + mark + _encode(query, _QUERY_CHARS)


def readings(target: str) -> tuple[str, ...]:
    """Every way an upstream may read TARGET, without repeats: as sent, `canonical`, and the lenient
    readings, in which escapes are decoded (all of them, `%2F` and nested ones too), a backslash is a
    slash, and the dot segments are removed, each with and without dropping `;` parameters from the
    path's segments and merging repeated slashes. A pattern that matches none of them does not match
    what any server reads."""
    path, mark, query = target.partition("?")
    if _plain(path, query):
        return (target,)
    found = dict.fromkeys([target, canonical(target)])
    decoded_query = mark + _decode_all(query)
    for drop_parameters in (False, True):
        for merge_slashes in (False, True):
            found[_lenient(path, drop_parameters, merge_slashes) + decoded_query] = None
    return tuple(found)


def _plain(path: str, query: str) -> bool:
    return bool(_PLAIN_PATH.fullmatch(path) and _PLAIN_QUERY.fullmatch(query))


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: `/a/./b/../c` is `/a/c`, and no `..` climbs above the root."""
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


@dataclass(frozen=True)
class Url:
    """An absolute URL taken apart for matching: the parts a server folds (scheme, host, default
    port) folded, the target (path and query) as sent."""

    scheme: str  # lower case
    host: str  # names.normalize'd; an IPv6 address without its brackets
    port: int | None  # None: the scheme's default, or none given
    target: str

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and names.is_ip_address(self.host) else self.host
        return f"{self.scheme}://{host}" + ("" if self.port is None else f":{self.port}")


def parse(url: str) -> Url:
    """URL (`scheme://host[:port]/path?query`) taken apart; an authority that is not one is kept
    whole, lower-cased, as the host."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return Url("", "", None, url)
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:end], rest[end:]
    if not target.startswith("/"):  # an empty path is "/" (RFC 3986 section 6.2.3)
        target = "/" + target
    scheme = scheme.lower()
    host, port = _split_authority(authority)
    if port is not None and port == DEFAULT_PORTS.get(scheme):
        port = None
    return Url(scheme, host, port, target)


def normalize(url: str) -> str:
    """URL as the access log's `url_normalized` gives it: scheme and host folded, the default port
    dropped, the target `canonical`."""
    parts = parse(url)
    return parts.origin + canonical(parts.target) if parts.scheme else canonical(url)


def _split_authority(authority: str) -> tuple[str, int | None]:
    host, port_text = authority, ""
    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if bracket and (not after or after.startswith(":")):
            host, port_text = inside, after[1:]
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    if port_text and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return authority.lower(), None
    return names.normalize(host), int(port_text) if port_text else None


def decode_unreserved(text: str) -> str:
    """TEXT with the escapes of unreserved characters decoded and the others upper-case, and nothing
    else changed: for patterns, whose `*`, `?` and `[` are not URL characters."""
    return _ESCAPE_TEXT.sub(_escape_form, text) if "%" in text else text


def _escape_form(m: re.Match[str]) -> str:
    return _escaped(m.group(1))


def _escaped(hex_digits: str) -> str:
    """The escape %HEX_DIGITS in its normal form: the character if it is unreserved, else upper-case."""
    char = chr(int(hex_digits, 16))
    return char if char in UNRESERVED else "%" + hex_digits.upper()


_ESCAPE_TEXT = re.compile(r"%([0-9A-Fa-f]{2})")


def _encode(text: str, allowed: frozenset[str]) -> str:
    """TEXT with unreserved escapes decoded, the other escapes upper-case, and every character
    outside ALLOWED percent-encoded (as the UTF-8 bytes it was read from)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            out.append(_escaped(text[i + 1 : i + 3]))
            i += 3
            continue
        out.append(c if c in allowed else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape")))
        i += 1
    return "".join(out)


def _decode_all(text: str) -> str:
    """TEXT with every escape decoded, and decoded again while that changes it (up to
    MAX_DECODE_ROUNDS); bytes that are not UTF-8 kept as surrogates, so that they stay distinct."""
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = _unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def _unquote(text: str) -> str:
    if "%" not in text:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8", "surrogateescape")


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _lenient(path: str, drop_parameters: bool, merge_slashes: bool) -> str:
    """PATH as a lenient server reads it: backslashes are slashes, every escape decoded (again while
    that changes it), `;` parameters dropped (before and after decoding) if DROP_PARAMETERS, runs of
    slashes one slash if MERGE_SLASHES, and then the dot segments removed."""
    for _ in range(MAX_DECODE_ROUNDS):
        step = path.replace("\\", "/")
        if drop_parameters:
            step = _without_parameters(step)
        step = _unquote(step)
        if step == path:
            break
        path = step
    path = path.replace("\\", "/")
    if drop_parameters:
        path = _without_parameters(path)
    if merge_slashes:
        path = _SLASHES.sub("/", path)
    return remove_dot_segments(path) if path.startswith("/") else path


_SLASHES = re.compile(r"//+")


def _without_parameters(path: str) -> str:
    """`/admin;x=1/y;z` is `/admin/y` to Tomcat and Spring: a segment ends at its `;`."""
    if ";" not in path:
        return path
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))
