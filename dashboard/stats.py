"""Outcome figures and fleet insight from the case store's records (dashboard; no I/O).

Pure functions over cases, ratings, appointments and the device registry, so that they
are tested on a known seed without a store and run in a worker thread for a big fleet.

*Outcomes*: ratings over time, the share of resolved cases fixed remotely (resolved
without any technician appointment), the median time from opening to resolution, and
the false alarms owners reported (ratings with "nothing was wrong"), for the whole fleet
and by product model and firmware.

*Over time*: cases opened and resolved per day with the median time to resolution
(:func:`cases_by_day`), and the share of the day's resolutions fixed remotely with the
owners' mean rating (:func:`fixes_by_day`); days are UTC dates.

*Failure rates*: the share of devices of each firmware and each production batch (within
their product model) that had a case (:func:`failure_rates`). The firmware is the one
a device runs now (its newest boot event, else the registry's); the batch is the
registry's ``batch`` of the device (set when devices are registered or imported), and
``unknown`` for a device registered without one.

*Insight*: for every fault and every group of devices (a firmware, a product model, a
production batch) the rate of devices that had a case of the fault, against the rate in
the rest of the population. A group is flagged when it has at least ``min_devices``
affected devices, its rate is at least ``min_ratio`` times the rest's, and the one-sided
binomial test of its count under the rest's rate (with half a pseudo-case added, so that
peers without any case still leave room for chance) gives ``p < alpha``. The population is
the devices of the product models that have had the fault: faults come from each model's
own catalog, so a fault only one model can have is no cluster on that model, and firmware
versions and batches are compared with their own model's peers. The insight is computed
in :mod:`dashboard.insight`; the outcomes, the figures over time and the failure rates
here.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

from notifier.model import Case, DeviceRecord, Rating

__all__ = [
    "Dimension",
    "cases_by_day",
    "failure_rates",
    "fixes_by_day",
    "group_of",
    "outcomes",
]

Dimension = Literal["firmware", "model", "batch"]
DIMENSIONS: Final[tuple[Dimension, ...]] = ("firmware", "model", "batch")
_UNKNOWN: Final = "unknown"
_VISIT_PREFIX: Final = "technician_visit"


# -- outcomes ---------------------------------------------------------------------------


def _week(at: datetime) -> str:
    start = (at - timedelta(days=at.weekday())).date()
    return start.isoformat()


@dataclass(slots=True)
class _Tally:
    cases: int = 0
    resolved: int = 0
    remote: int = 0
    ratings: int = 0
    stars: int = 0
    false_alarms: int = 0
    durations_s: list[float] = field(default_factory=list)

    def add(self, other: _Tally) -> None:
        self.cases += other.cases
        self.resolved += other.resolved
        self.remote += other.remote
        self.ratings += other.ratings
        self.stars += other.stars
        self.false_alarms += other.false_alarms
        self.durations_s.extend(other.durations_s)

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "resolved": self.resolved,
            "fixed_remotely": self.remote,
            "fixed_remotely_share": _share(self.remote, self.resolved),
            "median_resolution_s": (
                statistics.median(self.durations_s) if self.durations_s else None
            ),
            "ratings": self.ratings,
            "mean_stars": round(self.stars / self.ratings, 3) if self.ratings else None,
            "false_alarms": self.false_alarms,
            "false_alarm_share": _share(self.false_alarms, self.ratings),
        }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def outcomes(
    cases: Sequence[Case],
    ratings: Sequence[Rating],
    devices: Mapping[str, DeviceRecord],
    resolved_at: Mapping[str, datetime],
    visited_cases: Iterable[str],
    *,
    comments: int = 20,
) -> dict[str, Any]:
    """The owners' verdict and the loop's results.

    Args:
        cases: the cases to count.
        ratings: the owners' ratings (of any case; those of other cases are ignored).
        devices: the registry by device id (for the firmware).
        resolved_at: when each resolved case was resolved (from the audit trail); a case
            in it counts as resolved even if it moved on (a low rating escalates it).
        visited_cases: ids of cases that had any technician appointment.
        comments: how many of the newest comments to return.

    Returns:
        ``totals``, ``by_model`` and ``by_firmware`` (each: cases, resolved, fixed
        remotely and its share, median resolution time, ratings, mean stars, false
        alarms and their share), ``ratings_by_week`` and the newest ``comments``.
    """
    visited = visited_cases if isinstance(visited_cases, set | frozenset) else set(visited_cases)
    by_id: dict[str, Case] = {}
    # one tally per (model, firmware) cell in the pass over the cases; the model, firmware
    # and fleet tallies are sums of cells (a handful), not three updates per case
    cells: dict[tuple[str, str], _Tally] = {}
    firmware_of: dict[str, str] = {}

    def cell_of(case: Case) -> tuple[str, str]:
        firmware = firmware_of.get(case.device_id)
        if firmware is None:
            record = devices.get(case.device_id)
            firmware = (record.firmware if record is not None else None) or _UNKNOWN
            firmware_of[case.device_id] = firmware
        return case.model, firmware

    for case in cases:
        by_id[case.case_id] = case
        key = cell_of(case)
        tally = cells.get(key)
        if tally is None:
            tally = cells[key] = _Tally()
        tally.cases += 1
        done = resolved_at.get(case.case_id)
        if done is None:
            continue
        tally.resolved += 1
        if case.appointment_id is None and case.case_id not in visited:
            tally.remote += 1
        tally.durations_s.append(max((done - case.opened_at).total_seconds(), 0.0))
    weeks: defaultdict[str, list[Rating]] = defaultdict(list)
    commented: list[tuple[Rating, Case]] = []
    for rating in ratings:
        rated = by_id.get(rating.case_id)
        if rated is None:
            continue
        tally = cells[cell_of(rated)]
        tally.ratings += 1
        tally.stars += rating.stars
        tally.false_alarms += rating.nothing_wrong
        weeks[_week(rating.at)].append(rating)
        if rating.comment:
            commented.append((rating, rated))
    total = _Tally()
    models: defaultdict[str, _Tally] = defaultdict(_Tally)
    firmwares: defaultdict[str, _Tally] = defaultdict(_Tally)
    for (model, firmware), cell in cells.items():
        for tally in (total, models[model], firmwares[firmware]):
            tally.add(cell)
    # newest first; a stable sort keeps the ratings' order among equal times
    commented.sort(key=lambda pair: pair[0].at, reverse=True)
    notes = [
        {
            "case_id": rating.case_id,
            "at": rating.at.isoformat(),
            "stars": rating.stars,
            "nothing_wrong": rating.nothing_wrong,
            "comment": rating.comment,
            "model": case.model,
            "firmware": cell_of(case)[1],
            "fault": case.fault,
        }
        for rating, case in commented[:comments]
    ]
    return {
        "totals": total.as_json(),
        "by_model": {name: t.as_json() for name, t in sorted(models.items())},
        "by_firmware": {name: t.as_json() for name, t in sorted(firmwares.items())},
        "ratings_by_week": [
            {
                "week": week,
                "ratings": len(group),
                "mean_stars": round(sum(r.stars for r in group) / len(group), 3),
                "false_alarms": sum(1 for r in group if r.nothing_wrong),
            }
            for week, group in sorted(weeks.items())
        ],
        "comments": notes,
    }


# -- over time --------------------------------------------------------------------------


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def _median_h(durations_s: Sequence[float]) -> float | None:
    return round(statistics.median(durations_s) / 3600, 2) if durations_s else None


def cases_by_day(
    cases: Iterable[Case], resolved_at: Mapping[str, datetime], *, start: date, end: date
) -> list[dict[str, Any]]:
    """Cases opened and resolved on each day from ``start`` to ``end`` (UTC dates).

    Args:
        cases: the cases (of any time; only the days in range are counted).
        resolved_at: when each resolved case was resolved (from the audit trail).
        start: the first day.
        end: the last day (included).

    Returns:
        One row per day, oldest first: ``day`` (ISO date), ``opened``, ``resolved``
        and ``median_resolution_h`` (from opening to resolution, of the cases resolved
        that day; ``None`` on a day without one).
    """
    days = _days(start, end)
    opened: Counter[date] = Counter()
    durations: defaultdict[date, list[float]] = defaultdict(list)
    for case in cases:
        day = case.opened_at.astimezone(UTC).date()
        if start <= day <= end:
            opened[day] += 1
        done = resolved_at.get(case.case_id)
        if done is None:
            continue
        day = done.astimezone(UTC).date()
        if start <= day <= end:
            durations[day].append(max((done - case.opened_at).total_seconds(), 0.0))
    return [
        {
            "day": day.isoformat(),
            "opened": opened.get(day, 0),
            "resolved": len(durations.get(day, ())),
            "median_resolution_h": _median_h(durations.get(day, ())),
        }
        for day in days
    ]


def fixes_by_day(
    cases: Iterable[Case],
    resolved_at: Mapping[str, datetime],
    visited_cases: Iterable[str],
    ratings: Iterable[Rating],
    *,
    start: date,
    end: date,
) -> list[dict[str, Any]]:
    """The share of each day's resolutions fixed remotely, and the day's mean rating.

    A resolution is remote when its case never had a technician appointment (as in
    :func:`outcomes`). Ratings count on the day they were given.

    Returns:
        One row per day, oldest first: ``day``, ``resolved``, ``fixed_remotely``,
        ``fixed_remotely_share`` (``None`` on a day without a resolution), ``ratings``
        and ``mean_stars`` (``None`` on a day without a rating).
    """
    visited = visited_cases if isinstance(visited_cases, set | frozenset) else set(visited_cases)
    resolved: Counter[date] = Counter()
    remote: Counter[date] = Counter()
    for case in cases:
        done = resolved_at.get(case.case_id)
        if done is None:
            continue
        day = done.astimezone(UTC).date()
        if not start <= day <= end:
            continue
        resolved[day] += 1
        if case.appointment_id is None and case.case_id not in visited:
            remote[day] += 1
    given: Counter[date] = Counter()
    stars: Counter[date] = Counter()
    for rating in ratings:
        day = rating.at.astimezone(UTC).date()
        if start <= day <= end:
            given[day] += 1
            stars[day] += rating.stars
    return [
        {
            "day": day.isoformat(),
            "resolved": resolved.get(day, 0),
            "fixed_remotely": remote.get(day, 0),
            "fixed_remotely_share": _share(remote.get(day, 0), resolved.get(day, 0)),
            "ratings": given.get(day, 0),
            "mean_stars": (round(stars[day] / given[day], 3) if given.get(day) else None),
        }
        for day in _days(start, end)
    ]


# -- failure rates ------------------------------------------------------------------------


def failure_rates(
    devices: Iterable[DeviceRecord], cases: Iterable[Case], *, since: datetime | None = None
) -> list[dict[str, Any]]:
    """The share of devices of each firmware and each batch that had a case.

    A device *failed* when it had at least one case opened since ``since`` (any time
    when ``None``) that was not dismissed as a false alarm; a device counts once however
    many cases it had. Groups are within a product model (firmware ``1.2`` of a fridge
    is not that of a washer).

    Returns:
        Rows ``dimension`` (``firmware`` then ``batch``), ``model``, ``group``,
        ``devices``, ``failed`` and ``failure_rate``, by model and group within each
        dimension; only groups with devices.
    """
    failed_ids: set[str] = set()
    for case in cases:
        if case.state == "dismissed" or (since is not None and case.opened_at < since):
            continue
        failed_ids.add(case.device_id)
    sizes: dict[str, Counter[tuple[str, str]]] = {"firmware": Counter(), "batch": Counter()}
    failed: dict[str, Counter[tuple[str, str]]] = {"firmware": Counter(), "batch": Counter()}
    for device in devices:
        hit = device.device_id in failed_ids
        for dimension in ("firmware", "batch"):
            key = (device.model, group_of(device, dimension))
            sizes[dimension][key] += 1
            if hit:
                failed[dimension][key] += 1
    return [
        {
            "dimension": dimension,
            "model": model,
            "group": group,
            "devices": n,
            "failed": failed[dimension].get((model, group), 0),
            "failure_rate": round(failed[dimension].get((model, group), 0) / n, 4),
        }
        for dimension in ("firmware", "batch")
        for (model, group), n in sorted(sizes[dimension].items())
    ]


def group_of(device: DeviceRecord, dimension: Dimension) -> str:
    """The group a device belongs to along one dimension (``unknown`` when unset)."""
    if dimension == "model":
        return device.model
    value = device.firmware if dimension == "firmware" else device.batch
    return value or _UNKNOWN
