"""The case machine itself: diagnoses in, a case's next step, timers, ratings.

Part of :mod:`notifier.loop` (see there for the lifecycle). :class:`OwnerLoop` opens,
updates and closes cases from diagnoses, runs the timers (command retries, checks,
expiry, reminders) and takes the owner's rating; it composes the parts that do the rest:
:class:`~notifier.loop.remote.RemoteFix` (remedies, consent, commands),
:class:`~notifier.loop.verification.Verification` (the check after a fix or a visit),
:class:`~notifier.loop.visits.Visits` (offers, bookings, moves, reminders), all taking
their steps through one :class:`~notifier.loop.steps.CaseSteps` (locks, leases, the
audit trail, moves with their messages in one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

from diagnostics import CATALOG, Diagnosis, ModelCatalog
from notifier.actions import HealthReader
from notifier.campaigns import campaign_fault, check_campaign_action, open_campaign_case
from notifier.errors import ConflictError, InvalidRequestError
from notifier.loop.config import SAFETY_FAULTS, SERVICE, LoopConfig
from notifier.loop.notices import Notice, OwnerNotifier
from notifier.loop.remote import DeviceCommander, RemoteFix
from notifier.loop.steps import CaseSink, CaseSteps
from notifier.loop.verification import Verification
from notifier.loop.visits import Visits
from notifier.model import Appointment, Case, Rating, Task
from notifier.scheduling import urgency_from
from notifier.store import CaseStore, CaseTimer, TimerKind
from wire.errors import TransientError

__all__ = ["OwnerLoop"]

_LOG = logging.getLogger("notifier.loop")


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def _no_sink(_: Case) -> None:
    return None


class OwnerLoop:
    """The case machine; implements :class:`notifier.actions.CaseActions`.

    Use it as an async context manager: it owns the task group its commands run in.

    Args:
        store: the case store.
        commands: the command downlink.
        health: the stored scores.
        notifier: the owner's messages.
        config: timing and limits.
        catalog: the fault catalog (remedies per fault).
        sink: called with every changed case.
        clock: wall clock (UTC).
        holder: this instance's name in the store's leases (default: a random one).
    """

    def __init__(
        self,
        store: CaseStore,
        commands: DeviceCommander,
        health: HealthReader,
        notifier: OwnerNotifier,
        *,
        config: LoopConfig | None = None,
        catalog: Mapping[str, ModelCatalog] | None = None,
        sink: CaseSink = _no_sink,
        clock: Callable[[], datetime] = _utc_now,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.commands = commands
        self.health = health
        self.notifier = notifier
        self.config = config or LoopConfig()
        self.catalog = CATALOG if catalog is None else catalog
        self._clock = clock
        self.holder = holder or f"notifier-{secrets.token_hex(4)}"
        self._steps = CaseSteps(
            store, notifier, self.config, sink=sink, clock=clock, holder=self.holder
        )
        self._visits = Visits(self._steps, health)
        self._remote = RemoteFix(self._steps, self._visits, commands)
        self._verification = Verification(self._steps, self._remote, health)
        self._reminders_due = datetime.min.replace(tzinfo=UTC)
        self._resume_due = datetime.min.replace(tzinfo=UTC)
        self.diagnoses_seen = 0
        self.unowned = 0
        #: Diagnoses whose opening already had a case, now closed: no second case opened.
        self.repeats_of_closed = 0

    async def __aenter__(self) -> Self:
        await self._remote.__aenter__()
        await self._resume()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._remote.__aexit__(exc_type, exc, tb)

    async def _resume(self) -> None:
        """At start, give a timer to each case waiting on one that has none.

        A case moves to ``remote_fix`` or ``verifying`` before its timer is written: a
        process that stopped between the two left it without one. A case with a timer
        (another instance's command under way) keeps it.
        """
        now = self._clock()
        for case in await self.store.cases(states=["remote_fix", "verifying"]):
            what: TimerKind = "verify" if case.state == "verifying" else "retry"
            await self.store.set_timer(CaseTimer(case.case_id, what, now), replace=False)

    @property
    def commands_running(self) -> int:
        """Remote fixes waiting for the device's answer right now."""
        return self._remote.running

    @property
    def timer_errors(self) -> int:
        """Case steps (timers, expiry, reminders, commands) that raised the unforeseen."""
        return self._steps.timer_errors

    @property
    def leases_taken(self) -> int:
        """Leases on cases taken."""
        return self._steps.leases_taken

    @property
    def lease_waits(self) -> int:
        """How often a lease was held by another instance at first."""
        return self._steps.lease_waits

    @property
    def leases_overrun(self) -> int:
        """How often a lease ran out while held (a step took longer than ``lease_s``)."""
        return self._steps.leases_overrun

    # -- diagnoses in ------------------------------------------------------------------
    async def handle_diagnosis(self, diagnosis: Diagnosis) -> Case | None:
        """Open, update or note a case for a diagnosis; return the case touched."""
        self.diagnoses_seen += 1
        key = f"{diagnosis.device_id}/{diagnosis.fault}"
        async with self._steps.lock(key):
            case = await self.store.open_case(diagnosis.device_id, diagnosis.fault)
            if diagnosis.status == "closed":
                if case is not None:
                    await self._steps.audit(
                        case,
                        "system",
                        "diagnosis_closed",
                        "the device's scores are back to normal",
                        {"score": diagnosis.score, "at": diagnosis.updated_at.isoformat()},
                    )
                return case
            if case is None:
                if await self._had_its_case(diagnosis):
                    self.repeats_of_closed += 1
                    return None
                return await self._open(diagnosis)
            return await self._update(case, diagnosis)

    async def _had_its_case(self, diagnosis: Diagnosis) -> bool:
        """Whether this diagnosis' opening (its stable id) already opened a case, now closed.

        A case handed to a person (escalated), dismissed or expired is closed while the
        device may still be diagnosed with the same fault: its updates must not open a new
        case (and tell the owner again) on every message.
        """
        for case in await self.store.cases(device_id=diagnosis.device_id, limit=20):
            if case.fault != diagnosis.fault:
                continue
            for entry in await self.store.audit(case.case_id):
                if entry.to_state == "opened":
                    return bool(entry.evidence.get("diagnosis_id") == diagnosis.id)
            return False
        return False

    def _remedies(self, diagnosis: Diagnosis) -> tuple[str, ...]:
        """The case's remedies: curing remote actions and visits, in catalog order."""
        out: list[str] = []
        for remedy in diagnosis.remedies:
            if remedy.kind == "service":
                out.append(f"{SERVICE}:{remedy.part or ''}")
            elif remedy.cures:
                out.append(remedy.action)
        return tuple(dict.fromkeys(out))

    async def _open(self, diagnosis: Diagnosis) -> Case | None:
        device = await self.store.get_device(diagnosis.device_id)
        if device is None:
            self.unowned += 1
            _LOG.warning(
                "diagnosis %s for device %s, which no owner registered: no case opened",
                diagnosis.fault,
                diagnosis.device_id,
            )
            return None
        now = self._steps.clock()
        ttf = diagnosis.time_to_failure
        failure_at = None if ttf is None else now + timedelta(seconds=ttf.p50_s)
        case = Case(
            case_id=uuid.uuid4().hex[:16],
            device_id=diagnosis.device_id,
            owner_id=device.owner_id,
            model=diagnosis.model,
            fault=diagnosis.fault,
            state="opened",
            urgency=urgency_from(failure_at, now, safety=diagnosis.fault in SAFETY_FAULTS),
            opened_at=now,
            updated_at=now,
            confidence=diagnosis.confidence,
            failure_at=failure_at,
            remedies=self._remedies(diagnosis),
            evidence=diagnosis.evidence[:10],
        )
        try:
            await self.store.add_case(case)
        except ConflictError:
            return await self.store.open_case(diagnosis.device_id, diagnosis.fault)
        await self._steps.audit(
            case,
            "system",
            "transition",
            f"diagnostics named {diagnosis.fault} (confidence {diagnosis.confidence:.2f})",
            _diagnosis_evidence(diagnosis),
            to_state="opened",
        )
        await self._steps.publish(case)
        return await self._remote.advance(case, "the case opened", tell=_opening(case))

    async def start_campaign(self, device_ids: Sequence[str], action: str, reason: str) -> int:
        """Open a pre-emptive case with ``action`` as its remedy on each device.

        The cases run like any other: the owner's consent policy, the device's
        interlocks, verification afterwards. A device that already has an open case of
        this campaign is skipped; unregistered devices too. Returns how many opened.

        Raises:
            InvalidRequestError: ``action`` is not a remote remedy a device understands.
        """
        fault = campaign_fault(check_campaign_action(action))
        opened = 0
        for device_id in dict.fromkeys(device_ids):
            async with self._steps.lock(f"{device_id}/{fault}"):
                case = await open_campaign_case(
                    self.store,
                    device_id,
                    action,
                    reason,
                    devices=len(device_ids),
                    now=self._steps.clock(),
                )
                if case is None:
                    continue
                await self._steps.publish(case)
                await self._remote.advance(case, "a pre-emptive campaign")
                opened += 1
        return opened

    async def _resume_opened(self, now: datetime) -> None:
        """Advance cases left ``opened``: opened by another process, or not advanced here.

        The standalone ops dashboard opens a campaign's cases in the store and leaves
        them to the case machine (:mod:`notifier.campaigns`); a notifier that stopped,
        or whose store failed, between opening a case and its first step leaves one too.
        Only cases older than ``resume_opened_after_s`` are taken, so one that another
        notifier is opening right now is not advanced twice.
        """
        limit = timedelta(seconds=self.config.resume_opened_after_s)
        for case in await self.store.cases(states=["opened"]):
            if now - case.updated_at < limit:
                continue
            try:
                async with self._steps.lock(f"{case.device_id}/{case.fault}"):
                    case = await self._steps.fresh(case)
                    if case.state != "opened":
                        continue
                    await self._steps.publish(case)
                    await self._remote.advance(
                        case, "the case was waiting for its first step", tell=_opening(case)
                    )
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; its first step is tried again later", case.case_id, exc)
            except Exception:
                self._steps.case_failed(case.case_id, "its first step")

    async def _update(self, case: Case, diagnosis: Diagnosis) -> Case:
        now = self._steps.clock()
        ttf = diagnosis.time_to_failure
        failure_at = case.failure_at if ttf is None else now + timedelta(seconds=ttf.p50_s)
        urgency = urgency_from(failure_at, now, safety=diagnosis.fault in SAFETY_FAULTS)
        if _URGENCY_RANK[urgency] < _URGENCY_RANK[case.urgency]:
            urgency = case.urgency  # urgency only rises while a case is open
        changed = replace(case, confidence=diagnosis.confidence, failure_at=failure_at)
        if urgency != case.urgency:
            changed = replace(changed, urgency=urgency)
            await self._steps.audit(
                case,
                "system",
                "urgency",
                f"urgency {case.urgency} -> {urgency} from the new time to failure",
                _diagnosis_evidence(diagnosis),
            )
        if changed != case:
            case = await self._steps.save(case, **_diff(case, changed))
        # a diagnosis that closed with the fix and opens again: the fault is back
        if (
            case.state == "verifying"
            and case.fix_at is not None
            and diagnosis.status == "open"
            and diagnosis.updated_at > case.fix_at + timedelta(seconds=self.config.settle_s)
        ):
            return await self._verification.not_verified(
                case, "the fault came back after the fix", _diagnosis_evidence(diagnosis)
            )
        return case

    # -- the owner's and technician's requests (CaseActions) ---------------------------------
    async def accept_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner agrees to the remote fix the case waits for."""
        return await self._remote.accept_fix(owner_id, case_id)

    async def decline_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner declines the remote fix; a visit is offered instead."""
        return await self._remote.decline_fix(owner_id, case_id)

    async def choose_slot(self, owner_id: str, case_id: str, slot_index: int) -> Appointment:
        """The owner books one of the offered slots."""
        return await self._visits.choose_slot(owner_id, case_id, slot_index)

    async def request_other_slots(self, owner_id: str, case_id: str) -> Appointment:
        """The owner asks for other times: of the offer, or instead of the booked visit.

        See :meth:`notifier.loop.visits.Visits.request_other_slots`.
        """
        return await self._visits.request_other_slots(owner_id, case_id)

    async def decline_visit(self, owner_id: str, case_id: str) -> Case:
        """The owner does not want a visit: the offer is withdrawn or the booked visit cancelled."""
        return await self._visits.decline_visit(owner_id, case_id)

    async def rate(
        self,
        owner_id: str,
        case_id: str,
        stars: int,
        comment: str | None = None,
        *,
        nothing_wrong: bool = False,
    ) -> Rating:
        """The owner rates a resolved case."""
        if not 1 <= stars <= 5:
            raise InvalidRequestError("stars must be from 1 to 5")
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            if case.state not in ("resolved", "escalated"):
                raise ConflictError("a case can be rated once it is resolved")
            comment = (comment or "").strip() or None
            rating = Rating(case.case_id, stars, comment, nothing_wrong, self._steps.clock())
            await self.store.add_rating(rating)
            await self._steps.audit(
                case,
                "owner",
                "rating",
                f"the owner rated it {stars} of 5",
                {"stars": stars, "nothing_wrong": nothing_wrong, "comment": comment is not None},
            )
            reasons = []
            if stars <= self.config.low_rating:
                reasons.append(f"low rating ({stars} of 5)")
            if nothing_wrong:
                reasons.append("the owner says nothing was wrong (possible false alarm)")
            if comment:
                reasons.append("the owner left a comment")
            if reasons:
                reason = "; ".join(reasons)
                await self.store.add_task(
                    Task(uuid.uuid4().hex[:16], case.case_id, reason, self._steps.clock())
                )
                if case.state == "resolved":
                    await self._steps.move(
                        case, "escalated", reason, actor="owner", needs_person=reason, rating=stars
                    )
                else:
                    await self._steps.save(case, rating=stars, needs_person=reason)
            else:
                await self._steps.save(case, rating=stars)
            return rating

    async def complete_visit(
        self, technician_id: str, appointment_id: str, note: str | None = None
    ) -> Appointment:
        """The technician marks the visit done; the device is verified again."""
        return await self._visits.complete_visit(technician_id, appointment_id, note)

    # -- timers ------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Run due timers: command retries, verification checks, expiry of stale cases."""
        now = self._steps.clock()
        hold = now + timedelta(seconds=self.config.lease_s)
        while True:
            timers = await self.store.take_timers(now=now, hold_until=hold, limit=_TIMER_BATCH)
            for timer in timers:
                await self._fire(timer, now)
            if len(timers) < _TIMER_BATCH:
                break
        await self._expire(now)
        if now >= self._resume_due:
            self._resume_due = now + timedelta(seconds=self.config.resume_opened_after_s / 2)
            await self._resume_opened(now)
        if now >= self._reminders_due:
            self._reminders_due = now + _REMINDER_CHECK
            await self._visits.remind(now)

    async def _fire(self, timer: CaseTimer, now: datetime) -> None:
        """Run one due timer this instance took; it is removed unless set again."""
        case_id = timer.case_id
        try:
            case = await self.store.get_case(case_id)
            if case is not None:
                async with self._steps.lock(f"{case.device_id}/{case.fault}"):
                    case = await self._steps.fresh(case)
                    if timer.what == "verify" and case.state == "verifying":
                        await self._verification.verify(case)
                    elif timer.what == "retry" and case.state == "remote_fix":
                        await self._remote.spawn_command(case)
            await self.store.finish_timer(timer)
        except (ConflictError, TransientError) as exc:
            _LOG.warning("case %s: %s; trying again", case_id, exc)
            with contextlib.suppress(TransientError):
                # the timer taken, not the case's: a timer set meanwhile (the holder of
                # the case's lease went on with it) is its next step and stays
                await self.store.postpone_timer(timer, now + timedelta(seconds=5))
        except Exception:
            # one case that trips its timer must not stop every other case's
            self._steps.case_failed(case_id, f"its {timer.what} timer")

    async def _expire(self, now: datetime) -> None:
        limit = timedelta(seconds=self.config.consent_expiry_s)
        for case in await self.store.cases(states=["awaiting_consent", "appointment_proposed"]):
            if now - case.updated_at < limit:
                continue
            try:
                async with self._steps.lock(f"{case.device_id}/{case.fault}"):
                    case = await self._steps.fresh(case)
                    if case.state in ("awaiting_consent", "appointment_proposed"):
                        await self._steps.move(case, "expired", "the owner did not answer in time")
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; expiry tried again later", case.case_id, exc)
            except Exception:
                self._steps.case_failed(case.case_id, "expiry")

    async def run(self) -> None:
        """Run the timers until cancelled."""
        while True:
            await self.tick()
            await asyncio.sleep(self.config.tick_s)


_REMINDER_CHECK: Final = timedelta(seconds=60)


def _opening(case: Case) -> list[Notice]:
    """What a new case tells its owner with its first step: a safety warning if critical.

    Keyed by the case alone: a first step made again (after a crash, by another
    instance) does not warn twice.
    """
    if case.urgency != "critical":
        return []
    return [Notice("urgent_safety", urgent=True, key=f"{case.case_id}/urgent_safety")]


#: Due timers taken from the store at a time.
_TIMER_BATCH: Final = 100
_URGENCY_RANK: Final = {"low": 0, "normal": 1, "high": 2, "critical": 3}


def _diff(old: Case, new: Case) -> dict[str, Any]:
    return {
        name: getattr(new, name)
        for name in ("confidence", "failure_at", "urgency")
        if getattr(old, name) != getattr(new, name)
    }


def _diagnosis_evidence(diagnosis: Diagnosis) -> dict[str, Any]:
    ttf = diagnosis.time_to_failure
    return {
        "diagnosis_id": diagnosis.id,
        "status": diagnosis.status,
        "source": diagnosis.source,
        "confidence": round(diagnosis.confidence, 3),
        "score": round(diagnosis.score, 3),
        "at": diagnosis.updated_at.isoformat(),
        "time_to_failure_s": None if ttf is None else round(ttf.p50_s),
        "drivers": [f"{c.feature} z={c.z:+.1f}" for c in diagnosis.drivers[:3]],
        "evidence": list(diagnosis.evidence[:5]),
    }
