"""Time-to-failure predictor: point estimate, band calibration and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.catalog import Degradation
from diagnostics.predictor import TrendPredictor, progress_of
from wire.errors import ConfigError

DAY_S = 86_400.0
CAP_S = 365 * DAY_S
T0_S = 1_736_121_600.0  # 2025-01-06 00:00 UTC


def _feed(predictor: TrendPredictor, times_s: np.ndarray, progress: np.ndarray) -> None:
    for t, p in zip(times_s.tolist(), progress.tolist(), strict=True):
        predictor.observe("dev-1", "wear", t, p)


def _wear(
    rng: np.random.Generator, days: float, duration_days: float, step_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Progress of a fault failing after ``duration_days``, seen for ``days`` from onset.

    The noise is what telemetry features show: a daily swing with a random phase and
    noise that wanders over half a day (AR(1), as weather and use do), so readings hours
    apart still agree.
    """
    times = np.arange(0.0, days * DAY_S, step_s)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    daily = 0.03 * np.sin(2.0 * math.pi * times / DAY_S + phase)
    keep = math.exp(-step_s / 43_200.0)
    steps = rng.normal(0.0, 0.04 * math.sqrt(1.0 - keep * keep), times.size)
    wander = np.empty(times.size)
    level = rng.normal(0.0, 0.04)
    for i in range(times.size):
        level = keep * level + steps[i]
        wander[i] = level
    progress = np.clip(times / (duration_days * DAY_S) + daily + wander, 0.0, 1.0)
    return T0_S + times, progress


def test_clean_linear_wear_is_predicted_to_the_hour() -> None:
    predictor = TrendPredictor()
    times = T0_S + np.arange(0.0, 4 * DAY_S, 600.0)
    _feed(predictor, times, (times - T0_S) / (10 * DAY_S))
    now_s = float(times[-1])
    ttf = predictor.predict("dev-1", "wear", now_s)
    assert ttf is not None
    true_s = T0_S + 10 * DAY_S - now_s
    assert abs(ttf.p50_s - true_s) < 3_600.0
    assert ttf.p10_s - 1.0 <= true_s <= ttf.p90_s + 1.0
    assert ttf.progress == pytest.approx((now_s - T0_S) / (10 * DAY_S), abs=1e-3)


def test_band_covers_the_truth_about_as_often_as_it_says() -> None:
    """p10..p90 is an 80% band: with slow swings in the readings it must stay near it.

    Counting every reading as independent evidence makes the band a sliver that almost
    never holds the true failure time.
    """
    rng = np.random.default_rng(20250106)
    covered = 0
    trials = 60
    for trial in range(trials):
        predictor = TrendPredictor()
        duration = float(rng.uniform(8.0, 20.0))
        seen = float(rng.uniform(2.0, 0.7 * duration))
        times, progress = _wear(rng, seen, duration, 300.0)
        for t, p in zip(times.tolist(), progress.tolist(), strict=True):
            predictor.observe("dev", str(trial), t, p)
        now_s = float(times[-1])
        ttf = predictor.predict("dev", str(trial), now_s)
        assert ttf is not None
        true_s = T0_S + duration * DAY_S - now_s
        covered += int(ttf.p10_s <= true_s <= ttf.p90_s)
    assert 0.6 <= covered / trials <= 0.95


def test_band_narrows_as_the_trend_is_followed_longer() -> None:
    rng = np.random.default_rng(7)
    times, progress = _wear(rng, 12.0, 14.0, 300.0)
    widths = []
    for days in (3.0, 6.0, 12.0):
        predictor = TrendPredictor()
        seen = times < T0_S + days * DAY_S
        _feed(predictor, times[seen], progress[seen])
        ttf = predictor.predict("dev-1", "wear", float(times[seen][-1]))
        assert ttf is not None
        widths.append(ttf.p90_s - ttf.p10_s)
    assert widths[0] > widths[1] > widths[2]


def test_a_trend_within_the_noise_leaves_the_band_open_above() -> None:
    rng = np.random.default_rng(3)
    predictor = TrendPredictor()
    times = T0_S + np.arange(0.0, 2 * DAY_S, 300.0)
    progress = 0.3 + 0.001 * (times - T0_S) / DAY_S
    progress += 0.05 * np.sin(2 * math.pi * (times - T0_S) / DAY_S) + rng.normal(
        0, 0.01, times.size
    )
    _feed(predictor, times, progress)
    ttf = predictor.predict("dev-1", "wear", float(times[-1]))
    if ttf is not None:  # a slope this faint may come out at or below zero: no trend
        assert ttf.p90_s == CAP_S


