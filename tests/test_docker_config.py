"""The shipped deployment files: the broker's match the code, the stack can be operated.

``compose.yaml`` is rendered here the way ``docker compose config`` would, with
``.env.example`` (the YAML parsed with its anchors and merge keys, then ``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` replaced in every value), and each
property of an operable stack is checked on the result: one image built once, a
healthcheck on every service and ``service_healthy`` dependencies, metrics bound where
the compose network reaches them, commands the real CLI parser takes, ``FIXLOOP_``
variables that are real settings (and load), the Docker ignore file, the monitoring
profile with Prometheus targets and Grafana provisioning that match the services.
The healthcheck commands themselves are run against real endpoints and a real broker.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FLEET_SECRET as FLEET_SECRET_OF_TESTS

from dashboard.influxql import Measurements
from dashboard.service import DashboardService
from dashboard.settings import DashboardSettings
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from fixloop.broker import (
    DASHBOARD_USER,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DOCKER_SERVICE_USERS,
    GATEWAY_USER,
    STALL_BUDGET_S,
    STALL_DESIGN_RATE,
    Listener,
    hash_password,
    render_acl,
    render_mosquitto_conf,
    render_password_file,
)
from fixloop.broker_cli import docker_files, main
from fixloop.cli import _parser
from fixloop.config import load_settings
from fixloop.observe import (
    ServiceEndpoint,
    dashboard_metrics,
    diagnostics_metrics,
    notifier_metrics,
)
from fixloop.server import free_port
from fixloop.settings import Settings
from fixloop.stack import MosquittoServer
from gateway.metrics import GatewayMetrics
from notifier.service import NotifierService
from notifier.settings import NotifierSettings
from wire.errors import BrokerUnavailableError, PermanentError
from wire.influx import InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol.credentials import device_password
from wire.settings import MqttSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
FIXLOOP_SERVICES = ("gateway", "diagnostics", "notifier", "dashboard")
CORE = ("mosquitto", "influxdb", *FIXLOOP_SERVICES)
MONITORING = ("prometheus", "grafana")
#: Files and folders the operator makes on the host (README.md in docker/).
HOST_MADE = {"./mosquitto/passwd", "./certs", "./secrets"}
#: The settings section whose metrics_host/metrics_port each fixloop service serves on.
METRICS_SECTION = {name: name.upper() for name in FIXLOOP_SERVICES}


# -- rendering compose.yaml as docker compose does ---------------------------------------


class InterpolationError(Exception):
    """A required variable is missing (``${VAR:?error}``) or the syntax is not known."""


_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VARIABLE = re.compile(
    rf"\$(?:(?P<escaped>\$)|(?P<bare>{_NAME})|\{{(?P<braced>{_NAME})"
    r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bad>))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replace compose variables in one value, as ``docker compose`` does.

    ``$$`` is a literal ``$``; ``$VAR`` and ``${VAR}`` the value (empty when unset);
    ``${VAR:-default}`` the default when unset or empty, ``${VAR-default}`` when unset;
    ``${VAR:?error}`` fails when unset or empty, ``${VAR?error}`` when unset.

    Raises:
        InterpolationError: a required variable is missing, or a ``$`` starts nothing
            known.
    """

    def one(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bare"):
            return env.get(match.group("bare"), "")
        name = match.group("braced")
        if name is None:
            raise InterpolationError(f"invalid interpolation at {text[match.start() :]!r}")
        value, op, arg = env.get(name), match.group("op"), match.group("arg") or ""
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else str(value)
        if op in (":?", "?") and missing:
            raise InterpolationError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """Read a compose ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        assert sep, f"{path}:{number}: not KEY=VALUE"
        assert re.fullmatch(_NAME, key), f"{path}:{number}: not a variable name"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


def render(text: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model of ``text`` with ``env``: YAML (anchors, merges), then variables."""
    model = yaml.safe_load(text)
    assert isinstance(model, dict)
    # x- extension fields are only there to be referenced
    model = {key: value for key, value in model.items() if not key.startswith("x-")}
    return dict(_interpolate_tree(model, env))


EXAMPLE_ENV = read_env_file(ENV_EXAMPLE)


@cache
def _rendered_text() -> str:
    return json.dumps(render(COMPOSE.read_text(encoding="utf-8"), EXAMPLE_ENV))


def rendered() -> dict[str, Any]:
    """compose.yaml rendered with .env.example (a fresh copy each call)."""
    model: dict[str, Any] = json.loads(_rendered_text())
    return model


@pytest.mark.parametrize("rel", sorted(docker_files()))
def test_committed_broker_files_are_the_rendered_ones(rel: str) -> None:
    committed = (DOCKER / rel).read_text(encoding="utf-8")
    assert committed == docker_files()[rel], (
        f"docker/{rel} is stale: run `python -m fixloop.broker --docker`"
    )


def test_the_generator_entry_point_writes_them(tmp_path: Path) -> None:
    assert main(["--docker", "--output-dir", str(tmp_path)], environ={}) == 0
    for rel, text in docker_files().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text


def test_docker_broker_config_is_deliberate() -> None:
    conf = docker_files()["mosquitto/mosquitto.conf"]
    settings = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1]
        for line in conf.splitlines()
        if line and not line.startswith("#") and " " in line
    }
    assert settings["allow_anonymous"] == "false"
    assert settings["per_listener_settings"] == "false"
    assert settings["persistence"] == "true"
    # Durability bound: saved every second, by time, not by change count.
    assert settings["autosave_interval"] == "1"
    assert settings["autosave_on_changes"] == "false"
    # Queue bounds from the stated stall budget, never unbounded.
    assert DEFAULT_MAX_QUEUED_MESSAGES == STALL_BUDGET_S * STALL_DESIGN_RATE
    assert settings["max_queued_messages"] == str(DEFAULT_MAX_QUEUED_MESSAGES)
    assert settings["max_queued_bytes"] == str(DEFAULT_MAX_QUEUED_BYTES)
    assert int(settings["max_queued_bytes"]) > 0
    assert settings["password_file"] == "/mosquitto/config/passwd"
    assert settings["acl_file"] == "/mosquitto/config/acl"
    assert settings["persistence_location"] == "/mosquitto/data/"
    assert "user" not in settings  # the image already runs as its mosquitto user
    # The TLS listener carries its certificate; the plain one has none after it.
    tls = conf.split("listener 8883", 1)[1].split("listener ", 1)[0]
    assert "certfile /mosquitto/certs/server.crt" in tls
    assert "keyfile /mosquitto/certs/server.key" in tls
    assert conf.rstrip().endswith("listener 1883")


