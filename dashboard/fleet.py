"""Fleet-wide reads for the dashboard, kept briefly (case store and InfluxDB -> pages).

The overview, the board, the outcomes and the insight all read the whole registry and
every case; with 10,000 devices that is the expensive part of an answer. A
:class:`FleetCache` keeps one snapshot for ``cache_s`` seconds and drops it as soon as
the live :class:`~dashboard.feed.CaseFeed` reports a change (its version moves on), so
a page never shows a case state older than the feed it listens to. Concurrent requests
share one refresh.

The resolution time of a case comes from its audit trail (the ``transition`` to
``resolved``); an audit trail is only appended to, so once found it is kept for good.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from dashboard.feed import CaseFeed
from dashboard.influxql import Measurements, latest_scores
from gateway.influx import InfluxClient
from notifier.model import OPEN_STATES, Case, DeviceRecord
from notifier.store import CaseStore

__all__ = ["FleetCache", "Snapshot", "health_level", "overview"]

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

    def _fresh(self, snapshot: Snapshot | None) -> bool:
        return (
            snapshot is not None
            and snapshot.version == self._feed.version
            and time.monotonic() - snapshot.read_at < self._cache_s
        )

    async def snapshot(self) -> Snapshot:
        """The current snapshot (read now if the last one is stale)."""
        if self._fresh(self._snapshot):
            assert self._snapshot is not None
            return self._snapshot
        async with self._lock:
            if self._fresh(self._snapshot):
                assert self._snapshot is not None
                return self._snapshot
            version = self._feed.version
            devices, cases, scores = await asyncio.gather(
                self._store.devices(),
                self._store.cases(limit=ALL_ROWS),
                self._scores(),
            )
            self._snapshot = Snapshot(
                devices={d.device_id: d for d in devices},
                cases=cases,
                scores=scores,
                read_at=time.monotonic(),
                version=version,
            )
            return self._snapshot

    async def _scores(self) -> dict[str, tuple[int, float]]:
        if self._influx is None:
            return {}
        return await latest_scores(self._influx, measurements=self._measurements)

    def invalidate(self) -> None:
        """Forget the snapshot (after a change the dashboard made itself)."""
        self._snapshot = None

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