def test_no_prediction_without_enough_points_or_a_rising_trend() -> None:
    predictor = TrendPredictor()
    for i in range(4):
        predictor.observe("dev-1", "wear", T0_S + i * 600.0, 0.1 * i)
    assert predictor.predict("dev-1", "wear", T0_S + 3_000.0) is None
    predictor.observe("dev-1", "wear", T0_S + 2_400.0, 0.4)
    assert predictor.predict("dev-1", "wear", T0_S + 3_000.0) is not None
    falling = TrendPredictor()
    for i in range(20):
        falling.observe("dev-1", "wear", T0_S + i * 600.0, 0.5 - 0.01 * i)
    assert falling.predict("dev-1", "wear", T0_S + 20 * 600.0) is None
    assert predictor.predict("dev-2", "wear", T0_S) is None


def test_forget_drops_one_pair() -> None:
    predictor = TrendPredictor()
    for i in range(10):
        predictor.observe("dev-1", "wear", T0_S + i * 600.0, 0.01 * i)
        predictor.observe("dev-2", "wear", T0_S + i * 600.0, 0.01 * i)
    assert len(predictor) == 2
    predictor.forget("dev-1", "wear")
    assert len(predictor) == 1
    assert predictor.predict("dev-1", "wear", T0_S + DAY_S) is None
    assert predictor.predict("dev-2", "wear", T0_S + DAY_S) is not None
    assert predictor.state_bytes() > 0


def test_a_pair_followed_for_decades_stays_finite() -> None:
    predictor = TrendPredictor(half_life_days=1.0)
    days = np.arange(0.0, 30 * 365.0, 1.0)
    _feed(predictor, T0_S + days * DAY_S, days / (40 * 365.0))
    now_s = T0_S + float(days[-1]) * DAY_S
    ttf = predictor.predict("dev-1", "wear", now_s)
    assert ttf is not None
    assert all(math.isfinite(v) for v in (ttf.p10_s, ttf.p50_s, ttf.p90_s, ttf.progress))
    assert ttf.progress == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize(
    ("half_life_days", "decorrelation_days"),
    [(0.0, 1.0), (7.0, 0.0), (-1.0, 1.0), (7.0, math.nan), (math.inf, 1.0)],
)
def test_settings_must_be_positive(half_life_days: float, decorrelation_days: float) -> None:
    with pytest.raises(ConfigError):
        TrendPredictor(half_life_days=half_life_days, decorrelation_days=decorrelation_days)


@settings(max_examples=60, deadline=None)
@given(
    slope_per_day=st.floats(0.001, 0.5),
    start=st.floats(0.0, 0.8),
    noise=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**16),
)
def test_band_is_ordered_and_capped(
    slope_per_day: float, start: float, noise: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    predictor = TrendPredictor()
    times = T0_S + np.arange(0.0, 3 * DAY_S, 1_800.0)
    progress = np.clip(
        start + slope_per_day * (times - T0_S) / DAY_S + rng.normal(0, noise, times.size), 0, 1
    )
    _feed(predictor, times, progress)
    ttf = predictor.predict("dev-1", "wear", float(times[-1]))
    if ttf is None:
        return
    assert 0.0 <= ttf.p10_s <= ttf.p50_s <= ttf.p90_s <= CAP_S
    assert 0.0 <= ttf.progress <= 1.0


def test_progress_inverts_the_wear_shape() -> None:
    bearing = Degradation("spin_vibration", 1.5, 2.0)
    assert progress_of(1.5 * 0.25, bearing) == pytest.approx(0.5)
    assert progress_of(3.0, bearing) == 1.0
    assert progress_of(-1.0, bearing) == 0.0
    drift = Degradation("offset", 5.0, 1.0, two_sided=True)
    assert progress_of(-2.5, drift) == pytest.approx(0.5)


def test_progress_of_a_two_sided_indicator_uses_each_side_s_failure_change() -> None:
    offset = Degradation("offset", 4.9, 1.0, two_sided=True, opposite_delta=-4.0)
    assert progress_of(2.45, offset) == pytest.approx(0.5)
    assert progress_of(-2.0, offset) == pytest.approx(0.5)
    assert progress_of(-4.0, offset) == 1.0
    leak = Degradation("evaporator_on_c", 5.7, 2.7)
    assert progress_of(5.7 * 0.5**2.7, leak) == pytest.approx(0.5)
    assert progress_of(-1.0, leak) == 0.0
