"""The case store on SQLite and PostgreSQL: records round trip, the rules, owner rights, migrations.

Every test taking ``store`` (or ``open_store``) runs on both backends; the tests of files,
SQLite's migrations and its worker thread are SQLite's own (PostgreSQL's are in
``test_postgres_store.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields, is_dataclass, replace
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import PostgresDatabases
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import notifier.sqlite.schema
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import (
    OPEN_STATES,
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Notification,
    Owner,
    PushChannel,
    Rating,
    Slot,
    Task,
    Technician,
    Window,
)
from notifier.postgres import PostgresStore
from notifier.registry import NewDevice, ProductLine, claim_key
from notifier.sqlite import ERASED_OWNER, MIGRATIONS, SCHEMA_VERSION, SqliteStore
from notifier.store import CaseStore
from wire.errors import ConfigError, StoreUnavailableError

Store = SqliteStore | PostgresStore
OpenStore = Callable[[], Store]

T0 = datetime(2025, 3, 10, 8, 30, 15, 123456, tzinfo=UTC)
CEST = timezone(timedelta(hours=2))


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def make_owner(owner_id: str = "owner-1", **kw: Any) -> Owner:
    values: dict[str, Any] = {
        "owner_id": owner_id,
        "name": "Ana Müller-O'Brien",
        "language": "de",
        "timezone": "Europe/Berlin",
        "region": "north",
        "consent": "always_ask",
        "quiet_start": time(21, 30),
        "quiet_end": time(6, 45),
        "availability": (Window(0, time(8), time(12)), Window(5, time(9, 15), time(13, 45))),
        "channels": ("webpush", "ntfy"),
        "max_per_day": 5,
    }
    values.update(kw)
    return Owner(**values)


def make_case(case_id: str = "case-1", **kw: Any) -> Case:
    values: dict[str, Any] = {
        "case_id": case_id,
        "device_id": "dev-1",
        "owner_id": "owner-1",
        "model": "hp-200",
        "fault": "fan_bearing",
        "state": "opened",
        "urgency": "high",
        "opened_at": at(0),
        "updated_at": at(1),
    }
    values.update(kw)
    return Case(**values)


def full_case() -> Case:
    return make_case(
        state="remote_fix",
        confidence=0.87,
        failure_at=datetime(2025, 3, 20, 12, 0, tzinfo=CEST),
        remedies=("restart", "technician_visit:bearing"),
        tried=("restart",),
        pending_action="self_test",
        fix_at=at(5),
        appointment_id="appt-9",
        needs_person="owner says nothing was wrong",
        rating=4,
        evidence=("vibration 3.1x baseline", 'quote " and ; semicolon'),
    )


def make_appointment(appointment_id: str = "appt-1", **kw: Any) -> Appointment:
    values: dict[str, Any] = {
        "appointment_id": appointment_id,
        "case_id": "case-1",
        "technician_id": "tech-1",
        "start": at(60),
        "end": at(120),
        "state": "proposed",
    }
    values.update(kw)
    return Appointment(**values)


def datetimes_in(value: Any) -> Iterator[datetime]:
    if isinstance(value, datetime):
        yield value
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from datetimes_in(getattr(value, f.name))
    elif isinstance(value, tuple | list | frozenset):
        for item in value:
            yield from datetimes_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from datetimes_in(item)


def assert_same(got: Any, want: Any) -> None:
    """Field by field: equal values of the same types, every datetime back in UTC."""
    assert got is not None
    assert type(got) is type(want)
    for f in fields(want):
        value, expected = getattr(got, f.name), getattr(want, f.name)
        assert value == expected, f.name
        assert type(value) is type(expected), f.name
    for value in datetimes_in(got):
        assert value.tzinfo is UTC


def file_bytes(path: Path) -> bytes:
    """The database with its write-ahead log and shared-memory index."""
    return b"".join(
        candidate.read_bytes()
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        if candidate.exists()
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cases.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, db_path: Path, request: pytest.FixtureRequest) -> OpenStore:
    """Opens a store on this test's file or database (call it again for a second one)."""
    if backend == "sqlite":
        return lambda: SqliteStore(db_path)
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


@pytest.fixture
def stored_bytes(
    backend: str, db_path: Path, request: pytest.FixtureRequest
) -> Callable[[], bytes]:
    """What the store holds: SQLite's files, or every row of the PostgreSQL database."""
    if backend == "sqlite":
        return lambda: file_bytes(db_path)
    databases: PostgresDatabases = request.getfixturevalue("pg_databases")
    url: str = request.getfixturevalue("pg_url")
    return lambda: databases.dump(url)


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store() as opened:
        yield opened


async def with_case(store: Store, case: Case | None = None) -> Case:
    case = case or make_case()
    await store.add_case(case)
    return case


# -- round trips ------------------------------------------------------------------------------


def public_coroutines(cls: type) -> set[str]:
    """The names of ``cls``'s public coroutine methods, inherited ones included."""
    return {
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    }


async def test_implements_the_case_store_protocol(store: Store) -> None:
    as_protocol: CaseStore = store
    protocol_methods = public_coroutines(CaseStore)
    store_methods = public_coroutines(type(store))
    # Both ways: every protocol method is implemented, and the store has no public
    # coroutine method the protocol leaves out (callers typed on the protocol could not
    # reach it); `open` is the backend's own step, taken before the store is handed out.
    # The filter must see the methods at all, hence the named few.
    assert {"add_case", "take_timers", "postpone_timer"} <= protocol_methods
    assert store_methods - {"open"} == protocol_methods
    assert protocol_methods <= set(dir(as_protocol))
    for name in protocol_methods:
        assert inspect.signature(getattr(type(store), name)) == inspect.signature(
            getattr(CaseStore, name)
        ), name
    for name in protocol_methods:
        assert asyncio.iscoroutinefunction(getattr(store, name)), name


async def test_owner_round_trip_and_replace(store: Store) -> None:
    owner = make_owner()
    await store.put_owner(owner)
    assert_same(await store.get_owner("owner-1"), owner)
    no_quiet = replace(owner, name="Ana", quiet_start=None, quiet_end=None, availability=())
    await store.put_owner(no_quiet)
    assert_same(await store.get_owner("owner-1"), no_quiet)
    with_seconds = replace(owner, quiet_start=time(22, 0, 30))
    await store.put_owner(with_seconds)
    assert_same(await store.get_owner("owner-1"), with_seconds)
    assert await store.get_owner("nobody") is None


async def test_device_round_trip_and_owner_filter(store: Store) -> None:
    full = DeviceRecord("dev-2", "owner-1", "hp-200", firmware="2.4.1", label="cellar", batch="B7")
    bare = DeviceRecord("dev-1", "owner-2", "fr-10")
    await store.put_device(full)
    await store.put_device(bare)
    assert_same(await store.get_device("dev-2"), full)
    assert_same(await store.get_device("dev-1"), bare)
    assert await store.get_device("dev-3") is None
    assert await store.devices("owner-1") == [full]
    assert await store.devices() == [bare, full]
    assert await store.devices("owner-3") == []
    moved = replace(bare, owner_id="owner-1", firmware="1.0")
    await store.put_device(moved)
    assert await store.devices("owner-1") == [moved, full]


