"""Shared fixtures: real mosquitto and influxd servers on free loopback ports.

``mosquitto`` is a started broker per test (service user ``fixloop-gateway`` and the
devices of ``DEVICE_IDS``); ``make_mosquitto(**kw)`` starts more, or differently
configured ones. ``influxd`` is one server for the session (use your own database or
measurement names); ``make_influxd(**kw)`` gives a test its own server to stop, kill
or restart. ``postgres`` is one PostgreSQL for the session (run as an unprivileged user
when the tests run as root); ``pg_url`` is an empty, migrated case-store database on it
for one test, ``pg_databases`` makes new empty databases too. Every server a fixture
started is stopped at teardown, also on failure.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest

from fixloop.broker import GATEWAY_USER
from fixloop.pgserver import PostgresServer
from fixloop.stack import InfluxdServer, MosquittoServer
from wire.protocol.credentials import device_password

FLEET_SECRET = "test-fleet-secret-0123456789"
GATEWAY_PASSWORD = "gateway-test-password"
DEVICE_IDS = ("dev-001", "dev-002", "dev-003")
DYNSEC_ADMIN_PASSWORD = "dynsec-admin-test-password"

MakeMosquitto = Callable[..., MosquittoServer]
MakeInfluxd = Callable[..., InfluxdServer]


def device_pw(device_id: str) -> str:
    """Broker password of a test device."""
    return device_password(FLEET_SECRET, device_id)


@pytest.fixture
def make_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeMosquitto]:
    """Factory of started brokers; keyword arguments override the test defaults."""
    servers: list[MosquittoServer] = []

    def make(**kw: Any) -> MosquittoServer:
        options: dict[str, Any] = {
            "users": {GATEWAY_USER: GATEWAY_PASSWORD},
            "device_ids": DEVICE_IDS,
            "fleet_secret": FLEET_SECRET,
        }
        options.update(kw)
        root = options.pop("root", None) or tmp_path_factory.mktemp("mosquitto")
        server = MosquittoServer(Path(root), **options)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def mosquitto(make_mosquitto: MakeMosquitto) -> MosquittoServer:
    """A started broker for this test."""
    return make_mosquitto()


@pytest.fixture
def dynsec_mosquitto(make_mosquitto: MakeMosquitto) -> MosquittoServer:
    """A started broker whose accounts live in the dynamic-security plugin.

    Same first accounts as ``mosquitto`` (the gateway and ``DEVICE_IDS``), plus the
    plugin's administrator ``fixloop-admin`` with ``DYNSEC_ADMIN_PASSWORD``.
    """
    return make_mosquitto(dynsec_admin_password=DYNSEC_ADMIN_PASSWORD)


@pytest.fixture
def make_influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeInfluxd]:
    """Factory of started influxd servers owned by one test (stop, kill, restart them)."""
    servers: list[InfluxdServer] = []

    def make(**kw: Any) -> InfluxdServer:
        root = kw.pop("root", None) or tmp_path_factory.mktemp("influxd")
        server = InfluxdServer(Path(root), **kw)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxdServer]:
    """One influxd for the session, with database ``fixloop``; do not stop it."""
    with InfluxdServer(tmp_path_factory.mktemp("influxd-session")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session (fsync off); make databases with ``pg_databases``."""
    # in /tmp, not pytest's folder: the server's user must reach it when we are root
    root = Path(tempfile.mkdtemp(prefix="fixloop-pg-", dir="/tmp"))
    try:
        with PostgresServer(root, durable=False, die_with_parent=True) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


class PostgresDatabases:
    """Databases on the session's PostgreSQL: the shared case store, or new empty ones."""

    #: the database the case-store tests share, emptied before each
    SHARED: Final = "cases"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._numbers = itertools.count(1)
        self._migrated = False

    def fresh_store(self) -> str:
        """The URL of the shared case-store database, migrated and with its tables emptied.

        Emptying (``TRUNCATE``) takes milliseconds where a new database takes most of a
        second; a store opened on it finds the schema at its version and migrates nothing.
        """
        if not self._migrated:
            self.server.create_database(self.SHARED)
            from notifier.postgres import PostgresStore

            async def migrate() -> None:
                async with PostgresStore(self.server.url(self.SHARED)):
                    pass

            # its own thread and loop: fixtures may run inside the tests' event loop
            with ThreadPoolExecutor(1) as thread:
                thread.submit(asyncio.run, migrate()).result()
            self._migrated = True
        else:
            self.server.execute(_TRUNCATE_ALL, database=self.SHARED)
        return self.server.url(self.SHARED)

    def create(self) -> str:
        """The URL of a new, empty database (:meth:`drop` it)."""
        name = f"test_{next(self._numbers)}"
        self.server.create_database(name, template="template0")
        return self.server.url(name)

    def drop(self, url: str) -> None:
        """Drop the database of a URL :meth:`create` gave."""
        self.server.drop_database(database_of(url))

    def dump(self, url: str) -> bytes:
        """Every row of the database, as ``pg_dump --data-only`` writes them."""
        return self.server.dump(database_of(url))


# every table of the public schema but the schema's version, emptied in one statement
_TRUNCATE_ALL: Final = """DO $$ BEGIN EXECUTE (
    SELECT 'TRUNCATE ' || string_agg(format('%I', tablename), ', ') || ' RESTART IDENTITY'
    FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_version'
); END $$"""


def database_of(url: str) -> str:
    """The database a ``postgresql://`` URL names."""
    return urlsplit(url).path.lstrip("/")


@pytest.fixture(scope="session")
def pg_databases(postgres: PostgresServer) -> PostgresDatabases:
    """Makes databases on the session's PostgreSQL."""
    return PostgresDatabases(postgres)


@pytest.fixture
def pg_url(pg_databases: PostgresDatabases) -> str:
    """The URL of an empty, migrated case store for this test (emptied again for the next)."""
    return pg_databases.fresh_store()


class ManualClock:
    """A wall clock (UTC) the test sets and moves; call it for the time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
