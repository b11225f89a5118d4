"""Diagnosis policy (diagnostics, "Decide": from scores and device codes to a diagnosis).

Scorers only score (higher = more anomalous, STYLE.md rule 10); :class:`DiagnosisPolicy`
decides. It names the fault behind an anomaly from the catalog's signatures (which
features moved which way), merges that with the device's own self-diagnosis (error and
self-test codes, watchdog reboots), and keeps at most one open :class:`Diagnosis` per
device and fault:

* **hysteresis**: a model-based diagnosis opens after ``open_after`` updates in a row at or
  above ``open_threshold`` and closes after ``close_after`` updates in a row below
  ``close_threshold``; a device code opens one at once and it closes after the fault's
  quiet time without new codes (or on a boot that clears the fault, e.g. a firmware update);
* **no storms**: ``open`` and ``closed`` are always sent; an ``update`` only when something
  changed materially since the last one *sent* (confidence by ``confidence_step``, the
  predicted failure time by ``ttf_step`` of the time left, the remedies or the source), or
  at most every ``update_every_s`` of device time; a device has at most one model-based
  diagnosis, revised (closed and reopened under the new name) only after ``revise_after``
  updates of a clearly better hypothesis;
* **time**: every timestamp is the device's own (``ts_ms``); the engine keeps late,
  out-of-order data away from here.

The engine hands a round's readings over at once (:meth:`DiagnosisPolicy.on_scores`): the
faults are named for all of them together, and a reading that changes nothing worth sending
builds no :class:`Diagnosis` (an open case keeps its latest fields and builds the record
only when it is sent or read).

Devices scored by the detector core (models without a product file, and the metrics a file
does not list) come through :meth:`DiagnosisPolicy.on_detections`: the core's alert
*event* (its rising edge) starts an alert, which opens the generic ``unusual_behaviour``
diagnosis once it has lasted ``open_after_s`` of device time with ``open_after`` readings
at or above ``open_threshold`` and a metric ``min_driver_z`` away (a burst, or a small
bias no single metric explains, is not a fault); the diagnosis follows the alert and
closes when the core re-arms (its ``active`` falls). Its evidence: which metrics, how
far (signed deviations at the alert's strongest reading), since when.

Time to failure comes from a learnt remaining-life model of the product model and fault
when one is given (:class:`LearntLifetimes`, learnt from recorded failures), else from the
trend of the fault's health indicator (:class:`~diagnostics.predictor.TrendPredictor`).

Naming faults lives in :mod:`diagnostics.naming`, the per-device records in
:mod:`diagnostics.tracking`. This module stays whole (about 900 lines) because
:class:`DiagnosisPolicy` is one state machine: its model, detector, peer and device-code
paths open, revise and close the same per-device cases under the same hysteresis and
storm rules, and splitting it would spread one set of transitions over several files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from diagnostics.baseline import TrendRule
from diagnostics.catalog import CATALOG, FaultEntry, ModelCatalog
from diagnostics.features import FeatureSpec
from diagnostics.model import Contribution, Diagnosis
from diagnostics.naming import (
    _NOISE_Z,
    Hypothesis,
    _deviation_drivers,
    _Layout,
    _moved,
    _Named,
)
from diagnostics.predictor import TimeToFailure, TrendPredictor, progress_of
from diagnostics.tracking import Source, _Alert, _Case, _DeviceState
from wire.protocol import Event, ms_to_datetime

__all__ = ["GENERIC_FAULT", "DiagnosisPolicy", "Hypothesis", "LearntLifetimes", "PolicyConfig"]

_LOG = logging.getLogger(__name__)
UNKNOWN: Final = "unknown"
#: The fault a detector alert opens (the generic product's).
GENERIC_FAULT: Final = "unusual_behaviour"


class LearntLifetimes(Protocol):
    """Remaining life learnt from recorded failures, per product model and fault."""

    def predict(self, device_id: str, model: str, fault: str, ts_ms: int) -> TimeToFailure | None:
        """Return the device's time to failure as of ``ts_ms``, or None (nothing learnt)."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Thresholds of the diagnosis policy.

    Attributes:
        open_threshold: score at or above which an update counts toward opening.
        close_threshold: score below which an update counts toward closing (and below
            which the device's baseline may learn).
        open_after: updates in a row at or above ``open_threshold`` to open.
        open_after_s: device time those updates must span for a model-based diagnosis
            (sustained evidence: a burst of a few readings is not a fault).
        close_after: updates in a row below ``close_threshold`` to close.
        min_evidence: signature evidence (sum of weighted z) needed to name a fault.
        min_driver_z: a model-based diagnosis opens only when a feature deviates this much
            (a score no single feature explains names nothing to fix).
        revise_after: updates in a row of a clearly better hypothesis to revise one.
        update_every_s: longest time between two updates of an open diagnosis.
        confidence_step: confidence change that is worth an update.
        ttf_step: change of the predicted time to failure (p50), as a share of the time
            left that the last sent prediction implies, that is worth an update.
        trend_z: baseline ``|z|`` from which a feature's drift is watched (the trend
            trigger: a slow fault sits at a moderate z for days before it scores).
        trend_z_off: ``|z|`` below which a watched drift is dropped.
        trend_hold_s: device time a drift must stay beyond ``trend_z`` on one side before
            it counts (daily cycles and weather swing back within it).
        trend_min_t: trend significance (slope over its standard error) heading away from
            the baseline that a drift needs to count.
    """

    open_threshold: float = 0.5
    close_threshold: float = 0.2
    open_after: int = 3
    open_after_s: float = 1_800.0
    close_after: int = 60
    min_evidence: float = 4.0
    min_driver_z: float = 3.0
    revise_after: int = 10
    update_every_s: float = 12 * 3_600.0
    confidence_step: float = 0.1
    ttf_step: float = 0.2
    trend_z: float = 2.0
    trend_z_off: float = 1.5
    trend_hold_s: float = 18 * 3_600.0
    trend_min_t: float = 1.0

    @property
    def trend_rule(self) -> TrendRule:
        """The trend trigger's settings, for :meth:`BaselineTable.drift`."""
        return TrendRule(self.trend_z, self.trend_z_off, self.trend_hold_s, self.trend_min_t)


