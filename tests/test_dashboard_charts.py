"""The dashboard's charts, silent devices and firmware from boot events.

Unit tests of the aggregations on known seeds (health over time, cases and fixes per
day, failure rates, the silent level, boot firmware, CSV), then the routes against a
real SQLite case store and a real influxd: every chart needs a session, its CSV is the
same table as its JSON, boot events written the way the gateway writes them set the
firmware the overview, insight and device page show, and a registry larger than the
running fleet shows its other devices as silent.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import SecretStr
from test_dashboard import (
    NOW,
    ClientFactory,
    Clock,
    CountingStore,
    World,
    login,
    make_case,
    make_world,
    ops_users,
    seed_fleet,
)

from dashboard.app import create_app
from dashboard.charts import CHARTS, Table, csv_filename, to_csv
from dashboard.fleet import with_boot_firmware
from dashboard.health import LEVELS, fleet_health, health_level, health_timeline
from dashboard.history import HealthHistory, bucketed
from dashboard.keys import HISTORY_KEY
from dashboard.settings import DashboardSettings
from dashboard.stats import cases_by_day, failure_rates, fixes_by_day
from fixloop.stack import InfluxdServer
from notifier.model import DeviceRecord, Rating
from notifier.sqlite import SqliteStore
from notifier.store import CaseStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import event_to_line, point_line
from wire.protocol import Event

MIN_MS = 60_000
NOW_MS = int(NOW.timestamp() * 1000)


# -- the silent level ----------------------------------------------------------------------


def _registry(n: int) -> dict[str, DeviceRecord]:
    return {f"d{i}": DeviceRecord(f"d{i}", "o", "m", "1.0", batch="B1") for i in range(n)}


def test_a_device_not_heard_from_is_silent_whatever_its_last_score() -> None:
    devices = _registry(5)
    scores = {
        "d0": (NOW_MS - 2 * MIN_MS, 0.1),  # heard 2 min ago: healthy
        "d1": (NOW_MS - 60 * MIN_MS, 0.9),  # an hour ago, anomalous then: silent now
        "d2": (NOW_MS - 60 * MIN_MS, 0.1),  # an hour ago, healthy then: silent now
        "d3": (NOW_MS - 60 * MIN_MS, 0.4),  # scored an hour ago, a reading 1 min ago: watch
    }
    heard = {"d0": NOW_MS - 2 * MIN_MS, "d1": NOW_MS - 60 * MIN_MS, "d2": NOW_MS - 60 * MIN_MS}
    heard["d3"] = NOW_MS - 1 * MIN_MS
    health = fleet_health(
        devices,
        scores,
        healthy_below=0.3,
        anomalous_from=0.5,
        heard=heard,
        now_ms=NOW_MS,
        silent_after_s=900,
    )
    assert health.levels == {
        "d0": "healthy",
        "d1": "silent",
        "d2": "silent",
        "d3": "watch",
        "d4": "unknown",  # never heard from
    }
    assert dict(health.health) == {
        "healthy": 1,
        "watch": 1,
        "anomalous": 0,
        "silent": 2,
        "unknown": 1,
    }
    assert health.groups["model"][("m",)]["silent"] == 2
    # the worst list leaves out the silent device's stale score
    assert [device for _, _, device in health.worst] == ["d3"]
    # the counts hold until the first heard device passes the threshold: d0 at +13 min
    assert health.valid_until_ms == NOW_MS - 2 * MIN_MS + 900_000 + 1
    assert health.holds_at(NOW_MS + 12 * MIN_MS)
    assert not health.holds_at(NOW_MS + 13 * MIN_MS + 1)
    later = fleet_health(
        devices,
        scores,
        healthy_below=0.3,
        anomalous_from=0.5,
        heard=heard,
        now_ms=NOW_MS + 13 * MIN_MS + 1,
        silent_after_s=900,
    )
    assert later.health["silent"] == 3
    # without what was heard (no InfluxDB) nobody is silent, as before
    blind = fleet_health(devices, scores, healthy_below=0.3, anomalous_from=0.5)
    assert blind.health["silent"] == 0
    assert blind.valid_until_ms is None


def test_boot_firmware_replaces_the_registry_firmware_only_where_it_differs() -> None:
    registry = _registry(3)
    assert with_boot_firmware(registry, {"d0": (1, "1.0")}) is registry  # nothing new
    assert with_boot_firmware(registry, {}) is registry
    updated = with_boot_firmware(registry, {"d1": (5, "2.0"), "ghost": (5, "9.9")})
    assert updated is not registry
    assert list(updated) == ["d0", "d1", "d2"]  # the registry's order, no unknown device
    assert updated["d1"].firmware == "2.0"
    assert updated["d0"] is registry["d0"]
    assert registry["d1"].firmware == "1.0"  # left as it was


# -- health over time ----------------------------------------------------------------------


def _reference_timeline(
    starts: list[int],
    width: int,
    points: dict[str, list[tuple[int, float]]],
    first: dict[str, int],
    devices: list[str],
    silent_after_s: float,
) -> dict[str, list[int]]:
    """The same counts bucket by bucket and device by device (the slow, plain way)."""
    counts: dict[str, list[int]] = {level: [] for level in LEVELS}
    for start in starts:
        tally = dict.fromkeys(LEVELS, 0)
        for device in devices:
            mine = [(t, s) for t, s in points.get(device, []) if t <= start]
            heard = min([first.get(device, 10**18), *(t for t, _ in points.get(device, []))])
            if mine and start - mine[-1][0] < silent_after_s * 1000:
                tally[health_level(mine[-1][1], 0.3, 0.5)] += 1
            elif heard < start + width:
                tally["silent"] += 1
            else:
                tally["unknown"] += 1
        for level in LEVELS:
            counts[level].append(tally[level])
    return counts


def test_health_timeline_on_a_known_seed() -> None:
    width = 10 * MIN_MS
    starts = [NOW_MS + i * width for i in range(6)]
    points = {
        # reports every 20 min: held through the bucket between its scores
        "a": [(starts[0], 0.1), (starts[2], 0.4), (starts[4], 0.9)],
        # one score, then nothing: held for 30 min (three buckets), then silent
        "b": [(starts[1], 0.2)],
        # heard before the range (first score long ago), nothing in it: silent throughout
        "c": [],
        # first heard in bucket 3
        "d": [(starts[3], 0.6)],
        # not in the registry: not counted
        "x": [(starts[0], 0.9)],
    }
    first = {"a": starts[0], "b": starts[1], "c": NOW_MS - 86_400_000, "d": starts[3]}
    devices = ["a", "b", "c", "d", "e"]  # e: never heard from
    counts = health_timeline(
        starts,
        width,
        points,
        first,
        devices,
        healthy_below=0.3,
        anomalous_from=0.5,
        silent_after_s=1800,
    )
    assert counts == {
        "healthy": [1, 2, 1, 1, 0, 0],
        "watch": [0, 0, 1, 1, 0, 0],
        "anomalous": [0, 0, 0, 1, 2, 2],
        "silent": [1, 1, 1, 1, 2, 2],
        "unknown": [3, 2, 2, 1, 1, 1],
    }
    for i in range(len(starts)):
        assert sum(counts[level][i] for level in LEVELS) == len(devices)
    # with a threshold shorter than a bucket, a bucket without a score is silent
    short = health_timeline(
        starts,
        width,
        points,
        first,
        devices,
        healthy_below=0.3,
        anomalous_from=0.5,
        silent_after_s=60,
    )
    assert short["silent"] == [1, 2, 2, 3, 3, 4]
    assert short == _reference_timeline(starts, width, points, first, devices, 60)
    empty = health_timeline(
        [],
        width,
        points,
        first,
        devices,
        healthy_below=0.3,
        anomalous_from=0.5,
        silent_after_s=60,
    )
    assert empty == {level: [] for level in LEVELS}


def test_health_timeline_matches_counting_every_bucket_and_device() -> None:
    rng = random.Random(11)
    width = 5 * MIN_MS
    starts = [NOW_MS + i * width for i in range(40)]
    devices = [f"d{i}" for i in range(60)]
    points: dict[str, list[tuple[int, float]]] = {}
    first: dict[str, int] = {}
    for device in devices:
        if rng.random() < 0.1:
            continue  # never heard from
        every = rng.choice((1, 2, 3, 7))
        begin, end = sorted(rng.sample(range(-5, 45), 2))
        points[device] = [
            (starts[0] + k * width, round(rng.random(), 2))
            for k in range(begin, end, every)
            if 0 <= k < len(starts)
        ]
        first[device] = starts[0] + begin * width
    for silent_after_s in (60, 300, 900, 1200, 3600):
        counts = health_timeline(
            starts,
            width,
            points,
            first,
            devices,
            healthy_below=0.3,
            anomalous_from=0.5,
            silent_after_s=silent_after_s,
        )
        assert counts == _reference_timeline(starts, width, points, first, devices, silent_after_s)


# -- cases, fixes, failure rates ---------------------------------------------------------


def _device(i: int, model: str, firmware: str | None, batch: str | None) -> DeviceRecord:
    return DeviceRecord(f"d{i}", "o", model, firmware, batch=batch)


DAY0 = datetime(2024, 5, 10, tzinfo=UTC)


def test_cases_and_fixes_per_day_on_a_known_seed() -> None:
    dev = _device(1, "m", "1.0", "B1")

    def case(cid: str, state: Any, opened: datetime, **kw: Any) -> Any:
        return make_case(cid, dev, "f", state, opened_at=opened, **kw)

    cases = [
        case("a", "resolved", DAY0 + timedelta(hours=1)),  # resolved same day, 2 h
        case("b", "resolved", DAY0 + timedelta(hours=5), appointment_id="ap"),  # 30 h
        case("c", "resolved", DAY0 + timedelta(days=1, hours=2)),  # 4 h, visited
        case("d", "opened", DAY0 + timedelta(days=2)),
        case("e", "resolved", DAY0 - timedelta(days=3)),  # opened before, resolved day 2
        case("f", "resolved", DAY0 - timedelta(days=9)),  # both before the range
    ]
    resolved_at = {
        "a": DAY0 + timedelta(hours=3),
        "b": DAY0 + timedelta(days=1, hours=11),
        "c": DAY0 + timedelta(days=1, hours=6),
        "e": DAY0 + timedelta(days=2, hours=1),
        "f": DAY0 - timedelta(days=8),
    }
    start, end = date(2024, 5, 10), date(2024, 5, 13)
    rows = cases_by_day(cases, resolved_at, start=start, end=end)
    assert rows == [
        {"day": "2024-05-10", "opened": 2, "resolved": 1, "median_resolution_h": 2.0},
        {"day": "2024-05-11", "opened": 1, "resolved": 2, "median_resolution_h": 17.0},
        {"day": "2024-05-12", "opened": 1, "resolved": 1, "median_resolution_h": 121.0},
        {"day": "2024-05-13", "opened": 0, "resolved": 0, "median_resolution_h": None},
    ]
    ratings = [
        Rating("a", 5, None, False, DAY0 + timedelta(hours=4)),
        Rating("b", 2, None, False, DAY0 + timedelta(days=1, hours=12)),
        Rating("c", 4, None, False, DAY0 + timedelta(days=1, hours=13)),
        Rating("f", 1, None, False, DAY0 - timedelta(days=7)),  # before the range
    ]
    fixes = fixes_by_day(cases, resolved_at, {"c"}, ratings, start=start, end=end)
    assert fixes == [
        {"day": "2024-05-10", "resolved": 1, "fixed_remotely": 1, "fixed_remotely_share": 1.0,
         "ratings": 1, "mean_stars": 5.0},
        {"day": "2024-05-11", "resolved": 2, "fixed_remotely": 0, "fixed_remotely_share": 0.0,
         "ratings": 2, "mean_stars": 3.0},
        {"day": "2024-05-12", "resolved": 1, "fixed_remotely": 1, "fixed_remotely_share": 1.0,
         "ratings": 0, "mean_stars": None},
        {"day": "2024-05-13", "resolved": 0, "fixed_remotely": 0,
         "fixed_remotely_share": None, "ratings": 0, "mean_stars": None},
    ]  # fmt: skip


def test_failure_rates_per_firmware_and_batch() -> None:
    devices = [
        _device(0, "fridge", "1.0", "B1"),
        _device(1, "fridge", "1.0", "B2"),
        _device(2, "fridge", "2.0", "B1"),
        _device(3, "fridge", "2.0", "B1"),
        _device(4, "washer", "1.0", None),  # same version, another model: its own group
    ]
    by_id = {d.device_id: d for d in devices}
    cases = [
        make_case("c1", by_id["d2"], "f", "resolved", opened_at=NOW - timedelta(days=1)),
        make_case("c2", by_id["d2"], "g", "opened", opened_at=NOW - timedelta(days=2)),
        make_case("c3", by_id["d3"], "f", "opened", opened_at=NOW - timedelta(days=40)),
        make_case("c4", by_id["d0"], "f", "dismissed", opened_at=NOW - timedelta(days=1)),
        make_case("c5", by_id["d4"], "f", "opened", opened_at=NOW - timedelta(days=1)),
    ]
    rows = failure_rates(devices, cases)
    table = {(r["dimension"], r["model"], r["group"]): (r["failed"], r["devices"]) for r in rows}
    assert table == {
        ("firmware", "fridge", "1.0"): (0, 2),  # d0's only case was dismissed
        ("firmware", "fridge", "2.0"): (2, 2),  # d2 counts once for its two cases
        ("firmware", "washer", "1.0"): (1, 1),
        ("batch", "fridge", "B1"): (2, 3),
        ("batch", "fridge", "B2"): (0, 1),
        ("batch", "washer", "unknown"): (1, 1),
    }
    assert [r["dimension"] for r in rows] == ["firmware"] * 3 + ["batch"] * 3
    assert next(r for r in rows if r["group"] == "B1")["failure_rate"] == round(2 / 3, 4)
    recent = failure_rates(devices, cases, since=NOW - timedelta(days=30))
    assert {(r["group"], r["failed"]) for r in recent if r["dimension"] == "firmware"} == {
        ("1.0", 0),
        ("2.0", 1),  # d3's case is older than 30 days
        ("1.0", 1),
    }


def test_csv_has_a_header_quotes_and_defuses_formulas() -> None:
    table = Table.of(
        "failure-rates",
        ("group", "devices", "rate", "note"),
        [
            {"group": "B1", "devices": 3, "rate": 0.5, "note": None},
            {"group": '=HYPERLINK("x")', "devices": 1, "rate": -0.25, "note": "a, b"},
            {"group": "@SUM(A1)", "devices": 0, "rate": None, "note": 'say "hi"'},
        ],
    )
    body = to_csv(table)
    assert body.decode().split("\r\n")[0] == "group,devices,rate,note"
    assert body.endswith(b"\r\n")
    rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert rows == [
        ["group", "devices", "rate", "note"],
        ["B1", "3", "0.5", ""],
        ['\'=HYPERLINK("x")', "1", "-0.25", "a, b"],  # a negative number stays a number
        ["'@SUM(A1)", "0", "", 'say "hi"'],
    ]
    assert table.as_json()["rows"][0] == ["B1", 3, 0.5, None]
    assert csv_filename("fleet-health", NOW) == "fixloop-fleet-health-2024-05-15.csv"
    assert csv_filename('a"b/../c', NOW) == "fixloop-a-b----c-2024-05-15.csv"


# -- routes -------------------------------------------------------------------------------


async def _write(influx: InfluxClient, lines: list[bytes]) -> None:
    outcome = await influx.write(lines)
    assert not outcome.rejected


def _score(device: str, score: float, at: datetime) -> bytes:
    return point_line(
        "health",
        {"device": device},
        {"score": score, "baseline": 0.1, "fleet": 0.1},
        int(at.timestamp() * 1000),
    )


def _reading(device: str, seq: int, at: datetime) -> bytes:
    return point_line(
        "telemetry", {"device": device}, {"temp_c": 4.0, "seq": seq}, int(at.timestamp() * 1000)
    )


def _boot(device: str, firmware: str, at: datetime, seq: int = 1) -> bytes:
    """A boot event as the gateway stores it (the simulator's firmware says its version)."""
    event = Event(
        device_id=device,
        seq=seq,
        ts_ms=int(at.timestamp() * 1000),
        kind="boot",
        code=firmware,
        data={"firmware": firmware, "reset_reason": "firmware_update"},
    )
    return event_to_line(event)


async def counted(client: Any, path: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """A chart once no step of it is pending (the fleet health is counted behind)."""
    async with asyncio.timeout(timeout_s):
        while True:
            data: dict[str, Any] = await (await client.get(path)).json()
            if data.get("pending", 0) == 0:
                return data
            await asyncio.sleep(0.05)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "cases.db") as opened:
        yield opened


@pytest.fixture
async def influx(influxd: InfluxdServer) -> AsyncIterator[InfluxClient]:
    settings = InfluxSettings(url=influxd.url, database=f"charts_{uuid.uuid4().hex[:10]}")
    async with InfluxClient(settings) as client:
        await client.ensure_database()
        yield client


@pytest.fixture
async def world(aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient) -> World:
    return await make_world(aiohttp_client, store, influx, cache_s=0)


async def test_every_chart_needs_a_session_as_json_and_as_csv(world: World) -> None:
    client = world.client
    for name in CHARTS:
        for path in (
            f"/ops/api/charts/{name}",
            f"/ops/api/charts/{name}.csv",
            f"/ops/api/charts/{name}?format=csv",
        ):
            resp = await client.get(path)
            assert resp.status == 401, path
            assert resp.headers["Content-Type"].startswith("application/json")
            assert (await resp.json())["error"] == "log in first"
    await login(client, "vera")
    for name in CHARTS:
        resp = await client.get(f"/ops/api/charts/{name}")
        assert resp.status == 200, name
        # the dashboard's security headers apply to chart answers and downloads alike
        resp = await client.get(f"/ops/api/charts/{name}.csv")
        assert resp.status == 200, name
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.get("/ops/api/charts/nothing")).status == 404
    assert (await client.get("/ops/api/charts/cases?format=xml")).status == 422
    assert (await client.get("/ops/api/charts/cases?days=0")).status == 422
    assert (await client.get("/ops/api/charts/fleet-health?range=2y")).status == 422


