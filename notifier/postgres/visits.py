"""Technicians and visits in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

Technicians, and the appointments of their visits: a booking and a release take the
technician's advisory lock first, so two bookings of one technician never interleave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import Appointment, Technician
from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import BOOK_LOCK, Params, raise_missing_case, upsert, where_sql
from notifier.rows import appointment_from, appointment_row, technician_from, technician_row, ts

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["VisitQueries"]


class VisitQueries(PooledStore):
    """The technician and appointment queries of :class:`~notifier.postgres.PostgresStore`."""

    # -- technicians and appointments ----------------------------------------------------------

    async def put_technician(self, technician: Technician) -> None:
        """Insert or replace a technician."""
        row = technician_row(technician)
        await self._run(lambda conn: upsert(conn, "technicians", "technician_id", row))

    async def get_technician(self, technician_id: str) -> Technician | None:
        """Return a technician."""

        async def job(conn: Conn) -> Technician | None:
            row = await conn.fetchrow(
                "SELECT * FROM technicians WHERE technician_id = $1", technician_id
            )
            return None if row is None else technician_from(row)

        return await self._run(job)

    async def technicians(self, region: str | None = None) -> list[Technician]:
        """Return the technicians (of one region), by id."""

        async def job(conn: Conn) -> list[Technician]:
            if region is None:
                rows = await conn.fetch("SELECT * FROM technicians ORDER BY technician_id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM technicians WHERE region = $1 ORDER BY technician_id", region
                )
            return [technician_from(row) for row in rows]

        return await self._run(job)

    async def put_appointment(self, appointment: Appointment) -> None:
        """Insert or replace an appointment that is not ``booked`` (use :meth:`book`).

        Raises:
            InvalidRequestError: the appointment is ``booked``.
            NotFoundError: its case does not exist.
        """
        if appointment.state == "booked":
            raise InvalidRequestError("a booked appointment is stored with book()")
        row = appointment_row(appointment)

        async def job(conn: Conn) -> None:
            try:
                await upsert(conn, "appointments", "appointment_id", row)
            except asyncpg.ForeignKeyViolationError as exc:
                raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def book(self, appointment: Appointment) -> None:
        """Store an appointment as ``booked``, atomically refusing a double booking.

        Visits are half-open ``[start, end)``. The check and the write are one
        transaction holding the technician's advisory lock, which every booking and
        release of that technician takes first: whichever comes second sees the first.

        Raises:
            ConflictError: the technician has another booked visit overlapping it.
            InvalidRequestError: the technician, start or end is missing, or the end is
                not after the start.
            NotFoundError: its case does not exist.
        """
        if appointment.technician_id is None or appointment.start is None:
            raise InvalidRequestError("a booking needs a technician, a start and an end")
        if appointment.end is None:
            raise InvalidRequestError("a booking needs a technician, a start and an end")
        if appointment.end <= appointment.start:
            raise InvalidRequestError("a booking must end after it starts")
        row = appointment_row(replace(appointment, state="booked"))

        async def job(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute(BOOK_LOCK, row["technician_id"])
                clash = await conn.fetchval(
                    "SELECT appointment_id FROM appointments "
                    "WHERE technician_id = $1 AND state = 'booked' AND appointment_id != $2 "
                    "AND start_at < $3 AND end_at > $4 LIMIT 1",
                    row["technician_id"],
                    row["appointment_id"],
                    row["end_at"],
                    row["start_at"],
                )
                if clash is not None:
                    raise ConflictError(
                        f"technician {appointment.technician_id!r} is booked then "
                        f"(appointment {clash!r})"
                    )
                try:
                    await upsert(conn, "appointments", "appointment_id", row)
                except asyncpg.ForeignKeyViolationError as exc:
                    raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def release(self, appointment_id: str, *, now: datetime) -> Appointment:
        """Cancel a booked visit that has not started, freeing the technician's time.

        Under the technician's booking lock, like :meth:`book`.

        Raises:
            NotFoundError: no such appointment.
            ConflictError: it is not booked (done, cancelled, only proposed), or it has
                started already.
        """
        cutoff = ts(now)

        async def job(conn: Conn) -> Appointment:
            async with conn.transaction():
                technician = await conn.fetchval(
                    "SELECT technician_id FROM appointments WHERE appointment_id = $1",
                    appointment_id,
                )
                if technician is not None:
                    await conn.execute(BOOK_LOCK, technician)
                row = await conn.fetchrow(
                    "SELECT * FROM appointments WHERE appointment_id = $1 FOR UPDATE",
                    appointment_id,
                )
                if row is None:
                    raise NotFoundError(f"no appointment {appointment_id!r}")
                appointment = appointment_from(row)
                if appointment.state != "booked":
                    raise ConflictError(f"the visit is {appointment.state}, not booked")
                if row["start_at"] is None or row["start_at"] <= cutoff:
                    raise ConflictError("the visit has started already")
                await conn.execute(
                    "UPDATE appointments SET state = 'cancelled' "
                    "WHERE appointment_id = $1 AND state = 'booked'",
                    appointment_id,
                )
            return replace(appointment, state="cancelled")

        return await self._run(job)

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        """Return an appointment."""

        async def job(conn: Conn) -> Appointment | None:
            row = await conn.fetchrow(
                "SELECT * FROM appointments WHERE appointment_id = $1", appointment_id
            )
            return None if row is None else appointment_from(row)

        return await self._run(job)

    async def appointments(
        self,
        *,
        technician_id: str | None = None,
        case_id: str | None = None,
        states: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Appointment]:
        """Return appointments by start time (``since <= start < until``).

        Appointments without a start (proposals) come last, and only when neither
        ``since`` nor ``until`` is given.
        """
        p = Params()
        clauses: list[str] = []
        if technician_id is not None:
            clauses.append(f"technician_id = {p(technician_id)}")
        if case_id is not None:
            clauses.append(f"case_id = {p(case_id)}")
        if states is not None:
            if not states:
                return []
            clauses.append(f"state = ANY({p(list(states))}::text[])")
        if since is not None:
            clauses.append(f"start_at >= {p(ts(since))}")
        if until is not None:
            clauses.append(f"start_at < {p(ts(until))}")
        sql = (
            f"SELECT * FROM appointments {where_sql(clauses)} "
            "ORDER BY start_at IS NULL, start_at, appointment_id"
        )

        async def job(conn: Conn) -> list[Appointment]:
            return [appointment_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)
