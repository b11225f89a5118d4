"""The owner REST API against a real SQLite case store, a recording case machine and
a fake health reader."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from notifier.actions import HealthPoint
from notifier.api import API_PREFIX, MAX_BODY_BYTES, REQUEST_ID_HEADER, create_api
from notifier.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidRequestError,
    NotFoundError,
)
from notifier.keys import OPENAPI_KEY
from notifier.links import ActionLinks
from notifier.model import (
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Owner,
    PushChannel,
    Rating,
    Slot,
    Technician,
    mask_target,
)
from notifier.sqlite import SqliteStore
from wire.errors import StoreUnavailableError

NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
ALICE, BOB = "tok-alice-0123456789", "tok-bob-0123456789"
TECH1, TECH2, OPS = "tok-tech1-0123456789", "tok-tech2-0123456789", "tok-ops-0123456789"

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


def _hdr(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _p256dh() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return _b64(key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))


class FakeHealth:
    """Stored scores by device; ``fail`` makes the reader look unreachable."""

    def __init__(self) -> None:
        self.points: dict[str, HealthPoint] = {}
        self.fail = False

    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        if self.fail:
            raise StoreUnavailableError("influx away")
        return {d: self.points[d] for d in device_ids if d in self.points}

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        return [p for d, p in self.points.items() if d == device_id and p.at >= start]


@dataclass
class FakeActions:
    """Records every call and answers with plausible records; ``fail`` is raised next."""

    store: SqliteStore
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: BaseException | None = None

    def _check(self) -> None:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc

    async def _case(self, case_id: str) -> Case:
        case = await self.store.get_case(case_id)
        assert case is not None
        return case

    async def accept_fix(self, owner_id: str, case_id: str) -> Case:
        self.calls.append(("accept_fix", owner_id, case_id))
        self._check()
        return replace(await self._case(case_id), state="remote_fix")

    async def decline_fix(self, owner_id: str, case_id: str) -> Case:
        self.calls.append(("decline_fix", owner_id, case_id))
        self._check()
        return replace(await self._case(case_id), state="appointment_proposed")

    async def choose_slot(self, owner_id: str, case_id: str, slot_index: int) -> Appointment:
        self.calls.append(("choose_slot", owner_id, case_id, slot_index))
        self._check()
        (proposal,) = await self.store.appointments(case_id=case_id, states=["proposed"])
        slot = proposal.offered[slot_index]
        return replace(
            proposal,
            state="booked",
            technician_id=slot.technician_id,
            start=slot.start,
            end=slot.end,
            offered=(),
        )

    async def request_other_slots(self, owner_id: str, case_id: str) -> Appointment:
        self.calls.append(("request_other_slots", owner_id, case_id))
        self._check()
        (proposal,) = await self.store.appointments(case_id=case_id, states=["proposed"])
        later = tuple(
            replace(s, start=s.start + timedelta(days=7), end=s.end + timedelta(days=7))
            for s in proposal.offered
        )
        return replace(proposal, appointment_id="ap-new", offered=later)

    async def decline_visit(self, owner_id: str, case_id: str) -> Case:
        self.calls.append(("decline_visit", owner_id, case_id))
        self._check()
        return replace(await self._case(case_id), state="dismissed")

    async def rate(
        self,
        owner_id: str,
        case_id: str,
        stars: int,
        comment: str | None = None,
        *,
        nothing_wrong: bool = False,
    ) -> Rating:
        self.calls.append(("rate", owner_id, case_id, stars, comment, nothing_wrong))
        self._check()
        return Rating(case_id, stars, comment, nothing_wrong, NOW)

    async def complete_visit(
        self, technician_id: str, appointment_id: str, note: str | None = None
    ) -> Appointment:
        self.calls.append(("complete_visit", technician_id, appointment_id, note))
        self._check()
        visit = await self.store.get_appointment(appointment_id)
        assert visit is not None
        return replace(visit, state="done", note=note)


def _case(case_id: str, device_id: str, owner_id: str, state: Any, **kw: Any) -> Case:
    base: dict[str, Any] = {
        "model": "heatpump-x",
        "fault": "fan_bearing_wear",
        "urgency": "normal",
        "opened_at": NOW - timedelta(days=2),
        "updated_at": NOW - timedelta(days=1),
        "confidence": 0.87,
        "evidence": ("anomaly score 0.87 over 6 hours", "vibration rms 4.2 mm/s"),
    }
    base.update(kw)
    return Case(case_id=case_id, device_id=device_id, owner_id=owner_id, state=state, **base)


@dataclass
class World:
    client: Client
    store: SqliteStore
    actions: FakeActions
    health: FakeHealth


async def _seed(store: SqliteStore) -> None:
    await store.put_owner(Owner("o-alice", "Alice", timezone="Europe/Berlin"))
    await store.put_owner(Owner("o-bob", "Bob"))
    for token, principal in (
        (ALICE, ("owner", "o-alice")),
        (BOB, ("owner", "o-bob")),
        (TECH1, ("technician", "t-1")),
        (TECH2, ("technician", "t-2")),
        (OPS, ("ops", "olga")),
    ):
        await store.add_token(token, principal)  # type: ignore[arg-type]
    await store.put_technician(Technician("t-1", "Tom", "default", frozenset({"bearing"})))
    await store.put_technician(Technician("t-2", "Tina", "default", frozenset({"bearing"})))
    await store.put_device(DeviceRecord("d-a1", "o-alice", "heatpump-x", "1.2.0", "cellar"))
    await store.put_device(DeviceRecord("d-a2", "o-alice", "fridge-y", "3.0", "kitchen"))
    await store.put_device(DeviceRecord("d-a3", "o-alice", "fridge-y", "3.0", "garage"))
    await store.put_device(DeviceRecord("d-b1", "o-bob", "heatpump-x", "1.2.0", "bob's"))
    await store.add_case(
        _case(
            "c-a1", "d-a1", "o-alice", "awaiting_consent", urgency="high", pending_action="restart"
        )
    )
    await store.add_case(
        _case(
            "c-a2",
            "d-a1",
            "o-alice",
            "resolved",
            fault="door_seal",
            opened_at=NOW - timedelta(days=30),
            updated_at=NOW - timedelta(days=20),
        )
    )
    await store.add_case(
        _case(
            "c-a3",
            "d-a1",
            "o-alice",
            "appointment_proposed",
            fault="compressor",
            appointment_id="ap-1",
            opened_at=NOW - timedelta(days=1),
        )
    )
    await store.add_case(
        _case(
            "c-a4",
            "d-a1",
            "o-alice",
            "booked",
            fault="refrigerant",
            appointment_id="ap-2",
            opened_at=NOW - timedelta(days=3),
        )
    )
    await store.add_case(_case("c-b1", "d-b1", "o-bob", "awaiting_consent"))
    await store.add_case(
        _case(
            "c-b2",
            "d-b1",
            "o-bob",
            "appointment_proposed",
            fault="compressor",
            appointment_id="ap-b",
        )
    )
    slots = tuple(
        Slot(
            "t-1", NOW + timedelta(days=d, hours=1), NOW + timedelta(days=d, hours=3), 0.9 - d / 10
        )
        for d in (1, 2)
    )
    await store.put_appointment(
        Appointment("ap-1", "c-a3", "t-1", None, None, "proposed", part="bearing", offered=slots)
    )
    await store.put_appointment(
        Appointment("ap-b", "c-b2", "t-1", None, None, "proposed", offered=slots)
    )
    await store.book(
        Appointment(
            "ap-2",
            "c-a4",
            "t-1",
            NOW + timedelta(days=4),
            NOW + timedelta(days=4, hours=2),
            "booked",
            part="bearing",
        )
    )
    await store.book(
        Appointment(
            "ap-3",
            "c-b1",
            "t-2",
            NOW + timedelta(days=4),
            NOW + timedelta(days=4, hours=2),
            "booked",
        )
    )
    trail: list[tuple[str | None, str | None, str, dict[str, Any]]] = [
        (None, "opened", "diagnosis", {"score": 0.87}),
        ("opened", "awaiting_consent", "transition", {"score": 0.87, "confidence": 0.87}),
        (None, None, "notify", {"channel": "ch-1"}),
    ]
    for i, (before, after, action, evidence) in enumerate(trail):
        await store.add_audit(
            AuditEntry(
                "c-a1",
                NOW - timedelta(hours=5 - i),
                "system",
                action,
                "anomaly score 0.87 above threshold 0.5",
                evidence,
                before,
                after,
            )
        )


@pytest.fixture
async def world(aiohttp_client: ClientFactory) -> AsyncIterator[World]:
    store = await SqliteStore(":memory:").open()
    try:
        await _seed(store)
        actions = FakeActions(store)
        health = FakeHealth()
        app = create_api(store=store, actions=actions, health=health, clock=lambda: NOW)
        yield World(await aiohttp_client(app), store, actions, health)
    finally:
        await store.close()


async def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


# -- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer " + "x" * 5000},
    ],
)
async def test_no_or_bad_token_is_401_with_a_bearer_challenge(
    world: World, headers: dict[str, str]
) -> None:
    resp = await world.client.get(f"{API_PREFIX}/me", headers=headers)
    await _error(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_owner_sees_their_profile(world: World) -> None:
    resp = await world.client.get(f"{API_PREFIX}/me", headers=_hdr(ALICE))
    assert resp.status == 200
    body = await resp.json()
    assert body["name"] == "Alice"
    assert body["timezone"] == "Europe/Berlin"
    assert body["consent"] == "ask_if_interrupting"
    assert body["quiet_hours"] == {"start": "22:00", "end": "07:00"}
    assert resp.headers["Cache-Control"] == "no-store"


OWNER_ROUTES = [
    ("GET", "/me", None),
    ("PATCH", "/me", {"language": "de"}),
    ("GET", "/me/export", None),
    ("GET", "/me/channels", None),
    ("GET", "/devices", None),
    ("GET", "/cases", None),
    ("GET", "/cases/c-a1", None),
    ("POST", "/cases/c-a1/fix", {"accept": True}),
    ("POST", "/cases/c-a1/rating", {"stars": 5}),
    ("DELETE", "/me", {"confirm": "erase"}),
]
TECH_ROUTES = [
    ("GET", "/technician/visits", None),
    ("POST", "/technician/visits/ap-2/complete", {"note": "done"}),
]


@pytest.mark.parametrize(("method", "path", "body"), OWNER_ROUTES)
@pytest.mark.parametrize("token", [TECH1, OPS])
async def test_other_principals_cannot_use_owner_routes(
    world: World, method: str, path: str, body: Any, token: str
) -> None:
    resp = await world.client.request(method, API_PREFIX + path, json=body, headers=_hdr(token))
    await _error(resp, 403)
    assert world.actions.calls == []
    assert await world.store.get_owner("o-alice") is not None


@pytest.mark.parametrize(("method", "path", "body"), TECH_ROUTES)
@pytest.mark.parametrize("token", [ALICE, OPS])
async def test_other_principals_cannot_use_technician_routes(
    world: World, method: str, path: str, body: Any, token: str
) -> None:
    resp = await world.client.request(method, API_PREFIX + path, json=body, headers=_hdr(token))
    await _error(resp, 403)
    assert world.actions.calls == []


# -- another owner's things look like nothing at all ---------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/devices/d-b1", None),
        ("GET", "/cases/c-b1", None),
        ("GET", "/cases/c-b2/slots", None),
        ("POST", "/cases/c-b1/fix", {"accept": True}),
        ("POST", "/cases/c-b1/fix", {"accept": False}),
        ("POST", "/cases/c-b2/appointment", {"slot": 0}),
        ("POST", "/cases/c-b2/appointment", {"other_times": True}),
        ("POST", "/cases/c-b2/appointment", {"decline": True}),
        ("POST", "/cases/c-b1/rating", {"stars": 1}),
        # an invalid body does not tell the case exists either
        ("POST", "/cases/c-b1/rating", {"stars": 99}),
        ("GET", "/devices/d-none", None),
        ("GET", "/cases/c-none", None),
        ("POST", "/cases/c-none/fix", {"accept": True}),
    ],
)
async def test_another_owners_device_or_case_is_404(
    world: World, method: str, path: str, body: Any
) -> None:
    resp = await world.client.request(method, API_PREFIX + path, json=body, headers=_hdr(ALICE))
    error = await _error(resp, 404)
    assert error["code"] == "not_found"
    assert world.actions.calls == []


async def test_lists_hold_only_the_owners_own(world: World) -> None:
    devices = await (await world.client.get(f"{API_PREFIX}/devices", headers=_hdr(ALICE))).json()
    assert [d["device_id"] for d in devices["devices"]] == ["d-a1", "d-a2", "d-a3"]
    cases = await (await world.client.get(f"{API_PREFIX}/cases", headers=_hdr(ALICE))).json()
    assert {c["case_id"] for c in cases["cases"]} == {"c-a1", "c-a2", "c-a3", "c-a4"}
    bob = await (await world.client.get(f"{API_PREFIX}/cases", headers=_hdr(BOB))).json()
    assert {c["case_id"] for c in bob["cases"]} == {"c-b1", "c-b2"}


async def test_another_owners_channel_cannot_be_removed(world: World) -> None:
    await world.store.put_channel(
        PushChannel("ch-bob", "o-bob", "fcm", "bob-token-" + "x" * 40, created_at=NOW)
    )
    resp = await world.client.delete(f"{API_PREFIX}/me/channels/ch-bob", headers=_hdr(ALICE))
    await _error(resp, 404)
    (kept,) = await world.store.channels("o-bob")
    assert kept.active
    assert kept.target.startswith("bob-token-")


# -- technicians ---------------------------------------------------------------------------


async def test_a_technician_sees_and_completes_only_their_own_visits(world: World) -> None:
    resp = await world.client.get(
        f"{API_PREFIX}/technician/visits",
        params={"from": "2025-03-01T00:00:00Z", "to": "2025-03-20T00:00:00+01:00"},
        headers=_hdr(TECH1),
    )
    assert resp.status == 200
    visits = (await resp.json())["visits"]
    assert [v["appointment_id"] for v in visits] == ["ap-2"]
    assert visits[0]["fault"] == "refrigerant"
    assert visits[0]["part"] == "bearing"

    resp = await world.client.post(
        f"{API_PREFIX}/technician/visits/ap-3/complete", json={"note": "x"}, headers=_hdr(TECH1)
    )
    await _error(resp, 404)
    # a proposal that merely names the technician is not a visit
    resp = await world.client.post(
        f"{API_PREFIX}/technician/visits/ap-1/complete", json={}, headers=_hdr(TECH1)
    )
    await _error(resp, 404)
    assert world.actions.calls == []

    resp = await world.client.post(
        f"{API_PREFIX}/technician/visits/ap-2/complete",
        json={"note": "  replaced the bearing  "},
        headers=_hdr(TECH1),
    )
    assert resp.status == 200
    assert (await resp.json())["state"] == "done"
    assert world.actions.calls == [("complete_visit", "t-1", "ap-2", "replaced the bearing")]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"from": "2025-03-01T00:00:00"}, "from"),
        ({"from": "2025-03-01 00:00:00Z"}, "from"),
        ({"to": ""}, "to"),
    ],
)
async def test_visit_list_refuses_bad_times(
    world: World, params: dict[str, str], field: str
) -> None:
    resp = await world.client.get(
        f"{API_PREFIX}/technician/visits", params=params, headers=_hdr(TECH1)
    )
    error = await _error(resp, 400)
    assert error["field"] == field
    assert field in error["message"]


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2025-03-02T00:00:00Z", "to": "2025-03-01T00:00:00Z"},
        {"from": "2025-01-01T00:00:00Z", "to": "2025-12-01T00:00:00Z"},
    ],
)
async def test_visit_list_refuses_a_window_it_cannot_serve(
    world: World, params: dict[str, str]
) -> None:
    resp = await world.client.get(
        f"{API_PREFIX}/technician/visits", params=params, headers=_hdr(TECH1)
    )
    error = await _error(resp, 422)
    assert (error["field"], error["code"]) == ("to", "invalid_range")


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("ftp://hooks.example.org/x", "webhook"),
        ("hooks.example.org/x", "webhook"),
        ("http://push.example.org/x", "webpush"),
    ],
)
async def test_a_target_that_is_no_web_url_breaks_the_schema(
    world: World, target: str, kind: str
) -> None:
    keys: dict[str, str] = (
        {"secret": "a-long-shared-secret-42"}
        if kind == "webhook"
        else {"p256dh": _p256dh(), "auth": _b64(os.urandom(16))}
    )
    body = {"kind": kind, "target": target, "keys": keys}
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    assert (await _error(resp, 400))["field"] == "target"


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PATCH", "/me", {"timezone": "../../etc/passwd"}, "timezone"),
        ("PATCH", "/me", {"language": "English!"}, "language"),
        ("PATCH", "/me", {"consent": "whenever"}, "consent"),
        ("PATCH", "/me", {"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours.start"),
        (
            "PATCH",
            "/me",
            {"quiet_hours": {"start": "22:00:00+01:00", "end": "07:00:00+01:00"}},
            "quiet_hours.start",
        ),
        ("PATCH", "/me", {"quiet_hours": {"start": "22:00", "end": "07:00Z"}}, "quiet_hours.end"),
        ("PATCH", "/me", {"channels": ["fcm", "fcm"]}, "channels"),
        ("GET", "/cases?state=", None, "state"),
        ("PATCH", "/me", {"channels": ["pigeon"]}, "channels.0"),
        ("PATCH", "/me", {"name": "Mallory"}, "name"),
        ("PATCH", "/me", {"owner_id": "o-bob"}, "owner_id"),
        ("POST", "/cases/c-a1/fix", {"accept": "yes"}, "accept"),
        ("POST", "/cases/c-a1/fix", {}, "accept"),
        ("POST", "/cases/c-a1/fix", {"accept": True, "force": True}, "force"),
        ("POST", "/cases/c-a3/appointment", {"slot": -1}, "slot"),
        ("POST", "/cases/c-a3/appointment", {"slot": "0"}, "slot"),
        ("POST", "/cases/c-a3/appointment", {"other_times": False}, "other_times"),
        ("POST", "/cases/c-a2/rating", {"stars": 0}, "stars"),
        ("POST", "/cases/c-a2/rating", {"stars": 6}, "stars"),
        ("POST", "/cases/c-a2/rating", {"stars": 4.5}, "stars"),
        ("POST", "/cases/c-a2/rating", {"stars": 4, "comment": "x" * 2001}, "comment"),
        ("POST", "/cases/c-a2/rating", {"stars": 4, "nothing_wrong": "no"}, "nothing_wrong"),
        ("DELETE", "/me", {"confirm": "yes"}, "confirm"),
        ("DELETE", "/me", {}, "confirm"),
    ],
)
async def test_schema_violations_are_400_naming_the_field(
    world: World, method: str, path: str, body: Any, field: str
) -> None:
    before = await world.store.get_owner("o-alice")
    resp = await world.client.request(method, API_PREFIX + path, json=body, headers=_hdr(ALICE))
    error = await _error(resp, 400)
    assert error["field"] == field
    assert field in error["message"]
    assert world.actions.calls == []
    assert await world.store.get_owner("o-alice") == before


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "invalid_body"),
        (b"", {"Content-Type": "application/json"}, 400, "invalid_body"),
        (
            b'{"slot": 0, "decline": true}',
            {"Content-Type": "application/json"},
            400,
            "invalid_body",
        ),
        (b"{}", {"Content-Type": "application/json"}, 400, "invalid_body"),
        (b'{"slot": 0}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ],
)
async def test_unreadable_bodies(
    world: World, data: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a3/appointment", data=data, headers={**_hdr(ALICE), **headers}
    )
    error = await _error(resp, status)
    assert error["code"] == code
    assert world.actions.calls == []


async def test_a_body_too_large_is_413(world: World) -> None:
    big = json.dumps({"stars": 5, "comment": "x" * MAX_BODY_BYTES}).encode()
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a2/rating",
        data=big,
        headers={**_hdr(ALICE), "Content-Type": "application/json"},
    )
    assert (await _error(resp, 413))["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024
        yield b'{"stars": 5}'

    # no Content-Length: the limit still holds while reading
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a2/rating",
        data=chunks(),
        headers={**_hdr(ALICE), "Content-Type": "application/json"},
    )
    await _error(resp, 413)
    assert world.actions.calls == []


# -- profile -------------------------------------------------------------------------------


async def test_profile_changes_are_kept(world: World) -> None:
    resp = await world.client.patch(
        f"{API_PREFIX}/me",
        json={
            "language": "de",
            "timezone": "America/Sao_Paulo",
            "consent": "always_ask",
            "quiet_hours": {"start": "21:30", "end": "06:45"},
            "channels": ["webpush", "fcm"],
        },
        headers=_hdr(ALICE),
    )
    assert resp.status == 200
    assert (await resp.json())["channels"] == ["webpush", "fcm"]
    owner = await world.store.get_owner("o-alice")
    assert owner is not None
    assert (owner.language, owner.timezone, owner.consent) == (
        "de",
        "America/Sao_Paulo",
        "always_ask",
    )
    assert (owner.quiet_start, owner.quiet_end) == (time(21, 30), time(6, 45))
    assert owner.channels == ("webpush", "fcm")
    assert owner.name == "Alice"

    resp = await world.client.patch(
        f"{API_PREFIX}/me", json={"quiet_hours": None}, headers=_hdr(ALICE)
    )
    assert (await resp.json())["quiet_hours"] is None
    owner = await world.store.get_owner("o-alice")
    assert owner is not None
    assert (owner.quiet_start, owner.quiet_end, owner.language) == (None, None, "de")


# -- push channels -------------------------------------------------------------------------


def _valid_channels() -> list[dict[str, Any]]:
    return [
        {
            "kind": "webpush",
            "target": "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABsecretpart",
            "keys": {"p256dh": _p256dh(), "auth": _b64(os.urandom(16))},
        },
        {"kind": "fcm", "target": "fcm-registration-token-" + "a1B2" * 40},
        {"kind": "ntfy", "target": "https://ntfy.sh/alice-heatpump-7f3k"},
        {"kind": "ntfy", "target": "https://ntfy.example.org/a", "keys": {"token": "tk_abc123"}},
        {
            "kind": "webhook",
            "target": "https://home.example.org/hooks/fixloop?key=s3cr3t",
            "keys": {"secret": "a-long-shared-secret-42"},
        },
        {
            "kind": "webhook",
            "target": "https://93.184.215.14:8443/api/webhook/fixloop",
            "keys": {"secret": "another-shared-secret"},
        },
    ]


@pytest.mark.parametrize("index", range(6))
async def test_a_valid_channel_is_registered_and_its_secrets_never_returned(
    world: World, index: int
) -> None:
    body = _valid_channels()[index]
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["kind"] == body["kind"]
    assert set(created) == {"channel_id", "kind", "target", "active", "created_at"}
    listed = await (await world.client.get(f"{API_PREFIX}/me/channels", headers=_hdr(ALICE))).text()
    for text in (await resp.text(), listed):
        assert body["target"] not in text
        for secret in body.get("keys", {}).values():
            assert secret not in text
    (stored,) = await world.store.channels("o-alice")
    assert stored.channel_id == created["channel_id"]
    assert stored.target == body["target"]
    assert stored.keys == body.get("keys", {})
    assert stored.created_at == NOW


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "kind": "webpush",
                "target": "http://push.example.com/x",
                "keys": {"p256dh": "PLACEHOLDER", "auth": "AAAAAAAAAAAAAAAAAAAAAA"},
            },
            "target",
        ),
        (
            {
                "kind": "webpush",
                "target": "https://push.example.com/x",
                "keys": {"p256dh": _b64(b"\x04" + b"\x01" * 30), "auth": "AAAAAAAAAAAAAAAAAAAAAA"},
            },
            "keys.p256dh",
        ),
        (
            {
                "kind": "webpush",
                "target": "https://push.example.com/x",
                "keys": {"p256dh": "not base64!", "auth": "AAAAAAAAAAAAAAAAAAAAAA"},
            },
            "keys.p256dh",
        ),
        (
            {
                "kind": "webpush",
                "target": "https://push.example.com/x",
                "keys": {"p256dh": "PLACEHOLDER", "auth": _b64(b"x" * 15)},
            },
            "keys.auth",
        ),
        (
            {
                "kind": "webpush",
                "target": "https://push.example.com/x",
                "keys": {"p256dh": "PLACEHOLDER"},
            },
            "keys.auth",
        ),
        ({"kind": "fcm", "target": ""}, "target"),
        ({"kind": "fcm", "target": "t" * 4097}, "target"),
        ({"kind": "fcm", "target": "two words"}, "target"),
        ({"kind": "fcm", "target": "tok", "keys": {"secret": "x"}}, "keys"),
        ({"kind": "ntfy", "target": "ftp://ntfy.sh/topic"}, "target"),
        ({"kind": "ntfy", "target": "https://ntfy.sh/"}, "target"),
        (
            {"kind": "ntfy", "target": "https://ntfy.sh/t", "keys": {"password": "x"}},
            "keys.password",
        ),
        (
            {
                "kind": "webhook",
                "target": "https://home.example.org/two words",
                "keys": {"secret": "a-long-shared-secret-42"},
            },
            "target",
        ),
        (
            {
                "kind": "webhook",
                "target": "https://home.example.org/hook",
                "keys": {"secret": "short"},
            },
            "keys.secret",
        ),
        ({"kind": "webhook", "target": "https://home.example.org/hook"}, "keys"),
        ({"kind": "pigeon", "target": "roof"}, "kind"),
        ({"target": "https://ntfy.sh/t"}, "kind"),
        ({"kind": "ntfy", "target": "https://ntfy.sh/t", "extra": 1}, "extra"),
    ],
)
async def test_an_invalid_channel_is_refused_naming_the_field(
    world: World, body: dict[str, Any], field: str
) -> None:
    keys = body.get("keys")
    if isinstance(keys, dict) and keys.get("p256dh") == "PLACEHOLDER":
        keys["p256dh"] = _p256dh()
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    error = await _error(resp, 400)
    assert error["field"] == field
    assert field in error["message"]
    assert await world.store.channels("o-alice", active_only=False) == []


async def test_registering_a_channel_again_refreshes_it(world: World) -> None:
    body = _valid_channels()[1]
    first = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    again = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    assert (first.status, again.status) == (201, 200)
    assert (await first.json())["channel_id"] == (await again.json())["channel_id"]
    assert len(await world.store.channels("o-alice")) == 1


async def test_a_removed_channel_is_deleted_and_no_longer_exported(world: World) -> None:
    body = _valid_channels()[4]
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    channel_id = (await resp.json())["channel_id"]
    kept = await world.client.post(
        f"{API_PREFIX}/me/channels", json=_valid_channels()[2], headers=_hdr(ALICE)
    )
    kept_id = (await kept.json())["channel_id"]
    resp = await world.client.delete(f"{API_PREFIX}/me/channels/{channel_id}", headers=_hdr(BOB))
    await _error(resp, 404)  # not Bob's
    resp = await world.client.delete(f"{API_PREFIX}/me/channels/{channel_id}", headers=_hdr(ALICE))
    assert resp.status == 204
    listed = await (await world.client.get(f"{API_PREFIX}/me/channels", headers=_hdr(ALICE))).json()
    assert [c["channel_id"] for c in listed["channels"]] == [kept_id]
    stored = await world.store.channels("o-alice", active_only=False)
    assert [c.channel_id for c in stored] == [kept_id]
    export = await world.client.get(f"{API_PREFIX}/me/export", headers=_hdr(ALICE))
    text = await export.text()
    assert [c["channel_id"] for c in json.loads(text)["channels"]] == [kept_id]
    assert channel_id not in text
    assert "home.example.org" not in text
    resp = await world.client.delete(f"{API_PREFIX}/me/channels/{channel_id}", headers=_hdr(ALICE))
    await _error(resp, 404)


async def test_a_retired_channel_can_be_deleted_too(world: World) -> None:
    await world.store.put_channel(
        PushChannel("ch-dead", "o-alice", "fcm", "t" * 40, active=False, failures=10)
    )
    resp = await world.client.delete(f"{API_PREFIX}/me/channels/ch-dead", headers=_hdr(ALICE))
    assert resp.status == 204
    assert await world.store.channels("o-alice", active_only=False) == []


@pytest.mark.parametrize(
    "target",
    [
        "http://home.example.org/hook",  # plain http to a public host
        "https://user:pw@hooks.example.org/x",
        "https://:pw@hooks.example.org/x",
        "https://hooks.example.org:http/x",
        "https://[::1/x",
        "https://localhost/x",
        "https://LOCALHOST./x",
        "https://printer.localhost/x",
        "https://127.0.0.1/x",
        "https://127.1/x",
        "https://0x7f.1/x",
        "https://0x7F000001/x",
        "https://2130706433/x",
        "https://0177.0.0.1/x",
        "https://017700000001/x",
        "https://127.0.0.1./x",
        "https://10.1.2.3/x",
        "https://172.16.0.1/x",
        "https://192.168.1.20:8123/x",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/x",
        "https://0.0.0.0/x",
        "https://0/x",
        "https://224.0.0.1/x",
        "https://255.255.255.255/x",
        "https://240.0.0.1/x",
        "https://[::1]/x",
        "https://[::]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://[::ffff:7f00:1]/x",
        "https://[::ffff:a9fe:a9fe]/x",
        "https://[fe80::1]/x",
        "https://[fc00::1]/x",
        "https://[ff02::1]/x",
        "https://[2002:7f00:1::]/x",
        "https://[64:ff9b::a00:1]/x",
        "https://1.2.3.4.5/x",
        "https://256.0.0.1/x",
        "https://0x100000000/x",
        "https://127。0。0。1:8443/x",
        "https://１６９.２５４.１６９.２５４/",
        "https://10．0．0．1/x",
        "https://ｌｏｃａｌｈｏｓｔ/x",
        "https://hooks.example.org:0/x",
    ],
)
async def test_a_webhook_to_an_internal_or_odd_address_is_refused(
    world: World, target: str
) -> None:
    body = {"kind": "webhook", "target": target, "keys": {"secret": "a-long-shared-secret-42"}}
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    error = await _error(resp, 422)
    assert error["field"] == "target"
    assert error["code"] == "unsafe_target"
    assert await world.store.channels("o-alice", active_only=False) == []


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "ntfy", "target": "http://ntfy.home.lan/alerts"},
        {"kind": "ntfy", "target": "https://192.168.1.20/alerts"},
        {"kind": "ntfy", "target": "https://localhost/alerts"},
        {"kind": "webpush", "target": "https://10.0.0.5/wpush/v2/x"},
        {"kind": "ntfy", "target": "https://127。0。0。1/alerts"},
        {"kind": "webpush", "target": "https://１６９.２５４.１６９.２５４/wpush/v2/x"},
    ],
)
async def test_ntfy_and_webpush_targets_inside_the_network_are_refused(
    world: World, body: dict[str, Any]
) -> None:
    if body["kind"] == "webpush":
        body = {**body, "keys": {"p256dh": _p256dh(), "auth": _b64(os.urandom(16))}}
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    error = await _error(resp, 422)
    assert error["field"] == "target"
    assert error["code"] == "unsafe_target"
    assert await world.store.channels("o-alice", active_only=False) == []


async def test_internal_webhooks_are_taken_where_the_install_allows_them(
    aiohttp_client: ClientFactory,
) -> None:
    store = await SqliteStore(":memory:").open()
    try:
        await _seed(store)
        app = create_api(
            store=store,
            actions=FakeActions(store),
            health=FakeHealth(),
            clock=lambda: NOW,
            webhook_allow_private=True,
        )
        client = await aiohttp_client(app)
        for target in (
            "http://127.0.0.1:8123/hook",
            "http://localhost:8080/h",
            "https://10.0.0.2/",
        ):
            body = {"kind": "webhook", "target": target, "keys": {"secret": "s" * 16}}
            resp = await client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
            assert resp.status == 201, await resp.text()
        body = {"kind": "webhook", "target": "ftp://10.0.0.2/", "keys": {"secret": "s" * 16}}
        resp = await client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
        # not an http(s) URL at all: the schema says so (400), as for any other install
        assert (await _error(resp, 400))["field"] == "target"
    finally:
        await store.close()


def test_targets_are_masked() -> None:
    assert (
        mask_target("https://fcm.googleapis.com/fcm/send/abc?x=1") == "https://fcm.googleapis.com/…"
    )
    assert mask_target("abcdefghijklmnopqrstuvwxyz") == "…wxyz"
    assert mask_target("short-token") == "…"
    assert mask_target("http://[broken/abcdefghijklmnopqrstuvwxyz") == "…wxyz"


async def test_the_export_shows_each_target_as_the_api_does(world: World) -> None:
    # 20 characters: once shown in part by the export (from 16) but not by the API (from 24)
    short_token = "fcm-token-0123456789"
    for body in [*_valid_channels(), {"kind": "fcm", "target": short_token}]:
        resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
        assert resp.status == 201, await resp.text()
    listed = await (await world.client.get(f"{API_PREFIX}/me/channels", headers=_hdr(ALICE))).json()
    exported = await (await world.client.get(f"{API_PREFIX}/me/export", headers=_hdr(ALICE))).json()
    shown = {c["channel_id"]: c["target"] for c in listed["channels"]}
    assert len(shown) == 7
    assert {c["channel_id"]: c["target"] for c in exported["channels"]} == shown
    assert "…" in shown.values()
    assert not any("6789" in target for target in shown.values())


# -- devices and cases ---------------------------------------------------------------------


async def test_device_health_is_told_in_words(world: World) -> None:
    world.health.points = {
        "d-a1": HealthPoint(NOW, 0.1),
        "d-a2": HealthPoint(NOW, 0.7),
        "d-a3": HealthPoint(NOW, 0.05),
    }
    resp = await world.client.get(f"{API_PREFIX}/devices", headers=_hdr(ALICE))
    text = await resp.text()
    devices = {d["device_id"]: d for d in json.loads(text)["devices"]}
    # an urgent open case outweighs a calm reading
    assert devices["d-a1"]["health"] == "problem"
    assert set(devices["d-a1"]["open_cases"]) == {"c-a1", "c-a3", "c-a4"}
    assert devices["d-a2"]["health"] == "needs attention"
    assert devices["d-a3"]["health"] == "good"
    assert devices["d-a3"]["label"] == "garage"
    assert "score" not in text
    assert "0.7" not in text

    one = await (await world.client.get(f"{API_PREFIX}/devices/d-a3", headers=_hdr(ALICE))).json()
    assert one == devices["d-a3"]


async def test_device_list_survives_an_unreachable_health_store(world: World) -> None:
    world.health.fail = True
    resp = await world.client.get(f"{API_PREFIX}/devices", headers=_hdr(ALICE))
    assert resp.status == 200
    devices = {d["device_id"]: d["health"] for d in (await resp.json())["devices"]}
    assert devices == {"d-a1": "problem", "d-a2": "unknown", "d-a3": "unknown"}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, ["c-a3", "c-a1", "c-a4", "c-a2"]),
        ("open", ["c-a3", "c-a1", "c-a4"]),
        ("closed", ["c-a2"]),
    ],
)
async def test_cases_newest_first_and_filtered(
    world: World, state: str | None, expected: list[str]
) -> None:
    params = {} if state is None else {"state": state}
    resp = await world.client.get(f"{API_PREFIX}/cases", params=params, headers=_hdr(ALICE))
    assert [c["case_id"] for c in (await resp.json())["cases"]] == expected


async def test_an_unknown_case_filter_is_400(world: World) -> None:
    resp = await world.client.get(
        f"{API_PREFIX}/cases", params={"state": "sideways"}, headers=_hdr(ALICE)
    )
    assert (await _error(resp, 400))["field"] == "state"


async def test_case_history_is_in_plain_words(world: World) -> None:
    resp = await world.client.get(f"{API_PREFIX}/cases/c-a1", headers=_hdr(ALICE))
    assert resp.status == 200
    text = await resp.text()
    case = json.loads(text)
    assert case["device_label"] == "cellar"
    assert case["waiting_for"] == "your_consent"
    assert case["pending_fix"] == "restart"
    assert case["history"]
    assert all(isinstance(line, str) and line for line in case["history"])
    for word in (
        "score",
        "0.87",
        "confidence",
        "evidence",
        "threshold",
        "vibration",
        "ch-1",
    ):
        assert word not in text, word
    history = " ".join(case["history"])
    for jargon in ("awaiting_consent", "transition", "diagnosis", "notify", "_"):
        assert jargon not in history, jargon
    # times are told in the owner's zone (Berlin: UTC+1 in March; 04:00 UTC)
    assert "5:00" in history
    assert "4:00" not in history


async def test_slots_on_offer(world: World) -> None:
    resp = await world.client.get(f"{API_PREFIX}/cases/c-a3/slots", headers=_hdr(ALICE))
    text = await resp.text()
    offer = json.loads(text)
    assert offer["appointment_id"] == "ap-1"
    assert [s["index"] for s in offer["slots"]] == [0, 1]
    assert offer["slots"][0]["technician"] == "Tom"
    assert offer["slots"][0]["start"] == "2025-03-04T10:00:00Z"
    assert "score" not in text
    none = await (
        await world.client.get(f"{API_PREFIX}/cases/c-a2/slots", headers=_hdr(ALICE))
    ).json()
    assert none == {"appointment_id": None, "slots": []}


# -- answers to the case machine -------------------------------------------------------------


async def test_fix_answers_reach_the_case_machine(world: World) -> None:
    yes = await world.client.post(
        f"{API_PREFIX}/cases/c-a1/fix", json={"accept": True}, headers=_hdr(ALICE)
    )
    assert yes.status == 200
    assert (await yes.json())["state"] == "remote_fix"
    no = await world.client.post(
        f"{API_PREFIX}/cases/c-a1/fix", json={"accept": False}, headers=_hdr(ALICE)
    )
    assert (await no.json())["state"] == "appointment_proposed"
    assert world.actions.calls == [
        ("accept_fix", "o-alice", "c-a1"),
        ("decline_fix", "o-alice", "c-a1"),
    ]


async def test_appointment_answers_reach_the_case_machine(world: World) -> None:
    path = f"{API_PREFIX}/cases/c-a3/appointment"
    booked = await world.client.post(path, json={"slot": 1}, headers=_hdr(ALICE))
    assert booked.status == 201
    body = await booked.json()
    assert (body["state"], body["technician"], body["start"]) == (
        "booked",
        "Tom",
        "2025-03-05T10:00:00Z",
    )
    other = await world.client.post(path, json={"other_times": True}, headers=_hdr(ALICE))
    assert other.status == 200
    assert (await other.json())["appointment_id"] == "ap-new"
    declined = await world.client.post(path, json={"decline": True}, headers=_hdr(ALICE))
    assert (await declined.json())["state"] == "dismissed"
    assert [c[0] for c in world.actions.calls] == [
        "choose_slot",
        "request_other_slots",
        "decline_visit",
    ]
    assert world.actions.calls[0] == ("choose_slot", "o-alice", "c-a3", 1)


@pytest.mark.parametrize("stars", [1, 5])
async def test_a_rating_within_bounds_is_stored(world: World, stars: int) -> None:
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a2/rating",
        json={"stars": stars, "comment": "  quick fix  ", "nothing_wrong": stars == 1},
        headers=_hdr(ALICE),
    )
    assert resp.status == 201
    body = await resp.json()
    assert (body["stars"], body["comment"]) == (stars, "quick fix")
    assert world.actions.calls == [("rate", "o-alice", "c-a2", stars, "quick fix", stars == 1)]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ConflictError("the case has moved on"), 409, "conflict"),
        (IllegalTransitionError("a resolved case cannot be booked"), 409, "illegal_transition"),
        (InvalidRequestError("slot 7 is not on offer"), 422, "invalid_request"),
        (NotFoundError("no such case"), 404, "not_found"),
        (StoreUnavailableError("database is locked"), 503, "unavailable"),
    ],
)
async def test_case_machine_refusals_are_mapped(
    world: World, exc: Exception, status: int, code: str
) -> None:
    world.actions.fail = exc
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a3/appointment", json={"slot": 0}, headers=_hdr(ALICE)
    )
    error = await _error(resp, status)
    assert error["code"] == code
    if status < 500:
        assert error["message"] == str(exc)


async def test_a_bug_is_a_500_that_is_logged_and_the_app_goes_on(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.actions.fail = KeyError("internal detail 42")
    with caplog.at_level(logging.ERROR, logger="notifier.api"):
        resp = await world.client.post(
            f"{API_PREFIX}/cases/c-a1/fix",
            json={"accept": True},
            headers={**_hdr(ALICE), REQUEST_ID_HEADER: "req-abc-123"},
        )
    error = await _error(resp, 500)
    assert error["code"] == "internal_error"
    assert "internal detail" not in await resp.text()
    assert resp.headers[REQUEST_ID_HEADER] == "req-abc-123"
    assert any("req-abc-123" in r.getMessage() and r.exc_info for r in caplog.records)
    again = await world.client.post(
        f"{API_PREFIX}/cases/c-a1/fix", json={"accept": True}, headers=_hdr(ALICE)
    )
    assert again.status == 200


async def test_every_response_names_its_request(world: World) -> None:
    ok = await world.client.get(f"{API_PREFIX}/me", headers=_hdr(ALICE))
    bad = await world.client.get(f"{API_PREFIX}/me")
    odd = await world.client.get(f"{API_PREFIX}/me", headers={REQUEST_ID_HEADER: "bad id <script>"})
    ids = [r.headers[REQUEST_ID_HEADER] for r in (ok, bad, odd)]
    assert all(ids)
    assert len(set(ids)) == 3
    assert "bad id" not in ids[2]


async def test_unknown_addresses_and_methods_answer_json(world: World) -> None:
    resp = await world.client.get(f"{API_PREFIX}/nothing", headers=_hdr(ALICE))
    assert (await _error(resp, 404))["code"] == "not_found"
    resp = await world.client.put(f"{API_PREFIX}/me", json={}, headers=_hdr(ALICE))
    assert (await _error(resp, 405))["code"] == "method_not_allowed"
    assert "PATCH" in resp.headers["Allow"]


# -- the owner's rights --------------------------------------------------------------------


async def test_export_holds_the_owners_data_and_no_secrets(world: World) -> None:
    body = _valid_channels()[4]
    await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    resp = await world.client.get(f"{API_PREFIX}/me/export", headers=_hdr(ALICE))
    assert resp.status == 200
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert "2025-03-03" in resp.headers["Content-Disposition"]
    text = await resp.text()
    data = json.loads(text)
    assert data["owner"]["name"] == "Alice"
    assert {d["device_id"] for d in data["devices"]} == {"d-a1", "d-a2", "d-a3"}
    assert {c["case_id"] for c in data["cases"]} == {"c-a1", "c-a2", "c-a3", "c-a4"}
    assert len(data["channels"]) == 1
    assert "d-b1" not in text
    assert "c-b1" not in text
    assert body["keys"]["secret"] not in text
    assert ALICE not in text


async def test_erasure_needs_confirming_and_then_the_token_is_refused(world: World) -> None:
    resp = await world.client.delete(f"{API_PREFIX}/me", headers=_hdr(ALICE))
    await _error(resp, 400)
    assert await world.store.get_owner("o-alice") is not None

    resp = await world.client.delete(
        f"{API_PREFIX}/me", json={"confirm": "erase"}, headers=_hdr(ALICE)
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["erased"] is True
    assert body["rows"] > 0
    assert await world.store.get_owner("o-alice") is None
    for path in ("/me", "/cases", "/devices"):
        resp = await world.client.get(API_PREFIX + path, headers=_hdr(ALICE))
        await _error(resp, 401)
    # Bob is untouched
    assert (await world.client.get(f"{API_PREFIX}/me", headers=_hdr(BOB))).status == 200


async def test_a_token_whose_owner_is_gone_is_refused(world: World) -> None:
    await world.store.add_token("tok-ghost-0123456789", ("owner", "o-ghost"))
    resp = await world.client.get(f"{API_PREFIX}/me", headers=_hdr("tok-ghost-0123456789"))
    await _error(resp, 401)


# -- the OpenAPI document --------------------------------------------------------------------


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


async def test_openapi_describes_every_route_and_only_those(world: World) -> None:
    resp = await world.client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in world.client.app.router.routes()
        if route.resource is not None
    }
    described = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == described
    assert len(routes) == 22
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for ref in _refs(doc):
        assert _resolve(doc, ref) is not None
    for path, item in doc["paths"].items():
        for method, op in item.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(path.replace("}", "{").split("{")[1::2]), (method, path)
            assert op["responses"], (method, path)
            if path == "/openapi.json" or path.endswith("/tap"):
                # the document is public; a one-tap link is its own credential
                assert op["security"] == []
            else:
                assert op["security"] == [{"bearer": []}]
                assert "401" in op["responses"]
                assert "403" in op["responses"]
    channel = doc["paths"][f"{API_PREFIX}/me/channels"]["post"]["requestBody"]
    schema = _resolve(doc, channel["content"]["application/json"]["schema"]["$ref"])
    assert set(schema["discriminator"]["mapping"]) == {"fcm", "webpush", "ntfy", "webhook"}
    rating = _resolve(
        doc,
        doc["paths"][f"{API_PREFIX}/cases/{{id}}/rating"]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]["$ref"],
    )
    assert rating["properties"]["stars"]["minimum"] == 1
    assert rating["properties"]["stars"]["maximum"] == 5
    assert rating["additionalProperties"] is False
    assert world.client.app[OPENAPI_KEY] == doc


async def test_openapi_names_the_public_server() -> None:
    store = await SqliteStore(":memory:").open()
    try:
        app = create_api(
            store=store,
            actions=FakeActions(store),
            health=FakeHealth(),
            action_base_url="https://fixloop.example.org/api/v1/",
        )
        assert app[OPENAPI_KEY]["servers"] == [{"url": "https://fixloop.example.org"}]
    finally:
        await store.close()


async def test_history_and_titles_come_from_the_message_catalogue_when_installed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import notifier.api.words as words

    seen: list[tuple[Any, ...]] = []

    def plain_history(entries: Sequence[Any], language: str, timezone: str) -> list[str]:
        seen.append((list(entries), language, timezone))
        return ["Told in plain words."]

    def fault_title(fault: str, model: str, language: str) -> str:
        return f"title of {fault} on {model} in {language}"

    monkeypatch.setattr(words, "_CATALOG_HISTORY", plain_history)
    monkeypatch.setattr(words, "_CATALOG_TITLE", fault_title)
    case = await (await world.client.get(f"{API_PREFIX}/cases/c-a1", headers=_hdr(ALICE))).json()
    assert case["history"] == ["Told in plain words."]
    assert case["title"] == "title of fan_bearing_wear on heatpump-x in en"
    ((entries, language, timezone),) = seen
    assert (language, timezone) == ("en", "Europe/Berlin")
    assert [e[1:] for e in entries] == [
        ("diagnosis", None, "opened"),
        ("transition", "opened", "awaiting_consent"),
        ("notify", None, None),
    ]
    assert entries[0][0] == NOW - timedelta(hours=5)


# -- one-tap action links --------------------------------------------------------------------

LINKS = ActionLinks("the-owner-api-tests-link-secret", ttl=timedelta(hours=6))


@pytest.fixture
async def linked(aiohttp_client: ClientFactory) -> AsyncIterator[World]:
    store = await SqliteStore(":memory:").open()
    try:
        await _seed(store)
        actions, health = FakeActions(store), FakeHealth()
        app = create_api(
            store=store, actions=actions, health=health, clock=lambda: NOW, links=LINKS
        )
        yield World(await aiohttp_client(app), store, actions, health)
    finally:
        await store.close()


def _tap(case_id: str, action: str) -> str:
    return urlsplit(LINKS.url(API_PREFIX, case_id, action, now=NOW)).geturl()


@pytest.mark.parametrize(
    ("case_id", "action", "status", "call"),
    [
        ("c-a1", "accept_fix", 200, ("accept_fix", "o-alice", "c-a1")),
        ("c-a1", "decline_fix", 200, ("decline_fix", "o-alice", "c-a1")),
        ("c-a3", "choose_slot:1", 201, ("choose_slot", "o-alice", "c-a3", 1)),
        ("c-a3", "other_times", 200, ("request_other_slots", "o-alice", "c-a3")),
        ("c-a3", "decline_visit", 200, ("decline_visit", "o-alice", "c-a3")),
        ("c-a2", "rate_good", 201, ("rate", "o-alice", "c-a2", 5, None, False)),
        ("c-a2", "rate_bad", 201, ("rate", "o-alice", "c-a2", 2, None, False)),
        ("c-a2", "nothing_wrong", 201, ("rate", "o-alice", "c-a2", 3, None, True)),
        ("c-a2", "rate:4", 201, ("rate", "o-alice", "c-a2", 4, None, False)),
        ("c-b1", "accept_fix", 200, ("accept_fix", "o-bob", "c-b1")),
    ],
)
async def test_each_link_makes_the_request_of_its_route_once(
    linked: World, case_id: str, action: str, status: int, call: tuple[Any, ...]
) -> None:
    url = _tap(case_id, action)
    described = await linked.client.get(url)
    assert described.status == 200
    about = await described.json()
    assert (about["case_id"], about["action"]) == (case_id, action)
    assert about["expires_at"] == "2025-03-03T15:00:00Z"
    assert linked.actions.calls == []  # looking is not doing
    resp = await linked.client.post(url)  # no bearer token: the link is the credential
    assert resp.status == status, await resp.text()
    assert linked.actions.calls == [call]
    again = await linked.client.post(url)
    assert (await _error(again, 409))["code"] == "link_used"
    assert linked.actions.calls == [call]


@pytest.mark.parametrize(
    "action", ["", "restart", "choose_slot", "choose_slot:x", "choose_slot:100", "rate:6",
               "rate:0", "accept_fix:1", "rate_good:5"],
)  # fmt: skip
async def test_an_action_no_link_carries_is_a_400(linked: World, action: str) -> None:
    url = f"{API_PREFIX}/cases/c-a1/tap?{urlencode({'action': action, 'token': 'x'})}"
    error = await _error(await linked.client.post(url), 400)
    assert error["field"] == "action"
    assert linked.actions.calls == []


async def test_links_are_refused_where_none_are_signed(world: World) -> None:
    resp = await world.client.post(_tap("c-a1", "accept_fix"))
    assert (await _error(resp, 403))["code"] == "invalid_link"
    page = await world.client.get(_tap("c-a1", "accept_fix"), headers={"Accept": "text/html"})
    assert page.status == 403
    assert page.content_type == "text/html"
    assert world.actions.calls == []


async def test_a_link_of_an_erased_owner_finds_no_case(linked: World) -> None:
    url = _tap("c-b1", "accept_fix")
    await linked.store.erase_owner("o-bob")
    await _error(await linked.client.post(url), 404)
    assert linked.actions.calls == []


async def test_a_failed_request_through_a_link_answers_like_its_route(linked: World) -> None:
    linked.actions.fail = ConflictError("this case is not waiting for your go-ahead")
    resp = await linked.client.post(_tap("c-a1", "accept_fix"), headers={"Accept": "text/html"})
    assert resp.status == 409
    text = await resp.text()
    assert "not waiting for your go-ahead" in text
    assert "<script" not in text


async def test_well_formed_but_impossible_profile_and_keys_are_422(world: World) -> None:
    resp = await world.client.patch(
        f"{API_PREFIX}/me",
        json={"quiet_hours": {"start": "22:00", "end": "22:00"}},
        headers=_hdr(ALICE),
    )
    assert (await _error(resp, 422))["field"] == "quiet_hours"
    resp = await world.client.patch(
        f"{API_PREFIX}/me", json={"timezone": "Mars/Olympus_Mons"}, headers=_hdr(ALICE)
    )
    assert (await _error(resp, 422))["field"] == "timezone"
    off_curve = _b64(b"\x04" + b"\x01" * 64)
    body = {
        "kind": "webpush",
        "target": "https://push.example.com/x",
        "keys": {"p256dh": off_curve, "auth": "AAAAAAAAAAAAAAAAAAAAAA"},
    }
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    error = await _error(resp, 422)
    assert (error["field"], error["code"]) == ("keys.p256dh", "invalid_keys")
    assert await world.store.channels("o-alice", active_only=False) == []


async def test_whole_numbers_written_as_floats_are_taken(world: World) -> None:
    # JSON Schema's "integer" includes 4.0; the document and the code agree on it
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a2/rating", json={"stars": 4.0}, headers=_hdr(ALICE)
    )
    assert resp.status == 201, await resp.text()
    resp = await world.client.post(
        f"{API_PREFIX}/cases/c-a2/rating", json={"stars": 4.5}, headers=_hdr(ALICE)
    )
    assert (await _error(resp, 400))["field"] == "stars"


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "ntfy", "target": "https://ntfy.sh:http/topic"},
        {"kind": "ntfy", "target": "https://[::1/topic"},
        {"kind": "ntfy", "target": "https://user:pw@ntfy.sh/topic"},
        {"kind": "webpush", "target": "https://user:pw@push.example.com/x"},
        {"kind": "webpush", "target": "https://push.example.com:0/x"},
    ],
)
async def test_a_target_url_that_cannot_be_used_is_422(world: World, body: dict[str, Any]) -> None:
    if body["kind"] == "webpush":
        body = {**body, "keys": {"p256dh": _p256dh(), "auth": _b64(os.urandom(16))}}
    resp = await world.client.post(f"{API_PREFIX}/me/channels", json=body, headers=_hdr(ALICE))
    error = await _error(resp, 422)
    assert (error["field"], error["code"]) == ("target", "unsafe_target")
    assert await world.store.channels("o-alice", active_only=False) == []
