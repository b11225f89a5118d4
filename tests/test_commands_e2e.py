"""Command downlink on a real broker: the gateway's API reaches a simulated device."""

from __future__ import annotations

import asyncio

import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeMosquitto
from pydantic import SecretStr

from device_sim import FleetRunner, SimSettings
from fixloop.broker import GATEWAY_USER
from wire.commands import CommandChannel, CommandTimeoutError
from wire.protocol import CommandAction, Event
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration


async def send_when_back(
    commands: CommandChannel, device_id: str, action: CommandAction, version: str = ""
) -> Event:
    """Send a command, retrying while the device is still rebooting (offline)."""
    args = {"version": version} if version else {}
    for _ in range(20):
        try:
            return await commands.send(device_id, action, args, timeout_s=1.0)
        except CommandTimeoutError:
            continue
    raise AssertionError(f"{device_id} never answered {action}")


async def test_commands_change_the_simulated_device(make_mosquitto: MakeMosquitto) -> None:
    sim = SimSettings(
        devices=3,
        seed=3,
        models={"fridge": 1.0},  # no wash cycle to refuse a restart
        interval_s=10.0,
        # An hour of history at 600x: a restart's minute offline passes in a blink.
        speed=600.0,
        start_offset_s=3_600.0,
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    device_ids = FleetRunner(sim).fleet.device_ids
    broker = make_mosquitto(device_ids=device_ids)
    sim = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    target = device_ids[0]
    stop = asyncio.Event()
    runner = FleetRunner(sim)
    fleet = runner.fleet
    fleet.inject(target, "firmware_bug")
    fleet.inject(device_ids[1], "refrigerant_leak", duration_to_failure=86_400.0)
    async with runner:
        run = asyncio.create_task(runner.run(stop))
        try:
            async with CommandChannel(mqtt, client_id="test-commands") as commands:
                # A restart does not cure a firmware bug ...
                result = await commands.send(target, "restart", timeout_s=10)
                assert result.ok is True
                assert result.device_id == target
                assert "firmware_bug" in fleet.device(target).active_faults
                # ... a firmware update does.
                old = fleet.device(target).firmware
                result = await send_when_back(commands, target, "firmware_update", "9.0.0")
                assert result.ok is True, result.detail
                assert fleet.device(target).firmware != old
                assert "firmware_bug" not in fleet.device(target).active_faults
                # No remote command mends a leaking refrigerant circuit.
                result = await commands.send(device_ids[1], "restart", timeout_s=10)
                assert "refrigerant_leak" in fleet.device(device_ids[1]).active_faults
                # The self-test tells what the device can see of itself.
                result = await send_when_back(commands, device_ids[1], "selftest")
                assert result.kind == "command_result"
                # A device that is not there does not answer: a clear timeout.
                with pytest.raises(CommandTimeoutError, match="did not answer"):
                    await commands.send("sim-fridge-99999", "restart", timeout_s=0.5)
        finally:
            stop.set()
            await run
