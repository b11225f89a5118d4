"""Streaming multivariate anomaly detector for numeric time series (diagnostics stage).

Place in the pipeline: the gateway hands telemetry rows to ``diagnostics``; this detector
turns each row of numbers into an anomaly score in [0, 1] ("higher = more anomalous",
STYLE.md rule 10) using only the rows before it. A policy object, or the ``anomaly``
column of ``fixloop detect``, turns scores into decisions at :attr:`StreamDetector.threshold`.

How it scores (all statistics come from the first ``warmup_rows`` rows, never from labels):

1. Standardise every column with its warm-up mean and standard deviation, so columns of
   any scale weigh alike. Columns that are constant (or empty) during warm-up carry no
   information about normal variation and are ignored.
2. Predict each column from its own last ``lags`` values with a ridge-regularised
   autoregression fitted on warm-up. A signal that is normally noise around a level (a
   flow rate) is predicted by that level, so a sustained shift shows. A wandering signal
   (a temperature: weights summing to ``unit_root`` or more) is modelled by its changes
   instead, so slow drift beyond anything seen in warm-up is not an alarm while a sudden
   jump or a change of slope is. (Slow degradation trends are the failure predictors' job.)
3. Smooth each column's prediction residual with a time-aware EWMA (a sustained bias is
   what separates a fault from noise), square the standardised result, average over
   columns, and smooth that again.
4. Calibrate: replay the warm-up through the model, take a high quantile of its smoothed
   scores and multiply by a margin. That raw threshold maps to the operating point 0.5:
   ``score = raw / (raw + raw_threshold)``.

Irregular timestamps are fine: EWMAs decay by elapsed time in units of the warm-up's
median step. A gap longer than ``gap_factor`` median steps is a break: the lag memory
restarts from the current row and the smoothed evidence from its typical warm-up level.
Missing cells (NaN, inf) are imputed by the model's own prediction (they add no
evidence); a row with no usable cell is skipped. Rows are copied on entry and never
modified. A lone glitch is clipped and smoothed away: it raises the score but sustained
deviations are what cross the operating point. The detector draws no random numbers:
the same rows in the same order always give the same scores, and a pickled detector
resumes exactly.

Fitting and scoring are CPU work: async callers run them through ``asyncio.to_thread``
(STYLE.md rule 13).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.errors import ConfigError, PermanentError

__all__ = ["DEFAULT_THRESHOLD", "StreamConfig", "StreamDetector"]

_LOG = logging.getLogger(__name__)

#: The operating point every :class:`StreamDetector` is calibrated to.
DEFAULT_THRESHOLD: Final = 0.5

FloatArray = npt.NDArray[np.float64]

# A column whose warm-up spread is below this (relative to its level) counts as constant.
_CONSTANT_REL: Final = 1e-9


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Settings of a :class:`StreamDetector`.

    Attributes:
        warmup_rows: rows used to learn normal behaviour before scoring starts.
        lags: how many past values of a column predict its next value.
        ridge: ridge penalty on the autoregression weights (standardised units).
        residual_span: EWMA span of the per-column residuals, in median steps.
        score_span: EWMA span of the combined score, in median steps.
        quantile: quantile of the warm-up scores that sets the raw threshold.
        margin: factor on that quantile (warm-up scores are in-sample, so optimistic).
        gap_factor: a step longer than this many median steps is a break.
        clip_z: residuals are clipped to this many residual deviations, so one glitch
            cannot hold the score up for long.
        min_scale: floor of the residual spreads, as a fraction of a column's warm-up
            standard deviation, so a perfectly predictable column cannot dominate.
        unit_root: a column whose autoregression weights sum to at least this is
            modelled by its changes (above 1: never).
    """

    warmup_rows: int = 400
    lags: int = 3
    ridge: float = 1.0
    residual_span: float = 10.0
    score_span: float = 39.0
    quantile: float = 0.99
    margin: float = 2.0
    gap_factor: float = 10.0
    clip_z: float = 10.0
    min_scale: float = 0.05
    unit_root: float = 0.9

    def __post_init__(self) -> None:
        if self.lags < 1:
            raise ConfigError(f"detector lags must be >= 1 (got {self.lags})")
        minimum = 4 * (self.lags + 1)
        if self.warmup_rows < minimum:
            raise ConfigError(
                f"detector warm-up must be at least {minimum} rows (got {self.warmup_rows})"
            )
        positive = {
            "ridge": self.ridge,
            "margin": self.margin,
            "clip_z": self.clip_z,
            "min_scale": self.min_scale,
            "unit_root": self.unit_root,
        }
        for name, value in positive.items():
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"detector {name} must be a positive number (got {value})")
        for name, span in (("residual_span", self.residual_span), ("score_span", self.score_span)):
            if not span >= 1 or not math.isfinite(span):
                raise ConfigError(f"detector {name} must be >= 1 (got {span})")
        if not 0.5 <= self.quantile <= 1:
            raise ConfigError(f"detector quantile must be in [0.5, 1] (got {self.quantile})")
        if not self.gap_factor > 1:
            raise ConfigError(f"detector gap_factor must be > 1 (got {self.gap_factor})")


