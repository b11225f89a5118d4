"""MQTT topic scheme of the device contract (first stage of the pipeline: the wire).

Devices publish under ``devices/{device_id}/...`` and receive commands on
``devices/{device_id}/commands``; services talk on ``fleet/...``. See the README's
"Device contract" and ``ARCHITECTURE.md`` ("Bus and topics").
"""

from __future__ import annotations

import re
from typing import Final, Literal

__all__ = [
    "CASES_TOPIC",
    "DEVICE_ID_PATTERN",
    "DIAGNOSES_TOPIC",
    "REJECTED_TOPIC",
    "DeviceChannel",
    "commands_topic",
    "events_topic",
    "is_valid_device_id",
    "split_device_topic",
    "status_topic",
    "telemetry_topic",
]

DeviceChannel = Literal["telemetry", "events", "status", "commands"]

#: Device ids are short, printable and safe in a topic, a file name and a line-protocol tag.
DEVICE_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)
_CHANNELS: Final = frozenset(("telemetry", "events", "status", "commands"))

DIAGNOSES_TOPIC: Final = "fleet/diagnoses"
CASES_TOPIC: Final = "fleet/cases"
REJECTED_TOPIC: Final = "fleet/rejected"


def is_valid_device_id(device_id: str) -> bool:
    """Return whether ``device_id`` follows the contract's id pattern."""
    return _DEVICE_ID_RE.fullmatch(device_id) is not None


def telemetry_topic(device_id: str) -> str:
    """Topic a device publishes its readings on."""
    return f"devices/{device_id}/telemetry"


def events_topic(device_id: str) -> str:
    """Topic a device publishes boot, self-test, error and command-result events on."""
    return f"devices/{device_id}/events"


def status_topic(device_id: str) -> str:
    """Retained ``online``/``offline`` topic (the device's last will)."""
    return f"devices/{device_id}/status"


def commands_topic(device_id: str) -> str:
    """Topic the cloud publishes commands to a device on."""
    return f"devices/{device_id}/commands"


def split_device_topic(topic: str) -> tuple[str, DeviceChannel] | None:
    """Split ``devices/{id}/{channel}`` into its id and channel.

    Returns:
        ``(device_id, channel)``, or ``None`` when the topic is not a device topic
        or the id breaks the id pattern.
    """
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] not in _CHANNELS:
        return None
    if _DEVICE_ID_RE.fullmatch(parts[1]) is None:
        return None
    return parts[1], parts[2]  # type: ignore[return-value]
