"""``fixloop train``: learn the fleet models from the history stored in InfluxDB.

Reads telemetry and device events window by window (InfluxQL, so any InfluxDB flavour),
replays them through a :class:`~diagnostics.engine.DiagnosticsEngine` that samples
healthy feature rows (rows of flagged devices are skipped), fits one fleet model per
product model off the event loop and saves them in the versioned model format.

Given recorded failures (``fixloop`` reads them from the case store), the failed devices'
readings are also kept per hour and a remaining-life model is fitted per product model
and fault with enough failures (:mod:`diagnostics.lifetimes`, the predictor of ``fixloop
ttf``), saved beside the fleet models. Only failures inside the history read count, so
``--days`` should span the parts' lives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from diagnostics.engine import DiagnosticsEngine
from diagnostics.lifetimes import Failure, StepHistory, fit_lifetime_models, lifetimes_path
from diagnostics.product import load_products
from diagnostics.service import stored_registry
from diagnostics.settings import DiagnosticsSettings
from wire.errors import ConfigError
from wire.influx import InfluxClient, InfluxSettings, Series
from wire.protocol import EVENT_KINDS, Event, Reading

__all__ = ["TrainingReport", "history_items", "train_from_influx"]

_LOG = logging.getLogger(__name__)
_NOT_METRICS: Final = frozenset(("time", "seq", "status", "device"))

#: Called with (share done in [0, 1], readings so far) after every window.
Progress = Callable[[float, int], None]


@dataclass(frozen=True, slots=True)
class TrainingReport:
    """What ``fixloop train`` did.

    Attributes:
        readings: readings replayed.
        events: events replayed.
        devices: devices seen with a known product model.
        models: product model to the number of healthy rows its fleet model learnt from.
        path: where the models were saved.
        lifetimes: ``model/fault`` to the failures its remaining-life model learnt from.
    """

    readings: int
    events: int
    devices: int
    models: dict[str, int]
    path: str
    lifetimes: dict[str, int] = field(default_factory=dict)


def _readings(series: list[Series]) -> list[Reading]:
    out: list[Reading] = []
    for item in series:
        device = item.tags.get("device")
        if not device:
            continue
        columns = item.columns
        for row in item.values:
            values: dict[str, Any] = dict(zip(columns, row, strict=True))
            metrics: dict[str, float | bool] = {}
            for name, value in values.items():
                if name in _NOT_METRICS or value is None:
                    continue
                if isinstance(value, bool):
                    metrics[name] = value
                elif isinstance(value, int | float):
                    metrics[name] = float(value)
            if not metrics or values.get("seq") is None:
                continue
            status = values.get("status")
            out.append(
                Reading(
                    device,
                    int(values["seq"]),
                    int(values["time"]),
                    metrics,
                    status if isinstance(status, str) else None,
                )
            )
    return out


def _events(series: list[Series]) -> list[Event]:
    out: list[Event] = []
    for item in series:
        device = item.tags.get("device")
        if not device:
            continue
        for row in item.values:
            values: dict[str, Any] = dict(zip(item.columns, row, strict=True))
            kind = values.get("kind")
            if kind not in EVENT_KINDS or values.get("seq") is None:
                continue
            data: dict[str, float | bool | str] = {}
            if isinstance(values.get("data"), str):
                try:
                    loaded = orjson.loads(values["data"])
                except orjson.JSONDecodeError:
                    loaded = {}
                if isinstance(loaded, dict):
                    data = {k: v for k, v in loaded.items() if isinstance(v, float | bool | str)}
            ok = values.get("ok")
            out.append(
                Event(
                    device_id=device,
                    seq=int(values["seq"]),
                    ts_ms=int(values["time"]),
                    kind=kind,
                    code=values.get("code"),
                    command_id=values.get("command_id"),
                    ok=ok if isinstance(ok, bool) else None,
                    detail=values.get("detail"),
                    data=data,
                )
            )
    return out


async def history_items(influx: InfluxClient, start_ms: int, end_ms: int) -> list[Reading | Event]:
    """Readings and events stored in ``[start_ms, end_ms)``, in time order."""
    where = f"time >= {start_ms}ms AND time < {end_ms}ms"
    telemetry = await influx.query(f"SELECT * FROM telemetry WHERE {where} GROUP BY device")
    events = await influx.query(f"SELECT * FROM device_events WHERE {where} GROUP BY device")
    items: list[Reading | Event] = [*_readings(telemetry), *_events(events)]
    # Events first on a tie: a boot names the model before that instant's reading.
    items.sort(key=lambda item: (item.ts_ms, isinstance(item, Reading)))
    return items


async def train_from_influx(
    influx: InfluxSettings,
    settings: DiagnosticsSettings,
    *,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
    failures: Sequence[Failure] = (),
) -> TrainingReport:
    """Learn fleet models from the last ``settings.train_days`` of history and save them.

    With ``failures``, remaining-life models are learnt from the failed devices' history
    too (see the module docstring).

    Raises:
        StoreUnavailableError: InfluxDB cannot be reached.
        ConfigError: the history holds too little healthy data to fit any model.
    """
    end_ms = int(clock() * 1000)
    start_ms = end_ms - int(settings.train_days * 86_400_000)
    step_ms = settings.train_window_s * 1000
    readings = events = 0
    async with InfluxClient(influx) as client:
        registry = await stored_registry(client)
        engine = DiagnosticsEngine(
            registry=registry,
            collect_training=settings.train_sample,
            products=load_products(settings.products_dir),
        )
        failed = StepHistory(devices=frozenset(f.device_id for f in failures))
        window = start_ms
        while window < end_ms:
            upper = min(window + step_ms, end_ms)
            items = await history_items(client, window, upper)
            readings += sum(1 for i in items if isinstance(i, Reading))
            events += sum(1 for i in items if isinstance(i, Event))
            if items:
                await asyncio.to_thread(engine.process, items)
                if failures:
                    await asyncio.to_thread(failed.add, items)
            window = upper
            if progress is not None:
                progress((window - start_ms) / (end_ms - start_ms), readings)
    fitted = await asyncio.to_thread(engine.fit_fleet_models)
    if not fitted:
        raise ConfigError(
            f"not enough healthy history in the last {settings.train_days:g} days to train "
            f"a fleet model ({readings} readings of {engine.devices} devices)"
        )
    path = settings.model_path
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(engine.save, path)
    _LOG.info("fleet models for %s saved to %s", sorted(fitted), path)
    lifetimes: dict[str, int] = {}
    if failures:
        learnt = await asyncio.to_thread(fit_lifetime_models, failed, failures)
        if learnt.models:
            await asyncio.to_thread(learnt.save, lifetimes_path(path))
        lifetimes = {f"{m}/{f}": learnt.failures[(m, f)] for m, f in learnt.models}
        _LOG.info(
            "remaining-life models from %d recorded failures: %s",
            len(failures),
            ", ".join(f"{key} ({n})" for key, n in sorted(lifetimes.items())) or "none",
        )
    return TrainingReport(
        readings=readings,
        events=events,
        devices=engine.devices,
        models={model: fleet.rows for model, fleet in fitted.items()},
        path=str(path),
        lifetimes=lifetimes,
    )
