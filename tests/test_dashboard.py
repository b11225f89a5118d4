"""The ops dashboard's JSON API against a real SQLite case store and a real influxd.

Login, sessions, CSRF and roles; owner contacts kept off every answer; charts downsampled
by InfluxDB; outcomes and fleet insight on known seeds; campaigns; the live stream.
The seed helpers here also serve the browser tests (``test_dashboard_browser.py``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from dashboard.app import COOKIE_NAME, CSRF_HEADER, create_app
from dashboard.auth import OpsUser, hash_password, verify_password
from dashboard.feed import CaseFeed
from dashboard.fleet import FleetCache, Snapshot, apply_changes
from dashboard.influxql import Measurements, bucket_s
from dashboard.insight import binomial_sf, fleet_insight, population
from dashboard.settings import DashboardSettings
from dashboard.stats import outcomes
from fixloop.stack import InfluxdServer
from notifier.model import (
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Owner,
    PushChannel,
    Rating,
    Task,
    Technician,
)
from notifier.sqlite import SqliteStore
from notifier.store import CaseStore
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import point_line

NOW = datetime(2024, 5, 15, 12, 0, tzinfo=UTC)  # a Wednesday
PASSWORDS = {"vera": "viewer-pass-1", "alex": "agent-pass-2", "ada": "admin-pass-3"}
OWNER_NAME = "Grace Hopperton"
SECRETS = (
    "https://push.example.net/wp/SECRET-ENDPOINT-7f3a",
    "P256DH-SECRET-KEY-0123456789",
    "AUTH-SECRET-abcdef",
    "fcm-registration-token-SECRET-99",
    "whsec-SECRET-webhook-key",
)

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


_T = TypeVar("_T")


class Ticker:
    """A monotonic clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def landed(read: Callable[[], Awaitable[_T]], done: Callable[[_T], bool]) -> _T:
    """Read until ``done``: a read started behind the answers lands a few loop turns later."""
    value = await read()
    for _ in range(500):
        if done(value):
            break
        await asyncio.sleep(0.01)
        value = await read()
    return value


def ops_users() -> dict[str, OpsUser]:
    """A viewer, an agent and an admin (cheap scrypt cost, the same code path)."""
    roles = {"vera": "viewer", "alex": "agent", "ada": "admin"}
    return {
        name: OpsUser(name, roles[name], hash_password(pw, n=2**10), name.title())  # type: ignore[arg-type]
        for name, pw in PASSWORDS.items()
    }


@dataclass
class RecordingCampaign:
    """Stands in for the composition root's campaign starter; records what it is asked."""

    calls: list[tuple[list[str], str, str]] = field(default_factory=list)

    async def start(self, device_ids: Sequence[str], action: str, reason: str) -> int:
        self.calls.append((list(device_ids), action, reason))
        return len(device_ids)


# -- seeds -------------------------------------------------------------------------------


def make_case(case_id: str, device: DeviceRecord, fault: str, state: Any, **kw: Any) -> Case:
    opened = kw.pop("opened_at", NOW - timedelta(days=3))
    return Case(
        case_id=case_id,
        device_id=device.device_id,
        owner_id=device.owner_id,
        model=device.model,
        fault=fault,
        state=state,
        urgency=kw.pop("urgency", "normal"),
        opened_at=opened,
        updated_at=kw.pop("updated_at", opened + timedelta(hours=1)),
        confidence=kw.pop("confidence", 0.9),
        **kw,
    )


async def audit(
    store: SqliteStore,
    case: Case,
    at: datetime,
    action: str,
    reason: str,
    *,
    actor: Any = "system",
    evidence: dict[str, Any] | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
) -> None:
    await store.add_audit(
        AuditEntry(case.case_id, at, actor, action, reason, evidence or {}, from_state, to_state)
    )


@dataclass
class Seed:
    """What :func:`seed_fleet` wrote."""

    devices: list[DeviceRecord]
    rated: Case
    queued: Case
    task_id: str
    open_case: Case
    appointment: Appointment


async def seed_fleet(store: SqliteStore, *, devices: int = 40) -> Seed:
    """A small fleet: two product models, firmware and batches, one owner with push
    channels full of secrets, a case followed from diagnosis to a low rating (now in the
    person-needed queue), an open case with a visit booked, and a firmware cluster."""
    owner = Owner("own-1", OWNER_NAME, timezone="Europe/Berlin")
    await store.put_owner(owner)
    await store.put_owner(Owner("own-2", "Second Owner"))
    await store.put_channel(
        PushChannel(
            "ch-1",
            "own-1",
            "webpush",
            SECRETS[0],
            {"p256dh": SECRETS[1], "auth": SECRETS[2]},
            created_at=NOW,
        )
    )
    await store.put_channel(PushChannel("ch-2", "own-1", "fcm", SECRETS[3], created_at=NOW))
    await store.put_channel(
        PushChannel(
            "ch-3",
            "own-1",
            "webhook",
            "https://hooks.example.org/SECRET-hook",
            {"secret": SECRETS[4]},
            created_at=NOW,
        )
    )
    fleet = []
    for i in range(devices):
        model = "fridge-a1" if i % 2 == 0 else "washer-w3"
        firmware = ("1.4.0" if i % 4 == 0 else "1.5.2") if model == "fridge-a1" else "3.0.1"
        record = DeviceRecord(
            f"dev-{i:04d}",
            "own-1" if i < 4 else "own-2",
            model,
            firmware,
            label="kitchen" if i == 0 else None,
            batch=f"B{i % 3}",
        )
        fleet.append(record)
        await store.put_device(record)
    tech = Technician("tech-1", "Tom Tech", "default", frozenset({"compressor"}))
    await store.put_technician(tech)

    # a case followed from diagnosis to rating
    device = fleet[0]
    t0 = NOW - timedelta(days=2)
    rated = make_case(
        "case-rated",
        device,
        "door_seal_leak",
        "escalated",
        opened_at=t0,
        updated_at=t0 + timedelta(hours=30),
        tried=("defrost_cycle",),
        remedies=("defrost_cycle", "technician_visit:door_seal"),
        rating=2,
        needs_person="low rating (2 of 5)",
        evidence=("door open 40% of the time",),
    )
    await store.add_case(rated)
    await audit(
        store,
        rated,
        t0,
        "transition",
        "diagnostics named door_seal_leak (confidence 0.91)",
        to_state="opened",
        evidence={"confidence": 0.91, "drivers": ["door_open z=+4.1"]},
    )
    await audit(
        store,
        rated,
        t0 + timedelta(minutes=1),
        "transition",
        "the owner lets us fix it",
        from_state="opened",
        to_state="remote_fix",
    )
    await audit(
        store,
        rated,
        t0 + timedelta(minutes=1),
        "command",
        "sent defrost_cycle",
        evidence={"action": "defrost_cycle"},
    )
    # an audit entry that quotes a channel: the dashboard must mask it
    await audit(
        store,
        rated,
        t0 + timedelta(minutes=2),
        "notify",
        f"told the owner via {SECRETS[0]}",
        evidence={"kind": "fix_started", "target": SECRETS[3], "note": SECRETS[4]},
    )
    await audit(
        store,
        rated,
        t0 + timedelta(hours=2),
        "transition",
        "the command worked",
        from_state="remote_fix",
        to_state="verifying",
    )
    await audit(
        store,
        rated,
        t0 + timedelta(hours=26),
        "transition",
        "the device's scores stayed at its healthy baseline after the fix",
        from_state="verifying",
        to_state="resolved",
    )
    await store.add_rating(
        Rating(rated.case_id, 2, "still noisy at night", False, t0 + timedelta(hours=30))
    )
    await audit(
        store,
        rated,
        t0 + timedelta(hours=30),
        "rating",
        "the owner rated it 2 of 5",
        actor="owner",
        evidence={"stars": 2},
    )
    await audit(
        store,
        rated,
        t0 + timedelta(hours=30),
        "transition",
        "low rating (2 of 5)",
        actor="owner",
        from_state="resolved",
        to_state="escalated",
    )
    task = Task("task-1", rated.case_id, "low rating (2 of 5)", t0 + timedelta(hours=30))
    await store.add_task(task)

    # an open case waiting for a visit this week
    booked = make_case(
        "case-booked",
        fleet[1],
        "drum_bearing_wear",
        "booked",
        opened_at=NOW - timedelta(days=1),
        failure_at=NOW + timedelta(days=9),
        appointment_id="appt-1",
        remedies=("technician_visit:bearing",),
    )
    await store.add_case(booked)
    await audit(
        store,
        booked,
        booked.opened_at,
        "transition",
        "diagnostics named drum_bearing_wear",
        to_state="opened",
    )
    appointment = Appointment(
        "appt-1",
        booked.case_id,
        "tech-1",
        NOW + timedelta(days=1),
        NOW + timedelta(days=1, hours=2),
        "booked",
        part="bearing",
    )
    await store.book(appointment)

    # a firmware cluster: compressor stalls on fridge firmware 1.5.2, rare elsewhere
    n = 0
    for record in fleet:
        if record.model != "fridge-a1":
            continue
        if record.firmware == "1.5.2" or n == 0:
            state = "opened" if n % 3 else "resolved"
            case = make_case(
                f"case-stall-{n}",
                record,
                "compressor_stall",
                state,
                opened_at=NOW - timedelta(days=5, hours=n),
                remedies=("firmware_update", "technician_visit:compressor"),
            )
            await store.add_case(case)
            n += 1
    open_case = await store.get_case("case-stall-1")
    assert open_case is not None
    return Seed(fleet, rated, rated, task.task_id, open_case, appointment)


