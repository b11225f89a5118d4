"""Failure predictor for wear-type faults (diagnostics, "Decide": how urgent is it).

A wear-type fault's health indicator (a feature's change from the device's healthy
baseline, :class:`diagnostics.catalog.Degradation`) is turned into a *progress* toward
failure, ``(change / failure_delta) ** (1 / shape)``, which grows about linearly in time
from onset (0) to failure (1). :class:`TrendPredictor` fits that line by exponentially
weighted least squares over the progress points it is given (O(1) state: a few sums) and
extrapolates to 1: the time to failure, with a p10..p90 band from Fieller's interval for
the time the line reaches 1 (the uncertainty of both its level and its slope).

Telemetry features swing with the day (use, weather), so points a minute apart are not
independent evidence: the band counts at most one independent point per
``decorrelation_days`` of the time the fit spans, however many readings it holds.
Without that, thousands of readings a day make the band a small fraction of its true
width. A trend not yet significant at the band's level leaves the band open above (p90
at the one-year cap). The predictor keeps state only for the device+fault pairs it is
asked about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from diagnostics.catalog import Degradation
from wire.errors import ConfigError

__all__ = ["TimeToFailure", "TrendPredictor", "progress_of"]

_Z90: Final = 1.2816  # standard normal 90th percentile: p10..p90 is a central 80% band
_MIN_POINTS: Final = 5
_MAX_TTF_S: Final = 365 * 86_400.0
_DAY_S: Final = 86_400.0
# weights grow with time (see TrendPredictor.observe); past this the sums are rescaled
_RESCALE_W: Final = 1e100


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

    def aged(self, elapsed_s: float) -> TimeToFailure:
        """Return the same prediction as of ``elapsed_s`` seconds later (its clock run on).

        Every percentile counts down by the elapsed time (not below 0); a band open above
        (p90 at the one-year cap) stays open. Progress moves on along the line the median
        implies: what was left of it shrinks in proportion to the median's time used up.

        Args:
            elapsed_s: device time since the prediction's own time (negative counts as 0).
        """
        elapsed_s = max(elapsed_s, 0.0)
        if elapsed_s == 0.0:
            return self
        used = 1.0 if self.p50_s <= elapsed_s else elapsed_s / self.p50_s
        return TimeToFailure(
            p10_s=max(self.p10_s - elapsed_s, 0.0),
            p50_s=max(self.p50_s - elapsed_s, 0.0),
            p90_s=self.p90_s if self.p90_s >= _MAX_TTF_S else max(self.p90_s - elapsed_s, 0.0),
            progress=min(self.progress + (1.0 - self.progress) * used, 1.0),
        )


def progress_of(change: float, degradation: Degradation) -> float:
    """Return the progress toward failure in ``[0, 1]`` of an indicator ``change``."""
    delta = degradation.failure_delta
    if degradation.two_sided and change * delta < 0.0:
        opposite = degradation.opposite_delta
        delta = -delta if opposite is None else opposite
    ratio = change / delta
    ratio = min(max(ratio, 0.0), 1.0)
    return float(ratio ** (1.0 / degradation.shape))


class _Fit:
    __slots__ = (
        "log_scale",
        "n",
        "origin_s",
        "sw",
        "swt",
        "swtt",
        "swty",
        "sww",
        "swy",
        "swyy",
    )

    def __init__(self, origin_s: float) -> None:
        self.origin_s = origin_s
        self.log_scale = 0.0  # every weight is exp(decay * days - log_scale)
        self.n = 0
        self.sw = self.swt = self.swtt = self.sww = self.swy = self.swty = self.swyy = 0.0

    def rescale(self, factor: float, log_factor: float) -> None:
        """Divide every weighted sum by ``factor`` (``sww`` by its square)."""
        self.log_scale += log_factor
        self.sw /= factor
        self.swt /= factor
        self.swtt /= factor
        self.swy /= factor
        self.swty /= factor
        self.swyy /= factor
        self.sww /= factor * factor


class TrendPredictor:
    """Time to failure of device+fault pairs from their progress over time.

    Args:
        half_life_days: older progress points weigh half as much after this long.
        decorrelation_days: time span that counts as one independent point in the band.

    Raises:
        ConfigError: a setting is not a positive number.
    """

    def __init__(self, half_life_days: float = 7.0, decorrelation_days: float = 1.0) -> None:
        for name, value in (
            ("half_life_days", half_life_days),
            ("decorrelation_days", decorrelation_days),
        ):
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"predictor {name} must be a positive number (got {value})")
        self._decay_per_day = math.log(2.0) / half_life_days
        self._decorrelation_days = decorrelation_days
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
        days = (t_s - fit.origin_s) / _DAY_S
        # weights grow with time instead of decaying old sums: same ratios, O(1) per point
        w = math.exp(self._decay_per_day * days - fit.log_scale)
        if w > _RESCALE_W:
            # a pair followed for years: keep the sums finite (ratios do not change)
            fit.rescale(w, math.log(w))
            w = 1.0
        fit.n += 1
        fit.sw += w
        fit.sww += w * w
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
        # independent points: the weights' effective number, at most one per decorrelation
        # time of the span (a uniform spread of variance stt spans sqrt(12 stt) days)
        span_days = math.sqrt(12.0 * stt)
        n_eff = min(fit.sw * fit.sw / fit.sww, 1.0 + span_days / self._decorrelation_days)
        residual = max(syy - slope * sty, 0.0) * n_eff / max(n_eff - 2.0, 1.0)
        var_level = residual / n_eff  # of the fitted line at mean_t
        var_slope = residual / (stt * n_eff)  # per day squared; uncorrelated with the level
        days = (t_s - fit.origin_s) / _DAY_S
        now = min(max(mean_y + slope * (days - mean_t), 0.0), 1.0)
        since_mean = days - mean_t
        low, high = _fieller(1.0 - mean_y, slope, var_level, var_slope)

        def ttf(until_mean_days: float) -> float:
            left_s = (until_mean_days - since_mean) * _DAY_S
            return min(max(left_s, 0.0), _MAX_TTF_S)

        p50 = ttf((1.0 - mean_y) / slope) if now < 1.0 else 0.0
        return TimeToFailure(
            p10_s=min(ttf(low), p50),
            p50_s=p50,
            p90_s=_MAX_TTF_S if high is None else max(ttf(high), p50),
            progress=now,
        )

    def state_bytes(self) -> int:
        """Approximate bytes held (about 220 per tracked device+fault pair)."""
        return 220 * len(self._fits)


def _fieller(
    gap: float, slope: float, var_level: float, var_slope: float
) -> tuple[float, float | None]:
    """Central 80% interval of ``u = gap / slope`` (days from the fit's mean time).

    Fieller's interval: the ``u`` where ``|gap - slope * u| <= z * sd(level + slope * u)``.
    Returns ``(low, high)``; ``high`` is ``None`` when the interval is open above (the
    slope is not significantly above zero at this level).
    """
    z2 = _Z90 * _Z90
    a = slope * slope - z2 * var_slope
    if a <= 0.0:
        return 0.0, None
    b = gap * slope
    c = gap * gap - z2 * var_level
    disc = b * b - a * c
    root = math.sqrt(max(disc, 0.0))
    return (b - root) / a, (b + root) / a