async def test_channel_round_trip_order_and_active_filter(store: Store) -> None:
    newer = PushChannel(
        "ch-b",
        "owner-1",
        "webpush",
        "https://push.example/send/abc",
        keys={"p256dh": "BNc...", "auth": "tBH..."},
        created_at=at(10),
        failures=2,
    )
    older = PushChannel("ch-a", "owner-1", "ntfy", "https://ntfy.example/t", created_at=at(-10))
    dead = PushChannel(
        "ch-c",
        "owner-1",
        "fcm",
        "fcm-token",
        active=False,
        created_at=datetime(2025, 1, 1, tzinfo=CEST),
    )
    other = PushChannel(
        "ch-d", "owner-2", "webhook", "https://hook.example/x", keys={"secret": "s"}
    )
    for channel in (newer, older, dead, other):
        await store.put_channel(channel)
    active = await store.channels("owner-1")
    assert [c.channel_id for c in active] == ["ch-a", "ch-b"]
    assert_same(active[1], newer)
    every = await store.channels("owner-1", active_only=False)
    assert [c.channel_id for c in every] == ["ch-c", "ch-a", "ch-b"]
    assert_same(every[0], dead)
    assert_same((await store.channels("owner-2"))[0], other)
    await store.put_channel(replace(newer, active=False, failures=5))
    assert [c.channel_id for c in await store.channels("owner-1")] == ["ch-a"]


async def test_case_round_trip(store: Store) -> None:
    minimal = make_case("case-min", device_id="dev-9")
    full = full_case()
    await store.add_case(minimal)
    await store.add_case(full)
    assert_same(await store.get_case("case-min"), minimal)
    got = await store.get_case("case-1")
    assert_same(got, full)
    assert got is not None
    assert got.failure_at == datetime(2025, 3, 20, 10, 0, tzinfo=UTC)
    assert await store.get_case("case-none") is None


async def test_audit_round_trip_oldest_first(store: Store) -> None:
    await with_case(store)
    later = AuditEntry(
        "case-1",
        at(5),
        "system",
        "transition",
        "restart did not cure it",
        evidence={"score": 0.91, "points": [1, 2.5, None], "nested": {"ok": False}},
        from_state="verifying",
        to_state="appointment_proposed",
    )
    earlier = AuditEntry("case-1", at(1), "owner", "consent", "owner agreed")
    same_instant = AuditEntry("case-1", at(5), "ops", "note", "second at the same time")
    fleet = AuditEntry(None, at(2), "system", "campaign", "firmware 2.4 cluster")
    for entry in (later, earlier, same_instant, fleet):
        await store.add_audit(entry)
    trail = await store.audit("case-1")
    assert len(trail) == 3
    for got, want in zip(trail, (earlier, later, same_instant), strict=True):
        assert_same(got, want)
    assert await store.audit("case-2") == []


async def test_technician_round_trip_and_region_filter(store: Store) -> None:
    north = Technician(
        "tech-2",
        "Bo",
        "north",
        frozenset({"bearing", "refrigerant_circuit"}),
        timezone="Europe/Oslo",
        hours=(Window(1, time(7, 30), time(16)),),
    )
    south = Technician("tech-1", "Cy", "south", frozenset())
    await store.put_technician(north)
    await store.put_technician(south)
    assert_same(await store.get_technician("tech-2"), north)
    assert_same(await store.get_technician("tech-1"), south)
    assert await store.get_technician("tech-3") is None
    assert await store.technicians("north") == [north]
    assert await store.technicians() == [south, north]


async def test_appointment_round_trip(store: Store) -> None:
    await with_case(store)
    proposed = make_appointment(
        technician_id=None,
        start=None,
        end=None,
        part="bearing",
        offered=(
            Slot("tech-1", at(60), at(120), score=0.75),
            Slot("tech-2", datetime(2025, 3, 11, 9, 0, tzinfo=CEST), at(1500), score=-1.0),
        ),
    )
    await store.put_appointment(proposed)
    assert_same(await store.get_appointment("appt-1"), proposed)
    booked = replace(proposed, technician_id="tech-1", start=at(60), end=at(120), note="n/a")
    await store.book(booked)
    assert_same(await store.get_appointment("appt-1"), replace(booked, state="booked"))
    done = replace(booked, state="done", note="swapped the bearing")
    await store.put_appointment(done)
    assert_same(await store.get_appointment("appt-1"), done)
    assert await store.get_appointment("appt-2") is None


async def test_rating_round_trip(store: Store) -> None:
    await with_case(store)
    await with_case(store, make_case("case-2", device_id="dev-2"))
    rated = Rating("case-1", 2, "took two visits, ☹", nothing_wrong=False, at=at(30))
    false_alarm = Rating("case-2", 5, None, nothing_wrong=True, at=at(10).astimezone(CEST))
    await store.add_rating(rated)
    await store.add_rating(false_alarm)
    assert_same(await store.get_rating("case-1"), rated)
    assert_same(await store.get_rating("case-2"), false_alarm)
    assert await store.get_rating("case-3") is None
    assert await store.ratings() == [false_alarm, rated]
    assert await store.ratings(since=at(10)) == [false_alarm, rated]
    assert await store.ratings(since=at(11)) == [rated]


async def test_notification_round_trip_and_filters(store: Store) -> None:
    sent = Notification(
        "n-2",
        "owner-1",
        "case-1",
        "consent",
        "May we restart it?",
        "Your heat pump needs a restart.",
        actions=(("accept", "Yes, go ahead"), ("decline", "Not now")),
        created_at=at(2),
        status="sent",
        channel_id="ch-a",
    )
    held = Notification("n-1", "owner-1", None, "digest", "t", "b", (), at(1), status="held")
    other = Notification("n-3", "owner-2", None, "rate", "t", "b", (), at(0))
    for owner_id in ("owner-1", "owner-2"):
        await store.put_owner(Owner(owner_id, owner_id.title()))
    for notification in (sent, held, other):
        await store.add_notification(notification)
    got = await store.notifications("owner-1")
    assert [n.notification_id for n in got] == ["n-1", "n-2"]
    assert_same(got[1], sent)
    assert_same(got[0], held)
    assert await store.notifications("owner-1", status="held") == [held]
    assert await store.notifications("owner-1", since=at(2)) == [sent]
    assert await store.notifications("owner-1", status="failed") == []
    await store.add_notification(replace(held, status="sent"))
    assert await store.notifications("owner-1", status="held") == []


