"""Fair delivery order for the outbox: owner by owner in turn, a share each.

Place in the pipeline: the :class:`~notifier.outbox.Outbox` puts each message it is to
push here and its delivery workers take them back out. Messages wait per owner; owners
with a message waiting and a free share take turns, oldest message first, and at most
``per_owner`` of one owner's messages are out at a time, so one owner's backlog or slow
channels hold at most that share of the workers while everyone else's messages go on.
The ids of the messages out and of the latest finished are remembered, so a sweep of
the store that read a message just before its outcome was kept does not send it again.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from notifier.model import Notification, Owner

__all__ = ["Delivery", "OwnerTurns"]

#: Most messages waiting; past it a message stays in the store and the app, unpushed.
QUEUE_MAX: Final = 10_000
#: ids of delivered notifications remembered, so a sweep that read the store just
#: before a delivery's outcome was kept does not send it again
_RECENT_MAX: Final = 10_000


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to delivery: its owner, the notification, whether urgent."""

    owner: Owner
    notification: Notification
    urgent: bool


class OwnerTurns:
    """Messages waiting for delivery, taken owner by owner in turn.

    Args:
        per_owner: most messages of one owner out (taken, not finished) at a time.
        max_size: most messages waiting; :meth:`put` refuses more.
    """

    def __init__(self, per_owner: int, max_size: int = QUEUE_MAX) -> None:
        self._per_owner = per_owner
        self._max_size = max_size
        # messages waiting, by owner; owners with one waiting and a free share, in turn
        self._waiting: dict[str, deque[Delivery]] = {}
        self._turns: deque[str] = deque()
        self._in_turns: set[str] = set()
        self._out: Counter[str] = Counter()
        self._size = 0
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready = asyncio.Event()
        # notifications handed to delivery and not finished, and the latest finished
        self._pending: set[str] = set()
        self._recent: OrderedDict[str, None] = OrderedDict()

    def put(self, item: Delivery) -> bool:
        """Queue ``item`` behind its owner's others; ``False`` when the queue is full."""
        if self._size >= self._max_size:
            return False
        owner_id = item.owner.owner_id
        self._pending.add(item.notification.notification_id)
        self._waiting.setdefault(owner_id, deque()).append(item)
        self._size += 1
        self._unfinished += 1
        self._idle.clear()
        self._offer(owner_id)
        return True

    def knows(self, notification_id: str) -> bool:
        """Whether the notification is out for delivery or was delivered lately."""
        return notification_id in self._pending or notification_id in self._recent

    def _offer(self, owner_id: str) -> None:
        """Give the owner a turn if they have a message waiting and a free share."""
        if (
            owner_id in self._waiting
            and owner_id not in self._in_turns
            and self._out[owner_id] < self._per_owner
        ):
            self._turns.append(owner_id)
            self._in_turns.add(owner_id)
            self._ready.set()

    async def next(self) -> Delivery:
        """The next message to deliver: the oldest of the owner whose turn it is."""
        while not self._turns:
            self._ready.clear()
            await self._ready.wait()
        owner_id = self._turns.popleft()
        self._in_turns.discard(owner_id)
        waiting = self._waiting[owner_id]
        item = waiting.popleft()
        if not waiting:
            del self._waiting[owner_id]
        self._size -= 1
        self._out[owner_id] += 1
        self._offer(owner_id)  # to the back of the line, if they may have another out
        return item

    def finished(self, item: Delivery) -> None:
        """Note that a message taken with :meth:`next` was tried (whatever came of it)."""
        notification_id = item.notification.notification_id
        self._pending.discard(notification_id)
        self._recent[notification_id] = None
        if len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)
        owner_id = item.owner.owner_id
        self._out[owner_id] -= 1
        if self._out[owner_id] <= 0:
            del self._out[owner_id]
        self._offer(owner_id)
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every message put was tried."""
        await self._idle.wait()
