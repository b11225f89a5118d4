"""Contract every streaming detector passes (STYLE.md rule 11), on synthetic data only.

Inputs are never modified, the same rows give the same scores, a pickled detector resumes
exactly, a score depends only on the rows up to it, scores lie in [0, 1], constant and
missing columns neither crash nor dominate, scale does not matter, an injected fault
raises one alert event at once whose alert lasts as long as the fault (ROC AUC of the
alert level), and bad data (time going back, nothing to watch) is scored, never refused.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diagnostics.stream import StreamConfig, StreamDetector
from wire.errors import ConfigError, PermanentError

WARMUP = 200
Factory = Callable[[], StreamDetector]

DETECTORS: dict[str, Factory] = {
    "stream-default": lambda: StreamDetector(StreamConfig(min_rows=WARMUP)),
    "stream-smooth30": lambda: StreamDetector(
        StreamConfig(min_rows=WARMUP, alpha=1e-3, smooth_span=30.0, settle_rows=800)
    ),
}


@pytest.fixture(params=sorted(DETECTORS))
def make(request: pytest.FixtureRequest) -> Factory:
    return DETECTORS[request.param]


def telemetry(
    n: int = 800, seed: int = 1, shift_at: int | None = None, shift_len: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pump-like series: noisy flow, wandering temperature, vibration; 1-2 s steps.

    Returns:
        ``(seconds, values, labels)``; with ``shift_at`` the flow drops by two of its
        standard deviations for ``shift_len`` rows (labels mark them).
    """
    rng = np.random.default_rng(seed)
    seconds = np.cumsum(rng.choice([1.0, 1.0, 1.0, 2.0], size=n))
    flow = 32.0 + rng.normal(0, 0.5, n)
    temperature = 70.0 + np.cumsum(rng.normal(0, 0.05, n))
    vibration = 0.02 + 0.002 * np.sin(np.arange(n) / 15.0) + rng.normal(0, 0.0005, n)
    values = np.column_stack([flow, temperature, vibration])
    labels = np.zeros(n, dtype=bool)
    if shift_at is not None:
        values[shift_at : shift_at + shift_len, 0] -= 1.0
        labels[shift_at : shift_at + shift_len] = True
    return seconds, values, labels


def test_inputs_are_not_modified(make: Factory) -> None:
    seconds, values, _ = telemetry()
    values[5, 1] = np.nan
    values[300, 2] = np.inf
    kept_values, kept_seconds = values.copy(), seconds.copy()
    detector = make()
    detector.score_stream(values, seconds)
    row = [1.0, float("nan"), 3.0]
    detector.learn_one(row, float(seconds[-1]) + 1)
    detector.score_one(row, float(seconds[-1]) + 2)
    np.testing.assert_array_equal(values, kept_values)
    np.testing.assert_array_equal(seconds, kept_seconds)
    assert row[::2] == [1.0, 3.0]
    assert math.isnan(row[1])


def test_same_rows_same_scores(make: Factory) -> None:
    seconds, values, _ = telemetry(shift_at=500)
    first = make().score_stream(values, seconds)
    second = make().score_stream(values, seconds)
    np.testing.assert_array_equal(first, second)
    assert first[WARMUP:].std() > 0  # not trivially constant


def test_score_stream_matches_score_then_learn(make: Factory) -> None:
    seconds, values, _ = telemetry(n=400, shift_at=300, shift_len=50)
    batch = make().score_stream(values, seconds)
    detector = make()
    one_by_one = []
    for x, ts in zip(values, seconds, strict=True):
        score = detector.score_one(x, ts)
        assert detector.score_one(x, ts) == score  # scoring does not learn
        detector.learn_one(x, ts)
        one_by_one.append(score)
    np.testing.assert_array_equal(batch, np.array(one_by_one))


