"""A partition scores each device's readings in order, whichever gateway brought them.

Several gateways share the device topics, so one device's readings can reach its
partition out of order (a slower gateway's older reading after a faster one's newer
reading). The worker holds them ``reorder_hold_s`` and scores them in ``(ts, seq)``
order, none lost; one older than what was already scored is counted and not scored.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import orjson
import pytest
from conftest import DEVICE_IDS, GATEWAY_PASSWORD, MakeInfluxd
from test_gateway_e2e import device_client
from test_gateway_e2e import reading as gateway_reading

from diagnostics.engine import DiagnosticsEngine
from diagnostics.leases import SoleOwnerStore
from diagnostics.partition import PartitionedDiagnostics, PartitionState
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from fixloop.observe import diagnostics_metrics
from fixloop.stack import MosquittoServer
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.influx import InfluxSettings
from wire.partitions import partition_of, partition_topic
from wire.protocol import Event, Reading
from wire.settings import MqttSettings

DEVICES = ("order-dev-a", "order-dev-b")
READINGS = 40
PARTITIONS = 2
BASE_MS = int(time.time() * 1000) - 86_400_000


def reading(device_id: str, seq: int, *, ts_ms: int | None = None) -> Reading:
    stamp = BASE_MS + seq * 60_000 if ts_ms is None else ts_ms
    return Reading(device_id, seq, stamp, {"t": 20.0 + seq % 3})


def payload(item: Reading) -> bytes:
    body = {"v": 1, "id": item.device_id, "seq": item.seq, "ts": item.ts_ms, "metrics": {}}
    body["metrics"] = dict(item.metrics)
    return orjson.dumps(body)


def swapped(device_id: str) -> list[Reading]:
    """A device's readings as two gateways deliver them: each pair in reverse."""
    items: list[Reading] = []
    for seq in range(0, READINGS, 2):
        items += [reading(device_id, seq + 1), reading(device_id, seq)]
    return items


def state() -> PartitionState:
    # the engine is not used by admit and release
    return PartitionState(cast(DiagnosticsEngine, None))


def test_held_readings_come_out_in_order_once_their_hold_ends() -> None:
    part = state()
    assert part.admit(swapped("a")[:4], now_s=100.0) == 0  # seq 1, 0, 3, 2
    assert part.release(100.5, hold_s=1.0, max_held=100) == []
    assert part.next_release_s(1.0) == 101.0
    assert part.admit([reading("a", 5), reading("a", 4)], now_s=100.8) == 0
    out = part.release(101.0, hold_s=1.0, max_held=100)
    assert [r.seq for r in out] == [0, 1, 2, 3]
    # the checkpoint keeps what is still held
    part = pickle.loads(pickle.dumps(part))
    assert [r.seq for r in part.release(101.8, hold_s=1.0, max_held=100)] == [4, 5]
    # older than the last scored, or a repeat: counted, never scored
    assert part.admit([reading("a", 3), reading("a", 6), reading("a", 6)], now_s=102.0) == 2
    assert [r.seq for r in part.release(103.0, hold_s=1.0, max_held=100)] == [6]
    assert part.held == {}


def test_a_full_buffer_releases_its_oldest_arrivals_early() -> None:
    part = state()
    part.admit([reading("a", seq) for seq in (3, 1, 2, 0)], now_s=10.0)
    part.admit([reading("b", 0)], now_s=10.1)
    # five held, three allowed: the first two arrivals (seq 3 and 1 of "a") end their
    # hold early, and with seq 3 every older held reading of "a" goes too
    out = part.release(10.2, hold_s=5.0, max_held=3)
    assert [(r.device_id, r.seq) for r in out] == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]
    assert [(r.device_id, r.seq) for r in part.release(15.1, 5.0, 3)] == [("b", 0)]


def test_events_and_readings_keep_their_own_order() -> None:
    part = state()
    event = Event("a", 7, BASE_MS + 30_000, "error", code="E1")
    assert part.admit([reading("a", 1), event, reading("a", 0)], now_s=0.0) == 0
    out = part.release(1.0, hold_s=1.0, max_held=10)
    assert out == [reading("a", 0), event, reading("a", 1)]
    assert part.last_reading == {"a": (BASE_MS + 60_000, 1)}
    assert part.last_event == {"a": (BASE_MS + 30_000, 7)}


