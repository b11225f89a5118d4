"""The fleet's health over time, counted once per step (InfluxDB scores -> here -> chart).

Counting every device's level in every bucket of a range means reading every score in
it: InfluxDB 1.6 reads about 150,000 points a second on the development machine, so a
day of a 10,000-device fleet scored every 10 minutes takes some 10 s, and far longer at
real reporting rates. So the counts are made once per fixed step of :data:`STEP_S`, as
soon as a step is needed and has closed (:data:`SETTLE_S` after its end), with
:func:`~dashboard.health.health_timeline` over the step and the ``silent_after_s`` before
it. A step that ended :data:`SETTLE_S` before the fleet's newest score is *final*: its
counts are kept in memory and written to the ``fleet_health`` measurement (fields per
level, one point per step), and a restarted dashboard, or another one beside it, reads
them instead of counting again. That write is best effort: a dashboard that may only
read InfluxDB keeps its counts in memory. A later step is *provisional*: shown, never
written, and counted again once the newest score has moved or after
:data:`PROVISIONAL_S` (a fleet replaying hours of history, as ``fixloop up`` does, sends
the scores of past steps after they closed; an outage leaves steps after the newest
score that a returning fleet may still fill).

No answer waits for a long count: a few missing steps (those closed since the last look)
are counted before the answer, more (the first look at a range) behind it, newest
first, while the answer says how many are still ``pending``.

A step is counted once: scores that arrive for it later (a device publishing late) do
not change it. Over time a device counts as heard of from its first score on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Final

from dashboard.health import LEVELS, health_timeline
from dashboard.influxql import Measurements, first_scores, score_buckets
from wire.errors import PermanentError, TransientError
from wire.influx import InfluxClient
from wire.influxql import quote_ident
from wire.lineproto import point_line
from wire.tasks import cancel_and_wait

__all__ = ["PROVISIONAL_S", "SETTLE_S", "STEP_S", "HealthHistory", "bucketed"]

_LOG = logging.getLogger(__name__)

#: The width of a counted step.
STEP_S: Final = 300
#: A step is counted this long after its end, not before; and final once it ended this
#: long before the fleet's newest score.
SETTLE_S: Final = 60
#: A provisional step's counts are used this long at most (while the newest score stays).
PROVISIONAL_S: Final = 60.0
#: Steps counted per read of scores (an hour): bounds each query.
_CHUNK_STEPS: Final = 12
#: Up to this many missing steps are counted before the answer; more, behind it.
_INLINE_STEPS: Final = 12

Counts = tuple[int, ...]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _runs(steps: Sequence[int], step_ms: int, most: int) -> Iterator[list[int]]:
    """Consecutive steps in runs of at most ``most``."""
    run: list[int] = []
    for step in steps:
        if run and (step != run[-1] + step_ms or len(run) >= most):
            yield run
            run = []
        run.append(step)
    if run:
        yield run


def bucketed(
    counts: dict[int, Counts], start_ms: int, width_ms: int
) -> list[tuple[int, tuple[float, ...]]]:
    """Steps merged into buckets of ``width_ms``: the mean count per level (one decimal).

    Args:
        counts: step start (epoch ms) to its counts in :data:`~dashboard.health.LEVELS`
            order.
        start_ms: where the first bucket may start (buckets are aligned to the epoch).
        width_ms: the buckets' width.

    Returns:
        ``(bucket start, means)`` for every bucket holding a step, oldest first.
    """
    merged: dict[int, list[Counts]] = {}
    floor = start_ms // width_ms * width_ms
    for step, values in sorted(counts.items()):
        bucket = step // width_ms * width_ms
        if bucket >= floor:
            merged.setdefault(bucket, []).append(values)
    return [
        (bucket, tuple(round(sum(v[i] for v in rows) / len(rows), 1) for i in range(len(LEVELS))))
        for bucket, rows in merged.items()
    ]


class HealthHistory:
    """The fleet's devices per level in each closed step, counted once and kept.

    Args:
        influx: where the scores are read and the counts kept.
        fleet: the registry's device ids now (the devices counted) and the time of the
            fleet's newest score (epoch ms; ``None``: no score yet).
        silent_after_s: how long a score keeps a device from being silent.
        healthy_below: scores below this are healthy.
        anomalous_from: scores from this on are anomalous.
        clock: the wall clock (UTC-aware).
        measurements: the measurement names (``fleet_health`` holds the counts).
        keep_days: steps kept in memory at most, in days (older ones go first): at least
            the longest range asked for, or its oldest steps would go while it is counted.
    """

    def __init__(
        self,
        influx: InfluxClient,
        fleet: Callable[[], Awaitable[tuple[Collection[str], int | None]]],
        *,
        silent_after_s: float,
        healthy_below: float,
        anomalous_from: float,
        clock: Callable[[], datetime],
        measurements: Measurements,
        keep_days: int = 400,
    ) -> None:
        self._influx = influx
        self._fleet = fleet
        self._silent_after_s = silent_after_s
        self._healthy_below = healthy_below
        self._anomalous_from = anomalous_from
        self._clock = clock
        self._measurements = measurements
        self._step_ms = STEP_S * 1000
        self._keep_steps = keep_days * 86_400 // STEP_S + 1
        self._known: dict[int, Counts] = {}
        # provisional steps: when they were counted (monotonic) and the newest score then
        self._provisional: dict[int, tuple[float, int | None]] = {}
        self._lock = asyncio.Lock()
        self._first: dict[str, int] = {}
        self._first_at_ms = -1
        self._behind: asyncio.Task[None] | None = None
        self._queued: list[int] | None = None
        #: Steps counted from scores so far.
        self.computed = 0
        #: Steps read back from the ``fleet_health`` measurement so far.
        self.loaded = 0
        #: Writes of counted steps that InfluxDB did not take (the counts stayed in memory).
        self.write_failures = 0
        #: Seconds spent counting steps from scores so far.
        self.compute_s = 0.0
        #: Counts behind the answers that failed (InfluxDB unavailable; asked again later).
        self.fill_failures = 0

    async def counts(self, start: datetime, end: datetime) -> tuple[dict[int, Counts], int]:
        """Every closed step from the one holding ``start`` up to ``end``, as counted yet.

        Returns:
            Step start (epoch ms) to the devices per level (:data:`~dashboard.health.LEVELS`
            order), oldest first, and how many steps are still being counted behind the
            answer; steps not yet closed are left out.
        """
        step_ms = self._step_ms
        closed_by = min(_ms(end), _ms(self._clock()) - SETTLE_S * 1000)
        first = _ms(start) // step_ms * step_ms
        wanted = list(range(first, closed_by - step_ms + 1, step_ms))
        _, newest = await self._fleet()
        missing = self._missing(wanted, newest)
        if missing and len(missing) <= _INLINE_STEPS and not self._lock.locked():
            async with self._lock:
                await self._fill(wanted)
        elif missing:
            self._fill_behind(missing)
        counted = {step: self._known[step] for step in wanted if step in self._known}
        return counted, len(self._missing(wanted, newest))

    def _missing(self, steps: Sequence[int], newest: int | None) -> list[int]:
        """The steps not counted, or counted provisionally and due to be counted again."""
        now = time.monotonic()
        missing = []
        for step in steps:
            if step not in self._known:
                missing.append(step)
                continue
            provisional = self._provisional.get(step)
            if provisional is not None and (
                now - provisional[0] >= PROVISIONAL_S or provisional[1] != newest
            ):
                missing.append(step)
        return missing

    def _fill_behind(self, missing: list[int]) -> None:
        """Count ``missing`` behind the answers (after the count running now, if any)."""
        if self._behind is not None and not self._behind.done():
            self._queued = missing
            return
        self._behind = asyncio.create_task(self._count_behind(missing))

    async def _count_behind(self, missing: list[int]) -> None:
        todo: list[int] | None = missing
        while todo:
            try:
                async with self._lock:
                    await self._fill(todo)
            except (TransientError, PermanentError) as exc:
                self.fill_failures += 1
                _LOG.warning("fleet health not counted (%s); counted when asked again", exc)
            todo, self._queued = self._queued, None

    async def close(self) -> None:
        """Stop counting behind the answers (on app cleanup)."""
        task, self._behind = self._behind, None
        await cancel_and_wait(task)

    async def _fill(self, steps: list[int]) -> None:
        """Count those of ``steps`` that are missing (read back the kept ones first)."""
        devices, newest = await self._fleet()
        missing = self._missing(steps, newest)
        if not missing:
            return
        kept = await self._load(missing[0], missing[-1])
        for step, values in kept.items():
            self._known[step] = values
            self._provisional.pop(step, None)
        self.loaded += len(kept)
        todo = [step for step in missing if step not in kept]
        final_by = None if newest is None else newest - SETTLE_S * 1000
        # newest first: the recent end of a chart is the one looked at
        for run in reversed(list(_runs(todo, self._step_ms, _CHUNK_STEPS))):
            started = time.perf_counter()
            counted = await self._compute(run[0], run[-1] + self._step_ms, devices)
            self.compute_s += time.perf_counter() - started
            self.computed += len(counted)
            final: dict[int, Counts] = {}
            now = time.monotonic()
            for step, values in counted.items():
                self._known[step] = values
                if final_by is not None and step + self._step_ms <= final_by:
                    final[step] = values
                    self._provisional.pop(step, None)
                else:
                    self._provisional[step] = (now, newest)
            await self._keep(final)
        if len(self._known) > self._keep_steps:
            for step in sorted(self._known)[: len(self._known) - self._keep_steps]:
                del self._known[step]
                self._provisional.pop(step, None)

    async def _load(self, first_ms: int, last_ms: int) -> dict[int, Counts]:
        """Counts kept in InfluxDB before (by this dashboard or another)."""
        fields = ", ".join(quote_ident(level) for level in LEVELS)
        series = await self._influx.query(
            f"SELECT {fields} FROM {quote_ident(self._measurements.fleet_health)} "
            f"WHERE time >= {first_ms}ms AND time <= {last_ms}ms"
        )
        kept: dict[int, Counts] = {}
        for one in series:
            for row in one.values:
                values = row[1:]
                if (
                    isinstance(row[0], int)
                    and len(values) == len(LEVELS)
                    and all(isinstance(v, int) for v in values)
                ):
                    kept[row[0]] = tuple(values)
        return kept

    async def _first_heard(self, until_ms: int) -> dict[str, int]:
        """When each device was first scored; read again unless read after ``until_ms``."""
        if self._first_at_ms < until_ms:
            read_at = _ms(self._clock())
            self._first = await first_scores(self._influx, measurements=self._measurements)
            self._first_at_ms = read_at
        return self._first

    async def _compute(
        self, start_ms: int, end_ms: int, devices: Collection[str]
    ) -> dict[int, Counts]:
        """Count the steps in ``[start_ms, end_ms)`` from the scores of ``devices``."""
        step_ms = self._step_ms
        # a score this far before the first step still keeps its device from being silent
        held = math.ceil(self._silent_after_s * 1000 / step_ms)
        read_from = start_ms - held * step_ms
        steps = list(range(read_from, end_ms, step_ms))
        points, first = await asyncio.gather(
            score_buckets(
                self._influx,
                datetime.fromtimestamp(read_from / 1000, UTC),
                datetime.fromtimestamp(end_ms / 1000, UTC),
                STEP_S,
                measurements=self._measurements,
            ),
            self._first_heard(end_ms),
        )
        levels = await asyncio.to_thread(
            health_timeline,
            steps,
            step_ms,
            points,
            first,
            devices,
            healthy_below=self._healthy_below,
            anomalous_from=self._anomalous_from,
            silent_after_s=self._silent_after_s,
        )
        return {
            steps[i]: tuple(levels[level][i] for level in LEVELS) for i in range(held, len(steps))
        }

    async def _keep(self, counted: dict[int, Counts]) -> None:
        """Write counted steps to InfluxDB (best effort: they stay in memory anyway)."""
        if not counted:
            return
        lines = [
            point_line(
                self._measurements.fleet_health,
                {},
                dict(zip(LEVELS, values, strict=True)),
                step,
            )
            for step, values in sorted(counted.items())
        ]
        try:
            outcome = await self._influx.write(lines)
        except (TransientError, PermanentError) as exc:
            self.write_failures += 1
            _LOG.warning("fleet health steps not kept in InfluxDB (%s); kept in memory", exc)
            return
        if outcome.rejected:
            self.write_failures += 1
            _LOG.warning("InfluxDB refused %d fleet health steps", len(outcome.rejected))