def test_docker_acl_knows_every_service_user() -> None:
    acl = docker_files()["mosquitto/acl"]
    users = re.findall(r"^user (\S+)$", acl, flags=re.MULTILINE)
    assert users == [*DOCKER_SERVICE_USERS, "ops"]
    assert "pattern write devices/%u/telemetry" in acl
    assert "%c" not in acl
    # The gateway reads the broker's drop counter to make drops visible.
    gateway = acl.split(f"user {GATEWAY_USER}\n", 1)[1].split("\nuser ", 1)[0]
    assert "topic read $SYS/broker/publish/messages/dropped" in gateway


def _acl_blocks(text: str) -> dict[str, list[str]]:
    """The ACL file's ``user`` blocks: user -> its rule lines (comments left out)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("user "):
            current = blocks.setdefault(line.split(" ", 1)[1], [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return blocks


def test_the_shipped_acl_lets_the_dashboard_only_read_fleet_topics() -> None:
    blocks = _acl_blocks((DOCKER / "mosquitto" / "acl").read_text(encoding="utf-8"))
    assert blocks[DASHBOARD_USER] == ["topic read fleet/#"]
    for user in ("fixloop-gateway", "fixloop-diagnostics", "fixloop-notifier"):
        assert "topic readwrite fleet/#" in blocks[user], user
        assert "topic write devices/+/commands" in blocks[user], user
    # the EMQX cluster's rules say the same
    emqx = (DOCKER / "emqx" / "acl.conf").read_text(encoding="utf-8")
    writers = [line for line in emqx.splitlines() if "publish" in line or " all, [" in line]
    assert writers
    assert not any("dashboard" in line for line in writers), writers
    assert '{allow, {username, "fixloop-dashboard"}, subscribe, ["fleet/#"]}.' in emqx


async def test_the_shipped_acl_on_a_real_broker_keeps_the_dashboard_read_only(
    make_mosquitto: Any,
) -> None:
    passwords = {GATEWAY_USER: "gw-pw-0123", "fixloop-notifier": "nt-pw-0123"}
    passwords[DASHBOARD_USER] = "db-pw-0123"
    broker: MosquittoServer = make_mosquitto(
        users=passwords, acl_file=DOCKER / "mosquitto" / "acl", connection_messages=False
    )
    device_id = "dev-001"  # a device of the fixture's fleet

    def client(user: str, password: str, client_id: str) -> MqttClient:
        return MqttClient(
            broker.host,
            broker.port,
            client_id=client_id,
            username=user,
            password=password,
            connect_timeout_s=10,
            publish_timeout_s=10,
        )

    async def next_topic(listener: MqttClient) -> str:
        assert await listener.wait_messages(10), "no message came"
        (message,) = listener.take(1)
        return message.topic

    async with (
        client(DASHBOARD_USER, passwords[DASHBOARD_USER], "acl-dashboard") as dashboard,
        client("fixloop-notifier", passwords["fixloop-notifier"], "acl-notifier") as notifier,
        client(device_id, device_password(FLEET_SECRET_OF_TESTS, device_id), "acl-dev") as device,
    ):
        await dashboard.subscribe("fleet/#", qos=1)
        await notifier.subscribe("fleet/#", qos=1)
        await device.subscribe(f"devices/{device_id}/commands", qos=1)
        await notifier.publish("fleet/cases", b"case", qos=1)
        assert await next_topic(dashboard) == "fleet/cases"
        assert await next_topic(notifier) == "fleet/cases"
        # what the dashboard sends is refused: no case change, no command reaches anyone
        for topic in ("fleet/cases", f"devices/{device_id}/commands"):
            with pytest.raises(PermanentError, match="0x87"):
                await dashboard.publish(topic, b"forged", qos=1)
        # the notifier's command does arrive, so the device was listening all along
        await notifier.publish(f"devices/{device_id}/commands", b"go", qos=1)
        assert await next_topic(device) == f"devices/{device_id}/commands"
        # device topics are not the dashboard's to read (Mosquitto grants a wildcard
        # subscription and checks each message as it is sent)
        await dashboard.subscribe("devices/#", qos=1)
        await notifier.subscribe("devices/#", qos=1)
        await device.publish(f"devices/{device_id}/telemetry", b"{}", qos=1)
        assert await next_topic(notifier) == f"devices/{device_id}/telemetry"
        await notifier.publish("fleet/cases", b"after", qos=1)
        assert await next_topic(notifier) == "fleet/cases"
        assert await next_topic(dashboard) == "fleet/cases"  # the case, not the telemetry
        assert not dashboard.take(10)


def test_the_device_listener_takes_client_ids_from_user_names() -> None:
    conf = docker_files()["mosquitto/mosquitto.conf"]
    devices = conf.split("listener 8883", 1)[1].split("listener ", 1)[0]
    services = conf.split("listener 1883", 1)[1]
    assert "use_username_as_clientid true" in devices.splitlines()
    assert "use_username_as_clientid" not in services  # services pick their own ids
    assert docker_files()["mosquitto/mosquitto-dynsec.conf"].endswith(
        conf[conf.index("listener 8883") :]
    )


async def test_a_device_cannot_push_a_service_off_with_its_client_id(tmp_path: Path) -> None:
    """A real mosquitto with the shipped listener options, TLS aside."""
    service_port, device_port = free_port(), free_port()
    passwords = {GATEWAY_USER: "gw-pw-0123", "dev-001": "device-pw-0123"}
    (tmp_path / "passwd").write_text(render_password_file(passwords))
    (tmp_path / "acl").write_text(render_acl(service_users=[GATEWAY_USER]))
    conf = render_mosquitto_conf(
        listeners=(
            Listener(service_port, "127.0.0.1"),
            Listener(device_port, "127.0.0.1", username_as_client_id=True),
        ),
        data_dir=f"{tmp_path / 'data'}/",
        password_file=str(tmp_path / "passwd"),
        acl_file=str(tmp_path / "acl"),
        persistence=False,
        log_file=str(tmp_path / "mosquitto.log"),
        run_as_user=getpass.getuser(),
    )
    (tmp_path / "mosquitto.conf").write_text(conf)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = await asyncio.create_subprocess_exec(binary, "-c", str(tmp_path / "mosquitto.conf"))

    def client(port: int, user: str, client_id: str) -> MqttClient:
        return MqttClient(
            "127.0.0.1",
            port,
            client_id=client_id,
            username=user,
            password=passwords[user],
            connect_timeout_s=10,
            publish_timeout_s=10,
        )

    async def connected(mqtt: MqttClient) -> MqttClient:
        async with asyncio.timeout(10):
            while True:
                try:
                    await mqtt.connect()
                    return mqtt
                except BrokerUnavailableError:
                    await asyncio.sleep(0.05)

    async def keep_publishing(mqtt: MqttClient) -> None:
        async with asyncio.timeout(10):
            while True:
                await mqtt.publish("devices/dev-001/commands", b"x", qos=1)
                await asyncio.sleep(0.05)

    try:
        gateway = await connected(client(service_port, GATEWAY_USER, "fixloop-gateway"))
        await gateway.subscribe("devices/#", qos=1)
        # the device asks for the gateway's id on its own listener: it gets its own
        async with client(device_port, "dev-001", "fixloop-gateway") as device:
            await device.publish("devices/dev-001/telemetry", b"{}", qos=1)
            assert await gateway.wait_messages(10)
            assert [m.topic for m in gateway.take(10)] == ["devices/dev-001/telemetry"]
            await gateway.publish("devices/dev-001/commands", b"still here", qos=1)
            assert gateway.connected
        # without the option, the same device takes the id and the gateway is pushed off
        async with client(service_port, "dev-001", "fixloop-gateway"):
            with pytest.raises(BrokerUnavailableError):
                await keep_publishing(gateway)
        await gateway.disconnect()
    finally:
        broker.terminate()
        await broker.wait()


def test_service_client_ids_are_stable_where_a_session_is_kept_and_per_process_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    services = rendered()["services"]
    mqtt, influx = MqttSettings(), InfluxSettings()
    notifier_settings = _settings_of(services["notifier"]).notifier
    one = NotifierService(mqtt, influx, notifier_settings)
    two = NotifierService(mqtt, influx, notifier_settings)
    # the diagnoses consumer's persistent session: the configured id, at every start
    assert notifier_settings.client_id == "fixloop-notifier"
    # its session-less clients: a suffix of the process
    for made in (one, two):
        assert re.fullmatch(r"fixloop-notifier-commands-[0-9a-f]{8}", made.command_client_id)
        assert re.fullmatch(r"fixloop-notifier-cases-[0-9a-f]{8}", made.publisher_client_id)
    assert one.command_client_id != two.command_client_id
    assert one.publisher_client_id != two.publisher_client_id
    dashboard = _settings_of(services["dashboard"])
    first, second = (
        DashboardService(mqtt, influx, dashboard.dashboard, db_path=Path("unused")).client_id
        for _ in range(2)
    )
    assert first != second
    assert first.startswith("fixloop-dashboard-")
    # the sessions' ids come from settings: stable across restarts and recreated containers
    assert _settings_of(services["gateway"]).gateway.client_id == "fixloop-gateway"
    assert _settings_of(services["diagnostics"]).diagnostics.client_id == "fixloop-diagnostics"


def test_compose_file_textually() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert "\t" not in text
    for needle in (
        "image: eclipse-mosquitto:2",
        "image: influxdb:2.7",
        "dockerfile: docker/Dockerfile",
        '"8883:8883"',
        '"127.0.0.1:1883:1883"',
        "./mosquitto/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro",
        "./mosquitto/acl:/mosquitto/config/acl:ro",
        "./mosquitto/passwd:/mosquitto/config/passwd:ro",
        "DOCKER_INFLUXDB_INIT_MODE: setup",
        "FIXLOOP_INFLUX__FLAVOR: v2",
        "FIXLOOP_INFLUX__URL: http://influxdb:8086",
        f"FIXLOOP_MQTT__USERNAME: {GATEWAY_USER}",
    ):
        assert needle in text, needle
    # Plain MQTT is never published on every host interface.
    assert '"1883:1883"' not in text


def test_compose_file_structure() -> None:
    compose = rendered()
    services = compose["services"]
    assert set(services) == {*CORE, *MONITORING}
    for name in FIXLOOP_SERVICES:
        service = services[name]
        assert service["command"] == [name]
        env = service["environment"]
        assert env["FIXLOOP_MQTT__USERNAME"] == f"fixloop-{name}"
        assert env["FIXLOOP_MQTT__HOST"] == "mosquitto"
        assert env["FIXLOOP_INFLUX__FLAVOR"] == "v2"
        assert env["FIXLOOP_INFLUX__URL"] == "http://influxdb:8086"
        assert env["FIXLOOP_INFLUX__TOKEN"] == EXAMPLE_ENV["INFLUXDB_TOKEN"]
    assert services["notifier"]["environment"]["FIXLOOP_NOTIFIER__DB_PATH"].startswith(
        "/var/lib/fixloop/"
    )
    mosquitto = services["mosquitto"]
    assert mosquitto["ports"] == ["8883:8883", "127.0.0.1:1883:1883"]
    assert services["gateway"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    init = services["influxdb"]["environment"]
    assert init["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for key in ("ORG", "BUCKET", "RETENTION", "ADMIN_TOKEN"):
        assert f"DOCKER_INFLUXDB_INIT_{key}" in init
    # Every named volume a service mounts is declared.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                assert source in compose["volumes"], source
    # Mounted files exist in the repository (the secrets are made on the host).
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./") and source not in HOST_MADE:
                assert (DOCKER / source).exists(), source
    # Host ports are on loopback, except the devices' TLS listener.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:") or port == "8883:8883", (name, port)


def test_dockerfile_runs_the_gateway() -> None:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM python:3.11-slim" in text.splitlines()
    assert "RUN pip install /src" in text
    assert 'ENTRYPOINT ["fixloop"]' in text
    assert 'CMD ["gateway"]' in text
    assert "USER fixloop" in text
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert {".git", "tests", "docker", ".fixloop"} <= set(ignored)


def test_secrets_are_git_ignored() -> None:
    ignored = (DOCKER / ".gitignore").read_text(encoding="utf-8").split()
    assert {".env", "mosquitto/passwd", "certs/"} <= set(ignored)


def test_readme_documents_the_commands_that_exist() -> None:
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "python -m fixloop.broker --docker" in text
    assert "python -m fixloop.broker passwd docker/mosquitto/passwd" in text
    assert "docker/certs/server.crt" in text


def test_references_to_the_deployment_readme_name_its_sections() -> None:
    """A comment sending the reader to ``docker/README.md, "Section"`` finds that section."""
    headings = [
        line.lstrip("#").strip()
        for line in (DOCKER / "README.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    ]
    files = [*sorted(DOCKER.glob("compose*.yaml")), DOCKER / ".env.example"]
    found = 0
    for path in files:
        text = " ".join(
            line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
        )
        for name in re.findall(r'docker/README\.md,\s*"([^"]+)"', text):
            found += 1
            assert any(h.lower().startswith(name.lower()) for h in headings), (path.name, name)
    assert found >= 3
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Broker accounts at run time", 1)[1].split("\n## ", 1)[0]
    for words in ("password file", "devices credentials issue", "devices credentials revoke"):
        assert words in section, words


def test_passwd_entry_point_writes_a_private_password_file(tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text("# fleet\ndev-1\n\ndev-2\n")
    out = tmp_path / "passwd"
    environ = {"GW_PW": "gateway-pw", "FIXLOOP_STACK__FLEET_SECRET": "fleet-secret-123456"}
    argv = ["passwd", str(out), "--user", f"{GATEWAY_USER}=GW_PW", "--devices", str(devices)]
    assert main(argv, environ=environ) == 0
    assert out.stat().st_mode & 0o077 == 0
    expected = {
        GATEWAY_USER: "gateway-pw",
        "dev-1": device_password("fleet-secret-123456", "dev-1"),
        "dev-2": device_password("fleet-secret-123456", "dev-2"),
    }
    lines = dict(line.split(":", 1) for line in out.read_text().splitlines())
    assert set(lines) == set(expected)
    for user, hashed in lines.items():
        salt = base64.b64decode(hashed.split("$")[3])
        assert hash_password(expected[user], salt=salt) == hashed


def test_passwd_entry_point_refuses_a_missing_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["passwd", str(tmp_path / "passwd"), "--user", f"{GATEWAY_USER}=UNSET_VAR"]
    assert main(argv, environ={}) == 1
    assert "UNSET_VAR is not set" in capsys.readouterr().err
    assert not (tmp_path / "passwd").exists()


def test_emqx_cluster_file_replaces_the_broker_with_durable_replicated_sessions() -> None:
    # For production, a broker whose durable sessions survive a node crash.
    base: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    text = (DOCKER / "compose.emqx.yaml").read_text(encoding="utf-8")
    cluster: dict[str, Any] = yaml.safe_load(text)
    services = cluster["services"]
    assert services["mosquitto"] == {"profiles": ["single-broker"]}
    nodes = [services[f"emqx{i}"] for i in (1, 2, 3)]
    names = {node["environment"]["EMQX_NODE__NAME"] for node in nodes}
    assert names == {f"emqx@emqx{i}.fixloop" for i in (1, 2, 3)}
    for node in nodes:
        env = node["environment"]
        assert env["EMQX_DURABLE_SESSIONS__ENABLE"] == "true"
        assert env["EMQX_DURABLE_STORAGE__MESSAGES__REPLICATION_FACTOR"] == "3"
        assert env["EMQX_CLUSTER__STATIC__SEEDS"].count("emqx@") == 3
        assert env["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"
        # devices' client ids are their user names, as on Mosquitto's device listener
        zone = env["EMQX_LISTENERS__SSL__DEFAULT__ZONE"]
        assert env[f"EMQX_ZONES__{zone.upper()}__MQTT__USE_USERNAME_AS_CLIENTID"] == "true"
        assert not any(k.startswith("EMQX_LISTENERS__TCP__") for k in env)  # services pick
        assert "broker" in node["networks"]["default"]["aliases"]
        assert any(v.endswith(":/opt/emqx/data") for v in node["volumes"])
        assert f"{node['volumes'][-1].split(':')[0]}" in cluster["volumes"]
    for name in FIXLOOP_SERVICES:
        assert name in base["services"]
        assert services[name]["environment"]["FIXLOOP_MQTT__HOST"] == "broker"
        assert services[name]["depends_on"]["mosquitto"]["required"] is False
    acl = (DOCKER / "emqx" / "acl.conf").read_text(encoding="utf-8")
    assert '"devices/${username}/telemetry"' in acl
    assert acl.rstrip().endswith("{deny, all}.")
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "compose.emqx.yaml" in readme


# -- the rendering itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("$A/b", {"A": "x"}, "x/b"),
        ("${A}", {}, ""),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:-}", {}, ""),
        ("${A:?set A}", {"A": "v"}, "v"),
        ("$$HOME and $${A}", {"A": "x"}, "$HOME and ${A}"),
        ("pre-${A:-http://h:1/p}-post", {}, "pre-http://h:1/p-post"),
    ],
)
def test_interpolation_as_compose_does_it(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    ("text", "env", "error"),
    [
        ("${A:?set A in .env}", {}, "A: set A in .env"),
        ("${A:?set A in .env}", {"A": ""}, "A: set A in .env"),
        ("${A?gone}", {}, "A: gone"),
        ("cost: 5$", {}, "invalid interpolation"),
    ],
)
def test_interpolation_refuses(text: str, env: dict[str, str], error: str) -> None:
    with pytest.raises(InterpolationError, match=re.escape(error)):
        interpolate(text, env)


def test_the_example_env_sets_every_required_variable() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = set(re.findall(rf"\$\{{({_NAME}):\?", text))
    assert required >= {"INFLUXDB_TOKEN", "NOTIFIER_LINK_SECRET", "HEALTHCHECK_MQTT_PASSWORD"}
    assert required <= set(EXAMPLE_ENV), sorted(required - set(EXAMPLE_ENV))
    # every variable compose.yaml reads is explained in the example
    used = set(re.findall(rf"\$\{{({_NAME})", text))
    assert used <= set(EXAMPLE_ENV), sorted(used - set(EXAMPLE_ENV))
    # and without one the stack does not render
    without = {k: v for k, v in EXAMPLE_ENV.items() if k != "NOTIFIER_LINK_SECRET"}
    with pytest.raises(InterpolationError, match=r"set NOTIFIER_LINK_SECRET in \.env"):
        render(text, without)


# -- one image, healthchecks, dependencies --------------------------------------------------


def test_one_image_is_built_once_and_runs_every_fixloop_service() -> None:
    services = rendered()["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["gateway"]
    images = {services[name]["image"] for name in FIXLOOP_SERVICES}
    assert images == {EXAMPLE_ENV["FIXLOOP_IMAGE"]}
    # the others never pull what the build makes (a pull would fail or fetch another)
    for name in FIXLOOP_SERVICES:
        assert services[name]["pull_policy"] == "never", name
    # no other service runs that image or builds anything
    others = [s.get("image") for n, s in services.items() if n not in FIXLOOP_SERVICES]
    assert EXAMPLE_ENV["FIXLOOP_IMAGE"] not in others
    build = services["gateway"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def test_every_service_has_a_healthcheck() -> None:
    for name, service in rendered()["services"].items():
        check = service.get("healthcheck")
        assert check is not None, name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1, name
        for key in ("interval", "timeout", "retries"):
            assert key in check, (name, key)


def test_services_start_once_what_they_need_is_healthy() -> None:
    services = rendered()["services"]
    for name in FIXLOOP_SERVICES:
        needs = services[name]["depends_on"]
        assert {"mosquitto", "influxdb"} <= set(needs), name
    assert "notifier" in services["dashboard"]["depends_on"]
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, needed)
            assert "healthcheck" in services[needed], needed


def _probe_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    match = re.search(r"urlopen\('([^']+)'", test[3])
    assert match is not None, test
    return match.group(1)


def test_fixloop_healthchecks_probe_their_services_health() -> None:
    services = rendered()["services"]
    for name in FIXLOOP_SERVICES:
        env = services[name]["environment"]
        section = METRICS_SECTION[name]
        port = env[f"FIXLOOP_{section}__METRICS_PORT"]
        assert _probe_url(services[name]) == f"http://127.0.0.1:{port}/health", name


async def test_the_fixloop_healthcheck_command_follows_health(tmp_path: Path) -> None:
    """The healthcheck's own command, run against a real endpoint: 0 only while healthy."""
    test = rendered()["services"]["notifier"]["healthcheck"]["test"]
    problems: list[str] = []
    async with ServiceEndpoint(
        "probe", "127.0.0.1", 0, lambda: [], lambda: (list(problems), {})
    ) as endpoint:
        code = test[3].replace(":9110/", f":{endpoint.port}/")
        assert code != test[3]

        def probe() -> int:
            env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
            return subprocess.run(
                [sys.executable, "-c", code], capture_output=True, env=env, timeout=30
            ).returncode

        assert await asyncio.to_thread(probe) == 0
        problems.append("stage_down:digests")
        assert await asyncio.to_thread(probe) != 0
    assert await asyncio.to_thread(probe) != 0  # nothing listens


