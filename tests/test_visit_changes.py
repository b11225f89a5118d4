"""An owner moves or cancels a booked visit: the case machine on a real SQLite store, and
the owner and technician routes of the API in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ManualClock

from diagnostics import CATALOG, Diagnosis, TimeToFailure
from notifier.actions import HealthPoint
from notifier.api import API_PREFIX, create_api
from notifier.errors import ConflictError
from notifier.loop import LoopConfig, Notice, OwnerLoop
from notifier.messages import plain_history
from notifier.model import Appointment, Case, DeviceRecord, Owner, Technician, Window
from notifier.sqlite import SqliteStore
from wire.protocol import Event

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # a Monday
WEEKDAYS = tuple(Window(d, time(8), time(17)) for d in range(5))
ANN, BOB, TINA, TOM = "tok-ann-0123456789", "tok-bob-0123456789", "tok-tina-012345", "tok-tom-0123"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


class Device:
    async def send(
        self,
        device_id: str,
        action: str,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        return Event(device_id, 1, int(T0.timestamp() * 1000), "command_result", ok=True)


class Health:
    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        return {}

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        return []


@dataclass
class Told:
    notices: list[tuple[str, Notice]] = field(default_factory=list)

    async def notify(self, owner: Owner, case: Case, notice: Notice) -> None:
        self.notices.append((case.case_id, notice))

    def last(self, case_id: str) -> Notice:
        return [n for c, n in self.notices if c == case_id][-1]

    def kinds(self, case_id: str) -> list[str]:
        return [n.kind for c, n in self.notices if c == case_id]


@dataclass
class Rig:
    loop: OwnerLoop
    store: SqliteStore
    told: Told
    clock: ManualClock
    client: Client

    async def open(self, device_id: str, *, ttf_days: float | None = None) -> Case:
        """A worn drum bearing: no remote remedy, so a visit is offered at once."""
        ttf = (
            None
            if ttf_days is None
            else TimeToFailure(ttf_days * 43_200, ttf_days * 86_400, ttf_days * 172_800, 0.4)
        )
        case = await self.loop.handle_diagnosis(
            Diagnosis(
                device_id=device_id,
                model="washer",
                fault="bearing_wear",
                confidence=0.9,
                status="open",
                opened_at=self.clock.now,
                updated_at=self.clock.now,
                score=0.8,
                source="model",
                time_to_failure=ttf,
                remedies=CATALOG["washer"].faults["bearing_wear"].remedies,
                evidence=("vibration",),
            )
        )
        assert case is not None
        assert case.state == "appointment_proposed"
        return case

    async def case(self, case_id: str) -> Case:
        case = await self.store.get_case(case_id)
        assert case is not None
        return case

    async def offer(self, case_id: str) -> Appointment:
        case = await self.case(case_id)
        offer = await self.store.get_appointment(case.appointment_id or "")
        assert offer is not None
        assert offer.state == "proposed"
        return offer

    async def booked(self) -> list[Appointment]:
        return await self.store.appointments(technician_id="tina", states=["booked"])

    async def visits(self, token: str) -> list[dict[str, Any]]:
        resp = await self.client.get(
            f"{API_PREFIX}/technician/visits",
            params={"from": "2026-12-01T00:00:00Z", "to": "2026-12-30T00:00:00Z"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 200, await resp.text()
        visits: list[dict[str, Any]] = (await resp.json())["visits"]
        return visits

    async def answer(self, token: str, case_id: str, body: dict[str, Any]) -> Any:
        return await self.client.post(
            f"{API_PREFIX}/cases/{case_id}/appointment",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )


def _no_overlaps(visits: Sequence[Appointment]) -> bool:
    spans = sorted((v.start, v.end) for v in visits if v.start is not None and v.end is not None)
    return all(first[1] <= second[0] for first, second in itertools.pairwise(spans))


@pytest.fixture
async def rig(aiohttp_client: ClientFactory, tmp_path: Path) -> AsyncIterator[Rig]:
    clock, told = ManualClock(T0), Told()
    async with SqliteStore(tmp_path / "cases.sqlite3") as store:
        for owner in (
            Owner("ann", "Ann"),
            Owner("bob", "Bob", language="de", timezone="Europe/Berlin"),
            Owner("cem", "Cem", language="fr", timezone="Europe/Paris"),
        ):
            await store.put_owner(owner)
        await store.put_device(DeviceRecord("w-ann", "ann", "washer", "2.3.1"))
        await store.put_device(DeviceRecord("w-bob", "bob", "washer", "2.3.1"))
        await store.put_device(DeviceRecord("w-cem", "cem", "washer", "2.3.1"))
        for technician_id in ("tina", "tom"):
            await store.put_technician(
                Technician(
                    technician_id,
                    technician_id.title(),
                    "default" if technician_id == "tina" else "elsewhere",
                    frozenset({"bearing"}),
                    hours=WEEKDAYS,
                )
            )
        await store.add_token(ANN, ("owner", "ann"))
        await store.add_token(BOB, ("owner", "bob"))
        await store.add_token(TINA, ("technician", "tina"))
        await store.add_token(TOM, ("technician", "tom"))
        config = LoopConfig(tick_s=0.01, max_reschedules=2)
        async with OwnerLoop(store, Device(), Health(), told, config=config, clock=clock) as loop:
            app = create_api(store=store, actions=loop, health=Health(), clock=clock)
            client = await aiohttp_client(app)
            yield Rig(loop, store, told, clock, client)


# -- moving a booked visit ---------------------------------------------------------------


async def test_moving_a_booked_visit_frees_its_time_and_offers_new_ones(rig: Rig) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    assert booked.start is not None
    offer = await rig.loop.request_other_slots("ann", case.case_id)
    assert offer.state == "proposed"
    assert offer.offered
    # the planner's usual rules: Tina's working hours, after the lead time, not the old time
    for slot in offer.offered:
        assert slot.technician_id == "tina"
        assert slot.start.weekday() < 5
        assert time(8) <= slot.start.time()
        assert slot.end.time() <= time(17)
        assert slot.start >= T0 + timedelta(hours=12)
        assert booked.end is not None
        assert slot.end <= booked.start or booked.end <= slot.start
    old = await rig.store.get_appointment(booked.appointment_id)
    assert old is not None
    assert old.state == "cancelled"
    assert await rig.booked() == []  # Tina's time is free again
    case = await rig.case(case.case_id)
    assert (case.state, case.appointment_id) == ("appointment_proposed", offer.appointment_id)
    # the owner is told, with the old time and the new ones
    notice = rig.told.last(case.case_id)
    assert notice.kind == "visit_moving"
    assert notice.appointment is not None
    assert notice.appointment.start == booked.start
    assert notice.slots == offer.offered
    # the audit trail says what happened and why
    trail = await rig.store.audit(case.case_id)
    moved = next(e for e in trail if e.action == "visit_moved")
    assert moved.actor == "owner"
    assert moved.evidence["appointment_id"] == booked.appointment_id
    assert moved.evidence["moves"] == 1
    move = next(e for e in trail if e.from_state == "booked")
    assert (move.to_state, move.actor) == ("appointment_proposed", "owner")
    assert "move the visit" in move.reason
    # and a new time is booked as usual
    again = await rig.loop.choose_slot("ann", case.case_id, 0)
    assert again.start == offer.offered[0].start
    assert [a.appointment_id for a in await rig.booked()] == [again.appointment_id]
    assert (await rig.case(case.case_id)).state == "booked"


async def test_the_owners_history_tells_the_move_in_plain_words(rig: Rig) -> None:
    case = await rig.open("w-bob")
    await rig.loop.choose_slot("bob", case.case_id, 0)
    await rig.loop.request_other_slots("bob", case.case_id)
    trail = await rig.store.audit(case.case_id)
    lines = plain_history(
        [(e.at, e.action, e.from_state, e.to_state) for e in trail], "de", "Europe/Berlin"
    )
    assert any("verschieben" in line for line in lines), lines


async def test_a_freed_time_can_be_booked_by_another_case(rig: Rig) -> None:
    ann = await rig.open("w-ann")
    bob = await rig.open("w-bob")
    assert (await rig.offer(ann.case_id)).offered[0] == (await rig.offer(bob.case_id)).offered[0]
    first = await rig.loop.choose_slot("ann", ann.case_id, 0)
    await rig.loop.request_other_slots("ann", ann.case_id)
    # Bob's offer still holds the time Ann has just given up, and he gets it
    taken = await rig.loop.choose_slot("bob", bob.case_id, 0)
    assert (taken.start, taken.end) == (first.start, first.end)
    assert [a.case_id for a in await rig.booked()] == [bob.case_id]
    # Ann is not offered it back
    again = await rig.offer(ann.case_id)
    assert first.start not in [s.start for s in again.offered]


async def _after(steps: int, request: Awaitable[Appointment]) -> Appointment:
    """Make ``request`` after ``steps`` turns of the event loop (to vary the interleaving)."""
    for _ in range(steps):
        await asyncio.sleep(0)
    return await request


@pytest.mark.parametrize("steps", [0, 3, 30, 100, 150, 200, 300, 1000])
async def test_a_move_and_other_bookings_of_the_same_time_never_double_book(
    rig: Rig, steps: int
) -> None:
    ann, bob, cem = await rig.open("w-ann"), await rig.open("w-bob"), await rig.open("w-cem")
    first = (await rig.offer(ann.case_id)).offered[0]
    for other in (bob, cem):
        assert (await rig.offer(other.case_id)).offered[0] == first
    held = await rig.loop.choose_slot("ann", ann.case_id, 0)
    # Ann moves her visit while Bob and Cem, whose offers still hold its time, both book it
    moved, *took = await asyncio.gather(
        rig.loop.request_other_slots("ann", ann.case_id),
        _after(steps, rig.loop.choose_slot("bob", bob.case_id, 0)),
        _after(steps, rig.loop.choose_slot("cem", cem.case_id, 0)),
        return_exceptions=True,
    )
    assert isinstance(moved, Appointment), moved
    assert all(isinstance(t, Appointment | ConflictError) for t in took), took
    winners = [t for t in took if isinstance(t, Appointment)]
    assert len(winners) <= 1, took
    for winner in winners:  # came after the release and got the time
        assert (winner.start, winner.end) == (held.start, held.end)
    for loser, case in zip(took, (bob, cem), strict=True):
        if isinstance(loser, ConflictError):  # found the time held; has new times instead
            assert (await rig.case(case.case_id)).state == "appointment_proposed"
    booked = await rig.booked()
    assert _no_overlaps(booked)
    # whatever each was offered meanwhile, booking it never double-books either
    for owner_id, case in (("ann", ann), ("bob", bob), ("cem", cem)):
        if (await rig.case(case.case_id)).state == "appointment_proposed":
            with contextlib.suppress(ConflictError):
                await rig.loop.choose_slot(owner_id, case.case_id, 0)
    assert _no_overlaps(await rig.booked())


async def test_after_the_limit_of_moves_a_person_takes_over(rig: Rig) -> None:
    case = await rig.open("w-ann")
    for _ in range(rig.loop.config.max_reschedules):
        await rig.loop.choose_slot("ann", case.case_id, 0)
        await rig.loop.request_other_slots("ann", case.case_id)
    last = await rig.loop.choose_slot("ann", case.case_id, 0)
    with pytest.raises(ConflictError, match="moved 2 times") as refused:
        await rig.loop.request_other_slots("ann", case.case_id)
    assert "call you" in str(refused.value)
    case = await rig.case(case.case_id)
    assert case.state == "escalated"
    assert case.needs_person is not None
    assert "move the visit again" in case.needs_person
    tasks = await rig.store.tasks(state="open", case_id=case.case_id)
    assert [t.reason for t in tasks] == [case.needs_person]
    released = await rig.store.get_appointment(last.appointment_id)
    assert released is not None
    assert released.state == "cancelled"
    assert await rig.booked() == []
    assert rig.told.last(case.case_id).kind == "visit_move_limit"
    assert [e.action for e in await rig.store.audit(case.case_id)].count("visit_moved") == 2


async def test_no_other_free_time_keeps_the_booked_visit(rig: Rig) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    await rig.store.put_technician(
        Technician("tina", "Tina", "default", frozenset({"bearing"}), hours=())
    )
    with pytest.raises(ConflictError, match="stays as booked"):
        await rig.loop.request_other_slots("ann", case.case_id)
    assert (await rig.case(case.case_id)).state == "booked"
    assert [a.appointment_id for a in await rig.booked()] == [booked.appointment_id]


# -- too late ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "words"),
    [("start", "already started"), ("middle", "already started"), ("end", "has passed")],
)
async def test_a_visit_that_started_or_is_past_cannot_be_moved_or_cancelled(
    rig: Rig, when: str, words: str
) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    assert booked.start is not None
    assert booked.end is not None
    rig.clock.now = {
        "start": booked.start,
        "middle": booked.start + (booked.end - booked.start) / 2,
        "end": booked.end,
    }[when]
    for body in ({"other_times": True}, {"decline": True}):
        resp = await rig.answer(ANN, case.case_id, body)
        assert resp.status == 409
        error = (await resp.json())["error"]
        assert error["code"] == "conflict"
        assert words in error["message"]
        assert ("moved" if "other_times" in body else "cancelled") in error["message"]
    assert (await rig.case(case.case_id)).state == "booked"
    assert [a.appointment_id for a in await rig.booked()] == [booked.appointment_id]


async def test_a_completed_visit_cannot_be_moved_or_cancelled(rig: Rig) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    rig.clock.now = booked.end or T0
    await rig.loop.complete_visit("tina", booked.appointment_id, "new bearing")
    for body in ({"other_times": True}, {"decline": True}):
        resp = await rig.answer(ANN, case.case_id, body)
        assert resp.status == 409
        assert "completed" in (await resp.json())["error"]["message"]
    assert (await rig.case(case.case_id)).state == "verifying"


async def test_a_visit_moved_meanwhile_cannot_be_completed(rig: Rig) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    await rig.loop.request_other_slots("ann", case.case_id)
    with pytest.raises(ConflictError, match="cancelled"):
        await rig.loop.complete_visit("tina", booked.appointment_id)
    assert (await rig.case(case.case_id)).state == "appointment_proposed"


# -- cancelling a booked visit -------------------------------------------------------------


async def test_cancelling_a_booked_visit_frees_it_and_ends_the_case(rig: Rig) -> None:
    case = await rig.open("w-ann")
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    resp = await rig.answer(ANN, case.case_id, {"decline": True})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "dismissed"  # normal urgency: the owner's choice
    released = await rig.store.get_appointment(booked.appointment_id)
    assert released is not None
    assert released.state == "cancelled"
    assert await rig.booked() == []
    notice = rig.told.last(case.case_id)
    assert notice.kind == "visit_cancelled"
    assert notice.appointment is not None
    assert notice.appointment.start == booked.start
    trail = await rig.store.audit(case.case_id)
    assert [e.actor for e in trail if e.action == "visit_cancelled"] == ["owner"]


async def test_cancelling_an_urgent_visit_hands_the_case_to_a_person(rig: Rig) -> None:
    case = await rig.open("w-bob", ttf_days=5)
    assert case.urgency == "high"
    await rig.loop.choose_slot("bob", case.case_id, 0)
    resp = await rig.answer(BOB, case.case_id, {"decline": True})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["state"] == "escalated"
    assert await rig.booked() == []
    assert [t.case_id for t in await rig.store.tasks(state="open")] == [case.case_id]
    assert rig.told.last(case.case_id).kind == "visit_cancelled_call"


async def test_declining_an_offer_sends_no_cancellation_message(rig: Rig) -> None:
    case = await rig.open("w-ann")
    await rig.loop.decline_visit("ann", case.case_id)
    assert rig.told.kinds(case.case_id) == ["appointment_offer"]


# -- through the REST route, and what the technician sees ---------------------------------


async def test_the_rest_route_moves_a_visit_and_the_technician_sees_the_change(
    rig: Rig,
) -> None:
    case = await rig.open("w-ann")
    resp = await rig.answer(ANN, case.case_id, {"slot": 0})
    assert resp.status == 201, await resp.text()
    first = await resp.json()
    assert [v["appointment_id"] for v in await rig.visits(TINA)] == [first["appointment_id"]]
    resp = await rig.answer(BOB, case.case_id, {"other_times": True})
    assert resp.status == 404  # not Bob's case
    resp = await rig.answer(ANN, case.case_id, {"other_times": True})
    assert resp.status == 200, await resp.text()
    offer = await resp.json()
    assert offer["slots"]
    assert first["start"] not in [s["start"] for s in offer["slots"]]
    assert await rig.visits(TINA) == []  # the released visit is gone from Tina's list
    resp = await rig.answer(ANN, case.case_id, {"slot": 1})
    assert resp.status == 201, await resp.text()
    second = await resp.json()
    assert second["start"] == offer["slots"][1]["start"]
    visits = await rig.visits(TINA)
    assert [(v["appointment_id"], v["state"]) for v in visits] == [
        (second["appointment_id"], "booked")
    ]
    assert await rig.visits(TOM) == []


async def test_the_openapi_document_tells_what_a_booked_visit_allows(rig: Rig) -> None:
    resp = await rig.client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    operation = doc["paths"][f"{API_PREFIX}/cases/{{id}}/appointment"]["post"]
    assert "moves" in operation["description"]
    assert "started" in operation["responses"]["409"]["description"]


async def test_a_case_without_a_visit_has_nothing_to_move_or_cancel(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(
        Diagnosis(
            device_id="w-ann",
            model="washer",
            fault="firmware_bug",
            confidence=0.9,
            status="open",
            opened_at=T0,
            updated_at=T0,
            score=0.8,
            source="device",
            time_to_failure=None,
            remedies=CATALOG["washer"].faults["firmware_bug"].remedies,
        )
    )
    assert case is not None
    assert case.state == "awaiting_consent"  # a software update asks Ann first
    for body in ({"other_times": True}, {"decline": True}):
        resp = await rig.answer(ANN, case.case_id, body)
        assert resp.status == 409
        assert "no visit is offered or booked" in (await resp.json())["error"]["message"]
    assert (await rig.case(case.case_id)).state == "awaiting_consent"
