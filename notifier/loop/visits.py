"""Technicians' visits: offering slots, booking, moving, cancelling, completing, reminding.

Part of :mod:`notifier.loop` ("Act" when no remote remedy is left): the planner's best
slots before the predicted failure (:mod:`notifier.scheduling`) are offered to the owner,
who books one, asks for others or declines; until the visit starts the owner may move it
(its time is freed and new slots offered, ``max_reschedules`` times before a person
takes over) or cancel it; the technician completes it and the device is verified again
(:mod:`notifier.loop.verification`). Owners are reminded of a booked visit once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from notifier.actions import HealthReader
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.loop.config import CANCELLED, MOVED
from notifier.loop.notices import Notice
from notifier.loop.steps import CaseSteps, service_part
from notifier.model import Actor, Appointment, AuditEntry, Case, Slot, Task
from notifier.scheduling import check_bookable, plan_slots
from wire.errors import TransientError

__all__ = ["Visits"]

_LOG = logging.getLogger("notifier.loop")


class Visits:
    """A case's visits, from the first offer to the technician's report.

    Args:
        steps: the steps every part of the case machine takes.
        health: the stored scores (a completed visit is checked from the device's time).
    """

    def __init__(self, steps: CaseSteps, health: HealthReader) -> None:
        self._steps = steps
        self.store = steps.store
        self.config = steps.config
        self.health = health
        self._reminded: set[str] = set()

    async def plan(
        self, case: Case, *, exclude: Sequence[Slot] = (), freed: Appointment | None = None
    ) -> list[Slot]:
        """The planner's best slots for a case (``freed``: a visit of its own not to count)."""
        owner = await self._steps.owner(case.owner_id)
        now = self._steps.clock()
        technicians = await self.store.technicians(owner.region)
        booked = await self.store.appointments(states=["booked"], since=now - timedelta(days=1))
        if freed is not None:
            booked = [a for a in booked if a.appointment_id != freed.appointment_id]
        return plan_slots(
            technicians=technicians,
            booked=booked,
            owner=owner,
            part=service_part(case),
            urgency=case.urgency,
            now=now,
            failure_at=case.failure_at,
            exclude=exclude,
            config=self.config.planner,
        )

    async def propose(
        self,
        case: Case,
        why: str,
        *,
        exclude: Sequence[Slot] = (),
        actor: Actor = "system",
        tell: Sequence[Notice] = (),
    ) -> Case:
        """Offer the planner's best slots, or hand the case to a person if none."""
        slots = await self.plan(case, exclude=exclude)
        if not slots:
            return await self._steps.to_person(
                case, f"{why}; no technician has a free slot", tell=tell
            )
        return await self.offer(case, slots, why, actor=actor, tell=tell)

    async def offer(
        self,
        case: Case,
        slots: Sequence[Slot],
        why: str,
        *,
        actor: Actor = "system",
        notice: Notice | None = None,
        tell: Sequence[Notice] = (),
    ) -> Case:
        """Offer ``slots`` to the owner: a new proposal, the case moved, the owner told."""
        part = service_part(case)
        if case.appointment_id is not None:
            previous = await self.store.get_appointment(case.appointment_id)
            if previous is not None and previous.state == "proposed":
                await self.store.put_appointment(replace(previous, state="cancelled"))
        appointment = Appointment(
            appointment_id=uuid.uuid4().hex[:16],
            case_id=case.case_id,
            technician_id=None,
            start=None,
            end=None,
            state="proposed",
            part=part,
            offered=tuple(slots),
        )
        await self.store.put_appointment(appointment)
        case = await self._steps.move(
            case,
            "appointment_proposed",
            f"{why}; offered {len(slots)} slots",
            actor=actor,
            evidence={
                "part": part,
                "slots": [s.start.isoformat() for s in slots],
                "failure_at": None if case.failure_at is None else case.failure_at.isoformat(),
            },
            tell=[*tell, notice or Notice("appointment_offer", slots=tuple(slots))],
            appointment_id=appointment.appointment_id,
            pending_action=None,
        )
        return case

    async def booked_visit(self, case: Case, change: str) -> Appointment:
        """The case's booked visit while it can still be ``change`` (moved, cancelled).

        Raises:
            ConflictError: no visit is booked, or it is too late: it has started, its
                time has passed, or the technician completed it.
        """
        visit = None
        if case.appointment_id is not None:
            visit = await self.store.get_appointment(case.appointment_id)
        if visit is not None and visit.state == "done":
            raise ConflictError(
                f"the technician has already completed this visit, so it can no longer be {change}"
            )
        if case.state != "booked" or visit is None or visit.state != "booked":
            raise ConflictError("no visit is offered or booked for this case")
        now = self._steps.clock()
        if visit.start is not None and visit.start <= now:
            if visit.end is not None and visit.end <= now:
                raise ConflictError(
                    f"the time of this visit has passed, so it can no longer be {change}"
                )
            raise ConflictError(f"this visit has already started, so it can no longer be {change}")
        return visit

    async def release(self, case: Case, visit: Appointment, change: str) -> Appointment:
        """Free a booked visit's time in the store (atomic: it must not have started)."""
        try:
            released = await self.store.release(visit.appointment_id, now=self._steps.clock())
        except ConflictError as exc:
            raise ConflictError(f"this visit can no longer be {change}: {exc}") from exc
        _LOG.info("case %s: visit %s released (%s)", case.case_id, visit.appointment_id, change)
        return released

    async def moves(self, case: Case) -> int:
        """How often the owner moved a booked visit of this case."""
        return sum(1 for entry in await self.store.audit(case.case_id) if entry.action == MOVED)

    @staticmethod
    def _visit_evidence(visit: Appointment) -> dict[str, Any]:
        return {
            "appointment_id": visit.appointment_id,
            "technician_id": visit.technician_id,
            "start": None if visit.start is None else visit.start.isoformat(),
        }

    async def reschedule(self, case: Case) -> Appointment:
        """Move a booked visit: free its time and offer new slots, within the limit."""
        visit = await self.booked_visit(case, "moved")
        when = "?" if visit.start is None else visit.start.isoformat()
        moves = await self.moves(case)
        limit = self.config.max_reschedules
        if moves >= limit:
            visit = await self.release(case, visit, "moved")
            await self._steps.audit(
                case,
                "owner",
                CANCELLED,
                f"the owner asked to move the visit of {when} once more, after {moves} moves",
                {**self._visit_evidence(visit), "moves": moves, "limit": limit},
            )
            reason = (
                f"the owner asked to move the visit again after {moves} moves "
                f"(limit {limit}); a person should agree a time with them"
            )
            case = await self._steps.move(
                case,
                "escalated",
                reason,
                actor="owner",
                evidence={"moves": moves, "limit": limit},
                tell=[Notice("visit_move_limit", appointment=visit)],
                needs_person=reason,
            )
            await self.store.add_task(
                Task(uuid.uuid4().hex[:16], case.case_id, reason, self._steps.clock())
            )
            raise ConflictError(
                f"this visit has been moved {moves} times already; someone from our service "
                "team will call you to find a time that suits you"
            )
        # the booked time itself is what no longer suits: it is not offered again
        booked_time: tuple[Slot, ...] = ()
        if visit.technician_id is not None and visit.start is not None and visit.end is not None:
            booked_time = (Slot(visit.technician_id, visit.start, visit.end),)
        slots = await self.plan(case, exclude=booked_time, freed=visit)
        if not slots:
            raise ConflictError(
                "no other times are free before the repair is due, so your visit stays as booked"
            )
        visit = await self.release(case, visit, "moved")
        await self._steps.audit(
            case,
            "owner",
            MOVED,
            f"the owner asked to move the visit of {when}; its time is free again",
            {**self._visit_evidence(visit), "moves": moves + 1, "limit": limit},
        )
        case = await self.offer(
            case,
            slots,
            f"the owner asked to move the visit of {when} (move {moves + 1} of {limit})",
            actor="owner",
            notice=Notice("visit_moving", slots=tuple(slots), appointment=visit),
        )
        assert case.appointment_id is not None
        proposal = await self.store.get_appointment(case.appointment_id)
        assert proposal is not None
        return proposal

    async def proposal(self, case: Case) -> Appointment:
        """The visit times on offer for the case."""
        if case.state != "appointment_proposed" or case.appointment_id is None:
            raise ConflictError("no visit times are on offer for this case")
        appointment = await self.store.get_appointment(case.appointment_id)
        if appointment is None or appointment.state != "proposed":
            raise ConflictError("no visit times are on offer for this case")
        return appointment

    # -- the owner's and technician's requests ----------------------------------------
    async def choose_slot(self, owner_id: str, case_id: str, slot_index: int) -> Appointment:
        """The owner books one of the offered slots."""
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            proposal = await self.proposal(case)
            if not 0 <= slot_index < len(proposal.offered):
                raise InvalidRequestError(
                    f"slot {slot_index} is not on offer (0 to {len(proposal.offered) - 1})"
                )
            slot = proposal.offered[slot_index]
            technician = await self.store.get_technician(slot.technician_id)
            if technician is None:
                raise ConflictError("that technician is no longer available")
            booked = await self.store.appointments(
                technician_id=slot.technician_id, states=["booked"]
            )
            appointment = replace(
                proposal,
                technician_id=slot.technician_id,
                start=slot.start,
                end=slot.end,
                state="booked",
            )
            try:
                check_bookable(slot, technician, booked, self.config.planner)
                await self.store.book(appointment)
            except ConflictError:
                await self._steps.audit(case, "owner", "slot_taken", "the chosen slot was taken")
                await self.propose(
                    case,
                    "the chosen slot was taken meanwhile",
                    exclude=proposal.offered,
                    actor="owner",
                )
                raise
            await self._steps.move(
                case,
                "booked",
                f"the owner booked {slot.start.isoformat()} with {technician.name}",
                actor="owner",
                evidence={
                    "technician_id": technician.technician_id,
                    "start": slot.start.isoformat(),
                },
                tell=[Notice("appointment_booked", appointment=appointment)],
            )
            return appointment

    async def request_other_slots(self, owner_id: str, case_id: str) -> Appointment:
        """The owner asks for other times: of the offer, or instead of the booked visit.

        A booked visit that has not started is released (its time is free for others at
        once) and new slots are offered; after ``config.max_reschedules`` moves the visit
        is released and the case goes to a person instead.
        """
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            if case.state != "appointment_proposed":
                return await self.reschedule(case)
            proposal = await self.proposal(case)
            seen = list(proposal.offered)
            for earlier in await self.store.appointments(
                case_id=case.case_id, states=["cancelled"]
            ):
                seen.extend(earlier.offered)
            case = await self.propose(
                case, "the owner asked for other times", exclude=seen, actor="owner"
            )
            if case.state != "appointment_proposed" or case.appointment_id is None:
                raise ConflictError("no other times are free; our service team will call you")
            appointment = await self.store.get_appointment(case.appointment_id)
            assert appointment is not None
            return appointment

    async def decline_visit(self, owner_id: str, case_id: str) -> Case:
        """The owner does not want a visit: the offer is withdrawn or the booked visit cancelled.

        A booked visit can be cancelled until it starts; its time is free for others at once.
        """
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            cancelled: Appointment | None = None
            if case.state != "appointment_proposed":
                visit = await self.booked_visit(case, "cancelled")
                cancelled = await self.release(case, visit, "cancelled")
                when = "?" if visit.start is None else visit.start.isoformat()
                await self._steps.audit(
                    case,
                    "owner",
                    CANCELLED,
                    f"the owner cancelled the visit of {when}; its time is free again",
                    self._visit_evidence(visit),
                )
            elif case.appointment_id is not None:
                appointment = await self.store.get_appointment(case.appointment_id)
                if appointment is not None and appointment.state == "proposed":
                    await self.store.put_appointment(replace(appointment, state="cancelled"))
            if case.urgency in ("high", "critical"):
                reason = f"the owner declined a visit for an {case.urgency}-urgency fault"
                case = await self._steps.move(
                    case,
                    "escalated",
                    reason,
                    actor="owner",
                    tell=[]
                    if cancelled is None
                    else [Notice("visit_cancelled_call", appointment=cancelled)],
                    needs_person=reason,
                )
                await self.store.add_task(
                    Task(uuid.uuid4().hex[:16], case.case_id, reason, self._steps.clock())
                )
                return case
            return await self._steps.move(
                case,
                "dismissed",
                "the owner declined a visit",
                actor="owner",
                tell=[]
                if cancelled is None
                else [Notice("visit_cancelled", appointment=cancelled)],
            )

    async def complete_visit(
        self, technician_id: str, appointment_id: str, note: str | None = None
    ) -> Appointment:
        """The technician marks the visit done; the device is verified again."""
        appointment = await self.store.get_appointment(appointment_id)
        if appointment is None or appointment.technician_id != technician_id:
            raise NotFoundError(f"no visit {appointment_id}")
        if appointment.state != "booked":
            raise ConflictError(f"this visit is {appointment.state}, not booked")
        case = await self.store.get_case(appointment.case_id)
        if case is None:
            raise NotFoundError(f"no case for visit {appointment_id}")
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            # the owner may have moved or cancelled it while we waited for the lock
            appointment = await self.store.get_appointment(appointment_id)
            if appointment is None or appointment.state != "booked" or case.state != "booked":
                state = "gone" if appointment is None else appointment.state
                raise ConflictError(f"this visit is {state}, not booked")
            done = replace(appointment, state="done", note=note)
            await self.store.put_appointment(done)
            latest = (await self.health.latest([case.device_id])).get(case.device_id)
            # device time: the scores that count are the device's readings after now
            fix_at = self._steps.clock() if latest is None else latest.at
            case = await self._steps.move(
                case,
                "visited",
                "the technician completed the visit",
                actor="technician",
                evidence={"technician_id": technician_id, "note": note is not None},
                tell=[Notice("visit_done_checking")],
            )
            case = await self._steps.move(
                case, "verifying", "checking the device after the visit", fix_at=fix_at
            )
            await self._steps.set_timer(case, "verify", 0.0)
            return done

    async def remind(self, now: datetime) -> None:
        """Remind owners of booked visits that start within ``reminder_before_s``, once.

        A reminder is kept in the case's audit trail (``visit_reminder``, with the visit's
        id) in the same step as its message, so a restart or another instance does not
        send it again; a visit moved to a new time is a new visit and is reminded of in
        its turn.
        """
        before = timedelta(seconds=self.config.reminder_before_s)
        if before <= timedelta(0):
            return
        visits = await self.store.appointments(states=["booked"], since=now, until=now + before)
        for visit in visits:
            if visit.appointment_id in self._reminded:
                continue
            case = await self.store.get_case(visit.case_id)
            if case is None or case.state != "booked":
                continue
            if case.appointment_id != visit.appointment_id:
                continue
            try:
                async with self._steps.lock(f"{case.device_id}/{case.fault}"):
                    case = await self._steps.fresh(case)
                    if case.state != "booked" or case.appointment_id != visit.appointment_id:
                        continue
                    entries = await self.store.audit(case.case_id)
                    if any(
                        e.action == "visit_reminder"
                        and e.evidence.get("appointment_id") == visit.appointment_id
                        for e in entries
                    ):
                        self._reminded.add(visit.appointment_id)
                        continue
                    reminded = AuditEntry(
                        case_id=case.case_id,
                        at=self._steps.clock(),
                        actor="system",
                        action="visit_reminder",
                        reason="the visit is near: the owner is reminded of it",
                        evidence={
                            "appointment_id": visit.appointment_id,
                            "start": None if visit.start is None else visit.start.isoformat(),
                        },
                    )
                    # the reminder's line in the trail and the message are one step
                    await self._steps.save(
                        case,
                        entries=[reminded],
                        tell=[Notice("appointment_reminder", appointment=visit)],
                    )
                    self._reminded.add(visit.appointment_id)
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; its reminder is tried again later", case.case_id, exc)
