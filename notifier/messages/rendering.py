"""Writing the owner's messages and a case's history in their language (notifier).

Part of :mod:`notifier.messages` (the case machine's facts -> here -> the outbox; the
owner API's titles and histories). A template's body is a run of sentences; a sentence
whose placeholder has no value (no predicted failure time, no reason the device gave) is
simply left out, and when a long name or label would make a body too long, the sentences
a template marks as optional give way first (a text is cut short only as a last resort).
Times are shown in the owner's own time zone, written the way their language writes
them; ``{Device}`` starts a sentence.
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifier.errors import InvalidRequestError
from notifier.messages.catalogue import (
    MAX_ACTIONS,
    MAX_BODY,
    MAX_TITLE,
    REFUSALS,
    REMOTE_ACTIONS,
    SLOT_ACTION,
    Calendar,
    Catalogue,
    MessageContext,
    OwnerMessage,
    Product,
    Template,
)
from notifier.messages.languages import CATALOGUES, resolve_language

__all__ = [
    "action_title",
    "device_phrase",
    "fault_title",
    "plain_history",
    "product_name",
    "refusal_code",
    "render",
    "state_title",
]

_LOG = logging.getLogger(__name__)

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
_ELLIPSIS: Final = "…"


def _catalogue(language: str | None) -> Catalogue:
    return CATALOGUES[resolve_language(language)]


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


def _product(catalogue: Catalogue, model: str | None) -> Product:
    return catalogue.products.get(model or "", catalogue.products[""])


def product_name(model: str, language: str) -> str:
    """Return the product's plain name (``washing machine``, ``Waschmaschine``).

    Args:
        model: product model; an unknown one is a "device".
        language: message language.
    """
    return _product(_catalogue(language), model).name


def _device_forms(catalogue: Catalogue, model: str | None, label: str | None) -> tuple[str, ...]:
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


def _fault(catalogue: Catalogue, fault: str, model: str | None) -> tuple[str, str]:
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


def _action(catalogue: Catalogue, action: str | None, model: str | None) -> tuple[str, str, str]:
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


def _day(calendar: Calendar, local: datetime) -> str:
    day = calendar.first_day if local.day == 1 else str(local.day)
    return calendar.day.format(
        wd=calendar.weekdays[local.weekday()], d=day, mon=calendar.months[local.month - 1]
    )


def _date(calendar: Calendar, local: datetime) -> str:
    day = calendar.first_day if local.day == 1 else str(local.day)
    return calendar.date.format(d=day, mon=calendar.months[local.month - 1])


def _clock(calendar: Calendar, local: datetime) -> str:
    pattern = calendar.clock
    if local.minute == 0 and calendar.whole_hour is not None:
        pattern = calendar.whole_hour
    return pattern.format(h=local.hour, m=local.minute)


def _span(catalogue: Catalogue, start: datetime, end: datetime, zone: ZoneInfo) -> str:
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


def _when(catalogue: Catalogue, days: float | None) -> str | None:
    if days is None or not math.isfinite(days):
        return None
    for limit in (2, 7, 21, 60):
        if days < limit:
            return catalogue.words[f"when_days_{limit}"]
    return catalogue.words["when_later"]


# -- rendering --------------------------------------------------------------------------


def _device_values(
    catalogue: Catalogue, model: str | None, label: str | None
) -> dict[str, str | None]:
    nom, acc, dat = _device_forms(catalogue, model, label)
    return {"device": nom, "device_acc": acc, "device_dat": dat, "Device": _capitalise(nom)}


def _values(catalogue: Catalogue, ctx: MessageContext, zone: ZoneInfo) -> dict[str, str | None]:
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
    catalogue: Catalogue, template: Template, ctx: MessageContext, zone: ZoneInfo
) -> tuple[tuple[str, str], ...]:
    room = MAX_ACTIONS - (len(template.actions) - 1)
    actions: list[tuple[str, str]] = []
    for action_id in template.actions:
        label = catalogue.labels[action_id]
        if action_id != SLOT_ACTION:
            actions.append((action_id, label))
            continue
        for index, (start, _) in enumerate(ctx.slots[:room]):
            local = start.astimezone(zone)
            short = f"{_day(catalogue.calendar, local)}, {_clock(catalogue.calendar, local)}"
            actions.append((f"{SLOT_ACTION}:{index}", label.format(slot=short)))
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
    catalogue: Catalogue,
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
