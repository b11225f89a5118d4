"""InfluxDB client: line-protocol writes and InfluxQL reads over aiohttp (wire: every stage).

One code path serves InfluxDB 1.x, 2.x and 3.x. Writes go to ``/write`` (flavor ``v1``)
or ``/api/v2/write`` (flavor ``v2``, which InfluxDB 3 accepts too), always with
``precision=ms``; reads are InfluxQL on the v1-compatible ``/query`` that all three
serve. Authentication is a token (``Authorization: Token ...``) when one is set, else
HTTP basic auth from username and password, else none.

Error policy (ARCHITECTURE.md, "Delivery and safety rules"):

* 204: written.
* 400/422 (bad points, partial write): the batch is split in halves recursively to find
  the refused points; the good ones are written, the refused ones are returned with
  InfluxDB's error text. InfluxDB 1.x has already stored the good points of a partial
  write, so the halves write some points twice; that is harmless because a point's
  series and timestamp come from the device, so a rewrite overwrites itself.
* 413 (body too large): split as well; a single line that is still too large is refused.
* 401/403/404/5xx, connection errors and timeouts: :class:`StoreUnavailableError`; the
  caller keeps the batch (spool) and retries, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from yarl import URL

from wire.errors import PermanentError, StoreUnavailableError
from wire.influxql import quote_ident

__all__ = [
    "Epoch",
    "InfluxClient",
    "InfluxSettings",
    "Series",
    "WriteOutcome",
]

_LOG = logging.getLogger(__name__)

#: Time format of query results: epoch in these units (InfluxQL's ``epoch`` parameter).
Epoch = Literal["ns", "u", "ms", "s", "m", "h"]
#: Timestamp units of written lines.
Precision = Literal["ms", "us"]

_SPLIT_STATUSES: Final = frozenset((400, 413, 422))
# Bodies larger than this are gzipped in a worker thread, smaller ones on the loop.
_GZIP_INLINE_BYTES: Final = 64 * 1024
_ERROR_TEXT_LIMIT: Final = 500


class InfluxSettings(BaseModel):
    """Where and how to reach InfluxDB.

    Attributes:
        url: base URL of the HTTP API (a path prefix is kept).
        flavor: ``v1`` writes to ``/write?db=&rp=``; ``v2`` to ``/api/v2/write?org=&bucket=``
            (InfluxDB 2.x and 3.x).
        database: the v1 database, and the ``db`` of InfluxQL queries for ``v1``.
        retention_policy: the v1 retention policy (server default when unset).
        org: the v2 organisation (InfluxDB 3 ignores it).
        bucket: the v2 bucket, also the ``db`` of queries for ``v2``; ``database`` when unset.
        token: API token, sent as ``Authorization: Token ...`` (any flavor).
        username: user for HTTP basic auth (used when no token is set).
        password: password for HTTP basic auth.
        timeout_s: limit on each HTTP request, connection to last byte.
        gzip: compress write bodies (``Content-Encoding: gzip``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "http://127.0.0.1:8086"
    flavor: Literal["v1", "v2"] = "v1"
    database: str = Field(default="fixloop", min_length=1)
    retention_policy: str | None = None
    org: str | None = None
    bucket: str | None = None
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    gzip: bool = False

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return value

    @property
    def query_db(self) -> str:
        """The ``db`` parameter of InfluxQL queries."""
        if self.flavor == "v2":
            return self.bucket or self.database
        return self.database


@dataclass(frozen=True, slots=True)
class Series:
    """One series of an InfluxQL result.

    Attributes:
        name: the measurement.
        tags: the series' tag values (for ``GROUP BY`` queries), else empty.
        columns: column names; the first is ``time`` for ``SELECT`` queries.
        values: rows, one value per column.
    """

    name: str
    tags: Mapping[str, str]
    columns: tuple[str, ...]
    values: list[list[Any]]


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What one :meth:`InfluxClient.write` achieved.

    Attributes:
        written: lines InfluxDB accepted.
        rejected: lines InfluxDB refused, each with its error text; retrying will not help.
    """

    written: int
    rejected: list[tuple[bytes, str]] = field(default_factory=list)


def _error_text(body: bytes) -> str:
    """InfluxDB's error message from a response body (1.x ``error``, 2.x/3.x ``message``)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        for key in ("error", "message"):
            value = obj.get(key)
            if isinstance(value, str) and value:
                return value[:_ERROR_TEXT_LIMIT]
    text = body.decode("utf-8", "replace").strip()
    return text[:_ERROR_TEXT_LIMIT] or "no error text"


class InfluxClient:
    """Async InfluxDB client for line-protocol writes and InfluxQL queries.

    Use it as an async context manager; it owns one :class:`aiohttp.ClientSession`::

        async with InfluxClient(settings) as client:
            await client.ensure_database()
            outcome = await client.write(lines)
    """

    def __init__(self, settings: InfluxSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        base = URL(settings.url)
        prefix = base.path.rstrip("/")
        self._base = base.with_path(prefix or "/").with_query(None).with_fragment(None)
        self._prefix = prefix
        if settings.flavor == "v1":
            params = {"db": settings.database}
            if settings.retention_policy:
                params["rp"] = settings.retention_policy
            path = "/write"
        else:
            params = {"bucket": settings.bucket or settings.database}
            if settings.org:
                params["org"] = settings.org
            path = "/api/v2/write"
        # One URL per timestamp unit: ms for most writers, us for the gateway's telemetry
        # (a sub-millisecond offset from seq keeps same-millisecond readings apart).
        # InfluxDB 1.x spells microseconds "u" on /write; /api/v2/write spells it "us".
        micro = "u" if settings.flavor == "v1" else "us"
        self._write_urls: dict[Precision, URL] = {
            "ms": self._url(path, {**params, "precision": "ms"}),
            "us": self._url(path, {**params, "precision": micro}),
        }
        self._write_url = self._write_urls["ms"]
        self._query_url = self._url("/query", {})
        self._ping_url = self._url("/ping", {})
        self._headers: dict[str, str] = {}
        if settings.token is not None:
            self._headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        elif settings.username:
            password = settings.password.get_secret_value() if settings.password else ""
            pair = f"{settings.username}:{password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")

    def _url(self, path: str, params: Mapping[str, str]) -> URL:
        return self._base.with_path(self._prefix + path).with_query(params)

    @property
    def settings(self) -> InfluxSettings:
        """The settings this client was built with."""
        return self._settings

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _need_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise StoreUnavailableError("InfluxClient is not open: use 'async with'")
        return self._session

    async def _request(
        self,
        method: str,
        url: URL,
        *,
        data: bytes | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and read the whole answer.

        Raises:
            StoreUnavailableError: no answer (connection refused, reset, timeout).
        """
        session = self._need_session()
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                async with session.request(method, url, data=data, headers=headers) as resp:
                    return resp.status, await resp.read()
        except TimeoutError as exc:
            raise StoreUnavailableError(
                f"InfluxDB at {self._base} did not answer {method} {url.path} "
                f"within {self._settings.timeout_s} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise StoreUnavailableError(
                f"InfluxDB at {self._base} is unreachable ({type(exc).__name__}: {exc})"
            ) from exc

    async def ping(self) -> bool:
        """Whether InfluxDB answers ``/ping`` with a success status."""
        try:
            status, _ = await self._request("GET", self._ping_url)
        except StoreUnavailableError as exc:
            _LOG.debug("InfluxDB ping failed: %s", exc)
            return False
        return 200 <= status < 300

    async def ensure_database(self) -> None:
        """Create the v1 database if it does not exist (a no-op for ``v2``).

        Raises:
            StoreUnavailableError: InfluxDB cannot be reached or refused access.
            PermanentError: InfluxDB refused the statement.
        """
        if self._settings.flavor != "v1":
            return
        await self._query_raw(f"CREATE DATABASE {quote_ident(self._settings.database)}", None)

    async def write(self, lines: Sequence[bytes], *, precision: Precision = "ms") -> WriteOutcome:
        """Write line-protocol lines; set aside the ones InfluxDB refuses.

        Args:
            lines: one point per item, no trailing newlines.
            precision: the unit of the lines' timestamps, ``ms`` or ``us``.

        Returns:
            How many lines were written and which were refused, with InfluxDB's reason.

        Raises:
            StoreUnavailableError: InfluxDB cannot take writes now (unreachable, timeout,
                401/403/404, 5xx); nothing was set aside, retry the whole batch later.
        """
        if not lines:
            return WriteOutcome(0, [])
        rejected: list[tuple[bytes, str]] = []
        url = self._write_urls[precision]
        written = await self._write_part(list(lines), rejected, url)
        if rejected:
            _LOG.warning(
                "InfluxDB refused %d of %d points, first: %s",
                len(rejected),
                len(lines),
                rejected[0][1],
            )
        return WriteOutcome(written, rejected)

    async def _write_part(
        self, lines: list[bytes], rejected: list[tuple[bytes, str]], url: URL
    ) -> int:
        """Write ``lines``; when InfluxDB refuses points, bisect.

        Each level halves the lines, so this ends; a batch with ``b`` bad lines of ``n``
        costs at most ``1 + 2 b log2(n)`` requests.
        """
        error = await self._post_lines(lines, url)
        if error is None:
            return len(lines)
        if len(lines) == 1:
            rejected.append((lines[0], error))
            return 0
        middle = len(lines) // 2
        first = await self._write_part(lines[:middle], rejected, url)
        return first + await self._write_part(lines[middle:], rejected, url)

    async def _post_lines(self, lines: list[bytes], url: URL) -> str | None:
        """POST one body; ``None`` when written, the error text when points were refused.

        Raises:
            StoreUnavailableError: any answer other than success or refused points.
        """
        body = b"\n".join(lines)
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self._settings.gzip:
            if len(body) > _GZIP_INLINE_BYTES:
                body = await asyncio.to_thread(gzip.compress, body, 6)
            else:
                body = gzip.compress(body, 6)
            headers["Content-Encoding"] = "gzip"
        status, answer = await self._request("POST", url, data=body, headers=headers)
        if 200 <= status < 300:
            return None
        text = _error_text(answer)
        if status in _SPLIT_STATUSES:
            return f"HTTP {status}: {text}"
        raise StoreUnavailableError(f"InfluxDB refused the write with HTTP {status}: {text}")

    async def _query_raw(self, influxql: str, epoch: Epoch | None) -> list[Series]:
        form = {"q": influxql, "db": self._settings.query_db}
        if self._settings.flavor == "v1" and self._settings.retention_policy:
            form["rp"] = self._settings.retention_policy
        if epoch is not None:
            form["epoch"] = epoch
        status, answer = await self._request("POST", self._query_url, data=form)
        if status == 400:
            raise PermanentError(f"InfluxDB refused the query: {_error_text(answer)}")
        if not 200 <= status < 300:
            raise StoreUnavailableError(
                f"InfluxDB query failed with HTTP {status}: {_error_text(answer)}"
            )
        try:
            obj = orjson.loads(answer)
        except orjson.JSONDecodeError as exc:
            raise StoreUnavailableError("InfluxDB answered a query with invalid JSON") from exc
        return _parse_results(obj)

    async def query(self, influxql: str, *, epoch: Epoch = "ms") -> list[Series]:
        """Run InfluxQL on ``/query`` and return every series of every statement.

        Args:
            influxql: one or more statements (separated by ``;``).
            epoch: unit of the returned ``time`` column.

        Raises:
            StoreUnavailableError: InfluxDB cannot be reached or refused access.
            PermanentError: the query is wrong (a parse error or an error in a result,
                such as an unknown database).
        """
        return await self._query_raw(influxql, epoch)

    async def count(self, measurement: str, field: str = "seq", where: str = "") -> int:
        """Count the points of ``measurement`` that have ``field``.

        Args:
            measurement: the measurement to count.
            field: a field every point of interest has.
            where: an optional InfluxQL condition (without ``WHERE``).

        Returns:
            The number of points, 0 when there are none.

        Raises:
            StoreUnavailableError: InfluxDB cannot be reached.
            PermanentError: the query is wrong.
        """
        statement = f"SELECT COUNT({quote_ident(field)}) FROM {quote_ident(measurement)}"
        if where:
            statement += f" WHERE {where}"
        series = await self._query_raw(statement, "ms")
        total = 0
        for one in series:
            index = one.columns.index("count") if "count" in one.columns else 1
            for row in one.values:
                value = row[index]
                if isinstance(value, int):
                    total += value
        return total


def _parse_results(obj: object) -> list[Series]:
    """Flatten ``{"results": [{"series": [...]}]}``; raise on an error in any result."""
    if not isinstance(obj, dict):
        raise StoreUnavailableError("InfluxDB answered a query with an unexpected shape")
    error = obj.get("error")
    if isinstance(error, str):
        raise PermanentError(f"InfluxDB refused the query: {error}")
    series: list[Series] = []
    for result in obj.get("results") or ():
        if not isinstance(result, dict):
            continue
        error = result.get("error")
        if isinstance(error, str):
            raise PermanentError(f"InfluxDB query failed: {error}")
        for raw in result.get("series") or ():
            series.append(
                Series(
                    name=str(raw.get("name", "")),
                    tags=dict(raw.get("tags") or {}),
                    columns=tuple(raw.get("columns") or ()),
                    values=[list(row) for row in raw.get("values") or ()],
                )
            )
    return series
