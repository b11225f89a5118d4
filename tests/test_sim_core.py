"""The simulated fleet's pure core: determinism, signals, contract, backfill, speed (no I/O)."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from device_sim import Fleet, assign_models
from wire.errors import ConfigError
from wire.protocol import decode_event, decode_reading, split_device_topic

START = datetime(2024, 1, 15, tzinfo=UTC)
DAY = 86_400


def parse(messages: list[tuple[str, bytes]]) -> dict[str, dict[str, list[Any]]]:
    """device id -> channel -> decoded payloads, in order."""
    out: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for topic, payload in messages:
        split = split_device_topic(topic)
        assert split is not None, topic
        device_id, channel = split
        body = payload.decode() if channel == "status" else orjson.loads(payload)
        out[device_id][channel].append(body)
    return out


def test_same_seed_gives_identical_bytes() -> None:
    def run(seed: int) -> list[tuple[str, bytes]]:
        fleet = Fleet(
            6,
            start=START,
            seed=seed,
            fault_rate_per_device_month=60.0,
            outage_rate_per_device_month=60.0,
        )
        messages = fleet.step(3 * 3600)
        fleet.inject(fleet.device_ids[0], "bearing_wear", duration_to_failure=DAY)
        messages += fleet.send_command(fleet.device_ids[1], b'{"id":"c1","action":"selftest"}')
        return messages + fleet.step(3 * 3600)

    first, second = run(7), run(7)
    assert first == second
    assert len(first) > 6 * 6 * 300
    assert run(8) != first


def test_model_mix_is_even_and_stable() -> None:
    models = assign_models(30, {"washer": 1.0, "fridge": 1.0, "heat_pump": 1.0})
    assert models.count("washer") == models.count("fridge") == models.count("heat_pump") == 10
    assert assign_models(7, {"washer": 2.0, "fridge": 1.0})[:6] == models[:0] + assign_models(
        6, {"washer": 2.0, "fridge": 1.0}
    )
    assert assign_models(6, {"washer": 2.0, "fridge": 1.0}).count("washer") == 4
    with pytest.raises(ConfigError):
        assign_models(3, {"toaster": 1.0})  # type: ignore[dict-item]


def test_every_message_passes_the_gateway_codec_and_seq_increments() -> None:
    fleet = Fleet(9, start=START, seed=3, interval_s=30, fault_rate_per_device_month=60.0)
    messages = fleet.step(DAY)
    last_seq: dict[str, int] = {}
    last_ts: dict[str, int] = {}
    now_ms = fleet.now_ms
    for topic, payload in messages:
        split = split_device_topic(topic)
        assert split is not None
        device_id, channel = split
        if channel == "status":
            assert payload in (b"online", b"offline")
            continue
        if channel == "telemetry":
            message: Any = decode_reading(device_id, payload, now_ms)
        else:
            message = decode_event(device_id, payload, now_ms)
        assert message.seq == last_seq.get(device_id, 0) + 1
        assert message.ts_ms >= last_ts.get(device_id, 0)
        last_seq[device_id] = message.seq
        last_ts[device_id] = message.ts_ms
    assert len(last_seq) == 9
    assert fleet.readings_per_device() == {
        d: sum(1 for t, _ in messages if t == f"devices/{d}/telemetry") for d in fleet.device_ids
    }


def test_first_messages_are_online_then_boot() -> None:
    fleet = Fleet(3, start=START, seed=1)
    parsed = parse(fleet.step(60))
    for device_id, channels in parsed.items():
        assert channels["status"] == ["online"]
        boot = channels["events"][0]
        assert boot["type"] == "boot"
        assert boot["seq"] == 1
        assert boot["data"]["firmware"] == "2.3.1"
        assert boot["data"]["reset_reason"] == "power_on"
        assert fleet.device(device_id).model == boot["data"]["model"]
        # every 10 s of sim time a reading (6 in the first minute)
        assert len(channels["telemetry"]) == 6


def _values(readings: list[Any], name: str) -> list[Any]:
    return [r["metrics"][name] for r in readings if name in r["metrics"]]


def test_signals_are_plausible_for_each_model() -> None:
    fleet = Fleet(9, start=START, seed=11, interval_s=20)
    parsed = parse(fleet.step(2 * DAY))
    by_model: dict[str, list[Any]] = defaultdict(list)
    for device_id, channels in parsed.items():
        by_model[fleet.device(device_id).model] += channels["telemetry"]
    for readings in by_model.values():
        for name in readings[0]["metrics"]:
            for value in _values(readings, name):
                if isinstance(value, float) and name.endswith(("_c", "_l", "_k")):
                    assert round(value, 1) == value, (name, value)  # 0.1 steps
                if name in ("drum_rpm", "power_w", "compressor_hz", "heat_output_w"):
                    assert value == int(value), (name, value)  # whole numbers

    washer = by_model["washer"]
    assert {r["status"] for r in washer} >= {"idle", "filling", "heating", "washing", "spinning"}
    water = _values(washer, "water_temp_c")
    assert min(water) >= 10.0
    assert max(water) <= 65.0
    rpm = _values(washer, "drum_rpm")
    assert max(rpm) in (800.0, 1000.0, 1200.0, 1400.0)
    assert min(rpm) == 0.0
    spin_vibration = [
        r["metrics"]["vibration_rms_g"] for r in washer if r["metrics"]["drum_rpm"] >= 1000
    ]
    assert spin_vibration
    assert 0.2 < max(spin_vibration) < 1.5
    assert 1800.0 < max(_values(washer, "power_w")) < 2300.0
    assert any(_values(washer, "door_open"))

    fridge = by_model["fridge"]
    assert {r["status"] for r in fridge} == {"cooling", "idle", "defrost"}
    cabinet = _values(fridge, "cabinet_temp_c")
    assert min(cabinet) > 1.5
    assert max(cabinet) < 12.0
    assert 3.5 < sorted(cabinet)[len(cabinet) // 2] < 4.8
    duty = _values(fridge, "compressor_duty")
    assert 0.2 < sum(duty) / len(duty) < 0.6
    on = _values(fridge, "compressor_on")
    switches = sum(1 for a, b in itertools.pairwise(on) if a != b)
    assert switches > 3 * 2 * 24  # cycling, more than once an hour per fridge

    heat_pump = by_model["heat_pump"]
    assert {"heating", "dhw", "defrost"} <= {r["status"] for r in heat_pump}
    outdoor = _values(heat_pump, "outdoor_temp_c")
    assert -20.0 < min(outdoor) < max(outdoor) < 20.0
    cop = _values(heat_pump, "cop")
    assert 1.5 < sorted(cop)[len(cop) // 2] < 5.0
    flow = _values(heat_pump, "flow_temp_c")
    assert min(flow) > 20.0
    assert max(flow) < 60.0
    hz = [h for h in _values(heat_pump, "compressor_hz") if h]
    assert 20.0 <= min(hz) < max(hz) <= 90.0  # it modulates


def test_heat_pump_modulates_with_outdoor_temperature() -> None:
    fleet = Fleet(4, start=START, seed=5, interval_s=60, models={"heat_pump": 1.0})
    parsed = parse(fleet.step(3 * DAY))
    pairs = [
        (r["metrics"]["outdoor_temp_c"], r["metrics"]["compressor_hz"])
        for channels in parsed.values()
        for r in channels["telemetry"]
        if r["status"] == "heating"
    ]
    cold = [hz for t, hz in pairs if t < 0.0]
    mild = [hz for t, hz in pairs if t > 5.0]
    assert cold
    assert mild
    assert sum(cold) / len(cold) > sum(mild) / len(mild) + 5.0


def test_ambient_follows_a_daily_cycle() -> None:
    fleet = Fleet(1, start=START, seed=2, models={"heat_pump": 1.0})
    readings = parse(fleet.step(4 * DAY))[fleet.device_ids[0]]["telemetry"]
    by_hour: dict[int, list[float]] = defaultdict(list)
    for r in readings:
        by_hour[(r["ts"] // 3_600_000 + 1) % 24].append(r["metrics"]["outdoor_temp_c"])
    mean = {h: sum(v) / len(v) for h, v in by_hour.items()}
    assert mean[15] > mean[4] + 3.0  # afternoon warmer than the small hours


def test_backfill_keeps_original_ts_and_seq() -> None:
    fleet = Fleet(2, start=START, seed=4, models={"fridge": 1.0})
    device_id = fleet.device_ids[0]
    fleet.step(600)
    outage_start = fleet.now
    fleet.schedule_outage(device_id, duration=timedelta(hours=1))
    during = parse(fleet.step(1800))
    assert during[device_id]["status"] == ["offline"]
    assert "telemetry" not in during[device_id]
    assert fleet.device(device_id).buffered == 180
    assert len(during[fleet.device_ids[1]]["telemetry"]) == 180
    after = fleet.step(1800 + 60)
    parsed = parse(after)[device_id]
    assert parsed["status"] == ["online"]
    telemetry = parsed["telemetry"]
    reconnect_ms = round((outage_start + timedelta(hours=1)).timestamp() * 1000)
    late = [r for r in telemetry if r["ts"] < reconnect_ms]
    assert len(late) == 360  # an hour of readings, published late
    assert late[0]["ts"] >= outage_start.timestamp() * 1000
    seqs = [r["seq"] for r in telemetry]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # the backlog goes out first, right after "online", in its original order
    first_after = [t for t, _ in after if t.startswith(f"devices/{device_id}/")][:3]
    assert first_after[0].endswith("/status")
    assert fleet.device(device_id).buffered == 0


def test_offline_buffer_is_bounded() -> None:
    fleet = Fleet(1, start=START, seed=4, buffer_limit=50)
    device_id = fleet.device_ids[0]
    fleet.step(60)
    fleet.schedule_outage(device_id, duration=3600)
    fleet.step(1800)
    device = fleet.device(device_id)
    assert device.buffered == 50
    assert device.dropped == 180 - 50


def test_random_outages_come_back_with_backfill() -> None:
    fleet = Fleet(5, start=START, seed=9, outage_rate_per_device_month=90.0, outage_mean_s=600)
    messages = fleet.step(2 * DAY)
    statuses = [p for t, p in messages if t.endswith("/status")]
    assert statuses.count(b"offline") >= 3
    total = sum(fleet.readings_per_device().values())
    buffered = sum(d.buffered for d in fleet.devices)
    expected = 5 * 2 * DAY // 10
    assert total + buffered == expected  # nothing lost, only late


def test_many_devices_step_fast() -> None:
    fleet = Fleet(2000, start=START, seed=1)
    began = time.perf_counter()
    messages = fleet.step(300)
    elapsed = time.perf_counter() - began
    readings = sum(fleet.readings_per_device().values())
    assert readings == 2000 * 30
    assert len(messages) >= readings
    assert readings / elapsed > 10_000  # devices x readings per second


def test_times_must_be_aware() -> None:
    with pytest.raises(ConfigError):
        Fleet(1, start=datetime(2024, 1, 1))
    fleet = Fleet(1, start=START)
    with pytest.raises(ConfigError):
        fleet.device("nope")


def test_a_power_cut_while_offline_keeps_the_outbox_and_backfills_it() -> None:
    fleet = Fleet(1, start=START, seed=6, models={"fridge": 1.0})
    (device_id,) = fleet.device_ids
    device = fleet.device(device_id)
    before = parse(fleet.step(600))[device_id]
    fleet.schedule_outage(device_id, duration=timedelta(hours=2))
    fleet.schedule_power_cut(device_id, at=fleet.now + timedelta(minutes=30), duration=1800)
    during = parse(fleet.step(2 * 3600 - 60))[device_id]
    assert "telemetry" not in during
    assert during["status"] == ["offline"]
    held = device.buffered
    assert held == device.readings_taken - len(before["telemetry"]) + 1  # + the boot event
    after = parse(fleet.step(3600))[device_id]
    telemetry = before["telemetry"] + after["telemetry"]
    assert len(telemetry) == device.readings_taken  # nothing lost, nothing twice
    assert device.buffered == 0
    seqs = [r["seq"] for r in telemetry]
    assert len(set(seqs)) == len(seqs)
    assert seqs == sorted(seqs)
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(telemetry)]
    assert max(gaps) >= 1_800_000  # no readings while the power was off
    (boot,) = [e for e in after["events"] if e["type"] == "boot"]
    assert boot["data"]["reset_reason"] == "power_on"
    assert boot["data"]["clean_shutdown"] is False
