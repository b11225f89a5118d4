"""What every language of the owner's messages must say, and the records they are made of.

Part of :mod:`notifier.messages` (the case machine's facts -> here -> the outbox). The
message kinds, faults, remedies, products, refusal reasons, states and history steps
every language has words for; the length limits of a message; the message and its facts
(:class:`OwnerMessage`, :class:`MessageContext`); and the shape of one language's words
(:class:`Catalogue` of :class:`Template`, :class:`Product` and :class:`Calendar`), which
:mod:`notifier.messages.en`, :mod:`~notifier.messages.de` and
:mod:`~notifier.messages.fr` fill in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from notifier.errors import InvalidRequestError

__all__ = [
    "DEFAULT_LANGUAGE",
    "FAULTS",
    "HISTORY_STEPS",
    "KINDS",
    "MAX_ACTIONS",
    "MAX_BODY",
    "MAX_TITLE",
    "MODELS",
    "REFUSALS",
    "REMOTE_ACTIONS",
    "SLOT_ACTION",
    "STATES",
    "Calendar",
    "Catalogue",
    "MessageContext",
    "OwnerMessage",
    "Product",
    "Template",
]

MAX_TITLE: Final = 60
MAX_BODY: Final = 300
MAX_ACTIONS: Final = 3
DEFAULT_LANGUAGE: Final = "en"

#: The message kinds every language has.
KINDS: Final = (
    "fixed_remotely",
    "consent_request",
    "fix_waiting",
    "appointment_offer",
    "appointment_booked",
    "appointment_reminder",
    "visit_moving",
    "visit_cancelled",
    "visit_cancelled_call",
    "visit_move_limit",
    "visit_done_checking",
    "resolved",
    "not_fixed_escalated",
    "rating_request",
    "urgent_safety",
    "digest",
)

#: Faults of the catalogue (:mod:`diagnostics.catalog`) plus ``unknown``.
FAULTS: Final = (
    "bearing_wear",
    "drain_clog",
    "refrigerant_leak",
    "coil_fouling",
    "sensor_drift",
    "sensor_stuck",
    "firmware_bug",
    "crash_loop",
    "controller_hang",
    "unknown",
)
#: Remote remedies a device carries out.
REMOTE_ACTIONS: Final = ("restart", "firmware_update", "cleaning_cycle", "selftest", "config_set")
#: Product models; ``""`` stands for a device of no known model.
MODELS: Final = ("washer", "fridge", "heat_pump", "")
#: Refusal reasons a device may give that have their own words.
REFUSALS: Final = ("door_open", "mid_cycle", "low_battery", "defrosting", "updating")
#: States of a case (:data:`notifier.model.TRANSITIONS`), plus the two repeated steps.
STATES: Final = (
    "opened",
    "awaiting_consent",
    "remote_fix",
    "remote_fix_again",
    "verifying",
    "appointment_proposed",
    "appointment_proposed_again",
    "booked",
    "visited",
    "resolved",
    "dismissed",
    "escalated",
    "expired",
)
#: The action id that stands for one action per offered visit time (``choose_slot:N``).
SLOT_ACTION: Final = "choose_slot"
#: Audit-trail steps besides state changes that the owner's history tells.
HISTORY_STEPS: Final = (
    "command",
    "command_refused",
    "consent",
    "verification_failed",
    "slot_taken",
    "visit_moved",
    "visit_cancelled",
    "rating",
)


# -- records ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerMessage:
    """One message to an owner, ready to push.

    Attributes:
        kind: the template it was written from.
        title: short title (at most :data:`MAX_TITLE` characters).
        body: plain words (at most :data:`MAX_BODY` characters).
        actions: one-tap actions, ``(action id, label)`` (at most :data:`MAX_ACTIONS`).
        language: the language it is written in.
    """

    kind: str
    title: str
    body: str
    actions: tuple[tuple[str, str], ...]
    language: str

    def __post_init__(self) -> None:
        if len(self.title) > MAX_TITLE or len(self.body) > MAX_BODY:
            raise InvalidRequestError(f"{self.kind} message is too long")
        if len(self.actions) > MAX_ACTIONS:
            raise InvalidRequestError(f"{self.kind} message has more than {MAX_ACTIONS} actions")


@dataclass(frozen=True, slots=True)
class MessageContext:
    """The facts a message is written from.

    Attributes:
        owner_name: how the owner is addressed (empty: no name).
        device_label: the owner's name for the device (``None``: the product's plain name).
        model: product model (``washer``, ``fridge``, ``heat_pump``; anything else: "device").
        fault: the fault named by diagnostics (unknown names read as ``unknown``).
        action: the remote remedy concerned (``restart`` ...), if any.
        slots: offered visit times, ``(start, end)`` in UTC.
        appointment: the booked visit, ``(start, end, technician's first name or None)``.
        timezone: the owner's IANA time zone; times are shown in it.
        reason: the device's words (or code, such as ``door_open``) when it refused.
        urgent: the matter is urgent.
        days_to_failure: predicted days until the device fails, if known.
        count: how many messages a digest stands for (0: the number of ``items``).
        items: a digest's short lines.
    """

    owner_name: str
    device_label: str | None
    model: str
    fault: str = "unknown"
    action: str | None = None
    slots: tuple[tuple[datetime, datetime], ...] = ()
    appointment: tuple[datetime, datetime, str | None] | None = None
    timezone: str = "UTC"
    reason: str | None = None
    urgent: bool = False
    days_to_failure: float | None = None
    count: int = 0
    items: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        times = [t for slot in self.slots for t in slot]
        if self.appointment is not None:
            times += [self.appointment[0], self.appointment[1]]
        if any(t.tzinfo is None or t.utcoffset() is None for t in times):
            raise InvalidRequestError("message times must be timezone-aware (UTC)")


@dataclass(frozen=True, slots=True)
class Template:
    """One kind of message in one language.

    Attributes:
        title: the title (its placeholders always have a value).
        body: sentences; one whose placeholder has no value is left out.
        actions: action ids; ``choose_slot`` stands for one action per offered slot.
        optional: the sentences (by index) to leave out first, in order, when the body
            would be too long (a long name or label).
    """

    title: str
    body: tuple[str, ...]
    actions: tuple[str, ...] = ()
    optional: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Product:
    """How one language names a product.

    Attributes:
        name: the plain noun (``washing machine``).
        forms: "your ..." in nominative, accusative and dative.
        labelled: the same with the owner's label (``{label}``).
    """

    name: str
    forms: tuple[str, str, str]
    labelled: tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Calendar:
    """How one language writes dates and times.

    Attributes:
        weekdays: abbreviations, Monday first.
        months: abbreviations, January first.
        day: a date with weekday (``{wd}``, ``{d}``, ``{mon}``).
        date: a date without weekday (history lines).
        clock: a time of day (``{h}``, ``{m}`` as numbers).
        whole_hour: a time on the hour, if the language writes it shorter.
        first_day: how the first of a month is written (French ``1er``).
    """

    weekdays: tuple[str, ...]
    months: tuple[str, ...]
    day: str
    date: str
    clock: str
    whole_hour: str | None = None
    first_day: str = "1"


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Everything one language says.

    Attributes:
        code: language code.
        templates: kind -> template.
        products: model -> product names (``""``: a device of no known model).
        faults: fault -> ``(title, clause after "we noticed that")``.
        fault_models: ``fault/model`` -> a model's own ``(title, clause)``.
        actions: remote remedy -> ``(title, "we'd like to ...", "we have ...")``; ``""``
            is any other fix.
        action_models: ``action/model`` -> a model's own phrases.
        reasons: refusal code -> ``(clause after "it told us that", advice or "")``.
        states: case state -> a plain history line.
        steps: audit step -> a plain history line.
        labels: action id -> button label (``choose_slot`` gets ``{slot}``).
        words: the small words messages are assembled from.
        calendar: how dates are written.
        elisions: ``(regex, replacement)`` applied to finished text, for the contractions
            a language makes where two phrases meet (French ``que un`` -> ``qu'un``).
    """

    code: str
    templates: Mapping[str, Template]
    products: Mapping[str, Product]
    faults: Mapping[str, tuple[str, str]]
    fault_models: Mapping[str, tuple[str, str]]
    actions: Mapping[str, tuple[str, str, str]]
    action_models: Mapping[str, tuple[str, str, str]]
    reasons: Mapping[str, tuple[str, str]]
    states: Mapping[str, str]
    steps: Mapping[str, str]
    labels: Mapping[str, str]
    words: Mapping[str, str]
    calendar: Calendar
    elisions: tuple[tuple[str, str], ...] = ()

    def polish(self, text: str) -> str:
        """Apply the language's contractions to finished text."""
        for pattern, replacement in self.elisions:
            text = re.sub(pattern, replacement, text)
        return text
