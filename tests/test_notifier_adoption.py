"""Three notifiers share diagnoses on real mosquitto and PostgreSQL; one is killed and left dead.

Mosquitto hands a dead shared subscriber's messages to no other member and keeps routing
its share of new ones to its session, so without adoption the diagnoses sent its way wait
until it is started again under its name. With ``notifier.adopt_after_s`` the first live
notifier by name takes over its session (``wire.adoption``): every diagnosis gets its
case while the victim is still dead; started again, the victim takes its session back.
The same test runs both ways and asserts the difference.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import GATEWAY_PASSWORD, MakeMosquitto
from test_notifier_instances import NotifierProcess, Receiver, diagnosis, seed, wait_for

from diagnostics import encode_diagnosis
from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from notifier.postgres import PostgresStore
from wire.mqtt import MqttClient
from wire.protocol import DIAGNOSES_TOPIC

pytestmark = pytest.mark.integration

DEVICES = tuple(f"ad-{n:03d}" for n in range(30))
INSTANCES = ("a", "b", "c")
ADOPT_AFTER_S = 1.0
#: how long a dead notifier's share is watched without adoption (many times ADOPT_AFTER_S)
WAIT_DEAD_S = 12.0


def metric(notifier: NotifierProcess, name: str) -> int:
    url = f"http://127.0.0.1:{notifier.env['FIXLOOP_NOTIFIER__METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"fixloop_notifier_{name} "):
                return int(float(line.split()[1]))
    raise AssertionError(f"no {name} in /metrics")


async def publish(broker: MosquittoServer, device_ids: tuple[str, ...]) -> None:
    async with MqttClient(
        broker.host,
        broker.port,
        client_id="diagnostics-test",
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
    ) as client:
        for device_id in device_ids:
            payload = encode_diagnosis(diagnosis(device_id, 0.9))
            await client.publish(DIAGNOSES_TOPIC, payload, qos=1)
            await asyncio.sleep(0.05)


async def states(broker: MosquittoServer) -> dict[str, str]:
    """The notifiers' retained states on the broker, by instance."""
    found: dict[str, str] = {}
    async with MqttClient(
        broker.host,
        broker.port,
        client_id="states-test",
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
    ) as client:
        await client.subscribe("fleet/notifiers/+/state", qos=1)
        while await client.wait_messages(1.0):
            batch = client.take(100)
            for message in batch:
                if message.payload:
                    body = orjson.loads(message.payload)
                    found[body["instance"]] = body["state"]
            client.ack_many(batch)
    return found


@pytest.mark.parametrize("adopt", [True, False], ids=["adoption", "no-adoption"])
async def test_a_dead_notifiers_diagnoses_get_cases_only_with_adoption(
    make_mosquitto: MakeMosquitto,
    influxd: InfluxdServer,
    pg_url: str,
    tmp_path: Path,
    adopt: bool,
) -> None:
    broker = make_mosquitto(device_ids=DEVICES)
    receiver = Receiver()
    hooks_app = web.Application()
    hooks_app.router.add_post("/hook/{owner}", receiver.handle)
    hooks = TestServer(hooks_app, host="127.0.0.1")
    await hooks.start_server()
    conn = await asyncpg.connect(pg_url)
    async with PostgresStore(pg_url) as store:
        # owners who are asked first: no command goes to a device
        await seed(
            store,
            str(hooks.make_url("/hook")),
            DEVICES,
            lambda _: "always_ask",
            max_per_day=3,  # the default daily limit
        )
    notifiers = [NotifierProcess(broker, influxd, pg_url, tmp_path, name) for name in INSTANCES]
    if adopt:
        for notifier in notifiers:
            notifier.env["FIXLOOP_NOTIFIER__ADOPT_AFTER_S"] = str(ADOPT_AFTER_S)
    adopter, victim = notifiers[0], notifiers[1]  # the first live one by name adopts

    async def cases() -> set[str]:
        return {r["device_id"] for r in await conn.fetch("SELECT device_id FROM cases")}

    async def all_cases() -> bool:
        return await cases() == set(DEVICES)

    first, rest = DEVICES[:9], DEVICES[9:]
    try:
        for notifier in notifiers:
            notifier.start()
        await wait_for(
            lambda: all(n.subscribed_times() for n in notifiers), 60, "every notifier subscribed"
        )
        if adopt:
            ups = {name: "up" for name in INSTANCES}

            async def all_up() -> bool:
                return await states(broker) == ups

            await wait_for(all_up, 30, "every notifier announced up")
        await publish(broker, first)

        async def first_cases() -> bool:
            return await cases() >= set(first)

        await wait_for(first_cases, 60, "the first diagnoses' cases")
        victim.kill()
        killed_at = time.monotonic()
        await publish(broker, rest)  # a third of these go to the dead notifier's session
        if adopt:
            await wait_for(all_cases, 60, "every diagnosis's case while the victim is dead")
            print(f"every case {time.monotonic() - killed_at:.1f} s after the kill, victim dead")
            assert victim.proc is not None
            assert victim.proc.poll() is not None
            assert metric(adopter, "adopted_sessions") == 1
            assert metric(adopter, "adoptions_total") == 1
            assert "holds its session" in adopter.text()
            assert (await states(broker))["b"] == "adopted"
        else:
            await asyncio.sleep(WAIT_DEAD_S)
            waiting = set(DEVICES) - await cases()
            assert waiting, "without adoption the dead notifier's share should wait"
            assert waiting <= set(rest)
            print(f"{len(waiting)} of {len(rest)} diagnoses waiting {WAIT_DEAD_S:.0f} s after")
            assert metric(adopter, "adopted_sessions") == 0
            assert "holds its session" not in adopter.text()
        # started again under its name, the victim takes its session back
        restarted_at = datetime.now(UTC)
        victim.start()
        await wait_for(lambda: victim.subscribed_times() == 2, 60, "the victim back")
        await wait_for(all_cases, 60, "every diagnosis's case")
        if adopt:
            await wait_for(
                lambda: metric(adopter, "adopted_sessions") == 0, 30, "the session handed back"
            )
            await wait_for(lambda: states_are(broker, ups), 30, "the victim up again")
        rows = await conn.fetch("SELECT case_id, device_id FROM cases")
        await wait_for(
            lambda: conn.fetchval("SELECT count(*) = 0 FROM notifications WHERE status <> 'sent'"),
            60,
            "every message kept delivered",
        )
    finally:
        for notifier in notifiers:
            notifier.stop()
        await conn.close()
        await hooks.close()

    # one case per device, each owner asked once
    assert sorted(r["device_id"] for r in rows) == sorted(DEVICES)
    device_of = {r["case_id"]: r["device_id"] for r in rows}
    asked = [p for _, p in receiver.pushes]
    assert len({p["id"] for p in asked}) == len(DEVICES)
    if not adopt:
        # what waited was handled only once its notifier was back
        late = [at for at, p in receiver.pushes if device_of[p["data"]["case_id"]] in waiting]
        assert late, receiver.pushes[:1]
        assert min(late) >= restarted_at
    for notifier in notifiers:
        assert "Traceback" not in notifier.text(), notifier.instance


async def states_are(broker: MosquittoServer, expected: dict[str, str]) -> bool:
    return await states(broker) == expected
