"""The ops session's cookie and the live stream's lifetime.

The session cookie is ``HttpOnly``, ``SameSite=Strict``, and ``Secure`` whenever the
dashboard's public URL is ``https`` (or as the setting forces it). The live case stream
looks at the session before every event and heartbeat without extending it: it ends at
logout and at expiry, and an open stream alone never keeps a session alive; nor do the
refreshes the page makes on its own after a live change (they say so in a header). A manual
clock moves the sessions' time; the stream's heartbeats are short, and the tests count
them instead of timing anything. Once a session has ended the stream writes no heartbeat:
the ones counted after that were already on their way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from conftest import ManualClock
from test_dashboard import make_case

from dashboard.app import COOKIE_NAME, CSRF_HEADER, create_app
from dashboard.auth import OpsUser, SessionStore, hash_password
from dashboard.feed import CaseFeed
from dashboard.keys import SESSIONS_KEY
from dashboard.settings import DashboardSettings
from notifier.model import DeviceRecord
from notifier.sqlite import SqliteStore

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
PASSWORD = "the-ops-password-1"
IDLE_S = 600.0
#: Heartbeats read between a session's end and the stream's ``logout`` event (at most).
MAX_BEATS = 25

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


class Rig:
    def __init__(self, client: Client, clock: ManualClock, feed: CaseFeed) -> None:
        self.client, self.clock, self.feed = client, clock, feed

    async def login(self, **headers: str) -> ClientResponse:
        return await self.client.post(
            "/ops/login", json={"username": "ops", "password": PASSWORD}, headers=headers
        )


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(aiohttp_client: ClientFactory) -> AsyncIterator[RigFactory]:
    async with SqliteStore(":memory:") as store:

        async def make(**settings: Any) -> Rig:
            clock = ManualClock(NOW)
            feed = CaseFeed()
            app = create_app(
                store=store,
                influx=None,
                actions=None,
                users={"ops": OpsUser("ops", "admin", hash_password(PASSWORD, n=2**10))},
                clock=clock,
                feed=feed,
                settings=DashboardSettings(**{"session_idle_s": IDLE_S, **settings}),
            )
            return Rig(await aiohttp_client(app), clock, feed)

        yield make


def _attributes(set_cookie: str) -> dict[str, str]:
    """The attributes of one ``Set-Cookie`` header, by lower-cased name."""
    _, *parts = (part.strip() for part in set_cookie.split(";"))
    pairs = (part.partition("=") for part in parts if part)
    return {name.lower(): value for name, _, value in pairs}


async def _item(resp: ClientResponse) -> tuple[str, Any]:
    """The stream's next event as ``(event, data)``, ``("beat", None)`` or ``("end", None)``."""
    event = None
    async with asyncio.timeout(10):
        while True:
            raw = await resp.content.readline()
            if not raw:
                return "end", None
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                return "beat", None
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event is not None:
                return event, orjson.loads(line[len("data: ") :])


async def _until_logout(resp: ClientResponse) -> int:
    """Read to the ``logout`` event and the end of the stream; return the heartbeats seen."""
    beats = 0
    while (item := await _item(resp)) == ("beat", None):
        beats += 1
        assert beats <= MAX_BEATS, "the stream outlives its session"
    assert item == ("logout", {"reason": "session ended"})
    assert await _item(resp) == ("end", None)
    return beats


async def _open_stream(rig: Rig) -> ClientResponse:
    resp = await rig.client.get("/ops/api/events")
    assert resp.status == 200
    assert await _item(resp) == ("hello", {"ok": True})
    return resp


# -- the cookie ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "secure"),
    [
        ({}, False),
        ({"public_url": "http://127.0.0.1:8080/ops/"}, False),
        ({"public_url": "https://ops.example.com/ops/"}, True),
        ({"public_url": "https://ops.example.com/ops/", "cookie_secure": False}, False),
        ({"cookie_secure": True}, True),
    ],
)
async def test_the_cookie_is_secure_when_the_public_url_is_https(
    make_rig: RigFactory, settings: dict[str, Any], secure: bool
) -> None:
    rig = await make_rig(**settings)
    resp = await rig.login()
    assert resp.status == 200
    attributes = _attributes(resp.headers["Set-Cookie"])
    assert resp.headers["Set-Cookie"].startswith(f"{COOKIE_NAME}=")
    assert ("secure" in attributes) is secure
    assert "httponly" in attributes
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/ops"
    csrf = (await resp.json())["csrf_token"]
    # logging out deletes the cookie with the same attributes (sent by hand: the test
    # client keeps a Secure cookie off plain HTTP, as a browser does)
    cookie = f"{COOKIE_NAME}={resp.cookies[COOKIE_NAME].value}"
    resp = await rig.client.post("/ops/logout", headers={CSRF_HEADER: csrf, "Cookie": cookie})
    assert resp.status == 200
    deleted = _attributes(resp.headers["Set-Cookie"])
    assert ("secure" in deleted) is secure
    assert deleted["max-age"] == "0"
    assert deleted["samesite"] == "Strict"


