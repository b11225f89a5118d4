"""The fault catalog: every simulator code maps to the right fault, remedies in order."""

from __future__ import annotations

import pytest

from device_sim import FAULTS, MODEL_NAMES, faults_for_model
from diagnostics.catalog import CATALOG

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
