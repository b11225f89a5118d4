"""The fleet's routes of the ops dashboard: fleet, devices, products and charts (dashboard).

Read-only: the fleet cache (:mod:`dashboard.fleet`), InfluxDB (:mod:`dashboard.influxql`)
and the health history (:mod:`dashboard.history`) -> JSON or CSV.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from dashboard import charts, influxql, stats
from dashboard.fleet import Snapshot
from dashboard.health import LEVELS, FleetHealth, fleet_health, overview
from dashboard.history import STEP_S, bucketed
from dashboard.keys import (
    CACHE_KEY,
    CLOCK_KEY,
    HISTORY_KEY,
    INFLUX_KEY,
    MEASUREMENTS_KEY,
    SETTINGS_KEY,
    STORE_KEY,
)
from dashboard.middleware import Handler, send_json, session_of
from dashboard.routes.cases import since_param
from dashboard.settings import DashboardSettings
from dashboard.views import case_json, iso, mask_secrets, owner_secrets
from notifier.errors import (
    InvalidRequestError,
    NotFoundError,
)
from notifier.model import AuditEntry, Case

__all__ = ["ROUTES", "heard_window_s"]


_RANGES: Final = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}


def _iso_ms(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat()


def heard_window_s(settings: DashboardSettings) -> float:
    """How far back readings are looked for to learn when a device was last heard from."""
    return max(86_400.0, 4 * settings.silent_after_s)


def _now_ms(request: web.Request) -> int:
    return int(request.app[CLOCK_KEY]().timestamp() * 1000)


async def _health(request: web.Request, snapshot: Snapshot) -> FleetHealth:
    """The devices' levels (kept while registry and signals stay and nobody turns silent)."""
    settings = request.app[SETTINGS_KEY]
    cache = request.app[CACHE_KEY]
    now_ms = _now_ms(request)
    inputs = (snapshot.devices, snapshot.scores, snapshot.heard)
    health: FleetHealth | None = cache.reused("fleet_health", inputs)
    if health is None or not health.holds_at(now_ms):
        health = await asyncio.to_thread(
            fleet_health,
            snapshot.devices,
            snapshot.scores,
            healthy_below=settings.healthy_below,
            anomalous_from=settings.anomalous_from,
            heard=snapshot.heard,
            now_ms=now_ms,
            silent_after_s=settings.silent_after_s,
        )
        cache.remember("fleet_health", inputs, health)
    return health


async def _fleet(request: web.Request) -> web.StreamResponse:
    session_of(request)
    settings = request.app[SETTINGS_KEY]
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    kept = cache.derived(snapshot, "fleet")
    if kept is None or not kept[1].holds_at(_now_ms(request)):
        # the device half is kept while the registry and the signals stay the same
        health = await _health(request, snapshot)
        data = await asyncio.to_thread(
            overview,
            snapshot,
            healthy_below=settings.healthy_below,
            anomalous_from=settings.anomalous_from,
            iso=_iso_ms,
            health=health,
        )
        kept = (data, health)
        cache.keep(snapshot, "fleet", kept)
    data = dict(kept[0])
    data["generated_at"] = iso(request.app[CLOCK_KEY]())
    data["scores_available"] = request.app[INFLUX_KEY] is not None
    data["silent_after_s"] = settings.silent_after_s
    return send_json(data)


async def _products(request: web.Request) -> web.StreamResponse:
    """What devices send that no product file describes, per model (diagnostics counts it).

    A model without a file is scored generically from every metric it sends; a model
    whose file misses some of its metrics has those scored the same way. Each row: the
    model, whether a file describes it, the count (readings without a file, or values
    of unlisted metrics), the metrics concerned, the devices of the model in the
    registry and when it was last counted.
    """
    session_of(request)
    influx = request.app[INFLUX_KEY]
    if influx is None:
        return send_json({"available": False, "models": []})
    found, snapshot = await asyncio.gather(
        influxql.product_mismatches(influx, measurements=request.app[MEASUREMENTS_KEY]),
        request.app[CACHE_KEY].snapshot(),
    )
    devices: Counter[str] = Counter(d.model for d in snapshot.devices.values())
    return send_json(
        {
            "available": True,
            "models": [
                {
                    "model": m.model,
                    "has_file": m.has_file,
                    "count": m.count,
                    "metrics": list(m.metrics),
                    "devices": devices.get(m.model, 0),
                    "at": _iso_ms(m.at_ms),
                }
                for m in found
            ],
        }
    )


