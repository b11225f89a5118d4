"""Device partitions: which diagnostics partition a device belongs to, and its topics.

Pipeline place: between the gateway and diagnostics when diagnostics is partitioned by
device (ARCHITECTURE "Diagnostics partitioned by device"). The gateway republishes each
device message, after its point is durable, on its partition's topic
``fleet/partitions/{p}/{device_id}/{channel}`` with the device's own payload; the
diagnostics worker that holds partition ``p`` reads ``fleet/partitions/{p}/#`` through
that partition's own persistent MQTT session. A device's partition is a hash of its id
(CRC-32, the same in every process and Python version) modulo the partition count, so
the gateway and every worker agree without talking to each other.
"""

from __future__ import annotations

import zlib
from typing import Final

from wire.protocol.topics import DeviceChannel, split_device_topic

__all__ = [
    "PARTITIONS_PREFIX",
    "partition_filter",
    "partition_of",
    "partition_topic",
    "split_partition_topic",
]

#: Topics of the partitions start with this (service users may read and write ``fleet/#``).
PARTITIONS_PREFIX: Final = "fleet/partitions"
_PREFIX_PARTS: Final = 2


def partition_of(device_id: str, count: int) -> int:
    """The partition of ``device_id`` among ``count`` (CRC-32 of the id, modulo)."""
    return zlib.crc32(device_id.encode()) % count


def partition_topic(partition: int, device_id: str, channel: DeviceChannel) -> str:
    """The topic a device message is republished on for its partition."""
    return f"{PARTITIONS_PREFIX}/{partition}/{device_id}/{channel}"


def partition_filter(partition: int) -> str:
    """The topic filter of one partition's messages."""
    return f"{PARTITIONS_PREFIX}/{partition}/#"


def split_partition_topic(topic: str) -> tuple[int, str, DeviceChannel] | None:
    """Split ``fleet/partitions/{p}/{device_id}/{channel}``.

    Returns:
        ``(partition, device_id, channel)``, or ``None`` when the topic is not one of a
        partition or its device part is not a valid device topic.
    """
    head, sep, rest = topic.partition(PARTITIONS_PREFIX + "/")
    if head or not sep:
        return None
    number, sep, device_topic = rest.partition("/")
    if not sep or not number.isdigit():
        return None
    target = split_device_topic("devices/" + device_topic)
    if target is None:
        return None
    return int(number), target[0], target[1]
