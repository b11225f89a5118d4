"""Remaining-life models of the live fleet, learnt from recorded failures.

Unit tests, no I/O but a temporary file: readings of simulated devices whose coil warms
as it wears until it fails, aggregated per hour, learnt from and predicted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from diagnostics.engine import DiagnosticsEngine
from diagnostics.lifetimes import (
    Failure,
    HourlyMeans,
    LifetimeModels,
    StepHistory,
    failure_histories,
    fit_lifetime_models,
)
from wire.errors import ConfigError
from wire.protocol import Event, Reading

START = datetime(2026, 1, 1, tzinfo=UTC)
MS = 1000


def life_readings(
    device: str, start: datetime, life_h: int, seed: int, upto_h: int | None = None
) -> list[Reading]:
    """Readings every 20 minutes; the coil warms over the last half of its life."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(3 * (life_h if upto_h is None else upto_h)):
        hours = i / 3
        wear = max(0.0, hours / life_h - 0.5) * 2
        metrics = {
            "coil_c": 40.0 + 6.0 * wear**2 + float(rng.normal(0, 0.3)),
            "power_w": 900.0 + float(rng.normal(0, 20)),
            "running": bool(i % 2),
        }
        ts = start + timedelta(hours=hours)
        out.append(Reading(device, i, int(ts.timestamp() * MS), metrics))
    return out


def test_step_history_averages_per_step_and_keeps_only_chosen_devices() -> None:
    history = StepHistory(step_s=3600, devices=frozenset({"a"}))
    t0 = int(START.timestamp() * MS)
    history.add(
        [
            Reading("a", 1, t0, {"x": 1.0, "on": True}),
            Reading("a", 2, t0 + 1_800_000, {"x": 3.0, "on": False}),
            Reading("a", 3, t0 + 3_600_000, {"x": 5.0}),
            Reading("b", 1, t0, {"x": 100.0}),
            Event(device_id="a", seq=4, ts_ms=t0, kind="boot"),
        ]
    )
    rows = history.rows("a", ("on", "x"))
    assert rows is not None
    assert rows.times.tolist() == [START.timestamp() / 3600, START.timestamp() / 3600 + 1]
    assert rows.values[0].tolist() == [0.5, 2.0]
    assert np.isnan(rows.values[1, 0])
    assert rows.values[1, 1] == 5.0
    assert history.rows("b", ("x",)) is None
    assert history.metrics("a") == {"on", "x"}


def test_a_history_restarts_after_the_previous_failure_of_the_same_fault() -> None:
    history = StepHistory()
    first = life_readings("d1", START, 100, 1)
    second_start = START + timedelta(hours=101)
    second = life_readings("d1", second_start, 80, 2)
    history.add(first + [Reading("d1", r.seq + 1000, r.ts_ms, r.metrics) for r in second])
    failures = [
        Failure("d1", "hp", "fouling", START + timedelta(hours=100)),
        Failure("d1", "hp", "fouling", second_start + timedelta(hours=80)),
    ]
    (columns, units), *_ = failure_histories(history, failures).values()
    assert columns == ("coil_c", "power_w", "running")
    assert [u.times.shape[0] for u in units] == [100, 80]
    assert units[1].times[0] > units[0].times[-1]


