"""The one streaming anomaly-detection core (diagnostics stage), shared by every door.

Place in the pipeline: the gateway hands telemetry to ``diagnostics``; ``fixloop detect``
(:mod:`diagnostics.csvdetect`) feeds exported files through the same code. A
:class:`DetectorTable` holds many independent *slots* (one per device, or one per file),
each watching ``n_columns`` numbers, as a structure of arrays. One compiled loop steps
any mix of rows: one stream with many rows (a CSV file) or many slots with one row each
(a round of the live service). Rows of one slot are taken in the order given.

Why one module of about 1,400 lines: it is one detection core. The compiled helpers, the
row loop and :class:`DetectorTable` share one state layout (the ``_STATE_ORDER`` arrays
and the ``_J_*`` slots of a column's jump law) and are compiled and cached together by
numba; split, a change to the layout would have to be made in several files at once.
About 140 of its lines are this docstring, which is the core's specification.

API (for the live engine and any other caller)::

    table = DetectorTable(n_slots=1000, n_columns=6, config=DetectorConfig())
    out = table.step(slots, t_s, values)   # slots: int[R], t_s: float[R], values: float[R, C]
    out.score      # float[R]: 1 - tail probability of the row under the learnt normal
    out.event      # bool[R]: rising edge of an alert (what opens a case / flags a row)
    out.active     # bool[R]: the alert is up (event row, then until re-armed)
    out.deviation  # float[R, C]: signed standardised deviation per column (NaN: unscored)
    out.late       # bool[R]: row older than its slot's last one: scored, nothing learnt
    out.flags      # int8[R]: ROW_LATE | ROW_REPEATED | ROW_GAP, for counting bad data
    table.add_slots(k) -> range of the new slot indices;  table.reset_slots(slots)
    table.add_columns(k) -> range of the new column indices (new metrics, all slots)
    table.active(slot), table.rows_seen(slot), table.scored_columns(slot)
    table.predictors(slot)  # per column: "fast", "slow", "daily" or "weekly"
    table.threshold         # 1 - alpha: score at or above it is an event when armed
    table.state_bytes()     # about 1.4 kB per column and 1 kB per slot
    pickle.dumps(table)     # the whole state is numpy arrays and a frozen config

An event (``out.event``) is what should open a case: a generic "unusual behaviour" with
``out.deviation`` as its evidence (which columns, how far, which sign). ``out.active``
stays up until the slot re-arms; no further event comes from that slot meanwhile.

``t_s`` is seconds (any epoch); NaN means "no timestamp": a slot whose first row has none
counts rows instead, and its cycles are looked for in rows (:attr:`DetectorConfig.row_periods`).
``values`` holds NaN for a missing cell. Products with different metrics use one table
per column set, or one wide table where a slot leaves the columns it lacks NaN (they
cost memory only). ``step(..., learn=False)`` scores without changing anything.

How a row is scored, per column (all learnt online, with forgetting, from that slot only):

1. Four predictors of the next value run side by side: a fast level (follows a wandering
   signal), a slow level (noise around a level), the slow level plus a daily profile and
   plus a weekly profile (interpolated between bins by the row's phase in the period; with
   no timestamps, periods of :attr:`~DetectorConfig.row_periods` rows). Each keeps an
   exponentially weighted mean squared error; the column is predicted by the one with the
   least error (a memory of :attr:`~DetectorConfig.select_alpha`), a cyclic one only once
   a whole period has been seen and only when it beats the others by
   :attr:`~DetectorConfig.season_gain`. That is the periodicity test: daily, weekly or
   none, per column, revised continuously.
2. The row's error over that predictor's spread (floored at a share of the column's
   long-run spread, so flat stretches cannot make it infinite), widened while the column
   is young (``1 + young / n``), is the signed deviation. Updates are Huber-clipped, so a
   glitch moves the model little while a lasting change is followed; the spreads'
   updates are clipped tighter (3.5 spreads), so that a metric that jumps often cannot
   inflate its noise estimate without end (its jumps are told apart, below).
3. Jumps and states, for metrics that switch (on/off, pump state, a fan's speed steps,
   flow only while heating): a miss of the fast level beyond the Huber bound is a
   *jump*, counted once however many rows it lasts. Each column learns, with
   forgetting, the rate of its jumps per row, the log-normal law of their sizes, the
   levels it dwells at (its *states*, up to four, with their shares of time, learnt
   outside alerts; two closer than the jump bound are one) and the share of jumps that
   land somewhere new (taken as none until several have: the first jumps to somewhere
   new are news, a habit of them is not).
   A row's deviation is then no larger than its tail probability under "noise, or a
   jump to a known state, or a jump somewhere new" says (as a Gaussian z), so a switch
   between known states is not an anomaly while a jump to a level never held is. The
   levels follow a switch to a known state at once (by its posterior weight), and so
   does an alert's reference; a column with the habit (ten jumps or more, two states
   or more) that settles at a level for a second row is followed there too (a state,
   maybe new), though not by an alert's reference; a column is back to normal, for an
   alert, in any state it is known to settle at. A column that never jumped is scored
   as before.
4. Two statistics per row: the largest squared deviation over the scored columns, and
   the largest of their exponentially smoothed deviations (a small lasting bias), each
   over its own learnt spread. Each is turned into a tail probability by that slot's own
   forgetting histogram of past values (:attr:`~DetectorConfig.forget_rows`), never
   rarer than a Gaussian prior says, blended with that prior worth
   :attr:`~DetectorConfig.prior_rows` rows (so early rows are scored, conservatively).
   With :attr:`~DetectorConfig.drift_rows` set, a third statistic measures slow drifts
   (a leak, wear, which the levels follow): per column that does not jump, the slow
   level (without its cycle) against a long baseline of that memory whose updates are
   clipped at 3 spreads (and its spread's at 2, with nothing learnt from a row beyond
   the 3), so it follows a wander but falls behind a drift that outruns it, whose
   deviation then keeps growing; a column's deviation is then the larger of the two,
   and a settled change restarts the baseline from where the column is.
   The row's score is ``1 - min(1, k * min(p1, p2, ...))`` over its ``k`` statistics: a
   calibrated tail probability.
   The histograms learn every row outside alerts, and the first rows of a short alert
   (a burst) at :attr:`~DetectorConfig.burst_weight` once it is over, so heavy-tailed
   streams are not alarming at every burst; a long alert is never learnt as normal.

Events: a slot is *armed*; a row with tail probability at or under
:attr:`~DetectorConfig.alpha` (score at or above :attr:`DetectorTable.threshold`), after
the first :attr:`~DetectorConfig.min_rows` rows (and :attr:`~DetectorConfig.warmup_s` of
the slot's own time, when set), is an *event* and the alert goes up: the
levels of that moment are kept as the reference. While it is up, spreads and the choice
of predictor are held (cycle profiles learn at a tenth of their rate), the levels go on
following the signal, and the alert's own deviation is measured against the reference
(for a wandering column with a spread growing as a random walk's,
:attr:`~DetectorConfig.wander`). When :attr:`~DetectorConfig.calm_rows` rows in a row are
back to normal against the reference (tail probability at least
:attr:`~DetectorConfig.calm_p`), after at least that many rows, the alert ends, the levels
return to the reference and the slot is re-armed. If the deviation lasts
:attr:`~DetectorConfig.settle_rows` rows it is a settled change: the alert ends and the
levels, which have followed the signal, are the new normal; the old levels are kept, and
a later row that would raise an alert but is normal for them switches back silently (a
return to the old normal is no news).

Data quality never stops a slot: a missing cell adds no evidence; a column that has
only ever held one value (leading zeros, a constant) is not scored until it changes; a
gap longer than :attr:`~DetectorConfig.gap_factor` typical steps restarts the smoothed
evidence and widens the uncertainty again; a repeated timestamp is a row like any other;
an out-of-order row is scored against the current state and changes nothing. Each case
is flagged per row so callers can count it. No random numbers are drawn: the same rows
give the same outputs, and a pickled table resumes exactly.

Stepping is CPU work: async callers run it through ``asyncio.to_thread`` (STYLE.md rule 13).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

from wire.errors import ConfigError, PermanentError

__all__ = [
    "ROW_GAP",
    "ROW_LATE",
    "ROW_REPEATED",
    "DetectorConfig",
    "DetectorTable",
    "SlotLevels",
    "StepResult",
]

_LOG = logging.getLogger(__name__)
_Fn = TypeVar("_Fn", bound=Callable[..., Any])

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Row flags in :attr:`StepResult.flags`.
ROW_LATE: Final = 1
ROW_REPEATED: Final = 2
ROW_GAP: Final = 4

#: State arrays in the order the compiled loop takes them.
_STATE_ORDER: Final = (
    "rows",
    "last_t",
    "t0",
    "step_log",
    "has_time",
    "active",
    "act_rows",
    "calm",
    "hist_i",
    "hist_s",
    "hist_d",
    "totals",
    "n_col",
    "first",
    "level",
    "err",
    "sel",
    "ref",
    "ref_err",
    "sm",
    "sm_ref",
    "smv",
    "burst",
    "burst_n",
    "lmean",
    "lvar",
    "prof_d",
    "cnt_d",
    "prof_w",
    "cnt_w",
    "last_v",
    "jump",
    "jn",
    "jumping",
    "dbase",
    "dvar",
)
#: State arrays with a column axis (axis 1), widened by :meth:`DetectorTable.add_columns`.
_COLUMN_STATE: Final = (
    "n_col",
    "first",
    "level",
    "err",
    "sel",
    "ref",
    "ref_err",
    "sm",
    "sm_ref",
    "smv",
    "lmean",
    "lvar",
    "prof_d",
    "cnt_d",
    "prof_w",
    "cnt_w",
    "last_v",
    "jump",
    "jn",
    "jumping",
    "dbase",
    "dvar",
)
_BURST_ROWS: Final = 8  # an alert's first rows, kept until it is known to be short
_ALERT_PROFILE_SHARE: Final = 0.1  # cycle learning while alerting (see _learn_bin)
_COUNT_UNIT: Final = 16  # profile-bin visits are counted in sixteenths
_N_MODELS: Final = 4  # fast level, slow level, slow + daily, slow + weekly
_N_BINS: Final = 48  # tail histogram: log10(statistic) from -2 to 6, six bins a decade
_LOG_LOW: Final = -2.0
_PER_DECADE: Final = 6.0
_MAX_Z: Final = 1000.0
_SCALE_CLIP: Final = 3.5  # Huber bound, in spreads, of the spreads' updates
_DRIFT_HOLD: Final = 3.0  # Huber bound, in spreads, of the long baseline's updates
_DRIFT_SCALE: Final = 2.0  # and of its spread's
_JUMP_LOG_SD: Final = 0.5  # least spread of log jump sizes: sizes within ~2x are alike
_SQRT_HALF: Final = math.sqrt(0.5)
_JUMP_MEMORY: Final = 50.0  # jumps remembered by the law of their sizes and landings
_LANDING_PRIOR: Final = 4.0  # jumps counted as landing in known states before any is seen
_N_STATES: Final = 4  # levels a column is remembered to have settled at (its states)
# per column, the jump model: rate of jumps per row, mean and variance of the log of
# their sizes, share of jumps landing somewhere new, then each state's level and share
_HABIT: Final = 10  # jumps after which a column with two states or more is taken to switch
_STATE_MIN_SHARE: Final = 0.02  # a state held at least this share of the time is normal
_J_RATE: Final = 0
_J_LOG: Final = 1
_J_LOGVAR: Final = 2
_J_NEW: Final = 3
_J_LEVEL: Final = 4
_J_SHARE: Final = 4 + _N_STATES
_J_PENDING: Final = 4 + 2 * _N_STATES  # size of the jump under way
_J_LANDED: Final = 5 + 2 * _N_STATES  # 1 when it went somewhere new
_J_SIZE: Final = 6 + 2 * _N_STATES
_SQRT_2_PI: Final = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Settings of a :class:`DetectorTable` (the defaults are chosen by ``bench/diagnostics.py``).

    Attributes:
        alpha: tail probability at or under which a row raises an alert.
        calm_p: a row with a tail probability at least this counts as back to normal.
        calm_rows: normal rows in a row that end an alert (also its shortest length).
        settle_rows: an alert lasting this many rows is a settled change and is learnt.
        min_rows: rows a slot must have seen before it may raise an alert.
        warmup_s: time a slot with timestamps must have seen (from its first row) before
            it may raise an alert; rows are learnt and scored meanwhile.
        fast_alpha: EWMA weight of the fast level.
        slow_alpha: EWMA weight of the slow levels.
        error_alpha: EWMA weight of the predictors' squared errors (their spreads).
        select_alpha: EWMA weight of the longer-memory errors that choose the predictor.
        profile_alpha: smallest weight of a cycle profile bin's update.
        season_gain: a cyclic predictor is used only when its error is under this
            share of the best acyclic one.
        smooth_span: EWMA span, in rows, of the smoothed deviations.
        forget_rows: memory of the tail histograms, in rows.
        burst_weight: weight, in rows, with which the rows of a short alert (a burst)
            enter the tail histograms once it is over: bursts in heavy-tailed data are
            normal, but one burst should not hide the next one.
        wander: while an alert is up, a column followed by the fast level is compared with
            where it was when the alert went up, with a spread that grows as a random
            walk's: times ``sqrt(1 + wander * rows since the event)``.
        prior_rows: weight of the chi-square prior in the tail probability, in rows.
        young: uncertainty widening of a young column: scale times ``1 + young / n``.
        min_column_rows: rows a column must have learnt before it is scored.
        floor: smallest spread, as a share of the column's long-run standard deviation.
        clip: Huber clip of the updates, in spreads.
        gap_factor: a step longer than this many typical steps is a gap.
        drift_rows: memory, in rows, of each column's long baseline, against which a
            third statistic measures slow drifts (a leak, wear); 0 leaves it out.
        day_bins: bins of the daily profile.
        week_bins: bins of the weekly profile.
        periods_s: the two cycle lengths looked for, with timestamps (day, week).
        row_periods: the two cycle lengths looked for, in rows, without timestamps.
    """

    alpha: float = 3e-4
    calm_p: float = 0.05
    calm_rows: int = 5
    settle_rows: int = 400
    min_rows: int = 20
    fast_alpha: float = 0.3
    slow_alpha: float = 0.02
    error_alpha: float = 0.002
    select_alpha: float = 0.002
    profile_alpha: float = 0.1
    season_gain: float = 0.9
    smooth_span: float = 10.0
    forget_rows: float = 2000.0
    burst_weight: float = 0.25
    wander: float = 0.1
    prior_rows: float = 50.0
    young: float = 10.0
    min_column_rows: int = 10
    floor: float = 0.01
    clip: float = 5.0
    gap_factor: float = 10.0
    drift_rows: float = 0.0
    warmup_s: float = 0.0
    day_bins: int = 48
    week_bins: int = 168
    periods_s: tuple[float, float] = (86_400.0, 604_800.0)
    row_periods: tuple[float, float] = (24.0, 168.0)

    def __post_init__(self) -> None:
        for name in ("alpha", "calm_p", "fast_alpha", "slow_alpha", "error_alpha", "select_alpha"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"detector {name} must be in (0, 1) (got {value})")
        if not 0 < self.profile_alpha <= 1 or not 0 < self.season_gain <= 1:
            raise ConfigError("detector profile_alpha and season_gain must be in (0, 1]")
        for name in ("calm_rows", "settle_rows", "min_column_rows", "day_bins", "week_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"detector {name} must be >= 1 (got {getattr(self, name)})")
        if self.min_rows < 0:
            raise ConfigError(f"detector min_rows must be >= 0 (got {self.min_rows})")
        for name in ("smooth_span", "forget_rows"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"detector {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("prior_rows", "young", "floor", "clip", "burst_weight", "wander", "warmup_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"detector {name} must be a number >= 0 (got {value})")
        if not (self.drift_rows == 0 or self.drift_rows >= 1):
            raise ConfigError(f"detector drift_rows must be 0 or >= 1 (got {self.drift_rows})")
        if not self.clip > 0:
            raise ConfigError(f"detector clip must be > 0 (got {self.clip})")
        if not self.gap_factor > 1:
            raise ConfigError(f"detector gap_factor must be > 1 (got {self.gap_factor})")
        for name in ("periods_s", "row_periods"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(p > 0 and math.isfinite(p) for p in pair):
                raise ConfigError(f"detector {name} must be two positive lengths (got {pair})")

    @property
    def threshold(self) -> float:
        """The score at or above which a row is anomalous: ``1 - alpha``."""
        return 1.0 - self.alpha

    def _params(self) -> FloatArray:
        """The settings as the compiled loop takes them (order fixed by ``_P_*``)."""
        return np.array(
            [
                self.alpha,
                self.calm_p,
                self.calm_rows,
                self.settle_rows,
                self.min_rows,
                self.fast_alpha,
                self.slow_alpha,
                self.error_alpha,
                self.profile_alpha,
                self.season_gain,
                2.0 / (self.smooth_span + 1.0),
                1.0 / self.forget_rows,
                self.prior_rows,
                self.young,
                self.min_column_rows,
                self.floor,
                self.clip,
                self.gap_factor,
                self.periods_s[0],
                self.periods_s[1],
                self.row_periods[0],
                self.row_periods[1],
                self.select_alpha,
                self.burst_weight,
                self.wander,
                self.drift_rows,
                self.warmup_s,
            ],
            dtype=np.float64,
        )


@dataclass(frozen=True, slots=True)
class StepResult:
    """What :meth:`DetectorTable.step` says about each row it was given.

    Attributes:
        score: 1 - the row's tail probability, in [0, 1] (0 when nothing is scored).
        event: the row raised an alert (its rising edge).
        active: the alert is up at this row (the event row included).
        deviation: signed standardised deviation of each column (NaN: not scored).
        flags: per row, a bit set of :data:`ROW_LATE`, :data:`ROW_REPEATED`, :data:`ROW_GAP`.
    """

    score: FloatArray
    event: BoolArray
    active: BoolArray
    deviation: FloatArray
    flags: npt.NDArray[np.int8]

    @property
    def late(self) -> BoolArray:
        """Rows older than their slot's previous row (scored only, nothing learnt)."""
        result: BoolArray = (self.flags & ROW_LATE) != 0
        return result


@dataclass(frozen=True, slots=True)
class SlotLevels:
    """What each slot of a table has learnt, per column, for comparing slots (peers).

    Attributes:
        level: the slow level (slots x columns).
        spread: the column's long-run standard deviation in that slot.
        switches: the column switches between states there (its level is no level).
        scored: the column has changed at least once there.
        rows: rows each slot has learnt.
        elapsed_s: each slot's time from its first row to its last (NaN: no timestamps).
    """

    level: FloatArray
    spread: FloatArray
    switches: BoolArray
    scored: BoolArray
    rows: npt.NDArray[np.int64]
    elapsed_s: FloatArray


def _compiled(fn: _Fn) -> _Fn:
    try:
        jitted = numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:
        # no writable place for the cache (read-only install, no home): compile each start
        _LOG.info("compiled detector loop not cached: no writable cache directory")
        jitted = numba.njit(cache=False, nogil=True, error_model="numpy")(fn)
    return cast("_Fn", jitted)


@_compiled
def _max_sf(value: float, m: float) -> float:
    """P(max of m squared standard normals >= value): the prior of a row's statistic."""
    if value <= 0.0:
        return 1.0
    one = math.erfc(math.sqrt(0.5 * value))
    if one < 1e-8:
        return m * one
    tail: float = 1.0 - (1.0 - one) ** m
    return tail


@_compiled
def _tail(hist: Any, total: float, stat: float, dof: float, prior_rows: float) -> float:
    """Tail probability of ``stat``: forgetting histogram blended with the prior."""
    pos = (math.log10(max(stat, 1e-300)) - _LOG_LOW) * _PER_DECADE
    above = 0.0
    if pos < 0.0:
        above = total
    else:
        b = int(pos)
        if b >= _N_BINS:
            b = _N_BINS - 1
            frac = 1.0
        else:
            frac = pos - b
        for k in range(b + 1, _N_BINS):
            above += hist[k]
        above += hist[b] * (1.0 - frac)
    prior = _max_sf(stat, dof)
    # never rarer than the prior says: an empty tail in a few hundred rows proves little
    blended: float = (above + prior_rows * prior) / (total + prior_rows)
    return max(blended, prior)


@_compiled
def _remember(
    hist: Any, totals: Any, s: int, which: int, stat: float, forget: float, weight: float
) -> None:
    keep = 1.0 - forget
    for k in range(_N_BINS):
        hist[s, k] *= keep
    pos = (math.log10(max(stat, 1e-300)) - _LOG_LOW) * _PER_DECADE
    b = min(max(int(pos), 0), _N_BINS - 1) if pos > 0.0 else 0
    hist[s, b] += weight
    totals[s, which] = totals[s, which] * keep + weight


@_compiled
def _learn_bin(
    prof: Any,
    cnt: Any,
    s: int,
    c: int,
    b: int,
    weight: float,
    g: float,
    floor: float,
    hold: bool,
) -> None:
    """Move a profile bin by its share ``weight`` of the miss ``g``.

    A young bin is a running mean, a grown one an EWMA of weight ``floor``; while an
    alert is up a grown bin learns at a tenth of that, so a recurring pattern is still
    learnt over a few cycles but one anomaly does not become tomorrow's expectation.
    Visits are counted in sixteenths in one byte: only the first 1 / floor matter.
    """
    step = int(weight * _COUNT_UNIT + 0.5)
    if step <= 0:
        return
    count = min(255, int(cnt[s, c, b]) + step)
    cnt[s, c, b] = count
    rate = step / count
    if rate <= floor or count >= 255:
        rate = floor * step / _COUNT_UNIT * (_ALERT_PROFILE_SHARE if hold else 1.0)
    prof[s, c, b] += rate * g


@_compiled
def _z_of_p(p: float) -> float:
    """The ``z >= 0`` whose two-sided Gaussian tail ``erfc(z / sqrt 2)`` is ``p``."""
    if p >= 1.0:
        return 0.0
    if p <= 1e-300:
        return _MAX_Z
    # Abramowitz & Stegun 26.2.23 as the start, then Newton steps on log erfc
    t = math.sqrt(-2.0 * math.log(0.5 * p))
    z = t - (2.515517 + t * (0.802853 + t * 0.010328)) / (
        1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308))
    )
    target = math.log(p)
    for _ in range(3):
        z = max(z, 0.0)
        tail = math.erfc(z * _SQRT_HALF)
        if tail <= 0.0:
            break
        slope = -_SQRT_2_PI * math.exp(-0.5 * z * z) / tail
        z -= (math.log(tail) - target) / slope
    return max(z, 0.0)