async def test_task_round_trip_and_filters(store: Store) -> None:
    await with_case(store)
    await with_case(store, make_case("case-2", device_id="dev-2"))
    taken = Task("task-2", "case-1", "rating of 1 star", at(5), state="taken", assignee="ops-kim")
    fresh = Task("task-1", "case-2", "owner says nothing was wrong", at(7))
    first = Task("task-3", "case-1", "visit failed", at(1), state="closed")
    for task in (taken, fresh, first):
        await store.add_task(task)
    assert [t.task_id for t in await store.tasks()] == ["task-3", "task-2", "task-1"]
    assert_same((await store.tasks(state="taken"))[0], taken)
    assert_same((await store.tasks(state="open"))[0], fresh)
    assert [t.task_id for t in await store.tasks(case_id="case-1")] == ["task-3", "task-2"]
    assert await store.tasks(state="open", case_id="case-1") == []
    await store.add_task(replace(fresh, state="closed"))
    assert await store.tasks(state="open") == []


_text = st.text(max_size=30)
_aware = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, CEST, timezone(timedelta(hours=-9, minutes=-30))]),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    text=_text,
    opened=_aware,
    failure=st.none() | _aware,
    confidence=st.floats(allow_nan=False, allow_infinity=False),
    items=st.lists(_text, max_size=4).map(tuple),
    evidence=st.dictionaries(_text, st.none() | st.integers() | _text, max_size=4),
)
def test_any_case_and_audit_entry_round_trips(
    backend: str,
    request: pytest.FixtureRequest,
    text: str,
    opened: datetime,
    failure: datetime | None,
    confidence: float,
    items: tuple[str, ...],
    evidence: dict[str, Any],
) -> None:
    case = make_case(
        case_id=text,
        device_id=text,
        fault=text,
        opened_at=opened,
        updated_at=opened,
        failure_at=failure,
        confidence=confidence,
        remedies=items,
        evidence=items,
        pending_action=text or None,
    )
    entry = AuditEntry(text, opened, "system", text, text, evidence=evidence)

    # PostgreSQL's text has no NUL: such a record is refused (test_postgres_store.py)
    assume(backend == "sqlite" or "\x00" not in text)
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else ""

    async def round_trip() -> tuple[Case | None, list[AuditEntry]]:
        if backend == "sqlite":
            opened: Store = SqliteStore(":memory:")
        else:
            opened = PostgresStore(url, pool_size=1)
        async with opened as memory:
            await memory.add_case(case)
            await memory.add_audit(entry)
            try:
                return await memory.get_case(text), await memory.audit(text)
            finally:
                if isinstance(memory, PostgresStore):
                    await memory._run(lambda conn: conn.execute("TRUNCATE audit, cases CASCADE"))

    got_case, trail = asyncio.run(round_trip())
    assert_same(got_case, case)
    assert len(trail) == 1
    assert_same(trail[0], entry)


# -- filters ----------------------------------------------------------------------------------


async def test_cases_filters_newest_first(store: Store) -> None:
    cases = [
        make_case("c-a", device_id="dev-1", owner_id="o-1", opened_at=at(1), state="resolved"),
        make_case("c-b", device_id="dev-2", owner_id="o-1", opened_at=at(3), state="booked"),
        make_case("c-c", device_id="dev-1", owner_id="o-1", opened_at=at(2), state="opened"),
        make_case("c-d", device_id="dev-3", owner_id="o-2", opened_at=at(4), state="expired"),
    ]
    for case in cases:
        await store.add_case(case)

    async def ids(**kw: Any) -> list[str]:
        return [case.case_id for case in await store.cases(**kw)]

    assert await ids() == ["c-d", "c-b", "c-c", "c-a"]
    assert await ids(owner_id="o-1") == ["c-b", "c-c", "c-a"]
    assert await ids(device_id="dev-1") == ["c-c", "c-a"]
    assert await ids(states=["resolved", "expired"]) == ["c-d", "c-a"]
    assert await ids(states=sorted(OPEN_STATES)) == ["c-b", "c-c"]
    assert await ids(owner_id="o-1", device_id="dev-1", states=["opened"]) == ["c-c"]
    assert await ids(owner_id="o-2", device_id="dev-1") == []
    assert await ids(states=[]) == []
    assert await ids(limit=2) == ["c-d", "c-b"]
    assert await ids(limit=0) == []
    assert (await store.cases(device_id="dev-3"))[0] == cases[3]


async def test_appointments_filters_by_start(store: Store) -> None:
    await with_case(store)
    await with_case(store, make_case("case-2", device_id="dev-2"))
    appointments = [
        make_appointment("a-1", start=at(120), end=at(180), state="booked"),
        make_appointment("a-2", start=at(60), end=at(90), technician_id="tech-2", state="booked"),
        make_appointment("a-3", case_id="case-2", start=at(180), end=at(240), state="cancelled"),
        make_appointment("a-4", case_id="case-2", technician_id=None, start=None, end=None),
        make_appointment("a-5", start=at(240), end=at(300), state="done"),
    ]
    for appointment in appointments:
        if appointment.state == "booked":
            await store.book(appointment)
        else:
            await store.put_appointment(appointment)

    async def ids(**kw: Any) -> list[str]:
        return [a.appointment_id for a in await store.appointments(**kw)]

    assert await ids() == ["a-2", "a-1", "a-3", "a-5", "a-4"]
    assert await ids(technician_id="tech-1") == ["a-1", "a-3", "a-5"]
    assert await ids(case_id="case-2") == ["a-3", "a-4"]
    assert await ids(states=["booked"]) == ["a-2", "a-1"]
    assert await ids(states=["proposed", "done"]) == ["a-5", "a-4"]
    assert await ids(states=[]) == []
    assert await ids(since=at(120)) == ["a-1", "a-3", "a-5"]
    assert await ids(until=at(180)) == ["a-2", "a-1"]
    assert await ids(since=at(60), until=at(120)) == ["a-2"]
    assert await ids(technician_id="tech-1", states=["booked"], since=at(0)) == ["a-1"]
    assert await ids(since=at(120).astimezone(CEST), until=at(121)) == ["a-1"]


# -- the store's rules ------------------------------------------------------------------------


async def test_one_open_case_per_device_and_fault(store: Store) -> None:
    first = await with_case(store)
    with pytest.raises(ConflictError, match="open case"):
        await store.add_case(make_case("case-2", state="awaiting_consent"))
    with pytest.raises(ConflictError, match="exists"):
        await store.add_case(make_case("case-1", device_id="dev-other"))
    # another fault or another device is a case of its own
    await store.add_case(make_case("case-3", fault="door_seal"))
    await store.add_case(make_case("case-4", device_id="dev-2"))
    # a closed case does not block a new one
    assert await store.open_case("dev-1", "fan_bearing") == first
    await store.update_case(replace(first, state="resolved"), expected_state="opened")
    assert await store.open_case("dev-1", "fan_bearing") is None
    second = make_case("case-5", opened_at=at(10))
    await store.add_case(second)
    assert await store.open_case("dev-1", "fan_bearing") == second
    await store.add_case(make_case("case-6", state="expired"))
    # nor may a closed case be moved back while another is open
    await store.update_case(replace(first, state="escalated"), expected_state="resolved")
    with pytest.raises(ConflictError, match="another open case"):
        await store.update_case(replace(first, state="opened"), expected_state="escalated")
    assert (await store.get_case("case-1")) == replace(first, state="escalated")


