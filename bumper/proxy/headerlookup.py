"""mitmproxy's header lookups (`headers.get(name)`, `name in headers`) in one pass over the fields.

mitmproxy's Headers inherit `get` and `in` from collections.abc.Mapping: each goes through
`__getitem__`, `Headers.get_all`, the generic multidict's `get_all` (a lambda-free but per-field
`_kconv` call) and, for a miss, a raised and caught KeyError: 4-6 µs a lookup. Its own HTTP/1 code
asks a dozen of them per request (`expected_http_body_size`, `connection_close`, `Http1Server.send`),
and on keep-alive requests they were about 7% of bumper's CPU (py-spy, bench workload 2, c=10:
`_MultiDict.__getitem__` 7.1% inclusive). Here each is one loop over the `(name, value)` byte pairs:
1-1.6 µs. The answers are the same: names compared as `bytes.lower()` does, values decoded and
several joined with ", " as `Headers._reduce_values` does (docs/architecture.md, mitmproxy's insides;
`tests/test_internals.py` compares both ways over the same headers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mitmproxy.http import Headers


def _name(key: str | bytes) -> bytes:
    """KEY as Headers.get_all compares it: UTF-8 bytes (surrogates kept), lower-cased."""
    return (key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key).lower()


def get(self: Headers, key: Any, default: Any = None) -> Any:
    if not isinstance(key, str | bytes):  # whatever mitmproxy's answer is (a TypeError): not ours to change
        return Mapping.get(self, key, default)
    name = _name(key)
    values = [value for field, value in self.fields if field.lower() == name]
    if not values:
        return default
    if len(values) == 1:
        return values[0].decode("utf-8", "surrogateescape")
    return ", ".join(value.decode("utf-8", "surrogateescape") for value in values)


def contains(self: Headers, key: Any) -> bool:
    if not isinstance(key, str | bytes):
        return Mapping.__contains__(self, key)
    name = _name(key)
    return any(field.lower() == name for field, _ in self.fields)


def install() -> None:
    """Every Headers, mitmproxy's own code's included, looks names up in one pass from now on."""
    Headers.get = get  # type: ignore[method-assign,assignment]
    Headers.__contains__ = contains  # type: ignore[method-assign,assignment]
