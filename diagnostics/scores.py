"""What the diagnostics engine hands out: reading scores, round results, mismatches.

Place in the pipeline: :class:`~diagnostics.engine.DiagnosticsEngine` returns an
:class:`EngineResult` per call of ``process`` (its scores by column, its diagnosis
changes); the service writes the scores to InfluxDB and publishes the diagnoses. These
types are plain data (no numpy), re-exported by :mod:`diagnostics.engine`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from diagnostics.model import Diagnosis

__all__ = ["EngineResult", "Mismatch", "ReadingScore", "ReadingScores", "ScoreColumns"]


@dataclass(frozen=True, slots=True)
class Mismatch:
    """What one product model's devices send that no product file describes.

    Attributes:
        model: the product model (:data:`~diagnostics.engine.UNKNOWN_MODEL` for devices
            that never said).
        has_file: whether a product file describes the model.
        count: without a file, its readings (every metric scored generically); with
            one, the metric values its file does not list.
        metrics: the metrics concerned, sorted: without a file every metric seen, with
            one those its file does not list.
    """

    model: str
    has_file: bool
    count: int
    metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadingScore:
    """The score of one reading.

    Attributes:
        device_id: the device.
        ts_ms: the reading's own time.
        score: combined anomaly score in ``[0, 1]`` (higher = more anomalous; at least the
            policy's open threshold while a wear indicator drifts away, see the trend trigger).
        baseline: the device-baseline score.
        fleet: the fleet-model score (0 without a fleet model, or once the device's own
            baseline is warm for most features).
        late: the reading was older than the device's last one: scored, changed nothing.
    """

    device_id: str
    ts_ms: int
    score: float
    baseline: float
    fleet: float
    late: bool = False


@dataclass(frozen=True, slots=True)
class ReadingScores(Sequence[ReadingScore]):
    """The scores of many readings, held by column; a sequence of :class:`ReadingScore`.

    The engine scores readings in arrays and the service writes them out column by
    column, so a round's scores are never turned into one object per reading unless a
    caller indexes or iterates.

    Attributes:
        device_ids: each reading's device.
        ts_ms: each reading's own time.
        score: combined anomaly scores (see :attr:`ReadingScore.score`).
        baseline: device-baseline scores.
        fleet: fleet-model scores.
        late: which readings were late.
    """

    device_ids: tuple[str, ...] = ()
    ts_ms: tuple[int, ...] = ()
    score: tuple[float, ...] = ()
    baseline: tuple[float, ...] = ()
    fleet: tuple[float, ...] = ()
    late: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.device_ids)

    @overload
    def __getitem__(self, index: int) -> ReadingScore: ...

    @overload
    def __getitem__(self, index: slice) -> ReadingScores: ...

    def __getitem__(self, index: int | slice) -> ReadingScore | ReadingScores:
        if isinstance(index, slice):
            return ReadingScores(*(column[index] for column in self._columns()))
        return ReadingScore(*(column[index] for column in self._columns()))

    def __iter__(self) -> Iterator[ReadingScore]:
        return map(ReadingScore, *self._columns())

    def _columns(self) -> tuple[tuple[Any, ...], ...]:
        return (self.device_ids, self.ts_ms, self.score, self.baseline, self.fleet, self.late)


@dataclass(slots=True)
class ScoreColumns:
    """The columns of :class:`ReadingScores` while a batch is being scored."""

    device_ids: list[str] = field(default_factory=list)
    ts_ms: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    fleet: list[float] = field(default_factory=list)
    late: list[bool] = field(default_factory=list)

    def freeze(self) -> ReadingScores:
        """Return the columns as :class:`ReadingScores`."""
        return ReadingScores(
            tuple(self.device_ids),
            tuple(self.ts_ms),
            tuple(self.score),
            tuple(self.baseline),
            tuple(self.fleet),
            tuple(self.late),
        )


@dataclass(frozen=True, slots=True)
class EngineResult:
    """What one call of :meth:`~diagnostics.engine.DiagnosticsEngine.process` produced.

    Attributes:
        scores: one per reading of a device of known model, in input order per device.
        diagnoses: diagnosis changes (open, update, closed), in the order they happened.
    """

    scores: ReadingScores
    diagnoses: tuple[Diagnosis, ...]