@_compiled
def _jump_tail(js: Any, x: float, v: float, size: float, spread: float) -> tuple[float, float]:
    """Tail probability of a row under "noise, or a jump", and the known jumps' share in it.

    ``js`` is a column's jump model, ``x`` the row's miss over the quiet ``spread``,
    ``size`` its absolute value, ``v`` the value. With probability ``1 - rate`` a row is
    Gaussian noise. With probability ``rate`` it is a jump (a switch of operating state):
    to one of the states the column has settled at before (chosen by their shares of
    time, with the quiet spread around each), or, for a share of jumps learnt from how
    they landed, to somewhere new with a log-normal size. Returns ``P(as far or farther)``
    summed over those parts, and the share of it that jumps to known states account for
    (the posterior weight of "this row switched to a known state").
    """
    rate = js[_J_RATE]
    quiet = (1.0 - rate) * math.erfc(x * _SQRT_HALF)
    if rate <= 0.0 or size <= 0.0:
        return quiet, 0.0
    total_share = 0.0
    known = 0.0
    for k in range(_N_STATES):
        share = js[_J_SHARE + k]
        if share >= _STATE_MIN_SHARE:
            total_share += share
            known += share * math.erfc(abs(v - js[_J_LEVEL + k]) / spread * _SQRT_HALF)
    if total_share > 0.0:
        known /= total_share
    sd = math.sqrt(js[_J_LOGVAR] + _JUMP_LOG_SD * _JUMP_LOG_SD)
    new = 0.5 * math.erfc((math.log(size) - js[_J_LOG]) / sd * _SQRT_HALF)
    to_known = rate * (1.0 - js[_J_NEW]) * known
    total = quiet + to_known + rate * js[_J_NEW] * new
    if total <= 0.0:
        return 0.0, 0.0
    return total, to_known / total


