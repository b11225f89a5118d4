"""What people can ask of the owner loop, and what it reads of device health (notifier).

The owner REST API (:mod:`notifier.api`) parses and authorises requests, then calls a
:class:`CaseActions` (the case machine, :class:`notifier.loop.OwnerLoop`, implements it);
the case machine reads device health through a :class:`HealthReader` (InfluxDB's
``health`` measurement in production, :class:`notifier.health.InfluxHealth`).
Both are protocols so that each side is tested without the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from notifier.model import Appointment, Case, Rating

__all__ = ["CaseActions", "HealthPoint", "HealthReader"]


@dataclass(frozen=True, slots=True)
class HealthPoint:
    """One stored anomaly score of a device.

    Attributes:
        at: the reading's device time (UTC).
        score: anomaly score in ``[0, 1]``, higher is worse.
    """

    at: datetime
    score: float


class HealthReader(Protocol):
    """Reads the devices' stored anomaly scores."""

    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        """Return the newest score of each device that has one."""

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        """Return a device's scores from ``start`` on (device time), oldest first."""


class CaseActions(Protocol):
    """The owner's and the technician's requests to the case machine.

    Every method checks that the caller may act on the case (else
    :class:`~notifier.errors.NotFoundError`, so that another owner's case looks like
    no case at all) and that the case is in a state where the request makes sense
    (else :class:`~notifier.errors.ConflictError`), and writes the audit trail.
    """

    async def accept_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner agrees to the remote fix the case waits for; it runs now."""

    async def decline_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner declines the remote fix; the case moves on to a visit."""

    async def choose_slot(self, owner_id: str, case_id: str, slot_index: int) -> Appointment:
        """The owner books one of the offered slots (by its index in the offer).

        Raises:
            ConflictError: the slot was taken meanwhile (a fresh offer is made).
            InvalidRequestError: no such slot in the current offer.
        """

    async def request_other_slots(self, owner_id: str, case_id: str) -> Appointment:
        """The owner asks for other times than those offered or the one booked.

        A booked visit is moved: its time is freed for others and new slots are offered.

        Returns:
            The new proposal.

        Raises:
            ConflictError: nothing is on offer or booked; the visit has started, is past
                or was completed; no other time is free (a booked visit then stays); or
                the visit was moved too often (it is freed and a person takes over).
        """

    async def decline_visit(self, owner_id: str, case_id: str) -> Case:
        """The owner does not want a visit, offered or booked (a booked one is freed).

        The case ends (or goes to a person if urgent).

        Raises:
            ConflictError: no visit is offered or booked, or the booked one has started,
                is past or was completed.
        """

    async def rate(
        self,
        owner_id: str,
        case_id: str,
        stars: int,
        comment: str | None = None,
        *,
        nothing_wrong: bool = False,
    ) -> Rating:
        """The owner rates a resolved case (1 to 5, an optional comment).

        A low rating, a comment or ``nothing_wrong`` hands the case to a person.
        """

    async def complete_visit(
        self, technician_id: str, appointment_id: str, note: str | None = None
    ) -> Appointment:
        """The technician marks the visit done; the device is verified again."""