async def test_a_login_from_the_public_url_is_not_cross_site(make_rig: RigFactory) -> None:
    # behind a TLS-terminating proxy the page's origin is the public URL's, not the
    # plain-HTTP address the request reaches the dashboard at
    rig = await make_rig(public_url="https://ops.example.com/ops/")
    assert (await rig.login(Origin="https://ops.example.com")).status == 200
    assert (await rig.login(Origin="https://evil.example")).status == 403
    assert (await rig.login(Origin="http://ops.example.com")).status == 403
    assert (await rig.login(Origin="https://ops.example.com:8443")).status == 403
    plain = await make_rig()
    assert (await plain.login(Origin="https://ops.example.com")).status == 403


# -- the live stream -------------------------------------------------------------------------


@pytest.mark.parametrize("heartbeat_s", [0.02, 3600.0])
async def test_the_live_stream_ends_at_logout(make_rig: RigFactory, heartbeat_s: float) -> None:
    rig = await make_rig(heartbeat_s=heartbeat_s)
    csrf = (await (await rig.login()).json())["csrf_token"]
    resp = await _open_stream(rig)
    case = make_case("case-1", DeviceRecord("dev-1", "owner-1", "m"), "f", "opened")
    rig.feed.publish(case)
    item = await _item(resp)
    while item == ("beat", None):
        item = await _item(resp)
    assert item[0] == "case"
    assert item[1]["case_id"] == "case-1"
    assert (await rig.client.post("/ops/logout", headers={CSRF_HEADER: csrf})).status == 200
    beats = await _until_logout(resp)
    if heartbeat_s > 60:
        assert beats == 0  # logout wakes the stream; it does not wait for a heartbeat
    rig.feed.publish(case)  # nothing left to send it to
    assert rig.feed.subscribers == 0
    assert (await rig.client.get("/ops/api/ping")).status == 401


async def test_heartbeats_do_not_keep_a_session_alive(make_rig: RigFactory) -> None:
    rig = await make_rig(heartbeat_s=0.02)
    login = await rig.login()
    assert login.status == 200
    session_id = login.cookies[COOKIE_NAME].value
    resp = await _open_stream(rig)
    rig.clock.advance(IDLE_S - 10)
    for _ in range(3):  # heartbeats sent while the session had 10 s left ...
        assert await _item(resp) == ("beat", None)
    session = rig.client.app[SESSIONS_KEY].peek(session_id)
    assert session is not None
    assert session.expires_at == NOW + timedelta(seconds=IDLE_S)  # ... did not extend it
    rig.clock.advance(11)
    await _until_logout(resp)
    assert (await rig.client.get("/ops/api/ping")).status == 401


async def test_opening_the_stream_does_not_extend_the_session(make_rig: RigFactory) -> None:
    rig = await make_rig(heartbeat_s=3600.0)
    assert (await rig.login()).status == 200
    rig.clock.advance(IDLE_S - 10)
    resp = await _open_stream(rig)
    resp.close()
    rig.clock.advance(11)
    assert (await rig.client.get("/ops/api/events")).status == 401
    assert (await rig.client.get("/ops/api/ping")).status == 401


async def test_refreshes_the_page_makes_on_its_own_do_not_extend_the_session(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    assert (await rig.login()).status == 200
    background = {"X-Ops-Background": "1"}
    rig.clock.advance(IDLE_S - 10)
    assert (await rig.client.get("/ops/api/fleet", headers=background)).status == 200
    rig.clock.advance(11)
    assert (await rig.client.get("/ops/api/fleet", headers=background)).status == 401
    assert (await rig.login()).status == 200
    rig.clock.advance(IDLE_S - 10)
    assert (await rig.client.get("/ops/api/fleet")).status == 200  # a person's request
    rig.clock.advance(11)
    assert (await rig.client.get("/ops/api/fleet")).status == 200


async def test_a_case_after_expiry_is_not_sent(make_rig: RigFactory) -> None:
    rig = await make_rig(heartbeat_s=3600.0)
    assert (await rig.login()).status == 200
    resp = await _open_stream(rig)
    rig.clock.advance(IDLE_S + 1)
    rig.feed.publish(make_case("case-1", DeviceRecord("dev-1", "owner-1", "m"), "f", "opened"))
    assert await _until_logout(resp) == 0


async def test_the_stream_ends_at_the_absolute_limit_while_the_user_works(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(heartbeat_s=0.02, session_max_s=3 * IDLE_S)
    assert (await rig.login()).status == 200
    resp = await _open_stream(rig)
    for _ in range(3):  # a person's requests keep it alive, up to the absolute limit
        rig.clock.advance(IDLE_S - 1)
        assert (await rig.client.get("/ops/api/ping")).status == 200
        assert await _item(resp) == ("beat", None)
    rig.clock.advance(IDLE_S)  # past login + session_max_s, though used 1 s ago
    await _until_logout(resp)


def test_peek_neither_extends_nor_keeps_an_expired_session() -> None:
    clock = ManualClock(NOW)
    sessions = SessionStore(clock, idle_s=IDLE_S)
    session_id, session = sessions.create(OpsUser("ops", "admin", "scrypt$x"))
    clock.advance(IDLE_S - 1)
    assert sessions.peek(session_id) == session  # expires_at unchanged
    clock.advance(1)
    assert sessions.peek(session_id) is None
    assert len(sessions) == 0
    assert sessions.get(session_id) is None
    _, session = sessions.create(OpsUser("ops", "admin", "scrypt$x"))
    assert session.expires_at == NOW + timedelta(seconds=2 * IDLE_S)
