"""The device library on a real mosquitto (and the real gateway and influxd).

A power cut while offline, a broker restart, a command sent while the device is down,
interlocks, a repeated command id and firmware updates (checksum, good boot, rollback):
nothing lost, nothing stored twice, every command answered once.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import DEVICE_IDS, GATEWAY_PASSWORD, MakeMosquitto, device_pw
from paho.mqtt.enums import CallbackAPIVersion

from device import (
    Command,
    CommandResult,
    Device,
    DeviceSettings,
    Refusal,
    SelfTestResult,
)
from device.store import DeviceStore
from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from notifier.messages import refusal_code
from wire.commands import CommandChannel
from wire.influx import InfluxClient, InfluxSettings
from wire.protocol import Event, decode_event
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WATCHER = "ops-watcher"
WATCHER_PASSWORD = "ops-watcher-password"


# -- helpers (also used by test_device_auth and test_device_example) -----------------------


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def eventually(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool


class Watcher:
    """A service user that records every device message (paho, on its own thread)."""

    def __init__(self, broker: MosquittoServer, user: str = WATCHER, password: str = "") -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user}-watch", protocol=paho.MQTTv5
        )
        self.client.username_pw_set(user, password or WATCHER_PASSWORD)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("devices/#", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the watcher could not subscribe"

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.seen.append(Seen(message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [s.payload for s in self.seen if s.topic == topic]

    def events(self, device_id: str) -> list[Event]:
        now_ms = int(time.time() * 1000)
        return [decode_event(device_id, p, now_ms) for p in self.on(f"devices/{device_id}/events")]

    def results(self, device_id: str, command_id: str) -> list[Event]:
        return [
            e
            for e in self.events(device_id)
            if e.kind == "command_result" and e.command_id == command_id
        ]

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def watching(broker: MosquittoServer) -> Iterator[Watcher]:
    watcher = Watcher(broker)
    try:
        yield watcher
    finally:
        watcher.close()


def start_broker(make_mosquitto: MakeMosquitto, *device_ids: str) -> MosquittoServer:
    return make_mosquitto(
        users={GATEWAY_USER: GATEWAY_PASSWORD, WATCHER: WATCHER_PASSWORD},
        device_ids=(*DEVICE_IDS, *device_ids),
    )


def device_settings(
    broker: MosquittoServer, device_id: str, data_dir: Path, **overrides: Any
) -> DeviceSettings:
    values: dict[str, Any] = {
        "port": broker.port,
        "password": device_pw(device_id),
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "send_rate_per_s": 1_000.0,
        "firmware": "1.0.0",
        "model": "washer",
    }
    values.update(overrides)
    return DeviceSettings(device_id, broker.host, data_dir, **values)


def service_mqtt(broker: MosquittoServer) -> MqttSettings:
    return MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )


@asynccontextmanager
async def running_gateway(
    broker: MosquittoServer, influx: InfluxdServer, spool_dir: Path
) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(spool_dir=spool_dir, metrics_port=0, batch_linger_s=0.02)
    gateway = Gateway(service_mqtt(broker), InfluxSettings(url=influx.url), settings)
    async with gateway:
        task = asyncio.create_task(gateway.run())
        try:
            async with asyncio.timeout(10):
                await gateway.wait_subscribed()
            yield gateway
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


async def stored(influx: InfluxdServer, device_id: str, measurement: str = "telemetry") -> int:
    async with InfluxClient(InfluxSettings(url=influx.url)) as client:
        return await client.count(measurement, where=f"\"device\" = '{device_id}'")


async def stored_rows(
    influx: InfluxdServer, device_id: str, columns: str, measurement: str = "telemetry"
) -> list[list[Any]]:
    async with InfluxClient(InfluxSettings(url=influx.url)) as client:
        series = await client.query(
            f"SELECT {columns} FROM {measurement} WHERE \"device\" = '{device_id}'"
        )
    return [row for one in series for row in one.values]


async def wait_stored(influx: InfluxdServer, device_id: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (n := await stored(influx, device_id)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device_id}: {n} of {count} readings stored")
        await asyncio.sleep(0.1)


# -- a power cut while offline -------------------------------------------------------------

DRIVER = """
import json, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from device import Device, DeviceSettings

