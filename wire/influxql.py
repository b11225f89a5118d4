"""InfluxQL quoting, the one copy every stage's queries use (wire: shared by all stages).

Identifiers (database, measurement, field and tag keys) go in double quotes, string
literals (tag values in ``WHERE``) in single quotes; a backslash, the quote and a newline
are escaped in both, so no value can end the quoted text or start a second statement.
Pure Python and free of imports, so a synchronous caller (``fixloop.stack``) can use it
without loading the HTTP client.
"""

from __future__ import annotations

__all__ = ["quote_ident", "quote_string"]


def quote_ident(name: str) -> str:
    """Quote an InfluxQL identifier (database, measurement, field or tag key)."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def quote_string(value: str) -> str:
    """Quote an InfluxQL string literal (a tag value in ``WHERE``)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"
