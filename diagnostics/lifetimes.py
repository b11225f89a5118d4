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
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import numpy as np

from diagnostics.predictor import TimeToFailure
from diagnostics.remaining import RemainingLifeModel, UnitHistory, fit_remaining_life
from gateway.errors import ConfigError
from gateway.protocol import Event, Reading

__all__ = [
    "Failure",
    "LifetimeModels",
    "StepHistory",
    "failure_histories",
    "fit_lifetime_models",
    "lifetimes_path",
]

_LOG = logging.getLogger(__name__)
_FORMAT: Final = "fixloop-lifetimes/1"
_HOUR_S: Final = 3600.0


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
        history: StepHistory,
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