async def test_chart_csv_is_the_json_table_with_a_header_row(world: World) -> None:
    await login(world.client, "vera")
    for name, query in (
        ("cases", "?days=7"),
        ("fixes", "?days=7"),
        ("failure-rates", ""),
        ("fleet-health", "?range=6h"),
    ):
        data = await counted(world.client, f"/ops/api/charts/{name}{query}")
        assert data["chart"] == name
        for path in (
            f"/ops/api/charts/{name}.csv{query}",
            f"/ops/api/charts/{name}{query}{'&' if query else '?'}format=csv",
        ):
            resp = await world.client.get(path)
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
            assert resp.headers["Content-Disposition"] == (
                f'attachment; filename="fixloop-{name}-2024-05-15.csv"'
            )
            assert resp.headers["Cache-Control"] == "no-store"
            rows = list(csv.reader(io.StringIO(await resp.text(), newline="")))
            assert rows[0] == data["columns"]
            expected = [["" if v is None else str(v) for v in row] for row in data["rows"]]
            assert rows[1:] == expected
        assert data["rows"], name  # every chart has something to say about the seed


async def test_cases_fixes_and_failure_charts_from_the_seed(world: World) -> None:
    await login(world.client, "vera")
    cases = await (await world.client.get("/ops/api/charts/cases?days=7")).json()
    assert cases["columns"] == ["day", "opened", "resolved", "median_resolution_h"]
    by_day = {row[0]: row for row in cases["rows"]}
    assert list(by_day) == [(date(2024, 5, 9) + timedelta(days=i)).isoformat() for i in range(7)]
    # the seed: 11 stall cases opened 5 days ago (minus n hours), the rated case 2 days
    # ago, the booked one yesterday; the rated case resolved 26 h after opening
    assert sum(row[1] for row in cases["rows"]) == 13
    assert by_day["2024-05-13"][1] == 1
    assert by_day["2024-05-14"][1:] == [1, 1, 26.0]
    fixes = await (await world.client.get("/ops/api/charts/fixes?days=7")).json()
    rows = {row[0]: dict(zip(fixes["columns"], row, strict=True)) for row in fixes["rows"]}
    assert rows["2024-05-14"]["fixed_remotely_share"] == 1.0
    assert rows["2024-05-14"]["ratings"] == 1
    assert rows["2024-05-14"]["mean_stars"] == 2.0
    failures = await (await world.client.get("/ops/api/charts/failure-rates")).json()
    table = {(r[0], r[1], r[2]): r[3:] for r in failures["rows"]}
    # the seed's cluster: every fridge on 1.5.2 had a compressor stall
    assert table[("firmware", "fridge-a1", "1.5.2")] == [10, 10, 1.0]
    assert table[("firmware", "washer-w3", "3.0.1")] == [20, 1, 0.05]