@_compiled
def _mixed(z: float, resid: float, js: Any, v: float, spread: float) -> float:
    """A deviation ``z`` made no larger than the jump model's tail says (same sign)."""
    tail, _ = _jump_tail(js, abs(z), v, abs(resid), spread)
    return math.copysign(min(abs(z), _z_of_p(tail)), z)


@_compiled
def _state_z(js: Any, v: float, spread: float) -> float:
    """How far ``v`` is from the nearest state the column is known to settle at, as a z."""
    tail = 0.0
    for k in range(_N_STATES):
        if js[_J_SHARE + k] >= _STATE_MIN_SHARE:
            tail = max(tail, math.erfc(abs(v - js[_J_LEVEL + k]) / spread * _SQRT_HALF))
    return _z_of_p(tail) if tail > 0.0 else _MAX_Z


@_compiled
def _switches(js: Any, jumps: int) -> bool:
    """Whether a column has the habit of switching: many jumps, two states or more."""
    if jumps < _HABIT:
        return False
    held = 0
    for k in range(_N_STATES):
        if js[_J_SHARE + k] >= _STATE_MIN_SHARE:
            held += 1
    return held >= 2


@_compiled
def _nearest_state(js: Any, v: float, tolerance: float) -> int:
    """The remembered state whose level is nearest ``v``, within ``tolerance``; else -1."""
    best = -1
    gap = tolerance
    for k in range(_N_STATES):
        if js[_J_SHARE + k] > 0.0:
            d = abs(v - js[_J_LEVEL + k])
            if d <= gap:
                best, gap = k, d
    return best


