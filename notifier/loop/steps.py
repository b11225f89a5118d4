"""One step of a case, as every part of the case machine takes it.

Part of :mod:`notifier.loop`. :class:`CaseSteps` holds what the remote fix, the
verification and the visits share: the lock on a case (this process's lock plus the
store's lease), the audit trail, a move or a save by compare-and-set with its
messages in the same transaction (:meth:`CaseSteps.commit`), publishing the change,
handing a case to a person, and the counters of steps that failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from notifier.errors import CaseBusyError, IllegalTransitionError, NotFoundError
from notifier.loop.config import SERVICE, LoopConfig
from notifier.loop.notices import Notice, OwnerNotifier, StepNotifier
from notifier.model import TRANSITIONS, Actor, AuditEntry, Case, CaseState, Owner, Task
from notifier.store import CaseStore, CaseTimer, NewMessage, TimerKind
from wire.errors import TransientError

__all__ = ["CaseLock", "CaseSink", "CaseSteps", "has_service", "next_remote", "service_part"]

_LOG = logging.getLogger("notifier.loop")

#: Called with every changed case (the service publishes it on ``fleet/cases``).
CaseSink = Callable[[Case], Awaitable[None]]


class CaseLock:
    """One case's lock: this process's lock on the key, then the store's lease on it."""

    __slots__ = ("_key", "_steps")

    def __init__(self, steps: CaseSteps, key: str) -> None:
        self._steps = steps
        self._key = key

    async def __aenter__(self) -> None:
        lock = self._steps.local_lock(self._key)
        await lock.acquire()
        try:
            await self._steps.take_lease(self._key)
        except BaseException:
            lock.release()
            raise

    async def __aexit__(self, *_: object) -> None:
        try:
            await self._steps.drop_lease(self._key)
        finally:
            self._steps.local_lock(self._key).release()


