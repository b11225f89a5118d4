"""Remaining-life predictor learnt from run-to-failure histories (diagnostics, "Decide").

Place in the pipeline: beside :mod:`diagnostics.predictor`. That one extrapolates the trend
of a feature whose failure level the product's catalog states; this one needs no catalog:
it learns what the approach to failure looks like from units that did fail, and is
what ``fixloop ttf`` runs (:mod:`diagnostics.ttfcsv` reads the files).

A *history* is one unit's rows in time order, the last of which is its failure; a *partial
history* is a running unit's rows so far. Any numeric metrics in any time unit. Fitting:

1. **Columns.** Metrics that never change (or are never given) in the histories are set
   aside; they cannot tell one stage of life from another.
2. **Operating regimes** (:mod:`diagnostics.regimes`, with step 1). Columns whose values
   sit in a few tight groups (at most six,
   under 0.1 % of the column's variance within groups: set points such as altitude or
   throttle, not a sensor that merely follows them) are candidate *settings*. If the
   clusters of their joint values explain most of the other metrics' variance (median
   within-regime share of variance below a half), each row is given its regime and every
   other metric is normalised by that regime's mean and spread (from the histories); the
   setting columns themselves are then dropped. Otherwise one regime covers all rows and
   metrics are z-scored. A missing setting value is ignored in the distance to the regime
   centres.
3. **Health index.** A ridge regression from the normalised metrics (a missing value counts
   as the regime mean) to the share of life left (capped remaining / cap) gives one
   combined, less noisy signal, treated as one more metric.
4. **Features of a prefix.** For every row of every history, from that row and the rows
   before it of the same unit only: the mean of each metric over the last ``w`` rows for
   each window ``w``, its least-squares slope per time unit over the longest window and
   over the whole prefix, its change from the unit's first rows (the unit's own start
   level: units start with different wear), and the unit's age (time since its first
   row). Missing values are left out of every mean and slope; a feature with no value is
   left missing, which the regressor handles.
5. **Regressor.** Gradient-boosted trees (scikit-learn's ``HistGradientBoostingRegressor``)
   from those features to the remaining time, capped at ``cap`` if one is set (the
   piecewise-linear convention: early in life nothing tells how much longer a unit will
   last than the cap). Every prefix is one training row (up to ``max_prefixes`` in all);
   unweighted, because scikit-learn's binning with sample weights was several times
   slower for no clear gain in the cross-validated error (on two folds of C-MAPSS FD001).
6. **Settings and band.** Among a few candidate settings, the one with the lowest error in
   a cross-validation over units (folds never split a unit; each unit's prefixes weighted
   by one over its length, so every unit counts once) is kept, and the out-of-fold
   errors of that candidate give the band: for predictions in the same range (quintiles
   of the out-of-fold predictions), the ``(1 - coverage) / 2`` and ``(1 + coverage) / 2``
   quantiles of truth minus prediction are added to the prediction. The final model is
   then fitted on every history.

A running unit's prediction uses only its own rows (and what was learnt from the
histories): features are computed for each unit separately.

Assumption: each unit's first row is the start of its life (or of its observation, the
same way for histories and running units); age is measured from there.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.regimes import _find_regimes, _Regimes
from wire.errors import ConfigError

__all__ = [
    "DEFAULT_CANDIDATES",
    "RemainingConfig",
    "RemainingLifeModel",
    "RemainingPrediction",
    "UnitHistory",
    "fit_remaining_life",
]

_LOG = logging.getLogger(__name__)

Floats = npt.NDArray[np.float64]
Progress = Callable[[str], None]

_BAND_BINS: Final = 5


@dataclass(frozen=True, slots=True)
class RemainingConfig:
    """Settings of one remaining-life model.

    Attributes:
        cap: remaining time above which targets are learnt as the cap (None: no cap).
        windows: window lengths in rows for the recent means, shortest first.
        max_iter: boosting rounds.
        learning_rate: boosting step.
        max_leaf_nodes: leaves per tree.
        min_samples_leaf: fewest prefixes in a leaf.
        l2: L2 regularisation of the leaf values.
        coverage: the share of outcomes the band should hold (e.g. 0.8: p10..p90).
        folds: units' folds for choosing settings and measuring the band.
        seed: seed of every random choice (folds, boosting, prefixes kept).
        max_prefixes: most prefixes (rows) learnt from in one fit; beyond, a random share
            of each unit's prefixes is kept.
    """

    cap: float | None = None
    windows: tuple[int, ...] = (5, 15, 30)
    max_iter: int = 300
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 40
    l2: float = 1.0
    coverage: float = 0.8
    folds: int = 3
    seed: int = 0
    max_prefixes: int = 100_000

    def __post_init__(self) -> None:
        if self.cap is not None and not (math.isfinite(self.cap) and self.cap > 0):
            raise ConfigError(f"cap must be a positive number (got {self.cap})")
        if not self.windows or any(w < 1 for w in self.windows):
            raise ConfigError(f"windows must be positive row counts (got {self.windows})")
        if tuple(sorted(self.windows)) != self.windows:
            raise ConfigError(f"windows must be in increasing order (got {self.windows})")
        if not 0 < self.coverage < 1:
            raise ConfigError(f"coverage must be between 0 and 1 (got {self.coverage})")
        if self.folds < 2:
            raise ConfigError(f"folds must be at least 2 (got {self.folds})")
        if self.max_iter < 1 or self.max_leaf_nodes < 2 or self.min_samples_leaf < 1:
            raise ConfigError("max_iter, max_leaf_nodes and min_samples_leaf must be positive")
        if self.max_prefixes < 100:
            raise ConfigError(f"max_prefixes must be at least 100 (got {self.max_prefixes})")


#: The settings tried by default (on top of the caller's cap, coverage, folds and seed).
#: (Longer windows, 10/30/60 rows, were tried too and never won on C-MAPSS FD001.)
DEFAULT_CANDIDATES: Final[tuple[RemainingConfig, ...]] = (
    RemainingConfig(windows=(5, 15, 30)),
    RemainingConfig(windows=(5, 15, 30), max_iter=500, learning_rate=0.03, max_leaf_nodes=31),
)


@dataclass(frozen=True, slots=True)
class UnitHistory:
    """One unit's rows in time order.

    Attributes:
        unit: the unit's name.
        times: time of each row (any unit; non-decreasing).
        values: one row per time, one column per metric (NaN: missing).
    """

    unit: str
    times: Floats
    values: Floats

    def __post_init__(self) -> None:
        if self.times.ndim != 1 or self.values.ndim != 2:
            raise ConfigError(f"unit {self.unit}: times must be 1-D and values 2-D")
        if self.values.shape[0] != self.times.shape[0] or self.times.shape[0] == 0:
            raise ConfigError(f"unit {self.unit}: needs rows, one time per row")
        if not np.all(np.isfinite(self.times)):
            raise ConfigError(f"unit {self.unit}: every row needs a finite time")
        if np.any(np.diff(self.times) < 0):
            raise ConfigError(f"unit {self.unit}: times go back")


@dataclass(frozen=True, slots=True)
class RemainingPrediction:
    """Predicted remaining time of one unit after its last row, in the rows' time unit.

    Attributes:
        unit: the unit's name.
        remaining: the point prediction.
        low: lower end of the band.
        high: upper end of the band.
    """

    unit: str
    remaining: float
    low: float
    high: float


@dataclass(slots=True)
class RemainingLifeModel:
    """A fitted remaining-life model (picklable); make one with :func:`fit_remaining_life`.

    Attributes:
        config: the settings it was fitted with (chosen by cross-validation).
        columns: the metric names it reads, in order.
        used_columns: the metrics it found informative (others are constant or empty).
        regimes: how many operating regimes it found (1: none).
        band: per prediction range, the lower and upper offsets of the band.
        cv_rmse: the cross-validated error (one value per unit, unit-weighted) of each
            candidate, in the order tried.
    """

    config: RemainingConfig
    columns: tuple[str, ...]
    used_columns: tuple[str, ...]
    regimes: int
    band: Floats = field(repr=False)
    band_edges: Floats = field(repr=False)
    cv_rmse: tuple[float, ...]
    _norm: _Regimes = field(repr=False)
    _hi_weights: Floats = field(repr=False)
    _regressor: object = field(repr=False)

    def predict(self, units: Sequence[UnitHistory]) -> list[RemainingPrediction]:
        """Predict each unit's remaining time after its last row from its rows only.

        Args:
            units: partial histories, values in the columns of :attr:`columns`.

        Returns:
            One prediction per unit, in the order given.

        Raises:
            ConfigError: a unit's values do not have one column per metric.
        """
        rows = []
        for unit in units:
            _check_width(unit, len(self.columns))
            feats = _prefix_features(unit, self._norm, self._hi_weights, self.config, last=True)
            rows.append(feats[-1])
        if not rows:
            return []
        point = self._predict_features(np.vstack(rows))
        low, high = self._band_of(point)
        return [
            RemainingPrediction(u.unit, float(p), float(lo), float(hi))
            for u, p, lo, hi in zip(units, point, low, high, strict=True)
        ]

    def _predict_features(self, features: Floats) -> Floats:
        with _one_thread():
            raw: Floats = self._regressor.predict(features)  # type: ignore[attr-defined]
        return _clip(raw, self.config.cap)

    def _band_of(self, point: Floats) -> tuple[Floats, Floats]:
        bins = np.clip(np.searchsorted(self.band_edges, point), 0, len(self.band) - 1)
        low = _clip(point + self.band[bins, 0], self.config.cap)
        high = _clip(point + self.band[bins, 1], self.config.cap)
        return np.minimum(low, point), np.maximum(high, point)


def fit_remaining_life(
    histories: Sequence[UnitHistory],
    columns: Sequence[str],
    *,
    cap: float | None = None,
    coverage: float = 0.8,
    candidates: Sequence[RemainingConfig] = DEFAULT_CANDIDATES,
    folds: int = 3,
    seed: int = 0,
    progress: Progress | None = None,
) -> RemainingLifeModel:
    """Learn the approach to failure from complete histories (each ends at a failure).

    Args:
        histories: complete run-to-failure histories, at least ``folds`` units.
        columns: the metric names, one per column of every history's values.
        cap: remaining time above which targets are learnt as the cap (None: no cap).
        coverage: the share of outcomes the band should hold.
        candidates: settings to choose from by cross-validation over units (their own
            ``cap``, ``coverage``, ``folds`` and ``seed`` are replaced by the arguments).
        folds: folds of that cross-validation.
        seed: seed of the folds and of the boosting.
        progress: called with a short line as each step starts (None: silent).

    Returns:
        The model fitted on every history with the chosen settings.

    Raises:
        ConfigError: too few histories, a history of one row, or no informative metric.
    """
    say = progress if progress is not None else (lambda _line: None)
    configs = [replace(c, cap=cap, coverage=coverage, folds=folds, seed=seed) for c in candidates]
    if not configs:
        raise ConfigError("no candidate settings to fit")
    if len(histories) < folds:
        raise ConfigError(
            f"need at least {folds} run-to-failure histories to learn from (got {len(histories)})"
        )
    for unit in histories:
        _check_width(unit, len(columns))
        if unit.times.shape[0] < 2:
            raise ConfigError(
                f"history of unit {unit.unit} has one row; a history runs up to its failure"
            )
    fold_of = _unit_folds(len(histories), folds, seed)
    scores: list[float] = []
    best: tuple[float, int, Floats, Floats, Floats] | None = None
    for index, config in enumerate(configs):
        truth_parts, pred_parts, weight_parts = [], [], []
        for fold in range(folds):
            say(f"settings {index + 1}/{len(configs)}, fold {fold + 1}/{folds}")
            train = [h for h, f in zip(histories, fold_of, strict=True) if f != fold]
            held = [h for h, f in zip(histories, fold_of, strict=True) if f == fold]
            model = _fit_one(train, columns, config)
            features, truth, weight = _training_set(held, model._norm, model._hi_weights, config)
            truth_parts.append(_clip(truth, config.cap))
            pred_parts.append(model._predict_features(features))
            weight_parts.append(weight)
        truth_all = np.concatenate(truth_parts)
        pred_all = np.concatenate(pred_parts)
        weight_all = np.concatenate(weight_parts)
        rmse = float(np.sqrt(np.average((pred_all - truth_all) ** 2, weights=weight_all)))
        scores.append(rmse)
        _LOG.debug("candidate %d: cross-validated RMSE %.3f", index, rmse)
        if best is None or rmse < best[0]:
            best = (rmse, index, truth_all - pred_all, pred_all, weight_all)
    assert best is not None  # configs is not empty
    _, chosen, residuals, oof_pred, oof_weight = best
    say(f"fitting the chosen settings ({chosen + 1}) on all {len(histories)} histories")
    model = _fit_one(histories, columns, configs[chosen])
    model.band_edges, model.band = _band(oof_pred, residuals, oof_weight, coverage)
    model.cv_rmse = tuple(scores)
    return model


def _one_thread() -> contextlib.AbstractContextManager[object]:
    """Limit native thread pools (OpenMP, BLAS) to one thread while in the block."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=1)
    return limits


