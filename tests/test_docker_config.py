"""The shipped deployment files match the code that configures the tested broker."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixloop.broker import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DOCKER_SERVICE_USERS,
    GATEWAY_USER,
    STALL_BUDGET_S,
    STALL_DESIGN_RATE,
    docker_files,
    hash_password,
    main,
)
from gateway.protocol.credentials import device_password

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "compose.yaml"


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
    # Durability bound (issue 13): saved every second, by time, not by change count.
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
    text = COMPOSE.read_text(encoding="utf-8")
    compose: dict[str, Any] = yaml.safe_load(text)
    services = compose["services"]
    assert set(services) == {"mosquitto", "influxdb", "gateway", "diagnostics", "notifier"}
    for name in ("diagnostics", "notifier"):
        service = services[name]
        assert service["command"] == [name]
        assert service["environment"]["FIXLOOP_MQTT__USERNAME"] == f"fixloop-{name}"
        assert service["depends_on"]["influxdb"]["condition"] == "service_healthy"
    assert services["notifier"]["environment"]["FIXLOOP_NOTIFIER__DB_PATH"].startswith(
        "/var/lib/fixloop/"
    )
    mosquitto = services["mosquitto"]
    assert mosquitto["ports"] == ["8883:8883", "127.0.0.1:1883:1883"]
    gateway = services["gateway"]
    assert gateway["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    env = gateway["environment"]
    assert env["FIXLOOP_MQTT__HOST"] == "mosquitto"
    assert env["FIXLOOP_INFLUX__FLAVOR"] == "v2"
    assert env["FIXLOOP_INFLUX__URL"] == "http://influxdb:8086"
    assert gateway["depends_on"]["influxdb"]["condition"] == "service_healthy"
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
    for volume in mosquitto["volumes"]:
        source = volume.split(":", 1)[0]
        if source.startswith("./mosquitto/") and not source.endswith("passwd"):
            assert (DOCKER / source).is_file(), source


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
    # Issue 13: for production, a broker whose durable sessions survive a node crash.
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
        assert "broker" in node["networks"]["default"]["aliases"]
        assert any(v.endswith(":/opt/emqx/data") for v in node["volumes"])
        assert f"{node['volumes'][-1].split(':')[0]}" in cluster["volumes"]
    for name in ("gateway", "diagnostics", "notifier"):
        assert name in base["services"]
        assert services[name]["environment"]["FIXLOOP_MQTT__HOST"] == "broker"
        assert services[name]["depends_on"]["mosquitto"]["required"] is False
    acl = (DOCKER / "emqx" / "acl.conf").read_text(encoding="utf-8")
    assert '"devices/${username}/telemetry"' in acl
    assert acl.rstrip().endswith("{deny, all}.")
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "compose.emqx.yaml" in readme
