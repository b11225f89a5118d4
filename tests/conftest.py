"""Shared fixtures: real mosquitto and influxd servers on free loopback ports.

``mosquitto`` is a started broker per test (service user ``fixloop-gateway`` and the
devices of ``DEVICE_IDS``); ``make_mosquitto(**kw)`` starts more, or differently
configured ones. ``influxd`` is one server for the session (use your own database or
measurement names); ``make_influxd(**kw)`` gives a test its own server to stop, kill
or restart. Every server a fixture started is stopped at teardown, also on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.protocol.credentials import device_password

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


class ManualClock:
    """A wall clock (UTC) the test sets and moves; call it for the time."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