# -- fixtures ----------------------------------------------------------------------------


@dataclass
class World:
    client: Client
    store: SqliteStore
    clock: Clock
    feed: CaseFeed
    campaign: RecordingCampaign
    seed: Seed
    influx: InfluxClient | None = None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "cases.db") as opened:
        yield opened


@pytest.fixture
async def influx(influxd: InfluxdServer) -> AsyncIterator[InfluxClient]:
    settings = InfluxSettings(url=influxd.url, database=f"dash_{uuid.uuid4().hex[:10]}")
    async with InfluxClient(settings) as client:
        await client.ensure_database()
        yield client


async def make_world(
    aiohttp_client: ClientFactory,
    store: SqliteStore,
    influx: InfluxClient | None,
    *,
    seed: Seed | None = None,
    **settings: Any,
) -> World:
    clock = Clock()
    feed = CaseFeed(queue_size=4)
    campaign = RecordingCampaign()
    seed = seed or await seed_fleet(store)
    app = create_app(
        store=store,
        influx=influx,
        actions=None,
        users=ops_users(),
        clock=clock,
        campaign=campaign,
        feed=feed,
        settings=DashboardSettings(**settings),
    )
    client = await aiohttp_client(app)
    return World(client, store, clock, feed, campaign, seed, influx)


@pytest.fixture
async def world(aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient) -> World:
    return await make_world(aiohttp_client, store, influx, cache_s=0)


async def login(client: Client, username: str) -> str:
    resp = await client.post(
        "/ops/login", json={"username": username, "password": PASSWORDS[username]}
    )
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["csrf_token"])


async def post(client: Client, path: str, csrf: str | None, body: Any = None) -> Any:
    headers = {} if csrf is None else {CSRF_HEADER: csrf}
    return await client.post(path, json=body or {}, headers=headers)


# -- passwords and login -------------------------------------------------------------------


