"""The SQLite case store, joined from its query groups (notifier).

Each group of queries is a class of its own module over :class:`~notifier.sqlite.base.
StoreBase` (the connection and its worker thread); :class:`SqliteStore` is all of them,
the :class:`~notifier.store.CaseStore` the rest of fixloop opens.
"""

from __future__ import annotations

from notifier.sqlite.cases import CaseQueries
from notifier.sqlite.messages import MessageQueries
from notifier.sqlite.owners import OwnerQueries
from notifier.sqlite.rights import RightsQueries
from notifier.sqlite.timers import LeaseQueries
from notifier.sqlite.visits import VisitQueries

__all__ = ["SqliteStore"]


class SqliteStore(
    OwnerQueries, CaseQueries, MessageQueries, VisitQueries, LeaseQueries, RightsQueries
):
    """The case store in one SQLite file (WAL mode), or in memory for tests.

    Use as ``async with SqliteStore(path) as store:``, or ``store = await
    SqliteStore(path).open()`` and later ``await store.close()``. Implements
    :class:`~notifier.store.CaseStore`.

    Args:
        path: the database file (created if missing, its folder must exist), or
            ``":memory:"`` for a private in-memory store.
        busy_timeout_s: how long a statement waits for another process's lock before
            :class:`~wire.errors.StoreUnavailableError`.
    """
