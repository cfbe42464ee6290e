"""The embedded SQLite database (`<data_dir>/tuneserve.db`): connection and migrations.

One `Store` holds one connection, shared by threads under a lock
(`check_same_thread=False`). Every statement here is a single indexed lookup or
write that takes microseconds, and the gateway calls it from its one event-loop
thread, so a lock costs nothing measurable; one connection per thread would leak
connections from thread pools and could not be closed from the thread that owns
the Store. Other processes (the CLI while the gateway runs) have their own
connection: WAL mode lets them write while this one reads, and the busy timeout
makes concurrent writers wait instead of failing.

The connection is in autocommit mode (`isolation_level=None`): each statement is its
own transaction, so every read sees what other processes committed before it.
Multi-statement changes use `transaction()`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from tuneserve.errors import TuneserveError

DB_FILENAME = "tuneserve.db"
BUSY_TIMEOUT_S = 10.0

# Schema changes, applied in order; `schema_version` records how many have run.
# Append only: never edit or reorder an entry once it has shipped. Each entry is a
# tuple of single statements (not a script: `executescript` would COMMIT the
# migration's transaction halfway).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: tenants. Only the key's hash is stored; key_id is the non-secret part of the
    # key that finds the row (UNIQUE gives it an index).
    (
        """
        CREATE TABLE tenants (
            name TEXT PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            key_hash BLOB NOT NULL,
            created_at TEXT NOT NULL,
            key_rotated_at TEXT NOT NULL
        )
        """,
    ),
    # 2: merge/export jobs (merge/jobs.py). pid + pid_start identify the process that
    # runs a job, so a later command can tell a live job from one whose process died.
    (
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            spec TEXT NOT NULL,
            progress REAL NOT NULL DEFAULT 0,
            stage TEXT NOT NULL DEFAULT '',
            log TEXT NOT NULL DEFAULT '',
            outputs TEXT NOT NULL DEFAULT '[]',
            report TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER,
            pid_start TEXT,
            staging TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            started_at TEXT,
            heartbeat_at TEXT,
            finished_at TEXT
        )
        """,
        "CREATE INDEX jobs_status ON jobs (status, created_at)",
    ),
)


class StoreError(TuneserveError):
    """The database cannot be opened or has a schema this version does not know."""


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_FILENAME


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only: the file holds key hashes and tenant names. SQLite gives
            # the -wal and -shm files the same mode as the database.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            self._conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:  # e.g. the file is not a database
            self._conn.close()
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        with self.transaction() as conn:
            # BEGIN IMMEDIATE (in transaction()) makes a second process that opens a
            # fresh database at the same moment wait here, then see the new version.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            conn.execute("INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 0)")
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"tuneserve knows ({len(MIGRATIONS)}); upgrade tuneserve"
                )
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def schema_version(self) -> int:
        return self.query("SELECT version FROM schema_version")[0][0]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement (its own transaction); return the rows it changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements, all or nothing. IMMEDIATE takes the write lock up front,
        so a read-then-write block cannot fail halfway on another writer."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also when COMMIT itself failed
                    self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
