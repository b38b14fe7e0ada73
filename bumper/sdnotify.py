"""systemd's readiness protocol (sd_notify), without python-systemd: a unit with `Type=notify` starts
its dependants only once bumper says READY=1, which it says when its listeners are bound and its CA is
loaded, not when the process merely exists. Outside systemd ($NOTIFY_SOCKET unset) nothing is sent.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket $NOTIFY_SOCKET names; a name
starting with `@` is in the abstract namespace (a leading NUL byte)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("bumper")

ENV = "NOTIFY_SOCKET"
# systemd reads the socket at once; a full queue means it is gone or stuck, and must not stall the proxy.
SEND_TIMEOUT = 1.0


def message(*fields: str) -> bytes:
    """FIELDS (`READY=1`, `STATUS=...`) as one notification; newlines inside a value would start a
    field of their own, so they become spaces."""
    return "\n".join(field.replace("\n", " ") for field in fields).encode()


def address(value: str) -> str:
    """$NOTIFY_SOCKET as Python's socket module takes it: `@name` is the abstract socket `\\0name`."""
    return "\0" + value[1:] if value.startswith("@") else value


def notify(*fields: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send FIELDS to systemd if it asked for notifications; whether they were sent. A failure is one
    log line, never a stop: the proxy serves whether or not systemd hears of it."""
    target = environ.get(ENV)
    if not target:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message(*fields), address(target))
    except OSError as e:
        log.warning("sd_notify: cannot tell systemd %s through %s=%s: %s", fields[0], ENV, target, e)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """Before a reload (SIGHUP); ready() after it. systemd wants the monotonic clock with RELOADING=1
    to tell this reload from an earlier one."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")
