"""SQL building blocks of the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

What every query module of the store and its registry share: the connection and job
types, statements built from a row (``INSERT``, upsert), numbered parameters, the
advisory lock keys, and reading a statement's status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias, TypeVar

import asyncpg

from notifier.errors import NotFoundError

__all__ = [
    "BOOK_LOCK",
    "MIGRATE_LOCK",
    "REGISTRY_LOCK",
    "Params",
    "insert",
    "raise_missing_case",
    "row_count",
    "upsert",
    "where_sql",
]

_T = TypeVar("_T")

# Advisory lock keys (64 bit): one for migrating, one for registering devices; bookings
# lock hashtextextended('fixloop.book:' || technician_id, 0).
MIGRATE_LOCK: Final = 0x6669_786C_6F6F_7001
REGISTRY_LOCK: Final = 0x6669_786C_6F6F_7002
BOOK_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtextextended('fixloop.book:' || $1, 0))"

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: A connection of the store's pool.
    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    #: What runs with one connection (:meth:`notifier.postgres.connect.PooledStore._run`).
    Job: TypeAlias = Callable[[Conn], Awaitable[_T]]


def row_count(status: str) -> int:
    """Rows a statement touched, from its status (``UPDATE 3``, ``INSERT 0 1``)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _upsert_sql(table: str, key: str, columns: Sequence[str]) -> str:
    names = ", ".join(columns)
    marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns if column != key)
    return (
        f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


async def upsert(conn: Conn, table: str, key: str, row: dict[str, Any]) -> None:
    """Insert ``row`` into ``table``, or replace the row with the same ``key``."""
    await conn.execute(_upsert_sql(table, key, list(row)), *row.values())


async def insert(conn: Conn, table: str, row: dict[str, Any]) -> None:
    """Insert ``row`` into ``table``."""
    marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})", *row.values())


def where_sql(clauses: list[str]) -> str:
    """A ``WHERE`` clause joining ``clauses`` with ``AND`` (none: no clause)."""
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


class Params:
    """Numbered parameters (``$1``, ``$2`` ...) collected while a query is built."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        """Collect ``value``; return its placeholder."""
        self.values.append(value)
        return f"${len(self.values)}"


def raise_missing_case(exc: asyncpg.ForeignKeyViolationError, case_id: str) -> NoReturn:
    """Report a row whose case does not exist (its foreign key failed)."""
    raise NotFoundError(f"no case {case_id!r}") from exc
