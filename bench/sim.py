"""Simulator benchmark: a simulated fleet on the device library, stepped alone and through a broker.

Part ``step``: a fleet of ``--devices`` steps ``--seconds`` of sim time with no broker (the
pure ``Fleet``: every reading built, checked and encoded by the device library, kept in
its outbox and published into a list); prints device readings per CPU second, best of
three.

Part ``broker``: the same fleet size replays ``--seconds`` of sim time at ``speed max``
through a private mosquitto (``FleetRunner``: one MQTT connection per device, each
message leaving the device's outbox on its PUBACK); prints the time to connect every
device and the readings per wall second.

Usage::

    python bench/sim.py                       # both parts, 3,000 devices, 600 sim s
    python bench/sim.py --part step --devices 2000 --seconds 300
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_sim import Fleet, FleetRunner, SimSettings
from fixloop.broker import GATEWAY_USER
from fixloop.stack import MosquittoServer

FLEET_SECRET = "bench-sim-fleet-secret-0123456789"


def step(devices: int, seconds: float) -> None:
    best = 0.0
    for _ in range(3):
        fleet = Fleet(devices, start=datetime(2024, 1, 15, tzinfo=UTC), seed=1)
        began = time.process_time()
        fleet.step(seconds)
        spent = time.process_time() - began
        best = max(best, sum(fleet.readings_per_device().values()) / spent)
    print(f"step: {devices:,} devices x {seconds:g} sim s, no broker: {best:,.0f} readings/CPU s")


async def broker(devices: int, seconds: float) -> None:
    sim = SimSettings(
        devices=devices,
        seed=1,
        interval_s=10.0,
        speed="max",
        duration_s=seconds,
        start_offset_s=seconds + 3600,
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
    )
    ids = FleetRunner(sim).fleet.device_ids
    with (
        tempfile.TemporaryDirectory(prefix="fixloop-sim-") as tmp,
        MosquittoServer(
            Path(tmp),
            users={GATEWAY_USER: "bench-gateway-password"},
            device_ids=ids,
            fleet_secret=FLEET_SECRET,
            connection_messages=False,
        ) as server,
    ):
        runner = FleetRunner(sim.model_copy(update={"mqtt_port": server.port}))
        began = time.perf_counter()
        async with runner:
            connected = time.perf_counter()
            report = await runner.run()
        ended = time.perf_counter()
    wall = ended - connected
    print(
        f"broker: {devices:,} devices x {seconds:g} sim s at speed max: connected in "
        f"{connected - began:.1f} s, replayed in {wall:.1f} s, {report.readings_total:,} "
        f"readings, {report.readings_total / wall:,.0f} readings/s, "
        f"{report.buffered_at_end} still buffered"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["step", "broker", "all"], default="all")
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=600.0, help="sim seconds")
    args = parser.parse_args()
    if args.part in ("step", "all"):
        step(args.devices, args.seconds)
    if args.part in ("broker", "all"):
        asyncio.run(broker(args.devices, args.seconds))


if __name__ == "__main__":
    main()
