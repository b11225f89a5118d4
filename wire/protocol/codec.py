"""Bytes <-> typed messages for the device contract v1 (the wire; first stage).

Everything from a device is untrusted: :func:`decode_reading` and :func:`decode_event`
check size, JSON shape, schema version, types, finite numbers, name patterns, the time
window and that the payload's id equals the topic's id, and raise
:class:`~wire.errors.RejectedError` with a reason code otherwise. Names that pass the
patterns cannot carry line-protocol syntax; the line-protocol encoder escapes anyway.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from wire.errors import RejectedError
from wire.protocol.model import (
    COMMAND_ACTIONS,
    EVENT_KINDS,
    SCHEMA_VERSION,
    Command,
    Event,
    MetricValue,
    Reading,
)

__all__ = [
    "METRIC_NAME_PATTERN",
    "RESERVED_METRIC_NAMES",
    "Limits",
    "decode_command",
    "decode_event",
    "decode_reading",
    "encode_command",
    "encode_event",
    "encode_reading",
    "validate_reading",
]

#: Metric names: a letter, then letters, digits and underscores; short.
METRIC_NAME_PATTERN: Final = r"[A-Za-z][A-Za-z0-9_]{0,63}"
_METRIC_RE: Final = re.compile(METRIC_NAME_PATTERN)
_WORD_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_READING_KEYS: Final = frozenset(("v", "id", "seq", "ts", "metrics", "status"))
_EVENT_KEYS: Final = frozenset(
    ("v", "id", "seq", "ts", "type", "code", "command_id", "ok", "detail", "data")
)
_MAX_SEQ: Final = 2**63 - 1
#: Names a metric may not take: the stored point's own fields and InfluxQL's time.
RESERVED_METRIC_NAMES: Final = frozenset(("seq", "status", "time"))
_KNOWN_NAMES: set[str] = set()
_KNOWN_NAMES_MAX: Final = 65_536
_MAX_DETAIL: Final = 500


@dataclass(frozen=True, slots=True)
class Limits:
    """What the gateway accepts from a device.

    Attributes:
        max_payload_bytes: larger payloads are refused before parsing.
        max_metrics: most metrics in one reading.
        max_age_ms: oldest accepted timestamp, relative to now (the backfill window).
        max_future_ms: how far ahead of the gateway's clock a device clock may be.
        max_abs_value: largest accepted magnitude of a metric.
    """

    max_payload_bytes: int = 16_384
    max_metrics: int = 64
    max_age_ms: int = 35 * 86_400_000
    max_future_ms: int = 300_000
    max_abs_value: float = 1e12


DEFAULT_LIMITS: Final = Limits()


def _load_object(payload: bytes, limits: Limits, keys: frozenset[str]) -> dict[str, Any]:
    if len(payload) > limits.max_payload_bytes:
        raise RejectedError(
            "too_large", f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes}"
        )
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RejectedError("bad_json", f"payload is not valid JSON ({exc})") from exc
    if type(obj) is not dict:
        raise RejectedError("bad_schema", "payload must be a JSON object")
    version = obj.get("v")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise RejectedError(
            "unsupported_version",
            f"schema version {version!r} is not supported (this gateway speaks {SCHEMA_VERSION})",
        )
    if not keys.issuperset(obj):
        extra = sorted(set(obj) - keys)[:3]
        raise RejectedError("unknown_field", f"unknown top-level fields {extra!r}")
    return obj


def _header(
    obj: dict[str, Any], topic_device_id: str, now_ms: int, limits: Limits
) -> tuple[int, int]:
    device_id = obj.get("id")
    if device_id != topic_device_id:
        if type(device_id) is str and _DEVICE_ID_RE.fullmatch(device_id) is None:
            raise RejectedError("bad_id", "payload id breaks the device id pattern")
        raise RejectedError("id_mismatch", "payload id differs from the topic's device id")
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise RejectedError("bad_seq", "seq must be a non-negative integer")
    ts = obj.get("ts")
    if type(ts) is not int:
        raise RejectedError("bad_ts", "ts must be integer epoch milliseconds (UTC)")
    if ts < now_ms - limits.max_age_ms:
        raise RejectedError("too_old", f"ts {ts} is older than the backfill window")
    if ts > now_ms + limits.max_future_ms:
        raise RejectedError("in_future", f"ts {ts} is ahead of the gateway clock")
    return seq, ts


def decode_reading(
    topic_device_id: str, payload: bytes, now_ms: int, limits: Limits = DEFAULT_LIMITS
) -> Reading:
    """Validate a telemetry payload and build its :class:`Reading`.

    Args:
        topic_device_id: the device id taken from the topic (already pattern-checked).
        payload: the raw MQTT payload.
        now_ms: the gateway's clock, epoch milliseconds (for the time window).
        limits: what to accept.

    Raises:
        RejectedError: the payload breaks the contract; ``reason`` says how.
    """
    return Reading(topic_device_id, *validate_reading(topic_device_id, payload, now_ms, limits))


def validate_reading(
    topic_device_id: str, payload: bytes, now_ms: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[int, int, dict[str, MetricValue], str | None]:
    """Validate a telemetry payload; return ``(seq, ts_ms, metrics, status)``.

    The same checks as :func:`decode_reading`, without building the :class:`Reading`
    (the gateway's hot path encodes line protocol straight from these values).

    Raises:
        RejectedError: the payload breaks the contract; ``reason`` says how.
    """
    # The hot path of the gateway: checks are inlined and known-good metric names are
    # remembered, because every message of a fleet repeats the same few names.
    obj = _load_object(payload, limits, _READING_KEYS)
    seq, ts = _header(obj, topic_device_id, now_ms, limits)
    metrics = obj.get("metrics")
    if type(metrics) is not dict or not metrics:
        raise RejectedError("bad_metrics", "metrics must be a non-empty object")
    if len(metrics) > limits.max_metrics:
        raise RejectedError("too_many_metrics", f"more than {limits.max_metrics} metrics")
    bound = limits.max_abs_value
    known = _KNOWN_NAMES
    for name, value in metrics.items():
        if name not in known:
            _check_metric_name(name)
        kind = type(value)
        if kind is float:
            if not -bound <= value <= bound:  # also false for NaN
                raise RejectedError("bad_value", f"metric {name} is out of range")
        elif kind is int:
            if not -bound <= value <= bound:
                raise RejectedError("bad_value", f"metric {name} is out of range")
            metrics[name] = float(value)
        elif kind is not bool:
            raise RejectedError("bad_value", f"metric {name} must be a number or a bool")
    status = obj.get("status")
    if status is not None and (type(status) is not str or _WORD_RE.fullmatch(status) is None):
        raise RejectedError("bad_status", "status must be a short word")
    return seq, ts, metrics, status


def _check_metric_name(name: str) -> None:
    """Refuse a metric name that breaks the pattern or is one of the point's own fields."""
    if _METRIC_RE.fullmatch(name) is None:
        raise RejectedError("bad_metric_name", "a metric name breaks the name pattern")
    if name in RESERVED_METRIC_NAMES:
        raise RejectedError("bad_metric_name", f"metric name {name!r} is reserved")
    if len(_KNOWN_NAMES) >= _KNOWN_NAMES_MAX:  # a hostile fleet cannot grow it unbounded
        _KNOWN_NAMES.clear()
    _KNOWN_NAMES.add(name)


def _short_text(obj: dict[str, Any], key: str, limit: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise RejectedError("bad_event", f"{key} must be printable text of at most {limit}")
    return value


def decode_event(
    topic_device_id: str, payload: bytes, now_ms: int, limits: Limits = DEFAULT_LIMITS
) -> Event:
    """Validate an event payload and build its :class:`Event`.

    Raises:
        RejectedError: the payload breaks the contract; ``reason`` says how.
    """
    obj = _load_object(payload, limits, _EVENT_KEYS)
    seq, ts = _header(obj, topic_device_id, now_ms, limits)
    kind = obj.get("type")
    if kind not in EVENT_KINDS:
        raise RejectedError("bad_event", f"event type {kind!r} is unknown")
    ok = obj.get("ok")
    if ok is not None and type(ok) is not bool:
        raise RejectedError("bad_event", "ok must be a bool")
    code = obj.get("code")
    if code is not None and (type(code) is not str or _WORD_RE.fullmatch(code) is None):
        raise RejectedError("bad_event", "code must be a short word")
    data = obj.get("data", {})
    if type(data) is not dict or len(data) > limits.max_metrics:
        raise RejectedError("bad_event", "data must be an object of named values")
    clean: dict[str, float | bool | str] = {}
    for name, value in data.items():
        if _METRIC_RE.fullmatch(name) is None:
            raise RejectedError("bad_event", "a data name breaks the name pattern")
        if type(value) is bool or (type(value) is str and len(value) <= 200):
            clean[name] = value
        elif type(value) in (int, float) and math.isfinite(value):
            clean[name] = float(value)
        else:
            raise RejectedError("bad_event", f"data {name} must be a number, bool or short text")
    return Event(
        device_id=topic_device_id,
        seq=seq,
        ts_ms=ts,
        kind=kind,
        code=code,
        command_id=_short_text(obj, "command_id", 64),
        ok=ok,
        detail=_short_text(obj, "detail", _MAX_DETAIL),
        data=clean,
    )


def encode_reading(reading: Reading) -> bytes:
    """Encode a reading as a v1 telemetry payload (what a device publishes)."""
    body: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": reading.device_id,
        "seq": reading.seq,
        "ts": reading.ts_ms,
        "metrics": dict(reading.metrics),
    }
    if reading.status is not None:
        body["status"] = reading.status
    return orjson.dumps(body)


def encode_event(event: Event) -> bytes:
    """Encode an event as a v1 event payload."""
    body: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": event.device_id,
        "seq": event.seq,
        "ts": event.ts_ms,
        "type": event.kind,
    }
    for key in ("code", "command_id", "ok", "detail"):
        value = getattr(event, key)
        if value is not None:
            body[key] = value
    if event.data:
        body["data"] = dict(event.data)
    return orjson.dumps(body)