def _unit_folds(units: int, folds: int, seed: int) -> npt.NDArray[np.intp]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(units)
    fold_of = np.empty(units, dtype=np.intp)
    fold_of[order] = np.arange(units) % folds
    return fold_of


def _check_width(unit: UnitHistory, width: int) -> None:
    if unit.values.shape[1] != width:
        raise ConfigError(
            f"unit {unit.unit}: {unit.values.shape[1]} metric columns, expected {width}"
        )


def _clip(values: Floats, cap: float | None) -> Floats:
    return np.clip(values, 0.0, cap if cap is not None else np.inf)


def _band(
    pred: Floats, residuals: Floats, weights: Floats, coverage: float
) -> tuple[Floats, Floats]:
    """Band offsets per range of predictions (quintiles), from out-of-fold residuals."""
    edges = np.quantile(pred, np.linspace(0, 1, _BAND_BINS + 1)[1:-1])
    bins = np.searchsorted(edges, pred)
    lo_q, hi_q = (1 - coverage) / 2, (1 + coverage) / 2
    band = np.zeros((_BAND_BINS, 2))
    for b in range(_BAND_BINS):
        mask = bins == b
        if not np.any(mask):
            mask = np.ones_like(mask)
        band[b] = _weighted_quantiles(residuals[mask], weights[mask], (lo_q, hi_q))
    return edges, band


