"""Case store rows: how each record is kept in a table row, and read back (notifier).

Both case stores (:class:`notifier.sqlite.SqliteStore` and
:class:`notifier.postgres.PostgresStore`) and the device registry keep records the same
way, so one set of functions maps them: ``<record>_row`` turns a record into a column ->
value mapping for an ``INSERT``/``UPDATE``, and ``<record>_from`` reads a result row
(``sqlite3.Row`` or asyncpg's ``Record``) back into the record.

Datetimes are ISO 8601 UTC text with microseconds (fixed width, so text order is time
order) and come back UTC-aware; tuples, dicts and sets are JSON text; local times are
``HH:MM``; flags are 0/1. Owner exports (:func:`plain`, :func:`redacted`,
:func:`exported_channel`) are built here too, so both stores export alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime, time
from typing import Any, Protocol

from notifier.errors import InvalidRequestError
from notifier.model import (
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Notification,
    Owner,
    PushChannel,
    Rating,
    Slot,
    Task,
    Technician,
    Window,
    mask_target,
)
from notifier.store import CaseTimer

__all__ = [
    "Row",
    "appointment_from",
    "appointment_row",
    "audit_from",
    "audit_row",
    "case_from",
    "case_row",
    "channel_from",
    "channel_row",
    "channel_secrets",
    "device_from",
    "device_row",
    "dt",
    "dt_opt",
    "exported_channel",
    "hhmm",
    "hhmm_opt",
    "json_text",
    "notification_from",
    "notification_row",
    "owner_from",
    "owner_row",
    "plain",
    "rating_from",
    "rating_row",
    "redacted",
    "task_from",
    "task_row",
    "technician_from",
    "technician_row",
    "time_opt",
    "timer_from",
    "token_hash",
    "ts",
    "ts_opt",
    "windows",
    "windows_json",
]


class Row(Protocol):
    """A result row read by column name: ``sqlite3.Row``, or asyncpg's ``Record``."""

    def __getitem__(self, key: str, /) -> Any: ...


def ts(value: datetime) -> str:
    """A UTC-aware datetime as fixed-width ISO 8601 UTC text."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequestError("the case store keeps UTC-aware datetimes only, not naive ones")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def ts_opt(value: datetime | None) -> str | None:
    """Like :func:`ts`, ``None`` kept."""
    return None if value is None else ts(value)


def dt(text: str) -> datetime:
    """Read a time written by :func:`ts` (UTC-aware)."""
    return datetime.fromisoformat(text).astimezone(UTC)


def dt_opt(text: str | None) -> datetime | None:
    """Like :func:`dt`, ``None`` kept."""
    return None if text is None else dt(text)


def hhmm(value: time) -> str:
    """A local time as ``HH:MM`` (seconds too, should it have any)."""
    if value.second or value.microsecond:
        return value.isoformat()
    return value.isoformat(timespec="minutes")


def hhmm_opt(value: time | None) -> str | None:
    """Like :func:`hhmm`, ``None`` kept."""
    return None if value is None else hhmm(value)


def time_opt(text: str | None) -> time | None:
    """Read a local time written by :func:`hhmm`."""
    return None if text is None else time.fromisoformat(text)


def json_text(value: Any) -> str:
    """A value as compact JSON text (refusing what JSON cannot hold)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"not JSON-serialisable: {exc}") from exc


def windows_json(windows: tuple[Window, ...]) -> str:
    """Weekly time windows as JSON text: ``[[weekday, start, end], ...]``."""
    return json_text([[w.weekday, hhmm(w.start), hhmm(w.end)] for w in windows])


def windows(text: str) -> tuple[Window, ...]:
    """Read time windows written by :func:`windows_json`."""
    return tuple(
        Window(weekday, time.fromisoformat(start), time.fromisoformat(end))
        for weekday, start, end in json.loads(text)
    )


def owner_row(owner: Owner) -> dict[str, Any]:
    """A record as a row of ``owners``."""
    return {
        "owner_id": owner.owner_id,
        "name": owner.name,
        "language": owner.language,
        "timezone": owner.timezone,
        "region": owner.region,
        "consent": owner.consent,
        "quiet_start": hhmm_opt(owner.quiet_start),
        "quiet_end": hhmm_opt(owner.quiet_end),
        "availability": windows_json(owner.availability),
        "channels": json_text(list(owner.channels)),
        "max_per_day": owner.max_per_day,
    }


def owner_from(row: Row) -> Owner:
    """Read a record from a row of ``owners``."""
    return Owner(
        owner_id=row["owner_id"],
        name=row["name"],
        language=row["language"],
        timezone=row["timezone"],
        region=row["region"],
        consent=row["consent"],
        quiet_start=time_opt(row["quiet_start"]),
        quiet_end=time_opt(row["quiet_end"]),
        availability=windows(row["availability"]),
        channels=tuple(json.loads(row["channels"])),
        max_per_day=row["max_per_day"],
    )


