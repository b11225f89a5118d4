"""The fleet's health levels (dashboard): per device, grouped, over time, the overview.

A device's level comes from its latest score (:func:`health_level`), or is *silent*
when it has not been heard from for ``silent_after_s``; :func:`fleet_health` counts the
levels by model, firmware and batch, :func:`health_timeline` counts them over time and
:func:`overview` adds the open cases of a :class:`~dashboard.fleet.Snapshot`. Pure
functions of what :class:`~dashboard.fleet.FleetCache` keeps: no store or InfluxDB read.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from dashboard.fleet import Snapshot
from notifier.model import OPEN_STATES, DeviceRecord

__all__ = ["LEVELS", "FleetHealth", "fleet_health", "health_level", "health_timeline", "overview"]

_WORST: Final = 20


#: A device's health levels, best first; ``silent``: not heard from lately,
#: ``unknown``: no score yet (never heard from, or heard but not scored).
LEVELS: Final = ("healthy", "watch", "anomalous", "silent", "unknown")


def health_level(score: float | None, healthy_below: float, anomalous_from: float) -> str:
    """``healthy``, ``watch``, ``anomalous`` or ``unknown`` (no score); see :data:`LEVELS`."""
    if score is None:
        return "unknown"
    if score < healthy_below:
        return "healthy"
    return "watch" if score < anomalous_from else "anomalous"


def _counts() -> dict[str, int]:
    return {
        "devices": 0,
        "healthy": 0,
        "watch": 0,
        "anomalous": 0,
        "silent": 0,
        "unknown": 0,
        "open": 0,
    }


_GROUPINGS: Final = ("model", "firmware", "batch")


@dataclass(frozen=True, slots=True)
class FleetHealth:
    """The device half of the overview: it depends on the registry and the signals only.

    With 10,000 devices this is the costly half, so it is kept while neither changes
    (and until ``valid_until_ms``) and a case change only counts the open cases again
    (see :func:`overview`).

    Attributes:
        health: devices per health level (:data:`LEVELS`).
        groups: per grouping (``model``, ``firmware``, ``batch``), the group key to its
            device counts per level (``open`` is left at 0 here).
        keys: device id to its group key in each grouping, in that order.
        worst: ``(score, epoch ms, device id)`` of the highest scores at watch level or
            above of devices that are not silent, highest first.
        levels: device id to its level.
        valid_until_ms: the first time (epoch ms) at which a device heard from so far
            turns silent; the counts hold until then (``None``: for good).
    """

    health: Mapping[str, int]
    groups: Mapping[str, Mapping[tuple[str, ...], Mapping[str, int]]]
    keys: Mapping[str, tuple[tuple[str, ...], ...]]
    worst: Sequence[tuple[float, int, str]]
    levels: Mapping[str, str] = field(default_factory=dict)
    valid_until_ms: int | None = None

    def holds_at(self, now_ms: int) -> bool:
        """Whether the counts are still true at ``now_ms`` (no device turned silent)."""
        return self.valid_until_ms is None or now_ms < self.valid_until_ms


def fleet_health(
    devices: Mapping[str, DeviceRecord],
    scores: Mapping[str, tuple[int, float]],
    *,
    healthy_below: float,
    anomalous_from: float,
    heard: Mapping[str, int] | None = None,
    now_ms: int = 0,
    silent_after_s: float = math.inf,
) -> FleetHealth:
    """Count the devices by grouping and health level (one pass over the registry).

    Args:
        devices: the registry by device id.
        scores: device id to its newest ``(epoch ms, score)``.
        healthy_below: scores below this are healthy.
        anomalous_from: scores from this on are anomalous.
        heard: device id to when it was last heard from (epoch ms); ``None``: nobody
            is ever silent.
        now_ms: the time now (epoch ms).
        silent_after_s: a device last heard from longer ago than this is ``silent``,
            whatever its last score; one never heard from is ``unknown``.
    """
    health: Counter[str] = Counter()
    groups: dict[str, defaultdict[tuple[str, ...], dict[str, int]]] = {
        name: defaultdict(_counts) for name in _GROUPINGS
    }
    by_model, by_firmware, by_batch = (groups[name] for name in _GROUPINGS)
    keys: dict[str, tuple[tuple[str, ...], ...]] = {}
    levels: dict[str, str] = {}
    silent_ms = silent_after_s * 1000.0
    valid_until: float = math.inf
    for device in devices.values():
        device_id = device.device_id
        latest = scores.get(device_id)
        last = None if heard is None else heard.get(device_id)
        if last is not None and now_ms - last > silent_ms:
            level = "silent"
        else:
            level = health_level(latest[1] if latest else None, healthy_below, anomalous_from)
            if last is not None:
                valid_until = min(valid_until, last + silent_ms)
        levels[device_id] = level
        health[level] += 1
        mine = (
            (device.model,),
            (device.model, device.firmware or "unknown"),
            (device.model, device.batch or "unknown"),
        )
        keys[device_id] = mine
        for rows, key in ((by_model, mine[0]), (by_firmware, mine[1]), (by_batch, mine[2])):
            row = rows[key]
            row["devices"] += 1
            row[level] += 1
    worst = sorted(
        (
            (score, at, device_id)
            for device_id, (at, score) in scores.items()
            if score >= healthy_below and levels.get(device_id, "silent") != "silent"
        ),
        reverse=True,
    )[:_WORST]
    return FleetHealth(
        health={level: health.get(level, 0) for level in LEVELS},
        groups={name: dict(rows) for name, rows in groups.items()},
        keys=keys,
        worst=worst,
        levels=levels,
        valid_until_ms=None if math.isinf(valid_until) else math.floor(valid_until) + 1,
    )


def health_timeline(
    bucket_starts_ms: Sequence[int],
    width_ms: int,
    points: Mapping[str, Sequence[tuple[int, float]]],
    first_heard: Mapping[str, int],
    devices: Collection[str],
    *,
    healthy_below: float,
    anomalous_from: float,
    silent_after_s: float,
) -> dict[str, list[int]]:
    """The registry's devices per health level in each time bucket.

    In a bucket, a device has the level of its last score in it; a bucket without a
    score keeps the level of the device's previous score while that bucket starts less
    than ``silent_after_s`` after the previous one's (so a device reporting every five
    minutes is not silent in the one-minute buckets between its reports). Past that the
    device is ``silent`` if it had been heard of by the bucket's end (``first_heard``,
    or its first score here), else ``unknown``. One pass over the points, whatever
    the number of buckets.

    Args:
        bucket_starts_ms: bucket starts, oldest first, ``width_ms`` apart.
        width_ms: the buckets' width.
        points: device id to ``(bucket start, last score in the bucket)``, oldest first.
        first_heard: device id to when it was first heard of (epoch ms).
        devices: the devices counted (the registry); others in ``points`` are left out.
        healthy_below: scores below this are healthy.
        anomalous_from: scores from this on are anomalous.
        silent_after_s: how long a score keeps a device from being silent.

    Returns:
        Each of :data:`LEVELS` to its counts, one per bucket; per bucket they add up to
        the number of ``devices``.
    """
    n = len(bucket_starts_ms)
    if n == 0:
        return {level: [] for level in LEVELS}
    origin = bucket_starts_ms[0]
    hold = max(1, math.ceil(silent_after_s * 1000 / width_ms))
    steps: dict[str, list[int]] = {level: [0] * (n + 1) for level in LEVELS}
    heard_steps = [0] * (n + 1)
    levels_of = {level: steps[level] for level in ("healthy", "watch", "anomalous")}

    def index(at_ms: int) -> int:
        return (at_ms - origin) // width_ms

    for device_id in devices:
        mine = points.get(device_id, ())
        first = first_heard.get(device_id)
        if mine and (first is None or mine[0][0] < first):
            first = mine[0][0]
        if first is None:
            continue
        since = max(index(first), 0)
        if since < n:
            heard_steps[since] += 1
        for i, (at_ms, score) in enumerate(mine):
            k = index(at_ms)
            stop = k + hold
            if i + 1 < len(mine):
                stop = min(stop, index(mine[i + 1][0]))
            low, high = max(k, 0), min(stop, n)
            if low < high:
                row = levels_of[health_level(score, healthy_below, anomalous_from)]
                row[low] += 1
                row[high] -= 1
    counts: dict[str, list[int]] = {level: [] for level in LEVELS}
    running = dict.fromkeys(levels_of, 0)
    heard = 0
    total = len(devices)
    for b in range(n):
        heard += heard_steps[b]
        scored = 0
        for level, row in levels_of.items():
            running[level] += row[b]
            counts[level].append(running[level])
            scored += running[level]
        counts["silent"].append(max(heard - scored, 0))
        counts["unknown"].append(total - max(heard, scored))
    return counts


def overview(
    snapshot: Snapshot,
    *,
    healthy_below: float,
    anomalous_from: float,
    iso: Callable[[int], str],
    health: FleetHealth | None = None,
) -> dict[str, Any]:
    """The fleet overview: devices by model, firmware, batch and health, open cases.

    Args:
        snapshot: the fleet.
        healthy_below: scores below this are healthy.
        anomalous_from: scores from this on are anomalous.
        iso: epoch milliseconds to ISO 8601 text.
        health: :func:`fleet_health` of the snapshot's devices and scores, when known
            (then only the cases are counted here).

    Returns:
        ``devices`` (count), ``health`` (devices per level), ``by_model``,
        ``by_firmware`` and ``by_batch`` (rows with device counts per level and open
        cases), ``open_cases`` (total and by state) and ``worst`` (the devices with the
        highest scores at watch level or above).
    """
    if health is None:
        health = fleet_health(
            snapshot.devices,
            snapshot.scores,
            healthy_below=healthy_below,
            anomalous_from=anomalous_from,
        )
    by_state: Counter[str] = Counter()
    opened: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in _GROUPINGS}
    open_model, open_firmware, open_batch = (opened[name] for name in _GROUPINGS)
    keys = health.keys
    for case in snapshot.cases:
        if case.state not in OPEN_STATES:
            continue
        by_state[case.state] += 1
        found = keys.get(case.device_id)
        if found is None:
            continue
        open_model[found[0]] += 1
        open_firmware[found[1]] += 1
        open_batch[found[2]] += 1

    def rows(name: str, labels: tuple[str, ...]) -> list[dict[str, Any]]:
        counted = opened[name]
        return [
            {**dict(zip(labels, key, strict=True)), **counts, "open": counted.get(key, 0)}
            for key, counts in sorted(health.groups[name].items())
        ]

    devices = snapshot.devices
    return {
        "devices": len(devices),
        "health": dict(health.health),
        "by_model": rows("model", ("model",)),
        "by_firmware": rows("firmware", ("model", "firmware")),
        "by_batch": rows("batch", ("model", "batch")),
        "open_cases": {"total": sum(by_state.values()), "by_state": dict(sorted(by_state.items()))},
        "worst": [
            {
                "device_id": device_id,
                "model": devices[device_id].model,
                "firmware": devices[device_id].firmware,
                "batch": devices[device_id].batch,
                "score": round(score, 4),
                "level": health_level(score, healthy_below, anomalous_from),
                "at": iso(at),
            }
            for score, at, device_id in health.worst
            if device_id in devices
        ],
    }
