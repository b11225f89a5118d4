"""The production broker with accounts in the dynamic-security plugin.

``docker/compose.dynsec.yaml`` swaps the broker's config for ``mosquitto-dynsec.conf``
and gives the plugin a folder it may write; ``python -m fixloop.broker dynsec-init``
writes the plugin's first file, which a real mosquitto (2.0, as Debian ships it) loads
here: the services, operators, a login-only healthcheck account and the listed devices
can do what the ACL file lets them do, and nothing more.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import FLEET_SECRET, MakeMosquitto, device_pw

from fixloop.broker import DYNSEC_ADMIN_USER
from fixloop.broker_cli import DOCKER_DYNSEC_FILE, DOCKER_DYNSEC_PLUGIN, docker_files, main
from fixloop.dynsec import DynsecClient
from wire.errors import ConfigError, PermanentError
from wire.mqtt import MqttClient

DOCKER = Path(__file__).resolve().parent.parent / "docker"
WAIT_S = 10.0


def _conf(text: str) -> dict[str, str]:
    pairs = (line.split(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key: value for key, value in pairs}


def test_dynsec_broker_config_loads_the_plugin_instead_of_the_files() -> None:
    conf = docker_files()["mosquitto/mosquitto-dynsec.conf"]
    settings = _conf(conf)
    assert settings["plugin"] == DOCKER_DYNSEC_PLUGIN == "/usr/lib/mosquitto_dynamic_security.so"
    assert settings["plugin_opt_config_file"] == DOCKER_DYNSEC_FILE
    assert "password_file" not in settings
    assert "acl_file" not in settings
    assert settings["allow_anonymous"] == "false"
    assert settings["per_listener_settings"] == "false"  # the plugin covers every listener
    # everything else is the file-based broker's configuration
    plain = docker_files()["mosquitto/mosquitto.conf"]
    drop = re.compile(r"^(plugin|plugin_opt_config_file|password_file|acl_file) |^#")
    kept = [line for line in conf.splitlines() if not drop.match(line)]
    assert kept == [line for line in plain.splitlines() if not drop.match(line)]


def test_compose_overlay_swaps_the_broker_config_and_lets_the_plugin_write() -> None:
    base = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    overlay = yaml.safe_load((DOCKER / "compose.dynsec.yaml").read_text(encoding="utf-8"))
    assert set(overlay["services"]) == {"mosquitto", "notifier"}

    def by_target(volumes: list[str]) -> dict[str, str]:
        return {v.split(":")[1]: v for v in volumes}

    # Compose merges a service's volumes by target (compose-spec, merge rules).
    merged = by_target(base["services"]["mosquitto"]["volumes"])
    merged.update(by_target(overlay["services"]["mosquitto"]["volumes"]))
    conf = merged["/mosquitto/config/mosquitto.conf"]
    assert conf == "./mosquitto/mosquitto-dynsec.conf:/mosquitto/config/mosquitto.conf:ro"
    plugin_dir = str(Path(DOCKER_DYNSEC_FILE).parent)
    assert merged[plugin_dir] == f"./mosquitto/dynsec:{plugin_dir}"  # writable: no ":ro"
    assert "/mosquitto/data" in merged  # the persistence volume stays
    assert (DOCKER / "mosquitto" / "mosquitto-dynsec.conf").is_file()

    env = overlay["services"]["notifier"]["environment"]
    assert env["FIXLOOP_BROKER__ACCOUNTS"] == "dynsec"
    assert env["FIXLOOP_BROKER__ADMIN_PASSWORD"].startswith("${BROKER_ADMIN_PASSWORD:?")
    ignored = (DOCKER / ".gitignore").read_text(encoding="utf-8").split()
    assert "mosquitto/dynsec/" in ignored  # the accounts stay on the host


def _env() -> dict[str, str]:
    return {
        "ADMIN_PW": "admin-password-0123",
        "GW_PW": "gateway-password-0123",
        "OPS_PW": "ops-password-0123",
        "HEALTH_PW": "health-password-0123",
        "FIXLOOP_STACK__FLEET_SECRET": FLEET_SECRET,
    }


def _init_argv(out: Path, devices: Path) -> list[str]:
    return [
        "dynsec-init",
        str(out),
        "--admin-password-env",
        "ADMIN_PW",
        "--user",
        "fixloop-gateway=GW_PW",
        "--ops",
        "ops=OPS_PW",
        "--login",
        "fixloop-health=HEALTH_PW",
        "--devices",
        str(devices),
    ]


def _client(port: int, user: str, password: str) -> MqttClient:
    return MqttClient(
        "127.0.0.1",
        port,
        client_id=f"{user}-t",
        username=user,
        password=password,
        connect_timeout_s=WAIT_S,
        publish_timeout_s=WAIT_S,
    )


async def test_first_file_of_dynsec_init_runs_a_real_broker(
    make_mosquitto: MakeMosquitto, tmp_path: Path
) -> None:
    env = _env()
    devices = tmp_path / "devices.txt"
    devices.write_text("# the first batch\nwasher:0001\nboiler-0002\n\n")
    root = tmp_path / "broker"
    first = root / "dynamic-security.json"
    assert main(_init_argv(first, devices), env) == 0
    assert first.stat().st_mode & 0o777 == 0o600
    # the broker starts on this file (it writes its own only when there is none)
    broker = make_mosquitto(root=root, users={}, device_ids=(), dynsec_admin_password="unused")
    port = broker.port
    for device_id in ("washer:0001", "boiler-0002"):  # ':' is fine without a password file
        async with _client(port, device_id, device_pw(device_id)) as device:
            await device.publish(f"devices/{device_id}/telemetry", b"{}", qos=1)
    async with _client(port, "fixloop-gateway", env["GW_PW"]) as gateway:
        await gateway.subscribe("devices/+/telemetry", "fleet/#")
    async with _client(port, "ops", env["OPS_PW"]) as ops:
        await ops.publish("anything", b"x", qos=1)
    async with _client(port, "fixloop-health", env["HEALTH_PW"]) as health:
        with pytest.raises(PermanentError, match="0x87"):
            await health.publish("fixloop/health", b"", qos=1)
    async with DynsecClient(_client(port, DYNSEC_ADMIN_USER, env["ADMIN_PW"])) as admin:
        accounts = {a.username for a in await admin.device_accounts()}
    assert accounts == {"washer:0001", "boiler-0002"}
    with pytest.raises(ConfigError):
        await _client(port, DYNSEC_ADMIN_USER, "unused").connect()


def test_dynsec_init_never_overwrites_the_live_accounts_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _env()
    devices = tmp_path / "devices.txt"
    devices.write_text("dev-1\n")
    out = tmp_path / "dynsec" / "dynamic-security.json"
    assert main(_init_argv(out, devices), env) == 0
    before = out.read_text()
    assert main(_init_argv(out, devices), env) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*_init_argv(out, devices), "--force"], env) == 0
    assert out.read_text() != before  # new salts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ADMIN_PW": ""}, "ADMIN_PW is not set"),
        ({"GW_PW": ""}, "GW_PW is not set"),
        ({"FIXLOOP_STACK__FLEET_SECRET": ""}, "FIXLOOP_STACK__FLEET_SECRET is not set"),
    ],
)
def test_dynsec_init_refuses_missing_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text("dev-1\n")
    out = tmp_path / "dynamic-security.json"
    assert main(_init_argv(out, devices), {**_env(), **change}) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert os.listdir(tmp_path) == ["devices.txt"]
