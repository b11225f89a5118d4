"""What the diagnostics engine keeps per product model: device slots and their tables.

Place in the pipeline: :class:`~diagnostics.engine.DiagnosticsEngine` holds one
:class:`ModelState` per product model, and the whole engine, these included, is
pickled as a partition's checkpoint (:mod:`diagnostics.partition`). A model's devices
each have a slot in its :class:`~diagnostics.features.FeatureTable` and
:class:`~diagnostics.baseline.BaselineTable`; the metrics no product file describes are
scored on the detector core in a :class:`GenericMetrics` (one slot per device, one
column per metric, NaN where a reading lacks one; the reading's own time in seconds),
which also keeps the engine's rule for late readings and the state of the peer checks
(:mod:`diagnostics.peers`). A model's healthy feature levels are sampled here for
fitting its fleet model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from diagnostics.baseline import BaselineTable
from diagnostics.detector import DetectorConfig, DetectorTable, StepResult
from diagnostics.features import FeatureSpec, FeatureTable
from diagnostics.fleet import FleetModel
from wire.protocol import Reading

__all__ = ["NO_TIME", "GenericMetrics", "ModelState"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
#: A slot's last time before its first reading.
NO_TIME: Final = np.iinfo(np.int64).min
#: From this many readings the metric columns are gathered column by column.
_BY_COLUMN: Final = 64
#: Most healthy rows kept per model for fitting its fleet model.
_MAX_TRAINING_ROWS: Final = 40_000
_count: Final = np.count_nonzero  # much cheaper than ``.any()`` on the small rows here


@dataclass(slots=True)
class GenericMetrics:
    """The metrics of one product model that no file describes, on the detector core.

    One slot per device, one column per metric in the order first seen.
    ``last_ts_ms`` keeps the engine's rule for late readings: not newer than the device's
    last one (the core itself takes an equal time as a repeat).
    """

    table: DetectorTable
    names: tuple[str, ...]
    slots: dict[str, int] = field(default_factory=dict)
    last_ts_ms: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: per slot, whether its alert was up at its last row (the policy hears of the fall)
    was_up: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    #: device time of the last peer check, and per slot the checks in a row it stood out
    peer_at_ms: int = NO_TIME
    peer_runs: dict[int, int] = field(default_factory=dict)

    def widen(self, names: Sequence[str]) -> None:
        """Add a column per metric of ``names`` (cold in every slot)."""
        self.table.add_columns(len(names))
        self.names = (*self.names, *names)

    def slots_of(self, device_ids: Sequence[str]) -> npt.NDArray[np.intp]:
        """Return each device's slot, giving new devices one (the table grows by doubling)."""
        slots = self.slots
        found = [slots.get(d) for d in device_ids]
        if None in found:
            found = [slots.setdefault(d, len(slots)) for d in device_ids]
            table = self.table
            if len(slots) > table.n_slots:
                grow = max(len(slots) - table.n_slots, table.n_slots, 16)
                table.add_slots(grow)
                more = np.full(grow, NO_TIME, dtype=np.int64)
                self.last_ts_ms = np.concatenate([self.last_ts_ms, more])
                self.was_up = np.concatenate([self.was_up, np.zeros(grow, dtype=np.bool_)])
        return np.array(found, dtype=np.intp)

    def step(
        self,
        slots: npt.NDArray[np.intp],
        ts_ms: I64,
        values: F64,
        late: npt.NDArray[np.bool_] | None,
    ) -> tuple[StepResult, npt.NDArray[np.bool_]]:
        """Score and learn one round (each slot at most once); late rows are scored only."""
        last = self.last_ts_ms
        stale = ts_ms <= last[slots]
        if late is not None:
            stale |= late
        t_s = ts_ms / 1000.0
        table = self.table
        if not _count(stale):
            result = table.step(slots, t_s, values)
        else:
            live = ~stale
            parts = [
                (rows, table.step(slots[rows], t_s[rows], values[rows], learn=learn))
                for rows, learn in ((np.flatnonzero(live), True), (np.flatnonzero(stale), False))
            ]
            n = len(slots)
            result = StepResult(
                np.empty(n),
                np.empty(n, dtype=np.bool_),
                np.empty(n, dtype=np.bool_),
                np.empty((n, values.shape[1])),
                np.empty(n, dtype=np.int8),
            )
            for rows, part in parts:
                result.score[rows] = part.score
                result.event[rows] = part.event
                result.active[rows] = part.active
                result.deviation[rows] = part.deviation
                result.flags[rows] = part.flags
        fresh = slots[~stale]
        last[fresh] = ts_ms[~stale]
        return result, stale

    def values(self, readings: Sequence[Reading]) -> F64:
        """The readings' metrics as rows (NaN where a reading lacks one, booleans 0/1)."""
        n = len(readings)
        names = self.names
        nan = math.nan
        if n < _BY_COLUMN:
            rows: F64 = np.array(
                [[r.metrics.get(name, nan) for name in names] for r in readings], dtype=np.float64
            ).reshape(n, len(names))
            return rows
        metrics = [r.metrics for r in readings]
        rows = np.empty((n, len(names)), dtype=np.float64)
        for j, name in enumerate(names):
            rows[:, j] = np.fromiter((m.get(name, nan) for m in metrics), np.float64, n)
        return rows


