"""Reading a CSV file of telemetry for ``fixloop detect`` (diagnostics, an offline door).

How :mod:`diagnostics.csvdetect` reads a file it scores: the separator guessed from the
header, which column is time (by name, or plain numbers read as epoch seconds or
milliseconds) and which are watched (numeric ones; label columns never), records
split fast when unquoted and through the csv module when quoted (a quoted record may
span lines), cells read as numbers or times with missing markers taken as missing, and
the raw text of every record kept so that it is written back unchanged.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

import numpy as np

from wire.errors import ConfigError

__all__ = ["OUTPUT_COLUMNS"]

#: Columns that ``detect_csv`` appends to every row (never watched when a file has them).
OUTPUT_COLUMNS: Final = ("anomaly_score", "anomaly")

_MISSING: Final = frozenset({"", "nan", "na", "n/a", "null", "none", "-"})
#: Names of a column read as time when it holds plain numbers (epoch seconds or ms).
_TIME_NAMES: Final = frozenset(
    {"timestamp", "time", "datetime", "date", "ts", "epoch", "unix_time", "time_s", "t_s"}
)
#: Names of label columns: never watched (a detector must not read the answers).
_LABEL_NAMES: Final = frozenset({"label", "labels", "is_anomaly", "changepoint", "anomaly_label"})


@dataclass(frozen=True, slots=True)
class _Layout:
    """Which column is time and which are watched."""

    time_index: int | None
    value_indices: tuple[int, ...]
    not_numeric: tuple[str, ...]
    output_named: tuple[str, ...]
    time_is_numeric: bool
    time_scale: float = 1.0  # seconds per unit of a numeric time column


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


def _replay_first(first: str, tracker: _LineTracker) -> Iterator[str]:
    """Yield the already-read first line, then the rest through the tracker."""
    yield first
    yield from tracker


def _records(
    stream: TextIO, line_no: int, path: Path, width: int, sep: str
) -> Iterator[tuple[int, list[str], str]]:
    """Yield ``(line number, fields, raw text)`` per data record; blank lines are skipped.

    A line without quotes is split as it is (the common case, and many times faster
    than the csv module); a record with quotes, which may span lines, goes through it.
    """
    lines = iter(stream)
    while True:
        try:
            line = next(lines, None)
            if line is None:
                return
            line_no += 1
            start = line_no
            if '"' in line:
                while line.count('"') % 2:
                    more = next(lines, None)
                    if more is None:
                        break
                    line += more
                    line_no += 1
                raw = line.rstrip("\r\n")
                try:
                    fields = next(csv.reader(io.StringIO(raw), delimiter=sep), [])
                except csv.Error as exc:
                    raise ConfigError(f"{path} line {start}: {exc}") from exc
            else:
                raw = line.rstrip("\r\n")
                fields = raw.split(sep)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} near line {line_no + 1}: not UTF-8 text") from exc
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
    time_scale = 1.0
    if time_index is None and timestamp_column is None:
        time_index, time_scale = _numeric_time(names, sample, sep)
        time_is_numeric = time_index is not None
    values: list[int] = []
    ignored: list[str] = []
    output_named: list[str] = []
    for index, name in enumerate(names):
        if index == time_index:
            continue
        if name in OUTPUT_COLUMNS or name.lower() in _LABEL_NAMES:
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
    return _Layout(
        time_index, tuple(values), tuple(ignored), tuple(output_named), time_is_numeric, time_scale
    )


def _numeric_time(names: list[str], sample: list[list[str]], sep: str) -> tuple[int | None, float]:
    """A column named like time holding rising numbers: epoch seconds or milliseconds."""
    for index, name in enumerate(names):
        if name.lower() not in _TIME_NAMES:
            continue
        parsed = [_parse_number(row[index], sep) for row in sample]
        numbers = np.asarray([math.nan if v is None else v for v in parsed], dtype=np.float64)
        if not numbers.size or not np.isfinite(numbers).all():
            continue
        steps = np.diff(numbers)
        if steps.size and np.mean(steps >= 0) < 0.9:
            continue  # not a clock
        scale = 0.001 if float(np.median(np.abs(numbers))) > 1e11 else 1.0
        return index, scale
    return None, 1.0


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