async def test_open_states_of_the_schema_match_the_model(store: Store, db_path: Path) -> None:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(db_path) as conn:
            (sql,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'cases_one_open'"
            ).fetchone()
        conn.close()
    else:
        sql = await store._run(
            lambda conn: conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'cases_one_open'"
            )
        )
    where = sql.split("WHERE", 1)[1]
    assert set(re.findall(r"'(\w+)'", where)) == OPEN_STATES


async def test_update_case_is_compare_and_set(store: Store) -> None:
    case = await with_case(store)
    moved = replace(case, state="remote_fix", tried=("restart",), updated_at=at(3))
    await store.update_case(moved, expected_state="opened")
    assert await store.get_case("case-1") == moved
    with pytest.raises(ConflictError, match="not in state 'opened'"):
        await store.update_case(replace(case, state="dismissed"), expected_state="opened")
    assert await store.get_case("case-1") == moved
    with pytest.raises(ConflictError):
        await store.update_case(make_case("case-none"), expected_state="opened")
    assert await store.get_case("case-none") is None

    # two writers that read the same state: exactly one wins
    to_verify = replace(moved, state="verifying")
    to_visit = replace(moved, state="appointment_proposed")
    results = await asyncio.gather(
        store.update_case(to_verify, expected_state="remote_fix"),
        store.update_case(to_visit, expected_state="remote_fix"),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ConflictError) for r in results) == 1
    assert results.count([]) == 1  # the winner kept no messages: none were given
    assert (await store.get_case("case-1")) in (to_verify, to_visit)


async def test_a_move_and_its_audit_entry_are_kept_together(store: Store) -> None:
    case = await with_case(store)

    def entry(to_state: str, reason: str) -> AuditEntry:
        return AuditEntry(
            case_id="case-1",
            at=at(4),
            actor="system",
            action="transition",
            reason=reason,
            evidence={"action": "restart"},
            from_state="opened",
            to_state=to_state,
        )

    moved = replace(case, state="remote_fix", updated_at=at(4))
    await store.update_case(moved, expected_state="opened", audit=entry("remote_fix", "first"))
    assert [e.reason for e in await store.audit("case-1")] == ["first"]
    # a move that loses the compare-and-set writes no line in the trail either
    with pytest.raises(ConflictError):
        await store.update_case(
            replace(case, state="dismissed"),
            expected_state="opened",
            audit=entry("dismissed", "lost"),
        )
    # nor does an entry the store refuses leave the case moved
    with pytest.raises(InvalidRequestError):
        await store.update_case(
            replace(moved, state="verifying"),
            expected_state="remote_fix",
            audit=replace(entry("verifying", "bad"), actor=None),  # type: ignore[arg-type]
        )
    assert (await store.get_case("case-1")) == moved
    assert [e.reason for e in await store.audit("case-1")] == ["first"]


async def test_double_booking_refused_adjacent_allowed(store: Store) -> None:
    await with_case(store)
    await store.book(make_appointment("a-1", start=at(60), end=at(120)))
    for start, end in ((90, 150), (30, 61), (70, 80), (0, 500), (60, 120)):
        with pytest.raises(ConflictError, match="tech-1"):
            await store.book(make_appointment("a-x", start=at(start), end=at(end)))
    assert await store.get_appointment("a-x") is None
    # [start, end): a visit may start when the other ends, or end when it starts
    await store.book(make_appointment("a-2", start=at(120), end=at(180)))
    await store.book(make_appointment("a-3", start=at(0), end=at(60)))
    # another technician, or the same slot once the visit is cancelled
    await store.book(make_appointment("a-4", technician_id="tech-2", start=at(60), end=at(120)))
    await store.put_appointment(
        make_appointment("a-1", start=at(60), end=at(120), state="cancelled")
    )
    await store.book(make_appointment("a-5", start=at(90), end=at(110), state="proposed"))
    # moving a booked visit within its own time does not clash with itself
    await store.book(make_appointment("a-5", start=at(95), end=at(115)))
    booked = await store.appointments(technician_id="tech-1", states=["booked"])
    assert [(a.appointment_id, a.state) for a in booked] == [
        ("a-3", "booked"),
        ("a-5", "booked"),
        ("a-2", "booked"),
    ]


async def test_concurrent_bookings_one_wins(store: Store) -> None:
    await with_case(store)
    results = await asyncio.gather(
        store.book(make_appointment("a-1", start=at(60), end=at(120))),
        store.book(make_appointment("a-2", start=at(90), end=at(150))),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ConflictError) for r in results) == 1
    assert results.count(None) == 1
    assert len(await store.appointments(states=["booked"])) == 1


async def test_concurrent_bookings_from_two_connections(open_store: OpenStore) -> None:
    async with open_store() as first, open_store() as second:
        await with_case(first)
        for round_ in range(5):
            start = at(1000 * round_)
            results = await asyncio.gather(
                first.book(
                    make_appointment(f"a-{round_}-1", start=start, end=start + timedelta(hours=1))
                ),
                second.book(
                    make_appointment(
                        f"a-{round_}-2",
                        start=start + timedelta(minutes=30),
                        end=start + timedelta(hours=2),
                    )
                ),
                return_exceptions=True,
            )
            assert sum(isinstance(r, ConflictError) for r in results) == 1, results
            assert results.count(None) == 1
        assert len(await second.appointments(states=["booked"])) == 5


async def test_a_released_visit_frees_its_time_for_another_booking(store: Store) -> None:
    await with_case(store)
    await with_case(store, make_case("case-2", device_id="dev-2"))
    await store.book(make_appointment("a-1", start=at(60), end=at(120)))
    with pytest.raises(ConflictError):
        await store.book(make_appointment("a-2", case_id="case-2", start=at(60), end=at(120)))
    released = await store.release("a-1", now=at(0))
    assert released == make_appointment("a-1", start=at(60), end=at(120), state="cancelled")
    assert_same(await store.get_appointment("a-1"), released)
    await store.book(make_appointment("a-2", case_id="case-2", start=at(60), end=at(120)))
    booked = await store.appointments(technician_id="tech-1", states=["booked"])
    assert [a.appointment_id for a in booked] == ["a-2"]


