"""The outbox's send policy for one connection (the device's half of contract v1).

:class:`SendQueue` says which stored messages a connection publishes next and what
became of them: in outbox order, a bounded number in flight, at a pace, messages past
the gateway's backfill window dropped and counted, each one removed only when the broker
has acknowledged it. Both transports use it: :class:`device.client.Device` and the
simulator's fleet runner; what they send was built by :class:`device.core.DeviceCore`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final

from device.contract import MAX_AGE_MS
from device.core import _wall_ms
from device.errors import DeviceConfigError
from device.store import DeviceState, OutboxRow

__all__ = ["SendQueue"]


#: Messages read from the outbox at a time.
_BATCH: Final = 200
#: Spare minute: a message this close to the gateway's backfill window is not sent.
_EXPIRY_MARGIN_MS: Final = 60_000


class SendQueue:
    """Which outbox messages one connection publishes next, and what became of them.

    In outbox order; at most ``max_inflight`` unacknowledged; with ``rate_per_s``, a
    token bucket (burst ``max_inflight``) on ``monotonic`` time; a message whose ``ts``
    is within a minute of the gateway's backfill window is not sent but dropped and
    counted (``expired``). A message leaves the outbox only when :meth:`acked` (or,
    given up on, :meth:`refused`) and :meth:`settle` say so; a new connection starts
    again from the oldest message still in the outbox (:meth:`restart`), so a message
    whose PUBACK was lost is published again (the gateway stores it once).

    Not thread-safe: one transport thread or task uses it.

    Args:
        store: the outbox.
        clock_ms: the device's wall clock, epoch milliseconds (for the backfill window).
        max_inflight: most messages sent and not yet acknowledged.
        rate_per_s: most messages a second; ``None``: as fast as acknowledgements come.
        monotonic: the clock of the rate, in seconds.
    """

    def __init__(
        self,
        store: DeviceState,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        max_inflight: int = 20,
        rate_per_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inflight < 1 or (rate_per_s is not None and rate_per_s <= 0):
            raise DeviceConfigError("max_inflight must be at least 1 and rate_per_s positive")
        self._store = store
        self._clock_ms = clock_ms
        self.max_inflight = max_inflight
        self._rate_per_s = rate_per_s
        self._monotonic = monotonic
        self._tokens = float(max_inflight)
        self._tokens_at = monotonic()
        self._queue: deque[OutboxRow] = deque()
        self._cursor = 0
        self._seen_appends = -1
        self._acked: list[int] = []
        self._refused: list[int] = []
        self._expired: list[int] = []
        self.published = 0

    def restart(self) -> None:
        """A new connection: start again from the oldest message in the outbox."""
        self._queue.clear()
        self._cursor = 0
        self._seen_appends = -1

    def next(self, inflight: int = 0) -> list[OutboxRow]:
        """The messages to publish now, in order, with ``inflight`` still unacknowledged."""
        budget = self.max_inflight - inflight
        if self._rate_per_s is not None:
            now = self._monotonic()
            self._tokens = min(
                float(self.max_inflight),
                self._tokens + (now - self._tokens_at) * self._rate_per_s,
            )
            self._tokens_at = now
            budget = min(budget, int(self._tokens))
        rows: list[OutboxRow] = []
        if budget <= 0:
            return rows
        queue = self._queue
        oldest_ms = self._clock_ms() - MAX_AGE_MS + _EXPIRY_MARGIN_MS
        while len(rows) < budget:
            if not queue:
                store = self._store
                appends = store.appended
                if appends == self._seen_appends:
                    break  # nothing new since the outbox was last read to its end
                fresh = store.pending(self._cursor, _BATCH)
                if len(fresh) < _BATCH:
                    self._seen_appends = appends
                if not fresh:
                    break
                queue.extend(fresh)
            row = queue.popleft()
            self._cursor = row.id
            if row.ts_ms < oldest_ms:
                self._expired.append(row.id)
                continue
            rows.append(row)
        if self._rate_per_s is not None:
            self._tokens -= len(rows)
        return rows

    def acked(self, row_id: int) -> None:
        """The broker acknowledged message ``row_id``."""
        self._acked.append(row_id)
        self.published += 1

    def refused(self, row_id: int) -> None:
        """The broker refused message ``row_id`` for good (counted as ``refused``)."""
        self._refused.append(row_id)

    def settle(self) -> None:
        """Remove what was acknowledged, refused or expired from the outbox."""
        store = self._store
        if self._acked:
            store.remove(self._acked)
            self._acked.clear()
        if self._refused:
            store.remove(self._refused, counter="refused")
            self._refused.clear()
        if self._expired:
            store.remove(self._expired, counter="expired")
            self._expired.clear()
