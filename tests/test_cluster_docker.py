"""The production profile on clustered engines (``docker/compose.cluster.yaml``).

No Docker engine runs here: the file is rendered the way ``docker compose config``
would (with ``.env.example``) and held to the code: every ``FIXLOOP_`` variable is a
real setting and each service's settings load, images are pinned (EMQX to an Apache-2.0
version), every service has a healthcheck and starts once what it needs is healthy, the
hosts and ports the services are given are the services' own, instances and sessions
are one per process, and each fixloop service's probe answers on a real endpoint. The
PostgreSQL replication scripts run against real servers: a primary, a standby made by
``standby.sh``, a failover by promotion, and the case store reaching the new primary
through the two-host URL the profile gives the services.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_docker_config import DOCKER, EXAMPLE_ENV, _parse_command, _settings_fields, render

from diagnostics.leases import PostgresPartitionStore
from fixloop.config import load_settings
from fixloop.observe import ServiceEndpoint
from fixloop.pgserver import PostgresServer
from fixloop.server import free_port
from fixloop.settings import Settings
from gateway.metrics import GatewayMetrics, MetricsServer
from notifier.postgres import PostgresStore

CLUSTER = DOCKER / "compose.cluster.yaml"
STANDBY_SCRIPT = DOCKER / "cluster" / "postgres" / "standby.sh"
PRIMARY_SCRIPT = DOCKER / "cluster" / "postgres" / "10-init.sh"
ROLES = ("gateway", "diagnostics", "notifier", "dashboard")
EMQX_NODES = ("emqx1", "emqx2", "emqx3")
#: The probe each fixloop service's healthcheck asks: ready to take work.
PROBE = "/readyz"


def rendered() -> dict[str, Any]:
    return render(CLUSTER.read_text(encoding="utf-8"), EXAMPLE_ENV)


def role(name: str) -> str | None:
    """``gateway`` for ``gateway-2``; ``None`` for a server."""
    base = name.split("-")[0]
    return base if base in ROLES else None


def fixloop_services() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name, service in rendered()["services"].items():
        kind = role(name)
        if kind is not None:
            yield name, kind, service


def settings_of(service: dict[str, Any]) -> Settings:
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith("FIXLOOP_")}
    return load_settings(None, env)


# -- the file as compose reads it ----------------------------------------------------------


def test_every_variable_it_reads_is_in_the_example_and_required_ones_fail_without() -> None:
    text = CLUSTER.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used - {"EMQX_VERSION"} <= set(EXAMPLE_ENV), sorted(used - set(EXAMPLE_ENV))
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    assert {"EMQX_COOKIE", "POSTGRES_PASSWORD", "POSTGRES_REPLICATION_PASSWORD"} <= required
    assert "EMQX_LICENSE_KEY" not in used  # the open-source edition needs none
    for name in sorted(required):
        without = {k: v for k, v in EXAMPLE_ENV.items() if k != name}
        with pytest.raises(Exception, match=name):
            render(text, without)


def test_there_are_several_of_each_fixloop_service() -> None:
    counts = Counter(kind for _, kind, _ in fixloop_services())
    assert set(counts) == set(ROLES)
    assert all(count >= 2 for count in counts.values()), counts


def test_images_are_pinned_and_emqx_is_an_apache_licensed_version() -> None:
    services = rendered()["services"]
    for name, service in services.items():
        if role(name) is not None:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, (name, image)
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), (name, image)
    for node in EMQX_NODES:
        repository, _, tag = services[node]["image"].rpartition(":")
        # emqx/emqx up to 5.8 is the open-source edition (Apache 2.0); from 5.9 every
        # EMQX is under the BSL, free for a single node only
        assert repository == "emqx/emqx"
        assert tuple(int(p) for p in tag.split(".")[:2]) <= (5, 8), tag
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Production on clustered engines", 1)[1]
    assert f"emqx/emqx:{tag}" in section
    assert "Apache License 2.0" in section
    assert "Business Source License" in section


def test_one_image_is_built_once_and_runs_every_fixloop_service() -> None:
    services = rendered()["services"]
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["gateway-1"]
    build = services["gateway-1"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    for name, kind, service in fixloop_services():
        assert service["image"] == EXAMPLE_ENV["FIXLOOP_IMAGE"], name
        assert service["pull_policy"] == "never", name
        assert _parse_command(service["command"]).command == kind, name


def test_every_service_has_a_healthcheck_and_waits_for_what_it_needs() -> None:
    services = rendered()["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check is not None, name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(check["test"]) > 1, name
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services, (name, needed)
            assert how["condition"] == "service_healthy", (name, needed)
    for name, _, service in fixloop_services():
        assert {"emqx1", "influxdb", "postgres-primary"} <= set(service["depends_on"]), name
    for name in ("dashboard-1", "dashboard-2"):
        assert "notifier-1" in services[name]["depends_on"]
    assert "postgres-primary" in services["postgres-standby"]["depends_on"]


def test_every_fixloop_variable_is_a_real_setting_and_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fixloop.toml joins in
    for name, _, service in fixloop_services():
        for key in service["environment"]:
            assert key.startswith("FIXLOOP_"), (name, key)
            path = key.removeprefix("FIXLOOP_").lower().split("__")
            assert _settings_fields(path), f"{name}: {key} is no setting"
        settings_of(service)


def test_each_process_has_its_own_instance_session_and_spool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    services = rendered()["services"]
    sessions: list[str] = []
    partitioned: set[tuple[str, int]] = set()
    spools: set[tuple[str, str]] = set()
    for name, kind, service in fixloop_services():
        settings = settings_of(service)
        if kind == "gateway":
            gateway = settings.gateway
            assert gateway.shared_group, name
            assert gateway.instance, name
            sessions.append(gateway.session_client_id)
            volume = next(v for v in service["volumes"] if v.endswith(":/var/lib/fixloop"))
            assert str(gateway.instance_spool_dir).startswith("/var/lib/fixloop/"), name
            spools.add((volume.split(":")[0], str(gateway.instance_spool_dir)))
        elif kind == "notifier":
            notifier = settings.notifier
            assert notifier.shared_group, name
            assert notifier.instance, name
            assert notifier.store_url is not None, name
            sessions.append(notifier.session_client_id)
        elif kind == "diagnostics":
            # a partition's session ({client_id}-p{n}) moves with its lease between
            # workers: one name for all of them, none another service's
            diagnostics = settings.diagnostics
            assert diagnostics.partitions > 0, name
            assert diagnostics.lease_url is not None, name
            partitioned.add((diagnostics.client_id, diagnostics.partitions))
    # two clients with one id push each other off the broker
    assert len(sessions) == len(set(sessions)), sessions
    # every worker the same partitions, and the gateways republish on exactly those
    assert len(partitioned) == 1, partitioned
    (diagnostics_id, partitions), *_ = partitioned
    assert not any(s.startswith(f"{diagnostics_id}-") for s in sessions)
    republished = {
        settings_of(s).gateway.republish_partitions
        for _, k, s in fixloop_services()
        if k == "gateway"
    }
    assert republished == {partitions}
    gateways = [n for n, k, _ in fixloop_services() if k == "gateway"]
    assert len(spools) == len(gateways)
    assert len({volume for volume, _ in spools}) == len(gateways)  # a volume each
    for volume, _ in spools:
        assert volume in rendered()["volumes"], volume
    groups = {
        kind: {
            getattr(settings_of(s), kind).shared_group
            for _, k, s in fixloop_services()
            if k == kind
        }
        for kind in ("gateway", "notifier")
    }
    assert all(len(group) == 1 for group in groups.values()), groups
    # dashboards share one ops users file
    volumes = {tuple(services[n]["volumes"]) for n in ("dashboard-1", "dashboard-2")}
    assert len(volumes) == 1


def test_hosts_and_ports_are_the_services_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    services = rendered()["services"]
    aliases = {
        alias for node in EMQX_NODES for alias in services[node]["networks"]["default"]["aliases"]
    }
    postgres_env = services["postgres-primary"]["environment"]
    for name, _, service in fixloop_services():
        settings = settings_of(service)
        # the broker: every node answers to the name the services use
        for node in EMQX_NODES:
            assert settings.mqtt.host in services[node]["networks"]["default"]["aliases"]
        assert settings.mqtt.host in aliases, name
        assert settings.mqtt.port == 1883, name
        # InfluxDB 2: the v2 flavor (/api/v2/write), the org, bucket and token it set up
        influx = settings.influx
        url = urllib.parse.urlsplit(influx.url)
        assert (url.hostname, url.port) == ("influxdb", 8086), name
        init = services["influxdb"]["environment"]
        assert influx.flavor == "v2"
        assert influx.org == init["DOCKER_INFLUXDB_INIT_ORG"]
        assert influx.bucket == init["DOCKER_INFLUXDB_INIT_BUCKET"]
        assert influx.token is not None
        assert influx.token.get_secret_value() == init["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
        # the case store: both PostgreSQL servers, whichever takes writes
        assert settings.notifier.store_url is not None, name
        dsn = urllib.parse.urlsplit(settings.notifier.store_url.get_secret_value())
        user, _, rest = dsn.netloc.partition(":")
        password, _, hosts = rest.rpartition("@")
        assert user == postgres_env["POSTGRES_USER"]
        assert password == postgres_env["POSTGRES_PASSWORD"]
        assert dsn.path == f"/{postgres_env['POSTGRES_DB']}"
        assert hosts.split(",") == ["postgres-primary:5432", "postgres-standby:5432"]
        assert urllib.parse.parse_qs(dsn.query) == {"target_session_attrs": ["read-write"]}
        lease_url = settings.diagnostics.lease_url
        if role(name) == "diagnostics":
            assert lease_url is not None
            leases = urllib.parse.urlsplit(lease_url.get_secret_value())
            assert leases.netloc == dsn.netloc  # the same servers, user and password
            assert leases.query == dsn.query
            # a database of its own: the case store's holds only the case store's tables
            assert leases.path == "/fixloop_partitions" != dsn.path
            assert "CREATE DATABASE fixloop_partitions" in PRIMARY_SCRIPT.read_text()
        # the metrics port the healthcheck probes is where the service serves
        section = getattr(settings, role(name) or "")
        assert section.metrics_host == "0.0.0.0", name
        assert service["expose"] == [str(section.metrics_port)], name
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert f"'http://127.0.0.1:{section.metrics_port}{PROBE}'" in test[3], name
    # the InfluxQL reads find the bucket: its DBRP mapping runs at the first start
    mounts = dict(v.split(":")[:2] for v in services["influxdb"]["volumes"])
    assert mounts["./influxdb/init"] == "/docker-entrypoint-initdb.d"
    assert "v1 dbrp create" in (DOCKER / "influxdb" / "init" / "10-dbrp.sh").read_text()
    # host ports: each published once, servers' admin ports on loopback only
    published = [p.rsplit(":", 2)[-2] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:") or port.endswith(":8883"), (name, port)


def test_the_emqx_nodes_form_one_cluster_with_devices_named_by_their_user() -> None:
    services = rendered()["services"]
    names = []
    for node in EMQX_NODES:
        env = services[node]["environment"]
        names.append(env["EMQX_NODE__NAME"])
        assert env["EMQX_NODE__NAME"] == f"emqx@{services[node]['hostname']}"
        seeds = env["EMQX_CLUSTER__STATIC__SEEDS"].strip("[]").split(",")
        assert sorted(seeds) == sorted(f"emqx@{services[n]['hostname']}" for n in EMQX_NODES)
        assert env["EMQX_NODE__COOKIE"] == EXAMPLE_ENV["EMQX_COOKIE"]
        zone = env["EMQX_LISTENERS__SSL__DEFAULT__ZONE"]
        assert env[f"EMQX_ZONES__{zone.upper()}__MQTT__USE_USERNAME_AS_CLIENTID"] == "true"
        assert env["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"
        assert env["EMQX_AUTHORIZATION__SOURCES__1__PATH"] in {
            v.split(":")[1] for v in services[node]["volumes"]
        }
        assert "./emqx/acl.conf:/opt/emqx/etc/fixloop-acl.conf:ro" in services[node]["volumes"]
    assert len(set(names)) == 3
    # the shared groups the services subscribe with are allowed them, as the plain topics
    acl = (DOCKER / "emqx" / "acl.conf").read_text(encoding="utf-8")
    assert '"$share/+/devices/#"' in acl  # gateways (and diagnostics workers)
    assert '"$share/+/fleet/#"' in acl  # notifiers


# -- the probes the healthchecks ask exist ---------------------------------------------------


async def test_each_healthcheck_command_passes_on_a_real_ready_endpoint() -> None:
    """The healthcheck's own command against each service's real probe endpoint."""
    seen = set()
    metrics = GatewayMetrics()
    metrics.mqtt_connected = True
    problems: list[str] = []

    async def ready() -> list[str]:
        return list(problems)

    async with (
        MetricsServer(metrics, "127.0.0.1", 0) as gateway,
        ServiceEndpoint("probe", "127.0.0.1", 0, list, lambda: ([], {}), ready) as other,
    ):
        for name, kind, service in fixloop_services():
            code = service["healthcheck"]["test"][3]
            port = re.search(r":(\d+)/", code).group(1)  # type: ignore[union-attr]
            real = gateway.port if kind == "gateway" else other.port
            local = code.replace(f":{port}/", f":{real}/")

            def run(local: str = local) -> int:
                env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
                return subprocess.run(
                    [sys.executable, "-c", local], capture_output=True, env=env, timeout=30
                ).returncode

            assert await asyncio.to_thread(run) == 0, name
            seen.add(kind)
        # and they fail while the service is not ready
        metrics.mqtt_connected = False
        problems.append("mqtt_disconnected")
        for _name, _kind, service in fixloop_services():
            code = service["healthcheck"]["test"][3]
            port = re.search(r":(\d+)/", code).group(1)  # type: ignore[union-attr]
            real = gateway.port if _kind == "gateway" else other.port
            local = code.replace(f":{port}/", f":{real}/")
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", local], capture_output=True, timeout=30
            )
            assert done.returncode != 0, _name
    assert seen == set(ROLES)


# -- PostgreSQL: the replication scripts on real servers -------------------------------------


def _pg_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    assert found, "Debian's postgresql is installed for the tests"
    return found[-1]


def _unprivileged() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def run_primary_script(env: dict[str, str], as_user: dict[str, Any]) -> None:
    """``10-init.sh`` as the image runs it at the primary's first start."""
    subprocess.run(["bash", str(PRIMARY_SCRIPT)], env=env, check=True, timeout=60, **as_user)


