"""Learning pinned clients: a client that rejects the mimic for a name (an app that pins the real
certificate) gets that name spliced for a while, instead of failing on every connection."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("bumper.policy")

DEFAULT_TTL = 3600.0  # seconds a learned pair is spliced
DEFAULT_CAPACITY = 10_000  # pairs remembered at most; the oldest go first

# How mitmproxy words a client's rejection of the certificate it was shown.
_REJECTIONS = ("unknown ca", "bad certificate", "certificate unknown", "disconnected during the handshake")


def is_rejection(error: str) -> bool:
    return any(text in error.lower() for text in _REJECTIONS)


class LearnedPins:
    def __init__(
        self, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def remember(self, client: str, sni: str) -> None:
        self._until[(client, sni)] = self._clock() + self.ttl
        self._until.move_to_end((client, sni))
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def close(self) -> None:
        """Nothing to let go of in memory (SharedLearnedPins has a file)."""

    def pinned(self, client: str, sni: str) -> bool:
        until = self._until.get((client, sni))
        if until is None:
            return False
        if until < self._clock():
            del self._until[(client, sni)]
            return False
        return True


PINS_FILE = "pins.sqlite"  # in the --workers supervisor's private directory
SHARED_TIMEOUT = 1.0  # seconds a look waits for another worker's write: a row or two, never long


class SharedLearnedPins(LearnedPins):
    """Learned pins that every worker of one bumper sees (--workers, bumper.proxy.workers): a pin
    learned on one worker splices the pair on all, as a single process would. One small SQLite
    table (WAL: a look never waits for a write) in the supervisor's private directory, gone with it
    as a single process's memory is. The same bounds: CAPACITY rows, the oldest out first, each a
    client address and a host name (at most 253 bytes). Times are the wall clock's: the workers'
    monotonic clocks are not one clock. A file that cannot be used leaves this worker's memory in
    charge, with one line saying so: a pinned app then fails once more per worker, nothing worse."""

    def __init__(
        self, path: Path, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        super().__init__(ttl, capacity, clock)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._failed = False

    def remember(self, client: str, sni: str) -> None:
        super().remember(client, sni)
        self._attempt(lambda db: self._insert(db, client, sni))

    def pinned(self, client: str, sni: str) -> bool:
        if super().pinned(client, sni):
            return True
        row = self._attempt(
            lambda db: db.execute("SELECT until FROM pins WHERE client = ? AND sni = ?", (client, sni)).fetchone()
        )
        return row is not None and row[0] >= self._clock()

    def _insert(self, db: sqlite3.Connection, client: str, sni: str) -> None:
        db.execute(
            "INSERT OR REPLACE INTO pins (client, sni, until) VALUES (?, ?, ?)", (client, sni, self._clock() + self.ttl)
        )
        db.execute(
            "DELETE FROM pins WHERE rowid IN (SELECT rowid FROM pins ORDER BY until DESC LIMIT -1 OFFSET ?)",
            (self.capacity,),
        )

    def _attempt[T](self, operation: Callable[[sqlite3.Connection], T]) -> T | None:
        if self._failed:
            return None
        try:
            if self._db is None:
                self._db = self._open()
            return operation(self._db)
        except sqlite3.Error as e:
            self._failed = True
            log.warning("learned pinning: %s: %s; each worker learns for itself from now on", self.path, e)
            return None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=SHARED_TIMEOUT)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS pins (client TEXT, sni TEXT, until REAL, PRIMARY KEY (client, sni))")
        return db

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