async def test_boot_events_set_the_firmware_everywhere(world: World) -> None:
    assert world.influx is not None
    # a firmware update on two fridges that were on 1.4.0: each says 1.6.0 when it boots
    await _write(
        world.influx,
        [
            _boot("dev-0000", "1.4.0", NOW - timedelta(days=3), seq=1),
            _boot("dev-0000", "1.6.0", NOW - timedelta(hours=2), seq=50),
            _boot("dev-0004", "1.6.0", NOW - timedelta(hours=1)),
            _boot("dev-0002", "1.5.2", NOW - timedelta(hours=1)),  # as the registry says
            _score("dev-0000", 0.1, NOW - timedelta(minutes=1)),
        ],
    )
    await login(world.client, "ada")
    fleet = await (await world.client.get("/ops/api/fleet")).json()
    firmware = {(r["model"], r["firmware"]): r["devices"] for r in fleet["by_firmware"]}
    assert firmware[("fridge-a1", "1.6.0")] == 2
    assert firmware[("fridge-a1", "1.4.0")] == 8
    assert firmware[("fridge-a1", "1.5.2")] == 10
    device = (await (await world.client.get("/ops/api/devices/dev-0000")).json())["device"]
    assert device["firmware"] == "1.6.0"
    assert device["firmware_from"] == "boot event"
    assert device["firmware_reported_at"] == (NOW - timedelta(hours=2)).isoformat()
    assert device["state"] == "healthy"
    assert device["last_heard_at"] == (NOW - timedelta(minutes=1)).isoformat()
    listing = await (await world.client.get("/ops/api/devices?firmware=1.6.0")).json()
    assert [d["device_id"] for d in listing["devices"]] == ["dev-0000", "dev-0004"]
    # the by-firmware insight and outcomes see it: dev-0000's rated case is on 1.6.0 now
    insight = await (await world.client.get("/ops/api/insight")).json()
    groups = insight["flagged"] + insight["groups"]
    assert any(g["dimension"] == "firmware" and g["value"] == "1.6.0" for g in groups)
    outcomes = await (await world.client.get("/ops/api/outcomes")).json()
    assert outcomes["by_firmware"]["1.6.0"]["ratings"] == 1
    failures = await (await world.client.get("/ops/api/charts/failure-rates.csv")).text()
    assert "firmware,fridge-a1,1.6.0,2," in failures
    # a campaign for the new firmware reaches its devices
    csrf = (await (await world.client.get("/ops/api/session")).json())["csrf_token"]
    resp = await world.client.post(
        "/ops/api/campaigns",
        json={
            "fault": "compressor_stall",
            "dimension": "firmware",
            "value": "1.6.0",
            "action": "self_test",
        },
        headers={"X-CSRF-Token": csrf},
    )
    assert resp.status == 201
    assert world.campaign.calls[0][0] == ["dev-0000", "dev-0004"]


