"""The registry over the owner API: the ops role onboards, owners claim and release.

A real case store behind :func:`notifier.api.create_api` with its onboarding routes, on
each backend: an SQLite file, and a PostgreSQL database (the tests' own server); release
privacy is checked against a real influxd.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_owner_api import ClientFactory, FakeActions, FakeHealth

from fixloop.stack import InfluxdServer
from notifier.admin import ClaimLimiter, Onboarding
from notifier.api import API_PREFIX, create_api
from notifier.devicedata import DEVICE_MEASUREMENTS, InfluxDeviceData
from notifier.keys import OPENAPI_KEY
from notifier.model import Appointment, Case, Notification, Owner, Rating
from notifier.postgres import PostgresStore
from notifier.registry import claim_digest, claim_key
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings

NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)
OPS = "tok-ops-0123456789abcdef"
ANA, BEN = "tok-ana-0123456789abcdef", "tok-ben-0123456789abcdef"
KEY = claim_key("a fleet secret of the tests, 32+ chars")
MODELS = frozenset({"washer", "fridge", "heat_pump"})
_DBS = itertools.count()


@dataclass
class Clock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    client: Any
    store: SqliteStore | PostgresStore
    clock: Clock
    db_path: Path
    limiter: ClaimLimiter
    data: InfluxDeviceData | None = None
    auth: dict[str, dict[str, str]] = field(default_factory=dict)

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the store itself, with ``?`` parameters on either backend."""
        if isinstance(self.store, SqliteStore):
            with sqlite3.connect(self.db_path) as conn:
                found = conn.execute(sql, params).fetchall()
            conn.close()
            return found
        numbered = sql.split("?")
        sql = numbered[0] + "".join(f"${i}{part}" for i, part in enumerate(numbered[1:], 1))
        records = await self.store._run(lambda conn: conn.fetch(sql, *params))
        return [tuple(record) for record in records]

    async def call(self, method: str, path: str, who: str | None = "ops", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.auth[who]['token']}"
        return await self.client.request(method, f"{API_PREFIX}{path}", headers=headers, **kw)


