"""A Linux appliance on fixloop: CPU temperature, load, memory and uptime; restart on command.

Settings come from ``FIXLOOP_DEVICE_*`` variables (see ``DeviceSettings.from_env``);
``APPLIANCE_INTERVAL_S`` sets the reading interval (default 60) and, while the file
``APPLIANCE_BUSY_FILE`` exists (default ``/run/appliance/busy``, written by the appliance's
own control program), a restart is refused as ``mid_cycle``. ``fixloop-appliance.service``
beside this file runs it under systemd: ``python3 -m device.examples.linux_appliance``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from device import CommandResult, Device, DeviceSettings, Refusal

VERSION = "1.0.0"
BUSY_FILE = Path(os.environ.get("APPLIANCE_BUSY_FILE", "/run/appliance/busy"))


def sensors() -> dict[str, float]:
    """Read the sensors this machine has; skip the ones it lacks."""
    values = {"load_1m": os.getloadavg()[0]}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            values["cpu_temp_c"] = int(zone.read_text()) / 1000.0
            break
        except (OSError, ValueError):
            continue  # a zone without a readable sensor: try the next
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        total, available = (
            float(meminfo[meminfo.index(k) + 1]) for k in ("MemTotal:", "MemAvailable:")
        )
        values["mem_available_pct"] = 100.0 * available / total
        values["uptime_s"] = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass  # not Linux enough: load alone still makes a reading
    return values


def busy() -> Refusal | None:
    """Interlock: no restart while the appliance says it is busy."""
    if BUSY_FILE.exists():
        return Refusal("mid_cycle", "a job is running; will be possible after it")
    return None


def restart_program() -> None:
    """Start this program again in place (same pid, so systemd keeps tracking it)."""
    os.execv(sys.executable, sys.orig_argv)


def main() -> None:
    """Publish readings until SIGTERM; answer restart commands."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = Device(DeviceSettings.from_env(os.environ, firmware=VERSION))
    device.add_interlock(busy)
    device.on_command(
        "restart", lambda _: CommandResult(True, "restarting now", then=restart_program)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with device:
        while not stop.is_set():
            device.publish_reading(sensors())
            stop.wait(float(os.environ.get("APPLIANCE_INTERVAL_S", "60")))


if __name__ == "__main__":
    main()
