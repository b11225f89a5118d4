"""The fault catalog: every simulator code maps to the right fault, remedies in order, and
each wear fault's failure level is what the simulated product shows when it fails."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from device_sim import FAULTS, MODEL_NAMES, FaultName, Fleet, ModelName, faults_for_model
from diagnostics.catalog import CATALOG
from diagnostics.features import FEATURE_SPECS, extract_features
from wire.protocol import decode_reading

# the device codes the simulator's firmware and self-test send, per fault
SIM_CODES = {
    "drain_clog": {"E21"},
    "bearing_wear": {"E52"},
    "refrigerant_leak": {"E11", "E14"},
    "coil_fouling": {"E61"},
    "sensor_drift": {"E31"},
    "sensor_stuck": {"E32"},
    "firmware_bug": {"F07"},
    "controller_hang": {"E90"},
}


def test_every_model_has_a_catalog() -> None:
    assert set(CATALOG) == set(MODEL_NAMES)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_catalog_names_the_simulator_faults(model: str) -> None:
    assert set(CATALOG[model].faults) == set(faults_for_model(model))


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_simulator_code_maps_to_its_fault(model: str) -> None:
    table = CATALOG[model]
    for fault in faults_for_model(model):
        for code in SIM_CODES.get(fault, set()):
            entry = table.by_code(code)
            assert entry is not None, code
            assert entry.fault == fault
    assert table.by_code("PASS") is None
    assert table.by_code("cleaning_done") is None


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_watchdog_reboots_mean_a_crash_loop(model: str) -> None:
    entry = CATALOG[model].by_boot_reason("watchdog")
    assert entry is not None
    assert entry.fault == "crash_loop"
    assert CATALOG[model].by_boot_reason("power_on") is None


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_remedies_are_ordered_remote_first_and_match_the_cures(model: str) -> None:
    for fault, entry in CATALOG[model].faults.items():
        spec = FAULTS[fault]  # type: ignore[index]
        kinds = [r.kind for r in entry.remedies]
        assert kinds == sorted(kinds, key=lambda k: k != "remote"), fault
        curing = [r for r in entry.remedies if r.cures]
        assert curing, fault
        if spec.remote_cure is not None:
            # the remote cure is the first curing remedy to try
            assert curing[0].action == spec.remote_cure, fault
        if spec.repair_part is not None:
            parts = [r.part for r in entry.remedies if r.kind == "service"]
            assert parts == [spec.repair_part], fault
        else:
            assert all(r.kind == "remote" for r in entry.remedies), fault
        # a restart never cures a firmware fault
        if fault in ("firmware_bug", "crash_loop"):
            assert all(r.action != "restart" for r in entry.remedies)


def test_gradual_faults_have_a_degradation_and_signatures_name_model_features() -> None:
    from diagnostics.features import FEATURE_SPECS

    for model, table in CATALOG.items():
        names = set(FEATURE_SPECS[model].names)
        for fault, entry in table.faults.items():
            assert entry.gradual == FAULTS[fault].gradual  # type: ignore[index]
            if entry.gradual:
                assert entry.degradation is not None
                assert entry.degradation.feature in names
            assert {s.feature for s in entry.signature} <= names


# -- degradation levels against the simulated products ----------------------------------

_START = datetime(2025, 1, 6, tzinfo=UTC)
_ONSET_DAYS = 2.5
_TO_FAILURE_DAYS = 2.5
_AFTER_DAYS = 1.5
# the mean change at failure over the devices may differ from the catalog's by this share
_MEAN_TOLERANCE = 0.1
# the indicator's share of its failure change over progress 0.6..0.8 against the shape's
_SHAPE_TOLERANCE = 0.1


def _indicator_runs(
    model: ModelName, fault: FaultName, value: float | None, devices: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per device: days from onset and the indicator's raw values, fault run to failure."""
    entry = CATALOG[model].faults[fault]
    assert entry.degradation is not None
    spec = FEATURE_SPECS[model]
    column = spec.index(entry.degradation.feature)
    fleet = Fleet(devices, start=_START, models={model: 1.0}, seed=seed, interval_s=60.0)
    onset = _START + timedelta(days=_ONSET_DAYS)
    for device in fleet.devices:
        fleet.inject(
            device.device_id,
            fault,
            at=onset,
            duration_to_failure=timedelta(days=_TO_FAILURE_DAYS),
            value=value,
        )
    seen: dict[str, tuple[list[float], list[float]]] = {
        d.device_id: ([], []) for d in fleet.devices
    }
    end = onset + timedelta(days=_TO_FAILURE_DAYS + _AFTER_DAYS)
    onset_s = onset.timestamp()
    for batch in fleet.iter_until(end):
        for emit_ms, topic, payload in batch:
            if not topic.endswith("/telemetry"):
                continue
            device_id = topic.split("/")[1]
            reading = decode_reading(device_id, payload, emit_ms)
            x = extract_features(spec, reading)[column]
            if math.isfinite(x):
                days, values = seen[device_id]
                days.append((reading.ts_ms / 1000.0 - onset_s) / 86_400.0)
                values.append(x)
    return [(np.array(t), np.array(v)) for t, v in seen.values()]


