"""The device contract v1 as a device speaks it: topics, limits, payload encoders.

This is the device's half of the wire (the first stage of the pipeline); the gateway's
half is ``wire.protocol``. The library imports nothing of the backend, so the rules
are written here a second time, and ``tests/test_device_contract.py`` holds the two
halves and ``asyncapi.yaml`` together: every constant is compared, every payload built
here is decoded by the gateway's decoder, and every payload refused here is refused by
the gateway with the same reason code.

A message that would break the contract raises :class:`~device.errors.ContractError`
(with the gateway's reason code) here, on the device, before it is stored or sent:
a device maker finds the fault in their own logs, not in the fleet's ``fleet/rejected``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from device.errors import ContractError

try:  # the fast encoder when the program has it; the standard library's otherwise
    import orjson
except ImportError:  # pragma: no cover - fixloop's own installs have orjson
    orjson = None  # type: ignore[assignment]

__all__ = [
    "COMMAND_ACTIONS",
    "DEVICE_ID_PATTERN",
    "EVENT_KINDS",
    "INTERRUPTING_ACTIONS",
    "MAX_ABS_VALUE",
    "MAX_AGE_MS",
    "MAX_FUTURE_MS",
    "MAX_METRICS",
    "MAX_PAYLOAD_BYTES",
    "METRIC_NAME_PATTERN",
    "REFUSAL_CODES",
    "RESERVED_METRIC_NAMES",
    "SCHEMA_VERSION",
    "WORD_PATTERN",
    "ArgValue",
    "Command",
    "CommandAction",
    "DataValue",
    "EventKind",
    "MetricValue",
    "Refusal",
    "RefusalCode",
    "check_device_id",
    "commands_topic",
    "decode_command",
    "encode_event",
    "encode_reading",
    "events_topic",
    "status_topic",
    "telemetry_topic",
]

#: Every payload carries ``"v": 1``; the gateway refuses other versions.
SCHEMA_VERSION: Final = 1
#: Device ids: 1-64 characters, safe in a topic, a file name and a line-protocol tag.
DEVICE_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
#: Metric and event-data names.
METRIC_NAME_PATTERN: Final = r"[A-Za-z][A-Za-z0-9_]{0,63}"
#: Short words: ``status``, event ``code`` (an error code, a firmware version).
WORD_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
#: Metric names the stored point uses itself (and InfluxQL's time).
RESERVED_METRIC_NAMES: Final = frozenset(("seq", "status", "time"))
#: Largest payload the gateway reads, in bytes.
MAX_PAYLOAD_BYTES: Final = 16_384
#: Most metrics in one reading (and entries in an event's ``data``).
MAX_METRICS: Final = 64
#: Largest magnitude of a metric.
MAX_ABS_VALUE: Final = 1e12
#: Oldest ``ts`` the gateway takes (the backfill window): 35 days.
MAX_AGE_MS: Final = 35 * 86_400_000
#: How far a device clock may run ahead of the gateway's: 5 minutes.
MAX_FUTURE_MS: Final = 300_000
_MAX_SEQ: Final = 2**63 - 1
_MAX_DETAIL: Final = 500
_MAX_COMMAND_ID: Final = 64
_MAX_DATA_TEXT: Final = 200

MetricValue = float | bool
DataValue = float | bool | str
ArgValue = float | bool | str
EventKind = Literal["boot", "selftest", "error", "command_result", "info"]
EVENT_KINDS: Final = frozenset(("boot", "selftest", "error", "command_result", "info"))
CommandAction = Literal["restart", "selftest", "firmware_update", "cleaning_cycle", "config_set"]
COMMAND_ACTIONS: Final = frozenset(
    ("restart", "selftest", "firmware_update", "cleaning_cycle", "config_set")
)
#: Actions that interrupt the appliance's use: the interlocks guard these by default.
INTERRUPTING_ACTIONS: Final[frozenset[CommandAction]] = frozenset(
    ("restart", "firmware_update", "cleaning_cycle")
)
RefusalCode = Literal["door_open", "mid_cycle", "low_battery", "defrosting", "updating"]
#: Why a device refuses a command, as the owner loop tells it to the owner.
REFUSAL_CODES: Final = ("door_open", "mid_cycle", "low_battery", "defrosting", "updating")

_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)
_METRIC_RE: Final = re.compile(METRIC_NAME_PATTERN)
_WORD_RE: Final = re.compile(WORD_PATTERN)
_MAX_INT: Final = 2**63 - 1
#: Names and words already checked (a device sends the same few again and again), so
#: a reading is checked at the cost of a set lookup per metric; bounded.
_KNOWN_LIMIT: Final = 4_096
_known_ids: set[str] = set()
_known_names: set[str] = set()
_known_words: set[str] = set()


def _remember(known: set[str], value: str) -> None:
    if len(known) >= _KNOWN_LIMIT:
        known.clear()
    known.add(value)


# -- topics ------------------------------------------------------------------------------


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` when it follows the id pattern.

    Raises:
        ContractError: ``bad_id``.
    """
    if type(device_id) is str and device_id in _known_ids:
        return device_id
    if type(device_id) is not str or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise ContractError("bad_id", f"device id {device_id!r} breaks the pattern")
    _remember(_known_ids, device_id)
    return device_id


