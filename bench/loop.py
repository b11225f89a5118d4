"""Owner-loop benchmark: from a fault on a device to the owner's phone, and how often
a remote fix does it.

Runs the real stack in one process (a private mosquitto and influxd, the gateway, the
diagnostics service, the notifier with its SQLite store) with a simulated fleet, and
the owners' webhook endpoint as a local HTTP server that checks every signature.

Part ``latency``: the fleet lives in real time (``--interval`` seconds between
readings); each device gets an abrupt fault (a hung control task, which the device
reports with an error code at its next reading) at a known time, and its owner's
policy asks before a restart, so the first message is the consent request. Printed:
time from the fault's onset to the owner's message, p50 and p99, beside the telemetry
interval (the reference: a device cannot say anything sooner than its next reading);
goal: p99 under 2 intervals + 1 s.

Part ``remote``: a fleet replays weeks as fast as the stack takes them, with faults
that have a remote remedy (firmware bugs, crash loops, hangs, partial drain clogs)
injected at random; owners let fixes run. Printed: the share of those faults resolved
(verified) without a technician; goal: at least 95 %. Device answers are awaited for
3 s only: at replay speed a long wait would let simulated days pass.

Usage::

    python bench/loop.py                      # both parts
    python bench/loop.py --part latency --devices 40 --interval 2
    python bench/loop.py --part remote --devices 30 --days 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_sim import FleetRunner, SimSettings
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from notifier.model import DeviceRecord, Owner, PushChannel, Technician, Window
from notifier.push import verify_webhook_signature
from notifier.service import NotifierService
from notifier.settings import NotifierSettings, PushSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxSettings
from wire.settings import MqttSettings

FLEET_SECRET = "bench-fleet-secret-0123456789"
SERVICE_PASSWORD = "bench-service-password"
HOOK_SECRET = "bench-webhook-secret-0123456789"
ALL_WEEK = tuple(Window(d, dtime(0), dtime(23, 59)) for d in range(7))
REMOTE_FAULTS = ("firmware_bug", "crash_loop", "controller_hang")


class Receiver:
    """The owners' webhook endpoint: checks signatures, notes when each message came."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, dict[str, Any]]] = []
        self.bad = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_webhook_signature(
            HOOK_SECRET,
            request.headers.get("X-Fixloop-Timestamp", ""),
            body,
            request.headers.get("X-Fixloop-Signature", ""),
            now=time.time(),
        ):
            self.bad += 1
            return web.Response(status=401)
        self.arrivals.append((time.time(), request.match_info["owner"], await request.json()))
        return web.Response(status=204)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


async def seed(
    store: SqliteStore, runner: FleetRunner, hook_url: str, consent: str
) -> dict[str, str]:
    """One owner per device with a webhook channel; one technician who services all."""
    owner_of: dict[str, str] = {}
    for device in runner.fleet.devices:
        owner_id = f"o-{device.device_id}"
        owner_of[device.device_id] = owner_id
        await store.put_owner(
            Owner(
                owner_id,
                "Sam",
                consent=consent,
                quiet_start=None,
                quiet_end=None,  # type: ignore[arg-type]
                availability=ALL_WEEK,
                max_per_day=1_000,
            )
        )
        await store.put_channel(
            PushChannel(
                f"c-{owner_id}",
                owner_id,
                "webhook",
                f"{hook_url}/{owner_id}",
                {"secret": HOOK_SECRET},
            )
        )
        await store.put_device(DeviceRecord(device.device_id, owner_id, str(device.model)))
    await store.put_technician(
        Technician(
            "t-1",
            "Alex",
            "default",
            frozenset(
                {
                    "bearing",
                    "drain_pump",
                    "refrigerant_circuit",
                    "evaporator_coil",
                    "temperature_sensor",
                }
            ),
            hours=ALL_WEEK,
        )
    )
    return owner_of


