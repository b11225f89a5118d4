"""Remaining life from CSV files (behind ``fixloop ttf``).

Place in the pipeline: an offline door into ``diagnostics`` for exported histories. It
reads complete run-to-failure histories and partial histories of running units, fits
:func:`diagnostics.remaining.fit_remaining_life` on the former and writes, for each unit of
the latter, ``unit,remaining,low,high`` in the time column's unit.

What the files may look like:

- A header row; ``,`` or ``;`` between cells (guessed from the header); with ``;`` a
  decimal comma (``1,5``) is read as a number too.
- A unit column and a time column (names given; ``unit`` and ``time`` by default). Times
  are numbers (cycles, hours, seconds...) and must not go back within a unit; a unit's
  rows may be interleaved with other units' rows.
- In the history file every other column whose cells are all numbers (empty cells and
  ``NaN``/``NA``/``null`` are missing values) is a metric; other columns are ignored with
  a warning. Each history unit's last row is its failure.
- The input file must hold every metric of the history (other columns are ignored); a
  cell there that is not a number is refused with its line.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import numpy as np

from diagnostics.remaining import (
    DEFAULT_CANDIDATES,
    RemainingConfig,
    RemainingPrediction,
    UnitHistory,
    fit_remaining_life,
)
from wire.errors import ConfigError

__all__ = ["OUTPUT_COLUMNS", "TtfSummary", "predict_csv", "read_units"]

_LOG = logging.getLogger(__name__)

#: The columns of the output file.
OUTPUT_COLUMNS: Final = ("unit", "remaining", "low", "high")

_MISSING: Final = frozenset({"", "nan", "na", "n/a", "null", "none", "-"})


@dataclass(frozen=True, slots=True)
class TtfSummary:
    """What one ``predict_csv`` run did.

    Attributes:
        history_units: run-to-failure histories learnt from.
        history_rows: their rows.
        units: running units predicted (rows written).
        metrics: the metric columns read.
        used_metrics: the metrics the model found informative.
        ignored: history columns not read (not numeric).
        regimes: operating regimes found (1: none).
        cv_rmse: cross-validated error of the chosen settings on the histories.
    """

    history_units: int
    history_rows: int
    units: int
    metrics: tuple[str, ...]
    used_metrics: tuple[str, ...]
    ignored: tuple[str, ...]
    regimes: int
    cv_rmse: float


@dataclass(frozen=True, slots=True)
class _Table:
    """A CSV file read whole: header, rows (with their line numbers), separator."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]
    separator: str


def predict_csv(
    history: str | os.PathLike[str],
    in_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | TextIO,
    *,
    unit_column: str = "unit",
    time_column: str = "time",
    cap: float | None = None,
    coverage: float = 0.8,
    seed: int = 0,
    candidates: Sequence[RemainingConfig] = DEFAULT_CANDIDATES,
    progress: Callable[[str], None] | None = None,
) -> TtfSummary:
    """Learn from run-to-failure histories and predict the remaining life of running units.

    Args:
        history: CSV of complete histories (each unit's last row is its failure).
        in_path: CSV of partial histories of running units.
        out: a path to write (replaced atomically when done) or an open text stream.
        unit_column: the column naming the unit.
        time_column: the column holding time (a number).
        cap: remaining time above which targets are learnt as the cap (None: no cap).
        coverage: the share of outcomes the band ``[low, high]`` should hold.
        seed: seed of the cross-validation folds and of the boosting.
        candidates: the model settings to choose from by cross-validation over units.
        progress: called with a short line as each step starts (None: silent).

    Returns:
        A summary of the run.

    Raises:
        ConfigError: a file is missing, empty or malformed (with its line where there is
            one), a column is missing, there is no numeric metric, or a setting is wrong.
    """
    say = progress if progress is not None else (lambda _line: None)
    say(f"reading {history}")
    metrics, ignored, histories = read_units(
        history, unit_column=unit_column, time_column=time_column
    )
    rows = sum(h.times.shape[0] for h in histories)
    say(f"{len(histories)} histories, {rows:,} rows, {len(metrics)} metrics")
    say(f"reading {in_path}")
    _, _, running = read_units(
        in_path, unit_column=unit_column, time_column=time_column, metrics=metrics
    )
    model = fit_remaining_life(
        histories,
        metrics,
        cap=cap,
        coverage=coverage,
        candidates=candidates,
        seed=seed,
        progress=say,
    )
    say(f"predicting {len(running)} units")
    predictions = model.predict(running)
    _write(out, predictions)
    return TtfSummary(
        history_units=len(histories),
        history_rows=rows,
        units=len(predictions),
        metrics=metrics,
        used_metrics=model.used_columns,
        ignored=ignored,
        regimes=model.regimes,
        cv_rmse=min(model.cv_rmse),
    )