@_compiled
def _settle(js: Any, v: float, tolerance: float, a_share: float, a_level: float) -> None:
    """A quiet row: the column is in the state nearest ``v`` (a new one if none is near).

    States' shares of time are learnt with forgetting; a new state takes the place of
    the one with the least share. A state's level follows slow drift within it.
    """
    k = _nearest_state(js, v, tolerance)
    if k < 0:
        k = 0
        for j in range(1, _N_STATES):
            if js[_J_SHARE + j] < js[_J_SHARE + k]:
                k = j
        js[_J_LEVEL + k] = v
        js[_J_SHARE + k] = 0.0
    else:
        js[_J_LEVEL + k] += a_level * (v - js[_J_LEVEL + k])
        for j in range(_N_STATES):
            # two states closer than the tolerance are one (the noise split in two)
            near = abs(js[_J_LEVEL + j] - js[_J_LEVEL + k]) <= tolerance
            if j != k and js[_J_SHARE + j] > 0.0 and near:
                both = js[_J_SHARE + j] + js[_J_SHARE + k]
                mixed = js[_J_SHARE + j] * js[_J_LEVEL + j]
                mixed += js[_J_SHARE + k] * js[_J_LEVEL + k]
                js[_J_LEVEL + k] = mixed / both if both > 0.0 else js[_J_LEVEL + k]
                js[_J_SHARE + k] = both
                js[_J_SHARE + j] = 0.0
    for j in range(_N_STATES):
        js[_J_SHARE + j] *= 1.0 - a_share
    js[_J_SHARE + k] += a_share


@_compiled
def _learn_jump(
    js: Any,
    jn: Any,
    jumping: Any,
    s: int,
    c: int,
    v: float,
    before: float,
    resid: float,
    quiet: float,
    clip: float,
    a_jump: float,
    a_level: float,
    hold: bool,
) -> tuple[float, float]:
    """Learn a column's jumps from its fast level's miss; return the row's two weights.

    A miss beyond ``clip`` quiet spreads starts a jump, counted once however many rows
    it takes (a level shift is one jump; so is a relaxation toward a new state's level);
    where it lands (a known state or somewhere new) and its size are learnt, and so is
    the rate of jumps per row. A quiet row tells which state the column is in.

    Returns the posterior probability, under what was learnt before this row, that the
    row switched to a known state: how far the levels follow it at once. It is 0 for a
    column that never jumped, and near 0 for a jump to somewhere new, so that a level
    shift is not taken as normal at once.
    """
    size = abs(resid)
    tolerance = clip * quiet
    if abs(v - before) <= tolerance and not hold:
        # the value dwells: the column is in the state nearest it (learnt outside alerts
        # only: an alert must not teach that where it went is a normal state)
        _settle(js, v, tolerance, a_jump, a_level)
    js[_J_RATE] *= 1.0 - a_jump
    if size <= tolerance:
        if jumping[s, c] == 1:
            # the jump is over: learnt only now, so that the rows of a lasting one are
            # judged by what was known before it
            jn[s, c] = min(jn[s, c] + 1, 1_000_000_000)
            a_size = max(1.0 / jn[s, c], 1.0 / _JUMP_MEMORY)
            delta = math.log(js[_J_PENDING]) - js[_J_LOG]
            js[_J_LOG] += a_size * delta
            js[_J_LOGVAR] = (1.0 - a_size) * (js[_J_LOGVAR] + a_size * delta * delta)
            # jumps are taken to land in known states until several have shown otherwise:
            # the first jumps to somewhere new are news, a habit of them is not
            a_land = max(1.0 / (jn[s, c] + _LANDING_PRIOR), 1.0 / _JUMP_MEMORY)
            js[_J_NEW] += a_land * (js[_J_LANDED] - js[_J_NEW])
            js[_J_RATE] += a_jump
        jumping[s, c] = 0
        return 0.0, 0.0
    w = 0.0
    follow = 0.0
    if jn[s, c] > 0:
        _, w = _jump_tail(js, size / quiet, v, size, quiet)
        follow = w
        if jumping[s, c] == 1 and abs(v - before) <= tolerance and _switches(js, jn[s, c]):
            follow = 1.0  # a metric that switches has settled at a level: a state, maybe new
    if jumping[s, c] == 0:
        js[_J_PENDING] = size
        js[_J_LANDED] = 1.0 if _nearest_state(js, v, tolerance) < 0 else 0.0
    jumping[s, c] = 1
    return w, follow


