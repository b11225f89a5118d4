"""Unit tests of the device contract codec: every hostile payload is refused with a reason."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire.errors import RejectedError
from wire.protocol import (
    Command,
    Event,
    Limits,
    Reading,
    decode_command,
    decode_event,
    decode_reading,
    encode_command,
    encode_event,
    encode_reading,
    split_device_topic,
)

NOW_MS = 1_760_000_000_000


def payload(**overrides: object) -> bytes:
    body: dict[str, object] = {
        "v": 1,
        "id": "wm-0001",
        "seq": 7,
        "ts": NOW_MS - 1_000,
        "metrics": {"water_temp_c": 40.5, "drum_rpm": 1200, "door_open": False},
        "status": "washing",
    }
    body.update(overrides)
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def test_good_reading_decodes_to_typed_values() -> None:
    reading = decode_reading("wm-0001", payload(), NOW_MS)
    assert reading == Reading(
        "wm-0001",
        7,
        NOW_MS - 1_000,
        {"water_temp_c": 40.5, "drum_rpm": 1200.0, "door_open": False},
        "washing",
    )
    assert isinstance(reading.metrics["drum_rpm"], float)
    assert reading.ts.tzinfo is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "bad_json"),
        (b"[1,2,3]", "bad_schema"),
        (b'{"v": 1, "id": "wm-0001", "seq": 1, "ts": 1, "metrics": {"a": NaN}}', "bad_json"),
        (b'{"v": 1, "id": "wm-0001", "seq": 1, "ts": 1, "metrics": {"a": 1e999}}', "bad_json"),
        (payload(v=2), "unsupported_version"),
        (payload(v="1"), "unsupported_version"),
        (payload(v=...), "unsupported_version"),
        (payload(id="wm-0002"), "id_mismatch"),
        (payload(id="wm-0001\nevil,x=1"), "bad_id"),
        (payload(seq=-1), "bad_seq"),
        (payload(seq=True), "bad_seq"),
        (payload(ts=1.5), "bad_ts"),
        (payload(ts=NOW_MS - 40 * 86_400_000), "too_old"),
        (payload(ts=NOW_MS + 3_600_000), "in_future"),
        (payload(metrics={}), "bad_metrics"),
        (payload(metrics=[1, 2]), "bad_metrics"),
        (payload(metrics={"temp\nfake=1": 1.0}), "bad_metric_name"),
        (payload(metrics={'te"mp': 1.0}), "bad_metric_name"),
        (payload(metrics={"temp,x=1 y": 1.0}), "bad_metric_name"),
        (payload(metrics={"temp": 1e300}), "bad_value"),
        (payload(metrics={"temp": 10**15}), "bad_value"),
        (
            b'{"v":1,"id":"wm-0001","seq":1,"ts":%d,"metrics":{"t":1%s}}' % (NOW_MS, b"0" * 40),
            "bad_value",
        ),
        (payload(metrics={"temp": "hot"}), "bad_value"),
        (payload(metrics={"temp": None}), "bad_value"),
        (payload(metrics={f"m{i}": 1.0 for i in range(65)}), "too_many_metrics"),
        (payload(status="washing\nx"), "bad_status"),
        (payload(status=3), "bad_status"),
        (payload(extra=1), "unknown_field"),
        (b"x" * 20_000, "too_large"),
    ],
)
def test_hostile_readings_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RejectedError) as info:
        decode_reading("wm-0001", raw, NOW_MS)
    assert info.value.reason == reason
    assert info.value.detail


def test_limits_are_settings() -> None:
    tight = Limits(max_payload_bytes=300, max_metrics=2)
    with pytest.raises(RejectedError, match="too_many_metrics"):
        decode_reading("wm-0001", payload(), NOW_MS, tight)


@given(
    metrics=st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True),
        st.one_of(st.booleans(), st.floats(-1e9, 1e9, allow_nan=False)),
        min_size=1,
        max_size=10,
    ),
    seq=st.integers(0, 2**63 - 1),
)
def test_encode_decode_round_trip(metrics: dict[str, float | bool], seq: int) -> None:
    reading = Reading("hp-9", seq, NOW_MS, metrics, None)
    assert decode_reading("hp-9", encode_reading(reading), NOW_MS) == reading


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_rejection(raw: bytes) -> None:
    try:
        reading = decode_reading("wm-0001", raw, NOW_MS)
    except RejectedError:
        return
    assert all(isinstance(v, bool) or math.isfinite(v) for v in reading.metrics.values())


def test_event_round_trip_and_refusals() -> None:
    event = Event(
        "wm-0001", 9, NOW_MS, "command_result", command_id="c1", ok=False, detail="door open"
    )
    assert decode_event("wm-0001", encode_event(event), NOW_MS) == event
    bad = orjson.dumps({"v": 1, "id": "wm-0001", "seq": 1, "ts": NOW_MS, "type": "explode"})
    with pytest.raises(RejectedError, match="bad_event"):
        decode_event("wm-0001", bad, NOW_MS)


def test_command_round_trip_and_refusals() -> None:
    command = Command("c-1", "firmware_update", {"version": "2.1.0"})
    assert decode_command(encode_command(command)) == command
    with pytest.raises(RejectedError):
        decode_command(b'{"id": "c", "action": "self_destruct"}')
    with pytest.raises(ValueError, match="unknown command action"):
        Command("c", "self_destruct", {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("devices/wm-1/telemetry", ("wm-1", "telemetry")),
        ("devices/wm-1/events", ("wm-1", "events")),
        ("devices/wm-1/other", None),
        ("devices/wm 1/telemetry", None),
        ("devices/wm-1/telemetry/x", None),
        ("fleet/rejected", None),
    ],
)
def test_split_device_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert split_device_topic(topic) == expected
