"""Technicians and appointments (notifier; SQLite).

A booking checks for overlapping visits of the technician inside ``BEGIN IMMEDIATE``,
and a release frees a booked visit only while it has not started, in the same way, so
neither interleaves with the other. Appointments need their case
(:class:`~notifier.errors.NotFoundError` otherwise).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import Appointment, Technician
from notifier.rows import appointment_from, appointment_row, technician_from, technician_row, ts
from notifier.sqlite.base import StoreBase
from notifier.sqlite.sql import in_list, raise_missing_case, transaction, upsert


class VisitQueries(StoreBase):
    """Technicians, appointments, bookings and releases."""

    async def put_technician(self, technician: Technician) -> None:
        """Insert or replace a technician."""
        row = technician_row(technician)
        await self._run(lambda conn: upsert(conn, "technicians", "technician_id", row))

    async def get_technician(self, technician_id: str) -> Technician | None:
        """Return a technician."""

        def job(conn: sqlite3.Connection) -> Technician | None:
            row = conn.execute(
                "SELECT * FROM technicians WHERE technician_id = ?", (technician_id,)
            ).fetchone()
            return None if row is None else technician_from(row)

        return await self._run(job)

    async def technicians(self, region: str | None = None) -> list[Technician]:
        """Return the technicians (of one region), by id."""

        def job(conn: sqlite3.Connection) -> list[Technician]:
            if region is None:
                rows = conn.execute("SELECT * FROM technicians ORDER BY technician_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM technicians WHERE region = ? ORDER BY technician_id", (region,)
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

        def job(conn: sqlite3.Connection) -> None:
            try:
                upsert(conn, "appointments", "appointment_id", row)
            except sqlite3.IntegrityError as exc:
                raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def book(self, appointment: Appointment) -> None:
        """Store an appointment as ``booked``, atomically refusing a double booking.

        Visits are half-open ``[start, end)``: one may start when another ends.

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

        def job(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                clash = conn.execute(
                    "SELECT appointment_id FROM appointments "
                    "WHERE technician_id = ? AND state = 'booked' AND appointment_id != ? "
                    "AND start_at < ? AND end_at > ? LIMIT 1",
                    (row["technician_id"], row["appointment_id"], row["end_at"], row["start_at"]),
                ).fetchone()
                if clash is not None:
                    raise ConflictError(
                        f"technician {appointment.technician_id!r} is booked then "
                        f"(appointment {clash[0]!r})"
                    )
                try:
                    upsert(conn, "appointments", "appointment_id", row)
                except sqlite3.IntegrityError as exc:
                    raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def release(self, appointment_id: str, *, now: datetime) -> Appointment:
        """Cancel a booked visit that has not started, freeing the technician's time.

        The check and the change are one ``BEGIN IMMEDIATE`` transaction, so a release
        never interleaves with a :meth:`book` of the same time: whichever comes second
        sees the first.

        Args:
            appointment_id: the booked visit.
            now: the current time (UTC); a visit starting at or before it is too late.

        Returns:
            The visit as it is now stored (``cancelled``).

        Raises:
            NotFoundError: no such appointment.
            ConflictError: it is not booked (done, cancelled, only proposed), or it has
                started already.
        """
        cutoff = ts(now)

        def job(conn: sqlite3.Connection) -> Appointment:
            with transaction(conn):
                row = conn.execute(
                    "SELECT * FROM appointments WHERE appointment_id = ?", (appointment_id,)
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"no appointment {appointment_id!r}")
                appointment = appointment_from(row)
                if appointment.state != "booked":
                    raise ConflictError(f"the visit is {appointment.state}, not booked")
                if row["start_at"] is None or row["start_at"] <= cutoff:
                    raise ConflictError("the visit has started already")
                conn.execute(
                    "UPDATE appointments SET state = 'cancelled' "
                    "WHERE appointment_id = ? AND state = 'booked'",
                    (appointment_id,),
                )
            return replace(appointment, state="cancelled")

        return await self._run(job)

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        """Return an appointment."""

        def job(conn: sqlite3.Connection) -> Appointment | None:
            row = conn.execute(
                "SELECT * FROM appointments WHERE appointment_id = ?", (appointment_id,)
            ).fetchone()
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
        clauses: list[str] = []
        params: list[Any] = []
        if technician_id is not None:
            clauses.append("technician_id = ?")
            params.append(technician_id)
        if case_id is not None:
            clauses.append("case_id = ?")
            params.append(case_id)
        if states is not None:
            if not states:
                return []
            clauses.append(in_list("state", states))
            params.extend(states)
        if since is not None:
            clauses.append("start_at >= ?")
            params.append(ts(since))
        if until is not None:
            clauses.append("start_at < ?")
            params.append(ts(until))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def job(conn: sqlite3.Connection) -> list[Appointment]:
            rows = conn.execute(
                f"SELECT * FROM appointments {where} "
                "ORDER BY start_at IS NULL, start_at, appointment_id",
                params,
            )
            return [appointment_from(row) for row in rows]

        return await self._run(job)
