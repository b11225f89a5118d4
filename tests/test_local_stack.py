"""``fixloop up`` as a demo: its servers die with it, it shrugs off a rogue client, and
every fault it injects becomes a case the printed owner can see."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeMosquitto, device_pw

pytestmark = pytest.mark.integration


def up(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fixloop", "up", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def banner_of(proc: subprocess.Popen[str], timeout_s: float = 90.0) -> str:
    """Read stdout up to the end of the banner."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
        assert time.monotonic() < deadline, "".join(lines)
    text = "".join(lines)
    assert "fixloop is up" in text, text + (proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
    return text


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def server_pid(data_dir: Path, name: str) -> int:
    folder = "mosquitto" if name == "mosquitto" else "influxdb"
    return int((data_dir / folder / f"{name}.pid").read_text().strip())


def alive_in(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` runs and is a server of ``data_dir`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return str(data_dir).encode() in cmdline and state != "Z"


def servers_of(data_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [
        line
        for line in out.stdout.splitlines()
        if str(data_dir) in line and ("mosquitto" in line or "influxd" in line)
    ]


def test_kill_9_of_up_takes_its_servers_along_and_the_next_up_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    proc = up(data_dir, "--devices", "2")
    try:
        banner = banner_of(proc)
        pids = [server_pid(data_dir, name) for name in ("mosquitto", "influxd")]
        assert all(alive_in(pid, data_dir) for pid in pids), servers_of(data_dir)
    finally:
        proc.kill()  # kill -9: no shutdown code of ours runs
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while [pid for pid in pids if alive_in(pid, data_dir)]:
        assert time.monotonic() < deadline, f"orphaned servers: {servers_of(data_dir)}"
        time.sleep(0.1)
    assert servers_of(data_dir) == []

    again = up(data_dir, "--devices", "2")
    try:
        second = banner_of(again)
    finally:
        log = stop(again)
    assert "left behind" not in log  # nothing was left to stop
    broker = re.search(r"mqtt://127\.0\.0\.1:\d+", banner)
    assert broker is not None
    assert broker.group(0) in second  # same folder, same ports
    assert servers_of(data_dir) == []


def count_telemetry(influx_url: str) -> int:
    from fixloop.stack import InfluxdServer

    port = int(influx_url.rsplit(":", 1)[1])
    server = InfluxdServer(Path("/nonexistent"), port=port)  # a client of a running one
    answer = server.query("SELECT COUNT(seq) FROM telemetry", database="fixloop")
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def wait_for_more(influx_url: str, than: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (now := count_telemetry(influx_url)) <= than:
        assert time.monotonic() < deadline, f"no new telemetry beyond {than} in {timeout_s} s"
        time.sleep(0.5)
    return now


def test_a_rogue_client_with_a_taken_id_does_not_stop_the_stack(tmp_path: Path) -> None:
    from device_sim import FleetRunner, SimSettings
    from fixloop.stackaccounts import stack_client_ids
    from wire.protocol.credentials import device_password

    data_dir = tmp_path / "stack"
    proc = up(data_dir, "--devices", "4")
    try:
        banner = banner_of(proc)
        port = re.search(r"mqtt://127\.0\.0\.1:(\d+)", banner)
        influx = re.search(r"InfluxDB  (http://127\.0\.0\.1:\d+)", banner)
        assert port is not None, banner
        assert influx is not None, banner
        secret = (data_dir / "fleet_secret").read_text().strip()
        parts = stack_client_ids(secret)
        devices = FleetRunner(SimSettings(devices=4)).fleet.device_ids
        rogue_user = devices[1]  # valid credentials of one device ...

        def rogue(client_id: str) -> None:
            # ... and a client id taken by the stack: the broker closes the older
            # connection and lets this one in, for two seconds
            done = subprocess.run(
                [
                    "mosquitto_sub",
                    *("-V", "mqttv5", "-h", "127.0.0.1", "-p", port.group(1)),
                    *("-i", client_id, "-u", rogue_user, "-P", device_password(secret, rogue_user)),
                    *("-t", f"devices/{rogue_user}/commands", "-W", "2"),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode in (0, 27), done.stderr  # 27: -W ran out
            assert "rror" not in done.stderr, done.stderr

        stored = wait_for_more(influx.group(1), 0)
        for client_id in (devices[0], parts["gateway"], parts["diagnostics"], parts["notifier"]):
            rogue(client_id)
            assert proc.poll() is None, "the stack went down"
            stored = wait_for_more(influx.group(1), stored)
    finally:
        log = stop(proc)
    for part in ("gateway", "diagnostics", "notifier"):
        assert f"{parts[part]} lost its broker connection" in log, log[-3000:]
    assert f"sim device {devices[0]} lost its broker connection" in log, log[-3000:]
    assert f"sim device {devices[0]} reconnected" in log
    assert "another client connected with the same client id" in log
    # the rogue reconnects when pushed off in turn; each side backs off, and it gives up
    assert log.count("lost its broker connection") <= 4 * 4, log[-3000:]


async def test_a_command_channel_and_a_device_pushed_off_the_broker_come_back(
    make_mosquitto: MakeMosquitto,
) -> None:
    import asyncio

    from pydantic import SecretStr

    from device_sim import FleetRunner, SimSettings
    from fixloop.broker import GATEWAY_USER
    from wire.commands import CommandChannel, CommandTimeoutError
    from wire.errors import BrokerUnavailableError
    from wire.mqtt import MqttClient
    from wire.protocol import Event
    from wire.settings import MqttSettings

    sim = SimSettings(
        devices=2,
        models={"fridge": 1.0},  # no wash cycle to refuse a restart
        speed=600.0,
        start_offset_s=3_600.0,
        fleet_secret=SecretStr(FLEET_SECRET),
    )
    ids = FleetRunner(sim).fleet.device_ids
    broker = make_mosquitto(device_ids=ids)
    sim = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )

    async def take_over(client_id: str) -> None:
        rogue = MqttClient(
            broker.host,
            broker.port,
            client_id=client_id,
            username=ids[1],
            password=device_pw(ids[1]),
        )
        async with rogue:
            await rogue.ping(timeout_s=5)  # the broker has handled our CONNECT

    async def restart(commands: CommandChannel) -> Event:
        for _ in range(100):
            try:
                return await commands.send(ids[0], "restart", timeout_s=1.0)
            except (CommandTimeoutError, BrokerUnavailableError):
                await asyncio.sleep(0.1)
        raise AssertionError("the command channel never came back")

    runner = FleetRunner(sim, reconnect=True)
    stop = asyncio.Event()
    async with runner:
        run = asyncio.create_task(runner.run(stop))
        try:
            async with CommandChannel(mqtt, client_id="test-commands") as commands:
                connects = runner.report().connects
                assert (await restart(commands)).ok is not None
                for _ in range(100):  # back from the restart, on its resumed session
                    if runner.report().connects > connects and runner.connected(ids[0]):
                        break
                    await asyncio.sleep(0.05)
                await take_over(ids[0])  # the device ...
                await take_over("test-commands")  # ... and the channel
                answer = await restart(commands)
                assert answer.device_id == ids[0]
                assert runner.reconnects >= 1
                assert not run.done()
        finally:
            stop.set()
            await run


def test_every_fault_the_demo_injects_is_a_case_and_the_banner_owner_sees_the_first(
    tmp_path: Path,
) -> None:
    import json
    import sqlite3
    import threading
    import urllib.request

    data_dir = tmp_path / "stack"
    proc = up(data_dir, "--devices", "6", env={"FIXLOOP_STACK__DEMO_FAULT_EVERY_S": "1"})
    log: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    reader.start()

    def injected() -> list[tuple[str, str]]:
        found = (re.search(r"demo: (\w+) on (\S+) from", line) for line in list(log))
        return [(m.group(2), m.group(1)) for m in found if m]

    def cases() -> set[tuple[str, str]]:
        db = sqlite3.connect(f"file:{data_dir / 'cases.sqlite3'}?mode=ro", uri=True)
        try:
            return set(db.execute("SELECT device_id, fault FROM cases").fetchall())
        finally:
            db.close()

    try:
        banner = banner_of(proc)
        api = re.search(r"Bearer (\w+)' (http://\S+/api/v1)/cases", banner)
        assert api is not None, banner
        deadline = time.monotonic() + 120
        # the faults planned into the replayed history, and three given to the live fleet
        while len(faults := injected()) < 6:
            assert time.monotonic() < deadline, "".join(log[-30:])
            time.sleep(0.2)
        assert {fault for _, fault in faults[:3]} == {
            "crash_loop",
            "firmware_bug",
            "controller_hang",
        }
        deadline = time.monotonic() + 60
        while missing := set(faults) - cases():
            assert time.monotonic() < deadline, f"no case for {missing}: {''.join(log[-30:])}"
            time.sleep(0.5)

        # the token the banner prints is the first faulty device's owner's: its case shows
        first_device = faults[0][0]
        request = urllib.request.Request(
            f"{api.group(2)}/cases", headers={"Authorization": f"Bearer {api.group(1)}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = json.loads(answer.read())
        shown = body["cases"] if isinstance(body, dict) else body
        assert first_device in {case["device_id"] for case in shown}, body
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0, "".join(log[-30:])


async def test_a_stage_that_crashes_stops_the_whole_stack_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from device_sim import SimSettings
    from fixloop import local
    from fixloop.settings import Settings, StackSettings

    running = asyncio.Event()

    async def crashing_clock(data_dir: Path, runner: object) -> None:
        running.set()  # the fleet runs: every stage is up
        raise LookupError("the sim clock broke")

    monkeypatch.setattr(local, "_keep_sim_clock", crashing_clock)
    data_dir = tmp_path / "stack"
    settings = Settings(
        stack=StackSettings(data_dir=data_dir, demo_fault_every_s=0),
        sim=SimSettings(devices=3),
    )
    stop = asyncio.Event()  # never set: only the crash can end the stack
    async with asyncio.timeout(120):
        with pytest.raises(LookupError, match="the sim clock broke"):
            await local.run_local_stack(settings, stop)
    assert running.is_set()
    assert not stop.is_set()
    assert servers_of(data_dir) == []  # every step undone: broker and influxd stopped