async def test_a_visit_that_started_is_done_or_gone_is_not_released(store: Store) -> None:
    await with_case(store)
    await store.book(make_appointment("a-1", start=at(60), end=at(120)))
    for now in (at(60), at(90), at(200)):
        with pytest.raises(ConflictError, match="started"):
            await store.release("a-1", now=now)
    await store.book(make_appointment("a-2", start=at(300), end=at(360)))
    await store.put_appointment(make_appointment("a-2", start=at(300), end=at(360), state="done"))
    with pytest.raises(ConflictError, match="done"):
        await store.release("a-2", now=at(0))
    await store.put_appointment(make_appointment("a-3", start=None, end=None))
    with pytest.raises(ConflictError, match="proposed"):
        await store.release("a-3", now=at(0))
    with pytest.raises(NotFoundError):
        await store.release("a-404", now=at(0))
    with pytest.raises(InvalidRequestError):
        await store.release("a-1", now=datetime(2025, 3, 10, 8, 0))  # naive on purpose
    await store.release("a-1", now=at(0))
    with pytest.raises(ConflictError, match="cancelled"):
        await store.release("a-1", now=at(0))  # a release happens once
    states = {a.appointment_id: a.state for a in await store.appointments()}
    assert states == {"a-1": "cancelled", "a-2": "done", "a-3": "proposed"}


async def test_release_and_a_booking_of_the_same_time_never_double_book(
    open_store: OpenStore,
) -> None:
    async with open_store() as first, open_store() as second:
        await with_case(first)
        await with_case(first, make_case("case-2", device_id="dev-2"))
        for round_ in range(6):
            start = at(1000 * (round_ + 1))
            end = start + timedelta(hours=1)
            held = make_appointment(f"h-{round_}", start=start, end=end)
            await first.book(held)
            taker = make_appointment(f"t-{round_}", case_id="case-2", start=start, end=end)
            results = await asyncio.gather(
                first.release(held.appointment_id, now=at(0)),
                second.book(taker),
                return_exceptions=True,
            )
            assert isinstance(results[0], Appointment), results
            # the booking either came first and was refused, or came second and got the time
            assert results[1] is None or isinstance(results[1], ConflictError), results
            booked = await second.appointments(
                technician_id="tech-1", states=["booked"], since=start, until=end
            )
            assert len(booked) == (1 if results[1] is None else 0)
            if results[1] is not None:
                await second.book(taker)  # once released, the time is free
            booked = await second.appointments(
                technician_id="tech-1", states=["booked"], since=start, until=end
            )
            assert [a.appointment_id for a in booked] == [taker.appointment_id]


async def test_booking_needs_technician_start_and_end(store: Store) -> None:
    await with_case(store)
    for bad in (
        make_appointment(technician_id=None),
        make_appointment(start=None),
        make_appointment(end=None),
        make_appointment(start=at(60), end=at(60)),
        make_appointment(start=at(60), end=at(30)),
    ):
        with pytest.raises(InvalidRequestError):
            await store.book(bad)
    with pytest.raises(InvalidRequestError, match="book"):
        await store.put_appointment(make_appointment(state="booked"))
    assert await store.appointments() == []


async def test_records_need_their_case(store: Store) -> None:
    with pytest.raises(NotFoundError, match="case-1"):
        await store.book(make_appointment())
    with pytest.raises(NotFoundError, match="case-1"):
        await store.put_appointment(make_appointment())
    with pytest.raises(NotFoundError, match="case-1"):
        await store.add_rating(Rating("case-1", 3, None, nothing_wrong=False, at=at(0)))
    with pytest.raises(NotFoundError, match="case-1"):
        await store.add_task(Task("t-1", "case-1", "why", at(0)))


async def test_one_rating_per_case(store: Store) -> None:
    await with_case(store)
    first = Rating("case-1", 4, "good", nothing_wrong=False, at=at(10))
    await store.add_rating(first)
    with pytest.raises(ConflictError, match="rated already"):
        await store.add_rating(
            Rating("case-1", 1, "changed my mind", nothing_wrong=True, at=at(11))
        )
    assert await store.get_rating("case-1") == first
    for stars in (0, 6):
        with pytest.raises(InvalidRequestError, match="1 to 5"):
            await store.add_rating(replace(first, case_id="case-1", stars=stars))


async def test_naive_datetimes_refused(store: Store) -> None:
    with pytest.raises(InvalidRequestError, match="naive"):
        await store.add_case(make_case(opened_at=datetime(2025, 1, 1)))
    with pytest.raises(InvalidRequestError, match="naive"):
        await store.appointments(since=datetime(2025, 1, 1))
    assert await store.cases() == []


async def test_evidence_must_be_json(store: Store) -> None:
    with pytest.raises(InvalidRequestError, match="JSON"):
        await store.add_audit(AuditEntry(None, at(0), "system", "x", "y", evidence={"s": {1, 2}}))
    with pytest.raises(InvalidRequestError, match="JSON"):
        await store.add_audit(
            AuditEntry(None, at(0), "system", "x", "y", evidence={"f": float("nan")})
        )


# -- tokens -----------------------------------------------------------------------------------


async def test_tokens_are_kept_hashed(store: Store, stored_bytes: Callable[[], bytes]) -> None:
    owner_token = "tok-owner-Qx7PZr2vLm9"
    tech_token = "tok-tech-Hb4Ns8Wd1Ke"
    await store.add_token(owner_token, ("owner", "owner-1"))
    await store.add_token(tech_token, ("technician", "tech-1"))
    assert await store.resolve_token(owner_token) == ("owner", "owner-1")
    assert await store.resolve_token(tech_token) == ("technician", "tech-1")
    assert await store.resolve_token("tok-owner-Qx7PZr2vLm") is None
    assert await store.resolve_token("") is None
    with pytest.raises(InvalidRequestError):
        await store.add_token("", ("ops", "kim"))
    with pytest.raises(InvalidRequestError):
        await store.add_token("tok", ("root", "kim"))  # type: ignore[arg-type]
    await store.add_token(owner_token, ("ops", "kim"))
    assert await store.resolve_token(owner_token) == ("ops", "kim")

    data = stored_bytes()
    assert hashlib.sha256(owner_token.encode()).hexdigest().encode() in data
    assert owner_token.encode() not in data
    assert tech_token.encode() not in data


# -- identity-provider subjects, one-tap links, channels, the outbox's sweep -------------------


