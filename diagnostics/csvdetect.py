"""Score a CSV file of telemetry with the streaming detector (behind ``fixloop detect``).

Place in the pipeline: an offline door into ``diagnostics`` for exported telemetry or any
numeric time series. Rows stream in file order through one slot of the same detector
core the live service runs (:class:`~diagnostics.detector.DetectorTable`), each scored
from the rows before it only, and are written back unchanged with two columns added:

- ``anomaly``: 1 on the row where an alert *starts* (its rising edge: an event), else 0.
  A lasting deviation is one event, not a run of flagged rows, so a scorer that counts
  every flagged row as a detection (NAB-style windows: the first detection in a window
  earns, every detection outside one costs) sees one detection per alert.
- ``anomaly_score``: how surprising the row is, in [0, 1], on a log scale of its tail
  probability ``p`` under the learnt normal behaviour (the detector core's calibrated
  score is ``1 - p``): ``anomaly_score = log(p) / (2 log(alpha))``, so 0.5 is the
  operating point ``p = alpha`` and 1 is ``p = alpha ** 2`` or rarer. Outside an event
  row it is held just under 0.5, so ``anomaly_score >= 0.5`` marks exactly the
  ``anomaly`` rows, whichever column a scorer reads, and a scorer that sweeps its own
  threshold over the score ranks the events by how unlikely they were.

What the file may look like:

- The separator is ``,`` or ``;`` (guessed from the header unless given). With ``;`` a
  decimal comma (``1,5``) is read as a number too.
- The timestamp column is the first one whose cells parse as ISO 8601 date-times, or the
  one named by ``timestamp_column`` (which may also hold plain numbers: seconds). Without
  one, rows are taken as equally spaced. Times without a zone are read as UTC.
- Timestamps may be irregular, repeat, jump (a gap) or go back. A row earlier than the
  one before it is scored against what was learnt so far and teaches nothing; a cell
  that is not a time is taken as one typical step after the previous row. Each case is
  counted and reported on stderr as a warning; the file is never refused for it.
- Every other column whose cells are numbers (the first rows decide) is watched; other
  columns are ignored with a warning. Empty cells and ``NaN``/``NA``/``null`` are missing
  values; a later cell that is not a number is also taken as missing and counted.
- Columns already named ``anomaly_score`` or ``anomaly`` (an earlier run's output, or
  labels), or named like labels (``label``, ``is_anomaly``, ``changepoint`` ...), are
  never watched.
- Without an ISO time column, a column named like time (``timestamp``, ``time``, ``ts``,
  ``epoch`` ...) that holds rising plain numbers is read as epoch seconds (milliseconds
  when they are that large).
- A column that holds one value only (a constant, or leading zeros) is not scored until
  it changes; the rows it held its first value are counted per column, and one that
  never changes is reported as not scored. A flat stretch later on (one value repeated
  over :data:`FLAT_ROWS` rows or more: a stuck sensor, a stretch of zeros) is scored as
  it comes and counted. Missing cells are counted too (the column is not scored on
  that row and learns nothing from it).

Reading the file (separator, time and watched columns, records, cells) is
:mod:`diagnostics.csvread`; scoring the rows and writing them back is here.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, TextIO

import numpy as np
import numpy.typing as npt

from diagnostics.csvread import (
    OUTPUT_COLUMNS,
    _guess_separator,
    _Layout,
    _layout,
    _LineTracker,
    _parse_number,
    _parse_time,
    _records,
    _replay_first,
)
from diagnostics.detector import ROW_GAP, ROW_LATE, ROW_REPEATED, DetectorConfig, DetectorTable
from wire.errors import ConfigError

__all__ = [
    "FLAT_ROWS",
    "OPERATING_POINT",
    "OUTPUT_COLUMNS",
    "DetectSummary",
    "detect_csv",
    "surprise",
]

_LOG = logging.getLogger(__name__)

#: ``anomaly_score`` at the detector's operating point (tail probability ``alpha``).
OPERATING_POINT: Final = 0.5
#: Repeats of one value in a row that make a flat stretch (counted, never refused).
FLAT_ROWS: Final = 100
_SNIFF_ROWS: Final = 200

_PROGRESS_EVERY: Final = 10_000
_CHUNK_ROWS: Final = 4096


@dataclass(frozen=True, slots=True)
class DetectSummary:
    """What one ``detect_csv`` run did.

    Attributes:
        rows: data rows written.
        anomalies: alert events (rows with ``anomaly`` 1).
        columns: the watched columns, in file order.
        ignored: columns not watched (not numeric, or named like the output).
        timestamp_column: the column read as time, or None for equal steps.
        bad_cells: cells in watched columns that were not numbers (taken as missing).
        late_rows: rows earlier than the row before them (scored, not learnt).
        repeated_times: rows with the same time as the row before them.
        gaps: steps longer than the detector's gap factor times the typical step.
        bad_times: time cells that could not be read (taken as one step on).
        not_scored: watched columns that never changed, so were never scored.
        missing_cells: cells in watched columns that were empty or marked missing.
        flat_start: per watched column that held its first value for more than one row
            and then changed, the rows it held it (not scored until it changed).
        flat_stretches: per watched column with any, the flat stretches after its first
            change (one value repeated :data:`FLAT_ROWS` times or more in a row).
    """

    rows: int
    anomalies: int
    columns: tuple[str, ...]
    ignored: tuple[str, ...]
    timestamp_column: str | None
    bad_cells: int
    late_rows: int = 0
    repeated_times: int = 0
    gaps: int = 0
    bad_times: int = 0
    not_scored: tuple[str, ...] = ()
    missing_cells: int = 0
    flat_start: tuple[tuple[str, int], ...] = ()
    flat_stretches: tuple[tuple[str, int], ...] = ()


def detect_csv(
    in_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | TextIO,
    *,
    timestamp_column: str | None = None,
    warmup_rows: int | None = None,
    separator: str | None = None,
    progress: TextIO | None = None,
    config: DetectorConfig | None = None,
) -> DetectSummary:
    """Score every row of a CSV file and write it back with the score columns.

    Args:
        in_path: the CSV file to read.
        out: a path to write (replaced atomically when done) or an open text stream.
        timestamp_column: the column holding time; guessed when None.
        warmup_rows: rows learnt before an alert may be raised (scores are given from
            the first rows on); None keeps the detector's own (``min_rows``, 20).
        separator: ``,`` or ``;``; guessed from the header when None.
        progress: where to write a progress line every 10,000 rows (None: silent).
        config: detector settings; ``warmup_rows`` overrides its ``min_rows``.

    Returns:
        A summary of the run.

    Raises:
        ConfigError: the file is missing, empty or malformed (not UTF-8, ragged rows),
            has no numeric column, or a setting is wrong. Data quality (times out of
            order, constant or empty stretches, bad cells) is counted, never refused.
    """
    path = Path(in_path)
    base = config if config is not None else DetectorConfig()
    if warmup_rows is not None and warmup_rows < 0:
        raise ConfigError(f"warm-up rows must be >= 0 (got {warmup_rows})")
    detector_config = base if warmup_rows is None else replace(base, min_rows=warmup_rows)
    if separator is not None and separator not in {",", ";"}:
        raise ConfigError(f"separator must be ',' or ';' (got {separator!r})")
    try:
        source = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError as exc:
        raise ConfigError(f"input file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"input is a directory, not a CSV file: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    with source:
        if isinstance(out, str | os.PathLike):
            return _to_file(source, path, Path(out), separator, timestamp_column,
                            detector_config, progress)  # fmt: skip
        return _run(source, path, out, separator, timestamp_column, detector_config, progress)


def _to_file(
    source: TextIO,
    path: Path,
    out_path: Path,
    separator: str | None,
    timestamp_column: str | None,
    config: DetectorConfig,
    progress: TextIO | None,
) -> DetectSummary:
    """Write to a temporary file beside ``out_path`` and rename it into place at the end."""
    try:
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent
        )
    except OSError as exc:
        raise ConfigError(f"cannot write {out_path}: {exc.strerror}") from exc
    try:
        with open(handle, "w", encoding="utf-8", newline="") as sink:
            summary = _run(source, path, sink, separator, timestamp_column, config, progress)
        # mkstemp makes the file private; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        try:
            Path(temp_name).replace(out_path)
        except OSError as exc:
            raise ConfigError(f"cannot write {out_path}: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temp_name).unlink()
        raise
    return summary


def _run(
    source: TextIO,
    path: Path,
    sink: TextIO,
    separator: str | None,
    timestamp_column: str | None,
    config: DetectorConfig,
    progress: TextIO | None,
) -> DetectSummary:
    tracker = _LineTracker(source)
    try:
        first = next(tracker)
    except StopIteration:
        raise ConfigError(f"{path} is empty") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc.reason}") from exc
    sep = separator if separator is not None else _guess_separator(first)
    newline = "\r\n" if first.endswith("\r\n") else "\n"
    reader = csv.reader(_replay_first(first, tracker), delimiter=sep)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ConfigError(f"{path} line 1: {exc}") from exc
    header_text = tracker.take()
    if not any(name.strip() for name in header):
        raise ConfigError(f"{path} is empty")

    # Read a few rows ahead to decide what each column holds.
    ahead: list[tuple[int, list[str], str]] = []
    records = _records(source, tracker.line_no, path, len(header), sep)
    for record in records:
        ahead.append(record)
        if len(ahead) >= _SNIFF_ROWS:
            break
    if not ahead:
        raise ConfigError(f"{path} has a header but no data rows")
    layout = _layout(header, [fields for _, fields, _ in ahead], timestamp_column, sep, path)
    watched = tuple(header[i] for i in layout.value_indices)
    if layout.not_numeric:
        _LOG.warning("ignoring columns that are not numeric: %s", ", ".join(layout.not_numeric))
    if layout.output_named:
        _LOG.warning(
            "not watching columns named like the output or labels: %s",
            ", ".join(layout.output_named),
        )
    time_name = None if layout.time_index is None else header[layout.time_index]
    if time_name is None:
        _LOG.info("no timestamp column found: rows are taken as equally spaced")

    table = DetectorTable(1, len(layout.value_indices), config)
    sink.write(f"{header_text}{sep}{sep.join(OUTPUT_COLUMNS)}{newline}")
    count = _Counts(flat=_Flat(len(watched)))

    def all_records() -> Iterator[tuple[int, list[str], str]]:
        yield from ahead
        yield from records

    chunk: list[tuple[int, list[str], str]] = []
    for record in all_records():
        chunk.append(record)
        if len(chunk) >= _CHUNK_ROWS:
            _score_chunk(chunk, layout, sep, table, sink, newline, count, progress)
            chunk = []
    if chunk:
        _score_chunk(chunk, layout, sep, table, sink, newline, count, progress)
    never = tuple(name for i, name in enumerate(watched) if i not in set(table.scored_columns(0)))
    flat = count.flat
    flat_start = tuple(
        (name, int(flat.lead[j]))
        for j, name in enumerate(watched)
        if flat.started[j] and flat.lead[j] > 1
    )
    stretches = tuple(
        (name, int(flat.stretches[j])) for j, name in enumerate(watched) if flat.stretches[j]
    )
    _warn_counts(count, never, time_name, flat_start, stretches)
    return DetectSummary(
        rows=count.rows,
        anomalies=count.events,
        columns=watched,
        ignored=layout.not_numeric + layout.output_named,
        timestamp_column=time_name,
        bad_cells=count.bad_cells,
        late_rows=count.late,
        repeated_times=count.repeated,
        gaps=count.gaps,
        bad_times=count.bad_times,
        not_scored=never,
        missing_cells=count.missing,
        flat_start=flat_start,
        flat_stretches=stretches,
    )


class _Flat:
    """Per watched column: the rows it held its first value, and its flat stretches."""

    def __init__(self, columns: int) -> None:
        self.prev = np.full(columns, math.nan)  # the last value seen (NaN: none yet)
        self.run = np.zeros(columns, dtype=np.int64)  # repeats of it in a row so far
        self.started = np.zeros(columns, dtype=np.bool_)  # changed from its first value
        self.lead = np.zeros(columns, dtype=np.int64)  # rows holding its first value
        self.stretches = np.zeros(columns, dtype=np.int64)

    def update(self, values: npt.NDArray[np.float64]) -> None:
        """Count one chunk of rows (missing cells neither break nor extend a stretch)."""
        for j in range(values.shape[1]):
            x = values[:, j]
            x = x[~np.isnan(x)]
            if x.size == 0:
                continue
            if math.isnan(self.prev[j]):
                self.prev[j] = x[0]
                self.lead[j] = 1
                x = x[1:]
                if x.size == 0:
                    continue
            same = np.empty(x.size, dtype=np.bool_)
            same[0] = x[0] == self.prev[j]
            np.equal(x[1:], x[:-1], out=same[1:])
            self.prev[j] = x[-1]
            breaks = np.flatnonzero(~same)
            if not self.started[j]:
                if breaks.size == 0:
                    self.lead[j] += x.size
                    continue
                self.lead[j] += int(breaks[0])
                self.started[j] = True
                self.run[j] = 0
                same = same[breaks[0] :]
                breaks = breaks - breaks[0]
            self._runs(j, same, breaks)

    def _runs(self, j: int, same: npt.NDArray[np.bool_], breaks: npt.NDArray[np.intp]) -> None:
        # a stretch is counted once, when its repeats reach FLAT_ROWS
        carried = int(self.run[j])
        if breaks.size == 0:
            run = carried + same.size
            self.stretches[j] += carried < FLAT_ROWS <= run
            self.run[j] = run
            return
        self.stretches[j] += carried < FLAT_ROWS <= carried + int(breaks[0])
        self.stretches[j] += int(np.count_nonzero(np.diff(breaks) - 1 >= FLAT_ROWS))
        last = same.size - int(breaks[-1]) - 1
        self.stretches[j] += last >= FLAT_ROWS
        self.run[j] = last


@dataclass(slots=True)
class _Counts:
    """Running tallies of one run (rows, events and every data-quality case)."""

    rows: int = 0
    events: int = 0
    bad_cells: int = 0
    bad_times: int = 0
    late: int = 0
    repeated: int = 0
    gaps: int = 0
    first_late_line: int = 0
    missing: int = 0
    flat: _Flat = field(default_factory=lambda: _Flat(0))


def _score_chunk(
    chunk: list[tuple[int, list[str], str]],
    layout: _Layout,
    sep: str,
    table: DetectorTable,
    sink: TextIO,
    newline: str,
    count: _Counts,
    progress: TextIO | None,
) -> None:
    """Parse, score and write one chunk of records (one compiled call per chunk)."""
    n = len(chunk)
    values = np.empty((n, len(layout.value_indices)))
    stamps = np.full(n, math.nan)
    time_index = layout.time_index
    for r, (_, fields, _) in enumerate(chunk):
        if time_index is not None:
            stamp = _parse_time(fields[time_index], layout.time_is_numeric)
            if stamp is None:
                count.bad_times += 1
            else:
                stamps[r] = stamp * layout.time_scale
        for j, index in enumerate(layout.value_indices):
            value = _parse_number(fields[index], sep)
            if value is None:
                count.bad_cells += 1
                value = math.nan
            elif value != value:
                count.missing += 1
            values[r, j] = value
    result = table.step(np.zeros(n, dtype=np.int64), stamps, values)
    count.flat.update(values)
    scores = surprise(result.score, table.config.alpha)
    # Rows that are not an event keep their score, held just under the operating point.
    scores = np.where(result.event, scores, np.minimum(scores, OPERATING_POINT - 1e-6))
    flags = result.flags
    late = (flags & ROW_LATE) != 0
    if late.any() and not count.first_late_line:
        count.first_late_line = chunk[int(np.argmax(late))][0]
    count.late += int(late.sum())
    count.repeated += int(((flags & ROW_REPEATED) != 0).sum())
    count.gaps += int(((flags & ROW_GAP) != 0).sum())
    events = result.event.astype(np.int8).tolist()
    count.events += int(sum(events))
    sink.write(
        "".join(
            f"{raw}{sep}{score:.6f}{sep}{flag}{newline}"
            for (_, _, raw), score, flag in zip(chunk, scores.tolist(), events, strict=True)
        )
    )
    before = count.rows // _PROGRESS_EVERY
    count.rows += n
    if progress is not None and count.rows // _PROGRESS_EVERY > before:
        progress.write(f"fixloop detect: {count.rows} rows, {count.events} alerts\n")
        progress.flush()


def _warn_counts(
    count: _Counts,
    never: tuple[str, ...],
    time_name: str | None,
    flat_start: tuple[tuple[str, int], ...],
    stretches: tuple[tuple[str, int], ...],
) -> None:
    """One warning line per data-quality case met (the file was scored regardless)."""
    if count.late:
        _LOG.warning(
            "%d rows earlier than the row before them (first at line %d): scored against "
            "what was learnt so far, not learnt",
            count.late,
            count.first_late_line,
        )
    if count.bad_times:
        _LOG.warning(
            "%d cells in column %r were not times: taken as one typical step on",
            count.bad_times,
            time_name,
        )
    if count.repeated:
        _LOG.warning("%d rows repeat the time of the row before them", count.repeated)
    if count.gaps:
        _LOG.warning("%d gaps in time: the uncertainty widened after each", count.gaps)
    if count.bad_cells:
        _LOG.warning("%d cells were not numbers and were taken as missing", count.bad_cells)
    if count.missing:
        _LOG.warning(
            "%d cells were empty or marked missing: not scored, nothing learnt", count.missing
        )
    if flat_start:
        _LOG.warning(
            "held their first value before changing (not scored until then): %s",
            ", ".join(f"{name} ({rows} rows)" for name, rows in flat_start),
        )
    if stretches:
        _LOG.warning(
            "%d flat stretches (one value repeated %d times or more in a row), scored as "
            "they came: %s",
            sum(k for _, k in stretches),
            FLAT_ROWS,
            ", ".join(f"{name} ({k})" for name, k in stretches),
        )
    if never:
        _LOG.warning("never changed, so not scored: %s", ", ".join(never))


def surprise(score: npt.NDArray[np.float64], alpha: float) -> npt.NDArray[np.float64]:
    """The core's score ``1 - p`` as ``log(p) / (2 log(alpha))`` in [0, 1] (0.5 at ``alpha``).

    Args:
        score: the detector core's scores (one minus a tail probability).
        alpha: the tail probability of the operating point.

    Returns:
        The scores on the log scale ``fixloop detect`` writes.
    """
    tail = np.clip(1.0 - score, 1e-300, 1.0)
    scaled = np.log(tail) / (2.0 * math.log(alpha))
    result: npt.NDArray[np.float64] = np.clip(scaled, 0.0, 1.0) + 0.0  # no "-0.000000"
    return result
