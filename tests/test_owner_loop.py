"""The case machine on a real SQLite store, with a scripted device and stored scores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from conftest import ManualClock

from diagnostics import CATALOG, Diagnosis, TimeToFailure
from notifier.actions import HealthPoint
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.loop import LoopConfig, Notice, OwnerLoop
from notifier.model import TRANSITIONS, Case, DeviceRecord, Owner, Technician, Window
from notifier.sqlite import SqliteStore
from wire.errors import TransientError
from wire.protocol import Event

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # a Monday


@dataclass
class Commander:
    """A device that answers each action from a script (default: done)."""

    script: dict[str, list[Event | Exception]] = field(default_factory=dict)
    sent: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)
    device_time: datetime = T0

    async def send(
        self,
        device_id: str,
        action: str,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        self.sent.append((device_id, action, dict(args or {})))
        answers = self.script.get(action)
        answer: Event | Exception = (
            answers.pop(0)
            if answers
            else Event(
                device_id,
                1,
                int(self.device_time.timestamp() * 1000),
                "command_result",
                ok=True,
                detail="done",
                command_id="x",
            )
        )
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class Health:
    points: dict[str, list[HealthPoint]] = field(default_factory=dict)

    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        return {d: self.points[d][-1] for d in device_ids if self.points.get(d)}

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        return [p for p in self.points.get(device_id, []) if p.at >= start]

    def add(self, device_id: str, start: datetime, minutes: int, score: float) -> None:
        self.points.setdefault(device_id, []).extend(
            HealthPoint(start + timedelta(minutes=m), score) for m in range(minutes)
        )


@dataclass
class Told:
    notices: list[tuple[str, str, Notice]] = field(default_factory=list)

    async def notify(self, owner: Owner, case: Case, notice: Notice) -> None:
        self.notices.append((owner.owner_id, case.case_id, notice))

    def kinds(self, case_id: str | None = None) -> list[str]:
        return [n.kind for _, c, n in self.notices if case_id is None or c == case_id]


def diagnosis(
    device_id: str,
    model: str,
    fault: str,
    *,
    status: str = "open",
    at: datetime = T0,
    ttf_days: float | None = None,
    source: str = "device",
) -> Diagnosis:
    entry = CATALOG[model].faults[fault]
    ttf = (
        None
        if ttf_days is None
        else TimeToFailure(ttf_days * 43_200, ttf_days * 86_400, ttf_days * 172_800, 0.4)
    )
    return Diagnosis(
        device_id=device_id,
        model=model,
        fault=fault,
        confidence=0.9,
        status=status,  # type: ignore[arg-type]
        opened_at=at,
        updated_at=at,
        score=0.8,
        source=source,  # type: ignore[arg-type]
        time_to_failure=ttf,
        remedies=entry.remedies,
        evidence=(f"code at {at.isoformat()}",),
    )


WEEKDAYS = tuple(Window(d, time(8), time(17)) for d in range(5))


@dataclass
class Rig:
    loop: OwnerLoop
    store: SqliteStore
    commander: Commander
    health: Health
    told: Told
    clock: ManualClock

    async def settle(self) -> None:
        """Wait until the remote fixes started so far have their answers."""
        await asyncio.sleep(0)
        async with asyncio.timeout(10):
            while self.loop.commands_running:  # noqa: ASYNC110 - polls the loop's own count
                await asyncio.sleep(0.001)

    async def tick(self) -> None:
        self.clock.advance(1)
        await self.loop.tick()

    async def case(self, case_id: str) -> Case:
        case = await self.store.get_case(case_id)
        assert case is not None
        return case


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = ManualClock(T0)
    commander, health, told = Commander(), Health(), Told()
    async with SqliteStore(":memory:") as store:
        for owner in (
            Owner("ann", "Ann", consent="fix_and_tell"),
            Owner("bob", "Bob", language="de", timezone="Europe/Berlin"),
            Owner("cem", "Cem", consent="always_ask"),
        ):
            await store.put_owner(owner)
        for device_id, owner_id, model in (
            ("w-ann", "ann", "washer"),
            ("f-ann", "ann", "fridge"),
            ("w-bob", "bob", "washer"),
            ("w-cem", "cem", "washer"),
        ):
            await store.put_device(DeviceRecord(device_id, owner_id, model, "2.3.1"))
        await store.put_technician(
            Technician(
                "tina", "Tina", "default", frozenset({"bearing", "drain_pump"}), hours=WEEKDAYS
            )
        )
        config = LoopConfig(
            settle_s=60,
            verify_window_s=1_800,
            retry_after_s=120,
            max_refusals=3,
            verify_timeout_s=3_600,
            tick_s=0.01,
            firmware={"washer": "2.4.0", "fridge": "2.4.0"},
        )
        async with OwnerLoop(store, commander, health, told, config=config, clock=clock) as loop:
            yield Rig(loop, store, commander, health, told, clock)


async def test_firmware_fault_fixed_remotely_verified_told_and_rated(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(diagnosis("w-ann", "washer", "firmware_bug"))
    assert case is not None
    assert case.state == "remote_fix"
    await rig.settle()
    assert rig.commander.sent == [("w-ann", "firmware_update", {"version": "2.4.0"})]
    case = await rig.case(case.case_id)
    assert case.state == "verifying"
    assert case.fix_at == T0
    # scores stay healthy for the window after the settling time
    rig.health.add("w-ann", T0, 40, 0.05)
    await rig.tick()
    case = await rig.case(case.case_id)
    assert case.state == "resolved"
    assert rig.told.kinds(case.case_id) == ["fixed_remotely", "rating_request"]
    rating = await rig.loop.rate("ann", case.case_id, 5)
    assert rating.stars == 5
    assert (await rig.case(case.case_id)).state == "resolved"
    with pytest.raises(ConflictError):
        await rig.loop.rate("ann", case.case_id, 4)
    trail = await rig.store.audit(case.case_id)
    moves = [(e.from_state, e.to_state) for e in trail if e.action == "transition"]
    assert moves == [
        (None, "opened"),
        ("opened", "remote_fix"),
        ("remote_fix", "verifying"),
        ("verifying", "resolved"),
    ]
    assert all(e.reason for e in trail)


async def test_repeated_diagnosis_updates_the_one_open_case(rig: Rig) -> None:
    first = await rig.loop.handle_diagnosis(
        diagnosis("w-bob", "washer", "bearing_wear", ttf_days=20, source="model")
    )
    again = await rig.loop.handle_diagnosis(
        diagnosis("w-bob", "washer", "bearing_wear", status="update", ttf_days=3, source="model")
    )
    assert first is not None
    assert again is not None
    assert again.case_id == first.case_id
    assert len(await rig.store.cases(device_id="w-bob")) == 1
    assert again.urgency == "high"
    assert first.urgency == "normal"


async def test_consent_is_asked_before_an_interrupting_fix(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(diagnosis("w-bob", "washer", "controller_hang"))
    assert case is not None
    assert case.state == "awaiting_consent"
    assert case.pending_action == "restart"
    assert rig.told.kinds(case.case_id) == ["consent_request"]
    assert rig.commander.sent == []
    with pytest.raises(NotFoundError):
        await rig.loop.accept_fix("ann", case.case_id)  # not Ann's washer
    case = await rig.loop.accept_fix("bob", case.case_id)
    assert case.state == "remote_fix"
    await rig.settle()
    assert [a for _, a, _ in rig.commander.sent] == ["restart"]
    with pytest.raises(ConflictError):
        await rig.loop.accept_fix("bob", case.case_id)


async def test_declined_fix_without_a_visit_remedy_ends_the_case(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(diagnosis("w-cem", "washer", "firmware_bug"))
    assert case is not None
    assert case.state == "awaiting_consent"
    case = await rig.loop.decline_fix("cem", case.case_id)
    assert case.state == "dismissed"
    assert rig.commander.sent == []


async def test_interlock_refusal_waits_retries_then_moves_on(rig: Rig) -> None:
    refused = Event(
        "w-ann",
        5,
        int(T0.timestamp() * 1000),
        "command_result",
        command_id="x",
        ok=False,
        detail="refused: door open",
    )
    rig.commander.script["cleaning_cycle"] = [refused, TransientError("no answer"), refused]
    case = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "drain_clog", ttf_days=10, source="model")
    )
    assert case is not None
    await rig.settle()
    assert rig.told.kinds(case.case_id) == ["fix_waiting"]
    assert (await rig.case(case.case_id)).state == "remote_fix"
    for _ in range(2):
        rig.clock.advance(121)
        await rig.tick()
        await rig.settle()
    assert [a for _, a, _ in rig.commander.sent] == ["cleaning_cycle"] * 3
    case = await rig.case(case.case_id)
    # three refusals: no remote remedy is left, a visit is offered
    assert case.state == "appointment_proposed"
    assert rig.told.kinds(case.case_id)[-1] == "appointment_offer"
    refusals = [e for e in await rig.store.audit(case.case_id) if e.action == "command_refused"]
    assert [e.evidence["reason"] for e in refusals] == [
        "refused: door open",
        "no answer",
        "refused: door open",
    ]


async def test_worn_bearing_gets_a_visit_booked_completed_and_verified(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "bearing_wear", ttf_days=6, source="both")
    )
    assert case is not None
    assert case.state == "appointment_proposed"
    assert rig.commander.sent == []  # a self-test cures nothing; no remote remedy
    offer = await rig.store.get_appointment(case.appointment_id or "")
    assert offer is not None
    assert offer.part == "bearing"
    assert offer.offered
    assert all(s.start.weekday() < 5 for s in offer.offered)
    with pytest.raises(NotFoundError):
        await rig.loop.choose_slot("bob", case.case_id, 0)
    with pytest.raises(InvalidRequestError):
        await rig.loop.choose_slot("ann", case.case_id, 99)
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    assert booked.state == "booked"
    assert booked.technician_id == "tina"
    assert (await rig.case(case.case_id)).state == "booked"
    with pytest.raises(NotFoundError):
        await rig.loop.complete_visit("somebody", booked.appointment_id)
    rig.clock.now = booked.end or T0
    rig.health.add("w-ann", rig.clock.now - timedelta(minutes=5), 1, 0.9)
    await rig.loop.complete_visit("tina", booked.appointment_id, "new bearing fitted")
    case = await rig.case(case.case_id)
    assert case.state == "verifying"
    rig.health.add("w-ann", rig.clock.now, 60, 0.04)
    await rig.tick()
    case = await rig.case(case.case_id)
    assert case.state == "resolved"
    assert rig.told.kinds(case.case_id) == [
        "appointment_offer",
        "appointment_booked",
        "visit_done_checking",
        "resolved",
        "rating_request",
    ]


async def test_a_taken_slot_is_refused_and_new_times_offered(rig: Rig) -> None:
    one = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "bearing_wear", ttf_days=6, source="model")
    )
    two = await rig.loop.handle_diagnosis(
        diagnosis("w-bob", "washer", "bearing_wear", ttf_days=6, source="model")
    )
    assert one is not None
    assert two is not None
    offer_one = await rig.store.get_appointment(one.appointment_id or "")
    offer_two = await rig.store.get_appointment(two.appointment_id or "")
    assert offer_one is not None
    assert offer_two is not None
    assert offer_one.offered[0] == offer_two.offered[0]  # both offered the same first slot
    await rig.loop.choose_slot("ann", one.case_id, 0)
    with pytest.raises(ConflictError):
        await rig.loop.choose_slot("bob", two.case_id, 0)
    two = await rig.case(two.case_id)
    assert two.state == "appointment_proposed"
    fresh = await rig.store.get_appointment(two.appointment_id or "")
    assert fresh is not None
    assert offer_one.offered[0] not in fresh.offered
    await rig.loop.choose_slot("bob", two.case_id, 0)
    booked = await rig.store.appointments(technician_id="tina", states=["booked"])
    spans = sorted((a.start, a.end) for a in booked)
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0]


async def test_other_times_and_declining_a_visit(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "bearing_wear", ttf_days=20, source="model")
    )
    assert case is not None
    first = await rig.store.get_appointment(case.appointment_id or "")
    other = await rig.loop.request_other_slots("ann", case.case_id)
    assert first is not None
    assert other.offered
    assert not set(first.offered) & set(other.offered)
    case = await rig.loop.decline_visit("ann", case.case_id)
    assert case.state == "dismissed"  # normal urgency: the owner's choice ends it


async def test_failed_check_after_a_visit_goes_to_a_person(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "bearing_wear", ttf_days=6, source="model")
    )
    assert case is not None
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    rig.clock.now = booked.end or T0
    await rig.loop.complete_visit("tina", booked.appointment_id)
    rig.health.add("w-ann", rig.clock.now, 60, 0.8)
    await rig.tick()
    case = await rig.case(case.case_id)
    assert case.state == "escalated"
    assert case.needs_person
    assert [t.case_id for t in await rig.store.tasks(state="open")] == [case.case_id]
    assert rig.told.kinds(case.case_id)[-1] == "not_fixed_escalated"


async def test_a_case_handed_to_a_person_is_not_opened_again_by_its_diagnosis(rig: Rig) -> None:
    opening = diagnosis("w-ann", "washer", "bearing_wear", ttf_days=6, source="model")
    case = await rig.loop.handle_diagnosis(opening)
    assert case is not None
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    rig.clock.now = booked.end or T0
    await rig.loop.complete_visit("tina", booked.appointment_id)
    rig.health.add("w-ann", rig.clock.now, 60, 0.8)
    await rig.tick()
    assert (await rig.case(case.case_id)).state == "escalated"
    told = len(rig.told.kinds(case.case_id))
    # the device is still diagnosed with the same opening: updates open no second case
    for hours in (1, 2, 3):
        update = replace(opening, status="update", updated_at=T0 + timedelta(hours=hours))
        assert await rig.loop.handle_diagnosis(update) is None
    assert [c.case_id for c in await rig.store.cases(device_id="w-ann")] == [case.case_id]
    assert len(rig.told.kinds(case.case_id)) == told
    assert rig.loop.repeats_of_closed == 3
    # a new opening (a later device time) is a new case
    later = replace(opening, opened_at=T0 + timedelta(days=2), updated_at=T0 + timedelta(days=2))
    again = await rig.loop.handle_diagnosis(later)
    assert again is not None
    assert again.case_id != case.case_id


async def test_failed_remote_check_tries_the_next_remedy(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(diagnosis("w-ann", "washer", "controller_hang"))
    assert case is not None
    await rig.settle()
    rig.health.add("w-ann", T0, 40, 0.9)  # the restart did not help
    await rig.tick()
    await rig.settle()
    assert [a for _, a, _ in rig.commander.sent] == ["restart", "firmware_update"]
    assert (await rig.case(case.case_id)).tried == ("restart", "firmware_update")


async def test_low_rating_comment_or_false_alarm_reach_a_person(rig: Rig) -> None:
    ids = []
    for device_id, model in (("w-ann", "washer"), ("f-ann", "fridge")):
        case = await rig.loop.handle_diagnosis(diagnosis(device_id, model, "firmware_bug"))
        assert case is not None
        ids.append(case.case_id)
    await rig.settle()
    rig.health.add("w-ann", T0, 40, 0.05)
    rig.health.add("f-ann", T0, 40, 0.05)
    await rig.tick()
    await rig.loop.rate("ann", ids[0], 1, "it still beeps")
    await rig.loop.rate("ann", ids[1], 5, nothing_wrong=True)
    for case_id in ids:
        case = await rig.case(case_id)
        assert case.state == "escalated"
        assert case.needs_person
    reasons = sorted(t.reason for t in await rig.store.tasks(state="open"))
    assert "low rating (1 of 5)" in reasons[0]
    assert "comment" in reasons[0]
    assert "nothing was wrong" in reasons[1]
    label = await rig.store.get_rating(ids[1])
    assert label is not None
    assert label.nothing_wrong


async def test_requests_in_the_wrong_state_are_refused(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(diagnosis("w-ann", "washer", "firmware_bug"))
    assert case is not None
    with pytest.raises(ConflictError):
        await rig.loop.rate("ann", case.case_id, 5)  # not resolved yet
    with pytest.raises(ConflictError):
        await rig.loop.choose_slot("ann", case.case_id, 0)
    with pytest.raises(InvalidRequestError):
        await rig.loop.rate("ann", case.case_id, 6)
    for state, targets in TRANSITIONS.items():
        assert state not in ("dismissed", "expired") or not targets


async def test_unowned_devices_open_no_case_and_unanswered_requests_expire(rig: Rig) -> None:
    assert await rig.loop.handle_diagnosis(diagnosis("nobody", "washer", "firmware_bug")) is None
    assert rig.loop.unowned == 1
    case = await rig.loop.handle_diagnosis(diagnosis("w-cem", "washer", "firmware_bug"))
    assert case is not None
    assert case.state == "awaiting_consent"
    rig.clock.advance(rig.loop.config.consent_expiry_s + 1)
    await rig.tick()
    assert (await rig.case(case.case_id)).state == "expired"
    # the same opening, repeated, opens no second case ...
    assert await rig.loop.handle_diagnosis(diagnosis("w-cem", "washer", "firmware_bug")) is None
    # ... but a closed case does not block a new opening of the same fault
    again = await rig.loop.handle_diagnosis(
        diagnosis("w-cem", "washer", "firmware_bug", at=rig.clock.now)
    )
    assert again is not None
    assert again.case_id != case.case_id


async def test_a_campaign_runs_through_the_case_machine(rig: Rig) -> None:
    with pytest.raises(InvalidRequestError):
        await rig.loop.start_campaign(["w-ann"], "technician_visit", "no")
    opened = await rig.loop.start_campaign(
        ["w-ann", "w-bob", "w-ann", "nobody"], "firmware_update", "F07 cluster on 2.3.1"
    )
    assert opened == 2
    await rig.settle()
    # Ann lets fixes run; Bob is asked first (an update interrupts use)
    assert rig.commander.sent == [("w-ann", "firmware_update", {"version": "2.4.0"})]
    bob = await rig.store.cases(device_id="w-bob")
    assert [(c.fault, c.state) for c in bob] == [("campaign_firmware_update", "awaiting_consent")]
    assert await rig.loop.start_campaign(["w-bob"], "firmware_update", "again") == 0


async def test_a_booked_visit_is_reminded_of_once_a_day_before(rig: Rig) -> None:
    case = await rig.loop.handle_diagnosis(
        diagnosis("w-ann", "washer", "bearing_wear", ttf_days=6, source="model")
    )
    assert case is not None
    booked = await rig.loop.choose_slot("ann", case.case_id, 0)
    assert booked.start is not None
    rig.clock.now = booked.start - timedelta(days=1, minutes=5)
    for _ in range(3):
        await rig.tick()
    assert "appointment_reminder" not in rig.told.kinds(case.case_id)  # not yet a day before
    rig.clock.now = booked.start - timedelta(hours=23)
    for _ in range(3):
        rig.clock.advance(120)  # past the reminder check's pace
        await rig.tick()
    assert rig.told.kinds(case.case_id).count("appointment_reminder") == 1
    entries = [e for e in await rig.store.audit(case.case_id) if e.action == "visit_reminder"]
    assert [e.evidence["appointment_id"] for e in entries] == [booked.appointment_id]
    # a restarted case machine reads the trail and does not remind again
    fresh = OwnerLoop(
        rig.store, rig.commander, rig.health, rig.told, config=rig.loop.config, clock=rig.clock
    )
    async with fresh:
        await fresh.tick()
    assert rig.told.kinds(case.case_id).count("appointment_reminder") == 1


async def test_shutdown_does_not_wait_for_a_device_that_never_answers() -> None:
    class Silent(Commander):
        async def send(self, *args: Any, **kwargs: Any) -> Event:
            self.sent.append((args[0], args[1], {}))
            await asyncio.Event().wait()  # the device is away: only the timeout would end it
            raise AssertionError("unreachable")

    commander = Silent()
    async with SqliteStore(":memory:") as store:
        await store.put_owner(Owner("ann", "Ann", consent="fix_and_tell"))
        await store.put_device(DeviceRecord("w-ann", "ann", "washer", "2.3.1"))
        config = LoopConfig(command_timeout_s=3_600, firmware={"washer": "2.4.0"})
        loop = OwnerLoop(store, commander, Health(), Told(), config=config, clock=lambda: T0)
        async with asyncio.timeout(10):
            async with loop:
                case = await loop.handle_diagnosis(diagnosis("w-ann", "washer", "firmware_bug"))
                assert case is not None
                while not commander.sent:  # noqa: ASYNC110 - the fake device has no event
                    await asyncio.sleep(0.001)
        # the case waits for the next start, which takes it up again (as after a crash)
        stored = await store.get_case(case.case_id)
        assert stored is not None
        assert stored.state == "remote_fix"
