"""Notifiers side by side on one case store: leases, due timers, keyed and claimed messages.

Every test runs on SQLite and on a real PostgreSQL (``pg_url``). Two or three store
objects on one database stand for notifier instances, each with its own connections.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import ManualClock
from test_case_store import make_case, make_owner
from test_owner_loop import T0 as LOOP_T0
from test_owner_loop import Commander, Health, Told, diagnosis

from notifier.errors import ConflictError
from notifier.loop import LoopConfig, OwnerLoop
from notifier.model import DeviceRecord, Notification, Owner
from notifier.postgres import PostgresStore
from notifier.rows import case_row
from notifier.sqlite import MIGRATIONS, SqliteStore
from notifier.store import CaseTimer, NewMessage
from wire.protocol import Event

Store = SqliteStore | PostgresStore

T0 = datetime(2025, 3, 10, 8, 30, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "cases.db")
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


@pytest.fixture
async def stores(open_store: Callable[[], Store]) -> AsyncIterator[list[Store]]:
    """Three stores on one database, one per notifier instance."""
    opened = [await open_store().open() for _ in range(3)]
    try:
        yield opened
    finally:
        for one in opened:
            await one.close()


async def test_a_lease_is_held_by_one_holder_until_it_expires(stores: list[Store]) -> None:
    a, b, c = stores
    assert await a.take_lease("dev-1/fan", "a", now=at(0), until=at(30))
    # another holder cannot take it while it runs; its holder extends it
    assert not await b.take_lease("dev-1/fan", "b", now=at(10), until=at(40))
    assert await a.take_lease("dev-1/fan", "a", now=at(20), until=at(50))
    assert not await c.take_lease("dev-1/fan", "c", now=at(45), until=at(75))
    # the holder died (never let go): once the lease has run out, another takes it
    assert await b.take_lease("dev-1/fan", "b", now=at(51), until=at(81))
    assert not await a.take_lease("dev-1/fan", "a", now=at(52), until=at(82))
    # letting go frees it at once; only the holder can let go (and learns if it ran out)
    assert not await a.drop_lease("dev-1/fan", "a")
    assert not await c.take_lease("dev-1/fan", "c", now=at(53), until=at(83))
    assert await b.drop_lease("dev-1/fan", "b")
    assert await c.take_lease("dev-1/fan", "c", now=at(53), until=at(83))
    # other keys are their own
    assert await a.take_lease("dev-2/fan", "a", now=at(53), until=at(83))


async def test_many_holders_racing_for_one_lease_get_it_once(stores: list[Store]) -> None:
    rounds = 20
    for n in range(rounds):
        key = f"dev-{n}/fan"
        holders = [f"holder-{i}-{j}" for i in range(len(stores)) for j in range(3)]
        won = await asyncio.gather(
            *(
                stores[int(holder.split("-")[1])].take_lease(key, holder, now=at(0), until=at(30))
                for holder in holders
            )
        )
        assert sum(won) == 1, (key, won)


async def test_due_timers_are_taken_once_and_fire_again_if_not_finished(
    stores: list[Store],
) -> None:
    a, b, c = stores
    for n in range(30):
        await a.set_timer(CaseTimer(f"case-{n:02}", "verify", at(n)))
    await a.set_timer(CaseTimer("case-later", "retry", at(500)))
    # replace=False keeps a timer that is set
    await a.set_timer(CaseTimer("case-later", "verify", at(1)), replace=False)
    assert await a.get_timer("case-later") == CaseTimer("case-later", "retry", at(500))

    # three instances take at the same moment: every due timer goes to exactly one
    taken = await asyncio.gather(
        *(s.take_timers(now=at(100), hold_until=at(160), limit=7) for s in (a, b, c) for _ in "xy")
    )
    ids = [timer.case_id for batch in taken for timer in batch]
    assert len(ids) == len(set(ids)) == 30
    assert all(timer.due == at(160) for batch in taken for timer in batch)
    assert await a.take_timers(now=at(100), hold_until=at(160), limit=100) == []

    # finished timers go; one set again meanwhile (a new check) stays; one whose holder
    # died comes back when its hold runs out
    batch = [timer for group in taken for timer in group]
    finished, again, dead = batch[:20], batch[20], batch[21:]
    for timer in finished:
        assert await b.finish_timer(timer)
    await c.set_timer(CaseTimer(again.case_id, "verify", at(170)))
    assert not await b.finish_timer(again)
    back = await c.take_timers(now=at(175), hold_until=at(235), limit=100)
    assert sorted(t.case_id for t in back) == sorted([again.case_id, *(t.case_id for t in dead)])
    assert await a.get_timer(finished[0].case_id) is None


async def test_a_timer_set_again_while_its_taker_waits_for_the_case_stays(
    open_store: Callable[[], Store],
) -> None:
    """A notifier that took a case's timer but cannot have the case tries again later.

    Another notifier holds the case (its lease) and sets the case's next timer meanwhile
    (its command was answered: a check is due). The first one gives up waiting and puts
    back only the timer it took: the other's newer timer is the case's next step and
    stays; overwritten, the check would never run and the case would wait for good.
    """
    clock = ManualClock(LOOP_T0)
    refused = Event(
        "w-ann",
        5,
        int(LOOP_T0.timestamp() * 1000),
        "command_result",
        command_id="x",
        ok=False,
        detail="refused: door open",
    )
    commander = Commander(script={"cleaning_cycle": [refused]})
    config = LoopConfig(retry_after_s=120, tick_s=0.01, lease_s=1.0, firmware={"washer": "2.4.0"})
    async with open_store() as store:
        await store.put_owner(Owner("ann", "Ann", consent="fix_and_tell"))
        await store.put_device(DeviceRecord("w-ann", "ann", "washer", "2.3.1"))
        async with OwnerLoop(
            store, commander, Health(), Told(), config=config, clock=clock, holder="mine"
        ) as loop:
            case = await loop.handle_diagnosis(
                diagnosis("w-ann", "washer", "drain_clog", ttf_days=10, source="model")
            )
            assert case is not None
            async with asyncio.timeout(10):
                while loop.commands_running:  # noqa: ASYNC110 - polls the loop's own count
                    await asyncio.sleep(0.001)
            retry = await store.get_timer(case.case_id)
            assert retry is not None
            assert retry.what == "retry"
            # another notifier holds the case
            key = f"{case.device_id}/{case.fault}"
            assert await store.take_lease(
                key, "other", now=clock(), until=clock() + timedelta(hours=1)
            )
            clock.advance(121)
            hold = clock() + timedelta(seconds=config.lease_s)
            tick = asyncio.create_task(loop.tick())
            async with asyncio.timeout(10):
                while (await store.get_timer(case.case_id)) != replace(retry, due=hold):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            # taken; the taker waits for the case (lease_s + 5 s) while the holder sets
            # the case's next timer
            assert not tick.done()
            check = CaseTimer(case.case_id, "verify", clock() + timedelta(seconds=30))
            await store.set_timer(check)
            await tick
            assert loop.lease_waits >= 1
            assert await store.get_timer(case.case_id) == check


def note(notification_id: str, *, minutes: float = 0, status: str = "queued") -> Notification:
    return Notification(
        notification_id=notification_id,
        owner_id="owner-1",
        case_id="case-1",
        kind="consent_request",
        title="t",
        body="b",
        actions=(("accept", "Yes"),),
        created_at=T0 + timedelta(minutes=minutes),
        status=status,  # type: ignore[arg-type]
    )


async def test_an_owner_message_is_kept_once_per_key(stores: list[Store]) -> None:
    a, b, c = stores
    await a.put_owner(make_owner(max_per_day=50))
    await a.add_case(make_case())
    kept = await asyncio.gather(
        *(
            store.add_message(
                note(f"n-{i}"), key="case-1/consent_request/1", holder=f"h{i}", claim_until=at(60)
            )
            for i, store in enumerate((a, b, c, a, b, c))
        )
    )
    assert sum(1 for k in kept if k is not None) == 1
    assert len(await a.notifications("owner-1")) == 1


async def test_the_daily_limit_is_counted_in_the_store_across_instances(
    stores: list[Store],
) -> None:
    a, b, c = stores
    await a.put_owner(make_owner(max_per_day=4))
    await a.add_case(make_case())
    kept = await asyncio.gather(
        *(
            store.add_message(
                note(f"n-{i:02}", minutes=i / 60),
                key=f"k-{i}",
                holder="h",
                claim_until=at(60),
                max_per_day=4,
                since=T0 - timedelta(days=1),
            )
            for i, store in enumerate((a, b, c) * 4)
        )
    )
    statuses = sorted(k.status for k in kept if k is not None)
    assert statuses == ["held"] * 8 + ["queued"] * 4
    stored = await a.notifications("owner-1")
    assert sorted(n.status for n in stored) == statuses


async def test_queued_messages_are_claimed_by_one_sweep(stores: list[Store]) -> None:
    a, b, c = stores
    await a.put_owner(make_owner(max_per_day=100))
    await a.add_case(make_case())
    for i in range(40):
        await a.add_notification(note(f"n-{i:02}", minutes=i / 60))
    swept = await asyncio.gather(
        *(
            s.claim_queued(s_name, now=at(3600), until=at(3900), before=at(3600), limit=9)
            for s, s_name in ((a, "a"), (b, "b"), (c, "c"), (a, "a"), (b, "b"), (c, "c"))
        )
    )
    ids = [n.notification_id for batch in swept for n in batch]
    assert len(ids) == len(set(ids)) == 40
    # a claimed message is delivered by its holder only, until the claim runs out
    first = swept[0][0].notification_id
    assert await a.claim_notification(first, "a", now=at(3700), until=at(4000))
    assert not await b.claim_notification(first, "b", now=at(3700), until=at(4000))
    assert await b.claim_notification(first, "b", now=at(4001), until=at(4300))
    assert await c.claim_queued("c", now=at(3700), until=at(4000), before=at(3700), limit=99) == []
    # a message delivered (no longer queued) is not claimed again
    delivered = next(n for batch in swept for n in batch if n.notification_id == first)
    await b.add_notification(Notification(**{**_fields(delivered), "status": "sent"}))
    assert not await c.claim_notification(first, "c", now=at(9999), until=at(10_300))
    back = await c.claim_queued("c", now=at(9999), until=at(10_300), before=at(9999), limit=99)
    assert len(back) == 39
    assert await a.held_owners() == []


def _fields(notification: Notification) -> dict[str, object]:
    return {name: getattr(notification, name) for name in Notification.__dataclass_fields__}


async def test_cases_waiting_on_a_timer_get_one_when_a_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (6)")
    for step in MIGRATIONS[:6]:
        for statement in step:
            conn.execute(statement)
    for case in (
        make_case("c-verify", state="verifying", device_id="d1", updated_at=at(5)),
        make_case("c-fix", state="remote_fix", device_id="d2", updated_at=at(6)),
        make_case("c-booked", state="booked", device_id="d3"),
    ):
        row = case_row(case)
        conn.execute(
            f"INSERT INTO cases ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )
    conn.close()
    async with SqliteStore(path) as store:
        assert await store.get_timer("c-verify") == CaseTimer("c-verify", "verify", at(5))
        assert await store.get_timer("c-fix") == CaseTimer("c-fix", "retry", at(6))
        assert await store.get_timer("c-booked") is None


async def test_a_step_keeps_its_messages_in_its_transaction(stores: list[Store]) -> None:
    a, b, _ = stores
    await a.put_owner(make_owner(max_per_day=1))
    case = make_case(state="opened")
    await a.add_case(case)
    moved = replace(case, state="awaiting_consent", updated_at=at(60))

    def message(n: int) -> NewMessage:
        return NewMessage(
            note(f"n-{n}"),
            key=f"case-1/consent_request/{n}",
            holder="a",
            claim_until=at(90),
            max_per_day=1,
            since=T0 - timedelta(days=1),
        )

    # two instances race for one step: the loser keeps neither the move nor its message
    results = await asyncio.gather(
        a.update_case(moved, expected_state="opened", messages=[message(1)]),
        b.update_case(moved, expected_state="opened", messages=[message(2)]),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ConflictError) for r in results) == 1
    [kept] = next(r for r in results if isinstance(r, list))
    assert kept is not None
    assert kept.status == "queued"
    assert [n.notification_id for n in await a.notifications("owner-1")] == [kept.notification_id]
    # the daily limit is counted in the step too, and a key kept before is not kept again
    again = replace(moved, updated_at=at(61))
    winner = message(int(kept.notification_id.removeprefix("n-")))
    second, repeated = await a.update_case(
        again, expected_state="awaiting_consent", messages=[message(3), winner]
    )
    assert second is not None
    assert second.status == "held"
    assert repeated is None
    assert len(await a.notifications("owner-1")) == 2
