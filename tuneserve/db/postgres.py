"""PostgreSQL (`store.url: postgresql://...`): the database several gateways share.

Two psycopg pools: a sync one for the CLI, jobs and the gateway's worker threads, and
an async one for the gateway's hot path (key verification on every request), so no
query blocks the event loop. The async pool is opened lazily in the loop that first
uses it (psycopg's async pools belong to one loop), one per loop.

Connections are in autocommit: each statement is its own transaction and sees what
every other gateway committed before it, which is what makes a revoked key fail on
the next request everywhere. Nothing is cached.

The schema is never migrated implicitly: several gateways starting at once must not
race to change it, and a rolling upgrade must not change it under older replicas.
Opening checks the version and refuses both an older schema (run `tuneserve db
migrate`) and a newer one (upgrade tuneserve); `migrate()` runs under an advisory
lock, so concurrent migrations (two Jobs, an operator and a Job) apply each step once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import weakref
from typing import Any, Iterator, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from tuneserve.config import StoreConfig
from tuneserve.db.base import Row, Store, StoreError, Tx, newer_schema_error
from tuneserve.db.migrations import POSTGRESQL

# pg_advisory_xact_lock key of `tuneserve db migrate` (any constant unique to us).
MIGRATION_LOCK = 0x7475_6E65_7365_7276 >> 1  # "tuneserv", within bigint


@functools.lru_cache(maxsize=256)
def to_psycopg(sql: str) -> str:
    """`?` placeholders to psycopg's `%s` (and a literal `%` to `%%`). Our SQL never
    holds a `?` inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


def describe(url: str) -> str:
    """Where the DSN points, without its password: for messages and `db status`."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable DSN)"
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{parts.get('user') or ''}{'@' if parts.get('user') else ''}{host}{port}/{parts.get('dbname') or ''}"


def _connect_kwargs(config: StoreConfig) -> dict[str, Any]:
    # libpq counts whole seconds and treats under 2 as 2.
    return {"connect_timeout": max(2, math.ceil(config.connect_timeout_s))}


def connect(url: str, config: StoreConfig, **kwargs: Any) -> psycopg.Connection[dict[str, Any]]:
    """One connection outside the pools (schema checks, migrations), errors made clear."""
    try:
        return psycopg.connect(url, row_factory=dict_row, **_connect_kwargs(config), **kwargs)
    except (psycopg.Error, ValueError) as exc:
        raise StoreError(f"cannot connect to {describe(url)}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_version(conn: psycopg.Connection[dict[str, Any]]) -> int:
    present = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present").fetchone()
    if not present or not present["present"]:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row["version"]) if row else 0


def check_version(where: str, version: int) -> None:
    known = len(POSTGRESQL)
    if version > known:
        raise newer_schema_error(where, version, known)
    if version < known:
        raise StoreError(
            f"database {where} has schema version {version}, older than this tuneserve "
            f"needs ({known}): run `tuneserve db migrate`"
        )


def migrate(url: str, config: StoreConfig) -> tuple[int, int]:
    """Apply the missing migrations; return the versions before and after."""
    with connect(url, config) as conn:
        try:
            with conn.transaction():
                # Held until this transaction ends: a second migrate waits here, then
                # finds the schema current. Taken before CREATE TABLE IF NOT EXISTS,
                # which is not safe against itself run concurrently.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version "
                    "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
                )
                conn.execute(
                    "INSERT INTO schema_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
                )
                before = read_version(conn)
                if before > len(POSTGRESQL):
                    raise newer_schema_error(describe(url), before, len(POSTGRESQL))
                for statements in POSTGRESQL[before:]:
                    for statement in statements:
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = %s", (len(POSTGRESQL),))
        except psycopg.Error as exc:
            raise StoreError(f"migrating {describe(url)} failed: {_first_line(exc)}") from exc
    return before, len(POSTGRESQL)


class _PgTx(Tx):
    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self._conn = conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        return self._conn.execute(to_psycopg(sql), tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(to_psycopg(sql), tuple(params)).rowcount


class PostgresStore(Store):
    dialect = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, config: StoreConfig, check_schema: bool = True) -> None:
        self.where = describe(url)
        self._url = url
        self._config = config
        with connect(url, config) as conn:
            self._version = read_version(conn)
        if check_schema:
            check_version(self.where, self._version)
        self._kwargs = {"autocommit": True, "row_factory": dict_row, **_connect_kwargs(config)}
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=config.pool_min_size, max_size=config.pool_max_size,
            kwargs=self._kwargs, timeout=config.connect_timeout_s, name="tuneserve", open=True,
        )
        self._async_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnectionPool[Any]] = (
            weakref.WeakKeyDictionary()
        )

    def schema_version(self) -> int:
        return int(self.query("SELECT version FROM schema_version")[0]["version"])

    @contextlib.contextmanager
    def _unreachable_as_store_error(self) -> Iterator[None]:
        # Only the connection failing: SQL errors are bugs and keep their own type.
        try:
            yield
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise StoreError(f"database {self.where} unreachable: {_first_line(exc)}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        with self._unreachable_as_store_error(), self._pool.connection() as conn:
            return conn.execute(to_psycopg(sql), tuple(params)).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._unreachable_as_store_error(), self._pool.connection() as conn:
            return conn.execute(to_psycopg(sql), tuple(params)).rowcount

    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        pool = await self._async_pool()
        with self._unreachable_as_store_error():
            try:
                return await self._afetch(pool, sql, params)
            except psycopg.OperationalError:
                # After a database restart (a failover) every idle connection is dead,
                # and the pool finds out one request at a time. Drop them all and read
                # again once: a read is safe to repeat, and the outage then costs the
                # requests made while it lasted, not one more per pooled connection.
                await pool.check()
                return await self._afetch(pool, sql, params)

    @staticmethod
    async def _afetch(pool: AsyncConnectionPool[Any], sql: str, params: Sequence[Any]) -> Sequence[Row]:
        async with pool.connection() as conn:
            cursor = await conn.execute(to_psycopg(sql), tuple(params))
            return await cursor.fetchall()

    async def _async_pool(self) -> AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        pool = self._async_pools.get(loop)
        if pool is None:
            pool = self._async_pools[loop] = AsyncConnectionPool(
                self._url, min_size=self._config.pool_min_size, max_size=self._config.pool_max_size,
                kwargs=self._kwargs, timeout=self._config.connect_timeout_s, name="tuneserve-async",
                open=False,
            )
        await pool.open()  # idempotent, and safe when two first requests race here
        return pool

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._unreachable_as_store_error(), self._pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    async def aclose(self) -> None:
        pool = self._async_pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.close()

    def close(self) -> None:
        self._pool.close()
