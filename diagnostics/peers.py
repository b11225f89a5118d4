"""Peer checks: a device's metrics set against those of comparable devices.

Place in the pipeline: for metrics no product file describes, the engine
(:class:`~diagnostics.engine.DiagnosticsEngine`) scores each device against its own
history on the detector core; a device born faulty takes its fault for its normal
there. So where a product model has :data:`PEER_MIN_DEVICES` comparable devices, each is
also compared with its peers every :data:`PEER_EVERY_S` of device time
(:func:`peer_outliers`), and :func:`check_peers` tells the policy which stood out at
:data:`PEER_CHECKS` checks in a row and which are back among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np

from diagnostics.detector import SlotLevels
from diagnostics.model import Contribution, Diagnosis

if TYPE_CHECKING:
    from diagnostics.modelstate import GenericMetrics
    from diagnostics.policy import DiagnosisPolicy

__all__ = [
    "PEER_CHECKS",
    "PEER_EVERY_S",
    "PEER_MIN_DEVICES",
    "PEER_Z",
    "check_peers",
    "peer_outliers",
]

#: Peer checks of metrics no file describes: how often (device time), from how many
#: comparable devices, how far (in the peers' spread) a device must stand, at how many
#: checks in a row, before a case opens; a device is back once under half that far.
PEER_EVERY_S: Final = 3_600.0
PEER_MIN_DEVICES: Final = 20
PEER_Z: Final = 6.0
PEER_CHECKS: Final = 2
_PEER_MIN_ROWS: Final = 100


def peer_outliers(
    levels: SlotLevels, names: Sequence[str], *, warmup_s: float = 0.0
) -> tuple[dict[int, tuple[Contribution, ...]], set[int], dict[int, int]]:
    """Slots whose metrics stand far from their peers', and slots back among them.

    Per metric, the slots compared are those past their warm-up (:data:`_PEER_MIN_ROWS`
    rows and ``warmup_s`` of their own time) where the metric has changed and does not
    switch between states (a switching metric's level says how it is used, not how it
    is). With at least :data:`PEER_MIN_DEVICES` of them, a slot's deviation is its slow
    level's distance from their median over the peers' spread: the larger of the
    median absolute deviation (x 1.4826) and the median of the slots' own long-run
    spreads, so that a fleet of near-identical devices does not make noise news.

    Returns:
        the slots with a metric :data:`PEER_Z` or more away (drivers, largest first),
        the slots compared whose metrics are all under half that, and per slot compared
        the most peers it had.
    """
    level, spread = levels.level, levels.spread
    elapsed = np.nan_to_num(levels.elapsed_s, nan=np.inf)
    warm = (levels.rows >= _PEER_MIN_ROWS) & (elapsed >= warmup_s)
    deviation = np.full(level.shape, np.nan)
    peers: dict[int, int] = {}
    for c in range(min(level.shape[1], len(names))):
        members = np.flatnonzero(
            warm & levels.scored[:, c] & ~levels.switches[:, c] & np.isfinite(level[:, c])
        )
        if members.size < PEER_MIN_DEVICES:
            continue
        values = level[members, c]
        center = float(np.median(values))
        mad = 1.4826 * float(np.median(np.abs(values - center)))
        scale = max(mad, float(np.median(spread[members, c])), 1e-12 * (1.0 + abs(center)))
        deviation[members, c] = (values - center) / scale
        for slot in members.tolist():
            peers[slot] = max(peers.get(slot, 0), int(members.size))
    far: dict[int, tuple[Contribution, ...]] = {}
    near: set[int] = set()
    for slot in peers:
        row = deviation[slot]
        size = np.abs(np.nan_to_num(row, nan=0.0))
        if size.max() >= PEER_Z:
            order = [int(c) for c in np.argsort(-size) if size[c] >= PEER_Z]
            total = float(size[order].sum())
            far[slot] = tuple(
                Contribution(names[c], (names[c],), round(float(row[c]), 3), size[c] / total)
                for c in order[:5]
            )
        elif size.max() < PEER_Z / 2:
            near.add(slot)
    return far, near, peers


def check_peers(
    policy: DiagnosisPolicy, model: str, generic: GenericMetrics, now_ms: int
) -> list[Diagnosis]:
    """Compare each device's metrics with its peers' (where enough are comparable)."""
    config = generic.table.config
    far, near, peers = peer_outliers(
        generic.table.levels(), generic.names, warmup_s=config.warmup_s
    )
    ids = {slot: device for device, slot in generic.slots.items()}
    runs = generic.peer_runs
    made: list[Diagnosis] = []
    for slot in sorted(runs.keys() - far.keys()):
        del runs[slot]
    for slot, drivers in sorted(far.items()):
        runs[slot] = runs.get(slot, 0) + 1
        if runs[slot] >= PEER_CHECKS:
            made += policy.on_peers(ids[slot], model, now_ms, drivers, peers[slot])
    for slot in sorted(near):
        made += policy.on_peers(ids[slot], model, now_ms, (), peers[slot])
    return made