_WEAR_CASES = [
    # model, fault, injected value (sensor drift: its offset at failure, K), direction,
    # devices, tolerance of one device's change (washers spin and drain about once a day,
    # so more of them; a fridge's leak ends at the same evaporator level, but its healthy
    # level, and so the change, differs by fridge: 4.2 to 6.5 K)
    ("washer", "bearing_wear", None, 1, 8, 0.1),
    ("washer", "drain_clog", None, -1, 8, 0.05),
    ("fridge", "refrigerant_leak", None, 1, 8, 0.3),
    ("heat_pump", "coil_fouling", None, -1, 4, 0.15),
    ("washer", "sensor_drift", 5.0, 1, 3, 0.05),
    ("washer", "sensor_drift", -5.0, -1, 3, 0.05),
    ("fridge", "sensor_drift", 5.0, -1, 3, 0.1),  # a cabinet sensor reading high: -4 K
    ("fridge", "sensor_drift", -5.0, 1, 3, 0.1),
    ("heat_pump", "sensor_drift", 5.0, 1, 3, 0.05),
    ("heat_pump", "sensor_drift", -5.0, -1, 3, 0.05),
]


@pytest.mark.parametrize(
    ("model", "fault", "value", "direction", "devices", "device_tolerance"), _WEAR_CASES
)
def test_failure_delta_is_the_indicator_change_at_the_simulated_failure(
    model: ModelName,
    fault: FaultName,
    value: float | None,
    direction: int,
    devices: int,
    device_tolerance: float,
) -> None:
    """Run simulated devices with the fault to failure and compare with the catalog.

    The change is the indicator's mean over the days after failure (severity at 1) minus
    its mean over the healthy days before onset; the catalog's shape must give its share
    of that change on the way.
    """
    degradation = CATALOG[model].faults[fault].degradation
    assert degradation is not None
    expected = degradation.failure_delta
    if direction * expected < 0:
        assert degradation.two_sided
        opposite = degradation.opposite_delta
        expected = -expected if opposite is None else opposite
    changes, shares = [], []
    for t, x in _indicator_runs(model, fault, value, devices, seed=11):
        healthy = x[(t > 0.5 - _ONSET_DAYS) & (t < 0.0)]
        failed = x[t >= _TO_FAILURE_DAYS]
        if healthy.size < 5 or failed.size < 5:
            continue  # a washer that did not spin (or drain) in a window
        change = float(failed.mean() - healthy.mean())
        assert change == pytest.approx(expected, rel=device_tolerance), (change, expected)
        changes.append(change)
        mid = (t >= 0.6 * _TO_FAILURE_DAYS) & (t < 0.8 * _TO_FAILURE_DAYS)
        if mid.sum() >= 5:
            progress = t[mid] / _TO_FAILURE_DAYS
            share = float((x[mid] - healthy.mean()).mean() / change)
            shares.append((share, float((progress**degradation.shape).mean())))
    assert len(changes) >= 2
    assert float(np.mean(changes)) == pytest.approx(expected, rel=_MEAN_TOLERANCE)
    assert shares
    measured = float(np.mean([s for s, _ in shares]))
    stated = float(np.mean([p for _, p in shares]))
    assert measured == pytest.approx(stated, abs=_SHAPE_TOLERANCE)