def _weighted_quantiles(
    values: Floats, weights: Floats, quantiles: tuple[float, float]
) -> tuple[float, float]:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    cum /= cum[-1]
    last = len(cum) - 1
    low = min(int(np.searchsorted(cum, quantiles[0])), last)
    high = min(int(np.searchsorted(cum, quantiles[1])), last)
    return float(values[order[low]]), float(values[order[high]])


def _fit_one(
    histories: Sequence[UnitHistory], columns: Sequence[str], config: RemainingConfig
) -> RemainingLifeModel:
    from sklearn.ensemble import HistGradientBoostingRegressor

    stacked = np.vstack([h.values for h in histories])
    norm = _find_regimes(stacked)
    if not norm.metric_columns:
        raise ConfigError(
            "no metric changes in the histories (every metric is constant or missing)"
        )
    hi_weights = _health_index(histories, norm, config)
    features, truth, _ = _training_set(histories, norm, hi_weights, config)
    regressor = HistGradientBoostingRegressor(
        max_iter=config.max_iter,
        learning_rate=config.learning_rate,
        max_leaf_nodes=config.max_leaf_nodes,
        min_samples_leaf=config.min_samples_leaf,
        l2_regularization=config.l2,
        early_stopping=False,
        random_state=config.seed,
    )
    # One thread: OpenMP threads spin while waiting, and on a shared machine two of them
    # took ten times as long as one (2 cores, other work running).
    with _one_thread():
        regressor.fit(features, _clip(truth, config.cap))
    return RemainingLifeModel(
        config=config,
        columns=tuple(columns),
        used_columns=tuple(columns[i] for i in norm.metric_columns),
        regimes=norm.centres.shape[0] if norm.setting_columns else 1,
        band=np.zeros((1, 2)),
        band_edges=np.zeros(0),
        cv_rmse=(),
        _norm=norm,
        _hi_weights=hi_weights,
        _regressor=regressor,
    )