@contextlib.asynccontextmanager
async def stack(
    root: Path, runner: FleetRunner, notifier_settings: NotifierSettings, consent: str
) -> Any:
    """Servers, gateway, diagnostics, notifier and the webhook receiver, sinks first."""
    ids = runner.fleet.device_ids
    with (
        MosquittoServer(
            root / "mosquitto",
            users={GATEWAY_USER: SERVICE_PASSWORD},
            device_ids=ids,
            fleet_secret=FLEET_SECRET,
            connection_messages=False,
        ) as broker,
        InfluxdServer(root / "influxd") as influx,
    ):
        runner.settings = runner.settings.model_copy(update={"mqtt_port": broker.port})
        mqtt = MqttSettings(
            host=broker.host, port=broker.port, username=GATEWAY_USER, password=SERVICE_PASSWORD
        )
        influx_settings = InfluxSettings(url=influx.url)
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hook/{owner}", receiver.handle)
        hooks = TestServer(app, host="127.0.0.1")
        await hooks.start_server()
        async with SqliteStore(root / "cases.sqlite3") as store:
            await seed(store, runner, str(hooks.make_url("/hook")), consent)
            async with (
                Gateway(
                    mqtt, influx_settings, GatewaySettings(spool_dir=root / "spool", metrics_port=0)
                ) as gateway,
                DiagnosticsService(
                    mqtt, influx_settings, DiagnosticsSettings(model_path=root / "none.pkl")
                ) as diag,
                NotifierService(mqtt, influx_settings, notifier_settings, store=store) as notifier,
            ):
                tasks = [asyncio.create_task(s.run()) for s in (gateway, diag, notifier)]
                try:
                    await gateway.wait_subscribed()
                    await diag.wait_subscribed()
                    await notifier.wait_subscribed()
                    yield receiver, store, notifier
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        await hooks.close()


def notifier_settings(root: Path, **kw: Any) -> NotifierSettings:
    # the owners' webhooks go to a receiver on 127.0.0.1
    push = PushSettings(webhook_allow_private=True)
    return NotifierSettings(db_path=root / "unused.sqlite3", api_port=0, push=push, **kw)


async def latency(devices: int, interval_s: float, warmup_s: float) -> None:
    print(f"latency: {devices} devices, a reading every {interval_s:g} s, real time", flush=True)
    sim = SimSettings(
        devices=devices,
        seed=7,
        interval_s=interval_s,
        speed=1.0,
        start_offset_s=0,
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    runner = FleetRunner(sim)
    with tempfile.TemporaryDirectory(prefix="fixloop-loop-") as tmp:
        root = Path(tmp)
        settings = notifier_settings(root, command_timeout_s=10)
        async with stack(root, runner, settings, "always_ask") as (receiver, _store, _notifier):
            stop = asyncio.Event()
            async with runner:
                fleet = asyncio.create_task(runner.run(stop))
                await asyncio.sleep(warmup_s)
                onsets: dict[str, datetime] = {}
                start = datetime.now(UTC) + timedelta(seconds=1)
                spacing = max(0.3, 20.0 / devices)
                for i, device_id in enumerate(runner.fleet.device_ids):
                    at = start + timedelta(seconds=i * spacing + random.Random(i).random())
                    runner.fleet.inject(device_id, "controller_hang", at=at)
                    onsets[f"o-{device_id}"] = at
                deadline = time.time() + devices * spacing + 30
                while time.time() < deadline:
                    told = {owner for _, owner, _ in receiver.arrivals}
                    if set(onsets) <= told:
                        break
                    await asyncio.sleep(0.2)
                stop.set()
                await fleet
        first: dict[str, float] = {}
        for at, owner, _ in receiver.arrivals:
            first.setdefault(owner, at)
    delays = [first[o] - onsets[o].timestamp() for o in onsets if o in first]
    missed = len(onsets) - len(delays)
    goal = 2 * interval_s + 1
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    print(
        f"  faults {len(onsets)}, owners told {len(delays)}, not told {missed}, "
        f"bad signatures {receiver.bad}"
    )
    print(f"  onset -> owner's message: p50 {p50:.2f} s, p99 {p99:.2f} s, max {max(delays):.2f} s")
    print(
        f"  reference: telemetry interval {interval_s:g} s -> p99 / interval = "
        f"{p99 / interval_s:.2f} (goal: p99 < 2 intervals + 1 s = {goal:g} s: "
        f"{'met' if p99 < goal and not missed else 'NOT met'})",
        flush=True,
    )


async def remote(devices: int, days: float) -> None:
    print(
        f"remote: {devices} devices over {days:g} simulated days, as fast as possible", flush=True
    )
    sim = SimSettings(
        devices=devices,
        seed=21,
        interval_s=300,
        speed="max",
        start_offset_s=days * 86_400,
        duration_s=days * 86_400,
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    runner = FleetRunner(sim)
    rng = random.Random(5)
    start = runner.fleet.now
    injected: list[tuple[str, str]] = []
    for device in runner.fleet.devices:
        faults = list(REMOTE_FAULTS) + (["drain_clog"] if str(device.model) == "washer" else [])
        fault = rng.choice(faults)
        at = start + timedelta(days=rng.uniform(3.0, days - 4.0))
        ttf = timedelta(days=12) if fault == "drain_clog" else None
        runner.fleet.inject(device.device_id, fault, at=at, duration_to_failure=ttf)  # type: ignore[arg-type]
        injected.append((device.device_id, fault))
    with tempfile.TemporaryDirectory(prefix="fixloop-loop-") as tmp:
        root = Path(tmp)
        settings = notifier_settings(
            root,
            command_timeout_s=3,
            retry_after_s=1,
            settle_s=600,
            verify_window_s=3_600,
            verify_timeout_s=120,
        )
        async with stack(root, runner, settings, "fix_and_tell") as (_receiver, store, _notifier):
            async with runner:
                began = time.time()
                report = await runner.run()
                print(
                    f"  fleet replayed in {time.time() - began:.0f} s: {report.summary()}",
                    flush=True,
                )
            deadline = time.time() + 120
            while time.time() < deadline:
                busy = await store.cases(states=["opened", "remote_fix", "verifying"])
                if not busy:
                    break
                await asyncio.sleep(1)
            cases = await store.cases()
    by_key: dict[tuple[str, str], list[Any]] = {}
    for case in cases:
        by_key.setdefault((case.device_id, case.fault), []).append(case)
    remote_ok = 0
    rows: dict[str, list[int]] = {}
    for device_id, fault in injected:
        mine = by_key.get((device_id, fault), [])
        ok = any(c.state == "resolved" and c.appointment_id is None for c in mine)
        remote_ok += ok
        if not ok:
            ended = ", ".join(f"{c.state} after {list(c.tried)}" for c in mine) or "no case"
            print(f"  missed: {fault} on {device_id}: {ended}")
        rows.setdefault(fault, [0, 0])
        rows[fault][0] += ok
        rows[fault][1] += 1
    others = [c for c in cases if (c.device_id, c.fault) not in set(injected)]
    for case in others:
        tried = list(case.tried)
        print(f"  other case: {case.fault} on {case.device_id}, {case.state} after {tried}")
    share = remote_ok / len(injected) if injected else float("nan")
    print("  by fault: " + ", ".join(f"{f} {ok}/{n}" for f, (ok, n) in sorted(rows.items())))
    print(
        f"  resolved without a technician: {remote_ok}/{len(injected)} = {share:.1%} "
        f"(goal >= 95 %: {'met' if share >= 0.95 else 'NOT met'}); "
        f"other cases opened: {len(others)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["latency", "remote", "all"], default="all")
    parser.add_argument("--devices", type=int, help="devices (latency 40, remote 30)")
    parser.add_argument("--interval", type=float, default=2.0, help="latency: s per reading")
    parser.add_argument("--warmup", type=float, default=15.0, help="latency: s before faults")
    parser.add_argument("--days", type=float, default=20.0, help="remote: simulated days")
    args = parser.parse_args()
    if args.part in ("latency", "all"):
        asyncio.run(latency(args.devices or 40, args.interval, args.warmup))
    if args.part in ("remote", "all"):
        asyncio.run(remote(args.devices or 30, args.days))


if __name__ == "__main__":
    main()
