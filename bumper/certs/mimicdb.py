"""The on-disk mimic cache, as Squid's ssl_db: a restart reuses mimics instead of minting again.

SQLite in WAL mode (standard library) lets several bumper processes share one DIR. Rows are keyed
by the upstream leaf's SHA-256, the signing mode and the CA's fingerprint, so a changed upstream
certificate or a new CA never gets an old mimic. Every hit is re-checked by the caller before use.
The file holds mimic private keys: it is created 0600 inside the 0700 CA directory.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DB_FILE = "mimics.sqlite"
DEFAULT_MAX_ENTRIES = 100_000
_PRUNE_EVERY = 256  # inserts between size checks


@dataclass(frozen=True)
class StoredMimic:
    cert_der: bytes
    key_der: bytes


class MimicStoreBackend(Protocol):
    """What a shared store (for a cluster) must offer to replace the SQLite file."""

    def get(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str) -> StoredMimic | None: ...

    def put(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> None: ...

    def forget_other_cas(self, ca_fingerprint: str) -> int: ...

    def close(self) -> None: ...


class SqliteMimicStore:
    def __init__(self, path: Path, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.path = path
        self.max_entries = max_entries
        self._inserts = 0
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
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # a row lost on power loss is only a re-mint
        db.execute(
            "CREATE TABLE IF NOT EXISTS mimics ("
            " upstream BLOB NOT NULL, mode TEXT NOT NULL, ca TEXT NOT NULL,"
            " cert BLOB NOT NULL, key BLOB NOT NULL, used REAL NOT NULL,"
            " PRIMARY KEY (upstream, mode, ca))"
        )
        db.execute("CREATE INDEX IF NOT EXISTS mimics_used ON mimics (used)")
        return db

    def get(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str) -> StoredMimic | None:
        row = self._db.execute(
            "SELECT cert, key FROM mimics WHERE upstream = ? AND mode = ? AND ca = ?",
            (upstream_sha256, mode, ca_fingerprint),
        ).fetchone()
        return StoredMimic(row[0], row[1]) if row else None

    def put(self, upstream_sha256: bytes, mode: str, ca_fingerprint: str, mimic: StoredMimic) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO mimics VALUES (?, ?, ?, ?, ?, ?)",
            (upstream_sha256, mode, ca_fingerprint, mimic.cert_der, mimic.key_der, time.time()),
        )
        self._inserts += 1
        if self._inserts % _PRUNE_EVERY == 0:
            self.prune()

    def forget_other_cas(self, ca_fingerprint: str) -> int:
        """Drop mimics signed by any CA but this one; returns how many."""
        return self._db.execute("DELETE FROM mimics WHERE ca != ?", (ca_fingerprint,)).rowcount

    def prune(self) -> None:
        """Keep the newest max_entries rows."""
        self._db.execute(
            "DELETE FROM mimics WHERE rowid IN (SELECT rowid FROM mimics ORDER BY used DESC LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM mimics").fetchone()[0])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
