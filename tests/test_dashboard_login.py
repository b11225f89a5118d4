"""The ops login against parallel guessing and lock-out.

Every attempt is counted before its password is hashed, so 200 parallel guesses reach the
hash only as often as the limit allows; a guessing address is slowed by a delay that
doubles per failure, while the right password from a clean address still gets in; the
account's own limit slows only addresses it was not used from; every login, failed login
and refusal is in the audit trail. Clients are told apart by ``X-Forwarded-For`` here,
with the test client's loopback address set as a trusted proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ManualClock

import dashboard.auth
from dashboard.app import create_app
from dashboard.auth import LoginLimiter, OpsUser, hash_password
from dashboard.settings import DashboardSettings
from notifier.model import AuditEntry
from notifier.sqlite import SqliteStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
PASSWORD = "the-ops-password-1"
ATTACKER = "203.0.113.9"
COLLEAGUE = "198.51.100.7"

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


class AuditedStore(SqliteStore):
    """A case store that also keeps the audit entries written, for the test to read."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.entries: list[AuditEntry] = []

    async def add_audit(self, entry: AuditEntry) -> None:
        self.entries.append(entry)
        await super().add_audit(entry)


class Rig:
    def __init__(self, client: Client, store: AuditedStore, clock: ManualClock) -> None:
        self.client, self.store, self.clock = client, store, clock

    async def login(self, address: str, password: str, username: str = "ops") -> Any:
        return await self.client.post(
            "/ops/login",
            json={"username": username, "password": password},
            headers={"X-Forwarded-For": address},
        )

    def actions(self) -> list[str]:
        return [entry.action for entry in self.store.entries]


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(aiohttp_client: ClientFactory) -> AsyncIterator[RigFactory]:
    stores: list[AuditedStore] = []

    async def make(**settings: Any) -> Rig:
        store = AuditedStore()
        await store.__aenter__()
        stores.append(store)
        clock = ManualClock(NOW)
        users = {"ops": OpsUser("ops", "admin", hash_password(PASSWORD, n=2**10))}
        app = create_app(
            store=store,
            influx=None,
            actions=None,
            users=users,
            clock=clock,
            settings=DashboardSettings(**{"trusted_proxies": ("127.0.0.1", "::1"), **settings}),
        )
        return Rig(await aiohttp_client(app), store, clock)

    yield make
    for store in stores:
        await store.__aexit__(None, None, None)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the password hashes computed (the slow step a guess must reach)."""
    calls: list[str] = []
    real = dashboard.auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(dashboard.auth, "verify_password", counting)
    return calls


async def test_parallel_guesses_reach_the_hash_only_as_often_as_allowed(
    make_rig: RigFactory, hashes: list[str]
) -> None:
    rig = await make_rig()
    answers = await asyncio.gather(*(rig.login(ATTACKER, f"guess-{n}") for n in range(200)))
    statuses = sorted(answer.status for answer in answers)
    assert len(hashes) == 5  # login_max_failures, however the requests interleave
    assert statuses == [401] * 5 + [429] * 195
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status == 429)


async def test_the_right_password_from_another_address_works_during_an_attack(
    make_rig: RigFactory, hashes: list[str]
) -> None:
    rig = await make_rig()
    await asyncio.gather(*(rig.login(ATTACKER, f"guess-{n}") for n in range(200)))
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200
    # the attacker's address stays throttled, even with the right password
    assert (await rig.login(ATTACKER, PASSWORD)).status == 429
    # the peer address is not to be fooled: without a trusted proxy the header is ignored
    untrusted = await make_rig(trusted_proxies=())
    for n in range(5):
        assert (await untrusted.login(f"192.0.2.{n}", "wrong")).status == 401
    assert (await untrusted.login(COLLEAGUE, PASSWORD)).status == 429  # same peer: 127.0.0.1
    assert len(hashes) == 5 + 1 + 5


async def test_the_delay_doubles_with_each_failure_and_is_forgotten(make_rig: RigFactory) -> None:
    rig = await make_rig(login_max_failures=3, login_backoff_s=2.0, login_window_s=600.0)
    for _ in range(2):
        assert (await rig.login(ATTACKER, "wrong")).status == 401
    waits = []
    for _ in range(5):
        assert (await rig.login(ATTACKER, "wrong")).status == 401
        refused = await rig.login(ATTACKER, "wrong")
        assert refused.status == 429
        waits.append(int(refused.headers["Retry-After"]))
        assert (await refused.json())["retry_after_s"] == waits[-1]
        rig.clock.advance(waits[-1])
    assert waits == [2, 4, 8, 16, 32]
    # quiet for the window after the last delay: the address starts afresh
    rig.clock.advance(600)
    assert (await rig.login(ATTACKER, PASSWORD)).status == 200


async def test_a_long_guess_from_one_address_never_shuts_out_a_clean_one(
    make_rig: RigFactory, hashes: list[str]
) -> None:
    rig = await make_rig()
    for _ in range(40):  # the attacker waits out each delay and guesses again
        answer = await rig.login(ATTACKER, "wrong")
        if answer.status == 429:
            rig.clock.advance(int(answer.headers["Retry-After"]))
            assert (await rig.login(ATTACKER, "wrong")).status == 401
    assert len(hashes) > 20  # more guesses than the account's own free failures
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200  # never used before
    refused = await rig.login(ATTACKER, "wrong")
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) == 900  # the longest delay by now


async def test_the_account_limit_slows_new_addresses_but_never_locks_the_account(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(login_account_failures=4)
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200  # an address it is used from
    # guesses from many addresses, one each: no address is over its own limit
    for n in range(4):
        assert (await rig.login(f"192.0.2.{n}", "wrong")).status == 401
    assert (await rig.login("192.0.2.99", "wrong")).status == 429  # a new address waits
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200  # its own people get in
    rig.clock.advance(2)  # the delay ends: new addresses may try again
    assert (await rig.login("192.0.2.99", PASSWORD)).status == 200


async def test_every_login_is_in_the_audit_trail(make_rig: RigFactory) -> None:
    rig = await make_rig(login_max_failures=1)
    assert (await rig.login(ATTACKER, "wrong", username="my-password-typed-here")).status == 401
    assert (await rig.login(ATTACKER, "wrong")).status == 429
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200
    assert rig.actions() == ["login_failed", "login_throttled", "login"]
    failed, throttled, success = rig.store.entries
    assert all(e.actor == "ops" and e.case_id is None and e.at == NOW for e in rig.store.entries)
    # an unknown user name is not kept: it may be a password typed in the wrong field
    assert failed.evidence == {"user": None, "source": ATTACKER}
    assert throttled.evidence == {"user": "ops", "source": ATTACKER, "retry_after_s": 1.0}
    assert success.evidence == {"user": "ops", "source": COLLEAGUE}


async def test_forwarded_addresses_are_read_past_trusted_proxies_only(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(login_max_failures=1)
    # a client that claims an address itself: the hop our proxy saw is the one counted
    await rig.login(f"{COLLEAGUE}, {ATTACKER}", "wrong")
    assert (await rig.login(ATTACKER, "wrong")).status == 429
    assert (await rig.login(COLLEAGUE, PASSWORD)).status == 200
    assert [e.evidence["source"] for e in rig.store.entries] == [ATTACKER, ATTACKER, COLLEAGUE]


def test_ipv6_sources_are_counted_by_their_64_prefix() -> None:
    limiter = LoginLimiter(lambda: NOW, source_failures=1)
    assert limiter.source_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert limiter.source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert limiter.begin("ops", "2001:db8:1:2::5") == 0
    assert limiter.begin("ops", "2001:db8:1:2:ffff::9") > 0  # the same /64
    assert limiter.begin("ops", "2001:db8:1:3::5") == 0
