"""One stream, one row at a time: a river-style face on the detector core (diagnostics stage).

Place in the pipeline: the gateway hands telemetry rows to ``diagnostics``; a
:class:`StreamDetector` scores one stream of rows with a one-slot
:class:`~diagnostics.detector.DetectorTable`, the same compiled core that ``fixloop detect``
and the live service step, so it behaves exactly as they do (see
:mod:`diagnostics.detector` for how rows are scored and when an alert is an event).
Scores are "higher = more anomalous" (STYLE.md rule 10): one minus a calibrated tail
probability, in [0, 1], with the operating point at :attr:`StreamDetector.threshold`.

The number of values per row is fixed by the first row. Nothing about the data is
refused: missing cells, constant columns, gaps, repeated and out-of-order timestamps are
all scored (an out-of-order row against the current state, teaching nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.detector import DetectorConfig, DetectorTable, StepResult
from wire.errors import PermanentError

__all__ = ["DEFAULT_THRESHOLD", "StreamConfig", "StreamDetector"]

#: Settings of a :class:`StreamDetector` (the core's settings under their older name).
StreamConfig = DetectorConfig

#: The operating point of a detector with the default settings (``1 - alpha``).
DEFAULT_THRESHOLD: Final = DetectorConfig().threshold

FloatArray = npt.NDArray[np.float64]


class StreamDetector:
    """Streaming anomaly detector: ``score_one`` / ``learn_one``, or ``score_stream``.

    Example::

        detector = StreamDetector()
        result = detector.step_stream(rows, timestamps)  # each row sees only the past
        alerts = result.event  # rising edges; result.active is the alert level
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self._config = config if config is not None else DetectorConfig()
        self._table: DetectorTable | None = None

    @property
    def config(self) -> DetectorConfig:
        """The settings this detector was built with."""
        return self._config

    @property
    def threshold(self) -> float:
        """Operating point: a score at or above it raises an alert (``1 - alpha``)."""
        return self._config.threshold

    @property
    def ready(self) -> bool:
        """Whether the detector has seen enough rows to raise alerts (``min_rows``)."""
        return self._table is not None and self._table.rows_seen(0) > self._config.min_rows

    @property
    def n_columns(self) -> int | None:
        """Number of values per row (fixed by the first row), or None before it."""
        return None if self._table is None else self._table.n_columns

    @property
    def ignored_columns(self) -> tuple[int, ...]:
        """Indices of columns that have never changed, so are not scored (yet)."""
        if self._table is None:
            return ()
        scored = set(self._table.scored_columns(0))
        return tuple(i for i in range(self._table.n_columns) if i not in scored)

    @property
    def table(self) -> DetectorTable | None:
        """The one-slot core table (None before the first row)."""
        return self._table

    def score_one(self, x: Sequence[float] | FloatArray, ts: float | None = None) -> float:
        """Score one row given the rows learnt so far, without learning it.

        Args:
            x: the row's values (NaN or inf for a missing cell).
            ts: its timestamp in seconds; None counts rows instead.

        Returns:
            The anomaly score in [0, 1].

        Raises:
            PermanentError: the row has the wrong length.
        """
        table, row, stamp = self._prepare(x, ts)
        return float(table.step([0], [stamp], row, learn=False).score[0])

    def learn_one(self, x: Sequence[float] | FloatArray, ts: float | None = None) -> None:
        """Take one row into the detector's memory.

        Args:
            x: the row's values (NaN or inf for a missing cell).
            ts: its timestamp in seconds; None counts rows instead.

        Raises:
            PermanentError: the row has the wrong length.
        """
        table, row, stamp = self._prepare(x, ts)
        table.step([0], [stamp], row)

    def score_stream(
        self,
        rows: Iterable[Sequence[float] | FloatArray],
        timestamps: Iterable[float] | None = None,
    ) -> FloatArray:
        """Score then learn each row in turn: row i is scored from rows before it only.

        Args:
            rows: rows of equal length (a 2-D array works).
            timestamps: one per row in seconds, or None to count rows.

        Returns:
            One score in [0, 1] per row.

        Raises:
            PermanentError: a row has the wrong length.
        """
        return self.step_stream(rows, timestamps).score

    def step_stream(
        self,
        rows: Iterable[Sequence[float] | FloatArray],
        timestamps: Iterable[float] | None = None,
    ) -> StepResult:
        """Like :meth:`score_stream`, returning events, alert levels and deviations too.

        Args:
            rows: rows of equal length (a 2-D array works).
            timestamps: one per row in seconds, or None to count rows.

        Returns:
            The core's per-row result.

        Raises:
            PermanentError: a row has the wrong length.
        """
        data = np.array(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.float64)
        if data.ndim == 1:
            data = data.reshape(-1, 1)  # a row per item, as iterating the rows gives
        if data.size == 0:
            width = self.n_columns or 1
            data = data.reshape(0, width)
        if timestamps is None:
            stamps = np.full(data.shape[0], math.nan)
        else:
            stamps = np.array(list(timestamps), dtype=np.float64)
        table = self._ensure(data.shape[1])
        return table.step(np.zeros(data.shape[0], dtype=np.int64), stamps, data)

    def _prepare(
        self, x: Sequence[float] | FloatArray, ts: float | None
    ) -> tuple[DetectorTable, FloatArray, float]:
        row = np.array(x, dtype=np.float64, copy=True).reshape(1, -1)
        table = self._ensure(row.shape[1])
        return table, row, math.nan if ts is None else float(ts)

    def _ensure(self, width: int) -> DetectorTable:
        if self._table is None:
            if width < 1:
                raise PermanentError("a row needs at least one value")
            self._table = DetectorTable(1, width, self._config)
        elif width != self._table.n_columns:
            raise PermanentError(f"row has {width} values, expected {self._table.n_columns}")
        return self._table
