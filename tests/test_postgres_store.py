"""The PostgreSQL case store's own parts: migrations, rules under concurrency, errors.

What both stores share runs on both in ``test_case_store.py``; here is what only
PostgreSQL has: a database migrated by several instances, many connections writing at
once (where SQLite's single writer keeps order by itself), and a server that is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from conftest import PostgresDatabases
from pydantic import ValidationError

import notifier.postgres.connect
from fixloop.cli import main
from fixloop.failures import recorded_failures
from fixloop.pgserver import PostgresServer
from fixloop.server import free_port
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import Appointment, Case, Owner
from notifier.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore, redacted_url
from notifier.registry import NewDevice, ProductLine, claim_key
from notifier.schema import STEPS, render
from notifier.settings import NotifierSettings
from notifier.sqlite import SqliteStore
from notifier.stores import case_store, case_store_name
from wire.errors import ConfigError, StoreUnavailableError

T0 = datetime(2025, 3, 10, 8, 0, tzinfo=UTC)
KEY = claim_key("test-fleet-secret")


@pytest.fixture
def empty_url(pg_databases: PostgresDatabases) -> Iterator[str]:
    """A new, empty database."""
    url = pg_databases.create()
    try:
        yield url
    finally:
        pg_databases.drop(url)


async def tables_and_version(url: str) -> tuple[set[str], list[int]]:
    conn = await asyncpg.connect(url)
    try:
        tables = {
            row[0]
            for row in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        versions = (
            [row[0] for row in await conn.fetch("SELECT version FROM schema_version")]
            if "schema_version" in tables
            else []
        )
        return tables, versions
    finally:
        await conn.close()


# -- migrations ------------------------------------------------------------------------------


async def test_a_new_database_is_migrated_to_the_current_version(
    empty_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "notifier.postgres")
    assert await tables_and_version(empty_url) == (set(), [])
    async with PostgresStore(empty_url) as store:
        await store.put_owner(Owner("owner-1", "Ana"))
    tables, versions = await tables_and_version(empty_url)
    assert versions == [SCHEMA_VERSION] == [len(STEPS)]
    assert {"cases", "audit", "owners", "registry", "invites", "used_links"} <= tables
    assert f"migrated from schema version 0 to {SCHEMA_VERSION}" in caplog.text
    # opened again: nothing to do, the data is there
    caplog.clear()
    async with PostgresStore(empty_url) as store:
        assert await store.get_owner("owner-1") == Owner("owner-1", "Ana")
    assert "migrated" not in caplog.text


async def test_both_engines_render_every_step_of_one_description() -> None:
    sqlite, postgresql = render("sqlite"), render("postgresql")
    assert len(sqlite) == len(postgresql) == len(STEPS) == SCHEMA_VERSION
    assert postgresql == MIGRATIONS
    for lite, pg in zip(sqlite, postgresql, strict=True):
        assert len(lite) == len(pg)
    joined = "\n".join(s for step in postgresql for s in step)
    assert "REAL" not in joined.replace("DOUBLE PRECISION", "")
    assert "strftime" not in joined
    assert 'TEXT COLLATE "C"' in joined


async def test_instances_starting_together_migrate_once(empty_url: str) -> None:
    stores = [PostgresStore(empty_url, pool_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        await asyncio.gather(
            *(store.put_owner(Owner(f"owner-{i}", "Ana")) for i, store in enumerate(stores))
        )
    finally:
        for store in stores:
            await store.close()
    assert (await tables_and_version(empty_url))[1] == [SCHEMA_VERSION]


async def test_an_older_database_gets_the_missing_steps(empty_url: str) -> None:
    conn = await asyncpg.connect(empty_url)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version (version) VALUES (4)")
        for step in MIGRATIONS[:4]:
            for statement in step:
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO owners VALUES ('owner-1', 'Ana', 'en', 'UTC', 'south', 'always_ask', "
            "NULL, NULL, '[]', '[]', 3)"
        )
        await conn.execute(
            "INSERT INTO devices VALUES ('dev-1', 'owner-1', 'washer', '2.0.0', NULL, NULL)"
        )
    finally:
        await conn.close()
    async with PostgresStore(empty_url) as store:
        device = await store.registry().get("dev-1")
        assert device is not None
        assert (device.model, device.serial, device.region, device.owner_id) == (
            "washer",
            "dev-1",
            "south",
            "owner-1",
        )
        assert device.registered_at.tzinfo is UTC
        assert abs(device.registered_at - datetime.now(UTC)) < timedelta(minutes=5)
    assert (await tables_and_version(empty_url))[1] == [SCHEMA_VERSION]


async def test_a_failed_migration_leaves_the_database_as_it_was(
    empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with PostgresStore(empty_url) as store:
        await store.put_owner(Owner("owner-1", "Ana"))
    broken = ("CREATE TABLE extra (x INTEGER)", "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(notifier.postgres.connect, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(ConfigError, match=f"to version {SCHEMA_VERSION + 1} failed"):
        await PostgresStore(empty_url).open()
    tables, versions = await tables_and_version(empty_url)
    assert "extra" not in tables
    assert versions == [SCHEMA_VERSION]
    monkeypatch.undo()
    async with PostgresStore(empty_url) as store:
        assert await store.get_owner("owner-1") is not None


async def test_a_newer_or_foreign_database_is_refused(empty_url: str) -> None:
    async with PostgresStore(empty_url):
        pass
    conn = await asyncpg.connect(empty_url)
    try:
        await conn.execute("UPDATE schema_version SET version = 99")
        with pytest.raises(ConfigError, match="schema version 99"):
            await PostgresStore(empty_url).open()
        await conn.execute("DROP TABLE schema_version")
        with pytest.raises(ConfigError, match="not a fixloop case store"):
            await PostgresStore(empty_url).open()
    finally:
        await conn.close()


# -- atomicity under concurrency -------------------------------------------------------------


def visit(appointment_id: str, case_id: str, start_min: int, end_min: int) -> Appointment:
    return Appointment(
        appointment_id,
        case_id,
        "tech-1",
        T0 + timedelta(minutes=start_min),
        T0 + timedelta(minutes=end_min),
        "booked",
    )


async def test_concurrent_bookings_from_many_connections_never_overlap(pg_url: str) -> None:
    stores = [await PostgresStore(pg_url, pool_size=4).open() for _ in range(3)]
    try:
        for i in range(12):
            await stores[0].add_case(
                Case(f"case-{i}", f"dev-{i}", "owner-1", "washer", "f", "opened", "low", T0, T0)
            )
        for round_ in range(4):
            base = 1000 * round_
            # 12 bookings of one technician at once, every one overlapping every other
            attempts = [
                stores[i % 3].book(visit(f"a-{round_}-{i}", f"case-{i}", base + i, base + 60 + i))
                for i in range(12)
            ]
            results = await asyncio.gather(*attempts, return_exceptions=True)
            assert results.count(None) == 1, results
            assert all(isinstance(r, ConflictError) for r in results if r is not None), results
        booked = await stores[1].appointments(technician_id="tech-1", states=["booked"])
        assert len(booked) == 4
        for earlier, later in itertools.pairwise(booked):
            assert earlier.end is not None
            assert later.start is not None
            assert earlier.end <= later.start
    finally:
        for store in stores:
            await store.close()


async def test_concurrent_claims_of_one_code_bind_one_owner(pg_url: str) -> None:
    stores = [await PostgresStore(pg_url, pool_size=4).open() for _ in range(3)]
    try:
        registry = stores[0].registry()
        await registry.put_product_line(ProductLine("washer", "Washer", T0))
        codes = []
        for n in range(5):
            (outcome,) = await registry.register(
                [NewDevice(f"washer-{n}", "washer", f"S{n}")], key=KEY, now=T0, actor="ops:test"
            )
            assert outcome.claim_code is not None
            codes.append(outcome.claim_code)
        for i in range(8):
            await stores[0].put_owner(Owner(f"owner-{i}", f"Owner {i}"))
        for n, code in enumerate(codes):
            claims = [
                stores[i % 3].registry().claim(f"owner-{i}", code, key=KEY, label=None, now=T0)
                for i in range(8)
            ]
            results = await asyncio.gather(*claims, return_exceptions=True)
            won = [r for r in results if not isinstance(r, BaseException)]
            assert len(won) == 1, results
            assert all(isinstance(r, ConflictError) for r in results if r not in won), results
            device = await stores[2].registry().get(f"washer-{n}")
            assert device is not None
            assert device.owner_id == won[0].record.owner_id
            assert (
                len([d for d in await stores[1].devices() if d.device_id == device.device_id]) == 1
            )
    finally:
        for store in stores:
            await store.close()


async def test_concurrent_case_moves_and_invites_happen_once(pg_url: str) -> None:
    stores = [await PostgresStore(pg_url, pool_size=4).open() for _ in range(2)]
    try:
        case = Case("case-1", "dev-1", "owner-1", "washer", "f", "opened", "low", T0, T0)
        await stores[0].add_case(case)
        moves = [
            stores[i % 2].update_case(
                Case(
                    "case-1",
                    "dev-1",
                    "owner-1",
                    "washer",
                    "f",
                    "remote_fix",
                    "low",
                    T0,
                    T0,
                    confidence=i / 10,
                ),
                expected_state="opened",
            )
            for i in range(10)
        ]
        results = await asyncio.gather(*moves, return_exceptions=True)
        assert results.count([]) == 1, results  # the winner (no messages to keep)
        # one open case per device and fault, asked for by many at once
        opens = [
            stores[i % 2].add_case(
                Case(f"case-x{i}", "dev-2", "owner-1", "washer", "f", "opened", "low", T0, T0)
            )
            for i in range(10)
        ]
        results = await asyncio.gather(*opens, return_exceptions=True)
        assert results.count(None) == 1, results
        await stores[0].put_owner(Owner("owner-1", "Ana"))
        await stores[0].registry().add_invite("invite-code", "owner-1", T0 + timedelta(days=1))
        uses = [stores[i % 2].registry().use_invite("invite-code", now=T0) for i in range(10)]
        results = await asyncio.gather(*uses, return_exceptions=True)
        assert results.count("owner-1") == 1, results
        assert all(isinstance(r, NotFoundError) for r in results if r != "owner-1")
        links = [
            stores[i % 2].use_link("link-1", T0 + timedelta(days=1), now=T0) for i in range(10)
        ]
        assert (await asyncio.gather(*links)).count(True) == 1
    finally:
        for store in stores:
            await store.close()


# -- errors ----------------------------------------------------------------------------------


async def test_text_postgresql_cannot_keep_is_refused(pg_url: str) -> None:
    async with PostgresStore(pg_url) as store:
        with pytest.raises(InvalidRequestError, match="cannot keep"):
            await store.put_owner(Owner("owner-1", "Ana\x00"))
        assert await store.get_owner("owner-1") is None


async def test_an_unreachable_server_is_transient_and_bad_settings_refused(
    postgres: PostgresServer,
) -> None:
    with pytest.raises(StoreUnavailableError, match="cannot be reached"):
        await PostgresStore(
            f"postgresql://fixloop:pw@127.0.0.1:{free_port()}/x", connect_timeout_s=2
        ).open()
    with pytest.raises(ConfigError, match="no-such-db"):
        await PostgresStore(postgres.url("no-such-db")).open()
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        PostgresStore("mysql://u:secret@host/db")
    with pytest.raises(ConfigError):
        PostgresStore(postgres.url(), pool_size=0)


async def test_a_stopped_server_is_transient_and_the_store_recovers() -> None:
    root = Path(tempfile.mkdtemp(prefix="fixloop-pg-", dir="/tmp"))  # its own server, to stop
    with contextlib.ExitStack() as cleanup, PostgresServer(root, durable=False) as server:
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        async with PostgresStore(server.url(), connect_timeout_s=2) as store:
            await store.put_owner(Owner("owner-1", "Ana"))
            server.stop()
            with pytest.raises(StoreUnavailableError):
                await store.get_owner("owner-1")
            server.start()
            for _ in range(50):
                try:
                    assert await store.get_owner("owner-1") == Owner("owner-1", "Ana")
                    break
                except StoreUnavailableError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the store did not recover after the server came back")


def test_passwords_stay_out_of_messages() -> None:
    assert (
        redacted_url("postgresql://app:s3cret@db:5432/cases")
        == "postgresql://app:***@db:5432/cases"
    )
    assert redacted_url("postgresql://app@db/cases") == "postgresql://app@db/cases"
    with pytest.raises(ConfigError) as refused:
        PostgresStore("mysql://u:s3cret@host/db")
    assert "s3cret" not in str(refused.value)


# -- settings: the services and commands open the configured store ---------------------------


def test_the_store_url_chooses_postgresql(tmp_path: Path) -> None:
    assert isinstance(case_store(NotifierSettings(db_path=tmp_path / "c.db")), SqliteStore)
    settings = NotifierSettings(store_url="postgresql://app:s3cret@db/cases", store_pool_size=3)
    assert isinstance(case_store(settings), PostgresStore)
    assert case_store_name(settings) == "postgresql://app:***@db/cases"
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValidationError, match="PostgreSQL URL"):
        NotifierSettings(store_url="sqlite:///cases.db")


def test_the_commands_work_on_the_postgresql_store(
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("FIXLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FIXLOOP_STACK__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FIXLOOP_NOTIFIER__STORE_URL", pg_url)
    assert main(["--log-level", "WARNING", "products", "add", "washer", "--name", "Aqua 7"]) == 0
    assert "product line washer (Aqua 7) registered" in capsys.readouterr().out

    async def lines() -> list[ProductLine]:
        async with PostgresStore(pg_url) as store:
            return await store.registry().product_lines()

    assert [(line.model, line.name) for line in asyncio.run(lines())] == [("washer", "Aqua 7")]
    assert not (tmp_path / "data" / "cases.sqlite3").exists()


async def test_training_reads_recorded_failures_from_postgresql(pg_url: str) -> None:
    fixed = T0 + timedelta(days=3)
    async with PostgresStore(pg_url) as store:
        for case_id, state, visit_id in (
            ("case-1", "resolved", "appt-1"),
            ("case-2", "resolved", None),
            ("case-3", "booked", "appt-3"),
        ):
            await store.add_case(
                Case(
                    case_id,
                    f"dev-{case_id}",
                    "owner-1",
                    "washer",
                    "pump_wear",
                    state,
                    "low",
                    T0,
                    T0,
                    appointment_id=visit_id,
                    fix_at=fixed,
                )
            )
    failures = await recorded_failures(NotifierSettings(store_url=pg_url))
    assert [(f.device_id, f.fault, f.at) for f in failures] == [("dev-case-1", "pump_wear", fixed)]
