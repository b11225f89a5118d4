"""The store's records in the owner's words: the owner REST API's views built (notifier).

Case titles and histories come from the message catalogue (:mod:`notifier.messages`)
where it is installed, else from the plain English words here; device health is one of
four words, never a score. Each ``*_view`` function turns a record into the view the
API answers with (:mod:`notifier.api.views`).
"""

from __future__ import annotations

import importlib
import zoneinfo
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import ModuleType
from typing import Final

from notifier.actions import HealthPoint
from notifier.api.views import (
    AppointmentView,
    CaseView,
    ChannelView,
    HealthWord,
    OfferView,
    ProfileView,
    QuietHoursView,
    RatingView,
    SlotView,
    VisitView,
    WaitingFor,
)
from notifier.edge import zones
from notifier.model import (
    Appointment,
    AuditEntry,
    Case,
    Owner,
    PushChannel,
    Rating,
    mask_target,
)
from notifier.store import CaseStore

__all__ = [
    "appointment_view",
    "case_history",
    "case_title",
    "case_view",
    "channel_view",
    "device_label",
    "health_word",
    "offer_view",
    "profile_view",
    "rating_view",
    "visit_view",
]

#: A stored score at or above this reads "needs attention" (diagnostics' opening threshold).
_ATTENTION_SCORE: Final = 0.5
_URGENT: Final = frozenset(("high", "critical"))

# -- plain words ----------------------------------------------------------------------------

_HistoryEntry = tuple[datetime, str, str | None, str | None]


def _load_messages() -> ModuleType | None:
    """The message catalogue (:mod:`notifier.messages`), or ``None`` where it is missing."""
    try:
        return importlib.import_module("notifier.messages")
    except ModuleNotFoundError as exc:
        if exc.name != "notifier.messages":
            raise  # the catalogue is there but broken: that must show
        return None


#: The catalogue's ``fault_title(fault, model, language)``, if installed.
_CATALOG_TITLE: Final[Callable[[str, str, str], str] | None] = getattr(
    _load_messages(), "fault_title", None
)
#: The catalogue's ``plain_history(entries, language, timezone)``, if installed.
_CATALOG_HISTORY: Final[Callable[[Sequence[_HistoryEntry], str, str], list[str]] | None] = getattr(
    _load_messages(), "plain_history", None
)

_STATE_WORDS: Final[dict[str, str]] = {
    "opened": "We noticed something that needs looking at",
    "awaiting_consent": "We asked you before fixing it remotely",
    "remote_fix": "We started fixing it remotely",
    "verifying": "We are checking that it works properly again",
    "appointment_proposed": "We offered times for a technician visit",
    "booked": "A technician visit was booked",
    "visited": "The technician has been",
    "resolved": "It is fixed",
    "dismissed": "We closed it: nothing more needs doing",
    "escalated": "A person from our team is looking at it",
    "expired": "We closed it",
}


def case_title(case: Case, language: str) -> str:
    """The case's title in the owner's language (the catalogue's, else the fault's name)."""
    if _CATALOG_TITLE is not None:
        return str(_CATALOG_TITLE(case.fault, case.model, language))
    return case.fault.replace("_", " ").strip().capitalize() or "A problem"


def case_history(trail: Sequence[AuditEntry], owner: Owner) -> list[str]:
    """The case's history in plain words, in the owner's language and time zone."""
    entries: list[_HistoryEntry] = [(e.at, e.action, e.from_state, e.to_state) for e in trail]
    if _CATALOG_HISTORY is not None:
        return [str(line) for line in _CATALOG_HISTORY(entries, owner.language, owner.timezone)]
    zone = zoneinfo.ZoneInfo(owner.timezone) if owner.timezone in zones() else UTC
    lines: list[str] = []
    for at, _action, from_state, to_state in entries:
        # only state changes are told: the other entries are the loop's own bookkeeping
        if to_state is None or to_state == from_state or to_state not in _STATE_WORDS:
            continue
        when = at.astimezone(zone).strftime("%d %b %Y, %H:%M")
        lines.append(f"{when}: {_STATE_WORDS[to_state]}.")
    return lines


def _waiting_for(case: Case) -> WaitingFor | None:
    if case.state == "awaiting_consent":
        return "your_consent"
    if case.state == "appointment_proposed":
        return "your_choice"
    if case.state == "resolved" and case.rating is None:
        return "your_rating"
    return None


