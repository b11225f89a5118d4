"""Line protocol encoding: exact output, escaping, and round trips through a strict parser."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.errors import WriteRejectedError
from wire.lineproto import event_to_line, reading_to_line, telemetry_line
from wire.protocol import Event, Reading

TS = 1_732_380_000_123

# --- a small, strict, test-only line protocol parser --------------------------------
# It accepts exactly the escapes the encoder may produce and fails on anything else, so
# a round trip proves both that the encoder escapes enough and that it is unambiguous.

_NAME_UNESCAPES = {"\\": "\\", ",": ",", "=": "=", " ": " ", "n": "\n", "r": "\r"}
_STRING_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r"}


class ParseError(Exception):
    pass


def _read_name(line: str, pos: int, stops: str) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(line) and line[pos] not in stops:
        char = line[pos]
        if char == "\\":
            if pos + 1 >= len(line) or line[pos + 1] not in _NAME_UNESCAPES:
                raise ParseError(f"bad escape at {pos} in {line!r}")
            out.append(_NAME_UNESCAPES[line[pos + 1]])
            pos += 2
            continue
        if char in "=, \n\r" and char not in stops:
            raise ParseError(f"unescaped {char!r} at {pos} in {line!r}")
        out.append(char)
        pos += 1
    if not out:
        raise ParseError(f"empty name at {pos} in {line!r}")
    return "".join(out), pos


def _expect(line: str, pos: int, char: str) -> int:
    if pos >= len(line) or line[pos] != char:
        raise ParseError(f"expected {char!r} at {pos} in {line!r}")
    return pos + 1


def _read_value(line: str, pos: int) -> tuple[Any, int]:
    if line[pos] == '"':
        out: list[str] = []
        pos += 1
        while True:
            if pos >= len(line):
                raise ParseError("unterminated string")
            char = line[pos]
            if char == '"':
                return "".join(out), pos + 1
            if char == "\\":
                if pos + 1 >= len(line) or line[pos + 1] not in _STRING_UNESCAPES:
                    raise ParseError(f"bad string escape at {pos} in {line!r}")
                out.append(_STRING_UNESCAPES[line[pos + 1]])
                pos += 2
                continue
            out.append(char)
            pos += 1
    end = pos
    while end < len(line) and line[end] not in ", ":
        end += 1
    raw = line[pos:end]
    if raw in ("true", "false"):
        return raw == "true", end
    if raw.endswith("i"):
        return int(raw[:-1]), end
    value = float(raw)
    if not math.isfinite(value):
        raise ParseError(f"non-finite float {raw!r}")
    return value, end


def parse_line(data: bytes) -> tuple[str, dict[str, str], dict[str, Any], int]:
    """Parse one line into (measurement, tags, fields, timestamp)."""
    assert b"\n" not in data
    assert b"\r" not in data
    line = data.decode()
    measurement, pos = _read_name(line, 0, ", ")
    tags: dict[str, str] = {}
    while line[pos] == ",":
        key, pos = _read_name(line, pos + 1, "=")
        pos = _expect(line, pos, "=")
        value, pos = _read_name(line, pos, ", ")
        assert key not in tags, f"duplicate tag {key!r}"
        tags[key] = value
    pos = _expect(line, pos, " ")
    fields: dict[str, Any] = {}
    while True:
        key, pos = _read_name(line, pos, "=")
        pos = _expect(line, pos, "=")
        value, pos = _read_value(line, pos)
        assert key not in fields, f"duplicate field {key!r}"
        fields[key] = value
        if line[pos] == " ":
            break
        pos = _expect(line, pos, ",")
    timestamp = line[pos + 1 :]
    assert timestamp.isdigit(), f"bad timestamp in {line!r}"
    return measurement, tags, fields, int(timestamp)


# --- exact output ---------------------------------------------------------------------


def test_reading_exact_line() -> None:
    reading = Reading(
        "washer-0042",
        17,
        TS,
        {"temp": 20.5, "rpm": 1200.0, "door_open": False, "heater": True},
        "washing",
    )
    assert reading_to_line(reading) == (
        b"telemetry,device=washer-0042 temp=20.5,rpm=1200.0,door_open=false,heater=true,"
        b'status="washing",seq=17i 1732380000123'
    )


def test_reading_without_status_and_float_repr() -> None:
    reading = Reading("d1", 0, 5, {"v": 0.1, "tiny": 1e-300, "big": -1.5e20})
    assert (
        reading_to_line(reading) == b"telemetry,device=d1 v=0.1,tiny=1e-300,big=-1.5e+20,seq=0i 5"
    )


def test_event_exact_line() -> None:
    event = Event(
        "washer-0042",
        9,
        TS,
        "command_result",
        code="E21",
        command_id="cmd-1",
        ok=False,
        detail='door "open"\nwait',
        data={"b": 2.0, "a": "x"},
    )
    assert event_to_line(event) == (
        b'device_events,device=washer-0042,kind=command_result seq=9i,code="E21",'
        b'command_id="cmd-1",detail="door \\"open\\"\\nwait",ok=false,'
        b'data="{\\"a\\":\\"x\\",\\"b\\":2.0}" 1732380000123'
    )


def test_minimal_event_has_only_seq() -> None:
    assert event_to_line(Event("d1", 3, 7, "boot")) == b"device_events,device=d1,kind=boot seq=3i 7"


def test_hostile_device_id_stays_one_line() -> None:
    hostile = "evil\ntelemetry,device=x temp=99 1\r"
    line = reading_to_line(Reading(hostile, 1, TS, {"temp": 1.0}))
    assert line.count(b"\n") == 0
    assert b"\r" not in line
    _, tags, fields, _ = parse_line(line)
    assert tags == {"device": hostile}
    assert fields == {"temp": 1.0, "seq": 1}


def test_separators_in_names_are_escaped() -> None:
    line = reading_to_line(Reading("a b,c=d", 1, TS, {"x y,z=w": 1.0}, 'say "hi" \\ bye'))
    assert line == (
        b"telemetry,device=a\\ b\\,c\\=d x\\ y\\,z\\=w=1.0,"
        b'status="say \\"hi\\" \\\\ bye",seq=1i 1732380000123'
    )


@pytest.mark.parametrize(
    ("device_id", "metrics"),
    [
        ("", {"x": 1.0}),
        ("ends-in\\", {"x": 1.0}),
        ("d1", {"": 1.0}),
        ("d1", {"x\\": 1.0}),
        ("d1", {"seq": 1.0}),
        ("d1", {"status": True}),
        ("bad\ud800", {"x": 1.0}),
    ],
)
def test_unwritable_readings_are_refused(device_id: str, metrics: dict[str, float]) -> None:
    with pytest.raises(WriteRejectedError):
        reading_to_line(Reading(device_id, 1, TS, metrics))


def test_unwritable_event_text_is_refused() -> None:
    with pytest.raises(WriteRejectedError):
        event_to_line(Event("d1", 1, TS, "info", detail="bad\udfff"))


# --- properties -----------------------------------------------------------------------

names = st.text(max_size=20)
metric_values = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans())


def _writable(name: str) -> bool:
    return bool(name) and not name.endswith("\\")


@settings(max_examples=300, deadline=None)
@given(
    device_id=names,
    metrics=st.dictionaries(names, metric_values, max_size=6),
    status=st.none() | st.text(max_size=30),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    ts_ms=st.integers(min_value=0, max_value=2**53),
)
def test_reading_round_trip(
    device_id: str,
    metrics: dict[str, float | bool],
    status: str | None,
    seq: int,
    ts_ms: int,
) -> None:
    reading = Reading(device_id, seq, ts_ms, metrics, status)
    writable = _writable(device_id) and all(
        _writable(name) and name not in ("seq", "status") for name in metrics
    )
    if not writable:
        with pytest.raises(WriteRejectedError):
            reading_to_line(reading)
        return
    measurement, tags, fields, timestamp = parse_line(reading_to_line(reading))
    assert measurement == "telemetry"
    assert tags == {"device": device_id}
    expected: dict[str, Any] = dict(metrics)
    if status is not None:
        expected["status"] = status
    expected["seq"] = seq
    assert fields == expected
    for name, value in metrics.items():
        assert type(fields[name]) is type(value)
    assert timestamp == ts_ms


data_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=20)
)


@settings(max_examples=300, deadline=None)
@given(
    device_id=names,
    kind=st.sampled_from(["boot", "selftest", "error", "command_result", "info"]),
    code=st.none() | st.text(max_size=20),
    command_id=st.none() | st.text(max_size=20),
    ok=st.none() | st.booleans(),
    detail=st.none() | st.text(max_size=60),
    data=st.dictionaries(st.text(max_size=10), data_values, max_size=4),
)
def test_event_round_trip(
    device_id: str,
    kind: Any,
    code: str | None,
    command_id: str | None,
    ok: bool | None,
    detail: str | None,
    data: dict[str, float | bool | str],
) -> None:
    event = Event(device_id, 4, TS, kind, code, command_id, ok, detail, data)
    if not _writable(device_id):
        with pytest.raises(WriteRejectedError):
            event_to_line(event)
        return
    measurement, tags, fields, timestamp = parse_line(event_to_line(event))
    assert measurement == "device_events"
    assert tags == {"device": device_id, "kind": kind}
    assert timestamp == TS
    assert fields.pop("seq") == 4
    assert fields.pop("code", None) == code
    assert fields.pop("command_id", None) == command_id
    assert fields.pop("ok", None) is ok
    assert fields.pop("detail", None) == detail
    if data:
        assert orjson.loads(fields.pop("data")) == data
    assert fields == {}


def test_micros_keep_same_millisecond_readings_apart() -> None:
    # seq sets the microseconds below the device's millisecond, so two readings
    # of one millisecond are two points, and a redelivered one is the same point again.
    first = telemetry_line("dev-1", 41, 1_700_000_000_123, {"t": 1.5}, None, micros=True)
    second = telemetry_line("dev-1", 42, 1_700_000_000_123, {"t": 1.5}, None, micros=True)
    assert first.endswith(b"seq=41i 1700000000123041")
    assert second.endswith(b"seq=42i 1700000000123042")
    assert first.split(b" ")[0] == second.split(b" ")[0]  # one series: seq is no tag
    again = telemetry_line("dev-1", 41, 1_700_000_000_123, {"t": 1.5}, None, micros=True)
    assert again == first
    wrapped = telemetry_line("dev-1", 1_000_999, 1_700_000_000_123, {}, "idle", micros=True)
    assert wrapped.endswith(b"seq=1000999i 1700000000123999")
