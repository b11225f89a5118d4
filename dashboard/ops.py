"""What a person on the ops team may change (dashboard -> case store / case machine).

The dashboard is read-mostly. The few changes it makes are here, each audited with actor
``ops`` and the user's name in the evidence:

* :func:`take_over` — a person-needed task becomes the user's (``taken``);
* :func:`write_to_owner` — a message to the owner, stored as a notification of kind
  ``ops_message`` for the owner loop's outbox and the owner's app;
* :func:`close_task` — the task is closed and its case ends ``resolved`` or ``dismissed``
  (compare-and-set on the case state, so a case the machine moved meanwhile is a conflict,
  never overwritten);
* campaigns go through a :class:`CampaignStarter`: with the case machine in the same
  process (``fixloop up``) it opens and advances the cases; the standalone dashboard
  (``fixloop dashboard``) uses :class:`StoredCampaigns`, which opens them in the case
  store for the notifier's case machine to advance, so a campaign's cases are ordinary
  cases either way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Final, Literal, Protocol

from notifier.campaigns import check_campaign_action, open_campaign_case
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import TRANSITIONS, AuditEntry, Case, Notification, Task
from notifier.store import CaseStore

__all__ = [
    "OPS_MESSAGE_KIND",
    "CampaignStarter",
    "CloseOutcome",
    "StoredCampaigns",
    "close_task",
    "take_over",
    "write_to_owner",
]

_LOG = logging.getLogger(__name__)

#: Notification kind of a message the ops team wrote to an owner.
OPS_MESSAGE_KIND: Final = "ops_message"
_TITLE_LIMIT: Final = 120
_BODY_LIMIT: Final = 2000
_NOTE_LIMIT: Final = 1000

CloseOutcome = Literal["resolved", "dismissed"]


class CampaignStarter(Protocol):
    """Starts a pre-emptive campaign through the case machine (implemented by ``fixloop``)."""

    async def start(self, device_ids: Sequence[str], action: str, reason: str) -> int:
        """Open a case with ``action`` as its remedy for each device; return how many opened.

        Devices that already have an open case for the campaign's fault are skipped by
        the case machine (one open case per device and fault).
        """


class StoredCampaigns:
    """Campaigns of a dashboard without the case machine: the cases go to the case store.

    Each case is stored ``opened`` with the campaign's remedy and audited
    (:func:`notifier.campaigns.open_campaign_case`); the notifier's timers take cases
    left ``opened`` and give them their first step (consent, command, verification)
    within ``resume_opened_after_s`` (10 s), and publish them on ``fleet/cases``.

    Args:
        store: the notifier's case store.
        clock: wall clock (UTC).
    """

    def __init__(self, store: CaseStore, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    async def start(self, device_ids: Sequence[str], action: str, reason: str) -> int:
        """Open the campaign's cases; return how many opened.

        Raises:
            InvalidRequestError: ``action`` is not a remote remedy a device understands.
        """
        check_campaign_action(action)
        opened = 0
        for device_id in dict.fromkeys(device_ids):
            case = await open_campaign_case(
                self._store,
                device_id,
                action,
                reason,
                devices=len(device_ids),
                now=self._clock(),
            )
            opened += case is not None
        return opened


async def _task(store: CaseStore, task_id: str) -> Task:
    for task in await store.tasks():
        if task.task_id == task_id:
            return task
    raise NotFoundError(f"no task {task_id}")


def _may_work(task: Task, username: str, *, override: bool) -> None:
    if task.state == "closed":
        raise ConflictError(f"task {task.task_id} is closed")
    if task.state == "taken" and task.assignee != username and not override:
        raise ConflictError(f"task {task.task_id} is taken by {task.assignee}")


async def _case(store: CaseStore, case_id: str) -> Case:
    case = await store.get_case(case_id)
    if case is None:
        raise NotFoundError(f"no case {case_id}")
    return case


async def take_over(
    store: CaseStore,
    task_id: str,
    username: str,
    clock: Callable[[], datetime],
    *,
    override: bool = False,
) -> Task:
    """Make a person-needed task the user's.

    Args:
        store: the case store.
        task_id: the task.
        username: the ops user taking it.
        clock: the wall clock.
        override: take it even from another user (an admin).

    Raises:
        NotFoundError: no such task.
        ConflictError: the task is closed, or taken by someone else.
    """
    task = await _task(store, task_id)
    _may_work(task, username, override=override)
    taken = replace(task, state="taken", assignee=username)
    await store.add_task(taken)
    await store.add_audit(
        AuditEntry(
            case_id=task.case_id,
            at=clock(),
            actor="ops",
            action="take_over",
            reason=f"{username} took over: {task.reason}",
            evidence={"user": username, "task_id": task.task_id, "previous": task.assignee},
        )
    )
    _LOG.info("task %s taken over by %s", task.task_id, username)
    return taken


async def write_to_owner(
    store: CaseStore,
    task_id: str,
    username: str,
    body: str,
    clock: Callable[[], datetime],
    *,
    title: str | None = None,
    override: bool = False,
) -> Notification:
    """Store a message from the ops team to the owner of a task's case.

    The owner loop's outbox delivers ``queued`` notifications; the owner's app shows them.

    Raises:
        NotFoundError: no such task or case.
        ConflictError: the task is closed or someone else's.
        InvalidRequestError: an empty or too long message.
    """
    text = body.strip()
    heading = (title or "").strip() or "A message from our service team"
    if not text:
        raise InvalidRequestError("the message is empty")
    if len(text) > _BODY_LIMIT or len(heading) > _TITLE_LIMIT:
        raise InvalidRequestError(
            f"a message is at most {_BODY_LIMIT} characters, its title {_TITLE_LIMIT}"
        )
    task = await _task(store, task_id)
    _may_work(task, username, override=override)
    case = await _case(store, task.case_id)
    now = clock()
    notification = Notification(
        notification_id=uuid.uuid4().hex[:16],
        owner_id=case.owner_id,
        case_id=case.case_id,
        kind=OPS_MESSAGE_KIND,
        title=heading,
        body=text,
        actions=(),
        created_at=now,
        status="queued",
    )
    await store.add_notification(notification)
    await store.add_audit(
        AuditEntry(
            case_id=case.case_id,
            at=now,
            actor="ops",
            action=OPS_MESSAGE_KIND,
            reason=f"{username} wrote to the owner",
            evidence={
                "user": username,
                "task_id": task.task_id,
                "notification_id": notification.notification_id,
                "characters": len(text),
            },
        )
    )
    return notification


async def close_task(
    store: CaseStore,
    task_id: str,
    username: str,
    outcome: CloseOutcome,
    clock: Callable[[], datetime],
    *,
    note: str | None = None,
    override: bool = False,
) -> tuple[Task, Case]:
    """Close a person-needed task and end its case ``resolved`` or ``dismissed``.

    A case already in ``outcome`` stays as it is; otherwise it moves there if its
    lifecycle allows it (an escalated case may become either, an open one only
    dismissed), by compare-and-set with an audited ``transition`` by ``ops``.

    Returns:
        The closed task and the case as it is now.

    Raises:
        NotFoundError: no such task or case.
        ConflictError: the task is closed or someone else's, or the case moved on
            meanwhile.
        InvalidRequestError: the case cannot end that way from its state.
    """
    if outcome not in ("resolved", "dismissed"):
        raise InvalidRequestError("a task closes with 'resolved' or 'dismissed'")
    words = (note or "").strip()
    if len(words) > _NOTE_LIMIT:
        raise InvalidRequestError(f"a note is at most {_NOTE_LIMIT} characters")
    task = await _task(store, task_id)
    _may_work(task, username, override=override)
    case = await _case(store, task.case_id)
    now = clock()
    reason = f"closed by {username}" + (f": {words}" if words else "")
    evidence = {"user": username, "task_id": task.task_id, "task_reason": task.reason}
    if case.state != outcome:
        if outcome not in TRANSITIONS[case.state]:
            raise InvalidRequestError(f"a {case.state} case cannot be closed as {outcome}")
        moved = replace(case, state=outcome, updated_at=now, needs_person=None)
        await store.update_case(
            moved,
            expected_state=case.state,
            audit=AuditEntry(
                case_id=case.case_id,
                at=now,
                actor="ops",
                action="transition",
                reason=reason,
                evidence=evidence,
                from_state=case.state,
                to_state=outcome,
            ),
        )
        case = moved
    else:
        if case.needs_person is not None:
            cleared = replace(case, updated_at=now, needs_person=None)
            await store.update_case(cleared, expected_state=case.state)
            case = cleared
        await store.add_audit(
            AuditEntry(
                case_id=case.case_id,
                at=now,
                actor="ops",
                action="task_closed",
                reason=reason,
                evidence=evidence,
            )
        )
    closed = replace(task, state="closed", assignee=task.assignee or username)
    await store.add_task(closed)
    _LOG.info("task %s closed by %s; case %s is %s", task.task_id, username, case.case_id, outcome)
    return closed, case