def device_row(device: DeviceRecord) -> dict[str, Any]:
    """A record as a row of ``devices``."""
    return {
        "device_id": device.device_id,
        "owner_id": device.owner_id,
        "model": device.model,
        "firmware": device.firmware,
        "label": device.label,
        "batch": device.batch,
    }


def device_from(row: Row) -> DeviceRecord:
    """Read a record from a row of ``devices``."""
    return DeviceRecord(
        device_id=row["device_id"],
        owner_id=row["owner_id"],
        model=row["model"],
        firmware=row["firmware"],
        label=row["label"],
        batch=row["batch"],
    )


def channel_row(channel: PushChannel) -> dict[str, Any]:
    """A record as a row of ``channels``."""
    return {
        "channel_id": channel.channel_id,
        "owner_id": channel.owner_id,
        "kind": channel.kind,
        "target": channel.target,
        "keys": json_text(channel.keys),
        "active": int(channel.active),
        "created_at": ts_opt(channel.created_at),
        "failures": channel.failures,
    }


def channel_from(row: Row) -> PushChannel:
    """Read a record from a row of ``channels``."""
    return PushChannel(
        channel_id=row["channel_id"],
        owner_id=row["owner_id"],
        kind=row["kind"],
        target=row["target"],
        keys=json.loads(row["keys"]),
        active=bool(row["active"]),
        created_at=dt_opt(row["created_at"]),
        failures=row["failures"],
    )


def case_row(case: Case) -> dict[str, Any]:
    """A record as a row of ``cases``."""
    return {
        "case_id": case.case_id,
        "device_id": case.device_id,
        "owner_id": case.owner_id,
        "model": case.model,
        "fault": case.fault,
        "state": case.state,
        "urgency": case.urgency,
        "opened_at": ts(case.opened_at),
        "updated_at": ts(case.updated_at),
        "confidence": case.confidence,
        "failure_at": ts_opt(case.failure_at),
        "remedies": json_text(list(case.remedies)),
        "tried": json_text(list(case.tried)),
        "pending_action": case.pending_action,
        "fix_at": ts_opt(case.fix_at),
        "appointment_id": case.appointment_id,
        "needs_person": case.needs_person,
        "rating": case.rating,
        "evidence": json_text(list(case.evidence)),
    }


def case_from(row: Row) -> Case:
    """Read a record from a row of ``cases``."""
    return Case(
        case_id=row["case_id"],
        device_id=row["device_id"],
        owner_id=row["owner_id"],
        model=row["model"],
        fault=row["fault"],
        state=row["state"],
        urgency=row["urgency"],
        opened_at=dt(row["opened_at"]),
        updated_at=dt(row["updated_at"]),
        confidence=row["confidence"],
        failure_at=dt_opt(row["failure_at"]),
        remedies=tuple(json.loads(row["remedies"])),
        tried=tuple(json.loads(row["tried"])),
        pending_action=row["pending_action"],
        fix_at=dt_opt(row["fix_at"]),
        appointment_id=row["appointment_id"],
        needs_person=row["needs_person"],
        rating=row["rating"],
        evidence=tuple(json.loads(row["evidence"])),
    )


