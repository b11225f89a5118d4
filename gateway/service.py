"""The gateway service: MQTT ingest -> validation -> InfluxDB, never losing a point.

Pipeline order (telegraf's): input (broker, QoS-1 persistent session) -> parse and
validate (:mod:`wire.protocol.codec`) -> line protocol (:mod:`wire.lineproto`)
-> batch -> output (InfluxDB, or the on-disk spool while it is away) -> acknowledge.
This module is the broker side (sessions, reading, batching, acknowledging); the store
side, InfluxDB and the spool and the spool's replay, is :mod:`gateway.durable`.

Delivery rule (ARCHITECTURE "Delivery and safety rules"): a message is acknowledged
to the broker only after its point is in InfluxDB or in the spool (and, republishing
for partitioned diagnostics, its republished copy is acknowledged by the broker:
pipelined, :mod:`gateway.republish`). Until then the
broker keeps it in our persistent session, so a crash of the gateway at any moment
loses nothing: the broker redelivers and the replayed points overwrite themselves
(series and timestamp come from the device; telemetry's time carries ``seq`` below the
millisecond, so two readings of one millisecond keep both).

Progress or say so: InfluxDB is probed on a timer whatever the spool holds,
and tried directly when the spool refuses writes; spool errors are retried with backoff
and never end :meth:`Gateway.run`; batches received before a disconnect are stored (or,
after a bound, dropped knowingly for the broker to resend) by a writer that outlives the
connection, so a full queue never holds up the reconnect; ``/health`` turns 503 when the
gateway is not connected, has made nothing durable for ``stall_after_s`` while messages
wait, or the spool cannot take writes; a lost broker session is counted and logged.

Several gateways: with ``shared_group`` set, gateways share the device
topics through an MQTT 5 shared subscription, each under its ``instance`` name with
its own persistent session (client id ``client_id-instance``) and its own spool
(``spool_dir/instance``). Mosquitto does not hand a dead member's messages to the
others: it keeps them, and keeps routing the member's share, in the member's session
until the same instance comes back (README, "Several gateways"; pinned by
``tests/test_gateway_shared.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import orjson

from gateway.durable import PREVIEW_BYTES, DurableStore
from gateway.metrics import GatewayMetrics, MetricsServer
from gateway.republish import Republisher
from gateway.settings import GatewaySettings
from wire.adoption import SessionAdoption, state_topic
from wire.consumer import consume_forever, shared_filters
from wire.errors import (
    BrokerUnavailableError,
    ConfigError,
    RejectedError,
    WriteRejectedError,
)
from wire.influx import InfluxSettings
from wire.lineproto import event_to_line, telemetry_line
from wire.mqtt import Message, MqttClient, Will
from wire.protocol.codec import decode_event, validate_reading
from wire.protocol.topics import REJECTED_TOPIC, split_device_topic
from wire.settings import MqttSettings
from wire.tasks import cancel_and_wait

__all__ = ["Gateway"]

_LOG = logging.getLogger(__name__)

_INGEST_FILTERS: Final = ("devices/+/telemetry", "devices/+/events")
_TOPIC_CACHE_MAX: Final = 200_000
_LOUD_REJECTS_PER_REASON: Final = 20
_MIN_CHUNK: Final = 1_000
_GATHER_S: Final = 0.01
#: Mosquitto's count of messages it dropped (queue limits), read to make drops visible.
SYS_DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
#: How often a reader blocked on a full queue looks whether its connection is still up.
_PUT_CHECK_S: Final = 0.5
#: How long a lost connection's batches may take to be stored before the reconnect.
_FINISH_ON_LOST_S: Final = 5.0
#: Marker in the spool directory: this gateway has had a broker session before.
_SESSION_MARKER: Final = "mqtt-session"
#: Topic a retiring gateway sends itself a marker on, behind what its session queued.
_RETIRE_TOPIC: Final = "fleet/gateways/{client_id}/retired"


@dataclass(slots=True, eq=False)
class _Connection:
    """One broker connection as the writer sees it: its batches may outlive it."""

    client: MqttClient
    outstanding: int = 0
    abandoned: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Batch:
    """Lines parsed from a run of messages, and the messages to acknowledge after."""

    lines: list[bytes]
    messages: list[Message]
    newest_ts_ms: int
    connection: _Connection


class Gateway:
    """The ingest service, an async context manager; :meth:`run` works until cancelled.

    Args:
        mqtt: how to reach the broker.
        influx: how to reach InfluxDB.
        settings: batching, spool, limits, metrics endpoint.
        clock: wall clock in seconds (injectable for tests of the time window).
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        influx: InfluxSettings,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mqtt = mqtt
        self._settings = settings
        self._clock = clock
        self._limits = settings.limits()
        self.metrics = GatewayMetrics(stall_after_s=settings.stall_after_s)
        #: InfluxDB first, the spool while it is away, and the spool's replay
        self._durable = DurableStore(
            influx, settings, self.metrics, clock=clock, reporter=lambda: self._client
        )
        self._metrics_server: MetricsServer | None = None
        self._topics: dict[str, tuple[str, str] | None] = {}
        self._client: MqttClient | None = None
        self._subscribed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=settings.max_pending_batches)
        self._retire_topic: str | None = None
        self._retire_seen = asyncio.Event()
        #: messages settled without an acknowledgement (the broker holds them still)
        self._left_unacked = 0
        #: announces this gateway to its shared group and adopts dead members' sessions
        self.adoption = (
            SessionAdoption(
                role="gateways",
                group=settings.shared_group,
                instance=settings.instance,
                client_id=settings.session_client_id,
                after_s=settings.adopt_after_s,
                new_client=self._new_client,
                consume=lambda client: self._consume(client, main=False),
                on_hold=self._note_hold,
            )
            if settings.adopt_after_s and settings.shared_group and settings.instance
            else None
        )
        #: republishes stored messages for partitioned diagnostics, when configured
        self.republisher = (
            Republisher(settings.republish_partitions) if settings.republish_partitions else None
        )
        self.metrics.republish = self.republisher

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        settings = self._settings
        await self._durable.__aenter__()
        if settings.metrics_port or settings.metrics_host:
            self._metrics_server = MetricsServer(
                self.metrics, settings.metrics_host, settings.metrics_port
            )
            await self._metrics_server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.__aexit__(exc_type, exc, tb)
        await self._durable.__aexit__(exc_type, exc, tb)

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on, once started."""
        return self._metrics_server.port if self._metrics_server else None

    async def wait_subscribed(self) -> None:
        """Wait until the gateway is subscribed (tests and the stack runner use it)."""
        await self._subscribed.wait()

    async def drain(self) -> None:
        """Wait until every message received so far is durable and acknowledged."""
        await self._drained.wait()

    async def run(self) -> None:
        """Consume the broker and replay the spool until cancelled.

        Raises:
            ConfigError: the broker refused our credentials.
        """
        async with asyncio.TaskGroup() as group:
            group.create_task(self._durable.replay_loop(), name="gateway-replay")
            group.create_task(self._write_loop(), name="gateway-writer")
            group.create_task(self._connection_loop(), name="gateway-ingest")
            if self.adoption is not None:
                group.create_task(self.adoption.run(), name="gateway-adoption")

    async def retire(self) -> None:
        """Take this instance out of its shared group, storing everything it holds.

        For scaling down (README, "Several gateways"): Mosquitto keeps routing a stopped
        member's share to its session until the session expires, and then deletes it.
        This resumes the instance's session, unsubscribes (nothing new is routed to it),
        stores what the broker had queued for it up to a marker it sends itself after
        the UNSUBACK (the broker sends one client's messages first in, first out),
        replays its spool into InfluxDB, and then ends the session. Run it while the
        instance itself is stopped. A message it received and could not acknowledge (a
        republished copy not acknowledged, the connection lost) is still the session's:
        the session is then kept, and the retire says so.

        Raises:
            ConfigError: no ``shared_group`` and ``instance`` set, or the broker refused
                our credentials.
            BrokerUnavailableError: the broker went away meanwhile, or a message was
                left unacknowledged; run it again.
        """
        settings = self._settings
        if not settings.shared_group or not settings.instance:
            raise ConfigError("only a gateway with shared_group and instance set can retire")
        client_id = settings.session_client_id
        self._retire_topic = _RETIRE_TOPIC.format(client_id=client_id)
        left_before = self._left_unacked
        async with asyncio.TaskGroup() as group:
            helpers = [
                group.create_task(self._durable.replay_loop(), name="gateway-replay"),
                group.create_task(self._write_loop(), name="gateway-writer"),
            ]
            client = self._own_client()
            async with client:
                self._client = client
                self._check_session(client)
                helpers.append(group.create_task(self._consume(client), name="gateway-retire"))
                filters = shared_filters(_INGEST_FILTERS, settings.shared_group)
                await client.unsubscribe(*filters, SYS_DROPPED_TOPIC)
                await client.subscribe(self._retire_topic, qos=1)
                await client.publish(self._retire_topic, b"retired", qos=1)
                await self._retire_seen.wait()
                await self.drain()
                await self._durable.spool_empty.wait()
                await cancel_and_wait(*helpers)
        left = self._left_unacked - left_before
        if left:
            # ending the session would lose them (for partitioned diagnostics at least:
            # a stored batch whose republish failed is left for the broker to resend)
            raise BrokerUnavailableError(
                f"{left} messages were not acknowledged; the session keeps them: retire again"
            )
        # A clean start with no expiry replaces the session, which ends at the disconnect;
        # an empty retained state tells the group the instance is gone, not down.
        async with self._mqtt.client(client_id, clean_start=True, session_expiry_s=0) as end:
            await end.publish(state_topic("gateways", client_id), b"", qos=1, retain=True)
        (Path(settings.instance_spool_dir) / _SESSION_MARKER).unlink(missing_ok=True)
        _LOG.info("%s retired: everything it held is stored, its session is ended", client_id)

    # -- broker side ---------------------------------------------------------------

    def _new_client(self, client_id: str, will: Will | None) -> MqttClient:
        """A client for a session: ours, or an adopted member's (with its ``will``)."""
        settings = self._settings
        return self._mqtt.session_client(
            client_id,
            session_expiry_s=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            max_buffered=max(settings.batch_max_points * 4, 10_000),
            will=will,
        )

    def _own_client(self) -> MqttClient:
        """A client for our session; in a group that adopts, its will says "down"."""
        if self.adoption is not None:
            return self.adoption.own_client()
        return self._new_client(self._settings.session_client_id, None)

    def _note_hold(self, change: int) -> None:
        """A hold on a dead member's session started (1) or ended (-1)."""
        self.metrics.adopted_sessions += change
        if change > 0:
            self.metrics.adoptions += 1

    async def _connection_loop(self) -> None:
        def subscribed(client: MqttClient) -> None:
            self._client = client
            self.metrics.mqtt_connected = True
            self._check_session(client)
            self._subscribed.set()
            if self.adoption is not None:
                self.adoption.connected(client)

        def lost() -> None:
            self._client = None
            self.metrics.mqtt_connected = False
            if self.adoption is not None:
                self.adoption.lost()

        filters = shared_filters(_INGEST_FILTERS, self._settings.shared_group)
        if self.adoption is not None:
            filters.append(self.adoption.state_filter)
        await consume_forever(
            self._own_client,
            [*filters, SYS_DROPPED_TOPIC],
            self._consume,
            on_subscribed=subscribed,
            on_lost=lost,
            retry_max_s=self._settings.retry_max_s,
        )

    def _check_session(self, client: MqttClient) -> None:
        """Count and log a persistent session the broker no longer had.

        A marker file in the spool directory remembers that a session existed, so a
        broker that lost it while the gateway was also down is noticed too. What the lost
        session held is gone from the broker: only a broker that persists (see the
        README's delivery section) keeps it.
        """
        marker = Path(self._durable.spool_directory) / _SESSION_MARKER
        if not client.session_present and marker.exists():
            self.metrics.session_lost += 1
            _LOG.error(
                "the broker lost the gateway's persistent session (%s): messages it had "
                "queued for the gateway are gone",
                client.client_id,
            )
        if not marker.exists():
            try:
                marker.touch()
            except OSError as exc:
                _LOG.warning("cannot write %s: %s", marker, exc)

    async def _consume(self, client: MqttClient, *, main: bool = True) -> None:
        # Overflow policy "block": a full queue stops the reader, the client stops
        # reading its socket, and the broker keeps the messages in our session. The
        # writer is not tied to this connection: what was received is stored even if
        # the connection drops, before the next one starts (or dropped knowingly after
        # _FINISH_ON_LOST_S; unacknowledged, the broker sends it again).
        connection = _Connection(client)
        connection.idle.set()
        try:
            await self._read_loop(connection)
        finally:
            if main:  # disconnected from now on (for /health), while the writer finishes
                self._client = None
                self.metrics.mqtt_connected = False
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # shutting down: nothing to wait for
                await self._finish(connection)

    async def _finish(self, connection: _Connection) -> None:
        """Give the writer a bounded time to store what a lost connection delivered."""
        try:
            async with asyncio.timeout(_FINISH_ON_LOST_S):
                await connection.idle.wait()
        except TimeoutError:
            connection.abandoned = True
            _LOG.warning(
                "connection ended with %d messages not yet durable after %.0f s; "
                "reconnecting: the batch being written is still stored, the queued "
                "ones are dropped for the broker to deliver again",
                connection.outstanding,
                _FINISH_ON_LOST_S,
            )

    def _route(self, topic: str) -> tuple[str, str] | None:
        route = self._topics.get(topic, False)
        if route is False:
            if len(self._topics) >= _TOPIC_CACHE_MAX:
                self._topics.clear()
            route = self._topics[topic] = split_device_topic(topic)
        return route  # type: ignore[return-value]

    async def _read_loop(self, connection: _Connection) -> None:
        client = connection.client
        limits = self._limits
        metrics = self.metrics
        max_points = self._settings.batch_max_points
        route = self._route
        while True:
            await client.wait_messages()
            if client.pending < _MIN_CHUNK:
                # A trickle: let the socket gather a few milliseconds of data and read
                # it at once, so per-read and per-wake costs are shared by many
                # messages (a QoS-1 burst otherwise arrives in many small reads).
                # Latency stays far below the batch linger.
                await client.gather(_GATHER_S)
            messages = client.take(max_points)
            now_ms = int(self._clock() * 1000)
            lines: list[bytes] = []
            append = lines.append
            counts: Counter[str] = Counter()
            newest = 0
            retire_seen = False
            for message in messages:
                target = route(message.topic)
                try:
                    if target is None:
                        if message.topic == SYS_DROPPED_TOPIC:
                            self._note_broker_dropped(message.payload)
                            continue
                        if message.topic == self._retire_topic:
                            retire_seen = True
                            continue
                        if self.adoption is not None and self.adoption.note(
                            message.topic, message.payload
                        ):
                            continue
                        raise RejectedError("bad_topic", "not a devices/{id}/{channel} topic")  # noqa: TRY301
                    device_id, channel = target
                    counts[channel] += 1
                    if channel == "telemetry":
                        seq, ts_ms, values, status = validate_reading(
                            device_id, message.payload, now_ms, limits
                        )
                        append(telemetry_line(device_id, seq, ts_ms, values, status, micros=True))
                        if ts_ms > newest:
                            newest = ts_ms
                    elif channel == "events":
                        # Milliseconds to microseconds: the batch is written with one unit.
                        event = decode_event(device_id, message.payload, now_ms, limits)
                        append(event_to_line(event) + b"000")
                    else:
                        raise RejectedError("bad_topic", f"{channel} is not ingested")  # noqa: TRY301
                except RejectedError as exc:
                    await self._reject(client, message, exc.reason, exc.detail, now_ms)
                except WriteRejectedError as exc:
                    await self._reject(client, message, "unstorable", str(exc), now_ms)
            metrics.received.update(counts)
            metrics.unacked += len(messages)
            if not connection.outstanding:
                connection.idle.clear()
            connection.outstanding += len(messages)
            self._drained.clear()
            await self._enqueue(_Batch(lines, messages, newest, connection))
            if retire_seen:
                self._retire_seen.set()

    async def _enqueue(self, batch: _Batch) -> None:
        """Queue a batch for the writer; give up on it when the connection is gone.

        A reader blocked on a full queue must still see its connection end, or the
        reconnect would wait for the writer.
        """
        client = batch.connection.client
        while True:
            try:
                async with asyncio.timeout(_PUT_CHECK_S):
                    await self._queue.put(batch)
            except TimeoutError:
                if not client.connected:
                    self._settle(batch, stored=False)
                    raise BrokerUnavailableError(
                        "connection lost while the writer was behind"
                    ) from None
            else:
                return

    def _note_broker_dropped(self, payload: bytes) -> None:
        try:
            dropped = int(payload.strip() or b"0")
        except ValueError:
            return
        if dropped > max(self.metrics.broker_dropped, 0):
            _LOG.error("the broker has dropped %d messages (queue limits): they are lost", dropped)
        self.metrics.broker_dropped = dropped

    async def _reject(
        self, client: MqttClient, message: Message, reason: str, detail: str, now_ms: int
    ) -> None:
        self.metrics.rejected[reason] += 1
        target = self._route(message.topic)
        device_id = target[0] if target else None
        count = self.metrics.rejected[reason]
        level = logging.WARNING if count <= _LOUD_REJECTS_PER_REASON else logging.DEBUG
        _LOG.log(level, "refused message from device %s: %s (%s)", device_id, reason, detail)
        report = {
            "ts": now_ms,
            "topic": message.topic[:200],
            "device_id": device_id,
            "reason": reason,
            "detail": detail,
            "size": len(message.payload),
            "preview": message.payload[:PREVIEW_BYTES].decode("utf-8", "replace"),
        }
        try:
            await client.publish(REJECTED_TOPIC, orjson.dumps(report), qos=0)
        except BrokerUnavailableError:
            _LOG.debug("could not report a refused message: broker connection lost")

    async def _write_loop(self) -> None:
        if self.republisher is None:
            await self._write_batches()
            return
        async with asyncio.TaskGroup() as group:
            # settles the stored batches as their republished copies are acknowledged,
            # while the writer goes on with the next ones (gateway.republish)
            group.create_task(self.republisher.run(), name="gateway-republish")
            await self._write_batches()

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        max_points = self._settings.batch_max_points
        linger_s = self._settings.batch_linger_s
        carry: _Batch | None = None
        while True:
            first = carry if carry is not None else await queue.get()
            carry = None
            if first.connection.abandoned:
                self._settle(first, stored=False)
                continue
            batches = [first]
            count = len(first.lines)
            deadline = loop.time() + linger_s
            while count < max_points:
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            more = await queue.get()
                    except TimeoutError:
                        break
                else:
                    more = queue.get_nowait()
                if more.connection is not first.connection:
                    carry = more  # acknowledgements go to one connection at a time
                    break
                batches.append(more)
                count += len(more.lines)
            lines = first.lines
            for more in batches[1:]:
                lines.extend(more.lines)
            await self._durable.store(lines)
            if self.republisher is None:
                for batch in batches:
                    self._settle(batch, stored=True)
            else:
                # acknowledged once their republished copies are (gateway.republish)
                await self.republisher.submit(
                    first.connection.client,
                    [m for b in batches for m in b.messages],
                    functools.partial(self._settle_all, batches),
                )

    def _settle_all(self, batches: list[_Batch], republished: bool) -> None:
        for batch in batches:
            self._settle(batch, stored=True, ack=republished)

    def _settle(self, batch: _Batch, *, stored: bool, ack: bool = True) -> None:
        """Acknowledge a stored batch (if its connection is up) or count it as dropped.

        ``ack`` false: stored but not to be acknowledged (its republish failed); the
        broker delivers it again, and it overwrites itself.
        """
        metrics = self.metrics
        connection = batch.connection
        messages = batch.messages
        acked = False
        if stored:
            if batch.newest_ts_ms > metrics.last_point_ts_ms:
                metrics.last_point_ts_ms = batch.newest_ts_ms
            client = connection.client
            if ack and client.connected:
                try:
                    client.ack_many(messages)
                    metrics.acked += sum(1 for m in messages if m.qos)
                    acked = True
                except BrokerUnavailableError:
                    pass  # stored anyway; the broker sends it again and it overwrites itself
        else:
            metrics.dropped_unacked += len(messages)
        if not acked:
            self._left_unacked += len(messages)
        metrics.unacked = max(0, metrics.unacked - len(messages))
        connection.outstanding = max(0, connection.outstanding - len(messages))
        if not connection.outstanding:
            connection.idle.set()
        if not metrics.unacked:
            self._drained.set()
