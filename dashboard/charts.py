"""The dashboard's charts as tables: one form for the page (JSON) and for download (CSV).

Each chart of the page (fleet health over time, cases per day, fixes and ratings over
time, failure rates per firmware and batch) is drawn from a :class:`Table`; the same
table is what ``/ops/api/charts/<name>.csv`` (or ``?format=csv``) downloads, so the
figures a person sees and the ones they take to a spreadsheet cannot differ.

CSV follows RFC 4180 (comma, ``CRLF``, quotes doubled), with a header row; an empty
cell is a missing value. A text cell that a spreadsheet would take for a formula
(starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is prefixed with
``'`` (OWASP, "CSV injection"): model names and batches come from registry imports,
firmware versions from devices.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

__all__ = ["CHARTS", "Table", "csv_filename", "to_csv"]

#: The charts offered, by name.
CHARTS: Final = ("fleet-health", "cases", "fixes", "failure-rates")
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
_SAFE_NAME: Final = re.compile(r"[^a-z0-9-]")


@dataclass(frozen=True, slots=True)
class Table:
    """One chart's data: named columns and rows of numbers and text.

    Attributes:
        name: the chart (one of :data:`CHARTS`).
        columns: column names; the first is the x axis (a time, a day or a group).
        rows: one tuple per point, in ``columns`` order (``None``: no value).
        meta: what the page needs besides (the range, bucket width, thresholds).
    """

    name: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        name: str,
        columns: Sequence[str],
        records: Iterable[Mapping[str, Any]],
        meta: Mapping[str, Any] | None = None,
    ) -> Table:
        """A table of ``records`` (dicts) with the values of ``columns`` in that order."""
        return cls(
            name,
            tuple(columns),
            [tuple(record.get(c) for c in columns) for record in records],
            dict(meta or {}),
        )

    def as_json(self) -> dict[str, Any]:
        """JSON-ready: ``chart``, ``columns``, ``rows`` and the meta keys."""
        return {
            **self.meta,
            "chart": self.name,
            "columns": list(self.columns),
            "rows": [list(row) for row in self.rows],
        }


def _cell(value: Any) -> str | int | float:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(table: Table) -> bytes:
    """The table as UTF-8 CSV with a header row (RFC 4180)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([_cell(c) for c in table.columns])
    writer.writerows([_cell(v) for v in row] for row in table.rows)
    return out.getvalue().encode()


def csv_filename(name: str, at: datetime) -> str:
    """``fixloop-<chart>-<UTC date>.csv`` (only letters, digits and dashes in it)."""
    return f"fixloop-{_SAFE_NAME.sub('-', name.lower())}-{at.date().isoformat()}.csv"
