"""`store.url` to a Store: the one way every command and the gateway open the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneserve.config import Settings, StoreConfig
from tuneserve.db.base import Dialect, Store, StoreError
from tuneserve.db.migrations import latest
from tuneserve.db.sqlite import SQLiteStore, db_path

_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def store_url(config: StoreConfig) -> str | None:
    """The configured DSN (from store.url_file when set); None for the default SQLite."""
    if config.url_file is None:
        return config.url
    if config.url is not None:
        raise StoreError("set store.url or store.url_file, not both")
    try:
        url = config.url_file.read_text().strip()
    except OSError as exc:
        raise StoreError(f"cannot read store.url_file {config.url_file}: {exc.strerror}") from exc
    if not url.startswith(_SCHEMES):
        # The file's content is a secret: say what is wrong, never echo it.
        raise StoreError(
            f"store.url_file {config.url_file} does not hold a sqlite:/// or postgresql:// URL"
        )
    return url


def sqlite_path(settings: Settings, url: str | None) -> Path | None:
    """The SQLite file `url` selects, or None when it is a PostgreSQL DSN."""
    if url is None:
        return db_path(settings.data_dir)
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))  # sqlite:////abs/path, sqlite:///relative
    return None


def is_shared(settings: Settings) -> bool:
    """Whether the store is a server several machines share (PostgreSQL): then it also
    holds the adapter registry's index and the audit trail, which SQLite leaves to files."""
    return sqlite_path(settings, store_url(settings.store)) is None


def open_store(settings: Settings, check_schema: bool = True) -> Store:
    """The configured store. SQLite migrates on open (embedded default); PostgreSQL
    refuses a schema other than this version's unless `check_schema` is off."""
    url = store_url(settings.store)
    path = sqlite_path(settings, url)
    if path is not None:
        return SQLiteStore(path)
    assert url is not None
    # Imported here: psycopg is not loaded by commands on the embedded default.
    from tuneserve.db.postgres import PostgresStore

    return PostgresStore(url, settings.store, check_schema=check_schema)


def migrate(settings: Settings) -> dict[str, Any]:
    url = store_url(settings.store)
    path = sqlite_path(settings, url)
    if path is not None:
        before = _sqlite_version(path)
        with SQLiteStore(path) as store:  # migrates on open
            return {"backend": "sqlite", "database": str(path), "from": before, "to": store.schema_version()}
    assert url is not None
    from tuneserve.db.postgres import describe
    from tuneserve.db.postgres import migrate as migrate_postgres

    before, after = migrate_postgres(url, settings.store)
    return {"backend": "postgresql", "database": describe(url), "from": before, "to": after}


def status(settings: Settings) -> dict[str, Any]:
    url = store_url(settings.store)
    path = sqlite_path(settings, url)
    dialect: Dialect
    if path is not None:
        version, where, dialect = _sqlite_version(path), str(path), "sqlite"
    else:
        assert url is not None
        from tuneserve.db.postgres import connect, describe, read_version

        with connect(url, settings.store) as conn:
            version, where, dialect = read_version(conn), describe(url), "postgresql"
    known = latest(dialect)
    state = "current" if version == known else "behind" if version < known else "ahead"
    return {"backend": dialect, "database": where, "version": version, "latest": known, "state": state}


def _sqlite_version(path: Path) -> int:
    """The version without migrating (0 for a file not created yet)."""
    import contextlib
    import sqlite3

    if not path.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0
