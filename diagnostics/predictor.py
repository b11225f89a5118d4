"""Failure predictor for wear-type faults (diagnostics, "Decide": how urgent is it).

A wear-type fault's health indicator (a feature's change from the device's healthy
baseline, :class:`diagnostics.catalog.Degradation`) is turned into a *progress* toward
failure, ``(change / failure_delta) ** (1 / shape)``, which grows about linearly in time
from onset (0) to failure (1). :class:`TrendPredictor` fits that line by exponentially
weighted least squares over the progress points it is given (O(1) state: five sums) and
extrapolates to 1: the time to failure with a p10/p50/p90 band from the slope's standard
error. It keeps state only for the device+fault pairs it is asked about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from diagnostics.catalog import Degradation

__all__ = ["TimeToFailure", "TrendPredictor", "progress_of"]

_Z90: Final = 1.2816
_MIN_POINTS: Final = 5
_MAX_TTF_S: Final = 365 * 86_400.0


@dataclass(frozen=True, slots=True)
class TimeToFailure:
    """Predicted time to failure with its uncertainty, seconds from ``at``.

    Attributes:
        p10_s: 10th percentile (soonest plausible).
        p50_s: median.
        p90_s: 90th percentile.
        progress: estimated progress from onset (0) to failure (1) now.
    """

    p10_s: float
    p50_s: float
    p90_s: float
    progress: float


def progress_of(change: float, degradation: Degradation) -> float:
    """Return the progress toward failure in ``[0, 1]`` of an indicator ``change``."""
    delta = degradation.failure_delta
    ratio = abs(change / delta) if degradation.two_sided else change / delta
    ratio = min(max(ratio, 0.0), 1.0)
    return float(ratio ** (1.0 / degradation.shape))


class _Fit:
    __slots__ = ("n", "origin_s", "sw", "swt", "swtt", "swty", "swy", "swyy")

    def __init__(self, origin_s: float) -> None:
        self.origin_s = origin_s
        self.n = 0
        self.sw = self.swt = self.swtt = self.swy = self.swty = self.swyy = 0.0


class TrendPredictor:
    """Time to failure of device+fault pairs from their progress over time.

    Args:
        half_life_days: older progress points weigh half as much after this long.
    """

    def __init__(self, half_life_days: float = 7.0) -> None:
        self._decay_per_day = math.log(2.0) / half_life_days
        self._fits: dict[tuple[str, str], _Fit] = {}

    def __len__(self) -> int:
        return len(self._fits)

    def forget(self, device_id: str, fault: str) -> None:
        """Drop the state of one device+fault pair (its diagnosis closed)."""
        self._fits.pop((device_id, fault), None)

    def observe(self, device_id: str, fault: str, t_s: float, progress: float) -> None:
        """Add one progress point of ``device_id``'s ``fault`` at time ``t_s`` (epoch s)."""
        fit = self._fits.get((device_id, fault))
        if fit is None:
            fit = self._fits[(device_id, fault)] = _Fit(t_s)
        days = (t_s - fit.origin_s) / 86_400.0
        # weights grow with time instead of decaying old sums: same ratios, O(1) per point
        w = math.exp(self._decay_per_day * days)
        fit.n += 1
        fit.sw += w
        fit.swt += w * days
        fit.swtt += w * days * days
        fit.swy += w * progress
        fit.swty += w * days * progress
        fit.swyy += w * progress * progress

    def predict(self, device_id: str, fault: str, t_s: float) -> TimeToFailure | None:
        """Return the time to failure from ``t_s``, or ``None`` without a rising trend."""
        fit = self._fits.get((device_id, fault))
        if fit is None or fit.n < _MIN_POINTS or fit.sw <= 0.0:
            return None
        mean_t = fit.swt / fit.sw
        mean_y = fit.swy / fit.sw
        stt = fit.swtt / fit.sw - mean_t * mean_t
        sty = fit.swty / fit.sw - mean_t * mean_y
        syy = fit.swyy / fit.sw - mean_y * mean_y
        if stt <= 1e-9:
            return None
        slope = sty / stt
        if slope <= 0.0:
            return None
        residual = max(syy - slope * sty, 0.0)
        n_eff = max(fit.n - 2, 1)
        slope_se = math.sqrt(residual / (stt * n_eff))
        days = (t_s - fit.origin_s) / 86_400.0
        now = min(max(mean_y + slope * (days - mean_t), 0.0), 1.0)
        remaining = 1.0 - now

        def ttf(rate: float) -> float:
            if rate <= 0.0:
                return _MAX_TTF_S
            return min(remaining / rate * 86_400.0, _MAX_TTF_S)

        return TimeToFailure(
            p10_s=ttf(slope + _Z90 * slope_se),
            p50_s=ttf(slope),
            p90_s=ttf(slope - _Z90 * slope_se),
            progress=now,
        )

    def state_bytes(self) -> int:
        """Approximate bytes held (about 200 per tracked device+fault pair)."""
        return 200 * len(self._fits)
