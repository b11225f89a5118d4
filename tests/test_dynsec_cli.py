"""``fixloop devices credentials issue|revoke|list`` against a broker with the plugin.

The commands run through ``fixloop.cli.main`` as a user would run them, on the broker of
``[mqtt]`` with ``broker.admin_password``, or on a ``fixloop up`` data folder (its
administrator's password derived from the kept fleet secret, its port from
``ports.json``).
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from conftest import DEVICE_IDS, DYNSEC_ADMIN_PASSWORD, FLEET_SECRET, MakeMosquitto, device_pw

from fixloop.broker import DYNSEC_ADMIN_USER
from fixloop.cli import main
from fixloop.dynsec_cli import local_admin_password
from fixloop.stack import MosquittoServer
from fixloop.stackaccounts import service_password
from wire.errors import ConfigError
from wire.mqtt import MqttClient

WAIT_S = 10.0


def _env(monkeypatch: pytest.MonkeyPatch, broker: MosquittoServer) -> None:
    monkeypatch.setenv("FIXLOOP_BROKER__ACCOUNTS", "dynsec")
    monkeypatch.setenv("FIXLOOP_BROKER__ADMIN_PASSWORD", DYNSEC_ADMIN_PASSWORD)
    monkeypatch.setenv("FIXLOOP_MQTT__HOST", broker.host)
    monkeypatch.setenv("FIXLOOP_MQTT__PORT", str(broker.port))


def _publishes(broker: MosquittoServer, device_id: str, password: str) -> None:
    """The device logs in and publishes on its telemetry topic (raises if refused)."""

    async def go() -> None:
        client = MqttClient(
            broker.host,
            broker.port,
            client_id=device_id,
            username=device_id,
            password=password,
            connect_timeout_s=WAIT_S,
        )
        async with client:
            await client.publish(f"devices/{device_id}/telemetry", b"{}", qos=1)

    asyncio.run(go())


def test_issue_prints_the_password_once_and_revoke_shuts_the_device_out(
    dynsec_mosquitto: MosquittoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = dynsec_mosquitto
    _env(monkeypatch, broker)
    assert main(["devices", "credentials", "issue", "oven-7"]) == 0
    out, err = capsys.readouterr()
    password = out.strip()
    assert len(password) >= 24
    assert "\n" not in password
    assert "shown only now" in err
    assert password not in err
    _publishes(broker, "oven-7", password)

    assert main(["devices", "credentials", "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"device_id": "oven-7", "state": "enabled"} in listed
    assert {d["device_id"] for d in listed} == {*DEVICE_IDS, "oven-7"}

    assert main(["devices", "credentials", "revoke", "oven-7"]) == 0
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not authorized"):
        _publishes(broker, "oven-7", password)
    assert main(["devices", "credentials", "list"]) == 0
    assert "oven-7\trevoked" in capsys.readouterr().out.splitlines()

    assert main(["devices", "credentials", "revoke", "--delete", "oven-7"]) == 0
    capsys.readouterr()
    assert main(["devices", "credentials", "revoke", "oven-7"]) == 1
    assert "Client not found" in capsys.readouterr().err


def test_issue_takes_a_password_from_stdin(
    dynsec_mosquitto: MosquittoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _env(monkeypatch, dynsec_mosquitto)
    monkeypatch.setattr("sys.stdin", io.StringIO("a-password-from-the-factory\n"))
    assert main(["devices", "credentials", "issue", "--password-stdin", "fridge-1"]) == 0
    assert capsys.readouterr().out.strip() == "a-password-from-the-factory"
    _publishes(dynsec_mosquitto, "fridge-1", "a-password-from-the-factory")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["devices", "credentials", "issue", "--password-stdin", "fridge-2"]) == 2
    assert "at least 12" in capsys.readouterr().err


def test_commands_reach_the_fixloop_up_broker_of_the_data_folder(
    make_mosquitto: MakeMosquitto,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "stack"
    data.mkdir()
    (data / "fleet_secret").write_text(FLEET_SECRET + "\n")
    broker = make_mosquitto(
        root=data / "mosquitto", dynsec_admin_password=local_admin_password(FLEET_SECRET)
    )
    (data / "ports.json").write_text(json.dumps({"mqtt": broker.port}))
    monkeypatch.setenv("FIXLOOP_BROKER__ACCOUNTS", "dynsec")
    monkeypatch.setenv("FIXLOOP_STACK__DATA_DIR", str(data))
    assert main(["devices", "credentials", "issue", "--derived", "sim-42"]) == 0
    assert capsys.readouterr().out.strip() == device_pw("sim-42")
    _publishes(broker, "sim-42", device_pw("sim-42"))


def test_local_admin_password_is_the_stack_service_password_of_the_administrator() -> None:
    assert local_admin_password(FLEET_SECRET) == service_password(FLEET_SECRET, DYNSEC_ADMIN_USER)


def test_credentials_need_the_plugin_and_an_administrator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FIXLOOP_STACK__DATA_DIR", str(tmp_path / "none"))
    assert main(["devices", "credentials", "list"]) == 2
    assert 'broker.accounts = "dynsec"' in capsys.readouterr().err
    monkeypatch.setenv("FIXLOOP_BROKER__ACCOUNTS", "dynsec")
    assert main(["devices", "credentials", "list"]) == 2
    assert "FIXLOOP_BROKER__ADMIN_PASSWORD" in capsys.readouterr().err
