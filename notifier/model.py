"""Typed records of the owner loop (notifier: diagnostics -> here -> dashboard).

Frozen, slotted dataclasses shared by the case machine, the case store, the planner, the
push channels and the owner API. Every timestamp is UTC-aware; an owner's or a
technician's local time exists only at the edges (quiet hours, working hours, messages),
computed from their IANA time zone.

Case lifecycle (``TRANSITIONS`` is the single source of truth; the case machine refuses
anything else with :class:`~notifier.errors.IllegalTransitionError`)::

    opened ──▶ awaiting_consent ──▶ remote_fix ──▶ verifying ──▶ resolved
      │              │                  │              │
      │              └──(declined)──────┴──▶ appointment_proposed ──▶ booked ──▶ visited
      │                                           ▲                    │          │
      └──────────────▶ appointment_proposed       └────(moved)─────────┘ verifying ◀┘
    any open state ──▶ dismissed | escalated | expired

A booked visit the owner moves before it starts frees its time and goes back to
``appointment_proposed`` with new slots (a few times; then ``escalated`` to a person);
one the owner cancels ends like a declined offer (``dismissed``, or ``escalated`` when
urgent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any, Final, Literal
from urllib.parse import urlsplit

__all__ = [
    "CLOSED_STATES",
    "OPEN_STATES",
    "TRANSITIONS",
    "Actor",
    "Appointment",
    "AppointmentState",
    "AuditEntry",
    "Case",
    "CaseState",
    "ChannelKind",
    "ConsentPolicy",
    "DeviceRecord",
    "Notification",
    "Owner",
    "PushChannel",
    "Rating",
    "Slot",
    "Task",
    "Technician",
    "Urgency",
    "Window",
    "mask_target",
]

CaseState = Literal[
    "opened",
    "awaiting_consent",
    "remote_fix",
    "verifying",
    "appointment_proposed",
    "booked",
    "visited",
    "resolved",
    "dismissed",
    "escalated",
    "expired",
]

_ENDINGS: Final = ("dismissed", "escalated", "expired")

#: Legal case transitions: state -> the states it may move to.
TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "opened": frozenset(("awaiting_consent", "remote_fix", "appointment_proposed", *_ENDINGS)),
    "awaiting_consent": frozenset(("remote_fix", "appointment_proposed", *_ENDINGS)),
    # a remedy that is refused by an interlock or does not cure leads to the next one
    "remote_fix": frozenset(("remote_fix", "verifying", "appointment_proposed", *_ENDINGS)),
    # a failed check tries the next remote remedy or goes to an appointment
    "verifying": frozenset(("resolved", "remote_fix", "appointment_proposed", *_ENDINGS)),
    "appointment_proposed": frozenset(("appointment_proposed", "booked", *_ENDINGS)),
    # the owner moved the visit before it started: its time is freed and new slots offered
    "booked": frozenset(("visited", "appointment_proposed", *_ENDINGS)),
    "visited": frozenset(("verifying", *_ENDINGS)),
    # a resolved case may still go to a person (low rating, "nothing was wrong")
    "resolved": frozenset(("escalated",)),
    "dismissed": frozenset(),
    "escalated": frozenset(("resolved", "dismissed")),
    "expired": frozenset(),
}
CLOSED_STATES: Final = frozenset(("resolved", "dismissed", "escalated", "expired"))
OPEN_STATES: Final = frozenset(TRANSITIONS) - CLOSED_STATES

Urgency = Literal["low", "normal", "high", "critical"]
ConsentPolicy = Literal["fix_and_tell", "ask_if_interrupting", "always_ask"]
ChannelKind = Literal["fcm", "webpush", "ntfy", "webhook"]
Actor = Literal["system", "owner", "technician", "ops"]
AppointmentState = Literal["proposed", "booked", "done", "cancelled"]


@dataclass(frozen=True, slots=True)
class Window:
    """A weekly recurring local time window (availability, working hours).

    Attributes:
        weekday: 0 = Monday ... 6 = Sunday.
        start: local start time.
        end: local end time (after ``start``; windows do not cross midnight).
    """

    weekday: int
    start: time
    end: time


@dataclass(frozen=True, slots=True)
class Owner:
    """A device owner.

    Attributes:
        owner_id: stable id.
        name: how messages address them.
        language: message language (``en``, ``de`` ...).
        timezone: IANA time zone name.
        region: service region (for technicians).
        consent: what remote fixes may run without asking.
        quiet_start: local start of quiet hours (``None``: none).
        quiet_end: local end of quiet hours (may be before ``quiet_start``: overnight).
        availability: when a technician may come (empty: working hours of any day).
        channels: preferred push channel kinds, first first (empty: every active one).
        max_per_day: notifications per day before the rest go into a digest.
    """

    owner_id: str
    name: str
    language: str = "en"
    timezone: str = "UTC"
    region: str = "default"
    consent: ConsentPolicy = "ask_if_interrupting"
    quiet_start: time | None = time(22, 0)
    quiet_end: time | None = time(7, 0)
    availability: tuple[Window, ...] = ()
    channels: tuple[ChannelKind, ...] = ()
    max_per_day: int = 3


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A registered device and who owns it.

    Attributes:
        device_id: the device.
        owner_id: its owner.
        model: product model.
        firmware: installed firmware version, if known.
        label: the owner's name for it (``kitchen fridge``).
        batch: production batch, if known.
    """

    device_id: str
    owner_id: str
    model: str
    firmware: str | None = None
    label: str | None = None
    batch: str | None = None


