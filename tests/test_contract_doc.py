"""``asyncapi.yaml`` says what the codec does: keys, patterns, kinds, actions, reasons.

The codec is the contract; the AsyncAPI file describes it for device makers. These
tests feed payloads built from the file's schemas through the codec, so the two cannot
drift apart unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from wire.errors import RejectedError
from wire.protocol import (
    COMMAND_ACTIONS,
    DEVICE_ID_PATTERN,
    EVENT_KINDS,
    METRIC_NAME_PATTERN,
    SCHEMA_VERSION,
    decode_command,
    decode_event,
    decode_reading,
)
from wire.protocol.codec import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parent.parent
DOC = yaml.safe_load((ROOT / "asyncapi.yaml").read_text(encoding="utf-8"))
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
DEVICE = "dev-001"
NOW_MS = 1_740_816_070_000

VALID_READING: dict[str, Any] = {
    "v": 1,
    "id": DEVICE,
    "seq": 7,
    "ts": NOW_MS - 1_000,
    "metrics": {"temp_c": 21.5, "door_open": False},
    "status": "idle",
}
VALID_EVENT: dict[str, Any] = {
    "v": 1,
    "id": DEVICE,
    "seq": 8,
    "ts": NOW_MS - 1_000,
    "type": "command_result",
    "code": "E21",
    "command_id": "c-1",
    "ok": True,
    "detail": "done",
    "data": {"drain_time_s": 61.0},
}


def _reading(obj: dict[str, Any]) -> None:
    decode_reading(DEVICE, orjson.dumps(obj), NOW_MS)


def _event(obj: dict[str, Any]) -> None:
    decode_event(DEVICE, orjson.dumps(obj), NOW_MS)


def test_the_document_is_asyncapi_2_6() -> None:
    assert DOC["asyncapi"] == "2.6.0"
    assert DOC["info"]["version"] == str(SCHEMA_VERSION)
    assert SCHEMAS["Header"]["properties"]["v"]["const"] == SCHEMA_VERSION


def test_telemetry_keys_match_the_codec() -> None:
    schema = SCHEMAS["Telemetry"]
    assert set(schema["properties"]) == set(VALID_READING)
    _reading(VALID_READING)
    for key in schema["properties"]:
        without = {k: v for k, v in VALID_READING.items() if k != key}
        if key in schema["required"]:
            with pytest.raises(RejectedError):
                _reading(without)
        else:
            _reading(without)
    assert schema["additionalProperties"] is False
    with pytest.raises(RejectedError, match="unknown_field"):
        _reading({**VALID_READING, "extra": 1})


def test_telemetry_limits_match_the_codec() -> None:
    schema = SCHEMAS["Telemetry"]
    metrics = schema["properties"]["metrics"]
    assert metrics["maxProperties"] == DEFAULT_LIMITS.max_metrics
    number, boolean = metrics["additionalProperties"]["oneOf"]
    assert boolean == {"type": "boolean"}
    # numbers, not text: YAML reads an exponent without its sign (1.0e12) as a string
    assert number["maximum"] == -number["minimum"] == DEFAULT_LIMITS.max_abs_value
    assert type(number["maximum"]) is float
    assert f"{DEFAULT_LIMITS.max_payload_bytes:,}" in schema["description"]
    edge = {**VALID_READING, "metrics": {"m": DEFAULT_LIMITS.max_abs_value}}
    _reading(edge)
    with pytest.raises(RejectedError):
        _reading({**edge, "metrics": {"m": DEFAULT_LIMITS.max_abs_value * 1.01}})


def test_event_keys_match_the_codec() -> None:
    schema = SCHEMAS["Event"]
    assert set(schema["properties"]) == set(VALID_EVENT)
    _event(VALID_EVENT)
    for key in schema["properties"]:
        without = {k: v for k, v in VALID_EVENT.items() if k != key}
        if key in schema["required"]:
            with pytest.raises(RejectedError):
                _event(without)
        else:
            _event(without)
    with pytest.raises(RejectedError, match="unknown_field"):
        _event({**VALID_EVENT, "extra": 1})


def test_patterns_kinds_and_actions_match() -> None:
    assert SCHEMAS["Word"]["pattern"] == f"^{DEVICE_ID_PATTERN}$"
    assert SCHEMAS["Name"]["pattern"] == f"^{METRIC_NAME_PATTERN}$"
    param = DOC["components"]["parameters"]["device_id"]["schema"]
    assert param["pattern"] == f"^{DEVICE_ID_PATTERN}$"
    assert set(SCHEMAS["Event"]["properties"]["type"]["enum"]) == set(EVENT_KINDS)
    assert set(SCHEMAS["Command"]["properties"]["action"]["enum"]) == set(COMMAND_ACTIONS)


def test_command_schema_matches_the_codec() -> None:
    schema = SCHEMAS["Command"]
    valid = {"id": "c-1", "action": "restart", "args": {}}
    decode_command(orjson.dumps(valid))
    for key in schema["properties"]:
        without = {k: v for k, v in valid.items() if k != key}
        if key in schema["required"]:
            with pytest.raises(RejectedError):
                decode_command(orjson.dumps(without))
        else:
            decode_command(orjson.dumps(without))


def test_examples_decode() -> None:
    messages = DOC["components"]["messages"]
    telemetry = messages["Telemetry"]["examples"][0]["payload"]
    reading = decode_reading(telemetry["id"], orjson.dumps(telemetry), telemetry["ts"])
    assert reading.seq == telemetry["seq"]
    event = messages["Event"]["examples"][0]["payload"]
    assert decode_event(event["id"], orjson.dumps(event), event["ts"]).ok is True
    command = messages["Command"]["examples"][0]["payload"]
    assert decode_command(orjson.dumps(command)).action == command["action"]


def test_every_refusal_reason_is_listed() -> None:
    codes = set()
    for path in [*(ROOT / "wire").rglob("*.py"), *(ROOT / "gateway").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        codes |= set(re.findall(r'RejectedError\(\s*"([a-z_]+)"', text))
    service = "".join(
        (ROOT / "gateway" / name).read_text(encoding="utf-8")
        for name in ("service.py", "durable.py")
    )
    for reason in ("unstorable", "store_refused"):
        assert f'"{reason}"' in service
        codes.add(reason)
    codes -= {"bad_command"}  # the device's side: commands the device cannot parse
    assert "too_large" in codes  # the scan sees multi-line calls
    assert set(SCHEMAS["Rejected"]["properties"]["reason"]["enum"]) == codes