def test_the_broker_healthcheck_logs_in_for_real(make_mosquitto: Any, tmp_path: Path) -> None:
    """The broker's healthcheck command against a real mosquitto: a refused login fails."""
    service = rendered()["services"]["mosquitto"]
    kind, command = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    assert "-u fixloop-health" in command
    # compose handed "$$" on as "$": the shell reads the container's variable
    assert '-P "$HEALTHCHECK_MQTT_PASSWORD"' in command
    assert (
        service["environment"]["HEALTHCHECK_MQTT_PASSWORD"]
        == EXAMPLE_ENV["HEALTHCHECK_MQTT_PASSWORD"]
    )
    broker: MosquittoServer = make_mosquitto(users={"fixloop-health": "health-pw-123"})
    local = command.replace("-h 127.0.0.1 -p 1883", f"-h {broker.host} -p {broker.port}")
    assert local != command

    def check(password: str) -> int:
        env = {**os.environ, "HEALTHCHECK_MQTT_PASSWORD": password}
        return subprocess.run(["sh", "-c", local], env=env, timeout=30).returncode

    assert check("health-pw-123") == 0
    assert check("wrong") != 0
    broker.stop()
    assert check("health-pw-123") != 0


# -- metrics, commands, settings --------------------------------------------------------


def test_metrics_are_bound_where_the_compose_network_reaches_them() -> None:
    services = rendered()["services"]
    for name in FIXLOOP_SERVICES:
        service = services[name]
        section = METRICS_SECTION[name]
        env = service["environment"]
        assert env[f"FIXLOOP_{section}__METRICS_HOST"] == "0.0.0.0", name
        port = env[f"FIXLOOP_{section}__METRICS_PORT"]
        assert service["expose"] == [port], name
        settings = _settings_of(service)
        config = getattr(settings, name)
        assert (config.metrics_host, str(config.metrics_port)) == ("0.0.0.0", port)
    ports = [
        services[n]["environment"][f"FIXLOOP_{METRICS_SECTION[n]}__METRICS_PORT"]
        for n in FIXLOOP_SERVICES
    ]
    assert len(set(ports)) == len(ports)


