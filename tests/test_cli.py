"""The ``fixloop`` command as a user runs it: ``up`` starts everything and Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FLEET_SECRET, MakeMosquitto
from pydantic import SecretStr

from device_sim import DEFAULT_FIRMWARE, FleetRunner, SimSettings
from fixloop.stack import InfluxdServer, MosquittoServer

pytestmark = pytest.mark.integration


def fixloop(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fixloop", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def count_telemetry(influx_url: str) -> int:
    port = int(influx_url.rsplit(":", 1)[1])
    server = InfluxdServer(Path("/nonexistent"), port=port)  # a client of a running one
    answer = server.query("SELECT COUNT(seq) FROM telemetry", database="fixloop")
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def running_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if marker in line and "ps -eo" not in line]


def start_up(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = fixloop("up", "--data-dir", str(data_dir), "--devices", "6")
    assert proc.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        banner.append(line)
        if line.startswith("Press Ctrl-C"):
            break
        assert time.monotonic() < deadline, "".join(banner)
    text = "".join(banner)
    assert "fixloop is up" in text, text
    assert "6 simulated devices" in text
    match = re.search(r"InfluxDB  (http://127\.0\.0\.1:\d+)", text)
    assert match, text
    return proc, match.group(1)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_up_runs_the_stack_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    proc, influx_url = start_up(data_dir)
    try:
        deadline = time.monotonic() + 60
        while (first := count_telemetry(influx_url)) < 500:
            assert time.monotonic() < deadline, f"only {first} points after 60 s"
            time.sleep(0.5)
    finally:
        log = stop(proc)
    assert "fixloop stopped" in log
    assert running_processes(str(data_dir)) == [], "a server outlived fixloop up"
    secret = (data_dir / "fleet_secret").read_text()

    # A second run keeps the data, the fleet secret and the broker's session.
    proc, influx_url = start_up(data_dir)
    try:
        assert count_telemetry(influx_url) >= first
    finally:
        log = stop(proc)
    assert (data_dir / "fleet_secret").read_text() == secret
    assert "session resumed: True" in log


def test_a_wrong_setting_is_one_clear_line() -> None:
    proc = fixloop("up", env={"FIXLOOP_SIM__DEVICES": "0"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fixloop: error: setting sim.devices:")
    assert "FIXLOOP_SIM__DEVICES" in lines[0]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("up", "--for", "-1"), "--for"),
        (("up", "--for", "nan"), "--for"),
        (("up", "--speed", "fast"), "--speed"),
        (("up", "--speed", "0"), "--speed"),
        (("up", "--devices", "0"), "--devices"),
        (("sim", "--duration", "-5"), "--duration"),
    ],
)
def test_a_bad_flag_is_named_not_blamed_on_a_setting(args: tuple[str, ...], names: str) -> None:
    proc = fixloop(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"argument {names}:" in err
    assert "FIXLOOP_" not in err


def test_an_unknown_setting_is_refused() -> None:
    proc = fixloop("gateway", env={"FIXLOOP_GATEWAY__BATCH_SIZE": "10"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "gateway.batch_size" in err


def test_only_a_gateway_instance_of_a_shared_group_can_retire() -> None:
    proc = fixloop("gateway", "--retire", env={"FIXLOOP_GATEWAY__INSTANCE": "gw-1"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "gateway --retire needs gateway.shared_group and gateway.instance" in err


def test_sim_runs_a_fleet_against_any_broker(make_mosquitto: MakeMosquitto, tmp_path: Path) -> None:
    settings = SimSettings(
        devices=4, fault_rate_per_device_month=100.0, fleet_secret=SecretStr(FLEET_SECRET)
    )
    broker = make_mosquitto(device_ids=FleetRunner(settings).fleet.device_ids)
    truth = tmp_path / "faults.csv"
    proc = fixloop(
        "sim",
        "--devices",
        "4",
        "--speed",
        "max",
        "--duration",
        "86400",
        "--ground-truth",
        str(truth),
        env={
            "FIXLOOP_SIM__FLEET_SECRET": FLEET_SECRET,
            "FIXLOOP_SIM__MQTT_PORT": str(broker.port),
            "FIXLOOP_SIM__FAULT_RATE_PER_DEVICE_MONTH": "100",
        },
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    match = re.search(r"fleet stopped: 4 devices, (\d+) readings", err)
    assert match, err[-3000:]
    assert int(match.group(1)) >= 4 * 8_000  # a day at one reading per 10 s, less reboots
    rows = truth.read_text().splitlines()
    assert rows[0].startswith("device_id,")
    assert len(rows) > 1, "a fault rate of 100 a month gives faults within a day"


def test_sim_without_a_fleet_secret_says_so(mosquitto: MosquittoServer) -> None:
    proc = fixloop("sim", env={"FIXLOOP_SIM__MQTT_PORT": str(mosquitto.port)})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "sim.fleet_secret" in err.strip().splitlines()[-1]


def test_one_stack_per_data_folder(tmp_path: Path) -> None:
    from fixloop.datafolder import _folder_lock
    from wire.errors import ConfigError

    busy = pytest.raises(ConfigError, match=r"another fixloop up is running .* \(pid \d+\)")
    with _folder_lock(tmp_path), busy, _folder_lock(tmp_path):
        pass
    with _folder_lock(tmp_path):  # released with its holder
        pass


def test_the_local_stack_keeps_its_ports_across_restarts(tmp_path: Path) -> None:
    import socket

    from fixloop.datafolder import _ports

    first = _ports(tmp_path, {"mqtt": 0, "influx": 0, "api": 8123})
    assert first["api"] == 8123
    assert len(set(first.values())) == 3
    assert _ports(tmp_path, {"mqtt": 0, "influx": 0, "api": 8123}) == first
    with socket.socket() as squatter:  # something else took the broker's port meanwhile
        squatter.bind(("127.0.0.1", first["mqtt"]))
        squatter.listen()
        again = _ports(tmp_path, {"mqtt": 0, "influx": 0, "api": 8123})
    assert again["mqtt"] != first["mqtt"]
    assert again["influx"] == first["influx"]


def test_the_local_stack_chooses_ports_no_outgoing_connection_can_hold(tmp_path: Path) -> None:
    """A port in the ephemeral range may be held by a client's connection when the server binds."""
    import json

    from fixloop.datafolder import _ports
    from fixloop.server import ephemeral_range, free_port

    low, high = ephemeral_range()
    old = free_port()  # what an older release remembered: inside the range
    assert low <= old <= high
    (tmp_path / "ports.json").write_text(json.dumps({"mqtt": old}))
    chosen = _ports(tmp_path, {"mqtt": 0, "influx": 0, "dashboard": 0})
    assert chosen["mqtt"] != old
    assert all(0 < port < low for port in chosen.values()), chosen
    assert len(set(chosen.values())) == 3
    assert _ports(tmp_path, {"mqtt": 0, "influx": 0, "dashboard": 0}) == chosen