def test_password_hashes_verify_only_the_right_password() -> None:
    encoded = hash_password("correct horse", n=2**10)
    assert encoded.startswith("scrypt$1024$8$1$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)
    assert hash_password("correct horse", n=2**10) != encoded  # a fresh salt each time
    for bad in (
        "",
        "plain",
        "scrypt$x$8$1$aa$bb",
        "scrypt$3$8$1$aa$bb",
        "scrypt$1099511627776$8$1$aa$bb",
        encoded.rsplit("$", 1)[0] + "$",
    ):
        assert not verify_password("correct horse", bad)


async def test_the_api_needs_a_session(world: World) -> None:
    client = world.client
    for path in (
        "/ops/api/fleet",
        "/ops/api/cases",
        "/ops/api/queue",
        "/ops/api/events",
        "/ops/api/devices/dev-0000",
        "/ops/api/insight",
        "/ops/api/outcomes",
    ):
        resp = await client.get(path)
        assert resp.status == 401, path
        assert (await resp.json())["error"] == "log in first"
    resp = await client.post("/ops/api/tasks/task-1/take")
    assert resp.status == 401
    # the page itself loads (it shows the login form), and /ops leads to it
    resp = await client.get("/ops/")
    assert resp.status == 200
    assert "text/html" in resp.headers["Content-Type"]
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    resp = await client.get("/ops", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/ops/"


async def test_wrong_password_is_refused_and_the_cookie_is_strict(world: World) -> None:
    client = world.client
    resp = await client.post("/ops/login", json={"username": "alex", "password": "nope"})
    assert resp.status == 401
    assert COOKIE_NAME not in resp.cookies
    resp = await client.post("/ops/login", json={"username": "nobody", "password": "nope"})
    assert resp.status == 401
    resp = await client.post("/ops/login", json={"username": "alex", "password": PASSWORDS["alex"]})
    assert resp.status == 200
    cookie = resp.headers["Set-Cookie"]
    assert f"{COOKIE_NAME}=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/ops" in cookie
    body = await resp.json()
    assert body["role"] == "agent"
    assert len(body["csrf_token"]) >= 32
    resp = await client.get("/ops/api/session")
    assert resp.status == 200
    assert (await resp.json())["username"] == "alex"


async def test_a_login_form_post_sets_the_session_and_goes_to_the_page(world: World) -> None:
    resp = await world.client.post(
        "/ops/login",
        data={"username": "vera", "password": PASSWORDS["vera"]},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/ops/"
    assert (await world.client.get("/ops/api/fleet")).status == 200


async def test_a_login_from_another_site_is_refused(world: World) -> None:
    resp = await world.client.post(
        "/ops/login",
        json={"username": "ada", "password": PASSWORDS["ada"]},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403


async def test_failed_logins_are_rate_limited(world: World) -> None:
    client = world.client
    for _ in range(5):
        resp = await client.post("/ops/login", json={"username": "ada", "password": "guess"})
        assert resp.status == 401
    # this address now waits, even with the right password (tests/test_dashboard_login.py
    # shows the delay growing, and the account still open to other addresses)
    resp = await client.post("/ops/login", json={"username": "ada", "password": PASSWORDS["ada"]})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    world.clock.now += timedelta(seconds=301)
    resp = await client.post("/ops/login", json={"username": "ada", "password": PASSWORDS["ada"]})
    assert resp.status == 200


async def test_sessions_expire_and_end_at_logout(world: World) -> None:
    client = world.client
    csrf = await login(client, "vera")
    assert (await client.get("/ops/api/fleet")).status == 200
    world.clock.now += timedelta(minutes=59)
    assert (await client.get("/ops/api/fleet")).status == 200  # use extends it
    world.clock.now += timedelta(minutes=61)
    assert (await client.get("/ops/api/fleet")).status == 401
    csrf = await login(client, "vera")
    # ... but never past the absolute limit
    for _ in range(13):  # 11 h 55 min of use
        world.clock.now += timedelta(minutes=55)
        assert (await client.get("/ops/api/ping")).status == 200
    world.clock.now += timedelta(minutes=6)
    assert (await client.get("/ops/api/ping")).status == 401
    csrf = await login(client, "vera")
    assert (await post(client, "/ops/logout", None)).status == 403  # CSRF applies
    assert (await post(client, "/ops/logout", csrf)).status == 200
    assert (await client.get("/ops/api/ping")).status == 401


# -- roles and CSRF -------------------------------------------------------------------------


async def test_a_viewer_reads_but_cannot_take_over_or_start_campaigns(world: World) -> None:
    client = world.client
    csrf = await login(client, "vera")
    assert (await client.get("/ops/api/queue")).status == 200
    resp = await post(client, "/ops/api/tasks/task-1/take", csrf)
    assert resp.status == 403
    resp = await post(client, "/ops/api/tasks/task-1/close", csrf, {"outcome": "resolved"})
    assert resp.status == 403
    resp = await post(client, "/ops/api/tasks/task-1/message", csrf, {"body": "hello"})
    assert resp.status == 403
    resp = await post(
        client,
        "/ops/api/campaigns",
        csrf,
        {
            "fault": "compressor_stall",
            "dimension": "firmware",
            "value": "1.5.2",
            "action": "firmware_update",
        },
    )
    assert resp.status == 403
    assert world.campaign.calls == []
    assert (await world.store.tasks(state="open"))[0].task_id == "task-1"


async def test_csrf_token_missing_or_wrong_is_403(world: World) -> None:
    client = world.client
    csrf = await login(client, "alex")
    assert (await post(client, "/ops/api/tasks/task-1/take", None)).status == 403
    resp = await post(
        client, "/ops/api/tasks/task-1/take", csrf[:-1] + ("x" if csrf[-1] != "x" else "y")
    )
    assert resp.status == 403
    assert (await resp.json())["error"] == "missing or wrong CSRF token"
    assert (await world.store.tasks(state="open"))[0].state == "open"
    assert (await post(client, "/ops/api/tasks/task-1/take", csrf)).status == 200


async def test_an_agent_takes_over_writes_to_the_owner_and_closes(world: World) -> None:
    client, store = world.client, world.store
    csrf = await login(client, "alex")
    queue = await (await client.get("/ops/api/queue")).json()
    assert [t["task_id"] for t in queue["tasks"]] == ["task-1"]
    assert queue["tasks"][0]["case"]["state"] == "escalated"

    resp = await post(client, "/ops/api/tasks/task-1/take", csrf)
    assert resp.status == 200
    assert (await resp.json())["task"] == {
        **(await resp.json())["task"],
        "state": "taken",
        "assignee": "alex",
    }
    assert (await store.tasks(state="taken"))[0].assignee == "alex"

    resp = await post(
        client,
        "/ops/api/tasks/task-1/message",
        csrf,
        {"body": "Sorry about the noise, we will call you.", "title": "About your fridge"},
    )
    assert resp.status == 201
    sent = [n for n in await store.notifications("own-1") if n.kind == "ops_message"]
    assert len(sent) == 1
    assert sent[0].body == "Sorry about the noise, we will call you."
    assert sent[0].case_id == "case-rated"
    assert sent[0].status == "queued"
    resp = await post(client, "/ops/api/tasks/task-1/message", csrf, {"body": "  "})
    assert resp.status == 422

    resp = await post(
        client,
        "/ops/api/tasks/task-1/close",
        csrf,
        {"outcome": "resolved", "note": "called the owner, fine now"},
    )
    assert resp.status == 200, await resp.text()
    case = await store.get_case("case-rated")
    assert case is not None
    assert case.state == "resolved"
    assert case.needs_person is None
    trail = await store.audit("case-rated")
    ops_entries = [e for e in trail if e.actor == "ops"]
    assert [e.action for e in ops_entries] == ["take_over", "ops_message", "transition"]
    assert ops_entries[-1].from_state == "escalated"
    assert ops_entries[-1].to_state == "resolved"
    assert ops_entries[-1].evidence["user"] == "alex"
    assert (await store.tasks(case_id="case-rated"))[0].state == "closed"
    # closing again is a conflict, not a second transition
    resp = await post(client, "/ops/api/tasks/task-1/close", csrf, {"outcome": "dismissed"})
    assert resp.status == 409
    assert (await client.get("/ops/api/queue")).status == 200
    assert (await (await client.get("/ops/api/queue")).json())["tasks"] == []


async def test_a_task_taken_by_one_agent_is_not_closed_by_another(
    world: World, aiohttp_client: ClientFactory
) -> None:
    csrf = await login(world.client, "alex")
    assert (await post(world.client, "/ops/api/tasks/task-1/take", csrf)).status == 200
    other = await aiohttp_client(world.client.app)
    # a second agent would need their own user; the admin may override
    csrf_admin = await login(other, "ada")
    resp = await post(other, "/ops/api/tasks/task-1/close", csrf_admin, {"outcome": "dismissed"})
    assert resp.status == 200
    case = await world.store.get_case("case-rated")
    assert case is not None
    assert case.state == "dismissed"


async def test_closing_a_case_that_moved_meanwhile_is_a_conflict(world: World) -> None:
    csrf = await login(world.client, "alex")
    store = world.store
    case = await store.get_case("case-rated")
    assert case is not None
    # the case machine moves the case to dismissed behind the dashboard's back
    await store.update_case(replace(case, state="dismissed"), expected_state="escalated")
    resp = await post(world.client, "/ops/api/tasks/task-1/close", csrf, {"outcome": "resolved"})
    assert resp.status == 422  # a dismissed case cannot become resolved
    assert (await store.tasks(case_id="case-rated"))[0].state == "open"


async def test_an_admin_starts_a_campaign_for_the_group(world: World) -> None:
    client = world.client
    csrf = await login(client, "alex")
    body = {
        "fault": "compressor_stall",
        "dimension": "firmware",
        "value": "1.5.2",
        "action": "firmware_update",
    }
    assert (await post(client, "/ops/api/campaigns", csrf, body)).status == 403
    csrf = await login(client, "ada")
    resp = await post(client, "/ops/api/campaigns", csrf, body)
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    expected = sorted(d.device_id for d in world.seed.devices if d.firmware == "1.5.2")
    assert answer == {"devices": len(expected), "cases": len(expected)}
    [(device_ids, action, reason)] = world.campaign.calls
    assert device_ids == expected
    assert action == "firmware_update"
    assert "compressor_stall" in reason
    assert "ada" in reason
    resp = await post(client, "/ops/api/campaigns", csrf, {**body, "action": "rm -rf /"})
    assert resp.status == 422
    resp = await post(client, "/ops/api/campaigns", csrf, {**body, "value": "9.9.9"})
    assert resp.status == 404


# -- owner data stays off the page ------------------------------------------------------


async def _every_answer(client: Client, influx_device: str = "dev-0000") -> list[tuple[str, bytes]]:
    paths = [
        "/ops/api/session",
        "/ops/api/ping",
        "/ops/api/fleet",
        "/ops/api/devices",
        f"/ops/api/devices/{influx_device}?range=7d",
        "/ops/api/devices/dev-0001?range=30d",
        "/ops/api/cases",
        "/ops/api/cases/case-rated",
        "/ops/api/cases/case-booked",
        "/ops/api/cases/case-stall-1",
        "/ops/api/queue",
        "/ops/api/appointments?week=2024-05-13",
        "/ops/api/outcomes",
        "/ops/api/insight",
    ]
    answers = []
    for path in paths:
        resp = await client.get(path)
        assert resp.status == 200, (path, await resp.text())
        answers.append((path, await resp.read()))
    return answers


async def test_owner_contacts_never_reach_any_answer(world: World) -> None:
    assert world.influx is not None
    await world.influx.write(
        [
            point_line(
                "device_events",
                {"device": "dev-0000", "kind": "command_result"},
                {"seq": 1, "command_id": "c-1", "ok": True},
                int((NOW - timedelta(hours=3)).timestamp() * 1000),
            ),
        ]
    )
    for user in ("vera", "alex", "ada"):
        await login(world.client, user)
        for path, body in await _every_answer(world.client):
            for secret in (*SECRETS, "SECRET"):
                assert secret.encode() not in body, (user, path, secret)
            assert b"own-1" not in body, (user, path)  # not even the owner's id
            if user == "vera" or not path.startswith("/ops/api/cases/"):
                assert OWNER_NAME.encode() not in body, (user, path)
    # the agent sees the owner's name on the case page, and only there
    await login(world.client, "alex")
    page = await (await world.client.get("/ops/api/cases/case-rated")).json()
    assert page["owner"] == {"name": OWNER_NAME, "language": "en"}
    masked = next(e for e in page["audit"] if e["action"] == "notify")
    assert masked["reason"] == "told the owner via [hidden]"
    assert masked["evidence"]["target"] == "[hidden]"
    assert masked["evidence"]["note"] == "[hidden]"


# -- charts -------------------------------------------------------------------------------


def test_bucket_width_keeps_points_within_the_limit() -> None:
    start = NOW - timedelta(days=30)
    for span in (
        timedelta(minutes=5),
        timedelta(hours=1),
        timedelta(days=1),
        timedelta(days=7),
        timedelta(days=30),
        timedelta(days=400),
    ):
        for limit in (10, 100, 500):
            width = bucket_s(NOW - span, NOW, limit)
            first = int((NOW - span).timestamp()) // width
            last = (int(NOW.timestamp()) - 1) // width
            assert last - first + 1 <= limit, (span, limit, width)
    assert bucket_s(start, NOW, 500) == 7200  # 30 days / 499 = 5194 s -> 2 h


async def test_device_chart_is_downsampled_by_influxdb(
    aiohttp_client: ClientFactory, store: SqliteStore, influx: InfluxClient
) -> None:
    world = await make_world(aiohttp_client, store, influx, cache_s=0)
    # a month of readings every minute (43,200 points) and scores every 5 minutes
    start = NOW - timedelta(days=30)
    lines = []
    for i in range(30 * 24 * 60):
        ts_ms = int((start + timedelta(minutes=i)).timestamp() * 1000)
        lines.append(
            point_line(
                "telemetry",
                {"device": "dev-0000"},
                {"temp_c": 4.0 + (i % 60) / 10, "door_open": i % 7 == 0, "seq": i, "status": "ok"},
                ts_ms,
            )
        )
        if i % 5 == 0:
            lines.append(
                point_line(
                    "health",
                    {"device": "dev-0000"},
                    {"score": (i % 100) / 100, "baseline": 0.1, "fleet": 0.2},
                    ts_ms,
                )
            )
    for chunk in range(0, len(lines), 10_000):
        outcome = await influx.write(lines[chunk : chunk + 10_000])
        assert not outcome.rejected
    await login(world.client, "vera")
    for query, width in (
        ("range=30d", 7200),
        ("range=7d", 1800),
        ("range=24h", 300),
        ("range=1h", 10),
    ):
        resp = await world.client.get(f"/ops/api/devices/dev-0000?{query}")
        assert resp.status == 200
        data = await resp.json()
        assert data["range"]["bucket_s"] == width
        times = data["telemetry"]["times_ms"]
        assert 0 < len(times) <= 500, query
        assert list(data["telemetry"]["metrics"]) == ["temp_c"]  # no seq, bool or text
        assert len(data["telemetry"]["metrics"]["temp_c"]) == len(times)
        assert 0 < len(data["score"]["times_ms"]) <= 500
        assert len(data["score"]["score"]) == len(data["score"]["times_ms"])
    # the 1-hour view: 10 s buckets, one reading each, so the means are the readings
    data = await (await world.client.get("/ops/api/devices/dev-0000?range=1h")).json()
    assert len(data["telemetry"]["times_ms"]) == 60
    # an explicit range, with a smaller limit from the settings
    small = await make_world(aiohttp_client, store, influx, seed=world.seed, max_points=50)
    await login(small.client, "vera")
    resp = await small.client.get(
        "/ops/api/devices/dev-0000",
        params={"start": (NOW - timedelta(days=10)).isoformat(), "end": NOW.isoformat()},
    )
    data = await resp.json()
    assert len(data["telemetry"]["times_ms"]) <= 50
    assert data["range"]["bucket_s"] * 49 >= 10 * 86400
    # bucket means, from InfluxDB
    resp = await small.client.get(
        "/ops/api/devices/dev-0000",
        params={"start": (NOW - timedelta(hours=1)).isoformat(), "end": NOW.isoformat()},
    )
    data = await resp.json()
    assert data["range"]["bucket_s"] == 120
    means = data["telemetry"]["metrics"]["temp_c"]
    # bucket k holds the readings of minutes 2k and 2k+1: 4.0 + (2k + 0.5) / 10
    assert means == pytest.approx([4.05 + 0.2 * k for k in range(30)])
    for bad in (
        {"range": "2y"},
        {"start": "yesterday"},
        {"start": "2024-05-01T00:00:00"},
        {"start": NOW.isoformat(), "end": (NOW - timedelta(hours=1)).isoformat()},
        {"start": (NOW - timedelta(days=500)).isoformat()},
    ):
        assert (await small.client.get("/ops/api/devices/dev-0000", params=bad)).status == 422
    assert (await small.client.get("/ops/api/devices/nope")).status == 404


async def test_device_page_marks_diagnoses_commands_and_events(world: World) -> None:
    assert world.influx is not None
    event_at = NOW - timedelta(days=2) + timedelta(minutes=3)
    await world.influx.write(
        [
            point_line(
                "device_events",
                {"device": "dev-0000", "kind": "command_result"},
                {"seq": 7, "command_id": "cmd-9", "ok": True},
                int(event_at.timestamp() * 1000),
            ),
            point_line(
                "device_events",
                {"device": "dev-0000", "kind": "error"},
                {"seq": 8, "code": "E42"},
                int((NOW - timedelta(days=10)).timestamp() * 1000),
            ),
        ]
    )
    await login(world.client, "vera")
    data = await (await world.client.get("/ops/api/devices/dev-0000?range=7d")).json()
    kinds = [(m["kind"], m["label"]) for m in data["marks"]]
    assert ("diagnosis", "diagnostics named door_seal_leak (confidence 0.91)") in kinds
    assert ("command", "sent defrost_cycle") in kinds
    assert ("command", "command_result ok") in kinds
    assert ("case", "verifying → resolved") in kinds
    assert all("E42" not in label for _, label in kinds)  # outside the range
    assert [c["case_id"] for c in data["cases"]] == ["case-rated", "case-stall-0"]
    assert data["device"] == {
        "device_id": "dev-0000",
        "model": "fridge-a1",
        "firmware": "1.4.0",
        "firmware_from": "registry",
        "firmware_reported_at": None,
        "batch": "B0",
        "state": "unknown",
        "last_heard_at": None,
    }
    booked = await (await world.client.get("/ops/api/devices/dev-0001?range=24h")).json()
    # the predicted failure of the open case is marked (beyond the range end)
    assert [m["kind"] for m in booked["marks"]] == ["diagnosis", "failure"]


# -- overview, board, calendar ------------------------------------------------------------


async def test_fleet_overview_counts_devices_health_and_open_cases(world: World) -> None:
    assert world.influx is not None
    at_ms = int((NOW - timedelta(minutes=5)).timestamp() * 1000)
    scores = {"dev-0000": 0.1, "dev-0001": 0.4, "dev-0002": 0.9, "dev-0003": 0.95}
    await world.influx.write(
        [
            point_line("health", {"device": d}, {"score": s, "baseline": 0.1, "fleet": 0.1}, at_ms)
            for d, s in scores.items()
        ]
    )
    await login(world.client, "vera")
    data = await (await world.client.get("/ops/api/fleet")).json()
    assert data["devices"] == 40
    assert data["health"] == {
        "healthy": 1,
        "watch": 1,
        "anomalous": 2,
        "silent": 0,
        "unknown": 36,
    }
    models = {row["model"]: row for row in data["by_model"]}
    assert models["fridge-a1"]["devices"] == 20
    assert models["fridge-a1"]["anomalous"] == 1
    assert models["washer-w3"]["anomalous"] == 1
    firmware = {(r["model"], r["firmware"]): r for r in data["by_firmware"]}
    assert firmware[("fridge-a1", "1.5.2")]["devices"] == 10
    open_stalls = sum(1 for n in range(11) if n % 3)
    assert firmware[("fridge-a1", "1.5.2")]["open"] == open_stalls
    assert data["open_cases"]["by_state"] == {"booked": 1, "opened": open_stalls}
    assert [w["device_id"] for w in data["worst"]] == ["dev-0003", "dev-0002", "dev-0001"]
    listing = await (await world.client.get("/ops/api/devices?model=fridge-a1&limit=3")).json()
    assert listing["total"] == 20
    assert [d["device_id"] for d in listing["devices"]] == ["dev-0002", "dev-0000", "dev-0004"]


async def test_cases_board_and_case_view_follow_a_case_to_its_rating(world: World) -> None:
    await login(world.client, "vera")
    board = await (await world.client.get("/ops/api/cases")).json()
    stages = {s["state"]: s for s in board["stages"]}
    assert list(stages)[:3] == ["opened", "awaiting_consent", "remote_fix"]
    assert stages["escalated"]["count"] == 1
    card = stages["escalated"]["cases"][0]
    assert card["case_id"] == "case-rated"
    assert card["evidence"] == ["door open 40% of the time"]
    assert card["rating"] == 2
    assert "owner_id" not in card
    view = await (await world.client.get("/ops/api/cases/case-rated")).json()
    steps = [(e["action"], e["to_state"]) for e in view["audit"]]
    assert steps[0] == ("transition", "opened")
    assert ("transition", "resolved") in steps
    assert steps[-1] == ("transition", "escalated")
    assert view["rating"]["stars"] == 2
    assert view["rating"]["comment"] == "still noisy at night"
    assert view["owner"] is None  # a viewer does not see the owner
    assert view["tasks"][0]["reason"] == "low rating (2 of 5)"
    assert (await world.client.get("/ops/api/cases/nope")).status == 404


async def test_appointments_calendar_by_week(world: World) -> None:
    await login(world.client, "vera")
    week = await (await world.client.get("/ops/api/appointments")).json()
    assert week["week_start"] == "2024-05-13"
    assert len(week["days"]) == 7
    [visit] = week["appointments"]
    assert visit["technician"] == "Tom Tech"
    assert visit["device_id"] == "dev-0001"
    assert visit["start"] == (NOW + timedelta(days=1)).isoformat()
    later = await (await world.client.get(f"/ops/api/appointments?week={week['next']}")).json()
    assert later["appointments"] == []
    assert (await world.client.get("/ops/api/appointments?week=soon")).status == 422


# -- outcomes and insight ----------------------------------------------------------------


def _device(i: int, model: str, firmware: str | None, batch: str | None = None) -> DeviceRecord:
    return DeviceRecord(f"d{i}", "o", model, firmware, batch=batch)


def test_outcomes_on_a_known_seed() -> None:
    devices = {
        d.device_id: d
        for d in (_device(1, "m1", "1.0"), _device(2, "m1", "2.0"), _device(3, "m2", None))
    }
    t0 = NOW - timedelta(days=10)

    def case(cid: str, dev: str, state: Any, **kw: Any) -> Case:
        return make_case(cid, devices[dev], "f", state, opened_at=t0, **kw)

    cases = [
        case("a", "d1", "resolved"),  # remote, 2 h
        case("b", "d1", "resolved", appointment_id="ap"),  # visit, 50 h
        case("c", "d2", "escalated", rating=1),  # remote, 4 h, then a low rating
        case("d", "d3", "resolved"),  # visited (an appointment in the store), 10 h
        case("e", "d3", "opened"),  # not resolved
        case("f", "d2", "escalated"),  # failed fix, never resolved
    ]
    resolved_at = {
        "a": t0 + timedelta(hours=2),
        "b": t0 + timedelta(hours=50),
        "c": t0 + timedelta(hours=4),
        "d": t0 + timedelta(hours=10),
    }
    ratings = [
        Rating("a", 5, None, False, t0 + timedelta(days=1)),
        Rating("c", 1, "nothing was wrong with it", True, t0 + timedelta(days=1, hours=1)),
        Rating("d", 4, "quick", False, t0 + timedelta(days=8)),
        Rating("zzz", 1, "another fleet's", True, t0),  # not one of these cases
    ]
    data = outcomes(cases, ratings, devices, resolved_at, {"d"})
    totals = data["totals"]
    assert totals["cases"] == 6
    assert totals["resolved"] == 4
    assert totals["fixed_remotely"] == 2
    assert totals["fixed_remotely_share"] == 0.5
    assert totals["median_resolution_s"] == 7 * 3600  # median of 2, 4, 10, 50 h
    assert totals["ratings"] == 3
    assert totals["mean_stars"] == round(10 / 3, 3)
    assert totals["false_alarms"] == 1
    assert totals["false_alarm_share"] == round(1 / 3, 4)
    assert data["by_model"]["m1"]["resolved"] == 3
    assert data["by_model"]["m1"]["fixed_remotely_share"] == round(2 / 3, 4)
    assert data["by_model"]["m2"]["fixed_remotely"] == 0
    assert data["by_firmware"]["2.0"]["false_alarms"] == 1
    assert data["by_firmware"]["unknown"]["cases"] == 2
    assert [w["week"] for w in data["ratings_by_week"]] == ["2024-05-06", "2024-05-13"]
    assert data["ratings_by_week"][0] == {
        "week": "2024-05-06",
        "ratings": 2,
        "mean_stars": 3.0,
        "false_alarms": 1,
    }
    assert [c["case_id"] for c in data["comments"]] == ["d", "c"]


async def test_outcomes_endpoint_reads_resolution_times_from_the_audit_trail(world: World) -> None:
    await login(world.client, "vera")
    data = await (await world.client.get("/ops/api/outcomes")).json()
    totals = data["totals"]
    # resolved: the rated case (26 h, remote) and 4 stall cases marked resolved without a
    # trail (their updated_at, 1 h after opening); the booked case is open
    assert totals["resolved"] == 5
    assert totals["fixed_remotely"] == 5
    assert totals["median_resolution_s"] == 3600
    assert totals["ratings"] == 1
    assert totals["mean_stars"] == 2
    assert data["comments"][0]["comment"] == "still noisy at night"


def test_binomial_tail_matches_direct_sums() -> None:
    from math import comb

    for n, p in ((10, 0.3), (50, 0.02), (200, 0.5)):
        for k in range(0, n + 1, max(n // 10, 1)):
            direct = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
            assert binomial_sf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert binomial_sf(0, 5, 0.1) == 1.0
    assert binomial_sf(6, 5, 0.1) == 0.0


def test_insight_flags_a_planted_firmware_cluster() -> None:
    devices = []
    for i in range(600):
        model = "fridge" if i < 400 else "washer"
        firmware = ("2.1" if i % 4 == 0 else "2.0") if model == "fridge" else "7.0"
        devices.append(_device(i, model, firmware, batch=f"b{i % 5}"))
    cases = []
    for device in devices:
        n = int(device.device_id[1:])
        # compressor stalls: 30 of the 100 fridges on 2.1, 8 of the 300 on 2.0
        stall = (device.firmware == "2.1" and n % 40 < 12) or (
            device.firmware == "2.0" and n % 50 == 1
        )
        if stall:
            cases.append(
                make_case(
                    f"s{n}",
                    device,
                    "compressor_stall",
                    "opened",
                    remedies=("firmware_update", "technician_visit:compressor"),
                )
            )
        # door seals: spread evenly over every fridge group
        if device.model == "fridge" and n % 7 == 3:
            cases.append(
                make_case(
                    f"d{n}", device, "door_seal_leak", "resolved", remedies=("defrost_cycle",)
                )
            )
    groups = fleet_insight(devices, cases)
    flagged = [(g.fault, g.dimension, g.value) for g in groups if g.flagged]
    assert flagged == [("compressor_stall", "firmware", "2.1")]
    top = groups[0]
    assert (top.devices, top.affected) == (100, 30)
    assert (top.rest_devices, top.rest_affected) == (300, 8)  # only fridges: the fault's model
    assert top.suggested_action == "firmware_update"
    assert top.open_cases == 30
    assert top.share_of_cases == pytest.approx(30 / 38)
    assert top.share_of_fleet == pytest.approx(0.25)
    seals = [g for g in groups if g.fault == "door_seal_leak"]
    # one affected device among peers without a case is no cluster
    lone = fleet_insight(devices[:20], [make_case("x", devices[0], "rare_fault", "opened")])
    assert [
        (g.affected, g.rest_affected, g.flagged) for g in lone if g.dimension == "firmware"
    ] == [(1, 0, False)]
    assert all(g.p_value > 0.05 for g in lone)
    assert seals
    assert not any(g.flagged for g in seals)


async def test_insight_endpoint_flags_the_seeded_cluster(world: World) -> None:
    await login(world.client, "vera")
    data = await (await world.client.get("/ops/api/insight")).json()
    flagged = {(g["fault"], g["dimension"], g["value"]) for g in data["flagged"]}
    assert ("compressor_stall", "firmware", "1.5.2") in flagged
    assert all(g["fault"] == "compressor_stall" for g in data["flagged"])
    assert data["devices"] == 40


# -- live stream ---------------------------------------------------------------------------


async def _next_event(resp: Any) -> tuple[str, Any]:
    event = None
    async with asyncio.timeout(5):
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event is not None:
                return event, orjson.loads(line[len("data: ") :])


async def test_live_stream_delivers_a_published_case(world: World) -> None:
    await login(world.client, "vera")
    resp = await world.client.get("/ops/api/events")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert await _next_event(resp) == ("hello", {"ok": True})
    case = replace(world.seed.open_case, state="remote_fix", pending_action="firmware_update")
    world.feed.publish(case)
    kind, data = await _next_event(resp)
    assert kind == "case"
    assert data["case_id"] == "case-stall-1"
    assert data["state"] == "remote_fix"
    assert "owner_id" not in data
    # a burst larger than the queue: the oldest are dropped and the page is told
    for n in range(10):
        world.feed.publish(replace(case, confidence=n / 10))
    kind, data = await _next_event(resp)
    assert kind == "dropped"
    assert data["dropped"] == 6
    confidences = []
    for _ in range(4):
        kind, data = await _next_event(resp)
        confidences.append(data["confidence"])
    assert confidences == [0.6, 0.7, 0.8, 0.9]
    resp.close()


async def test_feed_queues_are_bounded_and_drop_the_oldest() -> None:
    feed = CaseFeed(queue_size=2)
    seed_case = make_case("c", DeviceRecord("d", "o", "m"), "f", "opened")
    async with feed.subscribe() as slow, feed.subscribe() as fast:
        for n in range(5):
            feed.publish(replace(seed_case, case_id=f"c{n}"))
            if n < 4:
                got = await fast.get()
                assert got is not None
        assert feed.subscribers == 2
        assert slow.dropped == 3
        assert [(await slow.get()).case_id for _ in range(2)] == ["c3", "c4"]  # type: ignore[union-attr]
        feed.close()
        assert (await fast.get()).case_id == "c4"  # type: ignore[union-attr]
        assert await fast.get() is None
    assert feed.subscribers == 0
    assert feed.version == 5


async def test_fleet_cache_follows_the_feed_and_refreshes_scores_behind(
    store: SqliteStore, influx: InfluxClient
) -> None:
    seed = await seed_fleet(store)
    feed = CaseFeed()
    ticker = Ticker()
    cache = FleetCache(store, influx, feed, cache_s=0.3, measurements=Measurements(), ticker=ticker)

    async def score(value: float, at: datetime) -> None:
        line = point_line(
            "health",
            {"device": "dev-0000"},
            {"score": value, "baseline": 0.1, "fleet": 0.1},
            int(at.timestamp() * 1000),
        )
        assert not (await influx.write([line])).rejected

    await score(0.1, NOW - timedelta(minutes=2))
    first = await cache.snapshot()
    assert first.scores["dev-0000"][1] == 0.1
    new = make_case("case-new", seed.devices[5], "drain_clog", "opened")
    await store.add_case(new)
    assert await cache.snapshot() is first  # reused within cache_s ...
    feed.publish(new)
    second = await cache.snapshot()  # ... but never past a change on the feed
    assert "case-new" in {c.case_id for c in second.cases}
    await score(0.9, NOW - timedelta(minutes=1))
    assert (await cache.snapshot()).scores["dev-0000"][1] == 0.1  # scores kept within cache_s
    ticker.now += 0.35
    latest = (await cache.snapshot()).scores["dev-0000"][1]  # starts a read behind
    assert latest in (0.1, 0.9)

    async def score_now() -> float:
        return float((await cache.snapshot()).scores["dev-0000"][1])

    assert await landed(score_now, lambda value: value == 0.9) == 0.9
    assert cache.score_failures == 0
    await cache.close()


# -- the fleet cache follows the feed -----------------------------------------------------


class CountingStore:
    """A case store that counts the calls of each of its methods and passes them on."""

    def __init__(self, store: SqliteStore) -> None:
        self.inner = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await method(*args, **kwargs)

        return counted


async def cached_world(
    aiohttp_client: ClientFactory, store: SqliteStore, **settings: Any
) -> tuple[World, CountingStore]:
    """A seeded dashboard with its cache on, reading the store through a call counter."""
    seed = await seed_fleet(store)
    counting = CountingStore(store)
    feed = CaseFeed(queue_size=4)
    campaign = RecordingCampaign()
    app = create_app(
        store=cast(CaseStore, counting),
        influx=None,
        actions=None,
        users=ops_users(),
        clock=Clock(),
        campaign=campaign,
        feed=feed,
        settings=DashboardSettings(**settings),
    )
    client = await aiohttp_client(app)
    return World(client, store, Clock(), feed, campaign, seed), counting


def _stage(board: dict[str, Any], state: str) -> list[str]:
    [stage] = [s for s in board["stages"] if s["state"] == state]
    return [c["case_id"] for c in stage["cases"]]


async def test_a_case_on_the_feed_reaches_every_answer_without_reading_the_store(
    aiohttp_client: ClientFactory, store: SqliteStore
) -> None:
    world, counting = await cached_world(aiohttp_client, store, cache_s=60)
    client = world.client
    csrf = await login(client, "alex")
    board = await (await client.get("/ops/api/cases")).json()
    fleet = await (await client.get("/ops/api/fleet")).json()
    insight = await (await client.get("/ops/api/insight")).json()
    await client.get("/ops/api/outcomes")
    await client.get("/ops/api/appointments")
    assert "case-stall-1" in _stage(board, "opened")
    assert counting.calls["cases"] == 1
    assert counting.calls["devices"] == 1

    # the case machine moves a case and opens one; only the feed tells the dashboard
    moved = replace(
        world.seed.open_case,
        state="remote_fix",
        pending_action="firmware_update",
        updated_at=NOW - timedelta(minutes=1),
    )
    fresh = make_case(
        "case-fresh",
        world.seed.devices[8],  # a fridge on 1.4.0 without a stall so far
        "compressor_stall",
        "opened",
        opened_at=NOW - timedelta(minutes=5),
    )
    world.feed.publish(moved)
    world.feed.publish(fresh)
    board = await (await client.get("/ops/api/cases")).json()
    assert "case-stall-1" not in _stage(board, "opened")
    assert "case-stall-1" in _stage(board, "remote_fix")
    assert _stage(board, "opened")[0] == "case-fresh"  # newest first
    after = await (await client.get("/ops/api/fleet")).json()
    before_states = fleet["open_cases"]["by_state"]
    assert after["open_cases"]["by_state"] == {
        **before_states,
        "remote_fix": 1,
        "opened": before_states["opened"],  # one moved on, one came
    }
    older = {(r["model"], r["firmware"]): r["open"] for r in fleet["by_firmware"]}
    newer = {(r["model"], r["firmware"]): r["open"] for r in after["by_firmware"]}
    assert newer[("fridge-a1", "1.4.0")] == older[("fridge-a1", "1.4.0")] + 1

    def stalls(data: dict[str, Any]) -> int:
        return int(
            next(
                g["affected"]
                for g in data["flagged"] + data["groups"]
                if (g["fault"], g["dimension"], g["value"])
                == ("compressor_stall", "model", "fridge-a1")
            )
        )

    assert stalls(await (await client.get("/ops/api/insight")).json()) == stalls(insight) + 1
    outcomes_now = await (await client.get("/ops/api/outcomes")).json()
    assert outcomes_now["totals"]["cases"] == 14  # 13 seeded, one new
    # the queue shows its task's case from the snapshot: no lookup per task
    queue = await (await client.get("/ops/api/queue")).json()
    assert queue["tasks"][0]["case"]["state"] == "escalated"
    assert counting.calls["get_case"] == 0
    # a change made on the dashboard goes the same way
    assert (await post(client, "/ops/api/tasks/task-1/close", csrf, {"outcome": "resolved"})).ok
    board = await (await client.get("/ops/api/cases")).json()
    assert "case-rated" in _stage(board, "resolved")
    assert "case-rated" not in _stage(board, "escalated")
    assert counting.calls["cases"] == 1  # never read again
    assert counting.calls["devices"] == 1
    assert counting.calls["ratings"] == 1  # outcomes looked up only the changed cases
    assert counting.calls["get_rating"] == 2


async def test_an_older_update_does_not_overwrite_a_newer_one(
    aiohttp_client: ClientFactory, store: SqliteStore
) -> None:
    world, counting = await cached_world(aiohttp_client, store, cache_s=60)
    await login(world.client, "vera")
    board = await (await world.client.get("/ops/api/cases")).json()
    assert "case-stall-1" in _stage(board, "opened")
    base = world.seed.open_case
    newer = replace(base, state="remote_fix", updated_at=NOW + timedelta(minutes=2))
    older = replace(base, state="awaiting_consent", updated_at=NOW + timedelta(minutes=1))
    world.feed.publish(newer)
    world.feed.publish(older)  # late, e.g. redelivered after a reconnect
    board = await (await world.client.get("/ops/api/cases")).json()
    assert "case-stall-1" in _stage(board, "remote_fix")
    assert "case-stall-1" not in _stage(board, "awaiting_consent")
    # the late one arriving on its own later changes nothing either
    world.feed.publish(older)
    board = await (await world.client.get("/ops/api/cases")).json()
    assert "case-stall-1" in _stage(board, "remote_fix")
    # a change with the same time as the one held is the later message: it wins
    same = replace(newer, state="verifying")
    world.feed.publish(same)
    board = await (await world.client.get("/ops/api/cases")).json()
    assert "case-stall-1" in _stage(board, "verifying")
    assert counting.calls["cases"] == 1


def test_applied_changes_keep_the_store_order_and_skip_older_records() -> None:
    device = DeviceRecord("d", "o", "m")
    cases = [
        make_case(f"c{n}", device, "f", "opened", opened_at=NOW - timedelta(days=n))
        for n in range(5)
    ]
    snapshot = Snapshot({}, cases, {c.case_id: c for c in cases}, {}, 0.0, 3)
    moved = replace(cases[2], state="remote_fix", updated_at=cases[2].updated_at + timedelta(1))
    stale = replace(cases[3], state="dismissed", updated_at=cases[3].updated_at - timedelta(1))
    between = make_case("c9", device, "g", "opened", opened_at=NOW - timedelta(days=1, hours=1))
    after, changed = apply_changes(snapshot, [moved, stale, between], 6)
    assert changed == {"c2", "c9"}
    assert [c.case_id for c in after.cases] == ["c0", "c1", "c9", "c2", "c3", "c4"]
    assert after.by_id["c2"] is moved
    assert after.by_id["c3"] is cases[3]
    assert after.version == 6
    assert [c.case_id for c in snapshot.cases] == ["c0", "c1", "c2", "c3", "c4"]  # untouched
    assert snapshot.by_id["c2"] is cases[2]
    # in place when no case is new: same order, no sorting needed
    again, changed = apply_changes(after, [replace(moved, state="verifying")], 7)
    assert [c.case_id for c in again.cases] == [c.case_id for c in after.cases]
    assert again.by_id["c2"].state == "verifying"


def test_the_feed_hands_out_recent_changes_until_it_cannot() -> None:
    feed = CaseFeed(log_size=3)
    case = make_case("c", DeviceRecord("d", "o", "m"), "f", "opened")
    assert feed.changes_since(0) == []
    for n in range(2):
        feed.publish(replace(case, case_id=f"c{n}"))
    assert [c.case_id for c in feed.changes_since(0) or []] == ["c0", "c1"]
    assert [c.case_id for c in feed.changes_since(1) or []] == ["c1"]
    assert feed.changes_since(2) == []
    feed.touch()
    assert feed.changes_since(1) is None  # a change without a case: read the store
    assert feed.changes_since(3) == []
    for n in range(2, 6):
        feed.publish(replace(case, case_id=f"c{n}"))
    # versions 5, 6 and 7 are kept: back to 4 is known, 3 is older than the log
    assert [c.case_id for c in feed.changes_since(5) or []] == ["c4", "c5"]
    assert [c.case_id for c in feed.changes_since(4) or []] == ["c3", "c4", "c5"]
    assert feed.changes_since(3) is None
    assert feed.changes_since(99) is None  # a version this feed never had


async def test_the_store_is_read_again_after_max_age_and_after_a_touch(
    store: SqliteStore,
) -> None:
    seed = await seed_fleet(store)
    counting = CountingStore(store)
    feed = CaseFeed()
    ticker = Ticker()
    cache = FleetCache(
        cast(CaseStore, counting),
        None,
        feed,
        cache_s=0.2,
        measurements=Measurements(),
        ticker=ticker,
    )
    try:
        first = await cache.snapshot()
        assert counting.calls["cases"] == 1
        # a change the feed never carried (a lost message)
        missed = make_case("case-missed", seed.devices[7], "drain_clog", "opened")
        await store.add_case(missed)
        assert await cache.snapshot() is first
        ticker.now += 0.25
        # past cache_s: this answer is still the kept snapshot, the store is read behind it
        behind = await cache.snapshot()
        assert "case-missed" not in behind.by_id
        found = await landed(cache.snapshot, lambda snap: "case-missed" in snap.by_id)
        assert "case-missed" in found.by_id
        assert counting.calls["cases"] == 2
        # read behind the answer at 0.25 s, not before one at 0.6 s
        assert found.read_at - first.read_at == 0.25
        # nobody asked for three times cache_s: the store is read before the answer
        other = make_case("case-missed-2", seed.devices[9], "drain_clog", "opened")
        await store.add_case(other)
        ticker.now += 0.65
        assert "case-missed-2" in (await cache.snapshot()).by_id
        assert counting.calls["cases"] == 3
        # a change the feed cannot describe: the next snapshot reads the store at once
        third = make_case("case-missed-3", seed.devices[11], "drain_clog", "opened")
        await store.add_case(third)
        feed.touch()
        assert "case-missed-3" in (await cache.snapshot()).by_id
        assert counting.calls["cases"] == 4
        assert cache.read_failures == 0
    finally:
        await cache.close()


async def test_outcomes_follow_a_rated_case_with_lookups_of_that_case_only(
    aiohttp_client: ClientFactory, store: SqliteStore
) -> None:
    world, counting = await cached_world(aiohttp_client, store, cache_s=60)
    await login(world.client, "vera")
    first = await (await world.client.get("/ops/api/outcomes")).json()
    assert first["totals"]["ratings"] == 1
    # the owner loop resolves a stall and the owner rates it 5 stars
    case = await store.get_case("case-stall-1")
    assert case is not None
    done = NOW - timedelta(hours=1)
    await audit(
        store, case, done, "transition", "fixed", from_state="verifying", to_state="resolved"
    )
    await store.add_rating(Rating(case.case_id, 5, "great", False, NOW))
    rated = replace(case, state="resolved", rating=5, updated_at=NOW)
    await store.update_case(rated, expected_state="opened")
    world.feed.publish(rated)
    second = await (await world.client.get("/ops/api/outcomes")).json()
    assert second["totals"]["ratings"] == 2
    assert second["totals"]["resolved"] == first["totals"]["resolved"] + 1
    assert second["totals"]["mean_stars"] == pytest.approx(3.5)
    assert second["comments"][0]["case_id"] == "case-stall-1"
    assert counting.calls["ratings"] == 1  # read once in full ...
    assert counting.calls["get_rating"] == 1  # ... then only the changed case
    assert counting.calls["appointments"] == 2  # all, then the changed case's
    assert counting.calls["cases"] == 1


def test_insight_kept_by_fault_matches_counting_everything_again() -> None:
    rng = random.Random(23)
    devices = [
        _device(i, "fridge" if i % 3 else "washer", f"{i % 4}.0", batch=f"b{i % 5}")
        for i in range(300)
    ]
    faults = ("stall", "leak", "clog")
    cases = [
        make_case(
            f"c{n}",
            rng.choice(devices),
            rng.choice(faults),
            rng.choice(("opened", "resolved", "remote_fix")),
            remedies=(rng.choice(("reset", "flush", "technician_visit:x")), "update"),
        )
        for n in range(120)
    ]
    grouped = population(devices)
    kept: dict[str, Any] = {}
    for step in range(40):
        if step % 4 == 0:
            cases.append(make_case(f"new{step}", rng.choice(devices), rng.choice(faults), "opened"))
        else:
            n = rng.randrange(len(cases))
            cases[n] = replace(cases[n], state=rng.choice(("opened", "resolved", "dismissed")))
        reused = fleet_insight(devices, cases, grouped=grouped, kept=kept)
        assert reused == fleet_insight(devices, cases)
        assert set(kept) == {c.fault for c in cases}
    # a fault whose last case went away is dropped from what is kept
    fleet_insight(devices, [c for c in cases if c.fault != "leak"], grouped=grouped, kept=kept)
    assert set(kept) == {"stall", "clog"}
