"""Fleet-wide reads for the dashboard, kept briefly (case store and InfluxDB -> pages).

The overview, the board, the outcomes and the insight all read the whole registry and
every case; with 10,000 devices that is the expensive part of an answer. A
:class:`FleetCache` keeps one snapshot for ``cache_s`` seconds and drops it as soon as
the live :class:`~dashboard.feed.CaseFeed` reports a change (its version moves on), so
a page never shows a case state older than the feed it listens to. Concurrent requests
share one refresh. The latest scores are refreshed in the background (see
:meth:`FleetCache.snapshot`), and answers computed from a snapshot are kept with it.

The resolution time of a case comes from its audit trail (the ``transition`` to
``resolved``); an audit trail is only appended to, so once found it is kept for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dashboard.feed import CaseFeed
from dashboard.influxql import Measurements, latest_scores
from gateway.errors import PermanentError, TransientError
from gateway.influx import InfluxClient
from notifier.model import OPEN_STATES, Case, DeviceRecord
from notifier.store import CaseStore

__all__ = ["FleetCache", "Snapshot", "health_level", "overview"]

_LOG = logging.getLogger(__name__)

#: Fleet-wide reads take every row; the store's default limit is for pages.
ALL_ROWS: Final = 10_000_000
_WORST: Final = 20


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry, every case and the latest scores, read together.

    Attributes:
        devices: the registry by device id.
        cases: every case, newest first.
        scores: device id to its newest ``(epoch ms, score)``.
        read_at: monotonic time of the read.
        version: the feed version it was read at.
    """

    devices: Mapping[str, DeviceRecord]
    cases: Sequence[Case]
    scores: Mapping[str, tuple[int, float]]
    read_at: float
    version: int


class FleetCache:
    """Shares fleet-wide reads between requests for a few seconds.

    Args:
        store: the case store.
        influx: InfluxDB (``None``: no scores).
        feed: the live feed whose version ends a snapshot.
        cache_s: the most a snapshot is reused (``0``: never).
        measurements: the InfluxDB measurement names.
    """

    def __init__(
        self,
        store: CaseStore,
        influx: InfluxClient | None,
        feed: CaseFeed,
        *,
        cache_s: float,
        measurements: Measurements,
    ) -> None:
        self._store = store
        self._influx = influx
        self._feed = feed
        self._cache_s = cache_s
        self._measurements = measurements
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._resolved: dict[str, datetime] = {}
        self._unresolved: dict[str, datetime] = {}
        self._derived: dict[Hashable, Any] = {}
        self._scores: dict[str, tuple[int, float]] | None = None
        self._scores_at = 0.0
        self._scores_task: asyncio.Task[None] | None = None
        #: Score reads that failed in the background (the old scores stayed in use).
        self.score_failures = 0

    def _fresh(self, snapshot: Snapshot | None) -> bool:
        return (
            snapshot is not None
            and snapshot.version == self._feed.version
            and time.monotonic() - snapshot.read_at < self._cache_s
        )

    async def snapshot(self) -> Snapshot:
        """The current snapshot (the store is read again if it is stale).

        Case states are never older than the feed: a feed change makes the next request
        read the store. The latest scores (one InfluxDB query over every device's series,
        the slow part with a big fleet) are refreshed in the background once older than
        ``cache_s``, and the previous ones are used meanwhile.
        """
        snapshot = self._snapshot
        if self._fresh(snapshot) and not self._scores_stale():
            assert snapshot is not None
            return snapshot
        async with self._lock:
            if self._scores is None or self._cache_s == 0:
                self._scores = await self._read_scores()
                self._scores_at = time.monotonic()
            elif self._scores_stale() and self._scores_task is None:
                self._scores_task = asyncio.create_task(self._refresh_scores())
            snapshot = self._snapshot
            if self._fresh(snapshot) and snapshot is not None:
                if snapshot.scores is self._scores:
                    return snapshot
                devices: Mapping[str, DeviceRecord] = snapshot.devices
                cases: Sequence[Case] = snapshot.cases
                read_at, version = snapshot.read_at, snapshot.version
            else:
                version = self._feed.version
                records, cases = await asyncio.gather(
                    self._store.devices(), self._store.cases(limit=ALL_ROWS)
                )
                devices = {d.device_id: d for d in records}
                read_at = time.monotonic()
            self._snapshot = Snapshot(devices, cases, self._scores, read_at, version)
            self._derived.clear()
            return self._snapshot

    def _scores_stale(self) -> bool:
        return self._scores is None or time.monotonic() - self._scores_at >= self._cache_s

    async def _read_scores(self) -> dict[str, tuple[int, float]]:
        if self._influx is None:
            return {}
        return await latest_scores(self._influx, measurements=self._measurements)

    async def _refresh_scores(self) -> None:
        try:
            self._scores = await self._read_scores()
            self._scores_at = time.monotonic()
        except (TransientError, PermanentError) as exc:
            self.score_failures += 1
            self._scores_at = time.monotonic()  # try again after another cache_s
            _LOG.warning("latest scores not read (%s); the previous ones stay", exc)
        finally:
            self._scores_task = None

    async def close(self) -> None:
        """Stop a background score read (on app cleanup)."""
        task, self._scores_task = self._scores_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def derived(self, snapshot: Snapshot, key: Hashable) -> Any:
        """A result computed from ``snapshot`` before (``None`` if not)."""
        return self._derived.get(key) if snapshot is self._snapshot else None

    def keep(self, snapshot: Snapshot, key: Hashable, value: Any) -> None:
        """Remember a result computed from ``snapshot`` until the next snapshot."""
        if snapshot is self._snapshot:
            self._derived[key] = value

    def invalidate(self) -> None:
        """Forget the snapshot (after a change the dashboard made itself)."""
        self._snapshot = None
        self._derived.clear()

    async def resolved_at(self, cases: Sequence[Case]) -> dict[str, datetime]:
        """When each of ``cases`` that was ever resolved was resolved (audit trail)."""
        found: dict[str, datetime] = {}
        for case in cases:
            known = self._resolved.get(case.case_id)
            if known is not None:
                found[case.case_id] = known
                continue
            if case.state not in ("resolved", "escalated") and case.rating is None:
                continue
            if self._unresolved.get(case.case_id) == case.updated_at:
                continue  # looked already, and the case has not changed since
            at = None
            for entry in await self._store.audit(case.case_id):
                if entry.action == "transition" and entry.to_state == "resolved":
                    at = entry.at
                    break
            if at is None and case.state == "resolved":
                at = case.updated_at  # a record without its audit trail
            if at is None:
                self._unresolved[case.case_id] = case.updated_at
            else:
                self._resolved[case.case_id] = found[case.case_id] = at
                self._unresolved.pop(case.case_id, None)
        return found


