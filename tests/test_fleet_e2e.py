"""A simulated fleet through real mosquitto, the gateway and influxd: exactly what was sent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto
from pydantic import SecretStr

from device_sim import FleetRunner, SimSettings
from fixloop.broker import GATEWAY_USER
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.influx import InfluxClient, InfluxSettings
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

DAY_S = 86_400.0


async def test_a_simulated_fleet_day_lands_exactly_in_influxdb(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    influx = make_influxd()
    sim = SimSettings(
        devices=12,
        seed=7,
        interval_s=30.0,
        duration_s=DAY_S,
        start_offset_s=DAY_S,
        speed="max",
        fault_rate_per_device_month=20.0,  # faults mean error and boot events too
        outage_rate_per_device_month=30.0,  # offline spells mean late, backfilled data
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,  # replaced below, once the broker's port is known
    )
    device_ids = FleetRunner(sim).fleet.device_ids
    broker = make_mosquitto(device_ids=device_ids, connection_messages=False)
    sim = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    gateway_settings = GatewaySettings(spool_dir=tmp_path / "spool", metrics_port=0)
    influx_settings = InfluxSettings(url=influx.url)

    async with Gateway(mqtt, influx_settings, gateway_settings) as gateway:
        task = asyncio.create_task(gateway.run())
        try:
            await gateway.wait_subscribed()
            async with FleetRunner(sim) as runner:
                report = await runner.run()
            sent = report.readings_total + report.events_total
            deadline = time.monotonic() + 60
            while gateway.metrics.stored < sent:
                assert time.monotonic() < deadline, f"stored {gateway.metrics.stored} of {sent}"
                await asyncio.sleep(0.1)
            await gateway.drain()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    assert report.buffered_at_end == 0
    assert report.dropped == 0
    assert report.faults, "the fleet should have had faults (and so events) in a day"
    # A day at one reading per 30 s: every device published about 2,880 readings.
    assert all(2_800 <= n <= 2_900 for n in report.readings_per_device.values())
    assert sum(gateway.metrics.rejected.values()) == 0

    async with InfluxClient(influx_settings) as client:
        telemetry = await client.query("SELECT COUNT(seq) FROM telemetry GROUP BY device")
        events = await client.query("SELECT COUNT(seq) FROM device_events GROUP BY device")
    stored_readings = {s.tags["device"]: s.values[0][1] for s in telemetry}
    stored_events = {s.tags["device"]: s.values[0][1] for s in events}
    assert stored_readings == dict(report.readings_per_device)
    assert stored_events == {d: n for d, n in report.events_per_device.items() if n}