@_compiled
def _best(sel: Any, s: int, c: int, elapsed: float, period_d: float, period_w: float,
          season_gain: float) -> int:  # fmt: skip
    """The predictor a column uses now: the least error, a cycle only once seen and better."""
    best = 0 if sel[s, c, 0] <= sel[s, c, 1] else 1
    if elapsed >= period_d and sel[s, c, 2] < season_gain * sel[s, c, best]:
        best = 2
    if elapsed >= period_w and sel[s, c, 3] < season_gain * sel[s, c, best]:
        best = 3
    return best


@_compiled
def _drift_level(level: Any, s: int, c: int, best: int) -> float:
    """The slow level of a column, without its daily or weekly cycle when it has one."""
    return float(level[s, c, best if best >= 2 else 1])


@_compiled
def _learn_baseline(
    dbase: Any, dvar: Any, s: int, c: int, value: float, fl: float, rate: float, n: int
) -> None:
    """Learn a column's long baseline (a memory of ``drift_rows``) from its slow level.

    A move is clipped at :data:`_DRIFT_HOLD` spreads, so the baseline follows a slow
    wander but falls behind a drift that outruns it (a slow leak, wear); a row that
    outruns it teaches the spread nothing, and other rows at most :data:`_DRIFT_SCALE`
    spreads: the drift is measured, not learnt.
    """
    rate = max(rate, 1.0 / (n + 1.0))
    delta = value - dbase[s, c]
    bound = _DRIFT_HOLD * math.sqrt(dvar[s, c] + fl) if n > 2 else abs(delta)
    dc = min(max(delta, -bound), bound)
    dbase[s, c] += rate * dc
    if n > 2 and abs(delta) > bound:
        # outrun: the spread learns nothing from it, or it would grow with the drift
        # (by about 3 / drift_rows a row in variance) and the deviation stop growing
        return
    dv = min(abs(delta), _DRIFT_SCALE * math.sqrt(dvar[s, c] + fl)) if n > 2 else delta
    dvar[s, c] = (1.0 - rate) * (dvar[s, c] + rate * dv * dv)


@_compiled
def _phase(t: float, period: float, bins: int) -> tuple[int, int, float]:
    """The two profile bins around ``t`` and the weight of the second one."""
    pos = (t % period) / period * bins - 0.5
    lo = math.floor(pos)
    frac = pos - lo
    i0 = int(lo) % bins
    i1 = (i0 + 1) % bins
    return i0, i1, frac


