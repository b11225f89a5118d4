"""Compiled inner loops of the diagnostics engine (feature, baseline and trend updates).

The engine scores one *round* at a time: every device of one product model at most once,
often only a few dozen devices. Written as whole-array numpy, a round costs some sixty
small array operations whatever its size, which is most of the time of a small round.
These kernels do the same arithmetic row by row in one compiled call (numba, compiled
once and cached next to this file), in float32 like the tables they update. They are the
bodies of :meth:`diagnostics.features.FeatureTable.advance`,
:meth:`diagnostics.baseline.BaselineTable.assess`, :meth:`~diagnostics.baseline.BaselineTable.learn`
and :meth:`~diagnostics.baseline.BaselineTable.drift`, and of the policy's fault naming;
see those for the meaning. The tests hold each loop to the same arithmetic written as
whole-array numpy.

Arguments are numpy arrays of the tables' own dtypes; every slot in one call is distinct.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

__all__ = [
    "advance_rows",
    "assess_rows",
    "evidence_rows",
    "feature_rows",
    "learn_rows",
    "round_masks",
    "trend_flags",
]

_LOG = logging.getLogger(__name__)
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _compiled(fn: _Fn) -> _Fn:
    try:
        jitted = numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:
        # no writable place for the cache (read-only install, no home): compile each start
        _LOG.info("compiled diagnostics loops not cached: no writable cache directory")
        jitted = numba.njit(cache=False, nogil=True, error_model="numpy")(fn)
    return cast("_Fn", jitted)


@_compiled
def advance_rows(
    x: Any,
    repeat_col: int,
    run_full: float,
    slots: Any,
    ts_ms: Any,
    epoch_ms: int,
    level: Any,
    spread: Any,
    trend: Any,
    count: Any,
    updated_s: Any,
    last_primary: Any,
    run: Any,
    last_ts_ms: Any,
    alpha: Any,
    keep: Any,
    trend_tau_days: float,
) -> tuple[Any, Any, Any, Any]:
    """Fold raw features ``x`` into the slots; return levels, counts, device times, late.

    Column ``repeat_col`` (if any) comes in holding the main sensor's value and leaves
    holding the repeat share.
    """
    n, width = x.shape
    out_level = np.empty((n, width), np.float32)
    out_count = np.empty((n, width), np.float32)
    now_s = np.empty(n, np.int32)
    late = np.empty(n, np.bool_)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    day_s = np.float32(86_400.0)
    max_days = np.float32(30.0)
    tiny = np.float32(1e-6)
    tau = np.float32(trend_tau_days)
    full = np.float32(run_full)
    for i in range(n):
        s = slots[i]
        t = ts_ms[i]
        stale = t <= last_ts_ms[s]
        late[i] = stale
        now = np.int32((t - epoch_ms) // 1000)
        now_s[i] = now
        if repeat_col >= 0:
            value = x[i, repeat_col]  # the main sensor's value, until it becomes the share
            previous = last_primary[s]
            length = run[s] + one if value == previous else zero
            if math.isnan(value) or math.isnan(previous):
                x[i, repeat_col] = np.nan
            else:
                x[i, repeat_col] = min(length / full, one)
            if not stale:
                run[s] = length
                if not math.isnan(value):
                    last_primary[s] = value
        for j in range(width):
            old = level[s, j]
            seen = count[s, j]
            value = x[i, j]
            if stale or math.isnan(value):
                out_level[i, j] = old
                out_count[i, j] = seen
                continue
            seen += one
            count[s, j] = seen
            out_count[i, j] = seen
            if math.isnan(old):
                level[s, j] = value
                out_level[i, j] = value
                updated_s[s, j] = now
                continue
            dt_days = np.float32(now - updated_s[s, j]) / day_s
            dt_days = min(max(dt_days, zero), max_days)
            a = alpha[j]
            error = value - old
            new = old + a * error
            weight = min(dt_days / tau, one)
            step = (new - old) / max(dt_days, tiny)
            trend[s, j] = trend[s, j] + weight * (step - trend[s, j])
            spread[s, j] = keep[j] * (spread[s, j] + a * error * error)
            level[s, j] = new
            out_level[i, j] = new
            updated_s[s, j] = now
        if not stale:
            last_ts_ms[s] = t
    return out_level, out_count, now_s, late


@_compiled
def assess_rows(
    slots: Any,
    level: Any,
    updates: Any,
    gate: bool,
    now_s: Any,
    count: Any,
    first_s: Any,
    mean: Any,
    var: Any,
    min_count: Any,
    floor2: Any,
    warmup_s: float,
    z_half: float,
) -> tuple[Any, Any, Any, Any, Any, Any]:
    """Judge ``level`` rows against the slots' baselines; see ``BaselineTable.assess``."""
    n, width = level.shape
    judged = np.empty((n, width), np.float32)
    g_mean = np.empty((n, width), np.float32)
    warm = np.empty((n, width), np.bool_)
    warm_features = np.zeros(n, np.int32)
    z = np.empty((n, width), np.float32)
    score = np.empty(n, np.float32)
    half2 = np.float32(z_half * z_half)
    for i in range(n):
        s = slots[i]
        peak = np.float32(0.0)
        for j in range(width):
            value = level[i, j]
            if gate and updates[i, j] < min_count[j]:
                value = np.float32(np.nan)
            judged[i, j] = value
            m = mean[s, j]
            g_mean[i, j] = m
            ok = count[s, j] >= min_count[j] and (now_s[i] - first_s[s, j]) >= warmup_s
            warm[i, j] = ok
            if ok:
                warm_features[i] += 1
            if ok and not math.isnan(value):
                zz = (value - m) / np.sqrt(var[s, j] + floor2[j])
                z[i, j] = zz
                peak = max(peak, abs(zz))
            else:
                z[i, j] = np.float32(0.0)
        p2 = peak * peak
        score[i] = p2 / (p2 + half2)
    return judged, g_mean, warm, warm_features, z, score


