"""Operating regimes of run-to-failure histories (diagnostics, "Decide").

Steps 1 and 2 of :mod:`diagnostics.remaining`'s fit: the metrics that never change are
set aside, columns whose values sit in a few tight groups are candidate *settings*, and
when the clusters of their joint values explain most of the other metrics' variance,
each row gets its regime and every other metric is normalised by that regime's mean and
spread (:class:`_Regimes`); otherwise one regime covers all rows and metrics are
z-scored. The module docstring of :mod:`diagnostics.remaining` states the rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__: list[str] = []

_LOG = logging.getLogger(__name__)

Floats = npt.NDArray[np.float64]


# within-group share of a column's variance for it to be a setting (set points: tight)
_SETTING_SHARE: Final = 1e-3
_REGIME_SHARE: Final = 0.01  # within-regime share of the settings' joint variance
_REGIME_EXPLAINED: Final = 0.5  # median within-regime variance share to accept regimes
_MAX_REGIMES: Final = 10
_REGIME_SAMPLE: Final = 5_000
_STD_FLOOR: Final = 1e-9


@dataclass(frozen=True, slots=True)
class _Regimes:
    """Operating regimes and the per-regime normalisation of the metrics."""

    setting_columns: tuple[int, ...]
    centres: Floats  # regimes x settings (standardised)
    setting_mean: Floats
    setting_std: Floats
    metric_columns: tuple[int, ...]
    mean: Floats  # regimes x metrics
    std: Floats

    def normalise(self, values: Floats) -> Floats:
        """Metric columns of ``values`` in regime-normalised form (NaN stays NaN)."""
        labels = self.label(values)
        metrics = values[:, list(self.metric_columns)]
        result: Floats = (metrics - self.mean[labels]) / self.std[labels]
        return result

    def label(self, values: Floats) -> npt.NDArray[np.intp]:
        """Regime of each row (nearest centre over the settings given)."""
        if not self.setting_columns:
            return np.zeros(values.shape[0], dtype=np.intp)
        settings = (values[:, list(self.setting_columns)] - self.setting_mean) / self.setting_std
        diff = settings[:, None, :] - self.centres[None, :, :]
        dist = np.nansum(diff * diff, axis=2)
        labels: npt.NDArray[np.intp] = np.argmin(dist, axis=1).astype(np.intp)
        return labels


# -- columns and regimes -----------------------------------------------------------------


def _informative(values: Floats) -> list[int]:
    """Columns with at least two distinct given values."""
    keep = []
    for j in range(values.shape[1]):
        col = values[:, j]
        col = col[np.isfinite(col)]
        if col.size >= 2 and float(np.ptp(col)) > _STD_FLOOR * max(1.0, float(np.abs(col).max())):
            keep.append(j)
    return keep


def _discrete(col: Floats, max_k: int) -> bool:
    """Whether a column's values sit in 2..max_k tight groups (split at the widest gaps)."""
    values = np.sort(col)
    total = float(np.sum((values - values.mean()) ** 2))
    if total <= 0:
        return False
    gaps = np.argsort(np.diff(values))[::-1]
    for k in range(2, max_k + 1):
        cuts = np.sort(gaps[: k - 1]) + 1
        within = sum(float(np.sum((g - g.mean()) ** 2)) for g in np.split(values, cuts))
        if within / total < _SETTING_SHARE:
            return True
    return False


def _cluster(data: Floats, max_k: int, seed: int) -> tuple[int, Floats] | None:
    """Fewest clusters (2..max_k) holding under 1 % of the variance within, and centres."""
    from sklearn.cluster import KMeans

    total = float(np.sum((data - data.mean(axis=0)) ** 2))
    if total <= 0:
        return None
    for k in range(2, max_k + 1):
        if np.unique(data, axis=0).shape[0] < k:
            return None
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(data)
        if km.inertia_ / total < _REGIME_SHARE:
            centres: Floats = km.cluster_centers_
            return k, centres
    return None


def _find_regimes(values: Floats, seed: int = 0) -> _Regimes:
    """Find setting columns and regimes (see the module docstring, step 2)."""
    informative = _informative(values)
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(values.shape[0], min(values.shape[0], _REGIME_SAMPLE), False)]
    discrete = []
    for j in informative:
        col = sample[:, j]
        col = col[np.isfinite(col)]
        if col.size >= 20 and _discrete(col, 6):
            discrete.append(j)
    plain = _single_regime(values, informative)
    if not discrete or len(discrete) == len(informative):
        return plain
    settings = sample[:, discrete]
    rows = np.all(np.isfinite(settings), axis=1)
    s_mean = np.nanmean(settings, axis=0)
    s_std = np.maximum(np.nanstd(settings, axis=0), _STD_FLOOR)
    found = _cluster((settings[rows] - s_mean) / s_std, _MAX_REGIMES, seed)
    if found is None:
        return plain
    k, centres = found
    others = [j for j in informative if j not in discrete]
    trial = _Regimes(tuple(discrete), centres, s_mean, s_std, (), np.zeros((k, 0)), np.ones((k, 0)))
    labels = trial.label(values)
    shares = []
    for j in others:
        col = values[:, j]
        ok = np.isfinite(col)
        total = float(np.var(col[ok]))
        within = 0.0
        for r in range(k):
            part = col[ok & (labels == r)]
            if part.size:
                within += float(np.var(part)) * part.size
        shares.append(within / max(int(ok.sum()), 1) / total if total > 0 else 1.0)
    if not shares or float(np.median(shares)) >= _REGIME_EXPLAINED:
        return plain
    mean = np.zeros((k, len(others)))
    std = np.ones((k, len(others)))
    for r in range(k):
        part = values[labels == r][:, others]
        if part.shape[0]:
            with np.errstate(all="ignore"):
                mean[r] = np.nan_to_num(np.nanmean(part, axis=0))
                std[r] = np.nan_to_num(np.nanstd(part, axis=0), nan=1.0)
    # a metric constant within a regime keeps the overall spread, so it is not blown up
    overall = np.maximum(np.nanstd(values[:, others], axis=0), _STD_FLOOR)
    std = np.where(std > _STD_FLOOR, std, overall)
    _LOG.info("found %d operating regimes from %d setting columns", k, len(discrete))
    return _Regimes(tuple(discrete), centres, s_mean, s_std, tuple(others), mean, std)


def _single_regime(values: Floats, columns: list[int]) -> _Regimes:
    part = values[:, columns]
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(part, axis=0))[None, :] if columns else np.zeros((1, 0))
        std = (
            np.maximum(np.nan_to_num(np.nanstd(part, axis=0)), _STD_FLOOR)[None, :]
            if columns
            else np.ones((1, 0))
        )
    return _Regimes((), np.zeros((1, 0)), np.zeros(0), np.ones(0), tuple(columns), mean, std)
