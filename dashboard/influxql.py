"""The dashboard's reads of InfluxDB (gateway's and diagnostics' measurements -> here -> pages).

InfluxDB does the aggregation: a chart over any range asks for ``GROUP BY time(<w>)``
with ``w`` chosen by :func:`bucket_s` so that at most ``max_points`` buckets fall in the
range, and ``fill(none)`` leaves out empty ones. Everything here is read-only InfluxQL
over :meth:`wire.influx.InfluxClient.query`, the common ground of InfluxDB 1.x, 2.x
and 3.x.

Measurements read: ``telemetry`` (tag ``device``, one field per metric, plus ``seq`` and
``status``), ``health`` (tag ``device``, fields ``score``, ``baseline``, ``fleet``),
``device_events`` (tags ``device``, ``kind``) and ``product_mismatch`` (tags ``model``,
``worker``; what devices send that no product file describes, counted by diagnostics).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from wire.influx import InfluxClient
from wire.influxql import quote_ident, quote_string
from wire.lineproto import (
    EVENTS_MEASUREMENT,
    HEALTH_MEASUREMENT,
    MISMATCH_MEASUREMENT,
    RESERVED_FIELDS,
    TELEMETRY_MEASUREMENT,
)

__all__ = [
    "DeviceSeries",
    "DeviceSignals",
    "Measurements",
    "ProductMismatch",
    "bucket_s",
    "device_events",
    "device_series",
    "device_signals",
    "first_scores",
    "latest_scores",
    "product_mismatches",
    "score_buckets",
]

#: Bucket widths offered, in seconds: round numbers a person reads at a glance.
_STEPS_S: Final = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
    86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Measurements:
    """The measurement names the dashboard reads (the pipeline's by default).

    Attributes:
        telemetry: device readings.
        health: anomaly scores.
        events: device events.
        fleet_health: the fleet's devices per level in each step, kept by the dashboard
            itself (:mod:`dashboard.history`).
        mismatch: what devices send that no product file describes.
    """

    telemetry: str = TELEMETRY_MEASUREMENT
    health: str = HEALTH_MEASUREMENT
    events: str = EVENTS_MEASUREMENT
    fleet_health: str = "fleet_health"
    mismatch: str = MISMATCH_MEASUREMENT


@dataclass(frozen=True, slots=True)
class DeviceSeries:
    """A device's downsampled charts over a range.

    Attributes:
        bucket_s: the width of each point's bucket.
        times_ms: bucket starts of the telemetry (epoch ms).
        metrics: metric name to its bucket means (``None`` where absent), aligned with
            ``times_ms``.
        score_times_ms: bucket starts of the scores.
        score: mean anomaly score per bucket.
        score_max: highest anomaly score per bucket.
        baseline: mean baseline score per bucket.
    """

    bucket_s: int
    times_ms: list[int]
    metrics: dict[str, list[float | None]]
    score_times_ms: list[int]
    score: list[float | None]
    score_max: list[float | None]
    baseline: list[float | None]


def bucket_s(start: datetime, end: datetime, max_points: int) -> int:
    """The bucket width so that ``[start, end)`` holds at most ``max_points`` buckets.

    ``GROUP BY time(w)`` aligns buckets to multiples of ``w`` since the epoch, so a range
    of span ``S`` touches at most ``ceil(S / w) + 1`` of them; ``w >= S / (max_points - 1)``
    keeps that within ``max_points``.

    Args:
        start: range start.
        end: range end (after ``start``).
        max_points: at least 2.

    Returns:
        A width from a list of round values (1 s ... 30 days), or a multiple of 30 days.
    """
    span_s = max((end - start).total_seconds(), 1.0)
    least = span_s / max(max_points - 1, 1)
    for step in _STEPS_S:
        if step >= least:
            return step
    month = _STEPS_S[-1]
    return month * math.ceil(least / month)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _range(device_id: str, start: datetime, end: datetime) -> str:
    return f"device = {quote_string(device_id)} AND time >= {_ms(start)}ms AND time < {_ms(end)}ms"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


async def latest_scores(
    influx: InfluxClient, *, measurements: Measurements = Measurements()
) -> dict[str, tuple[int, float]]:
    """Each device's newest anomaly score: device id to ``(epoch ms, score)``."""
    series = await influx.query(
        f"SELECT LAST(score) FROM {quote_ident(measurements.health)} GROUP BY device"
    )
    latest: dict[str, tuple[int, float]] = {}
    for one in series:
        device = one.tags.get("device")
        if not device or not one.values:
            continue
        row = one.values[0]
        score = _number(row[1]) if len(row) > 1 else None
        if score is not None and isinstance(row[0], int):
            latest[device] = (row[0], score)
    return latest


@dataclass(frozen=True, slots=True)
class ProductMismatch:
    """What one model's devices send that no product file describes (all workers).

    Attributes:
        model: the product model (``unknown``: devices that never said theirs).
        has_file: whether a product file describes it.
        count: without a file, its readings (all scored generically); with one, the
            metric values its file does not list. Summed over the diagnostics workers,
            each counting since its start.
        metrics: without a file every metric seen, with one those its file does not list.
        at_ms: the newest count's time (epoch ms).
    """

    model: str
    has_file: bool
    count: int
    metrics: tuple[str, ...]
    at_ms: int


async def product_mismatches(
    influx: InfluxClient, *, measurements: Measurements = Measurements()
) -> list[ProductMismatch]:
    """Each model's newest mismatch counts, summed over workers, by model name."""
    series = await influx.query(
        f'SELECT "count", has_file, metrics FROM {quote_ident(measurements.mismatch)} '
        "GROUP BY model, worker ORDER BY time DESC LIMIT 1"
    )
    found: dict[str, ProductMismatch] = {}
    for one in series:
        model = one.tags.get("model")
        if not model or not one.values:
            continue
        row = dict(zip(one.columns, one.values[0], strict=False))
        at_ms, count = row.get("time"), _number(row.get("count"))
        if not isinstance(at_ms, int) or count is None:
            continue
        text = row.get("metrics")
        metrics = {m for m in text.split(",") if m} if isinstance(text, str) else set()
        before = found.get(model)
        if before is not None:
            metrics |= set(before.metrics)
            count += before.count
            at_ms = max(at_ms, before.at_ms)
        found[model] = ProductMismatch(
            model, row.get("has_file") is True, int(count), tuple(sorted(metrics)), at_ms
        )
    return [found[m] for m in sorted(found)]


@dataclass(frozen=True, slots=True)
class DeviceSignals:
    """What InfluxDB last heard from each device.

    Attributes:
        scores: device id to its newest anomaly score, ``(epoch ms, score)``.
        heard: device id to the time of its newest reading or score (epoch ms); readings
            are looked for only since the ``readings_since`` given to
            :func:`device_signals`, scores over all time.
        boots: device id to its newest boot event, ``(epoch ms, firmware)``: a device
            says its firmware version in the ``code`` of every boot event (the
            gateway stores events in the events measurement, tag ``kind``).
    """

    scores: dict[str, tuple[int, float]]
    heard: dict[str, int]
    boots: dict[str, tuple[int, str]]


async def _last_by_device(influx: InfluxClient, statement: str) -> dict[str, tuple[int, Any]]:
    found: dict[str, tuple[int, Any]] = {}
    for one in await influx.query(statement):
        device = one.tags.get("device")
        if not device or not one.values:
            continue
        row = one.values[0]
        if len(row) > 1 and isinstance(row[0], int) and row[1] is not None:
            found[device] = (row[0], row[1])
    return found


async def device_signals(
    influx: InfluxClient,
    *,
    readings_since: datetime,
    measurements: Measurements = Measurements(),
    device_id: str | None = None,
) -> DeviceSignals:
    """Each device's newest score, when it was last heard from, and its firmware.

    Three statements, sent side by side: the newest score per device (all time), the
    newest reading per device since ``readings_since`` (a reading older than that is
    older than any silence threshold anyway, and a month of telemetry need not be
    read to learn it), and the newest boot event per device (all time; boots are rare).

    Args:
        influx: the InfluxDB client.
        readings_since: the oldest reading that counts as heard.
        measurements: the measurement names.
        device_id: only this device's (``None``: every device's).

    Returns:
        The signals; a device without a score has none in ``scores``, one never heard
        from none in ``heard``, one without a boot event none in ``boots``.
    """
    only = None if device_id is None else f"device = {quote_string(device_id)}"

    def where(*conditions: str | None) -> str:
        kept = [c for c in (only, *conditions) if c]
        return f"WHERE {' AND '.join(kept)} " if kept else ""

    recent = f"time >= {_ms(readings_since)}ms"
    boot = "kind = 'boot'"
    scores, readings, boots = await asyncio.gather(
        _last_by_device(
            influx,
            f"SELECT LAST(score) FROM {quote_ident(measurements.health)} {where()}GROUP BY device",
        ),
        _last_by_device(
            influx,
            f"SELECT LAST(seq) FROM {quote_ident(measurements.telemetry)} "
            f"{where(recent)}GROUP BY device",
        ),
        _last_by_device(
            influx,
            f"SELECT LAST(code) FROM {quote_ident(measurements.events)} "
            f"{where(boot)}GROUP BY device",
        ),
    )
    latest: dict[str, tuple[int, float]] = {}
    heard: dict[str, int] = {}
    for device, (at_ms, value) in scores.items():
        score = _number(value)
        if score is not None:
            latest[device] = (at_ms, score)
            heard[device] = at_ms
    for device, (at_ms, _) in readings.items():
        if at_ms > heard.get(device, -1):
            heard[device] = at_ms
    firmware = {
        device: (at_ms, value)
        for device, (at_ms, value) in boots.items()
        if isinstance(value, str) and value
    }
    return DeviceSignals(scores=latest, heard=heard, boots=firmware)


async def first_scores(
    influx: InfluxClient, *, measurements: Measurements = Measurements()
) -> dict[str, int]:
    """When each device was first scored (epoch ms): from then on it counts as heard of."""
    first = await _last_by_device(
        influx, f"SELECT FIRST(score) FROM {quote_ident(measurements.health)} GROUP BY device"
    )
    return {device: at_ms for device, (at_ms, _) in first.items()}


async def score_buckets(
    influx: InfluxClient,
    start: datetime,
    end: datetime,
    width_s: int,
    *,
    measurements: Measurements = Measurements(),
) -> dict[str, list[tuple[int, float]]]:
    """Every device's last score in each bucket of ``width_s`` over ``[start, end)``.

    Returns:
        Device id to ``(bucket start in epoch ms, score)``, oldest first, only for the
        buckets in which the device was scored (``fill(none)``).
    """
    statement = (
        f"SELECT LAST(score) FROM {quote_ident(measurements.health)} "
        f"WHERE time >= {_ms(start)}ms AND time < {_ms(end)}ms "
        f"GROUP BY time({int(width_s)}s), device fill(none)"
    )
    found: dict[str, list[tuple[int, float]]] = {}
    for one in await influx.query(statement):
        device = one.tags.get("device")
        if not device:
            continue
        mine = found.setdefault(device, [])
        for row in one.values:
            score = _number(row[1]) if len(row) > 1 else None
            if score is not None and isinstance(row[0], int):
                mine.append((row[0], score))
        mine.sort()
    return found


def _columns(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
    return {name: [row[i] for row in rows] for i, name in enumerate(columns)}


async def device_series(
    influx: InfluxClient,
    device_id: str,
    start: datetime,
    end: datetime,
    *,
    max_points: int = 500,
    measurements: Measurements = Measurements(),
) -> DeviceSeries:
    """A device's telemetry and scores over ``[start, end)``, downsampled by InfluxDB.

    Both statements go in one request. Numeric metrics come back as bucket means; boolean
    and text fields, and the ``seq`` counter, are left out.
    """
    width = bucket_s(start, end, max_points)
    where = _range(device_id, start, end)
    group = f"GROUP BY time({width}s) fill(none)"
    statement = (
        f"SELECT MEAN(*) FROM {quote_ident(measurements.telemetry)} WHERE {where} {group}; "
        f"SELECT MEAN(score) AS score, MAX(score) AS score_max, MEAN(baseline) AS baseline "
        f"FROM {quote_ident(measurements.health)} WHERE {where} {group}"
    )
    series = await influx.query(statement)
    times: list[int] = []
    metrics: dict[str, list[float | None]] = {}
    score_times: list[int] = []
    scores: dict[str, list[Any]] = {}
    for one in series:
        table = _columns(one.columns, one.values)
        if one.name == measurements.health:
            score_times = [int(t) for t in table.get("time", [])]
            scores = table
            continue
        times = [int(t) for t in table.get("time", [])]
        for column, values in table.items():
            if not column.startswith("mean_"):
                continue
            name = column[len("mean_") :]
            if name in RESERVED_FIELDS:
                continue
            metrics[name] = [_number(v) for v in values]
    return DeviceSeries(
        bucket_s=width,
        times_ms=times,
        metrics=dict(sorted(metrics.items())),
        score_times_ms=score_times,
        score=[_number(v) for v in scores.get("score", [])],
        score_max=[_number(v) for v in scores.get("score_max", [])],
        baseline=[_number(v) for v in scores.get("baseline", [])],
    )


async def device_events(
    influx: InfluxClient,
    device_id: str,
    start: datetime,
    end: datetime,
    *,
    limit: int = 200,
    measurements: Measurements = Measurements(),
) -> list[dict[str, Any]]:
    """A device's newest events in ``[start, end)`` (at most ``limit``), oldest first.

    Each event is ``{"at_ms", "kind", "code", "command_id", "detail", "ok"}``; the
    free-form ``data`` field is not passed on (it is device-made and unbounded).
    """
    series = await influx.query(
        f"SELECT kind, code, command_id, detail, ok FROM {quote_ident(measurements.events)} "
        f"WHERE {_range(device_id, start, end)} ORDER BY time DESC LIMIT {int(limit)}"
    )
    events: list[dict[str, Any]] = []
    for one in series:
        for row in one.values:
            item: Mapping[str, Any] = dict(zip(one.columns, row, strict=False))
            events.append(
                {
                    "at_ms": item.get("time"),
                    "kind": item.get("kind"),
                    "code": item.get("code"),
                    "command_id": item.get("command_id"),
                    "detail": item.get("detail"),
                    "ok": item.get("ok"),
                }
            )
    events.sort(key=lambda e: e["at_ms"] if isinstance(e["at_ms"], int) else 0)
    return events


def iso_ms(at_ms: int) -> str:
    """An epoch-milliseconds time as ISO 8601 UTC (for the page's labels)."""
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat()
