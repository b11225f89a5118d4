"""What the owner reads: the message catalogue of the owner loop (notifier).

The case machine says *what* happened (a kind of message and its facts); the outbox asks
this module to put it into short, warm, plain words in the owner's language, then keeps
and pushes the result. The API uses the same words for a case's title and its history.

Every message says what we noticed, what we did or propose, and what the owner needs to
do, if anything, with at most three one-tap actions. Owners never see our internal
names: no fault ids, command names, scores or error codes, only plain phrases ("the drum
bearing is wearing out", "a software update"). Times are shown in the owner's own time
zone, written the way their language writes them.

Each language is one :class:`_Catalogue`: the same templates with the same placeholders
and actions, and the same product, fault, action, reason and state phrases.
:func:`catalogue_problems` lists any difference (the tests require none). A template's
body is a run of sentences; a sentence whose placeholder has no value (no predicted
failure time, no reason the device gave) is simply left out, and when a long name or
label would make a body too long, the sentences a template marks as optional give way
first (a text is cut short only as a last resort). German needs its nouns in
more than one grammatical case: ``{device_acc}`` and ``{device_dat}`` are forms of
``{device}`` and count as the same placeholder; ``{Device}`` starts a sentence.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifier.errors import InvalidRequestError

# The catalogue is prose in three languages: en dashes, German and French quotation marks
# and typographic apostrophes are meant, not look-alikes of ASCII characters.
# ruff: noqa: RUF001

__all__ = [
    "DEFAULT_LANGUAGE",
    "FAULTS",
    "KINDS",
    "LANGUAGES",
    "MAX_ACTIONS",
    "MAX_BODY",
    "MAX_TITLE",
    "MODELS",
    "REFUSALS",
    "REMOTE_ACTIONS",
    "STATES",
    "MessageContext",
    "OwnerMessage",
    "action_title",
    "catalogue_problems",
    "device_phrase",
    "fault_title",
    "plain_history",
    "product_name",
    "refusal_code",
    "render",
    "resolve_language",
    "state_title",
]

_LOG = logging.getLogger(__name__)

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
#: Rough minutes a remote remedy keeps the device busy (what the consent question says).
_MINUTES: Final[Mapping[str, int]] = {
    "restart": 2,
    "firmware_update": 15,
    "cleaning_cycle": 30,
    "selftest": 5,
    "config_set": 1,
    "": 5,
}

_LABEL_MAX: Final = 20
_NAME_MAX: Final = 24
_ITEM_MAX: Final = 60
_DIGEST_ITEMS: Final = 3
_SLOT_ACTION: Final = "choose_slot"
_ELLIPSIS: Final = "…"
_CASE_SUFFIXES: Final = ("_acc", "_dat")


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
class _Template:
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
class _Product:
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
class _Calendar:
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
class _Catalogue:
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
    templates: Mapping[str, _Template]
    products: Mapping[str, _Product]
    faults: Mapping[str, tuple[str, str]]
    fault_models: Mapping[str, tuple[str, str]]
    actions: Mapping[str, tuple[str, str, str]]
    action_models: Mapping[str, tuple[str, str, str]]
    reasons: Mapping[str, tuple[str, str]]
    states: Mapping[str, str]
    steps: Mapping[str, str]
    labels: Mapping[str, str]
    words: Mapping[str, str]
    calendar: _Calendar
    elisions: tuple[tuple[str, str], ...] = ()

    def polish(self, text: str) -> str:
        """Apply the language's contractions to finished text."""
        for pattern, replacement in self.elisions:
            text = re.sub(pattern, replacement, text)
        return text


# -- English ----------------------------------------------------------------------------


def _en_product(noun: str) -> _Product:
    your = f"your {noun}"
    return _Product(noun, (your, your, your), ("your {label}",) * 3)


