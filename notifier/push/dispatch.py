"""Choosing the owner's channel and retrying (notifier: outbox -> here -> push senders).

:class:`PushDispatcher` tries an owner's active channels in their order of
preference (the owner's preferred kinds first, in that order, then every other
channel as the store lists them) until one takes the message:

* :class:`~notifier.errors.DeliveryError` (the service is away or throttles) is retried
  on the same channel with jittered exponential backoff, up to the policy's attempts,
  then the next channel is tried. A ``Retry-After`` is honoured: the pause is what the
  service asked for; when it asks for more than the policy's longest pause, the
  channel is given up for this message rather than holding up the owner's other
  channels.
* :class:`~notifier.errors.DeadTokenError` retires the channel: it comes back in the
  report as ``replace(channel, active=False)`` and is not tried again.
* any other :class:`~wire.errors.PermanentError` moves on to the next channel at once.

**Failures in a row.** Each channel that did not take the message (after its retries,
refused, or dead) counts one more failed delivery in :attr:`PushChannel.failures`; the
channel that took it goes back to 0. A channel whose count reaches ``max_failures`` is
retired like a dead one. This is the one place channels are retired: the report's
``updated`` holds every channel whose record changed (``retired`` the ones among them
now inactive).

**Bounded time**. Each message has a time budget (:class:`DeliveryLimits`
``budget_s``) for everything: every channel, every retry and every pause. A pause that
would end past it is not taken (``Retry-After`` is honoured only within the budget: a
longer one gives the channel up for this message); a send still running when it ends is
cut off and counts as a failure of that channel; the channels not reached are not
counted. The report then says ``out_of_time``, and the caller records the message as not
delivered. **Bounded sharing**: at most ``per_channel`` messages use one channel at a
time (a message holds its slot through its retries on that channel).

The dispatcher changes no store: the caller saves the updated channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from notifier.errors import DeadTokenError, DeliveryError
from notifier.model import ChannelKind, PushChannel
from notifier.push.base import PushMessage, PushSender, RetryLaterError
from wire.errors import ConfigError, PermanentError

__all__ = ["DeliveryLimits", "DeliveryReport", "PushDispatcher", "RetryPolicy"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one channel.

    Attributes:
        attempts: tries per channel before the next one (at least 1).
        base_delay_s: the first pause; each further pause doubles, up to ``max_delay_s``.
        max_delay_s: the longest pause, and the longest ``Retry-After`` waited for.

    Raises:
        ConfigError: fewer than one attempt or a negative or inverted delay.
    """

    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"push attempts must be at least 1, got {self.attempts}")
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise ConfigError("push delays need 0 <= base_delay_s <= max_delay_s")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The pause before retry number ``retry`` (0 for the first).

        "Equal jitter": half the exponential step, plus a random part of the other
        half, so pauses grow yet clients that failed together do not retry together.
        """
        step = min(self.max_delay_s, self.base_delay_s * 2.0**retry)
        return step / 2 + rng.uniform(0.0, step / 2)


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """How much of the delivery capacity one message, owner or channel may take.

    Attributes:
        workers: messages delivered at the same time (the outbox's delivery workers).
        per_owner: of those, at most this many for one owner, so that one owner's
            backlog (or slow channels) leaves the other workers to everyone else.
        per_channel: messages using one channel at the same time.
        budget_s: the time one message may take, over all its channels, retries and
            pauses; past it the message is given up as not delivered.

    Raises:
        ConfigError: a count below 1, ``per_owner`` above ``workers``, or a budget that
            is not positive.
    """

    workers: int = 4
    per_owner: int = 1
    per_channel: int = 1
    budget_s: float = 120.0

    def __post_init__(self) -> None:
        if min(self.workers, self.per_owner, self.per_channel) < 1:
            raise ConfigError("push workers, per_owner and per_channel must be at least 1")
        if self.per_owner > self.workers:
            raise ConfigError("push per_owner must not exceed workers")
        if not self.budget_s > 0:
            raise ConfigError(f"push budget_s must be positive, got {self.budget_s}")


class _Slots:
    """At most ``size`` holders per key; keys nobody holds or waits for are forgotten."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        semaphore, users = self._keys.get(key, (asyncio.Semaphore(self._size), 0))
        self._keys[key] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._keys[key]
            if users <= 1:
                del self._keys[key]
            else:
                self._keys[key] = (semaphore, users - 1)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one :meth:`PushDispatcher.deliver` did.

    Attributes:
        delivered_via: the channel that took the message (its failures back to 0), or
            ``None`` if none did.
        retired: channels now ``active=False``: dead, or failed ``max_failures`` times
            in a row.
        attempts: send calls made, over all channels.
        errors: why each failed call failed, in order (channel ids, never tokens).
        updated: every channel whose record changed (failures counted or reset, retired),
            in the order tried: save them.
        out_of_time: the message's time budget ended before a channel took it.
    """

    delivered_via: PushChannel | None
    retired: tuple[PushChannel, ...]
    attempts: int
    errors: tuple[str, ...]
    updated: tuple[PushChannel, ...] = ()
    out_of_time: bool = False

    @property
    def delivered(self) -> bool:
        """Whether some channel took the message."""
        return self.delivered_via is not None


class PushDispatcher:
    """Delivers a message over the first of an owner's channels that takes it.

    Args:
        senders: the sender for each channel kind (channels of other kinds are skipped).
        attempts: tries per channel (see :class:`RetryPolicy`).
        base_delay_s: the first backoff pause.
        max_delay_s: the longest pause, and the longest ``Retry-After`` waited for.
        max_failures: failed deliveries in a row after which a channel is retired.
        limits: workers, per-owner and per-channel shares and the time budget of a
            message (the dispatcher keeps the budget and the per-channel share; the
            outbox reads the rest).
        sleep: how to pause (injectable for tests).
        clock: a monotonic clock in seconds, for the budget (injectable for tests, with
            ``sleep``).
        rng: the jitter's random source (injectable for tests).

    Raises:
        ConfigError: an invalid retry policy or ``max_failures`` below 1.
    """

    def __init__(
        self,
        senders: Mapping[ChannelKind, PushSender] | Mapping[str, PushSender],
        *,
        attempts: int = 4,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        max_failures: int = 10,
        limits: DeliveryLimits | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_failures < 1:
            raise ConfigError(f"push max_failures must be at least 1, got {max_failures}")
        self._senders: dict[str, PushSender] = dict(senders.items())
        self.policy = RetryPolicy(attempts, base_delay_s, max_delay_s)
        self.max_failures = max_failures
        self.limits = DeliveryLimits() if limits is None else limits
        self._slots = _Slots(self.limits.per_channel)
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random() if rng is None else rng

    def order(
        self, channels: Sequence[PushChannel], preferred: Sequence[ChannelKind]
    ) -> list[PushChannel]:
        """The active channels in the order they will be tried.

        Args:
            channels: the owner's channels, as the store lists them.
            preferred: the owner's preferred kinds, first first.

        Returns:
            Channels of the preferred kinds (in the order of ``preferred``), then the rest,
            each group in the store's order; inactive channels left out.
        """
        active = [c for c in channels if c.active]
        rank = {kind: i for i, kind in reversed(list(enumerate(preferred)))}
        return sorted(active, key=lambda c: rank.get(c.kind, len(rank)))

    async def deliver(
        self,
        channels: Sequence[PushChannel],
        preferred: Sequence[ChannelKind],
        message: PushMessage,
        *,
        budget_s: float | None = None,
    ) -> DeliveryReport:
        """Deliver ``message`` over the first channel that takes it, within its time budget.

        Args:
            channels: the owner's channels.
            preferred: the owner's preferred kinds, first first (empty: store order).
            message: what to deliver.
            budget_s: the time this message may take (default: the limits' ``budget_s``).

        Returns:
            Which channel delivered (if any), the channels whose record changed (failures
            counted or reset) and those among them now retired, the calls made, the
            reasons of the failures and whether the budget ran out.
        """
        updated: list[PushChannel] = []
        errors: list[str] = []
        calls = 0
        deadline = self._clock() + (self.limits.budget_s if budget_s is None else budget_s)
        for channel in self.order(channels, preferred):
            sender = self._senders.get(channel.kind)
            if sender is None:
                # not the channel's fault: this install has no settings for its service
                errors.append(f"{channel.kind} channel {channel.channel_id}: no sender configured")
                continue
            if self._clock() >= deadline:
                return self._late(message, updated, calls, errors)
            outcome, tries = await self._try_channel(sender, channel, message, errors, deadline)
            calls += tries
            if outcome in ("late", "late_waiting"):
                if outcome == "late":  # cut off while it had the message: its failure
                    updated.append(self._failed(channel, dead=False))
                return self._late(message, updated, calls, errors)
            if outcome == "sent":
                if channel.failures:
                    updated.append(replace(channel, failures=0))
                _LOG.info(
                    "message %s delivered via push channel %s",
                    message.message_id,
                    channel.channel_id,
                )
                return self._report(replace(channel, failures=0), updated, calls, errors)
            updated.append(self._failed(channel, dead=outcome == "dead"))
        _LOG.warning("message %s reached no push channel", message.message_id)
        return self._report(None, updated, calls, errors)

    @staticmethod
    def _report(
        via: PushChannel | None,
        updated: list[PushChannel],
        calls: int,
        errors: list[str],
        *,
        out_of_time: bool = False,
    ) -> DeliveryReport:
        retired = tuple(c for c in updated if not c.active)
        return DeliveryReport(via, retired, calls, tuple(errors), tuple(updated), out_of_time)

    def _late(
        self, message: PushMessage, updated: list[PushChannel], calls: int, errors: list[str]
    ) -> DeliveryReport:
        _LOG.warning(
            "message %s reached no push channel within its time budget", message.message_id
        )
        return self._report(None, updated, calls, errors, out_of_time=True)

    def _failed(self, channel: PushChannel, *, dead: bool) -> PushChannel:
        """The channel after one more failed delivery (retired if dead or at the limit)."""
        failures = channel.failures + 1
        if dead:
            _LOG.info("push channel %s is gone: retired", channel.channel_id)
            return replace(channel, failures=failures, active=False)
        if failures >= self.max_failures:
            _LOG.warning(
                "push channel %s failed %d deliveries in a row: retired",
                channel.channel_id,
                failures,
            )
            return replace(channel, failures=failures, active=False)
        return replace(channel, failures=failures)

    async def _try_channel(
        self,
        sender: PushSender,
        channel: PushChannel,
        message: PushMessage,
        errors: list[str],
        deadline: float,
    ) -> tuple[str, int]:
        """Try one channel with retries until ``deadline``.

        Returns:
            ``("sent" | "dead" | "failed", send calls)``; ``"late"`` when the budget ended
            while the channel had the message, ``"late_waiting"`` when it ended before
            the channel was free to try.
        """
        state = {"calls": 0}
        try:
            async with (
                asyncio.timeout(max(0.0, deadline - self._clock())) as budget,
                self._slots.hold(channel.channel_id),
            ):
                return await self._retry(sender, channel, message, errors, deadline, state)
        except TimeoutError:
            if not budget.expired():
                raise
            errors.append(f"{channel.kind} channel {channel.channel_id}: out of time")
            return ("late" if state["calls"] else "late_waiting"), state["calls"]

    async def _retry(
        self,
        sender: PushSender,
        channel: PushChannel,
        message: PushMessage,
        errors: list[str],
        deadline: float,
        state: dict[str, int],
    ) -> tuple[str, int]:
        for attempt in range(1, self.policy.attempts + 1):
            if attempt > 1 and self._clock() >= deadline:
                errors.append(f"{channel.kind} channel {channel.channel_id}: out of time")
                return "late", attempt - 1
            state["calls"] = attempt
            try:
                await sender.send(channel, message)
            except DeadTokenError as exc:
                errors.append(str(exc))
                return "dead", attempt
            except DeliveryError as exc:
                errors.append(str(exc))
                if attempt == self.policy.attempts:
                    _LOG.warning(
                        "push channel %s failed %d times: trying the next",
                        channel.channel_id,
                        attempt,
                    )
                    return "failed", attempt
                pause_s = self._pause_s(exc, attempt, deadline - self._clock())
                if pause_s is None:
                    _LOG.warning(
                        "push channel %s asks for a pause longer than allowed or than the "
                        "message's time left: trying the next",
                        channel.channel_id,
                    )
                    return "failed", attempt
                _LOG.info(
                    "push channel %s failed (%s): retrying in %.1f s",
                    channel.channel_id,
                    type(exc).__name__,
                    pause_s,
                )
                await self._sleep(pause_s)
            except PermanentError as exc:
                errors.append(str(exc))
                _LOG.warning(
                    "push channel %s refused the message (%s)",
                    channel.channel_id,
                    type(exc).__name__,
                )
                return "failed", attempt
            else:
                return "sent", attempt
        return "failed", self.policy.attempts  # pragma: no cover - the loop always returns

    def _pause_s(self, exc: DeliveryError, attempt: int, left_s: float) -> float | None:
        """The pause before the next try, or ``None`` to give up on the channel.

        A pause that would use up the message's time left (``left_s``) is not taken:
        the next channel gets that time instead.
        """
        asked = exc.retry_after_s if isinstance(exc, RetryLaterError) else None
        if asked is None:
            pause_s = self.policy.backoff_s(attempt - 1, self._rng)
        elif asked > self.policy.max_delay_s:
            return None
        else:
            pause_s = asked
        return pause_s if pause_s < left_s else None
