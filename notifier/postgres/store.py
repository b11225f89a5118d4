"""The PostgreSQL case store, composed (notifier; :mod:`notifier.postgres`).

:class:`PostgresStore` is the pool (:class:`~notifier.postgres.connect.PooledStore`)
with the queries of each concern: owners, cases, messages, visits, leases and timers,
and the owner's rights; :meth:`PostgresStore.registry` hands out the device registry in
the same database.
"""

from __future__ import annotations

from notifier.postgres.cases import CaseQueries
from notifier.postgres.messages import MessageQueries
from notifier.postgres.owners import OwnerQueries
from notifier.postgres.registry import PostgresRegistry
from notifier.postgres.rights import RightsQueries
from notifier.postgres.timers import LeaseQueries
from notifier.postgres.visits import VisitQueries

__all__ = ["PostgresStore"]


class PostgresStore(
    OwnerQueries, CaseQueries, MessageQueries, VisitQueries, LeaseQueries, RightsQueries
):
    """The case store in a PostgreSQL database. Implements :class:`~notifier.store.CaseStore`.

    Use as ``async with PostgresStore(url) as store:``, or ``store = await
    PostgresStore(url).open()`` and later ``await store.close()``.

    Args:
        url: ``postgresql://user:password@host:port/database`` (libpq's URL and its
            query options, ``sslmode`` for one).
        pool_size: at most this many connections at once.
        lock_timeout_s: how long a statement waits for a row or lock another
            transaction holds before :class:`~wire.errors.StoreUnavailableError`.
        connect_timeout_s: how long opening a connection may take.
    """

    def registry(self) -> PostgresRegistry:
        """The device registry kept in this database (:mod:`notifier.registry`)."""
        return PostgresRegistry(self._run)
