"""The gateway service: MQTT ingest -> validation -> InfluxDB, never losing a point.

Pipeline order (telegraf's): input (broker, QoS-1 persistent session) -> parse and
validate (:mod:`gateway.protocol.codec`) -> line protocol (:mod:`gateway.lineproto`)
-> batch -> output (InfluxDB, or the on-disk spool while it is away) -> acknowledge.

Delivery rule (ARCHITECTURE "Delivery and safety rules"): a message is acknowledged
to the broker only after its point is in InfluxDB or in the spool. Until then the
broker keeps it in our persistent session, so a crash of the gateway at any moment
loses nothing: the broker redelivers and the replayed points overwrite themselves
(series and timestamp come from the device).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import orjson

from gateway.consumer import consume_forever, shared_filters
from gateway.errors import (
    BrokerUnavailableError,
    RejectedError,
    StoreUnavailableError,
    WriteRejectedError,
)
from gateway.influx import InfluxClient, InfluxSettings
from gateway.lineproto import event_to_line, telemetry_line
from gateway.metrics import GatewayMetrics, MetricsServer
from gateway.protocol.codec import decode_event, validate_reading
from gateway.protocol.mqtt import Message, MqttClient
from gateway.protocol.topics import REJECTED_TOPIC, split_device_topic
from gateway.settings import GatewaySettings, MqttSettings
from gateway.spool import Spool

__all__ = ["Gateway"]

_LOG = logging.getLogger(__name__)

_INGEST_FILTERS: Final = ("devices/+/telemetry", "devices/+/events")
_TOPIC_CACHE_MAX: Final = 200_000
_PREVIEW_BYTES: Final = 200
_LOUD_REJECTS_PER_REASON: Final = 20
_MIN_CHUNK: Final = 1_000
_GATHER_S: Final = 0.01


@dataclass(slots=True)
class _Batch:
    """Lines parsed from a run of messages, and the messages to acknowledge after."""

    lines: list[bytes]
    messages: list[Message]
    newest_ts_ms: int


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
        self._influx_settings = influx
        self._settings = settings
        self._clock = clock
        self._limits = settings.limits()
        self.metrics = GatewayMetrics()
        self._influx: InfluxClient | None = None
        self._spool: Spool | None = None
        self._metrics_server: MetricsServer | None = None
        self._spool_ready = asyncio.Event()
        self._topics: dict[str, tuple[str, str] | None] = {}
        self._client: MqttClient | None = None
        self._subscribed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        settings = self._settings
        self._spool = Spool(
            settings.spool_dir, fsync=settings.spool_fsync, max_bytes=settings.spool_max_bytes
        )
        self._sync_spool_gauges()
        self._influx = InfluxClient(self._influx_settings)
        await self._influx.__aenter__()
        try:
            await self._influx.ensure_database()
            self.metrics.influx_up = True
        except StoreUnavailableError as exc:
            _LOG.warning("InfluxDB is not reachable yet (%s); spooling until it is", exc)
        if settings.metrics_port or settings.metrics_host:
            self._metrics_server = MetricsServer(
                self.metrics, settings.metrics_host, settings.metrics_port
            )
            await self._metrics_server.__aenter__()
        if len(self._spool):
            self._spool_ready.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.__aexit__(exc_type, exc, tb)
        if self._influx is not None:
            await self._influx.__aexit__(exc_type, exc, tb)
        if self._spool is not None:
            self._spool.close()

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
            group.create_task(self._replay_loop(), name="gateway-replay")
            group.create_task(self._connection_loop(), name="gateway-ingest")

    # -- broker side ---------------------------------------------------------------

    def _new_client(self) -> MqttClient:
        return self._mqtt.client(
            self._settings.client_id,
            clean_start=False,
            session_expiry_s=self._settings.session_expiry_s,
            receive_maximum=self._settings.receive_maximum,
            max_buffered=max(self._settings.batch_max_points * 4, 10_000),
        )

    async def _connection_loop(self) -> None:
        def subscribed(client: MqttClient) -> None:
            self._client = client
            self.metrics.mqtt_connected = True
            self._subscribed.set()

        def lost() -> None:
            self._client = None
            self.metrics.mqtt_connected = False
            self.metrics.unacked = 0
            self._drained.set()  # what was not acknowledged the broker redelivers

        await consume_forever(
            self._new_client,
            shared_filters(_INGEST_FILTERS, self._settings.shared_group),
            self._consume,
            on_subscribed=subscribed,
            on_lost=lost,
            retry_max_s=self._settings.retry_max_s,
        )

    async def _consume(self, client: MqttClient) -> None:
        # Overflow policy "block": a full queue stops the reader, the client stops
        # reading its socket, and the broker keeps the messages in our session.
        queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=self._settings.max_pending_batches)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._write_loop(client, queue), name="gateway-writer")
            await self._read_loop(client, queue)

    def _route(self, topic: str) -> tuple[str, str] | None:
        route = self._topics.get(topic, False)
        if route is False:
            if len(self._topics) >= _TOPIC_CACHE_MAX:
                self._topics.clear()
            route = self._topics[topic] = split_device_topic(topic)
        return route  # type: ignore[return-value]

    async def _read_loop(self, client: MqttClient, queue: asyncio.Queue[_Batch]) -> None:
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
            for message in messages:
                target = route(message.topic)
                try:
                    if target is None:
                        raise RejectedError("bad_topic", "not a devices/{id}/{channel} topic")  # noqa: TRY301
                    device_id, channel = target
                    counts[channel] += 1
                    if channel == "telemetry":
                        seq, ts_ms, values, status = validate_reading(
                            device_id, message.payload, now_ms, limits
                        )
                        append(telemetry_line(device_id, seq, ts_ms, values, status))
                        if ts_ms > newest:
                            newest = ts_ms
                    elif channel == "events":
                        append(
                            event_to_line(decode_event(device_id, message.payload, now_ms, limits))
                        )
                    else:
                        raise RejectedError("bad_topic", f"{channel} is not ingested")  # noqa: TRY301
                except RejectedError as exc:
                    await self._reject(client, message, exc.reason, exc.detail, now_ms)
                except WriteRejectedError as exc:
                    await self._reject(client, message, "unstorable", str(exc), now_ms)
            metrics.received.update(counts)
            metrics.unacked += len(messages)
            self._drained.clear()
            await queue.put(_Batch(lines, messages, newest))

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
            "preview": message.payload[:_PREVIEW_BYTES].decode("utf-8", "replace"),
        }
        try:
            await client.publish(REJECTED_TOPIC, orjson.dumps(report), qos=0)
        except BrokerUnavailableError:
            _LOG.debug("could not report a refused message: broker connection lost")

    async def _write_loop(self, client: MqttClient, queue: asyncio.Queue[_Batch]) -> None:
        loop = asyncio.get_running_loop()
        max_points = self._settings.batch_max_points
        linger_s = self._settings.batch_linger_s
        while True:
            first = await queue.get()
            lines, messages, newest = first.lines, first.messages, first.newest_ts_ms
            deadline = loop.time() + linger_s
            while len(lines) < max_points:
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
                lines.extend(more.lines)
                messages.extend(more.messages)
                newest = max(newest, more.newest_ts_ms)
            await self._store(lines, client)
            if newest > self.metrics.last_point_ts_ms:
                self.metrics.last_point_ts_ms = newest
            client.ack_many(messages)
            acked = sum(1 for m in messages if m.qos)
            self.metrics.acked += acked
            self.metrics.unacked = max(0, self.metrics.unacked - len(messages))
            if not self.metrics.unacked:
                self._drained.set()

    # -- store side ----------------------------------------------------------------

    async def _store(self, lines: list[bytes], client: MqttClient | None) -> None:
        """Make ``lines`` durable: InfluxDB, else the spool; retry until one holds."""
        if not lines:
            return
        assert self._spool is not None
        backoff_s = 0.2
        while True:
            if not len(self._spool) and self.metrics.influx_up:
                try:
                    await self._write_influx(lines)
                except StoreUnavailableError as exc:
                    _LOG.warning("InfluxDB write failed (%s); spooling", exc)
                    self.metrics.influx_up = False
                else:
                    return
            try:
                await asyncio.to_thread(self._spool.append, b"\n".join(lines))
            except StoreUnavailableError as exc:
                _LOG.error("cannot spool (%s); holding acknowledgements", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._settings.retry_max_s)
                continue
            self.metrics.spooled += len(lines)
            self._sync_spool_gauges()
            self._spool_ready.set()
            return

    async def _write_influx(self, lines: list[bytes]) -> int:
        assert self._influx is not None
        started = time.perf_counter()
        outcome = await self._influx.write(lines)
        elapsed = time.perf_counter() - started
        metrics = self.metrics
        metrics.write_seconds_sum += elapsed
        metrics.write_count += 1
        metrics.last_write_s = elapsed
        metrics.influx_up = True
        metrics.stored += outcome.written
        for line, error in outcome.rejected:
            metrics.store_rejected += 1
            _LOG.warning("InfluxDB refused a point: %s", error)
            client = self._client
            if client is not None:
                report = {
                    "ts": int(self._clock() * 1000),
                    "reason": "store_refused",
                    "detail": error[:500],
                    "preview": line[:_PREVIEW_BYTES].decode("utf-8", "replace"),
                }
                try:
                    await client.publish(REJECTED_TOPIC, orjson.dumps(report), qos=0)
                except BrokerUnavailableError:
                    _LOG.debug("could not report a refused point: broker connection lost")
        return outcome.written

    def _sync_spool_gauges(self) -> None:
        assert self._spool is not None
        self.metrics.spool_batches = len(self._spool)
        self.metrics.spool_bytes = self._spool.pending_bytes

    async def _replay_loop(self) -> None:
        """Drain the spool into InfluxDB, oldest first, with backoff while it is away."""
        assert self._spool is not None
        spool = self._spool
        backoff_s = 0.2
        while True:
            if not len(spool):
                self._spool_ready.clear()
                await self._spool_ready.wait()
                continue
            batch = await asyncio.to_thread(spool.peek)
            if batch is None:
                continue
            lines = batch.split(b"\n")
            try:
                written = await self._write_influx(lines)
            except StoreUnavailableError as exc:
                self.metrics.influx_up = False
                _LOG.info("InfluxDB still away (%s); retrying in %.1f s", exc, backoff_s)
                await asyncio.sleep(backoff_s * (0.5 + random.random()))
                backoff_s = min(backoff_s * 2, self._settings.retry_max_s)
                continue
            backoff_s = 0.2
            self.metrics.replayed += written
            await asyncio.to_thread(spool.pop)
            self._sync_spool_gauges()
            if not len(spool):
                _LOG.info("spool drained; writing to InfluxDB directly again")
