"""Diagnostics on real mosquitto and influxd: faulty devices are diagnosed, healthy ones not."""

from __future__ import annotations

import asyncio
import functools
import pickle
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto
from pydantic import SecretStr

from device_sim import Fleet, FleetRunner, SimSettings
from diagnostics.engine import DiagnosticsEngine
from diagnostics.model import Diagnosis, decode_diagnosis
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from diagnostics.training import train_from_influx
from fixloop.broker import GATEWAY_USER
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import Event, Reading, decode_event, decode_reading
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

DAYS = 6.0
INTERVAL_S = 120.0
# device index -> (fault, days from onset to failure or 0 for abrupt faults)
FAULTS = {
    4: ("refrigerant_leak", 2.5),  # fridge
    6: ("controller_hang", 0.0),  # washer
    7: ("firmware_bug", 0.0),  # fridge
    8: ("crash_loop", 0.0),  # heat pump
}


def healthy_engine() -> DiagnosticsEngine:
    """An engine with fleet models learnt from a healthy simulated fleet (other seed).

    Same season as the test fleet: heat pumps work to the weather. The models are learnt
    once per test session (the same data every time); every engine gets its own copy.
    """
    return DiagnosticsEngine(fleet_models=pickle.loads(_healthy_fleet_models()))


@functools.cache
def _healthy_fleet_models() -> bytes:
    """The fleet models of :func:`healthy_engine`, pickled (a copy for each engine)."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=14)
    fleet = Fleet(6, start=start, seed=101, interval_s=INTERVAL_S)
    items: list[Reading | Event] = []
    for batch in fleet.iter_until(start + timedelta(days=3)):
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
    engine = DiagnosticsEngine(collect_training=0.2, seed=3)
    engine.process(items)
    return pickle.dumps(engine.fit_fleet_models(seed=3))


async def test_faulty_devices_are_diagnosed_and_healthy_ones_are_not(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
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
    sim = sim.model_copy(update={"mqtt_port": broker.port})
    runner.settings = sim
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    diag_settings = DiagnosticsSettings(model_path=tmp_path / "models" / "diagnostics.pkl")
    engine = await asyncio.to_thread(healthy_engine)

    seen: list[Diagnosis] = []
    async with (
        Gateway(
            mqtt, influx_settings, GatewaySettings(spool_dir=tmp_path / "spool", metrics_port=0)
        ) as gateway,
        DiagnosticsService(mqtt, influx_settings, diag_settings, engine=engine) as service,
        MqttClient(
            broker.host,
            broker.port,
            client_id="ops",
            username=GATEWAY_USER,
            password=GATEWAY_PASSWORD,
        ) as ops,
    ):
        await ops.subscribe("fleet/diagnoses", qos=1)
        tasks = [asyncio.create_task(gateway.run()), asyncio.create_task(service.run())]
        try:
            await gateway.wait_subscribed()
            await service.wait_subscribed()
            async with runner:
                report = await runner.run()
            deadline = time.monotonic() + 60
            while service.readings_scored < report.readings_total:
                assert time.monotonic() < deadline, (service.readings_scored, report.readings_total)
                await asyncio.sleep(0.1)
            await gateway.drain()
            while await ops.wait_messages(1.0):
                batch = ops.take(1000)
                seen.extend(decode_diagnosis(m.payload) for m in batch)
                ops.ack_many(batch)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    diagnosed = {d.device_id for d in seen if d.status == "open"}
    assert diagnosed >= set(faulty), f"missed {set(faulty) - diagnosed}"
    false_alarms = [
        (d.device_id, d.fault, d.score, d.evidence[:3]) for d in seen if d.device_id not in faulty
    ]
    assert not false_alarms, f"false alarms: {false_alarms}"
    # Scores are stored next to the telemetry.
    async with InfluxClient(influx_settings) as client:
        assert await client.count("health", field="score") >= report.readings_total * 0.9

    # `fixloop train` learns fleet models from that history and saves a loadable file.
    trained = await train_from_influx(influx_settings, diag_settings)
    assert set(trained.models) == {"washer", "fridge", "heat_pump"}
    loaded = DiagnosticsEngine.load(diag_settings.model_path)
    assert set(loaded.fleet_models) == set(trained.models)
