"""Fleet-wide reads for the dashboard, kept and followed live (case store and InfluxDB -> pages).

The overview, the board, the outcomes and the insight all read the whole registry and
every case; with 10,000 devices that is the expensive part of an answer. A
:class:`FleetCache` reads them once into a :class:`Snapshot` and then follows the live
:class:`~dashboard.feed.CaseFeed`: each case published there replaces (or adds) that
case in a new snapshot, so a page never shows a case state older than the feed it
listens to, and a case change costs no store read. An update older than the case the
snapshot holds (by ``updated_at``) is ignored, so late or replayed messages cannot undo
a newer state.

The store is still read in full as a safety net: behind the answers once a snapshot is
``cache_s`` old (the current one, kept up to date by the feed, serves meanwhile), before
the answer once it is ``3 * cache_s`` old (nobody asked for a while), and at once after a
change the feed cannot describe (:meth:`~dashboard.feed.CaseFeed.touch`, or more
changes than its log keeps). A missed message is thus corrected within seconds. The
latest scores are refreshed behind the answers the same way (see
:meth:`FleetCache.snapshot`).

Answers computed from a snapshot are kept with it (:meth:`FleetCache.derived`); the
parts of an answer that depend only on the registry or the scores are kept across
snapshots for as long as those stay the same (:meth:`FleetCache.reused`), so a case
change recomputes only what counts cases.

The resolution time of a case comes from its audit trail (the ``transition`` to
``resolved``); an audit trail is only appended to, so once found it is kept for good.

What InfluxDB says of each device is read with the scores (:class:`DeviceSignals`): when
it was last heard from (its newest reading or score) and the firmware its newest boot
event names. The snapshot's registry carries that firmware in place of the stored one
(the device's own word is newer than the record), so the overview, the
insight, the outcomes and campaigns all group by the firmware a device runs now. A
device not heard from for ``silent_after_s`` is *silent*, whatever its last score said
(:func:`~dashboard.health.fleet_health`); :func:`~dashboard.health.health_timeline`
counts the same levels over time (:mod:`dashboard.health`: the levels, computed from a
snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from dashboard.feed import CaseFeed
from dashboard.influxql import DeviceSignals, Measurements, device_signals
from notifier.model import Case, DeviceRecord, Rating
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError
from wire.influx import InfluxClient
from wire.tasks import cancel_and_wait

__all__ = [
    "FleetCache",
    "Snapshot",
    "apply_changes",
    "with_boot_firmware",
]

_LOG = logging.getLogger(__name__)

#: Fleet-wide reads take every row; the store's default limit is for pages.
ALL_ROWS: Final = 10_000_000
#: A snapshot this many times ``cache_s`` old is read again before the answer.
_MAX_AGE_FACTOR: Final = 3
#: Up to this many changed cases, their ratings and visits are looked up one by one;
#: past it, all ratings and visits are read again (two queries).
_LOOKUPS: Final = 32

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry, every case and the latest scores, as of one feed version.

    Attributes:
        devices: the registry by device id, each with the firmware of its newest boot
            event where it has one (see :func:`with_boot_firmware`).
        cases: every case, newest first (by opening time, then case id, as the store).
        by_id: the same cases by case id.
        scores: device id to its newest ``(epoch ms, score)``.
        read_at: monotonic time of the full store read this snapshot descends from.
        version: the feed version it is current with.
        heard: device id to when it was last heard from (epoch ms).
        boots: device id to its newest boot event, ``(epoch ms, firmware)``.
        registry: the registry as stored (``None``: the same as ``devices``).
    """

    devices: Mapping[str, DeviceRecord]
    cases: Sequence[Case]
    by_id: Mapping[str, Case]
    scores: Mapping[str, tuple[int, float]]
    read_at: float
    version: int
    heard: Mapping[str, int] = field(default_factory=dict)
    boots: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    registry: Mapping[str, DeviceRecord] | None = None


def with_boot_firmware(
    registry: Mapping[str, DeviceRecord], boots: Mapping[str, tuple[int, str]]
) -> Mapping[str, DeviceRecord]:
    """The registry with each device's firmware as its newest boot event names it.

    Returns ``registry`` itself when no boot event changes a record, so results kept
    for the registry stay valid.
    """
    changed: dict[str, DeviceRecord] = {}
    for device_id, (_, firmware) in boots.items():
        record = registry.get(device_id)
        if record is not None and record.firmware != firmware:
            changed[device_id] = replace(record, firmware=firmware)
    if not changed:
        return registry
    return {**registry, **changed}


def _newest_first(case: Case) -> tuple[datetime, str]:
    return case.opened_at, case.case_id


