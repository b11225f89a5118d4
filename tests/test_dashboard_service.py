"""``fixloop dashboard`` and ``fixloop ops-users``: the dashboard as its own service.

The service runs as a process against a real mosquitto, a real influxd and a real
SQLite case store: a case change published on ``fleet/cases`` reaches an open live
stream and the cases board, read back from the store. Ops users are managed with the
command (password on stdin): a new password works at the next login and ends the old
sessions at once. The diagnostics service's and the notifier's ``/metrics`` and
``/health`` are checked on real services too.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MakeMosquitto
from test_diagnostics_e2e import healthy_engine

from dashboard.app import CSRF_HEADER
from dashboard.auth import ROLE_RANK, OpsUser, SessionStore, hash_password, verify_password
from dashboard.service import decode_case_change
from dashboard.users import OpsUsersFile
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from fixloop.observe import diagnostics_endpoint, notifier_endpoint
from fixloop.opsusers import ROLES
from fixloop.server import free_port
from fixloop.stack import InfluxdServer, MosquittoServer
from notifier.errors import ConflictError, NotFoundError
from notifier.model import Case, DeviceRecord, Owner
from notifier.postgres import PostgresStore
from notifier.service import NotifierService, case_message
from notifier.settings import NotifierSettings
from notifier.sqlite import SqliteStore
from wire.errors import ConfigError, RejectedError
from wire.exposition import Metric, render_metrics
from wire.influx import InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import CASES_TOPIC
from wire.settings import MqttSettings

DASHBOARD_PW = "dashboard-broker-pw"
NOTIFIER_PW = "notifier-broker-pw"
NOW = datetime.now(UTC).replace(microsecond=0)
FIRST_PW = "first password of ada"
SECOND_PW = "second password of ada"


def make_case(case_id: str, **kw: Any) -> Case:
    fields: dict[str, Any] = {
        "case_id": case_id,
        "device_id": "dev-001",
        "owner_id": "own-1",
        "model": "washer",
        "fault": "drain_blocked",
        "state": "awaiting_consent",
        "urgency": "high",
        "opened_at": NOW - timedelta(hours=2),
        "updated_at": NOW - timedelta(hours=1),
        "confidence": 0.8125,
        "failure_at": NOW + timedelta(days=3),
        "tried": ("drain_cycle",),
        "pending_action": "pump_flush",
        "needs_person": None,
    }
    fields.update(kw)
    return Case(**fields)


# -- fleet/cases messages --------------------------------------------------------------


def test_a_case_change_comes_back_from_its_fleet_cases_message() -> None:
    case = make_case("case-1", remedies=("pump_flush",), evidence=("drain slow",))
    decoded = decode_case_change(case_message(case))
    # the message leaves out what only the store has: remedies, evidence, fix time
    assert decoded == Case(**{**_fields(case), "remedies": (), "evidence": (), "fix_at": None})
    rated = make_case("case-2", state="resolved", rating=4, failure_at=None, pending_action=None)
    assert decode_case_change(case_message(rated)) == rated


def _fields(case: Case) -> dict[str, Any]:
    return {name: getattr(case, name) for name in Case.__dataclass_fields__}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "bad_case"),
        (b"[1]", "bad_version"),
        (orjson.dumps({"v": 2, "case_id": "x"}), "bad_version"),
        (orjson.dumps({"v": 1, "case_id": "x"}), "bad_case"),
    ],
)
def test_what_is_not_a_case_change_is_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(RejectedError) as caught:
        decode_case_change(payload)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("key", "value"),
    [("state", "melted"), ("opened_at", "2024-05-01T10:00:00"), ("rating", 9)],
)
def test_a_case_change_with_a_wrong_field_is_refused(key: str, value: object) -> None:
    doc = orjson.loads(case_message(make_case("case-1")))
    doc[key] = value
    with pytest.raises(RejectedError, match=key):
        decode_case_change(orjson.dumps(doc))


# -- the users file --------------------------------------------------------------------


async def test_the_users_file_keeps_hashes_and_tells_whose_access_changed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ops" / "users.json"
    users = OpsUsersFile(path)
    assert users.load() == {}
    assert users.changed_users() == set()
    users.add("ada", "admin", hash_password("ada's password", n=2**10), "Ada  Lovelace")
    users.add("vera", "viewer", hash_password("vera's password", n=2**10))
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "ada's password" not in text
    assert "scrypt$1024$" in text
    assert [(u.username, u.role, u.name) for u in users.users()] == [
        ("ada", "admin", "Ada Lovelace"),
        ("vera", "viewer", ""),
    ]
    assert users.changed_users() == set()  # added users end no session
    with pytest.raises(ConflictError):
        users.add("ada", "viewer", hash_password("x" * 12, n=2**10))
    with pytest.raises(NotFoundError):
        users.remove("nobody")

    # another process (the command) changes the file: the service's reader follows it
    other = OpsUsersFile(path)
    other.set_password("ada", hash_password("new password!", n=2**10))
    other.remove("vera")
    found = await users.get_user("ada")
    assert found is not None
    assert verify_password("new password!", found.password_hash)
    assert await users.get_user("vera") is None
    assert users.changed_users() == {"ada", "vera"}
    assert users.changed_users() == set()


def test_a_broken_users_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    for text, problem in (
        ("{", "not JSON"),
        ('{"v": 1, "users": {"ada": {"role": "root", "password_hash": "x"}}}', "role"),
        ('{"v": 1, "users": {"ada": {"role": "admin"}}}', "no password hash"),
        ('{"users": {}}', "version 1"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=problem) as caught:
            OpsUsersFile(path).load()
        assert str(path) in str(caught.value)


def test_ending_a_users_sessions_leaves_the_others() -> None:
    store = SessionStore(lambda: NOW)
    ada = OpsUser("ada", "admin", "h")
    vera = OpsUser("vera", "viewer", "h")
    ada_ids = [store.create(ada)[0] for _ in range(2)]
    vera_id, _ = store.create(vera)
    assert store.end_user("ada") == 2
    assert all(store.get(i) is None for i in ada_ids)
    assert store.get(vera_id) is not None
    assert store.end_user("ada") == 0


def test_the_commands_roles_are_the_dashboards() -> None:
    assert tuple(ROLE_RANK) == ROLES


# -- fixloop ops-users, by command -----------------------------------------------------


def _cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fixloop", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _clis(
    *calls: tuple[list[str], str], env: dict[str, str]
) -> list[subprocess.CompletedProcess[str]]:
    """Run commands side by side (arguments, stdin): none may change what another reads."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: _cli(call[0], env, call[1]), calls))


