"""One-tap action links end to end: the case machine tells the owner, the outbox pushes a
message with signed links, and a tap on a link (a POST, as ntfy makes it) goes through the
owner API to the same case-machine request as the REST route."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ManualClock

from diagnostics import CATALOG, Diagnosis
from notifier.actions import HealthPoint
from notifier.api import create_api
from notifier.errors import ConflictError
from notifier.links import ActionLinks
from notifier.loop import LoopConfig, Notice, OwnerLoop
from notifier.model import DeviceRecord, Owner, PushChannel, Technician, Window
from notifier.outbox import Outbox
from notifier.push import PushDispatcher, PushMessage
from notifier.sqlite import SqliteStore
from wire.protocol import Event

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # a Monday
BASE = "https://fixloop.example.org/api/v1"
ALL_WEEK = tuple(Window(d, time(0), time(23, 59)) for d in range(7))

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


@dataclass
class Device:
    """Every command is done at once."""

    sent: list[str] = field(default_factory=list)

    async def send(
        self,
        device_id: str,
        action: str,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        self.sent.append(action)
        return Event(
            device_id, 1, int(T0.timestamp() * 1000), "command_result", ok=True, command_id="x"
        )


@dataclass
class Health:
    points: dict[str, list[HealthPoint]] = field(default_factory=dict)

    async def latest(self, device_ids: Any) -> dict[str, HealthPoint]:
        return {d: self.points[d][-1] for d in device_ids if self.points.get(d)}

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        return [p for p in self.points.get(device_id, []) if p.at >= start]


@dataclass
class Phone:
    """The owner's push channel: keeps what arrives."""

    kind: str = "ntfy"
    got: list[PushMessage] = field(default_factory=list)

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        self.got.append(message)

    def link(self, kind: str, action: str) -> str:
        for message in reversed(self.got):
            if message.data["kind"] != kind:
                continue
            for button in message.actions:
                if button.action_id == action:
                    assert button.url is not None
                    assert button.background  # ntfy posts it: one tap
                    url = urlsplit(button.url)
                    assert f"{url.scheme}://{url.netloc}".startswith("https://fixloop.example")
                    return f"{url.path}?{url.query}"
        raise AssertionError(f"no {action} button on a {kind} message")


@dataclass
class Rig:
    client: Client
    loop: OwnerLoop
    store: SqliteStore
    outbox: Outbox
    phone: Phone
    health: Health
    device: Device
    clock: ManualClock

    async def pushed(self) -> None:
        await self.outbox.drain()

    async def settle(self) -> None:
        await asyncio.sleep(0)
        async with asyncio.timeout(10):
            while self.loop.commands_running:  # noqa: ASYNC110 - polls the loop's own count
                await asyncio.sleep(0.001)

    async def state(self, case_id: str) -> str:
        case = await self.store.get_case(case_id)
        assert case is not None
        return case.state

    async def open(self, device_id: str, fault: str, **kw: Any) -> str:
        model = (await self.store.get_device(device_id) or DeviceRecord("", "", "")).model
        entry = CATALOG[model].faults[fault]
        case = await self.loop.handle_diagnosis(
            Diagnosis(
                device_id=device_id,
                model=model,
                fault=fault,
                confidence=0.9,
                status="open",
                opened_at=self.clock.now,
                updated_at=self.clock.now,
                score=0.8,
                source=kw.get("source", "device"),
                time_to_failure=None,
                remedies=entry.remedies,
                evidence=("seen",),
            )
        )
        assert case is not None
        await self.settle()
        await self.pushed()
        return case.case_id


@pytest.fixture
async def rig(aiohttp_client: ClientFactory) -> AsyncIterator[Rig]:
    clock, phone, health, device = ManualClock(T0), Phone(), Health(), Device()
    links = ActionLinks("a-long-secret-only-these-tests-know", ttl=timedelta(days=3))
    async with SqliteStore(":memory:") as store:
        for owner_id, consent in (("ann", "fix_and_tell"), ("cem", "always_ask")):
            await store.put_owner(
                Owner(owner_id, owner_id.title(), consent=consent, quiet_start=None,
                      quiet_end=None, availability=ALL_WEEK, max_per_day=100)
            )  # fmt: skip
            await store.put_channel(PushChannel(f"ph-{owner_id}", owner_id, "ntfy", "https://n/t"))
        await store.put_device(DeviceRecord("w-ann", "ann", "washer", "2.3.1"))
        await store.put_device(DeviceRecord("w-cem", "cem", "washer", "2.3.1"))
        await store.put_technician(
            Technician("tina", "Tina", "default", frozenset({"bearing"}), hours=ALL_WEEK)
        )
        dispatcher = PushDispatcher({"ntfy": phone}, attempts=1)  # type: ignore[dict-item]
        outbox = Outbox(store, dispatcher, clock=clock, action_base_url=BASE, links=links)
        config = LoopConfig(
            settle_s=60, verify_window_s=1_800, verify_timeout_s=3_600, tick_s=0.01,
            firmware={"washer": "2.4.0"},
        )  # fmt: skip
        async with OwnerLoop(store, device, health, outbox, config=config, clock=clock) as loop:
            app = create_api(store=store, actions=loop, health=health, clock=clock, links=links)
            worker = asyncio.create_task(outbox.run())
            try:
                client = await aiohttp_client(app)
                yield Rig(client, loop, store, outbox, phone, health, device, clock)
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)


