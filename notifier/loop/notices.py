"""What the case machine tells owners (:class:`Notice`) and through what.

Part of :mod:`notifier.loop`: a step of a case names its messages as notices; the
outbox (:class:`notifier.outbox.Outbox`) is the :class:`StepNotifier` that writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from notifier.model import Appointment, Case, Notification, Owner, Slot
from notifier.store import NewMessage

__all__ = ["Notice", "OwnerNotifier", "StepNotifier", "notice_key"]


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