def _training_set(
    histories: Sequence[UnitHistory], norm: _Regimes, hi_weights: Floats, config: RemainingConfig
) -> tuple[Floats, Floats, Floats]:
    """Features of every prefix, its true remaining time, and its weight (1 / unit rows).

    Past ``config.max_prefixes`` rows in all, each unit keeps the same share of its
    prefixes, drawn at random (seeded): time and memory stay bounded on long histories.
    """
    total = sum(h.times.shape[0] for h in histories)
    share = min(1.0, config.max_prefixes / total) if total else 1.0
    rng = np.random.default_rng(config.seed)
    feats, truth, weight = [], [], []
    for h in histories:
        n = h.times.shape[0]
        features = _prefix_features(h, norm, hi_weights, config, last=False)
        remaining = h.times[-1] - h.times
        if share < 1.0:
            keep = np.sort(rng.choice(n, max(1, math.ceil(n * share)), replace=False))
            features, remaining = features[keep], remaining[keep]
        feats.append(features)
        truth.append(remaining)
        weight.append(np.full(remaining.shape[0], 1.0 / remaining.shape[0]))
    return np.vstack(feats), np.concatenate(truth), np.concatenate(weight)


def _health_index(
    histories: Sequence[UnitHistory], norm: _Regimes, config: RemainingConfig
) -> Floats:
    """Ridge weights (bias last) from normalised metrics to the share of life left."""
    scale = config.cap
    if scale is None:
        scale = float(np.median([h.times[-1] - h.times[0] for h in histories])) or 1.0
    x = np.nan_to_num(np.vstack([norm.normalise(h.values) for h in histories]))
    y = np.concatenate([np.minimum(h.times[-1] - h.times, scale) / scale for h in histories])
    w = np.concatenate([np.full(h.times.shape[0], 1.0 / h.times.shape[0]) for h in histories])
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    gram = (design * w[:, None]).T @ design
    ridge = np.eye(design.shape[1]) * 1e-3 * float(np.trace(gram)) / design.shape[1]
    ridge[-1, -1] = 0.0
    coef: Floats = np.linalg.solve(gram + ridge, (design * w[:, None]).T @ y)
    return coef


