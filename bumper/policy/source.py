"""Where the policy in force comes from: the file, loaded at start-up and reloaded on SIGHUP and
whenever it changes. An invalid file changes nothing: the policy in force stays, and one line says why."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bumper.errors import ConfigError
from bumper.policy.load import CLIENT_BINDING
from bumper.policy.load import load as load_policy
from bumper.policy.rules import BindNames, Policy

log = logging.getLogger("bumper.policy")

WATCH_INTERVAL = 1.0  # seconds between looks at the policy file
# PolicySource.reloads' keys: a new policy in force, or an invalid file and the old one kept.
RELOADED, INVALID = "ok", "error"


type Stamp = tuple[int, int, int, int]  # device, inode, mtime (ns), size


def stamp(path: Path) -> Stamp | None:
    """What changes when PATH is written, replaced or removed: a look that reads nothing. The file's
    identity is part of it, as the time alone can miss a replacement: file systems stamp times from a
    coarse clock (milliseconds), and a Kubernetes ConfigMap update swaps PATH's symlink to another file
    of perhaps the same size (docs/deploy.md)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _warn(policy: Policy) -> None:
    if policy.bind_names is BindNames.CLIENT:
        log.warning("policy: bind_names: client: %s", CLIENT_BINDING.removeprefix("warning: "))


class PolicySource:
    def __init__(self, policy: Policy, path: Path | None = None, addons: Mapping[str, Any] | None = None) -> None:
        self.policy = policy
        self.path = path  # None: no file, nothing to reload
        self.addons = addons  # the addon classes a reloaded policy may name
        self.on_reload: list[Callable[[Policy], None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self.reloads: Counter[str] = Counter()  # by RELOADED or INVALID: read by --admin's /metrics

    def running(self) -> None:
        _warn(self.policy)
        if self.path is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.path))

    def done(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def reload(self) -> None:
        """A new policy for new connections; connections in flight keep the decisions they got."""
        if self.path is None:
            return
        try:
            new = load_policy(self.path, self.addons)
        except ConfigError as e:
            problems = str(e).splitlines()
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            log.error("policy not reloaded, the one in force stays: %s%s", problems[0], more)
            self.reloads[INVALID] += 1
            return
        self.policy = new
        _warn(new)
        for reloaded in self.on_reload:
            reloaded(new)
        log.info("policy reloaded from %s: %d rules, default %s", self.path, len(new.rules), new.default)
        self.reloads[RELOADED] += 1

    async def _watch(self, path: Path) -> None:
        seen = stamp(path)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = stamp(path)
            if now != seen:
                seen = now
                self.reload()
