"""Leases and case timers: notifiers side by side on one file (notifier; SQLite).

One process holds the file's write lock at a time (``BEGIN IMMEDIATE``), so a lease or a
timer is taken by a plain read-then-write; the same calls as PostgreSQL's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import datetime

from notifier.rows import timer_from, ts
from notifier.sqlite.base import StoreBase
from notifier.sqlite.sql import transaction
from notifier.store import CaseTimer


class LeaseQueries(StoreBase):
    """Leases on keys and the cases' timers."""

    async def take_lease(self, key: str, holder: str, *, now: datetime, until: datetime) -> bool:
        """Take (or extend) the lease on ``key`` for ``holder``; ``False`` while another's runs."""
        params = {"key": key, "holder": holder, "now": ts(now), "until": ts(until)}

        def job(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO case_leases (lease_key, holder, until_at) "
                    "VALUES (:key, :holder, :until) ON CONFLICT (lease_key) DO UPDATE "
                    "SET holder = excluded.holder, until_at = excluded.until_at "
                    "WHERE case_leases.holder = :holder OR case_leases.until_at < :now",
                    params,
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def drop_lease(self, key: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``key``; ``False`` if it was no longer theirs."""

        def job(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM case_leases WHERE lease_key = ? AND holder = ?", (key, holder)
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def set_timer(self, timer: CaseTimer, *, replace: bool = True) -> None:
        """Set a case's timer (``replace=False``: only if it has none)."""
        row = {"case_id": timer.case_id, "what": timer.what, "due_at": ts(timer.due)}
        conflict = "DO UPDATE SET what = excluded.what, due_at = excluded.due_at"

        def job(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO case_timers (case_id, what, due_at) "
                    "VALUES (:case_id, :what, :due_at) "
                    f"ON CONFLICT (case_id) {conflict if replace else 'DO NOTHING'}",
                    row,
                )

        await self._run(job)

    async def get_timer(self, case_id: str) -> CaseTimer | None:
        """Return a case's timer."""

        def job(conn: sqlite3.Connection) -> CaseTimer | None:
            row = conn.execute("SELECT * FROM case_timers WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else timer_from(row)

        return await self._run(job)

    async def take_timers(
        self, *, now: datetime, hold_until: datetime, limit: int
    ) -> list[CaseTimer]:
        """Take up to ``limit`` due timers, pushing each forward to ``hold_until``."""
        hold = ts(hold_until)

        def job(conn: sqlite3.Connection) -> list[CaseTimer]:
            with transaction(conn):
                rows = conn.execute(
                    "SELECT * FROM case_timers WHERE due_at <= ? ORDER BY due_at, case_id LIMIT ?",
                    (ts(now), max(limit, 0)),
                ).fetchall()
                conn.executemany(
                    "UPDATE case_timers SET due_at = ? WHERE case_id = ?",
                    [(hold, row["case_id"]) for row in rows],
                )
            return [replace(timer_from(row), due=hold_until) for row in rows]

        return await self._run(job)

    async def finish_timer(self, timer: CaseTimer) -> bool:
        """Remove a taken timer unless it was set again since."""

        def job(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM case_timers WHERE case_id = ? AND due_at = ?",
                    (timer.case_id, ts(timer.due)),
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def postpone_timer(self, timer: CaseTimer, due: datetime) -> bool:
        """Move a taken timer to ``due`` unless it was set again since."""

        def job(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "UPDATE case_timers SET due_at = ? WHERE case_id = ? AND due_at = ?",
                    (ts(due), timer.case_id, ts(timer.due)),
                )
                return cursor.rowcount > 0

        return await self._run(job)
