"""Republishing device messages on their diagnostics partition's topic, once durable.

Pipeline place: the last step of the gateway's writer, after a batch's points are in
InfluxDB or the spool and before the batch is acknowledged to the broker. Each device
message (telemetry and events) goes out again, QoS 1 with the device's own payload, on
``fleet/partitions/{p}/{device_id}/{channel}`` (:mod:`wire.partitions`), where the
diagnostics worker holding partition ``p`` reads it through that partition's persistent
session (ARCHITECTURE "Diagnostics partitioned by device"). A message is republished
before its acknowledgement, so a gateway crash in between makes the broker deliver it to
the gateway again and it is republished again: duplicates are possible, losses are not;
the workers drop a device's item that is not newer than the last one they handled.

Order: the publishes of a batch are written in the batch's order on the gateway's one
connection (:meth:`~wire.mqtt.MqttClient.publish_many`, pipelined, no task per
message), and the broker keeps a session's messages in order, so one gateway hands each
partition its devices' messages in the order it received them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from wire.mqtt import Message, MqttClient
from wire.partitions import partition_of, partition_topic
from wire.protocol.topics import split_device_topic

__all__ = ["Republisher"]

_LOG = logging.getLogger(__name__)
_CHANNELS: Final = frozenset(("telemetry", "events"))


class Republisher:
    """Republishes a stored batch's device messages on their partitions' topics.

    Args:
        partitions: how many partitions the devices are spread over (the diagnostics
            workers' ``partitions`` must be the same).

    Attributes:
        republished: messages the broker took on a partition topic.
        refused: messages the broker refused for good (ACL, size); logged and skipped.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.republished = 0
        self.refused = 0
        self._topics: dict[str, str | None] = {}

    def _topic(self, topic: str) -> str | None:
        found = self._topics.get(topic, "")
        if found == "":
            target = split_device_topic(topic)
            if target is None or target[1] not in _CHANNELS:
                found = None
            else:
                device_id, channel = target
                found = partition_topic(
                    partition_of(device_id, self.partitions), device_id, channel
                )
            if len(self._topics) >= 200_000:
                self._topics.clear()
            self._topics[topic] = found
        return found

    async def republish(self, client: MqttClient, messages: Sequence[Message]) -> None:
        """Publish ``messages`` (device topics only) on their partitions; wait for PUBACKs.

        Raises:
            BrokerUnavailableError: the connection dropped before every PUBACK came; the
                batch is not acknowledged then, and the broker delivers it again.
        """
        sends: list[tuple[str, bytes]] = []
        for message in messages:
            topic = self._topic(message.topic)
            if topic is not None:
                sends.append((topic, message.payload))
        if not sends:
            return
        for outcome in await client.publish_many(sends):
            if outcome is None:
                self.republished += 1
            else:
                self.refused += 1
                _LOG.warning("a device message was not republished: %s", outcome)
