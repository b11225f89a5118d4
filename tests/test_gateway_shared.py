"""Several gateways in one MQTT 5 shared group, on real mosquitto and influxd.

First what the design rests on: what Mosquitto does with a shared subscriber that dies
(pinned here, so a broker that behaves otherwise fails these tests rather than losing
data in production; README, "Several gateways"). Then the gateways themselves: three
in one group, one killed mid-burst (SIGKILL, no DISCONNECT) and started again under
its instance name: every reading is stored exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from conftest import GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto, device_pw

from fixloop.broker import GATEWAY_USER
from fixloop.server import free_port
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.errors import BrokerUnavailableError
from wire.influx import InfluxSettings
from wire.mqtt import Message, MqttClient
from wire.settings import MqttSettings
from wire.tasks import cancel_and_wait

pytestmark = pytest.mark.integration

GROUP_FILTER = "$share/ingest/devices/+/telemetry"
PUBLISHER = "dev-001"


def member(broker: MosquittoServer, client_id: str, *, persistent: bool) -> MqttClient:
    """A shared-group member that may hold at most 5 messages unacknowledged."""
    return MqttClient(
        broker.host,
        broker.port,
        client_id=client_id,
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
        clean_start=not persistent,
        session_expiry_s=3600 if persistent else 0,
        receive_maximum=5,
    )


async def publish(broker: MosquittoServer, seqs: range) -> None:
    """Publish ``seqs`` at QoS 1; each has reached the broker when this returns."""
    async with MqttClient(
        broker.host,
        broker.port,
        client_id=PUBLISHER,
        username=PUBLISHER,
        password=device_pw(PUBLISHER),
    ) as client:
        for seq in seqs:
            await client.publish(f"devices/{PUBLISHER}/telemetry", str(seq).encode(), qos=1)


async def collect(client: MqttClient, *, ack: bool, quiet_s: float = 1.0) -> set[int]:
    """Every message until none came for ``quiet_s``; acknowledged when ``ack``."""
    got: list[Message] = []
    while await client.wait_messages(quiet_s):
        batch = client.take(10_000)
        got += batch
        if ack:
            client.ack_many(batch)
    return {int(m.payload) for m in got}


async def test_mosquitto_gives_a_dead_clean_members_messages_to_no_one(
    mosquitto: MosquittoServer,
) -> None:
    dying = member(mosquitto, "member-a", persistent=False)
    survivor = member(mosquitto, "member-b", persistent=False)
    await dying.connect()
    await dying.subscribe(GROUP_FILTER)
    async with survivor:
        await survivor.subscribe(GROUP_FILTER)
        await publish(mosquitto, range(40))
        in_flight = await collect(dying, ack=False)
        assert len(in_flight) == 5  # its Receive Maximum; its other messages wait queued
        first = await collect(survivor, ack=True)
        dying.abort()  # a crash: no DISCONNECT
        await publish(mosquitto, range(100, 120))
        later = await collect(survivor, ack=True, quiet_s=1.5)
    # Messages published after the death go to the survivor only; what the dead member
    # held (in flight and queued) is deleted with its session, never redelivered.
    assert later >= set(range(100, 120))
    assert not in_flight & (first | later)
    assert len(set(range(40)) - first - later) >= 5


async def test_mosquitto_keeps_a_dead_persistent_members_share_for_its_return(
    mosquitto: MosquittoServer,
) -> None:
    dying = member(mosquitto, "member-a", persistent=True)
    survivor = member(mosquitto, "member-b", persistent=False)
    await dying.connect()
    await dying.subscribe(GROUP_FILTER)
    async with survivor:
        await survivor.subscribe(GROUP_FILTER)
        await publish(mosquitto, range(40))
        in_flight = await collect(dying, ack=False)
        assert len(in_flight) == 5
        dying.abort()
        await publish(mosquitto, range(100, 120))
        by_survivor = await collect(survivor, ack=True, quiet_s=1.5)
        # The dead member's offline session still takes its turn in the group: the
        # survivor gets only part of what was published after the death.
        assert not by_survivor >= set(range(100, 120))
        assert not in_flight & by_survivor
        # Back under the same client id, it gets its session: what it had in flight,
        # what was queued for it and what the broker routed to it while it was away.
        returned = member(mosquitto, "member-a", persistent=True)
        async with returned:
            assert returned.session_present
            await returned.subscribe(GROUP_FILTER)
            by_returned = await collect(returned, ack=True, quiet_s=1.5)
    assert in_flight <= by_returned
    assert by_survivor | by_returned == set(range(40)) | set(range(100, 120))


# -- the gateways ----------------------------------------------------------------------

DEVICES = tuple(f"sim-{n:03d}" for n in range(60))
READINGS_PER_DEVICE = 150
INSTANCES = ("a", "b", "c")


class GatewayProcess:
    """One ``fixloop gateway`` process of the group, under its instance name."""

    def __init__(
        self,
        broker: MosquittoServer,
        influx: InfluxdServer,
        root: Path,
        instance: str,
        **settings: str,
    ) -> None:
        self.instance = instance
        self.log = root / f"gateway-{instance}.log"
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "FIXLOOP_MQTT__HOST": broker.host,
            "FIXLOOP_MQTT__PORT": str(broker.port),
            "FIXLOOP_MQTT__USERNAME": GATEWAY_USER,
            "FIXLOOP_MQTT__PASSWORD": GATEWAY_PASSWORD,
            "FIXLOOP_INFLUX__URL": influx.url,
            "FIXLOOP_GATEWAY__SPOOL_DIR": str(root / "spool"),
            "FIXLOOP_GATEWAY__SHARED_GROUP": "ingest",
            "FIXLOOP_GATEWAY__INSTANCE": instance,
            "FIXLOOP_GATEWAY__METRICS_PORT": str(self.metrics_port),
            **{f"FIXLOOP_GATEWAY__{key.upper()}": value for key, value in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fixloop", "gateway"], env=self.env, stdout=out, stderr=out
            )

    def subscribed_times(self) -> int:
        return self.log.read_bytes().count(b" subscribed to ")

    def metric(self, name: str) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(f"fixloop_gateway_{name} "):
                    return int(float(line.split()[1]))
        raise AssertionError(f"no {name} in /metrics")

    def stored(self) -> int:
        return self.metric("stored_points_total")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


async def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def fleet_burst(
    broker: MosquittoServer,
    base_ms: int,
    devices: tuple[str, ...] = DEVICES,
    seqs: range = range(READINGS_PER_DEVICE),
    pace_s: float = 0.02,
) -> int:
    """Every device publishes its readings at QoS 1, paced; returns how many were sent."""

    async def one(device_id: str) -> None:
        async with MqttClient(
            broker.host,
            broker.port,
            client_id=device_id,
            username=device_id,
            password=device_pw(device_id),
        ) as client:
            for seq in seqs:
                body = {"v": 1, "id": device_id, "seq": seq, "ts": base_ms + seq * 1000}
                body["metrics"] = {"t": seq * 0.5}
                await client.publish(f"devices/{device_id}/telemetry", orjson.dumps(body), qos=1)
                await asyncio.sleep(pace_s)

    async with asyncio.TaskGroup() as group:
        for device_id in devices:
            group.create_task(one(device_id))
    return len(devices) * len(seqs)


async def fleet_until(
    broker: MosquittoServer, base_ms: int, stop: asyncio.Event, sent: dict[str, int] | None = None
) -> dict[str, int]:
    """Every device publishes readings at QoS 1, paced, until ``stop``.

    Returns how many each has sent; ``sent`` continues an earlier run's numbering.
    """
    sent = dict(sent) if sent else dict.fromkeys(DEVICES, 0)

    async def one(device_id: str) -> None:
        async with MqttClient(
            broker.host,
            broker.port,
            client_id=device_id,
            username=device_id,
            password=device_pw(device_id),
        ) as client:
            while not stop.is_set():
                seq = sent[device_id]
                body = {"v": 1, "id": device_id, "seq": seq, "ts": base_ms + seq * 1000}
                body["metrics"] = {"t": seq * 0.5}
                await client.publish(f"devices/{device_id}/telemetry", orjson.dumps(body), qos=1)
                sent[device_id] = seq + 1
                await asyncio.sleep(0.02)

    async with asyncio.TaskGroup() as group:
        for device_id in DEVICES:
            group.create_task(one(device_id))
    return sent


def stored_seqs(influx: InfluxdServer) -> dict[str, list[int]]:
    """The sequence numbers InfluxDB holds, per device."""
    answer = influx.query("SELECT seq FROM telemetry GROUP BY device", database="fixloop")
    series = answer["results"][0].get("series") or []
    return {s["tags"]["device"]: [int(v[1]) for v in s["values"]] for s in series}


def total_points(influx: InfluxdServer) -> int:
    answer = influx.query("SELECT COUNT(seq) FROM telemetry", database="fixloop")
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


async def test_a_gateway_killed_mid_burst_loses_nothing_and_stores_nothing_twice(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    broker = make_mosquitto(device_ids=DEVICES)
    influx = make_influxd()
    gateways = [GatewayProcess(broker, influx, tmp_path, name) for name in INSTANCES]
    victim = gateways[1]
    base_ms = int(time.time() * 1000) - 86_400_000
    try:
        for gateway in gateways:
            gateway.start()
        # Every session must exist before the burst so the broker routes to it.
        await wait_for(
            lambda: all(g.subscribed_times() for g in gateways), 30, "every gateway subscribed"
        )
        # The devices publish until told to stop, so the kill falls mid-burst whatever
        # the machine's pace: readings flow before it and after it.
        stop = asyncio.Event()
        burst = asyncio.create_task(fleet_until(broker, base_ms, stop))
        await wait_for(lambda: total_points(influx) >= 2_000, 60, "2,000 readings stored")
        victim.kill()
        at_kill = total_points(influx)
        await wait_for(lambda: total_points(influx) >= at_kill + 2_000, 60, "2,000 more")
        stop.set()
        sent_by_device = await burst
        sent = sum(sent_by_device.values())
        # The broker kept the victim's share (in flight, queued, and routed to it while
        # it was down) in its session; the same instance started again takes it back.
        victim.start()
        await wait_for(lambda: victim.subscribed_times() == 2, 30, "the victim back")
        await wait_for(lambda: total_points(influx) >= sent, 90, "every reading stored")
        by_gateway = {g.instance: g.stored() for g in gateways}
    finally:
        for gateway in gateways:
            gateway.stop()
    assert b"session resumed: True" in victim.log.read_bytes()
    # The group spread the load: the two that ran throughout stored part of it each.
    assert by_gateway["a"] > 0
    assert by_gateway["c"] > 0
    seqs = stored_seqs(influx)
    assert sorted(seqs) == sorted(DEVICES)
    for device_id, device_seqs in seqs.items():
        assert sorted(device_seqs) == list(range(sent_by_device[device_id])), device_id
    assert total_points(influx) == sent


async def test_a_retired_gateway_stores_its_share_and_leaves_the_group(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    devices = DEVICES[:10]
    broker = make_mosquitto(device_ids=devices)
    influx = make_influxd()
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    store = InfluxSettings(url=influx.url)

    def settings(instance: str) -> GatewaySettings:
        # A small Receive Maximum: most of the stopped member's share waits queued.
        return GatewaySettings(
            spool_dir=tmp_path / "spool",
            metrics_port=0,
            batch_linger_s=0.02,
            shared_group="ingest",
            instance=instance,
            receive_maximum=50,
        )

    base_ms = int(time.time() * 1000) - 86_400_000
    # b joins the group and stops: its persistent session stays a member.
    async with Gateway(mqtt, store, settings("b")) as b:
        task = asyncio.create_task(b.run())
        async with asyncio.timeout(20):
            await b.wait_subscribed()
        await cancel_and_wait(task)
    async with Gateway(mqtt, store, settings("a")) as a:
        task = asyncio.create_task(a.run())
        try:
            async with asyncio.timeout(20):
                await a.wait_subscribed()
            sent = await fleet_burst(broker, base_ms, devices, range(100), pace_s=0)
            await wait_for(lambda: total_points(influx) >= sent // 2, 60, "a's half stored")
            assert total_points(influx) < sent  # b's share waits for b at the broker
            # Devices keep publishing while b retires: what the broker routes to b
            # before it unsubscribes, b stores; after that, a does.
            during = asyncio.create_task(
                fleet_burst(broker, base_ms, devices, range(100, 200), pace_s=0.005)
            )
            async with Gateway(mqtt, store, settings("b")) as b:
                async with asyncio.timeout(60):
                    await b.retire()
                assert b.metrics.stored > 0
            sent += await during
            # b has left the group: a gets everything published from now on.
            sent += await fleet_burst(broker, base_ms, devices, range(200, 230), pace_s=0)
            await wait_for(lambda: total_points(influx) >= sent, 60, "the later ones stored")
        finally:
            await cancel_and_wait(task)
    for device_id, device_seqs in stored_seqs(influx).items():
        assert sorted(device_seqs) == list(range(230)), device_id
    async with mqtt.client("fixloop-gateway-b", clean_start=False, session_expiry_s=0) as probe:
        assert not probe.session_present  # the retired session is gone


async def test_a_retire_that_left_messages_unacknowledged_keeps_the_session(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    """A retire ends the session only once everything it held is acknowledged.

    Republishing for partitioned diagnostics, a batch whose republished copies were not
    acknowledged is stored but left unacknowledged, for the broker to deliver again.
    Ending the session then would take those messages from partitioned diagnostics for
    good: the retire says so instead, keeps the session, and a second retire finishes.
    """
    devices = DEVICES[:3]
    broker = make_mosquitto(device_ids=devices)
    influx = make_influxd()
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    store = InfluxSettings(url=influx.url)
    settings = GatewaySettings(
        spool_dir=tmp_path / "spool",
        batch_linger_s=0.02,
        shared_group="ingest",
        instance="b",
        republish_partitions=1,
    )
    async with Gateway(mqtt, store, settings) as b:
        task = asyncio.create_task(b.run())
        async with asyncio.timeout(20):
            await b.wait_subscribed()
        await cancel_and_wait(task)
    # partitioned diagnostics' session for the one partition
    partition = mqtt.client("diagnostics-p0", clean_start=False, session_expiry_s=600)
    async with partition:
        await partition.subscribe("fleet/partitions/0/#", qos=1)
    base_ms = int(time.time() * 1000) - 86_400_000
    sent = await fleet_burst(broker, base_ms, devices, range(5), pace_s=0)

    async with Gateway(mqtt, store, settings) as b:
        assert b.republisher is not None
        b.republisher.puback_timeout_s = 0  # no republished copy is acknowledged in time
        with pytest.raises(BrokerUnavailableError, match="not acknowledged"):
            async with asyncio.timeout(60):
                await b.retire()
        assert b.republisher.failed > 0
    async with Gateway(mqtt, store, settings) as b:
        async with asyncio.timeout(60):
            await b.retire()
    async with mqtt.client("fixloop-gateway-b", clean_start=False, session_expiry_s=0) as probe:
        assert not probe.session_present  # the retired session is gone
    copies: set[tuple[str, int]] = set()
    async with partition:
        for message in await take_all(partition):
            body = orjson.loads(message.payload)
            copies.add((body["id"], body["seq"]))
    assert copies == {(d, seq) for d in devices for seq in range(5)}
    assert total_points(influx) == sent


async def take_all(client: MqttClient, quiet_s: float = 1.0) -> list[Message]:
    """Every message until none came for ``quiet_s``, acknowledged."""
    got: list[Message] = []
    while await client.wait_messages(quiet_s):
        batch = client.take(10_000)
        client.ack_many(batch)
        got += batch
    return got


async def test_a_dead_gateways_share_is_adopted_by_a_live_one_until_it_returns(
    make_mosquitto: MakeMosquitto, make_influxd: MakeInfluxd, tmp_path: Path
) -> None:
    broker = make_mosquitto(device_ids=DEVICES)
    influx = make_influxd()
    gateways = [
        GatewayProcess(broker, influx, tmp_path, name, adopt_after_s="1") for name in INSTANCES
    ]
    victim, adopter = gateways[0], gateways[1]  # the first live one by name adopts
    base_ms = int(time.time() * 1000) - 86_400_000
    try:
        for gateway in gateways:
            gateway.start()
        await wait_for(
            lambda: all(g.subscribed_times() for g in gateways), 30, "every gateway subscribed"
        )
        stop = asyncio.Event()
        burst = asyncio.create_task(fleet_until(broker, base_ms, stop))
        await wait_for(lambda: total_points(influx) >= 2_000, 60, "2,000 readings stored")
        victim.kill()
        at_kill = total_points(influx)
        await wait_for(lambda: total_points(influx) >= at_kill + 2_000, 60, "2,000 more")
        stop.set()
        sent_by_device = await burst
        # Not started again: what the broker holds for it is stored by the adopter.
        await wait_for(
            lambda: total_points(influx) >= sum(sent_by_device.values()),
            60,
            "every reading stored while the victim stays dead",
        )
        assert b"holds its session" in adopter.log.read_bytes()
        assert adopter.metric("adopted_sessions") == 1
        # Back under its name, the victim takes its session over again.
        victim.start()
        await wait_for(lambda: victim.subscribed_times() == 2, 30, "the victim back")
        stop = asyncio.Event()
        burst = asyncio.create_task(fleet_until(broker, base_ms, stop, sent_by_device))
        await wait_for(lambda: victim.stored() >= 300, 60, "the victim storing its share")
        await wait_for(lambda: adopter.metric("adopted_sessions") == 0, 30, "the session back")
        assert adopter.metric("adoptions_total") >= 1
        stop.set()
        sent_by_device = await burst
        sent = sum(sent_by_device.values())
        await wait_for(lambda: total_points(influx) >= sent, 60, "every reading stored")
    finally:
        for gateway in gateways:
            gateway.stop()
    assert b"session resumed: True" in victim.log.read_bytes()
    assert b"no longer held here" in adopter.log.read_bytes()
    seqs = stored_seqs(influx)
    for device_id in DEVICES:
        assert sorted(seqs[device_id]) == list(range(sent_by_device[device_id])), device_id
    assert total_points(influx) == sent
