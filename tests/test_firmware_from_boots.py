"""The registry learns a device's firmware from its boot events.

A real mosquitto and influxd, the notifier service on a SQLite case store: a device
publishes boot events on its own topic, and the registry (and the claimed device's
record, which the dashboard and the owner API read) follow the version it names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from conftest import FLEET_SECRET, MakeMosquitto, device_pw

from fixloop.stack import InfluxdServer
from notifier.model import DeviceRecord, Owner
from notifier.registry import NewDevice, ProductLine, claim_key
from notifier.service import NotifierService
from notifier.settings import NotifierSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import Event, encode_event
from wire.settings import MqttSettings

NOTIFIER_PW = "notifier-firmware-pw"
NOW = datetime.now(UTC)
WAIT_S = 20.0


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the registry did not follow the boot event")


async def test_boot_events_update_the_registered_firmware(
    tmp_path: Path, make_mosquitto: MakeMosquitto, influxd: InfluxdServer
) -> None:
    broker = make_mosquitto(users={"fixloop-notifier": NOTIFIER_PW})
    registry_device, claimed, unknown = "dev-001", "dev-002", "dev-003"
    async with SqliteStore(tmp_path / "cases.sqlite3") as store:
        registry = store.registry()
        await registry.put_product_line(ProductLine("washer", "Washer", NOW))
        outcomes = await registry.register(
            [
                NewDevice(registry_device, "washer", "W-1", firmware="1.0.0"),
                NewDevice(claimed, "washer", "W-2", firmware="1.0.0"),
            ],
            key=claim_key(FLEET_SECRET),
            now=NOW,
            actor="test",
        )
        assert all(o.ok for o in outcomes)
        await store.put_owner(Owner("own-1", "Ada"))
        await store.put_device(DeviceRecord(claimed, "own-1", "washer", firmware="1.0.0"))
        mqtt = MqttSettings(
            host=broker.host, port=broker.port, username="fixloop-notifier", password=NOTIFIER_PW
        )
        settings = NotifierSettings(api_port=0, client_id="notifier-firmware-test")
        influx = InfluxSettings(url=influxd.url, database="fixloop")
        async with NotifierService(mqtt, influx, settings, store=store) as notifier:
            run = asyncio.create_task(notifier.run())
            seq = 0

            async def boot(device_id: str, firmware: str, *, as_data: bool = False) -> None:
                nonlocal seq
                seq += 1
                event = Event(
                    device_id,
                    seq,
                    int(time.time() * 1000),
                    "boot",
                    code=None if as_data else firmware,
                    data={"firmware": firmware} if as_data else {},
                )
                async with MqttClient(
                    broker.host,
                    broker.port,
                    client_id=device_id,
                    username=device_id,
                    password=device_pw(device_id),
                ) as device:
                    await device.publish(f"devices/{device_id}/events", encode_event(event), qos=1)

            async def firmware_of(device_id: str) -> str | None:
                found = await registry.get(device_id)
                return None if found is None else found.firmware

            try:
                await boot(registry_device, "2.1.0")
                await _until(lambda: _is(firmware_of(registry_device), "2.1.0"))
                await boot(claimed, "2.1.0+hotfix", as_data=True)
                await _until(lambda: _is(firmware_of(claimed), "2.1.0+hotfix"))
                record = await store.get_device(claimed)
                assert record is not None
                assert record.firmware == "2.1.0+hotfix"  # what the dashboard shows
                # a device the registry does not know changes nothing, nor does the
                # same version again
                await boot(unknown, "9.9.9")
                await boot(registry_device, "2.1.0")
                await boot(registry_device, "2.2.0")
                await _until(lambda: _is(firmware_of(registry_device), "2.2.0"))
                assert await registry.get(unknown) is None
                assert notifier.firmware_noted == 3
                assert (await store.get_device(registry_device)) is None
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)


async def _is(value: Awaitable[str | None], expected: str) -> bool:
    return await value == expected