_EN: Final = _Catalogue(
    code="en",
    templates={
        "fixed_remotely": _Template(
            "{Device} is working again",
            (
                "{hi} we noticed that {fault}.",
                "We {action_done} and checked afterwards: it's working normally again.",
                "There's nothing you need to do.",
            ),
        ),
        "consent_request": _Template(
            "A quick question about {device}",
            (
                "{hi} we noticed that {fault}.",
                "We'd like to {action_do}. It takes {duration}, and it can't be used in the"
                " meantime. Is that all right?",
                "If not, we'll suggest a technician visit instead.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": _Template(
            "We'll try again a little later",
            (
                "{hi} we wanted to {action_do}, but it couldn't be done just then.",
                "It told us that {reason}.",
                "{advice}",
                "We'll try again by ourselves in a little while.",
            ),
            optional=(3,),
        ),
        "appointment_offer": _Template(
            "A technician visit for {device}",
            (
                "{hi} we noticed that {fault}; a technician should take a look.",
                "Left as it is, it could stop working {when}.",
                "{urgent}",
                "Pick a time that suits you: {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": _Template(
            "Your technician visit is booked",
            (
                "{hi} {who} will come {appointment} to look at {device}.",
                "Please make sure someone is at home.",
                "If the time no longer suits you, you can change it.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": _Template(
            "Reminder: your technician visit",
            (
                "{hi} just a reminder that {who} will come {appointment} to look at {device}.",
                "Please make sure someone is at home.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": _Template(
            "New times for your technician visit",
            (
                "{hi} no problem: we've cancelled the visit {appointment} for {device}.",
                "Pick a new time that suits you: {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": _Template(
            "Your technician visit is cancelled",
            (
                "{hi} as you asked, we've cancelled the technician visit {appointment}"
                " for {device}.",
                "If we notice anything else, we'll let you know.",
                "There's nothing you need to do.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": _Template(
            "We'll be in touch about {device}",
            (
                "{hi} as you asked, we've cancelled the technician visit {appointment}.",
                "As {device} needs fixing soon, a person from our service team will contact"
                " you to find another way.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": _Template(
            "We'll call you to find a visit time",
            (
                "{hi} we're sorry that finding a good time for the visit for {device} hasn't"
                " been easy.",
                "We've freed up the visit {appointment}, and a person from our service team"
                " will call you soon to agree on a time that suits you.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": _Template(
            "The technician visit is done",
            (
                "{hi} {who} has finished working on {device}.",
                "We're now checking that everything runs as it should, and we'll let you know.",
                "There's nothing you need to do.",
            ),
        ),
        "resolved": _Template(
            "{Device} is working properly again",
            (
                "{hi} good news: since the technician's visit, {device} has been working"
                " as it should.",
                "Thank you for your patience.",
            ),
        ),
        "not_fixed_escalated": _Template(
            "Sorry, it's not fixed yet",
            (
                "{hi} we're sorry: {device} still isn't working as it should, and we haven't"
                " been able to fix it yet.",
                "A person from our service team will contact you soon to sort it out.",
                "There's nothing you need to do until then.",
            ),
            optional=(2,),
        ),
        "rating_request": _Template(
            "How did we do?",
            (
                "{hi} now that {device} is working again, we'd love to hear how it went.",
                "Tap below, and add a comment in the app if you like.",
                "If nothing was wrong in the first place, please tell us that too.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": _Template(
            "Important: {device} needs attention",
            (
                "{hi} we noticed that {fault}.",
                "{safety}",
                "We're arranging a technician visit as soon as we can and will send you times.",
            ),
        ),
        "digest": _Template(
            "{updates} since our last message",
            ("{hi} here's what happened:", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _en_product("washing machine"),
        "fridge": _en_product("fridge"),
        "heat_pump": _en_product("heat pump"),
        "": _en_product("device"),
    },
    faults={
        "bearing_wear": ("Worn drum bearing", "the drum bearing is wearing out"),
        "drain_clog": ("Blocked drain", "the drain pump is struggling to pump the water away"),
        "refrigerant_leak": (
            "Refrigerant leak",
            "the cooling circuit seems to be losing refrigerant",
        ),
        "coil_fouling": ("Dirty outdoor coil", "the coil in the outdoor unit is getting dirty"),
        "sensor_drift": (
            "Temperature sensor not quite accurate",
            "a temperature sensor is giving slightly wrong readings",
        ),
        "sensor_stuck": (
            "Temperature sensor not updating",
            "a temperature sensor has stopped updating its readings",
        ),
        "firmware_bug": ("Software error", "the control software ran into an error"),
        "crash_loop": ("Keeps restarting", "the controls keep restarting by themselves"),
        "controller_hang": ("Controls not responding", "the controls stopped responding"),
        "unknown": ("Something not quite right", "something isn't quite right"),
    },
    fault_models={
        "sensor_drift/washer": (
            "Water temperature sensor not quite accurate",
            "the water temperature sensor is giving slightly wrong readings",
        ),
    },
    actions={
        "restart": ("Remote restart", "restart {device} remotely", "restarted {device} remotely"),
        "firmware_update": (
            "Software update",
            "install a software update on {device}",
            "installed a software update on {device}",
        ),
        "cleaning_cycle": (
            "Cleaning cycle",
            "run a cleaning cycle on {device}",
            "ran a cleaning cycle on {device}",
        ),
        "selftest": (
            "Self-check",
            "run a short self-check on {device}",
            "ran a short self-check on {device}",
        ),
        "config_set": (
            "Setting adjusted",
            "adjust a setting on {device}",
            "adjusted a setting on {device}",
        ),
        "technician_visit": ("Technician visit", "send a technician", "sent a technician"),
        "": ("Remote fix", "fix {device} remotely", "fixed {device} remotely"),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Cleaning cycle for the drain pump",
            "run a cleaning cycle for the drain pump of {device}",
            "ran a cleaning cycle for the drain pump of {device}",
        ),
    },
    reasons={
        "door_open": ("the door is open", "If you can, please close the door."),
        "mid_cycle": (
            "a programme is running",
            "No need to stop it: we'll wait until it has finished.",
        ),
        "low_battery": ("its battery is low", "Please make sure it is plugged in."),
        "defrosting": ("it is defrosting", ""),
        "updating": ("it is installing an update", ""),
    },
    states={
        "opened": "We noticed a problem with {device} and started looking into it.",
        "awaiting_consent": "We asked you before fixing it remotely.",
        "remote_fix": "We started fixing {device} remotely.",
        "remote_fix_again": "We tried another remote fix.",
        "verifying": "We started checking that everything works properly again.",
        "appointment_proposed": "We offered you times for a technician visit.",
        "appointment_proposed_again": "We offered you other times for the visit.",
        "booked": "The technician visit was booked.",
        "visited": "The technician has been.",
        "resolved": "All good: {device} is working properly again.",
        "dismissed": "We closed this: nothing more needs doing.",
        "escalated": "A person from our service team took over.",
        "expired": "We closed this because we didn't hear back.",
    },
    steps={
        "command": "We sent a fix to {device}.",
        "command_refused": "{Device} couldn't do it just then, so we waited.",
        "consent": "You answered our question.",
        "verification_failed": "Our check showed it wasn't quite right yet.",
        "slot_taken": "The time you picked had just been taken.",
        "visit_moved": "You asked to move the visit, so we freed up the booked time.",
        "visit_cancelled": "The booked technician visit was cancelled.",
        "rating": "You told us how it went. Thank you!",
    },
    labels={
        "accept_fix": "Yes, go ahead",
        "decline_fix": "No, thanks",
        _SLOT_ACTION: "{slot}",
        "other_times": "Other times",
        "decline_visit": "Cancel the visit",
        "rate_good": "It went well",
        "rate_bad": "Not so well",
        "nothing_wrong": "Nothing was wrong",
    },
    words={
        "hi": "Hi {name},",
        "hi_anonymous": "Hi,",
        "who": "our technician",
        "at": "on {when}",
        "agreed_time": "at the agreed time",
        "duration_one": "about a minute",
        "duration": "about {n} minutes",
        "slots_join": " or ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "As it's urgent, these are our earliest times.",
        "no_slots": "We'll send you times for the visit very soon.",
        "when_days_2": "very soon",
        "when_days_7": "within the next few days",
        "when_days_21": "in the next couple of weeks",
        "when_days_60": "in the coming weeks",
        "when_later": "in the coming months",
        "update_one": "1 update",
        "updates": "{n} updates",
        "more": "\nAnd {n} more in the app.",
        "safety_washer": "To avoid further damage, please don't use it until a technician has"
        " looked at it.",
        "safety_fridge": "Your food may not stay cold: keep the door shut and move anything that"
        " spoils easily somewhere cool.",
        "safety_heat_pump": "Your home may get less heat or hot water, so keep another heater"
        " ready if you have one.",
        "safety_": "To be safe, please don't use it until a technician has looked at it.",
        "history": "{date} {time} — {text}",
        "history_done": "We {done}.",
    },
    calendar=_Calendar(
        weekdays=("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
        months=("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        day="{wd} {d} {mon}",
        date="{d} {mon}",
        clock="{h:02d}:{m:02d}",
    ),
)


# -- German -----------------------------------------------------------------------------


def _de_product(noun: str, gender: str) -> _Product:
    # the formal possessive "Ihr" in nominative, accusative, dative, by grammatical gender
    nom, acc, dat = {
        "f": ("Ihre", "Ihre", "Ihrer"),
        "m": ("Ihr", "Ihren", "Ihrem"),
        "n": ("Ihr", "Ihr", "Ihrem"),
    }[gender]
    forms = (f"{nom} {noun}", f"{acc} {noun}", f"{dat} {noun}")
    labelled = (
        f"{nom} {noun} „{{label}}“",
        f"{acc} {noun} „{{label}}“",
        f"{dat} {noun} „{{label}}“",
    )
    return _Product(noun, forms, labelled)


_DE: Final = _Catalogue(
    code="de",
    templates={
        "fixed_remotely": _Template(
            "{Device} läuft wieder",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "Wir haben {action_done} und geprüft: Jetzt läuft alles wieder normal.",
                "Sie müssen nichts weiter tun.",
            ),
        ),
        "consent_request": _Template(
            "Eine kurze Frage zu {device_dat}",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "Wir würden gern {action_do}. Das dauert {duration}; so lange ist das Gerät"
                " nicht nutzbar. Ist das in Ordnung?",
                "Falls nicht, schlagen wir einen Technikerbesuch vor.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": _Template(
            "Wir versuchen es etwas später noch einmal",
            (
                "{hi} wir wollten {action_do}, aber das ging gerade nicht.",
                "Das Gerät meldete, dass {reason}.",
                "{advice}",
                "Wir versuchen es in Kürze von selbst noch einmal.",
            ),
            optional=(3,),
        ),
        "appointment_offer": _Template(
            "Technikerbesuch für {device_acc}",
            (
                "{hi} wir haben bemerkt, dass {fault}; das sollte sich ein Techniker ansehen.",
                "Sonst könnte das Gerät {when} ausfallen.",
                "{urgent}",
                "Wählen Sie einen Termin: {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": _Template(
            "Ihr Technikerbesuch ist gebucht",
            (
                "{hi} {who} kommt {appointment} und sieht sich {device_acc} an.",
                "Bitte sorgen Sie dafür, dass jemand zu Hause ist.",
                "Passt der Termin nicht mehr, können Sie ihn ändern.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": _Template(
            "Erinnerung: Ihr Technikerbesuch",
            (
                "{hi} eine kurze Erinnerung: {who} kommt {appointment} und sieht sich"
                " {device_acc} an.",
                "Bitte sorgen Sie dafür, dass jemand zu Hause ist.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": _Template(
            "Neue Termine für Ihren Technikerbesuch",
            (
                "{hi} kein Problem: Wir haben den Besuch {appointment} für {device_acc} abgesagt.",
                "Wählen Sie einen neuen Termin, der Ihnen passt: {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": _Template(
            "Ihr Technikerbesuch ist abgesagt",
            (
                "{hi} wie gewünscht haben wir den Technikerbesuch {appointment} für"
                " {device_acc} abgesagt.",
                "Sollte uns noch etwas auffallen, melden wir uns bei Ihnen.",
                "Sie müssen nichts weiter tun.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": _Template(
            "Wir melden uns wegen {device_dat}",
            (
                "{hi} wie gewünscht haben wir den Technikerbesuch {appointment} abgesagt.",
                "Da {device} bald repariert werden sollte, meldet sich jemand aus unserem"
                " Service-Team bei Ihnen, um eine andere Lösung zu finden.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": _Template(
            "Wir rufen Sie an, um einen Termin zu finden",
            (
                "{hi} es tut uns leid, dass es so schwierig ist, einen passenden Termin für"
                " {device_acc} zu finden.",
                "Wir haben den Besuch {appointment} freigegeben; jemand aus unserem"
                " Service-Team ruft Sie bald an, um einen Termin zu vereinbaren.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": _Template(
            "Der Technikerbesuch ist abgeschlossen",
            (
                "{hi} {who} ist mit der Arbeit an {device_dat} fertig.",
                "Wir prüfen jetzt, ob alles wieder richtig läuft, und melden uns bei Ihnen.",
                "Sie müssen nichts tun.",
            ),
        ),
        "resolved": _Template(
            "{Device} ist repariert",
            (
                "{hi} gute Nachricht: Seit dem Technikerbesuch läuft {device} wieder einwandfrei.",
                "Danke für Ihre Geduld.",
            ),
        ),
        "not_fixed_escalated": _Template(
            "Leider noch nicht behoben",
            (
                "{hi} es tut uns leid: {device} funktioniert noch nicht richtig, und wir"
                " konnten das Problem bisher nicht beheben.",
                "Jemand aus unserem Service-Team meldet sich bald bei Ihnen und kümmert sich"
                " darum.",
                "Bis dahin müssen Sie nichts tun.",
            ),
            optional=(2,),
        ),
        "rating_request": _Template(
            "Wie ist es gelaufen?",
            (
                "{hi} {device} läuft wieder. Wie war es für Sie?",
                "Tippen Sie unten; in der App können Sie auch einen Kommentar schreiben.",
                "War gar nichts kaputt, sagen Sie es uns bitte auch.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": _Template(
            "Wichtig: Problem mit {device_dat}",
            (
                "{hi} wir haben bemerkt, dass {fault}.",
                "{safety}",
                "Wir planen schnellstmöglich einen Technikerbesuch und schicken Ihnen Termine.",
            ),
        ),
        "digest": _Template(
            "{updates} seit unserer letzten Nachricht",
            ("{hi} das ist inzwischen passiert:", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _de_product("Waschmaschine", "f"),
        "fridge": _de_product("Kühlschrank", "m"),
        "heat_pump": _de_product("Wärmepumpe", "f"),
        "": _de_product("Gerät", "n"),
    },
    faults={
        "bearing_wear": ("Verschlissenes Trommellager", "sich das Trommellager abnutzt"),
        "drain_clog": (
            "Verstopfter Abfluss",
            "die Laugenpumpe das Wasser nur noch mühsam abpumpt",
        ),
        "refrigerant_leak": (
            "Kältemittelverlust",
            "der Kühlkreislauf Kältemittel zu verlieren scheint",
        ),
        "coil_fouling": (
            "Verschmutzter Wärmetauscher",
            "der Wärmetauscher im Außengerät zunehmend verschmutzt",
        ),
        "sensor_drift": (
            "Temperaturfühler ungenau",
            "ein Temperaturfühler leicht falsche Werte liefert",
        ),
        "sensor_stuck": (
            "Temperaturfühler liefert keine Werte",
            "ein Temperaturfühler keine neuen Werte mehr liefert",
        ),
        "firmware_bug": ("Softwarefehler", "in der Steuerungssoftware ein Fehler aufgetreten ist"),
        "crash_loop": ("Startet ständig neu", "die Steuerung immer wieder von selbst neu startet"),
        "controller_hang": ("Steuerung reagiert nicht", "die Steuerung nicht mehr reagiert"),
        "unknown": ("Etwas stimmt nicht ganz", "etwas nicht ganz stimmt"),
    },
    fault_models={
        "sensor_drift/washer": (
            "Wassertemperaturfühler ungenau",
            "der Fühler für die Wassertemperatur leicht falsche Werte liefert",
        ),
    },
    actions={
        "restart": (
            "Neustart aus der Ferne",
            "{device_acc} aus der Ferne neu starten",
            "{device_acc} aus der Ferne neu gestartet",
        ),
        "firmware_update": (
            "Software-Update",
            "ein Software-Update auf {device_dat} installieren",
            "ein Software-Update auf {device_dat} installiert",
        ),
        "cleaning_cycle": (
            "Reinigungsprogramm",
            "bei {device_dat} ein Reinigungsprogramm laufen lassen",
            "bei {device_dat} ein Reinigungsprogramm laufen lassen",
        ),
        "selftest": (
            "Selbstprüfung",
            "bei {device_dat} eine kurze Selbstprüfung starten",
            "bei {device_dat} eine kurze Selbstprüfung gemacht",
        ),
        "config_set": (
            "Einstellung angepasst",
            "bei {device_dat} eine Einstellung anpassen",
            "bei {device_dat} eine Einstellung angepasst",
        ),
        "technician_visit": (
            "Technikerbesuch",
            "einen Techniker schicken",
            "einen Techniker geschickt",
        ),
        "": (
            "Reparatur aus der Ferne",
            "{device_acc} aus der Ferne reparieren",
            "{device_acc} aus der Ferne repariert",
        ),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Reinigungsprogramm für die Laugenpumpe",
            "bei {device_dat} ein Reinigungsprogramm für die Laugenpumpe laufen lassen",
            "bei {device_dat} ein Reinigungsprogramm für die Laugenpumpe laufen lassen",
        ),
    },
    reasons={
        "door_open": ("die Tür offen ist", "Bitte schließen Sie die Tür, wenn Sie können."),
        "mid_cycle": (
            "gerade ein Programm läuft",
            "Sie müssen es nicht abbrechen: Wir warten, bis es fertig ist.",
        ),
        "low_battery": (
            "der Akku schwach ist",
            "Bitte prüfen Sie, ob das Gerät am Strom angeschlossen ist.",
        ),
        "defrosting": ("es gerade abtaut", ""),
        "updating": ("es gerade ein Update installiert", ""),
    },
    states={
        "opened": "Wir haben ein Problem mit {device_dat} bemerkt und uns darum gekümmert.",
        "awaiting_consent": "Wir haben Sie gefragt, bevor wir etwas aus der Ferne reparieren.",
        "remote_fix": "Wir haben begonnen, {device_acc} aus der Ferne zu reparieren.",
        "remote_fix_again": "Wir haben eine weitere Lösung aus der Ferne versucht.",
        "verifying": "Wir haben begonnen zu prüfen, ob alles wieder richtig läuft.",
        "appointment_proposed": "Wir haben Ihnen Termine für einen Technikerbesuch angeboten.",
        "appointment_proposed_again": "Wir haben Ihnen andere Termine angeboten.",
        "booked": "Der Technikerbesuch wurde gebucht.",
        "visited": "Der Techniker war da.",
        "resolved": "Alles gut: {device} läuft wieder einwandfrei.",
        "dismissed": "Wir haben das abgeschlossen: Es ist nichts mehr zu tun.",
        "escalated": "Jemand aus unserem Service-Team hat übernommen.",
        "expired": "Wir haben das abgeschlossen, weil wir nichts von Ihnen gehört haben.",
    },
    steps={
        "command": "Wir haben eine Reparatur an {device_acc} geschickt.",
        "command_refused": "{Device} konnte das gerade nicht, also haben wir gewartet.",
        "consent": "Sie haben unsere Frage beantwortet.",
        "verification_failed": "Unsere Prüfung hat gezeigt, dass noch nicht alles stimmt.",
        "slot_taken": "Der gewählte Termin war gerade vergeben.",
        "visit_moved": "Sie wollten den Besuch verschieben; wir haben den Termin freigegeben.",
        "visit_cancelled": "Der gebuchte Technikerbesuch wurde abgesagt.",
        "rating": "Sie haben uns gesagt, wie es lief. Danke!",
    },
    labels={
        "accept_fix": "Ja, gern",
        "decline_fix": "Nein, danke",
        _SLOT_ACTION: "{slot}",
        "other_times": "Andere Zeiten",
        "decline_visit": "Besuch absagen",
        "rate_good": "Gut gelaufen",
        "rate_bad": "Nicht so gut",
        "nothing_wrong": "Es war nichts kaputt",
    },
    words={
        "hi": "Hallo {name},",
        "hi_anonymous": "Hallo,",
        "who": "unser Service-Team",
        "at": "am {when}",
        "agreed_time": "zum vereinbarten Termin",
        "duration_one": "etwa eine Minute",
        "duration": "etwa {n} Minuten",
        "slots_join": " oder ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "Da es eilt: unsere frühesten Termine.",
        "no_slots": "Wir schicken Ihnen sehr bald Termine für den Besuch.",
        "when_days_2": "sehr bald",
        "when_days_7": "in den nächsten Tagen",
        "when_days_21": "in den nächsten zwei, drei Wochen",
        "when_days_60": "in den kommenden Wochen",
        "when_later": "in den kommenden Monaten",
        "update_one": "1 Neuigkeit",
        "updates": "{n} Neuigkeiten",
        "more": "\nUnd {n} weitere in der App.",
        "safety_washer": "Bitte benutzen Sie das Gerät bis zum Technikerbesuch nicht, damit"
        " nichts weiter kaputtgeht.",
        "safety_fridge": "Lebensmittel bleiben eventuell nicht kühl: Halten Sie die Tür zu und"
        " lagern Sie Empfindliches woanders kühl.",
        "safety_heat_pump": "Es kann weniger warm werden und weniger Warmwasser geben; halten"
        " Sie, wenn möglich, eine andere Heizung bereit.",
        "safety_": "Bitte benutzen Sie das Gerät sicherheitshalber bis zum Technikerbesuch nicht.",
        "history": "{date} {time} — {text}",
        "history_done": "Wir haben {done}.",
    },
    calendar=_Calendar(
        weekdays=("Mo.", "Di.", "Mi.", "Do.", "Fr.", "Sa.", "So."),
        months=(
            "Jan.",
            "Feb.",
            "März",
            "Apr.",
            "Mai",
            "Juni",
            "Juli",
            "Aug.",
            "Sept.",
            "Okt.",
            "Nov.",
            "Dez.",
        ),
        day="{wd}, {d}. {mon}",
        date="{d}. {mon}",
        clock="{h:02d}:{m:02d}",
    ),
)


# -- French -----------------------------------------------------------------------------


def _fr_product(noun: str) -> _Product:
    your = f"votre {noun}"
    return _Product(noun, (your, your, your), ("votre {label}",) * 3)


_FR: Final = _Catalogue(
    code="fr",
    templates={
        "fixed_remotely": _Template(
            "{Device} fonctionne à nouveau",
            (
                "{hi} nous avons remarqué que {fault}.",
                "Nous avons {action_done}, puis vérifié : tout fonctionne de nouveau normalement.",
                "Vous n'avez rien à faire.",
            ),
        ),
        "consent_request": _Template(
            "Une petite question sur {device}",
            (
                "{hi} nous avons remarqué que {fault}.",
                "Nous aimerions {action_do}. Cela prend {duration}, et l'appareil ne sera pas"
                " utilisable pendant ce temps. Êtes-vous d'accord ?",
                "Sinon, nous vous proposerons la visite d'un technicien.",
            ),
            ("accept_fix", "decline_fix"),
            optional=(2,),
        ),
        "fix_waiting": _Template(
            "Nous réessaierons un peu plus tard",
            (
                "{hi} nous voulions {action_do}, mais ce n'était pas possible à ce moment-là.",
                "L'appareil nous a indiqué que {reason}.",
                "{advice}",
                "Nous réessaierons automatiquement d'ici peu.",
            ),
            optional=(3,),
        ),
        "appointment_offer": _Template(
            "Visite d'un technicien pour {device}",
            (
                "{hi} nous avons remarqué que {fault} ; un technicien doit venir voir.",
                "Sinon, une panne est possible {when}.",
                "{urgent}",
                "Choisissez un créneau : {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
            optional=(2, 1),
        ),
        "appointment_booked": _Template(
            "Votre rendez-vous avec le technicien est fixé",
            (
                "{hi} {who} passera {appointment} pour examiner {device}.",
                "Merci de vous assurer que quelqu'un sera présent.",
                "Si l'horaire ne vous convient plus, vous pouvez le modifier.",
            ),
            ("other_times", "decline_visit"),
            optional=(2,),
        ),
        "appointment_reminder": _Template(
            "Rappel : visite du technicien",
            (
                "{hi} petit rappel : {who} passera {appointment} pour examiner {device}.",
                "Merci de vous assurer que quelqu'un sera présent.",
            ),
            ("other_times", "decline_visit"),
        ),
        "visit_moving": _Template(
            "De nouveaux créneaux pour la visite du technicien",
            (
                "{hi} pas de souci : nous avons annulé la visite prévue {appointment} pour"
                " {device}.",
                "Choisissez un nouveau créneau qui vous convient : {slots}.",
                "{no_slots}",
            ),
            (_SLOT_ACTION, "other_times"),
        ),
        "visit_cancelled": _Template(
            "Votre rendez-vous avec le technicien est annulé",
            (
                "{hi} comme vous l'avez demandé, nous avons annulé la visite du technicien"
                " prévue {appointment} pour {device}.",
                "Si nous remarquons autre chose, nous vous le dirons.",
                "Vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_cancelled_call": _Template(
            "Nous vous recontactons au sujet de {device}",
            (
                "{hi} comme vous l'avez demandé, nous avons annulé la visite du technicien"
                " prévue {appointment}.",
                "Comme il faut réparer {device} bientôt, une personne de notre service client"
                " vous contactera pour trouver une autre solution.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_move_limit": _Template(
            "Nous vous appelons pour trouver un créneau",
            (
                "{hi} nous sommes désolés : trouver un bon moment pour la visite concernant"
                " {device} n'a pas été simple.",
                "Nous avons libéré la visite prévue {appointment} ; une personne de notre"
                " service client vous appellera bientôt pour convenir d'un horaire.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "visit_done_checking": _Template(
            "La visite du technicien est terminée",
            (
                "{hi} {who} a terminé son intervention sur {device}.",
                "Nous vérifions maintenant que tout fonctionne bien, et nous vous tiendrons"
                " au courant.",
                "Vous n'avez rien à faire.",
            ),
        ),
        "resolved": _Template(
            "{Device} fonctionne de nouveau",
            (
                "{hi} bonne nouvelle : depuis la visite du technicien, {device} fonctionne"
                " comme il faut.",
                "Merci de votre patience.",
            ),
        ),
        "not_fixed_escalated": _Template(
            "Désolés, ce n'est pas encore réparé",
            (
                "{hi} nous sommes désolés : {device} ne fonctionne pas encore correctement,"
                " et nous n'avons pas encore pu régler le problème.",
                "Une personne de notre service client vous contactera bientôt.",
                "D'ici là, vous n'avez rien à faire.",
            ),
            optional=(2,),
        ),
        "rating_request": _Template(
            "Comment cela s'est-il passé ?",
            (
                "{hi} {device} fonctionne à nouveau. Comment cela s'est-il passé pour vous ?",
                "Répondez ci-dessous ; vous pouvez aussi laisser un commentaire dans l'appli.",
                "S'il n'y avait rien de cassé, dites-le-nous aussi.",
            ),
            ("rate_good", "rate_bad", "nothing_wrong"),
            optional=(2,),
        ),
        "urgent_safety": _Template(
            "Important : un souci avec {device}",
            (
                "{hi} nous avons remarqué que {fault}.",
                "{safety}",
                "Nous organisons vite la visite d'un technicien et vous enverrons des créneaux.",
            ),
        ),
        "digest": _Template(
            "{updates} depuis notre dernier message",
            ("{hi} voici ce qui s'est passé :", "{items}", "{more}"),
        ),
    },
    products={
        "washer": _fr_product("lave-linge"),
        "fridge": _fr_product("réfrigérateur"),
        "heat_pump": _fr_product("pompe à chaleur"),
        "": _fr_product("appareil"),
    },
    faults={
        "bearing_wear": ("Roulement du tambour usé", "le roulement du tambour s'use"),
        "drain_clog": ("Vidange bouchée", "la pompe de vidange a du mal à évacuer l'eau"),
        "refrigerant_leak": (
            "Fuite de fluide frigorigène",
            "le circuit de refroidissement semble perdre du fluide frigorigène",
        ),
        "coil_fouling": ("Échangeur encrassé", "l'échangeur de l'unité extérieure s'encrasse"),
        "sensor_drift": (
            "Sonde de température imprécise",
            "une sonde de température donne des valeurs légèrement fausses",
        ),
        "sensor_stuck": (
            "Sonde de température figée",
            "une sonde de température ne met plus ses valeurs à jour",
        ),
        "firmware_bug": ("Erreur du logiciel", "le logiciel de commande a rencontré une erreur"),
        "crash_loop": ("Redémarrages à répétition", "la commande redémarre sans cesse d'elle-même"),
        "controller_hang": ("La commande ne répond plus", "la commande ne répond plus"),
        "unknown": (
            "Quelque chose ne va pas tout à fait",
            "quelque chose ne va pas tout à fait",
        ),
    },
    fault_models={
        "sensor_drift/washer": (
            "Sonde de température de l'eau imprécise",
            "la sonde de température de l'eau donne des valeurs légèrement fausses",
        ),
    },
    actions={
        "restart": (
            "Redémarrage à distance",
            "redémarrer {device} à distance",
            "redémarré {device} à distance",
        ),
        "firmware_update": (
            "Mise à jour du logiciel",
            "installer une mise à jour du logiciel sur {device}",
            "installé une mise à jour du logiciel sur {device}",
        ),
        "cleaning_cycle": (
            "Programme de nettoyage",
            "lancer un programme de nettoyage sur {device}",
            "lancé un programme de nettoyage sur {device}",
        ),
        "selftest": (
            "Autocontrôle",
            "lancer un court autocontrôle sur {device}",
            "lancé un court autocontrôle sur {device}",
        ),
        "config_set": (
            "Réglage ajusté",
            "ajuster un réglage sur {device}",
            "ajusté un réglage sur {device}",
        ),
        "technician_visit": (
            "Visite d'un technicien",
            "envoyer un technicien",
            "envoyé un technicien",
        ),
        "": ("Réparation à distance", "réparer {device} à distance", "réparé {device} à distance"),
    },
    action_models={
        "cleaning_cycle/washer": (
            "Nettoyage de la pompe de vidange",
            "lancer un nettoyage de la pompe de vidange sur {device}",
            "lancé un nettoyage de la pompe de vidange sur {device}",
        ),
    },
    reasons={
        "door_open": ("la porte est ouverte", "Si possible, merci de fermer la porte."),
        "mid_cycle": (
            "un programme est en cours",
            "Inutile de l'arrêter : nous attendrons qu'il soit terminé.",
        ),
        "low_battery": (
            "la batterie est faible",
            "Merci de vérifier que l'appareil est bien branché.",
        ),
        "defrosting": ("un dégivrage est en cours", ""),
        "updating": ("une mise à jour est en cours", ""),
    },
    states={
        "opened": "Nous avons remarqué un souci avec {device} et nous nous en occupons.",
        "awaiting_consent": "Nous vous avons demandé votre accord avant une réparation à distance.",
        "remote_fix": "Nous avons commencé à réparer {device} à distance.",
        "remote_fix_again": "Nous avons essayé une autre solution à distance.",
        "verifying": "Nous avons commencé à vérifier que tout fonctionne bien.",
        "appointment_proposed": "Nous vous avons proposé des créneaux pour la visite d'un"
        " technicien.",
        "appointment_proposed_again": "Nous vous avons proposé d'autres créneaux.",
        "booked": "Le rendez-vous avec le technicien a été fixé.",
        "visited": "Le technicien est passé.",
        "resolved": "Tout va bien : {device} fonctionne de nouveau correctement.",
        "dismissed": "Nous avons clos ce dossier : il n'y a plus rien à faire.",
        "escalated": "Une personne de notre service client a pris le relais.",
        "expired": "Nous avons clos ce dossier, faute de réponse de votre part.",
    },
    steps={
        "command": "Nous avons envoyé une réparation à {device}.",
        "command_refused": "{Device} n'a pas pu le faire à ce moment-là, nous avons donc attendu.",
        "consent": "Vous avez répondu à notre question.",
        "verification_failed": "Notre vérification a montré que tout n'était pas encore réglé.",
        "slot_taken": "Le créneau choisi venait d'être pris.",
        "visit_moved": "Vous avez demandé à déplacer la visite ; nous avons libéré le créneau.",
        "visit_cancelled": "La visite prévue du technicien a été annulée.",
        "rating": "Vous nous avez dit comment cela s'est passé. Merci !",
    },
    labels={
        "accept_fix": "Oui, allez-y",
        "decline_fix": "Non, merci",
        _SLOT_ACTION: "{slot}",
        "other_times": "Autres horaires",
        "decline_visit": "Annuler la visite",
        "rate_good": "Très bien",
        "rate_bad": "Pas terrible",
        "nothing_wrong": "Rien n'était en panne",
    },
    words={
        "hi": "Bonjour {name},",
        "hi_anonymous": "Bonjour,",
        "who": "notre technicien",
        "at": "le {when}",
        "agreed_time": "à l'horaire convenu",
        "duration_one": "environ une minute",
        "duration": "environ {n} minutes",
        "slots_join": " ou ",
        "span": "{day}, {start}–{end}",
        "span_days": "{day}, {start} – {end_day}, {end}",
        "urgent": "C'est urgent : voici nos premiers créneaux.",
        "no_slots": "Nous vous enverrons très bientôt des créneaux pour la visite.",
        "when_days_2": "très bientôt",
        "when_days_7": "dans les prochains jours",
        "when_days_21": "d'ici deux ou trois semaines",
        "when_days_60": "dans les semaines à venir",
        "when_later": "dans les mois à venir",
        "update_one": "1 nouvelle",
        "updates": "{n} nouvelles",
        "more": "\nEt {n} autres dans l'appli.",
        "safety_washer": "Pour éviter d'autres dégâts, merci de ne pas l'utiliser avant la visite"
        " du technicien.",
        "safety_fridge": "Vos aliments risquent de se réchauffer : gardez la porte fermée et"
        " mettez les produits fragiles au frais ailleurs.",
        "safety_heat_pump": "Le chauffage et l'eau chaude peuvent faiblir ; gardez si possible un"
        " autre chauffage à portée de main.",
        "safety_": "Par précaution, merci de ne pas utiliser l'appareil avant la visite du"
        " technicien.",
        "history": "{date} {time} — {text}",
        "history_done": "Nous avons {done}.",
    },
    calendar=_Calendar(
        weekdays=("lun.", "mar.", "mer.", "jeu.", "ven.", "sam.", "dim."),
        months=(
            "janv.",
            "févr.",
            "mars",
            "avr.",
            "mai",
            "juin",
            "juil.",
            "août",
            "sept.",
            "oct.",
            "nov.",
            "déc.",
        ),
        day="{wd} {d} {mon}",
        date="{d} {mon}",
        clock="{h} h {m:02d}",
        whole_hour="{h} h",
        first_day="1er",
    ),
    elisions=((r"\b([Qq]u|[Dd]|[Ll]|[Nn]|[Jj])e ([aeiouyéèêàâîôûAEIOUYÉ])", r"\1'\2"),),
)

_CATALOGUES: Final[Mapping[str, _Catalogue]] = {c.code: c for c in (_EN, _DE, _FR)}
#: Languages messages are written in.
LANGUAGES: Final = tuple(_CATALOGUES)


# -- checking the catalogue -------------------------------------------------------------


def _placeholders(text: str) -> set[str]:
    """The placeholders of ``text``, case forms counted as one (``device_acc`` -> ``device``)."""
    names: set[str] = set()
    for _, name, _, _ in string.Formatter().parse(text):
        if name is None:
            continue
        base = name.lower()
        for suffix in _CASE_SUFFIXES:
            base = base.removesuffix(suffix)
        names.add(base)
    return names


def _template_placeholders(template: _Template) -> set[str]:
    found = _placeholders(template.title)
    for sentence in template.body:
        found |= _placeholders(sentence)
    return found


def catalogue_problems(
    catalogues: Mapping[str, _Catalogue] | None = None,
) -> list[str]:
    """List how the languages differ from English in what they can say.

    Every language must have every kind with the same placeholders and actions, and the
    same products, faults, actions, refusal reasons, states, history steps, button labels
    and small words.

    Args:
        catalogues: the catalogues to check (default: the installed ones).

    Returns:
        One line per difference; empty when all languages agree.
    """
    catalogues = _CATALOGUES if catalogues is None else catalogues
    reference = catalogues[DEFAULT_LANGUAGE]
    problems: list[str] = []
    required = {
        "templates": KINDS,
        "products": MODELS,
        "faults": FAULTS,
        "actions": (*REMOTE_ACTIONS, "technician_visit", ""),
        "reasons": REFUSALS,
        "states": STATES,
        "steps": HISTORY_STEPS,
    }
    for table, names in required.items():
        missing = set(names) - set(getattr(reference, table))
        problems += [f"en: no {table} entry for {name!r}" for name in sorted(missing)]
    for code, catalogue in catalogues.items():
        for table in (
            "templates",
            "products",
            "faults",
            "fault_models",
            "actions",
            "action_models",
            "reasons",
            "states",
            "steps",
            "labels",
            "words",
        ):
            mine, theirs = set(getattr(catalogue, table)), set(getattr(reference, table))
            if mine != theirs:
                problems.append(f"{code}: {table} differ: {sorted(mine ^ theirs)}")
        for kind, template in reference.templates.items():
            other = catalogue.templates.get(kind)
            if other is None:
                continue
            if _template_placeholders(other) != _template_placeholders(template):
                problems.append(f"{code}: {kind} has other placeholders")
            if other.actions != template.actions:
                problems.append(f"{code}: {kind} has other actions")
        for key, word in reference.words.items():
            other_word = catalogue.words.get(key)
            if other_word is not None and _placeholders(other_word) != _placeholders(word):
                problems.append(f"{code}: word {key} has other placeholders")
    return problems


# -- the phrases ------------------------------------------------------------------------


def resolve_language(language: str | None) -> str:
    """Return the catalogue language for a language tag (``de-AT`` -> ``de``; else English)."""
    if not language:
        return DEFAULT_LANGUAGE
    tag = language.strip().lower().replace("_", "-")
    if tag in _CATALOGUES:
        return tag
    base = tag.split("-", 1)[0]
    return base if base in _CATALOGUES else DEFAULT_LANGUAGE


def _catalogue(language: str | None) -> _Catalogue:
    return _CATALOGUES[resolve_language(language)]


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:.") + _ELLIPSIS


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _product(catalogue: _Catalogue, model: str | None) -> _Product:
    return catalogue.products.get(model or "", catalogue.products[""])


def product_name(model: str, language: str) -> str:
    """Return the product's plain name (``washing machine``, ``Waschmaschine``).

    Args:
        model: product model; an unknown one is a "device".
        language: message language.
    """
    return _product(_catalogue(language), model).name


def _device_forms(catalogue: _Catalogue, model: str | None, label: str | None) -> tuple[str, ...]:
    product = _product(catalogue, model)
    clean = None if label is None else _shorten(label, _LABEL_MAX)
    if not clean:
        return product.forms
    return tuple(pattern.format(label=clean) for pattern in product.labelled)


def device_phrase(model: str, label: str | None, language: str) -> str:
    """Return how a message names the device (``your washing machine``, ``your kitchen fridge``).

    Args:
        model: product model.
        label: the owner's name for it, if any.
        language: message language.
    """
    return _device_forms(_catalogue(language), model, label)[0]


def _fault(catalogue: _Catalogue, fault: str, model: str | None) -> tuple[str, str]:
    key = fault if fault in catalogue.faults else "unknown"
    return catalogue.fault_models.get(f"{key}/{model}", catalogue.faults[key])


def fault_title(fault: str, model: str, language: str) -> str:
    """Return a fault's short plain title (``Worn drum bearing``) for lists and history.

    Args:
        fault: the catalogue's fault name (unknown names read as "something not quite right").
        model: product model.
        language: message language.
    """
    return _fault(_catalogue(language), fault, model)[0]


def _action(catalogue: _Catalogue, action: str | None, model: str | None) -> tuple[str, str, str]:
    key = (action or "").split(":", 1)[0]
    if key not in catalogue.actions:
        key = ""
    return catalogue.action_models.get(f"{key}/{model}", catalogue.actions[key])


def action_title(action: str, language: str, model: str | None = None) -> str:
    """Return a remedy's short plain title (``Software update``).

    Args:
        action: a remote remedy (``firmware_update``) or ``technician_visit[:part]``;
            anything else reads as a remote fix.
        language: message language.
        model: product model, for the few remedies a model names its own way.
    """
    return _action(_catalogue(language), action, model)[0]


def state_title(state: str, language: str, model: str | None = None) -> str:
    """Return what a case state means for the owner, as one plain sentence.

    Args:
        state: a case state (:data:`notifier.model.TRANSITIONS`).
        language: message language.
        model: product model (names the device; default: "your device").

    Raises:
        InvalidRequestError: no such state.
    """
    catalogue = _catalogue(language)
    line = catalogue.states.get(state)
    if line is None:
        raise InvalidRequestError(f"no case state {state!r}")
    return line.format_map(_device_values(catalogue, model, None))


_REFUSAL_WORDS: Final = (
    ("door_open", ("door", "lid")),
    ("low_battery", ("battery",)),
    ("defrosting", ("defrost",)),
    ("updating", ("updating", "update in progress", "installing")),
    ("mid_cycle", ("mid_cycle", "mid-cycle", "running", "in progress", "programme", "program")),
)


def refusal_code(reason: str | None) -> str | None:
    """Return the refusal code a device's words mean (``door_open``), or ``None``.

    Devices give a code (``door_open``) or words (``refused: the door is open; will be
    possible once it is closed``); anything else has no words of its own and is told as
    "it could not do it right now".
    """
    if not reason:
        return None
    text = reason.strip().lower().removeprefix("refused:").strip()
    if text in REFUSALS:
        return text
    for code, words in _REFUSAL_WORDS:
        if any(word in text for word in words):
            return code
    return None


# -- times ------------------------------------------------------------------------------


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        _LOG.debug("unknown time zone %r: showing UTC", name)
        return ZoneInfo("UTC")


def _day(calendar: _Calendar, local: datetime) -> str:
    day = calendar.first_day if local.day == 1 else str(local.day)
    return calendar.day.format(
        wd=calendar.weekdays[local.weekday()], d=day, mon=calendar.months[local.month - 1]
    )


def _date(calendar: _Calendar, local: datetime) -> str:
    day = calendar.first_day if local.day == 1 else str(local.day)
    return calendar.date.format(d=day, mon=calendar.months[local.month - 1])


def _clock(calendar: _Calendar, local: datetime) -> str:
    pattern = calendar.clock
    if local.minute == 0 and calendar.whole_hour is not None:
        pattern = calendar.whole_hour
    return pattern.format(h=local.hour, m=local.minute)


def _span(catalogue: _Catalogue, start: datetime, end: datetime, zone: ZoneInfo) -> str:
    calendar = catalogue.calendar
    first, last = start.astimezone(zone), end.astimezone(zone)
    # a visit ending at midnight still belongs to its day
    if last.date() == first.date() or last - timedelta(microseconds=1) < first.replace(
        hour=0, minute=0, second=0, microsecond=0
    ) + timedelta(days=1):
        return catalogue.words["span"].format(
            day=_day(calendar, first), start=_clock(calendar, first), end=_clock(calendar, last)
        )
    return catalogue.words["span_days"].format(
        day=_day(calendar, first),
        start=_clock(calendar, first),
        end_day=_day(calendar, last),
        end=_clock(calendar, last),
    )


def _when(catalogue: _Catalogue, days: float | None) -> str | None:
    if days is None or not math.isfinite(days):
        return None
    for limit in (2, 7, 21, 60):
        if days < limit:
            return catalogue.words[f"when_days_{limit}"]
    return catalogue.words["when_later"]


# -- rendering --------------------------------------------------------------------------


def _device_values(
    catalogue: _Catalogue, model: str | None, label: str | None
) -> dict[str, str | None]:
    nom, acc, dat = _device_forms(catalogue, model, label)
    return {"device": nom, "device_acc": acc, "device_dat": dat, "Device": _capitalise(nom)}


def _values(catalogue: _Catalogue, ctx: MessageContext, zone: ZoneInfo) -> dict[str, str | None]:
    words = catalogue.words
    values = _device_values(catalogue, ctx.model, ctx.device_label)
    device_only = {k: v for k, v in values.items() if v is not None}
    name = _shorten(ctx.owner_name, _NAME_MAX)
    values["hi"] = words["hi"].format(name=name) if name else words["hi_anonymous"]
    values["fault"] = _fault(catalogue, ctx.fault, ctx.model)[1]
    _, do, done = _action(catalogue, ctx.action, ctx.model)
    values["action_do"] = do.format_map(device_only)
    values["action_done"] = done.format_map(device_only)
    minutes = _MINUTES.get(ctx.action or "", _MINUTES[""])
    values["duration"] = (
        words["duration_one"] if minutes == 1 else words["duration"].format(n=minutes)
    )
    code = refusal_code(ctx.reason)
    reason, advice = (None, "") if code is None else catalogue.reasons[code]
    values["reason"] = reason
    values["advice"] = advice or None
    values["when"] = _when(catalogue, ctx.days_to_failure)
    values["urgent"] = words["urgent"] if ctx.urgent and ctx.slots else None
    shown = ctx.slots[: MAX_ACTIONS - 1]
    values["slots"] = (
        words["slots_join"].join(_span(catalogue, s, e, zone) for s, e in shown) if shown else None
    )
    values["no_slots"] = None if shown else words["no_slots"]
    who = None
    if ctx.appointment is None:
        values["appointment"] = words["agreed_time"]
    else:
        start, end, who = ctx.appointment
        values["appointment"] = words["at"].format(when=_span(catalogue, start, end, zone))
    values["who"] = _shorten(who, _NAME_MAX) if who else words["who"]
    values["safety"] = words.get(f"safety_{ctx.model}", words["safety_"])
    count = ctx.count or len(ctx.items)
    values["updates"] = words["update_one"] if count == 1 else words["updates"].format(n=count)
    items = ctx.items[:_DIGEST_ITEMS]
    values["items"] = "".join(f"\n• {_shorten(item, _ITEM_MAX)}" for item in items) or None
    hidden = max(0, count - len(items)) if items else 0
    values["more"] = words["more"].format(n=hidden) if hidden else None
    return values


def _fill(text: str, values: Mapping[str, str | None]) -> str | None:
    """Fill ``text``; ``None`` when one of its placeholders has no value."""
    names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    if any(values.get(name) is None for name in names):
        return None
    return text.format_map(values)


def _actions(
    catalogue: _Catalogue, template: _Template, ctx: MessageContext, zone: ZoneInfo
) -> tuple[tuple[str, str], ...]:
    room = MAX_ACTIONS - (len(template.actions) - 1)
    actions: list[tuple[str, str]] = []
    for action_id in template.actions:
        label = catalogue.labels[action_id]
        if action_id != _SLOT_ACTION:
            actions.append((action_id, label))
            continue
        for index, (start, _) in enumerate(ctx.slots[:room]):
            local = start.astimezone(zone)
            short = f"{_day(catalogue.calendar, local)}, {_clock(catalogue.calendar, local)}"
            actions.append((f"{_SLOT_ACTION}:{index}", label.format(slot=short)))
    return tuple(actions)


def render(kind: str, language: str, ctx: MessageContext) -> OwnerMessage:
    """Write one message to an owner in their language.

    Args:
        kind: the message kind (one of :data:`KINDS`).
        language: the owner's language tag (``de-AT`` reads as ``de``; unknown: English).
        ctx: the facts to tell.

    Returns:
        The message, within the length limits.

    Raises:
        InvalidRequestError: no such kind of message.
    """
    catalogue = _catalogue(language)
    template = catalogue.templates.get(kind)
    if template is None:
        raise InvalidRequestError(f"no message of kind {kind!r}")
    zone = _zone(ctx.timezone)
    values = _values(catalogue, ctx, zone)
    title = _fill(template.title, values) or ""
    filled = [_fill(text, values) for text in template.body]
    body = _join(filled)
    for index in template.optional:
        if len(body) <= MAX_BODY:
            break
        filled[index] = None
        body = _join(filled)
    if len(title) > MAX_TITLE or len(body) > MAX_BODY:
        _LOG.warning("%s message in %s is too long; shortened", kind, catalogue.code)
    title, body = catalogue.polish(title), catalogue.polish(body)
    return OwnerMessage(
        kind=kind,
        title=_shorten(title, MAX_TITLE),
        body=body if len(body) <= MAX_BODY else _shorten_body(body),
        actions=_actions(catalogue, template, ctx, zone),
        language=catalogue.code,
    )


def _join(sentences: Sequence[str | None]) -> str:
    return " ".join(s for s in sentences if s).replace(" \n", "\n")


def _shorten_body(body: str) -> str:
    # keep the digest's line breaks; only the tail is cut
    cut = body[: MAX_BODY - 1]
    if " " in cut[MAX_BODY // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:.") + _ELLIPSIS


# -- history ----------------------------------------------------------------------------

_HistoryEntry = tuple[datetime, str, str | None, str | None]


def plain_history(
    entries: Sequence[_HistoryEntry],
    language: str,
    timezone: str,
    *,
    model: str | None = None,
    device_label: str | None = None,
) -> list[str]:
    """Turn a case's audit steps into plain lines for the owner.

    State changes and the steps that matter to the owner are told
    (``3 Dec 10:04 — We started fixing your washing machine remotely.``); the loop's own
    bookkeeping (messages sent, urgency updates) is left out.

    Args:
        entries: audit steps, oldest first: ``(at, action, from_state, to_state)``.
        language: the owner's language.
        timezone: the owner's IANA time zone; times are shown in it.
        model: product model (names the device; default: "your device").
        device_label: the owner's name for the device.

    Returns:
        One line per step worth telling.

    Raises:
        InvalidRequestError: a step's time has no time zone.
    """
    catalogue = _catalogue(language)
    zone = _zone(timezone)
    device = {
        k: v for k, v in _device_values(catalogue, model, device_label).items() if v is not None
    }
    lines: list[str] = []
    for at, action, from_state, to_state in entries:
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidRequestError("history times must be timezone-aware (UTC)")
        text = _history_text(catalogue, action, from_state, to_state, model)
        if text is None:
            continue
        local = at.astimezone(zone)
        lines.append(
            catalogue.words["history"].format(
                date=_date(catalogue.calendar, local),
                time=_clock(catalogue.calendar, local),
                text=catalogue.polish(text.format_map(device)),
            )
        )
    return lines


def _history_text(
    catalogue: _Catalogue,
    action: str,
    from_state: str | None,
    to_state: str | None,
    model: str | None,
) -> str | None:
    if to_state is not None:
        key = to_state
        if to_state == from_state and f"{to_state}_again" in catalogue.states:
            key = f"{to_state}_again"
        elif to_state == from_state:
            return None
        return catalogue.states.get(key)
    if action in REMOTE_ACTIONS:
        done = _action(catalogue, action, model)[2]
        return catalogue.words["history_done"].format(done=done)
    return catalogue.steps.get(action)
