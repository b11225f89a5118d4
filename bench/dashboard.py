"""Dashboard benchmark: API answer times for a 10,000-device fleet and a month of telemetry.

Seeds a SQLite case store with a fleet (devices, owners, cases across the lifecycle with
their audit trails, ratings, appointments, person-needed tasks) and a private influxd with
a day of anomaly scores at 10-minute resolution for every device (what the fleet-health
chart reads; one device in fifty stopped two hours ago), a boot event from every device
(a twentieth of them booted a newer firmware lately), and a month of telemetry and scores
at 10-minute resolution for a sample of devices (all 10,000 for a month would take hours
to write here; the device chart queries read one device at a time, so the sample's size
does not change their cost). Then it serves the dashboard on 127.0.0.1 and times the API
answers over repeated requests (p50/p95), each next to references measured in the same
run: the round trip of a trivial handler (``/ops/api/ping``, same login and middleware)
and the raw InfluxDB query behind the answer. Fleet-wide answers are timed with the dashboard's
cache (the default, ``cache_s=5``); with a case change before every request, written to
the store and published on the live feed as the owner loop does (a case moved to its
next state, every tenth a new case; the change itself is not timed, the dashboard
applies it to its snapshot); with a change the feed cannot describe before every request
(``CaseFeed.touch``: the store is read again each time); and with the cache off, so every
request reads the whole store (and InfluxDB). Goal: under 200 ms.

Usage::

    python bench/dashboard.py                        # 10,000 devices, 200 with a month
    python bench/dashboard.py --devices 2000 --sampled 50 --requests 30
    python bench/dashboard.py --modes default        # only the cache-on section
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
from aiohttp import web

from dashboard import influxql
from dashboard.app import create_app
from dashboard.auth import OpsUser, hash_password
from dashboard.feed import CaseFeed
from dashboard.keys import CACHE_KEY, HISTORY_KEY
from dashboard.settings import DashboardSettings
from fixloop.stack import InfluxdServer
from notifier.errors import ConflictError
from notifier.model import (
    TRANSITIONS,
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Owner,
    Rating,
    Task,
    Technician,
)
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import event_to_line, point_line
from wire.protocol import Event

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
MODELS = {
    "fridge-a1": (("1.4.0", "1.5.2", "1.6.0"), ("compressor_stall", "door_seal_leak")),
    "washer-w3": (("3.0.1", "3.1.0"), ("drum_bearing_wear", "drain_clog")),
    "oven-o2": (("2.2.0", "2.3.1", "2.4.0"), ("heater_drift",)),
}
STATES = (
    "opened",
    "remote_fix",
    "verifying",
    "booked",
    "resolved",
    "resolved",
    "resolved",
    "resolved",
    "dismissed",
    "escalated",
)
PASSWORD = "bench-admin-password"


def fleet(devices: int) -> list[DeviceRecord]:
    rng = random.Random(7)
    records = []
    names = list(MODELS)
    for i in range(devices):
        model = names[i % len(names)]
        firmware = rng.choice(MODELS[model][0])
        records.append(
            DeviceRecord(
                f"dev-{i:05d}",
                f"own-{i // 4:05d}",
                model,
                firmware,
                batch=f"{model[:1].upper()}{rng.randrange(12):02d}",
            )
        )
    return records


async def seed_store(store: SqliteStore, devices: list[DeviceRecord]) -> dict[str, int]:
    rng = random.Random(11)
    counts = {"owners": 0, "cases": 0, "audit": 0, "ratings": 0, "appointments": 0, "tasks": 0}
    for owner_id in sorted({d.owner_id for d in devices}):
        await store.put_owner(Owner(owner_id, f"Owner {owner_id}"))
        counts["owners"] += 1
    for device in devices:
        await store.put_device(device)
    for n in range(8):
        await store.put_technician(
            Technician(f"tech-{n}", f"Technician {n}", "default", frozenset({"any"}))
        )
    day = 0
    for device in devices:
        faults = MODELS[device.model][1]
        # about 30% of devices had a case; one firmware clusters compressor stalls
        chance = 0.3 + (0.4 if device.firmware == "1.5.2" else 0.0)
        if rng.random() > chance:
            continue
        fault = faults[0] if device.firmware == "1.5.2" else rng.choice(faults)
        state = rng.choice(STATES)
        opened = NOW - timedelta(days=rng.uniform(0, 60))
        resolved_after = timedelta(hours=rng.uniform(1, 96))
        visited = state == "booked" or (state == "resolved" and rng.random() < 0.25)
        case = Case(
            case_id=f"case-{counts['cases']:06d}",
            device_id=device.device_id,
            owner_id=device.owner_id,
            model=device.model,
            fault=fault,
            state=state,  # type: ignore[arg-type]
            urgency="normal",
            opened_at=opened,
            updated_at=opened + resolved_after,
            confidence=round(rng.uniform(0.5, 1.0), 2),
            remedies=("firmware_update", "technician_visit:part"),
            tried=("firmware_update",) if state != "opened" else (),
            appointment_id=f"appt-{counts['cases']}" if visited else None,
            evidence=(f"{fault} signature", "score above baseline for 3 h"),
        )
        await store.add_case(case)
        counts["cases"] += 1
        entries = [
            AuditEntry(
                case.case_id,
                opened,
                "system",
                "transition",
                f"diagnostics named {fault}",
                {},
                None,
                "opened",
            )
        ]
        if state != "opened":
            entries.append(
                AuditEntry(
                    case.case_id,
                    opened + timedelta(minutes=1),
                    "system",
                    "command",
                    "sent firmware_update",
                    {"action": "firmware_update"},
                )
            )
        if state in ("resolved", "escalated"):
            entries.append(
                AuditEntry(
                    case.case_id,
                    opened + resolved_after,
                    "system",
                    "transition",
                    "scores back at baseline",
                    {},
                    "verifying",
                    "resolved",
                )
            )
        for entry in entries:
            await store.add_audit(entry)
            counts["audit"] += 1
        if visited:
            start = NOW.replace(hour=8) + timedelta(days=day % 7 - 3, hours=(day // 7) % 8)
            day += 1
            await store.put_appointment(
                Appointment(
                    case.appointment_id or "",
                    case.case_id,
                    f"tech-{day % 8}",
                    start,
                    start + timedelta(hours=1),
                    "done" if state == "resolved" else "proposed",
                    part="part",
                )
            )
            counts["appointments"] += 1
        if state in ("resolved", "escalated") and rng.random() < 0.6:
            stars = rng.choice((5, 5, 5, 4, 4, 3, 2, 1))
            nothing_wrong = rng.random() < 0.05
            await store.add_rating(
                Rating(
                    case.case_id,
                    stars,
                    "thanks" if stars >= 4 else "still not right" if rng.random() < 0.5 else None,
                    nothing_wrong,
                    opened + resolved_after + timedelta(hours=2),
                )
            )
            counts["ratings"] += 1
            if state == "escalated":
                await store.add_task(
                    Task(
                        f"task-{case.case_id}", case.case_id, "low rating", opened + resolved_after
                    )
                )
                counts["tasks"] += 1
    return counts


async def seed_influx(
    influx: InfluxClient, devices: list[DeviceRecord], sampled: int, days: int, hours: int
) -> dict[str, int]:
    rng = random.Random(3)
    start = NOW - timedelta(days=days)
    step = timedelta(minutes=10)
    steps = int(timedelta(days=days) / step)
    written = {"telemetry": 0, "health": 0, "boots": 0}
    batch: list[bytes] = []

    async def flush() -> None:
        nonlocal batch
        if batch:
            outcome = await influx.write(batch)
            assert not outcome.rejected, outcome.rejected[:1]
            batch = []

    for device in devices[:sampled]:
        base = rng.uniform(3, 6)
        for i in range(steps):
            ts_ms = int((start + i * step).timestamp() * 1000)
            batch.append(
                point_line(
                    "telemetry",
                    {"device": device.device_id},
                    {
                        "temp_c": round(base + (i % 144) / 72 + rng.gauss(0, 0.1), 3),
                        "power_w": round(80 + rng.gauss(0, 3), 2),
                        "vibration_g": round(0.1 + rng.random() / 50, 4),
                        "door_open": i % 37 == 0,
                        "seq": i,
                    },
                    ts_ms,
                )
            )
            batch.append(
                point_line(
                    "health",
                    {"device": device.device_id},
                    {
                        "score": round(min(max(rng.gauss(0.15, 0.08), 0.0), 1.0), 4),
                        "baseline": 0.1,
                        "fleet": 0.12,
                    },
                    ts_ms,
                )
            )
            written["telemetry"] += 1
            written["health"] += 1
            if len(batch) >= 20_000:
                await flush()
    last = NOW - timedelta(minutes=1)
    for n, device in enumerate(devices[sampled:]):
        end = last - timedelta(hours=2) if n % 50 == 0 else last
        for i in range(hours * 6):
            batch.append(
                point_line(
                    "health",
                    {"device": device.device_id},
                    {"score": round(rng.betavariate(1.2, 6), 4), "baseline": 0.1, "fleet": 0.12},
                    int((end - i * step).timestamp() * 1000),
                )
            )
            written["health"] += 1
        if len(batch) >= 20_000:
            await flush()
    for n, device in enumerate(devices):
        versions = MODELS[device.model][0]
        boots = [(start, device.firmware or versions[0])]
        if n % 20 == 0:
            boots.append((NOW - timedelta(hours=3), versions[-1]))  # updated lately
        for seq, (at, firmware) in enumerate(boots):
            event = Event(device.device_id, seq, int(at.timestamp() * 1000), "boot", code=firmware)
            batch.append(event_to_line(event))
            written["boots"] += 1
        if len(batch) >= 20_000:
            await flush()
    await flush()
    return written


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(round(q * (len(ordered) - 1)), len(ordered) - 1)]


class CaseChanges:
    """Changes cases the way the owner loop does: in the store, then on the live feed."""

    def __init__(
        self, store: SqliteStore, feed: CaseFeed, cases: list[Case], devices: list[DeviceRecord]
    ) -> None:
        self.store = store
        self.feed = feed
        self.cases = {case.case_id: case for case in cases}
        self.ids = sorted(self.cases)
        self.devices = devices
        self.rng = random.Random(17)
        self.made = 0

    async def __call__(self) -> None:
        self.made += 1
        if self.made % 10 == 0:
            case = await self._open()
        else:
            case = await self._move()
        self.cases[case.case_id] = case
        self.feed.publish(case)

    def _stamp(self, after: datetime) -> datetime:
        return max(datetime.now(UTC), after) + timedelta(milliseconds=1)

    async def _move(self) -> Case:
        old = self.cases[self.rng.choice(self.ids)]
        choices = sorted(TRANSITIONS[old.state])
        state = self.rng.choice(choices) if choices else old.state
        case = replace(old, state=state, updated_at=self._stamp(old.updated_at))  # type: ignore[arg-type]
        await self.store.update_case(case, expected_state=old.state)
        if state != old.state:
            await self.store.add_audit(
                AuditEntry(
                    case.case_id,
                    case.updated_at,
                    "system",
                    "transition",
                    "bench change",
                    {},
                    old.state,
                    state,
                )
            )
        return case

    async def _open(self) -> Case:
        while True:
            device = self.rng.choice(self.devices)
            now = self._stamp(NOW)
            case = Case(
                case_id=f"case-new-{self.made:06d}",
                device_id=device.device_id,
                owner_id=device.owner_id,
                model=device.model,
                fault=self.rng.choice(MODELS[device.model][1]),
                state="opened",
                urgency="normal",
                opened_at=now,
                updated_at=now,
                confidence=0.8,
                remedies=("firmware_update", "technician_visit:part"),
            )
            try:
                await self.store.add_case(case)
            except ConflictError:
                continue  # that device has this fault open already
            self.ids.append(case.case_id)
            return case


async def timed(
    call: Callable[[], Awaitable[Any]],
    requests: int,
    before: Callable[[], Awaitable[None]] | None = None,
) -> list[float]:
    await call()  # warm: connection, first read
    samples = []
    for _ in range(requests):
        if before is not None:
            await before()  # not timed: what happens between two requests
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def row(name: str, samples: list[float], note: str = "") -> str:
    p50, p95 = statistics.median(samples), pct(samples, 0.95)
    mark = "ok " if p95 < 200 else "SLOW"
    return f"  {mark} {name:<44} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms  {note}"


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def bench(args: argparse.Namespace) -> None:
    users = {"admin": OpsUser("admin", "admin", hash_password(PASSWORD))}
    with (
        tempfile.TemporaryDirectory(prefix="fixloop-dash-bench-") as tmp,
        InfluxdServer(Path(tmp) / "influxd") as influxd,
    ):
        devices = fleet(args.devices)
        async with (
            SqliteStore(Path(tmp) / "cases.db") as store,
            InfluxClient(
                InfluxSettings(url=influxd.url, database=influxd.database, timeout_s=120)
            ) as influx,
        ):
            started = time.perf_counter()
            counts = await seed_store(store, devices)
            store_s = time.perf_counter() - started
            started = time.perf_counter()
            points = await seed_influx(influx, devices, args.sampled, args.days, args.hours)
            influx_s = time.perf_counter() - started
            print(
                f"fleet: {len(devices):,} devices, {counts['owners']:,} owners, "
                f"{counts['cases']:,} cases ({counts['audit']:,} audit entries), "
                f"{counts['ratings']:,} ratings, {counts['appointments']:,} appointments, "
                f"{counts['tasks']:,} person-needed tasks; seeded in {store_s:.1f} s"
            )
            print(
                f"telemetry: {args.days} days at 10-minute resolution for {args.sampled} "
                f"devices ({points['telemetry']:,} readings, 4 metrics each), scores "
                f"({points['health']:,}: those and {args.hours} h at 10-minute resolution "
                f"for the other devices), {points['boots']:,} boot events; "
                f"written in {influx_s:.1f} s"
            )
            print(
                f"(a month at full rate for all {len(devices):,} devices is not written: "
                "chart queries read one device, so only the sample's depth matters)"
            )
            print(f"{args.requests} requests per answer, sequential, one logged-in admin:\n")
            sampled = [d.device_id for d in devices[: args.sampled]]
            rng = random.Random(5)
            month_start = (NOW - timedelta(days=args.days)).isoformat()
            modes: tuple[tuple[float, str, str], ...] = (
                (5.0, "", "cache on (default, 5 s)"),
                (5.0, "case", "cache on, a case change on the feed before every request"),
                (5.0, "touch", "cache on, a change without a case (touch) before every request"),
                (0.0, "", "cache off"),
            )
            if args.modes == "default":
                modes = modes[:1]
            for cache_s, churn, label in modes:
                feed = CaseFeed()
                changes = CaseChanges(store, feed, await store.cases(limit=10_000_000), devices)

                async def touch(feed: CaseFeed = feed) -> None:
                    feed.touch()  # the store is read again for the next answer

                before: Callable[[], Awaitable[None]] | None = None
                if churn == "case":
                    before = changes
                elif churn == "touch":
                    before = touch
                app = create_app(
                    store=store,
                    influx=influx,
                    actions=None,
                    users=users,
                    feed=feed,
                    settings=DashboardSettings(cache_s=cache_s),
                )
                runner, url = await serve(app)
                try:
                    async with aiohttp.ClientSession(
                        base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True)
                    ) as http:
                        resp = await http.post(
                            "/ops/login", json={"username": "admin", "password": PASSWORD}
                        )
                        csrf = (await resp.json())["csrf_token"]
                        assert csrf

                        def get(
                            path: str, http: aiohttp.ClientSession = http
                        ) -> Callable[[], Awaitable[Any]]:
                            async def call() -> Any:
                                async with http.get(path) as answer:
                                    assert answer.status == 200, (path, answer.status)
                                    return await answer.read()

                            return call

                        async def device_month(http: aiohttp.ClientSession = http) -> Any:
                            device = rng.choice(sampled)
                            async with http.get(
                                f"/ops/api/devices/{device}",
                                params={"start": month_start, "end": NOW.isoformat()},
                            ) as answer:
                                assert answer.status == 200
                                return await answer.json()

                        print(f"[{label}]")
                        cache = app[CACHE_KEY]
                        reads, applied = cache.store_reads, cache.applied
                        ping = await timed(get("/ops/api/ping"), args.requests)
                        print(row("reference: /ops/api/ping round trip", ping))
                        sizes = {}
                        for name, path in (
                            ("fleet overview", "/ops/api/fleet"),
                            ("cases board", "/ops/api/cases"),
                            ("outcomes", "/ops/api/outcomes"),
                            ("insight", "/ops/api/insight"),
                            ("person-needed queue", "/ops/api/queue"),
                            ("appointments (this week)", "/ops/api/appointments"),
                            ("chart: fleet health, 24 h", "/ops/api/charts/fleet-health"),
                            ("chart: fleet health, 24 h, CSV", "/ops/api/charts/fleet-health.csv"),
                            ("chart: cases per day, 30 d", "/ops/api/charts/cases"),
                            ("chart: fixes per day, 30 d", "/ops/api/charts/fixes"),
                            ("chart: failure rates", "/ops/api/charts/failure-rates"),
                        ):
                            started = time.perf_counter()
                            body = await get(path)()
                            first_ms = (time.perf_counter() - started) * 1000
                            note = f"first request {first_ms:.0f} ms"
                            if path.endswith("/fleet-health"):
                                # counted behind the first answer: time until it is all there
                                while orjson.loads(body)["pending"]:
                                    await asyncio.sleep(0.2)
                                    body = await get(path)()
                                done_s = time.perf_counter() - started
                                note += f", every step counted after {done_s:.1f} s"
                            sizes[name] = len(body)
                            samples = await timed(get(path), args.requests, before)
                            print(row(name, samples, f"{len(body) / 1024:.0f} KiB, {note}"))
                        month = await timed(device_month, args.requests, before)
                        sample = await device_month()
                        n_points = len(sample["telemetry"]["times_ms"])
                        print(
                            row(
                                "device page, month range",
                                month,
                                f"{n_points} points/series, bucket {sample['range']['bucket_s']} s",
                            )
                        )
                        history = app[HISTORY_KEY]
                        if history is not None:
                            print(
                                f"  fleet health steps: {history.computed} counted from scores "
                                f"in {history.compute_s:.1f} s, {history.loaded} read back "
                                "from InfluxDB"
                            )
                        print(
                            f"  full store reads (registry and every case): "
                            f"{cache.store_reads - reads}; feed changes applied to the "
                            f"snapshot: {cache.applied - applied}; case changes made: "
                            f"{changes.made if churn == 'case' else 0}"
                        )
                        if cache_s and not churn:
                            print("  references, raw InfluxDB:")
                            last = await timed(
                                lambda: influx.query(
                                    "SELECT LAST(score) FROM health GROUP BY device"
                                ),
                                args.requests,
                            )
                            print(
                                row(
                                    "  SELECT LAST(score) ... GROUP BY device",
                                    last,
                                    f"{len(devices):,} series",
                                )
                            )
                            day = NOW - timedelta(days=1)

                            async def signals(day: datetime = day) -> Any:
                                return await influxql.device_signals(influx, readings_since=day)

                            print(
                                row(
                                    "  signals: scores, readings (1 d), boots",
                                    await timed(signals, args.requests),
                                    "3 statements side by side",
                                )
                            )

                            dev = sampled[0]
                            start_ms = int((NOW - timedelta(days=args.days)).timestamp() * 1000)
                            end_ms = int(NOW.timestamp() * 1000)
                            q = (
                                f"SELECT MEAN(*) FROM telemetry WHERE device = '{dev}' AND "
                                f"time >= {start_ms}ms AND time < {end_ms}ms "
                                "GROUP BY time(7200s) fill(none); "
                                "SELECT MEAN(score), MAX(score), MEAN(baseline) FROM health "
                                f"WHERE device = '{dev}' AND time >= {start_ms}ms AND "
                                f"time < {end_ms}ms GROUP BY time(7200s) fill(none)"
                            )
                            raw = await timed(lambda q=q: influx.query(q), args.requests)
                            print(row("  device month, both statements", raw))
                            trail = await timed(lambda: store.cases(limit=10_000_000), 5)
                            print(row("  store.cases() (every case), for scale", trail))
                        print()
                finally:
                    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--sampled", type=int, default=200, help="devices with a month")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--hours", type=int, default=24, help="hours of scores for every device")
    parser.add_argument("--modes", choices=("all", "default"), default="all")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
