"""Devices sending what no product file describes: scored, counted, shown on the dashboard.

Real mosquitto and influxd: a kettle (a model with no file) and a washer sending a metric
its file does not list publish over MQTT; the diagnostics service scores both and writes
the counts per model to InfluxDB; the dashboard's ``/ops/api/products`` reads them back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto, device_pw

from dashboard.app import create_app
from dashboard.auth import OpsUser, hash_password
from diagnostics.engine import DiagnosticsEngine, Mismatch
from diagnostics.service import DiagnosticsService, mismatch_lines
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import MISMATCH_MEASUREMENT
from wire.mqtt import MqttClient
from wire.protocol import (
    Event,
    Reading,
    decode_event,
    decode_reading,
    encode_event,
    encode_reading,
)
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

KETTLE = "kettle-01"
WASHER = "washer-01"
READINGS = 40
PASSWORD = "viewer-pass-1"
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _messages(now_ms: int) -> dict[str, list[tuple[str, bytes]]]:
    step_ms = 60_000
    first = now_ms - READINGS * step_ms
    out: dict[str, list[tuple[str, bytes]]] = {KETTLE: [], WASHER: []}
    for device, model in ((KETTLE, "kettle"), (WASHER, "washer")):
        boot = Event(device, 1, first - 1, "boot", code="1.0", data={"model": model})
        out[device].append((f"devices/{device}/events", encode_event(boot)))
    for k in range(READINGS):
        ts = first + k * step_ms
        kettle = Reading(KETTLE, k + 2, ts, {"water_temp_c": 20.0 + k % 3, "heating": k % 2 == 0})
        washer = Reading(
            WASHER,
            k + 2,
            ts,
            {"drum_rpm": 0.0, "water_level_l": 0.0, "humidity_pct": 40.0 + k % 5},
            "idle",
        )
        out[KETTLE].append((f"devices/{KETTLE}/telemetry", encode_reading(kettle)))
        out[WASHER].append((f"devices/{WASHER}/telemetry", encode_reading(washer)))
    return out


async def _written(client: InfluxClient) -> dict[str, int]:
    """The newest count per model written by worker ``diag-a``."""
    series = await client.query(
        f"SELECT LAST(\"count\") FROM {MISMATCH_MEASUREMENT} WHERE worker = 'diag-a' GROUP BY model"
    )
    return {s.tags["model"]: int(s.values[0][1]) for s in series if s.values}


def test_the_engine_counts_mismatches_per_model() -> None:
    messages = _messages(1_700_000_000_000)
    engine = DiagnosticsEngine()
    items: list[Reading | Event] = []
    for device, sent in messages.items():
        for topic, payload in sent:
            decode = decode_event if topic.endswith("events") else decode_reading
            items.append(decode(device, payload, 1_700_000_000_000))
    engine.process(items)
    assert engine.mismatches() == [
        Mismatch("kettle", False, READINGS, ("heating", "water_temp_c")),
        Mismatch("washer", True, READINGS, ("humidity_pct",)),
    ]
    assert engine.unknown_by_model == {"kettle": READINGS}
    assert engine.unlisted_by_model == {"washer": READINGS}


async def test_mismatches_are_written_and_shown_on_the_dashboard(
    make_mosquitto: MakeMosquitto,
    make_influxd: MakeInfluxd,
    tmp_path: Path,
    aiohttp_client: ClientFactory,
) -> None:
    influx = make_influxd()
    broker = make_mosquitto(device_ids=[KETTLE, WASHER], connection_messages=False)
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    settings = DiagnosticsSettings(model_path=tmp_path / "none.pkl", client_id="diag-a")
    messages = _messages(int(time.time() * 1000))
    async with InfluxClient(influx_settings) as client:
        await client.ensure_database()
    async with DiagnosticsService(
        mqtt, influx_settings, settings, engine=DiagnosticsEngine(), mismatch_every_s=0.0
    ) as service:
        task = asyncio.create_task(service.run())
        try:
            await service.wait_subscribed()
            for device, sent in messages.items():
                async with MqttClient(
                    broker.host,
                    broker.port,
                    client_id=device,
                    username=device,
                    password=device_pw(device),
                ) as client:
                    for topic, payload in sent:
                        await client.publish(topic, payload, qos=1)
            deadline = time.monotonic() + 30
            while service.readings_scored < 2 * READINGS:
                assert time.monotonic() < deadline, service.readings_scored
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 30
            async with InfluxClient(influx_settings) as client:
                # the counts are written after each batch while they change
                while await _written(client) != {"kettle": READINGS, "washer": READINGS}:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert service.unknown_readings == READINGS
    assert service.unlisted_metrics == READINGS

    async with InfluxClient(influx_settings) as client:
        # a second worker of a shared subscription counts its own devices
        other = [Mismatch("kettle", False, 5, ("power_w",))]
        outcome = await client.write(mismatch_lines(other, "diag-b", int(time.time() * 1000)))
        assert outcome.written == 1
        async with SqliteStore(tmp_path / "cases.db") as store:
            app = create_app(
                store=store,
                influx=client,
                actions=None,
                users={"vera": OpsUser("vera", "viewer", hash_password(PASSWORD, n=2**10), "V")},
            )
            http = await aiohttp_client(app)
            login = await http.post("/ops/login", json={"username": "vera", "password": PASSWORD})
            assert login.status == 200, await login.text()
            answer = await http.get("/ops/api/products")
            assert answer.status == 200, await answer.text()
            body = await answer.json()
    rows = {row["model"]: row for row in body["models"]}
    assert set(rows) == {"kettle", "washer"}
    assert rows["kettle"]["has_file"] is False
    assert rows["kettle"]["count"] == READINGS + 5
    assert rows["kettle"]["metrics"] == ["heating", "power_w", "water_temp_c"]
    assert rows["washer"]["has_file"] is True
    assert rows["washer"]["count"] == READINGS
    assert rows["washer"]["metrics"] == ["humidity_pct"]
