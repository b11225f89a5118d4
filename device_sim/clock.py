"""Sim time for the simulated fleet (device_sim): faster than real time, or pure stepping.

:class:`SimClock` maps wall time to sim time. With a ``speed`` factor it runs that many
times faster than real time (a factor of 1000 fits weeks of wear into a test); with ``speed=None``
it is a pure stepping clock that never sleeps on its own: :meth:`SimClock.wait_until`
jumps straight to the target, as fast as the caller can step.

Sim time never runs ahead of the real clock: devices must not send timestamps from the
future (the gateway refuses them). So the fleet starts in the past (by default the
simulated duration before now) and, once sim time has caught up with real time, it
proceeds at real time, in both modes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final

from wire.errors import ConfigError

__all__ = ["SimClock"]

_MIN_SLEEP_S: Final = 0.001


class SimClock:
    """Sim time in epoch milliseconds.

    Args:
        start: the sim time at creation (UTC-aware).
        speed: sim seconds per real second, or ``None`` for pure stepping.
        wall_time: the real clock, epoch seconds (injectable for tests).
        monotonic: a monotonic clock, seconds (injectable for tests).
        sleep: how to wait, real seconds (injectable for tests).

    Raises:
        ConfigError: ``start`` is naive or ``speed`` is not positive.
    """

    def __init__(
        self,
        start: datetime,
        speed: float | None = None,
        *,
        wall_time: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if start.tzinfo is None or start.utcoffset() is None:
            raise ConfigError("the sim clock's start must be timezone-aware (UTC)")
        if speed is not None and not speed > 0.0:
            raise ConfigError("the sim clock's speed must be positive")
        self.start_ms = round(start.timestamp() * 1000)
        self.speed = speed
        self._wall_time = wall_time
        self._monotonic = monotonic
        self._sleep = sleep
        self._origin_s = monotonic()
        self._stepped_ms = self.start_ms

    @property
    def stepping(self) -> bool:
        """Whether this is a pure stepping clock (no pacing)."""
        return self.speed is None

    def _wall_ms(self) -> int:
        return round(self._wall_time() * 1000)

    def now_ms(self) -> int:
        """The current sim time, epoch milliseconds (never ahead of the real clock)."""
        if self.speed is None:
            return self._stepped_ms
        elapsed_s = self._monotonic() - self._origin_s
        paced = self.start_ms + round(elapsed_s * self.speed * 1000)
        return min(paced, self._wall_ms())

    def now(self) -> datetime:
        """The current sim time as a UTC-aware datetime."""
        return datetime.fromtimestamp(self.now_ms() / 1000, tz=UTC)

    async def wait_until(self, t_ms: int) -> None:
        """Return once sim time has reached ``t_ms``.

        A stepping clock jumps there at once (it only yields to the event loop), unless
        ``t_ms`` lies ahead of the real clock: then it waits for real time to get there.
        """
        if self.speed is None:
            ahead_ms = t_ms - self._wall_ms()
            while ahead_ms > 0:
                await self._sleep(max(ahead_ms / 1000, _MIN_SLEEP_S))
                ahead_ms = t_ms - self._wall_ms()
            self._stepped_ms = max(self._stepped_ms, t_ms)
            await self._sleep(0)
            return
        while self.now_ms() < t_ms:
            due_s = self._origin_s + (t_ms - self.start_ms) / 1000 / self.speed
            paced_s = due_s - self._monotonic()
            real_s = (t_ms - self._wall_ms()) / 1000
            await self._sleep(max(paced_s, real_s, _MIN_SLEEP_S))
