"""The on-disk mimic cache, as Squid's ssl_db: a restart reuses mimics instead of minting again.

SQLite in WAL mode (standard library) lets several bumper processes share one DIR. Rows are keyed
by the upstream leaf's SHA-256, the signing mode and the CA's fingerprint, so a changed upstream
certificate or a new CA never gets an old mimic. Every hit is re-checked by the caller before use.
The file holds mimic private keys: it is created 0600 inside the 0700 CA directory.

The cache is an optimisation, never a dependency: FailSafeMimicStore keeps bumper serving from
memory when the file is corrupt, read-only or on a full disk, and comes back to it by itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DB_FILE = "mimics.sqlite"
DEFAULT_MAX_BYTES = 256 * 1024**2
# What a row costs on disk besides its bytes (key columns, certificate, key): SQLite's cell header,
# its two index entries, and the page space it strands. Measured (SQLite 3, 4 KiB pages, a
# checkpointed file): rows of 1.9 to 2.6 KB, as most mimics are, fill a page alone, 1.4 to 2.1 KiB
# more than their bytes; smaller and larger rows pack better (0.3 to 0.5 KiB).
ROW_OVERHEAD = 2048
_ROW_BYTES = f"length(upstream) + length(mode) + length(ca) + length(cert) + length(key) + {ROW_OVERHEAD}"
# Written bytes (the cap's fraction) between trims: the file overshoots its cap by at most this.
_PRUNE_FRACTION = 32
RETRY_AFTER = 5.0  # seconds between attempts to write to a cache that failed
BACKLOG_BYTES = 4 * 1024**2  # mimics minted while the cache is down, written once it is back
# What SQLite says of a file that is not (or no longer) a sound database: it is set aside.
_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_SIDE_FILES = ("-wal", "-shm")  # SQLite's own, derived from the main file

log = logging.getLogger("bumper.mimic")


@dataclass(frozen=True)
class StoredMimic:
    cert_der: bytes
    key_der: bytes

    @property
    def size(self) -> int:
        return len(self.cert_der) + len(self.key_der)


def too_large(entry_bytes: int, max_bytes: int) -> bool:
    """Whether an entry of ENTRY_BYTES is served but not cached in a cache of MAX_BYTES: above a
    64th of it. A fraction rather than a fixed size, so that the rule holds for any cap: however
    large the certificates an upstream makes up, each can push out at most a 64th of the cache, and
    the cache keeps room for at least 64 of them."""
    return entry_bytes > max_bytes // 64


class MimicStoreBackend(Protocol):
    """What a shared store (for a cluster) must offer to replace the SQLite file."""

    def get(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str) -> StoredMimic | None: ...

    def put(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> None: ...

    def claim(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> StoredMimic:
        """MIMIC stored, unless the store holds one for the same upstream already (another process
        minted it at the same moment): then that one, stored first. MIMIC when it is not stored."""
        ...

    def forget_other_cas(self, ca_fingerprint: str) -> int: ...

    def stored_bytes(self) -> int:
        """What the stored mimics cost, as counted against the cap (for /metrics: no I/O)."""
        ...

    def close(self) -> None: ...


class SqliteMimicStore:
    """Capped by bytes (MAX_BYTES): every row counts its columns' bytes and ROW_OVERHEAD; the
    least recently written rows go first. A mimic above a 64th of the cap (too_large) is not stored."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._written = 0  # bytes written since the last trim
        self._bytes = 0  # what the table holds: counted when opened and trimmed, added to by writes
        self._connection: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        # Opened on first use, so a proxy that fails to start leaves no file behind.
        if self._connection is None:
            self._connection = self._open()
        return self._connection

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a row lost on power loss is only a re-mint
            db.execute(
                "CREATE TABLE IF NOT EXISTS mimics ("
                " upstream BLOB NOT NULL, mode TEXT NOT NULL, ca TEXT NOT NULL,"
                " cert BLOB NOT NULL, key BLOB NOT NULL, used REAL NOT NULL,"
                " PRIMARY KEY (upstream, mode, ca))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS mimics_used ON mimics (used)")
            # A file written under a higher cap, or by count before caps were in bytes, is trimmed now.
            self._trim(db)
        except BaseException:
            db.close()  # a file that cannot be set up is tried again later, from scratch
            raise
        return db

    def get(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str) -> StoredMimic | None:
        row = self._db.execute(
            "SELECT cert, key FROM mimics WHERE upstream = ? AND mode = ? AND ca = ?",
            (upstream_sha256, mode, ca_fingerprint),
        ).fetchone()
        return StoredMimic(row[0], row[1]) if row else None

    def row_bytes(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> int:
        """What a row costs against the cap, as _ROW_BYTES counts it in SQL."""
        return len(upstream_sha256) + len(mode.encode()) + len(ca_fingerprint.encode()) + mimic.size + ROW_OVERHEAD

    def fits(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> bool:
        return not too_large(self.row_bytes(upstream_sha256, mode, ca_fingerprint, mimic), self.max_bytes)

    def put(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> None:
        """Store MIMIC in place of any other for the same upstream, unless it is too large for the
        cap (it is then only served)."""
        self._insert("INSERT OR REPLACE", upstream_sha256, mode, ca_fingerprint, mimic)

    def claim(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> StoredMimic:
        """MIMIC stored, unless a row for the same upstream is there already: the row's mimic then.
        One statement, so that of two processes minting the same mimic at once one wins, and both
        serve its mimic (--workers: a client's session resumes only on the mimic it was made with)."""
        if self._insert("INSERT OR IGNORE", upstream_sha256, mode, ca_fingerprint, mimic):
            return mimic
        return self.get(upstream_sha256, mode, ca_fingerprint) or mimic  # too large: not stored

    def _insert(self, verb: str, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> bool:
        """Whether MIMIC went in, by VERB (INSERT OR ...)."""
        if not self.fits(upstream_sha256, mode, ca_fingerprint, mimic):
            return False
        added = self._db.execute(
            f"{verb} INTO mimics VALUES (?, ?, ?, ?, ?, ?)",
            (upstream_sha256, mode, ca_fingerprint, mimic.cert_der, mimic.key_der, time.time()),
        ).rowcount
        if not added:
            return False
        size = self.row_bytes(upstream_sha256, mode, ca_fingerprint, mimic)
        self._bytes += size
        self._written += size
        if self._written >= self.max_bytes // _PRUNE_FRACTION:
            self.prune()
        return True

    def forget_other_cas(self, ca_fingerprint: str) -> int:
        """Drop mimics signed by any CA but this one; returns how many."""
        dropped = int(self._db.execute("DELETE FROM mimics WHERE ca != ?", (ca_fingerprint,)).rowcount)
        if dropped:
            self.prune()  # counts what is left
        return dropped

    def prune(self) -> None:
        """Keep the most recently written rows that fit in max_bytes."""
        self._trim(self._db)

    def _trim(self, db: sqlite3.Connection) -> None:
        # The running total, newest first: every row past the cap goes. Two scans of the table
        # every max_bytes/_PRUNE_FRACTION bytes written (and at opening); other processes sharing
        # the file are counted here too.
        db.execute(
            "DELETE FROM mimics WHERE rowid IN (SELECT rowid FROM"
            f" (SELECT rowid, sum({_ROW_BYTES}) OVER (ORDER BY used DESC, rowid DESC) AS running FROM mimics)"
            " WHERE running > ?)",
            (self.max_bytes,),
        )
        self._bytes = int(db.execute(f"SELECT coalesce(sum({_ROW_BYTES}), 0) FROM mimics").fetchone()[0])
        self._written = 0

    def stored_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM mimics").fetchone()[0])

    def close(self) -> None:
        connection, self._connection = self._connection, None  # forgotten even if closing fails
        if connection is not None:
            connection.close()


def _reason(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__


class FailSafeMimicStore:
    """A SqliteMimicStore that never fails the connection that uses it.

    - A corrupt file (SQLite: not a database, malformed) is moved aside, 0600, as
      DB_FILE.corrupt-TIMESTAMP, and a fresh one is started.
    - Any other failure (read-only, disk full, cannot open) degrades the cache: mimics are served
      from memory, the ones minted meanwhile wait in a bounded backlog, and a write is tried again
      at most every RETRY_AFTER seconds; the first that succeeds writes the backlog and recovers.
    One warning when the cache degrades and one when it recovers: not one per connection. Only the
    cache's own files are ever touched, never the CA's beside them."""

    def __init__(
        self,
        store: SqliteMimicStore,
        clock: Callable[[], float] = time.monotonic,
        retry_after: float = RETRY_AFTER,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retry_after = retry_after
        self.backlog_bytes = backlog_bytes
        self._retry_at: float | None = None  # None: the cache works
        self._backlog: OrderedDict[tuple[bytes, str, str], StoredMimic] = OrderedDict()
        self._backlog_size = 0  # the bytes of the backlog's mimics

    @property
    def degraded(self) -> bool:
        return self._retry_at is not None

    def get(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str) -> StoredMimic | None:
        if self.degraded:  # only a write tells that the cache is back: reads wait for it
            return self._backlog.get((upstream_sha256, mode, ca_fingerprint))
        return self._attempt(lambda: self.store.get(upstream_sha256, mode, ca_fingerprint), None)

    def put(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> None:
        key = (upstream_sha256, mode, ca_fingerprint)
        self._write(key, mimic, lambda: self._put(key, mimic))

    def claim(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> StoredMimic:
        key = (upstream_sha256, mode, ca_fingerprint)
        return self._write(key, mimic, lambda: self.store.claim(*key, mimic))

    def _write(self, key: tuple[bytes, str, str], mimic: StoredMimic, write: Callable[[], StoredMimic]) -> StoredMimic:
        """What WRITE gives for MIMIC (the mimic stored): MIMIC itself while the cache is degraded
        (then into the backlog) or too large to store."""
        if not self.store.fits(*key, mimic):
            return mimic  # the store would not keep it either
        if self.degraded:
            self._keep(key, mimic)
            self._retry()
            return mimic
        written = self._attempt(write, None)
        if written is None:
            self._keep(key, mimic)
            return mimic
        return written

    def _keep(self, key: tuple[bytes, str, str], mimic: StoredMimic) -> None:
        """Into the backlog, the oldest dropped past backlog_bytes."""
        self._forget(key)
        self._backlog[key] = mimic
        self._backlog_size += mimic.size
        while self._backlog_size > self.backlog_bytes:
            self._forget(next(iter(self._backlog)))

    def _forget(self, key: tuple[bytes, str, str]) -> None:
        gone = self._backlog.pop(key, None)
        if gone is not None:
            self._backlog_size -= gone.size

    def _put(self, key: tuple[bytes, str, str], mimic: StoredMimic) -> StoredMimic:
        self.store.put(*key, mimic)
        return mimic

    def forget_other_cas(self, ca_fingerprint: str) -> int:
        return self._attempt(lambda: self.store.forget_other_cas(ca_fingerprint), 0)

    def stored_bytes(self) -> int:
        return self.store.stored_bytes()

    def close(self) -> None:
        self._close_quietly()

    def _attempt[T](self, operation: Callable[[], T], otherwise: T) -> T:
        """OPERATION's result; OTHERWISE when the cache failed (once more after setting a corrupt
        file aside, on a fresh file)."""
        for attempt in range(2):
            try:
                return operation()
            except (sqlite3.Error, OSError) as e:
                if attempt == 0 and _is_corrupt(e) and self._set_aside(e):
                    continue
                self._degrade(e)
        return otherwise

    def _set_aside(self, error: Exception) -> bool:
        """Move the corrupt file aside (its SQLite side files are dropped); True when done."""
        self._close_quietly()
        path = self.store.path
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")  # two in one second keep both
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            path.rename(aside)
            aside.chmod(0o600)  # it holds mimic keys, whoever wrote it
            for suffix in _SIDE_FILES:
                path.with_name(path.name + suffix).unlink(missing_ok=True)
        except OSError as e:
            log.warning(
                "mimic cache %s is corrupt (%s) and cannot be moved aside: %s", path, _reason(error), e.strerror
            )
            return False
        log.warning(
            "mimic cache %s is corrupt (%s): moved aside to %s; starting a fresh one", path, _reason(error), aside.name
        )
        return True

    def _degrade(self, error: Exception) -> None:
        self._close_quietly()
        if self._retry_at is None:
            log.warning(
                "mimic cache %s unusable (%s): serving mimics from memory, trying again every %g s",
                self.store.path, _reason(error), self.retry_after,
            )  # fmt: skip
        self._retry_at = self.clock() + self.retry_after

    def _retry(self) -> None:
        """Write the backlog, if the time has come to try; recovered when every row is written."""
        if self._retry_at is None or self.clock() < self._retry_at:
            return
        self._retry_at = None  # a failure below degrades again, without a second warning
        written = 0
        while self._backlog:
            key, mimic = next(iter(self._backlog.items()))
            try:
                self.store.put(*key, mimic)
            except (sqlite3.Error, OSError) as e:
                self._close_quietly()
                self._retry_at = self.clock() + self.retry_after
                if _is_corrupt(e):
                    self._set_aside(e)  # the next try starts on a fresh file
                return
            self._forget(key)
            written += 1
        log.warning("mimic cache %s usable again: %d mimics minted meanwhile written", self.store.path, written)

    def _close_quietly(self) -> None:
        try:
            self.store.close()
        except sqlite3.Error:
            pass  # closing a broken file may fail; the store forgot it all the same, and reopens anew


def _is_corrupt(error: Exception) -> bool:
    return isinstance(error, sqlite3.Error) and (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT
