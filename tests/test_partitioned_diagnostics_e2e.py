"""Partitioned diagnostics on real servers: workers join and die, diagnoses stay exact.

Real mosquitto, influxd and PostgreSQL (leases and checkpoints); the gateway republishes
on 8 partitions; diagnostics workers are processes of their own (tests/partition_worker.py).
Two workers share the partitions, a third joins mid-run, then one of the first two is
killed (SIGKILL) while devices drift toward their faults. The diagnoses must be those of
one unpartitioned engine fed the same messages (nothing missed, nothing false), each
opened once, and each device's readings handled by one worker at a time, in order.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto, PostgresDatabases
from pydantic import SecretStr
from test_diagnostics_e2e import FAULTS, INTERVAL_S, healthy_engine

from device_sim import FleetRunner, SimSettings
from diagnostics.leases import PostgresPartitionStore, SoleOwnerStore
from diagnostics.model import Diagnosis, decode_diagnosis
from diagnostics.partition import PartitionedDiagnostics
from diagnostics.service import load_engine
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.influx import InfluxSettings
from wire.mqtt import Message, MqttClient
from wire.partitions import partition_of
from wire.protocol import Event, Reading, decode_event, decode_reading
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

DAYS = 6.0
PARTITIONS = 8
WORKER = Path(__file__).with_name("partition_worker.py")


class Worker:
    """A worker process, its handled log and its output."""

    def __init__(self, name: str, root: Path, config: dict[str, Any]) -> None:
        self.name = name
        self.log = root / f"{name}.handled"
        self.out = root / f"{name}.out"
        self.config_path = root / f"{name}.json"
        self.config_path.write_bytes(orjson.dumps({**config, "worker": name}))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.out.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                str(self.config_path),
                str(self.log),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def ready(self) -> None:
        deadline = time.monotonic() + 90
        while b"ready" not in self.out.read_bytes():
            assert self.proc is not None
            assert self.proc.returncode is None, self.out.read_text()
            assert time.monotonic() < deadline, self.out.read_text()
            await asyncio.sleep(0.2)

    def handled(self) -> int:
        return self.log.read_bytes().count(b"\n") if self.log.exists() else 0

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await asyncio.wait_for(self.proc.wait(), 60)


async def _owners(url: str) -> Counter[str]:
    async with PostgresPartitionStore(url) as store:
        return Counter(await store.holders())


async def _wait_owners(url: str, expected: dict[str, int], workers: list[Worker]) -> None:
    deadline = time.monotonic() + 60
    while (owners := await _owners(url)) != Counter(expected):
        assert time.monotonic() < deadline, (owners, [w.out.read_text()[-2000:] for w in workers])
        await asyncio.sleep(0.2)


def _items(messages: list[Message], now_ms: int) -> list[Reading | Event]:
    items: list[Reading | Event] = []
    for message in messages:
        _, device_id, channel = message.topic.split("/")
        if channel == "telemetry":
            items.append(decode_reading(device_id, message.payload, now_ms))
        elif channel == "events":
            items.append(decode_event(device_id, message.payload, now_ms))
    return items


async def test_partitions_move_without_missed_false_or_repeated_diagnoses(
    make_mosquitto: MakeMosquitto,
    make_influxd: MakeInfluxd,
    pg_databases: PostgresDatabases,
    tmp_path: Path,
) -> None:
    influx = make_influxd()
    sim = SimSettings(
        devices=12,
        seed=5,
        interval_s=INTERVAL_S,
        duration_s=DAYS * 86_400,
        start_offset_s=DAYS * 86_400,
        speed="max",
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    runner = FleetRunner(sim)
    device_ids = runner.fleet.device_ids
    onset = runner.fleet.now + timedelta(days=2.5)
    faulty: dict[str, str] = {}
    for index, (fault, days) in FAULTS.items():
        duration = timedelta(days=days) if days else None
        runner.fleet.inject(device_ids[index], fault, at=onset, duration_to_failure=duration)  # type: ignore[arg-type]
        faulty[device_ids[index]] = fault
    broker = make_mosquitto(device_ids=device_ids, connection_messages=False)
    runner.settings = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    model_path = tmp_path / "models" / "diagnostics.pkl"
    model_path.parent.mkdir()
    (await asyncio.to_thread(healthy_engine)).save(model_path)
    lease_url = pg_databases.create()
    diagnostics = {
        "client_id": "diag",
        "model_path": str(model_path),
        "partitions": PARTITIONS,
        "lease_ttl_s": 3.0,
        "checkpoint_every_s": 0.5,
        "write_scores": False,
        "lifetime_backfill": False,
    }
    config = {
        "host": broker.host,
        "port": broker.port,
        "username": GATEWAY_USER,
        "password": GATEWAY_PASSWORD,
        "influx_url": influx.url,
        "lease_url": lease_url,
        "diagnostics": diagnostics,
    }
    a, b, c = (Worker(n, tmp_path, config) for n in ("worker-a", "worker-b", "worker-c"))
    expected = len(device_ids) * int(DAYS * 86_400 / INTERVAL_S)

    seen: list[Diagnosis] = []
    stream: list[Message] = []
    try:
        await a.start()
        await a.ready()
        await _wait_owners(lease_url, {a.name: PARTITIONS}, [a])
        await b.start()
        await b.ready()
        await _wait_owners(lease_url, {a.name: 4, b.name: 4}, [a, b])
        await c.start()
        await c.ready()  # loaded, joins while the fleet runs
        async with (
            Gateway(
                mqtt,
                influx_settings,
                GatewaySettings(
                    spool_dir=tmp_path / "spool",
                    metrics_port=0,
                    republish_partitions=PARTITIONS,
                ),
            ) as gateway,
            MqttClient(
                broker.host,
                broker.port,
                client_id="ops",
                username=GATEWAY_USER,
                password=GATEWAY_PASSWORD,
            ) as ops,
        ):
            await ops.subscribe("fleet/diagnoses", "devices/+/telemetry", "devices/+/events")
            ingest = asyncio.create_task(gateway.run())
            try:
                await gateway.wait_subscribed()
                async with runner:
                    fleet_run = asyncio.create_task(runner.run())
                    # the third worker joins at a third of the readings handled, the first
                    # dies (SIGKILL: no checkpoint, no release) at two thirds, whether or
                    # not the fleet has sent its last reading by then
                    joined = killed = False
                    while not fleet_run.done() or not killed:
                        handled = a.handled() + b.handled() + c.handled()
                        if not joined and handled >= expected / 3:
                            await _wait_owners(
                                lease_url, {a.name: 3, b.name: 3, c.name: 2}, [a, b, c]
                            )
                            joined = True
                        elif joined and not killed and handled >= expected * 2 / 3:
                            await a.stop(signal.SIGKILL)
                            killed = True
                        await asyncio.sleep(0.05)
                    report = await fleet_run
                readings = sum(report.readings_per_device.values())
                await gateway.drain()
                await _wait_owners(lease_url, {b.name: 4, c.name: 4}, [b, c])
                deadline = time.monotonic() + 120
                while True:
                    while await ops.wait_messages(0.5):
                        batch = ops.take(10_000)
                        ops.ack_many(batch)
                        for message in batch:
                            if message.topic == "fleet/diagnoses":
                                seen.append(decode_diagnosis(message.payload))
                            else:
                                stream.append(message)
                    handled_readings = {
                        (line.split("\t")[0], line.split("\t")[2])
                        for w in (a, b, c)
                        for line in w.log.read_text().splitlines()
                        if line.split("\t")[1] == "r"
                    }
                    if len(handled_readings) >= readings:
                        break
                    assert time.monotonic() < deadline, (len(handled_readings), readings)
            finally:
                ingest.cancel()
                await asyncio.gather(ingest, return_exceptions=True)
            while await ops.wait_messages(2.0):
                batch = ops.take(10_000)
                ops.ack_many(batch)
                seen.extend(
                    decode_diagnosis(m.payload) for m in batch if m.topic.startswith("fleet")
                )
    finally:
        for worker in (b, c):
            await worker.stop()
        await a.stop(signal.SIGKILL)
        pg_databases.drop(lease_url)
    assert len(handled_readings) == readings

    # Each device's readings were handled by one worker at a time, in order: sorted by
    # the (system-wide) monotonic clock, the workers of a device form runs, no worker
    # comes back after another took over, and within a run (ts, seq) only increases.
    by_device: dict[str, list[tuple[int, str, int, int, str]]] = defaultdict(list)
    for w in (a, b, c):
        for line in w.log.read_text().splitlines():
            device, kind, ts, seq, now, _ = line.split("\t")
            by_device[device].append((int(now), w.name, int(ts), int(seq), kind))
    moved = 0
    for device, records in by_device.items():
        records.sort()
        runs: list[str] = []
        last: dict[str, tuple[int, int]] = {}
        for _, name, ts, seq, kind in records:
            if not runs or runs[-1] != name:
                assert name not in runs, f"{device}: {name} handled it again after {runs}"
                runs.append(name)
                last = {}
            assert (ts, seq) > last.get(kind, (-1, -1)), f"{device}: out of order in {name}"
            last[kind] = (ts, seq)
        moved += len(runs) - 1
    assert moved >= 1  # the partitions did move

    # The same messages through one unpartitioned engine give the same diagnoses.
    reference = await asyncio.to_thread(load_engine, DiagnosticsSettings(model_path=model_path))
    expected_opens = {
        d.id
        for d in reference.process(_items(stream, int(time.time() * 1000))).diagnoses
        if d.status == "open"
    }
    opens = Counter(d.id for d in seen if d.status == "open")
    repeated = {key: n for key, n in opens.items() if n > 1}
    assert not repeated, f"opened more than once: {repeated}"
    assert set(opens) == expected_opens
    diagnosed = {d.device_id for d in seen if d.status == "open"}
    assert diagnosed >= set(faulty), f"missed {set(faulty) - diagnosed}"
    false_alarms = [(d.device_id, d.fault) for d in seen if d.device_id not in faulty]
    assert not false_alarms, f"false alarms: {false_alarms}"


async def test_one_worker_holds_every_partition_without_a_shared_store(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    """No PostgreSQL: one worker holds all partitions; a restart resumes its checkpoints."""
    influx = make_influxd()
    sim = SimSettings(
        devices=6,
        seed=7,
        interval_s=600.0,
        duration_s=86_400.0,
        start_offset_s=86_400.0,
        speed="max",
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    runner = FleetRunner(sim)
    broker = make_mosquitto(device_ids=runner.fleet.device_ids, connection_messages=False)
    runner.settings = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    settings = DiagnosticsSettings(
        client_id="solo",
        model_path=tmp_path / "none.pkl",
        partitions=4,
        checkpoint_every_s=0.2,
        write_scores=False,
        lifetime_backfill=False,
    )
    store = SoleOwnerStore()
    handled: list[tuple[int, str, int, int]] = []

    def note(partition: int, items: Sequence[Reading | Event]) -> None:
        handled.extend(
            (partition, i.device_id, i.ts_ms, i.seq) for i in items if isinstance(i, Reading)
        )

    async with Gateway(
        mqtt,
        influx_settings,
        GatewaySettings(spool_dir=tmp_path / "spool", metrics_port=0, republish_partitions=4),
    ) as gateway:
        ingest = asyncio.create_task(gateway.run())
        try:
            await gateway.wait_subscribed()
            first = PartitionedDiagnostics(
                mqtt, influx_settings, settings, store, worker_id="solo", on_handled=note
            )
            async with first:
                work = asyncio.create_task(first.run())
                deadline = time.monotonic() + 60
                while first.partitions_held != set(range(4)) or not first.connected:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                async with runner:
                    report = await runner.run()
                readings = sum(report.readings_per_device.values())
                await gateway.drain()
                while len(handled) < readings:
                    assert time.monotonic() < deadline + 60, (len(handled), readings)
                    await asyncio.sleep(0.05)
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            assert first.checkpoints >= 4
            assert gateway.republisher is not None
            assert gateway.republisher.republished >= readings
            await gateway.drain()  # every batch acknowledged: no republish in flight
            exposed = gateway.metrics.render().splitlines()
            assert f"fixloop_gateway_republished_total {gateway.republisher.republished}" in (
                exposed
            )
            assert "fixloop_gateway_republish_in_flight 0" in exposed
            assert "fixloop_gateway_republish_failed_total 0" in exposed

            # a restarted worker resumes from the checkpoints: nothing handled twice
            second = PartitionedDiagnostics(
                mqtt, influx_settings, settings, store, worker_id="solo", on_handled=note
            )
            async with second:
                work = asyncio.create_task(second.run())
                while second.partitions_held != set(range(4)) or not second.connected:
                    assert time.monotonic() < deadline + 120
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        finally:
            ingest.cancel()
            await asyncio.gather(ingest, return_exceptions=True)
    assert len(handled) == len(set(handled)) == readings
    assert {p for p, *_ in handled} == set(range(4))
    for partition, device, _, _ in handled:
        assert partition_of(device, 4) == partition