def start_standby(
    env: dict[str, str], port: int, log: Any, as_user: dict[str, Any]
) -> subprocess.Popen[bytes]:
    """``standby.sh`` as the standby's entrypoint, on a loopback port of its own."""
    return subprocess.Popen(
        [
            "bash",
            str(STANDBY_SCRIPT),
            *("-c", f"port={port}", "-c", "listen_addresses=127.0.0.1"),
            *("-c", "unix_socket_directories="),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **as_user,
    )


def tempfile_dir() -> str:
    """A folder under /tmp the unprivileged PostgreSQL user may enter."""
    path = tempfile.mkdtemp(prefix="fixloop-replica-")
    os.chmod(path, 0o755)
    return path


async def _wait(predicate: Any, what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = await predicate()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_the_standby_streams_the_primary_and_takes_over_when_promoted() -> None:
    services = rendered()["services"]
    env_of_image = services["postgres-primary"]["environment"]
    mounts = dict(v.split(":")[:2] for v in services["postgres-primary"]["volumes"])
    assert mounts["./cluster/postgres/10-init.sh"].startswith("/docker-entrypoint-initdb.d/")
    standby_service = services["postgres-standby"]
    assert standby_service["entrypoint"] == ["/usr/local/bin/fixloop-standby.sh"]
    assert (
        "./cluster/postgres/standby.sh:/usr/local/bin/fixloop-standby.sh:ro"
        in (standby_service["volumes"])
    )
    assert "synchronous_standby_names=" in " ".join(services["postgres-primary"]["command"])
    user = env_of_image["POSTGRES_USER"]
    bin_dir = _pg_bin()
    root = Path(tempfile_dir())
    try:
        primary = PostgresServer(
            root / "primary", superuser=user, database="fixloop", die_with_parent=True
        )
        primary.start()
        try:
            as_user = _unprivileged()
            env = {
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "POSTGRES_USER": user,
                "POSTGRES_DB": "fixloop",
                "POSTGRES_REPLICATION_PASSWORD": env_of_image["POSTGRES_REPLICATION_PASSWORD"],
                "PGDATA": str(primary.data_dir),
                "PGHOST": primary.host,
                "PGPORT": str(primary.port),
            }
            await asyncio.to_thread(run_primary_script, env, as_user)
            hba = (primary.data_dir / "pg_hba.conf").read_text()
            assert hba.rstrip().endswith("host replication replicator all scram-sha-256")
            # marker tables in another database: the case store's own holds only its own
            conn = await asyncpg.connect(primary.url("postgres"))
            try:
                await conn.execute("SELECT pg_reload_conf()")
                role = await conn.fetchrow(
                    "SELECT rolreplication, rolcanlogin FROM pg_roles WHERE rolname = 'replicator'"
                )
                assert role is not None
                assert tuple(role) == (True, True)
                await conn.execute("CREATE TABLE cases_before (id int)")
                await conn.execute("INSERT INTO cases_before VALUES (1)")
            finally:
                await conn.close()

            standby_root = root / "standby"
            standby_root.mkdir()
            if as_user:
                os.chown(standby_root, as_user["user"], as_user["group"])
            standby_port = free_port()
            standby_env = {
                **env,
                "PGDATA": str(standby_root / "data"),
                "PRIMARY_HOST": primary.host,
                "PRIMARY_PORT": str(primary.port),
            }
            del standby_env["PGHOST"], standby_env["PGPORT"]
            log = (root / "standby.log").open("wb")
            standby = start_standby(standby_env, standby_port, log, as_user)
            try:
                standby_url = f"postgresql://{user}@127.0.0.1:{standby_port}/postgres"

                async def standby_has(table: str) -> bool:
                    c = await asyncpg.connect(standby_url, timeout=2)
                    try:
                        return bool(await c.fetchval(f"SELECT count(*) FROM {table}"))
                    finally:
                        await c.close()

                try:
                    await _wait(lambda: standby_has("cases_before"), "the base backup")
                except AssertionError as exc:
                    text = (root / "standby.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"{exc}; the standby said:\n{text}") from exc
                # the primary streams to it, through the slot the script made
                conn = await asyncpg.connect(primary.url("postgres"))
                try:
                    slot = await conn.fetchrow("SELECT slot_name, active FROM pg_replication_slots")
                    assert slot is not None
                    assert tuple(slot) == ("standby1", True)
                    await conn.execute("CREATE TABLE cases_after (id int)")
                    await conn.execute("INSERT INTO cases_after VALUES (2)")
                    names = await conn.fetch("SELECT application_name FROM pg_stat_replication")
                    assert [r[0] for r in names] == ["standby1"]  # synchronous_standby_names
                    databases = await conn.fetch("SELECT datname FROM pg_database")
                    assert "fixloop_partitions" in {r[0] for r in databases}
                finally:
                    await conn.close()
                await _wait(lambda: standby_has("cases_after"), "streamed changes")

                # the services' URL: both hosts, whichever takes writes
                hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby_port}"
                both = f"postgresql://{user}@{hosts}/fixloop?target_session_attrs=read-write"
                async with PostgresStore(both) as store:
                    assert await store.get_case("none") is None  # migrated on the primary
                # the partitions' leases, in their own database, through the same hosts
                leases = both.replace("/fixloop?", "/fixloop_partitions?")
                async with PostgresPartitionStore(leases):
                    pass
                c = await asyncpg.connect(primary.url())
                try:
                    assert await c.fetchval("SELECT count(*) FROM cases") == 0
                finally:
                    await c.close()
                # failover: the primary goes, the standby is promoted, the same URL
                # reaches it
                primary.stop()
                c = await asyncpg.connect(standby_url)
                try:
                    assert await c.fetchval("SELECT pg_promote()") is True
                finally:
                    await c.close()

                async def opens() -> bool:
                    async with PostgresStore(both) as store:
                        return await store.get_case("none") is None

                assert await _wait(opens, "the promoted standby")
            finally:
                standby.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    standby.wait(30)
                except subprocess.TimeoutExpired:
                    standby.kill()
                    standby.wait()
                log.close()
        finally:
            primary.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_readmes_commands_name_real_services_and_commands() -> None:
    services = rendered()["services"]
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Production on clustered engines", 1)[1].split("\n## ", 1)[0]
    prefix = r"docker compose -f docker/compose\.cluster\.yaml"
    runs = re.findall(rf"{prefix} (?:run --rm(?: --no-deps)?|exec) ([\w-]+) ([^`\n]+)", section)
    assert {"dashboard-1", "postgres-standby"} <= {service for service, _ in runs}
    for service, argv in runs:
        assert service in services, service
        if role(service) is not None:
            _parse_command(argv.split("#")[0].split())
    for named in re.findall(rf"{prefix} up -d ([\w -]+)", section):
        assert set(named.split()) <= set(services), named
