"""An owner's device data in InfluxDB: exported with their data, erased with it (notifier).

The case store holds what the owner loop knows about an owner; InfluxDB holds what their
devices sent (``telemetry``, ``device_events``) and what the models made of it
(``health``), every point tagged with the device's id. An owner's export includes those
points, and their erasure removes them, so nothing about an erased owner stays behind.

:class:`InfluxDeviceData` does both through InfluxQL on ``/query`` (InfluxDB 1.x, and
2.x through its v1-compatible API):

* :meth:`~InfluxDeviceData.export` streams every point of the given devices as JSON
  lines (one object a point: ``measurement``, ``device``, ``time`` in RFC 3339 and the
  point's fields and other tags), page by page in time order, so an export of years of
  telemetry never sits in memory whole.
* :meth:`~InfluxDeviceData.erase` deletes the devices' series (``DROP SERIES``), or, when
  the manufacturer keeps device history (``[notifier] erase_device_data = "rekey"``),
  first copies every point to the same series under an anonymous device id (fields
  written with their stored types) and then deletes the original series.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, Literal, Protocol

import orjson

from notifier.errors import InvalidRequestError
from wire.influx import InfluxClient
from wire.influxql import quote_ident, quote_string
from wire.lineproto import (
    EVENTS_MEASUREMENT,
    HEALTH_MEASUREMENT,
    TELEMETRY_MEASUREMENT,
    point_line,
)
from wire.protocol import is_valid_device_id

__all__ = ["DEVICE_MEASUREMENTS", "DeviceData", "EraseMode", "InfluxDeviceData"]

_LOG = logging.getLogger(__name__)
#: The measurements that hold points tagged with a device's id.
DEVICE_MEASUREMENTS: Final = (TELEMETRY_MEASUREMENT, EVENTS_MEASUREMENT, HEALTH_MEASUREMENT)
_PAGE: Final = 5_000
_WRITE_BATCH: Final = 5_000
EraseMode = Literal["delete", "rekey"]


class DeviceData(Protocol):
    """Where an owner's device data is exported from and erased (a role)."""

    def export(self, device_ids: Sequence[str]) -> AsyncIterator[bytes]:
        """Yield every point of the devices as JSON lines (each ending in a newline)."""

    async def erase(self, device_ids: Sequence[str], *, mode: EraseMode) -> int:
        """Delete (or re-key, then delete) every point of the devices; return points moved."""


def _valid(device_ids: Sequence[str]) -> list[str]:
    bad = [d for d in device_ids if not is_valid_device_id(d)]
    if bad:
        raise InvalidRequestError(f"not a device id: {bad[0]!r}")
    return list(dict.fromkeys(device_ids))


