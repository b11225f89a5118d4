"""The detector contract for the scorers (device baselines, fleet models) and the engine on
a small simulated fleet with injected faults (STYLE.md rule 11)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from device_sim import Fleet
from diagnostics.engine import DiagnosticsEngine, EngineResult
from diagnostics.features import FEATURE_SPECS
from diagnostics.fleet import FleetModel
from tests import array_forms
from wire.protocol import Event, Reading, decode_event, decode_reading

START = datetime(2025, 1, 6, tzinfo=UTC)
DAYS = 6.0
ONSET = START + timedelta(days=2.5)
# device index -> injected fault (0, 1, 2 of each model stay healthy)
FAULTS = {
    3: ("sensor_drift", 2.0),  # washer
    4: ("refrigerant_leak", 2.5),  # fridge
    5: ("sensor_drift", 2.0),  # heat pump
    6: ("controller_hang", 0.0),  # washer
    7: ("firmware_bug", 0.0),  # fridge
    8: ("crash_loop", 0.0),  # heat pump
    10: ("sensor_stuck", 0.0),  # fridge
}


def _decode(fleet: Fleet, until: datetime) -> list[Reading | Event]:
    items: list[Reading | Event] = []
    for batch in fleet.iter_until(until):
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
    return items


@cache
def healthy_stream() -> tuple[Reading | Event, ...]:
    fleet = Fleet(6, start=START, seed=101, interval_s=120)
    return tuple(_decode(fleet, START + timedelta(days=3)))


@cache
def faulty_stream() -> tuple[tuple[Reading | Event, ...], dict[str, tuple[str, int]]]:
    fleet = Fleet(12, start=START, seed=5, interval_s=120)
    truth: dict[str, tuple[str, int]] = {}
    for index, (fault, days) in FAULTS.items():
        device_id = fleet.device_ids[index]
        duration = timedelta(days=days) if days else None
        record = fleet.inject(device_id, fault, at=ONSET, duration_to_failure=duration)  # type: ignore[arg-type]
        truth[device_id] = (fault, round(record.onset.timestamp() * 1000))
    return tuple(_decode(fleet, START + timedelta(days=DAYS))), truth


@cache
def trained() -> dict[str, FleetModel]:
    engine = DiagnosticsEngine(collect_training=0.2, seed=3)
    engine.process(healthy_stream())
    return engine.fit_fleet_models(seed=3)


def _run(engine: DiagnosticsEngine, items: tuple[Reading | Event, ...]) -> EngineResult:
    scores = []
    diagnoses = []
    for i in range(0, len(items), 500):
        result = engine.process(items[i : i + 500])
        scores += result.scores
        diagnoses += result.diagnoses
    return EngineResult(tuple(scores), tuple(diagnoses))


# -- detector contract ---------------------------------------------------------------


@pytest.fixture(params=["baseline", "gaussian"])
def make_engine(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    def build() -> DiagnosticsEngine:
        if request.param == "baseline":
            return DiagnosticsEngine()
        return DiagnosticsEngine(fleet_models=trained())

    return build


def test_scores_in_unit_interval_and_same_seed_same_scores(make_engine) -> None:  # type: ignore[no-untyped-def]
    items, _ = faulty_stream()
    first = _run(make_engine(), items[:20_000])
    second = _run(make_engine(), items[:20_000])
    a = np.array([s.score for s in first.scores])
    assert a.size > 1000
    assert np.all((a >= 0.0) & (a <= 1.0))
    assert np.array_equal(a, np.array([s.score for s in second.scores]))
    assert first.diagnoses == second.diagnoses


def test_inputs_are_not_modified(make_engine) -> None:  # type: ignore[no-untyped-def]
    items, _ = faulty_stream()
    chunk = items[:3000]
    snapshot = pickle.dumps(chunk)
    _run(make_engine(), chunk)
    assert pickle.dumps(chunk) == snapshot
    rows = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    rows[::7, 2] = np.nan
    copy = rows.copy()
    model = FleetModel.fit(
        "washer", FEATURE_SPECS["washer"].names, rows, np.full(6, 0.1, np.float32)
    )
    model.score(rows)
    assert np.array_equal(rows, copy, equal_nan=True)


def test_only_past_data_is_used(make_engine) -> None:  # type: ignore[no-untyped-def]
    items, _ = faulty_stream()
    short = _run(make_engine(), items[:6000])
    longer = _run(make_engine(), items[:12000])
    n = len(short.scores)
    assert [s.score for s in longer.scores[:n]] == [s.score for s in short.scores]


def test_state_pickles_and_models_round_trip(make_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items, _ = faulty_stream()
    engine = make_engine()
    _run(engine, items[:8000])
    clone = pickle.loads(pickle.dumps(engine))
    rest = items[8000:12000]
    assert [s.score for s in _run(engine, rest).scores] == [
        s.score for s in _run(clone, rest).scores
    ]
    engine.save(tmp_path / "models.pkl")
    assert (tmp_path / "models.pkl.json").exists()
    loaded = DiagnosticsEngine.load(tmp_path / "models.pkl")
    fresh = make_engine()
    assert [s.score for s in _run(loaded, items[:6000]).scores] == [
        s.score for s in _run(fresh, items[:6000]).scores
    ]


def test_roc_auc_on_simulated_faults(make_engine) -> None:  # type: ignore[no-untyped-def]
    items, truth = faulty_stream()
    result = _run(make_engine(), items)
    labels, scores = [], []
    for s in result.scores:
        fault = truth.get(s.device_id)
        if fault is not None and fault[0] in ("firmware_bug", "crash_loop"):
            continue  # seen in device events, not in telemetry
        if fault is not None and s.ts_ms < fault[1] + 86_400_000:
            continue  # give a fault a day to show
        labels.append(fault is not None)
        scores.append(s.score)
    assert roc_auc_score(labels, scores) >= 0.5


def test_load_refuses_other_formats(tmp_path: Path) -> None:
    from wire.errors import ConfigError

    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"format_version": 99}))
    with pytest.raises(ConfigError):
        DiagnosticsEngine.load(path)


# -- the engine on a small simulated fleet -----------------------------------------------


def test_faulty_devices_get_the_right_fault_and_healthy_ones_none() -> None:
    items, truth = faulty_stream()
    engine = DiagnosticsEngine(fleet_models=trained())
    result = _run(engine, items)
    opened: dict[str, list[str]] = {}
    for d in result.diagnoses:
        if d.status == "open":
            opened.setdefault(d.device_id, []).append(d.fault)
    for device_id, (fault, _) in truth.items():
        named = [f for f in opened.get(device_id, []) if f != "unknown"]
        assert named[:1] == [fault], (device_id, opened.get(device_id))
    healthy = set(engine._models) - set(truth)
    assert len(healthy) == 5
    assert {d for d in opened if d in healthy} == set()
    assert engine.unknown_readings == 0
    assert 0 < engine.state_bytes() / engine.devices < 4_000


def test_registry_and_unknown_models() -> None:
    # any model is scored: one without a product file (or none known) generically
    engine = DiagnosticsEngine(registry={"w1": "washer", "x": "toaster"})
    result = engine.process(
        [
            Reading("w1", 1, 1_000_000, {"drum_rpm": 0.0}, "idle"),
            Reading("nobody", 1, 1_000_000, {"drum_rpm": 0.0}, "idle"),
            Reading("x", 1, 1_000_000, {"slot_temp_c": 180.0, "on": True}, "toasting"),
        ]
    )
    assert [s.device_id for s in result.scores] == ["w1", "nobody", "x"]
    assert engine.unknown_readings == 2
    assert engine.unlisted_metrics == 0


@pytest.mark.parametrize("method", ["gaussian", "isolation_forest"])
def test_fleet_model_contract(method: str) -> None:
    rng = np.random.default_rng(1)
    names = FEATURE_SPECS["washer"].names
    healthy = rng.normal(size=(600, len(names))).astype(np.float32)
    healthy[::5, 1] = np.nan
    floors = np.full(len(names), 0.1, np.float32)
    kept = healthy.copy()
    a = FleetModel.fit("washer", names, healthy, floors, method=method, seed=4)  # type: ignore[arg-type]
    b = FleetModel.fit("washer", names, healthy, floors, method=method, seed=4)  # type: ignore[arg-type]
    assert np.array_equal(healthy, kept, equal_nan=True)
    test = rng.normal(size=(300, len(names))).astype(np.float32)
    test[150:, 0] += 6.0  # a fault moves one feature
    scores, z = a.score(test)
    assert np.array_equal(scores, b.score(test)[0])
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert np.array_equal(pickle.loads(pickle.dumps(a)).score(test)[0], scores)
    labels = np.arange(300) >= 150
    assert roc_auc_score(labels, scores) >= 0.7
    assert z.shape == test.shape


def test_baselines_only_warm_up_opens_no_model_diagnosis_on_a_healthy_fleet() -> None:
    # no fleet model and baselines still warming up (6 h of device time): minutes of
    # readings have seen one compressor cycle, not a day, so nothing model-based opens
    fleet = Fleet(30, start=START, seed=1, interval_s=20)
    engine = DiagnosticsEngine()
    result = engine.process(_decode(fleet, START + timedelta(hours=6)))
    assert len(result.scores) > 30_000
    assert [d for d in result.diagnoses if d.source != "device"] == []
    # scores stay quiet too: a cold baseline says nothing rather than cry wolf
    assert max(s.score for s in result.scores) < 0.5


def test_device_codes_open_at_once_during_warm_up() -> None:
    engine = DiagnosticsEngine(registry={"f1": "fridge"})
    error = Event("f1", 1, int(START.timestamp() * 1000), "error", code="F07")
    result = engine.process([error])
    assert [(d.status, d.fault, d.source) for d in result.diagnoses] == [
        ("open", "firmware_bug", "device")
    ]


def test_trend_trigger_flags_a_sustained_drift_away_not_a_swing() -> None:
    from diagnostics.baseline import BaselineTable, TrendRule

    table = BaselineTable(FEATURE_SPECS["washer"], capacity=2)
    slots = np.array([0, 1], dtype=np.intp)
    live = np.ones(2, dtype=np.bool_)
    width = len(FEATURE_SPECS["washer"].features)
    flagged = []
    rule = TrendRule(2.0, 1.5, 18 * 3_600, 1.0)
    for hour in range(48):
        z = np.zeros((2, width), dtype=np.float32)
        z[0, 3] = 2.0 + hour / 24.0  # drifts away, steadily
        z[1, 3] = 2.5 if hour % 12 < 10 else 0.5  # swings back within the hold
        slope = np.zeros((2, width), dtype=np.float32)
        slope[:, 3] = 2.0
        now = np.full(2, hour * 3_600, dtype=np.int32)
        flags = array_forms.trending(table, slots, z, slope, now, live, rule)
        flagged.append(flags[:, 3].tolist())
    assert [f[0] for f in flagged].index(True) == 18
    assert not any(f[1] for f in flagged)
    # a run ends when z falls back, and late readings change nothing
    back = np.zeros((2, width), dtype=np.float32)
    now = np.full(2, 49 * 3_600, dtype=np.int32)
    kept = array_forms.trending(table, slots, back, slope, now, ~live, rule)
    assert kept[0, 3]
    ended = array_forms.trending(table, slots, back, slope, now, live, rule)
    assert not ended.any()


def test_feature_step_matches_raw_then_update_and_late_rows_change_nothing() -> None:
    from diagnostics.features import FeatureTable

    readings = [r for r in healthy_stream() if isinstance(r, Reading)]
    washers = [r for r in readings if r.device_id.startswith("sim-washer")]
    devices = sorted({r.device_id for r in washers})
    slot = {d: i for i, d in enumerate(devices)}
    fused, plain = FeatureTable(FEATURE_SPECS["washer"]), FeatureTable(FEATURE_SPECS["washer"])
    by_device: dict[str, list[Reading]] = {d: [] for d in devices}
    for r in washers:
        by_device[r.device_id].append(r)
    for step in range(400):
        batch = [by_device[d][step] for d in devices if step < len(by_device[d])]
        slots = np.array([slot[r.device_id] for r in batch], dtype=np.intp)
        ts_ms = np.array([r.ts_ms for r in batch], dtype=np.int64)
        level, count, _, late = fused.advance(batch, slots, ts_ms)
        array_forms.update(plain, slots, ts_ms, array_forms.raw(plain, batch, slots))
        assert not late.any()
        assert np.array_equal(level, plain.level[slots], equal_nan=True)
        assert np.array_equal(count, plain.count[slots])
    for name in ("level", "spread", "trend", "count", "updated_s", "run", "last_primary"):
        assert np.array_equal(getattr(fused, name), getattr(plain, name), equal_nan=True), name
    # a reading not newer than its slot's last one is history: nothing moves
    before = {n: getattr(fused, n).copy() for n in ("level", "count", "run", "last_ts_ms")}
    stale = [by_device[devices[0]][0]]
    _, _, _, late = fused.advance(stale, np.array([0], dtype=np.intp), np.array([0], np.int64))
    assert late.tolist() == [True]
    for name, old in before.items():
        assert np.array_equal(getattr(fused, name), old, equal_nan=True), name


def _learn_by_arrays(table, slots, level, now_s, mask, z, trend):  # type: ignore[no-untyped-def]
    """The baseline update written as whole-array numpy: the oracle for the compiled loop."""
    s, x, t, zm = slots[mask], level[mask], now_s[mask][:, None], z[mask]
    count0, first = table.count[s], table.first_s[s]
    mean, var = table.mean[s], table.var[s]
    present = ~np.isnan(x)
    learnt = table.learnt_s[s]
    dt_days = np.clip((t - learnt).astype(np.float32) / np.float32(86_400.0), 0.0, 30.0)
    # the recent mean z of each feature; one that keeps to one side is not learnt
    moved = present & (zm != 0.0)
    weight_z = 1.0 - np.exp(-dt_days.astype(np.float32) / np.float32(1.0))
    side = np.where(moved, table.side_z[s] + weight_z * (zm - table.side_z[s]), table.side_z[s])
    table.side_z[s] = side
    present &= ~(moved & (np.abs(side) >= 0.8) & (trend[mask] * side > 0.0))
    gated = (count0 >= table.min_count) & (zm != 0.0)
    present &= np.abs(zm) < table.freeze_z
    inflate = np.where(gated, table._inflate, np.float32(1.0))
    table.first_s[s] = np.where(present & (count0 == 0), t, first)
    count = count0 + present
    ew = 1.0 - np.exp(-dt_days.astype(np.float32) / np.float32(table.tau_days))
    weight = np.where(present, np.maximum(1.0 / np.maximum(count, 1.0), ew), 0.0)
    delta = np.where(present, x - mean, np.float32(0.0))
    table.mean[s] = mean + weight * delta
    table.var[s] = (1.0 - weight) * (var + weight * delta * delta * inflate)
    table.count[s] = count
    table.learnt_s[s] = np.where(present, t, learnt)


def test_baseline_assess_and_learn_match_their_whole_array_forms() -> None:
    from diagnostics.baseline import BaselineTable

    spec = FEATURE_SPECS["fridge"]
    table = BaselineTable(spec, capacity=4, warmup_s=600.0)
    plain = BaselineTable(spec, capacity=4, warmup_s=600.0)
    rng = np.random.default_rng(3)
    slots = np.arange(4, dtype=np.intp)
    width = len(spec.features)
    for minute in range(400):
        level = rng.normal(5.0, 1.0, (4, width)).astype(np.float32)
        level[0] += np.float32(minute * 0.02)  # one device drifts: its deviation keeps to a side
        level[rng.random((4, width)) < 0.2] = np.nan
        now = np.full(4, minute * 60, dtype=np.int32)
        rows = table.assess(slots, level, now)
        z = array_forms.zscores(table, slots, level, now)
        assert np.array_equal(rows.warm, array_forms.warm(table, slots, now))
        assert np.array_equal(rows.z, z)
        assert np.array_equal(rows.score, array_forms.score(table, z))
        assert np.array_equal(rows.mean, table.mean[slots])
        assert np.array_equal(rows.warm_features, rows.warm.sum(axis=1))
        updates = rng.integers(0, 400, (4, width)).astype(np.float32)
        gated = table.assess(slots, level, now, updates)
        masked = np.where(updates >= table.min_count, level, np.float32(np.nan))
        assert np.array_equal(gated.level, masked, equal_nan=True)
        assert np.array_equal(gated.z, array_forms.zscores(table, slots, masked, now))
        mask = rng.random(4) < 0.8
        trend = rng.normal(0.0, 1.0, (4, width)).astype(np.float32)
        trend[0] = np.float32(0.5)  # the drifting device's level keeps heading away
        table.learn(slots, level, now, mask, rows.z, trend)
        _learn_by_arrays(
            plain, slots, level, now, mask, array_forms.zscores(plain, slots, level, now), trend
        )
    assert (table.count[1:] > 200).all()
    assert (np.abs(table.side_z[0]) >= 0.8).any()  # the drifting device stopped learning
    assert (table.count[0] < table.count[1:].min(axis=0)).any()
    for name in ("count", "learnt_s", "first_s"):
        assert np.array_equal(getattr(table, name), getattr(plain, name)), name
    # float32 exp may differ in its last bit between numpy and the compiled loop
    for name in ("mean", "var", "side_z"):
        assert np.allclose(getattr(table, name), getattr(plain, name), rtol=1e-5, atol=1e-5), name


def test_drift_matches_trend_rows_on_the_feature_tables_significance() -> None:
    from diagnostics.baseline import BaselineTable, TrendRule
    from diagnostics.features import FeatureTable

    spec = FEATURE_SPECS["heat_pump"]
    tracked = np.zeros(len(spec.features), dtype=np.bool_)
    tracked[[0, 1, 3]] = True
    fused = BaselineTable(spec, capacity=6, trend_features=tracked)
    plain = BaselineTable(spec, capacity=6, trend_features=tracked)
    features = FeatureTable(spec, capacity=6)
    rng = np.random.default_rng(11)
    slots = np.arange(6, dtype=np.intp)
    width = len(spec.features)
    columns = fused.trend_columns
    flagged = 0
    for hour in range(300):
        features.trend[:] = rng.normal(0.0, 3.0, features.trend.shape).astype(np.float32)
        features.spread[:] = rng.random(features.spread.shape).astype(np.float32)
        z = rng.normal(0.0, 2.5, (6, width)).astype(np.float32)
        z[rng.random((6, width)) < 0.1] = 0.0
        now = np.full(6, hour * 3_600, dtype=np.int32)
        live = rng.random(6) < 0.9
        rule = TrendRule(z_on=2.0, z_off=1.0, hold_s=4 * 3_600.0, min_slope_t=0.5)
        got = fused.drift(slots, z, features, now, live, rule)
        want = array_forms.trend_rows(
            plain,
            slots,
            z[:, columns],
            array_forms.slope_t(features, slots, columns),
            now,
            live,
            rule,
        )
        assert np.array_equal(got, want)
        flagged += int(got.sum())
    assert np.array_equal(fused.run_side, plain.run_side)
    assert np.array_equal(fused.run_s, plain.run_s)
    assert flagged > 0


def test_events_between_readings_keep_each_devices_order() -> None:
    engine = DiagnosticsEngine(registry={"w1": "washer", "f1": "fridge"})
    metrics = {"water_temp_c": 20.0, "drum_rpm": 0.0, "water_level_l": 0.0, "ambient_temp_c": 20.0}
    fridge = {"cabinet_temp_c": 4.0, "evaporator_temp_c": -20.0, "compressor_on": True}
    t0 = int(START.timestamp() * 1000)
    items: list[Reading | Event] = [
        Reading("w1", 1, t0, metrics, "idle"),
        Event("f1", 2, t0 + 1, "error", code="F07"),
        Reading("w1", 3, t0 + 60_000, metrics, "idle"),
        Reading("f1", 4, t0 + 2, fridge, "cooling"),
        Event("w1", 5, t0 + 60_001, "error", code="E21"),
        Reading("w1", 6, t0 + 120_000, metrics, "idle"),
    ]
    result = engine.process(items)
    assert [(s.device_id, s.ts_ms - t0) for s in result.scores if s.device_id == "w1"] == [
        ("w1", 0),
        ("w1", 60_000),
        ("w1", 120_000),
    ]
    assert [s.device_id for s in result.scores].count("f1") == 1
    # the diagnoses come in the order of the events that caused them
    assert [(d.device_id, d.status) for d in result.diagnoses] == [("f1", "open"), ("w1", "open")]
    assert engine.late_readings == 0


def test_round_masks_match_their_whole_array_form() -> None:
    from diagnostics.kernels import round_masks

    rng = np.random.default_rng(8)
    for with_fleet in (True, False):
        n = 400
        bscore = rng.random(n).astype(np.float32)
        cold = rng.random(n) < 0.3
        fscore = np.where(cold, rng.random(n), 0.0).astype(np.float32)
        flags = rng.random((n, 2)) < 0.1
        watched = rng.random(n) < 0.4
        late = rng.random(n) < 0.05
        score, drift, learn, judge = round_masks(
            bscore, fscore if with_fleet else np.zeros(0, np.float32), cold, flags, watched,
            late, 0.5, 0.3,
        )  # fmt: skip
        want = np.maximum(bscore, fscore) if with_fleet else bscore
        want_drift = flags.any(axis=1)
        want = np.where(want_drift, np.maximum(want, np.float32(0.5)), want)
        assert np.array_equal(score, want)
        assert np.array_equal(drift, want_drift)
        quiet = bscore < 0.3
        assert np.array_equal(learn, quiet & (cold | (~watched & (want < 0.3))) & ~late)
        assert np.array_equal(judge, (watched | (want >= 0.3)) & ~late)
        assert learn.any()
        assert judge.any()


def test_a_slow_one_sided_drift_is_diagnosed_before_failure() -> None:
    """A fouling coil: the efficiency falls for weeks, the baseline must not follow it."""
    import random

    from device_sim.heat_pump import HeatPump

    engine = DiagnosticsEngine(registry={"hp-1": "heat_pump"})
    pump = HeatPump(random.Random(3))
    t0 = int(START.timestamp() * 1000)
    onset_ms, failure_ms = 3 * 86_400_000, 28 * 86_400_000
    t, opened = t0, []
    for seq in range(1, 26 * 1_440):
        for _ in range(6):
            t += 10_000
            elapsed = t - t0
            share = (elapsed - onset_ms) / (failure_ms - onset_ms)
            pump.severity["coil_fouling"] = min(1.0, max(0.0, share))
            pump.step(t, 10.0)
        result = engine.process([Reading("hp-1", seq, t, pump.metrics(), pump.status())])
        opened += [(t - t0, d.fault) for d in result.diagnoses if d.status == "open"]
        if opened:
            break
    assert opened, "the drift was never diagnosed"
    at_ms, fault = opened[0]
    assert fault == "coil_fouling"
    assert onset_ms < at_ms < failure_ms


def test_new_firmware_makes_the_device_learn_its_normal_anew() -> None:
    engine = DiagnosticsEngine()
    items = healthy_stream()
    engine.process(items)
    device_id = next(i.device_id for i in items if isinstance(i, Event) and i.kind == "boot")
    boot = next(i for i in items if isinstance(i, Event) and i.device_id == device_id)
    model = engine._models[device_id]
    state = engine._state[model]
    slot = state.slots[device_id]
    learnt = state.baseline.count[slot].copy()
    assert learnt.max() > 0
    t = int(state.features.last_ts_ms[slot]) + 1_000
    same = Event(device_id, 10**6, t, "boot", data=dict(boot.data))
    engine.process([same])
    assert np.array_equal(state.baseline.count[slot], learnt)  # a plain restart keeps it
    newer = Event(device_id, 10**6 + 1, t + 1_000, "boot", data={**boot.data, "firmware": "9.9.9"})
    engine.process([newer])
    assert not state.baseline.count[slot].any()
    others = [s for d, s in state.slots.items() if d != device_id]
    assert state.baseline.count[others].max() > 0
