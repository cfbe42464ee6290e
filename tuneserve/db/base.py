"""The interface TenantStore and JobStore are written against, whatever the database.

SQL is written once, in the dialect both backends share: `?` placeholders (the
PostgreSQL store turns them into psycopg's `%s`), rows read by column name
(`row["name"]`, `dict(row)`), `ON CONFLICT ... DO NOTHING` rather than `INSERT OR
IGNORE`. What cannot be shared is a property of the store (`skip_locked`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterable, Literal, Protocol, Sequence

from tuneserve.errors import TuneserveError

Dialect = Literal["sqlite", "postgresql"]


class StoreError(TuneserveError):
    """The database cannot be reached or opened, or its schema is not this version's."""


class Row(Protocol):
    """A result row: sqlite3.Row on SQLite, a dict on PostgreSQL."""

    def __getitem__(self, key: str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class Tx(ABC):
    """The statements of one transaction (`Store.transaction()`)."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]: ...

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement; return the rows it changed."""


class Store(ABC):
    dialect: Dialect
    # Appended to a SELECT that claims rows: locked rows are skipped, not waited for,
    # so concurrent claimers each get a different row. Empty on SQLite, where
    # transaction() holds the one write lock and claimers are serialised anyway.
    skip_locked: str = ""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        """One read, in its own transaction: it sees everything committed before it."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement, its own transaction; return the rows it changed."""

    @abstractmethod
    async def aquery(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        """query() for the gateway's event loop: it never blocks the loop on the network."""

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        """Several statements, all or nothing; rows they read are locked for writing."""

    @abstractmethod
    def schema_version(self) -> int: ...

    async def aclose(self) -> None:  # noqa: B027 - a no-op where aquery holds nothing
        """Release what aquery() holds for the running event loop (the gateway's shutdown)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def newer_schema_error(where: str, version: int, known: int) -> StoreError:
    return StoreError(
        f"database {where} has schema version {version}, newer than this tuneserve "
        f"knows ({known}); upgrade tuneserve"
    )
