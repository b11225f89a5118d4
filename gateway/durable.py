"""The gateway's durable store: InfluxDB first, the on-disk spool while it is away.

Place in the pipeline: the gateway's writer (:class:`~gateway.service.Gateway`) hands
each batch of lines to :meth:`DurableStore.store` and acknowledges its messages to the
broker only once it returns, the batch being in InfluxDB or in the spool
(:mod:`gateway.spool`). :meth:`DurableStore.replay_loop` drains the spool into InfluxDB,
oldest first, and probes InfluxDB on a timer whatever the spool holds; spool
errors are counted, logged and retried with backoff and never end it. Points InfluxDB
refuses are counted and reported on the rejected topic through the gateway's current
broker connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import orjson

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.spool import Spool
from wire.errors import BrokerUnavailableError, PermanentError, StoreUnavailableError
from wire.influx import InfluxClient, InfluxSettings, Precision
from wire.mqtt import MqttClient
from wire.protocol.topics import REJECTED_TOPIC

__all__ = ["PREVIEW_BYTES", "DurableStore"]

_LOG = logging.getLogger(__name__)

#: Bytes of a refused message or point shown in its report on the rejected topic.
PREVIEW_BYTES: Final = 200
#: Timestamps of 15 digits and more are microseconds (ms reach 15 digits in year 33658).
_MICROS_DIGITS: Final = 15


def _precision(record: bytes) -> Precision:
    """The timestamp unit of a spooled batch (older spools hold milliseconds)."""
    first = record.split(b"\n", 1)[0]
    stamp = first.rsplit(b" ", 1)[-1]
    return "us" if len(stamp) >= _MICROS_DIGITS else "ms"


class DurableStore:
    """InfluxDB and the spool, an async context manager (opens both, closes both).

    Args:
        influx: how to reach InfluxDB.
        settings: the spool's place and limits, the retry bound.
        metrics: the gateway's metrics, kept current here for the store side.
        clock: wall clock in seconds (the time of a refused point's report).
        reporter: the gateway's broker connection now, if any, for refused points.
    """

    def __init__(
        self,
        influx: InfluxSettings,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        clock: Callable[[], float],
        reporter: Callable[[], MqttClient | None],
    ) -> None:
        self._influx_settings = influx
        self._settings = settings
        self.metrics = metrics
        self._clock = clock
        self._reporter = reporter
        self._influx: InfluxClient | None = None
        self._spool: Spool | None = None
        self._spool_ready = asyncio.Event()
        #: set by the replay loop when it finds the spool empty
        self.spool_empty = asyncio.Event()

    async def __aenter__(self) -> Self:
        settings = self._settings
        self._spool = Spool(
            settings.instance_spool_dir,
            fsync=settings.spool_fsync,
            max_bytes=settings.spool_max_bytes,
        )
        self._sync_spool_gauges()
        self.metrics.spool_writable = True
        self._influx = InfluxClient(self._influx_settings)
        await self._influx.__aenter__()
        try:
            await self._influx.ensure_database()
            self.metrics.influx_up = True
        except StoreUnavailableError as exc:
            _LOG.warning("InfluxDB is not reachable yet (%s); spooling until it is", exc)
        if len(self._spool):
            self._spool_ready.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._influx is not None:
            await self._influx.__aexit__(exc_type, exc, tb)
        if self._spool is not None:
            self._spool.close()

    @property
    def spool_directory(self) -> Path:
        """The spool's directory (the gateway keeps its session marker there)."""
        assert self._spool is not None
        return self._spool.directory

    async def store(self, lines: list[bytes]) -> None:
        """Make ``lines`` durable: InfluxDB, else the spool; retry until one holds.

        InfluxDB first while the spool is empty (no overtaking of spooled data needed:
        points are idempotent, order only keeps replay simple); directly again whenever
        the spool refuses writes (a full disk must not stop ingest while InfluxDB is up).
        """
        if not lines:
            return
        assert self._spool is not None
        metrics = self.metrics
        backoff_s = 0.2
        while True:
            if (metrics.influx_up and not len(self._spool)) or not metrics.spool_writable:
                try:
                    await self._write_influx(lines)
                except StoreUnavailableError as exc:
                    _LOG.warning("InfluxDB write failed (%s); spooling", exc)
                    metrics.influx_up = False
                else:
                    metrics.last_progress_s = time.time()
                    return
            try:
                await asyncio.to_thread(self._spool.append, b"\n".join(lines))
            except (StoreUnavailableError, PermanentError) as exc:
                metrics.spool_errors += 1
                metrics.spool_writable = False
                _LOG.error(
                    "cannot spool (%s) and InfluxDB is away; holding acknowledgements, "
                    "retrying in %.1f s",
                    exc,
                    backoff_s,
                )
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._settings.retry_max_s)
                continue
            metrics.spool_writable = True
            metrics.spooled += len(lines)
            metrics.last_progress_s = time.time()
            self._sync_spool_gauges()
            self.spool_empty.clear()
            self._spool_ready.set()
            return

    async def _write_influx(self, lines: list[bytes], precision: Precision = "us") -> int:
        assert self._influx is not None
        started = time.perf_counter()
        outcome = await self._influx.write(lines, precision=precision)
        elapsed = time.perf_counter() - started
        metrics = self.metrics
        metrics.write_seconds_sum += elapsed
        metrics.write_count += 1
        metrics.last_write_s = elapsed
        metrics.influx_up = True
        metrics.stored += outcome.written
        for line, error in outcome.rejected:
            metrics.store_rejected += 1
            _LOG.warning("InfluxDB refused a point: %s", error)
            client = self._reporter()
            if client is not None:
                report = {
                    "ts": int(self._clock() * 1000),
                    "reason": "store_refused",
                    "detail": error[:500],
                    "preview": line[:PREVIEW_BYTES].decode("utf-8", "replace"),
                }
                try:
                    await client.publish(REJECTED_TOPIC, orjson.dumps(report), qos=0)
                except BrokerUnavailableError:
                    _LOG.debug("could not report a refused point: broker connection lost")
        return outcome.written

    def _sync_spool_gauges(self) -> None:
        assert self._spool is not None
        self.metrics.spool_batches = len(self._spool)
        self.metrics.spool_bytes = self._spool.pending_bytes
        self.metrics.spool_disk_bytes = self._spool.disk_bytes

    async def replay_loop(self) -> None:
        """Drain the spool into InfluxDB, oldest first; probe InfluxDB on a timer.

        While InfluxDB is away it is probed with backoff whatever the spool holds (an
        empty spool must not leave it untried). Spool errors are counted, logged and
        retried with backoff; they never end the loop.
        """
        assert self._spool is not None
        spool = self._spool
        metrics = self.metrics
        backoff_s = 0.2

        def next_backoff() -> float:
            nonlocal backoff_s
            pause = backoff_s * (0.5 + random.random())
            backoff_s = min(backoff_s * 2, self._settings.retry_max_s)
            return pause

        while True:
            if not len(spool):
                self._spool_ready.clear()
                self.spool_empty.set()
                if metrics.influx_up:
                    await self._spool_ready.wait()
                    continue
                try:
                    async with asyncio.timeout(next_backoff()):
                        await self._spool_ready.wait()
                    continue
                except TimeoutError:
                    pass
                if await self._probe_influx():
                    backoff_s = 0.2
                continue
            try:
                batch = await asyncio.to_thread(spool.peek)
            except StoreUnavailableError as exc:
                metrics.spool_errors += 1
                _LOG.error("cannot read the spool (%s); retrying", exc)
                await asyncio.sleep(next_backoff())
                continue
            if batch is None:
                self._sync_spool_gauges()
                continue
            try:
                written = await self._write_influx(batch.split(b"\n"), _precision(batch))
            except StoreUnavailableError as exc:
                metrics.influx_up = False
                pause = next_backoff()
                _LOG.info("InfluxDB still away (%s); retrying in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                continue
            backoff_s = 0.2
            metrics.replayed += written
            metrics.last_progress_s = time.time()
            await self._pop_written(spool)
            self._sync_spool_gauges()
            if not len(spool):
                # Emptied, its segments are deleted: it can take writes again (the next
                # append says otherwise if the disk is still full).
                metrics.spool_writable = True
                _LOG.info("spool drained; writing to InfluxDB directly again")

    async def _probe_influx(self) -> bool:
        """Try InfluxDB (creating the database if it came up empty); True when it answers."""
        assert self._influx is not None
        try:
            await self._influx.ensure_database()
        except (StoreUnavailableError, PermanentError) as exc:
            _LOG.info("InfluxDB still away (%s)", exc)
            return False
        _LOG.info("InfluxDB is back")
        self.metrics.influx_up = True
        return True

    async def _pop_written(self, spool: Spool) -> None:
        """Remove the batch just written; retry until the cursor is saved.

        Until then a restart would write the batch again, which is harmless (points
        overwrite themselves), so the loop only waits, it never gives up.
        """
        pause = 0.2
        while True:
            try:
                await asyncio.to_thread(spool.pop)
            except IndexError:
                return
            except StoreUnavailableError as exc:
                self.metrics.spool_errors += 1
                _LOG.error("cannot remove a replayed batch from the spool (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self._settings.retry_max_s)
            else:
                return
