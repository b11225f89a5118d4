"""Gateway health and counters in Prometheus text format (the ingest stage's window).

Counters are plain integers bumped on the event loop (no locks needed); the HTTP
endpoint renders them on demand: ``/metrics`` (Prometheus text exposition 0.0.4) and
``/health`` (JSON, 200 when the pipeline can take data, 503 otherwise), and the two
probes an orchestrator asks: ``/livez`` (503 only when ingest is stalled, which a restart
cures: the broker redelivers what was not acknowledged) and ``/readyz`` (503 while the
broker connection is down or the spool refuses writes; InfluxDB being away is not a
reason, the spool takes its share).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from aiohttp import web

from gateway.republish import Republisher
from wire.exposition import CONTENT_TYPE, Metric, render_metrics

__all__ = ["GatewayMetrics", "MetricsServer"]

_LOG = logging.getLogger(__name__)


@dataclass(slots=True)
class GatewayMetrics:
    """What the gateway has done since it started.

    Attributes:
        received: messages taken from the broker, by channel (telemetry, events ...).
        stored: points written to InfluxDB (directly or replayed from the spool).
        spooled: points written to the on-disk spool while InfluxDB was away.
        replayed: points written to InfluxDB from the spool.
        rejected: messages refused by validation, by reason.
        store_rejected: points InfluxDB refused with a 400 (set aside, not retried).
        acked: QoS-1 messages acknowledged to the broker.
        spool_batches: batches waiting in the spool now.
        spool_bytes: bytes waiting in the spool now.
        unacked: messages received but not yet durable (and so not acknowledged).
        last_point_ts_ms: device timestamp of the newest point written.
        influx_up: whether the last InfluxDB write succeeded.
        mqtt_connected: whether the broker connection is up.
        spool_writable: whether the last spool append succeeded (False: the spool cannot
            take writes, so nothing can be acknowledged while InfluxDB is away).
        spool_disk_bytes: bytes of spool segment files on disk (what ``spool_max_bytes``
            bounds).
        spool_errors: spool operations that failed (full, disk errors, damaged records).
        session_lost: connects on which the broker had lost our persistent session.
        dropped_unacked: messages received but neither stored nor acknowledged when the
            connection ended (left to the broker to deliver again).
        broker_dropped: messages the broker says it dropped (``$SYS`` counter), -1 unknown.
        adopted_sessions: sessions of dead members of the shared group held now
            (:mod:`wire.adoption`).
        adoptions: times this gateway took over a dead member's session.
        republish: the republisher for partitioned diagnostics, when configured
            (:mod:`gateway.republish`; its counters are rendered, 0 without one).
        last_progress_s: wall time of the last point made durable (or of the start).
        stall_after_s: ``/health`` fails once messages wait this long with no progress.
    """

    received: Counter[str] = field(default_factory=Counter)
    stored: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    store_rejected: int = 0
    acked: int = 0
    spool_batches: int = 0
    spool_bytes: int = 0
    unacked: int = 0
    last_write_s: float = 0.0
    write_seconds_sum: float = 0.0
    write_count: int = 0
    last_point_ts_ms: int = 0
    influx_up: bool = False
    mqtt_connected: bool = False
    spool_writable: bool = True
    spool_disk_bytes: int = 0
    spool_errors: int = 0
    session_lost: int = 0
    dropped_unacked: int = 0
    broker_dropped: int = -1
    adopted_sessions: int = 0
    adoptions: int = 0
    republish: Republisher | None = None
    started_s: float = field(default_factory=time.time)
    last_progress_s: float = field(default_factory=time.time)
    stall_after_s: float = 60.0

    def problems(self, now_s: float | None = None) -> list[str]:
        """Why the gateway cannot take data now; empty when it can.

        Ingest is never stuck without saying so: not connected, messages
        waiting with nothing made durable for ``stall_after_s``, or a spool that refuses
        writes each turn ``/health`` red.
        """
        now = time.time() if now_s is None else now_s
        found = []
        if not self.mqtt_connected:
            found.append("mqtt_disconnected")
        if self.unacked and now - self.last_progress_s > self.stall_after_s:
            found.append("stalled")
        if not self.spool_writable:
            found.append("spool_unwritable")
        return found

    def live_problems(self, now_s: float | None = None) -> list[str]:
        """Why the gateway should be restarted (``/livez``): only a stall."""
        return [p for p in self.problems(now_s) if p == "stalled"]

    def ready_problems(self) -> list[str]:
        """Why the gateway cannot take data now (``/readyz``): broker or spool."""
        return [p for p in self.problems() if p in ("mqtt_disconnected", "spool_unwritable")]

    def lag_s(self, now_s: float | None = None) -> float:
        """Seconds between now and the device time of the newest point written."""
        if not self.last_point_ts_ms:
            return 0.0
        now = time.time() if now_s is None else now_s
        return max(0.0, now - self.last_point_ts_ms / 1000)

    def render(self) -> str:
        """Render every metric in Prometheus text exposition format."""
        families: list[Metric] = []
        Samples = list[tuple[dict[str, str], float]]

        def metric(
            name: str, kind: Literal["counter", "gauge"], help_text: str, samples: Samples
        ) -> None:
            families.append(Metric(f"fixloop_gateway_{name}", kind, help_text, samples))

        def by(label: str, counts: Counter[str]) -> Samples:
            return [({label: key}, count) for key, count in sorted(counts.items())] or [({}, 0)]

        metric(
            "received_total",
            "counter",
            "Messages taken from the broker.",
            by("channel", self.received),
        )
        metric("stored_points_total", "counter", "Points written to InfluxDB.", [({}, self.stored)])
        metric(
            "spooled_points_total",
            "counter",
            "Points written to the on-disk spool.",
            [({}, self.spooled)],
        )
        metric(
            "replayed_points_total",
            "counter",
            "Points replayed from the spool.",
            [({}, self.replayed)],
        )
        metric(
            "rejected_total",
            "counter",
            "Messages refused by validation.",
            by("reason", self.rejected),
        )
        metric(
            "store_rejected_points_total",
            "counter",
            "Points InfluxDB refused (400).",
            [({}, self.store_rejected)],
        )
        metric("acked_total", "counter", "QoS-1 messages acknowledged.", [({}, self.acked)])
        metric(
            "spool_batches", "gauge", "Batches waiting in the spool.", [({}, self.spool_batches)]
        )
        metric("spool_bytes", "gauge", "Bytes waiting in the spool.", [({}, self.spool_bytes)])
        metric(
            "spool_disk_bytes",
            "gauge",
            "Bytes of spool segment files on disk.",
            [({}, self.spool_disk_bytes)],
        )
        metric(
            "spool_writable",
            "gauge",
            "1 if the last spool append succeeded.",
            [({}, int(self.spool_writable))],
        )
        metric(
            "spool_errors_total", "counter", "Failed spool operations.", [({}, self.spool_errors)]
        )
        metric(
            "session_lost_total",
            "counter",
            "Connects on which the broker had lost the persistent session.",
            [({}, self.session_lost)],
        )
        metric(
            "dropped_unacked_total",
            "counter",
            "Messages left unstored and unacknowledged at a disconnect (the broker resends).",
            [({}, self.dropped_unacked)],
        )
        metric(
            "broker_dropped_messages",
            "gauge",
            "Messages the broker dropped (its $SYS counter; -1 unknown).",
            [({}, self.broker_dropped)],
        )
        metric(
            "adopted_sessions",
            "gauge",
            "Sessions of dead gateways of the shared group held by this one now.",
            [({}, self.adopted_sessions)],
        )
        metric(
            "adoptions_total",
            "counter",
            "Times this gateway took over a dead gateway's session.",
            [({}, self.adoptions)],
        )
        republish = self.republish
        metric(
            "republished_total",
            "counter",
            "Stored device messages the broker took on their diagnostics partition's topic.",
            [({}, republish.republished if republish else 0)],
        )
        metric(
            "republish_failed_total",
            "counter",
            "Stored device messages whose republish failed (left for the broker to resend).",
            [({}, republish.failed if republish else 0)],
        )
        metric(
            "republish_refused_total",
            "counter",
            "Stored device messages the broker refused on a partition topic (skipped).",
            [({}, republish.refused if republish else 0)],
        )
        metric(
            "republish_in_flight",
            "gauge",
            "Republished messages waiting for their PUBACK now.",
            [({}, republish.in_flight if republish else 0)],
        )
        metric(
            "seconds_since_progress",
            "gauge",
            "Seconds since a point was last made durable.",
            [({}, max(0.0, time.time() - self.last_progress_s))],
        )
        metric(
            "unacked_messages", "gauge", "Messages received, not yet durable.", [({}, self.unacked)]
        )
        metric(
            "lag_seconds",
            "gauge",
            "Now minus device time of the newest point written.",
            [({}, self.lag_s())],
        )
        metric(
            "write_seconds_sum",
            "counter",
            "Time spent in InfluxDB writes.",
            [({}, self.write_seconds_sum)],
        )
        metric("write_seconds_count", "counter", "InfluxDB writes.", [({}, self.write_count)])
        metric(
            "influx_up",
            "gauge",
            "1 if the last InfluxDB write succeeded.",
            [({}, int(self.influx_up))],
        )
        metric(
            "mqtt_connected",
            "gauge",
            "1 if the broker connection is up.",
            [({}, int(self.mqtt_connected))],
        )
        return render_metrics(families)

    def health(self, now_s: float | None = None) -> dict[str, object]:
        """Return a JSON-able health summary (``problems`` empty when healthy)."""
        now = time.time() if now_s is None else now_s
        return {
            "problems": self.problems(now),
            "mqtt_connected": self.mqtt_connected,
            "spool_writable": self.spool_writable,
            "seconds_since_progress": round(max(0.0, now - self.last_progress_s), 3),
            "session_lost": self.session_lost,
            "adopted_sessions": self.adopted_sessions,
            "influx_up": self.influx_up,
            "spool_batches": self.spool_batches,
            "unacked": self.unacked,
            "stored": self.stored,
            "rejected": sum(self.rejected.values()),
            "lag_s": round(self.lag_s(), 3),
        }


class MetricsServer:
    """HTTP endpoint for ``/metrics``, ``/health``, ``/livez``, ``/readyz``; a context manager.

    Args:
        metrics: the counters to serve.
        host: address to bind.
        port: port to bind; 0 picks a free one (see :attr:`port` after start).
    """

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def _health_handler(self, request: web.Request) -> web.Response:
        health = self._metrics.health()
        return web.json_response(health, status=503 if health["problems"] else 200)

    async def _live_handler(self, request: web.Request) -> web.Response:
        problems = self._metrics.live_problems()
        return web.json_response(
            {"ok": not problems, "problems": problems}, status=503 if problems else 200
        )

    async def _ready_handler(self, request: web.Request) -> web.Response:
        problems = self._metrics.ready_problems()
        return web.json_response(
            {"ok": not problems, "problems": problems}, status=503 if problems else 200
        )

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/health", self._health_handler)
        app.router.add_get("/livez", self._live_handler)
        app.router.add_get("/readyz", self._ready_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        if self._runner.addresses:  # the real port when 0 was asked
            self.port = int(self._runner.addresses[0][1])
        _LOG.info("gateway metrics on http://%s:%d/metrics", self._host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
