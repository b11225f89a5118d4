"""Typed messages of the device contract, schema version 1 (the wire's frozen values).

Everything past :mod:`wire.protocol.codec` sees these dataclasses, never dicts or
MQTT message objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

__all__ = [
    "COMMAND_ACTIONS",
    "EVENT_KINDS",
    "SCHEMA_VERSION",
    "Command",
    "CommandAction",
    "Event",
    "EventKind",
    "MetricValue",
    "Reading",
    "ms_to_datetime",
]

SCHEMA_VERSION: Final = 1
_INF: Final = math.inf
_NEG_INF: Final = -math.inf

MetricValue = float | bool
EventKind = Literal["boot", "selftest", "error", "command_result", "info"]
EVENT_KINDS: Final = frozenset(("boot", "selftest", "error", "command_result", "info"))
CommandAction = Literal["restart", "selftest", "firmware_update", "cleaning_cycle", "config_set"]
COMMAND_ACTIONS: Final = frozenset(
    ("restart", "selftest", "firmware_update", "cleaning_cycle", "config_set")
)


def ms_to_datetime(ts_ms: int) -> datetime:
    """Convert epoch milliseconds to a UTC-aware datetime."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


def _check_time(ts: datetime) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")


@dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry message from one device.

    Attributes:
        device_id: the publishing device.
        seq: the device's own sequence number (monotonic per boot-independent counter).
        ts_ms: the device's timestamp, epoch milliseconds UTC (what InfluxDB stores).
        metrics: metric name to finite number or bool.
        status: optional operating state (``idle``, ``washing`` ...).
    """

    device_id: str
    seq: int
    ts_ms: int
    metrics: Mapping[str, MetricValue]
    status: str | None = None

    def __post_init__(self) -> None:
        for value in self.metrics.values():
            if not _NEG_INF < value < _INF:  # false for NaN and infinities; bools pass
                raise ValueError(f"reading of {self.device_id} holds a value that is not finite")

    @property
    def ts(self) -> datetime:
        """The device's timestamp as a UTC-aware datetime."""
        return ms_to_datetime(self.ts_ms)


@dataclass(frozen=True, slots=True)
class Event:
    """A device event: boot, self-test result, error code, command result.

    Attributes:
        device_id: the publishing device.
        seq: the device's sequence number (shared with telemetry).
        ts_ms: the device's timestamp, epoch milliseconds UTC.
        kind: what happened.
        code: an error or fault code (``E21``), a self-test verdict, a firmware version.
        command_id: for ``command_result``, the command answered.
        ok: for ``command_result`` and ``selftest``, whether it succeeded or passed.
        detail: plain words from the device (why a command was refused ...).
        data: extra named values (self-test measurements, model, firmware).
    """

    device_id: str
    seq: int
    ts_ms: int
    kind: EventKind
    code: str | None = None
    command_id: str | None = None
    ok: bool | None = None
    detail: str | None = None
    data: Mapping[str, float | bool | str] = field(default_factory=dict)

    @property
    def ts(self) -> datetime:
        """The device's timestamp as a UTC-aware datetime."""
        return ms_to_datetime(self.ts_ms)


@dataclass(frozen=True, slots=True)
class Command:
    """A command from the cloud to one device.

    Attributes:
        id: unique command id, echoed in the device's ``command_result`` event.
        action: what the device should do.
        args: action arguments (``{"version": "2.1.0"}`` for a firmware update).
    """

    id: str
    action: CommandAction
    args: Mapping[str, float | bool | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in COMMAND_ACTIONS:
            raise ValueError(f"unknown command action {self.action!r}")
