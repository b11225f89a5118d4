"""What the owner REST API answers: its response bodies (notifier; here -> owners' apps).

Frozen pydantic models (:class:`notifier.edge.View`) that are also the OpenAPI
document's schemas. Owners never see scores or diagnostic evidence here; push targets
are masked and channel secrets never shown. :mod:`notifier.api.words` builds them from
the store's records.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime

from notifier.edge import View
from notifier.model import CaseState, ChannelKind, ConsentPolicy, Urgency

__all__ = [
    "ActionLinkView",
    "AppointmentView",
    "CaseDetailView",
    "CaseList",
    "CaseView",
    "ChannelList",
    "ChannelView",
    "DeviceList",
    "DeviceView",
    "ErasedView",
    "HealthWord",
    "OfferView",
    "ProfileView",
    "QuietHoursView",
    "RatingView",
    "SlotView",
    "VisitList",
    "VisitView",
    "WaitingFor",
]

HealthWord = Literal["good", "needs attention", "problem", "unknown"]
WaitingFor = Literal["your_consent", "your_choice", "your_rating"]

# -- response bodies ------------------------------------------------------------------------


class QuietHoursView(View):
    """Quiet hours, local ``HH:MM``.

    Attributes:
        start: local start.
        end: local end.
    """

    start: str
    end: str


class ProfileView(View):
    """The owner's profile.

    Attributes:
        name: how messages address them.
        language: message language.
        timezone: IANA time zone.
        region: service region.
        consent: which remote fixes may run without asking.
        quiet_hours: when no push comes (``null``: none).
        channels: preferred channel kinds, first first.
        max_per_day: notifications per day before the rest go into a digest.
    """

    name: str
    language: str
    timezone: str
    region: str
    consent: ConsentPolicy
    quiet_hours: QuietHoursView | None
    channels: list[ChannelKind]
    max_per_day: int


class ChannelView(View):
    """A registered push channel (its target masked, its secrets never shown).

    Attributes:
        channel_id: id.
        kind: which service.
        target: the target, masked.
        active: whether pushes go to it (``false``: retired after failing or being
            called dead; re-verify it to use it again).
        created_at: when it was registered.
    """

    channel_id: str
    kind: ChannelKind
    target: str
    active: bool
    created_at: AwareDatetime | None


class ChannelList(View):
    """The owner's push channels, active and retired, oldest first.

    Attributes:
        channels: the channels.
    """

    channels: list[ChannelView]


class DeviceView(View):
    """A device and how it is doing, in plain words.

    Attributes:
        device_id: id.
        label: the owner's name for it.
        model: product model.
        firmware: installed firmware version.
        health: ``good``, ``needs attention``, ``problem`` or ``unknown`` (no reading yet).
        open_cases: ids of its open cases, newest first.
    """

    device_id: str
    label: str | None
    model: str
    firmware: str | None
    health: HealthWord
    open_cases: list[str]


class DeviceList(View):
    """The owner's devices.

    Attributes:
        devices: the devices, by id.
    """

    devices: list[DeviceView]


class CaseView(View):
    """A case as its owner sees it.

    Attributes:
        case_id: id.
        device_id: the device.
        device_label: the owner's name for the device.
        title: the problem in plain words.
        state: lifecycle stage.
        open: whether it is still being worked on.
        urgency: how soon it matters.
        waiting_for: what the loop waits for from the owner, if anything.
        pending_fix: the remote fix waiting for consent or its result.
        appointment_id: the current appointment.
        rating: the owner's stars, once rated.
        opened_at: when it opened.
        updated_at: last change.
    """

    case_id: str
    device_id: str
    device_label: str | None
    title: str
    state: CaseState
    open: bool
    urgency: Urgency
    waiting_for: WaitingFor | None
    pending_fix: str | None
    appointment_id: str | None
    rating: int | None
    opened_at: AwareDatetime
    updated_at: AwareDatetime


class CaseDetailView(CaseView):
    """A case with its history in plain words.

    Attributes:
        history: what happened, oldest first, one sentence each.
    """

    history: list[str]


class CaseList(View):
    """The owner's cases, newest first.

    Attributes:
        cases: the cases.
    """

    cases: list[CaseView]


class SlotView(View):
    """A visit time on offer.

    Attributes:
        index: what to send back to choose it.
        start: start (UTC).
        end: end (UTC).
        technician: who would come.
    """

    index: int
    start: AwareDatetime
    end: AwareDatetime
    technician: str | None


class OfferView(View):
    """The visit times on offer for a case.

    Attributes:
        appointment_id: the proposal (``null``: nothing on offer).
        slots: the times, in the offer's order.
    """

    appointment_id: str | None
    slots: list[SlotView]


class AppointmentView(View):
    """A booked (or done, or cancelled) visit, as the owner sees it.

    Attributes:
        appointment_id: id.
        case_id: the case.
        state: ``proposed``, ``booked``, ``done`` or ``cancelled``.
        start: start (UTC).
        end: end (UTC).
        technician: who comes.
    """

    appointment_id: str
    case_id: str
    state: str
    start: AwareDatetime | None
    end: AwareDatetime | None
    technician: str | None


class RatingView(View):
    """A stored rating.

    Attributes:
        case_id: the case.
        stars: 1 to 5.
        comment: the owner's words.
        nothing_wrong: the owner said there was nothing wrong.
        at: when.
    """

    case_id: str
    stars: int
    comment: str | None
    nothing_wrong: bool
    at: AwareDatetime


class ActionLinkView(View):
    """What a one-tap action link will do (``POST`` the same link to do it).

    Attributes:
        case_id: the case.
        action: the action (``accept_fix``, ``choose_slot:0``, ``rate_good`` ...).
        title: the case's problem in plain words, in the owner's language.
        does: what the action does, in plain words.
        expires_at: when the link stops working.
    """

    case_id: str
    action: str
    title: str
    does: str
    expires_at: AwareDatetime


class ErasedView(View):
    """The result of an erasure.

    Attributes:
        erased: always ``true``.
        rows: how many stored rows were removed or anonymised.
    """

    erased: bool
    rows: int


class VisitView(View):
    """A visit as its technician sees it.

    Attributes:
        appointment_id: id.
        case_id: the case.
        device_id: the device.
        model: product model.
        fault: the diagnosed fault.
        part: the part to service.
        state: ``booked``, ``done`` or ``cancelled``.
        start: start (UTC).
        end: end (UTC).
        note: the technician's note once done.
        evidence: the diagnosis's facts in plain words.
    """

    appointment_id: str
    case_id: str
    device_id: str | None
    model: str | None
    fault: str | None
    part: str | None
    state: str
    start: AwareDatetime | None
    end: AwareDatetime | None
    note: str | None
    evidence: list[str]


class VisitList(View):
    """A technician's visits, by start.

    Attributes:
        visits: the visits.
    """

    visits: list[VisitView]
