"""Statement helpers of the SQLite case store (notifier).

What every query group of :mod:`notifier.sqlite` builds its statements with: an upsert
or insert of a row (a column -> value mapping from :mod:`notifier.rows`, shared with the
PostgreSQL store), a transaction (``BEGIN IMMEDIATE`` by default), an ``IN (?, ...)``
clause, and reading which rule an :class:`sqlite3.IntegrityError` broke.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from notifier.errors import NotFoundError


def in_list(column: str, values: Sequence[str]) -> str:
    """``column IN (?, ...)`` with one placeholder per value."""
    return f"{column} IN ({', '.join('?' for _ in values)})"


def upsert(conn: sqlite3.Connection, table: str, key: str, row: dict[str, Any]) -> None:
    """Insert ``row`` into ``table``, or update the row with the same ``key``."""
    columns = ", ".join(row)
    marks = ", ".join(f":{column}" for column in row)
    updates = ", ".join(f"{column} = excluded.{column}" for column in row if column != key)
    conn.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}",
        row,
    )


def insert(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """Insert ``row`` into ``table``."""
    columns = ", ".join(row)
    marks = ", ".join(f":{column}" for column in row)
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """One transaction: ``BEGIN IMMEDIATE`` takes the write lock before the first read."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def constraint(exc: sqlite3.IntegrityError) -> str:
    """The name of the rule an integrity error broke (``SQLITE_CONSTRAINT_...``)."""
    return getattr(exc, "sqlite_errorname", "")


def raise_missing_case(exc: sqlite3.IntegrityError, case_id: str) -> NoReturn:
    """Raise :class:`NotFoundError` for a record whose case is missing, else ``exc``."""
    if constraint(exc) == "SQLITE_CONSTRAINT_FOREIGNKEY":
        raise NotFoundError(f"no case {case_id!r}") from exc
    raise exc
