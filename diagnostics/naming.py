"""Fault naming (diagnostics, "Decide": which fault stands behind a vector of deviations).

The part of :class:`~diagnostics.policy.DiagnosisPolicy` that reads the catalog: a product
model's fault signatures resolved once to feature positions (:class:`_Layout`), scored
against deviations in one compiled pass, and the features that moved named as a
diagnosis's drivers. It keeps no state between readings; the policy decides what to open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics import kernels
from diagnostics.catalog import ANY_FEATURE, Degradation, ModelCatalog
from diagnostics.features import FeatureSpec
from diagnostics.model import Contribution

__all__ = ["Hypothesis"]


_MAX_DRIVERS: Final = 5


_NOISE_Z: Final = 2.0


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


class _Named:
    """A hypothesis as the policy follows it: drivers drawn from the deviations on demand."""

    __slots__ = ("_drivers", "_layout", "_values", "confidence", "explained", "fault", "moved")

    def __init__(
        self,
        fault: str,
        confidence: float,
        explained: bool,
        moved: bool,
        drivers: tuple[Contribution, ...] | None,
        layout: _Layout | None = None,
        values: list[float] | None = None,
    ) -> None:
        self.fault = fault
        self.confidence = confidence
        self.explained = explained
        self.moved = moved
        self._drivers = drivers
        self._layout = layout
        self._values = values

    @classmethod
    def of(cls, hypothesis: Hypothesis, explained: bool) -> _Named:
        drivers = hypothesis.drivers
        return cls(hypothesis.fault, hypothesis.confidence, explained, bool(drivers), drivers)

    @property
    def drivers(self) -> tuple[Contribution, ...]:
        drivers = self._drivers
        if drivers is None:
            assert self._layout is not None
            assert self._values is not None
            drivers = self._drivers = self._layout.noise_drivers(self._values)
            self._values = None
        return drivers


def _deviation_drivers(
    names: Sequence[str], deviation: Sequence[float]
) -> tuple[Contribution, ...]:
    """The metrics beyond the noise, largest first (else the one that moved most)."""
    moved = sorted(
        ((abs(z), i) for i, z in enumerate(deviation) if math.isfinite(z) and z != 0.0),
        reverse=True,
    )
    beyond = [m for m in moved if m[0] >= _NOISE_Z] or moved[:1]
    total = sum(a for a, _ in beyond[:_MAX_DRIVERS])
    return tuple(
        Contribution(names[i], (names[i],), round(deviation[i], 3), a / total if total else 0.0)
        for a, i in beyond[:_MAX_DRIVERS]
    )


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
    faults: tuple[str, ...]
    at: npt.NDArray[np.intp]
    direction: npt.NDArray[np.float64]
    two_way: npt.NDArray[np.bool_]
    weight: npt.NDArray[np.float64]

    @classmethod
    def of(cls, spec: FeatureSpec, table: ModelCatalog | None) -> _Layout:
        entries = () if table is None else tuple(table.faults.values())
        # a signature on ANY_FEATURE stands for every feature no product file describes
        generic = [i for i, f in enumerate(spec.features) if f.generic]
        signatures = tuple(
            (
                entry.fault,
                tuple(
                    term
                    for sig in entry.signature
                    for term in (
                        [(i, sig.direction, sig.weight) for i in generic]
                        if sig.feature == ANY_FEATURE
                        else [(spec.index(sig.feature), sig.direction, sig.weight)]
                    )
                    if term[0] >= 0
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
        # the signatures as (fault, term) arrays, short ones padded with a zero-weight term
        # on an extra column that is always 0
        width = len(spec.features)
        terms = max((len(sig) for _, sig in signatures), default=0)
        at = np.full((len(signatures), terms), width, dtype=np.intp)
        direction = np.ones((len(signatures), terms), dtype=np.float64)
        weight = np.zeros((len(signatures), terms), dtype=np.float64)
        for f, (_, signature) in enumerate(signatures):
            for k, (i, d, w) in enumerate(signature):
                at[f, k], direction[f, k], weight[f, k] = i, d, w
        return cls(
            spec,
            spec.names,
            tuple(f.metrics for f in spec.features),
            signatures,
            degradations,
            indicator,
            tuple(fault for fault, _ in signatures),
            at,
            direction,
            direction == 0.0,
            weight,
        )

    def noise_drivers(self, values: list[float]) -> tuple[Contribution, ...]:
        """Return the drivers of deviations ``values``: the features beyond the noise."""
        moved = [(abs(v), i) for i, v in enumerate(values) if abs(v) >= _NOISE_Z]
        return self.drivers(moved, values)[0]

    def evidence_rows(
        self, z: npt.NDArray[np.float32], explain_z: float
    ) -> tuple[list[int], list[float], list[float], list[bool], list[bool]]:
        """Score every signature against each row of ``z`` at once (one compiled pass).

        The sums run term by term in signature order, as :meth:`DiagnosisPolicy.name_fault`
        adds them, so the figures are the same to the last bit.

        Returns:
            per row the best fault's position (-1 for none), its evidence, the total of
            the deviations beyond the noise, whether any is, and whether any deviation
            reaches ``explain_z``.
        """
        best, evidence, totals, moved, explained = kernels.evidence_rows(
            z, self.at, self.direction, self.two_way, self.weight, _NOISE_Z, explain_z
        )
        return best.tolist(), evidence.tolist(), totals.tolist(), moved.tolist(), explained.tolist()

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


def _moved(drivers: Sequence[Contribution]) -> str:
    """Plain words on which features moved and how far (in units of their healthy spread)."""
    if not drivers:
        return "no single feature beyond its noise"
    return "moved: " + ", ".join(f"{c.feature} {c.z:+.1f} sd" for c in drivers)
