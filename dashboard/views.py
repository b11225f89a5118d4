"""Records of the case store as the ops dashboard shows them (dashboard; no I/O but secrets).

A case, an audit entry with the owner's contacts and push secrets masked out: shared by
the JSON routes and the live stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from notifier.model import AuditEntry, Case
from notifier.store import CaseStore

__all__ = ["audit_json", "case_json", "iso", "mask_secrets", "owner_secrets"]


# Evidence keys that could hold an owner's contacts; their values never reach the page.
_CONTACT_KEYS: Final = frozenset(
    ("target", "token", "keys", "endpoint", "p256dh", "auth", "secret", "email", "phone",
     "address", "url", "channel", "channels")
)  # fmt: skip


def iso(at: datetime | None) -> str | None:
    """A time as ISO 8601 text, or ``None``."""
    return None if at is None else at.isoformat()


def case_json(case: Case) -> dict[str, Any]:
    """A case for the page: no owner id, nothing of the owner."""
    return {
        "case_id": case.case_id,
        "device_id": case.device_id,
        "model": case.model,
        "fault": case.fault,
        "state": case.state,
        "open": case.is_open,
        "urgency": case.urgency,
        "opened_at": iso(case.opened_at),
        "updated_at": iso(case.updated_at),
        "confidence": round(case.confidence, 3),
        "failure_at": iso(case.failure_at),
        "remedies": list(case.remedies),
        "tried": list(case.tried),
        "pending_action": case.pending_action,
        "fix_at": iso(case.fix_at),
        "appointment_id": case.appointment_id,
        "needs_person": case.needs_person,
        "rating": case.rating,
        "evidence": list(case.evidence),
    }


def mask_secrets(value: Any, secrets: Sequence[str]) -> Any:
    """Evidence with contact-like keys dropped and any known secret text masked."""
    if isinstance(value, Mapping):
        return {
            str(k): ("[hidden]" if str(k).lower() in _CONTACT_KEYS else mask_secrets(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask_secrets(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret and secret in value:
                value = value.replace(secret, "[hidden]")
        return value
    return value


def audit_json(entry: AuditEntry, secrets: Sequence[str]) -> dict[str, Any]:
    """An audit entry for the page, the owner's secrets masked out of its evidence."""
    return {
        "at": iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "reason": mask_secrets(entry.reason, secrets),
        "evidence": mask_secrets(entry.evidence, secrets),
        "from_state": entry.from_state,
        "to_state": entry.to_state,
    }


async def owner_secrets(store: CaseStore, owner_id: str) -> list[str]:
    """The texts that must never reach the page for one owner (channel targets and keys)."""
    found: list[str] = []
    for channel in await store.channels(owner_id, active_only=False):
        found.append(channel.target)
        found.extend(v for v in channel.keys.values() if len(v) >= 4)
    return sorted(set(found), key=len, reverse=True)