def test_ops_users_by_command(tmp_path: Path) -> None:
    env = {**os.environ, "FIXLOOP_DASHBOARD__USERS_FILE": str(tmp_path / "users.json")}
    # commands that are refused change nothing, so they run beside the one before them
    added, refused = _clis(
        (["ops-users", "add", "ada", "--role", "admin", "--name", "Ada"], "pw\n"),
        # the password is never an argument
        (["ops-users", "add", "bob", "--password", "x" * 20], ""),
        env=env,
    )
    assert added.returncode == 1
    assert "at least 12 characters" in added.stderr
    assert refused.returncode == 2
    assert "unrecognized arguments" in refused.stderr
    added = _cli(["ops-users", "add", "ada", "--role", "admin"], env, FIRST_PW + "\n")
    assert added.returncode == 0, added.stderr
    assert "ops user ada added (admin)" in added.stdout
    again, vera = _clis(
        (["ops-users", "add", "ada"], FIRST_PW + "\n"),
        (["ops-users", "add", "vera"], "vera's long password\n"),
        env=env,
    )
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert vera.returncode == 0, vera.stderr
    listed = _cli(["ops-users", "list"], env)
    assert listed.stdout.splitlines() == ["ada\tadmin\t", "vera\tviewer\t"]
    missing, changed = _clis(
        (["ops-users", "passwd", "nobody"], SECOND_PW + "\n"),
        (["ops-users", "passwd", "ada"], SECOND_PW + "\n"),
        env=env,
    )
    assert missing.returncode == 1
    assert "no ops user nobody" in missing.stderr
    assert changed.returncode == 0, changed.stderr
    assert _cli(["ops-users", "remove", "vera"], env).returncode == 0
    users = OpsUsersFile(tmp_path / "users.json").load()
    assert set(users) == {"ada"}
    assert verify_password(SECOND_PW, users["ada"].password_hash)


