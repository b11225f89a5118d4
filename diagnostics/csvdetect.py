"""Score a CSV file of telemetry with the streaming detector (behind ``fixloop detect``).

Place in the pipeline: an offline door into ``diagnostics`` for exported telemetry or any
numeric time series. Rows stream through :class:`~diagnostics.stream.StreamDetector` in
file order, each scored from the rows before it only, and are written back unchanged
with two columns added: ``anomaly_score`` in [0, 1] and ``anomaly`` (1 at or above the
detector's operating threshold, 0 below). Rows in the warm-up score 0.

What the file may look like:

- The separator is ``,`` or ``;`` (guessed from the header unless given). With ``;`` a
  decimal comma (``1,5``) is read as a number too.
- The timestamp column is the first one whose cells parse as ISO 8601 date-times, or the
  one named by ``timestamp_column`` (which may also hold plain numbers: seconds). Without
  one, rows are taken as equally spaced. Times without a zone are read as UTC.
- Timestamps may be irregular and may repeat, but must not go back: a file out of order
  is refused with the line number, so that nothing is silently reordered.
- Every other column whose cells are numbers (the first rows decide) is watched; other
  columns are ignored with a warning. Empty cells and ``NaN``/``NA``/``null`` are missing
  values; a later cell that is not a number is also taken as missing and counted.
- Columns already named ``anomaly_score`` or ``anomaly`` (an earlier run's output, or
  labels) are never watched.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from diagnostics.stream import StreamConfig, StreamDetector
from gateway.errors import ConfigError, PermanentError

__all__ = ["OUTPUT_COLUMNS", "DetectSummary", "detect_csv"]

_LOG = logging.getLogger(__name__)

#: Columns that ``detect_csv`` appends to every row.
OUTPUT_COLUMNS: Final = ("anomaly_score", "anomaly")

_MISSING: Final = frozenset({"", "nan", "na", "n/a", "null", "none", "-"})
_SNIFF_ROWS: Final = 200
_PROGRESS_EVERY: Final = 10_000


@dataclass(frozen=True, slots=True)
class DetectSummary:
    """What one ``detect_csv`` run did.

    Attributes:
        rows: data rows written.
        anomalies: rows flagged at the operating threshold.
        columns: the watched columns, in file order.
        ignored: columns not watched (not numeric, or named like the output).
        timestamp_column: the column read as time, or None for equal steps.
        bad_cells: cells in watched columns that were not numbers (taken as missing).
    """

    rows: int
    anomalies: int
    columns: tuple[str, ...]
    ignored: tuple[str, ...]
    timestamp_column: str | None
    bad_cells: int


@dataclass(frozen=True, slots=True)
class _Layout:
    """Which column is time and which are watched."""

    time_index: int | None
    value_indices: tuple[int, ...]
    not_numeric: tuple[str, ...]
    output_named: tuple[str, ...]
    time_is_numeric: bool


class _LineTracker:
    """Iterate a text file's lines while remembering the raw text of each CSV record."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.pending: list[str] = []
        self.line_no = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._stream)
        self.line_no += 1
        self.pending.append(line)
        return line

    def take(self) -> str:
        """Return the raw text of the record just parsed, without its line ending."""
        text = "".join(self.pending)
        self.pending = []
        return text.rstrip("\r\n")


def detect_csv(
    in_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | TextIO,
    *,
    timestamp_column: str | None = None,
    warmup_rows: int = 400,
    separator: str | None = None,
    progress: TextIO | None = None,
    config: StreamConfig | None = None,
) -> DetectSummary:
    """Score every row of a CSV file and write it back with the score columns.

    Args:
        in_path: the CSV file to read.
        out: a path to write (replaced atomically when done) or an open text stream.
        timestamp_column: the column holding time; guessed when None.
        warmup_rows: rows the detector learns from before it scores.
        separator: ``,`` or ``;``; guessed from the header when None.
        progress: where to write a progress line every 10,000 rows (None: silent).
        config: detector settings; ``warmup_rows`` overrides its warm-up length.

    Returns:
        A summary of the run.

    Raises:
        ConfigError: the file is missing, empty or malformed, has no numeric column,
            unparsable or decreasing timestamps, or a setting is wrong.
    """
    path = Path(in_path)
    base = config if config is not None else StreamConfig()
    detector_config = replace(base, warmup_rows=warmup_rows)
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
    config: StreamConfig,
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
    config: StreamConfig,
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
    records = _records(reader, tracker, path, len(header))
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
            "not watching columns named like the output (labels or an earlier run): %s",
            ", ".join(layout.output_named),
        )
    time_name = None if layout.time_index is None else header[layout.time_index]
    if time_name is None:
        _LOG.info("no timestamp column found: rows are taken as equally spaced")

    detector = StreamDetector(config)
    sink.write(f"{header_text}{sep}{sep.join(OUTPUT_COLUMNS)}{newline}")
    rows = anomalies = bad_cells = 0
    previous: tuple[float, int] | None = None

    def all_records() -> Iterator[tuple[int, list[str], str]]:
        yield from ahead
        yield from records

    for line_no, fields, raw in all_records():
        stamp: float | None = None
        if layout.time_index is not None:
            stamp = _parse_time(fields[layout.time_index], layout.time_is_numeric)
            if stamp is None:
                raise ConfigError(
                    f"{path} line {line_no}: cannot read timestamp "
                    f"{fields[layout.time_index]!r} in column {time_name!r}"
                )
            if previous is not None and stamp < previous[0]:
                raise ConfigError(
                    f"{path} line {line_no}: timestamp {fields[layout.time_index]!r} is "
                    f"earlier than line {previous[1]}'s; sort the file by time first "
                    "(irregular or repeated times are fine, going back is not)"
                )
            previous = (stamp, line_no)
        values = []
        for index in layout.value_indices:
            value = _parse_number(fields[index], sep)
            if value is None:
                bad_cells += 1
                value = math.nan
            values.append(value)
        try:
            score = detector.score_stream([values], None if stamp is None else [stamp])[0]
        except PermanentError as exc:
            raise ConfigError(f"{path} line {line_no}: {exc}") from exc
        flag = int(score >= detector.threshold)
        anomalies += flag
        rows += 1
        sink.write(f"{raw}{sep}{score:.6f}{sep}{flag}{newline}")
        if progress is not None and rows % _PROGRESS_EVERY == 0:
            progress.write(f"fixloop detect: {rows} rows, {anomalies} anomalous\n")
            progress.flush()
    if detector.ready and detector.ignored_columns:
        _LOG.info(
            "constant or empty during warm-up, so not scored: %s",
            ", ".join(watched[i] for i in detector.ignored_columns),
        )
    if not detector.ready:
        _LOG.warning(
            "only %d rows with values: the warm-up needs %d, so every score is 0",
            rows,
            config.warmup_rows,
        )
    if bad_cells:
        _LOG.warning("%d cells were not numbers and were taken as missing", bad_cells)
    return DetectSummary(
        rows=rows,
        anomalies=anomalies,
        columns=watched,
        ignored=layout.not_numeric + layout.output_named,
        timestamp_column=time_name,
        bad_cells=bad_cells,
    )