async def _devices(request: web.Request) -> web.StreamResponse:
    """Devices matching a filter (model, firmware, batch, state, an id prefix), worst first."""
    session_of(request)
    query = request.query
    try:
        limit = min(max(int(query.get("limit", "100")), 1), 1000)
    except ValueError as exc:
        raise InvalidRequestError("limit must be a number") from exc
    wanted_state = query.get("state")
    if wanted_state is not None and wanted_state not in LEVELS:
        raise InvalidRequestError(f"state is one of {', '.join(LEVELS)}")
    snapshot = await request.app[CACHE_KEY].snapshot()
    levels = (await _health(request, snapshot)).levels
    prefix = query.get("q", "")
    rows: list[tuple[float, dict[str, Any]]] = []
    for device in snapshot.devices.values():
        if any(
            query.get(name) is not None and query.get(name) != (getattr(device, name) or "unknown")
            for name in ("model", "firmware", "batch")
        ):
            continue
        if prefix and not device.device_id.startswith(prefix):
            continue
        level = levels.get(device.device_id, "unknown")
        if wanted_state is not None and level != wanted_state:
            continue
        latest = snapshot.scores.get(device.device_id)
        heard = snapshot.heard.get(device.device_id)
        row = {
            "device_id": device.device_id,
            "model": device.model,
            "firmware": device.firmware,
            "batch": device.batch,
            "score": None if latest is None else round(latest[1], 4),
            "state": level,
            "last_heard_at": None if heard is None else _iso_ms(heard),
        }
        rows.append((-1.0 if latest is None else latest[1], row))
    rows.sort(key=lambda item: (-item[0], item[1]["device_id"]))
    return send_json({"total": len(rows), "devices": [row for _, row in rows[:limit]]})