# -- fixloop dashboard, a process against real servers ---------------------------------


def _case_store(env: dict[str, str], tmp_path: Path) -> SqliteStore | PostgresStore:
    """The case store the dashboard process was given: PostgreSQL's URL, or the file."""
    url = env.get("FIXLOOP_NOTIFIER__STORE_URL")
    return SqliteStore(tmp_path / "cases.sqlite3") if url is None else PostgresStore(url)


async def _seed_store(opened: SqliteStore | PostgresStore) -> None:
    async with opened as store:
        await store.put_owner(Owner("own-1", "Ada Owner"))
        await store.put_device(DeviceRecord("dev-001", "own-1", "washer", firmware="2.3.0"))
        await store.add_case(make_case("case-old"))


async def _health(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    try:
        async with client.get(url) as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientConnectionError:
        return 0, {}


async def _wait_healthy(
    client: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process
) -> None:
    async with asyncio.timeout(60):
        while (await _health(client, url))[0] != 200:
            assert proc.returncode is None, "the dashboard exited"
            await asyncio.sleep(0.1)


async def _login(client: aiohttp.ClientSession, base: str, password: str) -> int:
    async with client.post(
        f"{base}/ops/login", json={"username": "ada", "password": password}
    ) as resp:
        return resp.status


async def _next_event(stream: aiohttp.StreamReader) -> tuple[str, Any]:
    """Read the next server-sent event (comments and blank lines skipped)."""
    event = ""
    while True:
        line = (await stream.readline()).decode()
        assert line, "the live stream ended"
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event:
            return event, orjson.loads(line[6:])


@pytest.fixture(params=["sqlite", "postgresql"])
async def dashboard_process(
    tmp_path: Path,
    make_mosquitto: MakeMosquitto,
    influxd: InfluxdServer,
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[str, str, MosquittoServer, dict[str, str]]]:
    """A running ``fixloop dashboard``: (its address, its metrics address, broker, env).

    Its case store is an SQLite file, or a PostgreSQL database (``store_url``).
    """
    broker = make_mosquitto(
        users={"fixloop-dashboard": DASHBOARD_PW, "fixloop-notifier": NOTIFIER_PW}
    )
    db_path = tmp_path / "cases.sqlite3"
    store_url = None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "FIXLOOP_MQTT__HOST": broker.host,
        "FIXLOOP_MQTT__PORT": str(broker.port),
        "FIXLOOP_MQTT__USERNAME": "fixloop-dashboard",
        "FIXLOOP_MQTT__PASSWORD": DASHBOARD_PW,
        "FIXLOOP_INFLUX__URL": influxd.url,
        "FIXLOOP_NOTIFIER__DB_PATH": str(db_path),
        "FIXLOOP_DASHBOARD__USERS_FILE": str(tmp_path / "ops-users.json"),
        "FIXLOOP_DASHBOARD__PORT": str(port),
        "FIXLOOP_DASHBOARD__METRICS_HOST": "0.0.0.0",
        "FIXLOOP_DASHBOARD__METRICS_PORT": str(metrics_port),
        # a heartbeat (which also looks at the session) must not be what ends a stream
        "FIXLOOP_DASHBOARD__HEARTBEAT_S": "120",
    }
    if store_url is not None:
        env["FIXLOOP_NOTIFIER__STORE_URL"] = store_url
    await _seed_store(_case_store(env, tmp_path))
    # the file `fixloop ops-users add` writes (that command: test_ops_users_by_command)
    ada = await asyncio.to_thread(hash_password, FIRST_PW)
    OpsUsersFile(tmp_path / "ops-users.json").add("ada", "admin", ada)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fixloop",
        "dashboard",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as client:
            await _wait_healthy(client, f"http://127.0.0.1:{metrics_port}/health", proc)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", broker, env
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        code = await proc.wait()
    assert code == 0, log


