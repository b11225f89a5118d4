"""The local stack's data folder (``fixloop up``): held by one process, its state kept.

One ``fixloop up`` at a time holds the folder (a lock the kernel releases if the process
is killed); the ports it used are remembered (``ports.json``) so addresses stay the same
across restarts; and the simulated clock of the last run (``sim_clock``) says how much
history the fleet replays on the next start, so a restart never lays a second series
over the readings already stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from fixloop.server import ephemeral_range, lasting_port, port_free
from wire.errors import ConfigError

__all__: list[str] = []


_DEMO_HISTORY_S: Final = 6 * 3600.0


_SIM_CLOCK_FILE: Final = "sim_clock"


def _history_to_replay(data_dir: Path) -> float:
    """How far before now the simulated fleet starts: 6 hours, or the gap since last time.

    A data folder that already holds history continues it: the fleet replays only the
    time since the simulated clock of the last run (``sim_clock``, kept every few
    seconds), so a restart never lays a second series over the readings already stored.
    """
    try:
        last = float((data_dir / _SIM_CLOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return _DEMO_HISTORY_S
    gap = time.time() - last
    return min(_DEMO_HISTORY_S, max(0.0, gap))


@contextlib.contextmanager
def _folder_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data folder for this process (released by the kernel if it is killed).

    Raises:
        ConfigError: another live `fixloop up` holds it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "fixloop.lock"
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ConfigError(
                f"another fixloop up is running on {data_dir} (pid {holder}): stop it first, "
                "or give this one its own --data-dir"
            ) from exc
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ports(data_dir: Path, wanted: dict[str, int]) -> dict[str, int]:
    """The local stack's ports: as set, else the ones this folder used last, if free.

    Stable addresses across restarts, so that a saved dashboard link or a
    ``fixloop train`` against the demo's InfluxDB keeps working; a port now taken by
    something else is replaced by a free one (and remembered). Chosen ports lie below
    the kernel's ephemeral range, which no outgoing connection takes its port from.

    Args:
        data_dir: the stack's data folder (``ports.json`` is kept there).
        wanted: name -> port from the settings (0: not set).
    """
    path = data_dir / "ports.json"
    try:
        last = json.loads(path.read_text())
    except (OSError, ValueError):
        last = {}
    chosen: dict[str, int] = {}
    low, high = ephemeral_range()
    for name, port in wanted.items():
        if port:
            chosen[name] = port
            continue
        stored = last.get(name) if isinstance(last, dict) else None
        before = stored if isinstance(stored, int) else 0
        taken = frozenset(chosen.values())
        # A port in the ephemeral range (kept by an older release) is given up: an
        # outgoing connection may hold it when the server binds.
        lasting = 0 < before < 65536 and not low <= before <= high
        if lasting and before not in taken and port_free(before):
            chosen[name] = before
            continue
        chosen[name] = lasting_port(taken=taken)
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen
