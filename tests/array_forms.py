"""The diagnostics tables' updates written as plain whole-array numpy.

The engine runs these steps as compiled loops (``diagnostics.kernels``); these forms state
the same arithmetic array by array, and the tests hold the loops to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from diagnostics.baseline import TrendRule, z_to_score
from wire.protocol import Reading

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
#: readings of one repeated value that make a full repeat share (the feature table's own)
RUN_FULL = 20.0


def raw(table: Any, readings: Sequence[Reading], slots: npt.NDArray[np.intp]) -> F32:
    """Return the raw features of ``readings`` (one row each), repeat share included."""
    spec = table.spec
    extract = spec.extract
    rows = [extract(r.metrics, r.status) for r in readings]
    x = np.array(rows, dtype=np.float32).reshape(len(rows), table.width)
    if table._repeat >= 0:
        primary_name = spec.primary_metric
        primary = np.array(
            [float(r.metrics.get(primary_name, math.nan)) for r in readings], dtype=np.float32
        )
        previous = table.last_primary[slots]
        same = primary == previous
        run = np.where(same, table.run[slots] + 1.0, 0.0).astype(np.float32)
        table.run[slots] = run
        x[:, table._repeat] = np.where(
            np.isnan(primary) | np.isnan(previous), np.nan, np.minimum(run / RUN_FULL, 1.0)
        )
        table.last_primary[slots] = np.where(np.isnan(primary), previous, primary)
    return x


def update(table: Any, slots: npt.NDArray[np.intp], ts_ms: I64, x: F32) -> None:
    """Fold raw features ``x`` taken at ``ts_ms`` into the slots' state (slots distinct)."""
    if table.epoch_ms is None:
        table.epoch_ms = int(ts_ms.min()) if len(ts_ms) else 0
    now_s = ((ts_ms - table.epoch_ms) // 1000).astype(np.int32)
    present = ~np.isnan(x)
    level = table.level[slots]
    trend = table.trend[slots]
    fresh = present & np.isnan(level)
    seen = present & ~fresh
    dt_days = (now_s[:, None] - table.updated_s[slots]).astype(np.float32) / 86_400.0
    dt_days = np.clip(dt_days, 0.0, 30.0)
    alpha = table.alpha[None, :]
    error = np.where(seen, x - level, 0.0).astype(np.float32)
    new_level = np.where(seen, level + alpha * error, level)
    new_level = np.where(fresh, x, new_level)
    # slope per day: EW over time, each step weighted by its length, so a burst of
    # close samples and a long gap count by the time they cover (bounded, no blow-up)
    weight = np.minimum(dt_days / table.trend_tau_days, 1.0)
    step = (new_level - level) / np.maximum(dt_days, 1e-6)
    new_trend = np.where(seen, trend + weight * (step - trend), trend)
    spread = table.spread[slots]
    new_spread = np.where(seen, (1.0 - alpha) * (spread + alpha * error * error), spread)
    table.level[slots] = new_level
    table.trend[slots] = new_trend.astype(np.float32)
    table.spread[slots] = new_spread.astype(np.float32)
    table.count[slots] += present
    table.updated_s[slots] = np.where(present, now_s[:, None], table.updated_s[slots])
    table.last_ts_ms[slots] = ts_ms


def slope_t(
    table: Any, slots: npt.NDArray[np.intp], columns: npt.NDArray[np.intp] | None = None
) -> F32:
    """Return each feature's trend over its standard error (signed, one row per slot).

    With ``columns``, only those features' (in that order).

    The trend is about the level's change over the trend's memory (``table.trend_tau_days``)
    divided by it, so its error is that of the difference of two levels a memory apart:
    the level's own noise (the spread shrunk by the level's smoothing, ``a / (2 - a)``)
    times the square root of 2, and never below the feature's noise floor.
    """
    alpha, floor2 = table.alpha, table.floor2
    spread, trend = table.spread[slots], table.trend[slots]
    if columns is not None:
        alpha, floor2 = alpha[columns], floor2[columns]
        spread, trend = spread[:, columns], trend[:, columns]
    shrink = alpha / (2.0 - alpha)
    noise2 = 2.0 * spread * shrink[None, :] + floor2[None, :]
    se = np.sqrt(noise2) / np.float32(table.trend_tau_days)
    slope_t: F32 = (trend / se).astype(np.float32)
    return slope_t


def warm(
    table: Any, slots: npt.NDArray[np.intp], now_s: npt.NDArray[np.int32]
) -> npt.NDArray[np.bool_]:
    """Return which baselines of ``slots`` are trusted at ``now_s`` (one row per slot).

    Warm = at least the feature's ``min_count`` updates learnt, the first of them at
    least ``warmup_s`` of device time ago.
    """
    span = now_s[:, None].astype(np.int64) - table.first_s[slots]
    return (table.count[slots] >= table.min_count) & (span >= table.warmup_s)


def zscores(
    table: Any, slots: npt.NDArray[np.intp], level: F32, now_s: npt.NDArray[np.int32]
) -> F32:
    """Return signed z-scores of ``level`` rows (0 where the baseline is not warm yet)."""
    ready = warm(table, slots, now_s) & ~np.isnan(level)
    spread = np.sqrt(table.var[slots] + table.floor2)
    z = np.where(ready, (level - table.mean[slots]) / spread, 0.0)
    return z.astype(np.float32)


def score(table: Any, z: F32) -> F32:
    """Return each row's score in ``[0, 1]`` from its largest absolute z-score."""
    if z.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    return z_to_score(np.abs(z).max(axis=1))


def trending(
    table: Any,
    slots: npt.NDArray[np.intp],
    z: F32,
    slope_t: F32,
    now_s: npt.NDArray[np.int32],
    mask: npt.NDArray[np.bool_],
    rule: TrendRule,
) -> npt.NDArray[np.bool_]:
    """Track runs of moderate z; return which features drift away (one row per slot).

    A run starts when ``|z|`` reaches ``rule.z_on`` and lasts while ``z`` stays beyond
    ``rule.z_off`` on the same side. A run is flagged once it has lasted ``rule.hold_s``
    of device time with its trend's significance ``slope_t`` (slope over its standard
    error) heading away from the baseline by at least ``rule.min_slope_t``; it stays
    flagged until the run ends. Only rows where ``mask`` holds change the state;
    features not among ``trend_features`` are never flagged.

    Args:
        slots: device slots (distinct).
        z: signed baseline z-scores, one row per slot.
        slope_t: signed trend significance of each feature, one row per slot.
        now_s: device time of each row.
        mask: rows that may change the state (live readings).
        rule: when a run starts, ends and is flagged.
    """
    if not table._all_tracked:
        columns = table.trend_columns
        flags = np.zeros(z.shape, dtype=np.bool_)
        flags[:, columns] = trend_rows(
            table,
            slots,
            z[:, columns],
            slope_t[:, columns],
            now_s,
            mask,
            rule,
        )
        return flags
    return trend_rows(
        table,
        slots,
        z,
        slope_t,
        now_s,
        mask,
        rule,
    )


def trend_rows(
    table: Any,
    slots: npt.NDArray[np.intp],
    z: F32,
    slope_t: F32,
    now_s: npt.NDArray[np.int32],
    mask: npt.NDArray[np.bool_],
    rule: TrendRule,
) -> npt.NDArray[np.bool_]:
    """:func:`trending` on the tracked features only (``z`` and ``slope_t`` of those).

    Returns one column per tracked feature (see :attr:`trend_columns`).
    """
    side = table.run_side[slots].astype(np.int32)
    since = table.run_s[slots]
    t = now_s[:, None]
    sign = np.sign(z).astype(np.int32)
    absz = np.abs(z)
    going = (side != 0) & (sign == np.sign(side)) & (absz >= rule.z_off)
    starting = ~going & (absz >= rule.z_on)
    new_side = np.where(going, side, np.where(starting, sign, 0))
    new_since = np.where(starting, t, since)
    lasted = (t - new_since).astype(np.float32) >= np.float32(rule.hold_s)
    away = slope_t * sign.astype(np.float32) >= np.float32(rule.min_slope_t)
    flag = going & (np.abs(side) == 1) & lasted & away
    new_side = np.where(flag, 2 * sign, new_side)
    keep = ~mask[:, None]
    new_side = np.where(keep, side, new_side)
    new_since = np.where(keep, since, new_since)
    table.run_side[slots] = new_side.astype(np.int8)
    table.run_s[slots] = new_since.astype(np.int32)
    flagged: npt.NDArray[np.bool_] = np.abs(new_side) == 2
    return flagged