@dataclass(frozen=True, slots=True)
class _Model:
    """What warm-up taught: scaling, autoregressions, spreads and the raw threshold."""

    active: npt.NDArray[np.intp]  # indices of the columns that are scored
    mean: FloatArray  # per active column
    std: FloatArray
    coef: FloatArray  # (active, lags): weight of lag k+1 (of the change, if integrated)
    intercept: FloatArray
    integrated: npt.NDArray[np.bool_]  # columns modelled by their changes
    resid_scale: FloatArray
    smooth_scale: FloatArray
    median_step: float
    raw_threshold: float
    rest_score: float  # typical warm-up raw score: where the evidence restarts after a break


@dataclass(frozen=True, slots=True)
class _State:
    """Short-term memory carried from one row to the next (replaced, never mutated)."""

    lags: FloatArray | None  # (lags + 1, active) standardised values, newest first
    smooth: FloatArray | None  # EWMA of the scaled residuals per active column
    score: float  # EWMA of the combined score (raw units)
    last_ts: float | None


class StreamDetector:
    """Streaming anomaly detector: ``score_one`` / ``learn_one``, or ``score_stream``.

    Example::

        detector = StreamDetector(StreamConfig(warmup_rows=400))
        scores = detector.score_stream(rows, timestamps)  # each row sees only the past
        alarms = scores >= detector.threshold

    Rows scored during warm-up get 0.0: the detector is still learning what normal is.
    """

    def __init__(self, config: StreamConfig | None = None) -> None:
        self._config = config if config is not None else StreamConfig()
        self._n_columns: int | None = None
        self._warm_rows: list[FloatArray] = []
        self._warm_ts: list[float] = []
        self._model: _Model | None = None
        self._state = _State(lags=None, smooth=None, score=0.0, last_ts=None)
        self._rows_seen = 0

    # -- public view ---------------------------------------------------------------

    @property
    def config(self) -> StreamConfig:
        """The settings this detector was built with."""
        return self._config

    @property
    def threshold(self) -> float:
        """Operating point: a score at or above it is anomalous (0.5 by construction)."""
        return DEFAULT_THRESHOLD

    @property
    def ready(self) -> bool:
        """Whether warm-up is over and scores mean something."""
        return self._model is not None

    @property
    def n_columns(self) -> int | None:
        """Number of values per row (fixed by the first row), or None before it."""
        return self._n_columns

    @property
    def ignored_columns(self) -> tuple[int, ...]:
        """Indices of columns that were constant or empty during warm-up (not scored)."""
        if self._model is None or self._n_columns is None:
            return ()
        active = set(self._model.active.tolist())
        return tuple(i for i in range(self._n_columns) if i not in active)

    @property
    def raw_threshold(self) -> float | None:
        """The calibrated threshold in raw (unsquashed) units, once ready."""
        return None if self._model is None else self._model.raw_threshold

    # -- river-style API -----------------------------------------------------------

    def score_one(self, x: Sequence[float] | FloatArray, ts: float | None = None) -> float:
        """Score one row given the rows learnt so far, without learning it.

        Args:
            x: the row's values (NaN or inf for a missing cell).
            ts: its timestamp in seconds; None means one step after the previous row.

        Returns:
            The anomaly score in [0, 1]; 0.0 while warming up.

        Raises:
            PermanentError: the row has the wrong length or goes back in time.
        """
        row, stamp = self._check(x, ts)
        if self._model is None:
            return 0.0
        score, _, _ = self._advance(self._model, self._state, row, stamp)
        return score

    def learn_one(self, x: Sequence[float] | FloatArray, ts: float | None = None) -> None:
        """Take one row into the detector's memory (and into warm-up while it lasts).

        Args:
            x: the row's values (NaN or inf for a missing cell).
            ts: its timestamp in seconds; None means one step after the previous row.

        Raises:
            PermanentError: the row has the wrong length or goes back in time.
        """
        row, stamp = self._check(x, ts)
        self._learn(row, stamp)

    def score_stream(
        self,
        rows: Iterable[Sequence[float] | FloatArray],
        timestamps: Iterable[float] | None = None,
    ) -> FloatArray:
        """Score then learn each row in turn: row i is scored from rows before it only.

        Args:
            rows: rows of equal length (a 2-D array works).
            timestamps: one per row in seconds (non-decreasing), or None for equal steps.

        Returns:
            One score in [0, 1] per row.

        Raises:
            PermanentError: a row has the wrong length or goes back in time.
        """
        stamps = iter(timestamps) if timestamps is not None else None
        out: list[float] = []
        for x in rows:
            ts = next(stamps) if stamps is not None else None
            row, stamp = self._check(x, ts)
            out.append(self._learn(row, stamp))
        return np.asarray(out, dtype=np.float64)

    # -- internals -----------------------------------------------------------------

    def _check(self, x: Sequence[float] | FloatArray, ts: float | None) -> tuple[FloatArray, float]:
        row = np.array(x, dtype=np.float64, copy=True).reshape(-1)
        if self._n_columns is None:
            if row.size == 0:
                raise PermanentError("a row needs at least one value")
        elif row.size != self._n_columns:
            raise PermanentError(f"row has {row.size} values, expected {self._n_columns}")
        row[~np.isfinite(row)] = np.nan
        last = self._state.last_ts
        if ts is None:
            stamp = 0.0 if last is None else last + self._step_guess()
        else:
            stamp = float(ts)
            if not math.isfinite(stamp):
                raise PermanentError(f"timestamp {ts!r} is not a finite number")
            if last is not None and stamp < last:
                raise PermanentError(f"timestamp {stamp} is before the previous one ({last})")
        return row, stamp

    def _step_guess(self) -> float:
        if self._model is not None:
            return self._model.median_step
        steps = np.diff(np.asarray(self._warm_ts, dtype=np.float64))
        steps = steps[steps > 0]
        return float(np.median(steps)) if steps.size else 1.0

    def _learn(self, row: FloatArray, stamp: float) -> float:
        """Advance the state by one checked row; returns the row's score."""
        if self._n_columns is None:
            self._n_columns = row.size
        self._rows_seen += 1
        if self._model is None:
            self._state = _State(lags=None, smooth=None, score=0.0, last_ts=stamp)
            if np.isnan(row).all():
                return 0.0
            self._warm_rows.append(row)
            self._warm_ts.append(stamp)
            if len(self._warm_rows) >= self._config.warmup_rows:
                self._fit()
            return 0.0
        score, self._state, _ = self._advance(self._model, self._state, row, stamp)
        return score

    def _advance(
        self, model: _Model, state: _State, row: FloatArray, stamp: float
    ) -> tuple[float, _State, FloatArray | None]:
        """Score ``row`` against ``state``.

        Returns:
            The score, the next state and the clipped scaled residuals (None when the
            row had no usable cell and the state did not move).
        """
        z = (row[model.active] - model.mean) / model.std
        missing = np.isnan(z)
        if missing.all():
            # Nothing to learn from: keep the memory, report the current level.
            return _squash(state.score, model.raw_threshold), state, None
        cfg = self._config
        steps = _steps(state.last_ts, stamp, model.median_step)
        lags, smooth, score = state.lags, state.smooth, state.score
        if lags is None or smooth is None or steps > cfg.gap_factor:
            # A break (or the very first row): restart the lag memory from this row and
            # the evidence from its typical level; time alone is no evidence either way.
            lags = np.repeat(np.where(missing, 0.0, z)[None, :], cfg.lags + 1, axis=0)
            smooth = np.zeros_like(z)
            score = model.rest_score
            steps = 1.0
        level = lags[:-1]
        changes = level - lags[1:]
        predicted = model.intercept + np.where(
            model.integrated,
            lags[0] + np.einsum("ij,ji->i", model.coef, changes),
            np.einsum("ij,ji->i", model.coef, level),
        )
        z = np.where(missing, predicted, z)
        resid = np.clip((z - predicted) / model.resid_scale, -cfg.clip_z, cfg.clip_z)
        keep_r = _keep(cfg.residual_span, steps)
        smooth = keep_r * smooth + (1 - keep_r) * resid
        instant = float(np.mean((smooth / model.smooth_scale) ** 2))
        keep_s = _keep(cfg.score_span, steps)
        score = keep_s * score + (1 - keep_s) * instant
        new_lags = np.concatenate([z[None, :], lags[:-1]], axis=0)
        next_state = _State(new_lags, smooth, score, stamp)
        return _squash(score, model.raw_threshold), next_state, resid

    def _fit(self) -> None:
        """Learn the model from the warm-up rows and replay them to calibrate."""
        cfg = self._config
        data = np.vstack(self._warm_rows)
        stamps = np.asarray(self._warm_ts, dtype=np.float64)
        steps = np.diff(stamps)
        positive = steps[steps > 0]
        median_step = float(np.median(positive)) if positive.size else 1.0

        counts = np.sum(~np.isnan(data), axis=0)
        safe = np.where(np.isnan(data), 0.0, data)
        mean = safe.sum(axis=0) / np.maximum(counts, 1)
        var = (np.where(np.isnan(data), 0.0, data - mean) ** 2).sum(axis=0) / np.maximum(counts, 1)
        std = np.sqrt(var)
        informative = (counts >= 2) & (std > _CONSTANT_REL * np.maximum(1.0, np.abs(mean)))
        active = np.flatnonzero(informative)
        if active.size == 0:
            raise PermanentError(
                "every column was constant or empty during warm-up: nothing to watch"
            )
        ignored = np.flatnonzero(~informative)
        if ignored.size:
            _LOG.debug("columns constant or empty during warm-up, not scored: %s", ignored.tolist())
        mean, std = mean[active], std[active]
        z = (data[:, active] - mean) / std
        z = _forward_fill(z)

        breaks = np.concatenate([[True], steps / median_step > cfg.gap_factor])
        coef, intercept, integrated = _fit_autoregression(
            z, breaks, cfg.lags, cfg.ridge, cfg.unit_root
        )
        unit = np.ones(active.size)
        draft = _Model(
            active=active,
            mean=mean,
            std=std,
            coef=coef,
            intercept=intercept,
            integrated=integrated,
            resid_scale=unit,
            smooth_scale=unit,
            median_step=median_step,
            raw_threshold=1.0,
            rest_score=0.0,
        )
        # Early warm-up rows are skipped in every spread: the EWMAs are still filling.
        burn = len(self._warm_rows) // 4
        stages = self._replay(draft, data, stamps)
        resid_scale = np.maximum(stages[0][burn:].std(axis=0), cfg.min_scale)
        draft = replace(draft, resid_scale=resid_scale)
        stages = self._replay(draft, data, stamps)
        smooth_scale = np.maximum(stages[1][burn:].std(axis=0), cfg.min_scale / 10)
        draft = replace(draft, smooth_scale=smooth_scale)
        stages = self._replay(draft, data, stamps)
        raw = stages[2][burn:]
        threshold = float(np.quantile(raw, cfg.quantile)) * cfg.margin
        if not threshold > 0:
            threshold = float(np.finfo(np.float64).tiny)
        self._model = replace(draft, raw_threshold=threshold, rest_score=float(np.median(raw)))
        self._state = stages[3]
        self._warm_rows = []
        self._warm_ts = []

    def _replay(
        self, model: _Model, data: FloatArray, stamps: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, _State]:
        """Run the warm-up through ``model``: raw residuals, smoothed ones, scores, end state."""
        state = _State(lags=None, smooth=None, score=0.0, last_ts=None)
        resids, smooths, scores = [], [], []
        for row, stamp in zip(data, stamps, strict=True):
            _, state, resid = self._advance(model, state, row, float(stamp))
            if resid is None:
                continue
            assert state.smooth is not None  # set by every row that had a value
            resids.append(resid)
            smooths.append(state.smooth)
            scores.append(state.score)
        return np.vstack(resids), np.vstack(smooths), np.asarray(scores), state