def _parse_command(argv: list[str]) -> Any:
    try:
        return _parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        raise AssertionError(f"fixloop {' '.join(argv)}: refused by the CLI") from exc


def test_every_command_is_a_real_fixloop_command() -> None:
    services = rendered()["services"]
    for name in FIXLOOP_SERVICES:
        args = _parse_command(services[name]["command"])
        assert args.command == name
    dockerfile = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    default = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint == ["fixloop"]
    _parse_command(default)
    # and the one-off commands the README gives (docker compose run/exec SERVICE ...)
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    runs = re.findall(
        r"docker compose -f docker/compose\.yaml (?:run --rm(?: --no-deps)?|exec) (\w+) (.+)",
        readme,
    )
    assert {"ops-users", "train"} <= {argv.split()[0] for _, argv in runs}
    for service, argv in runs:
        assert service in FIXLOOP_SERVICES, service
        words = argv.split("#")[0].split()
        if words[0] == "fixloop":  # exec runs the command by name
            words = words[1:]
        _parse_command(words)


def _settings_fields(path: list[str]) -> bool:
    model: Any = Settings
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return True


def _settings_of(service: dict[str, Any]) -> Settings:
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith("FIXLOOP_")}
    return load_settings(None, env)


def _services_with_env() -> Iterator[tuple[str, dict[str, Any]]]:
    base = rendered()["services"]
    yield from base.items()
    emqx = render(
        (DOCKER / "compose.emqx.yaml").read_text(encoding="utf-8"),
        {**EXAMPLE_ENV, "EMQX_COOKIE": "c", "EMQX_LICENSE_KEY": "k"},
    )
    yield from ((f"emqx:{n}", s) for n, s in emqx["services"].items())
    # the other compose files shipped beside it (overlays, and the cluster profile)
    for overlay in sorted(DOCKER.glob("compose.*.yaml")):
        if overlay.name == "compose.emqx.yaml":
            continue
        text = overlay.read_text(encoding="utf-8")
        extra = {name: "x" for name in re.findall(rf"\$\{{({_NAME})", text)}
        model = render(text, {**extra, **EXAMPLE_ENV})
        yield from ((f"{overlay.name}:{n}", s) for n, s in model["services"].items())