def _replay_first(first: str, tracker: _LineTracker) -> Iterator[str]:
    """Yield the already-read first line, then the rest through the tracker."""
    yield first
    yield from tracker


def _records(
    reader: Iterator[list[str]], tracker: _LineTracker, path: Path, width: int
) -> Iterator[tuple[int, list[str], str]]:
    """Yield ``(line number, fields, raw text)`` per data record; blank lines are skipped."""
    while True:
        start = tracker.line_no + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ConfigError(f"{path} line {start}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} near line {start}: not UTF-8 text") from exc
        raw = tracker.take()
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != width:
            raise ConfigError(
                f"{path} line {start}: {len(fields)} fields where the header has {width}"
            )
        yield start, fields, raw


def _guess_separator(header_line: str) -> str:
    return ";" if header_line.count(";") > header_line.count(",") else ","


def _layout(
    header: list[str],
    sample: list[list[str]],
    timestamp_column: str | None,
    sep: str,
    path: Path,
) -> _Layout:
    names = [name.strip() for name in header]
    time_index: int | None = None
    time_is_numeric = False
    if timestamp_column is not None:
        if timestamp_column not in names:
            raise ConfigError(
                f"{path} has no column {timestamp_column!r} (columns: {', '.join(names)})"
            )
        time_index = names.index(timestamp_column)
        cells = [row[time_index] for row in sample]
        time_is_numeric = all(_parse_number(cell, sep) is not None for cell in cells)
        for cell in cells:
            if _parse_time(cell, time_is_numeric) is None:
                raise ConfigError(
                    f"{path}: cannot read {cell!r} in column {timestamp_column!r} as a time"
                )
    else:
        for index in range(len(names)):
            cells = [row[index].strip() for row in sample]
            if all(cells) and all(_parse_time(cell, numeric=False) is not None for cell in cells):
                time_index = index
                break
    values: list[int] = []
    ignored: list[str] = []
    output_named: list[str] = []
    for index, name in enumerate(names):
        if index == time_index:
            continue
        if name in OUTPUT_COLUMNS:
            output_named.append(name)
            continue
        cells = [row[index] for row in sample]
        parsed = [_parse_number(cell, sep) for cell in cells]
        present = [cell for cell in cells if cell.strip().lower() not in _MISSING]
        if present and all(value is not None for value in parsed):
            values.append(index)
        else:
            ignored.append(name)
    if not values:
        raise ConfigError(f"{path} has no numeric column to watch (columns: {', '.join(names)})")
    return _Layout(time_index, tuple(values), tuple(ignored), tuple(output_named), time_is_numeric)


def _parse_number(cell: str, sep: str) -> float | None:
    """A cell as a float; NaN for a missing marker; None when it is not a number."""
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        pass
    if sep == ";" and text.count(",") == 1 and "." not in text:
        try:
            return float(text.replace(",", "."))
        except ValueError:
            return None
    return None


def _parse_time(cell: str, numeric: bool) -> float | None:
    """A timestamp cell as seconds since the epoch, or None when it is not one."""
    text = cell.strip()
    if not text:
        return None
    if numeric:
        try:
            value = float(text)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    # fromisoformat takes "2020-03-09 10:14:33" and "2020-03-09T10:14:33.5+01:00"; a
    # trailing "Z" is accepted since Python 3.11. Plain numbers are not times here.
    if text[0] not in "0123456789" or text.replace(".", "", 1).isdigit():
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