@_compiled
def learn_rows(
    slots: Any,
    level: Any,
    now_s: Any,
    mask: Any,
    z: Any,
    gate: bool,
    trend: Any,
    count: Any,
    first_s: Any,
    mean: Any,
    var: Any,
    learnt_s: Any,
    side_z: Any,
    min_count: Any,
    freeze_z: float,
    one_sided_z: float,
    side_days: float,
    inflate: float,
    tau_days: float,
) -> None:
    """Fold ``level`` rows into the baselines where ``mask``; see ``BaselineTable.learn``."""
    n, width = level.shape
    one = np.float32(1.0)
    zero = np.float32(0.0)
    day_s = np.float32(86_400.0)
    max_days = np.float32(30.0)
    tau = np.float32(tau_days)
    widen = np.float32(inflate)
    side_tau = np.float32(side_days)
    with_trend = trend.shape[0] == n
    for i in range(n):
        if not mask[i]:
            continue
        s = slots[i]
        t = now_s[i]
        for j in range(width):
            value = level[i, j]
            if math.isnan(value):
                continue
            factor = one
            c0 = count[s, j]
            dt_days = np.float32(t - learnt_s[s, j]) / day_s
            dt_days = min(max(dt_days, zero), max_days)
            if gate:
                zz = z[i, j]
                if zz != zero:
                    # a deviation that keeps to one side is a drift, not the device's habit
                    w = one - np.float32(np.exp(-dt_days / side_tau))
                    side = side_z[s, j] + w * (zz - side_z[s, j])
                    side_z[s, j] = side
                    # a step that has settled (its level no longer moving away) is
                    # learnt: the device's new normal; a drift still heading away is not
                    if abs(side) >= one_sided_z and (with_trend and trend[i, j] * side > zero):
                        continue
                if abs(zz) >= freeze_z:
                    continue
                if c0 >= min_count[j] and zz != zero:
                    factor = widen
            if c0 == zero:
                first_s[s, j] = t
            c = c0 + one
            ew = one - np.float32(np.exp(-dt_days / tau))
            weight = max(one / max(c, one), ew)
            delta = value - mean[s, j]
            mean[s, j] = mean[s, j] + weight * delta
            var[s, j] = (one - weight) * (var[s, j] + weight * delta * delta * factor)
            count[s, j] = c
            learnt_s[s, j] = t