cfg = json.loads(sys.argv[1])
device = Device(DeviceSettings(
    cfg["device_id"], cfg["host"], Path(cfg["data_dir"]), port=cfg["port"],
    password=cfg["password"], send_rate_per_s=cfg["rate"], reconnect_min_s=0.05,
    reconnect_max_s=0.5, firmware="1.0.0"))
device.start()
start = datetime.fromtimestamp(cfg["start_s"], UTC)
for i in range(cfg["readings"]):
    device.publish_reading({"temp_c": 20.0 + i % 7, "door_open": i % 2 == 0},
                           ts=start + timedelta(seconds=10 * i))
print("stored", device.stats().seq, flush=True)
if cfg["flush"]:
    print("flushed", device.flush(120), flush=True)
sys.stdin.read()
device.stop()
"""


async def spawn_driver(tmp_path: Path, cfg: dict[str, Any]) -> asyncio.subprocess.Process:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        json.dumps(cfg),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


async def read_line(process: asyncio.subprocess.Process, timeout_s: float) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(timeout_s):
        return (await process.stdout.readline()).decode().strip()


async def test_a_two_hour_power_cut_while_offline_loses_nothing_and_stores_once(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    device_id = "dl-powercut"
    broker = start_broker(make_mosquitto, device_id)
    broker.stop()  # the device's network is down from the start
    readings = 720  # two hours at one reading per 10 s
    start_s = int(time.time()) - 2 * 3600 - 60
    cfg = {
        "device_id": device_id,
        "host": broker.host,
        "port": broker.port,
        "password": device_pw(device_id),
        "data_dir": str(tmp_path / "device"),
        "rate": 400.0,
        "start_s": start_s,
        "readings": readings,
        "flush": False,
    }
    first = await spawn_driver(tmp_path, cfg)
    assert await read_line(first, 120) == f"stored {readings + 1}"  # boot event + readings
    first.kill()  # the power goes: no clean stop, no goodbye
    await first.wait()
    with DeviceStore.open(tmp_path / "device" / "device.sqlite3") as store:
        assert (store.count, store.seq) == (readings + 1, readings + 1)  # all on disk

    broker.start()
    async with running_gateway(broker, influxd, tmp_path / "spool"):
        second = await spawn_driver(tmp_path, {**cfg, "readings": 0, "flush": True})
        assert await read_line(second, 30) == f"stored {readings + 2}"  # its own boot event
        assert await read_line(second, 120) == "flushed True"
        await wait_stored(influxd, device_id, readings, 60)
        assert second.stdin is not None
        second.stdin.close()
        async with asyncio.timeout(30):
            assert await second.wait() == 0
        rows = await stored_rows(influxd, device_id, "seq")
        boots = await stored_rows(influxd, device_id, "code, data", "device_events")
    assert await stored(influxd, device_id) == readings  # stored once
    assert sorted(row[1] for row in rows) == list(range(2, readings + 2))  # original seq
    assert sorted(row[0] for row in rows) == [
        start_s * 1000 + 10_000 * i for i in range(readings)
    ]  # original ts
    assert len(boots) == 2
    assert [json.loads(row[2])["clean_shutdown"] for row in sorted(boots)] == [True, False]


# -- a broker restart ----------------------------------------------------------------------


async def test_a_broker_restart_loses_no_reading(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    device_id = "dl-brokerrestart"
    broker = start_broker(make_mosquitto, device_id)
    async with running_gateway(broker, influxd, tmp_path / "spool"):
        dev = Device(device_settings(broker, device_id, tmp_path / "device"))
        dev.start()
        try:
            assert await asyncio.to_thread(dev.wait_connected, 10)
            for i in range(60):
                dev.publish_reading({"temp_c": float(i)})
            assert await asyncio.to_thread(dev.flush, 10)
            broker.stop()
            await eventually(lambda: not dev.connected, 10, "the device to notice")
            for i in range(60, 120):
                dev.publish_reading({"temp_c": float(i)})
            assert dev.stats().buffered == 60
            broker.start()
            for i in range(120, 180):
                dev.publish_reading({"temp_c": float(i)})
            assert await asyncio.to_thread(dev.flush, 30)
            await wait_stored(influxd, device_id, 180, 60)
            stats = dev.stats()
        finally:
            await asyncio.to_thread(dev.stop)
        rows = await stored_rows(influxd, device_id, "seq, temp_c")
    assert stats.connects >= 2
    assert (stats.dropped, stats.refused, stats.expired) == (0, 0, 0)
    assert await stored(influxd, device_id) == 180
    assert sorted(row[2] for row in rows) == [float(i) for i in range(180)]
    assert sorted(row[1] for row in rows) == list(range(2, 182))


# -- commands --------------------------------------------------------------------------------


class Washer:
    """A tiny appliance: a door, a running programme, and how often it was restarted."""

    def __init__(self) -> None:
        self.door_open = False
        self.washing = False
        self.restarts: list[str] = []

    def interlock(self) -> Refusal | None:
        if self.door_open:
            return Refusal("door_open", "the door is open; will be possible once it is closed")
        if self.washing:
            return Refusal("mid_cycle", "a wash is running; will be possible after the cycle")
        return None

    def restart(self, command: Command) -> CommandResult:
        self.restarts.append(command.id)
        return CommandResult(True, "restarting now; back in about a minute")

    def attach(self, dev: Device) -> Device:
        dev.add_interlock(self.interlock)
        dev.on_command("restart", self.restart)
        dev.on_selftest(lambda: SelfTestResult(True, "PASS", "all good", {"drain_time_s": 41.0}))
        return dev


async def test_a_command_sent_while_the_device_is_down_runs_once_after_it_is_back(
    make_mosquitto: MakeMosquitto, tmp_path: Path
) -> None:
    broker = start_broker(make_mosquitto)
    device_id = DEVICE_IDS[0]
    washer = Washer()
    settings = device_settings(broker, device_id, tmp_path / "device")
    with watching(broker) as watcher:
        dev = washer.attach(Device(settings))
        dev.start()
        assert await asyncio.to_thread(dev.wait_connected, 10)
        await asyncio.to_thread(dev.stop)  # it reboots: gone for a while
        status = f"devices/{device_id}/status"
        await eventually(lambda: watcher.on(status)[-1:] == [b"offline"], 10, "offline")
        async with CommandChannel(service_mqtt(broker), client_id="test-commands") as channel:
            sent = asyncio.create_task(channel.send(device_id, "restart", timeout_s=30))
            commands = f"devices/{device_id}/commands"
            await eventually(lambda: watcher.on(commands), 10, "the command at the broker")
            back = washer.attach(Device(settings))  # the device is back with its session
            back.start()
            try:
                result = await sent
                assert result.ok is True
                assert washer.restarts == [result.command_id]
                # the next command proves the queue is drained: no second run of the first
                second = await channel.send(device_id, "selftest", timeout_s=30)
                assert second.ok is True
            finally:
                await asyncio.to_thread(back.stop)
        again = washer.attach(Device(settings))
        again.start()
        try:
            assert await asyncio.to_thread(again.wait_connected, 10)
            assert again.stats().commands == 0
        finally:
            await asyncio.to_thread(again.stop)
        assert washer.restarts == [result.command_id]
        assert len(watcher.results(device_id, str(result.command_id))) == 1
        assert watcher.on(status) == [b"online", b"offline"] * 3
        selftests = [e for e in watcher.events(device_id) if e.kind == "selftest"]
        assert [(e.command_id, e.ok, e.code) for e in selftests] == [
            (second.command_id, True, "PASS")
        ]


async def test_interlocks_refuse_in_the_contracts_words(
    make_mosquitto: MakeMosquitto, tmp_path: Path
) -> None:
    broker = start_broker(make_mosquitto)
    device_id = DEVICE_IDS[1]
    washer = Washer()
    dev = washer.attach(Device(device_settings(broker, device_id, tmp_path / "device")))
    settings_applied: list[Command] = []

    def broken_sensor() -> Refusal | None:
        raise OSError("the door sensor does not answer")

    dev.add_interlock(broken_sensor, ["config_set"])
    dev.on_command("config_set", lambda c: settings_applied.append(c) or CommandResult(True))
    dev.start()
    try:
        assert await asyncio.to_thread(dev.wait_connected, 10)
        async with CommandChannel(service_mqtt(broker), client_id="test-commands") as channel:
            unsure = await channel.send(device_id, "config_set", {"eco": True}, timeout_s=20)
            washer.door_open = True
            door = await channel.send(device_id, "restart", timeout_s=20)
            washer.door_open, washer.washing = False, True
            cycle = await channel.send(device_id, "restart", timeout_s=20)
            selftest = await channel.send(device_id, "selftest", timeout_s=20)  # not guarded
            unknown = await channel.send(device_id, "cleaning_cycle", timeout_s=20)
            washer.washing = False
            done = await channel.send(device_id, "restart", timeout_s=20)
    finally:
        await asyncio.to_thread(dev.stop)
    assert (door.ok, door.code) == (False, "door_open")
    assert door.detail == "refused: the door is open; will be possible once it is closed"
    assert refusal_code(door.detail) == "door_open"
    assert (cycle.ok, cycle.code, refusal_code(cycle.detail)) == (False, "mid_cycle", "mid_cycle")
    assert selftest.ok is True
    assert selftest.data["passed"] is True
    assert (unknown.ok, unknown.detail) == (False, "this device does not do cleaning_cycle")
    assert done.ok is True
    assert washer.restarts == [done.command_id]
    # an interlock that cannot tell refuses, without claiming a reason it does not know
    assert (unsure.ok, unsure.code) == (False, None)
    assert unsure.detail == "refused: the device could not check it is safe now"
    assert settings_applied == []


async def test_a_repeated_command_id_is_answered_once(
    make_mosquitto: MakeMosquitto, tmp_path: Path
) -> None:
    broker = start_broker(make_mosquitto)
    device_id = DEVICE_IDS[2]
    washer = Washer()
    settings = device_settings(broker, device_id, tmp_path / "device")
    commands = f"devices/{device_id}/commands"
    payload = json.dumps({"id": "c-twice", "action": "restart", "args": {}}).encode()
    with watching(broker) as watcher:
        dev = washer.attach(Device(settings))
        dev.start()
        try:
            assert await asyncio.to_thread(dev.wait_connected, 10)
            watcher.publish(commands, payload)
            watcher.publish(commands, payload)
            watcher.publish(commands, b'{"id": "c-after", "action": "selftest"}')
            # commands run in order: once c-after is answered, both copies were handled
            await eventually(lambda: watcher.results(device_id, "c-after"), 20, "c-after")
            assert dev.stats().duplicates == 1
        finally:
            await asyncio.to_thread(dev.stop)
        again = washer.attach(Device(settings))
        again.start()
        try:
            assert await asyncio.to_thread(again.wait_connected, 10)
            watcher.publish(commands, payload)  # the same id after a restart
            watcher.publish(commands, b'{"id": "c-last", "action": "selftest"}')
            await eventually(lambda: watcher.results(device_id, "c-last"), 20, "c-last")
            assert again.stats().duplicates == 1
        finally:
            await asyncio.to_thread(again.stop)
        assert washer.restarts == ["c-twice"]
        assert len(watcher.results(device_id, "c-twice")) == 1


# -- firmware updates ------------------------------------------------------------------------


class SlotFirmware:
    """Two slots on files, as a device maker's updater would do it, in miniature."""

    def __init__(self, root: Path, running: str, *, healthy: bool = True) -> None:
        self.root = root
        self.running = running
        self.healthy = healthy
        self.calls: list[tuple[str, ...]] = []
        self.activated = threading.Event()

    def version(self) -> str:
        return self.running

    def install(self, image: Path, version: str) -> None:
        self.calls.append(("install", version))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "slot-b").write_bytes(image.read_bytes())

    def activate(self) -> None:
        self.calls.append(("activate",))
        self.activated.set()

    def boot_ok(self) -> bool:
        self.calls.append(("boot_ok",))
        return self.healthy

    def rollback(self, version: str) -> None:
        self.calls.append(("rollback", version))
        self.running = version


