"""``fixloop train`` learns remaining life from recorded failures, on a real influxd.

A simulated fleet's history is written to InfluxDB; some of its devices are recorded as
failed (several times each: a part replaced starts a new history). Training then saves,
beside the fleet models, a remaining-life model for the failed product model and fault,
which predicts a running device of that model from its own stored rows.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from device_sim import Fleet
from diagnostics.lifetimes import Failure, LifetimeModels, StepHistory, lifetimes_path
from diagnostics.service import backfill_lifetimes, load_engine
from diagnostics.settings import DiagnosticsSettings
from diagnostics.training import train_from_influx
from fixloop.cli import main
from fixloop.stack import InfluxdServer
from notifier.model import Case
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import event_to_line, reading_to_line
from wire.protocol import Event, Reading, decode_event, decode_reading

pytestmark = pytest.mark.integration

DAYS = 3


def fleet_items(start: datetime) -> list[Reading | Event]:
    fleet = Fleet(6, start=start, seed=11, interval_s=300.0)
    items: list[Reading | Event] = []
    for batch in fleet.iter_until(start + timedelta(days=DAYS)):
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
    return items


async def test_train_learns_remaining_life_from_recorded_failures(
    influxd: InfluxdServer, tmp_path: Path
) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=DAYS)
    items = fleet_items(start)
    influxd.create_database("lifetimes")
    influx_settings = InfluxSettings(url=influxd.url, database="lifetimes")
    async with InfluxClient(influx_settings) as client:
        lines = [reading_to_line(i) if isinstance(i, Reading) else event_to_line(i) for i in items]
        for at in range(0, len(lines), 5000):
            await client.write(lines[at : at + 5000])
    models = {
        i.device_id: str(i.data["model"])
        for i in items
        if isinstance(i, Event) and i.kind == "boot" and "model" in i.data
    }
    model = sorted(models.values())[0]
    failed = sorted(d for d, m in models.items() if m == model)
    assert len(failed) >= 2
    # each of them had the part replaced at 18, 36 and 54 hours: three histories each
    failures = [
        Failure(device, model, "bearing_wear", start + timedelta(hours=hours))
        for device in failed
        for hours in (18, 36, 54)
    ]
    settings = DiagnosticsSettings(
        model_path=tmp_path / "models" / "diagnostics.pkl", train_days=DAYS + 1
    )
    report = await train_from_influx(influx_settings, settings, failures=failures)

    assert report.lifetimes == {f"{model}/bearing_wear": len(failures)}
    learnt = LifetimeModels.load(lifetimes_path(settings.model_path))
    assert set(learnt.models) == {(model, "bearing_wear")}
    history = StepHistory(step_s=learnt.step_s)
    history.add(items)
    ttf = learnt.predict(
        history, failed[0], model, "bearing_wear", since=start + timedelta(hours=54)
    )
    assert ttf is not None
    assert 0 <= ttf.p10_s <= ttf.p50_s <= ttf.p90_s

    # the service: the learnt models loaded, the hourly means backfilled from InfluxDB
    engine = load_engine(settings, models)
    assert engine.lifetimes is not None
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    async with InfluxClient(influx_settings) as client:
        added = await backfill_lifetimes(client, engine, models, days=DAYS + 1, now_ms=now_ms)
    assert added > 0
    columns = learnt.models[(model, "bearing_wear")].columns
    filled = engine.lifetimes.history.rows(failed[0], columns)
    stored = history.rows(failed[0], columns)
    assert filled is not None
    assert stored is not None
    n = filled.times.shape[0]
    assert filled.times.tolist() == stored.times[:n].tolist()
    numbers = ~np.isnan(filled.values).all(axis=0)  # true/false metrics have no mean there
    assert numbers.any()
    assert np.allclose(filled.values[:, numbers], stored.values[:n, numbers], rtol=1e-5)
    prediction = engine.lifetimes.predict(failed[0], model, "bearing_wear", now_ms)
    assert prediction is not None


def test_fixloop_train_uses_the_case_store_and_models_of_its_data_folder(
    influxd: InfluxdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fixloop train --data-dir D`` reads the failures ``fixloop up`` on D recorded."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=DAYS)
    items = fleet_items(start)
    influxd.create_database("datafolder")
    influx_settings = InfluxSettings(url=influxd.url, database="datafolder")
    models = {
        i.device_id: str(i.data["model"])
        for i in items
        if isinstance(i, Event) and i.kind == "boot" and "model" in i.data
    }
    model = sorted(models.values())[0]
    failed = sorted(d for d, m in models.items() if m == model)
    data_dir = tmp_path / "demo"
    data_dir.mkdir()

    async def prepare() -> None:
        async with InfluxClient(influx_settings) as client:
            lines = [
                reading_to_line(i) if isinstance(i, Reading) else event_to_line(i) for i in items
            ]
            for at in range(0, len(lines), 5000):
                await client.write(lines[at : at + 5000])
        # where fixloop up keeps its case store: cases.sqlite3 in the data folder
        async with SqliteStore(data_dir / "cases.sqlite3") as store:
            for device in failed:
                for hours in (18, 36, 54):
                    fixed = start + timedelta(hours=hours)
                    await store.add_case(
                        Case(
                            f"case-{device}-{hours}",
                            device,
                            "owner-1",
                            model,
                            "bearing_wear",
                            "resolved",
                            "low",
                            start,
                            fixed,
                            appointment_id=f"visit-{device}-{hours}",
                            fix_at=fixed,
                        )
                    )

    asyncio.run(prepare())
    monkeypatch.chdir(tmp_path)  # the default .fixloop would be here
    for name in list(os.environ):
        if name.startswith("FIXLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FIXLOOP_INFLUX__URL", influxd.url)
    monkeypatch.setenv("FIXLOOP_INFLUX__DATABASE", "datafolder")
    argv = ["--log-level", "WARNING", "train", "--days", str(DAYS + 1)]
    assert main([*argv, "--data-dir", str(data_dir)]) == 0
    model_path = data_dir / "models" / "diagnostics.pkl"
    assert model_path.is_file()
    learnt = LifetimeModels.load(lifetimes_path(model_path))
    assert set(learnt.models) == {(model, "bearing_wear")}
    assert not (tmp_path / ".fixloop").exists()