@pytest.mark.parametrize("cut", [WARMUP // 2, WARMUP + 150])
def test_pickle_round_trip_resumes_exactly(make: Factory, cut: int) -> None:
    seconds, values, _ = telemetry(shift_at=500)
    detector = make()
    detector.score_stream(values[:cut], seconds[:cut])
    restored = pickle.loads(pickle.dumps(detector))
    expected = detector.score_stream(values[cut:], seconds[cut:])
    np.testing.assert_array_equal(restored.score_stream(values[cut:], seconds[cut:]), expected)
    assert restored.ready == detector.ready


def test_scores_use_only_the_past(make: Factory) -> None:
    seconds, values, _ = telemetry(n=700)
    k = 450
    reference = make().score_stream(values[:k], seconds[:k])
    altered = values.copy()
    altered[k:] = altered[k:] * 50 + 1000  # wild future rows
    np.testing.assert_array_equal(make().score_stream(altered, seconds)[:k], reference)
    np.testing.assert_array_equal(make().score_stream(values, seconds)[:k], reference)


def test_scores_in_unit_interval_even_for_wild_values(make: Factory) -> None:
    seconds, values, _ = telemetry()
    values[400] = [1e12, -1e12, 1e9]
    values[401:420, 2] = 0.0
    detector = make()
    result = detector.step_stream(values, seconds)
    scores = result.score
    assert np.all(np.isfinite(scores))
    assert np.all((scores >= 0) & (scores <= 1))
    # A glitch is one event; once the signal is back the alert ends and stays down.
    assert result.event[400]
    assert scores[400] >= detector.threshold
    assert not result.active[500:].any()
    assert not result.event[:WARMUP].any()  # no alert before the warm-up rows


def test_constant_column_is_ignored(make: Factory) -> None:
    seconds, values, _ = telemetry(shift_at=500)
    with_constant = np.column_stack([values, np.full(len(values), 7.0)])
    detector = make()
    scores = detector.score_stream(with_constant, seconds)
    np.testing.assert_allclose(scores, make().score_stream(values, seconds), rtol=1e-12)
    assert detector.ignored_columns == (3,)
    # The constant moving later neither crashes nor leaves [0, 1].
    with_constant[600:, 3] = 1e6
    later = make().score_stream(with_constant, seconds)
    assert np.all((later >= 0) & (later <= 1))


def test_missing_cells_are_imputed_from_the_past(make: Factory) -> None:
    seconds, values, _ = telemetry(shift_at=500)
    empty_column = np.column_stack([values, np.full(len(values), np.nan)])
    np.testing.assert_allclose(
        make().score_stream(empty_column, seconds),
        make().score_stream(values, seconds),
        rtol=1e-12,
    )
    holes = values.copy()
    rng = np.random.default_rng(3)
    holes[rng.random(holes.shape) < 0.1] = np.nan
    holes[350] = np.nan  # a row with nothing in it
    detector = make()
    result = detector.step_stream(holes, seconds)
    scores = result.score
    assert np.all(np.isfinite(scores))
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[350] == 0.0  # an empty row adds no evidence
    truth = np.arange(len(scores))[WARMUP:] >= 500
    assert roc_auc_score(truth, result.active[WARMUP:]) > 0.8


def test_column_scale_does_not_matter(make: Factory) -> None:
    seconds, values, _ = telemetry(shift_at=500)
    rescaled = values * np.array([1e6, 1e-4, 3.0]) + np.array([-5e7, 2.0, 100.0])
    scaled = make().step_stream(rescaled, seconds)
    plain = make().step_stream(values, seconds)
    np.testing.assert_allclose(scaled.score, plain.score, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scaled.event, plain.event)


def test_level_shift_raises_one_prompt_event_that_lasts(make: Factory) -> None:
    aucs, delays, false_events = [], [], []
    for seed in range(3):
        seconds, values, labels = telemetry(n=900, seed=seed, shift_at=550)
        result = make().step_stream(values, seconds)
        truth = labels[WARMUP:]
        aucs.append(roc_auc_score(truth, result.active[WARMUP:]))
        events = np.flatnonzero(result.event)
        inside = events[(events >= 550) & (events < 750)]
        delays.append(int(inside[0]) - 550 if inside.size else 999)
        false_events.append(int(((events >= WARMUP) & (events < 550)).sum()))
    assert min(aucs) >= 0.75, aucs
    assert np.mean(aucs) >= 0.85, aucs
    assert max(delays) <= 20, delays
    assert max(false_events) <= 1, false_events


def test_slow_drift_alone_is_not_an_alarm(make: Factory) -> None:
    """A wandering temperature is normal; the detector must not cry wolf over it."""
    seconds, values, _ = telemetry(n=900, seed=5)
    values[:, 1] += np.linspace(0.0, 3.0, len(values))  # several early spreads by the end
    result = make().step_stream(values, seconds)
    assert result.event[WARMUP:].sum() <= 1
    assert result.active[WARMUP:].mean() <= 0.1


def test_gap_restarts_short_term_memory(make: Factory) -> None:
    seconds, values, _ = telemetry(n=700)
    gapped = seconds.copy()
    gapped[450:] += 3600.0  # an hour offline
    values_after = values.copy()
    values_after[450:, 1] += 0.5  # the temperature moved while offline
    scores = make().score_stream(values_after, gapped)
    assert np.all(np.isfinite(scores))
    assert np.all((scores >= 0) & (scores <= 1))
    # Without the gap the same step is a sudden change; across a break it is history.
    jump = make().score_stream(values_after, seconds)
    assert scores[450] < jump[450]


def test_irregular_and_repeated_timestamps_are_fine(make: Factory) -> None:
    seconds, values, _ = telemetry(n=500)
    seconds = seconds.copy()
    seconds[300] = seconds[299]  # same second twice
    scores = make().score_stream(values, seconds)
    assert np.all((scores >= 0) & (scores <= 1))


def test_time_going_back_is_scored_and_teaches_nothing(make: Factory) -> None:
    seconds, values, _ = telemetry(n=500)
    detector, twin = make(), make()
    detector.score_stream(values[:300], seconds[:300])
    twin.score_stream(values[:300], seconds[:300])
    late = detector.step_stream(values[300:301] * 3, [seconds[10]])
    assert late.late[0]
    assert 0.0 <= late.score[0] <= 1.0
    assert not late.event[0]
    np.testing.assert_array_equal(
        detector.score_stream(values[300:], seconds[300:]),
        twin.score_stream(values[300:], seconds[300:]),
    )


def test_a_flat_sequence_is_one_column_of_rows(make: Factory) -> None:
    x = np.random.default_rng(2).normal(size=300)
    detector = make()
    assert detector.score_stream(x).shape == (300,)
    assert detector.n_columns == 1


def test_row_length_is_fixed_by_the_first_row(make: Factory) -> None:
    detector = make()
    detector.learn_one([1.0, 2.0, 3.0])
    with pytest.raises(PermanentError, match="expected 3"):
        detector.score_one([1.0, 2.0])


def test_nothing_to_watch_scores_zero() -> None:
    detector = StreamDetector(StreamConfig(min_rows=20))
    result = detector.step_stream(np.ones((30, 2)))
    assert np.all(result.score == 0.0)
    assert not result.event.any()
    assert detector.ignored_columns == (0, 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("alpha", 0.0), ("calm_rows", 0), ("clip", 0.0), ("smooth_span", 0.5), ("gap_factor", 1.0)],
)
def test_bad_settings_refuse_to_start(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        StreamConfig(**{field: value})  # type: ignore[arg-type]
