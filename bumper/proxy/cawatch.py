"""The CA's files under a running proxy: bumper signs with the CA it loaded at start until it
restarts, whatever happens to ca.pem and ca.key meanwhile (replaced, removed, corrupted), and says
so in one log line when it notices: on SIGHUP, or within a second of the change."""

from __future__ import annotations

import asyncio
import logging

from bumper.certs import ca as ca_files
from bumper.policy.source import WATCH_INTERVAL, Stamp, stamp

log = logging.getLogger("bumper.ca")

_FILES = (ca_files.CERT_FILE, ca_files.KEY_FILE, ca_files.ISSUING_CERT_FILE, ca_files.ISSUING_KEY_FILE)


class CaWatch:
    def __init__(self, authority: ca_files.CertificateAuthority) -> None:
        self.authority = authority
        self._reported: str | None = None  # the problem last logged: each is told once
        self._watcher: asyncio.Task[None] | None = None

    def running(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def check(self) -> None:
        problem = ca_files.on_disk_problem(self.authority)
        if problem == self._reported:
            return
        self._reported = problem
        if problem:
            log.warning("CA files changed under the running proxy (%s): the CA loaded at start stays in use", problem)
        else:
            log.info("CA files in %s hold the CA in use again", self.authority.directory)

    def _stamps(self) -> tuple[Stamp | None, ...]:
        return tuple(stamp(self.authority.directory / name) for name in _FILES)

    async def _watch(self) -> None:
        seen = self._stamps()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = self._stamps()
            if now != seen:
                seen = now
                self.check()
