"""The gateway on real mosquitto and influxd: hostile input, outages, crashes, nothing lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path

import aiohttp
import orjson
import pytest
from conftest import (
    DEVICE_IDS,
    FLEET_SECRET,
    GATEWAY_PASSWORD,
    MakeInfluxd,
    MakeMosquitto,
    device_pw,
)
from test_mqtt_client import TunedMosquitto

from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.metrics import GatewayMetrics
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.spool import Spool
from wire.errors import PermanentError
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import MqttClient
from wire.settings import MqttSettings
from wire.tasks import cancel_and_wait

pytestmark = pytest.mark.integration

OPS_USER, OPS_PASSWORD = "ops-watcher", "ops-watcher-password"


def gateway_mqtt(broker: MosquittoServer) -> MqttSettings:
    return MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )


def reading(device_id: str, seq: int, ts_ms: int, **metrics: float | bool) -> bytes:
    body = {"v": 1, "id": device_id, "seq": seq, "ts": ts_ms, "metrics": metrics or {"t": 1.5}}
    return orjson.dumps(body)


def device_client(broker: MosquittoServer, device_id: str) -> MqttClient:
    return MqttClient(
        broker.host,
        broker.port,
        client_id=device_id,
        username=device_id,
        password=device_pw(device_id),
    )


async def wait_for(
    predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)


async def count_points(url: str, measurement: str = "telemetry") -> int:
    async with InfluxClient(InfluxSettings(url=url)) as client:
        return await client.count(measurement)


@asynccontextmanager
async def running_gateway(
    broker: MosquittoServer, influx_url: str, spool_dir: Path, **overrides: object
) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(
        spool_dir=spool_dir,
        metrics_port=0,
        batch_linger_s=0.02,
        **overrides,  # type: ignore[arg-type]
    )
    async with Gateway(gateway_mqtt(broker), InfluxSettings(url=influx_url), settings) as gw:
        task = asyncio.create_task(gw.run())
        try:
            async with asyncio.timeout(10):
                await gw.wait_subscribed()
            yield gw
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


async def test_hostile_payloads_are_refused_with_reasons_and_good_ones_stored(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    broker = make_mosquitto(users={GATEWAY_USER: GATEWAY_PASSWORD, OPS_USER: OPS_PASSWORD})
    influx = make_influxd()
    now_ms = int(time.time() * 1000)
    dev = DEVICE_IDS[0]
    hostile: dict[str, bytes] = {
        "bad_json": b'{"v": 1, "id": "dev-001", "seq": 1,',
        "nan": b'{"v":1,"id":"dev-001","seq":1,"ts":%d,"metrics":{"t":NaN}}' % now_ms,
        "huge": reading(dev, 2, now_ms, t=1e300),
        "newline_name": reading(dev, 3, now_ms, **{"t\nevil,device=x f=1": 1.0}),
        "quote_name": reading(dev, 4, now_ms, **{'t"x': 1.0}),
        "wrong_id": reading("dev-002", 5, now_ms),
        "newline_id": reading("dev-001\ntelemetry,device=dev-002 t=9", 6, now_ms),
        "version": orjson.dumps({"v": 9, "id": dev, "seq": 7, "ts": now_ms, "metrics": {"t": 1}}),
        "too_large": b"{" + b" " * 20_000 + b"}",
        "old": reading(dev, 8, now_ms - 90 * 86_400_000),
    }
    expected_reasons = {
        "bad_json": "bad_json",
        "nan": "bad_json",
        "huge": "bad_value",
        "newline_name": "bad_metric_name",
        "quote_name": "bad_metric_name",
        "wrong_id": "id_mismatch",
        "newline_id": "bad_id",
        "version": "unsupported_version",
        "too_large": "too_large",
        "old": "too_old",
    }
    reports: list[dict[str, object]] = []

    async with (
        running_gateway(broker, influx.url, tmp_path / "spool") as gw,
        MqttClient(
            broker.host, broker.port, client_id="ops", username=OPS_USER, password=OPS_PASSWORD
        ) as ops,
        device_client(broker, dev) as device,
    ):
        await ops.subscribe("fleet/rejected", qos=0)
        good = 0
        for index, payload in enumerate(hostile.values()):
            await device.publish(f"devices/{dev}/telemetry", payload, qos=1)
            await device.publish(
                f"devices/{dev}/telemetry", reading(dev, 100 + index, now_ms - index), qos=1
            )
            good += 1
        # A device may not publish under another device's id: the broker's ACL refuses it.
        with pytest.raises(PermanentError):
            await device.publish(
                f"devices/{DEVICE_IDS[1]}/telemetry", reading(DEVICE_IDS[1], 1, now_ms), qos=1
            )

        await wait_for(lambda: sum(gw.metrics.rejected.values()) >= len(hostile), 10, "refusals")
        await wait_for(lambda: gw.metrics.stored >= good, 10, "good points")
        while len(reports) < len(hostile) and await ops.wait_messages(5):
            reports.extend(orjson.loads(m.payload) for m in ops.take(100))

        # The gateway keeps going after all that.
        await device.publish(f"devices/{dev}/telemetry", reading(dev, 999, now_ms + 1), qos=1)
        await wait_for(lambda: gw.metrics.stored >= good + 1, 10, "a point after the refusals")

        url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
        assert 'fixloop_gateway_rejected_total{reason="bad_metric_name"} 2' in text
        assert f"fixloop_gateway_stored_points_total {good + 1}" in text

    assert sorted(str(r["reason"]) for r in reports) == sorted(expected_reasons.values())
    assert all(r["device_id"] == dev and r["detail"] for r in reports)
    assert dict(gw.metrics.rejected) == {
        reason: list(expected_reasons.values()).count(reason)
        for reason in set(expected_reasons.values())
    }
    assert await count_points(influx.url) == good + 1
    # Nothing injected a second line, series or field into InfluxDB.
    async with InfluxClient(InfluxSettings(url=influx.url)) as client:
        series = await client.query("SHOW SERIES")
        fields = await client.query("SHOW FIELD KEYS FROM telemetry")
    assert [row[0] for s in series for row in s.values] == [f"telemetry,device={dev}"]
    assert sorted(row[0] for s in fields for row in s.values) == ["seq", "t"]


async def publish_burst(
    broker: MosquittoServer, count_per_device: int, base_ms: int, pace_s: float = 0.0
) -> int:
    """Publish ``count_per_device`` readings from every test device at QoS 1."""

    async def one(device_id: str) -> None:
        async with device_client(broker, device_id) as client:
            pending: list[asyncio.Task[None]] = []
            for seq in range(count_per_device):
                payload = reading(device_id, seq, base_ms + seq * 1000, t=seq * 0.5, ok=True)
                pending.append(
                    asyncio.create_task(
                        client.publish(f"devices/{device_id}/telemetry", payload, qos=1)
                    )
                )
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending.clear()
                    if pace_s:
                        await asyncio.sleep(pace_s)
            await asyncio.gather(*pending)

    async with asyncio.TaskGroup() as group:
        for device_id in DEVICE_IDS:
            group.create_task(one(device_id))
    return count_per_device * len(DEVICE_IDS)


async def test_influxdb_outage_under_load_loses_nothing(
    mosquitto: MosquittoServer, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    influx = make_influxd()
    base_ms = int(time.time() * 1000) - 86_400_000
    async with running_gateway(mosquitto, influx.url, tmp_path / "spool") as gw:
        publisher = asyncio.create_task(publish_burst(mosquitto, 8_000, base_ms, pace_s=0.02))
        await wait_for(lambda: gw.metrics.stored > 2_000, 30, "first points stored")
        await asyncio.to_thread(influx.stop)
        await wait_for(lambda: gw.metrics.spooled > 2_000, 30, "points spooled while away")
        sent = await publisher
        await asyncio.sleep(0.5)
        await asyncio.to_thread(influx.start)
        await wait_for(lambda: gw.metrics.spool_batches == 0, 60, "the spool to drain", 0.2)
        await wait_for(lambda: gw.metrics.unacked == 0, 30, "every message acknowledged")
        assert gw.metrics.replayed > 0
    assert await count_points(influx.url) == sent


def gateway_process(
    broker: MosquittoServer,
    influx: InfluxdServer,
    spool_dir: Path,
    log: Path,
    *,
    republish_partitions: int = 0,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FIXLOOP_MQTT__HOST": broker.host,
        "FIXLOOP_MQTT__PORT": str(broker.port),
        "FIXLOOP_MQTT__USERNAME": GATEWAY_USER,
        "FIXLOOP_MQTT__PASSWORD": GATEWAY_PASSWORD,
        "FIXLOOP_INFLUX__URL": influx.url,
        "FIXLOOP_GATEWAY__SPOOL_DIR": str(spool_dir),
        "FIXLOOP_GATEWAY__METRICS_PORT": "0",
        "FIXLOOP_GATEWAY__REPUBLISH_PARTITIONS": str(republish_partitions),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fixloop", "gateway"], env=env, stdout=out, stderr=out
        )


@pytest.mark.parametrize(
    ("influx_down", "republish"),
    [(False, False), (True, False), (False, True)],
    ids=["influx-up", "spool-holds-data", "republished-pipelined"],
)
async def test_gateway_killed_mid_burst_loses_nothing(
    mosquitto: MosquittoServer,
    make_influxd: MakeInfluxd,
    tmp_path: Path,
    influx_down: bool,
    republish: bool,
) -> None:
    """SIGKILLed mid-burst and started again, the gateway stores every reading.

    Republishing for partitioned diagnostics (pipelined: a batch's republished copies
    wait for their PUBACKs while the next batch is stored), every reading also reaches
    its partition topic: a device message is acknowledged only after both.
    """
    influx = make_influxd()
    log = tmp_path / "gateway.log"
    spool = tmp_path / "spool"
    base_ms = int(time.time() * 1000) - 86_400_000
    partitions = 4 if republish else 0
    republished: set[tuple[str, int]] = set()
    async with AsyncExitStack() as stack:
        if republish:
            # a persistent session, as a partition's worker has: it misses nothing
            worker = await stack.enter_async_context(
                gateway_mqtt(mosquitto).client(
                    "partitions-stand-in", clean_start=False, session_expiry_s=600
                )
            )
            await worker.subscribe("fleet/partitions/#", qos=1)

            async def watch() -> None:
                while True:
                    await worker.wait_messages()
                    batch = worker.take(10_000)
                    for message in batch:
                        device_id = message.topic.split("/")[3]
                        republished.add((device_id, orjson.loads(message.payload)["seq"]))
                    worker.ack_many(batch)

            watcher = asyncio.create_task(watch())
            stack.push_async_callback(cancel_and_wait, watcher)
        sent = await _kill_mid_burst(
            mosquitto,
            influx,
            spool,
            log,
            base_ms,
            influx_down=influx_down,
            partitions=partitions,
            also=lambda sent: not republish or len(republished) >= sent,
        )
    if republish:
        expected = {(d, seq) for d in DEVICE_IDS for seq in range(sent // len(DEVICE_IDS))}
        assert republished == expected


async def _kill_mid_burst(
    mosquitto: MosquittoServer,
    influx: InfluxdServer,
    spool: Path,
    log: Path,
    base_ms: int,
    *,
    influx_down: bool,
    partitions: int,
    also: Callable[[int], bool] = lambda sent: True,
) -> int:
    """Start a gateway, SIGKILL it mid-burst, start it again; return the readings sent.

    The restarted gateway runs until every reading is stored and ``also(sent)`` holds.
    """
    gateway = gateway_process(mosquitto, influx, spool, log, republish_partitions=partitions)
    try:
        # The session must exist before the burst so the broker queues for it.
        await wait_for(lambda: b"subscribed" in log.read_bytes(), 20, "the gateway to subscribe")
        if influx_down:
            await asyncio.to_thread(influx.stop)
        publisher = asyncio.create_task(publish_burst(mosquitto, 10_000, base_ms, pace_s=0.01))
        if influx_down:
            await wait_for(
                lambda: (
                    any(spool.glob("*.seg"))
                    and sum(p.stat().st_size for p in spool.glob("*.seg")) > 200_000
                ),
                30,
                "spooled data",
            )
        else:
            await wait_for(
                lambda: influx.query("SELECT COUNT(seq) FROM telemetry", database="fixloop")[
                    "results"
                ][0].get("series"),
                30,
                "first points",
            )
        assert not publisher.done(), "the burst must still be running when the gateway dies"
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        sent = await publisher  # the broker keeps the gateway's queue meanwhile
        if influx_down:
            await asyncio.to_thread(influx.start)
        gateway = gateway_process(mosquitto, influx, spool, log, republish_partitions=partitions)
        await wait_for(lambda: b"resumed: True" in log.read_bytes(), 20, "the session resumed")

        async def all_stored() -> bool:
            return await count_points(influx.url) == sent

        deadline = time.monotonic() + 60
        while not await all_stored():
            assert time.monotonic() < deadline, f"only {await count_points(influx.url)} of {sent}"
            await asyncio.sleep(0.3)
        # still running: what it has not acknowledged yet is its own to finish
        await wait_for(lambda: also(sent), 60, "the rest of the work")
    finally:
        gateway.terminate()
        gateway.wait(10)
    assert gateway.returncode in (0, -signal.SIGTERM)
    return sent


async def health(port: int | None) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/health") as response,
    ):
        return response.status, await response.json()


async def test_full_spool_says_so_and_ingest_resumes_when_influxdb_returns(
    mosquitto: MosquittoServer, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    # With InfluxDB away and the spool full the gateway holds acknowledgements
    # (the broker keeps the messages) and /health is 503; once InfluxDB is back it writes
    # again although nothing new could be spooled, and everything arrives.
    influx = make_influxd()
    base_ms = int(time.time() * 1000) - 86_400_000
    async with running_gateway(
        mosquitto, influx.url, tmp_path / "spool", spool_max_bytes=2**20, retry_max_s=0.5
    ) as gw:
        await asyncio.to_thread(influx.kill)
        sent = await publish_burst(mosquitto, 10_000, base_ms)
        await wait_for(lambda: not gw.metrics.spool_writable, 30, "the spool to fill")
        status, body = await health(gw.metrics_port)
        assert status == 503
        assert "spool_unwritable" in body["problems"]  # type: ignore[operator]
        assert gw.metrics.unacked > 0
        await asyncio.to_thread(influx.start)
        await wait_for(lambda: gw.metrics.unacked == 0, 60, "every message stored", 0.2)
        await wait_for(lambda: gw.metrics.spool_batches == 0, 60, "the spool to drain", 0.2)
        assert gw.metrics.spool_disk_bytes == 0  # replayed space is reclaimed
        status, body = await health(gw.metrics_port)
        assert (status, body["problems"]) == (200, [])
        assert gw.metrics.spool_errors > 0
    assert await count_points(influx.url) == sent


async def test_a_lost_broker_session_is_counted(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    broker = make_mosquitto()
    async with running_gateway(broker, influxd.url, tmp_path / "spool", retry_max_s=0.5) as gw:
        assert gw.metrics.session_lost == 0
        # The broker crashes and comes back without its database: our session is gone.
        await asyncio.to_thread(broker.kill)
        for path in broker.data_dir.glob("*.db"):
            path.unlink()
        await wait_for(lambda: not gw.metrics.mqtt_connected, 10, "the disconnect")
        status, body = await health(gw.metrics_port)
        assert status == 503
        assert "mqtt_disconnected" in body["problems"]  # type: ignore[operator]
        await asyncio.to_thread(broker.start)
        await wait_for(lambda: gw.metrics.mqtt_connected, 20, "the reconnect")
        assert gw.metrics.session_lost == 1


async def test_messages_the_broker_drops_are_reported(
    influxd: InfluxdServer, tmp_path: Path
) -> None:
    # Past max_queued_messages the broker drops; the gateway reads its $SYS counter,
    # which mosquitto publishes every sys_interval: 1 s here instead of the shipped 10 s.
    broker = TunedMosquitto(
        tmp_path / "mosquitto",
        extra=["sys_interval 1"],
        users={GATEWAY_USER: GATEWAY_PASSWORD},
        device_ids=DEVICE_IDS,
        fleet_secret=FLEET_SECRET,
        max_queued_messages=10,
    )
    broker.start()
    try:
        spool = tmp_path / "spool"
        async with running_gateway(broker, influxd.url, spool):
            pass  # the session exists; the broker queues for it from now on
        await publish_burst(broker, 50, int(time.time() * 1000) - 60_000)
        async with running_gateway(broker, influxd.url, spool) as gw:
            await wait_for(lambda: gw.metrics.broker_dropped > 0, 25, "the drop count", 0.2)
            assert "fixloop_gateway_broker_dropped_messages" in gw.metrics.render()
    finally:
        broker.stop()


def test_health_names_every_reason_the_gateway_cannot_take_data() -> None:
    metrics = GatewayMetrics(stall_after_s=60.0, last_progress_s=1_000.0)
    metrics.mqtt_connected = True
    assert metrics.problems(now_s=1_030.0) == []
    metrics.unacked = 5  # waiting, but within the threshold
    assert metrics.problems(now_s=1_030.0) == []
    assert metrics.problems(now_s=1_061.0) == ["stalled"]
    metrics.unacked = 0  # nothing waits: no progress is needed
    assert metrics.problems(now_s=2_000.0) == []
    metrics.mqtt_connected = False
    metrics.spool_writable = False
    assert metrics.problems(now_s=1_030.0) == ["mqtt_disconnected", "spool_unwritable"]
    assert metrics.health(now_s=1_030.0)["problems"] == ["mqtt_disconnected", "spool_unwritable"]


async def test_batches_received_before_a_disconnect_are_stored(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    # The writer outlives the connection. Batches taken from the broker while
    # InfluxDB hangs are stored after the broker is gone, not dropped with the connection.
    broker = make_mosquitto()
    influx = make_influxd()
    assert influx.pid is not None
    async with running_gateway(broker, influx.url, tmp_path / "spool", retry_max_s=0.5) as gw:
        os.kill(influx.pid, signal.SIGSTOP)
        try:
            await publish_burst(broker, 500, int(time.time() * 1000) - 1_000_000)
            await wait_for(lambda: gw.metrics.unacked > 0, 10, "messages waiting")
            await asyncio.to_thread(broker.kill)
            await wait_for(lambda: not gw.metrics.mqtt_connected, 10, "the disconnect")
            assert gw.metrics.unacked > 0
        finally:
            os.kill(influx.pid, signal.SIGCONT)
        await wait_for(lambda: gw.metrics.unacked == 0, 30, "the writer to finish", 0.2)
        received = gw.metrics.received["telemetry"]
        assert received > 0
        assert not gw.metrics.rejected
        assert gw.metrics.dropped_unacked == 0
        assert gw.metrics.stored + gw.metrics.spooled - gw.metrics.replayed >= received


async def test_a_spool_written_in_milliseconds_replays_at_the_right_time(
    make_influxd: MakeInfluxd, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    # Spools from before same-millisecond readings hold millisecond timestamps; new
    # batches hold microseconds. Each batch is replayed in its own unit.
    influx = make_influxd()
    ts_ms = int(time.time() * 1000) - 3_600_000
    with Spool(tmp_path / "spool") as spool:
        spool.append(f"telemetry,device=old-1 t=1.5,seq=7i {ts_ms}".encode())
        spool.append(f"telemetry,device=new-1 t=2.5,seq=8i {ts_ms * 1000 + 8}".encode())
    async with running_gateway(mosquitto, influx.url, tmp_path / "spool") as gw:
        await wait_for(lambda: gw.metrics.spool_batches == 0, 30, "the replay", 0.1)
    async with InfluxClient(InfluxSettings(url=influx.url)) as client:
        rows = await client.query("SELECT t FROM telemetry GROUP BY device", epoch="ms")
    times = {series.tags["device"]: series.values[0][0] for series in rows}
    assert times == {"old-1": ts_ms, "new-1": ts_ms}