@contextmanager
def image_server(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


IMAGE = b"firmware 2.0.0 " * 10_000


async def update(
    broker: MosquittoServer, device_id: str, args: dict[str, float | bool | str]
) -> Event:
    async with CommandChannel(service_mqtt(broker), client_id="test-ota") as channel:
        return await channel.send(device_id, "firmware_update", args, timeout_s=30)


@pytest.mark.parametrize("healthy", [True, False], ids=["good_boot", "failed_boot"])
async def test_a_firmware_update_reports_its_boot_or_rolls_back(
    make_mosquitto: MakeMosquitto, tmp_path: Path, healthy: bool
) -> None:
    broker = start_broker(make_mosquitto)
    device_id = DEVICE_IDS[0]
    settings = device_settings(broker, device_id, tmp_path / "device")
    old = SlotFirmware(tmp_path / "slots", "1.0.0")
    with image_server({"/fw-2.0.0.img": IMAGE}) as base, watching(broker) as watcher:
        dev = Device(settings, firmware=old)
        dev.start()
        try:
            assert await asyncio.to_thread(dev.wait_connected, 10)
            sha = hashlib.sha256(IMAGE).hexdigest()
            args = {"version": "2.0.0", "url": f"{base}/fw-2.0.0.img", "sha256": sha}
            result = await update(broker, device_id, args)
            assert (result.ok, result.code) == (True, "2.0.0")
            assert await asyncio.to_thread(old.activated.wait, 10)
        finally:
            await asyncio.to_thread(dev.stop)  # the reboot into the new slot
        assert old.calls == [("install", "2.0.0"), ("activate",)]
        assert (tmp_path / "slots" / "slot-b").read_bytes() == IMAGE
        assert list((tmp_path / "device" / "ota").iterdir()) == []

        new = SlotFirmware(tmp_path / "slots", "2.0.0", healthy=healthy)
        booted = Device(settings, firmware=new)
        booted.start()
        try:
            kind, code = ("info", "2.0.0") if healthy else ("error", "OTA_ROLLBACK")

            def outcomes() -> list[Event]:
                return [e for e in watcher.events(device_id) if (e.kind, e.code) == (kind, code)]

            await eventually(outcomes, 20, code)
        finally:
            await asyncio.to_thread(booted.stop)
        [outcome] = outcomes()
        boots = [e for e in watcher.events(device_id) if e.kind == "boot"]
    assert [(b.code, b.data["reset_reason"]) for b in boots] == [
        ("1.0.0", "power_on"),
        ("2.0.0", "firmware_update"),
    ]
    assert outcome.command_id == result.command_id
    if healthy:
        assert outcome.ok is True
        assert outcome.detail == "firmware 2.0.0 is running (was 1.0.0)"
        assert new.calls == [("boot_ok",)]
    else:
        assert outcome.ok is False
        assert outcome.detail == "firmware 2.0.0 failed its boot check; rolling back to 1.0.0"
        assert new.calls == [("boot_ok",), ("rollback", "1.0.0")]
        assert new.running == "1.0.0"


async def test_a_firmware_image_with_the_wrong_checksum_is_not_installed(
    make_mosquitto: MakeMosquitto, tmp_path: Path
) -> None:
    broker = start_broker(make_mosquitto)
    device_id = DEVICE_IDS[1]
    firmware = SlotFirmware(tmp_path / "slots", "1.0.0")
    dev = Device(device_settings(broker, device_id, tmp_path / "device"), firmware=firmware)
    with image_server({"/fw.img": IMAGE}) as base:
        dev.start()
        try:
            assert await asyncio.to_thread(dev.wait_connected, 10)
            wrong = hashlib.sha256(b"another image").hexdigest()
            url = f"{base}/fw.img"
            bad = await update(broker, device_id, {"version": "2.0.0", "url": url, "sha256": wrong})
            missing = await update(
                broker, device_id, {"version": "2.0.0", "url": f"{base}/nope", "sha256": wrong}
            )
            older = await update(broker, device_id, {"version": "0.9", "url": url, "sha256": wrong})
            no_sum = await update(broker, device_id, {"version": "2.0.0", "url": url})
        finally:
            await asyncio.to_thread(dev.stop)
    assert (bad.ok, bad.code) == (False, "OTA_CHECKSUM")
    assert bad.detail == "checksum mismatch: the image of 2.0.0 is not the one announced"
    assert (missing.ok, missing.code) == (False, "OTA_DOWNLOAD")
    assert older.ok is False
    assert older.detail == "0.9 is older than the installed 1.0.0; not installed"
    assert (no_sum.ok, no_sum.detail) == (
        False,
        "firmware_update needs the image's sha256 (64 hex digits)",
    )
    assert firmware.calls == []  # nothing installed, nothing activated
    assert list((tmp_path / "device" / "ota").iterdir()) == []


def test_a_new_firmware_that_keeps_crashing_is_rolled_back(tmp_path: Path) -> None:
    """Boots that never reach a verdict (a crash loop) count; past the limit: roll back."""
    from fixloop.server import free_port

    settings = DeviceSettings(
        "dev-001", "127.0.0.1", tmp_path, port=free_port(), max_boot_attempts=2
    )
    with DeviceStore.open(tmp_path / "device.sqlite3") as store:
        pending = {"version": "2.0.0", "previous": "1.0.0", "command_id": "c-9", "attempts": 0}
        store.put("ota", pending)

    class Crashing(SlotFirmware):
        def boot_ok(self) -> bool:
            self.calls.append(("boot_ok",))
            raise SystemExit("the new firmware dies in its self-check")

    for boot in range(2):  # two boots die before the boot check answers
        firmware = Crashing(tmp_path / "slots", "2.0.0")
        dev = Device(settings, firmware=firmware)
        with pytest.raises(SystemExit):
            dev.start()
        assert firmware.calls == [("boot_ok",)], boot
    firmware = Crashing(tmp_path / "slots", "2.0.0")
    with Device(settings, firmware=firmware):
        pass
    assert firmware.calls == [("rollback", "1.0.0")]  # no third try of the check
    with DeviceStore.open(tmp_path / "device.sqlite3") as store:
        assert store.get("ota") is None
        events = [json.loads(r.payload) for r in store.pending(0, 100)]
    rollback = [e for e in events if e.get("code") == "OTA_ROLLBACK"]
    assert len(rollback) == 1
    assert rollback[0]["command_id"] == "c-9"
    assert rollback[0]["detail"] == (
        "firmware 2.0.0 stopped 2 times before its boot check; rolling back to 1.0.0"
    )
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for event in events:  # every stored event is one the gateway takes
        decode_event("dev-001", json.dumps(event).encode(), now_ms)
