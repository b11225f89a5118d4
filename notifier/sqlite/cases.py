"""Cases, their audit trail, ratings and tasks (notifier; SQLite).

The case side of :class:`notifier.sqlite.SqliteStore`. One open case per device and
fault is a partial unique index over the open states; a case move is a compare-and-set
``UPDATE ... WHERE state = ?`` that appends its audit lines and keeps its messages
(:func:`notifier.sqlite.messages.keep_message`) in the same transaction; one rating per
case is the ratings table's key. Ratings and tasks need their case
(:class:`~notifier.errors.NotFoundError` otherwise).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from notifier.errors import ConflictError, InvalidRequestError
from notifier.model import OPEN_STATES, AuditEntry, Case, Notification, Rating, Task
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
from notifier.sqlite.base import StoreBase
from notifier.sqlite.messages import keep_message
from notifier.sqlite.sql import constraint, in_list, insert, raise_missing_case, transaction, upsert
from notifier.store import NewMessage

_OPEN: Final = tuple(sorted(OPEN_STATES))


class CaseQueries(StoreBase):
    """Cases, the audit trail, ratings and tasks."""

    async def add_case(self, case: Case) -> None:
        """Insert a new case.

        Raises:
            ConflictError: a case with that id exists, or an open case for the same
                device and fault exists (one open case per device and fault).
        """
        row = case_row(case)

        def job(conn: sqlite3.Connection) -> None:
            try:
                insert(conn, "cases", row)
            except sqlite3.IntegrityError as exc:
                if constraint(exc) == "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise ConflictError(f"case {case.case_id!r} exists") from exc
                if constraint(exc) == "SQLITE_CONSTRAINT_UNIQUE":
                    raise ConflictError(
                        f"device {case.device_id!r} has an open case for {case.fault!r}"
                    ) from exc
                raise

        await self._run(job)

    async def get_case(self, case_id: str) -> Case | None:
        """Return a case."""

        def job(conn: sqlite3.Connection) -> Case | None:
            row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else case_from(row)

        return await self._run(job)

    async def open_case(self, device_id: str, fault: str) -> Case | None:
        """Return the open case of a device and fault, if any."""

        def job(conn: sqlite3.Connection) -> Case | None:
            row = conn.execute(
                "SELECT * FROM cases WHERE device_id = ? AND fault = ? "
                f"AND {in_list('state', _OPEN)}",
                (device_id, fault, *_OPEN),
            ).fetchone()
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
        owner are kept (or lost) together.

        Returns:
            Each message as kept (``None``: its key was kept before, or no owner).

        Raises:
            ConflictError: the stored case moved on (or does not exist), or the new
                state would give the device a second open case for the fault.
        """
        row = case_row(case)
        updates = ", ".join(f"{column} = :{column}" for column in row if column != "case_id")
        params = {**row, "expected_state": expected_state}

        entries = [] if audit is None else [audit] if isinstance(audit, AuditEntry) else audit
        entry_rows = [audit_row(entry) for entry in entries]

        def job(conn: sqlite3.Connection) -> list[Notification | None]:
            with transaction(conn):
                try:
                    cursor = conn.execute(
                        f"UPDATE cases SET {updates} "
                        "WHERE case_id = :case_id AND state = :expected_state",
                        params,
                    )
                except sqlite3.IntegrityError as exc:
                    if constraint(exc) == "SQLITE_CONSTRAINT_UNIQUE":
                        raise ConflictError(
                            f"device {case.device_id!r} has another open case for {case.fault!r}"
                        ) from exc
                    raise
                if cursor.rowcount == 0:
                    raise ConflictError(
                        f"case {case.case_id!r} is not in state {expected_state!r} "
                        "(or does not exist)"
                    )
                for entry_row in entry_rows:
                    insert(conn, "audit", entry_row)
                return [keep_message(conn, message) for message in messages]

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
        clauses: list[str] = []
        params: list[Any] = []
        if owner_id is not None:
            clauses.append("owner_id = ?")
            params.append(owner_id)
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if states is not None:
            if not states:
                return []
            clauses.append(in_list("state", states))
            params.extend(states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(limit, 0))

        def job(conn: sqlite3.Connection) -> list[Case]:
            rows = conn.execute(
                f"SELECT * FROM cases {where} ORDER BY opened_at DESC, case_id DESC LIMIT ?",
                params,
            )
            return [case_from(row) for row in rows]

        return await self._run(job)

    async def add_audit(self, entry: AuditEntry) -> None:
        """Append to the audit trail (never changed or removed, except by erasure)."""
        row = audit_row(entry)
        await self._run(lambda conn: insert(conn, "audit", row))

    async def audit(self, case_id: str) -> list[AuditEntry]:
        """Return a case's audit trail, oldest first (entries of one instant as written)."""

        def job(conn: sqlite3.Connection) -> list[AuditEntry]:
            rows = conn.execute(
                "SELECT * FROM audit WHERE case_id = ? ORDER BY at, seq", (case_id,)
            )
            return [audit_from(row) for row in rows]

        return await self._run(job)

    async def add_rating(self, rating: Rating) -> None:
        """Store the rating of a case.

        Raises:
            ConflictError: the case is rated already (one rating per case).
            NotFoundError: the case does not exist.
            InvalidRequestError: the stars are not 1 to 5.
        """
        row = rating_row(rating)

        def job(conn: sqlite3.Connection) -> None:
            try:
                insert(conn, "ratings", row)
            except sqlite3.IntegrityError as exc:
                if constraint(exc) == "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise ConflictError(f"case {rating.case_id!r} is rated already") from exc
                if constraint(exc) == "SQLITE_CONSTRAINT_CHECK":
                    raise InvalidRequestError(
                        f"a rating is 1 to 5 stars, not {rating.stars}"
                    ) from exc
                raise_missing_case(exc, rating.case_id)

        await self._run(job)

    async def get_rating(self, case_id: str) -> Rating | None:
        """Return a case's rating."""

        def job(conn: sqlite3.Connection) -> Rating | None:
            row = conn.execute("SELECT * FROM ratings WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else rating_from(row)

        return await self._run(job)

    async def ratings(self, since: datetime | None = None) -> list[Rating]:
        """Return ratings, oldest first (``since`` inclusive)."""
        bound = ts_opt(since)

        def job(conn: sqlite3.Connection) -> list[Rating]:
            if bound is None:
                rows = conn.execute("SELECT * FROM ratings ORDER BY at, case_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM ratings WHERE at >= ? ORDER BY at, case_id", (bound,)
                )
            return [rating_from(row) for row in rows]

        return await self._run(job)

    async def add_task(self, task: Task) -> None:
        """Insert or replace a task for a person.

        Raises:
            NotFoundError: its case does not exist.
        """
        row = task_row(task)

        def job(conn: sqlite3.Connection) -> None:
            try:
                upsert(conn, "tasks", "task_id", row)
            except sqlite3.IntegrityError as exc:
                raise_missing_case(exc, task.case_id)

        await self._run(job)

    async def tasks(self, *, state: str | None = None, case_id: str | None = None) -> list[Task]:
        """Return tasks, oldest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if case_id is not None:
            clauses.append("case_id = ?")
            params.append(case_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def job(conn: sqlite3.Connection) -> list[Task]:
            rows = conn.execute(f"SELECT * FROM tasks {where} ORDER BY created_at, task_id", params)
            return [task_from(row) for row in rows]

        return await self._run(job)
