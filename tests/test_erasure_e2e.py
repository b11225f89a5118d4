"""An owner's erasure, mid-delivery, against a real influxd: nothing about them is left.

The owner API erases the owner from the case store and their devices' points from
InfluxDB; a push that was under way finishes afterwards and must not bring the message
back. Then every table, the database file and its write-ahead log, and InfluxDB are
searched for anything that identifies the owner.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_owner_api import FakeActions, FakeHealth

from fixloop.stack import InfluxdServer
from notifier.api import API_PREFIX, create_api
from notifier.devicedata import DEVICE_MEASUREMENTS, EraseMode, InfluxDeviceData
from notifier.loop import Notice
from notifier.model import Case, DeviceRecord, Owner, PushChannel
from notifier.outbox import Outbox
from notifier.push import PushDispatcher, PushMessage
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings

NOW = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)
T0_MS = int(NOW.timestamp() * 1000) - 3_600_000
OWNER_ID, NAME, TOKEN = "o-nina-4711", "Nina Quast", "tok-nina-0123456789abcdef"
DEVICE, LABEL = "dev-nina-77", "Ninas Kellerwaschmaschine"
OTHER_DEVICE = "dev-other-01"
HOOK = "https://hooks.example.org/nina-private-hook-3141"
_DBS = itertools.count()


@dataclass
class BlockingSender:
    """A webhook sender that holds each delivery until released."""

    entered: asyncio.Event
    release: asyncio.Event
    sent: int = 0

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        self.entered.set()
        await self.release.wait()
        self.sent += 1


def _points(device: str) -> list[bytes]:
    lines = []
    for n in range(120):
        ts = T0_MS + n * 30_000
        lines.append(f"telemetry,device={device} temp={20 + n % 7}.5,seq={n}i {ts}".encode())
        lines.append(f"health,device={device} score=0.{n % 9}1,baseline=0.1 {ts}".encode())
    lines.append(f'device_events,device={device} kind="boot",code="" {T0_MS}'.encode())
    return lines


@pytest.fixture
async def influx(influxd: InfluxdServer) -> AsyncIterator[InfluxClient]:
    settings = InfluxSettings(url=influxd.url, database=f"erasure{next(_DBS)}", timeout_s=10)
    async with InfluxClient(settings) as client:
        await client.ensure_database()
        outcome = await client.write(_points(DEVICE) + _points(OTHER_DEVICE))
        assert outcome.rejected == []
        yield client


async def _seed(store: SqliteStore) -> tuple[Owner, Case]:
    owner = Owner(OWNER_ID, NAME, timezone="Europe/Berlin", quiet_start=None, quiet_end=None)
    await store.put_owner(owner)
    await store.put_owner(Owner("o-other", "Otto"))
    await store.add_token(TOKEN, ("owner", OWNER_ID))
    await store.put_device(DeviceRecord(DEVICE, OWNER_ID, "washer", label=LABEL))
    await store.put_device(DeviceRecord(OTHER_DEVICE, "o-other", "washer"))
    await store.put_channel(PushChannel("ch-nina", OWNER_ID, "webhook", HOOK, {"secret": "s"}))
    case = Case("case-n1", DEVICE, OWNER_ID, "washer", "drain_clog", "opened", "normal", NOW, NOW)
    await store.add_case(case)
    return owner, case


def _files(db_path: Path) -> dict[str, bytes]:
    """The database file, its write-ahead log and shared memory, as far as they exist."""
    paths = {suffix: Path(f"{db_path}{suffix}") for suffix in ("", "-wal", "-shm")}
    return {suffix: path.read_bytes() for suffix, path in paths.items() if path.exists()}


def _tables(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return [
            f"{name}: {row}" for name in names for row in conn.execute(f'SELECT * FROM "{name}"')
        ]


async def _device_values(client: InfluxClient) -> set[str]:
    found: set[str] = set()
    for measurement in DEVICE_MEASUREMENTS:
        for one in await client.query(f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "device"'):
            found |= {str(row[1]) for row in one.values}
    return found


async def _erase_mid_delivery(
    tmp_path: Path, influx: InfluxClient, aiohttp_client: object, mode: EraseMode
) -> tuple[Path, InfluxDeviceData, list[dict[str, object]]]:
    db_path = tmp_path / "cases.sqlite3"
    async with SqliteStore(db_path) as store:
        owner, case = await _seed(store)
        data = InfluxDeviceData(influx)
        app = create_api(
            store=store,
            actions=FakeActions(store),
            health=FakeHealth(),
            clock=lambda: NOW,
            device_data=data,
            erase_mode=mode,
        )
        client = await aiohttp_client(app)  # type: ignore[operator]
        auth = {"Authorization": f"Bearer {TOKEN}"}

        resp = await client.get(f"{API_PREFIX}/me/export/device-data", headers=auth)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        exported = [json.loads(line) for line in (await resp.text()).splitlines()]

        sender = BlockingSender(asyncio.Event(), asyncio.Event())
        dispatcher = PushDispatcher({"webhook": sender}, attempts=1, max_failures=3)  # type: ignore[arg-type]
        outbox = Outbox(store, dispatcher, clock=lambda: NOW)
        worker = asyncio.create_task(outbox.run())
        try:
            await outbox.notify(owner, case, Notice("resolved"))
            async with asyncio.timeout(10):
                await sender.entered.wait()
            resp = await client.delete(f"{API_PREFIX}/me", json={"confirm": "erase"}, headers=auth)
            assert resp.status == 200, await resp.text()
            sender.release.set()
            async with asyncio.timeout(10):
                await outbox.drain()
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        assert sender.sent == 1
        assert await store.notifications(OWNER_ID) == []
        resp = await client.get(f"{API_PREFIX}/me", headers=auth)
        assert resp.status == 401
    return db_path, data, exported


async def test_erasure_mid_delivery_leaves_nothing_anywhere(
    tmp_path: Path, influx: InfluxClient, aiohttp_client: object
) -> None:
    db_path, data, exported = await _erase_mid_delivery(tmp_path, influx, aiohttp_client, "delete")
    # the export held every point of the owner's device, and only those
    assert len(exported) == len(_points(DEVICE))
    assert {row["device"] for row in exported} == {DEVICE}
    assert {row["measurement"] for row in exported} == set(DEVICE_MEASUREMENTS)
    assert str(exported[0]["time"]).endswith(("Z", "+00:00"))

    identifiers = [OWNER_ID, NAME, DEVICE, LABEL, HOOK, TOKEN]
    rows = _tables(db_path)
    for value in identifiers:
        assert not any(value in row for row in rows), value
    for suffix, raw in _files(db_path).items():
        for value in identifiers:
            assert value.encode() not in raw, (suffix, value)
    # a tombstone without identifiers says it happened
    assert any("owner_erased" in row for row in rows)

    assert (await data.count([DEVICE])) == {m: 0 for m in DEVICE_MEASUREMENTS}
    assert DEVICE not in await _device_values(influx)
    others = await data.count([OTHER_DEVICE])
    assert others["telemetry"] == 120
    assert others["health"] == 120


async def test_rekeyed_erasure_keeps_history_under_an_anonymous_id(
    tmp_path: Path, influx: InfluxClient, aiohttp_client: object
) -> None:
    # two readings within one millisecond, kept apart below it as the gateway writes them
    same_ms = (T0_MS + 5) * 1000
    lines = [
        f"telemetry,device={DEVICE} temp=30.5,seq={900 + n}i {same_ms + n}".encode() for n in (1, 2)
    ]
    assert (await influx.write(lines, precision="us")).rejected == []
    await _erase_mid_delivery(tmp_path, influx, aiohttp_client, "rekey")
    values = await _device_values(influx)
    assert DEVICE not in values
    anonymous = [v for v in values if v.startswith("anon-")]
    assert len(anonymous) == 1
    kept = await InfluxDeviceData(influx).count(anonymous)
    assert kept == {"telemetry": 122, "device_events": 1, "health": 120}
    # the fields keep their stored types (an integer stays an integer)
    series = await influx.query(
        f"SELECT seq, temp FROM telemetry WHERE device = '{anonymous[0]}' AND seq < 900 "
        "ORDER BY time LIMIT 2"
    )
    assert [row[1:] for row in series[0].values] == [[0, 20.5], [1, 21.5]]
    assert isinstance(series[0].values[0][1], int)
    both = await influx.query(
        f"SELECT seq FROM telemetry WHERE device = '{anonymous[0]}' AND seq >= 900", epoch="u"
    )
    assert [row[1] for row in both[0].values] == [901, 902]