def test_learns_from_failures_and_predicts_a_running_device(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    history = StepHistory()
    failures = []
    for n in range(8):
        life = int(rng.integers(150, 300))
        start = START + timedelta(hours=int(rng.integers(0, 50)))
        history.add(life_readings(f"hp{n}", start, life, n))
        failures.append(
            Failure(f"hp{n}", "heatpump", "coil_fouling", start + timedelta(hours=life))
        )
    # a running device: 200 of its 240 hours gone
    history.add(life_readings("live", START, 240, 99, upto_h=200))
    models = fit_lifetime_models(history, failures, min_failures=5)
    assert set(models.models) == {("heatpump", "coil_fouling")}
    assert models.failures == {("heatpump", "coil_fouling"): 8}
    ttf = models.predict(history, "live", "heatpump", "coil_fouling")
    assert ttf is not None
    assert ttf.p10_s <= ttf.p50_s <= ttf.p90_s
    assert abs(ttf.p50_s / 3600 - 40) < 25
    assert 0 < ttf.progress < 1
    assert models.predict(history, "live", "heatpump", "other") is None
    path = tmp_path / "lifetimes.pkl"
    models.save(path)
    again = LifetimeModels.load(path).predict(history, "live", "heatpump", "coil_fouling")
    assert again == ttf


def test_too_few_failures_learn_nothing_and_bad_files_are_refused(tmp_path: Path) -> None:
    history = StepHistory()
    history.add(life_readings("d", START, 50, 1))
    models = fit_lifetime_models(
        history, [Failure("d", "hp", "fouling", START + timedelta(hours=50))]
    )
    assert models.models == {}
    assert models.failures == {("hp", "fouling"): 1}
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read"):
        LifetimeModels.load(bad)
    with pytest.raises(ConfigError, match="UTC-aware"):
        Failure("d", "hp", "fouling", datetime(2026, 1, 1))


# -- live: the engine's hourly means and the policy's time to failure -------------------


def _learnt(model: str, fault: str) -> tuple[LifetimeModels, StepHistory]:
    rng = np.random.default_rng(5)
    history = StepHistory()
    failures = []
    for n in range(8):
        life = int(rng.integers(150, 300))
        start = START + timedelta(hours=int(rng.integers(0, 50)))
        history.add(life_readings(f"u{n}", start, life, n))
        failures.append(Failure(f"u{n}", model, fault, start + timedelta(hours=life)))
    return fit_lifetime_models(history, failures, min_failures=5), history


def test_the_engine_states_the_learnt_time_to_failure_and_falls_back_to_the_trend() -> None:
    models, _ = _learnt("washer", "bearing_wear")
    live = life_readings("w1", START, 240, 99, upto_h=200)
    boot = Event(device_id="w1", seq=0, ts_ms=live[0].ts_ms - 1, kind="boot",
                 data={"model": "washer"})  # fmt: skip
    at = live[-1].ts_ms + 1
    codes = [
        Event(device_id="w1", seq=10_000 + k, ts_ms=at + k * 60_000, kind="error", code="E52")
        for k in range(2)
    ]
    engine = DiagnosticsEngine(lifetimes=models)
    assert engine.lifetimes is not None
    engine.process([boot, *live])
    sent = [d for d in engine.process(codes).diagnoses if d.fault == "bearing_wear"]
    assert [d.status for d in sent] == ["open", "update"]
    ttf = sent[-1].time_to_failure
    assert ttf is not None
    # what the learnt model says from the device's closed hours, counted down to the code
    own = StepHistory()
    own.add(live[:-3])  # the last hour is still open in the engine
    expected = models.predict(own, "w1", "washer", "bearing_wear")
    assert expected is not None
    end_s = (int(live[-1].ts_ms // 3_600_000)) * 3600.0
    aged = expected.aged(codes[1].ts_ms / 1000 - end_s)
    assert ttf.p50_s == pytest.approx(aged.p50_s)
    assert abs(ttf.p50_s / 3600 - 40) < 25
    # without a learnt model the trend predictor speaks (it has nothing here)
    plain = DiagnosticsEngine()
    plain.process([boot, *live])
    fallback = plain.process(codes).diagnoses
    assert [d.status for d in fallback] == ["open"]  # nothing new to send: no update
    assert all(d.time_to_failure is None for d in fallback)
    assert engine.state_bytes() > plain.state_bytes()


def test_hourly_means_are_bounded_and_keep_the_start_and_the_latest_rows() -> None:
    means = HourlyMeans({"hp": ("x",)}, max_rows=64, head_rows=8, tail_rows=16)
    t0 = int(START.timestamp() * MS)
    readings = [Reading("d", h, t0 + h * 3_600_000, {"x": float(h)}) for h in range(500)]
    means.add("hp", readings)
    means.add("other", readings)  # a model without a learnt model is not kept
    rows = means.rows("d", ("x", "missing"))
    assert rows is not None
    assert rows.values.shape[0] <= 64
    assert means.closed("d") == 499  # the last hour is still open
    first_h = START.timestamp() / 3600
    assert rows.times[:8].tolist() == [first_h + h for h in range(8)]
    assert rows.times[-16:].tolist() == [first_h + h for h in range(483, 499)]
    assert rows.values[:, 0].tolist() == (rows.times - first_h).tolist()
    assert np.isnan(rows.values[:, 1]).all()
    # an older hour is not reopened; stored rows only go before live ones
    means.add("hp", [Reading("d", 9_999, t0, {"x": -1.0})])
    assert means.late == 1
    assert means.add_rows("d", "hp", [0, 1], np.array([[1.0], [2.0]])) == 0
    assert means.add_rows("e", "hp", [5, 6], np.array([[1.0], [2.0]])) == 2
    assert means.devices == 2


def test_load_engine_loads_the_learnt_lifetimes(tmp_path: Path) -> None:
    from diagnostics.lifetimes import lifetimes_path
    from diagnostics.service import load_engine
    from diagnostics.settings import DiagnosticsSettings

    settings = DiagnosticsSettings(model_path=tmp_path / "models" / "diagnostics.pkl")
    assert load_engine(settings).lifetimes is None
    models, _ = _learnt("washer", "bearing_wear")
    models.save(lifetimes_path(settings.model_path))
    engine = load_engine(settings)
    assert engine.lifetimes is not None
    assert engine.lifetimes.watches("washer")
    assert not engine.lifetimes.watches("fridge")
