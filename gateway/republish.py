"""Republishing device messages on their diagnostics partition's topic, once durable.

Pipeline place: the last step of the gateway's writer, after a batch's points are in
InfluxDB or the spool and before the batch is acknowledged to the broker. Each device
message (telemetry and events) goes out again, QoS 1 with the device's own payload, on
``fleet/partitions/{p}/{device_id}/{channel}`` (:mod:`wire.partitions`), where the
diagnostics worker holding partition ``p`` reads it through that partition's persistent
session (ARCHITECTURE "Diagnostics partitioned by device").

Delivery: a device message is acknowledged to the broker only after its point is
durable AND the broker has acknowledged (PUBACK) its republished copy. A gateway crash
in between (SIGKILL included) makes the broker deliver it to the gateway again, and it
is stored (overwriting itself) and republished again: duplicates are possible, losses
are not; the workers drop a device's item that is not newer than the last one they
scored.

Pipelined: the writer does not wait for a batch's PUBACKs before it stores
the next batch. :meth:`Republisher.submit` writes a stored batch's publishes and queues
it; :meth:`Republisher.run` waits for each queued batch's PUBACKs, in the order the
batches were submitted, and only then settles it (the acknowledgement to the broker).
The window is bounded: at most ``window`` republished messages wait for their PUBACKs
(beyond it, :meth:`~Republisher.submit` waits, which holds up the writer, whose full
queue holds up the reader: back-pressure, never memory growth), and never more than the
broker's Receive Maximum (the client's send quota). A batch whose republish failed (the
connection dropped, or no PUBACK within ``puback_timeout_s``: then the connection is
dropped on purpose) is settled unacknowledged, so the broker delivers it again.

Order: the publishes of a batch are written in the batch's order on the gateway's one
connection (:meth:`~wire.mqtt.MqttClient.send_many`, pipelined, no task per message),
batches one after another, and the broker keeps a session's messages in order, so one
gateway hands each partition its devices' messages in the order it received them.
Across several gateways there is no such order: the workers reorder
(:mod:`diagnostics.partition`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from wire.errors import BrokerUnavailableError
from wire.mqtt import InFlight, Message, MqttClient
from wire.partitions import partition_of, partition_topic
from wire.protocol.topics import split_device_topic

__all__ = ["Republisher", "Settle"]

_LOG = logging.getLogger(__name__)
_CHANNELS: Final = frozenset(("telemetry", "events"))

#: Called once per submitted batch, in submission order: ``True`` when every message
#: was republished (the broker took it, or refused it for good), ``False`` when the
#: batch must not be acknowledged (the broker is to deliver it again).
Settle = Callable[[bool], None]


@dataclass(slots=True, eq=False)
class _Submitted:
    """A stored batch whose republished copies wait for their PUBACKs."""

    client: MqttClient
    sent: InFlight | None  # None: nothing to republish, or the send failed
    count: int
    failed: bool
    settle: Settle


class Republisher:
    """Republishes stored batches' device messages on their partitions' topics, pipelined.

    Args:
        partitions: how many partitions the devices are spread over (the diagnostics
            workers' ``partitions`` must be the same).
        window: at most this many republished messages wait for their PUBACKs (a batch
            larger than it is still sent, alone).
        puback_timeout_s: how long a batch's PUBACKs may take once it is first in line;
            after that the connection is dropped and the batch is not acknowledged.

    Attributes:
        republished: messages the broker took on a partition topic.
        refused: messages the broker refused for good (ACL, size); logged and skipped.
        failed: messages whose republish failed (left unacknowledged for the broker to
            deliver again).
        in_flight: republished messages waiting for their PUBACK now.
    """

    def __init__(
        self, partitions: int, *, window: int = 50_000, puback_timeout_s: float = 60.0
    ) -> None:
        self.partitions = partitions
        self.window = window
        self.puback_timeout_s = puback_timeout_s
        self.republished = 0
        self.refused = 0
        self.failed = 0
        self.in_flight = 0
        self._topics: dict[str, str | None] = {}
        self._submitted: deque[_Submitted] = deque()
        self._queued = asyncio.Event()  # set by submit, for run
        self._room = asyncio.Event()  # set by run, for submit

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

    async def submit(self, client: MqttClient, messages: Sequence[Message], settle: Settle) -> None:
        """Write ``messages``' republished copies (device topics only); do not wait for PUBACKs.

        Waits while the window is full. ``settle`` is called by :meth:`run` once every
        PUBACK came (or the republish failed), after the batches submitted before.
        """
        sends: list[tuple[str, bytes]] = []
        for message in messages:
            topic = self._topic(message.topic)
            if topic is not None:
                sends.append((topic, message.payload))
        while self.in_flight and self.in_flight + len(sends) > self.window:
            self._room.clear()
            await self._room.wait()
        sent: InFlight | None = None
        failed = False
        if sends:
            try:
                sent = await client.send_many(sends)
            except BrokerUnavailableError as exc:
                failed = True
                _LOG.warning("stored batch not republished (%s); the broker resends it", exc)
        self.in_flight += len(sends)
        self._submitted.append(_Submitted(client, sent, len(sends), failed, settle))
        self._queued.set()

    def _count(self, outcomes: Sequence[object]) -> None:
        for outcome in outcomes:
            if outcome is None:
                self.republished += 1
            else:
                self.refused += 1
                _LOG.warning("a device message was not republished: %s", outcome)

    async def run(self) -> None:
        """Settle the submitted batches in order as their PUBACKs come; until cancelled."""
        submitted = self._submitted
        while True:
            if not submitted:
                self._queued.clear()
                await self._queued.wait()
                continue
            head = submitted[0]
            ok = not head.failed
            if head.sent is not None and not head.failed:
                try:
                    async with asyncio.timeout(self.puback_timeout_s):
                        outcomes = await head.sent.acked()
                except TimeoutError:
                    ok = False
                    _LOG.error(
                        "no PUBACK within %.0f s for %d republished messages",
                        self.puback_timeout_s,
                        head.count,
                    )
                except BrokerUnavailableError as exc:
                    ok = False
                    _LOG.warning("stored batch not republished (%s); the broker resends it", exc)
                else:
                    self._count(outcomes)
            if not ok:
                self.failed += head.count
                if head.client.connected:
                    # unacknowledged on a live connection, the batch would not come
                    # again before the next connection: make it the next one now
                    _LOG.warning("dropping the connection so that the broker resends it")
                    head.client.abort()
            submitted.popleft()
            self.in_flight -= head.count
            self._room.set()
            head.settle(ok)
