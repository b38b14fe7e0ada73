"""Host names as users write them in options and rules: exact names and `*.` globs."""

from __future__ import annotations

import ipaddress


def normalize(host: str) -> str:
    """Lower case, no trailing dot: the form every comparison uses."""
    return host.strip().rstrip(".").lower()


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def valid_pattern(pattern: str) -> bool:
    """An exact name, or `*.` followed by a name: the wildcard only as the whole first label."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    return bool(name) and "*" not in name and all(labels)


def host_matches(pattern: str, host: str) -> bool:
    """`*.example.com` matches any name below example.com at any depth; `example.com` only itself."""
    pattern, host = normalize(pattern), normalize(host)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern
