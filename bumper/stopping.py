"""How bumper stops: SIGINT (Ctrl-C) and SIGTERM end the proxy at any moment, start-up included,
with one line on stderr and exit code 0, never a traceback.

Until serve() hands them to the event loop, both raise KeyboardInterrupt (the entry point makes
SIGTERM do so too), which the command turns into that line. The processes bumper starts never see
them: a terminal sends Ctrl-C to the whole process group, and bumper stops its key worker itself.
An interrupted one-shot command (`bumper ca`, `mimic`, `policy`) exits 130, silently.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
ONE_SHOT_COMMANDS = frozenset({"ca", "mimic", "policy"})  # any other first argument runs the proxy
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report an interrupted command


def stopped() -> int:
    """The line every stop of the proxy ends with, and its exit code."""
    print("bumper: stopped", file=sys.stderr, flush=True)
    return 0


def interrupted(args: list[str]) -> int:
    """The exit code when SIGINT or SIGTERM cut the command ARGS short. For the proxy that is its
    normal end; a one-shot command did not do its work, and `bumper ca init && ...` must stop."""
    return EXIT_INTERRUPTED if args[:1] and args[0] in ONE_SHOT_COMMANDS else stopped()


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread. A process started meanwhile starts with both
    blocked, as a signal mask survives fork and exec; this one gets them when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