def _time_range(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    query = request.query
    settings = request.app[SETTINGS_KEY]
    if "start" in query or "end" in query:
        try:
            start = datetime.fromisoformat(query["start"])
            end = datetime.fromisoformat(query["end"]) if "end" in query else now
        except (KeyError, ValueError) as exc:
            raise InvalidRequestError("start and end are ISO 8601 times with a zone") from exc
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidRequestError("start and end need a time zone (UTC: 'Z' or '+00:00')")
        start, end = start.astimezone(UTC), end.astimezone(UTC)
    else:
        span = _RANGES.get(query.get("range", "24h"))
        if span is None:
            raise InvalidRequestError(f"range is one of {', '.join(_RANGES)}")
        start, end = now - span, now
    if end <= start:
        raise InvalidRequestError("the range must end after it starts")
    if end - start > timedelta(days=settings.max_range_days):
        raise InvalidRequestError(f"a range is at most {settings.max_range_days} days")
    return start, end


def _marks(
    audits: Mapping[str, Sequence[AuditEntry]],
    events: Sequence[dict[str, Any]],
    cases: Sequence[Case],
    start: datetime,
    end: datetime,
) -> list[dict[str, Any]]:
    """Diagnoses, commands, case steps and device events in ``[start, end)``, by time."""
    marks: list[dict[str, Any]] = []
    for case_id, trail in audits.items():
        for entry in trail:
            if not start <= entry.at < end:
                continue
            if entry.action == "transition" and entry.to_state == "opened":
                kind, label = "diagnosis", entry.reason
            elif entry.action in ("command", "command_result", "command_skipped"):
                kind, label = "command", entry.reason
            elif entry.action == "transition":
                kind, label = "case", f"{entry.from_state} → {entry.to_state}"
            else:
                continue
            marks.append(
                {"at_ms": int(entry.at.timestamp() * 1000), "kind": kind, "label": label,
                 "case_id": case_id}
            )  # fmt: skip
    for event in events:
        kind = "command" if event.get("command_id") else "event"
        label = str(event.get("kind"))
        if event.get("code"):
            label += f" {event['code']}"
        if event.get("ok") is not None:
            label += " ok" if event["ok"] else " failed"
        marks.append({"at_ms": event["at_ms"], "kind": kind, "label": label, "case_id": None})
    for case in cases:
        if case.is_open and case.failure_at is not None:
            marks.append(
                {"at_ms": int(case.failure_at.timestamp() * 1000), "kind": "failure",
                 "label": f"predicted {case.fault} failure", "case_id": case.case_id}
            )  # fmt: skip
    marks.sort(key=lambda m: m["at_ms"])
    return marks


async def _device(request: web.Request) -> web.StreamResponse:
    session_of(request)
    app = request.app
    store = app[STORE_KEY]
    device_id = request.match_info["device_id"]
    device = await store.get_device(device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id}")
    now = app[CLOCK_KEY]()
    start, end = _time_range(request, now)
    influx = app[INFLUX_KEY]
    measurements = app[MEASUREMENTS_KEY]
    cases = await store.cases(device_id=device_id, limit=50)
    recent = cases[:20]
    trails, secrets = await asyncio.gather(
        asyncio.gather(*(store.audit(c.case_id) for c in recent)),
        owner_secrets(store, device.owner_id),
    )
    audits = {case.case_id: trail for case, trail in zip(recent, trails, strict=True)}
    series: influxql.DeviceSeries | None = None
    events: list[dict[str, Any]] = []
    signals = influxql.DeviceSignals(scores={}, heard={}, boots={})
    if influx is not None:
        series, events, signals = await asyncio.gather(
            influxql.device_series(
                influx,
                device_id,
                start,
                end,
                max_points=app[SETTINGS_KEY].max_points,
                measurements=measurements,
            ),
            influxql.device_events(influx, device_id, start, end, measurements=measurements),
            # its newest score, reading and boot: this device's only, not the fleet's
            influxql.device_signals(
                influx,
                readings_since=now - timedelta(seconds=heard_window_s(app[SETTINGS_KEY])),
                measurements=measurements,
                device_id=device_id,
            ),
        )
    marks = _marks(audits, events, cases, start, end)
    for mark in marks:
        mark["label"] = mask_secrets(mark["label"], secrets)
    # the firmware its newest boot event names, when it has one; its level and last word
    boot = signals.boots.get(device_id)
    heard = signals.heard.get(device_id)
    settings = app[SETTINGS_KEY]
    level = fleet_health(
        {device_id: device},
        signals.scores,
        healthy_below=settings.healthy_below,
        anomalous_from=settings.anomalous_from,
        heard=signals.heard,
        now_ms=int(now.timestamp() * 1000),
        silent_after_s=settings.silent_after_s,
    ).levels[device_id]
    return send_json(
        {
            "device": {
                "device_id": device.device_id,
                "model": device.model,
                "firmware": device.firmware if boot is None else boot[1],
                "firmware_from": "registry" if boot is None else "boot event",
                "firmware_reported_at": None if boot is None else _iso_ms(boot[0]),
                "batch": device.batch,
                "state": level,
                "last_heard_at": None if heard is None else _iso_ms(heard),
            },
            "range": {
                "start": iso(start),
                "end": iso(end),
                "bucket_s": None if series is None else series.bucket_s,
                "max_points": app[SETTINGS_KEY].max_points,
            },
            "telemetry": None
            if series is None
            else {"times_ms": series.times_ms, "metrics": series.metrics},
            "score": None
            if series is None
            else {
                "times_ms": series.score_times_ms,
                "score": series.score,
                "score_max": series.score_max,
                "baseline": series.baseline,
            },
            "events": [
                {k: mask_secrets(v, secrets) if isinstance(v, str) else v for k, v in e.items()}
                for e in events
            ],
            "marks": marks,
            "cases": [case_json(c) for c in cases],
        }
    )


#: Most buckets of the fleet's health over time (the page draws one point per bucket).
_CHART_POINTS: Final = 100


_HEALTH_COLUMNS: Final = ("time", *LEVELS)


def _chart_days(request: web.Request, default: int) -> int:
    raw = request.query.get("days", str(default))
    try:
        days = int(raw)
    except ValueError as exc:
        raise InvalidRequestError("days must be a whole number") from exc
    if not 1 <= days <= 730:
        raise InvalidRequestError("days is from 1 to 730")
    return days


async def _health_chart(request: web.Request) -> charts.Table:
    """Devices per level in each bucket of a range (``range=24h``, or ``start``/``end``).

    Each bucket holds the mean over the counted steps in it (:mod:`dashboard.history`);
    a bucket is never narrower than a step. ``pending``: steps still being counted (the
    page asks again until there are none).
    """
    app = request.app
    settings, history = app[SETTINGS_KEY], app[HISTORY_KEY]
    start, end = _time_range(request, app[CLOCK_KEY]())
    width_s = max(influxql.bucket_s(start, end, _CHART_POINTS), STEP_S)
    meta = {
        "start": iso(start),
        "end": iso(end),
        "bucket_s": width_s,
        "step_s": STEP_S,
        "silent_after_s": settings.silent_after_s,
        "available": history is not None,
    }
    if history is None:
        return charts.Table("fleet-health", _HEALTH_COLUMNS, [], {**meta, "pending": 0})
    steps, pending = await history.counts(start, end)
    rows = [
        (_iso_ms(bucket), *means)
        for bucket, means in bucketed(steps, int(start.timestamp() * 1000), width_s * 1000)
    ]
    return charts.Table("fleet-health", _HEALTH_COLUMNS, rows, {**meta, "pending": pending})


async def _cases_chart(request: web.Request) -> charts.Table:
    """Cases opened and resolved per day, with the median time to resolution."""
    days = _chart_days(request, 30)
    cache = request.app[CACHE_KEY]
    today = request.app[CLOCK_KEY]().astimezone(UTC).date()
    snapshot = await cache.snapshot()
    key = ("chart", "cases", days, today)
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        resolved_at = await cache.resolved_at(snapshot.cases)
        rows = await asyncio.to_thread(
            stats.cases_by_day,
            snapshot.cases,
            resolved_at,
            start=today - timedelta(days=days - 1),
            end=today,
        )
        table = charts.Table.of(
            "cases", ("day", "opened", "resolved", "median_resolution_h"), rows, {"days": days}
        )
        cache.keep(snapshot, key, table)
    return table


async def _fixes_chart(request: web.Request) -> charts.Table:
    """Per day: resolutions, the share fixed remotely, ratings and their mean."""
    days = _chart_days(request, 30)
    cache = request.app[CACHE_KEY]
    today = request.app[CLOCK_KEY]().astimezone(UTC).date()
    snapshot = await cache.snapshot()
    key = ("chart", "fixes", days, today)
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        ratings, visited = await cache.outcome_records()
        resolved_at = await cache.resolved_at(snapshot.cases)
        rows = await asyncio.to_thread(
            stats.fixes_by_day,
            snapshot.cases,
            resolved_at,
            visited,
            ratings,
            start=today - timedelta(days=days - 1),
            end=today,
        )
        columns = ("day", "resolved", "fixed_remotely", "fixed_remotely_share", "ratings",
                   "mean_stars")  # fmt: skip
        table = charts.Table.of("fixes", columns, rows, {"days": days})
        cache.keep(snapshot, key, table)
    return table


async def _failures_chart(request: web.Request) -> charts.Table:
    """The share of devices of each firmware and batch with a case (``days=0``: all time)."""
    since = since_param(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("chart", "failure-rates", request.query.get("days", "0"))
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        rows = await asyncio.to_thread(
            stats.failure_rates, snapshot.devices.values(), snapshot.cases, since=since
        )
        columns = ("dimension", "model", "group", "devices", "failed", "failure_rate")
        table = charts.Table.of("failure-rates", columns, rows, {"since": iso(since)})
        cache.keep(snapshot, key, table)
    return table


_CHART_TABLES: Final[dict[str, Callable[[web.Request], Awaitable[charts.Table]]]] = {
    "fleet-health": _health_chart,
    "cases": _cases_chart,
    "fixes": _fixes_chart,
    "failure-rates": _failures_chart,
}


async def _chart(request: web.Request) -> web.StreamResponse:
    """``GET /ops/api/charts/{name}``: its data as JSON, or CSV (``.csv``, ``?format=csv``)."""
    session_of(request)
    raw = request.match_info["chart"]
    name = raw.removesuffix(".csv")
    wanted = request.query.get("format", "csv" if raw.endswith(".csv") else "json")
    if wanted not in ("json", "csv"):
        raise InvalidRequestError("format is json or csv")
    build = _CHART_TABLES.get(name)
    if build is None:
        raise NotFoundError(f"no chart {name}; charts: {', '.join(charts.CHARTS)}")
    table = await build(request)
    if wanted == "json":
        return send_json(table.as_json())
    filename = charts.csv_filename(name, request.app[CLOCK_KEY]())
    return web.Response(
        body=charts.to_csv(table),
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


#: This module's part of the JSON API: method, path, handler (each checks its role).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/ops/api/fleet", _fleet),
    ("GET", "/ops/api/devices", _devices),
    ("GET", "/ops/api/products", _products),
    ("GET", "/ops/api/devices/{device_id}", _device),
    ("GET", "/ops/api/charts/{chart}", _chart),
)