def case_view(case: Case, label: str | None, language: str) -> CaseView:
    """The case as its owner sees it."""
    return CaseView(
        case_id=case.case_id,
        device_id=case.device_id,
        device_label=label,
        title=case_title(case, language),
        state=case.state,
        open=case.is_open,
        urgency=case.urgency,
        waiting_for=_waiting_for(case),
        pending_fix=case.pending_action,
        appointment_id=case.appointment_id,
        rating=case.rating,
        opened_at=case.opened_at,
        updated_at=case.updated_at,
    )


def health_word(point: HealthPoint | None, open_cases: Sequence[Case]) -> HealthWord:
    """A device's health in one word: its open cases first, then its latest score."""
    if any(case.urgency in _URGENT for case in open_cases):
        return "problem"
    if open_cases:
        return "needs attention"
    if point is None:
        return "unknown"
    return "needs attention" if point.score >= _ATTENTION_SCORE else "good"


def profile_view(owner: Owner) -> ProfileView:
    """The owner's profile as the API shows it."""
    quiet = (
        None
        if owner.quiet_start is None or owner.quiet_end is None
        else QuietHoursView(
            start=owner.quiet_start.strftime("%H:%M"), end=owner.quiet_end.strftime("%H:%M")
        )
    )
    return ProfileView(
        name=owner.name,
        language=owner.language,
        timezone=owner.timezone,
        region=owner.region,
        consent=owner.consent,
        quiet_hours=quiet,
        channels=list(owner.channels),
        max_per_day=owner.max_per_day,
    )


def channel_view(channel: PushChannel) -> ChannelView:
    """A push channel, its target masked and its secrets left out."""
    return ChannelView(
        channel_id=channel.channel_id,
        kind=channel.kind,
        target=mask_target(channel.target),
        active=channel.active,
        created_at=channel.created_at,
    )


def rating_view(rating: Rating) -> RatingView:
    """A stored rating."""
    return RatingView(
        case_id=rating.case_id,
        stars=rating.stars,
        comment=rating.comment,
        nothing_wrong=rating.nothing_wrong,
        at=rating.at,
    )


async def device_label(store: CaseStore, device_id: str) -> str | None:
    """The owner's name for a device (``None``: none, or no such device)."""
    device = await store.get_device(device_id)
    return None if device is None else device.label


class _Names:
    """Technician names, looked up once per request."""

    def __init__(self, store: CaseStore) -> None:
        self._store = store
        self._names: dict[str, str | None] = {}

    async def name(self, technician_id: str | None) -> str | None:
        if technician_id is None:
            return None
        if technician_id not in self._names:
            technician = await self._store.get_technician(technician_id)
            self._names[technician_id] = None if technician is None else technician.name
        return self._names[technician_id]


async def offer_view(store: CaseStore, proposal: Appointment | None) -> OfferView:
    """The visit times on offer, with the technicians' names (empty: none)."""
    if proposal is None:
        return OfferView(appointment_id=None, slots=[])
    names = _Names(store)
    slots = [
        SlotView(
            index=index,
            start=slot.start,
            end=slot.end,
            technician=await names.name(slot.technician_id),
        )
        for index, slot in enumerate(proposal.offered)
    ]
    return OfferView(appointment_id=proposal.appointment_id, slots=slots)


async def appointment_view(store: CaseStore, appointment: Appointment) -> AppointmentView:
    """A booked visit, with the technician's name."""
    return AppointmentView(
        appointment_id=appointment.appointment_id,
        case_id=appointment.case_id,
        state=appointment.state,
        start=appointment.start,
        end=appointment.end,
        technician=await _Names(store).name(appointment.technician_id),
    )


def visit_view(appointment: Appointment, case: Case | None) -> VisitView:
    """A visit as its technician sees it (with the case's fault and evidence)."""
    return VisitView(
        appointment_id=appointment.appointment_id,
        case_id=appointment.case_id,
        device_id=None if case is None else case.device_id,
        model=None if case is None else case.model,
        fault=None if case is None else case.fault,
        part=appointment.part,
        state=appointment.state,
        start=appointment.start,
        end=appointment.end,
        note=appointment.note,
        evidence=[] if case is None else list(case.evidence),
    )
