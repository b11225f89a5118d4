"""The simulator on the device library, against a real mosquitto (and gateway and influxd).

A command sent while a simulated device reboots waits in the device's persistent session
and is answered once when the device is back; a simulated two-hour outage with a power
cut inside it, and a broker restart while the fleet runs, lose no reading: buffered in
the devices' outboxes, backfilled, stored once.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeMosquitto
from pydantic import SecretStr
from test_device_e2e import eventually, running_gateway, stored, stored_rows

from device_sim import FleetRunner, SimSettings
from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer
from wire.commands import CommandChannel
from wire.mqtt import MqttClient
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration


def service(port: int) -> MqttSettings:
    return MqttSettings(
        host="127.0.0.1", port=port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )


async def test_a_command_sent_while_a_simulated_device_reboots_runs_once_when_it_is_back(
    make_mosquitto: MakeMosquitto,
) -> None:
    sim = SimSettings(
        devices=1,
        seed=3,
        models={"fridge": 1.0},  # no wash cycle to refuse a restart
        interval_s=10.0,
        speed=10.0,  # a reboot's 30-60 s offline take 3-6 s
        start_offset_s=3600.0,  # sim time never runs ahead of real time
        id_prefix="reboot",
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    (device_id,) = FleetRunner(sim).fleet.device_ids
    broker = make_mosquitto(device_ids=(device_id,))
    runner = FleetRunner(sim.model_copy(update={"mqtt_port": broker.port}))
    device = runner.fleet.device(device_id)
    seen: list[tuple[str, bytes]] = []
    stop = asyncio.Event()
    async with MqttClient(
        broker.host,
        broker.port,
        client_id="sim-watcher",
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
    ) as watcher:
        await watcher.subscribe(f"devices/{device_id}/#", qos=1)

        async def watch() -> None:
            async for message in watcher.messages():
                seen.append((message.topic.rsplit("/", 1)[1], message.payload))
                watcher.ack(message)

        watching = asyncio.create_task(watch())
        try:
            async with runner:
                run = asyncio.create_task(runner.run(stop))
                async with CommandChannel(service(broker.port), client_id="cmds") as commands:
                    first = await commands.send(device_id, "restart", timeout_s=10)
                    assert first.ok is True
                    await eventually(lambda: ("status", b"offline") in seen, 10, "the will")
                    assert not device.connected  # rebooting: its connection is gone
                    second = await commands.send(device_id, "selftest", timeout_s=30)
                assert second.ok is True
                stop.set()
                report = await run
        finally:
            watching.cancel()
    channels = [channel for channel, _ in seen]
    asked = channels.index("commands", channels.index("commands") + 1)  # the self-test
    statuses = [(i, p) for i, (c, p) in enumerate(seen) if c == "status"]
    last_before = [p for i, p in statuses if i < asked][-1]
    assert last_before == b"offline"  # it reached the broker while the device was down
    events = [orjson.loads(p) for c, p in seen if c == "events"]
    answers = [e for e in events if e.get("command_id") == second.command_id]
    assert [e["type"] for e in answers] == ["selftest", "command_result"]  # once
    boots = [e for e in events if e["type"] == "boot"]
    assert [b["data"]["reset_reason"] for b in boots] == ["power_on", "restart_command"]
    assert (device.core.commands, device.core.duplicates) == (2, 0)
    assert report.commands_received == 2
    assert report.connects == 2  # one session, resumed after the reboot


async def test_a_power_cut_while_offline_and_a_broker_restart_lose_no_reading(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    sim = SimSettings(
        devices=2,
        seed=11,
        models={"fridge": 1.0},
        interval_s=10.0,
        speed=720.0,  # two hours of device time in ten seconds
        start_offset_s=3 * 3600.0,
        duration_s=2.5 * 3600.0,
        id_prefix="powercut",
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    ids = FleetRunner(sim).fleet.device_ids
    broker = make_mosquitto(device_ids=tuple(ids))
    runner = FleetRunner(sim.model_copy(update={"mqtt_port": broker.port}), reconnect=True)
    fleet = runner.fleet
    cut = ids[0]  # the other one stays connected, but for the broker's restart
    start = fleet.now
    # two hours without network, and inside them half an hour without power
    fleet.schedule_outage(cut, at=start + timedelta(minutes=10), duration=timedelta(hours=2))
    fleet.schedule_power_cut(cut, at=start + timedelta(minutes=40), duration=1800)
    async with running_gateway(broker, influxd, tmp_path / "spool"):
        async with runner:
            run = asyncio.create_task(runner.run())
            # the broker restarts while the power is off
            await eventually(
                lambda: fleet.now >= start + timedelta(minutes=50), 30, "sim time to pass"
            )
            assert fleet.device(cut).buffered > 0
            assert not fleet.device(cut).running
            broker.stop()
            down_at = fleet.now
            await eventually(  # the steady one buffers while the broker is away
                lambda: fleet.now >= down_at + timedelta(minutes=12), 30, "sim time to pass"
            )
            broker.start()
            report = await run
        taken = {i: fleet.device(i).readings_taken for i in ids}
        for device_id in ids:
            await eventually_stored(influxd, device_id, taken[device_id])
        rows = {i: await stored_rows(influxd, i, "seq") for i in ids}
    assert runner.reconnects >= 1  # the connected one lost the broker and came back
    assert (report.buffered_at_end, report.dropped) == (0, 0)
    for device_id in ids:
        seqs = [row[1] for row in rows[device_id]]
        assert len(seqs) == len(set(seqs)) == taken[device_id]  # stored once each
        assert report.readings_per_device[device_id] >= taken[device_id]
    ts = sorted(row[0] for row in rows[cut])
    assert max(b - a for a, b in itertools.pairwise(ts)) >= 1_800_000  # the power cut


async def eventually_stored(influx: InfluxdServer, device_id: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while (n := await stored(influx, device_id)) != count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{device_id}: {n} readings stored, {count} taken")
        await asyncio.sleep(0.2)
