"""A new product line onboarded end to end with commands only, on real servers.

A manufacturer writes a product file for a dishwasher, checks it and registers the
product line, imports 501 devices from a CSV file (two chunks of the import; claim codes
written for the labels, broker accounts issued in Mosquitto's dynamic-security plugin) and
invites an owner — all with the ``fixloop`` command as a separate process. The owner's
app accepts the invite, registers a webhook and claims one dishwasher with the code from
its label; the device logs in to the broker with its account; the ops dashboard shows it
in the fleet; a diagnosis for it opens a case, and the owner's first message arrives at
the webhook.
"""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import DYNSEC_ADMIN_PASSWORD, GATEWAY_PASSWORD, MakeMosquitto
from test_dashboard import ClientFactory, ops_users
from test_dashboard import login as ops_login

from dashboard.app import create_app
from dashboard.settings import DashboardSettings
from diagnostics import Diagnosis, encode_diagnosis
from diagnostics.product import load_product
from fixloop.broker import GATEWAY_USER
from fixloop.config import load_settings
from fixloop.onboarding import case_store_path, service_onboarding
from fixloop.stack import InfluxdServer
from notifier.push import verify_webhook_signature
from notifier.service import NotifierService
from notifier.settings import NotifierSettings, PushSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import DIAGNOSES_TOPIC
from wire.protocol.credentials import device_password
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

DEVICES = 501  # one more than the import's chunk of 500 rows
HOOK_SECRET = "mia-webhook-secret-0123456789"
PRODUCT = """
[product]
model = "dishwasher"
title = "dishwasher"
primary_metric = "water_temp_c"

[metrics]
water_temp_c = { unit = "degC", healthy = [10, 75], description = "wash water temperature" }
pump_current_a = { unit = "A", healthy = [0, 2.5], description = "circulation pump current" }
heater_on = { unit = "bool", description = "heater running" }

[faults.filter_clog]
title = "filter clogged"
codes = ["E24"]
remedies = [
    { action = "cleaning_cycle", note = "a hot rinse frees a lightly clogged filter" },
    { action = "technician_visit", part = "drain_pump", skill = "plumbing", note = "a new pump" },
]
"""


async def fixloop(config: Path, *args: str) -> tuple[int, str, str]:
    """Run the ``fixloop`` command as a user would: its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fixloop",
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=config.parent,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Hook:
    """The owner's webhook: checks each signature, keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.bad = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        if not verify_webhook_signature(
            HOOK_SECRET,
            headers["X-Fixloop-Timestamp"],
            body,
            headers["X-Fixloop-Signature"],
            now=time.time(),
        ):
            self.bad += 1
            return web.Response(status=401)
        self.messages.append(await request.json())
        return web.Response(status=204)


@pytest.mark.timeout(600)
async def test_a_new_product_line_onboarded_with_commands_only(
    tmp_path: Path,
    make_mosquitto: MakeMosquitto,
    influxd: InfluxdServer,
    aiohttp_client: ClientFactory,
) -> None:
    broker = make_mosquitto(dynsec_admin_password=DYNSEC_ADMIN_PASSWORD)
    products = tmp_path / "products"
    products.mkdir()
    (products / "dishwasher.toml").write_text(PRODUCT)
    config = tmp_path / "fixloop.toml"
    config.write_text(
        f'[stack]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[diagnostics]\nproducts_dir = "{products}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[broker]\naccounts = "dynsec"\nadmin_password = "{DYNSEC_ADMIN_PASSWORD}"\n'
    )
    with (tmp_path / "devices.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["model", "serial", "region", "firmware", "batch"])
        for n in range(DEVICES):
            rows.writerow(["dishwasher", f"SW5-{n:06d}", ("north", "south")[n % 2], "1.0.3", "B7"])

    # -- the manufacturer, with commands only -------------------------------------------
    code, out, err = await fixloop(config, "products", "check", str(products / "dishwasher.toml"))
    assert code == 0, err
    assert "ok: model dishwasher" in out
    code, out, err = await fixloop(config, "products", "add", "dishwasher", "--name", "Sparkle 5")
    assert code == 0, err
    code, out, err = await fixloop(
        config, "devices", "import", "devices.csv", "--labels", "labels.csv"
    )
    assert code == 0, err
    assert "501 rows: 501 added, 0 failed" in err
    assert "broker accounts issued" in err
    with (tmp_path / "labels.csv").open() as f:
        labels = list(csv.DictReader(f))
    assert len(labels) == DEVICES
    assert len({row["claim_code"] for row in labels}) == DEVICES
    code, out, err = await fixloop(
        config, "owners", "invite", "--name", "Mia Berg", "--timezone", "Europe/Berlin"
    )
    assert code == 0, err
    invite = dict(line.split("\t", 1) for line in out.splitlines())["invite"]

    # -- the services: the notifier (owner API) and the ops dashboard -------------------
    settings = load_settings(config, {})
    hook = Hook()
    hook_app = web.Application()
    hook_app.router.add_post("/hook", hook.handle)
    hooks = TestServer(hook_app, host="127.0.0.1")
    await hooks.start_server()
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influxd.url, database="onboarding", timeout_s=10)
    notifier_settings = NotifierSettings(
        db_path=tmp_path / "unused.sqlite3",
        api_port=0,
        client_id="fixloop-notifier-onboarding",
        push=PushSettings(webhook_allow_private=True),  # the owner's webhook is on 127.0.0.1
    )
    async with InfluxClient(influx_settings) as influx:
        await influx.ensure_database()
    try:
        async with (
            SqliteStore(case_store_path(settings)) as store,
            NotifierService(
                mqtt,
                influx_settings,
                notifier_settings,
                store=store,
                onboarding=lambda given: service_onboarding(settings, given),
            ) as notifier,
            InfluxClient(influx_settings) as dashboard_influx,
            aiohttp.ClientSession(base_url=notifier.api_url.removesuffix("/api/v1")) as http,
        ):
            runner = asyncio.create_task(notifier.run())
            try:
                await notifier.wait_subscribed()
                await _owner_and_ops(
                    tmp_path,
                    http,
                    hook,
                    hooks,
                    labels,
                    invite,
                    store,
                    notifier,
                    broker.port,
                    aiohttp_client,
                    create_dashboard=lambda: create_app(
                        store=store,
                        influx=dashboard_influx,
                        actions=notifier.loop,
                        users=ops_users(),
                        settings=DashboardSettings(cache_s=0),
                    ),
                    mqtt=mqtt,
                )
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
    finally:
        await hooks.close()
    assert hook.bad == 0


