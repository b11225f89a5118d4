"""The appointment planner (notifier: case machine -> here -> the owner's offer).

When no remote remedy is left, the case machine (:mod:`notifier.loop`) asks
:func:`plan_slots` for the best few technician visits before the predicted failure and
offers them to the owner; when the owner picks one, :func:`check_bookable` looks again
(an offer made an hour ago may be gone) just before the store books it atomically.
:func:`urgency_from` turns a predicted time to failure into a case's urgency.

Pure logic, no I/O. Every instant is UTC; working hours, availability and quiet hours are
local wall times, turned into UTC for each date through :mod:`zoneinfo`, so a window on a
daylight-saving change day keeps its wall-clock meaning. A window edge that falls in a
DST gap or repeat is resolved inward for windows a visit must lie in (a visit never runs
at a wall time outside them) and outward for quiet hours a visit must avoid.

Scores: higher is better; a slot that ends before the predicted failure (or any slot when
no failure is predicted) scores above zero, a slot after it below zero.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifier.errors import ConflictError, InvalidRequestError
from notifier.model import Appointment, Owner, Slot, Technician, Urgency, Window
from wire.errors import ConfigError

__all__ = ["PlannerConfig", "check_bookable", "plan_slots", "urgency_from"]

_LOG = logging.getLogger(__name__)

_HOUR_S: Final = 3_600.0
_DAY_S: Final = 86_400.0
_MIDNIGHT: Final = time(0)
#: Appointment states that hold a technician's time (as the store's ``book`` sees them).
_BUSY_STATES: Final = frozenset(("booked",))
#: How fast a later slot loses score, in hours, by urgency: a critical case wants the
#: very first slot, a low-urgency one can trade a few hours for a less busy technician.
_EARLINESS_TAU_H: Final[dict[str, float]] = {
    "critical": 6.0,
    "high": 24.0,
    "normal": 72.0,
    "low": 168.0,
}
#: Load penalties stop growing past this many visits a day (scores stay above zero).
_MAX_LOAD: Final = 10

_Interval = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """How the planner cuts and ranks visit slots.

    Attributes:
        visit_s: length of a visit.
        step_s: slot grid, from the start of each working window.
        offer: how many slots to offer at most.
        horizon_critical_s: how far ahead to look for a critical case.
        horizon_high_s: how far ahead to look for a high-urgency case.
        horizon_normal_s: how far ahead to look for a normal case.
        horizon_low_s: how far ahead to look for a low-urgency case.
        lead_critical_s: earliest start from now for a critical case.
        lead_high_s: earliest start from now for a high-urgency case.
        lead_s: earliest start from now for normal and low urgency.
        min_gap_s: free time a technician needs between two visits (travel).
        spacing_s: least time between two offered slots, so an offer is a real choice.
        margin_s: scale of the safety margin before a predicted failure: a slot ending
            this long before it has earned about two thirds of the margin bonus.
        load_weight: score taken off per visit the technician already has that day.
        day_start: owner-local start of the day when the owner gave no availability.
        day_end: owner-local end of the day when the owner gave no availability.
    """

    visit_s: float = 2 * _HOUR_S
    step_s: float = 0.5 * _HOUR_S
    offer: int = 3
    horizon_critical_s: float = 2 * _DAY_S
    horizon_high_s: float = 5 * _DAY_S
    horizon_normal_s: float = 14 * _DAY_S
    horizon_low_s: float = 28 * _DAY_S
    lead_critical_s: float = 2 * _HOUR_S
    lead_high_s: float = 6 * _HOUR_S
    lead_s: float = 12 * _HOUR_S
    min_gap_s: float = 0.5 * _HOUR_S
    spacing_s: float = 2 * _HOUR_S
    margin_s: float = _DAY_S
    load_weight: float = 0.02
    day_start: time = time(8)
    day_end: time = time(20)

    def __post_init__(self) -> None:
        """Refuse settings the planner cannot work with.

        Raises:
            ConfigError: a length that is not positive, a negative gap, spacing, lead
                or weight, fewer than one slot to offer, or an empty default day.
        """
        positive = {
            "visit_s": self.visit_s,
            "step_s": self.step_s,
            "horizon_critical_s": self.horizon_critical_s,
            "horizon_high_s": self.horizon_high_s,
            "horizon_normal_s": self.horizon_normal_s,
            "horizon_low_s": self.horizon_low_s,
            "margin_s": self.margin_s,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"planner {name} must be a positive number, not {value!r}")
        not_negative = {
            "lead_critical_s": self.lead_critical_s,
            "lead_high_s": self.lead_high_s,
            "lead_s": self.lead_s,
            "min_gap_s": self.min_gap_s,
            "spacing_s": self.spacing_s,
            "load_weight": self.load_weight,
        }
        for name, value in not_negative.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"planner {name} must be zero or more, not {value!r}")
        if self.offer < 1:
            raise ConfigError(f"planner offer must be at least 1, not {self.offer!r}")
        if self.day_end != _MIDNIGHT and self.day_end <= self.day_start:
            raise ConfigError("planner day_end must be after day_start")

    def horizon_for(self, urgency: Urgency) -> timedelta:
        """Return how far ahead to look for a case of this urgency."""
        seconds = {
            "critical": self.horizon_critical_s,
            "high": self.horizon_high_s,
            "normal": self.horizon_normal_s,
            "low": self.horizon_low_s,
        }[urgency]
        return timedelta(seconds=seconds)

    def lead_for(self, urgency: Urgency) -> timedelta:
        """Return the earliest start from now for a case of this urgency."""
        if urgency == "critical":
            return timedelta(seconds=self.lead_critical_s)
        if urgency == "high":
            return timedelta(seconds=self.lead_high_s)
        return timedelta(seconds=self.lead_s)


def urgency_from(failure_at: datetime | None, now: datetime, *, safety: bool = False) -> Urgency:
    """Return a case's urgency from its predicted failure time.

    Args:
        failure_at: predicted failure (UTC), ``None`` when unknown.
        now: the current time (UTC).
        safety: the fault is a safety risk (always critical).

    Returns:
        ``critical`` for a safety fault or a failure in less than 2 days (or already
        past), ``high`` in less than 7 days, ``normal`` in less than 30 days or when
        unknown, ``low`` otherwise.

    Raises:
        InvalidRequestError: a time without a time zone.
    """
    now = _utc(now, "now")
    if safety:
        return "critical"
    if failure_at is None:
        return "normal"
    left = _utc(failure_at, "failure_at") - now
    if left < timedelta(days=2):
        return "critical"
    if left < timedelta(days=7):
        return "high"
    if left < timedelta(days=30):
        return "normal"
    return "low"


def plan_slots(
    *,
    technicians: Sequence[Technician],
    booked: Sequence[Appointment],
    owner: Owner,
    part: str | None,
    urgency: Urgency,
    now: datetime,
    failure_at: datetime | None,
    exclude: Sequence[Slot] = (),
    config: PlannerConfig = PlannerConfig(),
) -> list[Slot]:
    """Return the best few visit slots for an owner, best first.

    A slot is a visit of ``config.visit_s`` by a technician of the owner's region who
    services ``part`` (any technician of the region when ``part`` is ``None``). It lies
    inside the technician's working hours and the owner's availability (every day from
    ``config.day_start`` to ``config.day_end`` owner-local when the owner gave none),
    outside the owner's quiet hours, at least ``config.min_gap_s`` away from the
    technician's booked visits, and does not overlap a slot in ``exclude`` (times
    already offered and declined, whoever the technician). It starts between now plus
    the urgency's lead time and the end of the urgency's horizon and, when a failure is
    predicted, ends before it. When no slot ends before the predicted failure, the
    earliest slots after it are offered instead, with scores below zero.

    Offered slots are at least ``config.spacing_s`` apart; they are picked greedily by
    score: earlier is better (more so for higher urgency), more margin before the
    failure is better, and a technician with fewer visits that day scores a little
    higher. The result is deterministic for the same inputs.

    Args:
        technicians: the technicians to consider.
        booked: appointments that may hold the technicians' time (only ``booked`` ones do).
        owner: the device's owner.
        part: the part to service, ``None`` for any.
        urgency: the case's urgency.
        now: the current time (UTC).
        failure_at: predicted failure (UTC), ``None`` when unknown.
        exclude: slots offered before and declined.
        config: the planner's settings.

    Returns:
        Up to ``config.offer`` slots (UTC), best first; empty when nothing fits.

    Raises:
        InvalidRequestError: a time without a time zone, or an unknown owner time zone.
    """
    now = _utc(now, "now")
    deadline: datetime | None = None
    if failure_at is not None:
        deadline = _utc(failure_at, "failure_at") - timedelta(seconds=config.visit_s)
    visit = timedelta(seconds=config.visit_s)
    step = timedelta(seconds=config.step_s)
    earliest = now + config.lead_for(urgency)
    latest = now + config.horizon_for(urgency)
    if latest < earliest:
        return []

    owner_free = _owner_free(owner, earliest, latest + visit, config)
    owner_starts = [a for a, _ in owner_free]
    declined = _merge((_utc(s.start, "slot start"), _utc(s.end, "slot end")) for s in exclude)
    declined_starts = [a for a, _ in declined]
    gap = timedelta(seconds=config.min_gap_s)

    before: list[Slot] = []
    after: list[Slot] = []
    for technician in _candidates(technicians, owner.region, part):
        try:
            zone = _zone(technician.timezone)
        except InvalidRequestError:
            _LOG.warning(
                "technician %s has an unknown time zone %r; not planned",
                technician.technician_id,
                technician.timezone,
            )
            continue
        visits = _busy_visits(booked, technician.technician_id)
        busy = _merge((start - gap, end + gap) for start, end in visits)
        busy_starts = [a for a, _ in busy]
        load = Counter(start.astimezone(zone).date() for start, _ in visits)
        for start in _grid(technician.hours, zone, earliest, latest, visit, step):
            end = start + visit
            if not _contains(owner_free, owner_starts, start, end):
                continue
            if _overlaps(busy, busy_starts, start, end):
                continue
            if _overlaps(declined, declined_starts, start, end):
                continue
            in_time = deadline is None or start <= deadline
            score = _score(
                start,
                end,
                earliest=earliest,
                failure_at=None if deadline is None else deadline + visit,
                urgency=urgency,
                load=load[start.astimezone(zone).date()],
                in_time=in_time,
                config=config,
            )
            slot = Slot(technician.technician_id, start, end, score)
            (before if in_time else after).append(slot)

    pool = before or after
    offer = _pick(pool, config)
    _LOG.debug(
        "planned %d of %d slots (%d before the predicted failure) at urgency %s",
        len(offer),
        len(before) + len(after),
        len(before),
        urgency,
    )
    return offer


def check_bookable(
    slot: Slot,
    technician: Technician,
    booked: Sequence[Appointment],
    config: PlannerConfig = PlannerConfig(),
) -> None:
    """Check once more, at booking time, that a slot can still be booked.

    Args:
        slot: the slot the owner chose.
        technician: its technician.
        booked: the technician's appointments (only ``booked`` ones hold time; other
            technicians' are ignored).
        config: the planner's settings (for the gap between visits).

    Raises:
        ConflictError: the slot now overlaps a booked visit of the technician (closer
            than ``config.min_gap_s``).
        InvalidRequestError: the slot is not the technician's, ends before it starts,
            lies outside the technician's working hours, or has a time without a zone.
    """
    start = _utc(slot.start, "slot start")
    end = _utc(slot.end, "slot end")
    if slot.technician_id != technician.technician_id:
        raise InvalidRequestError(
            f"the slot is for technician {slot.technician_id!r}, not {technician.technician_id!r}"
        )
    if end <= start:
        raise InvalidRequestError("a visit must end after it starts")
    zone = _zone(technician.timezone)
    hours = _windows(technician.hours, zone, start, end)
    if not _contains(hours, [a for a, _ in hours], start, end):
        raise InvalidRequestError(
            f"{start.isoformat()} to {end.isoformat()} is outside the working hours of "
            f"technician {technician.technician_id!r}"
        )
    gap = timedelta(seconds=config.min_gap_s)
    for appointment in booked:
        if appointment.technician_id != technician.technician_id:
            continue
        if appointment.state not in _BUSY_STATES:
            continue
        if appointment.start is None or appointment.end is None:
            continue
        other_start = _utc(appointment.start, "appointment start")
        other_end = _utc(appointment.end, "appointment end")
        if start < other_end + gap and other_start - gap < end:
            raise ConflictError(
                f"technician {technician.technician_id!r} has a visit then "
                f"(appointment {appointment.appointment_id!r})"
            )


# -- time and intervals ---------------------------------------------------------------------
def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequestError(f"{name} must carry a time zone (UTC)")
    return value.astimezone(UTC)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidRequestError(f"unknown time zone {name!r}") from exc


def _instant(day: date, wall: time, zone: ZoneInfo, *, late: bool) -> datetime:
    """Return the UTC instant of a local wall time on a date.

    A wall time in a DST gap (it does not exist) or repeat (it exists twice) has two
    readings (PEP 495 ``fold``); ``late`` picks the later one, else the earlier.
    """
    local = datetime.combine(day, wall.replace(tzinfo=None), tzinfo=zone)
    first = local.replace(fold=0).astimezone(UTC)
    second = local.replace(fold=1).astimezone(UTC)
    return max(first, second) if late else min(first, second)


def _wall_interval(
    day: date, start: time, end: time, zone: ZoneInfo, *, inward: bool
) -> _Interval | None:
    """Return a local wall-time span on a date as UTC.

    An end not after the start is the next day's (quiet hours overnight, a window up to
    midnight).
    """
    end_day = day + timedelta(days=1) if end <= start else day
    first = _instant(day, start, zone, late=inward)
    last = _instant(end_day, end, zone, late=not inward)
    return (first, last) if first < last else None


def _local_days(start: datetime, end: datetime, zone: ZoneInfo) -> list[date]:
    # one day either side: a window of the day before may reach past midnight
    first = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _windows(
    windows: Iterable[Window], zone: ZoneInfo, start: datetime, end: datetime
) -> list[_Interval]:
    """Return weekly windows as merged UTC intervals around ``[start, end]``."""
    by_day: dict[int, list[Window]] = {}
    for window in windows:
        # windows do not cross midnight (model.Window); an end of 00:00 means midnight
        if window.end <= window.start and window.end != _MIDNIGHT:
            _LOG.debug("ignoring a window that ends before it starts: %s", window)
            continue
        by_day.setdefault(window.weekday, []).append(window)
    spans: list[_Interval] = []
    for day in _local_days(start, end, zone):
        for window in by_day.get(day.weekday(), ()):
            span = _wall_interval(day, window.start, window.end, zone, inward=True)
            if span is not None:
                spans.append(span)
    return _merge(spans)


def _merge(spans: Iterable[_Interval]) -> list[_Interval]:
    """Return intervals sorted, with overlapping and touching ones joined."""
    merged: list[_Interval] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _subtract(spans: Sequence[_Interval], cuts: Sequence[_Interval]) -> list[_Interval]:
    """Return merged ``spans`` without merged ``cuts``."""
    kept: list[_Interval] = []
    for span_start, span_end in spans:
        start = span_start
        for cut_start, cut_end in cuts:
            if cut_end <= start or cut_start >= span_end:
                continue
            if cut_start > start:
                kept.append((start, cut_start))
            start = max(start, cut_end)
            if start >= span_end:
                break
        if start < span_end:
            kept.append((start, span_end))
    return kept


def _contains(
    spans: Sequence[_Interval], starts: Sequence[datetime], start: datetime, end: datetime
) -> bool:
    """Whether one of the merged ``spans`` holds all of ``[start, end)``."""
    i = bisect_right(starts, start) - 1
    return i >= 0 and spans[i][1] >= end


def _overlaps(
    spans: Sequence[_Interval], starts: Sequence[datetime], start: datetime, end: datetime
) -> bool:
    """Whether ``[start, end)`` meets one of the merged half-open ``spans``."""
    i = bisect_left(starts, end)  # spans[:i] begin before ``end``; the last ends latest
    return i > 0 and spans[i - 1][1] > start


# -- planning -------------------------------------------------------------------------------
def _candidates(
    technicians: Sequence[Technician], region: str, part: str | None
) -> list[Technician]:
    chosen: dict[str, Technician] = {}
    for technician in technicians:
        if technician.region != region:
            continue
        if part is not None and part not in technician.skills:
            continue
        chosen.setdefault(technician.technician_id, technician)
    return [chosen[key] for key in sorted(chosen)]


def _busy_visits(booked: Sequence[Appointment], technician_id: str) -> list[_Interval]:
    visits: list[_Interval] = []
    for appointment in booked:
        if appointment.technician_id != technician_id or appointment.state not in _BUSY_STATES:
            continue
        if appointment.start is None or appointment.end is None:
            continue
        start = _utc(appointment.start, "appointment start")
        visits.append((start, _utc(appointment.end, "appointment end")))
    return visits


def _owner_free(
    owner: Owner, start: datetime, end: datetime, config: PlannerConfig
) -> list[_Interval]:
    """Return when a visit suits the owner: availability less quiet hours, in UTC."""
    zone = _zone(owner.timezone)
    availability = owner.availability or tuple(
        Window(weekday, config.day_start, config.day_end) for weekday in range(7)
    )
    free = _windows(availability, zone, start, end)
    if owner.quiet_start is None or owner.quiet_end is None:
        return free
    if owner.quiet_start == owner.quiet_end:
        return free
    quiet: list[_Interval] = []
    for day in _local_days(start, end, zone):
        span = _wall_interval(day, owner.quiet_start, owner.quiet_end, zone, inward=False)
        if span is not None:
            quiet.append(span)
    return _subtract(free, _merge(quiet))


def _grid(
    hours: Iterable[Window],
    zone: ZoneInfo,
    earliest: datetime,
    latest: datetime,
    visit: timedelta,
    step: timedelta,
) -> Iterable[datetime]:
    """Yield visit starts on the step grid of each working window, in time order."""
    for window_start, window_end in _windows(hours, zone, earliest, latest + visit):
        start = window_start
        if start < earliest:
            start += step * -((window_start - earliest) // step)  # round up onto the grid
        while start + visit <= window_end and start <= latest:
            yield start
            start += step


def _score(
    start: datetime,
    end: datetime,
    *,
    earliest: datetime,
    failure_at: datetime | None,
    urgency: Urgency,
    load: int,
    in_time: bool,
    config: PlannerConfig,
) -> float:
    hours_late = (start - earliest).total_seconds() / _HOUR_S
    earliness = math.exp(-hours_late / _EARLINESS_TAU_H[urgency])
    penalty = config.load_weight * min(load, _MAX_LOAD)
    if not in_time:
        # after the predicted failure: always below zero, the earliest least so
        return round(-1.0 + 0.5 * earliness - min(penalty, 0.4), 6)
    margin = 1.0
    if failure_at is not None:
        margin = 1.0 - math.exp(-(failure_at - end).total_seconds() / config.margin_s)
    return round(1.0 + earliness + 0.5 * margin - min(penalty, 0.9), 6)


def _pick(pool: Sequence[Slot], config: PlannerConfig) -> list[Slot]:
    """Pick the best slots greedily, keeping them ``config.spacing_s`` apart."""
    spacing = timedelta(seconds=config.spacing_s)
    chosen: list[Slot] = []
    for slot in sorted(pool, key=lambda s: (-s.score, s.start, s.technician_id)):
        if all(abs(slot.start - other.start) >= spacing for other in chosen):
            chosen.append(slot)
            if len(chosen) == config.offer:
                break
    return chosen