def apply_changes(
    snapshot: Snapshot, changes: Iterable[Case], version: int
) -> tuple[Snapshot, set[str]]:
    """A new snapshot with changed cases put in place of their older records.

    Args:
        snapshot: the snapshot to start from (left as it is).
        changes: changed or new cases, oldest change first.
        version: the feed version the result is current with.

    Returns:
        The new snapshot and the ids of the cases that changed in it. A change whose
        ``updated_at`` is older than the record held is skipped (a late or replayed
        message must not undo a newer state); one as new replaces it (the later message
        wins).
    """
    by_id = dict(snapshot.by_id)
    changed: dict[str, Case] = {}
    reorder = False
    for case in changes:
        known = by_id.get(case.case_id)
        if known is not None and case.updated_at < known.updated_at:
            continue
        if known is None or known.opened_at != case.opened_at:
            reorder = True
        by_id[case.case_id] = changed[case.case_id] = case
    if not changed:
        return replace(snapshot, version=version), set()
    if reorder:
        cases = sorted(by_id.values(), key=_newest_first, reverse=True)
    else:
        cases = [changed.get(case.case_id, case) for case in snapshot.cases]
    return replace(snapshot, cases=cases, by_id=by_id, version=version), set(changed)


class FleetCache:
    """Keeps fleet-wide reads between requests and follows the live feed.

    Args:
        store: the case store.
        influx: InfluxDB (``None``: no scores).
        feed: the live feed whose changes the snapshot follows.
        cache_s: how old a snapshot (and the scores) may get before they are read again
            behind the answers (``0``: every request reads everything).
        measurements: the InfluxDB measurement names.
        clock: the wall clock (UTC-aware).
        ticker: the monotonic clock the cache ages by (seconds; tests pass their own).
        heard_window_s: how far back readings are looked for to learn when a device
            was last heard from (its scores count over all time).
    """

    def __init__(
        self,
        store: CaseStore,
        influx: InfluxClient | None,
        feed: CaseFeed,
        *,
        cache_s: float,
        measurements: Measurements,
        clock: Callable[[], datetime] | None = None,
        ticker: Callable[[], float] = time.monotonic,
        heard_window_s: float = 86_400.0,
    ) -> None:
        self._store = store
        self._influx = influx
        self._feed = feed
        self._cache_s = cache_s
        self._max_age_s = cache_s * _MAX_AGE_FACTOR
        self._measurements = measurements
        self._clock = clock or (lambda: datetime.now(UTC))
        self._ticker = ticker
        self._heard_window_s = heard_window_s
        self._effective: tuple[Mapping[str, DeviceRecord], Mapping[str, Any], Any] | None = None
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._resolved: dict[str, datetime] = {}
        self._unresolved: dict[str, datetime] = {}
        self._derived: dict[Hashable, Any] = {}
        self._memo: dict[Hashable, tuple[tuple[object, ...], Any]] = {}
        self._views: dict[str, tuple[Case, Callable[[Case], Any], Any]] = {}
        self._signals: DeviceSignals | None = None
        self._scores_at = 0.0
        self._scores_task: asyncio.Task[None] | None = None
        self._reread_task: asyncio.Task[None] | None = None
        self._reread_after = 0.0
        # ratings and technician visits for the outcomes, kept up to date per changed case
        self._records_lock = asyncio.Lock()
        self._ratings: dict[str, Rating] = {}
        self._visited: set[str] = set()
        self._records_stale = True
        self._unchecked: set[str] = set()
        #: Score reads that failed in the background (the old scores stayed in use).
        self.score_failures = 0
        #: Full store reads behind the answers that failed (the snapshot stayed in use).
        self.read_failures = 0
        #: Full reads of the registry and every case so far.
        self.store_reads = 0
        #: Case changes from the feed applied to a snapshot so far.
        self.applied = 0

    def _age_s(self, snapshot: Snapshot) -> float:
        return self._ticker() - snapshot.read_at

    def _install(self, snapshot: Snapshot) -> Snapshot:
        self._snapshot = snapshot
        self._derived.clear()
        return snapshot

    def _caught_up(self) -> Snapshot | None:
        """The snapshot with the feed's changes applied (``None``: read the store first)."""
        snapshot = self._snapshot
        if snapshot is None or self._age_s(snapshot) >= self._max_age_s:
            return None
        if snapshot.version != self._feed.version:
            changes = self._feed.changes_since(snapshot.version)
            if changes is None:
                return None
            snapshot, changed = apply_changes(snapshot, changes, self._feed.version)
            self.applied += len(changes)
            self._unchecked |= changed
            self._install(snapshot)
        updated = self._with_signals(snapshot)
        if updated is not snapshot:
            snapshot = self._install(updated)
        return snapshot

    def _with_signals(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with the newest signals (scores, last heard, boot firmware)."""
        signals = self._signals
        if signals is None or (
            snapshot.scores is signals.scores
            and snapshot.heard is signals.heard
            and snapshot.boots is signals.boots
        ):
            return snapshot
        registry = snapshot.registry if snapshot.registry is not None else snapshot.devices
        kept = self._effective
        if kept is not None and kept[0] is registry and kept[1] is signals.boots:
            devices = kept[2]
        else:
            devices = with_boot_firmware(registry, signals.boots)
            self._effective = (registry, signals.boots, devices)
        return replace(
            snapshot,
            devices=devices,
            scores=signals.scores,
            heard=signals.heard,
            boots=signals.boots,
            registry=registry,
        )

    async def snapshot(self) -> Snapshot:
        """The current snapshot.

        Case states are never older than the feed: changes published there are applied
        to the snapshot before it is handed out. The store is read in full when there is
        no snapshot yet, after a change the feed cannot describe, and once the snapshot
        is ``3 * cache_s`` old; from ``cache_s`` on, it is read again behind the answers.
        The latest scores (one InfluxDB query over every device's series, the slow part
        with a big fleet) are refreshed behind the answers once older than ``cache_s``,
        and the previous ones are used meanwhile.
        """
        if self._cache_s == 0:
            async with self._lock:
                self._signals = await self._read_signals()
                self._scores_at = self._ticker()
                return await self._read_store()
        snapshot = self._caught_up()
        if snapshot is None:
            async with self._lock:
                snapshot = self._caught_up()
                if snapshot is None:
                    if self._signals is None:
                        self._signals = await self._read_signals()
                        self._scores_at = self._ticker()
                    snapshot = await self._read_store()
        self._refresh_behind(snapshot)
        return snapshot

    async def _read_store(self) -> Snapshot:
        """Read the registry and every case, then apply what the feed published meanwhile."""
        version = self._feed.version
        started = self._ticker()
        records, cases = await asyncio.gather(
            self._store.devices(), self._store.cases(limit=ALL_ROWS)
        )
        self.store_reads += 1
        registry = {d.device_id: d for d in records}
        snapshot = self._install(
            self._with_signals(
                Snapshot(
                    devices=registry,
                    cases=cases,
                    by_id={c.case_id: c for c in cases},
                    scores={},
                    read_at=started,
                    version=version,
                    registry=registry,
                )
            )
        )
        self._records_stale = True  # the outcomes' ratings and visits are read again too
        # if the feed cannot say what changed during the read, the next request reads again
        return self._caught_up() or snapshot

    def _refresh_behind(self, snapshot: Snapshot) -> None:
        now = self._ticker()
        if self._scores_stale() and self._scores_task is None:
            self._scores_task = asyncio.create_task(self._refresh_scores())
        if (
            self._age_s(snapshot) >= self._cache_s
            and now >= self._reread_after
            and self._reread_task is None
        ):
            self._reread_task = asyncio.create_task(self._reread())

    async def _reread(self) -> None:
        try:
            async with self._lock:
                current = self._snapshot
                if current is None or self._age_s(current) >= self._cache_s:
                    await self._read_store()
        except (TransientError, PermanentError) as exc:
            self.read_failures += 1
            self._reread_after = self._ticker() + self._cache_s  # not on every request
            _LOG.warning("fleet not read again (%s); the snapshot stays, kept by the feed", exc)
        finally:
            self._reread_task = None

    def _scores_stale(self) -> bool:
        return self._signals is None or self._ticker() - self._scores_at >= self._cache_s

    async def _read_signals(self) -> DeviceSignals:
        if self._influx is None:
            return DeviceSignals(scores={}, heard={}, boots={})
        signals = await device_signals(
            self._influx,
            readings_since=self._clock() - timedelta(seconds=self._heard_window_s),
            measurements=self._measurements,
        )
        # what did not change stays the same object, so results kept for it stay valid
        previous = self._signals
        if previous is not None:
            signals = DeviceSignals(
                scores=previous.scores if previous.scores == signals.scores else signals.scores,
                heard=previous.heard if previous.heard == signals.heard else signals.heard,
                boots=previous.boots if previous.boots == signals.boots else signals.boots,
            )
        return signals

    async def _refresh_scores(self) -> None:
        try:
            self._signals = await self._read_signals()
            self._scores_at = self._ticker()
        except (TransientError, PermanentError) as exc:
            self.score_failures += 1
            self._scores_at = self._ticker()  # try again after another cache_s
            _LOG.warning("latest scores not read (%s); the previous ones stay", exc)
        finally:
            self._scores_task = None

    async def close(self) -> None:
        """Stop the reads behind the answers (on app cleanup)."""
        tasks = (self._scores_task, self._reread_task)
        self._scores_task = self._reread_task = None
        await cancel_and_wait(*tasks)

    def derived(self, snapshot: Snapshot, key: Hashable) -> Any:
        """A result computed from ``snapshot`` before (``None`` if not)."""
        return self._derived.get(key) if snapshot is self._snapshot else None

    def keep(self, snapshot: Snapshot, key: Hashable, value: Any) -> None:
        """Remember a result computed from ``snapshot`` until the next snapshot."""
        if snapshot is self._snapshot:
            self._derived[key] = value

    def reused(self, key: Hashable, inputs: tuple[object, ...]) -> Any:
        """A result :meth:`remember`-ed for the very same ``inputs`` objects (or ``None``).

        For parts of an answer that depend on a snapshot's registry or scores only:
        a case change makes a new snapshot but keeps those objects, so the part is
        reused until the registry is read again or new scores arrive.
        """
        kept = self._memo.get(key)
        if kept is None or len(kept[0]) != len(inputs):
            return None
        if all(a is b for a, b in zip(kept[0], inputs, strict=True)):
            return kept[1]
        return None

    def remember(self, key: Hashable, inputs: tuple[object, ...], value: Any) -> None:
        """Keep ``value`` as computed from ``inputs`` (see :meth:`reused`)."""
        self._memo[key] = (inputs, value)

    def rendered(self, case: Case, render: Callable[[Case], _T]) -> _T:
        """``render(case)``, kept until the case changes (records are immutable)."""
        kept = self._views.get(case.case_id)
        if kept is not None and kept[0] is case and kept[1] is render:
            value: _T = kept[2]
            return value
        value = render(case)
        self._views[case.case_id] = (case, render, value)
        return value

    def invalidate(self) -> None:
        """Forget the snapshot: the next request reads the store."""
        self._snapshot = None
        self._derived.clear()

    async def cases_by_id(self, case_ids: Iterable[str]) -> dict[str, Case]:
        """The current record of each of ``case_ids`` that exists.

        From the snapshot when the cache is on (a case newer than it, not yet on the
        feed, is looked up on its own); with the cache off, from one read of every case
        rather than one query per case.
        """
        wanted = set(case_ids)
        if not wanted:
            return {}
        if self._cache_s == 0:
            index: Mapping[str, Case] = {
                c.case_id: c for c in await self._store.cases(limit=ALL_ROWS)
            }
        else:
            index = (await self.snapshot()).by_id
        found = {case_id: index[case_id] for case_id in wanted if case_id in index}
        missing = sorted(wanted - found.keys()) if self._cache_s else []
        for case in await asyncio.gather(*(self._store.get_case(c) for c in missing)):
            if case is not None:
                found[case.case_id] = case
        return found

    async def outcome_records(self) -> tuple[list[Rating], set[str]]:
        """The owners' ratings (oldest first) and the ids of cases with a technician visit.

        Both are read in full once per snapshot read from the store; in between, only the
        cases the feed changed are looked up again (two small queries each).
        """
        if self._cache_s == 0:
            ratings, visits = await asyncio.gather(
                self._store.ratings(), self._store.appointments()
            )
            return ratings, {v.case_id for v in visits if v.state != "cancelled"}
        async with self._records_lock:
            unchecked, self._unchecked = self._unchecked, set()
            if self._records_stale or len(unchecked) > _LOOKUPS:
                self._records_stale = False
                ratings, visits = await asyncio.gather(
                    self._store.ratings(), self._store.appointments()
                )
                self._ratings = {r.case_id: r for r in ratings}
                self._visited = {v.case_id for v in visits if v.state != "cancelled"}
            else:
                ordered = sorted(unchecked)
                found = await asyncio.gather(
                    asyncio.gather(*(self._store.get_rating(c) for c in ordered)),
                    asyncio.gather(*(self._store.appointments(case_id=c) for c in ordered)),
                )
                for case_id, rating, visits in zip(ordered, *found, strict=True):
                    if rating is None:
                        self._ratings.pop(case_id, None)
                    else:
                        self._ratings[case_id] = rating
                    if any(v.state != "cancelled" for v in visits):
                        self._visited.add(case_id)
                    else:
                        self._visited.discard(case_id)
            ratings = sorted(self._ratings.values(), key=lambda r: (r.at, r.case_id))
            return ratings, set(self._visited)

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