def read_units(
    path: str | os.PathLike[str],
    *,
    unit_column: str = "unit",
    time_column: str = "time",
    metrics: tuple[str, ...] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...], list[UnitHistory]]:
    """Read a CSV file of units' rows.

    Args:
        path: the CSV file.
        unit_column: the column naming the unit.
        time_column: the column holding time (a number).
        metrics: the metric columns to read (None: every numeric column but unit and time).

    Returns:
        The metric columns, the columns ignored, and each unit's rows in file order
        (units in order of first appearance).

    Raises:
        ConfigError: the file cannot be read, a column is missing, a time is not a
            number or goes back, or there is no numeric metric.
    """
    table = _read(Path(path))
    index = {name: i for i, name in enumerate(table.header)}
    for role, name, flag in (
        ("unit", unit_column, "--unit-column"),
        ("time", time_column, "--time-column"),
    ):
        if name not in index:
            raise ConfigError(
                f"{table.path}: no {role} column {name!r} (columns: {', '.join(table.header)});"
                f" name it with {flag}"
            )
    if unit_column == time_column:
        raise ConfigError(f"the unit and time columns must differ (both {unit_column!r})")
    if metrics is None:
        metrics, ignored = _numeric_columns(table, {unit_column, time_column})
    else:
        absent = [m for m in metrics if m not in index]
        if absent:
            raise ConfigError(
                f"{table.path} lacks metric column(s) of the history: {', '.join(absent)}"
            )
        ignored = tuple(
            n for n in table.header if n not in metrics and n not in (unit_column, time_column)
        )
    u_at, t_at = index[unit_column], index[time_column]
    m_at = [index[m] for m in metrics]
    grouped: dict[str, tuple[list[float], list[list[float]], list[int]]] = {}
    for line_no, cells in table.rows:
        unit = cells[u_at].strip()
        if not unit:
            raise ConfigError(f"{table.path} line {line_no}: no unit in column {unit_column!r}")
        time = _number(cells[t_at], table.separator)
        if time is None or not math.isfinite(time):
            raise ConfigError(
                f"{table.path} line {line_no}: time {cells[t_at].strip()!r} in column"
                f" {time_column!r} is not a number"
            )
        values = []
        for name, at in zip(metrics, m_at, strict=True):
            cell = cells[at]
            value = _number(cell, table.separator)
            if value is None:
                if cell.strip().lower() not in _MISSING:
                    raise ConfigError(
                        f"{table.path} line {line_no}: {name} = {cell.strip()!r} is not a number"
                    )
                value = math.nan
            values.append(value if math.isfinite(value) else math.nan)
        times, rows, lines = grouped.setdefault(unit, ([], [], []))
        if times and time < times[-1]:
            raise ConfigError(
                f"{table.path} line {line_no}: time {time:g} of unit {unit} goes back"
                f" (line {lines[-1]} had {times[-1]:g})"
            )
        times.append(time)
        rows.append(values)
        lines.append(line_no)
    units = [
        UnitHistory(
            unit,
            np.asarray(times, dtype=np.float64),
            np.asarray(rows, dtype=np.float64).reshape(len(times), len(metrics)),
        )
        for unit, (times, rows, _lines) in grouped.items()
    ]
    return metrics, ignored, units


def _read(path: Path) -> _Table:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise ConfigError(f"file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path} is a directory, not a CSV file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text: {exc.reason}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path} is empty (a header row is needed)")
    separator = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.reader(lines, delimiter=separator)
    try:
        header = [cell.strip() for cell in next(reader)]
        duplicated = sorted({n for n in header if header.count(n) > 1})
        if duplicated:
            raise ConfigError(f"{path} line 1: column(s) named twice: {', '.join(duplicated)}")
        rows = []
        for cells in reader:
            line_no = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise ConfigError(
                    f"{path} line {line_no}: {len(cells)} cells, the header has {len(header)}"
                )
            rows.append((line_no, cells))
    except csv.Error as exc:
        raise ConfigError(f"{path} line {reader.line_num}: {exc}") from exc
    if not rows:
        raise ConfigError(f"{path} has a header but no data rows")
    return _Table(path, header, rows, separator)


def _numeric_columns(table: _Table, skip: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    metrics, ignored = [], []
    for at, name in enumerate(table.header):
        if name in skip:
            continue
        given = False
        bad_line = None
        for line_no, cells in table.rows:
            cell = cells[at]
            if _number(cell, table.separator) is not None:
                given = True
            elif cell.strip().lower() not in _MISSING:
                bad_line = line_no
                break
        if given and bad_line is None:
            metrics.append(name)
        else:
            why = f"not a number on line {bad_line}" if bad_line is not None else "no values"
            _LOG.warning("%s: column %r ignored (%s)", table.path, name, why)
            ignored.append(name)
    if not metrics:
        raise ConfigError(
            f"{table.path} has no numeric metric column besides the unit and time"
            f" (columns: {', '.join(table.header)})"
        )
    return tuple(metrics), tuple(ignored)


def _number(cell: str, separator: str) -> float | None:
    text = cell.strip()
    if separator == ";":
        text = text.replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _write(out: str | os.PathLike[str] | TextIO, predictions: list[RemainingPrediction]) -> None:
    if isinstance(out, str | os.PathLike):
        with _atomic(Path(out)) as stream:
            _write_rows(stream, predictions)
    else:
        _write_rows(out, predictions)


def _write_rows(stream: TextIO, predictions: list[RemainingPrediction]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(OUTPUT_COLUMNS)
    for p in predictions:
        writer.writerow([p.unit, f"{p.remaining:.6g}", f"{p.low:.6g}", f"{p.high:.6g}"])


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[TextIO]:
    """Write to a temporary file beside ``path``, renamed over it only on success."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
            yield stream
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