def audit_row(entry: AuditEntry) -> dict[str, Any]:
    """A record as a row of ``audit``."""
    return {
        "case_id": entry.case_id,
        "at": ts(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "reason": entry.reason,
        "evidence": json_text(entry.evidence),
        "from_state": entry.from_state,
        "to_state": entry.to_state,
    }


def audit_from(row: Row) -> AuditEntry:
    """Read a record from a row of ``audit``."""
    return AuditEntry(
        case_id=row["case_id"],
        at=dt(row["at"]),
        actor=row["actor"],
        action=row["action"],
        reason=row["reason"],
        evidence=json.loads(row["evidence"]),
        from_state=row["from_state"],
        to_state=row["to_state"],
    )


def technician_row(technician: Technician) -> dict[str, Any]:
    """A record as a row of ``technicians``."""
    return {
        "technician_id": technician.technician_id,
        "name": technician.name,
        "region": technician.region,
        "skills": json_text(sorted(technician.skills)),
        "timezone": technician.timezone,
        "hours": windows_json(technician.hours),
    }


def technician_from(row: Row) -> Technician:
    """Read a record from a row of ``technicians``."""
    return Technician(
        technician_id=row["technician_id"],
        name=row["name"],
        region=row["region"],
        skills=frozenset(json.loads(row["skills"])),
        timezone=row["timezone"],
        hours=windows(row["hours"]),
    )


def appointment_row(appointment: Appointment) -> dict[str, Any]:
    """A record as a row of ``appointments``."""
    offered = [
        {
            "technician_id": slot.technician_id,
            "start": ts(slot.start),
            "end": ts(slot.end),
            "score": slot.score,
        }
        for slot in appointment.offered
    ]
    return {
        "appointment_id": appointment.appointment_id,
        "case_id": appointment.case_id,
        "technician_id": appointment.technician_id,
        "start_at": ts_opt(appointment.start),
        "end_at": ts_opt(appointment.end),
        "state": appointment.state,
        "part": appointment.part,
        "offered": json_text(offered),
        "note": appointment.note,
    }


def appointment_from(row: Row) -> Appointment:
    """Read a record from a row of ``appointments``."""
    offered = tuple(
        Slot(slot["technician_id"], dt(slot["start"]), dt(slot["end"]), slot["score"])
        for slot in json.loads(row["offered"])
    )
    return Appointment(
        appointment_id=row["appointment_id"],
        case_id=row["case_id"],
        technician_id=row["technician_id"],
        start=dt_opt(row["start_at"]),
        end=dt_opt(row["end_at"]),
        state=row["state"],
        part=row["part"],
        offered=offered,
        note=row["note"],
    )


def rating_row(rating: Rating) -> dict[str, Any]:
    """A record as a row of ``ratings``."""
    return {
        "case_id": rating.case_id,
        "stars": rating.stars,
        "comment": rating.comment,
        "nothing_wrong": int(rating.nothing_wrong),
        "at": ts(rating.at),
    }


def rating_from(row: Row) -> Rating:
    """Read a record from a row of ``ratings``."""
    return Rating(
        case_id=row["case_id"],
        stars=row["stars"],
        comment=row["comment"],
        nothing_wrong=bool(row["nothing_wrong"]),
        at=dt(row["at"]),
    )


def notification_row(notification: Notification) -> dict[str, Any]:
    """A record as a row of ``notifications``."""
    return {
        "notification_id": notification.notification_id,
        "owner_id": notification.owner_id,
        "case_id": notification.case_id,
        "kind": notification.kind,
        "title": notification.title,
        "body": notification.body,
        "actions": json_text([list(action) for action in notification.actions]),
        "created_at": ts(notification.created_at),
        "status": notification.status,
        "channel_id": notification.channel_id,
    }


def notification_from(row: Row) -> Notification:
    """Read a record from a row of ``notifications``."""
    return Notification(
        notification_id=row["notification_id"],
        owner_id=row["owner_id"],
        case_id=row["case_id"],
        kind=row["kind"],
        title=row["title"],
        body=row["body"],
        actions=tuple((action_id, label) for action_id, label in json.loads(row["actions"])),
        created_at=dt(row["created_at"]),
        status=row["status"],
        channel_id=row["channel_id"],
    )


def task_row(task: Task) -> dict[str, Any]:
    """A record as a row of ``tasks``."""
    return {
        "task_id": task.task_id,
        "case_id": task.case_id,
        "reason": task.reason,
        "created_at": ts(task.created_at),
        "state": task.state,
        "assignee": task.assignee,
    }


def task_from(row: Row) -> Task:
    """Read a record from a row of ``tasks``."""
    return Task(
        task_id=row["task_id"],
        case_id=row["case_id"],
        reason=row["reason"],
        created_at=dt(row["created_at"]),
        state=row["state"],
        assignee=row["assignee"],
    )


def token_hash(token: str) -> str:
    """What is kept of an API token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# -- export ----------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A record (or a value inside one) as JSON-serialisable data."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, datetime):
        return ts(value)
    if isinstance(value, time):
        return hhmm(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, frozenset | set):
        return sorted(plain(item) for item in value)
    return value


def redacted(value: Any, secrets: dict[str, str]) -> Any:
    """``value`` with every string that is a channel secret replaced by its mask."""
    if isinstance(value, str):
        return secrets.get(value, value)
    if isinstance(value, dict):
        return {key: redacted(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [redacted(item, secrets) for item in value]
    return value


def channel_secrets(channels: Sequence[PushChannel]) -> dict[str, str]:
    """Each channel's target and key values -> what an export shows instead."""
    secrets: dict[str, str] = {}
    for channel in channels:
        secrets[channel.target] = mask_target(channel.target)
        secrets.update((key, "***") for key in channel.keys.values())
    return secrets


def exported_channel(channel: PushChannel) -> dict[str, Any]:
    """A push channel as an owner's export shows it (no secrets)."""
    # secrets (keys, the full target) stay out of an export: it is a file that travels
    return {
        "channel_id": channel.channel_id,
        "kind": channel.kind,
        "target": mask_target(channel.target),
        "active": channel.active,
        "created_at": ts_opt(channel.created_at),
        "failures": channel.failures,
    }


def timer_from(row: Row) -> CaseTimer:
    """Read a case's timer from a row of ``case_timers``."""
    return CaseTimer(case_id=row["case_id"], what=row["what"], due=dt(row["due_at"]))
