"""Host names as users write them in options and rules: exact names and `*.` globs."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

import idna

REGEX_PREFIX = "regex:"
MAX_PORT = 65535
# Every request of a connection asks again about the same names, so the answers are cached; but only
# for values as short as a DNS name with its port: longer ones (from a broken or hostile peer) would
# make 4096 cache entries cost megabytes.
CACHED_LENGTH = 260


def normalize(host: str) -> str:
    """The form every comparison uses: lower case, no trailing dot, and an internationalised name as the
    DNS sees it, after UTS #46 (IDNA 2008 with the mapping browsers apply): bücher.example is
    xn--bcher-kva.example, whether a client, a certificate or a policy wrote it. A name IDNA refuses
    is only lower-cased: it equals nothing but itself, and idna_problem says why it is refused."""
    host = host.strip().rstrip(".")
    if host.isascii():
        host = host.lower()
        return _canonical_ipv6(host) if ":" in host else host
    return (_to_ascii if len(host) <= CACHED_LENGTH else _to_ascii.__wrapped__)(host)


def _canonical_ipv6(host: str) -> str:
    """An IPv6 literal (bracketed or not) in its one compressed form, and an IPv4-mapped one as the
    IPv4 address a dual-stack socket reaches: `[::FFFF:7f00:1]` is 127.0.0.1, as rules write it."""
    try:
        address = ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return host  # not an address: a name (or nonsense) that equals only itself
    return str(address.ipv4_mapped or address)


# The last label of a host that URL parsers (WHATWG) and inet_aton read as a number: decimal, or
# hex with 0x. Such a host is an IPv4 address or nothing, never a name.
_NUMBER = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)", re.IGNORECASE)


def ipv4_form_problem(host: str) -> str | None:
    """Why HOST is an IPv4 address in a form no browser sends, or None. inet_aton (and so getaddrinfo)
    reads `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1` and `127.000.000.001` as 127.0.0.1, while a
    rule for 127.0.0.1 sees another string: a host that ends in a number must be a dotted quad in its
    one canonical form."""
    if ":" in host:
        return None  # IPv6: one form per address once normalized
    labels = host.strip().split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()  # one trailing dot, as a URL may carry
    if not _NUMBER.fullmatch(labels[-1]) or _is_canonical_ipv4(host.strip()):
        return None
    try:
        address = socket.inet_ntoa(socket.inet_aton(host.strip()))
    except OSError:
        return f"{host!r} ends in a number but is no IPv4 address in dotted-quad form"
    return f"{host!r} is {address} in a form no browser sends (shortened, decimal, octal or hex): write {address}"


def _is_canonical_ipv4(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def _to_ascii(host: str) -> str:
    try:
        return idna.encode(host, uts46=True).decode("ascii").rstrip(".")
    except idna.IDNAError:
        return host.lower()


def idna_problem(host: str) -> str | None:
    """Why HOST is no valid internationalised name, or None: a name with non-ASCII characters must pass
    UTS #46, and an ASCII label that claims to be an A-label (xn--) must be one."""
    host = host.strip().rstrip(".")
    try:
        if not host.isascii():
            idna.encode(host, uts46=True)
        else:
            for label in host.split("."):
                if label[:4].lower() == "xn--":
                    idna.ulabel(label)
    except idna.IDNAError as e:
        return f"{host!r} is not a valid internationalised name ({e})"
    return None


def is_ip_address(host: str) -> bool:
    return (_is_ip_address if len(host) <= CACHED_LENGTH else _is_ip_address.__wrapped__)(host)


@functools.lru_cache(maxsize=4096)
def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_port(text: str, lowest: int) -> int:
    """TEXT as a TCP port from LOWEST to 65535, or ValueError saying what is wrong with it."""
    if not (text.isascii() and text.isdigit()):  # int() would take " 80", "8_0" and "٨٠"
        raise ValueError(f"{text!r} is not a port number")
    if not lowest <= int(text) <= MAX_PORT:
        raise ValueError(f"port {text} is out of range ({lowest}-{MAX_PORT})")
    return int(text)


def normalize_pattern(pattern: str) -> str:
    """An exact name or a `*.` glob, normalized as names are (the glob's suffix in its A-labels)."""
    pattern = pattern.strip()
    return "*." + normalize(pattern[2:]) if pattern.startswith("*.") else normalize(pattern)


def valid_pattern(pattern: str) -> bool:
    """An exact name, `*.` followed by a name (the wildcard only as the whole first label), or
    `regex:` followed by a regular expression that must match the whole name."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            _regex(pattern[len(REGEX_PREFIX) :])
        except re.error:
            return False
        return True
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return bool(name) and "*" not in name and all(labels)


def host_matches(pattern: str, host: str) -> bool:
    """`*.example.com` matches any name below example.com at any depth; `example.com` only itself."""
    if pattern.startswith(REGEX_PREFIX):
        return _regex(pattern[len(REGEX_PREFIX) :]).fullmatch(normalize(host)) is not None
    pattern, host = normalize_pattern(pattern), normalize(host)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@functools.lru_cache(maxsize=4096)
def _regex(expression: str) -> re.Pattern[str]:
    return re.compile(expression, re.IGNORECASE)


def checked_pattern(pattern: str) -> str:
    """PATTERN normalized (a regex as it is), or ValueError saying what is wrong with it."""
    normalized = pattern if pattern.startswith(REGEX_PREFIX) else normalize_pattern(pattern)
    if not valid_pattern(normalized):
        raise ValueError(f"bad name, glob or regex {pattern!r} (use example.com, *.example.com or regex:...)")
    if not pattern.startswith(REGEX_PREFIX):
        if problem := idna_problem(pattern.strip().removeprefix("*.")):
            raise ValueError(f"bad name {pattern!r}: {problem.partition(' is ')[2]}")
        if problem := ipv4_form_problem(pattern.strip().removeprefix("*.")):
            raise ValueError(f"bad address {pattern!r}: {problem.partition(' is ')[2]}")
    return normalized


def checked_patterns(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """PATTERNS normalized, or ValueError naming the first bad one (for addon settings)."""
    return tuple(checked_pattern(p) for p in patterns)


def all_exact(patterns: tuple[str, ...]) -> bool:
    """Whether PATTERNS name hosts exactly: at least one, and no `*.` glob or regex among them."""
    return bool(patterns) and not any(p.startswith(("*.", REGEX_PREFIX)) for p in patterns)


def matches_any(patterns: tuple[str, ...], host: str) -> bool:
    return any(host_matches(p, host) for p in patterns)


def host_port(host: str, port: int) -> str:
    """HOST:PORT in the one form rules and logs compare: IPv6 bracketed, names and addresses normalized."""
    host = normalize(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
