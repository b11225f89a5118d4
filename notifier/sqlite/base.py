"""The SQLite case store's connection and worker thread (notifier).

:class:`StoreBase` holds what every group of the store's queries needs: the one
connection and the one-thread executor it belongs to, their lifecycle, and
:meth:`StoreBase._run`, which runs a job with the connection on that thread and maps
SQLite's errors to the store's (a broken rule :class:`~notifier.errors.InvalidRequestError`,
anything else :class:`~wire.errors.StoreUnavailableError`). The query groups
(:mod:`notifier.sqlite.owners`, ``cases``, ``messages``, ``visits``, ``timers``,
``rights``) subclass it, and :class:`notifier.sqlite.store.SqliteStore` joins them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from notifier.errors import InvalidRequestError
from notifier.registry import SqliteRegistry
from notifier.sqlite.schema import connect
from wire.errors import ConfigError, StoreUnavailableError

_T = TypeVar("_T")


class StoreBase:
    """The connection, its worker thread and their lifecycle, shared by the query groups.

    Args:
        path: the database file (created if missing, its folder must exist), or
            ``":memory:"`` for a private in-memory store.
        busy_timeout_s: how long a statement waits for another process's lock before
            :class:`~wire.errors.StoreUnavailableError`.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        if busy_timeout_s < 0:
            raise ConfigError(f"busy_timeout_s must not be negative, not {busy_timeout_s}")
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Open the file, set it up (WAL, foreign keys, busy timeout) and migrate it.

        Returns:
            The store itself.

        Raises:
            ConfigError: the file cannot be opened, is not a case store, comes from a
                newer fixloop, or a migration failed (the file is left as it was).
        """
        if self._conn is not None:
            return self
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-store")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(
                executor, connect, self._path, self._busy_timeout_s
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        return self

    async def close(self) -> None:
        """Close the connection and stop the worker thread (closing twice is harmless)."""
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if executor is None:
            return
        try:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``job`` with the connection on the worker thread."""
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise StoreUnavailableError("the case store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job, conn)
        except sqlite3.IntegrityError as exc:
            raise InvalidRequestError(f"the record breaks a rule of the case store: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the case store failed: {exc}") from exc

    def registry(self) -> SqliteRegistry:
        """The device registry kept in this file (:mod:`notifier.registry`)."""
        return SqliteRegistry(self._run)