@dataclass(frozen=True, slots=True)
class PushChannel:
    """A push channel an owner registered.

    Attributes:
        channel_id: stable id.
        owner_id: its owner.
        kind: ``fcm``, ``webpush``, ``ntfy`` or ``webhook``.
        target: FCM registration token, Web Push endpoint URL, ntfy topic URL or webhook URL.
        keys: channel secrets (Web Push ``p256dh`` and ``auth``; webhook ``secret``).
        active: ``False`` once the service said the token is dead.
        created_at: when it was registered.
        failures: delivery failures in a row.
    """

    channel_id: str
    owner_id: str
    kind: ChannelKind
    target: str
    keys: dict[str, str] = field(default_factory=dict)
    active: bool = True
    created_at: datetime | None = None
    failures: int = 0


def mask_target(target: str) -> str:
    """Return a push target with its secret part hidden.

    A URL keeps its scheme and host (``https://fcm.googleapis.com/…``); a token keeps
    its last four characters if it is long enough for that to reveal nothing (24
    characters or more). The owner API and an owner's export both show this, and
    nothing else of a target.

    Args:
        target: a registration token or URL.

    Returns:
        What may be shown of it.
    """
    try:
        parts = urlsplit(target)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:  # not a URL after all (an unbalanced "[" in a token)
        scheme, host = "", None
    if scheme in ("http", "https") and host:
        return f"{scheme}://{host}/…"
    return f"…{target[-4:]}" if len(target) >= 24 else "…"


