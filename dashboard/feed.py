"""Live case changes for the dashboard's pages (notifier's ``fleet/cases`` -> here -> browsers).

The composition root feeds a :class:`CaseFeed` from the ``fleet/cases`` MQTT topic (or
straight from the case machine in a one-process install) with :meth:`CaseFeed.publish`;
each open server-sent-events stream holds a :class:`Subscription` with its own bounded
queue. A slow browser never holds up the feed: when its queue is full the oldest change
is dropped and counted (the page refetches when it learns it missed some).

Every publish also bumps :attr:`CaseFeed.version` and is kept in a short log of recent
changes, so the dashboard's cache of fleet-wide reads can catch up with
:meth:`CaseFeed.changes_since` (apply the changed cases to what it holds) instead of
reading every case again. A change without a case (:meth:`CaseFeed.touch`), or a gap
longer than the log, tells the cache to read the store again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from types import TracebackType
from typing import Final, Self

from notifier.model import Case
from wire.errors import ConfigError

__all__ = ["CaseFeed", "Subscription"]

_LOG = logging.getLogger(__name__)

_DEFAULT_QUEUE: Final = 256
_DEFAULT_LOG: Final = 4096


class Subscription:
    """One listener's bounded queue of case changes (drop-oldest when full).

    Use it as an async context manager (from :meth:`CaseFeed.subscribe`); leaving it
    unregisters the listener.
    """

    def __init__(self, feed: CaseFeed, maxsize: int) -> None:
        self._feed = feed
        self._queue: asyncio.Queue[Case | None] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0
        self.closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._feed._unsubscribe(self)

    def _offer(self, item: Case | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            self._feed.dropped += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        """End this listener's stream: :meth:`get` returns ``None`` after what is queued."""
        self._offer(None)

    async def get(self) -> Case | None:
        """Wait for the next change; ``None`` once the feed is closed."""
        if self.closed and self._queue.empty():
            return None
        item = await self._queue.get()
        if item is None:
            self.closed = True
        return item


class CaseFeed:
    """Fan-out of case changes to every open live stream.

    Args:
        queue_size: the bound of each listener's queue.
        log_size: how many recent changes :meth:`changes_since` can hand out.
    """

    def __init__(self, *, queue_size: int = _DEFAULT_QUEUE, log_size: int = _DEFAULT_LOG) -> None:
        if queue_size < 1:
            raise ConfigError("queue_size must be at least 1")
        if log_size < 1:
            raise ConfigError("log_size must be at least 1")
        self._queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._closed = False
        # (version, case) of the newest changes; ``None``: a change without a case
        self._log: deque[tuple[int, Case | None]] = deque(maxlen=log_size)
        #: Changes published so far (a cache key for fleet-wide reads).
        self.version = 0
        #: Changes dropped across all listeners because their queue was full.
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        """How many listeners are registered."""
        return len(self._subscribers)

    def publish(self, case: Case) -> None:
        """Hand a changed case to every listener (never blocks; call on the event loop)."""
        self.version += 1
        self._log.append((self.version, case))
        for subscriber in self._subscribers:
            subscriber._offer(case)

    def touch(self) -> None:
        """Note a change made without a case to publish (fleet-wide caches are stale)."""
        self.version += 1
        self._log.append((self.version, None))

    def changes_since(self, version: int) -> list[Case] | None:
        """The cases published after ``version``, oldest first.

        Args:
            version: a value :attr:`version` had before.

        Returns:
            The changed cases in the order they were published (empty when nothing
            changed), or ``None`` when they are not known: a change without a case
            (:meth:`touch`) came after ``version``, or the log no longer reaches back
            to it.
        """
        if version == self.version:
            return []
        if not self._log or version > self.version:
            return None
        first = self._log[0][0]
        if version + 1 < first:
            return None  # older than the log
        changes: list[Case] = []
        for _, case in itertools.islice(self._log, version + 1 - first, None):
            if case is None:
                return None
            changes.append(case)
        return changes

    def subscribe(self) -> Subscription:
        """Register a listener; use the result with ``async with``."""
        subscription = Subscription(self, self._queue_size)
        if self._closed:
            subscription._offer(None)
        else:
            self._subscribers.add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """End every listener's stream (on shutdown); later subscriptions end at once."""
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.close()
        if self.dropped:
            _LOG.info("case feed closed; %d changes were dropped for slow listeners", self.dropped)
