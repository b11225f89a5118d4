"""Per-device adaptive baseline (diagnostics, "Detect": each device against its own past).

For every device and feature, :class:`BaselineTable` keeps an exponentially weighted mean
and variance of the feature's *level* (from :class:`diagnostics.features.FeatureTable`)
over the device's healthy history. A feature's z-score is its level's distance from that
mean in units of the baseline spread (never below the feature's noise floor). Learning
runs on a time constant of days, and is frozen while the device is flagged, so a slow
drift is not learnt away. The score maps the largest z-score to ``[0, 1]``, higher =
more anomalous (STYLE.md rule 10).

A slow drift stops the baseline from learning at a moderate z, and may sit there for days
before its z is large enough to score: :meth:`BaselineTable.drift` catches it earlier. It
keeps, per feature, the run of updates in which the z-score stayed moderate on one side, and
flags the feature once such a run has lasted a sustained device time while its trend heads
away from the baseline, significantly (slope over its standard error). A daily cycle or a
cold spell breaks such a run or turns its trend; a fault keeps both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.features import FeatureSpec, FeatureTable
from diagnostics.kernels import assess_rows, learn_rows, trend_flags

__all__ = ["BaselineRows", "BaselineTable", "TrendRule", "z_to_score"]

F32 = npt.NDArray[np.float32]
_Z_HALF: Final = 6.0
_NO_Z: Final = np.zeros((0, 0), dtype=np.float32)
#: A feature whose recent mean z (memory ``_SIDE_DAYS``) is beyond this is not learnt: a
#: slow drift keeps its deviation on one side, a healthy level swings both ways.
_ONE_SIDED_Z: Final = 0.8
_SIDE_DAYS: Final = 1.0
_NO_COUNTS: Final = _NO_Z


def z_to_score(z: npt.NDArray[np.floating] | float, z_half: float = _Z_HALF) -> F32:
    """Map a non-negative z-score to ``[0, 1)``: ``z² / (z² + z_half²)`` (0.5 at ``z_half``)."""
    z2 = np.square(np.asarray(z, dtype=np.float32))
    return (z2 / (z2 + np.float32(z_half * z_half))).astype(np.float32)


@dataclass(frozen=True, slots=True)
class TrendRule:
    """When a run of moderate deviations counts as a drift (see :meth:`BaselineTable.drift`).

    Attributes:
        z_on: ``|z|`` that starts a run.
        z_off: ``|z|`` below which a run ends.
        hold_s: device time a run must last before it is flagged.
        min_slope_t: trend significance (slope over its standard error) away from the
            baseline needed to flag it.
    """

    z_on: float = 2.0
    z_off: float = 1.5
    hold_s: float = 18 * 3_600.0
    min_slope_t: float = 1.0


@dataclass(frozen=True, slots=True)
class BaselineRows:
    """Readings judged against their devices' baselines (see :meth:`BaselineTable.assess`).

    Attributes:
        level: the judged levels: the given ones, ``NaN`` where the feature has had fewer
            than its ``min_count`` updates (too few to say anything).
        mean: the baseline means, gathered.
        warm: which baselines are trusted (see :meth:`BaselineTable.assess`).
        warm_features: per row, how many of its features' baselines are warm.
        z: signed z-scores of the judged levels (0 where not warm).
        score: each row's score from its largest ``|z|`` (see :func:`z_to_score`).
    """

    level: F32
    mean: F32
    warm: npt.NDArray[np.bool_]
    warm_features: npt.NDArray[np.int32]
    z: F32
    score: F32


class BaselineTable:
    """Healthy baselines of all devices of one product model (structure of arrays).

    Args:
        spec: the product model's features.
        tau_days: memory of the baseline once warm (days of history).
        freeze_z: a feature deviating more than this is not learnt.
        warmup_s: device time a feature's baseline must cover before it is trusted.
        capacity: initial number of device slots.
        trend_features: which features :meth:`drift` tracks (default: all); runs are
            kept for these only.

    Attributes:
        trend_columns: the positions of the features :meth:`drift` tracks.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        tau_days: float = 10.0,
        freeze_z: float = 1.5,
        warmup_s: float = 86_400.0,
        capacity: int = 64,
        trend_features: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        n = len(spec.features)
        tracked = np.ones(n, np.bool_) if trend_features is None else trend_features
        self.trend_columns: npt.NDArray[np.intp] = np.flatnonzero(tracked)
        self._all_tracked = len(self.trend_columns) == n
        k = len(self.trend_columns)
        self.tau_days = tau_days
        self.freeze_z = freeze_z
        self.warmup_s = warmup_s
        # variance kept by a normal truncated at ±c: 1 - 2c·φ(c) / (2Φ(c) - 1)
        c = freeze_z
        pdf = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
        self._kept_var = 1.0 - 2.0 * c * pdf / math.erf(c / math.sqrt(2.0))
        self._inflate = np.float32(1.0 / self._kept_var)
        self.floor2 = np.array([f.floor**2 for f in spec.features], dtype=np.float32)
        self.min_count = np.array([f.min_count for f in spec.features], dtype=np.float32)
        self.mean: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.var: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.count: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.learnt_s: npt.NDArray[np.int32] = np.zeros((capacity, n), dtype=np.int32)
        # the recent mean of each feature's signed z (about a day's memory): a healthy
        # level swings both ways around its baseline, a drift keeps to one side
        self.side_z: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.first_s: npt.NDArray[np.int32] = np.zeros((capacity, n), dtype=np.int32)
        # the current one-sided run of moderate z: when it began and its side (0 = none,
        # +-1 = running, +-2 = flagged as a drift)
        self.run_s: npt.NDArray[np.int32] = np.zeros((capacity, k), dtype=np.int32)
        self.run_side: npt.NDArray[np.int8] = np.zeros((capacity, k), dtype=np.int8)

    @property
    def capacity(self) -> int:
        """The number of slots allocated."""
        return int(self.mean.shape[0])

    def ensure(self, slots: int) -> None:
        """Grow the arrays to hold at least ``slots`` slots."""
        cap = self.capacity
        if slots <= cap:
            return
        new = max(slots, 2 * cap)
        for name in ("mean", "var", "count", "learnt_s", "first_s", "side_z", "run_s", "run_side"):
            old = getattr(self, name)
            grown = np.zeros((new, *old.shape[1:]), dtype=old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)

    def forget(self, slot: int) -> None:
        """Drop what ``slot``'s baseline has learnt: it warms up again from its next readings."""
        for name in ("mean", "var", "count", "learnt_s", "first_s", "side_z", "run_s", "run_side"):
            getattr(self, name)[slot] = 0

    def assess(
        self,
        slots: npt.NDArray[np.intp],
        level: F32,
        now_s: npt.NDArray[np.int32],
        updates: F32 | None = None,
    ) -> BaselineRows:
        """Judge ``level`` rows against the slots' baselines, gathering them once.

        Warm = at least the feature's ``min_count`` updates learnt, the first of them at
        least ``warmup_s`` of device time ago; z is the level's distance from the mean in
        units of the spread (never below the noise floor), 0 where not warm; the score maps
        the largest ``|z|`` through :func:`z_to_score`. One compiled pass
        (:func:`diagnostics.kernels.assess_rows`). With ``updates`` (the
        feature table's update counts of the same rows), a level updated fewer than its
        feature's ``min_count`` times is judged as missing.
        """
        judged, mean, warm, warm_features, z, score = assess_rows(
            slots,
            level,
            _NO_COUNTS if updates is None else updates,
            updates is not None,
            now_s,
            self.count,
            self.first_s,
            self.mean,
            self.var,
            self.min_count,
            self.floor2,
            self.warmup_s,
            _Z_HALF,
        )
        return BaselineRows(judged, mean, warm, warm_features, z, score)

    def learn(
        self,
        slots: npt.NDArray[np.intp],
        level: F32,
        now_s: npt.NDArray[np.int32],
        mask: npt.NDArray[np.bool_],
        z: F32 | None = None,
        trend: F32 | None = None,
    ) -> None:
        """Fold ``level`` rows into the baselines of the rows where ``mask`` holds.

        With ``trend`` (the feature table's trends of the same rows), a feature whose
        recent deviation keeps to one side while its level still heads away is not
        learnt: a slow drift must not become the device's normal, while a step that has
        settled (a new firmware, a new place) is learnt.

        A feature whose deviation ``z`` is already beyond ``freeze_z`` is not learnt even
        on an unflagged device: a drift must not teach the baseline its own spread.

        A running mean while a feature warms up, then an exponentially weighted one whose
        weight follows the time since the last update (``tau_days``), so features that
        update often and rarely forget at the same pace.
        """
        learn_rows(
            slots,
            level,
            now_s,
            mask,
            _NO_Z if z is None else z,
            z is not None,
            _NO_Z if trend is None else trend,
            self.count,
            self.first_s,
            self.mean,
            self.var,
            self.learnt_s,
            self.side_z,
            self.min_count,
            self.freeze_z,
            _ONE_SIDED_Z,
            _SIDE_DAYS,
            float(self._inflate),
            self.tau_days,
        )

    def drift(
        self,
        slots: npt.NDArray[np.intp],
        z: F32,
        features: FeatureTable,
        now_s: npt.NDArray[np.int32],
        mask: npt.NDArray[np.bool_],
        rule: TrendRule,
    ) -> npt.NDArray[np.bool_]:
        """Track runs of moderate z; return which tracked features drift away.

        A run starts when ``|z|`` reaches ``rule.z_on`` and lasts while ``z`` stays beyond
        ``rule.z_off`` on the same side. A run is flagged once it has lasted ``rule.hold_s``
        of device time with its trend's significance (slope over its standard error, from
        ``features``) heading away from the baseline by at least ``rule.min_slope_t``; it
        stays flagged until the run ends. Only rows where ``mask`` holds change the state.
        One compiled pass (:func:`diagnostics.kernels.trend_flags`).

        Args:
            slots: device slots (distinct).
            z: every feature's signed z-score, one row per slot.
            features: the feature table of the same slots (trend and spread).
            now_s: device time of each row.
            mask: rows that may change the state (live readings).
            rule: when a run starts, ends and is flagged.

        Returns:
            one column per tracked feature (see :attr:`trend_columns`).
        """
        flags: npt.NDArray[np.bool_] = trend_flags(
            slots,
            z,
            self.trend_columns,
            now_s,
            mask,
            self.run_side,
            self.run_s,
            features.trend,
            features.spread,
            features.alpha,
            features.floor2,
            features.trend_tau_days,
            rule.z_on,
            rule.z_off,
            rule.hold_s,
            rule.min_slope_t,
        )
        return flags

    def state_bytes(self) -> int:
        """Bytes of numpy state per device slot."""
        return int(self.mean[0].nbytes + self.var[0].nbytes + self.count[0].nbytes) + int(
            self.learnt_s[0].nbytes
            + self.side_z[0].nbytes
            + self.first_s[0].nbytes
            + self.run_s[0].nbytes
            + self.run_side[0].nbytes
        )