async def test_a_registry_bigger_than_the_running_fleet_shows_the_rest_as_silent(
    aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient
) -> None:
    # thirty devices ran six hours ago; six run now (``up --devices 6`` on the same data)
    seed = await seed_fleet(store, devices=30)
    ids = [d.device_id for d in seed.devices]
    lines = []
    for i, device in enumerate(ids):
        for k in range(12):
            at = NOW - timedelta(hours=8) + timedelta(minutes=10 * k)
            lines += [_score(device, 0.1, at), _reading(device, k, at)]
        if i < 6:
            for k in range(6):
                at = NOW - timedelta(minutes=60 - 10 * k)
                lines.append(_reading(device, 100 + k, at))
                # the sixth is not scored lately (its readings still say it is there)
                if i < 5:
                    lines.append(_score(device, 0.1 if i else 0.7, at))
    await _write(influx, lines)
    world = await make_world(aiohttp_client, store, influx, seed=seed, cache_s=0)
    await login(world.client, "vera")
    fleet = await (await world.client.get("/ops/api/fleet")).json()
    assert fleet["devices"] == 30
    assert fleet["health"] == {
        "healthy": 5,
        "watch": 0,
        "anomalous": 1,
        "silent": 24,
        "unknown": 0,
    }
    assert fleet["silent_after_s"] == 900
    assert [w["device_id"] for w in fleet["worst"]] == [ids[0]]
    assert sum(r["silent"] for r in fleet["by_model"]) == 24
    silent = await (await world.client.get("/ops/api/devices?state=silent&limit=100")).json()
    assert silent["total"] == 24
    assert {d["device_id"] for d in silent["devices"]} == set(ids[6:])
    assert all(d["state"] == "silent" for d in silent["devices"])
    assert (
        silent["devices"][0]["last_heard_at"]
        == (NOW - timedelta(hours=8) + timedelta(minutes=110)).isoformat()
    )
    healthy = await (await world.client.get("/ops/api/devices?state=healthy")).json()
    assert {d["device_id"] for d in healthy["devices"]} == set(ids[1:6])
    assert (await world.client.get("/ops/api/devices?state=asleep")).status == 422

    # over the last day (15-minute buckets): all thirty healthy seven hours ago, all
    # silent once the old run's scores are 15 min behind, five back an hour ago (over
    # time a device counts as heard when it is scored, so the sixth stays silent)
    chart = await counted(world.client, "/ops/api/charts/fleet-health?range=24h")
    assert chart["columns"] == ["time", *LEVELS]
    assert chart["bucket_s"] == 900
    rows = {row[0]: dict(zip(chart["columns"], row, strict=True)) for row in chart["rows"]}
    for row in rows.values():
        assert sum(row[level] for level in LEVELS) == pytest.approx(30, abs=0.2)

    def at(delta: timedelta) -> dict[str, Any]:
        start = NOW + delta
        key = datetime.fromtimestamp(int(start.timestamp()) // 900 * 900, UTC).isoformat()
        return rows[key]

    assert at(timedelta(hours=-12))["unknown"] == 30  # before anybody was scored
    assert at(timedelta(hours=-7))["healthy"] == 30
    assert at(timedelta(hours=-3))["silent"] == 30
    assert at(timedelta(minutes=-30)) == {
        "time": at(timedelta(minutes=-30))["time"],
        "healthy": 4,
        "watch": 0,
        "anomalous": 1,
        "silent": 25,
        "unknown": 0,
    }


# -- the fleet's health over time is counted once per step --------------------------------


def test_steps_merge_into_chart_buckets_as_means() -> None:
    step = 300_000
    counts = {
        NOW_MS + 0 * step: (3, 0, 0, 1, 0),
        NOW_MS + 1 * step: (2, 1, 0, 1, 0),
        NOW_MS + 2 * step: (2, 1, 0, 1, 0),
        NOW_MS + 3 * step: (0, 0, 4, 0, 0),
        NOW_MS - 1 * step: (4, 0, 0, 0, 0),  # before the range's first bucket
    }
    assert bucketed(counts, NOW_MS, 3 * step) == [
        (NOW_MS, (2.3, 0.7, 0.0, 1.0, 0.0)),
        (NOW_MS + 3 * step, (0.0, 0.0, 4.0, 0.0, 0.0)),
    ]
    assert bucketed({}, NOW_MS, step) == []


def _history(app: Any) -> HealthHistory:
    history = app[HISTORY_KEY]
    assert isinstance(history, HealthHistory)
    return history


async def test_fleet_health_steps_are_counted_once_and_kept_in_influxdb(
    aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient
) -> None:
    seed = await seed_fleet(store, devices=12)
    lines = [
        _score(device.device_id, 0.1 if n % 4 else 0.8, NOW - timedelta(minutes=10 * k))
        for n, device in enumerate(seed.devices)
        for k in range(36)  # six hours, every ten minutes
    ]
    await _write(influx, lines)
    first = await make_world(aiohttp_client, store, influx, seed=seed, cache_s=0)
    await login(first.client, "vera")
    path = "/ops/api/charts/fleet-health?range=6h"
    # 6 h of 5-minute steps from 06:00, the last from 11:50: the one from 11:55 has not
    # settled (it is counted a minute after its end); more than a few missing steps are
    # counted behind the answer, which says how many are pending
    at_once = await (await first.client.get(path)).json()
    assert at_once["pending"] == 71
    assert at_once["rows"] == []
    answer = await counted(first.client, path)
    history = _history(first.client.app)
    assert history.computed == 71
    assert history.loaded == 0
    again = await (await first.client.get(path)).json()
    assert again == answer
    assert history.computed == 71  # counted once
    kept = await influx.query("SELECT * FROM fleet_health")
    assert sum(len(s.values) for s in kept) == 71
    assert history.write_failures == 0
    rows = {row[0]: row[1:] for row in answer["rows"]}
    # three buckets an hour ago: nine healthy, three anomalous, all twelve seen
    assert rows[(NOW - timedelta(hours=1)).isoformat()] == [9.0, 0.0, 3.0, 0.0, 0.0]

    # another dashboard (or this one after a restart) reads the kept steps back
    second = await make_world(aiohttp_client, store, influx, seed=seed, cache_s=0)
    await login(second.client, "vera")
    answer2 = await counted(second.client, path)
    assert answer2["rows"] == answer["rows"]
    assert _history(second.client.app).computed == 0
    assert _history(second.client.app).loaded == 71
    # half an hour on, only the steps that settled meanwhile are counted (11:55 to 12:20);
    # the devices are silent from 12:15, fifteen minutes past their last score
    second.clock.now = NOW + timedelta(minutes=30)
    later = await (await second.client.get(path)).json()
    assert later["pending"] == 0  # a few steps: counted before the answer
    assert _history(second.client.app).computed == 6
    assert later["rows"][-1][4] == 12.0  # silent


async def test_a_read_only_influxdb_user_still_gets_the_chart(
    aiohttp_client: ClientFactory, store: SqliteStore, make_influxd: Any
) -> None:
    server = make_influxd(username="admin", password="admin-secret-1")
    admin = InfluxSettings(
        url=server.url,
        database=server.database,
        username="admin",
        password=SecretStr("admin-secret-1"),
    )
    async with InfluxClient(admin) as root:
        await root.query("CREATE USER reader WITH PASSWORD 'reader-secret-2'")
        await root.query(f'GRANT READ ON "{server.database}" TO reader')
        seed = await seed_fleet(store, devices=8)
        await _write(
            root,
            [_score(d.device_id, 0.1, NOW - timedelta(minutes=8)) for d in seed.devices],
        )
    reader = InfluxSettings(
        url=server.url,
        database=server.database,
        username="reader",
        password=SecretStr("reader-secret-2"),
    )
    async with InfluxClient(reader) as influx:
        world = await make_world(aiohttp_client, store, influx, seed=seed, cache_s=0)
        await login(world.client, "vera")
        resp = await world.client.get("/ops/api/charts/fleet-health?range=1h")
        assert resp.status == 200
        data = await resp.json()
        assert data["pending"] == 0
        history = _history(world.client.app)
        assert history.write_failures >= 1  # InfluxDB refused the write: kept in memory
        assert history.computed == 11  # 11:00 to 11:50; 11:55 has not settled
        assert data["rows"][-1][1:] == [8.0, 0.0, 0.0, 0.0, 0.0]
        # and asked again, the steps come from memory: nothing counted twice
        assert (await world.client.get("/ops/api/charts/fleet-health?range=1h")).status == 200
        assert history.computed == 11  # 11:00 to 11:50; 11:55 has not settled


async def test_a_device_page_reads_its_own_signals_not_the_whole_fleet(
    aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient
) -> None:
    seed = await seed_fleet(store)
    await _write(
        influx,
        [
            _boot("dev-0003", "3.2.0", NOW - timedelta(hours=5)),
            _score("dev-0003", 0.9, NOW - timedelta(hours=2)),
            _reading("dev-0003", 7, NOW - timedelta(minutes=30)),
            _score("dev-0005", 0.4, NOW - timedelta(minutes=1)),
        ],
    )
    counting = CountingStore(store)
    app = create_app(
        store=cast(CaseStore, counting),
        influx=influx,
        actions=None,
        users=ops_users(),
        clock=Clock(),
        settings=DashboardSettings(cache_s=0),
    )
    client = await aiohttp_client(app)
    await login(client, "vera")
    device = (await (await client.get("/ops/api/devices/dev-0003")).json())["device"]
    # its last reading was half an hour ago: silent, though its last score was anomalous
    assert device["state"] == "silent"
    assert device["last_heard_at"] == (NOW - timedelta(minutes=30)).isoformat()
    assert device["firmware"] == "3.2.0"
    assert device["firmware_from"] == "boot event"
    other = (await (await client.get("/ops/api/devices/dev-0005")).json())["device"]
    assert (other["state"], other["firmware"]) == ("watch", "3.0.1")
    # neither the registry nor every case was read for it (the cache is off here)
    assert counting.calls["devices"] == 0
    assert seed.devices[3].firmware == "3.0.1"  # the registry still says the old one


async def test_steps_after_the_newest_score_are_counted_again_when_scores_arrive(
    aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient
) -> None:
    # a fleet replaying its history (``fixloop up`` at full speed): three of the last six
    # hours are in when the chart is first looked at, the rest arrives after
    seed = await seed_fleet(store, devices=6)

    def scores(first_k: int, last_k: int, value: float) -> list[bytes]:
        return [
            _score(d.device_id, value, NOW - timedelta(minutes=10 * k))
            for d in seed.devices
            for k in range(first_k, last_k + 1)
        ]

    await _write(influx, scores(18, 36, 0.1))  # 06:00 to 09:00
    world = await make_world(aiohttp_client, store, influx, seed=seed, cache_s=0)
    await login(world.client, "vera")
    path = "/ops/api/charts/fleet-health?range=6h"
    before = {row[0]: row[1:] for row in (await counted(world.client, path))["rows"]}
    at_ten = (NOW - timedelta(hours=2)).isoformat()
    assert before[at_ten] == [0.0, 0.0, 0.0, 6.0, 0.0]  # silent: nothing there yet
    history = _history(world.client.app)
    assert history.computed == 71
    # only the steps that ended before the newest score (09:00, less a minute) are kept
    kept = await influx.query("SELECT * FROM fleet_health")
    assert sum(len(s.values) for s in kept) == 35  # 06:00 to 08:50
    assert max(row[0] for s in kept for row in s.values) == int(
        (NOW - timedelta(hours=3, minutes=10)).timestamp() * 1000
    )

    await _write(influx, scores(0, 17, 0.8))  # the rest of the replay: anomalous
    after = {row[0]: row[1:] for row in (await counted(world.client, path))["rows"]}
    assert after[at_ten] == [0.0, 0.0, 6.0, 0.0, 0.0]
    assert history.computed == 71 + 36  # the provisional steps, counted again
    kept = await influx.query("SELECT * FROM fleet_health")
    assert sum(len(s.values) for s in kept) == 71
