"""One partitioned-diagnostics worker in its own process, for the tests and the bench.

Usage: ``python tests/partition_worker.py CONFIG.json LOG``. The config holds the broker
(``host``, ``port``, ``username``, ``password``), ``influx_url``, ``lease_url`` (none: the
worker holds every partition alone), ``worker`` and the ``diagnostics`` settings. Each
handled item is appended to LOG as ``device kind ts_ms seq monotonic_ns`` (tab-separated,
written per batch so that a killed worker leaves what it handled). SIGTERM stops the
worker cleanly (checkpoints, releases its partitions); SIGKILL is a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
from pydantic import SecretStr

from diagnostics.leases import PartitionStore, PostgresPartitionStore, SoleOwnerStore
from diagnostics.partition import PartitionedDiagnostics
from diagnostics.settings import DiagnosticsSettings
from wire.influx import InfluxSettings
from wire.protocol import Event, Reading
from wire.settings import MqttSettings


def _logger(out: TextIO):  # type: ignore[no-untyped-def]
    def handled(partition: int, items: Sequence[Reading | Event]) -> None:
        now = time.monotonic_ns()
        out.write(
            "".join(
                f"{i.device_id}\t{'r' if isinstance(i, Reading) else 'e'}\t{i.ts_ms}\t"
                f"{i.seq}\t{now}\t{partition}\n"
                for i in items
            )
        )
        out.flush()

    return handled


async def main(config: dict[str, Any], log: Path) -> None:
    mqtt = MqttSettings(
        host=config["host"],
        port=config["port"],
        username=config["username"],
        password=SecretStr(config["password"]),
    )
    settings = DiagnosticsSettings(**config["diagnostics"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    store: PartitionStore
    async with contextlib.AsyncExitStack() as stack:
        if config.get("lease_url"):
            store = await stack.enter_async_context(PostgresPartitionStore(config["lease_url"]))
        else:
            store = SoleOwnerStore()
        out = stack.enter_context(log.open("a", encoding="utf-8"))
        worker = await stack.enter_async_context(
            PartitionedDiagnostics(
                mqtt,
                InfluxSettings(url=config["influx_url"]),
                settings,
                store,
                worker_id=config["worker"],
                on_handled=_logger(out),
            )
        )
        task = asyncio.create_task(worker.run())
        print("ready", flush=True)
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        print(
            f"stopped handled={worker.readings_scored} published={worker.diagnoses_published}"
            f" repeats_skipped={worker.repeats_skipped} takeovers={worker.takeovers}"
            f" checkpoint_bytes={worker.checkpoint_bytes}",
            flush=True,
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(orjson.loads(Path(sys.argv[1]).read_bytes()), Path(sys.argv[2])))