async def _owner_and_ops(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    hook: Hook,
    hooks: TestServer,
    labels: list[dict[str, str]],
    invite: str,
    store: SqliteStore,
    notifier: NotifierService,
    broker_port: int,
    aiohttp_client: ClientFactory,
    *,
    create_dashboard: Callable[[], web.Application],
    mqtt: MqttSettings,
) -> None:
    # -- the owner's app ------------------------------------------------------------------
    async with http.post("/api/v1/invites/accept", json={"invite": invite}) as resp:
        assert resp.status == 201, await resp.text()
        token = (await resp.json())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with http.patch("/api/v1/me", json={"quiet_hours": None}, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    channel = {
        "kind": "webhook",
        "target": str(hooks.make_url("/hook")),
        "keys": {"secret": HOOK_SECRET},
    }
    async with http.post("/api/v1/me/channels", json=channel, headers=auth) as resp:
        assert resp.status == 201, await resp.text()
    mine = labels[437]
    claim = {"claim_code": mine["claim_code"], "label": "Kitchen"}
    async with http.post("/api/v1/me/devices/claim", json=claim, headers=auth) as resp:
        assert resp.status == 201, await resp.text()
        device = await resp.json()
    device_id = mine["device_id"]
    assert device["device_id"] == device_id
    assert (device["model"], device["firmware"]) == ("dishwasher", "1.0.3")

    # the dishwasher reaches the broker with the account the import gave it
    fleet_secret = (tmp_path / "data" / "fleet_secret").read_text().strip()
    client = MqttClient(
        "127.0.0.1",
        broker_port,
        client_id=device_id,
        username=device_id,
        password=device_password(fleet_secret, device_id),
        connect_timeout_s=10,
    )
    async with client:
        await client.publish(f"devices/{device_id}/status", b"online", qos=1)

    # -- the ops dashboard shows it in the fleet ----------------------------------------------
    dashboard = await aiohttp_client(create_dashboard())
    await ops_login(dashboard, "vera")
    resp = await dashboard.get("/ops/api/devices", params={"model": "dishwasher"})
    assert resp.status == 200, await resp.text()
    fleet = await resp.json()
    assert [d["device_id"] for d in fleet["devices"]] == [device_id]
    assert fleet["devices"][0]["firmware"] == "1.0.3"

    # -- a diagnosis reaches its owner ----------------------------------------------------------
    product = load_product(tmp_path / "products" / "dishwasher.toml")
    now = datetime.now(UTC)
    unclaimed = labels[438]["device_id"]
    publisher = mqtt.client("onboarding-diagnostics")
    async with publisher:
        for target in (unclaimed, device_id):
            diagnosis = Diagnosis(
                device_id=target,
                model="dishwasher",
                fault="filter_clog",
                confidence=0.9,
                status="open",
                opened_at=now,
                updated_at=now,
                score=0.9,
                source="device",
                remedies=product.catalog.faults["filter_clog"].remedies,
                evidence=("code E24",),
            )
            await publisher.publish(DIAGNOSES_TOPIC, encode_diagnosis(diagnosis), qos=1)

    async def first_message() -> list[dict[str, Any]]:
        return hook.messages

    messages = await until("the owner's first message", first_message)
    cases = await store.cases(device_id=device_id)
    assert len(cases) == 1
    assert messages[0]["data"]["case_id"] == cases[0].case_id
    async with http.get("/api/v1/cases", headers=auth) as resp:
        owned = (await resp.json())["cases"]
    assert [c["case_id"] for c in owned] == [cases[0].case_id]
    # the unclaimed dishwasher has no owner to tell: no case
    assert await store.cases(device_id=unclaimed) == []
    assert notifier.loop is not None
    assert notifier.loop.unowned == 1