def health_level(score: float | None, healthy_below: float, anomalous_from: float) -> str:
    """``healthy``, ``watch``, ``anomalous`` or ``unknown`` (no score)."""
    if score is None:
        return "unknown"
    if score < healthy_below:
        return "healthy"
    return "watch" if score < anomalous_from else "anomalous"


def _counts() -> dict[str, int]:
    return {"devices": 0, "healthy": 0, "watch": 0, "anomalous": 0, "unknown": 0, "open": 0}


def overview(
    snapshot: Snapshot,
    *,
    healthy_below: float,
    anomalous_from: float,
    iso: Callable[[int], str],
) -> dict[str, Any]:
    """The fleet overview: devices by model, firmware, batch and health, open cases.

    Returns:
        ``devices`` (count), ``health`` (devices per level), ``by_model``,
        ``by_firmware`` and ``by_batch`` (rows with device counts per level and open
        cases), ``open_cases`` (total and by state) and ``worst`` (the devices with the
        highest scores at watch level or above).
    """
    health: Counter[str] = Counter()
    groups: dict[str, defaultdict[tuple[str, ...], dict[str, int]]] = {
        "model": defaultdict(_counts),
        "firmware": defaultdict(_counts),
        "batch": defaultdict(_counts),
    }
    keys: dict[str, tuple[tuple[str, ...], ...]] = {}
    for device in snapshot.devices.values():
        latest = snapshot.scores.get(device.device_id)
        level = health_level(latest[1] if latest else None, healthy_below, anomalous_from)
        health[level] += 1
        mine = (
            (device.model,),
            (device.model, device.firmware or "unknown"),
            (device.model, device.batch or "unknown"),
        )
        keys[device.device_id] = mine
        for name, key in zip(("model", "firmware", "batch"), mine, strict=True):
            row = groups[name][key]
            row["devices"] += 1
            row[level] += 1
    by_state: Counter[str] = Counter()
    for case in snapshot.cases:
        if case.state not in OPEN_STATES:
            continue
        by_state[case.state] += 1
        found = keys.get(case.device_id)
        if found is None:
            continue
        for name, key in zip(("model", "firmware", "batch"), found, strict=True):
            groups[name][key]["open"] += 1
    worst = sorted(
        (
            (score, at, device_id)
            for device_id, (at, score) in snapshot.scores.items()
            if score >= healthy_below and device_id in snapshot.devices
        ),
        reverse=True,
    )[:_WORST]

    def rows(name: str, labels: tuple[str, ...]) -> list[dict[str, Any]]:
        return [
            {**dict(zip(labels, key, strict=True)), **counts}
            for key, counts in sorted(groups[name].items())
        ]

    return {
        "devices": len(snapshot.devices),
        "health": {
            level: health.get(level, 0) for level in _counts() if level not in ("devices", "open")
        },
        "by_model": rows("model", ("model",)),
        "by_firmware": rows("firmware", ("model", "firmware")),
        "by_batch": rows("batch", ("model", "batch")),
        "open_cases": {"total": sum(by_state.values()), "by_state": dict(sorted(by_state.items()))},
        "worst": [
            {
                "device_id": device_id,
                "model": snapshot.devices[device_id].model,
                "firmware": snapshot.devices[device_id].firmware,
                "batch": snapshot.devices[device_id].batch,
                "score": round(score, 4),
                "level": health_level(score, healthy_below, anomalous_from),
                "at": iso(at),
            }
            for score, at, device_id in worst
        ],
    }
