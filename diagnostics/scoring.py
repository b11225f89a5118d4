"""How a round's scores reach the diagnosis policy, on both scoring paths.

Place in the pipeline: :class:`~diagnostics.engine.DiagnosticsEngine` scores a round of
one product model's readings and hands the verdicts to its
:class:`~diagnostics.policy.DiagnosisPolicy` here. :func:`detect` steps the detector
core with the metrics no product file describes, tells the policy of every row whose
alert is up (or has just fallen) and runs the peer checks when they are due;
:func:`judge` gives the policy the product features' deviations of the rows that are
watched or scoring high, each from the stronger witness: the device's own baseline, or
the product model's fleet model.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.baseline import BaselineRows
from diagnostics.csvdetect import surprise
from diagnostics.model import Diagnosis
from diagnostics.modelstate import ModelState
from diagnostics.peers import PEER_EVERY_S, check_peers
from diagnostics.policy import DiagnosisPolicy
from wire.protocol import Reading

__all__ = ["detect", "judge"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
_count: Final = np.count_nonzero  # much cheaper than ``.any()`` on the small rows here


def detect(
    policy: DiagnosisPolicy,
    state: ModelState,
    readings: list[Reading],
    order: list[int],
    late: npt.NDArray[np.bool_] | None,
    caused: list[tuple[int, Diagnosis]],
) -> tuple[npt.NDArray[np.bool_], F64]:
    """Step the model's detector table with ``readings`` and hand its verdicts on.

    Returns:
        which readings were late (scored, nothing learnt) and each reading's score
        (``fixloop detect``'s scale: 0.5 at the core's operating point).
    """
    generic = state.generic
    assert generic is not None
    device_ids = [r.device_id for r in readings]
    ts_ms = np.array([r.ts_ms for r in readings], dtype=np.int64)
    slots = generic.slots_of(device_ids)
    result, stale = generic.step(slots, ts_ms, generic.values(readings), late)
    score = surprise(result.score, generic.table.config.alpha)
    # the policy hears of the rows whose alert is up, or was up at the slot's last row
    was_up = generic.was_up
    heard = (result.active | was_up[slots]) & ~stale
    if _count(heard):
        picked = np.flatnonzero(heard)
        rows: list[int] = picked.tolist()
        made = policy.on_detections(
            [device_ids[k] for k in rows], state.spec.model, generic.names,
            ts_ms[picked].tolist(), score[picked], result.event[picked],
            result.active[picked], result.deviation[picked],
        )  # fmt: skip
        caused += [(order[rows[k]], d) for k, d in made]
    live = ~stale
    was_up[slots[live]] = result.active[live]
    if _count(live):
        now_ms = int(ts_ms[live].max())
        if now_ms - generic.peer_at_ms >= PEER_EVERY_S * 1000:
            generic.peer_at_ms = now_ms
            peered = check_peers(policy, state.spec.model, generic, now_ms)
            caused += [(max(order), d) for d in peered]
    return stale, score


def judge(
    policy: DiagnosisPolicy,
    state: ModelState,
    readings: list[Reading],
    order: list[int],
    slots: npt.NDArray[np.intp],
    picked: npt.NDArray[np.intp],
    rows: BaselineRows,
    level: F32,
    score: F32,
    drifting: npt.NDArray[np.bool_] | None,
    caused: list[tuple[int, Diagnosis]],
) -> None:
    """Hand the ``picked`` rows' deviations to the policy (watched or scoring high)."""
    bz = rows.z[picked]
    mean = rows.mean[picked]
    level = level[picked]
    fleet = state.fleet
    if fleet is not None:
        # the fleet model knows the product's own features; the rest have no peers
        width = len(fleet.features)
        fz = np.zeros_like(bz)
        fz[:, :width] = fleet.standardize(level[:, :width])
        center = np.full(bz.shape[1], np.nan, dtype=np.float32)
        center[:width] = fleet.center
        # per feature the stronger witness: the device's own baseline, or its peers
        z = np.where(np.abs(bz) >= np.abs(fz), bz, fz)
        reference = np.where(rows.warm[picked], mean, center)
    else:
        z, reference = bz, mean
    change = level - reference
    members = picked.tolist()
    made, watched = policy.on_scores(
        [readings[i].device_id for i in members],
        state.spec,
        [readings[i].ts_ms for i in members],
        score[picked],
        z,
        change,
        None if drifting is None else drifting[picked],
    )
    if made:
        caused += [(order[members[k]], d) for k, d in made]
    state.watched[slots[picked]] = watched