class InfluxDeviceData:
    """A :class:`DeviceData` on InfluxDB.

    Args:
        client: an open InfluxDB client (owned by the caller).
        measurements: the measurements whose points carry a ``device`` tag.
    """

    def __init__(
        self, client: InfluxClient, measurements: Sequence[str] = DEVICE_MEASUREMENTS
    ) -> None:
        self._client = client
        self._measurements = tuple(measurements)
        self._database_known = False

    async def _ready(self) -> None:
        # an install whose gateway has not written yet has no database: nothing to read,
        # and nothing to erase, rather than an error
        if not self._database_known:
            await self._client.ensure_database()
            self._database_known = True

    async def _points(
        self, measurement: str, device_id: str
    ) -> AsyncIterator[tuple[int, dict[str, object]]]:
        """A device's points of one measurement, oldest first: ``(ts_us, columns)``.

        Microseconds: the gateway keeps two readings of one millisecond apart below it.
        """
        await self._ready()
        after: int | None = None
        while True:
            since = "" if after is None else f" AND time > {after}u"
            series = await self._client.query(
                f"SELECT * FROM {quote_ident(measurement)} "
                f'WHERE "device" = {quote_string(device_id)}'
                f"{since} ORDER BY time ASC LIMIT {_PAGE}",
                epoch="u",
            )
            rows = [(one.columns, row) for one in series for row in one.values]
            if not rows:
                return
            for columns, row in rows:
                values = dict(zip(columns, row, strict=True))
                ts_us = values.pop("time")
                assert isinstance(ts_us, int)
                after = ts_us
                yield ts_us, {k: v for k, v in values.items() if v is not None}
            if len(rows) < _PAGE:
                return

    async def export(self, device_ids: Sequence[str]) -> AsyncIterator[bytes]:
        """Yield every point of the devices as JSON lines, device by device, oldest first.

        Raises:
            InvalidRequestError: a device id is not one.
            StoreUnavailableError: InfluxDB cannot be reached.
        """
        for device_id in _valid(device_ids):
            for measurement in self._measurements:
                async for ts_us, values in self._points(measurement, device_id):
                    values.pop("device", None)
                    at = datetime.fromtimestamp(ts_us // 1_000_000, tz=UTC).replace(
                        microsecond=ts_us % 1_000_000
                    )
                    head = {"measurement": measurement, "device": device_id, "time": at}
                    yield orjson.dumps(head | values, option=orjson.OPT_APPEND_NEWLINE)

    async def _schema(self, measurement: str) -> tuple[set[str], dict[str, str]]:
        """The measurement's tag keys and field types (``float``, ``integer`` ...)."""
        tags = {
            str(row[0])
            for one in await self._client.query(f"SHOW TAG KEYS FROM {quote_ident(measurement)}")
            for row in one.values
        }
        fields = {
            str(row[0]): str(row[1])
            for one in await self._client.query(f"SHOW FIELD KEYS FROM {quote_ident(measurement)}")
            for row in one.values
        }
        return tags, fields

    async def _rekey(self, measurement: str, device_id: str, anonymous: str) -> int:
        tags, types = await self._schema(measurement)
        moved = 0
        batch: list[bytes] = []
        async for ts_us, values in self._points(measurement, device_id):
            point_tags: dict[str, str] = {"device": anonymous}
            fields: dict[str, float | int | bool | str] = {}
            for name, value in values.items():
                if name == "device":
                    continue
                if name in tags:
                    point_tags[name] = str(value)
                    continue
                kind = types.get(name, "float")
                if kind == "float" and isinstance(value, int | float) and value is not True:
                    fields[name] = float(value)
                elif kind == "integer" and isinstance(value, int | float):
                    fields[name] = int(value)
                elif isinstance(value, bool | str):
                    fields[name] = value
            if not fields:
                continue
            # point_line writes the number it is given: here microseconds, sent as such
            batch.append(point_line(measurement, point_tags, fields, ts_us))
            if len(batch) >= _WRITE_BATCH:
                moved += await self._write(batch)
                batch = []
        if batch:
            moved += await self._write(batch)
        return moved

    async def _write(self, lines: list[bytes]) -> int:
        outcome = await self._client.write(lines, precision="us")
        if outcome.rejected:
            _LOG.warning("re-keying device data: InfluxDB refused %d points", len(outcome.rejected))
        return len(lines) - len(outcome.rejected)

    async def erase(self, device_ids: Sequence[str], *, mode: EraseMode = "delete") -> int:
        """Remove every point of the devices from the measurements.

        Args:
            device_ids: the devices.
            mode: ``delete`` drops the series; ``rekey`` first copies each point to an
                anonymous device id (``anon-`` and random hex, one per device, linked to
                nothing) and then drops the originals.

        Returns:
            The number of points copied under anonymous ids (0 for ``delete``).

        Raises:
            InvalidRequestError: a device id is not one.
            StoreUnavailableError: InfluxDB cannot be reached (nothing is half-done that
                a retry of the erasure would not finish).
        """
        moved = 0
        await self._ready()
        for device_id in _valid(device_ids):
            anonymous = f"anon-{secrets.token_hex(8)}"
            for measurement in self._measurements:
                if mode == "rekey":
                    moved += await self._rekey(measurement, device_id, anonymous)
                await self._client.query(
                    f"DROP SERIES FROM {quote_ident(measurement)} "
                    f'WHERE "device" = {quote_string(device_id)}'
                )
        return moved

    async def count(self, device_ids: Sequence[str]) -> Mapping[str, int]:
        """Points left per measurement for the devices (what an erasure must bring to 0)."""
        where = " OR ".join(f'"device" = {quote_string(d)}' for d in _valid(device_ids))
        await self._ready()
        out: dict[str, int] = {}
        for measurement in self._measurements:
            total = 0
            for one in await self._client.query(
                f"SELECT COUNT(*) FROM {quote_ident(measurement)} WHERE {where}"
            ):
                for row in one.values:
                    total += max((v for v in row[1:] if isinstance(v, int)), default=0)
            out[measurement] = total
        return out