def test_every_fixloop_variable_is_a_real_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fixloop.toml joins in
    seen = 0
    for name, service in _services_with_env():
        for key in service.get("environment", {}):
            if not key.startswith("FIXLOOP_"):
                continue
            seen += 1
            path = key.removeprefix("FIXLOOP_").lower().split("__")
            assert _settings_fields(path), f"{name}: {key} is no setting"
        if name in FIXLOOP_SERVICES:
            _settings_of(service)  # the example's values are valid, too
    assert seen > 40


def test_the_notifier_takes_push_links_and_public_url_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    notifier = rendered()["services"]["notifier"]
    settings = _settings_of(notifier).notifier
    assert settings.public_url == EXAMPLE_ENV["NOTIFIER_PUBLIC_URL"]
    assert settings.link_secret is not None
    assert settings.link_secret.get_secret_value() == EXAMPLE_ENV["NOTIFIER_LINK_SECRET"]
    # push settings left empty in .env are not set: those channels are not offered
    assert settings.push.fcm_service_account is None
    assert settings.push.vapid_private_key is None
    assert settings.push.ntfy_token is None
    assert settings.push.vapid_subject == EXAMPLE_ENV["VAPID_SUBJECT"]
    env = notifier["environment"]
    for key in ("FCM_SERVICE_ACCOUNT", "VAPID_PRIVATE_KEY", "VAPID_SUBJECT", "NTFY_TOKEN"):
        assert f"${{{key}:-}}" in COMPOSE.read_text(encoding="utf-8"), key
    filled = render(
        COMPOSE.read_text(encoding="utf-8"),
        {
            **EXAMPLE_ENV,
            "NTFY_TOKEN": "tk_123",
            "FCM_SERVICE_ACCOUNT": "/run/secrets/fixloop/a.json",
        },
    )["services"]["notifier"]
    push = _settings_of(filled).notifier.push
    assert push.ntfy_token is not None
    assert push.ntfy_token.get_secret_value() == "tk_123"
    assert str(push.fcm_service_account) == "/run/secrets/fixloop/a.json"
    assert any(v.endswith(":/run/secrets/fixloop:ro") for v in notifier["volumes"])
    assert env["FIXLOOP_NOTIFIER__API_HOST"] == "0.0.0.0"


