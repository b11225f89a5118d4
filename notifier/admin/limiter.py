"""Slowing claim-code and invite guessing (notifier; the registry's owner routes -> here).

Part of :mod:`notifier.admin`: the :class:`ClaimLimiter` the claim and invite routes
ask before they check a code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from wire.errors import ConfigError

__all__ = ["ClaimLimiter"]

_LONG_AGO: Final = datetime.min.replace(tzinfo=UTC)


@dataclass(slots=True)
class _Tries:
    failures: int = 0
    blocked_until: datetime = _LONG_AGO
    last: datetime = _LONG_AGO


class ClaimLimiter:
    """Slows claim-code guessing per owner and per source address.

    Every attempt is counted as a failure *before* its code is checked, in one step with
    the check of the limits (no ``await`` between), so parallel requests cannot all slip
    through; an attempt that then succeeds takes its count back. Past ``free`` failures,
    each further one opens a wait that doubles (``backoff_s``, ``2 * backoff_s`` ... up to
    ``max_backoff_s``) during which the owner, or the address, is refused without a
    check. Counts are forgotten after ``window_s`` of quiet once the last wait ended.

    Args:
        owner_failures: free failures per owner.
        source_failures: free failures per source address (a household shares one).
        backoff_s: the first wait.
        max_backoff_s: the longest wait.
        window_s: quiet time after which failures are forgotten.
        max_keys: bound on the owners and addresses tracked (the oldest go first).

    Raises:
        ConfigError: a limit below 1 or a wait that is not positive.
    """

    def __init__(
        self,
        *,
        owner_failures: int = 5,
        source_failures: int = 10,
        backoff_s: float = 2.0,
        max_backoff_s: float = 3_600.0,
        window_s: float = 900.0,
        max_keys: int = 10_000,
    ) -> None:
        if owner_failures < 1 or source_failures < 1 or max_keys < 1:
            raise ConfigError("claim limits must be at least 1")
        if not 0 < backoff_s <= max_backoff_s or window_s <= 0:
            raise ConfigError("claim waits need 0 < backoff_s <= max_backoff_s, window_s > 0")
        self._free = {"owner": owner_failures, "source": source_failures}
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._window = timedelta(seconds=window_s)
        self._max_keys = max_keys
        self._tries: OrderedDict[tuple[str, str], _Tries] = OrderedDict()

    def _live(self, key: tuple[str, str], now: datetime) -> _Tries | None:
        tries = self._tries.get(key)
        if tries is not None and now - max(tries.last, tries.blocked_until) >= self._window:
            del self._tries[key]
            return None
        return tries

    def begin(self, keys: Sequence[tuple[str, str]], now: datetime) -> float:
        """Check the limits and count the attempt as a failure; return the wait (0: go).

        Args:
            keys: ``("owner", id)`` and ``("source", address)``.
            now: the current time.

        Returns:
            Seconds to wait before the next attempt (0: this one may go on, and is
            counted until :meth:`succeeded` takes it back).
        """
        wait = 0.0
        for key in keys:
            tries = self._live(key, now)
            if tries is not None:
                wait = max(wait, (tries.blocked_until - now).total_seconds())
        if wait > 0:
            return wait
        for key in keys:
            tries = self._live(key, now) or _Tries()
            tries.failures += 1
            tries.last = now
            free = self._free[key[0]]
            if tries.failures >= free:
                steps = min(tries.failures - free, 60)
                delay = min(self._max_backoff_s, self._backoff_s * 2.0**steps)
                tries.blocked_until = now + timedelta(seconds=delay)
            self._tries[key] = tries
            self._tries.move_to_end(key)
        while len(self._tries) > self._max_keys:
            self._tries.popitem(last=False)
        return 0.0

    def succeeded(self, keys: Sequence[tuple[str, str]]) -> None:
        """Take back the count of an attempt that succeeded (and its wait)."""
        for key in keys:
            tries = self._tries.get(key)
            if tries is None:
                continue
            tries.failures = max(tries.failures - 1, 0)
            if tries.failures == 0:
                del self._tries[key]
            elif tries.failures < self._free[key[0]]:
                tries.blocked_until = _LONG_AGO  # this attempt's own wait goes with it
