"""The case machine (notifier, "Decide", "Act", "Verify", "Close" of the loop).

:class:`OwnerLoop` turns :class:`~diagnostics.Diagnosis` messages into cases and carries
each case through its lifecycle (:data:`notifier.model.TRANSITIONS`):

1. **open** one case per device and fault (a repeated diagnosis updates it), with an
   urgency from the predicted time to failure;
2. **remote fix** first: the catalog's remote remedies that can cure the fault, in
   catalog order, each once; run at once or after the owner's consent, as the owner's
   consent policy says; a device that refuses (an interlock: door open, mid-cycle) or does
   not answer is asked again later, a few times, before the next remedy;
3. **verify** from the stored scores: after a settling time the device's scores must stay
   at its healthy baseline for a window of device time, and the fault must not come back;
4. **appointment** when no remote remedy is left: the planner's best slots before the
   predicted failure; the owner books one, asks for others or declines; until the visit
   starts the owner may move it (its time is freed and new slots offered, a few times
   before a person takes over) or cancel it; the technician completes the visit and the
   device is verified again;
5. **close**: resolved with the owner told and asked once for a rating; a low rating, a
   comment or "nothing was wrong" hands the case to a person.

Every decision is written to the audit trail with its reason and evidence. Commands run
as tasks of the loop's task group; a lock per case keeps a diagnosis, a command result
and an owner's request from interleaving on one case, and the store's compare-and-set on
the state catches anything else.

**Side by side** (issue 15). Any number of case machines may share one store (notifier
instances on PostgreSQL; one on SQLite takes the same paths). The lock per case is a
lease in the store (:meth:`~notifier.store.CaseStore.take_lease`) on the case's key
(device and fault), held by one instance while it handles the case and expiring after
``lease_s``, so a case is handled by one instance at a time and a dead instance's cases
move on. A case's timer (a command to send again, a fix to check) is a row in the store:
any instance takes the due ones (``FOR UPDATE SKIP LOCKED``), and a remote fix waiting
for its device keeps a timer too, so a fix whose instance died is sent again elsewhere.
A step and the message it calls for are one transaction (:meth:`OwnerLoop._commit`,
with a :class:`StepNotifier`): an instance that dies mid-step never leaves a case moved
and its owner not told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable

from diagnostics import CATALOG, Diagnosis, ModelCatalog
from notifier.actions import HealthPoint, HealthReader
from notifier.campaigns import campaign_fault, check_campaign_action, open_campaign_case
from notifier.errors import (
    CaseBusyError,
    ConflictError,
    IllegalTransitionError,
    InvalidRequestError,
    NotFoundError,
)
from notifier.model import (
    TRANSITIONS,
    Actor,
    Appointment,
    AuditEntry,
    Case,
    CaseState,
    Notification,
    Owner,
    Rating,
    Slot,
    Task,
)
from notifier.scheduling import PlannerConfig, check_bookable, plan_slots, urgency_from
from notifier.store import CaseStore, CaseTimer, NewMessage, TimerKind
from wire.errors import PermanentError, TransientError
from wire.protocol import CommandAction, Event

__all__ = [
    "CaseSink",
    "DeviceCommander",
    "LoopConfig",
    "Notice",
    "OwnerLoop",
    "OwnerNotifier",
    "StepNotifier",
    "notice_key",
]

_LOG = logging.getLogger(__name__)

#: Remote actions that take the appliance out of use for a while (consent policy).
INTERRUPTING: Final = frozenset(("restart", "firmware_update", "cleaning_cycle"))
#: Faults whose urgency is critical whatever the time to failure (food, water, heat).
SAFETY_FAULTS: Final = frozenset(("refrigerant_leak",))
_SERVICE: Final = "technician_visit"
#: Audit steps of a booked visit the owner moved or cancelled (its time freed).
_MOVED: Final = "visit_moved"
_CANCELLED: Final = "visit_cancelled"


@dataclass(frozen=True, slots=True)
class LoopConfig:
    """Timing and limits of the case machine.

    Attributes:
        command_timeout_s: how long to wait for a device's command result.
        retry_after_s: wall time before a refused or unanswered command is sent again.
        max_refusals: refusals or timeouts of one remedy before the next one.
        settle_s: device time after a fix before its scores count (a reboot, a cycle).
        verify_window_s: device time the scores must stay healthy to call it fixed.
        healthy_score: a score below this is healthy.
        healthy_share: share of scores in the window that must be healthy.
        verify_timeout_s: wall time after which a check that saw too little data fails.
        consent_expiry_s: wall time an unanswered consent request or slot offer waits.
        tick_s: how often timers (retries, checks, expiry) are looked at.
        low_rating: ratings at or below this go to a person.
        max_reschedules: how often an owner may move a booked visit; asking once more
            hands the case to a person, who agrees a time with the owner.
        reminder_before_s: how long before a booked visit the owner is reminded of it
            (once per visit; 0: never).
        firmware: the firmware version to install, by product model.
        planner: the appointment planner's settings.
        resume_opened_after_s: wall time after which a case still ``opened`` (a
            campaign's, opened by the standalone dashboard; one whose first step failed)
            gets its first step from the timers.
        lease_s: how long an instance's lease on a case lasts (it gives it up when done;
            one that died loses it after this long), and how long a timer it took stays
            hidden from the others while it handles it.
    """

    command_timeout_s: float = 30.0
    retry_after_s: float = 300.0
    max_refusals: int = 3
    settle_s: float = 600.0
    verify_window_s: float = 3_600.0
    healthy_score: float = 0.3
    healthy_share: float = 0.9
    verify_timeout_s: float = 6 * 3_600.0
    consent_expiry_s: float = 7 * 86_400.0
    tick_s: float = 1.0
    low_rating: int = 2
    max_reschedules: int = 3
    reminder_before_s: float = 86_400.0
    firmware: Mapping[str, str] = field(default_factory=dict)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    resume_opened_after_s: float = 10.0
    lease_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Notice:
    """What a message to the owner is about, beyond the case itself.

    Attributes:
        kind: the message template (``consent_request``, ``fixed_remotely`` ...).
        action: the remote remedy concerned.
        reason: the device's words when it refused.
        slots: offered slots.
        appointment: the booked visit.
        urgent: may override quiet hours.
        key: the message's idempotency key (``None``: one per case version and kind,
            :func:`notice_key`).
    """

    kind: str
    action: str | None = None
    reason: str | None = None
    slots: tuple[Slot, ...] = ()
    appointment: Appointment | None = None
    urgent: bool = False
    key: str | None = None


def notice_key(case: Case, notice: Notice) -> str:
    """A message's idempotency key: the same for the same step of the same case.

    A case's version is its state and ``updated_at`` (a move or a save makes a new one,
    and only one instance's compare-and-set wins it), so a step done again after a
    crash or by a second instance writes the same key and the store keeps one message.
    """
    if notice.key is not None:
        return notice.key
    parts = [case.case_id, notice.kind, case.state, case.updated_at.isoformat()]
    if notice.action is not None:
        parts.append(notice.action)
    if notice.appointment is not None:
        parts.append(notice.appointment.appointment_id)
    return "/".join(parts)


class OwnerNotifier(Protocol):
    """Writes and delivers messages to owners (:class:`notifier.outbox.Outbox`)."""

    async def notify(self, owner: Owner, case: Case, notice: Notice) -> None:
        """Tell the owner; must not raise for delivery trouble (it keeps the message)."""


@runtime_checkable
class StepNotifier(OwnerNotifier, Protocol):
    """An :class:`OwnerNotifier` whose messages are kept in the step that calls for them.

    The case machine has the message written first (:meth:`prepare`), keeps it with the
    case's step in one transaction (:meth:`~notifier.store.CaseStore.update_case`), and
    hands what was kept to delivery (:meth:`hand_over`): a process that dies between the
    two no longer leaves a case moved and its owner not told.
    """

    async def prepare(self, owner: Owner, case: Case, notice: Notice) -> NewMessage:
        """Write the message for the case as it will be stored."""

    def hand_over(self, owner: Owner, kept: Notification, urgent: bool) -> None:
        """Deliver a message the step kept (or count it, kept ``held``)."""


class DeviceCommander(Protocol):
    """Sends a command and returns the device's result (``wire.commands.CommandChannel``)."""

    async def send(
        self,
        device_id: str,
        action: CommandAction,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        """Publish a command and wait for its ``command_result`` event."""


#: Called with every changed case (the service publishes it on ``fleet/cases``).
CaseSink = Callable[[Case], Awaitable[None]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def _no_sink(_: Case) -> None:
    return None


class _CaseLock:
    """One case's lock: this process's lock on the key, then the store's lease on it."""

    __slots__ = ("_key", "_loop")

    def __init__(self, loop: OwnerLoop, key: str) -> None:
        self._loop = loop
        self._key = key

    async def __aenter__(self) -> None:
        lock = self._loop._local_lock(self._key)
        await lock.acquire()
        try:
            await self._loop._take_lease(self._key)
        except BaseException:
            lock.release()
            raise

    async def __aexit__(self, *_: object) -> None:
        try:
            await self._loop._drop_lease(self._key)
        finally:
            self._loop._local_lock(self._key).release()


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
        self._sink = sink
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self.holder = holder or f"notifier-{secrets.token_hex(4)}"
        self._group: asyncio.TaskGroup | None = None
        self._running: set[str] = set()
        self._fix_tasks: set[asyncio.Task[None]] = set()
        self._reminded: set[str] = set()
        self._reminders_due = datetime.min.replace(tzinfo=UTC)
        self._resume_due = datetime.min.replace(tzinfo=UTC)
        self.diagnoses_seen = 0
        self.unowned = 0
        #: case steps (timers, expiry, reminders, commands) that raised the unforeseen
        self.timer_errors = 0
        #: leases taken; how often one was held by another instance at first; how often
        #: one ran out while held (a step that took longer than ``lease_s``)
        self.leases_taken = 0
        self.lease_waits = 0
        self.leases_overrun = 0

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        await self._resume()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        # a remote fix waiting for its device (up to command_timeout_s) must not hold the
        # shutdown: it is cancelled, and the case, still in remote_fix, is taken up again
        # at the next start (_resume), as after a crash
        for task in list(self._fix_tasks):
            task.cancel()
        if group is not None:
            await group.__aexit__(exc_type, exc, tb)

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
        return len(self._running)

    # -- helpers ---------------------------------------------------------------------
    def _lock(self, key: str) -> _CaseLock:
        """The lock on one case (``device/fault``): here and, by a lease, in the store."""
        return _CaseLock(self, key)

    def _local_lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _take_lease(self, key: str) -> None:
        """Take the store's lease on a case key, waiting while another instance holds it.

        Raises:
            CaseBusyError: another instance kept it for longer than a lease lasts.
        """
        lease = timedelta(seconds=self.config.lease_s)
        deadline = time.monotonic() + self.config.lease_s + 5.0
        pause_s = 0.02
        while True:
            now = self._clock()
            if await self.store.take_lease(key, self.holder, now=now, until=now + lease):
                self.leases_taken += 1
                return
            if pause_s == 0.02:
                self.lease_waits += 1
            if time.monotonic() >= deadline:
                raise CaseBusyError(f"case {key} is being handled by another notifier")
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.5)

    async def _drop_lease(self, key: str) -> None:
        try:
            held = await self.store.drop_lease(key, self.holder)
        except TransientError as exc:
            # it runs out by itself
            _LOG.warning("lease on %s not given up (%s); it expires", key, exc)
            return
        if not held:
            # another instance may have handled the case meanwhile: lease_s is too short
            self.leases_overrun += 1
            _LOG.warning(
                "case %s: its lease ran out while held (a step took over %s s)",
                key,
                self.config.lease_s,
            )

    async def _set_timer(self, case: Case, what: TimerKind, after_s: float) -> None:
        due = self._clock() + timedelta(seconds=after_s)
        await self.store.set_timer(CaseTimer(case.case_id, what, due))

    async def _audit(
        self,
        case: Case | None,
        actor: Actor,
        action: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
        *,
        from_state: str | None = None,
        to_state: str | None = None,
    ) -> None:
        await self.store.add_audit(
            AuditEntry(
                case_id=None if case is None else case.case_id,
                at=self._clock(),
                actor=actor,
                action=action,
                reason=reason,
                evidence=evidence or {},
                from_state=from_state,
                to_state=to_state,
            )
        )

    async def _move(
        self,
        case: Case,
        state: CaseState,
        reason: str,
        *,
        actor: Actor = "system",
        evidence: dict[str, Any] | None = None,
        tell: Sequence[Notice] = (),
        **changes: Any,
    ) -> Case:
        """Move a case to ``state`` (audited, stored by compare-and-set, published).

        The owner is told ``tell`` in the same step (:meth:`_commit`).
        """
        if state not in TRANSITIONS[case.state]:
            raise IllegalTransitionError(f"a case cannot go from {case.state} to {state}")
        moved = replace(case, state=state, updated_at=self._clock(), **changes)
        entry = AuditEntry(
            case_id=case.case_id,
            at=moved.updated_at,
            actor=actor,
            action="transition",
            reason=reason,
            evidence=evidence or {},
            from_state=case.state,
            to_state=state,
        )
        await self._commit(case, moved, [entry], tell)
        _LOG.info("case %s: %s -> %s (%s)", case.case_id, case.state, state, reason)
        return moved

    async def _save(
        self,
        case: Case,
        *,
        entries: Sequence[AuditEntry] = (),
        tell: Sequence[Notice] = (),
        **changes: Any,
    ) -> Case:
        """Change a case in its state (by compare-and-set, with ``entries`` and ``tell``)."""
        changed = replace(case, updated_at=self._clock(), **changes)
        await self._commit(case, changed, list(entries), tell)
        return changed

    async def _commit(
        self, before: Case, after: Case, entries: list[AuditEntry], tell: Sequence[Notice]
    ) -> None:
        """Store one step of a case: the case, its lines in the trail, its messages.

        One transaction (a reader, or a crash, never sees a case in a state its trail does
        not explain, nor a step whose message is missing); then the change is published
        and the messages kept are handed to delivery. A notifier that cannot write its
        messages first (a test's) tells the owner after the step instead.
        """
        prepared: list[tuple[Notice, NewMessage]] = []
        after_step: list[Notice] = []
        owner = await self.store.get_owner(after.owner_id) if tell else None
        steps = self.notifier if isinstance(self.notifier, StepNotifier) else None
        if owner is not None and steps is None:
            after_step = list(tell)
        elif owner is not None and steps is not None:
            for notice in tell:
                try:
                    prepared.append((notice, await steps.prepare(owner, after, notice)))
                except TransientError:
                    raise
                except Exception:
                    # the step goes on; a person sees in the trail the owner was not told
                    self._case_failed(after.case_id, f"telling the owner ({notice.kind})")
                    entries.append(self._told_entry(after, notice, told=False))
        entries.extend(self._told_entry(after, notice, told=True) for notice, _ in prepared)
        kept = await self.store.update_case(
            after,
            expected_state=before.state,
            audit=entries,
            messages=[message for _, message in prepared],
        )
        await self._publish(after)
        if owner is not None and steps is not None:
            for (notice, _), message in zip(prepared, kept, strict=True):
                if message is not None:
                    steps.hand_over(owner, message, notice.urgent)
        for notice in after_step:
            await self._tell(after, notice)

    def _told_entry(self, case: Case, notice: Notice, *, told: bool) -> AuditEntry:
        return AuditEntry(
            case_id=case.case_id,
            at=self._clock(),
            actor="system",
            action="notify" if told else "notify_failed",
            reason=f"told the owner: {notice.kind}"
            if told
            else f"could not tell the owner: {notice.kind}",
            evidence={"kind": notice.kind, "action": notice.action, "urgent": notice.urgent},
        )

    async def _publish(self, case: Case) -> None:
        try:
            await self._sink(case)
        except TransientError as exc:
            _LOG.warning("case %s: change not published (%s)", case.case_id, exc)

    async def _owner(self, owner_id: str) -> Owner:
        owner = await self.store.get_owner(owner_id)
        if owner is None:
            raise NotFoundError(f"no owner {owner_id}")
        return owner

    async def _tell(self, case: Case, notice: Notice) -> None:
        owner = await self.store.get_owner(case.owner_id)
        if owner is None:
            return
        try:
            await self.notifier.notify(owner, case, notice)
        except TransientError:
            raise
        except Exception:
            # the case goes on; a person sees in the trail that the owner was not told
            self._case_failed(case.case_id, f"telling the owner ({notice.kind})")
            await self.store.add_audit(self._told_entry(case, notice, told=False))
            return
        await self.store.add_audit(self._told_entry(case, notice, told=True))

    async def _owned_case(self, owner_id: str, case_id: str) -> Case:
        case = await self.store.get_case(case_id)
        if case is None or case.owner_id != owner_id:
            raise NotFoundError(f"no case {case_id}")
        return case

    def _next_remote(self, case: Case) -> str | None:
        """The next remote remedy that can cure the fault and was not tried yet."""
        for remedy in case.remedies:
            if remedy.startswith(_SERVICE) or remedy.startswith("~"):
                continue
            if remedy not in case.tried:
                return remedy
        return None

    @staticmethod
    def _service_part(case: Case) -> str | None:
        for remedy in case.remedies:
            if remedy.startswith(_SERVICE):
                _, _, part = remedy.partition(":")
                return part or None
        return None

    @staticmethod
    def _has_service(case: Case) -> bool:
        return any(r.startswith(_SERVICE) for r in case.remedies)

    # -- diagnoses in ------------------------------------------------------------------
    async def handle_diagnosis(self, diagnosis: Diagnosis) -> Case | None:
        """Open, update or note a case for a diagnosis; return the case touched."""
        self.diagnoses_seen += 1
        key = f"{diagnosis.device_id}/{diagnosis.fault}"
        async with self._lock(key):
            case = await self.store.open_case(diagnosis.device_id, diagnosis.fault)
            if diagnosis.status == "closed":
                if case is not None:
                    await self._audit(
                        case,
                        "system",
                        "diagnosis_closed",
                        "the device's scores are back to normal",
                        {"score": diagnosis.score, "at": diagnosis.updated_at.isoformat()},
                    )
                return case
            if case is None:
                return await self._open(diagnosis)
            return await self._update(case, diagnosis)

    def _remedies(self, diagnosis: Diagnosis) -> tuple[str, ...]:
        """The case's remedies: curing remote actions and visits, in catalog order."""
        out: list[str] = []
        for remedy in diagnosis.remedies:
            if remedy.kind == "service":
                out.append(f"{_SERVICE}:{remedy.part or ''}")
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
        now = self._clock()
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
        await self._audit(
            case,
            "system",
            "transition",
            f"diagnostics named {diagnosis.fault} (confidence {diagnosis.confidence:.2f})",
            _diagnosis_evidence(diagnosis),
            to_state="opened",
        )
        await self._publish(case)
        return await self._advance(case, "the case opened", tell=_opening(case))

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
            async with self._lock(f"{device_id}/{fault}"):
                case = await open_campaign_case(
                    self.store,
                    device_id,
                    action,
                    reason,
                    devices=len(device_ids),
                    now=self._clock(),
                )
                if case is None:
                    continue
                await self._publish(case)
                await self._advance(case, "a pre-emptive campaign")
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
                async with self._lock(f"{case.device_id}/{case.fault}"):
                    case = await self._fresh(case)
                    if case.state != "opened":
                        continue
                    await self._publish(case)
                    await self._advance(
                        case, "the case was waiting for its first step", tell=_opening(case)
                    )
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; its first step is tried again later", case.case_id, exc)
            except Exception:
                self._case_failed(case.case_id, "its first step")

    async def _update(self, case: Case, diagnosis: Diagnosis) -> Case:
        now = self._clock()
        ttf = diagnosis.time_to_failure
        failure_at = case.failure_at if ttf is None else now + timedelta(seconds=ttf.p50_s)
        urgency = urgency_from(failure_at, now, safety=diagnosis.fault in SAFETY_FAULTS)
        if _URGENCY_RANK[urgency] < _URGENCY_RANK[case.urgency]:
            urgency = case.urgency  # urgency only rises while a case is open
        changed = replace(case, confidence=diagnosis.confidence, failure_at=failure_at)
        if urgency != case.urgency:
            changed = replace(changed, urgency=urgency)
            await self._audit(
                case,
                "system",
                "urgency",
                f"urgency {case.urgency} -> {urgency} from the new time to failure",
                _diagnosis_evidence(diagnosis),
            )
        if changed != case:
            case = await self._save(case, **_diff(case, changed))
        # a diagnosis that closed with the fix and opens again: the fault is back
        if (
            case.state == "verifying"
            and case.fix_at is not None
            and diagnosis.status == "open"
            and diagnosis.updated_at > case.fix_at + timedelta(seconds=self.config.settle_s)
        ):
            return await self._not_verified(
                case, "the fault came back after the fix", _diagnosis_evidence(diagnosis)
            )
        return case

    # -- deciding the next step ----------------------------------------------------------
    async def _advance(self, case: Case, why: str, *, tell: Sequence[Notice] = ()) -> Case:
        """Pick the next remedy for a case that is not waiting on anything.

        ``tell``: messages to keep with that step besides its own (a new case's urgent
        safety message).
        """
        action = self._next_remote(case)
        if action is not None:
            owner = await self.store.get_owner(case.owner_id)
            policy = "ask_if_interrupting" if owner is None else owner.consent
            ask = policy == "always_ask" or (
                policy == "ask_if_interrupting" and action in INTERRUPTING
            )
            if ask:
                return await self._move(
                    case,
                    "awaiting_consent",
                    f"{action} interrupts use; the owner's policy ({policy}) asks first",
                    evidence={"action": action, "after": why},
                    tell=[*tell, Notice("consent_request", action=action)],
                    pending_action=action,
                )
            return await self._start_fix(
                case, action, f"{why}; {policy} allows {action}", tell=tell
            )
        if self._has_service(case):
            return await self._propose(case, f"{why}; no remote remedy left", tell=tell)
        return await self._to_person(
            case, f"{why}; the catalog has no remedy for this fault", tell=tell
        )

    async def _start_fix(
        self, case: Case, action: str, reason: str, *, tell: Sequence[Notice] = ()
    ) -> Case:
        case = await self._move(
            case,
            "remote_fix",
            reason,
            evidence={"action": action},
            tell=tell,
            pending_action=action,
            tried=(*case.tried, action),
        )
        await self._spawn_command(case)
        return case

    async def _spawn_command(self, case: Case) -> None:
        """Send the case's pending command in a task of its own.

        The case's timer is set to when the command's answer is overdue: if this
        instance dies meanwhile, another sends it again then.
        """
        if case.case_id in self._running:
            # its command is still under way here (a next remedy chosen in its task):
            # the timers send it once that task ends
            await self._set_timer(case, "retry", self.config.tick_s)
            return
        await self._set_timer(case, "retry", self.config.command_timeout_s + self.config.lease_s)
        self._running.add(case.case_id)
        if self._group is None:
            raise InvalidRequestError("the case machine is not running")
        task = self._group.create_task(self._run_command(case.case_id), name=f"fix-{case.case_id}")
        self._fix_tasks.add(task)
        task.add_done_callback(self._fix_tasks.discard)

    def _command_args(self, case: Case, action: str) -> dict[str, float | bool | str]:
        if action == "firmware_update":
            version = self.config.firmware.get(case.model)
            if version is None:
                raise InvalidRequestError(f"no firmware release is set for {case.model}")
            return {"version": version}
        return {}

    async def _run_command(self, case_id: str) -> None:
        try:
            await self._command_once(case_id)
        except PermanentError as exc:
            _LOG.warning("case %s: command step failed: %s", case_id, exc)
        except Exception:
            # a task of the case machine's group: raising here would stop every case
            self._case_failed(case_id, "the remote fix")
        finally:
            self._running.discard(case_id)

    async def _command_once(self, case_id: str) -> None:
        case = await self.store.get_case(case_id)
        if case is None or case.state != "remote_fix" or case.pending_action is None:
            return
        action = case.pending_action
        try:
            args = self._command_args(case, action)
        except InvalidRequestError as exc:
            async with self._lock(f"{case.device_id}/{case.fault}"):
                case = await self._fresh(case)
                await self._audit(case, "system", "command_skipped", str(exc), {"action": action})
                await self._after_failed_remedy(case, str(exc))
            return
        await self._audit(case, "system", "command", f"sent {action}", {"action": action, **args})
        try:
            result: Event | None = await self.commands.send(
                case.device_id,
                action,  # type: ignore[arg-type]
                args,
                timeout_s=self.config.command_timeout_s,
            )
            error = None
        except TransientError as exc:
            result, error = None, str(exc)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            if case.state != "remote_fix":
                return
            if result is not None and result.ok:
                case = await self._move(
                    case,
                    "verifying",
                    f"the device did {action}: {result.detail or 'ok'}",
                    evidence={"action": action, "detail": result.detail, "code": result.code},
                    fix_at=result.ts,
                )
                await self._set_timer(case, "verify", self.config.tick_s)
                return
            reason = error or (result.detail if result is not None else None) or "no answer"
            refusals = await self._refusals(case, action)
            refused = AuditEntry(
                case_id=case.case_id,
                at=self._clock(),
                actor="system",
                action="command_refused",
                reason=f"{action} not done: {reason}",
                evidence={"action": action, "reason": reason, "refusals": refusals + 1},
            )
            if refusals + 1 < self.config.max_refusals:
                # the refusal and the owner's message are one step
                tell = []
                if refusals == 0 and result is not None:
                    tell = [Notice("fix_waiting", action=action, reason=reason)]
                case = await self._save(case, entries=[refused], tell=tell)
                await self._set_timer(case, "retry", self.config.retry_after_s)
                return
            await self.store.add_audit(refused)
            await self._after_failed_remedy(case, f"{action} could not be done: {reason}")

    async def _refusals(self, case: Case, action: str) -> int:
        return sum(
            1
            for entry in await self.store.audit(case.case_id)
            if entry.action == "command_refused" and entry.evidence.get("action") == action
        )

    async def _fresh(self, case: Case) -> Case:
        fresh = await self.store.get_case(case.case_id)
        if fresh is None:
            raise NotFoundError(f"case {case.case_id} is gone")
        return fresh

    async def _after_failed_remedy(self, case: Case, why: str) -> Case:
        """A remedy did not work: the next remote one, a visit, or a person."""
        action = self._next_remote(case)
        if action is not None:
            return await self._start_fix(case, action, f"{why}; trying {action} next")
        if self._has_service(case):
            return await self._propose(case, f"{why}; a technician is needed")
        return await self._to_person(case, f"{why}; nothing else to try remotely")

    async def _to_person(self, case: Case, reason: str, *, tell: Sequence[Notice] = ()) -> Case:
        case = await self._move(
            case,
            "escalated",
            reason,
            tell=[*tell, Notice("not_fixed_escalated")],
            needs_person=reason,
        )
        await self.store.add_task(Task(uuid.uuid4().hex[:16], case.case_id, reason, self._clock()))
        return case

    # -- verification ---------------------------------------------------------------------
    async def _verify(self, case: Case) -> Case:
        """Check a verifying case's scores; resolve, fail, or look again later."""
        assert case.fix_at is not None
        config = self.config
        start = case.fix_at + timedelta(seconds=config.settle_s)
        points = await self.health.since(case.device_id, start)
        evidence = _health_evidence(points, config.healthy_score)
        span_s = (points[-1].at - start).total_seconds() if points else 0.0
        if span_s >= config.verify_window_s:
            window = [p for p in points if (p.at - start).total_seconds() <= config.verify_window_s]
            healthy = sum(1 for p in window if p.score < config.healthy_score)
            if healthy >= config.healthy_share * len(window):
                return await self._resolved(case, evidence)
            return await self._not_verified(
                case,
                f"only {healthy} of {len(window)} scores healthy in the check window",
                evidence,
            )
        waited_s = (self._clock() - case.updated_at).total_seconds()
        if waited_s >= config.verify_timeout_s:
            return await self._not_verified(
                case, f"too little data after the fix ({len(points)} scores)", evidence
            )
        await self._set_timer(case, "verify", config.tick_s)
        return case

    async def _resolved(self, case: Case, evidence: dict[str, Any]) -> Case:
        visited = case.appointment_id is not None
        last = case.tried[-1] if case.tried else None
        return await self._move(
            case,
            "resolved",
            "the device's scores stayed at its healthy baseline after the fix",
            evidence=evidence,
            tell=[
                Notice("resolved" if visited else "fixed_remotely", action=last),
                Notice("rating_request"),
            ],
        )

    async def _not_verified(self, case: Case, why: str, evidence: dict[str, Any]) -> Case:
        await self._audit(case, "system", "verification_failed", why, evidence)
        if case.appointment_id is not None:
            return await self._to_person(case, f"still not right after the visit: {why}")
        return await self._after_failed_remedy(case, f"the check failed: {why}")

    # -- appointments ------------------------------------------------------------------------
    async def _plan(
        self, case: Case, *, exclude: Sequence[Slot] = (), freed: Appointment | None = None
    ) -> list[Slot]:
        """The planner's best slots for a case (``freed``: a visit of its own not to count)."""
        owner = await self._owner(case.owner_id)
        now = self._clock()
        technicians = await self.store.technicians(owner.region)
        booked = await self.store.appointments(states=["booked"], since=now - timedelta(days=1))
        if freed is not None:
            booked = [a for a in booked if a.appointment_id != freed.appointment_id]
        return plan_slots(
            technicians=technicians,
            booked=booked,
            owner=owner,
            part=self._service_part(case),
            urgency=case.urgency,
            now=now,
            failure_at=case.failure_at,
            exclude=exclude,
            config=self.config.planner,
        )

    async def _propose(
        self,
        case: Case,
        why: str,
        *,
        exclude: Sequence[Slot] = (),
        actor: Actor = "system",
        tell: Sequence[Notice] = (),
    ) -> Case:
        slots = await self._plan(case, exclude=exclude)
        if not slots:
            return await self._to_person(case, f"{why}; no technician has a free slot", tell=tell)
        return await self._offer(case, slots, why, actor=actor, tell=tell)

    async def _offer(
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
        part = self._service_part(case)
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
        case = await self._move(
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

    async def _booked_visit(self, case: Case, change: str) -> Appointment:
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
        now = self._clock()
        if visit.start is not None and visit.start <= now:
            if visit.end is not None and visit.end <= now:
                raise ConflictError(
                    f"the time of this visit has passed, so it can no longer be {change}"
                )
            raise ConflictError(f"this visit has already started, so it can no longer be {change}")
        return visit

    async def _release(self, case: Case, visit: Appointment, change: str) -> Appointment:
        """Free a booked visit's time in the store (atomic: it must not have started)."""
        try:
            released = await self.store.release(visit.appointment_id, now=self._clock())
        except ConflictError as exc:
            raise ConflictError(f"this visit can no longer be {change}: {exc}") from exc
        _LOG.info("case %s: visit %s released (%s)", case.case_id, visit.appointment_id, change)
        return released

    async def _moves(self, case: Case) -> int:
        """How often the owner moved a booked visit of this case."""
        return sum(1 for entry in await self.store.audit(case.case_id) if entry.action == _MOVED)

    @staticmethod
    def _visit_evidence(visit: Appointment) -> dict[str, Any]:
        return {
            "appointment_id": visit.appointment_id,
            "technician_id": visit.technician_id,
            "start": None if visit.start is None else visit.start.isoformat(),
        }

    async def _reschedule(self, case: Case) -> Appointment:
        """Move a booked visit: free its time and offer new slots, within the limit."""
        visit = await self._booked_visit(case, "moved")
        when = "?" if visit.start is None else visit.start.isoformat()
        moves = await self._moves(case)
        limit = self.config.max_reschedules
        if moves >= limit:
            visit = await self._release(case, visit, "moved")
            await self._audit(
                case,
                "owner",
                _CANCELLED,
                f"the owner asked to move the visit of {when} once more, after {moves} moves",
                {**self._visit_evidence(visit), "moves": moves, "limit": limit},
            )
            reason = (
                f"the owner asked to move the visit again after {moves} moves "
                f"(limit {limit}); a person should agree a time with them"
            )
            case = await self._move(
                case,
                "escalated",
                reason,
                actor="owner",
                evidence={"moves": moves, "limit": limit},
                tell=[Notice("visit_move_limit", appointment=visit)],
                needs_person=reason,
            )
            await self.store.add_task(
                Task(uuid.uuid4().hex[:16], case.case_id, reason, self._clock())
            )
            raise ConflictError(
                f"this visit has been moved {moves} times already; someone from our service "
                "team will call you to find a time that suits you"
            )
        # the booked time itself is what no longer suits: it is not offered again
        booked_time: tuple[Slot, ...] = ()
        if visit.technician_id is not None and visit.start is not None and visit.end is not None:
            booked_time = (Slot(visit.technician_id, visit.start, visit.end),)
        slots = await self._plan(case, exclude=booked_time, freed=visit)
        if not slots:
            raise ConflictError(
                "no other times are free before the repair is due, so your visit stays as booked"
            )
        visit = await self._release(case, visit, "moved")
        await self._audit(
            case,
            "owner",
            _MOVED,
            f"the owner asked to move the visit of {when}; its time is free again",
            {**self._visit_evidence(visit), "moves": moves + 1, "limit": limit},
        )
        case = await self._offer(
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

    async def _proposal(self, case: Case) -> Appointment:
        if case.state != "appointment_proposed" or case.appointment_id is None:
            raise ConflictError("no visit times are on offer for this case")
        appointment = await self.store.get_appointment(case.appointment_id)
        if appointment is None or appointment.state != "proposed":
            raise ConflictError("no visit times are on offer for this case")
        return appointment

    # -- the owner's and technician's requests (CaseActions) ---------------------------------
    async def accept_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner agrees to the remote fix the case waits for."""
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            if case.state != "awaiting_consent" or case.pending_action is None:
                raise ConflictError("this case is not waiting for your go-ahead")
            await self._audit(
                case, "owner", "consent", f"the owner agreed to {case.pending_action}"
            )
            return await self._start_fix(case, case.pending_action, "the owner agreed")

    async def decline_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner declines the remote fix; a visit is offered instead."""
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            if case.state != "awaiting_consent":
                raise ConflictError("this case is not waiting for your go-ahead")
            await self._audit(case, "owner", "consent", f"the owner declined {case.pending_action}")
            if self._has_service(case):
                return await self._propose(case, "the owner declined the remote fix", actor="owner")
            return await self._move(
                case,
                "dismissed",
                "the owner declined the only remedy",
                actor="owner",
                pending_action=None,
            )

    async def choose_slot(self, owner_id: str, case_id: str, slot_index: int) -> Appointment:
        """The owner books one of the offered slots."""
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            proposal = await self._proposal(case)
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
                await self._audit(case, "owner", "slot_taken", "the chosen slot was taken")
                await self._propose(
                    case,
                    "the chosen slot was taken meanwhile",
                    exclude=proposal.offered,
                    actor="owner",
                )
                raise
            await self._move(
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
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            if case.state != "appointment_proposed":
                return await self._reschedule(case)
            proposal = await self._proposal(case)
            seen = list(proposal.offered)
            for earlier in await self.store.appointments(
                case_id=case.case_id, states=["cancelled"]
            ):
                seen.extend(earlier.offered)
            case = await self._propose(
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
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            cancelled: Appointment | None = None
            if case.state != "appointment_proposed":
                visit = await self._booked_visit(case, "cancelled")
                cancelled = await self._release(case, visit, "cancelled")
                when = "?" if visit.start is None else visit.start.isoformat()
                await self._audit(
                    case,
                    "owner",
                    _CANCELLED,
                    f"the owner cancelled the visit of {when}; its time is free again",
                    self._visit_evidence(visit),
                )
            elif case.appointment_id is not None:
                appointment = await self.store.get_appointment(case.appointment_id)
                if appointment is not None and appointment.state == "proposed":
                    await self.store.put_appointment(replace(appointment, state="cancelled"))
            if case.urgency in ("high", "critical"):
                reason = f"the owner declined a visit for an {case.urgency}-urgency fault"
                case = await self._move(
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
                    Task(uuid.uuid4().hex[:16], case.case_id, reason, self._clock())
                )
                return case
            return await self._move(
                case,
                "dismissed",
                "the owner declined a visit",
                actor="owner",
                tell=[]
                if cancelled is None
                else [Notice("visit_cancelled", appointment=cancelled)],
            )

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
        case = await self._owned_case(owner_id, case_id)
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            if case.state not in ("resolved", "escalated"):
                raise ConflictError("a case can be rated once it is resolved")
            comment = (comment or "").strip() or None
            rating = Rating(case.case_id, stars, comment, nothing_wrong, self._clock())
            await self.store.add_rating(rating)
            await self._audit(
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
                    Task(uuid.uuid4().hex[:16], case.case_id, reason, self._clock())
                )
                if case.state == "resolved":
                    await self._move(
                        case, "escalated", reason, actor="owner", needs_person=reason, rating=stars
                    )
                else:
                    await self._save(case, rating=stars, needs_person=reason)
            else:
                await self._save(case, rating=stars)
            return rating

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
        async with self._lock(f"{case.device_id}/{case.fault}"):
            case = await self._fresh(case)
            # the owner may have moved or cancelled it while we waited for the lock
            appointment = await self.store.get_appointment(appointment_id)
            if appointment is None or appointment.state != "booked" or case.state != "booked":
                state = "gone" if appointment is None else appointment.state
                raise ConflictError(f"this visit is {state}, not booked")
            done = replace(appointment, state="done", note=note)
            await self.store.put_appointment(done)
            latest = (await self.health.latest([case.device_id])).get(case.device_id)
            # device time: the scores that count are the device's readings after now
            fix_at = self._clock() if latest is None else latest.at
            case = await self._move(
                case,
                "visited",
                "the technician completed the visit",
                actor="technician",
                evidence={"technician_id": technician_id, "note": note is not None},
                tell=[Notice("visit_done_checking")],
            )
            case = await self._move(
                case, "verifying", "checking the device after the visit", fix_at=fix_at
            )
            await self._set_timer(case, "verify", 0.0)
            return done

    # -- timers ------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Run due timers: command retries, verification checks, expiry of stale cases."""
        now = self._clock()
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
            await self._remind(now)

    async def _fire(self, timer: CaseTimer, now: datetime) -> None:
        """Run one due timer this instance took; it is removed unless set again."""
        case_id = timer.case_id
        try:
            case = await self.store.get_case(case_id)
            if case is not None:
                async with self._lock(f"{case.device_id}/{case.fault}"):
                    case = await self._fresh(case)
                    if timer.what == "verify" and case.state == "verifying":
                        await self._verify(case)
                    elif timer.what == "retry" and case.state == "remote_fix":
                        await self._spawn_command(case)
            await self.store.finish_timer(timer)
        except (ConflictError, TransientError) as exc:
            _LOG.warning("case %s: %s; trying again", case_id, exc)
            with contextlib.suppress(TransientError):
                await self.store.set_timer(
                    CaseTimer(case_id, timer.what, now + timedelta(seconds=5))
                )
        except Exception:
            # one case that trips its timer must not stop every other case's
            self._case_failed(case_id, f"its {timer.what} timer")

    def _case_failed(self, case_id: str, what: str) -> None:
        """Log and count a case step that raised something unforeseen; the others go on."""
        self.timer_errors += 1
        _LOG.exception("case %s: %s failed; the case is left as it is", case_id, what)

    async def _remind(self, now: datetime) -> None:
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
                async with self._lock(f"{case.device_id}/{case.fault}"):
                    case = await self._fresh(case)
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
                        at=self._clock(),
                        actor="system",
                        action="visit_reminder",
                        reason="the visit is near: the owner is reminded of it",
                        evidence={
                            "appointment_id": visit.appointment_id,
                            "start": None if visit.start is None else visit.start.isoformat(),
                        },
                    )
                    # the reminder's line in the trail and the message are one step
                    await self._save(
                        case,
                        entries=[reminded],
                        tell=[Notice("appointment_reminder", appointment=visit)],
                    )
                    self._reminded.add(visit.appointment_id)
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; its reminder is tried again later", case.case_id, exc)

    async def _expire(self, now: datetime) -> None:
        limit = timedelta(seconds=self.config.consent_expiry_s)
        for case in await self.store.cases(states=["awaiting_consent", "appointment_proposed"]):
            if now - case.updated_at < limit:
                continue
            try:
                async with self._lock(f"{case.device_id}/{case.fault}"):
                    case = await self._fresh(case)
                    if case.state in ("awaiting_consent", "appointment_proposed"):
                        await self._move(case, "expired", "the owner did not answer in time")
            except (ConflictError, TransientError) as exc:
                _LOG.warning("case %s: %s; expiry tried again later", case.case_id, exc)
            except Exception:
                self._case_failed(case.case_id, "expiry")

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
        "status": diagnosis.status,
        "source": diagnosis.source,
        "confidence": round(diagnosis.confidence, 3),
        "score": round(diagnosis.score, 3),
        "at": diagnosis.updated_at.isoformat(),
        "time_to_failure_s": None if ttf is None else round(ttf.p50_s),
        "drivers": [f"{c.feature} z={c.z:+.1f}" for c in diagnosis.drivers[:3]],
        "evidence": list(diagnosis.evidence[:5]),
    }


def _health_evidence(points: Sequence[HealthPoint], healthy: float) -> dict[str, Any]:
    if not points:
        return {"scores": 0}
    scores = [p.score for p in points]
    return {
        "scores": len(scores),
        "healthy": sum(1 for s in scores if s < healthy),
        "max": round(max(scores), 3),
        "from": points[0].at.isoformat(),
        "to": points[-1].at.isoformat(),
    }
