"""Device health as the case machine reads it: stored scores from InfluxDB (notifier).

The diagnostics service writes each reading's anomaly score next to the telemetry
(measurement ``health``, tag ``device``, field ``score``, the reading's own time).
:class:`InfluxHealth` reads it back with InfluxQL through the same client the gateway
uses, so verification works on InfluxDB 1.x, 2.x and 3.x alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from notifier.actions import HealthPoint
from wire.influx import InfluxClient
from wire.influxql import quote_ident, quote_string
from wire.lineproto import HEALTH_MEASUREMENT
from wire.protocol import is_valid_device_id, ms_to_datetime

__all__ = ["InfluxHealth"]

_MAX_POINTS: Final = 20_000


def _points(rows: list[list[object]]) -> list[HealthPoint]:
    out = []
    for row in rows:
        ts, score = row[0], row[1]
        if isinstance(ts, int) and isinstance(score, int | float):
            out.append(HealthPoint(ms_to_datetime(ts), float(score)))
    return out


class InfluxHealth:
    """A :class:`~notifier.actions.HealthReader` on InfluxDB's ``health`` measurement.

    Args:
        client: an open InfluxDB client (owned by the caller).
        measurement: the measurement holding the scores.
    """

    def __init__(self, client: InfluxClient, measurement: str = HEALTH_MEASUREMENT) -> None:
        self._client = client
        self._measurement = measurement

    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        """Return the newest score of each device that has one."""
        ids = [d for d in device_ids if is_valid_device_id(d)]
        if not ids:
            return {}
        where = " OR ".join(f'"device" = {quote_string(d)}' for d in ids)
        series = await self._client.query(
            f'SELECT LAST("score") FROM "{self._measurement}" WHERE {where} GROUP BY "device"'
        )
        out: dict[str, HealthPoint] = {}
        for one in series:
            device = one.tags.get("device")
            points = _points(one.values)
            if device and points:
                out[device] = points[-1]
        return out

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        """Return a device's scores from ``start`` on (device time), oldest first."""
        if not is_valid_device_id(device_id):
            return []
        start_ns = int(start.astimezone(UTC).timestamp() * 1000) * 1_000_000
        series = await self._client.query(
            f'SELECT "score" FROM {quote_ident(self._measurement)} '
            f'WHERE "device" = {quote_string(device_id)} '
            f"AND time >= {start_ns} ORDER BY time ASC LIMIT {_MAX_POINTS}"
        )
        return [p for one in series for p in _points(one.values)]
