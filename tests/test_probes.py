"""Liveness (``/livez``) and readiness (``/readyz``) of every fixloop service, on real servers.

What an orchestrator (Kubernetes, or compose's healthchecks in the cluster profile) asks
each process: whether to restart it (liveness) and whether it can take work now
(readiness: its broker subscription is up, its case store answers). Each service runs
here against a real mosquitto, influxd and SQLite case store; the broker is stopped and
started again under it, and the case store closed, to see the answers follow.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GATEWAY_PASSWORD, MakeMosquitto

from dashboard.auth import hash_password
from dashboard.service import DashboardService
from dashboard.settings import DashboardSettings
from dashboard.users import OpsUsersFile
from diagnostics.engine import DiagnosticsEngine
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import GATEWAY_USER
from fixloop.observe import dashboard_endpoint, diagnostics_endpoint, notifier_endpoint
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.metrics import GatewayMetrics
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from notifier.service import NotifierService
from notifier.settings import NotifierSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxSettings
from wire.settings import MqttSettings

pytestmark = pytest.mark.integration

USERS = {
    GATEWAY_USER: GATEWAY_PASSWORD,
    "fixloop-diagnostics": "diagnostics-probe-pw",
    "fixloop-notifier": "notifier-probe-pw",
    "fixloop-dashboard": "dashboard-probe-pw",
}


def mqtt(broker: MosquittoServer, user: str) -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, username=user, password=USERS[user])


async def probe(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with client.get(url) as response:
        return response.status, await response.json()


async def wait_status(
    client: aiohttp.ClientSession, url: str, status: int, timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        got, body = await probe(client, url)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: {got} {body}, waited for {status}")
        await asyncio.sleep(0.1)


def test_the_gateways_probes_read_its_state() -> None:
    """Unit: liveness fails only on a stall, readiness on broker or spool."""
    metrics = GatewayMetrics(stall_after_s=60.0)
    metrics.mqtt_connected = True
    assert (metrics.live_problems(), metrics.ready_problems()) == ([], [])
    metrics.influx_up = False  # the spool takes InfluxDB's share: still ready
    assert metrics.ready_problems() == []
    metrics.mqtt_connected = False
    metrics.spool_writable = False
    assert metrics.ready_problems() == ["mqtt_disconnected", "spool_unwritable"]
    assert metrics.live_problems() == []  # a restart cures neither
    metrics.unacked = 10
    metrics.last_progress_s = time.time() - 120
    assert metrics.live_problems() == ["stalled"]


async def test_the_gateway_is_ready_while_its_broker_is_there(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    broker = make_mosquitto(users=USERS)
    settings = GatewaySettings(spool_dir=tmp_path / "spool", metrics_port=0, retry_max_s=0.5)
    influx = InfluxSettings(url=influxd.url, database="fixloop")
    async with (
        Gateway(mqtt(broker, GATEWAY_USER), influx, settings) as gateway,
        aiohttp.ClientSession() as client,
    ):
        task = asyncio.create_task(gateway.run())
        try:
            base = f"http://127.0.0.1:{gateway.metrics_port}"
            await gateway.wait_subscribed()
            assert await probe(client, f"{base}/livez") == (200, {"ok": True, "problems": []})
            assert await probe(client, f"{base}/readyz") == (200, {"ok": True, "problems": []})
            await asyncio.to_thread(broker.stop)
            body = await wait_status(client, f"{base}/readyz", 503)
            assert body == {"ok": False, "problems": ["mqtt_disconnected"]}
            # alive all the while: a restart would not bring the broker back
            assert (await probe(client, f"{base}/livez"))[0] == 200
            await asyncio.to_thread(broker.start)
            await wait_status(client, f"{base}/readyz", 200)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_diagnostics_notifier_and_dashboard_are_ready_with_broker_and_store(
    make_mosquitto: MakeMosquitto, influxd: InfluxdServer, tmp_path: Path
) -> None:
    broker = make_mosquitto(users=USERS)
    influx = InfluxSettings(url=influxd.url, database="fixloop")
    users_file = tmp_path / "ops-users.json"
    OpsUsersFile(users_file).add("ada", "admin", hash_password("probe password of ada"))
    async with (
        DiagnosticsService(
            mqtt(broker, "fixloop-diagnostics"),
            influx,
            DiagnosticsSettings(model_path=tmp_path / "none.pkl"),
            engine=DiagnosticsEngine(),
        ) as diagnostics,
        NotifierService(
            mqtt(broker, "fixloop-notifier"),
            influx,
            NotifierSettings(db_path=tmp_path / "cases.sqlite3", api_port=0),
        ) as notifier,
        SqliteStore(tmp_path / "cases.sqlite3") as dashboard_store,
        DashboardService(
            mqtt(broker, "fixloop-dashboard"),
            influx,
            DashboardSettings(port=0, users_file=users_file),
            store=dashboard_store,
        ) as dashboard,
        diagnostics_endpoint(diagnostics, "127.0.0.1", 0) as diagnostics_probe,
        notifier_endpoint(notifier, "127.0.0.1", 0) as notifier_probe,
        dashboard_endpoint(dashboard, "127.0.0.1", 0) as dashboard_probe,
        aiohttp.ClientSession() as client,
    ):
        services = (diagnostics, notifier, dashboard)
        bases = [
            f"http://127.0.0.1:{e.port}"
            for e in (diagnostics_probe, notifier_probe, dashboard_probe)
        ]
        # before the subscriptions are up: alive, not ready
        for base in bases:
            assert (await probe(client, f"{base}/livez"))[0] == 200
            status, body = await probe(client, f"{base}/readyz")
            assert (status, body["problems"]) == (503, ["mqtt_disconnected"]), base
        tasks = [asyncio.create_task(service.run()) for service in services]
        try:
            for service in services:
                await service.wait_subscribed()
            for base in bases:
                assert await probe(client, f"{base}/readyz") == (200, {"ok": True, "problems": []})
            await asyncio.to_thread(broker.stop)
            for base in bases:
                body = await wait_status(client, f"{base}/readyz", 503)
                assert body["problems"] == ["mqtt_disconnected"], base
                assert (await probe(client, f"{base}/livez"))[0] == 200
            await asyncio.to_thread(broker.start)
            for base in bases:
                await wait_status(client, f"{base}/readyz", 200)
            # a case store that does not answer: the notifier and the dashboard say so
            await dashboard_store.close()
            status, body = await probe(client, f"{bases[2]}/readyz")
            assert (status, body["problems"]) == (503, ["store_unavailable"])
            assert notifier.store is not None
            await notifier.store.close()
            status, body = await probe(client, f"{bases[1]}/readyz")
            assert (status, body["problems"]) == (503, ["store_unavailable"])
            assert (await probe(client, f"{bases[1]}/livez"))[0] == 200
            assert (await probe(client, f"{bases[0]}/readyz"))[0] == 200  # no store needed
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