def telemetry_topic(device_id: str) -> str:
    """Topic a device publishes its readings on (QoS 1)."""
    return f"devices/{device_id}/telemetry"


def events_topic(device_id: str) -> str:
    """Topic a device publishes boot, self-test, error, info and command results on (QoS 1)."""
    return f"devices/{device_id}/events"


def status_topic(device_id: str) -> str:
    """Retained ``online``/``offline`` topic; ``offline`` is the last will (QoS 1)."""
    return f"devices/{device_id}/status"


def commands_topic(device_id: str) -> str:
    """Topic the backend sends commands on (QoS 1)."""
    return f"devices/{device_id}/commands"


# -- messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A command from the backend.

    Attributes:
        id: unique command id; the device echoes it as ``command_id`` in its result.
        action: what to do.
        args: arguments (``{"version": "2.4.0", "url": ..., "sha256": ...}``).
    """

    id: str
    action: CommandAction
    args: Mapping[str, ArgValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an interlock refuses a command now, in the contract's words.

    The ``command_result`` carries ``ok: false``, ``code`` = :attr:`code` and
    ``detail`` = ``"refused: <words>"``; the owner loop reads either and tells the owner
    (``door_open`` becomes "the door is open").

    Attributes:
        code: one of :data:`REFUSAL_CODES`.
        words: plain words for people (``"the door is open; will be possible once it is
            closed"``).
    """

    code: RefusalCode
    words: str

    def __post_init__(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ContractError(
                "bad_event", f"refusal code {self.code!r} is not one of {', '.join(REFUSAL_CODES)}"
            )
        _text("detail", self.detail, _MAX_DETAIL)

    @property
    def detail(self) -> str:
        """The result's ``detail``: ``refused: <words>``."""
        return f"refused: {self.words}"


# -- checks ------------------------------------------------------------------------------


def _header(device_id: str, seq: int, ts_ms: int, now_ms: int | None) -> None:
    check_device_id(device_id)
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise ContractError("bad_seq", f"seq must be an integer from 0 to 2^63-1 (got {seq!r})")
    if type(ts_ms) is not int:
        raise ContractError("bad_ts", f"ts must be integer epoch milliseconds (got {ts_ms!r})")
    if now_ms is not None:
        if ts_ms < now_ms - MAX_AGE_MS:
            raise ContractError("too_old", f"ts {ts_ms} is older than the 35-day backfill window")
        if ts_ms > now_ms + MAX_FUTURE_MS:
            raise ContractError("in_future", f"ts {ts_ms} is more than 5 minutes ahead")


def _metric_value(name: str, value: object) -> MetricValue:
    if type(value) is float and -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
        return value  # the common case first
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        number = float(value)
        if not -MAX_ABS_VALUE <= number <= MAX_ABS_VALUE:  # false for NaN too
            raise ContractError("bad_value", f"metric {name} = {value!r} is not within ±1e12")
        return int(value) if isinstance(value, int) else number
    raise ContractError("bad_value", f"metric {name} must be a number or a bool (got {value!r})")


def _name(name: object, reason: str, what: str) -> str:
    if type(name) is not str or _METRIC_RE.fullmatch(name) is None:
        raise ContractError(reason, f"{what} name {name!r} breaks the name pattern")
    return name


def _metric_name(name: object) -> str:
    if type(name) is str and name in _known_names:
        return name
    _name(name, "bad_metric_name", "metric")
    if name in RESERVED_METRIC_NAMES:
        raise ContractError("bad_metric_name", f"metric name {name!r} is reserved")
    _remember(_known_names, name)  # type: ignore[arg-type]
    return name  # type: ignore[return-value]


def _word(key: str, value: object, reason: str) -> str:
    if type(value) is str and value in _known_words:
        return value
    if type(value) is not str or _WORD_RE.fullmatch(value) is None:
        raise ContractError(reason, f"{key} must be a short word (got {value!r})")
    _remember(_known_words, value)
    return value


def _text(key: str, value: object, limit: int) -> str:
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise ContractError("bad_event", f"{key} must be printable text of at most {limit}")
    return value


_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _json_dumps(body: dict[str, object]) -> bytes:
    return _JSON.encode(body).encode()


#: Every value is checked (finite, within 64-bit integers) before it is encoded, so
#: both encoders write the same JSON values.
_dumps: Final[Callable[[dict[str, object]], bytes]] = (
    _json_dumps if orjson is None else orjson.dumps
)


def _dump(body: dict[str, object]) -> bytes:
    payload = _dumps(body)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(
            "too_large", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    return payload


def encode_reading(
    device_id: str,
    seq: int,
    ts_ms: int,
    metrics: Mapping[str, object],
    status: str | None = None,
    *,
    now_ms: int | None = None,
) -> bytes:
    """Check a reading against contract v1 and encode its telemetry payload.

    Args:
        device_id: the publishing device.
        seq: its sequence number (shared with events).
        ts_ms: when it was taken, epoch milliseconds UTC.
        metrics: name to finite number (magnitude at most 1e12) or bool; 1 to 64 entries.
        status: operating state, a short word.
        now_ms: the device's clock; with it, ``ts_ms`` is checked against the time window.

    Raises:
        ContractError: what breaks the contract, with the gateway's reason code.
    """
    _header(device_id, seq, ts_ms, now_ms)
    if not isinstance(metrics, Mapping) or not metrics:
        raise ContractError("bad_metrics", "metrics must be a non-empty mapping")
    if len(metrics) > MAX_METRICS:
        raise ContractError("too_many_metrics", f"more than {MAX_METRICS} metrics")
    plain = type(metrics) is dict  # plain values in a dict are encoded as they are
    known = _known_names
    for name, value in metrics.items():
        if not (type(name) is str and name in known):
            _metric_name(name)
        kind = type(value)
        if kind is float or kind is int:
            if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:  # type: ignore[operator]
                _metric_value(name, value)  # raises (NaN too)
        elif kind is not bool:
            plain = False
    clean: Mapping[str, object] = (
        metrics if plain else {name: _metric_value(name, v) for name, v in metrics.items()}
    )
    body: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": device_id,
        "seq": seq,
        "ts": ts_ms,
        "metrics": clean,
    }
    if status is not None:
        body["status"] = _word("status", status, "bad_status")
    return _dump(body)


def encode_event(
    device_id: str,
    seq: int,
    ts_ms: int,
    kind: EventKind,
    *,
    code: str | None = None,
    command_id: str | None = None,
    ok: bool | None = None,
    detail: str | None = None,
    data: Mapping[str, object] | None = None,
    now_ms: int | None = None,
) -> bytes:
    """Check an event against contract v1 and encode its payload.

    Args:
        device_id: the publishing device.
        seq: its sequence number (shared with telemetry).
        ts_ms: when it happened, epoch milliseconds UTC.
        kind: ``boot``, ``selftest``, ``error``, ``command_result`` or ``info``.
        code: a short word: error code, self-test verdict, firmware version.
        command_id: the command answered (printable, at most 64 characters).
        ok: whether a command succeeded or a self-test passed.
        detail: plain words (printable, at most 500 characters).
        data: at most 64 named values: finite numbers, bools, text of at most 200.
        now_ms: the device's clock; with it, ``ts_ms`` is checked against the time window.

    Raises:
        ContractError: what breaks the contract, with the gateway's reason code.
    """
    _header(device_id, seq, ts_ms, now_ms)
    if kind not in EVENT_KINDS:
        raise ContractError("bad_event", f"event type {kind!r} is unknown")
    body: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": device_id,
        "seq": seq,
        "ts": ts_ms,
        "type": kind,
    }
    if code is not None:
        body["code"] = _word("code", code, "bad_event")
    if command_id is not None:
        body["command_id"] = _text("command_id", command_id, _MAX_COMMAND_ID)
    if ok is not None:
        if type(ok) is not bool:
            raise ContractError("bad_event", "ok must be a bool")
        body["ok"] = ok
    if detail is not None:
        body["detail"] = _text("detail", detail, _MAX_DETAIL)
    if data:
        if len(data) > MAX_METRICS:
            raise ContractError("bad_event", f"data holds more than {MAX_METRICS} entries")
        clean: dict[str, object] = {}
        for name, value in data.items():
            _name(name, "bad_event", "data")
            clean[name] = _data_value(name, value)
        body["data"] = clean
    return _dump(body)


