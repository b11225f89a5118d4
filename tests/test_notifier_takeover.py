"""A dead notifier's cases move on: two case machines on one store, step by step.

Each test runs on SQLite and on a real PostgreSQL. Notifier ``a`` takes part in a case
and then dies without letting go of anything; notifier ``b``, on the same store with its
own connections, carries the case on once what ``a`` held has run out, and not before.
The wall clock is a manual one, moved by the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ManualClock
from test_owner_loop import T0, Commander, Health, Told, diagnosis

from notifier.loop import LoopConfig, OwnerLoop
from notifier.model import DeviceRecord, Owner
from notifier.outbox import Outbox
from notifier.postgres import PostgresStore
from notifier.sqlite import SqliteStore
from wire.protocol import Event

Store = SqliteStore | PostgresStore
CONFIG = LoopConfig(
    command_timeout_s=30,
    retry_after_s=120,
    lease_s=20,
    tick_s=0.01,
    settle_s=60,
    firmware={"washer": "2.4.0"},
)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "cases.db")
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


@pytest.fixture
async def stores(open_store: Callable[[], Store]) -> AsyncIterator[tuple[Store, Store]]:
    a, b = await open_store().open(), await open_store().open()
    try:
        await a.put_owner(Owner("ann", "Ann", consent="fix_and_tell", quiet_start=None))
        await a.put_device(DeviceRecord("w-ann", "ann", "washer", "2.3.1"))
        yield a, b
    finally:
        await a.close()
        await b.close()


class Silent(Commander):
    """A device that never answers: the command waits until its notifier dies."""

    async def send(self, device_id: str, action: str, *_: object, **__: object) -> Event:
        self.sent.append((device_id, action, {}))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_fix_whose_notifier_died_is_sent_again_by_another(
    stores: tuple[Store, Store],
) -> None:
    store_a, store_b = stores
    clock = ManualClock(T0)
    silent, answering = Silent(), Commander()
    told_a, told_b = Outbox(store_a, None, clock=clock), Outbox(store_b, None, clock=clock)
    a = OwnerLoop(store_a, silent, Health(), told_a, config=CONFIG, clock=clock, holder="a")
    b = OwnerLoop(store_b, answering, Health(), told_b, config=CONFIG, clock=clock, holder="b")
    async with b:
        async with a:
            case = await a.handle_diagnosis(diagnosis("w-ann", "washer", "firmware_bug"))
            assert case is not None
            assert case.state == "remote_fix"
            async with asyncio.timeout(10):
                while not silent.sent:  # noqa: ASYNC110 - polls the device's own list
                    await asyncio.sleep(0.005)
            assert [action for _, action, _ in silent.sent] == ["firmware_update"]
        # a is gone (its command never answered); its timer waits for the answer's time
        timer = await store_b.get_timer(case.case_id)
        assert timer is not None
        assert timer.what == "retry"
        clock.advance(CONFIG.command_timeout_s)
        await b.tick()
        assert answering.sent == []  # not before the answer is overdue
        clock.advance(CONFIG.lease_s + 1)
        await b.tick()
        async with asyncio.timeout(10):
            while b.commands_running:  # noqa: ASYNC110 - polls the loop's own count
                await asyncio.sleep(0.005)
        assert [action for _, action, _ in answering.sent] == ["firmware_update"]
        moved = await store_b.get_case(case.case_id)
        assert moved is not None
        assert moved.state == "verifying"
        timer = await store_b.get_timer(case.case_id)
        assert timer is not None
        assert timer.what == "verify"


async def test_a_case_held_by_a_dead_notifier_moves_on_when_its_lease_runs_out(
    stores: tuple[Store, Store],
) -> None:
    store_a, store_b = stores
    clock = ManualClock(T0)
    told = Told()
    b = OwnerLoop(store_b, Commander(), Health(), told, config=CONFIG, clock=clock, holder="b")
    # a took the case's lease and died mid-step
    lease_until = T0 + timedelta(seconds=CONFIG.lease_s)
    assert await store_a.take_lease("w-ann/firmware_bug", "a", now=T0, until=lease_until)
    async with b:
        step = asyncio.create_task(b.handle_diagnosis(diagnosis("w-ann", "washer", "firmware_bug")))
        await asyncio.sleep(0.3)
        assert not step.done()  # b waits: the case is a's until its lease runs out
        assert await store_b.cases(device_id="w-ann") == []
        clock.advance(CONFIG.lease_s + 1)
        async with asyncio.timeout(10):
            case = await step
        assert case is not None
        assert case.state in ("remote_fix", "verifying")
        assert b.lease_waits == 1
        async with asyncio.timeout(10):
            while b.commands_running:  # noqa: ASYNC110 - polls the loop's own count
                await asyncio.sleep(0.005)
        # b let go of it: another holder may take it at once
        assert await store_a.take_lease(
            "w-ann/firmware_bug", "c", now=clock(), until=clock() + timedelta(seconds=1)
        )


async def test_a_critical_case_warns_its_owner_once_with_its_first_step(
    stores: tuple[Store, Store],
) -> None:
    store, _ = stores
    await store.put_device(DeviceRecord("f-ann", "ann", "fridge", "2.3.1"))
    clock = ManualClock(T0)
    outbox = Outbox(store, None, clock=clock)
    loop = OwnerLoop(store, Commander(), Health(), outbox, config=CONFIG, clock=clock)
    async with loop:
        case = await loop.handle_diagnosis(diagnosis("f-ann", "fridge", "refrigerant_leak"))
    assert case is not None
    assert case.urgency == "critical"
    kept = [n for n in await store.notifications("ann") if n.case_id == case.case_id]
    assert sorted(n.kind for n in kept) == ["not_fixed_escalated", "urgent_safety"]
    [warning] = [n for n in kept if n.kind == "urgent_safety"]
    # kept in the first step's transaction, under a key of the case alone: a first step
    # made again would not warn twice
    trail = await store.audit(case.case_id)
    first_step = next(
        i for i, e in enumerate(trail) if e.action == "transition" and e.from_state == "opened"
    )
    assert trail[first_step + 1].action == "notify", [(e.action, e.at, e.evidence) for e in trail]
    assert trail[first_step + 1].evidence["kind"] == "urgent_safety"
    again = await store.add_message(
        replace(warning, notification_id="again"),
        key=f"{case.case_id}/urgent_safety",
        holder="x",
        claim_until=T0,
    )
    assert again is None
