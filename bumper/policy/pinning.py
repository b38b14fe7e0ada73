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
# Seconds a pin learned on another worker may take to be seen here: the table is looked at no more
# often, so that a connection costs no SQL (and no wait on the event loop) in the common case.
SHARED_REFRESH = 0.5


class SharedLearnedPins(LearnedPins):
    """Learned pins that every worker of one bumper sees (--workers, bumper.proxy.workers): a pin
    learned on one worker splices the pair on all, as a single process would, within SHARED_REFRESH.
    One small SQLite table (WAL: a look never waits for a write) in the supervisor's private
    directory, gone with it as a single process's memory is; each worker answers from its copy in
    memory, loaded again only when another connection changed the table (PRAGMA data_version),
    which it asks at most every SHARED_REFRESH. The same bounds: CAPACITY rows, the oldest out
    first, each a client address and a host name (at most 253 bytes), and the copy no bigger. Times
    are the wall clock's: the workers' monotonic clocks are not one clock. A file that cannot be used
    leaves this worker's memory in charge, with one line saying so: a pinned app then fails once more
    per worker, nothing worse."""

    def __init__(
        self, path: Path, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        super().__init__(ttl, capacity, clock)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._failed = False
        self._version: int | None = None  # the table's data_version when the copy was loaded
        self._checked: float | None = None  # when the table was last asked about

    def remember(self, client: str, sni: str) -> None:
        super().remember(client, sni)
        self._attempt(lambda db: self._insert(db, client, sni))

    def pinned(self, client: str, sni: str) -> bool:
        now = self._clock()
        # Either way: a wall clock set back must not stop the looks.
        if self._checked is None or abs(now - self._checked) >= SHARED_REFRESH:
            self._checked = now
            self._attempt(lambda db: self._reload(db, now))
        return super().pinned(client, sni)

    def _reload(self, db: sqlite3.Connection, now: float) -> None:
        """The copy in memory loaded again if another connection (worker) changed the table since;
        this one's own writes are in it already."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        rows = db.execute(
            "SELECT client, sni, until FROM pins WHERE until >= ? ORDER BY until DESC LIMIT ?", (now, self.capacity)
        ).fetchall()
        self._until = OrderedDict(((client, sni), until) for client, sni, until in reversed(rows))
        self._version = version

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
