"""``fixloop up`` as a demo: its servers die with it, it shrugs off a rogue client, and
every fault it injects becomes a case the printed owner can see (issue 14)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