# -- features ----------------------------------------------------------------------------


def _prefix_features(
    unit: UnitHistory, norm: _Regimes, hi_weights: Floats, config: RemainingConfig, *, last: bool
) -> Floats:
    """Features of each prefix of ``unit`` (module docstring, step 4); ``last``: the whole only."""
    z = norm.normalise(unit.values)
    hi = np.nan_to_num(z) @ hi_weights[:-1] + hi_weights[-1]
    x = np.hstack([z, hi[:, None]])
    n = x.shape[0]
    given = np.isfinite(x)
    vals = np.where(given, x, 0.0)
    idx = np.arange(n, dtype=np.float64)
    c_n = _cumsum0(given.astype(np.float64))
    c_x = _cumsum0(vals)
    c_k = _cumsum0(given * idx[:, None])
    c_kk = _cumsum0(given * (idx * idx)[:, None])
    c_kx = _cumsum0(vals * idx[:, None])
    rows = np.array([n - 1]) if last else np.arange(n)
    end = rows + 1
    times = unit.times
    parts = []
    for w in config.windows:
        start = np.maximum(end - w, 0)
        parts.append(_window_mean(c_x, c_n, start, end))
    w_long = config.windows[-1]
    for start in (np.maximum(end - w_long, 0), np.zeros_like(end)):
        slope_per_row = _window_slope(c_n, c_x, c_k, c_kk, c_kx, start, end)
        span = times[end - 1] - times[start]
        steps = (end - 1 - start).astype(np.float64)
        with np.errstate(all="ignore"):
            per_time = np.where(span > 0, steps / span, np.nan)
        parts.append(slope_per_row * per_time[:, None])
    first_end = np.minimum(end, config.windows[-1])
    early = _window_mean(c_x, c_n, np.zeros_like(end), first_end)
    parts.append(parts[len(config.windows) - 1] - early)
    age = (times[rows] - times[0])[:, None]
    return np.hstack([*parts, age])


def _cumsum0(a: Floats) -> Floats:
    out = np.zeros((a.shape[0] + 1, a.shape[1]))
    np.cumsum(a, axis=0, out=out[1:])
    return out


def _window_mean(
    c_x: Floats, c_n: Floats, start: npt.NDArray[np.intp], end: npt.NDArray[np.intp]
) -> Floats:
    count = c_n[end] - c_n[start]
    with np.errstate(all="ignore"):
        mean: Floats = np.where(count > 0, (c_x[end] - c_x[start]) / count, np.nan)
    return mean


def _window_slope(
    c_n: Floats,
    c_x: Floats,
    c_k: Floats,
    c_kk: Floats,
    c_kx: Floats,
    start: npt.NDArray[np.intp],
    end: npt.NDArray[np.intp],
) -> Floats:
    n = c_n[end] - c_n[start]
    sx = c_x[end] - c_x[start]
    sk = c_k[end] - c_k[start]
    skk = c_kk[end] - c_kk[start]
    skx = c_kx[end] - c_kx[start]
    den = n * skk - sk * sk
    with np.errstate(all="ignore"):
        slope: Floats = np.where((n >= 2) & (den > 0), (n * skx - sk * sx) / den, np.nan)
    return slope
