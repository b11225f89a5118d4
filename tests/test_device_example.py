"""The Linux appliance example on a real mosquitto, gateway and influxd, and its systemd unit."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MakeMosquitto, device_pw
from test_device_e2e import (
    eventually,
    running_gateway,
    service_mqtt,
    start_broker,
    stored,
    wait_stored,
    watching,
)

from fixloop.stack import InfluxdServer
from wire.commands import CommandChannel
from wire.protocol import decode_reading

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "device" / "examples"


def thermal_sensor() -> bool:
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            int(zone.read_text())
        except (OSError, ValueError):
            continue
        return True
    return False


async def test_the_linux_appliance_publishes_and_restarts_on_command(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    device_id = "dl-linux-appliance"
    broker = start_broker(make_mosquitto, device_id)
    busy = tmp_path / "busy"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FIXLOOP_DEVICE_ID": device_id,
        "FIXLOOP_DEVICE_HOST": broker.host,
        "FIXLOOP_DEVICE_PORT": str(broker.port),
        "FIXLOOP_DEVICE_PASSWORD": device_pw(device_id),
        "FIXLOOP_DEVICE_DATA_DIR": str(tmp_path / "state"),
        "FIXLOOP_DEVICE_MODEL": "linux-appliance",
        "APPLIANCE_INTERVAL_S": "0.2",
        "APPLIANCE_BUSY_FILE": str(busy),
    }
    telemetry = f"devices/{device_id}/telemetry"
    status = f"devices/{device_id}/status"
    with watching(broker) as watcher:
        async with running_gateway(broker, influxd, tmp_path / "spool"):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "device.examples.linux_appliance",
                cwd=tmp_path,
                env=env,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await eventually(lambda: len(watcher.on(telemetry)) >= 3, 30, "readings")
                async with CommandChannel(service_mqtt(broker), client_id="test-cmd") as channel:
                    busy.write_text("washing\n")
                    refused = await channel.send(device_id, "restart", timeout_s=20)
                    busy.unlink()
                    done = await channel.send(device_id, "restart", timeout_s=20)

                def boots() -> list[str | float | bool]:
                    return [
                        e.data["reset_reason"]
                        for e in watcher.events(device_id)
                        if e.kind == "boot"
                    ]

                await eventually(lambda: len(boots()) == 2, 30, "the second boot")
                before = len(watcher.on(telemetry))
                await eventually(lambda: len(watcher.on(telemetry)) > before, 30, "readings")
                await wait_stored(influxd, device_id, len(watcher.on(telemetry)), 30)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        _, stderr = await process.communicate()
                except TimeoutError:
                    process.kill()
                    _, stderr = await process.communicate()
            assert process.returncode == 0, stderr.decode()[-2000:]
            assert await stored(influxd, device_id) >= 4
        statuses = watcher.on(status)
    now_ms = int(time.time() * 1000)
    readings = [decode_reading(device_id, p, now_ms) for p in watcher.on(telemetry)]
    for reading in readings:
        assert reading.metrics["load_1m"] >= 0.0
        assert ("cpu_temp_c" in reading.metrics) == thermal_sensor()
        assert 0.0 < float(reading.metrics["mem_available_pct"]) <= 100.0
    seqs = [r.seq for r in readings]
    assert seqs == sorted(seqs)  # one seq across the restart, never reused
    assert len(set(seqs)) == len(seqs)
    assert (refused.ok, refused.code, refused.detail) == (
        False,
        "mid_cycle",
        "refused: a job is running; will be possible after it",
    )
    assert (done.ok, done.detail) == (True, "restarting now")
    assert boots() == ["power_on", "restart_command"]
    # online, the last will when the old process image went, online again, a clean goodbye
    assert statuses == [b"online", b"offline", b"online", b"offline"]


def test_the_systemd_unit_runs_the_example() -> None:
    unit = EXAMPLES / "fixloop-appliance.service"
    lines = [line for line in unit.read_text(encoding="utf-8").splitlines() if "=" in line]
    settings = [line.split("=", 1) for line in lines if not line.startswith("#")]
    assert ["ExecStart", "/usr/bin/python3 -m device.examples.linux_appliance"] in settings
    assert ["Restart", "always"] in settings
    assert ["StateDirectory", "fixloop-appliance"] in settings
    assert ["Environment", "FIXLOOP_DEVICE_DATA_DIR=%S/fixloop-appliance"] in settings
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_example_stays_small_and_uses_only_the_library() -> None:
    source = (EXAMPLES / "linux_appliance.py").read_text(encoding="utf-8")
    code = [
        line
        for line in source.splitlines()
        if line.strip() and not line.strip().startswith(("#", '"""'))
    ]
    assert len(code) <= 70
    imports = [line for line in code if line.startswith(("import ", "from "))]
    assert all(
        line.split()[1].split(".")[0]
        in {"__future__", "logging", "os", "signal", "sys", "threading", "pathlib", "device"}
        for line in imports
    )
