"""The one clock notation of bumper's logs, stderr and the JSON access log alike: RFC 3339 in UTC
to the millisecond, as datetime.isoformat(timespec="milliseconds") writes it, with Z for the zone
(2026-12-04T17:40:56.123Z; datetime.fromisoformat reads it)."""

from __future__ import annotations

import functools
import math
import time


def iso_utc(timestamp: float) -> str:
    """TIMESTAMP (seconds since the epoch) in that notation: microseconds rounded, then cut, as
    datetime does, at a fraction of its cost (the access log writes one per request)."""
    fraction, seconds = math.modf(timestamp)
    micros = round(fraction * 1_000_000)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return f"{_second(int(seconds))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
