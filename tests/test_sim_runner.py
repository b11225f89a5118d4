"""The fleet runner: against a fake connection (no I/O) and against a real mosquitto."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from device_sim import FleetRunner, SimSettings
from fixloop.broker import GATEWAY_USER
from tests.conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeMosquitto
from wire.errors import BrokerUnavailableError
from wire.mqtt import Message, MqttClient, Will


class FakeConnection:
    """Records publishes; delivers queued commands."""

    def __init__(self, device_id: str, will: Will, clean_start: bool = True) -> None:
        self.device_id = device_id
        self.will = will
        self.clean_start = clean_start
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscribed: list[str] = []
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.acked: list[int] = []
        self.open = False
        self.aborted = False

    async def connect(self) -> None:
        self.open = True

    async def disconnect(self) -> None:
        self.open = False

    def abort(self) -> None:
        self.open = False
        self.aborted = True

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        self.subscribed += topic_filters

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        await asyncio.sleep(0)
        self.published.append((topic, payload, qos, retain))

    async def messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                async with asyncio.timeout(0.05):
                    message = await self.inbox.get()
            except TimeoutError:
                if not self.open:  # as MqttClient: the end of the connection ends this
                    raise BrokerUnavailableError("the connection is closed") from None
                continue
            yield message

    def ack(self, message: Message) -> None:
        self.acked.append(message.packet_id)


async def test_runner_publishes_everything_and_answers_commands() -> None:
    settings = SimSettings(devices=3, fleet_secret=FLEET_SECRET, speed="max", duration_s=600)
    connections: dict[str, FakeConnection] = {}

    def connect(device_id: str, password: str, will: Will, clean_start: bool) -> FakeConnection:
        assert len(password) == 24
        assert clean_start  # each device's first connection of the run
        connections[device_id] = FakeConnection(device_id, will, clean_start)
        return connections[device_id]

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    async with FleetRunner(settings, start=start, connect=connect) as runner:
        first = runner.fleet.device_ids[0]
        command = orjson.dumps({"id": "c-1", "action": "selftest", "args": {}})
        await connections[first].inbox.put(
            Message(f"devices/{first}/commands", command, 1, False, 7)
        )
        report = await runner.run()
    assert report.readings_total == 3 * 60
    assert report.commands_received == 1
    for device_id, conn in connections.items():
        assert not conn.open
        assert conn.subscribed == [f"devices/{device_id}/commands"]
        assert conn.will == Will(f"devices/{device_id}/status", b"offline", qos=1, retain=True)
        topics = Counter(t.rsplit("/", 1)[1] for t, *_ in conn.published)
        assert topics["telemetry"] == report.readings_per_device[device_id] == 60
        assert all(qos == 1 for _, _, qos, _ in conn.published)
        status = [(p, retain) for t, p, _, retain in conn.published if t.endswith("/status")]
        assert status == [(b"online", True), (b"offline", True)]
    answers = [
        orjson.loads(p) for t, p, *_ in connections[first].published if t.endswith("/events")
    ]
    assert {a["type"] for a in answers if a.get("command_id") == "c-1"} == {
        "selftest",
        "command_result",
    }
    assert connections[first].acked == [7]
    assert report.end - report.start == timedelta(seconds=600)


async def test_runner_stops_when_told() -> None:
    settings = SimSettings(devices=2, fleet_secret=FLEET_SECRET, speed=1.0)
    stop = asyncio.Event()

    def connect(device_id: str, password: str, will: Will, clean_start: bool) -> FakeConnection:
        return FakeConnection(device_id, will, clean_start)

    async with FleetRunner(settings, connect=connect) as runner:
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        async with asyncio.timeout(5):
            report = await task
    assert report.readings_total <= 2


async def test_runner_against_mosquitto(make_mosquitto: MakeMosquitto) -> None:
    settings = SimSettings(
        devices=4, fleet_secret=FLEET_SECRET, speed="max", duration_s=1800, interval_s=10
    )
    runner = FleetRunner(settings)
    broker = make_mosquitto(device_ids=tuple(runner.fleet.device_ids))
    settings = settings.model_copy(update={"mqtt_port": broker.port, "mqtt_host": broker.host})
    runner = FleetRunner(settings)
    received: Counter[str] = Counter()
    async with MqttClient(
        broker.host,
        broker.port,
        client_id="sim-test-sub",
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
    ) as subscriber:
        await subscriber.subscribe("devices/+/telemetry", "devices/+/events", qos=1)
        async with runner:
            report = await runner.run()
        expected = report.readings_total + report.events_total
        assert report.readings_total == 4 * 180
        async with asyncio.timeout(10):
            async for message in subscriber.messages():
                subscriber.ack(message)
                received[message.topic.split("/")[1]] += 1
                if sum(received.values()) == expected:
                    break
    for device_id in runner.fleet.device_ids:
        per_device = report.readings_per_device[device_id] + report.events_per_device[device_id]
        assert received[device_id] == per_device


async def test_a_device_that_loses_the_broker_buffers_and_reconnects_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("device_sim.runner._RECONNECT_FIRST_S", 0.01)
    monkeypatch.setattr("device_sim.runner._RECONNECT_MAX_S", 0.04)
    settings = SimSettings(
        devices=1, fleet_secret=FLEET_SECRET, speed=600.0, start_offset_s=1800, duration_s=1800
    )
    made: list[FakeConnection] = []
    refusals = 8  # connects refused while "the broker is down"

    class Flaky(FakeConnection):
        async def connect(self) -> None:
            nonlocal refusals
            if len(made) > 1 and refusals:
                refusals -= 1
                raise BrokerUnavailableError("connection refused")
            await super().connect()

        async def publish(
            self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
        ) -> None:
            if len(made) == 1 and len(self.published) == 20:
                self.open = False
                raise BrokerUnavailableError("the broker went away")
            await super().publish(topic, payload, qos=qos, retain=retain)

    def connect(device_id: str, password: str, will: Will, clean_start: bool) -> FakeConnection:
        made.append(Flaky(device_id, will, clean_start))
        return made[-1]

    async with FleetRunner(settings, connect=connect, reconnect=True) as runner:
        report = await runner.run()
    (device,) = runner.fleet.devices
    assert runner.reconnects == 1
    assert len(made) == 2 + 8  # the first, eight refused, the one that held
    assert [c.clean_start for c in made] == [True] + [False] * 9  # the session resumed
    assert report.buffered_at_end == 0
    assert report.readings_total == device.readings_taken == 180
    telemetry = [p for c in made for t, p, *_ in c.published if t.endswith("/telemetry")]
    seqs = [orjson.loads(p)["seq"] for p in telemetry]
    assert sorted(set(seqs)) == sorted(seqs)  # each once: the failed one was not acked


async def test_a_message_the_broker_refuses_is_dropped_and_counted_as_the_library_does() -> None:
    from wire.errors import PermanentError

    settings = SimSettings(devices=1, fleet_secret=FLEET_SECRET, speed="max", duration_s=600)

    class Strict(FakeConnection):
        async def publish(
            self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
        ) -> None:
            if topic.endswith("/telemetry") and orjson.loads(payload)["seq"] == 5:
                raise PermanentError("the broker refused the message (0x87)")
            await super().publish(topic, payload, qos=qos, retain=retain)

    def connect(device_id: str, password: str, will: Will, clean_start: bool) -> FakeConnection:
        return Strict(device_id, will, clean_start)

    async with FleetRunner(settings, connect=connect) as runner:
        report = await runner.run()
    (device,) = runner.fleet.devices
    assert device.core.store.counter("refused") == 1
    assert report.readings_total == device.readings_taken - 1 == 59
    assert report.buffered_at_end == 0  # the rest went on