def encode_command(command: Command) -> bytes:
    """Encode a command payload ``{id, action, args}``."""
    return orjson.dumps({"id": command.id, "action": command.action, "args": dict(command.args)})


def decode_command(payload: bytes) -> Command:
    """Decode a command payload (the device side of the contract).

    Raises:
        RejectedError: the payload is not a valid command.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RejectedError("bad_json", "command is not valid JSON") from exc
    if type(obj) is not dict:
        raise RejectedError("bad_command", "command must be a JSON object")
    command_id, action, args = obj.get("id"), obj.get("action"), obj.get("args", {})
    if type(command_id) is not str or not 0 < len(command_id) <= 64:
        raise RejectedError("bad_command", "command id must be a short string")
    if not command_id.isprintable():
        # the id is echoed in the device's result, where it must be printable text
        raise RejectedError("bad_command", "command id must be printable text")
    if action not in COMMAND_ACTIONS:
        raise RejectedError("bad_command", f"unknown action {action!r}")
    if type(args) is not dict:
        raise RejectedError("bad_command", "args must be an object")
    for key, value in args.items():
        # asyncapi.yaml: an argument is a number, a bool or text (no object, list or null)
        if not isinstance(value, bool | int | float | str):
            raise RejectedError("bad_command", f"argument {key} must be a number, bool or text")
    return Command(command_id, action, args)
