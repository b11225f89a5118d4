"""Partitioned diagnostics: each device's readings handled by one worker at a time, in order.

Pipeline place: the diagnostics stage when ``partitions`` is set (ARCHITECTURE
"Diagnostics partitioned by device"). The gateway republishes every stored device
message on its partition's topic (:mod:`gateway.republish`, :mod:`wire.partitions`);
a worker holds some partitions under leases (:mod:`diagnostics.leases`) and, for each,

1. loads the partition's last checkpoint (the pickled state of the partition's own
   :class:`~diagnostics.engine.DiagnosticsEngine` and the last item handled per device)
   and the keys of the diagnosis changes published after it;
2. connects with the partition's own MQTT client id (``{client_id}-p{n}``, a persistent
   session, clean start off) and subscribes to ``fleet/partitions/{n}/#``: the broker
   delivers what the session kept since the last acknowledgement, in order, then the new
   messages; a second connection with that id takes the session over, so the broker
   itself keeps a partition on one connection at a time;
3. scores each batch off the event loop, publishes the diagnosis changes on
   ``fleet/diagnoses`` (skipping an open or closed change its predecessor already
   published: same stable :attr:`~diagnostics.model.Diagnosis.id`, same status), writes
   the scores to InfluxDB, and notes the published keys in the store;
4. every ``checkpoint_every_s`` (or ``checkpoint_max_messages``) saves a checkpoint
   under its lease and only then acknowledges the messages it covers; a partition taken
   over therefore resumes from the checkpoint and replays exactly the messages after it.

Each partition has its own engine, so what a device's diagnosis depends on (its own
history, and the peers it is compared with: the devices of its partition) is the same
whichever worker holds it. A worker that cannot renew a lease stops that partition
before the lease ends.

Order across gateways: one gateway hands a partition its messages in the
order it received them, but several gateways sharing the device topics do not: a
device's reading stored by a slower gateway reaches the partition after a newer one
stored by a faster gateway. So a partition holds each item ``reorder_hold_s`` (2 s)
after it arrived, in a per-device buffer that is part of the checkpointed
:class:`PartitionState`, and scores a device's items in ``(ts_ms, seq)`` order: when an
item's hold ends, it and every held item of its device and kind not newer than it go
to the engine, sorted (at most ``reorder_max_items`` are held per partition; beyond it
the oldest arrivals end their hold early). A reading overtaken by less than the hold is
therefore scored in its place. Held items are covered by the checkpoint that
acknowledges their messages, so a partition that moves keeps them; nothing is lost.

An item not newer than the last one of its device and kind already scored or held
(``(ts_ms, seq)``, readings and events apart) is not scored: a repeat (a gateway that
crashed after its republish and before its acknowledgement republishes again), or a
reading overtaken by more than the hold (a gateway that stalled, or a dead gateway's
share delivered on its return). It is counted (:attr:`PartitionedDiagnostics.late_items`),
and it is in InfluxDB all the same: the gateway stored it before republishing it.
Scoring it would change nothing anyway (the engine takes a reading older than the
device's last one as history: scored, no state changed, never a diagnosis), and not
scoring it keeps a repeat from being scored twice; so the diagnoses are those of the
device's readings in order, none false and none twice.

This module stays whole (about 620 lines): :class:`PartitionState` is what a checkpoint
pickles (stored checkpoints name it by this module), and the worker's lease, session,
reorder and acknowledgement steps are one protocol whose order is what keeps a moved
partition from losing or repeating an item.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import pickle
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, cast

from diagnostics.engine import DiagnosticsEngine, EngineResult
from diagnostics.leases import PartitionStore
from diagnostics.model import Diagnosis, encode_diagnosis
from diagnostics.service import health_lines, load_engine, registry_or_empty
from diagnostics.settings import DiagnosticsSettings
from wire.errors import (
    BrokerUnavailableError,
    ConfigError,
    PermanentError,
    RejectedError,
    StoreUnavailableError,
)
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import Message, MqttClient
from wire.partitions import partition_filter, split_partition_topic
from wire.protocol import DIAGNOSES_TOPIC, Event, Reading, decode_event, decode_reading
from wire.settings import MqttSettings
from wire.supervisor import StageHealth

__all__ = ["CHECKPOINT_VERSION", "Handled", "PartitionState", "PartitionedDiagnostics"]

_LOG = logging.getLogger(__name__)
#: Version of the pickled checkpoint; another version is not loaded.
CHECKPOINT_VERSION: Final = 1
#: Share of the lease time after which a partition whose lease was not renewed stops.
_LEASE_MARGIN: Final = 0.8
#: Longest time between two lease rounds (renewal, hand-over to a joining worker).
_ROUND_MAX_S: Final = 5.0
#: Longest wait for messages before the stop and lease checks run again.
_POLL_S: Final = 0.5
_FINAL_STATUSES: Final = frozenset(("open", "closed"))

#: Called with the partition and the items handled (in order), for tests and benches.
Handled = Callable[[int, Sequence[Reading | Event]], None]


class _LeaseLostError(Exception):
    """The worker no longer holds the partition: stop without saving."""


_Key = tuple[int, int]  # (ts_ms, seq)
_Slot = tuple[str, bool]  # (device id, is a reading)


@dataclass(slots=True)
class PartitionState:
    """What a checkpoint holds for one partition.

    Attributes:
        engine: the partition's engine.
        last_reading: per device, ``(ts_ms, seq)`` of the last reading scored.
        last_event: per device, ``(ts_ms, seq)`` of the last event handled.
        held: items waiting for their hold to end, per device and kind, sorted by key.
        held_count: how many items are held.
        arrivals: ``(arrived at, device, is a reading, key)`` in arrival order (wall
            clock seconds; an entry may outlive its item, released with a newer one).
    """

    engine: DiagnosticsEngine
    last_reading: dict[str, _Key] = field(default_factory=dict)
    last_event: dict[str, _Key] = field(default_factory=dict)
    held: dict[_Slot, list[tuple[_Key, Reading | Event]]] = field(default_factory=dict)
    arrivals: deque[tuple[float, str, bool, _Key]] = field(default_factory=deque)
    held_count: int = 0

    def admit(self, items: Sequence[Reading | Event], now_s: float) -> int:
        """Hold the items newer than the last one scored or held of their device and kind.

        Returns:
            How many items were not held: not newer than that (late, or repeats).
        """
        late = 0
        held = self.held
        arrivals = self.arrivals
        for item in items:
            reading = isinstance(item, Reading)
            last = self.last_reading if reading else self.last_event
            key = (item.ts_ms, item.seq)
            before = last.get(item.device_id)
            if before is not None and key <= before:
                late += 1
                continue
            slot = (item.device_id, reading)
            waiting = held.get(slot)
            if waiting is None:
                held[slot] = [(key, item)]
            elif waiting[-1][0] < key:
                waiting.append((key, item))  # the usual case: in order
            else:
                at = bisect.bisect_left(waiting, (key,))
                if waiting[at][0] == key:
                    late += 1  # a repeat of a held one
                    continue
                waiting.insert(at, (key, item))
            self.held_count += 1
            arrivals.append((now_s, item.device_id, reading, key))
        return late

    def release(self, now_s: float, hold_s: float, max_held: int) -> list[Reading | Event]:
        """The held items whose hold ended, and older ones of their device and kind.

        Sorted by ``(ts_ms, seq)``; each device's items are then newer than any of its
        scored before.
        """
        arrivals = self.arrivals
        until = now_s - hold_s
        cut: dict[_Slot, _Key] = {}
        while arrivals and (arrivals[0][0] <= until or len(arrivals) > max_held):
            _, device_id, reading, key = arrivals.popleft()
            slot = (device_id, reading)
            if slot not in cut or key > cut[slot]:
                cut[slot] = key
        released: list[Reading | Event] = []
        held = self.held
        for slot, newest in cut.items():
            waiting = held.get(slot)
            if not waiting or waiting[0][0] > newest:
                continue  # released already, with a newer one
            count = bisect.bisect_left(waiting, ((newest[0], newest[1] + 1),))
            released += [item for _, item in waiting[:count]]
            last = self.last_reading if slot[1] else self.last_event
            last[slot[0]] = waiting[count - 1][0]
            if count == len(waiting):
                del held[slot]
            else:
                del waiting[:count]
            self.held_count -= count
        if len(cut) > 1:
            released.sort(key=_item_key)
        return released

    def next_release_s(self, hold_s: float) -> float | None:
        """When the next hold ends (wall clock), or None when nothing is held."""
        return self.arrivals[0][0] + hold_s if self.arrivals else None

    def __getstate__(self) -> dict[str, Any]:
        # Held readings as plain tuples: a checkpoint holds up to reorder_max_items of
        # them, and pickling tuples takes a seventh of the time of the dataclasses.
        return {
            "engine": self.engine,
            "last_reading": self.last_reading,
            "last_event": self.last_event,
            "held": {
                slot: [(key, _pack(item)) for key, item in waiting]
                for slot, waiting in self.held.items()
            },
            "arrivals": self.arrivals,
            "held_count": self.held_count,
        }

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # saved before the reorder buffer: (None, slots)
            state = state[1]
        self.engine = state["engine"]
        self.last_reading = state["last_reading"]
        self.last_event = state["last_event"]
        self.held = {
            slot: [(key, _unpack(item)) for key, item in waiting]
            for slot, waiting in state.get("held", {}).items()
        }
        self.arrivals = state.get("arrivals", deque())
        self.held_count = state.get("held_count", 0)


def _pack(item: Reading | Event) -> tuple[Any, ...]:
    if isinstance(item, Reading):
        return (item.device_id, item.seq, item.ts_ms, item.metrics, item.status)
    return (item,)  # events are few: as they are


def _unpack(packed: tuple[Any, ...]) -> Reading | Event:
    if len(packed) == 1:
        return cast(Event, packed[0])
    return Reading(*packed)


def _item_key(item: Reading | Event) -> _Key:
    return (item.ts_ms, item.seq)


@dataclass(slots=True, eq=False)
class _Held:
    """A partition this worker serves."""

    partition: int
    epoch: int
    valid_until: float
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    connected: bool = False


def _key(diagnosis: Diagnosis) -> str:
    return f"{diagnosis.id}:{diagnosis.status}"


class PartitionedDiagnostics:
    """A diagnostics worker of partitioned diagnostics; :meth:`run` until cancelled.

    Args:
        mqtt: how to reach the broker (a service user).
        influx: where telemetry lives and scores go.
        settings: the service's settings (``partitions`` > 0).
        store: the shared leases and checkpoints.
        engine: the engine every partition starts from (default: loaded as the
            unpartitioned service does).
        worker_id: this worker's name in the leases (default: host name and process id).
        clock: wall clock in seconds.
        on_handled: called with each batch's handled items.

    Attributes:
        partitions_held: the partitions being served now.
        takeovers: partitions started (claimed, or restarted after an error).
        repeats_skipped: diagnosis changes not published again after a move.
        held_items: items held for reordering now (all partitions).
        late_items: items not scored because one of their device and kind as new or
            newer was already scored or held: repeats, or overtaken by more than
            ``reorder_hold_s`` (stored in InfluxDB all the same).
        checkpoints: checkpoints saved.
        checkpoint_bytes: size of the last checkpoint saved.
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        influx: InfluxSettings,
        settings: DiagnosticsSettings,
        store: PartitionStore,
        *,
        engine: DiagnosticsEngine | None = None,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
        on_handled: Handled | None = None,
    ) -> None:
        if settings.partitions < 1:
            raise ConfigError("partitioned diagnostics needs partitions >= 1")
        self._mqtt = mqtt
        self._influx_settings = influx
        self._settings = settings
        self._store = store
        self.engine = engine
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._clock = clock
        self._on_handled = on_handled
        self._influx: InfluxClient | None = None
        self._template = b""
        self._held: dict[int, _Held] = {}
        self.partitions_held: set[int] = set()
        self.readings_scored = 0
        self.diagnoses_published = 0
        self.scores_dropped = 0
        self.items_failed = 0
        self.takeovers = 0
        self.repeats_skipped = 0
        self.late_items = 0
        self._held_items: dict[int, int] = {}
        self.checkpoints = 0
        self.checkpoint_bytes = 0
        self.stages = StageHealth()

    @property
    def connected(self) -> bool:
        """Whether every partition held has its broker session up (none held: True)."""
        return all(h.connected for h in self._held.values() if not h.stop.is_set())

    @property
    def held_items(self) -> int:
        """Items held for reordering now, in every partition served."""
        return sum(self._held_items.values())

    @property
    def unknown_readings(self) -> int:
        """Not counted per partition: always 0 (the engines count their own)."""
        return 0

    async def __aenter__(self) -> Self:
        self._influx = InfluxClient(self._influx_settings)
        await self._influx.__aenter__()
        try:
            if self.engine is None:
                registry = await registry_or_empty(self._influx)
                self.engine = await asyncio.to_thread(load_engine, self._settings, registry)
            self._template = await asyncio.to_thread(pickle.dumps, self.engine, 5)
        except BaseException:
            await self._influx.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._influx is not None:
            await self._influx.__aexit__(exc_type, exc, tb)

    # -- leases ------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold partitions and serve them until cancelled (then each is checkpointed)."""
        settings = self._settings
        ttl_s = settings.lease_ttl_s
        async with asyncio.TaskGroup() as group:
            try:
                while True:
                    await self._lease_round(group, ttl_s)
                    await asyncio.sleep(min(ttl_s / 3, _ROUND_MAX_S))
            finally:
                # shutting down: each partition checkpoints, acknowledges and frees its
                # lease, so its successor starts at once instead of after the lease time
                for held in self._held.values():
                    held.stop.set()
                tasks = [h.task for h in self._held.values() if h.task is not None]
                if tasks:
                    await asyncio.wait(tasks, timeout=ttl_s)

    async def _lease_round(self, group: asyncio.TaskGroup, ttl_s: float) -> None:
        started = time.monotonic()
        try:
            holding = await self._store.hold(self.worker_id, self._settings.partitions, ttl_s)
        except StoreUnavailableError as exc:
            _LOG.warning("leases not renewed (%s); partitions stop when they run out", exc)
            return
        valid_until = started + ttl_s * _LEASE_MARGIN
        leases = holding.leases
        for number, held in list(self._held.items()):
            assert held.task is not None
            if held.task.done():
                del self._held[number]
            elif leases.get(number) != held.epoch:
                _LOG.warning("partition %d: lease lost; stopping without a checkpoint", number)
                held.task.cancel()
                del self._held[number]
            else:
                held.valid_until = valid_until
        share = holding.fair_share
        serving = sorted(n for n, h in self._held.items() if not h.stop.is_set())
        for number in serving[share:]:
            _LOG.info(
                "partition %d handed over: %d workers share %d partitions",
                number,
                holding.workers,
                self._settings.partitions,
            )
            self._held[number].stop.set()
        serving = serving[:share]
        for number, epoch in sorted(leases.items()):
            if number in self._held:
                continue
            if len(serving) < share:
                held = _Held(number, epoch, valid_until)
                held.task = group.create_task(self._serve(held), name=f"diagnostics-p{number}")
                self._held[number] = held
                serving.append(number)
            else:
                # held beyond the share and not served (its task ended): free it
                try:
                    await self._store.release(self.worker_id, number, epoch)
                except StoreUnavailableError as exc:
                    _LOG.warning("partition %d not released (%s); it runs out", number, exc)
        self.partitions_held = set(serving)

    # -- one partition -----------------------------------------------------------------

    async def _serve(self, held: _Held) -> None:
        number = held.partition
        try:
            await self._serve_partition(held)
        except _LeaseLostError:
            _LOG.warning("partition %d: lease lost; stopped without a checkpoint", number)
        except (BrokerUnavailableError, StoreUnavailableError) as exc:
            _LOG.warning("partition %d stopped (%s); taken up again next round", number, exc)
        except PermanentError:
            _LOG.exception("partition %d stopped; taken up again next round", number)
        finally:
            held.connected = False
            self._held_items.pop(number, None)

    def _restore(self, number: int, checkpoint: bytes | None) -> PartitionState:
        if checkpoint is not None:
            try:
                version, state = pickle.loads(checkpoint)
            except Exception:
                _LOG.exception("partition %d: checkpoint unreadable; starting afresh", number)
            else:
                if version == CHECKPOINT_VERSION and isinstance(state, PartitionState):
                    return state
                _LOG.error("partition %d: checkpoint of version %r ignored", number, version)
        return PartitionState(pickle.loads(self._template))

    def _alive(self, held: _Held) -> None:
        if time.monotonic() > held.valid_until:
            raise _LeaseLostError

    async def _serve_partition(self, held: _Held) -> None:
        settings = self._settings
        number, epoch = held.partition, held.epoch
        saved = await self._store.load(number)
        state = await asyncio.to_thread(self._restore, number, saved.checkpoint)
        repeats = set(saved.published)
        self.takeovers += 1
        client = self._mqtt.client(
            f"{settings.client_id}-p{number}",
            clean_start=False,
            session_expiry_s=settings.session_expiry_s,
            max_buffered=65_535,
        )
        async with client:
            await client.subscribe(partition_filter(number), qos=1)
            held.connected = True
            _LOG.info(
                "partition %d served by %s (epoch %d, session resumed: %s, %d devices)",
                number,
                self.worker_id,
                epoch,
                client.session_present,
                len(state.last_reading),
            )
            unacked: list[Message] = []
            saved_at = time.monotonic()
            hold_s = settings.reorder_hold_s
            while not held.stop.is_set():
                self._alive(held)
                due = saved_at + settings.checkpoint_every_s - time.monotonic()
                release_s = state.next_release_s(hold_s)
                if release_s is not None:
                    due = min(due, release_s - self._clock())
                await client.wait_messages(min(_POLL_S, max(0.01, due)))
                messages = client.take(settings.batch_max)
                self._alive(held)
                await self._handle(client, held, state, messages, repeats)
                unacked += messages
                if unacked and (
                    time.monotonic() - saved_at >= settings.checkpoint_every_s
                    or len(unacked) >= settings.checkpoint_max_messages
                ):
                    await self._checkpoint(held, state, client, unacked)
                    unacked = []
                    saved_at = time.monotonic()
            # handed over: checkpoint what was handled, acknowledge it, free the lease
            self._alive(held)
            await self._checkpoint(held, state, client, unacked)
            held.connected = False
        await self._store.release(self.worker_id, number, epoch)
        _LOG.info("partition %d released by %s", number, self.worker_id)

    async def _checkpoint(
        self, held: _Held, state: PartitionState, client: MqttClient, unacked: list[Message]
    ) -> None:
        blob = await asyncio.to_thread(pickle.dumps, (CHECKPOINT_VERSION, state), 5)
        if not await self._store.save(self.worker_id, held.partition, held.epoch, blob):
            raise _LeaseLostError
        self.checkpoints += 1
        self.checkpoint_bytes = len(blob)
        client.ack_many(unacked)

    def _decode(self, messages: Sequence[Message]) -> list[Reading | Event]:
        now_ms = int(self._clock() * 1000)
        items: list[Reading | Event] = []
        for message in messages:
            target = split_partition_topic(message.topic)
            if target is None:
                continue
            _, device_id, channel = target
            try:
                if channel == "telemetry":
                    items.append(decode_reading(device_id, message.payload, now_ms))
                elif channel == "events":
                    items.append(decode_event(device_id, message.payload, now_ms))
            except RejectedError:
                continue  # the gateway reports what it refuses
        return items

    async def _handle(
        self,
        client: MqttClient,
        held: _Held,
        state: PartitionState,
        messages: Sequence[Message],
        repeats: set[str],
    ) -> None:
        now_s = self._clock()
        if messages:
            late = state.admit(self._decode(messages), now_s)
            if late:
                self.late_items += late
                _LOG.debug("partition %d: %d items late or repeated", held.partition, late)
        settings = self._settings
        items = state.release(now_s, settings.reorder_hold_s, settings.reorder_max_items)
        self._held_items[held.partition] = state.held_count
        if not items:
            return
        engine = state.engine
        try:
            results = [await asyncio.to_thread(engine.process, items)]
        except Exception:
            _LOG.exception("a round of %d items failed; scoring them one by one", len(items))
            results = []
            for item in items:
                try:
                    results.append(await asyncio.to_thread(engine.process, [item]))
                except Exception:
                    self.items_failed += 1
                    _LOG.exception("%s of device %s skipped", type(item).__name__, item.device_id)
        if self._on_handled is not None:
            self._on_handled(held.partition, items)
        for result in results:
            await self._publish(client, held, result, repeats)

    async def _publish(
        self, client: MqttClient, held: _Held, result: EngineResult, repeats: set[str]
    ) -> None:
        published: list[str] = []
        for diagnosis in result.diagnoses:
            key = _key(diagnosis)
            if key in repeats:
                repeats.discard(key)
                self.repeats_skipped += 1
                continue
            self._alive(held)
            await client.publish(DIAGNOSES_TOPIC, encode_diagnosis(diagnosis), qos=1)
            self.diagnoses_published += 1
            if diagnosis.status in _FINAL_STATUSES:
                published.append(key)
                _LOG.info(
                    "diagnosis %s: %s on %s (%s)",
                    diagnosis.status,
                    diagnosis.fault,
                    diagnosis.device_id,
                    diagnosis.id,
                )
        if published and not await self._store.note_published(
            self.worker_id, held.partition, held.epoch, published
        ):
            raise _LeaseLostError
        self.readings_scored += len(result.scores)
        if self._settings.write_scores and result.scores:
            await self._write_scores(health_lines(result))

    async def _write_scores(self, lines: list[bytes]) -> None:
        assert self._influx is not None
        if not lines:
            return
        try:
            await self._influx.write(lines)
        except StoreUnavailableError as exc:
            # derived data: the partition goes on (the unpartitioned service retries)
            self.scores_dropped += len(lines)
            _LOG.warning("scores not stored (%s): %d dropped", exc, len(lines))