async def test_subject_links(store: Store) -> None:
    await store.put_owner(make_owner("owner-ada"))
    await store.put_owner(make_owner("owner-bob"))
    await store.link_subject("https://idp", "s-1", "owner-ada")
    await store.link_subject("https://idp", "s-1", "owner-ada")  # again: no change
    await store.link_subject("https://other-idp", "s-1", "owner-bob")
    await store.link_subject("https://idp", "s-2", "owner-ada")  # one owner, two subjects
    with pytest.raises(ConflictError):
        await store.link_subject("https://idp", "s-1", "owner-bob")
    with pytest.raises(NotFoundError):
        await store.link_subject("https://idp", "s-9", "owner-nobody")
    with pytest.raises(InvalidRequestError):
        await store.link_subject("", "s-9", "owner-ada")
    assert await store.owner_of_subject("https://idp", "s-1") == "owner-ada"
    assert await store.owner_of_subject("https://other-idp", "s-1") == "owner-bob"
    assert await store.owner_of_subject("https://idp", "s-9") is None
    assert await store.adopt_subject("https://idp", "s-1", make_owner("owner-x")) == "owner-ada"
    assert await store.get_owner("owner-x") is None
    assert await store.subjects_of("owner-ada") == [("https://idp", "s-1"), ("https://idp", "s-2")]
    assert not await store.unlink_subject("https://idp", "s-1", "owner-bob")  # not Bob's
    assert await store.unlink_subject("https://idp", "s-2", "owner-ada")
    assert not await store.unlink_subject("https://idp", "s-2", "owner-ada")  # gone already
    assert await store.owner_of_subject("https://idp", "s-2") is None
    await store.erase_owner("owner-ada")
    assert await store.owner_of_subject("https://idp", "s-1") is None
    assert await store.owner_of_subject("https://other-idp", "s-1") == "owner-bob"


async def test_first_sign_ins_of_one_subject_at_once_make_one_owner(open_store: OpenStore) -> None:
    async with open_store() as first, open_store() as second:
        adopted = await asyncio.gather(
            *(
                (first, second)[i % 2].adopt_subject(
                    "https://idp", "s-new", make_owner(f"owner-new-{i}")
                )
                for i in range(8)
            )
        )
        assert len(set(adopted)) == 1
        owners = [await first.get_owner(f"owner-new-{i}") for i in range(8)]
        assert [owner.owner_id for owner in owners if owner is not None] == [adopted[0]]
        assert await second.subjects_of(adopted[0]) == [("https://idp", "s-new")]


async def test_a_one_tap_link_works_once_until_forgotten(open_store: OpenStore) -> None:
    async with open_store() as first, open_store() as second:
        uses = await asyncio.gather(
            *((first, second)[i % 2].use_link("link-1", at(60), now=at(0)) for i in range(6))
        )
        assert uses.count(True) == 1
        assert not await second.use_link("link-1", at(60), now=at(30))
        # once expired, its use is forgotten on the way (the link itself no longer works)
        assert await first.use_link("link-2", at(200), now=at(61))
        assert await first.use_link("link-1", at(200), now=at(61))


async def test_channel_state_changes_only_the_delivery_state(store: Store) -> None:
    channel = PushChannel("ch-1", "owner-1", "ntfy", "https://ntfy.example/t-1", created_at=at(0))
    assert not await store.update_channel_state("ch-1", active=False, failures=3)
    assert await store.channels("owner-1", active_only=False) == []  # not made by it
    await store.put_channel(channel)
    assert await store.update_channel_state("ch-1", active=False, failures=3)
    assert await store.channels("owner-1") == []
    assert await store.channels("owner-1", active_only=False) == [
        replace(channel, active=False, failures=3)
    ]
    with pytest.raises(InvalidRequestError):
        await store.update_channel_state("ch-1", active=True, failures=-1)


async def test_a_deleted_channel_leaves_no_trace_in_the_trail(store: Store) -> None:
    await store.put_owner(make_owner())
    secret_key = "auth-key-of-the-channel"
    await store.put_channel(
        PushChannel(
            "ch-1",
            "owner-1",
            "webpush",
            "https://push.example/endpoint/abc123",
            keys={"auth": secret_key},
            created_at=at(0),
        )
    )
    await store.add_case(make_case())
    await store.add_audit(
        AuditEntry(
            "case-1",
            at(1),
            "system",
            "notify",
            "told",
            {"to": "https://push.example/endpoint/abc123", "key": secret_key, "n": 1},
        )
    )
    assert not await store.delete_channel("owner-2", "ch-1")  # not theirs
    assert await store.delete_channel("owner-1", "ch-1")
    assert not await store.delete_channel("owner-1", "ch-1")
    assert await store.channels("owner-1", active_only=False) == []
    (entry,) = await store.audit("case-1")
    assert entry.evidence == {"to": "https://push.example/…", "key": "***", "n": 1}


async def test_queued_notifications_of_every_owner_oldest_first(store: Store) -> None:
    for owner_id in ("owner-1", "owner-2"):
        await store.put_owner(make_owner(owner_id))
    made = [
        ("n-4", "owner-2", "queued", 4),
        ("n-1", "owner-1", "queued", 1),
        ("n-2", "owner-1", "sent", 2),
        ("n-3", "owner-2", "queued", 3),
        ("n-9", "owner-1", "queued", 9),
    ]
    for notification_id, owner_id, status, minute in made:
        await store.add_notification(
            Notification(notification_id, owner_id, None, "k", "t", "b", (), at(minute), status)
        )
    found = await store.queued_notifications(before=at(5), limit=10)
    assert [n.notification_id for n in found] == ["n-1", "n-3", "n-4"]
    assert [n.notification_id for n in await store.queued_notifications(before=at(5), limit=2)] == [
        "n-1",
        "n-3",
    ]
    assert await store.queued_notifications(before=at(1), limit=10) == []


# -- owner rights -----------------------------------------------------------------------------

NAME = "Zebulon Quarterfield"
CONTACTS = (
    "https://ntfy.example/zq-private-topic-91",
    "BKzq-p256dh-secret-key",
    "zq-auth-secret",
    "fcm-zq-registration-token-0042",
)
TOKEN = "tok-zq-raw-owner-token-5531"
COMMENT = "zq-comment: the technician was late"
OWNER_ID = "owner-zq-7731"


async def fill_owner(store: Store, owner_id: str = OWNER_ID, name: str = NAME) -> None:
    tag = owner_id[-4:]
    await store.put_owner(make_owner(owner_id, name=name))
    await store.add_token(TOKEN if owner_id == OWNER_ID else f"tok-{tag}", ("owner", owner_id))
    await store.put_device(
        DeviceRecord(f"dev-{tag}", owner_id, "hp-200", label=f"{name}'s heat pump")
    )
    target = CONTACTS[0] if owner_id == OWNER_ID else f"https://ntfy.example/{tag}"
    await store.put_channel(
        PushChannel(
            f"ch-{tag}-1",
            owner_id,
            "webpush",
            target,
            keys={"p256dh": CONTACTS[1], "auth": CONTACTS[2]} if owner_id == OWNER_ID else {},
            created_at=at(0),
        )
    )
    await store.put_channel(
        PushChannel(
            f"ch-{tag}-2",
            owner_id,
            "fcm",
            CONTACTS[3] if owner_id == OWNER_ID else f"fcm-{tag}",
            created_at=at(1),
        )
    )
    case = make_case(f"case-{tag}", device_id=f"dev-{tag}", owner_id=owner_id, state="resolved")
    await store.add_case(case)
    await store.add_audit(
        AuditEntry(case.case_id, at(2), "system", "notify", "told the owner", {"to": target})
    )
    await store.add_audit(
        AuditEntry(
            case.case_id,
            at(3),
            "system",
            "transition",
            "fixed",
            {"score": 0.1},
            "verifying",
            "resolved",
        )
    )
    await store.put_appointment(
        make_appointment(f"appt-{tag}", case_id=case.case_id, state="done", note="bearing swapped")
    )
    comment = COMMENT if owner_id == OWNER_ID else f"fine, says {tag}"
    await store.add_rating(Rating(case.case_id, 2, comment, nothing_wrong=False, at=at(4)))
    await store.add_notification(
        Notification(
            f"n-{tag}",
            owner_id,
            case.case_id,
            "rate",
            "How did we do?",
            f"Hello {name}, rate us",
            (),
            at(4),
        )
    )
    await store.add_task(Task(f"task-{tag}", case.case_id, "low rating", at(5)))


