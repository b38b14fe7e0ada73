"""How bumper stops: SIGINT (Ctrl-C) and SIGTERM end the proxy at any moment, start-up included,
with one line on stderr and exit code 0, never a traceback. Once the proxy serves, SIGTERM drains
first (bumper.proxy.drain): open connections may finish, up to --drain-timeout.

Until serve() hands them to the event loop, both raise KeyboardInterrupt (the entry point makes
SIGTERM do so too), which the command turns into that line. The processes bumper starts never see
them: a terminal sends Ctrl-C to the whole process group, and bumper stops its key worker itself.
An interrupted one-shot command (`bumper ca`, `mimic`, `policy`) exits 130, silently.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
ONE_SHOT_COMMANDS = frozenset({"ca", "mimic", "policy"})  # any other first argument runs the proxy
# The hidden option of a --workers worker (bumper.proxy.workers): its supervisor writes the stop line.
WORKER_FLAG = "--worker-channel"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report an interrupted command
# The stop line's logger. It has the stderr log's handler alone (cli), as the configuration errors'
# has: mitmproxy's handler on the root logger needs the event loop, which is gone when bumper stops.
LOGGER = "bumper.stopped"
# logging's `extra` for a line that the text log shows bare, without its time: the start-up and stop
# lines, as bumper has always printed them (scripts wait for `proxy listening on`, `stopped`).
BARE = {"bumper_bare": True}


_signalled = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, and are remembered: Python swallows an exception
    raised where it cannot propagate (a weakref callback in the import machinery, seen once in 300
    runs of tests/test_cli.py), and a stop must not be lost there."""
    for sig in SIGNALS:
        signal.signal(sig, _interrupt)
    sys.unraisablehook = _unraisable


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    if unraisable.exc_type is not KeyboardInterrupt:  # a swallowed stop: no "Exception ignored" traceback
        sys.__unraisablehook__(unraisable)


def signalled() -> bool:
    """Whether SIGINT or SIGTERM came since install(), caught or swallowed."""
    return _signalled


def stopped() -> int:
    """The line every stop of the proxy ends with, and its exit code: through the stderr log once it
    is set up (a JSON line with --log-format json), printed before that."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers:
        logger.info("bumper: stopped", extra=BARE)
    else:
        print("bumper: stopped", file=sys.stderr, flush=True)
    return 0


def interrupted(args: list[str]) -> int:
    """The exit code when SIGINT or SIGTERM cut the command ARGS short. For the proxy that is its
    normal end; a one-shot command did not do its work, and `bumper ca init && ...` must stop."""
    if WORKER_FLAG in args:
        return 0
    return EXIT_INTERRUPTED if one_shot(args) else stopped()


def one_shot(args: list[str]) -> bool:
    """Whether ARGS run a one-shot command rather than the proxy."""
    return bool(args[:1]) and args[0] in ONE_SHOT_COMMANDS


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread. A process started meanwhile starts with both
    blocked, as a signal mask survives fork and exec; this one gets them when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