async def test_yes_on_a_consent_request_runs_the_fix_once(rig: Rig) -> None:
    case_id = await rig.open("w-cem", "firmware_bug")
    assert await rig.state(case_id) == "awaiting_consent"
    link = rig.phone.link("consent_request", "accept_fix")
    resp = await rig.client.post(link)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["case_id"], body["state"]) == (case_id, "remote_fix")
    await rig.settle()
    assert rig.device.sent == ["firmware_update"]
    assert await rig.state(case_id) == "verifying"
    again = await rig.client.post(link)
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "link_used"
    assert rig.device.sent == ["firmware_update"]
    trail = await rig.store.audit(case_id)
    consent = [e for e in trail if e.action == "consent"]
    assert [(e.actor, e.reason) for e in consent] == [
        ("owner", "the owner agreed to firmware_update")
    ]


async def test_no_on_a_consent_request_declines_the_fix(rig: Rig) -> None:
    case_id = await rig.open("w-cem", "firmware_bug")
    resp = await rig.client.post(rig.phone.link("consent_request", "decline_fix"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "dismissed"  # no visit remedy for this fault
    assert await rig.state(case_id) == "dismissed"
    assert rig.device.sent == []
    # the other button of the same message now meets a case that has moved on
    late = await rig.client.post(rig.phone.link("consent_request", "accept_fix"))
    assert late.status == 409
    assert (await late.json())["error"]["code"] == "conflict"


async def test_a_visit_time_is_booked_from_its_button(rig: Rig) -> None:
    case_id = await rig.open("w-ann", "bearing_wear", source="model")
    assert await rig.state(case_id) == "appointment_proposed"
    case = await rig.store.get_case(case_id)
    assert case is not None
    offer = await rig.store.get_appointment(case.appointment_id or "")
    assert offer is not None
    link = rig.phone.link("appointment_offer", "choose_slot:1")
    # opening the link in a browser only asks; nothing is booked yet
    page = await rig.client.get(link, headers={"Accept": "text/html"})
    assert page.status == 200
    assert page.content_type == "text/html"
    text = await page.text()
    assert '<form method="post">' in text
    assert "Book visit time 2" in text
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert await rig.state(case_id) == "appointment_proposed"
    resp = await rig.client.post(link)
    assert resp.status == 201, await resp.text()
    booked = await resp.json()
    assert booked["state"] == "booked"
    assert booked["start"] == offer.offered[1].start.isoformat().replace("+00:00", "Z")
    assert await rig.state(case_id) == "booked"
    await rig.pushed()
    assert rig.phone.got[-1].data["kind"] == "appointment_booked"


async def test_other_times_from_the_offer_and_the_booking(rig: Rig) -> None:
    case_id = await rig.open("w-ann", "bearing_wear", source="model")
    first = rig.phone.link("appointment_offer", "other_times")
    resp = await rig.client.post(first)
    assert resp.status == 200, await resp.text()
    offer = await resp.json()
    assert offer["slots"]
    case = await rig.store.get_case(case_id)
    assert case is not None
    assert offer["appointment_id"] == case.appointment_id
    await rig.pushed()
    resp = await rig.client.post(rig.phone.link("appointment_offer", "choose_slot:0"))
    assert resp.status == 201
    booked = await resp.json()
    await rig.pushed()
    # the booking message's "other times" moves the booked visit: its time is freed
    resp = await rig.client.post(rig.phone.link("appointment_booked", "other_times"))
    assert resp.status == 200, await resp.text()
    moved = await resp.json()
    assert moved["slots"]
    assert booked["start"] not in [s["start"] for s in moved["slots"]]
    assert await rig.state(case_id) == "appointment_proposed"
    old = await rig.store.get_appointment(booked["appointment_id"])
    assert old is not None
    assert old.state == "cancelled"
    await rig.pushed()
    assert rig.phone.got[-1].data["kind"] == "visit_moving"
    # a new time is booked from the moving message's own buttons
    resp = await rig.client.post(rig.phone.link("visit_moving", "choose_slot:0"))
    assert resp.status == 201, await resp.text()
    again = await resp.json()
    assert again["start"] == moved["slots"][0]["start"]
    assert await rig.state(case_id) == "booked"
    # once the visit has started, the reminder's "other times" answers like the REST route
    rig.clock.now = datetime.fromisoformat(again["start"])
    owner, case = await rig.store.get_owner("ann"), await rig.store.get_case(case_id)
    assert owner is not None
    assert case is not None
    await rig.outbox.notify(owner, case, Notice("appointment_reminder"))
    await rig.pushed()
    resp = await rig.client.post(rig.phone.link("appointment_reminder", "other_times"))
    assert resp.status == 409
    message = (await resp.json())["error"]["message"]
    assert "already started" in message
    with pytest.raises(ConflictError) as direct:
        await rig.loop.request_other_slots("ann", case_id)
    assert str(direct.value) == message
    assert await rig.state(case_id) == "booked"


async def test_a_booked_visit_is_cancelled_from_its_button(rig: Rig) -> None:
    case_id = await rig.open("w-ann", "bearing_wear", source="model")
    resp = await rig.client.post(rig.phone.link("appointment_offer", "choose_slot:0"))
    assert resp.status == 201, await resp.text()
    booked = await resp.json()
    await rig.pushed()
    booking = rig.phone.got[-1]
    assert booking.data["kind"] == "appointment_booked"
    assert [b.action_id for b in booking.actions] == ["other_times", "decline_visit"]
    resp = await rig.client.post(rig.phone.link("appointment_booked", "decline_visit"))
    assert resp.status == 200, await resp.text()
    assert await rig.state(case_id) == "dismissed"
    visit = await rig.store.get_appointment(booked["appointment_id"])
    assert visit is not None
    assert visit.state == "cancelled"
    await rig.pushed()
    assert rig.phone.got[-1].data["kind"] == "visit_cancelled"


@pytest.mark.parametrize(
    ("action", "stars", "nothing_wrong", "state"),
    [
        ("rate_good", 5, False, "resolved"),
        ("rate_bad", 2, False, "escalated"),
        ("nothing_wrong", 3, True, "escalated"),
    ],
)
async def test_a_rating_from_its_button(
    rig: Rig, action: str, stars: int, nothing_wrong: bool, state: str
) -> None:
    case_id = await rig.open("w-ann", "firmware_bug")
    assert await rig.state(case_id) == "verifying"
    rig.health.points["w-ann"] = [
        HealthPoint(T0 + timedelta(minutes=m), 0.05) for m in range(0, 40)
    ]
    rig.clock.now += timedelta(seconds=1)
    await rig.loop.tick()
    await rig.pushed()
    assert await rig.state(case_id) == "resolved"
    resp = await rig.client.post(rig.phone.link("rating_request", action))
    assert resp.status == 201, await resp.text()
    rated = await resp.json()
    assert (rated["stars"], rated["nothing_wrong"]) == (stars, nothing_wrong)
    rating = await rig.store.get_rating(case_id)
    assert rating is not None
    assert (rating.stars, rating.nothing_wrong) == (stars, nothing_wrong)
    assert await rig.state(case_id) == state


async def test_a_link_works_for_its_own_case_and_action_only(rig: Rig) -> None:
    one = await rig.open("w-cem", "firmware_bug")
    link = urlsplit(rig.phone.link("consent_request", "accept_fix"))
    token = parse_qs(link.query)["token"][0]
    other_action = f"{link.path}?{urlencode({'action': 'decline_fix', 'token': token})}"
    other_case = link.path.replace(one, "c-else")
    for url in (other_action, f"{other_case}?{link.query}"):
        resp = await rig.client.post(url)
        assert resp.status == 403, url
        assert (await resp.json())["error"]["code"] == "invalid_link"
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    resp = await rig.client.post(
        f"{link.path}?{urlencode({'action': 'accept_fix', 'token': tampered})}"
    )
    assert resp.status == 403
    assert await rig.state(one) == "awaiting_consent"
    # past its expiry the genuine link no longer works, and says so
    rig.clock.now = T0 + timedelta(days=3, seconds=1)
    resp = await rig.client.post(f"{link.path}?{link.query}")
    assert resp.status == 410
    assert (await resp.json())["error"]["code"] == "link_expired"
    page = await rig.client.post(f"{link.path}?{link.query}", headers={"Accept": "text/html"})
    assert page.status == 410
    assert "expired" in await page.text()
    assert await rig.state(one) == "awaiting_consent"
