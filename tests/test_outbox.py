"""The outbox: messages written in the owner's language, held in quiet hours and past the
daily limit, sent as one digest later, and dead channels retired."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import ManualClock

from notifier.errors import DeadTokenError, DeliveryError
from notifier.links import ActionLinks
from notifier.loop import Notice
from notifier.model import Case, DeviceRecord, Notification, Owner, PushChannel
from notifier.outbox import Outbox, in_quiet_hours
from notifier.push import PushDispatcher, PushMessage
from notifier.sqlite import SqliteStore

NOON = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LINKS = ActionLinks("a-link-secret-for-the-outbox-tests", ttl=timedelta(days=2))


@dataclass
class Sender:
    kind: str = "webhook"
    sent: list[tuple[str, PushMessage]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        if channel.channel_id in self.dead:
            raise DeadTokenError("gone")
        if channel.channel_id in self.down:
            raise DeliveryError("away")
        self.sent.append((channel.channel_id, message))


def case(case_id: str, owner_id: str = "eva") -> Case:
    return Case(case_id, "w-1", owner_id, "washer", "bearing_wear", "opened", "normal", NOON, NOON)


Rig = tuple[Outbox, SqliteStore, "Sender", "ManualClock"]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock, sender = ManualClock(NOON), Sender()
    async with SqliteStore(":memory:") as store:
        await store.put_owner(
            Owner("eva", "Eva", language="de", timezone="Europe/Berlin", max_per_day=2)
        )
        await store.put_device(DeviceRecord("w-1", "eva", "washer", label="Keller"))
        for cid in ("old", "new"):
            await store.put_channel(
                PushChannel(cid, "eva", "webhook", f"http://127.0.0.1:1/{cid}", {"secret": "s"})
            )
        dispatcher = PushDispatcher(
            {"webhook": sender},  # type: ignore[dict-item]
            attempts=1,
            max_failures=3,
        )
        outbox = Outbox(
            store, dispatcher, clock=clock, action_base_url="https://api.example/v1", links=LINKS
        )
        worker = asyncio.create_task(outbox.run())
        try:
            yield outbox, store, sender, clock
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)


async def test_message_in_the_owners_language_with_action_links(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    await outbox.notify(owner, case("c1"), Notice("consent_request", action="restart"))
    await outbox.drain()
    assert len(sender.sent) == 1
    channel_id, message = sender.sent[0]
    assert channel_id == "old"
    assert "Keller" in message.body  # the owner's own name for the device, in German
    assert message.data["case_id"] == "c1"
    assert message.data["kind"] == "consent_request"
    ids = [a.action_id for a in message.actions]
    assert ids == ["accept_fix", "decline_fix"]
    for action in message.actions:
        # a signed link for that one action on that case, posted in the background by ntfy
        assert action.background
        assert action.url is not None
        url = urlsplit(action.url)
        assert f"{url.scheme}://{url.netloc}{url.path}" == "https://api.example/v1/cases/c1/tap"
        query = parse_qs(url.query)
        assert query["action"] == [action.action_id]
        (token,) = query["token"]
        grant = LINKS.verify(token, "c1", action.action_id, now=NOON)
        assert grant.expires_at == NOON + timedelta(days=2)
    first, second = (parse_qs(urlsplit(a.url or "").query)["token"][0] for a in message.actions)
    assert first != second
    kept = await store.notifications("eva")
    assert [(n.kind, n.status, n.channel_id) for n in kept] == [("consent_request", "sent", "old")]


async def test_dead_channel_is_retired_and_the_next_used(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    sender.dead.add("old")
    owner = await store.get_owner("eva")
    assert owner is not None
    await outbox.notify(owner, case("c1"), Notice("fix_waiting", action="restart"))
    await outbox.drain()
    assert [cid for cid, _ in sender.sent] == ["new"]
    assert [c.channel_id for c in await store.channels("eva")] == ["new"]
    await outbox.notify(owner, case("c1"), Notice("fixed_remotely", action="restart"))
    await outbox.drain()
    assert [cid for cid, _ in sender.sent] == ["new", "new"]


async def test_quiet_hours_hold_then_one_digest(rig: Rig) -> None:
    outbox, store, sender, clock = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    clock.now = datetime(2026, 12, 7, 22, 30, tzinfo=UTC)  # 23:30 in Berlin
    assert in_quiet_hours(owner, clock.now)
    await outbox.notify(owner, case("c1"), Notice("appointment_booked"))
    await outbox.notify(owner, case("c2"), Notice("resolved"))
    # urgent messages go through quiet hours
    await outbox.notify(owner, case("c3"), Notice("urgent_safety", urgent=True))
    await outbox.drain()
    assert [m.data["kind"] for _, m in sender.sent] == ["urgent_safety"]
    assert await outbox.flush() == 0  # still quiet
    clock.now = datetime(2026, 12, 8, 7, 30, tzinfo=UTC)  # 08:30 in Berlin
    assert await outbox.flush() == 1
    await outbox.drain()
    assert [m.data["kind"] for _, m in sender.sent] == ["urgent_safety", "digest"]
    statuses = sorted(n.status for n in await store.notifications("eva"))
    assert statuses == ["digested", "digested", "sent", "sent"]


async def test_daily_limit_holds_the_rest(rig: Rig) -> None:
    outbox, store, sender, clock = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    for n in range(4):
        await outbox.notify(owner, case(f"c{n}"), Notice("fixed_remotely", action="restart"))
    await outbox.drain()
    assert len(sender.sent) == 2  # max_per_day
    assert [n.status for n in await store.notifications("eva", status="held")] == ["held"] * 2
    assert await outbox.flush() == 0  # the day's budget is spent
    clock.now += timedelta(days=1, minutes=1)
    assert await outbox.flush() == 1
    await outbox.drain()
    assert sender.sent[-1][1].data["kind"] == "digest"


def test_quiet_hours_wrap_midnight_in_the_owners_zone() -> None:
    owner = Owner("x", "X", timezone="America/New_York", quiet_start=time(22), quiet_end=time(7))
    assert in_quiet_hours(owner, datetime(2026, 12, 7, 4, 0, tzinfo=UTC))  # 23:00 NY
    assert in_quiet_hours(owner, datetime(2026, 12, 7, 11, 30, tzinfo=UTC))  # 06:30 NY
    assert not in_quiet_hours(owner, datetime(2026, 12, 7, 12, 30, tzinfo=UTC))  # 07:30 NY
    never = replace(owner, quiet_start=None, quiet_end=None)
    assert not in_quiet_hours(never, datetime(2026, 12, 7, 4, 0, tzinfo=UTC))


async def test_buttons_carry_no_link_without_a_signer() -> None:
    async with SqliteStore(":memory:") as store:
        owner = Owner("eva", "Eva", quiet_start=None, quiet_end=None)
        await store.put_owner(owner)
        sender = Sender()
        dispatcher = PushDispatcher({"webhook": sender})  # type: ignore[dict-item]
        await store.put_channel(PushChannel("one", "eva", "webhook", "https://h.example/x"))
        outbox = Outbox(
            store, dispatcher, clock=ManualClock(NOON), action_base_url="https://api.example/v1"
        )
        await outbox.notify(owner, case("c1"), Notice("consent_request", action="restart"))
        notification = (await store.notifications("eva"))[0]
        await outbox.deliver(owner, notification, False)
    ((_, message),) = sender.sent
    assert [(a.action_id, a.url, a.background) for a in message.actions] == [
        ("accept_fix", None, False),
        ("decline_fix", None, False),
    ]


async def test_failures_are_kept_reset_and_retire_the_channel(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    sender.down.add("old")

    async def push(n: int) -> None:
        await outbox.notify(owner, case(f"c{n}"), Notice("urgent_safety", urgent=True))
        await outbox.drain()

    async def failures() -> dict[str, tuple[int, bool]]:
        kept = await store.channels("eva", active_only=False)
        return {c.channel_id: (c.failures, c.active) for c in kept}

    await push(1)
    assert await failures() == {"old": (1, True), "new": (0, True)}
    await push(2)
    assert await failures() == {"old": (2, True), "new": (0, True)}
    sender.down.clear()
    await push(3)
    assert await failures() == {"old": (0, True), "new": (0, True)}  # a success resets
    sender.down.add("old")
    for n in range(4, 7):
        await push(n)
    assert await failures() == {"old": (3, False), "new": (0, True)}  # the limit: retired
    await push(7)
    assert [cid for cid, _ in sender.sent][-1] == "new"
    assert (await failures())["old"] == (3, False)  # no longer tried


async def test_a_channel_removed_during_a_delivery_stays_removed(rig: Rig) -> None:
    _, store, _, clock = rig
    owner = await store.get_owner("eva")
    assert owner is not None

    @dataclass
    class RemovedMeanwhile(Sender):
        async def send(self, channel: PushChannel, message: PushMessage) -> None:
            if channel.channel_id == "old":
                # the owner removes the channel while the push service is failing it
                assert await store.delete_channel("eva", "old")
                raise DeliveryError("away")
            await Sender.send(self, channel, message)

    sender = RemovedMeanwhile()
    dispatcher = PushDispatcher({"webhook": sender}, attempts=1)  # type: ignore[dict-item]
    outbox = Outbox(store, dispatcher, clock=clock)
    await outbox.notify(owner, case("c1"), Notice("urgent_safety", urgent=True))
    notification = (await store.notifications("eva"))[-1]
    await outbox.deliver(owner, notification, True)
    assert [cid for cid, _ in sender.sent] == ["new"]
    # the failure reported for the deleted channel did not bring it back
    assert [c.channel_id for c in await store.channels("eva", active_only=False)] == ["new"]


def test_quiet_hours_with_an_offset_are_read_as_wall_clock_times() -> None:
    # such values are refused at the API; one that reached the store must not crash delivery
    plus_one = timezone(timedelta(hours=1))
    owner = Owner(
        "x",
        "X",
        timezone="Europe/Berlin",
        quiet_start=time(22, tzinfo=plus_one),
        quiet_end=time(7, tzinfo=plus_one),
    )
    assert in_quiet_hours(owner, datetime(2026, 12, 7, 22, 30, tzinfo=UTC))  # 23:30 Berlin
    assert not in_quiet_hours(owner, datetime(2026, 12, 7, 12, 0, tzinfo=UTC))


async def test_one_message_that_trips_delivery_does_not_stop_the_others(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    real_send = sender.send
    calls = 0

    async def send_once_broken(channel: PushChannel, message: PushMessage) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("an unforeseen bug in one message")
        await real_send(channel, message)

    sender.send = send_once_broken  # type: ignore[method-assign]
    await outbox.notify(owner, case("c1"), Notice("fix_waiting", action="restart"))
    await outbox.notify(owner, case("c2"), Notice("fixed_remotely", action="restart"))
    await outbox.drain()
    assert outbox.errors == 1
    assert [m.data["case_id"] for _, m in sender.sent] == ["c2"]
    statuses = {n.case_id: n.status for n in await store.notifications("eva")}
    assert statuses == {"c1": "failed", "c2": "sent"}


async def test_a_push_no_channel_took_is_said_in_the_case_trail(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    sender.down.update({"old", "new"})
    await outbox.notify(owner, case("c9"), Notice("fix_waiting", action="restart"))
    await outbox.drain()
    [failed] = await store.notifications("eva", status="failed")
    trail = await store.audit("c9")
    assert [(e.action, e.evidence["notification"]) for e in trail] == [
        ("push_failed", failed.notification_id)
    ]
    assert "waits in the owner's app" in trail[0].reason


# -- what the store holds as queued and nobody took ------------------------------------------


def queued(notification_id: str, created_at: datetime, owner_id: str = "eva") -> Notification:
    return Notification(
        notification_id=notification_id,
        owner_id=owner_id,
        case_id=None,
        kind="ops_message",
        title="A message from our service team",
        body="We will call you tomorrow.",
        actions=(),
        created_at=created_at,
        status="queued",
    )


async def test_sweep_delivers_what_another_process_queued_once(rig: Rig) -> None:
    outbox, store, sender, clock = rig
    # written by the dashboard's process a minute ago, and one just now
    await store.add_notification(queued("n-old", NOON - timedelta(minutes=1)))
    await store.add_notification(queued("n-new", NOON))
    assert await outbox.sweep() == 1
    await outbox.drain()
    assert [m.body for _, m in sender.sent] == ["We will call you tomorrow."]
    kept = {n.notification_id: n.status for n in await store.notifications("eva")}
    assert kept == {"n-old": "sent", "n-new": "queued"}
    assert await outbox.sweep() == 0  # delivered: not again
    clock.advance(60)
    assert await outbox.sweep() == 1  # the newer one, once its writer had its chance
    await outbox.drain()
    assert len(sender.sent) == 2
    assert outbox.swept == 2


async def test_sweep_never_sends_twice_what_delivery_already_holds(rig: Rig) -> None:
    outbox, store, sender, clock = rig
    owner = await store.get_owner("eva")
    assert owner is not None
    await outbox.notify(owner, case("c1"), Notice("fix_waiting", action="restart"))
    clock.advance(300)
    # whether the delivery has finished by now or not, the sweep leaves it alone
    assert await outbox.sweep() == 0
    await outbox.drain()
    assert await outbox.sweep() == 0
    assert len(sender.sent) == 1


async def test_sweep_retries_a_message_whose_delivery_failed_to_be_kept(rig: Rig) -> None:
    outbox, store, sender, clock = rig
    sender.down.update({"old", "new"})
    await store.add_notification(queued("n-1", NOON - timedelta(minutes=1)))
    assert await outbox.sweep() == 1
    await outbox.drain()
    # no channel took it: failed, said in the store, not retried by sweeps
    assert [n.status for n in await store.notifications("eva")] == ["failed"]
    clock.advance(300)
    assert await outbox.sweep() == 0
    assert sender.sent == []


async def test_sweep_skips_an_erased_owner(rig: Rig) -> None:
    outbox, store, sender, _ = rig
    await store.put_owner(Owner("leo", "Leo"))
    await store.add_notification(queued("n-leo", NOON - timedelta(minutes=1), owner_id="leo"))
    await store.erase_owner("leo")
    assert await outbox.sweep() == 0
    assert sender.sent == []