@_compiled
def trend_flags(
    slots: Any,
    z: Any,
    columns: Any,
    now_s: Any,
    mask: Any,
    run_side: Any,
    run_s: Any,
    trend: Any,
    spread: Any,
    alpha: Any,
    floor2: Any,
    trend_tau_days: float,
    z_on: float,
    z_off: float,
    hold_s: float,
    min_slope_t: float,
) -> Any:
    """Track the runs of moderate z of the tracked ``columns``; see ``BaselineTable.drift``.

    The trend's significance is computed here from the feature table's ``trend``,
    ``spread``, ``alpha`` and ``floor2``: the trend over its standard error. Returns one flag
    column per tracked feature.
    """
    n = z.shape[0]
    k = columns.shape[0]
    flags = np.zeros((n, k), np.bool_)
    two = np.float32(2.0)
    tau = np.float32(trend_tau_days)
    for i in range(n):
        s = slots[i]
        t = now_s[i]
        for c in range(k):
            col = columns[c]
            zz = z[i, col]
            side = np.int32(run_side[s, c])
            since = run_s[s, c]
            sign = np.int32(0)
            if zz > 0:
                sign = np.int32(1)
            elif zz < 0:
                sign = np.int32(-1)
            absz = abs(zz)
            side_sign = np.int32(1) if side > 0 else np.int32(-1)
            going = side != 0 and sign == side_sign and absz >= z_off
            starting = not going and absz >= z_on
            new_side = side if going else (sign if starting else np.int32(0))
            new_since = t if starting else since
            if going and abs(side) == 1 and np.float32(t - new_since) >= np.float32(hold_s):
                a = alpha[col]
                shrink = a / (two - a)
                noise2 = two * spread[s, col] * shrink + floor2[col]
                slope_t = trend[s, col] / (np.sqrt(noise2) / tau)
                if slope_t * np.float32(sign) >= np.float32(min_slope_t):
                    new_side = 2 * sign
            if mask[i]:
                run_side[s, c] = new_side
                run_s[s, c] = new_since
            else:
                new_side = side
            flags[i, c] = abs(new_side) == 2
    return flags


@_compiled
def evidence_rows(
    z: Any,
    at: Any,
    direction: Any,
    two_way: Any,
    weight: Any,
    noise_z: float,
    explain_z: float,
) -> tuple[Any, Any, Any, Any, Any]:
    """Score every fault signature against each row of ``z``; see ``_Layout.evidence_rows``.

    Sums run term by term in signature order, in float64, as the policy's own
    ``name_fault`` adds them, so the figures are the same to the last bit. ``at`` holds
    each signature's feature positions, padded with the position one past the last
    feature (a value of 0).
    """
    rows, width = z.shape
    faults, terms = at.shape
    best = np.full(rows, -1, np.int64)
    best_evidence = np.zeros(rows, np.float64)
    totals = np.zeros(rows, np.float64)
    moved = np.zeros(rows, np.bool_)
    explained = np.zeros(rows, np.bool_)
    for i in range(rows):
        total = 0.0
        for j in range(width):
            size = abs(np.float64(z[i, j]))
            if size >= noise_z:
                total += size
                moved[i] = True
            if size >= explain_z:
                explained[i] = True
        totals[i] = total
        top = 0.0
        top_at = 0
        for f in range(faults):
            evidence = 0.0
            for k in range(terms):
                col = at[f, k]
                value = 0.0 if col >= width else np.float64(z[i, col])
                toward = abs(value) if two_way[f, k] else direction[f, k] * value
                if toward > 0.0:
                    evidence += weight[f, k] * toward
                elif math.isnan(toward):
                    evidence = math.nan  # a missing deviation voids the signature
            if not evidence > 0.0:
                evidence = 0.0
            if f == 0 or evidence > top:
                top = evidence
                top_at = f
        if faults > 0 and top > 0.0:
            best[i] = top_at
            best_evidence[i] = top
    return best, best_evidence, totals, moved, explained


@_compiled
def round_masks(
    baseline_score: Any,
    fleet_score: Any,
    cold: Any,
    flags: Any,
    watched: Any,
    late: Any,
    open_threshold: float,
    close_threshold: float,
) -> tuple[Any, Any, Any, Any]:
    """Combine a round's scores and say which rows learn and which the policy judges.

    The fleet model's score counts for cold rows (``fleet_score`` may be empty: no fleet
    model); a drifting row (any of its ``flags``) scores at least ``open_threshold``.
    A row learns while its own baseline sees nothing amiss and it is cold, or unwatched
    and quiet altogether; the policy judges watched rows and rows at ``close_threshold``
    or above. Late rows do neither.

    Returns:
        the combined scores, which rows drift, which learn and which are judged.
    """
    n = baseline_score.shape[0]
    with_fleet = fleet_score.shape[0] == n
    score = np.empty(n, np.float32)
    drift = np.zeros(n, np.bool_)
    learn = np.zeros(n, np.bool_)
    judge = np.zeros(n, np.bool_)
    floor = np.float32(open_threshold)
    for i in range(n):
        own = baseline_score[i]
        value = own
        if with_fleet and cold[i] and fleet_score[i] > value:
            value = fleet_score[i]
        for c in range(flags.shape[1]):
            if flags[i, c]:
                drift[i] = True
        if drift[i] and value < floor:
            value = floor
        score[i] = value
        if late[i]:
            continue
        quiet = own < close_threshold
        learn[i] = quiet and (cold[i] or (not watched[i] and value < close_threshold))
        judge[i] = watched[i] or value >= close_threshold
    return score, drift, learn, judge


