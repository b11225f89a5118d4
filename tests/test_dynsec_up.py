"""``fixloop up`` with ``broker.accounts = "dynsec"``: accounts issued and revoked while
the demo runs, kept across its restarts."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wire.errors import BrokerUnavailableError, ConfigError
from wire.mqtt import MqttClient

pytestmark = pytest.mark.integration

WAIT_S = 10.0


def _env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FIXLOOP_BROKER__ACCOUNTS": "dynsec",
        "FIXLOOP_STACK__DATA_DIR": str(data_dir),
    }


def _up(data_dir: Path, devices: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fixloop", "up", "--devices", str(devices)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(data_dir),
    )


def _banner(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            break
        assert time.monotonic() < deadline, "".join(lines)
    text = "".join(lines)
    if "fixloop is up" not in text:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(text + err[-3000:])
    return text


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return err


def _credentials(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fixloop", "devices", "credentials", *args],
        capture_output=True,
        text=True,
        env=_env(data_dir),
        timeout=60,
        check=False,
    )


def _accounts(data_dir: Path) -> dict[str, str]:
    listed = _credentials(data_dir, "list")
    assert listed.returncode == 0, listed.stderr
    return dict(line.split("\t") for line in listed.stdout.splitlines())


async def _device_session(port: int, device_id: str, password: str) -> MqttClient:
    client = MqttClient(
        "127.0.0.1",
        port,
        client_id=f"{device_id}-test",
        username=device_id,
        password=password,
        connect_timeout_s=WAIT_S,
        publish_timeout_s=WAIT_S,
    )
    await client.connect()
    await client.publish(f"devices/{device_id}/telemetry", b"{}", qos=1)
    return client


async def _revoked_while_connected(data_dir: Path, port: int, password: str) -> None:
    device = await _device_session(port, "oven-1", password)
    try:
        revoke = await asyncio.to_thread(_credentials, data_dir, "revoke", "oven-1")
        assert revoke.returncode == 0, revoke.stderr
        with pytest.raises(BrokerUnavailableError, match="0x98"):
            async with asyncio.timeout(WAIT_S):
                await device.wait_messages()
    finally:
        await device.disconnect()
    with pytest.raises(ConfigError):
        await _device_session(port, "oven-1", password)


def test_up_issues_and_revokes_device_accounts_without_a_broker_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    proc = _up(data_dir, 2)
    try:
        banner = _banner(proc)
        assert "accounts in the dynamic-security plugin" in banner
        found = re.search(r"mqtt://127\.0\.0\.1:(\d+)", banner)
        assert found is not None
        port = int(found.group(1))
        pid = (data_dir / "mosquitto" / "mosquitto.pid").read_text().strip()
        simulated = _accounts(data_dir)
        assert len(simulated) == 2
        assert set(simulated.values()) == {"enabled"}

        issued = _credentials(data_dir, "issue", "oven-1")
        assert issued.returncode == 0, issued.stderr
        password = issued.stdout.strip()
        asyncio.run(_revoked_while_connected(data_dir, port, password))
        assert (data_dir / "mosquitto" / "mosquitto.pid").read_text().strip() == pid
        assert proc.poll() is None  # the demo runs on
    finally:
        if proc.poll() is None:
            _stop(proc)

    # the next run keeps what was issued and revoked, and adds the new devices
    again = _up(data_dir, 3)
    try:
        _banner(again)
        accounts = _accounts(data_dir)
    finally:
        _stop(again)
    assert accounts["oven-1"] == "revoked"
    enabled = {name for name, state in accounts.items() if state == "enabled"}
    assert set(simulated) < enabled
    assert len(enabled) == 3
