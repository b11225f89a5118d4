"""Faults change the signals the right way, are ground truth, and commands really act (no I/O)."""

from __future__ import annotations

import csv
import io
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from device_sim import Fleet, faults_to_csv, faults_to_json
from wire.errors import ConfigError

START = datetime(2024, 1, 15, tzinfo=UTC)
DAY = 86_400


def of(messages: list[tuple[str, bytes]], device_id: str, channel: str) -> list[Any]:
    topic = f"devices/{device_id}/{channel}"
    return [orjson.loads(p) for t, p in messages if t == topic]


_IDS = itertools.count(1)


def command(fleet: Fleet, device_id: str, action: str, **args: Any) -> list[Any]:
    # every command has its own id: a repeated id is answered once, not run again
    payload = orjson.dumps({"id": f"cmd-{action}-{next(_IDS)}", "action": action, "args": args})
    return of(fleet.send_command(device_id, payload), device_id, "events")


def result(events: list[Any]) -> Any:
    (answer,) = [e for e in events if e["type"] == "command_result"]
    return answer


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def step_until(fleet: Fleet, device_id: str, condition: str, limit_s: int = 3 * DAY) -> None:
    """Step 10 s at a time until the washer is idle with the door shut, or running."""
    appliance: Any = fleet.device(device_id).appliance
    for _ in range(limit_s // 10):
        idle = not appliance.running and not appliance.door_open
        if (condition == "idle" and idle) or (
            condition == "washing" and appliance.running and appliance.status() == "washing"
        ):
            return
        fleet.step(10)
    raise AssertionError(f"washer never became {condition}")


def test_bearing_wear_raises_spin_vibration_and_only_a_repair_cures_it() -> None:
    fleet = Fleet(3, start=START, seed=21, interval_s=30, models={"washer": 1.0})
    ids = fleet.device_ids
    fleet.inject(ids[0], "bearing_wear", duration_to_failure=timedelta(days=8))
    early = fleet.step(3 * DAY)
    fleet.step(2 * DAY)
    late = fleet.step(3 * DAY)

    def spin_vibration(messages: list[tuple[str, bytes]], device_id: str) -> float:
        spins = [
            r["metrics"]
            for r in of(messages, device_id, "telemetry")
            if r["metrics"]["drum_rpm"] >= 700
        ]
        assert spins
        return max(m["vibration_rms_g"] / (m["drum_rpm"] / 1000) ** 2 for m in spins)

    assert spin_vibration(late, ids[0]) > 2.0 * spin_vibration(early, ids[0])
    assert spin_vibration(late, ids[1]) < 1.5 * spin_vibration(early, ids[1]) + 0.1
    step_until(fleet, ids[0], "idle")
    test = result(command(fleet, ids[0], "selftest"))
    assert test["code"] == "E52"
    assert test["data"]["passed"] is False
    fleet.step(120)
    assert result(command(fleet, ids[0], "restart"))["ok"] is True
    fleet.step(120)
    assert "bearing_wear" in fleet.device(ids[0]).active_faults  # a restart changes nothing
    step_until(fleet, ids[0], "idle")
    test = result(command(fleet, ids[0], "selftest"))
    assert test["code"] == "E52"
    (record,) = fleet.ground_truth()
    assert (record.device_id, record.fault, record.cured_at) == (ids[0], "bearing_wear", None)
    assert record.failure_at == record.onset + timedelta(days=8)
    cured, messages = fleet.repair(ids[0], "bearing")
    assert cured == ["bearing_wear"]
    assert fleet.ground_truth()[0].cured_by == "repair:bearing"
    boot = [e for e in of(messages + fleet.step(120), ids[0], "events") if e["type"] == "boot"]
    assert boot[0]["data"]["reset_reason"] == "service"
    step_until(fleet, ids[0], "idle")
    assert result(command(fleet, ids[0], "selftest"))["code"] == "PASS"


def test_drain_clog_slows_drain_raises_e21_and_a_cleaning_cycle_clears_it() -> None:
    fleet = Fleet(1, start=START, seed=22, interval_s=20, models={"washer": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "drain_clog", duration_to_failure=timedelta(days=6))
    messages = fleet.step(5 * DAY)  # severity 0.83 at the end: above the E21 limit
    telemetry = of(messages, device_id, "telemetry")
    flows = [r["metrics"]["drain_flow_l_min"] for r in telemetry if r["status"] == "draining"]
    assert max(flows[-5:]) < 0.5 * max(flows[:5])
    step_until(fleet, device_id, "idle")
    assert result(command(fleet, device_id, "selftest"))["code"] == "E21"
    started = result(command(fleet, device_id, "cleaning_cycle"))
    assert started["ok"] is True
    done = of(fleet.step(3600), device_id, "events")
    assert [e["code"] for e in done if e["type"] == "info"] == ["cleaning_done"]
    (record,) = fleet.ground_truth()
    assert record.cured_by == "cleaning_cycle"
    assert record.cured_at is not None
    step_until(fleet, device_id, "idle")
    test = result(command(fleet, device_id, "selftest"))
    assert test["code"] == "PASS"
    assert test["data"]["drain_time_s"] < 80


def test_a_severe_clog_needs_the_technician() -> None:
    fleet = Fleet(1, start=START, seed=23, interval_s=60, models={"washer": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "drain_clog", duration_to_failure=timedelta(days=1))
    messages = fleet.step(3 * DAY)
    errors = [e for e in of(messages, device_id, "events") if e["type"] == "error"]
    assert errors
    assert {e["code"] for e in errors} == {"E21"}
    assert errors[-1]["data"]["drain_time_s"] > 300
    step_until(fleet, device_id, "idle")
    assert result(command(fleet, device_id, "cleaning_cycle"))["ok"] is True
    fleet.step(7200)
    assert "drain_clog" in fleet.device(device_id).active_faults
    with pytest.raises(ConfigError):
        fleet.repair(device_id, "compressor")
    cured, _ = fleet.repair(device_id, "drain_pump")
    assert cured == ["drain_clog"]


def test_refrigerant_leak_raises_duty_and_cabinet_temperature() -> None:
    fleet = Fleet(2, start=START, seed=24, interval_s=60, models={"fridge": 1.0})
    sick, healthy = fleet.device_ids
    fleet.inject(sick, "refrigerant_leak", duration_to_failure=timedelta(days=10))
    early = fleet.step(DAY)
    fleet.step(8 * DAY)
    late = fleet.step(DAY)

    def stats(messages: list[tuple[str, bytes]], device_id: str) -> tuple[float, float]:
        metrics = [r["metrics"] for r in of(messages, device_id, "telemetry")]
        return (
            mean([m["compressor_duty"] for m in metrics]),
            mean([m["cabinet_temp_c"] for m in metrics]),
        )

    duty_early, cabinet_early = stats(early, sick)
    duty_late, cabinet_late = stats(late, sick)
    assert duty_late > 0.95
    assert duty_late > duty_early + 0.3
    assert cabinet_late > cabinet_early + 2.0
    assert abs(stats(late, healthy)[0] - stats(early, healthy)[0]) < 0.15
    assert "E11" in {e.get("code") for e in of(late, sick, "events")}
    test = result(command(fleet, sick, "selftest"))
    assert test["code"] == "E14"
    assert test["data"]["suction_pressure_bar"] < 0.5
    assert result(command(fleet, healthy, "selftest"))["code"] == "PASS"
    assert result(command(fleet, sick, "restart"))["ok"] is True
    fleet.step(600)
    assert "refrigerant_leak" in fleet.device(sick).active_faults


def test_coil_fouling_lowers_cop() -> None:
    # twins: same seed, same weather; only one gets the fault
    twin = Fleet(1, start=START, seed=25, interval_s=60, models={"heat_pump": 1.0})
    fleet = Fleet(1, start=START, seed=25, interval_s=60, models={"heat_pump": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "coil_fouling", duration_to_failure=timedelta(days=6))
    early, twin_early = fleet.step(DAY), twin.step(DAY)
    fleet.step(4 * DAY)
    twin.step(4 * DAY)
    late, twin_late = fleet.step(DAY), twin.step(DAY)

    def cop(messages: list[tuple[str, bytes]]) -> float:
        return mean(
            [
                r["metrics"]["cop"]
                for r in of(messages, device_id, "telemetry")
                if r["status"] == "heating" and "cop" in r["metrics"]
            ]
        )

    assert cop(early) > 0.9 * cop(twin_early)
    assert cop(late) < 0.75 * cop(twin_late)
    assert result(command(twin, device_id, "selftest"))["code"] == "PASS"
    test = result(command(fleet, device_id, "selftest"))
    assert test["code"] == "E61"
    result(command(fleet, device_id, "cleaning_cycle"))
    fleet.step(600)
    assert "coil_fouling" in fleet.device(device_id).active_faults  # a defrost is no wash


def test_stuck_sensor_flatlines_and_fools_the_thermostat() -> None:
    fleet = Fleet(1, start=START, seed=26, interval_s=30, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    fleet.step(3600)
    fleet.inject(device_id, "sensor_stuck", value=6.0)
    messages = fleet.step(6 * 3600)
    metrics = [r["metrics"] for r in of(messages, device_id, "telemetry")]
    assert {m["cabinet_temp_c"] for m in metrics[5:]} == {6.0}
    assert metrics[-1]["compressor_duty"] > 0.9  # it thinks the cabinet is warm
    assert fleet.device(device_id).appliance.true_primary_c() < 0.0
    test = result(command(fleet, device_id, "selftest"))
    assert test["code"] == "E32"
    assert test["data"]["sensor_flatline"] is True
    (record,) = fleet.ground_truth()
    assert record.failure_at is None
    assert record.fault == "sensor_stuck"


def test_drifting_sensor_is_caught_by_the_plausibility_check() -> None:
    fleet = Fleet(1, start=START, seed=27, interval_s=60, models={"washer": 1.0})
    (device_id,) = fleet.device_ids
    fleet.step(60)
    assert result(command(fleet, device_id, "selftest"))["code"] == "PASS"
    fleet.inject(device_id, "sensor_drift", duration_to_failure=DAY, value=5.0)
    fleet.step(DAY)
    step_until(fleet, device_id, "idle")
    fleet.step(3600)
    test = result(command(fleet, device_id, "selftest"))
    assert test["code"] == "E31"
    assert 4.0 < test["data"]["sensor_delta_k"] < 6.0


def test_firmware_bug_survives_a_restart_and_a_firmware_update_cures_it() -> None:
    fleet = Fleet(1, start=START, seed=28, interval_s=60, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "firmware_bug")
    events = of(fleet.step(DAY), device_id, "events")
    assert sum(1 for e in events if e.get("code") == "F07") >= 3
    assert result(command(fleet, device_id, "restart"))["ok"] is True
    events = of(fleet.step(DAY), device_id, "events")
    assert any(e["type"] == "boot" for e in events)
    assert any(e.get("code") == "F07" for e in events)
    assert result(command(fleet, device_id, "firmware_update", version="2.3.0"))["ok"] is False
    answer = result(command(fleet, device_id, "firmware_update", version="2.4.0"))
    assert answer["ok"] is True
    assert "2.4.0" in answer["detail"]
    events = of(fleet.step(DAY), device_id, "events")
    assert [e["data"]["firmware"] for e in events if e["type"] == "boot"] == ["2.4.0"]
    assert not any(e.get("code") == "F07" for e in events)
    (record,) = fleet.ground_truth()
    assert record.cured_by == "firmware_update"
    again = result(command(fleet, device_id, "firmware_update", version="2.4.0"))
    assert again["ok"] is True
    assert "nothing to do" in again["detail"]


def test_crash_loop_reboots_with_gaps_until_a_firmware_update() -> None:
    fleet = Fleet(1, start=START, seed=29, models={"heat_pump": 1.0})
    (device_id,) = fleet.device_ids
    fleet.step(600)
    fleet.inject(device_id, "crash_loop")
    messages = fleet.step(3 * 3600)
    boots = [e for e in of(messages, device_id, "events") if e["type"] == "boot"]
    assert len(boots) >= 6
    assert {b["data"]["reset_reason"] for b in boots} == {"watchdog"}
    ts = [r["ts"] for r in of(messages, device_id, "telemetry")]
    assert max(b - a for a, b in itertools.pairwise(ts)) >= 30_000  # gaps
    assert len(ts) < 3 * 360 - 6 * 3
    statuses = [p for t, p in messages if t.endswith("/status")]
    assert statuses.count(b"offline") == len(boots)
    # restart: no cure (the bug is in the firmware)
    while not fleet.device(device_id).connected:
        fleet.step(10)
    assert result(command(fleet, device_id, "restart"))["ok"] is True
    boots = [e for e in of(fleet.step(3 * 3600), device_id, "events") if e["type"] == "boot"]
    assert len(boots) >= 4
    while not fleet.device(device_id).connected:
        fleet.step(10)
    assert result(command(fleet, device_id, "firmware_update", version="2.5.1"))["ok"] is True
    boots = [e for e in of(fleet.step(3 * 3600), device_id, "events") if e["type"] == "boot"]
    assert [b["data"]["reset_reason"] for b in boots] == ["firmware_update"]


def test_controller_hang_is_cured_by_a_restart() -> None:
    fleet = Fleet(1, start=START, seed=30, interval_s=30, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "controller_hang")
    messages = fleet.step(3 * 3600)
    assert "E90" in {e.get("code") for e in of(messages, device_id, "events")}
    telemetry = of(messages, device_id, "telemetry")
    assert telemetry[-1]["status"] == "error"
    assert telemetry[-1]["metrics"]["cabinet_temp_c"] > 6.0  # the compressor stopped
    assert result(command(fleet, device_id, "restart"))["ok"] is True
    telemetry = of(fleet.step(3 * 3600), device_id, "telemetry")
    assert telemetry[-1]["status"] != "error"
    assert telemetry[-1]["metrics"]["cabinet_temp_c"] < 6.0
    (record,) = fleet.ground_truth()
    assert record.cured_by == "restart"


def test_washer_refuses_to_interrupt_a_wash_or_with_the_door_open() -> None:
    fleet = Fleet(1, start=START, seed=31, models={"washer": 1.0})
    (device_id,) = fleet.device_ids
    fleet.inject(device_id, "firmware_bug")
    step_until(fleet, device_id, "washing")
    for action, args in (
        ("restart", {}),
        ("firmware_update", {"version": "3.0.0"}),
        ("cleaning_cycle", {}),
    ):
        answer = result(command(fleet, device_id, action, **args))
        assert answer["ok"] is False
        assert answer["detail"] == "refused: a wash is running; will be possible after the cycle"
    assert fleet.device(device_id).firmware == "2.3.1"
    assert "firmware_bug" in fleet.device(device_id).active_faults
    test = result(command(fleet, device_id, "selftest"))
    assert test["ok"] is True
    assert test["data"]["mode"] == "passive"
    appliance: Any = fleet.device(device_id).appliance
    step_until(fleet, device_id, "idle")
    appliance.door_open = True  # the owner opens the door
    answer = result(command(fleet, device_id, "restart"))
    assert answer["ok"] is False
    assert "door is open" in answer["detail"]
    appliance.door_open = False
    assert result(command(fleet, device_id, "firmware_update", version="3.0.0"))["ok"] is True


def test_config_set_changes_the_device() -> None:
    fleet = Fleet(1, start=START, seed=32, interval_s=30, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    fleet.step(3600)
    assert result(command(fleet, device_id, "config_set", setpoint_c=7.0))["ok"] is True
    assert result(command(fleet, device_id, "config_set", colour=1.0))["ok"] is False
    assert result(command(fleet, device_id, "config_set", setpoint_c=30.0))["ok"] is False
    assert result(command(fleet, device_id, "config_set", interval_s=60))["ok"] is True
    telemetry = of(fleet.step(6 * 3600), device_id, "telemetry")
    assert len(telemetry) == 6 * 60
    assert 6.0 < mean([r["metrics"]["cabinet_temp_c"] for r in telemetry[60:]]) < 8.0


def test_offline_devices_answer_commands_once_they_are_back_and_bad_ones_are_dropped() -> None:
    fleet = Fleet(1, start=START, seed=33)
    (device_id,) = fleet.device_ids
    fleet.step(60)
    assert fleet.send_command(device_id, b"not json") == []
    assert fleet.device(device_id).core.bad_commands == 1
    fleet.schedule_outage(device_id, duration=600)
    fleet.step(10)
    assert command(fleet, device_id, "selftest") == []  # held in its session
    assert fleet.device(device_id).commands_held == 1
    later = of(fleet.step(600), device_id, "events")
    assert [e["type"] for e in later if e.get("command_id")] == ["selftest", "command_result"]
    assert result(later)["ok"] is True


def test_a_command_sent_while_the_device_reboots_runs_once_after_it_is_back() -> None:
    fleet = Fleet(1, start=START, seed=35, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    fleet.step(60)
    first = orjson.dumps({"id": "c-restart", "action": "restart", "args": {}})
    answered = of(fleet.send_command(device_id, first), device_id, "events")
    assert result(answered)["ok"] is True
    assert not fleet.device(device_id).connected  # rebooting
    second = orjson.dumps({"id": "c-during", "action": "restart", "args": {}})
    assert fleet.send_command(device_id, second) == []
    assert fleet.send_command(device_id, second) == []  # the broker delivered it twice
    after = fleet.step(600)
    events = of(after, device_id, "events")
    boots = [e for e in events if e["type"] == "boot"]
    results = [e for e in events if e["type"] == "command_result"]
    assert [r["command_id"] for r in results] == ["c-during"]  # run once, not twice
    assert boots[0]["data"]["reset_reason"] == "restart_command"
    assert boots[0]["data"]["clean_shutdown"] is True
    assert len(boots) == 2  # the reboot it asked for, once
    again = of(fleet.send_command(device_id, first), device_id, "events")
    assert again == []  # an old id again: answered before, not run again
    assert fleet.device(device_id).core.duplicates == 2


def test_random_schedule_and_ground_truth_export() -> None:
    fleet = Fleet(20, start=START, seed=34, interval_s=120, fault_rate_per_device_month=15.0)
    fleet.step(4 * DAY)
    records = fleet.ground_truth()
    assert len(records) >= 20
    assert all(START <= r.onset <= fleet.now for r in records)
    for record in records:
        model = fleet.device(record.device_id).model
        assert record.model == model
        assert record.fault in {
            "bearing_wear",
            "drain_clog",
            "refrigerant_leak",
            "coil_fouling",
            "sensor_drift",
            "sensor_stuck",
            "firmware_bug",
            "crash_loop",
            "controller_hang",
        }
        gradual = record.fault in {
            "bearing_wear",
            "drain_clog",
            "refrigerant_leak",
            "coil_fouling",
            "sensor_drift",
        }
        assert (record.failure_at is not None) == gradual
    cured = [r for r in records if r.cured_at is not None]
    assert all(r.cured_by == "watchdog_reboot" for r in cured)  # only a crash cures a hang
    rows = list(csv.DictReader(io.StringIO(faults_to_csv(records))))
    assert len(rows) == len(records)
    assert rows[0]["onset"] == records[0].onset.isoformat()
    assert orjson.loads(faults_to_json(records)) == [r.to_dict() for r in records]
    with pytest.raises(ConfigError):
        fleet.inject(fleet.device_ids[0], "coil_fouling")  # a washer has no coil