@_compiled
def _step_rows(
    par: Any,
    slots: Any,
    t_in: Any,
    x: Any,
    learn: bool,
    rows: Any,
    last_t: Any,
    t0: Any,
    step_log: Any,
    has_time: Any,
    active: Any,
    act_rows: Any,
    calm: Any,
    hist_i: Any,
    hist_s: Any,
    hist_d: Any,
    totals: Any,
    n_col: Any,
    first: Any,
    level: Any,
    err: Any,
    sel: Any,
    ref: Any,
    ref_err: Any,
    sm: Any,
    sm_ref: Any,
    smv: Any,
    burst: Any,
    burst_n: Any,
    lmean: Any,
    lvar: Any,
    prof_d: Any,
    cnt_d: Any,
    prof_w: Any,
    cnt_w: Any,
    last_v: Any,
    jump: Any,
    jn: Any,
    jumping: Any,
    dbase: Any,
    dvar: Any,
    score: Any,
    event: Any,
    up: Any,
    dev: Any,
    flags: Any,
) -> None:
    alpha, calm_p, calm_rows, settle_rows, min_rows = par[0], par[1], par[2], par[3], par[4]
    a_fast, a_slow, a_err, a_prof, season_gain = par[5], par[6], par[7], par[8], par[9]
    beta, forget, prior_rows, young, min_col = par[10], par[11], par[12], par[13], par[14]
    floor_share, clip, gap_factor, a_sel = par[15], par[16], par[17], par[22]
    burst_weight, wander = par[23], par[24]
    drift = par[25] > 0.0
    a_base = 1.0 / par[25] if drift else 0.0
    warmup_s = par[26]
    n_stats = 3.0 if drift else 2.0
    n_rows, n_cols = x.shape
    bd = prof_d.shape[2]
    bw = prof_w.shape[2]
    sm_norm = math.sqrt(beta / (2.0 - beta))
    pred = np.empty(_N_MODELS)
    sm_new = np.empty(n_cols)
    smr_new = np.empty(n_cols)
    for r in range(n_rows):
        s = slots[r]
        t = t_in[r]
        flag = 0
        if has_time[s] < 0:
            has_time[s] = 0 if math.isnan(t) else 1
        typical = math.exp(step_log[s])
        if has_time[s] == 0:
            t = float(rows[s])
            period_d, period_w = par[20], par[21]
        else:
            period_d, period_w = par[18], par[19]
            if math.isnan(t):
                t = last_t[s] + typical if rows[s] > 0 else 0.0
        late = False
        gap = False
        if rows[s] > 0:
            step = t - last_t[s]
            if step < 0.0:
                late = True
                flag |= 1
            elif step == 0.0:
                flag |= 2
            elif step > gap_factor * typical and rows[s] > 2:
                gap = True
                flag |= 4
        else:
            t0[s] = t
            step = 0.0
        elapsed = t - t0[s]
        d0, d1, dfrac = _phase(t, period_d, bd)
        w0, w1, wfrac = _phase(t, period_w, bw)
        # -- deviations ------------------------------------------------------------------
        m = 0
        sum_i = 0.0
        sum_s = 0.0
        ref_i = 0.0
        ref_s = 0.0
        sum_d = 0.0
        alerting = active[s] == 1
        has_ref = active[s] >= 1  # alerting, or a settled change with the old normal kept
        for c in range(n_cols):
            dev[r, c] = np.nan
            sm_new[c] = 0.0 if gap else sm[s, c]
            smr_new[c] = 0.0 if gap else sm_ref[s, c]
            v = x[r, c]
            if math.isnan(v) or n_col[s, c] < min_col:
                continue
            pd_ = prof_d[s, c, d0] * (1.0 - dfrac) + prof_d[s, c, d1] * dfrac
            pw_ = prof_w[s, c, w0] * (1.0 - wfrac) + prof_w[s, c, w1] * wfrac
            pred[0] = level[s, c, 0]
            pred[1] = level[s, c, 1]
            pred[2] = level[s, c, 2] + pd_
            pred[3] = level[s, c, 3] + pw_
            best = _best(sel, s, c, elapsed, period_d, period_w, season_gain)
            fl = floor_share * floor_share * lvar[s, c] + 1e-24 * (1.0 + lmean[s, c] ** 2)
            n_eff = min(n_col[s, c], 2 * min_col) if gap else n_col[s, c]
            spread = math.sqrt(err[s, c, best] + fl) * (1.0 + young / n_eff)
            z = (v - pred[best]) / spread
            if jn[s, c] > 0:
                z = _mixed(z, v - pred[best], jump[s, c], v, spread)
            z = min(max(z, -_MAX_Z), _MAX_Z)
            dev[r, c] = z
            zc = min(max(z, -clip), clip)
            sm_new[c] = (1.0 - beta) * sm_new[c] + beta * zc
            m += 1
            sum_i = max(sum_i, z * z)
            norm = sm_norm if math.isnan(smv[s, c]) else math.sqrt(smv[s, c] + 1e-12)
            q = sm_new[c] / norm
            sum_s = max(sum_s, q * q)
            # drift: the column's slow level (without its cycle) against a long
            # baseline that follows it only slowly (a slow leak, wear)
            # (not for a column that jumps between states: its slow level is no level)
            if drift and jn[s, c] == 0:
                q = _drift_level(level, s, c, best) - dbase[s, c]
                q /= math.sqrt(dvar[s, c] + fl) * (1.0 + young / n_eff)
                sum_d = max(sum_d, min(q * q, _MAX_Z * _MAX_Z))
                if abs(q) > abs(z):
                    dev[r, c] = min(max(q, -_MAX_Z), _MAX_Z)  # the evidence is the drift
            if has_ref:
                # the same deviation against the levels held when the alert went up
                base = pred[best] - level[s, c, best] + ref[s, c, best]
                spread_r = math.sqrt(ref_err[s, c, best] + fl) * (1.0 + young / n_eff)
                if best == 0:
                    # a wandering column may wander from where it was, as a random walk
                    spread_r *= math.sqrt(1.0 + wander * act_rows[s])
                zr = (v - base) / spread_r
                if jn[s, c] > 0:
                    zr = _mixed(zr, v - base, jump[s, c], v, spread_r)
                    # a column that switches between states is back to normal in any of them
                    zr = math.copysign(min(abs(zr), _state_z(jump[s, c], v, spread_r)), zr)
                zr = min(max(zr, -_MAX_Z), _MAX_Z)
                ref_i = max(ref_i, zr * zr)
                zrc = min(max(zr, -clip), clip)
                smr_new[c] = (1.0 - beta) * smr_new[c] + beta * zrc
                q = smr_new[c] / norm
                ref_s = max(ref_s, q * q)
        p = 1.0
        p_ref = 1.0
        p_ref_row = 1.0
        stat_i = 0.0
        stat_s = 0.0
        stat_d = 0.0
        if m > 0:
            stat_i = sum_i
            stat_s = sum_s
            stat_d = sum_d
            p_i = _tail(hist_i[s], totals[s, 0], stat_i, float(m), prior_rows)
            p_s = _tail(hist_s[s], totals[s, 1], stat_s, float(m), prior_rows)
            p_d = _tail(hist_d[s], totals[s, 2], stat_d, float(m), prior_rows) if drift else 1.0
            p = min(1.0, n_stats * min(p_i, p_s, p_d))
            if has_ref:
                p_i = _tail(hist_i[s], totals[s, 0], ref_i, float(m), prior_rows)
                p_s = _tail(hist_s[s], totals[s, 1], ref_s, float(m), prior_rows)
                p_ref = min(1.0, n_stats * min(p_i, p_s, p_d))
                p_ref_row = p_i
        score[r] = 1.0 - p
        flags[r] = flag
        if late or not learn:
            event[r] = False
            up[r] = alerting
            continue
        # -- time ----------------------------------------------------------------------
        if rows[s] > 0 and step > 0.0:
            lstep = math.log(step)
            if rows[s] == 1:
                step_log[s] = lstep
            elif not gap:
                step_log[s] += 0.05 * (lstep - step_log[s])
        rows[s] += 1
        last_t[s] = t
        for c in range(n_cols):
            sm[s, c] = sm_new[c]
            sm_ref[s, c] = smr_new[c]
        # -- events --------------------------------------------------------------------
        fired = False
        closed = False
        if not alerting:
            if m > 0 and p <= alpha and rows[s] > min_rows and elapsed >= warmup_s:
                if has_ref and p_ref_row >= calm_p:
                    # back in the normal known before the last settled change: no news
                    for c in range(n_cols):
                        sm[s, c] = 0.0
                        sm_ref[s, c] = 0.0
                        for k in range(1, _N_MODELS):
                            held = ref[s, c, k]
                            ref[s, c, k] = level[s, c, k]
                            level[s, c, k] = held
                else:
                    fired = True
                    active[s] = 1
                    burst_n[s] = 0
                    act_rows[s] = 0
                    calm[s] = 0
                    for c in range(n_cols):
                        sm_ref[s, c] = sm[s, c]
                        for k in range(_N_MODELS):
                            ref[s, c, k] = level[s, c, k]
                            ref_err[s, c, k] = err[s, c, k]
        else:
            act_rows[s] += 1
            calm[s] = calm[s] + 1 if p_ref >= calm_p else 0
            if calm[s] >= calm_rows and act_rows[s] >= calm_rows:
                # back to what was normal before: so are the levels
                active[s] = 0
                closed = True
                for c in range(n_cols):
                    sm[s, c] = sm_ref[s, c]
                    for k in range(1, _N_MODELS):  # the fast level follows by itself
                        level[s, c, k] = ref[s, c, k]
            elif act_rows[s] >= settle_rows:
                # a settled change: the levels have followed it meanwhile; the old
                # normal is kept, so that a return to it is no news either
                active[s] = 2
                burst_n[s] = 0
                for c in range(n_cols):
                    # the long baseline starts again from where the column is now
                    dbase[s, c] = level[s, c, 1]
        hold = active[s] == 1
        event[r] = fired
        up[r] = fired or alerting
        # -- learning ------------------------------------------------------------------
        for c in range(n_cols):
            v = x[r, c]
            if math.isnan(v):
                continue
            before = last_v[s, c]
            last_v[s, c] = v
            if n_col[s, c] == 0:
                # a column is learnt from its first change on (a constant tells nothing)
                if math.isnan(first[s, c]):
                    first[s, c] = v
                    continue
                if v == first[s, c]:
                    continue
                for k in range(_N_MODELS):
                    level[s, c, k] = v
                    err[s, c, k] = 0.0
                    sel[s, c, k] = 0.0
                lmean[s, c] = 0.5 * (v + first[s, c])
                lvar[s, c] = 0.25 * (v - first[s, c]) ** 2
                dbase[s, c] = lmean[s, c]
                dvar[s, c] = lvar[s, c]
                n_col[s, c] = 1
                continue
            pd_ = prof_d[s, c, d0] * (1.0 - dfrac) + prof_d[s, c, d1] * dfrac
            pw_ = prof_w[s, c, w0] * (1.0 - wfrac) + prof_w[s, c, w1] * wfrac
            n = n_col[s, c]
            inv = 1.0 / (n + 1.0)
            la = max(0.001, inv)
            delta = v - lmean[s, c]
            lmean[s, c] += la * delta
            lvar[s, c] = (1.0 - la) * (lvar[s, c] + la * delta * delta)
            fl = floor_share * floor_share * lvar[s, c] + 1e-24 * (1.0 + lmean[s, c] ** 2)
            ae = max(a_err, inv)
            aq = max(a_sel, inv)
            a_jump = max(forget, 1.0 / rows[s])
            w = 0.0
            follow = 0.0
            if n > 2:
                # a jump is told by the fast level's miss; every level follows a known kind
                quiet = math.sqrt(err[s, c, 0] + fl)
                resid0 = v - level[s, c, 0]
                w, follow = _learn_jump(
                    jump[s, c],
                    jn,
                    jumping,
                    s,
                    c,
                    v,
                    before,
                    resid0,
                    quiet,
                    clip,
                    a_jump,
                    a_slow,
                    hold,
                )
            for k in range(_N_MODELS):
                if k == 0:
                    target, rate = v, max(a_fast, inv)
                elif k == 1:
                    target, rate = v, max(a_slow, inv)
                elif k == 2:
                    target, rate = v - pd_, max(a_slow, inv)
                else:
                    target, rate = v - pw_, max(a_slow, inv)
                resid = target - level[s, c, k]
                bound = clip * math.sqrt(err[s, c, k] + fl) if n > 2 else abs(resid)
                rc = min(max(resid, -bound), bound)
                if not hold:
                    # a jump is told by the jump model, not by the spread of the noise,
                    # and the spread is clipped tighter than the levels: at the levels'
                    # bound, jumps in more than 1 / clip**2 of the rows would inflate it
                    # without end (the noise of a switching metric read as its jumps)
                    re = min(abs(rc), _SCALE_CLIP * bound / clip) if n > 2 else rc
                    err[s, c, k] = (1.0 - ae * (1.0 - w)) * err[s, c, k] + ae * (1.0 - w) * re * re
                    sel[s, c, k] = (1.0 - aq * (1.0 - w)) * sel[s, c, k] + aq * (1.0 - w) * re * re

                level[s, c, k] += rate * rc
                if follow > 0.0:
                    # a switch to a known state is no evidence either way: the levels
                    # follow it at once, and so does the alert's reference (which does
                    # not follow a switching metric settling at a level never held)
                    level[s, c, k] += follow * (target - level[s, c, k])
                    if active[s] >= 1 and w > 0.0:
                        ref[s, c, k] += w * (target - ref[s, c, k])
                if k == 2:
                    g = v - level[s, c, 2] - pd_
                    if min(cnt_d[s, c, d0], cnt_d[s, c, d1]) * a_prof >= _COUNT_UNIT:
                        g = min(max(g, -bound), bound)  # a young bin learns its level
                    _learn_bin(prof_d, cnt_d, s, c, d0, 1.0 - dfrac, g, a_prof, hold)
                    _learn_bin(prof_d, cnt_d, s, c, d1, dfrac, g, a_prof, hold)
                elif k == 3:
                    g = v - level[s, c, 3] - pw_
                    if min(cnt_w[s, c, w0], cnt_w[s, c, w1]) * a_prof >= _COUNT_UNIT:
                        g = min(max(g, -bound), bound)
                    _learn_bin(prof_w, cnt_w, s, c, w0, 1.0 - wfrac, g, a_prof, hold)
                    _learn_bin(prof_w, cnt_w, s, c, w1, wfrac, g, a_prof, hold)
            if not hold and n >= min_col:
                # the smoothed deviations' own spread (errors are seldom white)
                if math.isnan(smv[s, c]):
                    smv[s, c] = sm_norm * sm_norm
                smv[s, c] = (1.0 - ae) * smv[s, c] + ae * min(sm[s, c] ** 2, 25.0)
            if drift and not hold:
                best = _best(sel, s, c, elapsed, period_d, period_w, season_gain)
                _learn_baseline(dbase, dvar, s, c, _drift_level(level, s, c, best), fl, a_base, n)
            n_col[s, c] = min(n + 1, 1_000_000_000)
            if gap and n_col[s, c] > 2 * min_col:
                n_col[s, c] = 2 * min_col  # after a gap the uncertainty widens again
        if m > 0:
            if active[s] != 1 and not fired and not closed:
                _remember(hist_i, totals, s, 0, stat_i, forget, 1.0)
                _remember(hist_s, totals, s, 1, stat_s, forget, 1.0)
                _remember(hist_d, totals, s, 2, stat_d, forget, 1.0)
            elif burst_n[s] < _BURST_ROWS:
                burst[s, burst_n[s], 0] = stat_i
                burst[s, burst_n[s], 1] = stat_s
                burst[s, burst_n[s], 2] = stat_d
                burst_n[s] += 1
        if closed:
            # A short alert was a burst: heavy-tailed data has them as a matter of
            # course, and a calibration that never saw them would alert on every one.
            # A long one is not remembered, so that it does not teach what is normal.
            if act_rows[s] <= 3 * calm_rows:
                for j in range(burst_n[s]):
                    _remember(hist_i, totals, s, 0, burst[s, j, 0], forget, burst_weight)
                    _remember(hist_s, totals, s, 1, burst[s, j, 1], forget, burst_weight)
                    _remember(hist_d, totals, s, 2, burst[s, j, 2], forget, burst_weight)
            burst_n[s] = 0


