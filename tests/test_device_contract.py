"""The device library's contract v1 against ``asyncapi.yaml`` and the gateway's decoder.

The library imports nothing of the backend, so its contract constants are its own; these
tests hold them to the AsyncAPI document and to ``wire.protocol``: equal constants,
every payload the library builds decodes to the same values at the gateway, and every
payload the library refuses is refused by the gateway with the same reason code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import device
from device import contract
from device.errors import ContractError
from notifier.messages import REFUSALS, refusal_code
from wire.errors import RejectedError
from wire.protocol import (
    COMMAND_ACTIONS,
    DEVICE_ID_PATTERN,
    EVENT_KINDS,
    METRIC_NAME_PATTERN,
    SCHEMA_VERSION,
    Limits,
    decode_command,
    decode_event,
    decode_reading,
)
from wire.protocol.codec import RESERVED_METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOC = yaml.safe_load((ROOT / "asyncapi.yaml").read_text(encoding="utf-8"))
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]
DEV = "dev-001"
NOW_MS = 1_740_816_070_000
LIMITS = Limits()


# -- constants ---------------------------------------------------------------------------


def test_constants_equal_the_gateways() -> None:
    assert contract.SCHEMA_VERSION == SCHEMA_VERSION
    assert contract.DEVICE_ID_PATTERN == DEVICE_ID_PATTERN
    assert contract.METRIC_NAME_PATTERN == METRIC_NAME_PATTERN
    assert contract.EVENT_KINDS == EVENT_KINDS
    assert contract.COMMAND_ACTIONS == COMMAND_ACTIONS
    assert contract.RESERVED_METRIC_NAMES == RESERVED_METRIC_NAMES
    assert LIMITS.max_payload_bytes == contract.MAX_PAYLOAD_BYTES
    assert LIMITS.max_metrics == contract.MAX_METRICS
    assert LIMITS.max_abs_value == contract.MAX_ABS_VALUE
    assert LIMITS.max_age_ms == contract.MAX_AGE_MS
    assert LIMITS.max_future_ms == contract.MAX_FUTURE_MS
    assert contract.INTERRUPTING_ACTIONS <= contract.COMMAND_ACTIONS


def test_constants_equal_the_asyncapi_document() -> None:
    assert DOC["info"]["version"] == str(contract.SCHEMA_VERSION)
    assert SCHEMAS["Header"]["properties"]["v"]["const"] == contract.SCHEMA_VERSION
    param = DOC["components"]["parameters"]["device_id"]["schema"]
    assert param["pattern"] == f"^{contract.DEVICE_ID_PATTERN}$"
    assert SCHEMAS["Word"]["pattern"] == f"^{contract.WORD_PATTERN}$"
    assert SCHEMAS["Name"]["pattern"] == f"^{contract.METRIC_NAME_PATTERN}$"
    assert set(SCHEMAS["Event"]["properties"]["type"]["enum"]) == contract.EVENT_KINDS
    assert set(SCHEMAS["Command"]["properties"]["action"]["enum"]) == contract.COMMAND_ACTIONS
    metrics = SCHEMAS["Telemetry"]["properties"]["metrics"]
    assert metrics["maxProperties"] == contract.MAX_METRICS
    number = metrics["additionalProperties"]["oneOf"][0]
    # PyYAML reads 1.0e12 as text (YAML 1.1 wants a sign on the exponent)
    assert (float(number["minimum"]), float(number["maximum"])) == (
        -contract.MAX_ABS_VALUE,
        contract.MAX_ABS_VALUE,
    )
    reserved = re.search(r"Names (.+) are reserved", metrics["description"])
    assert reserved is not None
    assert set(re.split(r",? and |, ", reserved.group(1))) == contract.RESERVED_METRIC_NAMES
    assert f"{contract.MAX_PAYLOAD_BYTES:,}" in SCHEMAS["Telemetry"]["description"]
    event = SCHEMAS["Event"]["properties"]
    assert event["detail"]["maxLength"] == 500
    assert event["command_id"]["maxLength"] == 64
    assert event["data"]["maxProperties"] == contract.MAX_METRICS
    assert event["data"]["additionalProperties"]["oneOf"][2]["maxLength"] == 200
    seq = SCHEMAS["Header"]["properties"]["seq"]
    assert (seq["minimum"], seq["maximum"]) == (0, 2**63 - 1)


def test_topics_equal_the_gateways() -> None:
    from wire.protocol import commands_topic, events_topic, status_topic, telemetry_topic

    for ours, theirs in (
        (contract.telemetry_topic, telemetry_topic),
        (contract.events_topic, events_topic),
        (contract.status_topic, status_topic),
        (contract.commands_topic, commands_topic),
    ):
        assert ours(DEV) == theirs(DEV)
        assert ours(DEV).replace(DEV, "{device_id}") in DOC["channels"]


def test_refusal_codes_are_the_owner_loops() -> None:
    assert contract.REFUSAL_CODES == REFUSALS
    for code in contract.REFUSAL_CODES:
        refusal = contract.Refusal(code, "words for people")
        assert refusal.detail == "refused: words for people"
        assert refusal_code(code) == code
    # the library's detail is read back as the right code by the owner loop
    door = contract.Refusal("door_open", "the door is open; will be possible once it is closed")
    assert refusal_code(door.detail) == "door_open"
    with pytest.raises(ContractError):
        contract.Refusal("sleepy", "not a code")  # type: ignore[arg-type]


def test_the_library_loads_no_backend_module() -> None:
    code = (
        "import sys, device, device.client, device.ota, device.store\n"
        "print('\\n'.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert "device" in loaded
    assert "paho" in loaded
    backend = {"gateway", "diagnostics", "notifier", "dashboard", "fixloop", "device_sim"}
    assert loaded & backend == set()


def test_pyproject_declares_paho_mqtt_2() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"paho-mqtt>=2"' in text
    assert device.__name__ == "device"


# -- payloads the library builds, decoded by the gateway ------------------------------------

names = st.from_regex(f"\\A{contract.METRIC_NAME_PATTERN}\\Z").filter(
    lambda n: n not in contract.RESERVED_METRIC_NAMES
)
values = st.one_of(
    st.booleans(),
    st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False),
    st.integers(-(10**12), 10**12),
)
words = st.from_regex(f"\\A{contract.WORD_PATTERN}\\Z")


@settings(max_examples=200, deadline=None)
@given(
    metrics=st.dictionaries(names, values, min_size=1, max_size=64),
    seq=st.integers(0, 2**63 - 1),
    age_ms=st.integers(0, contract.MAX_AGE_MS),
    status=st.none() | words,
)
def test_every_reading_the_library_builds_decodes_the_same(
    metrics: dict[str, float | bool], seq: int, age_ms: int, status: str | None
) -> None:
    ts = NOW_MS - age_ms
    payload = contract.encode_reading(DEV, seq, ts, metrics, status, now_ms=NOW_MS)
    reading = decode_reading(DEV, payload, NOW_MS)
    assert (reading.seq, reading.ts_ms, reading.status) == (seq, ts, status)
    assert dict(reading.metrics) == metrics
    for name, value in reading.metrics.items():
        assert isinstance(value, bool) == isinstance(metrics[name], bool)


data_values = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**53), 2**53),
    st.text(max_size=200),
)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(sorted(contract.EVENT_KINDS)),
    code=st.none() | words,
    command_id=st.none() | st.text(min_size=1, max_size=64).filter(str.isprintable),
    ok=st.none() | st.booleans(),
    detail=st.none() | st.text(max_size=500).filter(str.isprintable),
    data=st.dictionaries(names, data_values, max_size=8),
)
def test_every_event_the_library_builds_decodes_the_same(
    kind: contract.EventKind,
    code: str | None,
    command_id: str | None,
    ok: bool | None,
    detail: str | None,
    data: dict[str, float | bool | str],
) -> None:
    payload = contract.encode_event(
        DEV,
        3,
        NOW_MS,
        kind,
        code=code,
        command_id=command_id,
        ok=ok,
        detail=detail,
        data=data,
        now_ms=NOW_MS,
    )
    event = decode_event(DEV, payload, NOW_MS)
    assert (event.kind, event.code, event.command_id, event.ok, event.detail) == (
        kind,
        code,
        command_id,
        ok,
        detail,
    )
    assert dict(event.data) == data


# -- payloads the library refuses, refused by the gateway the same way ----------------------


def raw_reading(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "id": DEV, "seq": 5, "ts": NOW_MS, "metrics": {"t": 1.5}}
    body.update(overrides)
    return body


READING_FAULTS: dict[str, dict[str, Any]] = {
    "bad_metric_name": {"metrics": {"1st": 1.0}},
    "reserved_name": {"metrics": {"time": 1.0}},
    "newline_name": {"metrics": {"t\nevil": 1.0}},
    "too_big": {"metrics": {"t": 1.5e12}},
    "text_value": {"metrics": {"t": "fast"}},
    "null_value": {"metrics": {"t": None}},
    "no_metrics": {"metrics": {}},
    "too_many": {"metrics": {f"m{i}": 1.0 for i in range(65)}},
    "two_word_status": {"status": "two words"},
    "negative_seq": {"seq": -1},
    "huge_seq": {"seq": 2**63},
    "float_ts": {"ts": 1.5},
    "bool_ts": {"ts": True},
    "old": {"ts": NOW_MS - contract.MAX_AGE_MS - 1},
    "future": {"ts": NOW_MS + contract.MAX_FUTURE_MS + 1},
    "bad_id": {"id": "dev 001"},
}
READING_REASONS = {
    "bad_metric_name": "bad_metric_name",
    "reserved_name": "bad_metric_name",
    "newline_name": "bad_metric_name",
    "too_big": "bad_value",
    "text_value": "bad_value",
    "null_value": "bad_value",
    "no_metrics": "bad_metrics",
    "too_many": "too_many_metrics",
    "two_word_status": "bad_status",
    "negative_seq": "bad_seq",
    "huge_seq": "bad_seq",
    "float_ts": "bad_ts",
    "bool_ts": "bad_ts",
    "old": "too_old",
    "future": "in_future",
    "bad_id": "bad_id",
}


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises((ContractError, RejectedError)) as info:
        call()
    error = info.value
    assert isinstance(error, ContractError | RejectedError)
    return error.reason


@pytest.mark.parametrize("case", sorted(READING_FAULTS))
def test_a_reading_the_library_refuses_the_gateway_refuses_alike(case: str) -> None:
    body = raw_reading(**READING_FAULTS[case])
    ours = _reason(
        lambda: contract.encode_reading(
            body["id"], body["seq"], body["ts"], body["metrics"], body.get("status"), now_ms=NOW_MS
        )
    )
    theirs = _reason(lambda: decode_reading(DEV, json.dumps(body).encode(), NOW_MS))
    assert ours == theirs == READING_REASONS[case]


def test_non_finite_values_never_leave_the_device() -> None:
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ContractError) as info:
            contract.encode_reading(DEV, 1, NOW_MS, {"t": value})
        assert info.value.reason == "bad_value"
        with pytest.raises(ContractError):
            contract.encode_event(DEV, 1, NOW_MS, "info", data={"x": value})
    # the gateway refuses them too: JSON has no literal for them
    with pytest.raises(RejectedError):
        decode_reading(
            DEV, b'{"v":1,"id":"dev-001","seq":1,"ts":%d,"metrics":{"t":NaN}}' % NOW_MS, NOW_MS
        )


def raw_event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "id": DEV, "seq": 5, "ts": NOW_MS, "type": "info"}
    body.update(overrides)
    return body


EVENT_FAULTS: dict[str, dict[str, Any]] = {
    "unknown_type": {"type": "reboot"},
    "two_word_code": {"code": "E 21"},
    "long_command_id": {"command_id": "c" * 65},
    "unprintable_command_id": {"command_id": "c\n1"},
    "long_detail": {"detail": "x" * 501},
    "newline_detail": {"detail": "line\nline"},
    "text_ok": {"ok": "yes"},
    "bad_data_name": {"data": {"1x": 1.0}},
    "long_data_text": {"data": {"note": "x" * 201}},
    "nested_data": {"data": {"note": {"a": 1}}},
    "too_much_data": {"data": {f"d{i}": 1.0 for i in range(65)}},
    "too_large": {"data": {f"d{i:02d}{'n' * 60}": "x" * 200 for i in range(64)}},
}


@pytest.mark.parametrize("case", sorted(EVENT_FAULTS))
def test_an_event_the_library_refuses_the_gateway_refuses_alike(case: str) -> None:
    body = raw_event(**EVENT_FAULTS[case])
    ours = _reason(
        lambda: contract.encode_event(
            body["id"],
            body["seq"],
            body["ts"],
            body["type"],
            code=body.get("code"),
            command_id=body.get("command_id"),
            ok=body.get("ok"),
            detail=body.get("detail"),
            data=body.get("data"),
            now_ms=NOW_MS,
        )
    )
    theirs = _reason(lambda: decode_event(DEV, json.dumps(body).encode(), NOW_MS))
    assert ours == theirs
    assert ours == ("too_large" if case == "too_large" else "bad_event")


def test_every_reason_the_library_gives_is_in_the_document() -> None:
    reasons = set(READING_REASONS.values()) | {"bad_event", "too_large", "bad_json"}
    listed = set(SCHEMAS["Rejected"]["properties"]["reason"]["enum"])
    assert reasons <= listed
    source = (ROOT / "device" / "contract.py").read_text(encoding="utf-8")
    raised = set(re.findall(r'ContractError\(\s*"([a-z_]+)"', source))
    assert raised - {"bad_command"} <= listed
    assert "bad_command" in (ROOT / "README.md").read_text(encoding="utf-8")


# -- commands ------------------------------------------------------------------------------

COMMANDS: dict[str, bytes] = {
    "valid": b'{"id":"c-1","action":"restart","args":{}}',
    "no_args": b'{"id":"c-1","action":"selftest"}',
    "update": b'{"id":"c-2","action":"firmware_update","args":{"version":"2.4.0","n":3}}',
    "bad_json": b'{"id":"c-1",',
    "nan_arg": b'{"id":"c-1","action":"config_set","args":{"x":NaN}}',
    "not_object": b"[1, 2]",
    "no_id": b'{"action":"restart"}',
    "empty_id": b'{"id":"","action":"restart"}',
    "long_id": b'{"id":"' + b"c" * 65 + b'","action":"restart"}',
    "number_id": b'{"id":7,"action":"restart"}',
    "unknown_action": b'{"id":"c-1","action":"explode"}',
    "list_args": b'{"id":"c-1","action":"restart","args":[1]}',
    "nested_arg": b'{"id":"c-1","action":"config_set","args":{"a":{"b":1}}}',
    "list_arg": b'{"id":"c-1","action":"config_set","args":{"a":[1]}}',
    "null_arg": b'{"id":"c-1","action":"config_set","args":{"a":null}}',
    "unprintable_id": b'{"id":"c\\u0007","action":"restart"}',
}


@pytest.mark.parametrize("case", sorted(COMMANDS))
def test_commands_decode_as_the_gateway_encodes_them(case: str) -> None:
    payload = COMMANDS[case]
    refused: str | None = None
    try:
        theirs = decode_command(payload)
    except RejectedError as exc:
        refused = exc.reason
    if refused is not None:
        assert _reason(lambda: contract.decode_command(payload)) == refused
        return
    ours = contract.decode_command(payload)
    assert (ours.id, ours.action, dict(ours.args)) == (
        theirs.id,
        theirs.action,
        dict(theirs.args),
    )


def test_command_args_the_document_forbids_are_refused() -> None:
    # asyncapi.yaml: args values are numbers, bools or text
    schema = SCHEMAS["Command"]["properties"]["args"]["additionalProperties"]["oneOf"]
    assert [s["type"] for s in schema] == ["number", "boolean", "string"]
    for bad in (b'{"a":{"b":1}}', b'{"a":[1]}', b'{"a":null}'):
        payload = b'{"id":"c-1","action":"config_set","args":' + bad + b"}"
        assert _reason(lambda p=payload: contract.decode_command(p)) == "bad_command"
    unprintable = b'{"id":"c\\u0007","action":"restart"}'
    assert _reason(lambda: contract.decode_command(unprintable)) == "bad_command"


def test_registering_an_unknown_action_is_a_contract_error(tmp_path: Path) -> None:
    dev = device.Device(device.DeviceSettings("dev-001", "127.0.0.1", tmp_path))
    with pytest.raises(ContractError):
        dev.on_command("explode", lambda c: device.CommandResult(True))  # type: ignore[arg-type]
    with pytest.raises(ContractError):
        dev.add_interlock(lambda: None, ["explode"])  # type: ignore[list-item]