# opcodes of feature programs (see diagnostics.features.FeatureProgram)
OP_METRIC = 0
OP_TRUTH = 1
OP_CONST = 2
OP_ADD = 3
OP_SUB = 4
OP_MUL = 5
OP_DIV = 6
OP_POW = 7
OP_NEG = 8
OP_LT = 9
OP_LE = 10
OP_GT = 11
OP_GE = 12
OP_EQ = 13
OP_NE = 14
OP_AND = 15
OP_OR = 16
OP_NOT = 17
OP_STATUS = 18
OP_ABS = 19
OP_SQRT = 20
OP_EXP = 21
OP_LOG = 22
OP_MIN = 23
OP_MAX = 24
OP_OUT = 25
OP_OUT_SHARE = 26


@_compiled
def feature_rows(code: Any, consts: Any, x: Any, status: Any, registers: int, width: int) -> Any:
    """Run a feature program over every row: the raw features, ``NaN`` where none.

    ``code`` holds one instruction per row of ``(op, dst, a, b)``; registers are float64
    (conditions are 1.0 or 0.0); ``x`` holds the metric columns (``NaN``: not sent) and
    ``status`` each reading's status word as a code (-1: none known). IEEE arithmetic as
    numpy's: a division by zero, an overflow or a square root of a negative number gives
    inf or NaN, never an error; ``min``/``max`` give NaN when either side is NaN.
    """
    n = x.shape[0]
    out = np.empty((n, width), np.float64)
    reg = np.zeros(registers, np.float64)
    nan = np.float64(np.nan)
    for i in range(n):
        for k in range(code.shape[0]):
            op = code[k, 0]
            d = code[k, 1]
            a = code[k, 2]
            b = code[k, 3]
            if op == OP_METRIC:
                reg[d] = x[i, a]
            elif op == OP_TRUTH:
                v = x[i, a]
                reg[d] = 1.0 if (v == v and v != 0.0) else 0.0
            elif op == OP_CONST:
                reg[d] = consts[a]
            elif op == OP_ADD:
                reg[d] = reg[a] + reg[b]
            elif op == OP_SUB:
                reg[d] = reg[a] - reg[b]
            elif op == OP_MUL:
                reg[d] = reg[a] * reg[b]
            elif op == OP_DIV:
                reg[d] = reg[a] / reg[b]
            elif op == OP_POW:
                reg[d] = reg[a] ** consts[b]
            elif op == OP_NEG:
                reg[d] = -reg[a]
            elif op == OP_LT:
                reg[d] = 1.0 if reg[a] < reg[b] else 0.0
            elif op == OP_LE:
                reg[d] = 1.0 if reg[a] <= reg[b] else 0.0
            elif op == OP_GT:
                reg[d] = 1.0 if reg[a] > reg[b] else 0.0
            elif op == OP_GE:
                reg[d] = 1.0 if reg[a] >= reg[b] else 0.0
            elif op == OP_EQ:
                reg[d] = 1.0 if reg[a] == reg[b] else 0.0
            elif op == OP_NE:
                reg[d] = 1.0 if reg[a] != reg[b] else 0.0
            elif op == OP_AND:
                reg[d] = 1.0 if (reg[a] != 0.0 and reg[b] != 0.0) else 0.0
            elif op == OP_OR:
                reg[d] = 1.0 if (reg[a] != 0.0 or reg[b] != 0.0) else 0.0
            elif op == OP_NOT:
                reg[d] = 0.0 if reg[a] != 0.0 else 1.0
            elif op == OP_STATUS:
                reg[d] = 1.0 if status[i] == a else 0.0
            elif op == OP_ABS:
                reg[d] = abs(reg[a])
            elif op == OP_SQRT:
                reg[d] = np.sqrt(reg[a])
            elif op == OP_EXP:
                reg[d] = np.exp(reg[a])
            elif op == OP_LOG:
                reg[d] = np.log(reg[a])
            elif op == OP_MIN:
                va = reg[a]
                vb = reg[b]
                reg[d] = nan if (va != va or vb != vb) else (vb if vb < va else va)
            elif op == OP_MAX:
                va = reg[a]
                vb = reg[b]
                reg[d] = nan if (va != va or vb != vb) else (vb if vb > va else va)
            elif op == OP_OUT:
                out[i, d] = nan if (b >= 0 and reg[b] == 0.0) else reg[a]
            elif op == OP_OUT_SHARE:
                if b >= 0 and reg[b] == 0.0:
                    out[i, d] = nan
                else:
                    out[i, d] = 1.0 if reg[a] != 0.0 else 0.0
    return out