def test_a_restart_replays_only_the_gap_since_the_last_run(tmp_path: Path) -> None:
    import time as clock

    from fixloop.datafolder import _DEMO_HISTORY_S, _history_to_replay

    assert _history_to_replay(tmp_path) == _DEMO_HISTORY_S  # a new folder: 6 hours
    (tmp_path / "sim_clock").write_text(f"{clock.time() - 600:.3f}\n")
    assert 599 <= _history_to_replay(tmp_path) <= 700
    (tmp_path / "sim_clock").write_text(f"{clock.time() - 10 * 86_400:.3f}\n")
    assert _history_to_replay(tmp_path) == _DEMO_HISTORY_S  # long away: the usual 6 hours
    (tmp_path / "sim_clock").write_text("garbage\n")
    assert _history_to_replay(tmp_path) == _DEMO_HISTORY_S


async def test_the_demo_gives_its_first_fault_to_the_owner_the_banner_shows() -> None:
    import asyncio

    from fixloop.demo import demo_faults

    runner = FleetRunner(SimSettings(devices=12, fleet_secret=SecretStr(FLEET_SECRET)))
    ids = runner.fleet.device_ids
    for seed in range(5):
        shown = [ids[7], ids[8]]
        task = asyncio.create_task(demo_faults(runner, every_s=0.001, seed=seed, first_for=shown))
        while not runner.fleet.ground_truth():  # noqa: ASYNC110 - the fleet has no event
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.fleet.ground_truth()[0].device_id in shown
        runner = FleetRunner(SimSettings(devices=12, fleet_secret=SecretStr(FLEET_SECRET)))


def test_the_demos_devices_are_in_the_registry(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"

    def listed() -> list[dict[str, object]]:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "fixloop", "devices", "list"),
                *("--json", "--data-dir", str(data_dir)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    for _ in range(2):  # a second run registers nothing twice
        proc, _influx = start_up(data_dir)
        stop(proc)
        devices = listed()
        assert len(devices) == 6, devices
    wanted = {d.device_id: str(d.model) for d in FleetRunner(SimSettings(devices=6)).fleet.devices}
    assert {str(d["device_id"]): d["model"] for d in devices} == wanted
    for device in devices:
        assert device["serial"] == device["device_id"]
        assert device["region"] == "default"
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", str(device["firmware"])), device
        assert device["state"] == "claimed"
        assert str(device["owner_id"]).startswith("owner-")
        assert re.fullmatch(r"B0[1-4]", str(device["batch"]))
    # what they left the factory with (a remote firmware update may have moved one on)
    assert DEFAULT_FIRMWARE in {device["firmware"] for device in devices}