class Clock:
    """The worker's wall clock, moved by the test: a hold ends when the test says."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


async def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.integration
async def test_readings_overtaken_between_gateways_are_scored_in_order_none_lost(
    mosquitto: MosquittoServer, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    """A real worker on real mosquitto; its partitions' messages arrive out of order."""
    influx = make_influxd()
    mqtt = MqttSettings(
        host=mosquitto.host, port=mosquitto.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    settings = DiagnosticsSettings(
        client_id="order",
        model_path=tmp_path / "none.pkl",
        partitions=PARTITIONS,
        checkpoint_every_s=0.5,
        reorder_hold_s=2.0,
        write_scores=False,
        lifetime_backfill=False,
    )
    handled: list[tuple[str, int, int]] = []

    def note(partition: int, items: Sequence[Reading | Event]) -> None:
        for item in items:
            assert partition_of(item.device_id, PARTITIONS) == partition
            if isinstance(item, Reading):
                handled.append((item.device_id, item.ts_ms, item.seq))

    clock = Clock()
    worker = PartitionedDiagnostics(
        mqtt,
        InfluxSettings(url=influx.url),
        settings,
        SoleOwnerStore(),
        clock=clock,
        on_handled=note,
    )
    total = READINGS * len(DEVICES)
    async with worker, mqtt.client("two-gateways") as gateways:
        work = asyncio.create_task(worker.run())
        try:
            await wait_until(
                lambda: worker.partitions_held == set(range(PARTITIONS)) and worker.connected,
                "the partitions",
            )
            sends = [
                (partition_topic(partition_of(d, PARTITIONS), d, "telemetry"), payload(r))
                for d in DEVICES
                for r in swapped(d)
            ]
            assert not any(await gateways.publish_many(sends))
            await wait_until(lambda: worker.held_items == total, "every reading held")
            assert handled == []
            clock.now_s += settings.reorder_hold_s
            await wait_until(lambda: len(handled) == total, "every reading scored")
            for device_id in DEVICES:
                mine = [(ts, seq) for d, ts, seq in handled if d == device_id]
                assert mine == [(BASE_MS + s * 60_000, s) for s in range(READINGS)]

            # older than what was scored: a repeat, and a reading overtaken by more than
            # the hold; counted, not scored (both are in InfluxDB: the gateway stored them)
            device_id = DEVICES[0]
            topic = partition_topic(partition_of(device_id, PARTITIONS), device_id, "telemetry")
            late = [reading(device_id, 5), reading(device_id, READINGS + 7, ts_ms=BASE_MS + 1)]
            after = reading(device_id, READINGS)
            assert not any(
                await gateways.publish_many([(topic, payload(r)) for r in [*late, after]])
            )
            await wait_until(
                lambda: worker.late_items == len(late) and worker.held_items == 1, "the late ones"
            )
            clock.now_s += settings.reorder_hold_s
            await wait_until(lambda: len(handled) > total, "the next reading")
            assert handled[-1] == (device_id, after.ts_ms, after.seq)
        finally:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    assert len(handled) == len(set(handled)) == total + 1
    metrics = {m.name: m.samples for m in diagnostics_metrics(worker)}
    assert metrics["fixloop_diagnostics_late_items_total"] == (({}, len(late)),)
    assert metrics["fixloop_diagnostics_held_items"] == (({}, 0),)


def test_a_checkpoint_from_before_the_buffer_loads_with_nothing_held() -> None:
    part = state()
    # how Python pickled the state of the slotted class without a __getstate__
    part.__setstate__((None, {"engine": None, "last_reading": {"a": (5, 1)}, "last_event": {}}))
    assert part.last_reading == {"a": (5, 1)}
    assert part.held == {}
    assert not part.arrivals
    assert part.held_count == 0
    assert part.admit([reading("a", 2)], now_s=0.0) == 0
    assert [r.seq for r in part.release(1.0, hold_s=1.0, max_held=10)] == [2]


@pytest.mark.integration
async def test_two_gateways_hand_a_partition_readings_out_of_order_all_scored_in_order(
    mosquitto: MosquittoServer, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    """Two real gateways share the device topics (round-robin); one lingers a second
    before it stores and republishes, so each device's readings reach their partition
    out of order. The worker scores every one, in order, none counted late."""
    influx = make_influxd()
    mqtt = MqttSettings(
        host=mosquitto.host, port=mosquitto.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    settings = DiagnosticsSettings(
        client_id="order-gw",
        model_path=tmp_path / "none.pkl",
        partitions=PARTITIONS,
        checkpoint_every_s=0.5,
        reorder_hold_s=8.0,  # well past the slow gateway's linger: no timing at stake
        write_scores=False,
        lifetime_backfill=False,
    )
    handled: list[tuple[str, int]] = []

    def note(partition: int, items: Sequence[Reading | Event]) -> None:
        handled.extend((i.device_id, i.seq) for i in items if isinstance(i, Reading))

    def gateway(instance: str, linger_s: float) -> Gateway:
        return Gateway(
            mqtt,
            influx_settings,
            GatewaySettings(
                spool_dir=tmp_path / "spool",
                metrics_port=0,
                shared_group="ingest",
                instance=instance,
                batch_linger_s=linger_s,
                republish_partitions=PARTITIONS,
            ),
        )

    devices = DEVICE_IDS[:3]
    count = 30
    arrived: list[tuple[str, int]] = []
    worker = PartitionedDiagnostics(
        mqtt, influx_settings, settings, SoleOwnerStore(), on_handled=note
    )
    async with (
        gateway("fast", 0.0) as fast,
        gateway("slow", 1.0) as slow,
        worker,
        mqtt.client("partition-watch") as watch,
    ):
        await watch.subscribe("fleet/partitions/#", qos=1)
        tasks = [asyncio.create_task(g.run()) for g in (fast, slow)]
        tasks.append(asyncio.create_task(worker.run()))
        try:
            for g in (fast, slow):
                await g.wait_subscribed()
            await wait_until(
                lambda: worker.partitions_held == set(range(PARTITIONS)) and worker.connected,
                "the partitions",
            )
            base_ms = int(time.time() * 1000) - 3_600_000
            for device_id in devices:
                async with device_client(mosquitto, device_id) as device:
                    for seq in range(count):
                        body = gateway_reading(device_id, seq, base_ms + seq * 1000)
                        await device.publish(f"devices/{device_id}/telemetry", body, qos=1)
            total = len(devices) * count

            async def watched() -> None:
                while len(arrived) < total:
                    await watch.wait_messages()
                    batch = watch.take(1_000)
                    watch.ack_many(batch)
                    arrived.extend(
                        (m.topic.split("/")[3], orjson.loads(m.payload)["seq"]) for m in batch
                    )

            async with asyncio.timeout(60):
                await watched()
            await wait_until(lambda: len(handled) >= total, "every reading scored")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # the partitions did get them out of order: the slow gateway's came late
    assert any(
        [s for d, s in arrived if d == device_id] != list(range(count)) for device_id in devices
    )
    for device_id in devices:
        assert [s for d, s in handled if d == device_id] == list(range(count))
    assert worker.late_items == 0