def test_every_example_variable_is_read_by_a_compose_file() -> None:
    texts = [COMPOSE.read_text(encoding="utf-8")] + [
        path.read_text(encoding="utf-8") for path in sorted(DOCKER.glob("compose.*.yaml"))
    ]
    used = {name for text in texts for name in re.findall(rf"\$\{{({_NAME})", text)}
    assert set(EXAMPLE_ENV) <= used, sorted(set(EXAMPLE_ENV) - used)
    assert {
        "FIXLOOP_STACK__FLEET_SECRET",
        "NOTIFIER_OIDC_ISSUER",
        "NOTIFIER_OIDC_AUDIENCE",
        "NOTIFIER_OIDC_JWKS_URL",
        "BROKER_ADMIN_PASSWORD",
    } <= set(EXAMPLE_ENV)


def test_the_notifier_takes_the_fleet_secret_and_the_identity_provider_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    text = COMPOSE.read_text(encoding="utf-8")
    settings = _settings_of(rendered()["services"]["notifier"])
    # claims need it: the service never makes one up
    assert settings.stack.fleet_secret is not None
    assert (
        settings.stack.fleet_secret.get_secret_value()
        == (EXAMPLE_ENV["FIXLOOP_STACK__FLEET_SECRET"])
    )
    without = {k: v for k, v in EXAMPLE_ENV.items() if k != "FIXLOOP_STACK__FLEET_SECRET"}
    with pytest.raises(InterpolationError, match="FIXLOOP_STACK__FLEET_SECRET"):
        render(text, without)
    # left empty in the example: owners sign in with fixloop's tokens only
    assert settings.notifier.oidc.issuer is None
    idp = {
        "NOTIFIER_OIDC_ISSUER": "https://login.example.com/realms/acme",
        "NOTIFIER_OIDC_AUDIENCE": "https://api.example.com",
        "NOTIFIER_OIDC_JWKS_URL": "https://login.example.com/realms/acme/certs",
        "NOTIFIER_OIDC_AUTO_CREATE": "true",
    }
    oidc = _settings_of(render(text, {**EXAMPLE_ENV, **idp})["services"]["notifier"]).notifier.oidc
    assert (oidc.issuer, oidc.audience, oidc.jwks_url, oidc.auto_create) == (
        idp["NOTIFIER_OIDC_ISSUER"],
        idp["NOTIFIER_OIDC_AUDIENCE"],
        idp["NOTIFIER_OIDC_JWKS_URL"],
        True,
    )
    # the dynsec overlay's administrator password comes from the example as well
    overlay = render((DOCKER / "compose.dynsec.yaml").read_text(encoding="utf-8"), EXAMPLE_ENV)[
        "services"
    ]["notifier"]["environment"]
    assert overlay["FIXLOOP_BROKER__ADMIN_PASSWORD"] == EXAMPLE_ENV["BROKER_ADMIN_PASSWORD"]