class CaseSteps:
    """The steps every part of the case machine takes on a case.

    Args:
        store: the case store.
        notifier: the owner's messages.
        config: timing and limits.
        sink: called with every changed case.
        clock: wall clock (UTC).
        holder: this instance's name in the store's leases.
    """

    def __init__(
        self,
        store: CaseStore,
        notifier: OwnerNotifier,
        config: LoopConfig,
        *,
        sink: CaseSink,
        clock: Callable[[], datetime],
        holder: str,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.config = config
        self.clock = clock
        self.holder = holder
        self._sink = sink
        self._locks: dict[str, asyncio.Lock] = {}
        #: case steps (timers, expiry, reminders, commands) that raised the unforeseen
        self.timer_errors = 0
        #: leases taken; how often one was held by another instance at first; how often
        #: one ran out while held (a step that took longer than ``lease_s``)
        self.leases_taken = 0
        self.lease_waits = 0
        self.leases_overrun = 0

    def lock(self, key: str) -> CaseLock:
        """The lock on one case (``device/fault``): here and, by a lease, in the store."""
        return CaseLock(self, key)

    def local_lock(self, key: str) -> asyncio.Lock:
        """This process's lock on one case key."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def take_lease(self, key: str) -> None:
        """Take the store's lease on a case key, waiting while another instance holds it.

        Raises:
            CaseBusyError: another instance kept it for longer than a lease lasts.
        """
        lease = timedelta(seconds=self.config.lease_s)
        deadline = time.monotonic() + self.config.lease_s + 5.0
        pause_s = 0.02
        while True:
            now = self.clock()
            if await self.store.take_lease(key, self.holder, now=now, until=now + lease):
                self.leases_taken += 1
                return
            if pause_s == 0.02:
                self.lease_waits += 1
            if time.monotonic() >= deadline:
                raise CaseBusyError(f"case {key} is being handled by another notifier")
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.5)

    async def drop_lease(self, key: str) -> None:
        """Give up the store's lease on a case key (it runs out by itself otherwise)."""
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

    async def set_timer(self, case: Case, what: TimerKind, after_s: float) -> None:
        """Set the case's timer ``what`` to ``after_s`` from now."""
        due = self.clock() + timedelta(seconds=after_s)
        await self.store.set_timer(CaseTimer(case.case_id, what, due))

    async def audit(
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
        """Add a line to the audit trail (of a case, or of none)."""
        await self.store.add_audit(
            AuditEntry(
                case_id=None if case is None else case.case_id,
                at=self.clock(),
                actor=actor,
                action=action,
                reason=reason,
                evidence=evidence or {},
                from_state=from_state,
                to_state=to_state,
            )
        )

    async def move(
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
        moved = replace(case, state=state, updated_at=self.clock(), **changes)
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
        await self.commit(case, moved, [entry], tell)
        _LOG.info("case %s: %s -> %s (%s)", case.case_id, case.state, state, reason)
        return moved

    async def save(
        self,
        case: Case,
        *,
        entries: Sequence[AuditEntry] = (),
        tell: Sequence[Notice] = (),
        **changes: Any,
    ) -> Case:
        """Change a case in its state (by compare-and-set, with ``entries`` and ``tell``)."""
        changed = replace(case, updated_at=self.clock(), **changes)
        await self.commit(case, changed, list(entries), tell)
        return changed

    async def commit(
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
                    self.case_failed(after.case_id, f"telling the owner ({notice.kind})")
                    entries.append(self.told_entry(after, notice, told=False))
        entries.extend(self.told_entry(after, notice, told=True) for notice, _ in prepared)
        kept = await self.store.update_case(
            after,
            expected_state=before.state,
            audit=entries,
            messages=[message for _, message in prepared],
        )
        await self.publish(after)
        if owner is not None and steps is not None:
            for (notice, _), message in zip(prepared, kept, strict=True):
                if message is not None:
                    steps.hand_over(owner, message, notice.urgent)
        for notice in after_step:
            await self.tell(after, notice)

    def told_entry(self, case: Case, notice: Notice, *, told: bool) -> AuditEntry:
        """The line in the trail that the owner was told, or could not be."""
        return AuditEntry(
            case_id=case.case_id,
            at=self.clock(),
            actor="system",
            action="notify" if told else "notify_failed",
            reason=f"told the owner: {notice.kind}"
            if told
            else f"could not tell the owner: {notice.kind}",
            evidence={"kind": notice.kind, "action": notice.action, "urgent": notice.urgent},
        )

    async def publish(self, case: Case) -> None:
        """Hand a changed case to the sink; a transient failure is only logged."""
        try:
            await self._sink(case)
        except TransientError as exc:
            _LOG.warning("case %s: change not published (%s)", case.case_id, exc)

    async def owner(self, owner_id: str) -> Owner:
        """The case's owner."""
        owner = await self.store.get_owner(owner_id)
        if owner is None:
            raise NotFoundError(f"no owner {owner_id}")
        return owner

    async def tell(self, case: Case, notice: Notice) -> None:
        """Tell the owner after a step (a notifier that cannot keep messages in it)."""
        owner = await self.store.get_owner(case.owner_id)
        if owner is None:
            return
        try:
            await self.notifier.notify(owner, case, notice)
        except TransientError:
            raise
        except Exception:
            # the case goes on; a person sees in the trail that the owner was not told
            self.case_failed(case.case_id, f"telling the owner ({notice.kind})")
            await self.store.add_audit(self.told_entry(case, notice, told=False))
            return
        await self.store.add_audit(self.told_entry(case, notice, told=True))

    async def owned_case(self, owner_id: str, case_id: str) -> Case:
        """The owner's case."""
        case = await self.store.get_case(case_id)
        if case is None or case.owner_id != owner_id:
            raise NotFoundError(f"no case {case_id}")
        return case

    async def fresh(self, case: Case) -> Case:
        """The case as stored now."""
        fresh = await self.store.get_case(case.case_id)
        if fresh is None:
            raise NotFoundError(f"case {case.case_id} is gone")
        return fresh

    async def to_person(self, case: Case, reason: str, *, tell: Sequence[Notice] = ()) -> Case:
        """Hand the case to a person: escalated, with a task, the owner told."""
        case = await self.move(
            case,
            "escalated",
            reason,
            tell=[*tell, Notice("not_fixed_escalated")],
            needs_person=reason,
        )
        await self.store.add_task(Task(uuid.uuid4().hex[:16], case.case_id, reason, self.clock()))
        return case

    def case_failed(self, case_id: str, what: str) -> None:
        """Log and count a case step that raised something unforeseen; the others go on."""
        self.timer_errors += 1
        _LOG.exception("case %s: %s failed; the case is left as it is", case_id, what)


def next_remote(case: Case) -> str | None:
    """The next remote remedy that can cure the fault and was not tried yet."""
    for remedy in case.remedies:
        if remedy.startswith(SERVICE) or remedy.startswith("~"):
            continue
        if remedy not in case.tried:
            return remedy
    return None


def service_part(case: Case) -> str | None:
    """The part a technician's visit brings, if the case's remedies name one."""
    for remedy in case.remedies:
        if remedy.startswith(SERVICE):
            _, _, part = remedy.partition(":")
            return part or None
    return None


def has_service(case: Case) -> bool:
    """Whether a technician's visit is among the case's remedies."""
    return any(r.startswith(SERVICE) for r in case.remedies)
