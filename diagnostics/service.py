"""The diagnostics service: telemetry and events in over MQTT, diagnoses out.

Pipeline place: it subscribes to the same device topics the gateway stores (its own
persistent QoS-1 session, or a shared subscription across workers), feeds each batch
to the I/O-free :class:`~diagnostics.engine.DiagnosticsEngine` off the event loop,
publishes every diagnosis change on ``fleet/diagnoses`` (QoS 1), writes each reading's
scores next to the telemetry in InfluxDB (measurement ``health``), and only then
acknowledges the batch, so a crash replays it rather than losing a diagnosis.

What devices send that no product file describes (readings of a model without a file,
metrics a model's file does not list) is scored all the same and counted: every
``mismatch_every_s`` while it changes, the counts per model go to InfluxDB (measurement
``product_mismatch``, tags ``model`` and ``worker``, fields ``has_file``, ``count`` and
``metrics``), where the dashboard reads them.

Readings the gateway refuses are skipped here without a report (the gateway reports
them on ``fleet/rejected``); a device's product model comes from its boot event, or at
start from the boot events already stored in InfluxDB.

With remaining-life models learnt by ``fixloop train`` (``<model_path stem>.lifetimes.pkl``)
the engine predicts time to failure from the devices' hourly means; at start those are
backfilled from InfluxDB (hourly ``MEAN`` of each metric the models read over the last
``train_days``; true/false metrics have no mean there and start empty).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Final, Self

import numpy as np
import orjson

from diagnostics.engine import DiagnosticsEngine, EngineResult, Mismatch
from diagnostics.lifetimes import LifetimeModels, lifetimes_path
from diagnostics.model import encode_diagnosis
from diagnostics.product import load_products
from diagnostics.settings import DiagnosticsSettings
from wire.consumer import consume_forever, shared_filters
from wire.errors import (
    PermanentError,
    RejectedError,
    StoreUnavailableError,
)
from wire.influx import InfluxClient, InfluxSettings
from wire.lineproto import HEALTH_MEASUREMENT, MISMATCH_MEASUREMENT, point_line
from wire.mqtt import Message, MqttClient
from wire.protocol import (
    DIAGNOSES_TOPIC,
    Event,
    Reading,
    decode_event,
    decode_reading,
    split_device_topic,
)
from wire.settings import MqttSettings
from wire.supervisor import StageHealth, supervise

__all__ = [
    "DiagnosticsService",
    "backfill_lifetimes",
    "health_lines",
    "load_engine",
    "mismatch_lines",
    "registry_or_empty",
    "stored_registry",
]

_LOG = logging.getLogger(__name__)

_FILTERS: Final = ("devices/+/telemetry", "devices/+/events")
#: Longest list of metric names written for one model (a device may invent many).
_MISMATCH_TEXT: Final = 2_000
_SCORE_WRITE_TRIES: Final = 5


def load_engine(
    settings: DiagnosticsSettings, registry: Mapping[str, str] | None = None
) -> DiagnosticsEngine:
    """Load the trained engine, or a baselines-only one when nothing is trained yet.

    Args:
        settings: where the models are, and the products folder.
        registry: device id to product model, for devices whose boot is not seen.

    Raises:
        ConfigError: a model file exists but cannot be used, or a product file is wrong.
    """
    products = load_products(settings.products_dir)
    path = settings.model_path
    scoring = settings.generic_scoring
    lifetimes: LifetimeModels | None = None
    learnt = lifetimes_path(path)
    if learnt.exists():
        lifetimes = LifetimeModels.load(learnt)
        _LOG.info(
            "remaining-life models loaded from %s: %s",
            learnt,
            ", ".join(f"{m}/{f}" for m, f in sorted(lifetimes.models)) or "none",
        )
    if path.exists():
        engine = DiagnosticsEngine.load(
            path,
            registry=registry,
            products=products,
            lifetimes=lifetimes,
            generic_scoring=scoring,
        )
        _LOG.info("diagnostics models loaded from %s: %s", path, sorted(engine.fleet_models))
        return engine
    _LOG.warning(
        "no trained diagnostics model at %s: scoring with per-device baselines only "
        "(run `fixloop train` once there is history)",
        path,
    )
    return DiagnosticsEngine(
        registry=registry, products=products, lifetimes=lifetimes, generic_scoring=scoring
    )


async def backfill_lifetimes(
    influx: InfluxClient,
    engine: DiagnosticsEngine,
    registry: Mapping[str, str],
    *,
    days: float,
    now_ms: int,
) -> int:
    """Fill the hourly means the learnt remaining-life models read from stored telemetry.

    One InfluxQL ``MEAN`` per metric and product model, by hour and device, over the
    ``days`` before the current hour (which the live readings fill). A metric InfluxDB
    cannot average (true/false) is left empty and logged.

    Returns:
        the hourly rows added.

    Raises:
        StoreUnavailableError: InfluxDB cannot be reached.
    """
    live = engine.lifetimes
    if live is None:
        return 0
    history = live.history
    step_ms = int(history.step_s * 1000)
    end_ms = now_ms // step_ms * step_ms
    start_ms = end_ms - int(days * 86_400_000)
    added = 0
    for model, columns in sorted(history.columns.items()):
        devices = {d for d, m in registry.items() if m == model}
        if not devices:
            continue
        rows: dict[str, dict[int, list[float]]] = {}
        for j, column in enumerate(columns):
            query = (
                f'SELECT MEAN("{column}") FROM telemetry WHERE time >= {start_ms}ms AND '
                f"time < {end_ms}ms GROUP BY time({step_ms}ms), device"
            )
            try:
                series = await influx.query(query)
            except PermanentError as exc:
                _LOG.info("%s: %s not backfilled (%s)", model, column, exc)
                continue
            for item in series:
                device = item.tags.get("device")
                if device not in devices:
                    continue
                steps = rows.setdefault(device, {})
                for stamp, value in item.values:
                    if isinstance(value, int | float) and math.isfinite(value):
                        row = steps.setdefault(int(stamp) // step_ms, [math.nan] * len(columns))
                        row[j] = float(value)
        for device, steps in rows.items():
            order = sorted(steps)
            values = np.array([steps[k] for k in order], dtype=np.float64)
            added += history.add_rows(device, model, order, values)
    _LOG.info("remaining life: %d hourly rows backfilled from InfluxDB", added)
    return added


async def stored_registry(influx: InfluxClient) -> dict[str, str]:
    """Device id to product model, from the boot events already in InfluxDB."""
    series = await influx.query(
        "SELECT LAST(data) FROM device_events WHERE kind = 'boot' GROUP BY device"
    )
    registry: dict[str, str] = {}
    for item in series:
        device = item.tags.get("device")
        if not device or not item.values:
            continue
        try:
            data = orjson.loads(item.values[0][1])
        except (orjson.JSONDecodeError, TypeError):
            continue
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, str) and model:
            # any model: one without a product file is scored generically
            registry[device] = model
        else:
            _LOG.warning("device %s booted without a product model (%r)", device, model)
    return registry


async def registry_or_empty(influx: InfluxClient) -> dict[str, str]:
    """:func:`stored_registry`, or no device when InfluxDB cannot say yet (warned).

    A starting service learns devices from their boot events as they come.
    """
    try:
        return await stored_registry(influx)
    except (StoreUnavailableError, PermanentError) as exc:
        _LOG.warning("cannot read the device registry from InfluxDB yet: %s", exc)
        return {}


def mismatch_lines(mismatches: Iterable[Mismatch], worker: str, ts_ms: int) -> list[bytes]:
    """Line-protocol points of the mismatch counts (one per model) at ``ts_ms``.

    Args:
        mismatches: :meth:`DiagnosticsEngine.mismatches`.
        worker: the service's MQTT client id (workers of a shared subscription each
            count their own devices).
        ts_ms: the time of the count (epoch ms).
    """
    lines: list[bytes] = []
    for found in mismatches:
        names = ",".join(found.metrics)
        if len(names) > _MISMATCH_TEXT:
            names = names[: names.rfind(",", 0, _MISMATCH_TEXT)] + ",..."
        fields: dict[str, float | int | bool | str] = {
            "has_file": found.has_file,
            "count": found.count,
            "metrics": names,
        }
        tags = {"model": found.model, "worker": worker}
        lines.append(point_line(MISMATCH_MEASUREMENT, tags, fields, ts_ms))
    return lines


def health_lines(result: EngineResult) -> list[bytes]:
    """Line-protocol points of a round's scores (measurement ``health``; late ones skipped)."""
    scores = result.scores
    return [
        point_line(
            HEALTH_MEASUREMENT,
            {"device": device_id},
            {"score": score, "baseline": baseline, "fleet": fleet},
            ts_ms,
        )
        for device_id, ts_ms, score, baseline, fleet, late in zip(
            scores.device_ids,
            scores.ts_ms,
            scores.score,
            scores.baseline,
            scores.fleet,
            scores.late,
            strict=True,
        )
        if not late
    ]


