"""Notifier benchmark: how many new cases one notifier process opens per second.

Runs a private mosquitto and influxd (:mod:`fixloop.stack`) and the notifier service as
``fixloop notifier`` runs it (:class:`~notifier.service.NotifierService`: case store,
owner loop, outbox, owner API, command channel), on a SQLite case store (the default) or
on PostgreSQL (``--store-url``). ``--devices`` devices, each with its own owner, are
registered first. The notifier subscribes once (its persistent session), stops, and one
new diagnosis per device (a hung controller, which the owner's default policy asks
about before a restart) is queued at the broker for it; then the notifier starts again
and the run is timed from its start until every diagnosis is handled: each one opens a
case, writes its audit line and the owner's consent request, and publishes the case
change on ``fleet/cases``. Publishing is outside the timed window.

Prints diagnoses handled, cases opened, wall seconds, cases per wall second, and the
notifier process's CPU seconds (and cases per CPU second, the figure that does not
depend on what else the shared machine runs).

Usage::

    python bench/notifier.py                       # 2,000 devices, SQLite
    python bench/notifier.py --devices 5000
    python bench/notifier.py --postgres             # a private PostgreSQL (initdb here)
    python bench/notifier.py --store-url postgresql://user:pw@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diagnostics import CATALOG, Diagnosis, encode_diagnosis
from fixloop.pgserver import PostgresServer
from fixloop.stack import InfluxdServer, MosquittoServer
from notifier.model import DeviceRecord, Owner
from notifier.service import NotifierService
from notifier.settings import NotifierSettings
from notifier.stores import case_store
from wire.influx import InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import DIAGNOSES_TOPIC
from wire.settings import MqttSettings

NOTIFIER_USER, NOTIFIER_PASSWORD = "fixloop-notifier", "bench-notifier-password"
SOURCE_USER, SOURCE_PASSWORD = "fixloop-diagnostics", "bench-diagnostics-password"
MODEL, FAULT = "washer", "controller_hang"


def diagnosis(device_id: str, at: datetime) -> Diagnosis:
    """One new diagnosis of a hung controller on ``device_id``."""
    return Diagnosis(
        device_id=device_id,
        model=MODEL,
        fault=FAULT,
        confidence=0.9,
        status="open",
        opened_at=at,
        updated_at=at,
        score=0.8,
        source="device",
        remedies=CATALOG[MODEL].faults[FAULT].remedies,
        evidence=(f"code E71 at {at.isoformat()}",),
    )


async def seed(settings: NotifierSettings, devices: list[str]) -> None:
    """Register every device, each with its own owner."""
    store = case_store(settings)
    await store.open()
    try:
        for device_id in devices:
            owner_id = f"owner-{device_id}"
            await store.put_owner(Owner(owner_id=owner_id, name=f"Owner of {device_id}"))
            await store.put_device(
                DeviceRecord(device_id=device_id, owner_id=owner_id, model=MODEL)
            )
    finally:
        await store.close()


async def run(devices: int, store_url: str | None) -> None:
    """Seed, queue the diagnoses, time the notifier draining them; print one line."""
    with tempfile.TemporaryDirectory(prefix="fixloop-bench-notifier-") as tmp:
        root = Path(tmp)
        broker = MosquittoServer(
            root / "mosquitto",
            users={NOTIFIER_USER: NOTIFIER_PASSWORD, SOURCE_USER: SOURCE_PASSWORD},
            max_queued_messages=devices * 2,
            die_with_parent=True,
        ).start()
        influxd = InfluxdServer(root / "influxd", die_with_parent=True).start()
        try:
            mqtt = MqttSettings(
                host=broker.host,
                port=broker.port,
                username=NOTIFIER_USER,
                password=NOTIFIER_PASSWORD,
            )
            settings = NotifierSettings(
                db_path=root / "cases.sqlite3",
                store_url=store_url,  # type: ignore[arg-type]
                api_port=0,
            )
            ids = [f"bench-{i:07d}" for i in range(devices)]
            await seed(settings, ids)
            influx = InfluxSettings(url=influxd.url, database="fixloop")
            # subscribe once: the broker keeps the persistent session's queue from now on
            async with NotifierService(mqtt, influx, settings) as notifier:
                task = asyncio.create_task(notifier.run())
                await notifier.wait_subscribed()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            source = MqttClient(
                broker.host,
                broker.port,
                client_id="bench-diagnostics",
                username=SOURCE_USER,
                password=SOURCE_PASSWORD,
            )
            now = datetime.now(UTC)
            async with source:
                for device_id in ids:
                    await source.publish(
                        DIAGNOSES_TOPIC, encode_diagnosis(diagnosis(device_id, now)), qos=1
                    )
            async with NotifierService(mqtt, influx, settings) as notifier:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                task = asyncio.create_task(notifier.run())
                while notifier.diagnoses_handled < devices:  # noqa: ASYNC110 - a counter
                    await asyncio.sleep(0.01)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert notifier.store is not None
                opened = len(await notifier.store.cases(limit=devices * 2))
                failed = notifier.diagnoses_failed
        finally:
            influxd.stop()
            broker.stop()
    kind = "postgresql" if store_url else "sqlite"
    sys.stdout.write(
        f"{kind:<10} diagnoses {devices:>7,}  cases opened {opened:>7,}  failed {failed}  "
        f"{wall:6.2f} s  {opened / wall:8,.0f} cases/s  "
        f"CPU {cpu:6.2f} s  {opened / cpu:8,.0f} cases/CPU-s\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2_000, help="devices (one case each)")
    parser.add_argument("--store-url", help="a PostgreSQL database instead of SQLite")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="start a private PostgreSQL (durable commits, as in production) and use it",
    )
    args = parser.parse_args()
    # owners here have no push channel: every consent request says so at WARNING
    logging.basicConfig(level=logging.ERROR)
    if not args.postgres:
        asyncio.run(run(args.devices, args.store_url))
        return
    with (
        tempfile.TemporaryDirectory(prefix="fixloop-bench-pg-") as tmp,
        PostgresServer(Path(tmp), die_with_parent=True) as server,
    ):
        asyncio.run(run(args.devices, server.url()))


if __name__ == "__main__":
    main()
