r"""InfluxDB line protocol for readings, events and every stage's points (wire: every stage).

The gateway decodes device payloads into frozen :class:`~wire.protocol.Reading` and
:class:`~wire.protocol.Event` values (:mod:`wire.protocol.codec`); this module turns
them into line-protocol lines, which :mod:`wire.influx` writes (or
:mod:`gateway.spool` keeps while InfluxDB is away). Timestamps are epoch milliseconds
(writes use ``precision=ms``), except that the gateway writes telemetry in microseconds
with a sub-millisecond offset from ``seq`` (``telemetry_line(..., micros=True)``), so
same-millisecond readings keep both.

Escaping follows the line protocol reference
(https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/):

* measurement: ``,`` and space;
* tag keys, tag values and field keys: ``,``, ``=`` and space;
* string field values: ``"`` and ``\``.

Everything from a device is untrusted, so this encoder also escapes ``\`` in names, and
never lets a line feed or carriage return through raw: they become the two characters
``\n`` and ``\r``, so a hostile name or text can never start a second point. The
escaping is injective (two different inputs never give the same line), but what InfluxDB
stores differs: it keeps ``\n`` as those two characters, not as a line feed, and InfluxDB
1.x keeps ``\\`` in tags and field keys as two backslashes (the 2.x reference reads it
as one).
None of this reaches well-formed data: the codec's name patterns admit no backslash,
line feed, carriage return, space, comma or equals sign.

Some inputs cannot be written at all and raise
:class:`~wire.errors.WriteRejectedError` (a permanent error: quarantine the message):
an empty name or tag value, a name or tag value ending in a backslash (InfluxDB 1.x
cannot parse ``\\`` before a separator), text that is not encodable as UTF-8, and
metrics named ``seq`` or ``status``, which this schema uses for its own fields (InfluxDB
keeps only the last of two equal field keys, so the metric would be lost silently).

Encoding readings is the gateway's hot path: escaped names and tag values are cached
(names repeat across a fleet), so a typical reading costs a dict lookup per metric, a
float ``repr`` and one ``str.encode``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

import orjson

from wire.errors import WriteRejectedError
from wire.protocol.model import Event, MetricValue, Reading

__all__ = [
    "EVENTS_MEASUREMENT",
    "HEALTH_MEASUREMENT",
    "MISMATCH_MEASUREMENT",
    "RESERVED_FIELDS",
    "TELEMETRY_MEASUREMENT",
    "event_to_line",
    "point_line",
    "reading_to_line",
    "telemetry_line",
]

#: Measurement of telemetry points (one point per reading).
TELEMETRY_MEASUREMENT: Final = "telemetry"
#: Measurement of device events (one point per event).
EVENTS_MEASUREMENT: Final = "device_events"
#: Measurement of the diagnostics stage's per-reading scores, next to ``telemetry``.
HEALTH_MEASUREMENT: Final = "health"
#: Measurement of what devices send that no product file describes, per model (diagnostics).
MISMATCH_MEASUREMENT: Final = "product_mismatch"
#: Field keys of telemetry points that are not metrics.
RESERVED_FIELDS: Final = frozenset(("seq", "status"))

# Names: tag keys, tag values and field keys.
_NAME_SPECIAL: Final = re.compile(r"[,= \\\n\r]")
_NAME_ESCAPES: Final = {
    ord("\\"): "\\\\",
    ord(","): "\\,",
    ord("="): "\\=",
    ord(" "): "\\ ",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
}
# String field values (inside double quotes).
_STRING_SPECIAL: Final = re.compile(r'["\\\n\r]')
_STRING_ESCAPES: Final = {
    ord("\\"): "\\\\",
    ord('"'): '\\"',
    ord("\n"): "\\n",
    ord("\r"): "\\r",
}
_MEASUREMENT_ESCAPES: Final = {
    ord("\\"): "\\\\",
    ord(","): "\\,",
    ord(" "): "\\ ",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
}

# Caches of escaped names and short string values. Bounded: a hostile fleet inventing
# names cannot grow them past _CACHE_LIMIT entries (they are cleared and refilled).
_CACHE_LIMIT: Final = 65_536
_NAMES: dict[str, str] = {}
_WORDS: dict[str, str] = {}
_TEMPLATES: dict[tuple[str, ...], tuple[bytes, bytes]] = {}

_TELEMETRY_PREFIX: Final = TELEMETRY_MEASUREMENT.translate(_MEASUREMENT_ESCAPES) + ",device="
_EVENTS_PREFIX: Final = EVENTS_MEASUREMENT.translate(_MEASUREMENT_ESCAPES) + ",device="


def _escape_name(raw: str) -> str:
    """Escape a tag key, tag value or field key, and remember the result."""
    if not raw:
        raise WriteRejectedError("line protocol has no empty names or tag values")
    if raw[-1] == "\\":
        raise WriteRejectedError("line protocol cannot end a name or tag value in a backslash")
    escaped = raw.translate(_NAME_ESCAPES) if _NAME_SPECIAL.search(raw) else raw
    if len(_NAMES) >= _CACHE_LIMIT:
        _NAMES.clear()
    _NAMES[raw] = escaped
    return escaped


def _escape_string(raw: str) -> str:
    """Escape a string field value (without its quotes)."""
    return raw.translate(_STRING_ESCAPES) if _STRING_SPECIAL.search(raw) else raw


def _escape_word(raw: str) -> str:
    """Escape a short, repeating string field value (a status) and remember it."""
    escaped = _escape_string(raw)
    if len(_WORDS) >= _CACHE_LIMIT:
        _WORDS.clear()
    _WORDS[raw] = escaped
    return escaped


def _reserved_metric(metrics: Mapping[str, MetricValue]) -> WriteRejectedError:
    names = sorted(RESERVED_FIELDS.intersection(metrics))
    return WriteRejectedError(f"metric names {names!r} are reserved for the point's own fields")


def reading_to_line(reading: Reading) -> bytes:
    """Encode a reading as one line of the ``telemetry`` measurement.

    The line is ``telemetry,device=<id> <metric>=<value>,...,status="<status>",seq=<n>i
    <ts_ms>``: floats as their ``repr``, bools as ``true``/``false``, ``status`` only
    when the reading has one. The result never contains a raw line feed.

    Args:
        reading: a validated reading.

    Returns:
        The UTF-8 line, without a trailing newline.

    Raises:
        WriteRejectedError: the reading cannot be expressed in line protocol (see the
            module docstring); retrying will not help.
    """
    return telemetry_line(
        reading.device_id, reading.seq, reading.ts_ms, reading.metrics, reading.status
    )


def telemetry_line(
    device_id: str,
    seq: int,
    ts_ms: int,
    metrics: Mapping[str, MetricValue],
    status: str | None,
    *,
    micros: bool = False,
) -> bytes:
    """Encode the parts of a reading as one ``telemetry`` line (see :func:`reading_to_line`).

    The gateway's hot path calls this with the values the codec validated, without
    building a :class:`Reading` first.

    With ``micros`` the timestamp is in microseconds, ``ts_ms * 1000 + seq % 1000`` (write
    it with ``precision=us``): two readings of one device in the same millisecond keep
    both (their seq differs), a redelivered reading overwrites itself (same seq), and the
    series stay one per device (seq is a field, not a tag). Read with ``epoch=ms``, the
    time is the device's ``ts`` again.

    Raises:
        WriteRejectedError: the values cannot be expressed in line protocol.
    """
    if "seq" in metrics or "status" in metrics:
        raise _reserved_metric(metrics)
    # One %-template per set of metric names (a fleet repeats a few), and orjson writes
    # the values: floats in their shortest round-trip form, bools as true/false, which
    # is exactly line protocol's spelling. About 40% faster than formatting each field.
    names = tuple(metrics)
    template = _TEMPLATES.get(names)
    if template is None:
        template = _template(names)
    values = orjson.dumps(list(metrics.values()))[1:-1].split(b",") if metrics else []
    device = _NAMES.get(device_id) or _escape_name(device_id)
    ts = ts_ms * 1000 + seq % 1000 if micros else ts_ms
    try:
        if status is None:
            return template[0] % (device.encode(), *values, seq, ts)
        word = _WORDS.get(status) or _escape_word(status)
        return template[1] % (device.encode(), *values, word.encode(), seq, ts)
    except UnicodeEncodeError as exc:
        raise WriteRejectedError("reading holds text that is not valid UTF-8") from exc


def _template(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """Build the line templates (without and with status) for one set of metric names."""
    try:
        fields = b"".join(
            (_NAMES.get(n) or _escape_name(n)).encode().replace(b"%", b"%%") + b"=%b,"
            for n in names
        )
    except UnicodeEncodeError as exc:
        raise WriteRejectedError("reading holds text that is not valid UTF-8") from exc
    head = _TELEMETRY_PREFIX.encode().replace(b"%", b"%%") + b"%b " + fields
    templates = (head + b"seq=%di %d", head + b'status="%b",seq=%di %d')
    if len(_TEMPLATES) >= _CACHE_LIMIT:
        _TEMPLATES.clear()
    _TEMPLATES[names] = templates
    return templates


def event_to_line(event: Event) -> bytes:
    """Encode an event as one line of the ``device_events`` measurement.

    Tags are ``device`` and ``kind``; fields are ``seq`` (integer), ``code``,
    ``command_id`` and ``detail`` (strings, when present), ``ok`` (bool, when present)
    and ``data`` (a JSON object with sorted keys, as a string, when not empty).

    Args:
        event: a validated event.

    Returns:
        The UTF-8 line, without a trailing newline.

    Raises:
        WriteRejectedError: the event cannot be expressed in line protocol.
    """
    names = _NAMES
    fields = [f"seq={event.seq}i"]
    if event.code is not None:
        fields.append(f'code="{_escape_string(event.code)}"')
    if event.command_id is not None:
        fields.append(f'command_id="{_escape_string(event.command_id)}"')
    if event.detail is not None:
        fields.append(f'detail="{_escape_string(event.detail)}"')
    if event.ok is not None:
        fields.append("ok=true" if event.ok else "ok=false")
    if event.data:
        try:
            data = orjson.dumps(dict(event.data), option=orjson.OPT_SORT_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise WriteRejectedError(f"event data is not JSON-encodable ({exc})") from exc
        fields.append(f'data="{_escape_string(data)}"')
    device = names.get(event.device_id) or _escape_name(event.device_id)
    kind = names.get(event.kind) or _escape_name(event.kind)
    line = f"{_EVENTS_PREFIX}{device},kind={kind} {','.join(fields)} {event.ts_ms}"
    try:
        return line.encode()
    except UnicodeEncodeError as exc:
        raise WriteRejectedError("event holds text that is not valid UTF-8") from exc


def point_line(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, float | int | bool | str],
    ts_ms: int,
) -> bytes:
    """Encode one point of any measurement (the later stages' scores, for example).

    Floats are written as floats, ints as integers (``5i``), bools as ``true``/``false``
    and strings quoted; every name and value is escaped like the telemetry lines.

    Raises:
        WriteRejectedError: no fields, a non-finite float, or text line protocol
            cannot hold.
    """
    if not fields:
        raise WriteRejectedError("a point needs at least one field")
    parts: list[str] = []
    for name, value in fields.items():
        key = _NAMES.get(name) or _escape_name(name)
        if value is True or value is False:
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}i")
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise WriteRejectedError(f"field {name!r} is not finite")
            parts.append(f"{key}={value!r}")
        else:
            parts.append(f'{key}="{_escape_string(value)}"')
    head = measurement.translate(_MEASUREMENT_ESCAPES)
    for name, value in tags.items():
        head += f",{_NAMES.get(name) or _escape_name(name)}={_escape_name(value)}"
    try:
        return f"{head} {','.join(parts)} {ts_ms}".encode()
    except UnicodeEncodeError as exc:
        raise WriteRejectedError("point holds text that is not valid UTF-8") from exc
