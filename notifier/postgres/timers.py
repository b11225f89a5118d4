"""Leases and timers in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

What lets notifiers work side by side on one store: a lease on a case's key, held by
one notifier at a time, and the cases' timers, taken by whichever notifier comes first
(``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import row_count
from notifier.rows import timer_from, ts
from notifier.store import CaseTimer

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["LeaseQueries"]


class LeaseQueries(PooledStore):
    """The lease and timer queries of :class:`~notifier.postgres.PostgresStore`."""

    # -- notifiers side by side: leases and timers ---------------------------------------------

    async def take_lease(self, key: str, holder: str, *, now: datetime, until: datetime) -> bool:
        """Take (or extend) the lease on ``key`` for ``holder``; ``False`` while another's runs.

        One statement: two notifiers asking at once are ordered by the row's lock, and
        the second sees the first's lease (PostgreSQL re-checks the ``WHERE`` after the
        wait).
        """

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "INSERT INTO case_leases (lease_key, holder, until_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (lease_key) DO UPDATE "
                "SET holder = excluded.holder, until_at = excluded.until_at "
                "WHERE case_leases.holder = $2 OR case_leases.until_at < $4",
                key,
                holder,
                ts(until),
                ts(now),
            )
            return row_count(status) > 0

        return await self._run(job)

    async def drop_lease(self, key: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``key``; ``False`` if it was no longer theirs."""

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM case_leases WHERE lease_key = $1 AND holder = $2", key, holder
            )
            return row_count(status) > 0

        return await self._run(job)

    async def set_timer(self, timer: CaseTimer, *, replace: bool = True) -> None:
        """Set a case's timer (``replace=False``: only if it has none)."""
        conflict = "DO UPDATE SET what = excluded.what, due_at = excluded.due_at"

        async def job(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO case_timers (case_id, what, due_at) VALUES ($1, $2, $3) "
                f"ON CONFLICT (case_id) {conflict if replace else 'DO NOTHING'}",
                timer.case_id,
                timer.what,
                ts(timer.due),
            )

        await self._run(job)

    async def get_timer(self, case_id: str) -> CaseTimer | None:
        """Return a case's timer."""

        async def job(conn: Conn) -> CaseTimer | None:
            row = await conn.fetchrow("SELECT * FROM case_timers WHERE case_id = $1", case_id)
            return None if row is None else timer_from(row)

        return await self._run(job)

    async def take_timers(
        self, *, now: datetime, hold_until: datetime, limit: int
    ) -> list[CaseTimer]:
        """Take up to ``limit`` due timers, pushing each forward to ``hold_until``.

        ``FOR UPDATE SKIP LOCKED``: notifiers taking timers at the same moment each get
        other rows, none waits for another.
        """

        async def job(conn: Conn) -> list[CaseTimer]:
            rows = await conn.fetch(
                "UPDATE case_timers SET due_at = $1 WHERE case_id IN ("
                "SELECT case_id FROM case_timers WHERE due_at <= $2 "
                "ORDER BY due_at, case_id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "RETURNING case_id, what, due_at",
                ts(hold_until),
                ts(now),
                max(limit, 0),
            )
            return sorted((timer_from(row) for row in rows), key=lambda timer: timer.case_id)

        return await self._run(job)

    async def finish_timer(self, timer: CaseTimer) -> bool:
        """Remove a taken timer unless it was set again since."""

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM case_timers WHERE case_id = $1 AND due_at = $2",
                timer.case_id,
                ts(timer.due),
            )
            return row_count(status) > 0

        return await self._run(job)

    async def postpone_timer(self, timer: CaseTimer, due: datetime) -> bool:
        """Move a taken timer to ``due`` unless it was set again since."""

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE case_timers SET due_at = $3 WHERE case_id = $1 AND due_at = $2",
                timer.case_id,
                ts(timer.due),
                ts(due),
            )
            return row_count(status) > 0

        return await self._run(job)