class DiagnosisPolicy:
    """Turns scores and self-diagnosis into :class:`Diagnosis` changes.

    Args:
        config: thresholds.
        catalog: the fault catalog per product model.
    """

    def __init__(
        self,
        config: PolicyConfig | None = None,
        catalog: Mapping[str, ModelCatalog] | None = None,
    ) -> None:
        self.config = config or PolicyConfig()
        self.catalog = CATALOG if catalog is None else catalog
        self.predictor = TrendPredictor()
        #: remaining life learnt from recorded failures, preferred to the trend when it
        #: knows the product model and fault
        self.lifetimes: LearntLifetimes | None = None
        self._devices: dict[str, _DeviceState] = {}
        self._layouts: dict[str, _Layout] = {}
        self._alerts: dict[str, _Alert] = {}
        #: generic cases of devices far from their peers (see :meth:`on_peers`)
        self._peer_cases: dict[str, _Case] = {}

    # -- queries ---------------------------------------------------------------------
    def is_watched(self, device_id: str) -> bool:
        """Whether the device has an open diagnosis or is on its way to one."""
        return device_id in self._devices

    def open_diagnoses(self, device_id: str | None = None) -> list[Diagnosis]:
        """Return the open diagnoses (of one device, or of all)."""
        states = (
            self._devices.items()
            if device_id is None
            else [(device_id, self._devices[device_id])]
            if device_id in self._devices
            else []
        )
        found = [case.diagnosis for _, state in states for case in state.cases.values()]
        alerts = (
            self._alerts.values()
            if device_id is None
            else [self._alerts[device_id]]
            if device_id in self._alerts
            else []
        )
        peers = (
            self._peer_cases.values()
            if device_id is None
            else [self._peer_cases[device_id]]
            if device_id in self._peer_cases
            else []
        )
        return (
            found
            + [alert.case.diagnosis for alert in alerts if alert.case is not None]
            + [case.diagnosis for case in peers]
        )

    def drift_indicators(self, spec: FeatureSpec) -> npt.NDArray[np.bool_]:
        """Return which of ``spec``'s features are a wear fault's health indicator."""
        table = self.catalog.get(spec.model)
        flags = np.zeros(len(spec.features), dtype=np.bool_)
        for entry in () if table is None else table.faults.values():
            if entry.degradation is not None and spec.index(entry.degradation.feature) >= 0:
                flags[spec.index(entry.degradation.feature)] = True
        return flags

    # -- naming ----------------------------------------------------------------------
    def _layout(self, spec: FeatureSpec) -> _Layout:
        layout = self._layouts.get(spec.model)
        if layout is None or layout.spec is not spec:
            layout = self._layouts[spec.model] = _Layout.of(spec, self.catalog.get(spec.model))
        return layout

    def name_fault(self, spec: FeatureSpec, z: npt.NDArray[np.float32]) -> Hypothesis:
        """Name the fault whose catalog signature best explains deviations ``z``."""
        layout = self._layout(spec)
        values: list[float] = z.tolist()
        moved = [(abs(v), i) for i, v in enumerate(values) if abs(v) >= _NOISE_Z]
        drivers, total = layout.drivers(moved, values)
        best, best_evidence = UNKNOWN, 0.0
        for fault, signature in layout.signatures:
            evidence = 0.0
            for i, direction, weight in signature:
                value = values[i]
                moved_z = abs(value) if direction == 0 else direction * value
                evidence += weight * max(moved_z, 0.0)
            if evidence > best_evidence:
                best, best_evidence = fault, evidence
        if best_evidence < self.config.min_evidence:
            return Hypothesis(UNKNOWN, best_evidence, 0.0, drivers)
        confidence = min(1.0, best_evidence / max(total, best_evidence))
        return Hypothesis(best, best_evidence, confidence, drivers)

    def name_drift(
        self, spec: FeatureSpec, z: npt.NDArray[np.float32], drifting: npt.NDArray[np.bool_]
    ) -> Hypothesis:
        """Name the wear fault whose health indicator is among the ``drifting`` features.

        The catalog's degradation signatures say which feature a wear fault moves, and
        which way; the drifting feature furthest from its baseline that way names it.
        """
        layout = self._layout(spec)
        values: list[float] = z.tolist()
        flags: list[bool] = drifting.tolist()
        min_z = self.config.min_driver_z
        moved = [(abs(v), i) for i, v in enumerate(values) if flags[i] or abs(v) >= min_z]
        drivers, total = layout.drivers(moved, values)
        best, best_evidence = UNKNOWN, 0.0
        for fault, i, two_sided, sign in layout.degradations:
            if not flags[i]:
                continue
            value = values[i]
            evidence = abs(value) if two_sided else value * sign
            if evidence > best_evidence:
                best, best_evidence = fault, evidence
        confidence = min(1.0, best_evidence / total) if total and best != UNKNOWN else 0.0
        return Hypothesis(best, best_evidence, confidence, drivers)

    # -- scores ----------------------------------------------------------------------
    def on_score(
        self,
        device_id: str,
        spec: FeatureSpec,
        ts_ms: int,
        score: float,
        z: npt.NDArray[np.float32],
        change: npt.NDArray[np.float32],
        drifting: npt.NDArray[np.bool_] | None = None,
    ) -> list[Diagnosis]:
        """Take one live reading's score and deviations; return the diagnosis changes.

        Args:
            device_id: the device.
            spec: its product model's features.
            ts_ms: the reading's own time.
            score: its anomaly score in ``[0, 1]``.
            z: per-feature signed deviations (baseline, or fleet while no baseline).
            change: per-feature level minus healthy reference, in feature units.
            drifting: per feature, whether the trend trigger sees it drift away from its
                baseline (see :meth:`~diagnostics.baseline.BaselineTable.drift`); such a
                drift explains the score and names a wear fault when ``z`` alone does not.
        """
        cfg = self.config
        if score < cfg.close_threshold:
            if device_id not in self._devices:
                return []
            return self._step(device_id, spec, ts_ms, score, None, change)
        hypothesis = self.name_fault(spec, z)
        explained = any(abs(c.z) >= cfg.min_driver_z for c in hypothesis.drivers)
        named = _Named.of(hypothesis, explained)
        if (
            drifting is not None
            and drifting.any()
            and (hypothesis.fault == UNKNOWN or not explained)
        ):
            named = self._drift(spec, z, drifting) or named
        return self._step(device_id, spec, ts_ms, score, named, change)

    def on_scores(
        self,
        device_ids: Sequence[str],
        spec: FeatureSpec,
        ts_ms: Sequence[int],
        scores: npt.NDArray[np.float32],
        z: npt.NDArray[np.float32],
        change: npt.NDArray[np.float32],
        drifting: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[list[tuple[int, Diagnosis]], list[bool]]:
        """Take many live readings of one product model, in order (see :meth:`on_score`).

        The same as :meth:`on_score` for each row in turn, with the faults named for all
        rows at once. ``z`` must not change afterwards (a diagnosis may draw its drivers
        from it later).

        Args:
            device_ids: each row's device.
            spec: the product model's features.
            ts_ms: each row's reading time.
            scores: each row's anomaly score.
            z: per row and feature, signed deviations.
            change: per row and feature, level minus healthy reference.
            drifting: per row and feature, whether the trend trigger sees a drift.

        Returns:
            the diagnosis changes with the row that made each, and per row whether its
            device is watched afterwards.
        """
        cfg = self.config
        low = cfg.close_threshold
        score_list: list[float] = scores.tolist()
        changes: list[tuple[int, Diagnosis]] = []
        watched: list[bool] = []
        named_rows = [k for k, s in enumerate(score_list) if s >= low]
        names: dict[int, _Named] = {}
        if named_rows:
            layout = self._layout(spec)
            rows = z if len(named_rows) == len(score_list) else z[named_rows]
            # a driver of at least min_driver_z is among the top five beyond the noise
            # exactly when the largest deviation is
            best, best_evidence, total, moved, explained = layout.evidence_rows(
                rows, max(cfg.min_driver_z, _NOISE_Z)
            )
            values: list[list[float]] = rows.tolist()
            faults = layout.faults
            min_evidence = cfg.min_evidence
            drift_rows: list[bool] | None = None
            if drifting is not None:
                drift_rows = np.any(drifting[named_rows], axis=1).tolist()
            for j, k in enumerate(named_rows):
                evidence = best_evidence[j]
                if best[j] < 0 or evidence < min_evidence:
                    fault, confidence = UNKNOWN, 0.0
                else:
                    fault = faults[best[j]]
                    confidence = min(1.0, evidence / max(total[j], evidence))
                named = _Named(fault, confidence, explained[j], moved[j], None, layout, values[j])
                if (
                    drift_rows is not None
                    and drift_rows[j]
                    and (fault == UNKNOWN or not explained[j])
                ):
                    assert drifting is not None
                    named = self._drift(spec, z[k], drifting[k]) or named
                names[k] = named
        devices = self._devices
        change_rows: list[list[float]] | None = None
        for k, device_id in enumerate(device_ids):
            named_k = names.get(k)
            if named_k is not None or device_id in devices:
                if change_rows is None:
                    change_rows = change.tolist()
                made = self._step(device_id, spec, ts_ms[k], score_list[k], named_k, change_rows[k])
                if made:
                    changes += [(k, d) for d in made]
            watched.append(device_id in devices)
        return changes, watched

    def on_detections(
        self,
        device_ids: Sequence[str],
        model: str,
        names: Sequence[str],
        ts_ms: Sequence[int],
        scores: npt.NDArray[np.float64],
        events: npt.NDArray[np.bool_],
        active: npt.NDArray[np.bool_],
        deviation: npt.NDArray[np.float64],
    ) -> list[tuple[int, Diagnosis]]:
        """Take the detector core's verdicts on live readings of one product model, in order.

        Args:
            device_ids: each row's device.
            model: their product model.
            names: the metric of each deviation column.
            ts_ms: each row's reading time.
            scores: each row's score (``0.5`` at the core's operating point, see
                :func:`~diagnostics.csvdetect.surprise`).
            events: the row raised an alert (its rising edge).
            active: the alert is up at the row.
            deviation: per row and metric, the signed deviation (NaN: not scored).

        Returns:
            the diagnosis changes with the row that made each.
        """
        alerts = self._alerts
        cfg = self.config
        event_list: list[bool] = events.tolist()
        up: list[bool] = active.tolist()
        changes: list[tuple[int, Diagnosis]] = []
        rows = [k for k, d in enumerate(device_ids) if up[k] or d in alerts]
        for k in rows:
            device_id, t = device_ids[k], ts_ms[k]
            alert = alerts.get(device_id)
            if event_list[k]:
                if alert is not None and alert.case is not None:
                    changes.append((k, self._close_alert(alert.case, t, "a new alert")))
                alert = alerts[device_id] = _Alert(t)
            elif alert is None:
                continue  # up since before the policy knew it (a restart): not news
            elif not up[k]:
                del alerts[device_id]
                if alert.case is not None:
                    why = "the detector re-armed: back to normal, or the change is learnt"
                    changes.append((k, self._close_alert(alert.case, t, why)))
                continue
            alert.rows += 1
            score = float(scores[k])
            if score >= cfg.open_threshold:
                alert.above += 1
            if score > alert.peak or not alert.drivers:
                drivers = _deviation_drivers(names, deviation[k].tolist())
                if drivers:
                    alert.peak = max(alert.peak, score)
                    alert.drivers = drivers
            if alert.case is not None:
                named = _Named(GENERIC_FAULT, 1.0, True, True, alert.drivers)
                confidence = round(min(alert.peak, 1.0), 4)
                made = self._send(alert.case, t, score=score, confidence=confidence, drivers=named)
                changes += [(k, d) for d in made]
            elif (
                alert.above >= cfg.open_after
                and (t - alert.since_ms) / 1000.0 >= cfg.open_after_s
                and alert.drivers
                and abs(alert.drivers[0].z) >= cfg.min_driver_z
                and device_id not in self._peer_cases  # one open case per fault
            ):
                alert.case = self._open_alert(device_id, model, t, score, alert)
                changes.append((k, alert.case.diagnosis))
        return changes

    def on_peers(
        self,
        device_id: str,
        model: str,
        ts_ms: int,
        drivers: tuple[Contribution, ...],
        peers: int,
    ) -> list[Diagnosis]:
        """A device whose metrics stand far from its peers' (or are back among them).

        Args:
            device_id: the device.
            model: its product model.
            ts_ms: device time of the check.
            drivers: the metrics far from the peers, ``z`` in the peers' spreads, largest
                first; empty: the device is back among its peers.
            peers: how many devices were compared, itself included.

        Returns:
            the diagnosis changes: ``unusual_behaviour`` opened (unless the device's own
            history already opened it), updated while it lasts, closed once it is over.
        """
        case = self._peer_cases.get(device_id)
        if not drivers:
            if case is None:
                return []
            del self._peer_cases[device_id]
            alert = self._alerts.get(device_id)
            if alert is not None and alert.case is None:
                # the device's own history sees its way back (a repair) as a change:
                # toward its peers' normal it is no news
                del self._alerts[device_id]
            return [self._close_alert(case, ts_ms, "back among its peers")]
        top = abs(drivers[0].z)
        score = round(1.0 - math.erfc(top / math.sqrt(2.0)), 6)
        if case is not None:
            named = _Named(GENERIC_FAULT, score, True, True, drivers)
            return self._send(case, ts_ms, score=score, confidence=score, drivers=named)
        alert = self._alerts.get(device_id)
        if alert is not None and alert.case is not None:
            return []  # its own history already opened it
        entry = self._entry(model, GENERIC_FAULT)
        at = ms_to_datetime(ts_ms)
        moved = ", ".join(f"{c.feature} {c.z:+.1f}" for c in drivers)
        diagnosis = Diagnosis(
            device_id=device_id,
            model=model,
            fault=GENERIC_FAULT,
            confidence=score,
            status="open",
            opened_at=at,
            updated_at=at,
            score=score,
            source="model",
            time_to_failure=None,
            drivers=drivers,
            remedies=() if entry is None else entry.remedies,
            evidence=(
                f"unlike its {peers - 1} peers of model {model} (how far from their median, "
                "in their spread)",
                f"far from its peers: {moved}",
            ),
        )
        _LOG.info("%s: opened %s (far from its %d peers)", device_id, GENERIC_FAULT, peers)
        case = self._peer_cases[device_id] = _Case(
            diagnosis, from_model=True, last_code_ms=None, ts_ms=ts_ms
        )
        return [diagnosis]

    def _open_alert(
        self, device_id: str, model: str, ts_ms: int, score: float, alert: _Alert
    ) -> _Case:
        entry = self._entry(model, GENERIC_FAULT)
        at = ms_to_datetime(ts_ms)
        diagnosis = Diagnosis(
            device_id=device_id,
            model=model,
            fault=GENERIC_FAULT,
            confidence=round(min(alert.peak, 1.0), 4),
            status="open",
            opened_at=at,
            updated_at=at,
            score=score,
            source="model",
            time_to_failure=self._ttf(device_id, model, GENERIC_FAULT, ts_ms),
            drivers=alert.drivers,
            remedies=() if entry is None else entry.remedies,
            evidence=(
                f"unusual since {ms_to_datetime(alert.since_ms).isoformat()}: "
                f"{alert.rows} readings, peak score {alert.peak:.2f}",
                _moved(alert.drivers),
            ),
        )
        _LOG.info("%s: opened %s (detector alert, score %.2f)", device_id, GENERIC_FAULT, score)
        return _Case(diagnosis, from_model=True, last_code_ms=None, ts_ms=ts_ms)

    def _close_alert(self, case: _Case, ts_ms: int, why: str) -> Diagnosis:
        self.predictor.forget(case.device_id, case.fault)
        old = case.diagnosis
        ttf = old.time_to_failure
        _LOG.info("%s: closed %s (%s)", case.device_id, case.fault, why)
        return replace(
            old,
            status="closed",
            updated_at=ms_to_datetime(ts_ms),
            time_to_failure=None if ttf is None else ttf.aged((ts_ms - case.updated_ms) / 1000.0),
            evidence=(*old.evidence[-9:], why),
        )

    def _drift(
        self, spec: FeatureSpec, z: npt.NDArray[np.float32], drifting: npt.NDArray[np.bool_]
    ) -> _Named | None:
        # a drift explains the score only as a wear fault's indicator on its way
        drift = self.name_drift(spec, z, drifting)
        return None if drift.fault == UNKNOWN else _Named.of(drift, True)

    def _step(
        self,
        device_id: str,
        spec: FeatureSpec,
        ts_ms: int,
        score: float,
        named: _Named | None,
        change: Sequence[float] | npt.NDArray[np.float32],
    ) -> list[Diagnosis]:
        """Follow one reading: ``named`` is its hypothesis when it scores at all."""
        cfg = self.config
        state = self._devices.get(device_id)
        if state is None:
            state = self._devices[device_id] = _DeviceState()
        if score >= cfg.open_threshold:
            if state.above == 0:
                state.above_since_ms = ts_ms
            state.above += 1
            state.below = 0
        elif score < cfg.close_threshold:
            state.below += 1
            state.above = 0
        else:
            state.above = 0
            state.below = 0
        changes: list[Diagnosis] = []
        if named is not None:
            model_case = None
            for case in state.cases.values():
                if case.from_model:
                    model_case = case
                    break
            self._observe(device_id, spec, named.fault, ts_ms, change)
            if model_case is not None:
                changes = self._follow(device_id, spec, ts_ms, score, named, state, model_case)
            elif (
                named.explained
                and state.above >= cfg.open_after
                and (ts_ms - state.above_since_ms) / 1000.0 >= cfg.open_after_s
            ):
                changes = self._open_model(device_id, spec, ts_ms, score, named, state)
        if state.below >= cfg.close_after and state.cases:
            changes += self._close_quiet(device_id, state, ts_ms, score)
        if not state.cases and state.above == 0 and score < cfg.close_threshold:
            del self._devices[device_id]
        return changes

    def _observe(
        self,
        device_id: str,
        spec: FeatureSpec,
        fault: str,
        ts_ms: int,
        change: Sequence[float] | npt.NDArray[np.float32],
    ) -> None:
        indicator = self._layout(spec).indicator.get(fault)
        if indicator is None:
            return
        i, degradation = indicator
        value = float(change[i])
        if not math.isfinite(value):
            return
        progress = progress_of(value, degradation)
        self.predictor.observe(device_id, fault, ts_ms / 1000.0, progress)

    def _ttf(self, device_id: str, model: str, fault: str, ts_ms: int) -> TimeToFailure | None:
        if self.lifetimes is not None:
            learnt = self.lifetimes.predict(device_id, model, fault, ts_ms)
            if learnt is not None:
                return learnt
        return self.predictor.predict(device_id, fault, ts_ms / 1000.0)

    def _entry(self, model: str, fault: str) -> FaultEntry | None:
        table = self.catalog.get(model)
        return None if table is None else table.faults.get(fault)

    def _open_model(
        self,
        device_id: str,
        spec: FeatureSpec,
        ts_ms: int,
        score: float,
        hypothesis: _Named,
        state: _DeviceState,
    ) -> list[Diagnosis]:
        existing = state.cases.get(hypothesis.fault)
        if existing is not None:
            # the device already said so itself: the scores now agree with it
            existing.from_model = True
            return self._send(existing, ts_ms, score=score, source="both", force=True)
        entry = self._entry(spec.model, hypothesis.fault)
        at = ms_to_datetime(ts_ms)
        diagnosis = Diagnosis(
            device_id=device_id,
            model=spec.model,
            fault=hypothesis.fault,
            confidence=round(score * max(hypothesis.confidence, 0.1), 4),
            status="open",
            opened_at=at,
            updated_at=at,
            score=score,
            source="model",
            time_to_failure=self._ttf(device_id, spec.model, hypothesis.fault, ts_ms),
            drivers=hypothesis.drivers,
            remedies=() if entry is None else entry.remedies,
            evidence=(
                f"score {score:.2f} for {state.above} updates since "
                f"{ms_to_datetime(state.above_since_ms).isoformat()}",
                _moved(hypothesis.drivers),
            ),
        )
        state.cases[hypothesis.fault] = _Case(
            diagnosis, from_model=True, last_code_ms=None, ts_ms=ts_ms
        )
        _LOG.info("%s: opened %s (score %.2f)", device_id, hypothesis.fault, score)
        return [diagnosis]

    def _follow(
        self,
        device_id: str,
        spec: FeatureSpec,
        ts_ms: int,
        score: float,
        hypothesis: _Named,
        state: _DeviceState,
        case: _Case,
    ) -> list[Diagnosis]:
        cfg = self.config
        current = case.fault
        if hypothesis.fault != current and hypothesis.fault != UNKNOWN:
            if state.rival == hypothesis.fault:
                state.rival_count += 1
            else:
                state.rival, state.rival_count = hypothesis.fault, 1
            if (
                state.rival_count >= cfg.revise_after
                and score >= cfg.open_threshold
                and current == UNKNOWN
                and case.last_code_ms is None
            ):
                state.rival, state.rival_count = None, 0
                closed = self._close(
                    device_id, state, current, ts_ms, f"revised to {hypothesis.fault}"
                )
                return closed + self._open_model(device_id, spec, ts_ms, score, hypothesis, state)
            return self._send(case, ts_ms, score=score)
        state.rival, state.rival_count = None, 0
        confidence = round(score * max(hypothesis.confidence, 0.1), 4)
        if case.last_code_ms is not None:
            confidence = max(confidence, case.confidence)
        # deviations all within the noise keep the drivers seen last
        return self._send(
            case,
            ts_ms,
            score=score,
            confidence=confidence,
            drivers=hypothesis if hypothesis.moved else None,
        )

    def _send(
        self,
        case: _Case,
        ts_ms: int,
        *,
        score: float | None = None,
        confidence: float | None = None,
        drivers: _Named | None = None,
        source: Source | None = None,
        evidence: str | None = None,
        force: bool = False,
    ) -> list[Diagnosis]:
        ttf = self._ttf(case.device_id, case.model, case.fault, ts_ms)
        if ttf is None and case.time_to_failure is not None:
            # nothing new from the predictor: the last prediction, counted down to this
            # reading's time, so that a sent prediction is always as of its updated_at
            ttf = case.time_to_failure.aged((ts_ms - case.updated_ms) / 1000.0)
        case.revise(
            ts_ms,
            score=score,
            confidence=confidence,
            drivers=drivers,
            source=source,
            evidence=evidence,
            time_to_failure=ttf,
        )
        elapsed_s = (ts_ms - case.last_sent_ms) / 1000.0
        if not (
            force
            or elapsed_s >= self.config.update_every_s
            or self._material(case.sent, case, elapsed_s)
        ):
            return []
        new = case.diagnosis
        case.last_sent_ms = ts_ms
        case.sent = new
        return [new]

    def _material(self, sent: Diagnosis, case: _Case, elapsed_s: float) -> bool:
        """Whether the case differs from the last diagnosis sent enough to send it.

        A case keeps its fault and remedies; its source, confidence and predicted failure
        time are what may have moved.
        """
        cfg = self.config
        if (
            case.source != sent.source
            or abs(case.confidence - sent.confidence) >= cfg.confidence_step - 1e-9
        ):
            return True
        before, now = sent.time_to_failure, case.time_to_failure
        if now is None:
            return False
        if before is None:
            return True
        # compare with what the sent prediction says now: a failure that stays on schedule
        # (the countdown running) is no news; one that moves by a share of the time left is
        left_s = max(before.p50_s - elapsed_s, 3_600.0)
        return abs(now.p50_s - left_s) >= cfg.ttf_step * left_s

    # -- closing ---------------------------------------------------------------------
    def _close(
        self, device_id: str, state: _DeviceState, fault: str, ts_ms: int, why: str
    ) -> list[Diagnosis]:
        case = state.cases.pop(fault)
        self.predictor.forget(device_id, fault)
        old = case.diagnosis
        ttf = old.time_to_failure
        closed = replace(
            old,
            status="closed",
            updated_at=ms_to_datetime(ts_ms),
            time_to_failure=None if ttf is None else ttf.aged((ts_ms - case.updated_ms) / 1000.0),
            evidence=(*old.evidence[-9:], why),
        )
        _LOG.info("%s: closed %s (%s)", device_id, fault, why)
        return [closed]

    def _close_quiet(
        self, device_id: str, state: _DeviceState, ts_ms: int, score: float
    ) -> list[Diagnosis]:
        if state.below < self.config.close_after or not state.cases:
            return []
        changes: list[Diagnosis] = []
        for fault, case in list(state.cases.items()):
            if case.last_code_ms is not None:
                entry = self._entry(case.model, fault)
                quiet_s = 86_400.0 if entry is None else entry.quiet_close_s
                if (ts_ms - case.last_code_ms) / 1000.0 < quiet_s:
                    continue
            changes += self._close(device_id, state, fault, ts_ms, f"scores normal ({score:.2f})")
        return changes

    # -- self-diagnosis ----------------------------------------------------------------
    def on_event(self, event: Event, model: str) -> list[Diagnosis]:
        """Take one live device event of a ``model`` device; return the diagnosis changes."""
        table = self.catalog.get(model)
        if table is None:
            return []
        device_id = event.device_id
        changes: list[Diagnosis] = []
        if event.kind == "boot":
            reason = str(event.data.get("reset_reason", ""))
            state = self._devices.get(device_id)
            if state is not None:
                for fault in list(state.cases):
                    entry = table.faults.get(fault)
                    if entry is not None and reason in entry.cleared_by:
                        changes += self._close(
                            device_id, state, fault, event.ts_ms, f"boot after {reason}"
                        )
                self._forget_if_idle(device_id, state)
            entry = table.by_boot_reason(reason)
            if entry is not None:
                changes += self._hit(event, model, entry, f"reboot by {reason}", 0.6)
            return changes
        if event.code is None:
            return changes
        if event.kind == "error" or (event.kind == "selftest" and event.ok is False):
            entry = table.by_code(event.code)
            if entry is not None:
                what = "self-test" if event.kind == "selftest" else "error"
                changes += self._hit(event, model, entry, f"{what} {event.code}", 0.85)
        return changes

    def _forget_if_idle(self, device_id: str, state: _DeviceState) -> None:
        if not state.cases and state.above == 0:
            self._devices.pop(device_id, None)

    def _hit(
        self, event: Event, model: str, entry: FaultEntry, what: str, confidence: float
    ) -> list[Diagnosis]:
        device_id = event.device_id
        state = self._devices.setdefault(device_id, _DeviceState())
        ts_ms = event.ts_ms
        stamp = f"{what} at {ms_to_datetime(ts_ms).isoformat()}"
        case = state.cases.get(entry.fault)
        if case is not None:
            known = case.last_code_ms is not None
            case.last_code_ms = ts_ms
            source: Source = "both" if case.from_model else "device"
            conf = min(0.99, max(case.confidence, confidence) + (0.05 if known else 0.2))
            return self._send(
                case, ts_ms, confidence=conf, source=source, evidence=stamp, force=not known
            )
        at = ms_to_datetime(ts_ms)
        diagnosis = Diagnosis(
            device_id=device_id,
            model=model,
            fault=entry.fault,
            confidence=confidence,
            status="open",
            opened_at=at,
            updated_at=at,
            score=confidence,
            source="device",
            remedies=entry.remedies,
            evidence=(stamp,),
        )
        state.cases[entry.fault] = _Case(
            diagnosis, from_model=False, last_code_ms=ts_ms, ts_ms=ts_ms
        )
        _LOG.info("%s: opened %s (%s)", device_id, entry.fault, what)
        return [diagnosis]
