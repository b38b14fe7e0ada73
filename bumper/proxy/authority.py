"""The Host header (or :authority) of a request, as mitmproxy's pretty_url reads it, cached: every
request of a connection asks again about the same value."""

from __future__ import annotations

import functools

from mitmproxy.net.http import url

from bumper.policy.names import CACHED_LENGTH


def parse_authority(authority: str) -> tuple[str, int | None]:
    """Host and port of a Host header or :authority, read leniently as mitmproxy's pretty_url reads
    them: a malformed value is its own host."""
    return (_parse_authority if len(authority) <= CACHED_LENGTH else _parse_authority.__wrapped__)(authority)


@functools.lru_cache(maxsize=4096)
def _parse_authority(authority: str) -> tuple[str, int | None]:
    return url.parse_authority(authority, check=False)
