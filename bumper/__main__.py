"""The `bumper` command (also `python -m bumper`).

It owns SIGINT and SIGTERM before it imports anything heavy: importing mitmproxy is most of
bumper's start-up, and a Ctrl-C then must stop it as quietly as while it serves (bumper.stopping).
"""

from __future__ import annotations

import signal
import sys

from bumper import stopping


def main() -> int:
    stopping.install()  # start-up stops on SIGTERM as on Ctrl-C
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping.SIGNALS)  # held across cli's re-exec
        from bumper import cli  # here, not above: the import is what a stop most often interrupts

        code = cli.main()
    except KeyboardInterrupt:  # before cli.main could catch it
        return stopping.interrupted(sys.argv[1:])
    if code == 0 and stopping.signalled() and stopping.one_shot(sys.argv[1:]):  # swallowed on the way
        return stopping.EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
