"""The embedded SQLite database (default `<data_dir>/tuneserve.db`): one machine.

One `SQLiteStore` holds one connection, shared by threads under a lock
(`check_same_thread=False`). Every statement here is a single indexed lookup or
write that takes microseconds, and the gateway calls it from its one event-loop
thread, so a lock costs nothing measurable (and `aquery` may run it directly); one
connection per thread would leak connections from thread pools and could not be
closed from the thread that owns the store. Other processes (the CLI while the
gateway runs) have their own connection: WAL mode lets them write while this one
reads, and the busy timeout makes concurrent writers wait instead of failing.

The connection is in autocommit mode (`isolation_level=None`): each statement is its
own transaction, so every read sees what other processes committed before it.
Multi-statement changes use `transaction()`. The schema is migrated on open, as the
embedded default always did: there is no one else to run `tuneserve db migrate`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from tuneserve.db.base import Row, Store, StoreError, Tx, newer_schema_error
from tuneserve.db.migrations import SQLITE

DB_FILENAME = "tuneserve.db"
BUSY_TIMEOUT_S = 10.0


def db_path(data_dir: Path) -> Path:
    return data_dir / DB_FILENAME


class _SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount


class SQLiteStore(Store):
    dialect = "sqlite"

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
        with self.transaction() as tx:
            # BEGIN IMMEDIATE (in transaction()) makes a second process that opens a
            # fresh database at the same moment wait here, then see the new version.
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            tx.execute("INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 0)")
            version = tx.query("SELECT version FROM schema_version")[0]["version"]
            if version > len(SQLITE):
                raise newer_schema_error(str(self.path), version, len(SQLITE))
            for statements in SQLITE[version:]:
                for statement in statements:
                    tx.execute(statement)
            tx.execute("UPDATE schema_version SET version = ?", (len(SQLITE),))

    def schema_version(self) -> int:
        return int(self.query("SELECT version FROM schema_version")[0]["version"])

    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        # A local file read of microseconds: a thread hop would cost more than it saves.
        return self.query(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """IMMEDIATE takes the write lock up front, so a read-then-write block cannot
        fail halfway on another writer (and claims are serialised)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SQLiteTx(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also when COMMIT itself failed
                    self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
