"""A minimal ``influxd`` (1.x) runner for component tests: free loopback ports, tmp dirs.

It writes a config that keeps everything inside one temporary directory, starts
``influxd -config ...``, waits for ``/ping`` to answer 204 and stops the process again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

INFLUXD = os.environ.get("FIXLOOP_INFLUXD", "/usr/bin/influxd")


def free_port() -> int:
    """Ask the kernel for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class InfluxdProcess:
    """A running ``influxd``; ``url`` is its HTTP API."""

    proc: subprocess.Popen[bytes]
    url: str
    root: Path
    log_path: Path

    def stop(self) -> None:
        """Terminate the process (kill it if it does not stop within 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the process's output, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


def write_config(root: Path, http_port: int, rpc_port: int) -> Path:
    """Write an influxd config that keeps all state under ``root``."""
    config = f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root / "meta"}"
  logging-enabled = false

[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  pprof-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[retention]
  enabled = false

[shard-precreation]
  enabled = false
"""
    path = root / "influxd.conf"
    path.write_text(config)
    return path


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=1) as resp:
            return int(resp.status) == 204
    except (urllib.error.URLError, OSError):
        return False


def start_influxd(root: Path, startup_timeout_s: float = 20.0) -> InfluxdProcess:
    """Start ``influxd`` with its state under ``root`` and wait until it answers.

    Raises:
        RuntimeError: the binary is missing or the server did not come up in time.
    """
    if shutil.which(INFLUXD) is None:
        raise RuntimeError(f"influxd binary not found at {INFLUXD}")
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        http_port, rpc_port = free_port(), free_port()
        config = write_config(root, http_port, rpc_port)
        log_path = root / f"influxd-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [INFLUXD, "-config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = InfluxdProcess(proc, f"http://127.0.0.1:{http_port}", root, log_path)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # died: most likely a port race, try fresh ports
            if _ping(server.url):
                return server
            time.sleep(0.05)
        died = proc.poll() is not None
        tail = server.log_tail()
        with contextlib.suppress(Exception):
            server.stop()
        if not died or attempt == 2:
            raise RuntimeError(f"influxd did not start:\n{tail}")
    raise RuntimeError("influxd did not start")