def _steps(last_ts: float | None, stamp: float, median_step: float) -> float:
    """Elapsed time in median steps; rows closer than a step count as one step."""
    if last_ts is None:
        return 1.0
    return max(1.0, (stamp - last_ts) / median_step)


def _keep(span: float, steps: float) -> float:
    """EWMA weight kept on the past after ``steps`` median steps (alpha = 2 / (span + 1))."""
    return float((1.0 - 2.0 / (span + 1.0)) ** steps)


def _squash(raw: float, raw_threshold: float) -> float:
    """Map a raw score in [0, inf) to [0, 1), with the raw threshold at 0.5."""
    return raw / (raw + raw_threshold)


def _forward_fill(z: FloatArray) -> FloatArray:
    """Fill missing standardised cells with the column's last value (0, its mean, at first)."""
    out = z.copy()
    last = np.zeros(z.shape[1])
    for i in range(out.shape[0]):
        gaps = np.isnan(out[i])
        out[i, gaps] = last[gaps]
        last = out[i]
    return out


def _fit_autoregression(
    z: FloatArray, breaks: npt.NDArray[np.bool_], lags: int, ridge: float, unit_root: float
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Ridge autoregression of each column on its own lags, within unbroken stretches.

    A column whose level weights sum to ``unit_root`` or more is refitted on its changes.

    Returns:
        ``(coef, intercept, integrated)``: ``coef[j, k]`` weighs column j's lag k+1 (of
        its level, or of its change where ``integrated[j]``).
    """
    n, d = z.shape
    coef = np.zeros((d, lags))
    intercept = np.zeros(d)
    integrated = np.zeros(d, dtype=bool)
    # Row i is a target when rows i-span .. i lie in one unbroken stretch.
    segment = np.cumsum(breaks)
    rows = np.arange(n)

    def targets(span: int) -> npt.NDArray[np.intp]:
        ok = (rows >= span) & (segment == segment[np.maximum(rows - span, 0)])
        return np.flatnonzero(ok)

    level_rows, change_rows = targets(lags), targets(lags + 1)
    if change_rows.size < lags + 2:
        _LOG.info("warm-up has too few unbroken stretches to fit lags; using levels only")
        return coef, intercept, integrated
    changes = np.diff(z, axis=0, prepend=z[:1])
    for j in range(d):
        beta = _ridge(z[:, j], level_rows, lags, ridge)
        if beta[:lags].sum() >= unit_root:
            beta = _ridge(changes[:, j], change_rows, lags, ridge)
            integrated[j] = True
        coef[j] = beta[:lags]
        intercept[j] = beta[lags]
    return coef, intercept, integrated


def _ridge(
    series: FloatArray, targets: npt.NDArray[np.intp], lags: int, ridge: float
) -> FloatArray:
    """Weights of ``series``'s lags 1..lags, then the intercept (not shrunk)."""
    design = np.column_stack(
        [series[targets - k] for k in range(1, lags + 1)] + [np.ones(targets.size)]
    )
    penalty = ridge * np.eye(lags + 1)
    penalty[-1, -1] = 0.0
    result: FloatArray = np.linalg.solve(
        design.T @ design + penalty, design.T @ series[targets]
    ).astype(np.float64)
    return result
