"""Keeps a service's long-running stages alive (shared base: every service -> here).

A stage is one endless coroutine of a service: a consumer, a timer loop, a delivery
worker. Each stage isolates a bad item itself (logs it with its id, counts it, parks it
and goes on), so a stage that ends anyway has met something it did not foresee. Before,
such an error ended the service's whole task group silently until shutdown: one owner's
stored quiet hours stopped every owner's cases, pushes and digests.

:func:`supervise` runs a stage and, when it raises anything but a cancellation or a
:class:`~wire.errors.ConfigError` (which no restart cures), logs the death at once
with its traceback, marks the stage down in :class:`StageHealth` and restarts it after
a growing pause. A stage that then runs ``healthy_after_s`` without dying again resets
the pause. ``/health`` reads :attr:`StageHealth.down` and turns red while any stage is
down; the restarts are counted per stage for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from wire.errors import ConfigError

__all__ = ["StageHealth", "supervise"]

_LOG = logging.getLogger(__name__)
_FIRST_PAUSE_S: Final = 1.0
_LONGEST_PAUSE_S: Final = 30.0


@dataclass(slots=True)
class StageHealth:
    """Which stages of a service are down, and how often each was restarted.

    Attributes:
        down: stage name -> what ended it (a short description), while it is down.
        restarts: stage name -> restarts since the service started.
    """

    down: dict[str, str] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every stage is running."""
        return not self.down


async def supervise(
    name: str,
    stage: Callable[[], Coroutine[Any, Any, None]],
    health: StageHealth,
    *,
    first_pause_s: float = _FIRST_PAUSE_S,
    longest_pause_s: float = _LONGEST_PAUSE_S,
    healthy_after_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``stage()`` until cancelled, restarting it whenever it ends.

    Args:
        name: the stage's name in logs, ``/health`` and ``/metrics``.
        stage: builds the stage's coroutine (called again for each restart).
        health: where the stage's state is kept.
        first_pause_s: pause before the first restart; doubles up to ``longest_pause_s``.
        longest_pause_s: the longest pause between restarts.
        healthy_after_s: a run this long resets the pause to ``first_pause_s``.
        clock: monotonic clock (seconds).

    Raises:
        ConfigError: the stage found the configuration wrong; a restart would not help.
    """
    pause_s = first_pause_s
    while True:
        started = clock()
        try:
            await stage()
            reason = "ended on its own"
        except ConfigError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if clock() - started >= healthy_after_s:
                pause_s = first_pause_s
            _LOG.exception("stage %s died (%s); restarting it in %.0f s", name, reason, pause_s)
        else:
            if clock() - started >= healthy_after_s:
                pause_s = first_pause_s
            _LOG.error("stage %s ended on its own; restarting it in %.0f s", name, pause_s)
        health.down[name] = reason
        health.restarts[name] = health.restarts.get(name, 0) + 1
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, longest_pause_s)
        health.down.pop(name, None)