@dataclass(frozen=True, slots=True)
class Case:
    """One device problem, from the diagnosis to the owner's rating.

    Attributes:
        case_id: stable id.
        device_id: the device.
        owner_id: its owner.
        model: product model.
        fault: the fault named by diagnostics.
        state: lifecycle stage.
        urgency: from the predicted time to failure.
        opened_at: when the case opened (wall clock).
        updated_at: last change.
        confidence: diagnosis confidence.
        failure_at: predicted failure time (p50), if known.
        remedies: the remedies from the catalog (``action`` or ``technician_visit:part``).
        tried: remote remedies tried so far, in order.
        pending_action: the remote remedy waiting for the owner's consent or its result.
        fix_at: device time when the last fix (command result or visit) happened.
        appointment_id: the current appointment, if any.
        needs_person: why a person must look at it (``None``: no need).
        rating: the owner's stars once rated.
        evidence: plain-word facts from the diagnosis.
    """

    case_id: str
    device_id: str
    owner_id: str
    model: str
    fault: str
    state: CaseState
    urgency: Urgency
    opened_at: datetime
    updated_at: datetime
    confidence: float = 0.0
    failure_at: datetime | None = None
    remedies: tuple[str, ...] = ()
    tried: tuple[str, ...] = ()
    pending_action: str | None = None
    fix_at: datetime | None = None
    appointment_id: str | None = None
    needs_person: str | None = None
    rating: int | None = None
    evidence: tuple[str, ...] = ()

    @property
    def is_open(self) -> bool:
        """Whether the case is still being worked on."""
        return self.state in OPEN_STATES


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision or change, with why and on what evidence.

    Attributes:
        case_id: the case (``None`` for fleet-wide decisions).
        at: when (wall clock, UTC).
        actor: who decided.
        action: what was done (``transition``, ``command``, ``notify``, ``rating`` ...).
        reason: plain words on why.
        evidence: the facts it rested on (JSON-serialisable).
        from_state: the case state before, for a transition.
        to_state: the case state after, for a transition.
    """

    case_id: str | None
    at: datetime
    actor: Actor
    action: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    from_state: str | None = None
    to_state: str | None = None


@dataclass(frozen=True, slots=True)
class Technician:
    """A service technician.

    Attributes:
        technician_id: stable id.
        name: display name.
        region: the region they serve.
        skills: the parts they service (``bearing``, ``refrigerant_circuit`` ...).
        timezone: IANA time zone of their working hours.
        hours: weekly working windows (local).
    """

    technician_id: str
    name: str
    region: str
    skills: frozenset[str]
    timezone: str = "UTC"
    hours: tuple[Window, ...] = ()


@dataclass(frozen=True, slots=True)
class Slot:
    """A visit slot the planner offers.

    Attributes:
        technician_id: who would come.
        start: start (UTC).
        end: end (UTC).
        score: how good it is (higher is better).
    """

    technician_id: str
    start: datetime
    end: datetime
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class Appointment:
    """A technician visit for a case.

    Attributes:
        appointment_id: stable id.
        case_id: the case.
        technician_id: who comes (for a proposal: who would).
        start: start (UTC).
        end: end (UTC).
        state: ``proposed``, ``booked``, ``done`` or ``cancelled``.
        part: the part to service.
        offered: the slots offered with it (for ``proposed``).
        note: the technician's note once done.
    """

    appointment_id: str
    case_id: str
    technician_id: str | None
    start: datetime | None
    end: datetime | None
    state: AppointmentState
    part: str | None = None
    offered: tuple[Slot, ...] = ()
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Rating:
    """The owner's verdict on a resolved case.

    Attributes:
        case_id: the case.
        stars: 1 to 5.
        comment: optional words.
        nothing_wrong: the owner says there was nothing wrong (a false-alarm label).
        at: when.
    """

    case_id: str
    stars: int
    comment: str | None
    nothing_wrong: bool
    at: datetime


@dataclass(frozen=True, slots=True)
class Notification:
    """A message sent (or held for a digest) to an owner.

    Attributes:
        notification_id: stable id.
        owner_id: recipient.
        case_id: the case it is about.
        kind: template name (``fix_done``, ``consent``, ``slots``, ``rate`` ...).
        title: short title.
        body: plain words.
        actions: one-tap actions: ``(action id, label)``.
        created_at: when it was written.
        status: ``sent``, ``held`` (quiet hours or daily limit), ``failed``.
        channel_id: the channel that delivered it.
    """

    notification_id: str
    owner_id: str
    case_id: str | None
    kind: str
    title: str
    body: str
    actions: tuple[tuple[str, str], ...]
    created_at: datetime
    status: str = "sent"
    channel_id: str | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """Work for a person on the ops team.

    Attributes:
        task_id: stable id.
        case_id: the case.
        reason: why a person is needed.
        created_at: when.
        state: ``open``, ``taken`` or ``closed``.
        assignee: who took it.
    """

    task_id: str
    case_id: str
    reason: str
    created_at: datetime
    state: str = "open"
    assignee: str | None = None