def _decode(messages: Iterable[Message], now_ms: int) -> list[Reading | Event]:
    items: list[Reading | Event] = []
    for message in messages:
        target = split_device_topic(message.topic)
        if target is None:
            continue
        device_id, channel = target
        try:
            if channel == "telemetry":
                items.append(decode_reading(device_id, message.payload, now_ms))
            elif channel == "events":
                items.append(decode_event(device_id, message.payload, now_ms))
        except RejectedError:
            continue  # the gateway reports what it refuses
    return items


class DiagnosticsService:
    """Scores the fleet as it speaks; an async context manager, :meth:`run` until cancelled.

    Args:
        mqtt: how to reach the broker (a service user).
        influx: where telemetry lives and scores go.
        settings: the service's settings.
        engine: an engine to use instead of loading ``settings.model_path``.
        clock: wall clock in seconds.
        mismatch_every_s: least time between two writes of the mismatch counts.
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        influx: InfluxSettings,
        settings: DiagnosticsSettings,
        *,
        engine: DiagnosticsEngine | None = None,
        clock: Callable[[], float] = time.time,
        mismatch_every_s: float = 30.0,
    ) -> None:
        self._mqtt = mqtt
        self._influx_settings = influx
        self._settings = settings
        self._clock = clock
        self.engine = engine
        self._influx: InfluxClient | None = None
        self._subscribed = asyncio.Event()
        self.diagnoses_published = 0
        self.readings_scored = 0
        self.scores_dropped = 0
        self._mismatch_every_s = mismatch_every_s
        self._mismatch_at = -math.inf
        self._mismatch_said: list[Mismatch] = []
        #: readings and events the engine raised on (logged with the device, skipped)
        self.items_failed = 0
        #: the consumer's state: down while restarting after an unforeseen error
        self.stages = StageHealth()
        #: whether the device topics' subscription is up (readiness)
        self.connected = False

    @property
    def unknown_readings(self) -> int:
        """Readings of devices whose model no product file describes (scored generically)."""
        return 0 if self.engine is None else self.engine.unknown_readings

    @property
    def unlisted_metrics(self) -> int:
        """Metric values of described models that their file does not list (scored too)."""
        return 0 if self.engine is None else self.engine.unlisted_metrics

    async def __aenter__(self) -> Self:
        self._influx = InfluxClient(self._influx_settings)
        await self._influx.__aenter__()
        if self.engine is None:
            registry = await registry_or_empty(self._influx)
            _LOG.info("diagnostics knows %d devices from stored boot events", len(registry))
            try:
                self.engine = await asyncio.to_thread(load_engine, self._settings, registry)
            except BaseException:
                await self._influx.__aexit__(None, None, None)
                raise
            if self._settings.lifetime_backfill and self.engine.lifetimes is not None:
                try:
                    await backfill_lifetimes(
                        self._influx,
                        self.engine,
                        registry,
                        days=self._settings.train_days,
                        now_ms=int(self._clock() * 1000),
                    )
                except StoreUnavailableError as exc:
                    _LOG.warning("remaining life not backfilled, InfluxDB unavailable: %s", exc)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._influx is not None:
            await self._influx.__aexit__(exc_type, exc, tb)

    async def wait_subscribed(self) -> None:
        """Wait until the service is subscribed."""
        await self._subscribed.wait()

    async def run(self) -> None:
        """Consume, score and publish until cancelled; reconnect with backoff.

        Raises:
            ConfigError: the broker refused our credentials.
        """
        settings = self._settings
        # a consumer that dies anyway is logged at once and restarted (unacknowledged
        # messages come again from the persistent session)
        await supervise(
            "diagnostics",
            lambda: consume_forever(
                lambda: self._mqtt.client(
                    settings.client_id,
                    clean_start=False,
                    session_expiry_s=settings.session_expiry_s,
                    # Never below the Receive Maximum (65,535 by default): the broker may
                    # have that many messages in flight to us.
                    max_buffered=max(settings.batch_max * 4, 65_535),
                ),
                shared_filters(_FILTERS, settings.shared_group),
                self._consume,
                on_subscribed=self._on_subscribed,
                on_lost=self._on_lost,
            ),
            self.stages,
        )

    def _on_subscribed(self, _client: MqttClient) -> None:
        self.connected = True
        self._subscribed.set()

    def _on_lost(self) -> None:
        self.connected = False

    async def _consume(self, client: MqttClient) -> None:
        engine = self.engine
        assert engine is not None
        while True:
            await client.wait_messages()
            messages = client.take(self._settings.batch_max)
            items = _decode(messages, int(self._clock() * 1000))
            try:
                result = await asyncio.to_thread(engine.process, items)
            except Exception:
                # one reading that trips the engine must not stop the fleet's scoring:
                # the round again, one item at a time, skipping (and naming) the culprit
                _LOG.exception("a round of %d items failed; scoring them one by one", len(items))
                for item in items:
                    try:
                        one = await asyncio.to_thread(engine.process, [item])
                    except Exception:
                        self.items_failed += 1
                        _LOG.exception(
                            "%s of device %s at %d skipped: the engine raised on it",
                            type(item).__name__,
                            item.device_id,
                            item.ts_ms,
                        )
                        continue
                    await self._publish(client, one)
            else:
                await self._publish(client, result)
            client.ack_many(messages)

    async def _publish(self, client: MqttClient, result: EngineResult) -> None:
        for diagnosis in result.diagnoses:
            await client.publish(DIAGNOSES_TOPIC, encode_diagnosis(diagnosis), qos=1)
            self.diagnoses_published += 1
            _LOG.log(
                logging.DEBUG if diagnosis.status == "update" else logging.INFO,
                "diagnosis %s: %s on %s (confidence %.2f)",
                diagnosis.status,
                diagnosis.fault,
                diagnosis.device_id,
                diagnosis.confidence,
            )
        self.readings_scored += len(result.scores)
        if not self._settings.write_scores:
            return
        await self._write_mismatches()
        if not result.scores:
            return
        await self._write_scores(health_lines(result))

    async def _write_mismatches(self) -> None:
        """Write the mismatch counts when they changed, at most every ``mismatch_every_s``."""
        now = time.monotonic()
        if self.engine is None or now - self._mismatch_at < self._mismatch_every_s:
            return
        mismatches = self.engine.mismatches()
        if mismatches == self._mismatch_said:
            return
        self._mismatch_at = now
        lines = mismatch_lines(mismatches, self._settings.client_id, int(self._clock() * 1000))
        await self._write_scores(lines)
        self._mismatch_said = mismatches

    async def _write_scores(self, lines: list[bytes]) -> None:
        """Write scores; they are derived data, so after a few tries they are let go."""
        assert self._influx is not None
        delay_s = 0.2
        for attempt in range(_SCORE_WRITE_TRIES):
            try:
                await self._influx.write(lines)
            except StoreUnavailableError as exc:
                if attempt == _SCORE_WRITE_TRIES - 1:
                    self.scores_dropped += len(lines)
                    _LOG.warning("scores not stored (%s): %d dropped", exc, len(lines))
                    return
                await asyncio.sleep(delay_s)
                delay_s *= 2
            else:
                return