async def _make(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    data: InfluxDeviceData | None = None,
    store_url: str | None = None,
) -> World:
    db_path = tmp_path / f"cases{next(_DBS)}.sqlite3"
    store = await (SqliteStore(db_path) if store_url is None else PostgresStore(store_url)).open()
    await store.add_token(OPS, ("ops", "olga"))
    for owner_id, name, token in (("o-ana", "Ana", ANA), ("o-ben", "Ben", BEN)):
        await store.put_owner(Owner(owner_id, name))
        await store.add_token(token, ("owner", owner_id))
    clock = Clock()
    limiter = ClaimLimiter(owner_failures=3, source_failures=50, backoff_s=60, window_s=600)
    onboarding = Onboarding(store.registry(), KEY, MODELS, limiter=limiter)
    app = create_api(
        store=store,
        actions=FakeActions(store),
        health=FakeHealth(),
        clock=clock,
        device_data=data,
        onboarding=onboarding,
    )
    world = World(await aiohttp_client(app), store, clock, db_path, limiter, data)
    world.auth = {"ops": {"token": OPS}, "ana": {"token": ANA}, "ben": {"token": BEN}}
    return world


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` for an SQLite file, else an empty PostgreSQL case store's URL."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def world(
    aiohttp_client: ClientFactory, tmp_path: Path, store_url: str | None
) -> AsyncIterator[World]:
    made = await _make(aiohttp_client, tmp_path, store_url=store_url)
    try:
        yield made
    finally:
        await made.store.close()


async def _ok(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json() if status != 204 else None


async def _err(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    return dict((await resp.json())["error"])


async def _washer_line(world: World) -> None:
    await _ok(await world.call("POST", "/admin/product-lines", json={"model": "washer"}), 201)


async def _add(world: World, serial: str, **extra: str) -> dict[str, Any]:
    body = {"model": "washer", "serial": serial, **extra}
    return dict(await _ok(await world.call("POST", "/admin/devices", json=body), 201))


# -- the ops role ----------------------------------------------------------------------------


async def test_admin_routes_take_only_ops_tokens(world: World) -> None:
    assert (await world.call("GET", "/admin/devices", who=None)).status == 401
    error = await _err(await world.call("GET", "/admin/devices", who="ana"), 403)
    assert "operations" in error["message"]
    await _ok(await world.call("GET", "/admin/devices"))


async def test_a_product_line_needs_a_product_file(world: World) -> None:
    error = await _err(
        await world.call("POST", "/admin/product-lines", json={"model": "dishwasher"}), 422
    )
    assert error["field"] == "model"
    assert "dishwasher" in error["message"]
    line = await _ok(
        await world.call(
            "POST", "/admin/product-lines", json={"model": "washer", "name": "Aquaclean 7"}
        ),
        201,
    )
    assert line["name"] == "Aquaclean 7"
    assert line["product_file"] is True
    await _add(world, "W-1")
    lines = await _ok(await world.call("GET", "/admin/product-lines"))
    assert [(x["model"], x["devices"]) for x in lines["product_lines"]] == [("washer", 1)]


async def test_add_device_answers_its_claim_code_once_and_keeps_only_a_digest(
    world: World,
) -> None:
    await _washer_line(world)
    added = await _add(world, "W-100", region="north", firmware="2.3.1")
    code = added["claim_code"]
    assert added["device_id"] == "washer-W-100"
    assert added["state"] == "unclaimed"
    assert added["region"] == "north"
    assert len(code) == 14
    again = await _ok(await world.call("GET", "/admin/devices/washer-W-100"))
    assert again["claim_code"] is None
    assert again["firmware"] == "2.3.1"
    ((stored,),) = await world.rows(
        "SELECT claim_hash FROM registry WHERE device_id = 'washer-W-100'"
    )
    everything = "".join(str(r) for r in await world.rows("SELECT * FROM registry"))
    assert stored == claim_digest(KEY, code)
    assert code not in everything
    assert code.replace("-", "") not in everything


async def test_add_device_refuses_unknown_models_duplicates_and_bad_values(world: World) -> None:
    await _washer_line(world)
    error = await _err(
        await world.call("POST", "/admin/devices", json={"model": "fridge", "serial": "F-1"}), 422
    )
    assert error["field"] == "model"
    assert "unknown model 'fridge'" in error["message"]
    await _add(world, "W-7")
    error = await _err(
        await world.call(
            "POST", "/admin/devices", json={"model": "washer", "serial": "W-7", "device_id": "x1"}
        ),
        409,
    )
    assert error["field"] == "serial"
    assert "duplicate serial" in error["message"]
    error = await _err(
        await world.call(
            "POST", "/admin/devices", json={"model": "washer", "serial": "W-8", "bogus": 1}
        ),
        400,
    )
    assert error["field"] == "bogus"
    error = await _err(
        await world.call(
            "POST", "/admin/devices", json={"model": "washer", "serial": "W 9 with blanks"}
        ),
        400,
    )
    assert error["field"] == "serial"


async def test_json_import_reports_each_row(world: World) -> None:
    await _washer_line(world)
    await _add(world, "W-1")
    rows = [
        {"model": "washer", "serial": "W-2"},
        {"model": "washer", "serial": "W-1"},  # registered before
        {"model": "dryer", "serial": "D-1"},  # no product line
        {"model": "washer", "serial": "W-3", "colour": "red"},  # unknown column
        {"model": "washer", "serial": "W-2"},  # the same as row 1
        {"model": "washer"},  # no serial
        {"model": "washer", "serial": "W-4", "claim_code": "abcd-efgh-jkmn"},
    ]
    report = await _ok(await world.call("POST", "/admin/device-imports", json={"devices": rows}))
    assert (report["added"], report["failed"]) == (2, 5)
    by_row = {r["row"]: r for r in report["rows"]}
    assert by_row[1]["status"] == "added"
    assert by_row[1]["claim_code"]
    assert [e["column"] for e in by_row[2]["errors"]] == ["device_id", "serial"]
    assert "a washer has it already" in by_row[2]["errors"][1]["message"]
    assert [e["column"] for e in by_row[3]["errors"]] == ["model"]
    assert [e["column"] for e in by_row[4]["errors"]] == ["colour"]
    assert "also row 1" in by_row[5]["errors"][0]["message"]
    assert by_row[6]["errors"] == [{"column": "serial", "message": "is required"}]
    assert by_row[7]["claim_code"] == "abcd-efgh-jkmn"
    listed = await _ok(await world.call("GET", "/admin/devices?model=washer"))
    assert [d["serial"] for d in listed["devices"]] == ["W-1", "W-2", "W-4"]


async def test_csv_import_names_lines_and_refuses_a_bad_header(world: World) -> None:
    await _washer_line(world)
    csv_body = (
        "model;serial;region;firmware\n"
        "washer;C-1;north;2.3.1\n"
        "\n"
        "washer;C-2;south;1.0;extra\n"
        "washer;C-3;east;not a version\n"
    )
    report = await _ok(
        await world.call(
            "POST",
            "/admin/device-imports",
            data=csv_body.encode(),
            headers={"Content-Type": "text/csv"},
        )
    )
    assert report["added"] == 1
    assert [(r["row"], r["status"]) for r in report["rows"]] == [
        (2, "added"),
        (4, "failed"),
        (5, "failed"),
    ]
    assert "4 columns" in report["rows"][1]["errors"][0]["message"]
    assert report["rows"][2]["errors"][0]["column"] == "firmware"
    error = await _err(
        await world.call(
            "POST",
            "/admin/device-imports",
            data=b"model,serial,colour\nwasher,X,red\n",
            headers={"Content-Type": "text/csv"},
        ),
        400,
    )
    assert "line 1: unknown column 'colour'" in error["message"]


async def test_device_list_pages_and_filters(world: World) -> None:
    await _washer_line(world)
    rows = [{"model": "washer", "serial": f"P-{n:03d}"} for n in range(7)]
    await _ok(await world.call("POST", "/admin/device-imports", json={"devices": rows}))
    seen: list[str] = []
    after = ""
    while True:
        page = await _ok(await world.call("GET", f"/admin/devices?limit=3{after}"))
        seen += [d["device_id"] for d in page["devices"]]
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    assert seen == [f"washer-P-{n:03d}" for n in range(7)]
    assert (await world.call("GET", "/admin/devices?limit=0")).status == 400
    assert (await world.call("GET", "/admin/devices?state=lost")).status == 400
    claimed = await _ok(await world.call("GET", "/admin/devices?state=claimed"))
    assert claimed["devices"] == []


# -- claiming ----------------------------------------------------------------------------------


async def test_an_owner_claims_once_with_the_code(world: World) -> None:
    await _washer_line(world)
    code = (await _add(world, "W-1", firmware="2.3.1"))["claim_code"]
    # typed from the label: lower case, blanks instead of dashes, O for 0 and so on
    typed = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    device = await _ok(
        await world.call(
            "POST", "/me/devices/claim", who="ana", json={"claim_code": typed, "label": "cellar"}
        ),
        201,
    )
    assert device["device_id"] == "washer-W-1"
    assert device["label"] == "cellar"
    assert device["firmware"] == "2.3.1"
    mine = await _ok(await world.call("GET", "/devices", who="ana"))
    assert [d["device_id"] for d in mine["devices"]] == ["washer-W-1"]
    again = await _err(
        await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code}), 409
    )
    assert "yours already" in again["message"]
    other = await _err(
        await world.call("POST", "/me/devices/claim", who="ben", json={"claim_code": code}), 409
    )
    assert "release it" in other["message"]
    assert (await _ok(await world.call("GET", "/devices", who="ben")))["devices"] == []
    registered = await _ok(await world.call("GET", "/admin/devices/washer-W-1"))
    assert (registered["state"], registered["owner_id"]) == ("claimed", "o-ana")
    claims = await world.rows("SELECT actor, evidence FROM audit WHERE action = 'device_claimed'")
    assert claims == [("owner", '{"device_id":"washer-W-1","owner_id":"o-ana"}')]


async def test_wrong_codes_are_refused_and_then_rate_limited(world: World) -> None:
    await _washer_line(world)
    code = (await _add(world, "W-1"))["claim_code"]
    bad = await _err(
        await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": "x"}), 422
    )
    assert bad["field"] == "claim_code"
    for _ in range(2):
        await _err(
            await world.call(
                "POST", "/me/devices/claim", who="ana", json={"claim_code": "ZZZZ-ZZZZ-ZZZZ"}
            ),
            404,
        )
    # three failures for this owner: now even the right code waits
    resp = await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code})
    error = await _err(resp, 429)
    assert error["code"] == "too_many_attempts"
    assert int(resp.headers["Retry-After"]) == 60
    # another owner is not held up by Ana's guessing
    await _ok(
        await world.call("POST", "/me/devices/claim", who="ben", json={"claim_code": code}), 201
    )
    world.clock.now += timedelta(seconds=61)
    resp = await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": "QQQQQQQQ"})
    await _err(resp, 404)
    # each further failure doubles the wait
    resp = await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code})
    assert int(resp.headers["Retry-After"]) == 120


async def test_right_codes_and_conflicts_are_not_counted_as_guesses(world: World) -> None:
    await _washer_line(world)
    first = (await _add(world, "W-1"))["claim_code"]
    second = (await _add(world, "W-2"))["claim_code"]

    async def claim(code: str) -> Any:
        return await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code})

    for _ in range(2):
        await _err(await claim("ZZZZ-ZZZZ-ZZZZ"), 404)
    # the third attempt would reach the limit of 3, but the code is right
    await _ok(await claim(first), 201)
    for _ in range(3):
        await _err(await claim(first), 409)
    await _ok(await claim(second), 201)
    await _err(await claim("ZZZZ-ZZZZ-ZZZZ"), 404)
    assert (await claim(second)).status == 429


async def test_a_retired_device_cannot_be_claimed(world: World) -> None:
    await _washer_line(world)
    code = (await _add(world, "W-1"))["claim_code"]
    retired = await _ok(await world.call("POST", "/admin/devices/washer-W-1/retire"))
    assert retired["state"] == "retired"
    await _err(await world.call("POST", "/admin/devices/washer-W-1/retire"), 409)
    await _err(await world.call("POST", "/admin/devices/nope/retire"), 404)
    await _err(
        await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code}), 404
    )


# -- release on resale ---------------------------------------------------------------------


@pytest.fixture
async def influx_world(
    aiohttp_client: ClientFactory, tmp_path: Path, influxd: InfluxdServer, store_url: str | None
) -> AsyncIterator[World]:
    settings = InfluxSettings(url=influxd.url, database=f"registry{next(_DBS)}", timeout_s=10)
    async with InfluxClient(settings) as client:
        await client.ensure_database()
        made = await _make(aiohttp_client, tmp_path, InfluxDeviceData(client), store_url)
        try:
            yield made
        finally:
            await made.store.close()


async def test_release_leaves_the_next_owner_nothing_of_the_seller(influx_world: World) -> None:
    world = influx_world
    await _washer_line(world)
    code = (await _add(world, "W-1"))["claim_code"]
    device = "washer-W-1"
    await _ok(
        await world.call(
            "POST", "/me/devices/claim", who="ana", json={"claim_code": code, "label": "Anas"}
        ),
        201,
    )
    store = world.store
    start = NOW - timedelta(days=3)
    done = Case(
        device_id=device,
        case_id="c-old",
        owner_id="o-ana",
        model="washer",
        fault="drain_clog",
        state="resolved",
        urgency="normal",
        opened_at=start,
        updated_at=start,
        evidence=(f"{device} drained slowly",),
    )
    open_case = Case(
        device_id=device,
        case_id="c-open",
        owner_id="o-ana",
        model="washer",
        fault="bearing_wear",
        state="booked",
        urgency="normal",
        opened_at=NOW,
        updated_at=NOW,
        appointment_id="ap-1",
    )
    await store.add_case(done)
    await store.add_case(open_case)
    await store.add_rating(Rating("c-old", 2, "noisy again", False, NOW))
    await store.put_appointment(
        Appointment(
            "ap-1",
            "c-open",
            "t-1",
            NOW + timedelta(days=2),
            NOW + timedelta(days=2, hours=2),
            "proposed",
        )
    )
    await store.add_notification(
        Notification("n-1", "o-ana", "c-old", "fix_done", "Fixed", "Your washer Anas ...", (), NOW)
    )
    assert world.data is not None
    at_ms = int(NOW.timestamp()) * 1000
    points = [
        f"telemetry,device={device} temp=40.5,seq={n}i {at_ms - n * 60_000}".encode()
        for n in range(30)
    ]
    client = world.data._client  # the test writes what the gateway would
    assert (await client.write(points)).rejected == []

    # only its owner can release it, and it needs a confirmation
    await _err(
        await world.call(
            "POST", f"/me/devices/{device}/release", who="ben", json={"confirm": "release"}
        ),
        404,
    )
    await _err(await world.call("POST", f"/me/devices/{device}/release", who="ana", json={}), 400)
    released = await _ok(
        await world.call(
            "POST", f"/me/devices/{device}/release", who="ana", json={"confirm": "release"}
        )
    )
    assert released == {
        "device_id": device,
        "cases_kept": 2,
        "cases_closed": 1,
        "visits_cancelled": 1,
    }
    assert await world.data.count([device]) == {m: 0 for m in DEVICE_MEASUREMENTS}

    # the seller keeps their history, no longer linked to the device
    cases = await _ok(await world.call("GET", "/cases", who="ana"))
    assert {c["case_id"]: c["state"] for c in cases["cases"]} == {
        "c-old": "resolved",
        "c-open": "dismissed",
    }
    kept = await store.get_case("c-old")
    assert kept is not None
    assert kept.device_id.startswith("anon-")
    assert kept.evidence == (f"{kept.device_id} drained slowly",)
    assert (await _ok(await world.call("GET", "/devices", who="ana")))["devices"] == []

    # the buyer claims it with the same label and sees nothing of Ana's
    await _ok(
        await world.call("POST", "/me/devices/claim", who="ben", json={"claim_code": code}), 201
    )
    view = await _ok(await world.call("GET", f"/devices/{device}", who="ben"))
    assert view["open_cases"] == []
    assert view["label"] is None
    assert (await _ok(await world.call("GET", "/cases", who="ben")))["cases"] == []
    export = await _ok(await world.call("GET", "/me/export", who="ben"))
    text = str(export)
    for secret in ("c-old", "c-open", "noisy again", "Anas", "o-ana"):
        assert secret not in text
    resp = await world.call("GET", "/me/export/device-data", who="ben")
    assert resp.status == 200
    assert (await resp.text()) == ""
    assert await store.cases(device_id=device) == []
    ((quoting,),) = await world.rows(
        "SELECT COUNT(*) FROM audit WHERE case_id IS NOT NULL AND "
        "(evidence LIKE '%' || ? || '%' OR reason LIKE '%' || ? || '%')",
        device,
        device,
    )
    assert quoting == 0


async def test_an_erased_owner_leaves_the_device_claimable_and_unlinked(world: World) -> None:
    await _washer_line(world)
    code = (await _add(world, "W-1"))["claim_code"]
    await _ok(
        await world.call("POST", "/me/devices/claim", who="ana", json={"claim_code": code}), 201
    )
    await _ok(await world.call("DELETE", "/me", who="ana", json={"confirm": "erase"}))
    rows = [str(row) for row in await world.rows("SELECT * FROM audit")]
    assert any("device_claimed" in row for row in rows)
    assert not any("o-ana" in row for row in rows)
    registered = await _ok(await world.call("GET", "/admin/devices/washer-W-1"))
    assert (registered["state"], registered["owner_id"]) == ("unclaimed", None)
    await _ok(
        await world.call("POST", "/me/devices/claim", who="ben", json={"claim_code": code}), 201
    )


# -- invites, technicians, tokens ------------------------------------------------------------


async def test_an_invite_is_exchanged_once_for_a_token(world: World) -> None:
    invited = await _ok(
        await world.call(
            "POST",
            "/admin/owners",
            json={"name": "Carla", "language": "de", "timezone": "Europe/Berlin"},
        ),
        201,
    )
    assert invited["expires_at"].startswith("2026-05-18")
    accepted = await _ok(
        await world.call("POST", "/invites/accept", who=None, json={"invite": invited["invite"]}),
        201,
    )
    assert accepted["principal_id"] == invited["owner_id"]
    me = await world.client.get(
        f"{API_PREFIX}/me", headers={"Authorization": f"Bearer {accepted['token']}"}
    )
    profile = await _ok(me)
    assert (profile["name"], profile["language"]) == ("Carla", "de")
    await _err(
        await world.call("POST", "/invites/accept", who=None, json={"invite": invited["invite"]}),
        404,
    )
    await _err(
        await world.call("POST", "/admin/owners", json={"name": "X", "timezone": "Mars/Base"}), 422
    )


async def test_an_invite_expires(world: World) -> None:
    invited = await _ok(await world.call("POST", "/admin/owners", json={"name": "Dora"}), 201)
    world.clock.now += timedelta(days=15)
    await _err(
        await world.call("POST", "/invites/accept", who=None, json={"invite": invited["invite"]}),
        404,
    )


async def test_technicians_and_tokens_are_issued_and_revoked(world: World) -> None:
    tech = await _ok(
        await world.call(
            "POST",
            "/admin/technicians",
            json={"name": "Tom", "region": "north", "skills": ["bearing", "drain_pump"]},
        ),
        201,
    )
    assert tech["skills"] == ["bearing", "drain_pump"]
    headers = {"Authorization": f"Bearer {tech['token']}"}
    await _ok(await world.client.get(f"{API_PREFIX}/technician/visits", headers=headers))
    stored = await world.store.get_technician(tech["technician_id"])
    assert stored is not None
    assert len(stored.hours) == 5

    issued = await _ok(
        await world.call("POST", "/admin/tokens", json={"role": "ops", "principal_id": "ida"}),
        201,
    )
    world.auth["ida"] = {"token": issued["token"]}
    await _ok(await world.call("GET", "/admin/product-lines", who="ida"))
    await _err(
        await world.call("POST", "/admin/tokens", json={"role": "owner", "principal_id": "nobody"}),
        404,
    )
    await _ok(await world.call("DELETE", f"/admin/tokens/{issued['token_id']}"), 204)
    assert (await world.call("GET", "/admin/product-lines", who="ida")).status == 401
    await _err(await world.call("DELETE", f"/admin/tokens/{issued['token_id']}"), 404)
    await _ok(await world.call("DELETE", f"/admin/tokens/{tech['token_id']}"), 204)
    assert (
        await world.client.get(f"{API_PREFIX}/technician/visits", headers=headers)
    ).status == 401


async def test_ops_link_subjects_of_a_named_provider_without_oidc_set_up(world: World) -> None:
    path = "/admin/owners/o-ana/subjects"
    error = await _err(await world.call("POST", path, json={"subject": "s-1"}), 422)
    assert error["field"] == "issuer"
    body = {"subject": "s-1", "issuer": "https://idp.example/realms/acme"}
    assert await _ok(await world.call("POST", path, json=body), 201) == {
        "owner_id": "o-ana",
        **body,
    }
    assert await world.store.owner_of_subject(body["issuer"], "s-1") == "o-ana"
    await _err(await world.call("POST", path, json={**body, "subject": "bad\nsub"}), 400)
    await _err(await world.call("POST", path, json={**body, "issuer": "ftp://idp"}), 400)
    await _err(await world.call("DELETE", path, params={"subject": "s-1"}), 422)
    await _ok(await world.call("DELETE", path, params=body), 204)
    assert await world.store.owner_of_subject(body["issuer"], "s-1") is None
    assert (await world.call("GET", path, who="ana")).status == 403


async def test_the_document_describes_the_onboarding_routes(world: World) -> None:
    doc = await _ok(await world.client.get("/openapi.json"))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in world.client.app.router.routes()
        if route.resource is not None
    }
    described = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == described
    assert f"{API_PREFIX}/admin/device-imports" in doc["paths"]
    subjects = doc["paths"][f"{API_PREFIX}/admin/owners/{{id}}/subjects"]
    assert set(subjects) == {"get", "post", "delete"}
    claim = doc["paths"][f"{API_PREFIX}/me/devices/claim"]["post"]
    assert "429" in claim["responses"]
    assert doc["paths"][f"{API_PREFIX}/invites/accept"]["post"]["security"] == []
    assert doc["paths"][f"{API_PREFIX}/admin/devices"]["get"]["security"] == [{"bearer": []}]
    assert world.client.app[OPENAPI_KEY] == doc
