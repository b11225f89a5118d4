"""Pre-emptive campaigns: the cases they open, for whichever process opens them (notifier).

A campaign (a remote remedy for every device of a firmware, a batch, a model ...) opens
one case per device with the remedy as its only one. The case machine
(:class:`notifier.loop.OwnerLoop`) opens them with :func:`open_campaign_case` and
advances each at once; a process without the case machine (the standalone ops
dashboard, which may not even publish on the broker) opens them the same way and leaves
them ``opened``: the notifier's timers advance cases that stayed ``opened`` (its
``resume_opened_after_s``), so they then run like any other (consent, interlocks,
verification).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from notifier.errors import ConflictError, InvalidRequestError
from notifier.model import AuditEntry, Case
from notifier.store import CaseStore

__all__ = ["CAMPAIGN_ACTIONS", "campaign_fault", "check_campaign_action", "open_campaign_case"]

#: The remote remedies a campaign may run (what every device's firmware understands).
CAMPAIGN_ACTIONS: Final = frozenset(("restart", "firmware_update", "cleaning_cycle", "selftest"))


def check_campaign_action(action: str) -> str:
    """Return ``action`` if a campaign may run it.

    Raises:
        InvalidRequestError: it is not a remote remedy a device understands.
    """
    if action not in CAMPAIGN_ACTIONS:
        raise InvalidRequestError(
            f"a campaign runs a remote remedy ({', '.join(sorted(CAMPAIGN_ACTIONS))})"
        )
    return action


def campaign_fault(action: str) -> str:
    """The fault name of a campaign's cases (one open case per device and fault)."""
    return f"campaign_{action}"


async def open_campaign_case(
    store: CaseStore,
    device_id: str,
    action: str,
    reason: str,
    *,
    devices: int,
    now: datetime,
) -> Case | None:
    """Store and audit one device's campaign case, ``opened``; ``None`` if none was opened.

    Nothing is opened for a device that is not registered or already has an open case of
    this campaign (the store keeps one open case per device and fault, also against
    another process opening the same one).

    Args:
        store: the case store.
        device_id: the device.
        action: the campaign's remote remedy (checked by :func:`check_campaign_action`).
        reason: why, for the case's evidence and the audit trail.
        devices: how many devices the campaign covers (for the audit trail).
        now: the time of opening.
    """
    fault = campaign_fault(check_campaign_action(action))
    device = await store.get_device(device_id)
    if device is None or await store.open_case(device_id, fault):
        return None
    case = Case(
        case_id=uuid.uuid4().hex[:16],
        device_id=device_id,
        owner_id=device.owner_id,
        model=device.model,
        fault=fault,
        state="opened",
        urgency="low",
        opened_at=now,
        updated_at=now,
        remedies=(action,),
        evidence=(reason[:200],),
    )
    try:
        await store.add_case(case)
    except ConflictError:
        return None
    await store.add_audit(
        AuditEntry(
            case_id=case.case_id,
            at=now,
            actor="ops",
            action="transition",
            reason=f"pre-emptive campaign: {reason}",
            evidence={"action": action, "devices": devices},
            to_state="opened",
        )
    )
    return case
