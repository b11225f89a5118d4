"""Devices registered over the admin API get broker accounts at once (dynamic security).

The notifier's onboarding as ``fixloop notifier`` builds it (``service_onboarding``) on
a broker whose accounts live in Mosquitto's dynamic-security plugin: a device added by
an ops person logs in with the password derived from the fleet secret, and retiring it
shuts it out while the broker runs. ``fixloop devices import --random-passwords`` writes
new passwords for the factory into the labels file.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import DYNSEC_ADMIN_PASSWORD, FLEET_SECRET
from pydantic import SecretStr
from test_owner_api import ClientFactory, FakeActions, FakeHealth

from fixloop.cli import main
from fixloop.onboarding import service_onboarding
from fixloop.settings import BrokerSettings, Settings, StackSettings
from fixloop.stack import MosquittoServer
from notifier.api import API_PREFIX, create_api
from notifier.sqlite import SqliteStore
from wire.errors import ConfigError
from wire.mqtt import MqttClient
from wire.protocol.credentials import device_password
from wire.settings import MqttSettings

OPS = "tok-ops-dynsec-0123456789abcdef"


async def _logs_in(broker: MosquittoServer, device_id: str, password: str | None = None) -> None:
    client = MqttClient(
        broker.host,
        broker.port,
        client_id=device_id,
        username=device_id,
        password=password or device_password(FLEET_SECRET, device_id),
        connect_timeout_s=10,
    )
    async with client:
        await client.publish(f"devices/{device_id}/status", b"online", qos=1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "cases.sqlite3") as opened:
        yield opened


async def test_admin_api_issues_and_revokes_broker_accounts(
    dynsec_mosquitto: MosquittoServer,
    store: SqliteStore,
    tmp_path: Path,
    aiohttp_client: ClientFactory,
) -> None:
    broker = dynsec_mosquitto
    settings = Settings(
        stack=StackSettings(data_dir=tmp_path, fleet_secret=SecretStr(FLEET_SECRET)),
        mqtt=MqttSettings(host=broker.host, port=broker.port),
        broker=BrokerSettings(accounts="dynsec", admin_password=SecretStr(DYNSEC_ADMIN_PASSWORD)),
    )
    onboarding = service_onboarding(settings, store)
    assert onboarding is not None
    assert onboarding.accounts is not None
    await store.add_token(OPS, ("ops", "olga"))
    client = await aiohttp_client(
        create_api(
            store=store, actions=FakeActions(store), health=FakeHealth(), onboarding=onboarding
        )
    )
    auth = {"Authorization": f"Bearer {OPS}"}
    resp = await client.post(
        f"{API_PREFIX}/admin/product-lines", json={"model": "fridge"}, headers=auth
    )
    assert resp.status == 201, await resp.text()

    with pytest.raises(ConfigError, match="not authorized"):
        await _logs_in(broker, "fridge-F-77")
    resp = await client.post(
        f"{API_PREFIX}/admin/devices", json={"model": "fridge", "serial": "F-77"}, headers=auth
    )
    assert resp.status == 201, await resp.text()
    await _logs_in(broker, "fridge-F-77")

    rows = {"devices": [{"model": "fridge", "serial": f"F-{n}"} for n in range(80, 83)]}
    resp = await client.post(f"{API_PREFIX}/admin/device-imports", json=rows, headers=auth)
    assert (await resp.json())["added"] == 3
    for n in range(80, 83):
        await _logs_in(broker, f"fridge-F-{n}")

    resp = await client.post(f"{API_PREFIX}/admin/devices/fridge-F-77/retire", headers=auth)
    assert resp.status == 200, await resp.text()
    with pytest.raises(ConfigError, match="not authorized"):
        await _logs_in(broker, "fridge-F-77")
    await _logs_in(broker, "fridge-F-80")

    # the broker away: registered all the same, and the report says who has no account
    await asyncio.to_thread(broker.stop)
    rows = {"devices": [{"model": "fridge", "serial": "F-90"}]}
    resp = await client.post(f"{API_PREFIX}/admin/device-imports", json=rows, headers=auth)
    report = await resp.json()
    assert (resp.status, report["added"]) == (200, 1), report
    assert report["without_broker_login"] == ["fridge-F-90"]


def test_import_with_random_passwords_writes_them_for_the_factory(
    dynsec_mosquitto: MosquittoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = dynsec_mosquitto
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIXLOOP_STACK__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIXLOOP_BROKER__ACCOUNTS", "dynsec")
    monkeypatch.setenv("FIXLOOP_BROKER__ADMIN_PASSWORD", DYNSEC_ADMIN_PASSWORD)
    monkeypatch.setenv("FIXLOOP_MQTT__HOST", broker.host)
    monkeypatch.setenv("FIXLOOP_MQTT__PORT", str(broker.port))
    assert main(["products", "add", "heat_pump"]) == 0
    (tmp_path / "pumps.csv").write_text("model,serial\nheat_pump,HP-1\nheat_pump,HP-2\n")
    code = main(["devices", "import", "pumps.csv", "--labels", "labels.csv", "--random-passwords"])
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "labels.csv").open() as f:
        labels = list(csv.DictReader(f))
    assert [row["device_id"] for row in labels] == ["heat_pump-HP-1", "heat_pump-HP-2"]
    for row in labels:
        assert row["mqtt_password"] != device_password(FLEET_SECRET, row["device_id"])
        asyncio.run(_logs_in(broker, row["device_id"], row["mqtt_password"]))
    assert main(["devices", "retire", "heat_pump-HP-2"]) == 0
    with pytest.raises(ConfigError, match="not authorized"):
        asyncio.run(_logs_in(broker, "heat_pump-HP-2", labels[1]["mqtt_password"]))

    # the broker away: the devices are registered and their claim codes kept all the same
    capsys.readouterr()
    broker.stop()
    (tmp_path / "more.csv").write_text("model,serial\nheat_pump,HP-3\n")
    assert main(["devices", "import", "more.csv", "--labels", "more-labels.csv"]) == 1
    err = capsys.readouterr().err
    assert "broker accounts of 1 devices not issued" in err
    assert "1 devices registered without a broker account" in err
    with (tmp_path / "more-labels.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["device_id"] == "heat_pump-HP-3"
    assert row["claim_code"]