def _data_value(name: str, value: object) -> DataValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > _MAX_DATA_TEXT:
            raise ContractError("bad_event", f"data {name} is longer than {_MAX_DATA_TEXT}")
        return value
    if isinstance(value, int):
        if -_MAX_INT <= value <= _MAX_INT:
            return int(value)
        if abs(value) < 10**308:  # beyond 64 bits the gateway reads a float anyway
            return float(value)
    elif isinstance(value, float) and math.isfinite(value):
        return float(value)
    raise ContractError("bad_event", f"data {name} must be a finite number, bool or short text")


def decode_command(payload: bytes) -> Command:
    """Decode a command payload ``{id, action, args}``.

    Raises:
        ContractError: ``bad_json`` or ``bad_command``.
    """
    try:
        obj = json.loads(payload, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError("bad_json", "command is not valid JSON") from exc
    if type(obj) is not dict:
        raise ContractError("bad_command", "command must be a JSON object")
    command_id, action, args = obj.get("id"), obj.get("action"), obj.get("args", {})
    if (
        type(command_id) is not str
        or not 0 < len(command_id) <= _MAX_COMMAND_ID
        or not command_id.isprintable()
    ):
        # the id is echoed in the result, where it must be printable text of 1-64
        raise ContractError("bad_command", "command id must be printable text of 1-64")
    if action not in COMMAND_ACTIONS:
        raise ContractError("bad_command", f"unknown action {action!r}")
    if type(args) is not dict:
        raise ContractError("bad_command", "args must be an object")
    clean: dict[str, ArgValue] = {}
    for key, value in args.items():
        if not isinstance(value, bool | int | float | str):
            raise ContractError("bad_command", f"argument {key} must be a number, bool or text")
        clean[key] = value
    return Command(command_id, action, clean)


def _no_constant(name: str) -> object:
    # Python's json reads NaN and Infinity; JSON (and the backend's encoder) has neither
    raise ValueError(f"{name} is not JSON")