async def test_a_case_published_on_fleet_cases_reaches_the_live_page_and_the_board(
    dashboard_process: tuple[str, str, MosquittoServer, dict[str, str]], tmp_path: Path
) -> None:
    base, metrics, broker, env = dashboard_process
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        assert await _login(client, base, FIRST_PW) == 200
        async with client.get(f"{base}/ops/api/events") as events:
            assert events.status == 200
            assert (await _next_event(events.content))[0] == "hello"
            # the notifier stores a change, then publishes it
            stored = make_case(
                "case-new",
                fault="pump_wear",
                remedies=("pump_flush", "technician_visit:pump"),
                evidence=("slow",),
            )
            async with _case_store(env, tmp_path) as store:
                await store.add_case(stored)
            async with MqttClient(
                broker.host,
                broker.port,
                client_id="notifier-test",
                username="fixloop-notifier",
                password=NOTIFIER_PW,
            ) as notifier:
                await notifier.publish(CASES_TOPIC, case_message(stored), qos=1)
                # a change the store does not hold (yet) is shown from the message
                await notifier.publish(CASES_TOPIC, case_message(make_case("case-x")), qos=1)
                await notifier.publish(CASES_TOPIC, b"not a case", qos=1)
            async with asyncio.timeout(20):
                kind, first = await _next_event(events.content)
                _, second = await _next_event(events.content)
        assert kind == "case"
        assert first["case_id"] == "case-new"
        # read back from the store: what the message leaves out is there
        assert first["remedies"] == ["pump_flush", "technician_visit:pump"]
        assert first["evidence"] == ["slow"]
        assert first["pending_action"] == "pump_flush"
        assert second["case_id"] == "case-x"
        assert second["remedies"] == []
        async with client.get(f"{base}/ops/api/cases") as resp:
            assert resp.status == 200
            board = orjson.dumps(await resp.json()).decode()
        assert "case-new" in board
        assert "case-old" in board
        async with client.get(f"{metrics}/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    values = _samples(text)
    assert values["fixloop_dashboard_case_changes_total"] == 2
    assert values["fixloop_dashboard_case_changes_from_message_total"] == 1
    assert values["fixloop_dashboard_case_changes_refused_total"] == 1
    assert values["fixloop_dashboard_mqtt_connected"] == 1
    assert values["fixloop_dashboard_ops_users"] == 1


async def test_a_new_password_by_command_ends_the_old_sessions(
    dashboard_process: tuple[str, str, MosquittoServer, dict[str, str]],
) -> None:
    base, metrics, _broker, env = dashboard_process
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        assert await _login(client, base, FIRST_PW) == 200
        async with client.get(f"{base}/ops/api/session") as resp:
            assert resp.status == 200
        async with client.get(f"{base}/ops/api/events") as events:
            assert (await _next_event(events.content))[0] == "hello"
            changed = await asyncio.to_thread(
                _cli, ["ops-users", "passwd", "ada"], env, SECOND_PW + "\n"
            )
            assert changed.returncode == 0, changed.stderr
            # the open page is told at once that its session ended (the users file is
            # looked at every 2 s; no heartbeat comes in this time)
            async with asyncio.timeout(10):
                kind, _ = await _next_event(events.content)
            assert kind == "logout"
        async with client.get(f"{base}/ops/api/session") as resp:
            assert resp.status == 401
        assert await _login(client, base, FIRST_PW) == 401
        assert await _login(client, base, SECOND_PW) == 200
        async with client.get(f"{base}/ops/api/session") as resp:
            assert resp.status == 200
            assert (await resp.json())["username"] == "ada"
        async with client.get(f"{metrics}/metrics") as resp:
            values = _samples(await resp.text())
    assert values["fixloop_dashboard_sessions_ended_total"] >= 1


async def test_a_campaign_from_the_standalone_dashboard_is_run_by_the_notifier(
    dashboard_process: tuple[str, str, MosquittoServer, dict[str, str]],
    tmp_path: Path,
    influxd: InfluxdServer,
) -> None:
    base, _metrics, broker, env = dashboard_process
    db_path = tmp_path / "cases.sqlite3"
    body = {"fault": "pump_wear", "dimension": "firmware", "value": "2.3.0", "action": "selftest"}
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        async with client.post(
            f"{base}/ops/login", json={"username": "ada", "password": FIRST_PW}
        ) as resp:
            assert resp.status == 200
            csrf = (await resp.json())["csrf_token"]
        headers = {CSRF_HEADER: csrf}
        # no notifier runs yet: the cases wait in the store, opened
        async with client.post(f"{base}/ops/api/campaigns", json=body, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            assert await resp.json() == {"devices": 1, "cases": 1}
        async with client.post(f"{base}/ops/api/campaigns", json=body, headers=headers) as resp:
            assert (await resp.json())["cases"] == 0  # one open case per device and campaign
        bad = {**body, "action": "format_disk"}
        async with client.post(f"{base}/ops/api/campaigns", json=bad, headers=headers) as resp:
            assert resp.status == 422, await resp.text()
    async with _case_store(env, tmp_path) as store:
        (case,) = await store.cases(states=["opened"])
        assert (case.device_id, case.fault, case.remedies) == (
            "dev-001",
            "campaign_selftest",
            ("selftest",),
        )
    # the notifier's case machine gives it its first step, and tells the dashboard
    settings = NotifierSettings(
        db_path=db_path,
        store_url=env.get("FIXLOOP_NOTIFIER__STORE_URL"),
        api_port=0,
        client_id="notifier-campaign-test",
        resume_opened_after_s=0.5,
        command_timeout_s=1.0,
    )
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username="fixloop-notifier", password=NOTIFIER_PW
    )
    influx = InfluxSettings(url=influxd.url, database="fixloop")
    async with NotifierService(mqtt, influx, settings) as notifier:
        task = asyncio.create_task(notifier.run())
        try:
            assert notifier.store is not None
            async with asyncio.timeout(20):
                while (moved := await notifier.store.get_case(case.case_id)) is not None:
                    if moved.state != "opened":
                        break
                    await asyncio.sleep(0.1)
            assert moved is not None
            assert moved.state in ("remote_fix", "awaiting_consent"), moved.state
            trail = [e.reason for e in await notifier.store.audit(case.case_id)]
            assert trail[0].startswith("pre-emptive campaign: ")
            assert any("waiting for its first step" in reason for reason in trail), trail
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_fixloop_dashboard_refuses_to_start_without_users_or_store(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FIXLOOP_DASHBOARD__USERS_FILE": str(tmp_path / "users.json"),
        "FIXLOOP_NOTIFIER__DB_PATH": str(tmp_path / "cases.sqlite3"),
    }
    no_users = _cli(["dashboard"], env)
    assert no_users.returncode == 2
    assert "no ops users" in no_users.stderr
    assert "fixloop ops-users add" in no_users.stderr
    OpsUsersFile(tmp_path / "users.json").add("ada", "viewer", hash_password(FIRST_PW))
    no_store = _cli(["dashboard"], env)
    assert no_store.returncode == 2
    assert "cases.sqlite3 not found" in no_store.stderr
    assert not (tmp_path / "cases.sqlite3").exists()


# -- /metrics and /health of the other services ----------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _samples(text: str) -> dict[str, float]:
    """Parse Prometheus text format strictly: every line a comment or a sample."""
    values: dict[str, float] = {}
    families: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge"), line
            families.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        assert match.group(1) in families, line
        key = match.group(1) + (match.group(2) or "")
        values[key] = float(match.group(3))
    return values


def test_metrics_render_in_the_text_format() -> None:
    text = render_metrics(
        [
            Metric("x_total", "counter", "Things.", [({"stage": 'a"b\\c'}, 3)]),
            Metric("y", "gauge", "Level.", [({}, 0.25), ({"k": "v"}, float("nan"))]),
        ]
    )
    assert text == (
        "# HELP x_total Things.\n# TYPE x_total counter\n"
        'x_total{stage="a\\"b\\\\c"} 3\n'
        "# HELP y Level.\n# TYPE y gauge\ny 0.25\n"
        'y{k="v"} NaN\n'
    )


async def test_diagnostics_and_notifier_serve_metrics_and_health_on_every_interface(
    tmp_path: Path, make_mosquitto: MakeMosquitto, influxd: InfluxdServer
) -> None:
    broker = make_mosquitto(
        users={"fixloop-diagnostics": "diag-pw", "fixloop-notifier": NOTIFIER_PW}
    )
    influx = InfluxSettings(url=influxd.url, database="fixloop")
    engine = await asyncio.to_thread(healthy_engine)

    def mqtt(user: str, password: str) -> MqttSettings:
        return MqttSettings(host=broker.host, port=broker.port, username=user, password=password)

    notifier_settings = NotifierSettings(db_path=tmp_path / "cases.sqlite3", api_port=0)
    async with (
        DiagnosticsService(
            mqtt("fixloop-diagnostics", "diag-pw"),
            influx,
            DiagnosticsSettings(model_path=tmp_path / "none.pkl"),
            engine=engine,
        ) as diagnostics,
        NotifierService(
            mqtt("fixloop-notifier", NOTIFIER_PW), influx, notifier_settings
        ) as notifier,
        diagnostics_endpoint(diagnostics, "0.0.0.0", 0) as diag_endpoint,
        notifier_endpoint(notifier, "0.0.0.0", 0) as notifier_endpoint_,
        aiohttp.ClientSession() as client,
    ):
        assert diag_endpoint.url.startswith("http://0.0.0.0:")
        tasks = [asyncio.create_task(diagnostics.run()), asyncio.create_task(notifier.run())]
        try:
            await diagnostics.wait_subscribed()
            await notifier.wait_subscribed()
            for endpoint, prefix in (
                (diag_endpoint, "fixloop_diagnostics"),
                (notifier_endpoint_, "fixloop_notifier"),
            ):
                base = f"http://127.0.0.1:{endpoint.port}"
                status, body = await _health(client, f"{base}/health")
                assert status == 200, body
                assert body["ok"] is True
                assert body["problems"] == []
                assert body["down"] == {}
                async with client.get(f"{base}/metrics") as resp:
                    assert resp.status == 200
                    values = _samples(await resp.text())
                assert values, prefix
                assert all(name.startswith(prefix + "_") for name in values)
                assert all(value == 1 for name, value in values.items() if "_stage_up{" in name)
            # a stage that is down turns /health red
            notifier.stages.down["digests"] = "RuntimeError: test"
            status, body = await _health(
                client, f"http://127.0.0.1:{notifier_endpoint_.port}/health"
            )
            assert status == 503
            assert body["problems"] == ["stage_down:digests"]
            del notifier.stages.down["digests"]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