async def test_export_owner(store: Store) -> None:
    await fill_owner(store)
    await fill_owner(store, "owner-other-0001", "Other Person")
    exported = await store.export_owner(OWNER_ID)
    text = json.dumps(exported)
    assert json.loads(text) == exported

    assert exported["owner"]["name"] == NAME
    assert exported["owner"]["quiet_start"] == "21:30"
    assert exported["owner"]["availability"][1] == {"weekday": 5, "start": "09:15", "end": "13:45"}
    assert [d["device_id"] for d in exported["devices"]] == ["dev-7731"]
    assert exported["channels"] == [
        {
            "channel_id": "ch-7731-1",
            "kind": "webpush",
            "target": "https://ntfy.example/…",
            "active": True,
            "created_at": "2025-03-10T08:30:15.123456+00:00",
            "failures": 0,
        },
        {
            "channel_id": "ch-7731-2",
            "kind": "fcm",
            "target": "…0042",
            "active": True,
            "created_at": "2025-03-10T08:31:15.123456+00:00",
            "failures": 0,
        },
    ]
    for secret in (*CONTACTS, TOKEN):
        assert secret not in text
    (case,) = exported["cases"]
    assert case["case_id"] == "case-7731"
    assert case["opened_at"] == "2025-03-10T08:30:15.123456+00:00"
    assert [entry["action"] for entry in case["audit"]] == ["notify", "transition"]
    assert case["audit"][0]["evidence"] == {"to": "https://ntfy.example/…"}
    assert case["audit"][1]["evidence"] == {"score": 0.1}
    assert [a["appointment_id"] for a in exported["appointments"]] == ["appt-7731"]
    assert exported["ratings"] == [
        {
            "case_id": "case-7731",
            "stars": 2,
            "comment": COMMENT,
            "nothing_wrong": False,
            "at": "2025-03-10T08:34:15.123456+00:00",
        }
    ]
    assert [n["body"] for n in exported["notifications"]] == [f"Hello {NAME}, rate us"]
    assert [t["task_id"] for t in exported["tasks"]] == ["task-7731"]
    assert "Other Person" not in text
    assert "0001" not in text

    assert await store.export_owner("nobody") == {
        "owner": None,
        "devices": [],
        "channels": [],
        "cases": [],
        "appointments": [],
        "ratings": [],
        "notifications": [],
        "tasks": [],
    }


async def test_erase_owner_leaves_nothing_in_the_store(
    store: Store, stored_bytes: Callable[[], bytes]
) -> None:
    await fill_owner(store)
    await fill_owner(store, "owner-other-0001", "Other Person")
    personal = [NAME.encode(), OWNER_ID.encode(), COMMENT.encode()]
    personal += [contact.encode() for contact in CONTACTS]
    before = stored_bytes()
    for value in personal:
        assert value in before, value

    touched = await store.erase_owner(OWNER_ID)
    # owner, token, 2 channels, notification, device; case owner; rating comment; notify
    # evidence; the case's device id
    assert touched == 10
    after = stored_bytes()
    for value in [*personal, hashlib.sha256(TOKEN.encode()).hexdigest().encode(), b"dev-7731"]:
        assert value not in after, value

    assert await store.get_owner(OWNER_ID) is None
    assert await store.resolve_token(TOKEN) is None
    assert await store.channels(OWNER_ID, active_only=False) == []
    assert await store.notifications(OWNER_ID) == []
    assert await store.devices(OWNER_ID) == []
    assert await store.get_device("dev-7731") is None
    case = await store.get_case("case-7731")
    assert case is not None
    assert case.owner_id == ERASED_OWNER
    assert case.device_id.startswith("anon-")
    assert await store.cases(owner_id=ERASED_OWNER) == [case]
    rating = await store.get_rating("case-7731")
    assert rating is not None
    assert (rating.stars, rating.comment) == (2, None)
    trail = await store.audit("case-7731")
    assert [(e.action, e.evidence) for e in trail] == [
        ("notify", {}),
        ("transition", {"score": 0.1}),
    ]
    assert [a.appointment_id for a in await store.appointments(case_id="case-7731")] == [
        "appt-7731"
    ]
    assert [t.task_id for t in await store.tasks(case_id="case-7731")] == ["task-7731"]
    assert (await store.export_owner(OWNER_ID))["cases"] == []

    # the other owner is untouched
    other = await store.export_owner("owner-other-0001")
    assert other["owner"]["name"] == "Other Person"
    assert len(other["channels"]) == 2
    assert other["ratings"][0]["comment"] == "fine, says 0001"
    assert await store.resolve_token("tok-0001") == ("owner", "owner-other-0001")
    assert await store.erase_owner(OWNER_ID) == 0

    await store.close()
    closed = stored_bytes()
    for value in personal:
        assert value not in closed, value


