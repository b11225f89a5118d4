"""Remaining-life models of the live fleet, learnt from recorded failures (diagnostics).

Place in the pipeline: ``fixloop train`` replays stored history (``diagnostics.training``);
for the devices that failed (the case store knows which and when, handed in as data by
``fixloop``: a :class:`Failure` per device, fault and time), their readings are
aggregated into fixed steps (one row per ``step_s``: each metric's mean; a bool counts as
0/1) by a :class:`StepHistory`, each failure's rows (from the device's first row, or its
previous failure of the same fault, up to the failure) become a run-to-failure history,
and :func:`fit_lifetime_models` fits one :class:`~diagnostics.remaining.RemainingLifeModel`
per product model and fault with at least ``min_failures`` failures: the same predictor
as ``fixloop ttf``. :meth:`LifetimeModels.predict` turns a running device's own step rows
into a :class:`~diagnostics.predictor.TimeToFailure` (seconds; the band is p10..p90).

Time in the histories is hours, so the predictor's windows (in rows) are hours too.

Live, the diagnostics engine keeps the same hourly means of the devices of product models
with a learnt model (:class:`HourlyMeans`: bounded, a device's first and latest rows kept
whole and the middle of a long life thinned) and :class:`LiveLifetimes` predicts from
them, once per new hourly row, what the policy states as a diagnosis's time to failure.
At start the service backfills those means from InfluxDB (``train_days`` of history).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from diagnostics.predictor import TimeToFailure
from diagnostics.remaining import RemainingLifeModel, UnitHistory, fit_remaining_life
from wire.errors import ConfigError
from wire.protocol import Event, Reading

__all__ = [
    "Failure",
    "HourlyMeans",
    "LifetimeModels",
    "LiveLifetimes",
    "StepHistory",
    "StepRows",
    "failure_histories",
    "fit_lifetime_models",
    "lifetimes_path",
]

_LOG = logging.getLogger(__name__)
_FORMAT: Final = "fixloop-lifetimes/1"
_HOUR_S: Final = 3600.0
_NO_STEP: Final = -(2**62)


class StepRows(Protocol):
    """Readings aggregated per fixed step, by device (what a prediction reads)."""

    @property
    def step_s(self) -> float:
        """The step length in seconds."""

    def rows(
        self,
        device_id: str,
        columns: Sequence[str],
        *,
        after: datetime | None = None,
        until: datetime | None = None,
    ) -> UnitHistory | None:
        """The device's step rows in ``(after, until]`` (times in hours), or None."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A recorded failure (or replacement of the failing part) of one device.

    Attributes:
        device_id: the device.
        model: its product model.
        fault: the fault that ended the part's life.
        at: when (UTC-aware).
    """

    device_id: str
    model: str
    fault: str
    at: datetime

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ConfigError(f"failure of {self.device_id}: time must be UTC-aware")


@dataclass(slots=True)
class StepHistory:
    """Readings of chosen devices summed per fixed step (memory: one row per step).

    Attributes:
        step_s: the step length in seconds.
        devices: the devices kept (None: every device).
    """

    step_s: float = _HOUR_S
    devices: frozenset[str] | None = None
    _sums: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)

    def add(self, items: Iterable[Reading | Event]) -> None:
        """Add readings (events are passed over)."""
        for item in items:
            if not isinstance(item, Reading):
                continue
            if self.devices is not None and item.device_id not in self.devices:
                continue
            step = int(item.ts_ms // (self.step_s * 1000))
            row = self._sums.setdefault(item.device_id, {}).setdefault(step, {})
            for name, value in item.metrics.items():
                cell = row.setdefault(name, [0.0, 0.0])
                cell[0] += float(value)
                cell[1] += 1.0

    def rows(
        self,
        device_id: str,
        columns: Sequence[str],
        *,
        after: datetime | None = None,
        until: datetime | None = None,
    ) -> UnitHistory | None:
        """The device's step rows in ``(after, until]`` (by step start), or None if none.

        Times are hours since the epoch (the start of each step); each value is the mean
        of the readings in the step, NaN where a metric was not sent.
        """
        steps = self._sums.get(device_id, {})
        low = -math.inf if after is None else after.timestamp() / self.step_s
        high = math.inf if until is None else until.timestamp() / self.step_s
        chosen = sorted(s for s in steps if low < s <= high)
        if not chosen:
            return None
        values = np.full((len(chosen), len(columns)), np.nan)
        for i, step in enumerate(chosen):
            row = steps[step]
            for j, name in enumerate(columns):
                cell = row.get(name)
                if cell is not None:
                    values[i, j] = cell[0] / cell[1]
        times = np.array(chosen, dtype=np.float64) * self.step_s / _HOUR_S
        return UnitHistory(device_id, times, values)

    def metrics(self, device_id: str) -> set[str]:
        """Names of the metrics the device sent."""
        return {name for row in self._sums.get(device_id, {}).values() for name in row}


@dataclass(slots=True)
class LifetimeModels:
    """Fitted remaining-life models by (product model, fault); picklable.

    Attributes:
        step_s: the step the histories were aggregated with.
        models: (product model, fault) to its model.
        failures: (product model, fault) to the failures it learnt from.
    """

    step_s: float
    models: dict[tuple[str, str], RemainingLifeModel]
    failures: dict[tuple[str, str], int]

    def predict(
        self,
        history: StepRows,
        device_id: str,
        model: str,
        fault: str,
        *,
        since: datetime | None = None,
    ) -> TimeToFailure | None:
        """Time to failure of a running device from its own rows after ``since``.

        Args:
            history: where the device's readings were aggregated (same ``step_s``).
            device_id: the device.
            model: its product model.
            fault: the fault to predict.
            since: its last failure or repair of that fault (None: from its first row).

        Returns:
            The prediction in seconds from the end of its last step, or None without a
            model for (model, fault) or without rows.
        """
        fitted = self.models.get((model, fault))
        if fitted is None:
            return None
        rows = history.rows(device_id, fitted.columns, after=since)
        if rows is None:
            return None
        (p,) = fitted.predict([rows])
        age_h = float(rows.times[-1] - rows.times[0])
        progress = age_h / (age_h + p.remaining) if age_h + p.remaining > 0 else 0.0
        return TimeToFailure(
            p10_s=p.low * _HOUR_S, p50_s=p.remaining * _HOUR_S, p90_s=p.high * _HOUR_S,
            progress=min(max(progress, 0.0), 1.0),
        )  # fmt: skip

    def save(self, path: Path) -> None:
        """Write the models to ``path`` (a pickle with a format tag)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(pickle.dumps({"format": _FORMAT, "models": self}))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> LifetimeModels:
        """Read models written by :meth:`save` (only from a trusted path: it is a pickle).

        Raises:
            ConfigError: the file is missing or not in this format.
        """
        try:
            data = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise ConfigError(f"cannot read remaining-life models from {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ConfigError(f"{path} does not hold remaining-life models ({_FORMAT})")
        models = data["models"]
        if not isinstance(models, LifetimeModels):
            raise ConfigError(f"{path} does not hold remaining-life models ({_FORMAT})")
        return models


class _Track:
    """One device's hourly means (private): closed rows, and the step being summed."""

    __slots__ = ("closed", "columns", "counts", "n", "step", "steps", "sums", "values")

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.steps = np.zeros(16, dtype=np.int64)
        self.values = np.full((16, len(columns)), np.nan, dtype=np.float32)
        self.n = 0
        self.closed = 0
        self.step = _NO_STEP
        self.sums = [0.0] * len(columns)
        self.counts = [0] * len(columns)


@dataclass(slots=True)
class HourlyMeans:
    """Per device, the mean of each metric per step, in bounded memory (live).

    Only devices of the product models in ``columns`` are kept, and only those metrics.
    A device's rows are its closed steps (the step being summed is not one yet). When a
    device has ``max_rows`` rows, the rows between its first ``head_rows`` and its last
    ``tail_rows`` are thinned to every other one: the start of its life, its age and its
    recent rows stay exact, the long middle is sampled.

    Attributes:
        columns: product model to the metrics kept for its devices.
        step_s: the step length in seconds.
        max_rows: most rows kept per device.
        head_rows: first rows always kept.
        tail_rows: last rows always kept.
    """

    columns: Mapping[str, tuple[str, ...]]
    step_s: float = _HOUR_S
    max_rows: int = 2048
    head_rows: int = 48
    tail_rows: int = 720
    late: int = 0
    _tracks: dict[str, _Track] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_rows < 2 * (self.head_rows + self.tail_rows):
            raise ConfigError("max_rows must be at least twice head_rows + tail_rows")

    def watches(self, model: str) -> bool:
        """Whether devices of ``model`` are kept."""
        return model in self.columns

    @property
    def devices(self) -> int:
        """Devices kept."""
        return len(self._tracks)

    def _track(self, device_id: str, model: str) -> _Track:
        track = self._tracks.get(device_id)
        if track is None or track.columns != self.columns[model]:
            track = self._tracks[device_id] = _Track(self.columns[model])
        return track

    def add(self, model: str, readings: Sequence[Reading], late: Sequence[bool] = ()) -> None:
        """Add live readings of ``model`` devices (``late`` ones, and older steps, are left out).

        A reading of a step before the one being summed is left out (and counted in
        :attr:`late`): a closed hour is not reopened.
        """
        columns = self.columns.get(model)
        if columns is None:
            return
        step_ms = self.step_s * 1000.0
        for k, reading in enumerate(readings):
            if late and late[k]:
                continue
            track = self._track(reading.device_id, model)
            step = int(reading.ts_ms // step_ms)
            if step != track.step:
                if step < track.step:
                    self.late += 1
                    continue
                self._close(track)
                track.step = step
            metrics = reading.metrics
            sums, counts = track.sums, track.counts
            for j, name in enumerate(columns):
                value = metrics.get(name)
                if value is not None:
                    sums[j] += float(value)
                    counts[j] += 1

    def add_rows(
        self, device_id: str, model: str, steps: Sequence[int], values: npt.NDArray[np.float64]
    ) -> int:
        """Add closed rows from stored history (``values``: one column per metric of ``model``).

        Rows must come before the device's live ones, in step order; a row not after the
        device's last one is left out. Returns the rows added.
        """
        columns = self.columns.get(model)
        if columns is None:
            return 0
        track = self._track(device_id, model)
        added = 0
        for step, row in zip(steps, values, strict=True):
            last = track.steps[track.n - 1] if track.n else _NO_STEP
            if step <= max(last, track.step):
                continue
            self._append(track, int(step), row)
            added += 1
        return added

    def _close(self, track: _Track) -> None:
        if track.step == _NO_STEP or not any(track.counts):
            return
        row = np.array(
            [s / c if c else math.nan for s, c in zip(track.sums, track.counts, strict=True)]
        )
        self._append(track, track.step, row)
        track.sums = [0.0] * len(track.columns)
        track.counts = [0] * len(track.columns)

    def _append(self, track: _Track, step: int, row: npt.NDArray[np.float64]) -> None:
        if track.n == self.max_rows:
            head, tail = self.head_rows, self.tail_rows
            keep = np.r_[
                np.arange(head),
                np.arange(head, track.n - tail, 2),
                np.arange(track.n - tail, track.n),
            ]
            kept = len(keep)
            track.steps[:kept] = track.steps[keep]
            track.values[:kept] = track.values[keep]
            track.n = kept
        elif track.n == len(track.steps):
            size = min(2 * track.n, self.max_rows)
            steps = np.zeros(size, dtype=np.int64)
            steps[: track.n] = track.steps
            values = np.full((size, len(track.columns)), np.nan, dtype=np.float32)
            values[: track.n] = track.values
            track.steps, track.values = steps, values
        track.steps[track.n] = step
        track.values[track.n] = row
        track.n += 1
        track.closed += 1

    def closed(self, device_id: str) -> int:
        """Rows the device has closed so far (a new one means a new prediction)."""
        track = self._tracks.get(device_id)
        return 0 if track is None else track.closed

    def end_s(self, device_id: str) -> float:
        """End of the device's last closed step, seconds since the epoch (NaN: none)."""
        track = self._tracks.get(device_id)
        if track is None or not track.n:
            return math.nan
        return float(track.steps[track.n - 1] + 1) * self.step_s

    def rows(
        self,
        device_id: str,
        columns: Sequence[str],
        *,
        after: datetime | None = None,
        until: datetime | None = None,
    ) -> UnitHistory | None:
        """The device's closed rows in ``(after, until]`` (by step start), or None if none.

        Times are hours since the epoch (each step's start), as :class:`StepHistory` gives.
        """
        track = self._tracks.get(device_id)
        if track is None or not track.n:
            return None
        steps = track.steps[: track.n]
        low = -math.inf if after is None else after.timestamp() / self.step_s
        high = math.inf if until is None else until.timestamp() / self.step_s
        chosen = np.flatnonzero((steps > low) & (steps <= high))
        if not chosen.size:
            return None
        index = {name: j for j, name in enumerate(track.columns)}
        values = np.full((chosen.size, len(columns)), np.nan)
        for j, name in enumerate(columns):
            at = index.get(name)
            if at is not None:
                values[:, j] = track.values[chosen, at]
        times = steps[chosen].astype(np.float64) * self.step_s / _HOUR_S
        return UnitHistory(device_id, times, values)

    def state_bytes(self) -> int:
        """Bytes of the arrays held."""
        return sum(t.steps.nbytes + t.values.nbytes for t in self._tracks.values())


class LiveLifetimes:
    """Learnt remaining life for the live engine (see the module docstring).

    Keeps the hourly means of the devices of the product models ``models`` knows, and
    predicts a device's time to failure from them once per new hourly row (the policy
    asks at every update of a diagnosis; in between, the last prediction counts down).

    Args:
        models: the learnt models (``fixloop train``).
        max_rows: most hourly rows kept per device.
    """

    def __init__(self, models: LifetimeModels, *, max_rows: int = 2048) -> None:
        self.models = models
        columns: dict[str, set[str]] = {}
        for (model, _), fitted in models.models.items():
            columns.setdefault(model, set()).update(fitted.columns)
        self.history = HourlyMeans(
            {m: tuple(sorted(c)) for m, c in columns.items()},
            step_s=models.step_s,
            max_rows=max_rows,
        )
        self._cache: dict[tuple[str, str], tuple[int, float, TimeToFailure | None]] = {}

    def watches(self, model: str) -> bool:
        """Whether a model was learnt for some fault of ``model``."""
        return self.history.watches(model)

    def observe(self, model: str, readings: Sequence[Reading], late: Sequence[bool] = ()) -> None:
        """Add live readings of ``model`` devices to their hourly means."""
        self.history.add(model, readings, late)

    def predict(self, device_id: str, model: str, fault: str, ts_ms: int) -> TimeToFailure | None:
        """The device's learnt time to failure as of ``ts_ms``, or None (no model, no rows)."""
        if (model, fault) not in self.models.models:
            return None
        closed = self.history.closed(device_id)
        if not closed:
            return None
        key = (device_id, fault)
        hit = self._cache.get(key)
        if hit is None or hit[0] != closed:
            ttf = self.models.predict(self.history, device_id, model, fault)
            hit = self._cache[key] = (closed, self.history.end_s(device_id), ttf)
        _, end_s, ttf = hit
        return None if ttf is None else ttf.aged(ts_ms / 1000.0 - end_s)

    def state_bytes(self) -> int:
        """Approximate bytes held (hourly rows and cached predictions)."""
        return self.history.state_bytes() + 200 * len(self._cache)


def lifetimes_path(model_path: Path) -> Path:
    """Where the remaining-life models live: beside the fleet models' file."""
    return model_path.with_name(model_path.stem + ".lifetimes.pkl")


def failure_histories(
    history: StepHistory, failures: Sequence[Failure]
) -> dict[tuple[str, str], tuple[tuple[str, ...], list[UnitHistory]]]:
    """Run-to-failure histories per (product model, fault), with their metric columns.

    A device's history for a failure starts after its previous failure of the same fault
    (the part was new again) or at its first row, and ends at the failure.
    """
    by_key: dict[tuple[str, str], list[Failure]] = {}
    for failure in sorted(failures, key=lambda f: f.at):
        by_key.setdefault((failure.model, failure.fault), []).append(failure)
    result: dict[tuple[str, str], tuple[tuple[str, ...], list[UnitHistory]]] = {}
    for key, group in by_key.items():
        columns = tuple(sorted(set().union(*(history.metrics(f.device_id) for f in group))))
        previous: dict[str, datetime] = {}
        units = []
        for failure in group:
            rows = history.rows(
                failure.device_id, columns, after=previous.get(failure.device_id), until=failure.at
            )
            previous[failure.device_id] = failure.at
            if rows is not None and rows.times.shape[0] >= 2:
                name = f"{failure.device_id}@{failure.at.isoformat()}"
                units.append(UnitHistory(name, rows.times, rows.values))
        if columns and units:
            result[key] = (columns, units)
    return result


def fit_lifetime_models(
    history: StepHistory, failures: Sequence[Failure], *, min_failures: int = 5
) -> LifetimeModels:
    """Fit one remaining-life model per (product model, fault) with enough failures.

    Args:
        history: the failed devices' readings, aggregated.
        failures: the recorded failures.
        min_failures: fewest histories a model is learnt from (at least 3).

    Returns:
        The models (possibly none).
    """
    models: dict[tuple[str, str], RemainingLifeModel] = {}
    counts: dict[tuple[str, str], int] = {}
    for key, (columns, units) in failure_histories(history, failures).items():
        counts[key] = len(units)
        if len(units) < max(min_failures, 3):
            _LOG.info("%s/%s: %d failure histories, too few to learn from", *key, len(units))
            continue
        try:
            models[key] = fit_remaining_life(units, columns)
        except ConfigError as exc:
            _LOG.warning("%s/%s: no remaining-life model: %s", *key, exc)
    return LifetimeModels(step_s=history.step_s, models=models, failures=counts)