@dataclass(slots=True)
class ModelState:
    """Everything the engine keeps for one product model (mutable).

    ``described`` is how many of the spec's features come from a product file;
    ``known`` the metrics scored either way; ``has_file`` whether a product file
    describes the model. Metrics no file describes are scored by ``generic``, the
    detector core (for a model without a file: all of them).
    """

    spec: FeatureSpec
    features: FeatureTable
    baseline: BaselineTable
    described: int = 0
    known: frozenset[str] = frozenset()
    has_file: bool = False
    slots: dict[str, int] = field(default_factory=dict)
    watched: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(64, dtype=np.bool_))
    fleet: FleetModel | None = None
    training: list[F32] = field(default_factory=list)
    training_seen: int = 0
    training_held: int = 0
    indicators: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, np.bool_))
    generic: GenericMetrics | None = None

    def slot(self, device_id: str) -> int:
        """Return the device's slot, giving a new device one (the tables grow)."""
        slot = self.slots.get(device_id)
        if slot is None:
            slot = self.slots[device_id] = len(self.slots)
            if slot >= self.features.capacity:
                self.features.ensure(slot + 1)
                self.baseline.ensure(slot + 1)
                grown = np.zeros(self.features.capacity, dtype=np.bool_)
                grown[: len(self.watched)] = self.watched
                self.watched = grown
        return slot

    @property
    def devices(self) -> int:
        """Devices with scoring state."""
        if self.has_file or self.generic is None:
            return len(self.slots)
        return len(self.generic.slots)

    def state_bytes(self) -> int:
        """Approximate bytes of per-device state (see ``DiagnosticsEngine.state_bytes``)."""
        rows = len(self.slots)
        total = rows * (self.features.state_bytes() + self.baseline.state_bytes() + 1)
        total += 150 * len(self.slots)
        generic = self.generic
        if generic is not None and generic.table.n_slots:
            per_slot = generic.table.state_bytes() // generic.table.n_slots
            total += len(generic.slots) * (per_slot + 8 + (0 if self.has_file else 150))
        return total

    def undescribed(self, readings: Sequence[Reading]) -> tuple[dict[str, Any], list[int], int]:
        """What ``readings`` carry that the model's scored metrics do not cover.

        Returns:
            the metrics not scored yet, each with its first value (in the readings' order:
            deterministic); with a product file, the readings (by position) holding
            metrics it does not list, and how many such metric values they hold (without
            a file: no readings and 0, every metric being scored generically).
        """
        known = self.known
        first: dict[str, Any] = {}
        extra: list[int] = []  # readings with metrics the file does not list
        unlisted = 0
        if self.has_file:
            listed = self.spec.listed
            for k, reading in enumerate(readings):
                metrics = reading.metrics
                if listed.issuperset(metrics):
                    continue
                extra.append(k)
                for name, value in metrics.items():  # in the reading's order: deterministic
                    if name not in listed:
                        unlisted += 1
                        if name not in known:
                            first.setdefault(name, value)
        else:
            for reading in readings:
                metrics = reading.metrics
                if not known.issuperset(metrics):
                    for name, value in metrics.items():
                        if name not in known:
                            first.setdefault(name, value)
        return first, extra, unlisted

    def widen_detector(self, first: dict[str, Any], config: DetectorConfig) -> None:
        """Score the metrics ``first`` names on the detector core (new columns start cold)."""
        self.known = self.known | first.keys()
        names = tuple(first)
        if self.generic is None:
            self.generic = GenericMetrics(DetectorTable(0, len(names), config), names)
        else:
            self.generic.widen(names)

    def widen_baseline(
        self,
        first: dict[str, Any],
        drift_indicators: Callable[[FeatureSpec], npt.NDArray[np.bool_]],
    ) -> None:
        """Append the metrics ``first`` names to the features (new columns start cold)."""
        spec = self.spec.with_metrics(first)
        self.spec = spec
        self.known = self.known | first.keys()
        self.features.widen(spec)
        old = self.baseline
        width = len(old.min_count)
        indicators = drift_indicators(spec)
        new = BaselineTable(
            spec,
            tau_days=old.tau_days,
            freeze_z=old.freeze_z,
            warmup_s=old.warmup_s,
            capacity=old.capacity,
            trend_features=indicators,
        )
        for name in ("mean", "var", "count", "learnt_s", "first_s", "side_z"):
            getattr(new, name)[:, :width] = getattr(old, name)
        # the tracked (wear indicator) columns are the product's own: the same runs
        new.run_s[:] = old.run_s
        new.run_side[:] = old.run_side
        self.baseline = new
        self.indicators = indicators

    def sample(self, rows: F32, share: float, rng: np.random.Generator) -> None:
        """Keep about ``share`` of the healthy feature-level ``rows`` for fitting."""
        if rows.shape[0] == 0:
            return
        take = rng.random(rows.shape[0]) < share
        picked = rows[take]
        if picked.shape[0] == 0:
            return
        self.training_seen += picked.shape[0]
        self.training.append(picked.copy())
        self.training_held += picked.shape[0]
        if self.training_held > 2 * _MAX_TRAINING_ROWS:
            merged = np.concatenate(self.training)
            keep = rng.choice(merged.shape[0], _MAX_TRAINING_ROWS, replace=False)
            self.training = [merged[np.sort(keep)]]
            self.training_held = _MAX_TRAINING_ROWS
