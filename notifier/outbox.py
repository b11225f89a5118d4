"""The outbox: what the owner is told, when, and through which channel (notifier).

The case machine says *what* happened (a :class:`~notifier.loop.Notice`); the outbox
writes it in the owner's language (:mod:`notifier.messages`), keeps it in the case
store, and delivers it through the owner's push channels (:mod:`notifier.push`; the
dispatcher the settings call for is :mod:`notifier.dispatcher`) on a worker of its own,
so that a slow push service never holds up the case machine.

Owners are not flooded: during their quiet hours (in their own time zone) and past
their daily limit a message is *held*, unless it is urgent; held messages go out as one
digest when the owner can be reached again. After each delivery the channels' records
are brought up to date (:class:`~notifier.push.DeliveryReport` ``updated``): failures in
a row counted or reset, and a channel retired when the push service calls it dead or
it has failed ``max_failures`` deliveries in a row.

One-tap buttons carry a signed link (:mod:`notifier.links`) to the owner API, so that
a tap works without signing in, for that one action on that one case, once.

**Fair delivery**. Several delivery workers (:class:`~notifier.push.DeliveryLimits`
``workers``) take messages owner by owner in turn (:mod:`notifier.turns`), and at most
``per_owner`` of one owner's messages are out at a time, so one owner's backlog or slow
channels hold at most that share of the workers while everyone else's messages go on;
each message has a time budget (``budget_s``, all channels and retries included), past
which it is recorded as ``failed`` and its worker moves on. A retired channel is used
again only after the owner re-verifies it (:meth:`Outbox.verify_channel`: a test
message that arrives).

**Side by side**. Notifier instances share one store, so what must hold for
all of them is decided there: each message is kept once per idempotency key
(:func:`~notifier.loop.notice_key`: a race or a step done again after a crash writes no
second message), the daily limit is counted in the same transaction as the write, and a
``queued`` message is delivered only by the instance that holds its claim (taken when it
is written, or by a sweep, ``FOR UPDATE SKIP LOCKED``; checked again right before the
push; it runs out ten seconds after the time budget, so a dead instance's messages are
swept up by another). Every retry of a message carries the same ``message_id`` (its
notification id), which receivers use to drop what they already have. Digests are sent
to the owners the store holds messages for, by whichever instance flushes first (the
digest is keyed by the messages it covers).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifier.dispatcher import build_dispatcher
from notifier.links import ActionLinks
from notifier.loop import Notice, notice_key
from notifier.messages import MessageContext, render
from notifier.model import AuditEntry, Case, Notification, Owner, PushChannel
from notifier.push import DeliveryLimits, PushAction, PushDispatcher, PushMessage
from notifier.store import CaseStore, NewMessage
from notifier.turns import Delivery, OwnerTurns
from wire.errors import TransientError

__all__ = ["Outbox", "build_dispatcher", "in_quiet_hours"]

_LOG = logging.getLogger(__name__)
_DAY: Final = timedelta(days=1)
#: how old a ``queued`` notification must be before :meth:`Outbox.sweep` takes it: the
#: process that wrote it has had this long to hand it to its own delivery
_SWEEP_AGE: Final = timedelta(seconds=30)
#: How much longer than a message's time budget its delivery claim lasts (the claim is
#: renewed right before the push, so it must cover one delivery and keeping its outcome).
_CLAIM_MARGIN_S: Final = 10.0
#: The longest a channel's re-verification may take (the owner waits for the answer).
_VERIFY_BUDGET_S: Final = 30.0


#: The words of a channel's test message, by language.
_TEST_WORDS: Final = {
    "en": "This is a test message: your notifications arrive here again.",
    "de": "Dies ist eine Testnachricht: Ihre Benachrichtigungen kommen hier wieder an.",
    "fr": "Ceci est un message de test : vos notifications arrivent de nouveau ici.",
}


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def in_quiet_hours(owner: Owner, at: datetime) -> bool:
    """Whether ``at`` falls in the owner's quiet hours (their local time; may wrap midnight)."""
    start, end = owner.quiet_start, owner.quiet_end
    if start is None or end is None:
        return False
    # wall-clock times: an offset (refused at the API) must not make them incomparable
    start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    if start == end:
        return False
    local: time = at.astimezone(_zone(owner.timezone)).time()
    if start < end:
        return start <= local < end
    return local >= start or local < end


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    """Writes, keeps and delivers owner messages; implements :class:`~notifier.loop.OwnerNotifier`.

    Args:
        store: where notifications are kept (and channels retired).
        dispatcher: delivers over the owner's channels (``None``: keep only).
        clock: wall clock (UTC).
        action_base_url: base address of the owner API for one-tap action links.
        links: signs the one-tap action links (``None``, or no ``action_base_url``: the
            buttons carry no link and the app handles their action ids).
        limits: delivery workers and the per-owner share (default: the dispatcher's).
        holder: this instance's name in the store's delivery claims (default: random).
    """

    def __init__(
        self,
        store: CaseStore,
        dispatcher: PushDispatcher | None,
        *,
        clock: Callable[[], datetime] = _utc_now,
        action_base_url: str | None = None,
        links: ActionLinks | None = None,
        limits: DeliveryLimits | None = None,
        holder: str | None = None,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._base = (action_base_url or "").rstrip("/")
        self._links = links
        if limits is None:
            limits = DeliveryLimits() if dispatcher is None else dispatcher.limits
        self._limits = limits
        #: messages waiting for delivery, owner by owner in turn
        self._turns = OwnerTurns(limits.per_owner)
        self._holder = holder or f"notifier-{secrets.token_hex(4)}"
        self._claim = timedelta(seconds=limits.budget_s + _CLAIM_MARGIN_S)
        self.written = 0
        self.sent = 0
        self.held = 0
        self.failed = 0
        self.dropped = 0
        #: notifications whose delivery raised something unforeseen (marked ``failed``)
        self.errors = 0
        #: notifications given up because their time budget ran out (marked ``failed``)
        self.out_of_time = 0
        #: ``queued`` notifications found in the store and handed to delivery by a sweep
        self.swept = 0
        #: messages not written again: the store had their idempotency key already
        self.duplicates = 0
        #: queued messages not pushed here: another instance held their claim
        self.claimed_elsewhere = 0

    # -- writing ---------------------------------------------------------------------
    async def _context(self, owner: Owner, case: Case, notice: Notice) -> MessageContext:
        device = await self._store.get_device(case.device_id)
        appointment = notice.appointment
        technician = None
        if appointment is not None and appointment.technician_id is not None:
            tech = await self._store.get_technician(appointment.technician_id)
            technician = None if tech is None else tech.name.split()[0]
        days = None
        if case.failure_at is not None:
            days = max(0.0, (case.failure_at - self._clock()).total_seconds() / 86_400)
        return MessageContext(
            owner_name=owner.name,
            device_label=None if device is None else device.label,
            model=case.model,
            fault=case.fault,
            action=notice.action,
            slots=tuple((s.start, s.end) for s in notice.slots),
            appointment=None
            if appointment is None or appointment.start is None or appointment.end is None
            else (appointment.start, appointment.end, technician),
            timezone=owner.timezone,
            reason=notice.reason,
            urgent=notice.urgent,
            days_to_failure=days,
        )

    async def prepare(self, owner: Owner, case: Case, notice: Notice) -> NewMessage:
        """Write the message for ``case`` as it will be kept (``held`` in quiet hours).

        The store keeps it once per key and counts the daily limit when it writes it
        (:meth:`~notifier.store.CaseStore.add_message`, or with the case's step in
        :meth:`~notifier.store.CaseStore.update_case`); :meth:`hand_over` delivers it.
        """
        ctx = await self._context(owner, case, notice)
        message = render(notice.kind, owner.language, ctx)
        now = self._clock()
        quiet = not notice.urgent and in_quiet_hours(owner, now)
        notification = Notification(
            notification_id=uuid.uuid4().hex[:16],
            owner_id=owner.owner_id,
            case_id=case.case_id,
            kind=notice.kind,
            title=message.title,
            body=message.body,
            actions=tuple(message.actions),
            created_at=now,
            status="held" if quiet else "queued",
        )
        # the daily limit is counted where every instance writes (urgent ones pass)
        return NewMessage(
            notification,
            key=notice_key(case, notice),
            holder=self._holder,
            claim_until=now + self._claim,
            max_per_day=None if notice.urgent else owner.max_per_day,
            since=now - _DAY,
        )

    def hand_over(self, owner: Owner, kept: Notification, urgent: bool) -> None:
        """Queue a kept message for delivery (one kept ``held`` waits for a digest)."""
        self.written += 1
        if kept.status == "held":
            self.held += 1
            return
        self._enqueue(owner, kept, urgent)

    async def notify(self, owner: Owner, case: Case, notice: Notice) -> None:
        """Write the message, keep it once, and queue it for delivery (or hold it)."""
        message = await self.prepare(owner, case, notice)
        kept = await self._store.add_message(
            message.notification,
            key=message.key,
            holder=message.holder,
            claim_until=message.claim_until,
            max_per_day=message.max_per_day,
            since=message.since,
        )
        if kept is None:
            self.duplicates += 1
            _LOG.info("case %s: %s was written before; not again", case.case_id, notice.kind)
            return
        self.hand_over(owner, kept, notice.urgent)

    def _enqueue(self, owner: Owner, notification: Notification, urgent: bool) -> None:
        if not self._turns.put(Delivery(owner, notification, urgent)):
            # the message stays in the store (status queued) and in the owner's app
            self.dropped += 1
            _LOG.warning(
                "outbox full: notification %s kept, not pushed", notification.notification_id
            )

    async def _over_limit(self, owner: Owner, now: datetime) -> bool:
        recent = await self._store.notifications(owner.owner_id, since=now - _DAY)
        pushed = sum(1 for n in recent if n.status in ("sent", "queued", "failed"))
        return pushed >= owner.max_per_day

    # -- delivering ------------------------------------------------------------------
    def _push_message(self, notification: Notification, urgent: bool) -> PushMessage:
        case_id = notification.case_id or ""
        links, now = self._links, self._clock()
        actions = tuple(
            PushAction(
                action_id,
                label,
                None
                if links is None or not self._base or not case_id
                else links.url(self._base, case_id, action_id, now=now),
                # ntfy posts to the link in the background: one tap, nothing to open
                background=links is not None and bool(self._base) and bool(case_id),
            )
            for action_id, label in notification.actions
        )
        return PushMessage(
            title=notification.title,
            body=notification.body,
            actions=actions,
            data={
                "notification_id": notification.notification_id,
                "case_id": case_id,
                "kind": notification.kind,
            },
            urgent=urgent,
            collapse_key=case_id or None,
            # the same id on every retry: receivers drop what they already have
            message_id=notification.notification_id,
        )

    async def deliver(self, owner: Owner, notification: Notification, urgent: bool) -> None:
        """Push one notification over the owner's channels and record the outcome.

        Only while this instance holds the message's claim in the store (renewed here):
        a message another instance holds, or that is no longer queued, is left alone.
        """
        now = self._clock()
        if not await self._store.claim_notification(
            notification.notification_id, self._holder, now=now, until=now + self._claim
        ):
            self.claimed_elsewhere += 1
            _LOG.info(
                "notification %s: delivered or held elsewhere; not pushed here",
                notification.notification_id,
            )
            return
        status, channel_id = "failed", None
        if self._dispatcher is not None:
            channels = await self._store.channels(owner.owner_id)
            report = await self._dispatcher.deliver(
                channels, owner.channels, self._push_message(notification, urgent)
            )
            if report.out_of_time:
                self.out_of_time += 1
                _LOG.warning(
                    "notification %s: its time budget ran out before a channel took it; "
                    "marked failed",
                    notification.notification_id,
                )
            for changed in report.updated:
                # only the delivery state: a channel removed meanwhile stays removed
                await self._store.update_channel_state(
                    changed.channel_id, active=changed.active, failures=changed.failures
                )
                if not changed.active:
                    _LOG.info(
                        "retired push channel %s of owner %s", changed.channel_id, owner.owner_id
                    )
            if report.delivered_via is not None:
                status, channel_id = "sent", report.delivered_via.channel_id
        await self._store.add_notification(
            replace(notification, status=status, channel_id=channel_id)
        )
        if status == "sent":
            self.sent += 1
        else:
            self.failed += 1
            await self._audit_failure(notification)

    async def _audit_failure(self, notification: Notification) -> None:
        """Say in the case's trail that the push did not arrive (the trail said "told")."""
        if not notification.case_id:
            return
        try:
            await self._store.add_audit(
                AuditEntry(
                    case_id=notification.case_id,
                    at=self._clock(),
                    actor="system",
                    action="push_failed",
                    reason=f"no push channel took the message: {notification.kind}; "
                    "it waits in the owner's app",
                    evidence={
                        "kind": notification.kind,
                        "notification": notification.notification_id,
                    },
                )
            )
        except TransientError as exc:
            _LOG.warning(
                "notification %s: its failure is not in the trail (%s)",
                notification.notification_id,
                exc,
            )

    async def verify_channel(self, owner: Owner, channel: PushChannel) -> bool:
        """Send a test message over one channel; bring it back into use if it arrives.

        This is how a retired channel is re-verified: registering it again does not
        bring it back. The test goes over that channel only (retries within a short
        budget); if the push service takes it, the channel is made active with no
        failures in a row, else it stays as it is.

        Args:
            owner: the channel's owner (the message is in their language's words).
            channel: the channel, as stored.

        Returns:
            Whether the channel took the test message (and is active now).
        """
        if self._dispatcher is None or channel.owner_id != owner.owner_id:
            return False
        message = PushMessage(
            title="fixloop",
            body=_TEST_WORDS.get(owner.language.split("-")[0], _TEST_WORDS["en"]),
            data={"kind": "channel_test", "channel_id": channel.channel_id},
            ttl_s=3_600,
        )
        report = await self._dispatcher.deliver(
            [replace(channel, active=True)],
            (),
            message,
            budget_s=min(_VERIFY_BUDGET_S, self._limits.budget_s),
        )
        if not report.delivered:
            _LOG.info(
                "push channel %s of owner %s: test message not taken",
                channel.channel_id,
                owner.owner_id,
            )
            return False
        if not await self._store.update_channel_state(channel.channel_id, active=True, failures=0):
            return False  # removed meanwhile: it stays removed
        _LOG.info("push channel %s of owner %s re-verified", channel.channel_id, owner.owner_id)
        return True

    async def run(self) -> None:
        """Deliver queued notifications with the delivery workers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for n in range(self._limits.workers):
                group.create_task(self._work(), name=f"push-delivery-{n}")

    async def _work(self) -> None:
        """One delivery worker: one message at a time, each failure kept to its message."""
        while True:
            item = await self._turns.next()
            owner, notification, urgent = item.owner, item.notification, item.urgent
            try:
                await self.deliver(owner, notification, urgent)
            except TransientError:
                # the store is away: the message stays queued in the store and the app
                self.failed += 1
                _LOG.warning(
                    "notification %s not delivered: store away", notification.notification_id
                )
            except Exception:
                # one message that trips delivery must not stop everyone else's
                self.errors += 1
                _LOG.exception(
                    "notification %s could not be delivered; marked failed, delivery goes on",
                    notification.notification_id,
                )
                await self._mark_failed(notification)
            finally:
                self._turns.finished(item)

    async def _mark_failed(self, notification: Notification) -> None:
        try:
            await self._store.add_notification(replace(notification, status="failed"))
        except Exception:
            _LOG.exception(
                "notification %s: its failure could not be stored", notification.notification_id
            )

    async def sweep(self, *, limit: int = 1_000) -> int:
        """Hand to delivery what the store holds as ``queued`` and no delivery has taken.

        Such a message was written by another process (an ops message from the
        dashboard), or this process stopped or lost the store before delivering it or
        keeping its outcome. It is delivered once, like any other (never urgent: it
        was judged when written). Messages written in the last 30 seconds are left to
        the process that wrote them.

        Args:
            limit: how many to take in one sweep, oldest first.

        Returns:
            How many were handed to delivery.
        """
        now = self._clock()
        found = await self._store.claim_queued(
            self._holder, now=now, until=now + self._claim, before=now - _SWEEP_AGE, limit=limit
        )
        taken = 0
        for notification in found:
            notification_id = notification.notification_id
            if self._turns.knows(notification_id):
                continue
            owner = await self._store.get_owner(notification.owner_id)
            if owner is None:
                continue  # erased meanwhile: nothing to deliver, nobody to tell
            self._enqueue(owner, notification, urgent=False)
            taken += 1
        if taken:
            self.swept += taken
            _LOG.info("%d queued notification(s) found in the store and sent on", taken)
        return taken

    async def drain(self) -> None:
        """Wait until every queued notification was tried (needs :meth:`run` running)."""
        await self._turns.drain()

    async def flush(self) -> int:
        """Send one digest to each owner with held messages who can be reached now."""
        now = self._clock()
        sent = 0
        for owner_id in await self._store.held_owners():
            try:
                sent += await self._flush_owner(owner_id, now)
            except TransientError:
                raise
            except Exception:
                # one owner's digest that fails must not hold back everyone else's
                self.errors += 1
                _LOG.exception("digest for owner %s failed; the others go on", owner_id)
        return sent

    async def _flush_owner(self, owner_id: str, now: datetime) -> int:
        """Send one owner's digest if they have held messages and can be reached now."""
        owner = await self._store.get_owner(owner_id)
        if owner is None:
            return 0
        if in_quiet_hours(owner, now) or await self._over_limit(owner, now):
            return 0
        held = await self._store.notifications(owner_id, status="held")
        if not held:
            return 0
        message = render(
            "digest",
            owner.language,
            MessageContext(
                owner_name=owner.name,
                device_label=None,
                model="",
                fault="unknown",
                timezone=owner.timezone,
                count=len(held),
                items=tuple(n.title for n in held),
            ),
        )
        digest = Notification(
            notification_id=uuid.uuid4().hex[:16],
            owner_id=owner_id,
            case_id=held[-1].case_id,
            kind="digest",
            title=message.title,
            body=message.body,
            actions=tuple(message.actions),
            created_at=now,
            status="queued",
        )
        # keyed by the messages it covers: two instances flushing at once write one
        covered = "\n".join(sorted(n.notification_id for n in held)).encode()
        kept = await self._store.add_message(
            digest,
            key=f"digest/{owner_id}/{hashlib.sha256(covered).hexdigest()[:32]}",
            holder=self._holder,
            claim_until=now + self._claim,
        )
        for one in held:
            await self._store.add_notification(replace(one, status="digested"))
        if kept is None:
            self.duplicates += 1
            return 0
        self._enqueue(owner, kept, False)
        return 1
