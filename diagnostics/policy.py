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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.catalog import CATALOG, Degradation, FaultEntry, ModelCatalog
from diagnostics.features import FeatureSpec
from diagnostics.model import Contribution, Diagnosis
from diagnostics.predictor import TimeToFailure, TrendPredictor, progress_of
from gateway.protocol import Event, ms_to_datetime

__all__ = ["DiagnosisPolicy", "Hypothesis", "PolicyConfig"]

_LOG = logging.getLogger(__name__)
UNKNOWN: Final = "unknown"
_NOISE_Z: Final = 2.0


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


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A named fault behind a vector of feature deviations.

    Attributes:
        fault: the fault's name, or ``unknown``.
        evidence: weighted sum of the signature's deviations.
        confidence: the share of all deviations the fault explains, in ``[0, 1]``.
        drivers: the features that moved, largest first.
    """

    fault: str
    evidence: float
    confidence: float
    drivers: tuple[Contribution, ...]


@dataclass(slots=True)
class _Case:
    """An open diagnosis and what the policy needs to keep it (mutable, private)."""

    diagnosis: Diagnosis
    from_model: bool
    last_code_ms: int | None = None
    last_sent_ms: int = 0
    sent: Diagnosis | None = None


@dataclass(slots=True)
class _DeviceState:
    above: int = 0
    above_since_ms: int = 0
    below: int = 0
    rival: str | None = None
    rival_count: int = 0
    cases: dict[str, _Case] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Layout:
    """A product model's catalog resolved to feature positions (built once per model).

    Attributes:
        spec: the features it was built for.
        names: feature names, in vector order.
        metrics: each feature's metrics.
        signatures: per fault in catalog order, its signature as (position, direction,
            weight), features the model lacks left out.
        degradations: per wear fault in catalog order, its indicator's position, whether
            it is two-sided and the sign of its failure change.
        indicator: wear fault to its indicator's position and degradation.
    """

    spec: FeatureSpec
    names: tuple[str, ...]
    metrics: tuple[tuple[str, ...], ...]
    signatures: tuple[tuple[str, tuple[tuple[int, int, float], ...]], ...]
    degradations: tuple[tuple[str, int, bool, float], ...]
    indicator: Mapping[str, tuple[int, Degradation]]

    @classmethod
    def of(cls, spec: FeatureSpec, table: ModelCatalog | None) -> _Layout:
        entries = () if table is None else tuple(table.faults.values())
        signatures = tuple(
            (
                entry.fault,
                tuple(
                    (spec.index(sig.feature), sig.direction, sig.weight)
                    for sig in entry.signature
                    if spec.index(sig.feature) >= 0
                ),
            )
            for entry in entries
        )
        indicator = {
            entry.fault: (spec.index(entry.degradation.feature), entry.degradation)
            for entry in entries
            if entry.degradation is not None and spec.index(entry.degradation.feature) >= 0
        }
        degradations = tuple(
            (fault, i, d.two_sided, float(np.sign(d.failure_delta)))
            for fault, (i, d) in indicator.items()
        )
        return cls(
            spec,
            spec.names,
            tuple(f.metrics for f in spec.features),
            signatures,
            degradations,
            indicator,
        )

    def drivers(
        self, moved: list[tuple[float, int]], values: list[float]
    ) -> tuple[tuple[Contribution, ...], float]:
        """Return the largest five moved features as contributions, and the total moved."""
        total = sum(a for a, _ in moved)
        names, metrics = self.names, self.metrics
        drivers = tuple(
            Contribution(names[i], metrics[i], values[i], a / total if total else 0.0)
            for a, i in sorted(moved, reverse=True)[:5]
        )
        return drivers, total


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
        self._devices: dict[str, _DeviceState] = {}
        self._layouts: dict[str, _Layout] = {}

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
        return [case.diagnosis for _, state in states for case in state.cases.values()]

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
                baseline (see :meth:`~diagnostics.baseline.BaselineTable.trending`); such a
                drift explains the score and names a wear fault when ``z`` alone does not.
        """
        cfg = self.config
        state = self._devices.get(device_id)
        if state is None:
            if score < cfg.close_threshold:
                return []
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
        model_case = next((c for c in state.cases.values() if c.from_model), None)
        if score >= cfg.close_threshold:
            hypothesis = self.name_fault(spec, z)
            explained = any(abs(c.z) >= cfg.min_driver_z for c in hypothesis.drivers)
            if (
                drifting is not None
                and drifting.any()
                and (hypothesis.fault == UNKNOWN or not explained)
            ):
                # a drift explains the score only as a wear fault's indicator on its way
                drift = self.name_drift(spec, z, drifting)
                if drift.fault != UNKNOWN:
                    hypothesis, explained = drift, True
            self._observe(device_id, spec, hypothesis.fault, ts_ms, change)
            sustained = (
                state.above >= cfg.open_after
                and (ts_ms - state.above_since_ms) / 1000.0 >= cfg.open_after_s
            )
            if model_case is None and sustained and explained:
                changes += self._open_model(device_id, spec, ts_ms, score, hypothesis, state)
            elif model_case is not None:
                changes += self._follow(
                    device_id, spec, ts_ms, score, hypothesis, state, model_case
                )
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
        change: npt.NDArray[np.float32],
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

    def _ttf(self, device_id: str, fault: str, ts_ms: int) -> TimeToFailure | None:
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
        hypothesis: Hypothesis,
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
            time_to_failure=self._ttf(device_id, hypothesis.fault, ts_ms),
            drivers=hypothesis.drivers,
            remedies=() if entry is None else entry.remedies,
            evidence=(f"score {score:.2f} for {state.above} updates",),
        )
        state.cases[hypothesis.fault] = _Case(
            diagnosis, from_model=True, last_sent_ms=ts_ms, sent=diagnosis
        )
        _LOG.info("%s: opened %s (score %.2f)", device_id, hypothesis.fault, score)
        return [diagnosis]

    def _follow(
        self,
        device_id: str,
        spec: FeatureSpec,
        ts_ms: int,
        score: float,
        hypothesis: Hypothesis,
        state: _DeviceState,
        case: _Case,
    ) -> list[Diagnosis]:
        cfg = self.config
        current = case.diagnosis.fault
        if hypothesis.fault not in (current, UNKNOWN):
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
            confidence = max(confidence, case.diagnosis.confidence)
        return self._send(
            case,
            ts_ms,
            score=score,
            confidence=confidence,
            drivers=hypothesis.drivers or case.diagnosis.drivers,
        )

    def _send(
        self,
        case: _Case,
        ts_ms: int,
        *,
        score: float | None = None,
        confidence: float | None = None,
        drivers: tuple[Contribution, ...] | None = None,
        source: str | None = None,
        evidence: str | None = None,
        force: bool = False,
    ) -> list[Diagnosis]:
        old = case.diagnosis
        ttf = self._ttf(old.device_id, old.fault, ts_ms) or old.time_to_failure
        new_conf = old.confidence if confidence is None else confidence
        new = replace(
            old,
            status="update",
            updated_at=ms_to_datetime(ts_ms),
            score=old.score if score is None else score,
            confidence=new_conf,
            drivers=old.drivers if drivers is None else drivers,
            source=old.source if source is None else source,  # type: ignore[arg-type]
            time_to_failure=ttf,
            evidence=old.evidence if evidence is None else (*old.evidence[-9:], evidence),
        )
        case.diagnosis = new
        elapsed_s = (ts_ms - case.last_sent_ms) / 1000.0
        if not (
            force
            or elapsed_s >= self.config.update_every_s
            or self._material(case.sent or old, new, elapsed_s)
        ):
            return []
        case.last_sent_ms = ts_ms
        case.sent = new
        return [new]

    def _material(self, sent: Diagnosis, new: Diagnosis, elapsed_s: float) -> bool:
        """Whether ``new`` differs from the last diagnosis sent enough to send it."""
        cfg = self.config
        if (
            new.fault != sent.fault
            or new.source != sent.source
            or new.remedies != sent.remedies
            or abs(new.confidence - sent.confidence) >= cfg.confidence_step - 1e-9
        ):
            return True
        before, now = sent.time_to_failure, new.time_to_failure
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
        closed = replace(
            old,
            status="closed",
            updated_at=ms_to_datetime(ts_ms),
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
                entry = self._entry(case.diagnosis.model, fault)
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
            source = "both" if case.from_model else "device"
            conf = min(0.99, max(case.diagnosis.confidence, confidence) + (0.05 if known else 0.2))
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
            diagnosis,
            from_model=False,
            last_code_ms=ts_ms,
            last_sent_ms=ts_ms,
            sent=diagnosis,
        )
        _LOG.info("%s: opened %s (%s)", device_id, entry.fault, what)
        return [diagnosis]
