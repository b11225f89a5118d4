"""Diagnosis policy: hysteresis, one open diagnosis per device and fault, device codes,
late data, and the diagnosis JSON codec."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diagnostics.engine import DiagnosticsEngine
from diagnostics.features import FEATURE_SPECS
from diagnostics.model import Diagnosis, decode_diagnosis, encode_diagnosis
from diagnostics.policy import DiagnosisPolicy, PolicyConfig
from diagnostics.predictor import TimeToFailure, TrendPredictor
from wire.errors import RejectedError
from wire.protocol import Event, Reading

SPEC = FEATURE_SPECS["washer"]
T0 = 1_736_121_600_000
MIN = 60_000


def _z(**values: float) -> np.ndarray:
    z = np.zeros(len(SPEC.features), dtype=np.float32)
    for name, value in values.items():
        z[SPEC.index(name)] = value
    return z


def _feed(
    policy: DiagnosisPolicy, scores: list[float], z: np.ndarray, t0: int = T0
) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    for i, s in enumerate(scores):
        out += policy.on_score("w1", SPEC, t0 + i * MIN, s, z, z * 0.01)
    return out


def test_opens_only_after_k_updates_above_and_closes_after_m_below() -> None:
    cfg = PolicyConfig(
        open_threshold=0.5,
        close_threshold=0.2,
        open_after=3,
        close_after=4,
        open_after_s=120.0,
    )
    policy = DiagnosisPolicy(cfg)
    z = _z(spin_vibration=12.0)
    # two above, one dip: no diagnosis (not sustained)
    assert _feed(policy, [0.9, 0.9, 0.3, 0.9, 0.9], z) == []
    changes = _feed(policy, [0.9], z, T0 + 5 * MIN)
    assert [d.status for d in changes] == ["open"]
    assert changes[0].fault == "bearing_wear"
    assert changes[0].remedies[-1].part == "bearing"
    # scores between the thresholds keep it open; three low ones are not enough
    assert all(d.status != "closed" for d in _feed(policy, [0.3, 0.1, 0.1, 0.1], z, T0 + 6 * MIN))
    closed = _feed(policy, [0.1], z, T0 + 10 * MIN)
    assert [d.status for d in closed] == ["closed"]
    assert not policy.is_watched("w1")


def test_one_open_diagnosis_per_device_and_fault_without_storms() -> None:
    cfg = PolicyConfig(open_after=2, open_after_s=0.0, close_after=1000, update_every_s=6 * 3600)
    policy = DiagnosisPolicy(cfg)
    changes = _feed(policy, [0.9] * 600, _z(spin_vibration=12.0))
    opens = [d for d in changes if d.status == "open"]
    assert len(opens) == 1
    # 10 hours of high scores: at most a handful of updates, never a second open
    assert len(changes) <= 4
    assert len(policy.open_diagnoses("w1")) == 1


def test_device_code_opens_at_once_and_merges_with_the_model() -> None:
    policy = DiagnosisPolicy(PolicyConfig(open_after=2, open_after_s=0.0))
    error = Event("w1", 1, T0, "error", code="E21")
    first = policy.on_event(error, "washer")
    assert [(d.status, d.fault, d.source) for d in first] == [("open", "drain_clog", "device")]
    assert first[0].remedies[0].action == "cleaning_cycle"
    # the same code again updates the same diagnosis
    again = policy.on_event(Event("w1", 2, T0 + MIN, "error", code="E21"), "washer")
    assert all(d.status == "update" for d in again)
    # the scores agree: still one diagnosis, now from both
    changes = _feed(policy, [0.9, 0.9, 0.9], _z(drain_flow_l_min=-10.0), T0 + 2 * MIN)
    assert all(d.fault == "drain_clog" and d.status == "update" for d in changes)
    assert changes
    assert changes[-1].source == "both"
    assert len(policy.open_diagnoses("w1")) == 1


def test_boot_after_firmware_update_clears_firmware_faults_only() -> None:
    policy = DiagnosisPolicy()
    policy.on_event(Event("f1", 1, T0, "error", code="F07"), "fridge")
    policy.on_event(Event("f1", 2, T0, "error", code="E90"), "fridge")
    boot = Event(
        "f1", 3, T0 + MIN, "boot", data={"model": "fridge", "reset_reason": "restart_command"}
    )
    closed = policy.on_event(boot, "fridge")
    assert [(d.fault, d.status) for d in closed] == [("controller_hang", "closed")]
    update = Event("f1", 4, T0 + 2 * MIN, "boot", data={"reset_reason": "firmware_update"})
    assert [(d.fault, d.status) for d in policy.on_event(update, "fridge")] == [
        ("firmware_bug", "closed")
    ]
    watchdog = Event("f1", 5, T0 + 3 * MIN, "boot", data={"reset_reason": "watchdog"})
    assert [(d.fault, d.status) for d in policy.on_event(watchdog, "fridge")] == [
        ("crash_loop", "open")
    ]


def test_late_readings_change_nothing_live() -> None:
    engine = DiagnosticsEngine(registry={"w1": "washer"})
    metrics = {"water_temp_c": 20.0, "drum_rpm": 0.0, "water_level_l": 0.0, "ambient_temp_c": 20.0}
    live = [Reading("w1", i, T0 + i * MIN, metrics, "idle") for i in range(1, 50)]
    engine.process(live)
    state = engine._state["washer"]
    before = state.features.level.copy(), state.baseline.mean.copy()
    stale = Reading("w1", 999, T0, {**metrics, "water_temp_c": 90.0}, "idle")
    result = engine.process([stale])
    assert result.scores[0].late
    assert result.diagnoses == ()
    assert np.array_equal(state.features.level, before[0], equal_nan=True)
    assert np.array_equal(state.baseline.mean, before[1])
    assert engine.late_readings == 1
    # an out-of-order device code is history too
    assert engine.process([Event("w1", 1000, T0, "error", code="E21")]).diagnoses == ()


def test_diagnosis_json_round_trip_and_refusals() -> None:
    policy = DiagnosisPolicy(PolicyConfig(open_after=1, open_after_s=0.0))
    (diagnosis,) = _feed(policy, [0.9], _z(spin_vibration=12.0, tumble_power_w=3.0))
    payload = encode_diagnosis(diagnosis)
    decoded = decode_diagnosis(payload)
    assert encode_diagnosis(decoded) == payload
    assert (decoded.device_id, decoded.fault, decoded.opened_at) == (
        diagnosis.device_id,
        diagnosis.fault,
        diagnosis.opened_at,
    )
    assert decoded.remedies == diagnosis.remedies
    assert diagnosis.key == "w1/bearing_wear"
    with pytest.raises(RejectedError):
        decode_diagnosis(b"{}")
    with pytest.raises(RejectedError):
        decode_diagnosis(b"not json")
    with pytest.raises(RejectedError):
        decode_diagnosis(encode_diagnosis(diagnosis).replace(b'"open"', b'"maybe"'))


def test_updates_only_on_material_change_or_when_due() -> None:
    cfg = PolicyConfig(open_after=2, open_after_s=0.0, close_after=10_000, update_every_s=6 * 3600)
    policy = DiagnosisPolicy(cfg)
    z = _z(spin_vibration=12.0)
    # 24 hours of one reading a minute whose score wobbles by less than the confidence step
    scores = [0.9 + 0.04 * ((i % 7) - 3) / 3 for i in range(24 * 60)]
    changes = _feed(policy, scores, z)
    assert [d.status for d in changes[:1]] == ["open"]
    updates = [d for d in changes if d.status == "update"]
    # the first time-to-failure prediction is news; after that nothing material, so only
    # the periodic refresh, once per 6 h of device time
    assert changes[0].time_to_failure is None
    assert updates[0].time_to_failure is not None
    assert 2 <= len(updates) <= 5
    gaps = [(b.updated_at - a.updated_at).total_seconds() for a, b in itertools.pairwise(updates)]
    assert min(gaps) >= 6 * 3600
    # a material move (confidence down by more than the step) is sent at once
    t = T0 + 24 * 60 * MIN
    moved = _feed(policy, [0.6], z, t)
    assert [d.status for d in moved] == ["update"]
    assert _feed(policy, [0.6], z, t + MIN) == []


def test_a_drifting_wear_indicator_names_its_fault_at_a_moderate_z() -> None:
    policy = DiagnosisPolicy()
    z = _z(idle_temp_offset_k=-2.4)
    drifting = np.zeros(len(SPEC.features), dtype=np.bool_)
    drifting[SPEC.index("idle_temp_offset_k")] = True
    assert policy.drift_indicators(SPEC)[SPEC.index("idle_temp_offset_k")]
    assert not policy.drift_indicators(SPEC)[SPEC.index("error_status")]
    hypothesis = policy.name_drift(SPEC, z, drifting)
    assert hypothesis.fault == "sensor_drift"
    assert [c.feature for c in hypothesis.drivers] == ["idle_temp_offset_k"]
    # a wear fault drifts one way only: drain flow rising is no clog
    drifting[:] = False
    drifting[SPEC.index("drain_flow_l_min")] = True
    assert policy.name_drift(SPEC, _z(drain_flow_l_min=2.5), drifting).fault == "unknown"
    # without the drift, z 2.4 explains nothing; with it, a diagnosis opens
    out: list[Diagnosis] = []
    for i in range(40):
        out += policy.on_score("w1", SPEC, T0 + i * MIN, 0.5, z, z * 0.01)
    assert out == []
    drifting[:] = False
    drifting[SPEC.index("idle_temp_offset_k")] = True
    for i in range(40, 80):
        out += policy.on_score("w1", SPEC, T0 + i * MIN, 0.5, z, z * 0.01, drifting)
    assert [(d.status, d.fault) for d in out] == [("open", "sensor_drift")]


def _stream(seed: int, devices: int, steps: int) -> list[tuple[str, int, float, np.ndarray]]:
    """Readings of a few washers drifting in and out of faults, with noise and gaps."""
    rng = np.random.default_rng(seed)
    width = len(SPEC.features)
    out = []
    for step in range(steps):
        for d in range(devices):
            phase = (step // 40 + d) % 4
            z = rng.normal(0.0, 1.5, width).astype(np.float32)
            if phase == 1:
                z[SPEC.index("spin_vibration")] += 8.0 + rng.normal(0.0, 3.0)
            elif phase == 2:
                z[SPEC.index("drain_flow_l_min")] -= 6.0 + rng.normal(0.0, 2.0)
            if rng.random() < 0.05:
                z[rng.integers(width)] = np.nan
            if rng.random() < 0.05:
                z[:] = 0.0
            score = np.clip(rng.normal(0.6, 0.25) if phase else rng.normal(0.05, 0.05), 0, 1)
            # scores come as float32, like the engine's
            out.append((f"w{d}", T0 + step * MIN, float(np.float32(score)), z))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_readings_at_once_decide_as_one_at_a_time(seed: int) -> None:
    cfg = PolicyConfig(open_after=2, open_after_s=0.0, close_after=20, revise_after=3)
    one, many = DiagnosisPolicy(cfg), DiagnosisPolicy(cfg)
    stream = _stream(seed, devices=3, steps=400)
    drift_at = SPEC.index("idle_temp_offset_k")
    expected: list[bytes] = []
    got: list[bytes] = []
    for start in range(0, len(stream), 3):
        rows = stream[start : start + 3]
        z = np.stack([r[3] for r in rows])
        change = z * np.float32(0.05)
        drifting = np.zeros(z.shape, dtype=np.bool_)
        drifting[:, drift_at] = [(start // 3 + k) % 9 == 0 for k in range(len(rows))]
        for k, (device_id, ts_ms, score, _) in enumerate(rows):
            made = one.on_score(device_id, SPEC, ts_ms, score, z[k], change[k], drifting[k])
            expected += [encode_diagnosis(d) for d in made]
        changes, watched = many.on_scores(
            [r[0] for r in rows],
            SPEC,
            [r[1] for r in rows],
            np.array([r[2] for r in rows], dtype=np.float32),
            z,
            change,
            drifting,
        )
        got += [encode_diagnosis(d) for _, d in changes]
        assert watched == [one.is_watched(r[0]) for r in rows]
    statuses = {decode_diagnosis(d).status for d in expected}
    assert statuses == {"open", "update", "closed"}
    assert got == expected
    assert [encode_diagnosis(d) for d in many.open_diagnoses()] == [
        encode_diagnosis(d) for d in one.open_diagnoses()
    ]


@pytest.mark.parametrize("model", sorted(FEATURE_SPECS))
def test_rows_scored_at_once_name_the_fault_one_row_would(model: str) -> None:
    spec = FEATURE_SPECS[model]
    policy = DiagnosisPolicy()
    layout = policy._layout(spec)
    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 4.0, (500, len(spec.features))).astype(np.float32)
    z[rng.random(z.shape) < 0.03] = np.nan
    z[rng.random(z.shape) < 0.2] = 0.0
    best, evidence, totals, moved, explained = layout.evidence_rows(z, 3.0)
    named = 0
    for k in range(z.shape[0]):
        one = policy.name_fault(spec, z[k])
        fault = layout.faults[best[k]] if best[k] >= 0 else "unknown"
        if evidence[k] < policy.config.min_evidence:
            fault = "unknown"
        assert fault == one.fault
        assert evidence[k] == one.evidence
        size = np.abs(z[k].astype(np.float64))
        assert totals[k] == sum(v for v in size.tolist() if v >= 2.0)
        assert moved[k] == bool((size >= 2.0).any())
        assert explained[k] == bool((size >= 3.0).any())
        named += fault != "unknown"
    assert named > 100


class _SilentAfter(TrendPredictor):
    """A predictor that has nothing new to say once ``silent`` is set."""

    silent = False

    def predict(self, device_id: str, fault: str, t_s: float) -> TimeToFailure | None:
        return None if self.silent else super().predict(device_id, fault, t_s)


def test_a_resent_time_to_failure_counts_down_to_its_updated_at() -> None:
    cfg = PolicyConfig(open_after=2, open_after_s=0.0, close_after=30, update_every_s=3600)
    policy = DiagnosisPolicy(cfg)
    predictor = _SilentAfter()
    policy.predictor = predictor
    z = _z(spin_vibration=12.0)
    i_spin = SPEC.index("spin_vibration")
    out: list[Diagnosis] = []
    # bearing wear rising steadily for a day: the predictor has a time to failure
    for i in range(24 * 60):
        change = np.zeros(len(SPEC.features), dtype=np.float32)
        change[i_spin] = 0.3 + 0.2 * i / (24 * 60)
        out += policy.on_score("w1", SPEC, T0 + i * MIN, 0.9, z, change)
    assert any(d.time_to_failure is not None for d in out)
    last_s = (T0 + (24 * 60 - 1) * MIN) / 1000.0
    latest = predictor.predict("w1", "bearing_wear", last_s)
    assert latest is not None
    due_s = last_s + latest.p50_s  # when the latest prediction says it fails
    # then half a day with nothing new from the predictor: each update re-sends the
    # prediction as of its own time, the failure moment unchanged
    predictor.silent = True
    later: list[Diagnosis] = []
    t1 = T0 + 24 * 60 * MIN
    for i in range(12 * 60):
        later += policy.on_score("w1", SPEC, t1 + i * MIN, 0.9, z, change)
    updates = [d for d in later if d.status == "update"]
    assert len(updates) >= 10
    for d in updates:
        ttf = d.time_to_failure
        assert ttf is not None
        assert d.updated_at.timestamp() + ttf.p50_s == pytest.approx(due_s, abs=1.0)
        assert ttf.p50_s < latest.p50_s
        assert ttf.progress >= latest.progress
    # closing sends it as of the closing time too
    t2 = t1 + 12 * 60 * MIN
    closed = [
        d
        for i in range(40)
        for d in policy.on_score("w1", SPEC, t2 + i * MIN, 0.0, _z(), change * 0)
        if d.status == "closed"
    ]
    assert len(closed) == 1
    final = closed[0].time_to_failure
    assert final is not None
    assert closed[0].updated_at.timestamp() + final.p50_s == pytest.approx(due_s, abs=1.0)


def test_an_aged_prediction_counts_down_and_keeps_an_open_band_open() -> None:
    ttf = TimeToFailure(p10_s=3_600.0, p50_s=4 * 3_600.0, p90_s=365 * 86_400.0, progress=0.6)
    assert ttf.aged(0.0) == ttf
    assert ttf.aged(-5.0) == ttf
    two_hours = ttf.aged(2 * 3_600.0)
    assert two_hours.p10_s == 0.0
    assert two_hours.p50_s == 2 * 3_600.0
    assert two_hours.p90_s == 365 * 86_400.0  # open above: still open
    assert two_hours.progress == pytest.approx(0.8)
    past = ttf.aged(10 * 3_600.0)
    assert (past.p50_s, past.progress) == (0.0, 1.0)
    closed_band = TimeToFailure(p10_s=10.0, p50_s=20.0, p90_s=40.0, progress=0.5)
    assert closed_band.aged(30.0).p90_s == 10.0
