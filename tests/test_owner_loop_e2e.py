"""The owner loop end to end on real mosquitto and influxd with a simulated fleet.

A firmware fault is cured by a remote update, verified from the stored scores, the
owner is told over a signed webhook and rates it; worn bearings are not cured
remotely: a visit is offered and booked, the technician services the bearing (the
simulator repairs the device) and completes the visit, the device is verified and the
owner's low rating reaches a person; one owner cannot see or act on another's device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import time as dtime
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FLEET_SECRET, GATEWAY_PASSWORD, MakeInfluxd, MakeMosquitto
from pydantic import SecretStr
from test_diagnostics_e2e import healthy_engine

from device_sim import FleetRunner, SimSettings
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from notifier.model import DeviceRecord, Owner, PushChannel, Technician, Window
from notifier.postgres import PostgresStore
from notifier.push import verify_webhook_signature
from notifier.service import NotifierService
from notifier.settings import NotifierSettings, PushSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxSettings
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

HOOK_SECRET = "webhook-secret-0123456789abcdef"
INTERVAL_S = 300.0
ALL_WEEK = tuple(Window(d, dtime(0), dtime(23, 59)) for d in range(7))


class Receiver:
    """The owners' webhook endpoint: checks every signature, keeps the messages."""

    def __init__(self) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify_webhook_signature(
            HOOK_SECRET,
            request.headers["X-Fixloop-Timestamp"],
            body,
            request.headers["X-Fixloop-Signature"],
            now=time.time(),
        )
        if not ok:
            self.bad_signatures += 1
            return web.Response(status=401)
        self.messages.setdefault(request.match_info["owner"], []).append(await request.json())
        return web.Response(status=204)

    def kinds(self, owner: str) -> list[str]:
        return [m["data"].get("kind", "") for m in self.messages.get(owner, [])]


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_owner_loop_end_to_end(
    make_mosquitto: MakeMosquitto,
    make_influxd: MakeInfluxd,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    influx = make_influxd()
    sim = SimSettings(
        devices=6,
        seed=11,
        interval_s=INTERVAL_S,
        start_offset_s=30 * 86_400,
        # fast, but paced: the fleet must still be replaying when the visit is done (30
        # days take about 65 s; the worn bearing's E52 comes some 8 days in)
        speed=40_000.0,
        fleet_secret=SecretStr(FLEET_SECRET),
        mqtt_port=1,
        models={"washer": 1.0},
    )
    runner = FleetRunner(sim)
    ids = runner.fleet.device_ids
    fw_device, bearing_device = ids[0], ids[1]
    onset = runner.fleet.now + timedelta(days=1)
    runner.fleet.inject(fw_device, "firmware_bug", at=onset)
    runner.fleet.inject(
        bearing_device, "bearing_wear", at=onset, duration_to_failure=timedelta(days=3)
    )
    broker = make_mosquitto(device_ids=ids, connection_messages=False)
    runner.settings = sim.model_copy(update={"mqtt_port": broker.port})
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url)
    engine = await asyncio.to_thread(healthy_engine)

    receiver = Receiver()
    hook_app = web.Application()
    hook_app.router.add_post("/hook/{owner}", receiver.handle)
    hooks = TestServer(hook_app, host="127.0.0.1")
    await hooks.start_server()

    store: SqliteStore | PostgresStore = (
        SqliteStore(tmp_path / "cases.sqlite3")
        if backend == "sqlite"
        else PostgresStore(request.getfixturevalue("pg_url"))
    )
    await store.__aenter__()
    owners = {"ann": fw_device, "bob": bearing_device}
    for owner_id in ("ann", "bob", "carl"):
        await store.put_owner(
            Owner(
                owner_id,
                owner_id.title(),
                consent="fix_and_tell",
                quiet_start=None,
                quiet_end=None,
                availability=ALL_WEEK,
                max_per_day=50,
            )
        )
        await store.add_token(f"token-{owner_id}", ("owner", owner_id))
        await store.put_channel(
            PushChannel(
                f"hook-{owner_id}",
                owner_id,
                "webhook",
                str(hooks.make_url(f"/hook/{owner_id}")),
                {"secret": HOOK_SECRET},
            )
        )
    for device_id in ids:
        owner_id = next((o for o, d in owners.items() if d == device_id), "carl")
        await store.put_device(DeviceRecord(device_id, owner_id, "washer", "2.3.1"))
    await store.put_technician(
        Technician("tina", "Tina Berger", "default", frozenset({"bearing"}), hours=ALL_WEEK)
    )
    await store.add_token("token-tina", ("technician", "tina"))

    settings = NotifierSettings(
        db_path=tmp_path / "unused.sqlite3",
        api_port=0,
        command_timeout_s=20,
        retry_after_s=1,
        settle_s=1_800,
        verify_window_s=4 * 3_600,
        verify_timeout_s=300,
        firmware={"washer": "2.4.0"},
        push=PushSettings(webhook_allow_private=True),  # the owners' webhooks are on 127.0.0.1
    )
    stop = asyncio.Event()
    try:
        async with (
            Gateway(
                mqtt, influx_settings, GatewaySettings(spool_dir=tmp_path / "spool", metrics_port=0)
            ) as gateway,
            DiagnosticsService(
                mqtt,
                influx_settings,
                DiagnosticsSettings(model_path=tmp_path / "m.pkl"),
                engine=engine,
            ) as diagnostics,
            NotifierService(mqtt, influx_settings, settings, store=store) as notifier,
            aiohttp.ClientSession(base_url=notifier.api_url.removesuffix("/api/v1")) as http,
        ):
            tasks = [
                asyncio.create_task(gateway.run()),
                asyncio.create_task(diagnostics.run()),
                asyncio.create_task(notifier.run()),
            ]
            try:
                await gateway.wait_subscribed()
                await diagnostics.wait_subscribed()
                await notifier.wait_subscribed()
                async with http.get("/health") as response:
                    assert response.status == 200
                    health = await response.json()
                    assert health["ok"] is True
                    assert health["notifications_out_of_time"] == 0
                async with runner:
                    fleet = asyncio.create_task(runner.run(stop))
                    await _scenarios(http, runner, receiver, store, fw_device, bearing_device)
                    stop.set()
                    await fleet
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()
        await hooks.close()
    assert receiver.bad_signatures == 0


def _auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer token-{who}"}


async def _get(http: aiohttp.ClientSession, who: str, path: str) -> tuple[int, Any]:
    async with http.get(f"/api/v1{path}", headers=_auth(who)) as response:
        return response.status, await response.json()


async def _post(http: aiohttp.ClientSession, who: str, path: str, body: Any) -> tuple[int, Any]:
    async with http.post(f"/api/v1{path}", json=body, headers=_auth(who)) as response:
        return response.status, await response.json()


async def _case_in(
    http: aiohttp.ClientSession, who: str, states: set[str]
) -> dict[str, Any] | None:
    status, body = await _get(http, who, "/cases")
    assert status == 200, body
    cases = body["cases"] if isinstance(body, dict) else body
    return next((c for c in cases if c["state"] in states), None)


async def _scenarios(
    http: aiohttp.ClientSession,
    runner: FleetRunner,
    receiver: Receiver,
    store: SqliteStore | PostgresStore,
    fw_device: str,
    bearing_device: str,
) -> None:
    # (1) the firmware fault is cured by a remote update, verified, told, rated
    await until("Ann told her washer was fixed", lambda: _kinds(receiver, "ann", "fixed_remotely"))
    ann_case = await _case_in(http, "ann", {"resolved"})
    assert ann_case is not None
    assert ann_case["device_id"] == fw_device
    assert runner.fleet.device(fw_device).firmware == "2.4.0"
    assert "firmware_bug" not in runner.fleet.device(fw_device).active_faults
    # the rating request follows the good news, a push of its own
    await until("Ann asked to rate", lambda: _kinds(receiver, "ann", "rating_request"), 30)
    status, _ = await _post(http, "ann", f"/cases/{ann_case['case_id']}/rating", {"stars": 5})
    assert status == 201

    # (2) worn bearings: a visit is offered, booked, done; the device is verified
    bob_case = await until(
        "a visit offered to Bob",
        lambda: _case_in(http, "bob", {"appointment_proposed"}),
        timeout_s=180,
    )
    assert bob_case["device_id"] == bearing_device
    await until("Bob offered times", lambda: _kinds(receiver, "bob", "appointment_offer"), 30)
    case_id = bob_case["case_id"]
    status, slots = await _get(http, "bob", f"/cases/{case_id}/slots")
    assert status == 200
    assert slots
    status, booked = await _post(http, "bob", f"/cases/{case_id}/appointment", {"slot": 0})
    assert status == 201, booked
    status, visits = await _get(http, "tina", "/technician/visits")
    assert status == 200
    visit_list = visits["visits"] if isinstance(visits, dict) else visits
    visit = next(v for v in visit_list if v["case_id"] == case_id)
    cured = await runner.repair(bearing_device, "bearing")
    assert cured == ["bearing_wear"]
    status, body = await _post(
        http,
        "tina",
        f"/technician/visits/{visit['appointment_id']}/complete",
        {"note": "bearing replaced"},
    )
    assert status == 200, body
    try:
        await until("Bob's washer verified", lambda: _case_in(http, "bob", {"resolved"}), 180)
    except AssertionError:
        for entry in await store.audit(case_id):  # what the case machine saw and did
            print(entry.at, entry.action, entry.to_state, entry.reason, entry.evidence)
        raise
    await until("Bob told it is fixed", lambda: _kinds(receiver, "bob", "resolved"), 30)

    # (3) a low rating reaches a person
    status, _ = await _post(
        http, "bob", f"/cases/{case_id}/rating", {"stars": 1, "comment": "took a week"}
    )
    assert status == 201
    escalated = await store.get_case(case_id)
    assert escalated is not None
    assert escalated.state == "escalated"
    assert [t.case_id for t in await store.tasks(state="open")] == [case_id]

    # (4) Ann cannot see or act on Bob's washer or case
    status, _ = await _get(http, "ann", f"/devices/{bearing_device}")
    assert status == 404
    status, _ = await _get(http, "ann", f"/cases/{case_id}")
    assert status == 404
    status, _ = await _post(http, "ann", f"/cases/{case_id}/rating", {"stars": 5})
    assert status == 404
    status, _ = await _post(http, "ann", f"/cases/{case_id}/appointment", {"slot": 0})
    assert status == 404


async def _kinds(receiver: Receiver, owner: str, kind: str) -> bool:
    return kind in receiver.kinds(owner)
