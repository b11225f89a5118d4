"""``/metrics``, ``/health``, ``/livez`` and ``/readyz`` of diagnostics, notifier and dashboard.

The gateway serves its own (:mod:`gateway.metrics`); both write the text with
:mod:`wire.exposition`. For the other services the
composition root reads the running service's public counters and serves them on the
service's ``metrics_host:metrics_port``, so that every fixloop service can be scraped
and health-checked the same way:

* ``GET /metrics``: Prometheus text exposition format 0.0.4, names
  ``fixloop_<service>_...``;
* ``GET /health``: JSON with ``ok``, ``problems`` (empty when healthy), the stages that
  are ``down`` and why, ``restarts`` per stage and a few counts; status 200 when
  ``problems`` is empty, else 503;
* ``GET /livez``: liveness (an orchestrator restarts the process when it fails): 200 as
  long as the process's event loop answers; nothing a restart cannot cure turns it red
  (a broker or store that is away does not);
* ``GET /readyz``: readiness (an orchestrator sends work, or goes on with a rolling
  update, only while it passes): 200 when what the service depends on answers now, the
  broker subscription up and the case store answering a query, else 503 with the
  ``problems``; a check that takes longer than :data:`READY_TIMEOUT_S` counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import orjson
from aiohttp import web

from wire.errors import StoreUnavailableError
from wire.exposition import CONTENT_TYPE, Metric, render_metrics
from wire.supervisor import StageHealth

if TYPE_CHECKING:  # only named in annotations: a service's process loads no other's code
    from dashboard.service import DashboardService
    from diagnostics.partition import PartitionedDiagnostics
    from diagnostics.service import DiagnosticsService
    from notifier.service import NotifierService
    from notifier.store import CaseStore

__all__ = [
    "READY_TIMEOUT_S",
    "ServiceEndpoint",
    "dashboard_endpoint",
    "dashboard_ready",
    "diagnostics_endpoint",
    "diagnostics_ready",
    "notifier_endpoint",
    "notifier_ready",
]

_LOG = logging.getLogger(__name__)

#: Longest a readiness check may take; longer counts as not ready (Kubernetes probes
#: time out after 1 s by default, so set ``timeoutSeconds`` above this).
READY_TIMEOUT_S = 2.0
#: A case id no case has: the store's readiness query looks it up.
_PROBE_CASE_ID = "readiness-probe"

Health = tuple[list[str], dict[str, Any]]
Ready = Callable[[], Awaitable[list[str]]]


def _one(name: str, kind: Literal["counter", "gauge"], help_text: str, value: float) -> Metric:
    return Metric(name, kind, help_text, (({}, value),))


def _stage_metrics(prefix: str, stages: StageHealth, names: Sequence[str]) -> list[Metric]:
    every = sorted({*names, *stages.restarts, *stages.down})
    return [
        Metric(
            f"{prefix}_stage_up",
            "gauge",
            "1 while the stage runs, 0 while it restarts after an unforeseen error.",
            [({"stage": name}, int(name not in stages.down)) for name in every],
        ),
        Metric(
            f"{prefix}_stage_restarts_total",
            "counter",
            "Restarts of the stage after an unforeseen error.",
            [({"stage": name}, stages.restarts.get(name, 0)) for name in every],
        ),
    ]


def _stage_health(stages: StageHealth) -> dict[str, Any]:
    return {"down": dict(stages.down), "restarts": dict(stages.restarts)}


class ServiceEndpoint:
    """HTTP endpoint for a service's ``/metrics`` and ``/health``; an async context manager.

    Args:
        service: the service's name (in the log).
        host: address to bind (``0.0.0.0`` to be scraped from other containers).
        port: port to bind; 0 picks a free one (see :attr:`port` once started).
        metrics: returns the metric families now.
        health: returns the problems now (empty: healthy) and details for the body.
        ready: returns what keeps the service from taking work now (empty: ready);
            ``None``: ready whenever it answers.
    """

    def __init__(
        self,
        service: str,
        host: str,
        port: int,
        metrics: Callable[[], Sequence[Metric]],
        health: Callable[[], Health],
        ready: Ready | None = None,
    ) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._metrics = metrics
        self._health = health
        self._ready = ready
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base address of the endpoint."""
        return f"http://{self.host}:{self.port}"

    async def _get_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=render_metrics(self._metrics()).encode(),
            headers={"Content-Type": CONTENT_TYPE},
        )

    async def _get_health(self, _request: web.Request) -> web.Response:
        problems, details = self._health()
        body = {"ok": not problems, "problems": problems, **details}
        return web.Response(
            body=orjson.dumps(body),
            status=503 if problems else 200,
            content_type="application/json",
        )

    async def _get_live(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _get_ready(self, _request: web.Request) -> web.Response:
        problems: list[str] = []
        if self._ready is not None:
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    problems = await self._ready()
            except TimeoutError:
                problems = ["readiness_timeout"]
        return web.json_response(
            {"ok": not problems, "problems": problems}, status=503 if problems else 200
        )

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/health", self._get_health)
        app.router.add_get("/livez", self._get_live)
        app.router.add_get("/readyz", self._get_ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        if self._runner.addresses:  # the real port when 0 was asked
            self.port = int(self._runner.addresses[0][1])
        _LOG.info("%s metrics on %s/metrics, /health, /livez and /readyz", self.service, self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


# -- the services ----------------------------------------------------------------------


def diagnostics_metrics(service: DiagnosticsService | PartitionedDiagnostics) -> list[Metric]:
    """The diagnostics service's metric families."""
    p = "fixloop_diagnostics"
    engine = service.engine
    return [
        _one(f"{p}_readings_scored_total", "counter", "Readings scored.", service.readings_scored),
        _one(
            f"{p}_diagnoses_published_total",
            "counter",
            "Diagnosis changes published on fleet/diagnoses.",
            service.diagnoses_published,
        ),
        _one(
            f"{p}_scores_dropped_total",
            "counter",
            "Scores not stored in InfluxDB after retries.",
            service.scores_dropped,
        ),
        _one(
            f"{p}_items_failed_total",
            "counter",
            "Readings and events the engine raised on (skipped).",
            service.items_failed,
        ),
        _one(
            f"{p}_unknown_readings_total",
            "counter",
            "Readings of models no product file describes (scored generically).",
            service.unknown_readings,
        ),
        _one(
            f"{p}_fleet_models",
            "gauge",
            "Product models with a trained fleet model.",
            0 if engine is None else len(engine.fleet_models),
        ),
        # a partitioned worker's reorder buffer (diagnostics.partition); 0 unpartitioned
        _one(
            f"{p}_late_items_total",
            "counter",
            "Items not scored: repeats, or older than one of their device already scored "
            "(stored in InfluxDB all the same).",
            getattr(service, "late_items", 0),
        ),
        _one(
            f"{p}_held_items",
            "gauge",
            "Items held for reordering now.",
            getattr(service, "held_items", 0),
        ),
        *_stage_metrics(p, service.stages, ["diagnostics"]),
    ]


def diagnostics_health(service: DiagnosticsService | PartitionedDiagnostics) -> Health:
    """The diagnostics service's problems and details."""
    problems = [f"stage_down:{name}" for name in sorted(service.stages.down)]
    if service.engine is None:
        problems.append("no_engine")
    return problems, {
        **_stage_health(service.stages),
        "readings_scored": service.readings_scored,
        "diagnoses_published": service.diagnoses_published,
        "items_failed": service.items_failed,
        "scores_dropped": service.scores_dropped,
    }


def notifier_metrics(service: NotifierService) -> list[Metric]:
    """The notifier's metric families."""
    p = "fixloop_notifier"
    outbox, loop = service.outbox, service.loop

    def out(attribute: str) -> int:
        return 0 if outbox is None else int(getattr(outbox, attribute))

    return [
        _one(
            f"{p}_diagnoses_handled_total",
            "counter",
            "Diagnoses taken from fleet/diagnoses.",
            service.diagnoses_handled,
        ),
        _one(
            f"{p}_diagnoses_refused_total",
            "counter",
            "Diagnoses refused (not a diagnosis, or not handled).",
            service.diagnoses_refused,
        ),
        _one(
            f"{p}_diagnoses_failed_total",
            "counter",
            "Diagnoses the case machine raised on (skipped).",
            service.diagnoses_failed,
        ),
        _one(
            f"{p}_unowned_diagnoses_total",
            "counter",
            "Diagnoses of devices without an owner.",
            0 if loop is None else loop.unowned,
        ),
        _one(
            f"{p}_case_step_errors_total",
            "counter",
            "Case steps (timers, expiry, reminders, commands) that raised the unforeseen.",
            0 if loop is None else loop.timer_errors,
        ),
        _one(
            f"{p}_case_leases_taken_total",
            "counter",
            "Leases on cases this notifier took in the case store (one per case step).",
            0 if loop is None else loop.leases_taken,
        ),
        _one(
            f"{p}_case_lease_waits_total",
            "counter",
            "Case steps that waited for another notifier's lease on the case.",
            0 if loop is None else loop.lease_waits,
        ),
        _one(
            f"{p}_case_leases_overrun_total",
            "counter",
            "Case steps that outlived their lease (notifier.lease_s too short).",
            0 if loop is None else loop.leases_overrun,
        ),
        _one(
            f"{p}_notifications_written_total", "counter", "Owner messages written.", out("written")
        ),
        _one(
            f"{p}_notifications_written_before_total",
            "counter",
            "Owner messages not written again: the store had their idempotency key.",
            out("duplicates"),
        ),
        _one(
            f"{p}_notifications_claimed_elsewhere_total",
            "counter",
            "Queued owner messages not pushed here: another notifier held their claim.",
            out("claimed_elsewhere"),
        ),
        _one(
            f"{p}_notifications_sent_total",
            "counter",
            "Owner messages a channel took.",
            out("sent"),
        ),
        _one(
            f"{p}_notifications_held_total",
            "counter",
            "Owner messages held for a digest (quiet hours, rate limit).",
            out("held"),
        ),
        _one(
            f"{p}_notifications_failed_total",
            "counter",
            "Deliveries that failed (no channel took the message, or the store was away).",
            out("failed"),
        ),
        _one(
            f"{p}_notifications_not_pushed_total",
            "counter",
            "Owner messages kept in the app but not pushed: the delivery queue was full.",
            out("dropped"),
        ),
        _one(
            f"{p}_notifications_errors_total",
            "counter",
            "Owner messages whose delivery raised the unforeseen (marked failed).",
            out("errors"),
        ),
        _one(
            f"{p}_notifications_out_of_time_total",
            "counter",
            "Owner messages whose time budget ran out before delivery (marked failed).",
            out("out_of_time"),
        ),
        _one(
            f"{p}_adopted_sessions",
            "gauge",
            "Sessions of dead notifiers of the shared group held by this one now.",
            0 if service.adoption is None else service.adoption.held,
        ),
        _one(
            f"{p}_adoptions_total",
            "counter",
            "Times this notifier took over a dead notifier's session.",
            0 if service.adoption is None else service.adoption.adoptions,
        ),
        *_stage_metrics(
            p, service.stages, ["case-timers", "push-delivery", "digests", "diagnoses"]
        ),
    ]


def notifier_health(service: NotifierService) -> Health:
    """The notifier's problems and details (the same stages as its API's ``/health``)."""
    problems = [f"stage_down:{name}" for name in sorted(service.stages.down)]
    outbox = service.outbox
    return problems, {
        **_stage_health(service.stages),
        "diagnoses_handled": service.diagnoses_handled,
        "diagnoses_failed": service.diagnoses_failed,
        "adopted_sessions": 0 if service.adoption is None else service.adoption.held,
        "notifications_failed_internally": 0 if outbox is None else outbox.errors,
        "notifications_out_of_time": 0 if outbox is None else outbox.out_of_time,
    }


def dashboard_metrics(service: DashboardService) -> list[Metric]:
    """The dashboard service's metric families."""
    p = "fixloop_dashboard"
    return [
        _one(
            f"{p}_case_changes_total",
            "counter",
            "Case changes taken from fleet/cases.",
            service.case_changes,
        ),
        _one(
            f"{p}_case_changes_refused_total",
            "counter",
            "Messages on fleet/cases that were not a case change.",
            service.case_changes_refused,
        ),
        _one(
            f"{p}_case_changes_from_message_total",
            "counter",
            "Case changes shown from the message because the store could not give the case.",
            service.case_changes_from_message,
        ),
        _one(
            f"{p}_mqtt_connected",
            "gauge",
            "1 while the fleet/cases subscription is up.",
            int(service.connected),
        ),
        _one(f"{p}_live_streams", "gauge", "Open live streams (pages).", service.feed.subscribers),
        _one(
            f"{p}_live_dropped_total",
            "counter",
            "Case changes dropped for slow live streams.",
            service.feed.dropped,
        ),
        _one(f"{p}_sessions", "gauge", "Ops sessions held.", service.sessions),
        _one(
            f"{p}_sessions_ended_total",
            "counter",
            "Sessions ended because their user was removed or changed.",
            service.sessions_ended,
        ),
        _one(f"{p}_ops_users", "gauge", "Ops users in the users file.", len(service.users.users())),
        *_stage_metrics(p, service.stages, ["case-feed", "ops-users"]),
    ]


def dashboard_health(service: DashboardService) -> Health:
    """The dashboard service's problems and details."""
    problems = [f"stage_down:{name}" for name in sorted(service.stages.down)]
    if not service.connected:
        problems.append("mqtt_disconnected")
    return problems, {
        **_stage_health(service.stages),
        "mqtt_connected": service.connected,
        "case_changes": service.case_changes,
        "live_streams": service.feed.subscribers,
    }


async def _store_answers(store: CaseStore | None) -> list[str]:
    """``[]`` when the case store answers a query, else why not."""
    if store is None:
        return ["store_closed"]
    try:
        await store.get_case(_PROBE_CASE_ID)
    except StoreUnavailableError as exc:
        _LOG.warning("readiness: the case store does not answer: %s", exc)
        return ["store_unavailable"]
    return []


async def diagnostics_ready(service: DiagnosticsService | PartitionedDiagnostics) -> list[str]:
    """What keeps the diagnostics service from scoring now: its models, its broker."""
    problems = []
    if service.engine is None:
        problems.append("no_engine")
    if not service.connected:
        problems.append("mqtt_disconnected")
    return problems


async def notifier_ready(service: NotifierService) -> list[str]:
    """What keeps the notifier from taking diagnoses now: its broker, its case store."""
    problems = []
    if not service.connected:
        problems.append("mqtt_disconnected")
    problems += await _store_answers(service.store)
    return problems


async def dashboard_ready(service: DashboardService) -> list[str]:
    """What keeps the dashboard from serving now: the case feed, the case store."""
    problems = []
    if not service.connected:
        problems.append("mqtt_disconnected")
    problems += await _store_answers(service.store)
    return problems


def diagnostics_endpoint(
    service: DiagnosticsService | PartitionedDiagnostics, host: str, port: int
) -> ServiceEndpoint:
    """The diagnostics service's ``/metrics``, ``/health``, ``/livez``, ``/readyz``."""
    return ServiceEndpoint(
        "diagnostics",
        host,
        port,
        lambda: diagnostics_metrics(service),
        lambda: diagnostics_health(service),
        lambda: diagnostics_ready(service),
    )


def notifier_endpoint(service: NotifierService, host: str, port: int) -> ServiceEndpoint:
    """The notifier's ``/metrics``, ``/health``, ``/livez`` and ``/readyz`` on ``host:port``."""
    return ServiceEndpoint(
        "notifier",
        host,
        port,
        lambda: notifier_metrics(service),
        lambda: notifier_health(service),
        lambda: notifier_ready(service),
    )


def dashboard_endpoint(service: DashboardService, host: str, port: int) -> ServiceEndpoint:
    """The dashboard service's ``/metrics``, ``/health``, ``/livez``, ``/readyz``."""
    return ServiceEndpoint(
        "dashboard",
        host,
        port,
        lambda: dashboard_metrics(service),
        lambda: dashboard_health(service),
        lambda: dashboard_ready(service),
    )