class DetectorTable:
    """Many independent detector slots stepped together (see the module docstring).

    Args:
        n_slots: slots to create (more can be added with :meth:`add_slots`).
        n_columns: numbers per row, the same for every slot of this table.
        config: the settings; the defaults when None.

    Raises:
        ConfigError: a size is not positive.
    """

    def __init__(self, n_slots: int, n_columns: int, config: DetectorConfig | None = None) -> None:
        if n_slots < 0 or n_columns < 1:
            raise ConfigError(f"a detector table needs slots >= 0 and columns >= 1 "
                              f"(got {n_slots}, {n_columns})")  # fmt: skip
        self._config = config if config is not None else DetectorConfig()
        self._params = self._config._params()
        self._n_columns = n_columns
        self._state: dict[str, np.ndarray[Any, Any]] = {}
        self._n_slots = 0
        self._grow(n_slots)

    # -- shape ---------------------------------------------------------------------------

    @property
    def config(self) -> DetectorConfig:
        """The settings this table was built with."""
        return self._config

    @property
    def threshold(self) -> float:
        """Operating point: a score at or above it raises an alert (``1 - alpha``)."""
        return self._config.threshold

    @property
    def n_slots(self) -> int:
        """Number of slots."""
        return self._n_slots

    @property
    def n_columns(self) -> int:
        """Numbers per row."""
        return self._n_columns

    def rows_seen(self, slot: int) -> int:
        """Rows a slot has learnt (late rows not counted)."""
        return int(self._state["rows"][slot])

    def active(self, slot: int) -> bool:
        """Whether the slot's alert is up."""
        return bool(self._state["active"][slot] == 1)

    def scored_columns(self, slot: int) -> tuple[int, ...]:
        """Columns of a slot that have changed at least once, so are learnt and scored."""
        n_col = self._state["n_col"][slot]
        return tuple(int(c) for c in np.flatnonzero(n_col > 0))

    def predictors(self, slot: int) -> tuple[str, ...]:
        """Which predictor each column of a slot uses now: fast, slow, daily or weekly."""
        st, cfg = self._state, self._config
        periods = cfg.periods_s if st["has_time"][slot] == 1 else cfg.row_periods
        if st["has_time"][slot] == 1:
            elapsed = float(st["last_t"][slot] - st["t0"][slot])
        else:
            elapsed = float(st["rows"][slot])
        names = []
        for c in range(self._n_columns):
            err = st["sel"][slot, c]
            best = 0 if err[0] <= err[1] else 1
            if elapsed >= periods[0] and err[2] < cfg.season_gain * err[best]:
                best = 2
            if elapsed >= periods[1] and err[3] < cfg.season_gain * err[best]:
                best = 3
            names.append(("fast", "slow", "daily", "weekly")[best])
        return tuple(names)

    def levels(self) -> SlotLevels:
        """Every slot's slow levels, spreads and switching columns (for peer checks)."""
        st = self._state
        shares = st["jump"][:, :, _J_SHARE : _J_SHARE + _N_STATES]
        held = np.count_nonzero(shares >= _STATE_MIN_SHARE, axis=2)
        timed = st["has_time"] == 1
        elapsed = np.where(timed, st["last_t"] - st["t0"], np.nan)
        return SlotLevels(
            level=st["level"][:, :, 1].copy(),
            spread=np.sqrt(np.maximum(st["lvar"], 0.0)),
            switches=(st["jn"] >= _HABIT) & (held >= 2),
            scored=st["n_col"] > 0,
            rows=st["rows"].astype(np.int64),
            elapsed_s=elapsed.astype(np.float64),
        )

    def state_bytes(self) -> int:
        """Memory held by the state arrays."""
        return sum(int(a.nbytes) for a in self._state.values())

    def add_slots(self, count: int) -> range:
        """Add ``count`` fresh slots; returns their indices."""
        if count < 0:
            raise ConfigError(f"cannot add {count} slots")
        start = self._n_slots
        self._grow(count)
        return range(start, start + count)

    def reset_slots(self, slots: npt.ArrayLike) -> None:
        """Forget everything about the given slots (as if new)."""
        index = np.asarray(slots, dtype=np.int64)
        fresh = self._fresh(index.size)
        for name, array in self._state.items():
            array[index] = fresh[name]

    def add_columns(self, count: int) -> range:
        """Append ``count`` columns to every slot; returns their indices.

        The new columns start as a new slot's would (unscored until they have changed
        and learnt :attr:`~DetectorConfig.min_column_rows` values); what the slots learnt
        of the other columns is kept, so their deviations go on exactly as before.
        """
        if count < 0:
            raise ConfigError(f"cannot add {count} columns")
        start = self._n_columns
        self._n_columns += count
        fresh = self._fresh(self._n_slots)
        for name in _COLUMN_STATE:
            fresh[name][:, :start] = self._state[name]
            self._state[name] = fresh[name]
        return range(start, self._n_columns)

    # -- stepping ------------------------------------------------------------------------

    def step(
        self,
        slots: npt.ArrayLike,
        t_s: npt.ArrayLike,
        values: npt.ArrayLike,
        *,
        learn: bool = True,
    ) -> StepResult:
        """Score rows (each against its slot's state so far), then learn them.

        Args:
            slots: slot index per row; a slot may appear many times (taken in order).
            t_s: timestamp per row in seconds; NaN when there is none.
            values: ``(rows, n_columns)`` numbers, NaN (or inf) for a missing cell. Never
                modified.
            learn: False scores only: nothing in the table changes.

        Returns:
            Scores, events, alert states, per-column deviations and flags, per row.

        Raises:
            PermanentError: shapes disagree or a slot index is out of range.
        """
        index = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        stamps = np.ascontiguousarray(t_s, dtype=np.float64).reshape(-1)
        data = np.array(values, dtype=np.float64, copy=True, ndmin=2)
        if data.ndim != 2 or data.shape[1] != self._n_columns:
            raise PermanentError(
                f"rows have {data.shape[-1]} values, the table has {self._n_columns} columns"
            )
        n = data.shape[0]
        if index.size != n or stamps.size != n:
            raise PermanentError(f"{n} rows but {index.size} slots and {stamps.size} times")
        if n and (index.min() < 0 or index.max() >= self._n_slots):
            raise PermanentError(f"slot index out of range (table has {self._n_slots})")
        data[~np.isfinite(data)] = np.nan
        stamps = np.where(np.isfinite(stamps), stamps, np.nan)
        score = np.empty(n)
        event = np.empty(n, dtype=np.bool_)
        up = np.empty(n, dtype=np.bool_)
        dev = np.empty((n, self._n_columns))
        flags = np.empty(n, dtype=np.int8)
        state = [self._state[name] for name in _STATE_ORDER]
        args: list[Any] = [self._params, index, stamps, data, learn, *state]
        args += [score, event, up, dev, flags]
        _step_rows(*args)
        return StepResult(score, event, up, dev, flags)

    # -- internals -----------------------------------------------------------------------

    def _fresh(self, count: int) -> dict[str, np.ndarray[Any, Any]]:
        c, cfg = self._n_columns, self._config
        f8, f4 = np.float64, np.float32
        return {
            "rows": np.zeros(count, np.int64),
            "last_t": np.zeros(count, f8),
            "t0": np.zeros(count, f8),
            "step_log": np.zeros(count, f8),
            "has_time": np.full(count, -1, np.int8),
            "active": np.zeros(count, np.int8),
            "act_rows": np.zeros(count, np.int32),
            "calm": np.zeros(count, np.int32),
            "hist_i": np.zeros((count, _N_BINS), f8),
            "hist_s": np.zeros((count, _N_BINS), f8),
            "hist_d": np.zeros((count, _N_BINS), f8),
            "totals": np.zeros((count, 3), f8),
            "n_col": np.zeros((count, c), np.int32),
            "first": np.full((count, c), np.nan, f8),
            "level": np.zeros((count, c, _N_MODELS), f8),
            "err": np.zeros((count, c, _N_MODELS), f8),
            "sel": np.zeros((count, c, _N_MODELS), f8),
            "ref": np.zeros((count, c, _N_MODELS), f8),
            "ref_err": np.zeros((count, c, _N_MODELS), f8),
            "sm": np.zeros((count, c), f8),
            "sm_ref": np.zeros((count, c), f8),
            "smv": np.full((count, c), math.nan, f8),
            "burst": np.zeros((count, _BURST_ROWS, 3), f8),
            "burst_n": np.zeros(count, np.int32),
            "lmean": np.zeros((count, c), f8),
            "lvar": np.zeros((count, c), f8),
            "prof_d": np.zeros((count, c, cfg.day_bins), f4),
            "cnt_d": np.zeros((count, c, cfg.day_bins), np.uint8),
            "prof_w": np.zeros((count, c, cfg.week_bins), f4),
            "cnt_w": np.zeros((count, c, cfg.week_bins), np.uint8),
            "last_v": np.full((count, c), np.nan, f8),
            "jump": np.zeros((count, c, _J_SIZE), f8),
            "jn": np.zeros((count, c), np.int32),
            "jumping": np.zeros((count, c), np.int8),
            "dbase": np.zeros((count, c), f8),
            "dvar": np.zeros((count, c), f8),
        }

    def _grow(self, count: int) -> None:
        fresh = self._fresh(count)
        if not self._state:
            self._state = fresh
        else:
            self._state = {name: np.concatenate([self._state[name], fresh[name]]) for name in fresh}
        self._n_slots += count

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self._config, "n_columns": self._n_columns,
                "n_slots": self._n_slots, "state": self._state}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._config = state["config"]
        self._params = self._config._params()
        self._n_columns = state["n_columns"]
        self._n_slots = state["n_slots"]
        self._state = state["state"]
        missing = [name for name in _STATE_ORDER if name not in self._state]
        if missing:
            # a table pickled before these arrays existed: they start as a new slot's
            fresh = self._fresh(self._n_slots)
            self._state.update({name: fresh[name] for name in missing})


def config_fields() -> tuple[str, ...]:
    """Names of the :class:`DetectorConfig` settings (for benchmarks and help texts)."""
    return tuple(f.name for f in fields(DetectorConfig))