async def test_no_owner_data_in_the_logs(
    open_store: OpenStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_store() as store:
        await fill_owner(store)
        await store.export_owner(OWNER_ID)
        with pytest.raises(ConflictError):
            await store.add_rating(Rating("case-7731", 1, COMMENT, nothing_wrong=True, at=at(9)))
        await store.erase_owner(OWNER_ID)
    assert caplog.records  # erasure is logged, without the data
    for value in (NAME, OWNER_ID, COMMENT, TOKEN, *CONTACTS):
        assert value not in caplog.text


# -- files, migrations and the worker thread ---------------------------------------------------


async def test_reopen_finds_the_data(open_store: OpenStore) -> None:
    case = full_case()
    async with open_store() as store:
        await store.put_owner(make_owner())
        await store.add_case(case)
        await store.add_token("tok-reopen", ("owner", "owner-1"))
        await store.book(make_appointment())
    store = await open_store().open()
    try:
        assert await store.get_owner("owner-1") == make_owner()
        assert await store.get_case("case-1") == case
        assert await store.resolve_token("tok-reopen") == ("owner", "owner-1")
        assert (await store.get_appointment("appt-1")) == make_appointment(state="booked")
    finally:
        await store.close()
    await store.close()  # twice is harmless


async def test_file_is_wal_and_versioned(db_path: Path) -> None:
    async with SqliteStore(db_path):
        pass
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 2


async def test_in_memory_store() -> None:
    async with SqliteStore(":memory:") as store:
        await store.put_owner(make_owner())
        assert await store.get_owner("owner-1") == make_owner()
    async with SqliteStore(":memory:") as fresh:
        assert await fresh.get_owner("owner-1") is None


def make_v1_file(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO owners VALUES ('owner-1', 'Ana', 'en', 'UTC', 'default', 'always_ask', "
        "'22:00', NULL, '[[2,\"08:00\",\"12:30\"]]', '[\"ntfy\"]', 3)"
    )
    conn.execute(
        "INSERT INTO cases (case_id, device_id, owner_id, model, fault, state, urgency, "
        "opened_at, updated_at, confidence, remedies, tried, evidence) VALUES "
        "('case-1', 'dev-1', 'owner-1', 'hp-200', 'fan_bearing', 'booked', 'low', "
        "'2025-03-10T08:30:15.123456+00:00', '2025-03-10T08:31:15.123456+00:00', 0.5, "
        "'[\"restart\"]', '[]', '[\"vibration\"]')"
    )
    conn.close()


def schema_of(path: Path) -> tuple[int, set[str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    return version, names


async def test_v1_file_is_migrated(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_v1_file(db_path)
    assert schema_of(db_path) == (1, schema_of(db_path)[1])
    assert "appointments_booked" not in schema_of(db_path)[1]
    caplog.set_level(logging.INFO, logger="notifier.sqlite")
    async with SqliteStore(db_path) as store:
        assert await store.get_owner("owner-1") == Owner(
            "owner-1",
            "Ana",
            consent="always_ask",
            quiet_end=None,
            availability=(Window(2, time(8), time(12, 30)),),
            channels=("ntfy",),
        )
        case = await store.get_case("case-1")
        assert case is not None
        assert (case.state, case.remedies, case.opened_at) == ("booked", ("restart",), T0)
        await store.book(make_appointment())
    version, names = schema_of(db_path)
    assert version == SCHEMA_VERSION
    assert "appointments_booked" in names
    assert "used_links" in names
    assert f"from schema version 1 to {SCHEMA_VERSION}" in caplog.text
    caplog.clear()
    async with SqliteStore(db_path):
        pass
    assert "migrated" not in caplog.text


async def test_failed_migration_leaves_the_file_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_v1_file(db_path)
    broken = ("CREATE TABLE extra (x INTEGER)", "CREATE INDEX oops ON no_such_table (x)")
    monkeypatch.setattr(notifier.sqlite.schema, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(ConfigError, match=f"to version {SCHEMA_VERSION + 1} failed"):
        await SqliteStore(db_path).open()
    version, names = schema_of(db_path)
    assert version == 1
    assert "extra" not in names
    assert "appointments_booked" not in names
    monkeypatch.undo()
    async with SqliteStore(db_path) as store:
        assert await store.get_case("case-1") is not None
    assert schema_of(db_path)[0] == SCHEMA_VERSION


async def test_newer_file_refused(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.put_owner(make_owner())
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}.*newer fixloop"):
        await SqliteStore(db_path).open()
    assert schema_of(db_path)[0] == SCHEMA_VERSION + 1


async def test_files_that_are_not_case_stores_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(ConfigError, match="cannot open"):
        await SqliteStore(garbage).open()
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE something (x)")
    conn.close()
    with pytest.raises(ConfigError, match="not a fixloop case store"):
        await SqliteStore(foreign).open()
    with pytest.raises(ConfigError, match="cannot open"):
        await SqliteStore(tmp_path / "no-such-dir" / "cases.db").open()


async def test_closed_store_refuses_work(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(StoreUnavailableError, match="not open"):
        await store.get_owner("owner-1")
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailableError, match="not open"):
        await store.put_owner(make_owner())


async def test_waits_for_a_lock_without_blocking_the_loop(db_path: Path) -> None:
    async with SqliteStore(db_path, busy_timeout_s=5.0) as store:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            ticks = 0
            ten_turns = asyncio.Event()

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    if ticks >= 10:
                        ten_turns.set()
                    await asyncio.sleep(0.01)

            async with asyncio.TaskGroup() as group:
                ticker = group.create_task(tick())
                write = group.create_task(store.put_owner(make_owner()))
                await ten_turns.wait()  # the loop keeps running while the store waits
                assert not write.done()
                other.execute("COMMIT")
                await write
                ticker.cancel()
            assert await store.get_owner("owner-1") == make_owner()
        finally:
            other.close()


async def test_lock_held_too_long_is_transient(db_path: Path) -> None:
    async with SqliteStore(db_path, busy_timeout_s=0.1) as store:
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match="locked"):
                await store.put_owner(make_owner())
            other.execute("ROLLBACK")
            await store.put_owner(make_owner())
        finally:
            other.close()


async def test_a_delivery_finishing_after_erasure_brings_nothing_back(store: Store) -> None:
    await store.put_owner(Owner("owner-9", "Nina"))
    queued = Notification("n-9", "owner-9", None, "resolved", "Nina, all fixed", "b", (), at(1))
    await store.add_notification(queued)
    await store.erase_owner("owner-9")
    # the push that was under way stores its outcome afterwards
    await store.add_notification(replace(queued, status="sent", channel_id="ch-9"))
    assert await store.notifications("owner-9") == []


async def test_the_database_and_its_log_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "cases.sqlite3"
    async with SqliteStore(path) as store:
        await store.put_owner(make_owner())
        for one in (path, Path(f"{path}-wal")):
            assert one.stat().st_mode & 0o777 == 0o600, one
    path.chmod(0o644)
    async with SqliteStore(path) as store:
        assert path.stat().st_mode & 0o777 == 0o600


async def test_a_boot_events_firmware_is_kept_in_the_registry_and_the_record(
    store: Store,
) -> None:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    registry = store.registry()
    await registry.put_product_line(ProductLine("washer", "Washer", now))
    (outcome,) = await registry.register(
        [NewDevice("w-1", "washer", "S-1", firmware="1.0.0")],
        key=claim_key("a fleet secret of the tests, 32+ chars"),
        now=now,
        actor="test",
    )
    assert outcome.ok
    await store.put_owner(Owner("o-1", "Ada"))
    await store.put_device(DeviceRecord("w-1", "o-1", "washer", firmware="1.0.0"))
    assert await registry.note_firmware("w-1", "2.0.1")
    assert not await registry.note_firmware("w-1", "2.0.1")  # the same again
    assert not await registry.note_firmware("nobody", "2.0.1")
    with pytest.raises(InvalidRequestError):
        await registry.note_firmware("w-1", "2.0 beta; drop")
    found = await registry.get("w-1")
    record = await store.get_device("w-1")
    assert found is not None
    assert record is not None
    assert (found.firmware, record.firmware) == ("2.0.1", "2.0.1")
