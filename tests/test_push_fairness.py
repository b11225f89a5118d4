"""Fair, bounded push delivery and retired channels.

One owner's slow channels hold at most their share of the delivery workers while another
owner's message goes out; a message's time budget ends it however many channels and
``Retry-After`` answers it meets; a retired channel stays retired when registered again
until a test message re-verifies it; the channel limit counts retired channels.
No assert here depends on how fast the machine is: each checks an order or a count, and
the waits for a receiver are generous bounds that only a hang would reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import ValidationError
from pytest_aiohttp import AiohttpServer

from notifier.actions import CaseActions, HealthReader
from notifier.api import API_PREFIX, create_api
from notifier.errors import DeliveryError
from notifier.loop import Notice
from notifier.model import Case, ChannelKind, Owner, PushChannel
from notifier.outbox import Outbox
from notifier.push import (
    DeliveryLimits,
    PushDispatcher,
    PushMessage,
    RetryLaterError,
    WebhookSender,
)
from notifier.settings import PushSettings
from notifier.sqlite import SqliteStore
from wire.errors import ConfigError

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SECRET = "a-webhook-secret-for-fairness"
WAIT_S = 30.0  # only a hang reaches it

Client = TestClient[web.Request, web.Application]


def case(case_id: str, owner_id: str) -> Case:
    return Case(case_id, "w-1", owner_id, "washer", "bearing_wear", "opened", "normal", NOW, NOW)


async def push(outbox: Outbox, store: SqliteStore, owner_id: str, case_id: str) -> None:
    owner = await store.get_owner(owner_id)
    assert owner is not None
    await outbox.notify(owner, case(case_id, owner_id), Notice("urgent_safety", urgent=True))


async def statuses(store: SqliteStore, owner_id: str) -> dict[str | None, str]:
    return {n.case_id: n.status for n in await store.notifications(owner_id)}


@dataclass
class Receiver:
    """Webhook receivers: ``/slow/...`` answers once the gate opens, ``/quick`` at once."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    quick: asyncio.Event = field(default_factory=asyncio.Event)
    order: list[str] = field(default_factory=list)
    waiting: int = 0
    most_waiting: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/slow/{n}", self.slow)
        app.router.add_post("/quick", self.fast)
        return app

    async def slow(self, request: web.Request) -> web.Response:
        await request.read()
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        self.order.append(request.path)
        return web.Response(status=204)

    async def fast(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.order.append(f"/quick {body['data']['case_id']}")
        self.quick.set()
        return web.Response(status=204)


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    async with SqliteStore(":memory:") as opened:
        yield opened


async def test_one_owners_slow_channels_do_not_hold_up_another_owners_message(
    aiohttp_server: AiohttpServer, store: SqliteStore
) -> None:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    await store.put_owner(Owner("slow", "Sam"))
    await store.put_owner(Owner("quick", "Quinn"))
    for n in range(20):
        url = str(server.make_url(f"/slow/{n}"))
        await store.put_channel(PushChannel(f"s{n:02}", "slow", "webhook", url, {"secret": SECRET}))
    url = str(server.make_url("/quick"))
    await store.put_channel(PushChannel("q", "quick", "webhook", url, {"secret": SECRET}))
    async with WebhookSender(timeout_s=WAIT_S * 4, allow_internal=True) as sender:
        limits = DeliveryLimits(workers=3, per_owner=1, budget_s=WAIT_S * 4)
        outbox = Outbox(store, PushDispatcher({"webhook": sender}, limits=limits))
        worker = asyncio.create_task(outbox.run())
        try:
            for n in range(5):  # a backlog of the slow owner's messages first
                await push(outbox, store, "slow", f"slow-{n}")
            await push(outbox, store, "quick", "quick-0")
            await asyncio.wait_for(receiver.quick.wait(), WAIT_S)
            for _ in range(int(WAIT_S * 10)):  # until its outcome is stored
                if (await statuses(store, "quick"))["quick-0"] == "sent":
                    break
                await asyncio.sleep(0.1)
            # the quick owner's message is out while the slow owner's first still hangs
            assert (await statuses(store, "quick")) == {"quick-0": "sent"}
            assert set((await statuses(store, "slow")).values()) == {"queued"}
            assert receiver.order == ["/quick quick-0"]
            # the slow owner has one message out: their share of the workers, no more
            assert receiver.waiting == receiver.most_waiting == 1
            receiver.gate.set()
            await asyncio.wait_for(outbox.drain(), WAIT_S)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    assert set((await statuses(store, "slow")).values()) == {"sent"}
    assert receiver.order[1:] == ["/slow/0"] * 5  # the first channel took each, in turn
    assert outbox.sent == 6
    assert outbox.out_of_time == 0


async def test_one_owners_503_channels_end_within_the_budget_and_hold_up_no_one(
    aiohttp_server: AiohttpServer, store: SqliteStore
) -> None:
    calls: list[str] = []
    quick_seen = asyncio.Event()

    async def busy(request: web.Request) -> web.Response:
        await request.read()
        calls.append(request.path)
        return web.Response(status=503, headers={"Retry-After": "1"})

    async def quick(request: web.Request) -> web.Response:
        await request.read()
        calls.append(request.path)
        quick_seen.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/busy/{n}", busy)
    app.router.add_post("/quick", quick)
    server = await aiohttp_server(app)
    await store.put_owner(Owner("busy", "Bo"))
    await store.put_owner(Owner("quick", "Quinn"))
    for n in range(20):
        url = str(server.make_url(f"/busy/{n}"))
        await store.put_channel(PushChannel(f"b{n:02}", "busy", "webhook", url, {"secret": SECRET}))
    url = str(server.make_url("/quick"))
    await store.put_channel(PushChannel("q", "quick", "webhook", url, {"secret": SECRET}))
    fake = FakeTime()

    async def pause(delay_s: float) -> None:
        if not fake.slept:
            # the busy owner's message is paused on its first Retry-After: the other
            # owner's must get through now (queued behind it, this wait would time out)
            await asyncio.wait_for(quick_seen.wait(), WAIT_S)
        await fake.sleep(delay_s)

    async with WebhookSender(timeout_s=WAIT_S, allow_internal=True) as sender:
        dispatcher = PushDispatcher(
            {"webhook": sender},
            attempts=4,
            max_delay_s=30.0,
            limits=DeliveryLimits(workers=2, per_owner=1, budget_s=30.0),
            sleep=pause,
            clock=fake,
        )
        outbox = Outbox(store, dispatcher)
        worker = asyncio.create_task(outbox.run())
        try:
            await push(outbox, store, "busy", "busy-0")
            await push(outbox, store, "quick", "quick-0")
            await asyncio.wait_for(outbox.drain(), WAIT_S)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    assert await statuses(store, "quick") == {"quick-0": "sent"}
    assert await statuses(store, "busy") == {"busy-0": "failed"}
    # each Retry-After of 1 s was honoured while it fitted in the 30 s; after that, the
    # channels left got one try each and no pause
    assert fake.slept == [1.0] * len(fake.slept)
    assert 30.0 - 2.0 <= fake.now < 30.0
    busy_calls = [c for c in calls if c.startswith("/busy/")]
    assert len(set(busy_calls)) == 20
    assert len(busy_calls) == len(fake.slept) + 20 < 20 * 4
    # the other owner's message went out during the busy owner's first pause
    assert calls.index("/quick") <= 1  # before the busy owner's second try
    assert outbox.errors == 0


@dataclass
class Scripted:
    """A sender whose channels fail or hang as told; it records every call, in order."""

    kind: ChannelKind = "webhook"
    calls: list[str] = field(default_factory=list)
    hang: set[str] = field(default_factory=set)
    retry_after: dict[str, float] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    on_call: Callable[[], None] | None = None

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        self.calls.append(f"{channel.channel_id} {message.data.get('case_id', '')}".strip())
        if self.on_call is not None:
            self.on_call()
        if channel.channel_id in self.hang:
            await asyncio.Event().wait()
        if channel.channel_id in self.retry_after:
            raise RetryLaterError("503", self.retry_after[channel.channel_id])
        if channel.channel_id in self.down:
            raise DeliveryError("away")


class FakeTime:
    """A monotonic clock that only the test's sleeps and sends move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.slept.append(delay_s)
        self.now += delay_s


def channels(owner_id: str, n: int) -> list[PushChannel]:
    return [
        PushChannel(f"{owner_id}-{i:02}", owner_id, "webhook", f"https://h{i}.example/x")
        for i in range(n)
    ]


async def test_the_time_budget_ends_a_message_over_20_channels_of_retry_after() -> None:
    fake = FakeTime()
    owned = channels("ann", 20)
    # every channel answers 503 with Retry-After: 5 s, and each answer takes 2 s
    sender = Scripted(retry_after={c.channel_id: 5.0 for c in owned})
    sender.on_call = lambda: setattr(fake, "now", fake.now + 2.0)
    dispatcher = PushDispatcher(
        {"webhook": sender},
        attempts=4,
        max_delay_s=30.0,
        limits=DeliveryLimits(budget_s=60.0),
        sleep=fake.sleep,
        clock=fake,
    )
    report = await dispatcher.deliver(owned, (), PushMessage("t", "b"))
    assert not report.delivered
    assert report.out_of_time
    assert fake.now <= 60.0 + 2.0  # at most one answer past the end, never a pause
    assert sum(fake.slept) < 60.0
    assert report.attempts == len(sender.calls) < 20 * 4
    # each channel tried was counted as failing once; the ones never reached were not
    tried = {call.split()[0] for call in sender.calls}
    assert {c.channel_id for c in report.updated} == tried
    assert all(c.failures == 1 for c in report.updated)
    assert len(tried) < 20


async def test_retry_after_is_honoured_only_within_the_budget() -> None:
    fake = FakeTime()
    first, second = channels("ann", 2)
    sender = Scripted(retry_after={first.channel_id: 20.0})
    dispatcher = PushDispatcher(
        {"webhook": sender},
        max_delay_s=30.0,
        limits=DeliveryLimits(budget_s=15.0),
        sleep=fake.sleep,
        clock=fake,
    )
    report = await dispatcher.deliver([first, second], (), PushMessage("t", "b"))
    # 20 s asked, 15 s left: not waited for; the next channel gets the time instead
    assert report.delivered_via == second
    assert fake.slept == []
    # with the time for it, the pause asked for is taken, once: the second would end late
    sender.retry_after[first.channel_id] = 10.0
    report = await dispatcher.deliver([first], (), PushMessage("t", "b"))
    assert fake.slept == [10.0]
    assert report.attempts == 2
    assert not report.delivered


async def test_a_message_past_its_budget_is_marked_failed_and_the_worker_goes_on(
    store: SqliteStore,
) -> None:
    await store.put_owner(Owner("ann", "Ann"))
    await store.put_owner(Owner("bob", "Bob"))
    for channel in (*channels("ann", 2), *channels("bob", 1)):
        await store.put_channel(channel)
    sender = Scripted(hang={"ann-00", "ann-01"})
    # one worker: the hanging message must end for the next one to go out at all
    limits = DeliveryLimits(workers=1, per_owner=1, budget_s=0.2)
    outbox = Outbox(store, PushDispatcher({"webhook": sender}, limits=limits))
    worker = asyncio.create_task(outbox.run())
    try:
        await push(outbox, store, "ann", "a1")
        await push(outbox, store, "bob", "b1")
        await asyncio.wait_for(outbox.drain(), WAIT_S)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert await statuses(store, "ann") == {"a1": "failed"}
    assert await statuses(store, "bob") == {"b1": "sent"}
    assert outbox.out_of_time == 1
    assert outbox.errors == 0
    # the channel cut off counts one failure; the one the budget never reached does not
    kept = {c.channel_id: c.failures for c in await store.channels("ann", active_only=False)}
    assert kept == {"ann-00": 1, "ann-01": 0}
    assert sender.calls == ["ann-00 a1", "bob-00 b1"]


async def test_owners_take_turns_and_one_owner_has_one_message_out(store: SqliteStore) -> None:
    for owner_id in ("ann", "bob", "cat"):
        await store.put_owner(Owner(owner_id, owner_id.title()))
        await store.put_channel(channels(owner_id, 1)[0])
    sender = Scripted()
    limits = DeliveryLimits(workers=1, per_owner=1)
    outbox = Outbox(store, PushDispatcher({"webhook": sender}, limits=limits))
    for n in range(3):
        await push(outbox, store, "ann", f"a{n}")
    await push(outbox, store, "bob", "b0")
    await push(outbox, store, "cat", "c0")
    await push(outbox, store, "bob", "b1")
    worker = asyncio.create_task(outbox.run())
    try:
        await asyncio.wait_for(outbox.drain(), WAIT_S)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    # a backlog of one owner's messages does not go before everyone else's
    assert [call.split()[1] for call in sender.calls] == ["a0", "b0", "c0", "a1", "b1", "a2"]


async def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError):
        DeliveryLimits(workers=0)
    with pytest.raises(ConfigError):
        DeliveryLimits(workers=2, per_owner=3)
    with pytest.raises(ConfigError):
        DeliveryLimits(budget_s=0)
    with pytest.raises(ValidationError):
        PushSettings(workers=2, per_owner=3)
    assert PushSettings().workers > 1


# -- retired channels through the owner API ------------------------------------------------

TOKEN = "tok-ann-0123456789abcdef"
HOOK = {"kind": "webhook", "target": "https://home.example.org/hook", "keys": {"secret": SECRET}}


class Api:
    def __init__(self, client: Client, store: SqliteStore, sender: Scripted) -> None:
        self.client, self.store, self.sender = client, store, sender

    async def post(self, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return await self.client.post(f"{API_PREFIX}{path}", json=body, headers=headers)

    async def listed(self) -> list[dict[str, Any]]:
        resp = await self.client.get(
            f"{API_PREFIX}/me/channels", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 200
        return list((await resp.json())["channels"])


@pytest.fixture
async def api(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], store: SqliteStore
) -> Api:
    await store.put_owner(Owner("ann", "Ann"))
    await store.add_token(TOKEN, ("owner", "ann"))
    sender = Scripted()
    outbox = Outbox(store, PushDispatcher({"webhook": sender}, attempts=1))
    app = create_api(
        store=store,
        actions=cast(CaseActions, None),
        health=cast(HealthReader, None),
        clock=lambda: NOW,
        verifier=outbox,
    )
    return Api(await aiohttp_client(app), store, sender)


async def test_a_retired_channel_stays_retired_when_registered_again(api: Api) -> None:
    created = await api.post("/me/channels", HOOK)
    assert created.status == 201
    channel_id = (await created.json())["channel_id"]
    assert await api.store.update_channel_state(channel_id, active=False, failures=10)
    again = await api.post(
        "/me/channels", {**HOOK, "keys": {"secret": "a-new-secret-for-the-webhook"}}
    )
    assert again.status == 200
    assert (await again.json())["active"] is False
    (kept,) = await api.store.channels("ann", active_only=False)
    assert (kept.channel_id, kept.active, kept.failures) == (channel_id, False, 10)
    assert kept.keys == {
        "secret": "a-new-secret-for-the-webhook"
    }  # the keys are refreshed, not the state
    assert [c["active"] for c in await api.listed()] == [False]  # the owner sees it retired


async def test_a_test_message_that_arrives_re_verifies_the_channel(api: Api) -> None:
    created = await api.post("/me/channels", HOOK)
    channel_id = (await created.json())["channel_id"]
    assert await api.store.update_channel_state(channel_id, active=False, failures=10)
    api.sender.down.add(channel_id)
    refused = await api.post(f"/me/channels/{channel_id}/verify")
    assert refused.status == 409
    assert (await refused.json())["error"]["code"] == "not_verified"
    (kept,) = await api.store.channels("ann", active_only=False)
    assert (kept.active, kept.failures) == (False, 10)
    api.sender.down.clear()
    verified = await api.post(f"/me/channels/{channel_id}/verify")
    assert verified.status == 200
    assert (await verified.json())["active"] is True
    (kept,) = await api.store.channels("ann", active_only=False)
    assert (kept.active, kept.failures) == (True, 0)
    assert api.sender.calls == [channel_id, channel_id]  # the test message, over it only
    missing = await api.post("/me/channels/ch-nope/verify")
    assert missing.status == 404


async def test_the_channel_limit_counts_retired_channels(api: Api) -> None:
    for n in range(20):
        resp = await api.post("/me/channels", {**HOOK, "target": f"https://h{n}.example.org/x"})
        assert resp.status == 201
    for channel in (await api.store.channels("ann", active_only=False))[:10]:
        await api.store.update_channel_state(channel.channel_id, active=False, failures=10)
    over = await api.post("/me/channels", {**HOOK, "target": "https://h99.example.org/x"})
    assert over.status == 422
    assert len(await api.listed()) == 20
