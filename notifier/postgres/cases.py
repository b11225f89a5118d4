"""Cases in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

Cases and their audit trail (a move is a compare-and-set, with its audit lines and
messages in one transaction), their ratings, and the tasks they give a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Final

import asyncpg

from notifier.errors import ConflictError, InvalidRequestError
from notifier.model import OPEN_STATES, AuditEntry, Case, Notification, Rating, Task
from notifier.postgres.connect import PooledStore
from notifier.postgres.messages import keep_message
from notifier.postgres.sql import Params, insert, raise_missing_case, row_count, upsert, where_sql
from notifier.rows import (
    audit_from,
    audit_row,
    case_from,
    case_row,
    rating_from,
    rating_row,
    task_from,
    task_row,
    ts_opt,
)
from notifier.store import NewMessage

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["CaseQueries"]

_OPEN: Final = sorted(OPEN_STATES)


class CaseQueries(PooledStore):
    """The case queries of :class:`~notifier.postgres.PostgresStore`."""

    # -- cases and the audit trail -------------------------------------------------------------

    async def add_case(self, case: Case) -> None:
        """Insert a new case.

        Raises:
            ConflictError: a case with that id exists, or an open case for the same
                device and fault exists (one open case per device and fault).
        """
        row = case_row(case)

        async def job(conn: Conn) -> None:
            try:
                await insert(conn, "cases", row)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "cases_pkey":
                    raise ConflictError(f"case {case.case_id!r} exists") from exc
                raise ConflictError(
                    f"device {case.device_id!r} has an open case for {case.fault!r}"
                ) from exc

        await self._run(job)

    async def get_case(self, case_id: str) -> Case | None:
        """Return a case."""

        async def job(conn: Conn) -> Case | None:
            row = await conn.fetchrow("SELECT * FROM cases WHERE case_id = $1", case_id)
            return None if row is None else case_from(row)

        return await self._run(job)

    async def open_case(self, device_id: str, fault: str) -> Case | None:
        """Return the open case of a device and fault, if any."""

        async def job(conn: Conn) -> Case | None:
            row = await conn.fetchrow(
                "SELECT * FROM cases WHERE device_id = $1 AND fault = $2 "
                "AND state = ANY($3::text[])",
                device_id,
                fault,
                _OPEN,
            )
            return None if row is None else case_from(row)

        return await self._run(job)

    async def update_case(
        self,
        case: Case,
        *,
        expected_state: str,
        audit: AuditEntry | Sequence[AuditEntry] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> list[Notification | None]:
        """Replace a case if its stored state is still ``expected_state``.

        ``audit`` is appended and ``messages`` kept (as by :meth:`add_message`) in the
        same transaction, so the change, its lines in the trail and what it tells the
        owner are kept (or lost) together. The owners' rows are locked before the case's,
        in the order :meth:`erase_owner` takes them.

        Returns:
            Each message as kept (``None``: its key was kept before, or no owner).

        Raises:
            ConflictError: the stored case moved on (or does not exist), or the new
                state would give the device a second open case for the fault.
        """
        row = case_row(case)
        columns = [column for column in row if column != "case_id"]
        updates = ", ".join(f"{column} = ${i}" for i, column in enumerate(columns, start=3))
        values = [row[column] for column in columns]

        entries = [] if audit is None else [audit] if isinstance(audit, AuditEntry) else audit
        entry_rows = [audit_row(entry) for entry in entries]
        owners = sorted({message.notification.owner_id for message in messages})

        async def job(conn: Conn) -> list[Notification | None]:
            async with conn.transaction():
                for owner_id in owners:
                    await conn.execute(
                        "SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id
                    )
                try:
                    status = await conn.execute(
                        f"UPDATE cases SET {updates} WHERE case_id = $1 AND state = $2",
                        case.case_id,
                        expected_state,
                        *values,
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise ConflictError(
                        f"device {case.device_id!r} has another open case for {case.fault!r}"
                    ) from exc
                if row_count(status) == 0:
                    raise ConflictError(
                        f"case {case.case_id!r} is not in state {expected_state!r} "
                        "(or does not exist)"
                    )
                for entry_row in entry_rows:
                    await insert(conn, "audit", entry_row)
                return [await keep_message(conn, message) for message in messages]

        return await self._run(job)

    async def cases(
        self,
        *,
        owner_id: str | None = None,
        device_id: str | None = None,
        states: Sequence[str] | None = None,
        limit: int = 1000,
    ) -> list[Case]:
        """Return cases, newest first, filtered by owner, device and states."""
        p = Params()
        clauses: list[str] = []
        if owner_id is not None:
            clauses.append(f"owner_id = {p(owner_id)}")
        if device_id is not None:
            clauses.append(f"device_id = {p(device_id)}")
        if states is not None:
            if not states:
                return []
            clauses.append(f"state = ANY({p(list(states))}::text[])")
        sql = (
            f"SELECT * FROM cases {where_sql(clauses)} "
            f"ORDER BY opened_at DESC, case_id DESC LIMIT {p(max(limit, 0))}"
        )

        async def job(conn: Conn) -> list[Case]:
            return [case_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    async def add_audit(self, entry: AuditEntry) -> None:
        """Append to the audit trail (never changed or removed, except by erasure)."""
        row = audit_row(entry)
        await self._run(lambda conn: insert(conn, "audit", row))

    async def audit(self, case_id: str) -> list[AuditEntry]:
        """Return a case's audit trail, oldest first (entries of one instant as written)."""

        async def job(conn: Conn) -> list[AuditEntry]:
            rows = await conn.fetch(
                "SELECT * FROM audit WHERE case_id = $1 ORDER BY at, seq", case_id
            )
            return [audit_from(row) for row in rows]

        return await self._run(job)

    # -- ratings, notifications, tasks ---------------------------------------------------------

    async def add_rating(self, rating: Rating) -> None:
        """Store the rating of a case.

        Raises:
            ConflictError: the case is rated already (one rating per case).
            NotFoundError: the case does not exist.
            InvalidRequestError: the stars are not 1 to 5.
        """
        row = rating_row(rating)

        async def job(conn: Conn) -> None:
            try:
                await insert(conn, "ratings", row)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"case {rating.case_id!r} is rated already") from exc
            except asyncpg.CheckViolationError as exc:
                raise InvalidRequestError(f"a rating is 1 to 5 stars, not {rating.stars}") from exc
            except asyncpg.ForeignKeyViolationError as exc:
                raise_missing_case(exc, rating.case_id)

        await self._run(job)

    async def get_rating(self, case_id: str) -> Rating | None:
        """Return a case's rating."""

        async def job(conn: Conn) -> Rating | None:
            row = await conn.fetchrow("SELECT * FROM ratings WHERE case_id = $1", case_id)
            return None if row is None else rating_from(row)

        return await self._run(job)

    async def ratings(self, since: datetime | None = None) -> list[Rating]:
        """Return ratings, oldest first (``since`` inclusive)."""
        bound = ts_opt(since)

        async def job(conn: Conn) -> list[Rating]:
            if bound is None:
                rows = await conn.fetch("SELECT * FROM ratings ORDER BY at, case_id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM ratings WHERE at >= $1 ORDER BY at, case_id", bound
                )
            return [rating_from(row) for row in rows]

        return await self._run(job)

    async def add_task(self, task: Task) -> None:
        """Insert or replace a task for a person.

        Raises:
            NotFoundError: its case does not exist.
        """
        row = task_row(task)

        async def job(conn: Conn) -> None:
            try:
                await upsert(conn, "tasks", "task_id", row)
            except asyncpg.ForeignKeyViolationError as exc:
                raise_missing_case(exc, task.case_id)

        await self._run(job)

    async def tasks(self, *, state: str | None = None, case_id: str | None = None) -> list[Task]:
        """Return tasks, oldest first."""
        p = Params()
        clauses: list[str] = []
        if state is not None:
            clauses.append(f"state = {p(state)}")
        if case_id is not None:
            clauses.append(f"case_id = {p(case_id)}")
        sql = f"SELECT * FROM tasks {where_sql(clauses)} ORDER BY created_at, task_id"

        async def job(conn: Conn) -> list[Task]:
            return [task_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)