def test_the_dashboard_reads_the_notifiers_case_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    services = rendered()["services"]
    notifier, dashboard = services["notifier"], services["dashboard"]
    store = Path(_settings_of(notifier).notifier.db_path)
    mount = {v.split(":")[1]: v.split(":")[0] for v in notifier["volumes"]}
    volume = mount[str(next(p for p in store.parents if str(p) in mount))]
    seen = _settings_of(dashboard)
    in_dashboard = {v.split(":")[0]: v.split(":")[1] for v in dashboard["volumes"]}
    assert seen.notifier.db_path == Path(in_dashboard[volume]) / store.name
    assert seen.dashboard.users_file.parent == Path("/var/lib/fixloop")
    assert seen.dashboard.host == "0.0.0.0"
    assert dashboard["ports"] == [f"127.0.0.1:{seen.dashboard.port}:{seen.dashboard.port}"]


# -- the Docker ignore file -----------------------------------------------------------------


def _ignore_patterns() -> list[str]:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex on context-relative paths (Go's Match, ``**``)."""
    parts = []
    for segment in pattern.strip("/").split("/"):
        if segment == "**":
            parts.append("(?:[^/]+/)*")
            continue
        text = "".join(
            "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment
        )
        parts.append(text + "/")
    return re.compile("".join(parts).removesuffix("/"))


def _ignored(path: str, patterns: list[re.Pattern[str]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_the_ignore_file_keeps_environments_settings_and_data_out() -> None:
    assert not any(p.startswith("!") for p in _ignore_patterns())
    patterns = [_pattern(p) for p in _ignore_patterns()]
    for path in (
        ".venv/lib/python3.11/site-packages/numpy/__init__.py",
        "sub/dir/.venv/bin/python",
        "fixloop.toml",
        "deploy/fixloop.toml",
        ".fixloop/cases.sqlite3",
        "data/cases.sqlite3",
        "data/cases.sqlite3-wal",
        "var/spool/segment-1",
        "models/diagnostics.pkl",
        "build/lib/gateway/service.py",
        "dist/fixloop-0.1.0.whl",
        ".git/HEAD",
        ".env",
        "docker/.env",
        "tests/test_cli.py",
        "gateway/__pycache__/service.cpython-311.pyc",
        "fixloop.egg-info/PKG-INFO",
    ):
        assert _ignored(path, patterns), path
    for path in (
        "pyproject.toml",
        "README.md",
        "gateway/spool.py",
        "dashboard/static/index.html",
        "diagnostics/products/washer.toml",
    ):
        assert not _ignored(path, patterns), path


def test_the_build_context_is_what_pip_install_needs() -> None:
    """Walk this checkout as ``docker build`` would send it."""
    patterns = [_pattern(p) for p in _ignore_patterns()]
    sent: list[Path] = []
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not _ignored((rel / d).as_posix(), patterns)]
        sent.extend(rel / f for f in files if not _ignored((rel / f).as_posix(), patterns))
    names = {p.as_posix() for p in sent}
    assert {"pyproject.toml", "README.md", "dashboard/static/index.html"} <= names
    for package in ("gateway", "diagnostics", "notifier", "dashboard", "device_sim", "fixloop"):
        assert f"{package}/__init__.py" in names, package
    assert any(n.startswith("diagnostics/products/") for n in names)
    assert not any(n.split("/")[0] in {".venv", ".git", "tests", "build", "docker"} for n in names)
    size = sum((ROOT / p).stat().st_size for p in sent if (ROOT / p).is_file())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB would be sent"


# -- monitoring: Prometheus and Grafana -----------------------------------------------------


@cache
def exported_metrics() -> frozenset[str]:
    """Every metric family name the fixloop services export."""
    mqtt, influx = MqttSettings(), InfluxSettings()
    families: list[str] = re.findall(r"^# TYPE (\S+) ", GatewayMetrics().render(), re.M)
    families += [
        m.name for m in diagnostics_metrics(DiagnosticsService(mqtt, influx, DiagnosticsSettings()))
    ]
    families += [
        m.name for m in notifier_metrics(NotifierService(mqtt, influx, NotifierSettings()))
    ]
    families += [
        m.name
        for m in dashboard_metrics(
            DashboardService(mqtt, influx, DashboardSettings(), db_path=Path("unused"))
        )
    ]
    return frozenset(families)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfixloop_[a-z0-9_]+", expr))


def test_the_monitoring_profile_holds_prometheus_and_grafana() -> None:
    services = rendered()["services"]
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"], name
    for name in CORE:
        assert "profiles" not in services[name], name  # the stack itself needs no profile
    grafana = services["grafana"]
    assert {"prometheus", "influxdb"} <= set(grafana["depends_on"])
    assert grafana["environment"]["INFLUXDB_TOKEN"] == EXAMPLE_ENV["INFLUXDB_TOKEN"]
    for name in MONITORING:
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), port


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to docker/) of a service's file mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def test_prometheus_scrapes_every_fixloop_service_where_it_serves() -> None:
    services = rendered()["services"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = DOCKER / mounts[config_flag.split("=", 1)[1]]
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for name in FIXLOOP_SERVICES:
        port = services[name]["environment"][f"FIXLOOP_{METRICS_SECTION[name]}__METRICS_PORT"]
        assert targets[name] == [f"{name}:{port}"], name
    for job, hosts in targets.items():
        for target in hosts:
            host = target.split(":")[0]
            assert host in services or host == "localhost", (job, target)
    assert targets["influxdb"] == ["influxdb:8086"]
    # alert rules: mounted where the config says, every fixloop metric a real one
    for rule_file in config["rule_files"]:
        rules = yaml.safe_load((DOCKER / mounts[rule_file]).read_text(encoding="utf-8"))
        exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
        assert exprs
        for expr in exprs:
            assert _metric_names(expr) <= exported_metrics(), expr


def test_grafana_is_provisioned_with_both_data_sources_and_the_fleet_dashboard() -> None:
    services = rendered()["services"]
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = DOCKER / mounts["/etc/grafana/provisioning"]
    sources: list[dict[str, Any]] = []
    for path in sorted((provisioning / "datasources").glob("*.yaml")):
        sources += yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]
    by_type = {source["type"]: source for source in sources}
    assert set(by_type) == {"prometheus", "influxdb"}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    influx = by_type["influxdb"]
    assert influx["url"] == "http://influxdb:8086"
    # Grafana fills these from its environment, which compose sets from .env
    assert influx["jsonData"]["dbName"] == "${INFLUXDB_BUCKET}"
    assert influx["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUXDB_TOKEN}"
    assert {"INFLUXDB_BUCKET", "INFLUXDB_TOKEN"} <= set(grafana["environment"])
    uids = {source["uid"]: source["type"] for source in sources}

    providers: list[dict[str, Any]] = []
    for path in sorted((provisioning / "dashboards").glob("*.yaml")):
        providers += yaml.safe_load(path.read_text(encoding="utf-8"))["providers"]
    folders = [DOCKER / mounts[p["options"]["path"]] for p in providers]
    boards = [json.loads(p.read_text(encoding="utf-8")) for f in folders for p in f.glob("*.json")]
    assert [board["uid"] for board in boards] == ["fixloop-fleet"]
    panels = [p for p in boards[0]["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    measurements = Measurements()
    written = {measurements.telemetry, measurements.health, measurements.events}
    kinds = set()
    for panel in panels:
        source = panel["datasource"]
        assert uids[source["uid"]] == source["type"], panel["title"]
        kinds.add(source["type"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source
            if source["type"] == "prometheus":
                assert _metric_names(target["expr"]) <= exported_metrics(), target["expr"]
            else:
                read = set(re.findall(r'FROM "([^"]+)"', target["query"]))
                assert read, target["query"]
                assert read <= written, target["query"]
                assert "$timeFilter" in target["query"]
    assert kinds == {"prometheus", "influxdb"}
    # every service's metrics are charted somewhere
    charted = {
        name
        for panel in panels
        for target in panel["targets"]
        for name in _metric_names(target.get("expr", ""))
    }
    for prefix in ("gateway", "diagnostics", "notifier", "dashboard"):
        assert any(n.startswith(f"fixloop_{prefix}_") for n in charted), prefix


def test_the_docker_readme_tells_the_stack_as_it_is() -> None:
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    for name in (*CORE, *MONITORING):
        assert f"`{name}`" in text, name
    for needle in (
        "cp docker/.env.example docker/.env",
        "--profile monitoring",
        "--user fixloop-health=HEALTHCHECK_MQTT_PASSWORD",
        "--user fixloop-dashboard=DASHBOARD_MQTT_PASSWORD",
        "ops-users add",
        "/metrics",
        "/health",
    ):
        assert needle in text, needle
    assert "three-service" not in text
