"""Streaming per-device features (diagnostics, first step of "Detect").

Every telemetry :class:`~gateway.protocol.Reading` becomes a short vector of *raw
features* for its product model: physical quantities that stay comparable across
operating states (vibration per squared drum speed while spinning, drain flow while
draining, evaporator temperature while the compressor runs, COP against its Carnot
limit, the main sensor's offset from a second sensor while idle, duty cycles of on/off
states). A raw feature is ``NaN`` when the reading does not show it (no spin, no drain).

:class:`FeatureTable` keeps, per device and feature, an exponentially weighted level,
spread and linear trend (per day, weighted by the time each step covers), so memory is O(1) per
metric: a few float32 numbers. The table is a structure of arrays over device slots and is
updated for a whole batch at once (a batch holds each slot at most once), by one compiled
loop in :meth:`FeatureTable.advance` (:mod:`diagnostics.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics.kernels import advance_rows
from gateway.protocol import MetricValue, Reading

__all__ = [
    "FEATURE_SPECS",
    "FeatureDef",
    "FeatureSpec",
    "FeatureTable",
    "extract_features",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
_NAN: Final = math.nan
_TREND_TAU_DAYS: Final = 1.0
_RUN_FULL: Final = 20.0
_FLOW_W_PER_K: Final = 0.35 * 4186.0


@dataclass(frozen=True, slots=True)
class FeatureDef:
    """One streaming feature of a product model.

    Attributes:
        name: the feature's name.
        metrics: the metrics it is computed from (for explanations).
        alpha: weight of a new value in the feature's level (per update).
        floor: smallest change that matters (sensor noise and quantization), feature unit.
        min_count: updates before the device's own baseline of it is trusted.
        description: plain words.
    """

    name: str
    metrics: tuple[str, ...]
    alpha: float
    floor: float
    min_count: int
    description: str


Extractor = Callable[[Mapping[str, MetricValue], str | None], list[float]]


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """The features of one product model and how to compute them from a reading.

    Attributes:
        model: the product model.
        primary_metric: the main temperature sensor's metric (for ``sensor_repeat``).
        features: the features, in vector order.
        extract: metrics and status to raw feature values (``NaN`` when not shown); the
            ``sensor_repeat`` slot carries the main sensor's own value, which
            :class:`FeatureTable` turns into the repeat share (it needs the history).
    """

    model: str
    primary_metric: str
    features: tuple[FeatureDef, ...]
    extract: Extractor

    @property
    def names(self) -> tuple[str, ...]:
        """The feature names, in vector order."""
        return tuple(f.name for f in self.features)

    def index(self, name: str) -> int:
        """Return the position of feature ``name`` (``-1`` when the model lacks it)."""
        names = self.names
        return names.index(name) if name in names else -1


def _f(values: Mapping[str, MetricValue], name: str) -> float:
    return float(values.get(name, _NAN))


def _washer(m: Mapping[str, MetricValue], status: str | None) -> list[float]:
    rpm = _f(m, "drum_rpm")
    spin = _f(m, "vibration_rms_g") / (rpm / 1000.0) ** 2 if rpm >= 600.0 else _NAN
    tumbling = status in ("washing", "rinsing") and 40.0 <= rpm <= 60.0
    power = _f(m, "power_w") if tumbling else _NAN
    flow = _f(m, "drain_flow_l_min")
    drain = flow if status == "draining" and flow > 0.0 else _NAN
    idle = status == "idle" and rpm == 0.0 and _f(m, "water_level_l") == 0.0
    offset = _f(m, "water_temp_c") - _f(m, "ambient_temp_c") if idle else _NAN
    error = 1.0 if status == "error" else 0.0
    return [spin, power, drain, offset, _f(m, "water_temp_c"), error]


def _fridge(m: Mapping[str, MetricValue], status: str | None) -> list[float]:
    on = bool(m.get("compressor_on", False))
    cabinet = _f(m, "cabinet_temp_c")
    evaporator = _f(m, "evaporator_temp_c")
    duty = _f(m, "compressor_duty")
    door = bool(m.get("door_open", False))
    evap_on = evaporator if on and status == "cooling" else _NAN
    power_on = _f(m, "power_w") if on and not door and status == "cooling" else _NAN
    # the evaporator settles at the true cabinet temperature while the compressor rests
    settled = status == "idle" and not on and evaporator > cabinet - 8.0
    evap_off = evaporator - cabinet if settled else _NAN
    lift = max(_f(m, "ambient_temp_c") - cabinet, 5.0)
    error = 1.0 if status == "error" else 0.0
    return [evap_on, power_on, duty, duty / lift, evap_off, cabinet, error]


def _heat_pump(m: Mapping[str, MetricValue], status: str | None) -> list[float]:
    flow = _f(m, "flow_temp_c")
    outdoor = _f(m, "outdoor_temp_c")
    heat = _f(m, "heat_output_w")
    power = _f(m, "power_w")
    efficiency = _NAN
    capacity = _NAN
    if status == "heating" and heat > 0.0 and power > 0.0:
        # COP from the reported heat output and the power meter, not the firmware's own
        # ``cop`` (that one is computed from the flow sensor, so a drifting sensor moves it)
        hot_k = flow + 276.15
        cold_k = outdoor + 267.15
        efficiency = heat / power * max(hot_k - cold_k, 1.0) / hot_k
        hz = _f(m, "compressor_hz")
        if hz > 25.0:
            modulation = (hz - 20.0) / 70.0
            factor = min(1.15, max(0.5, 0.7 + 0.015 * (outdoor + 7.0)))
            capacity = heat / modulation / factor
    defrost = 1.0 if status == "defrost" else 0.0
    # the firmware reports its true heat output; the water flow is fixed (0.35 l/s), so
    # flow minus return must match it: what is left over is the flow sensor's offset
    offset = flow - _f(m, "return_temp_c") - _f(m, "heat_output_w") / _FLOW_W_PER_K
    if status not in ("heating", "standby", "dhw"):
        offset = _NAN
    error = 1.0 if status == "error" else 0.0
    return [efficiency, capacity, defrost, offset, flow, error]


def _repeat() -> FeatureDef:
    return FeatureDef(
        "sensor_repeat",
        (),
        0.1,
        0.1,
        100,
        "how long the main sensor has repeated one value exactly (1 = 20 readings or more)",
    )


def _error() -> FeatureDef:
    return FeatureDef("error_status", (), 0.3, 0.1, 60, "share of readings in status error")


#: Feature specs, keyed by product model.
FEATURE_SPECS: Final[Mapping[str, FeatureSpec]] = {
    "washer": FeatureSpec(
        "washer",
        "water_temp_c",
        (
            FeatureDef(
                "spin_vibration",
                ("vibration_rms_g", "drum_rpm"),
                0.15,
                0.04,
                16,
                "drum vibration per squared spin speed (g per krpm²), spins above 600 rpm",
            ),
            FeatureDef(
                "tumble_power_w",
                ("power_w", "drum_rpm"),
                0.1,
                6.0,
                30,
                "motor power while tumbling (W)",
            ),
            FeatureDef(
                "drain_flow_l_min",
                ("drain_flow_l_min",),
                0.3,
                0.4,
                4,
                "drain flow while draining (l/min)",
            ),
            FeatureDef(
                "idle_temp_offset_k",
                ("water_temp_c", "ambient_temp_c"),
                0.05,
                0.4,
                200,
                "drum sensor minus room sensor while idle and empty (K)",
            ),
            _repeat(),
            _error(),
        ),
        _washer,
    ),
    "fridge": FeatureSpec(
        "fridge",
        "cabinet_temp_c",
        (
            FeatureDef(
                "evaporator_on_c",
                ("evaporator_temp_c", "compressor_on"),
                0.05,
                0.8,
                100,
                "evaporator temperature while the compressor cools (°C)",
            ),
            FeatureDef(
                "power_on_w",
                ("power_w", "compressor_on"),
                0.05,
                0.3,
                100,
                "power while the compressor runs, door shut (W)",
            ),
            FeatureDef(
                "compressor_duty",
                ("compressor_duty",),
                0.02,
                0.05,
                300,
                "compressor duty over the last hour",
            ),
            FeatureDef(
                "duty_per_lift",
                ("compressor_duty", "ambient_temp_c", "cabinet_temp_c"),
                0.02,
                0.004,
                300,
                "compressor duty per kelvin between room and cabinet",
            ),
            FeatureDef(
                "evaporator_off_offset_k",
                ("evaporator_temp_c", "cabinet_temp_c"),
                0.05,
                0.5,
                200,
                "evaporator minus cabinet sensor while the compressor rests (K)",
            ),
            _repeat(),
            _error(),
        ),
        _fridge,
    ),
    "heat_pump": FeatureSpec(
        "heat_pump",
        "flow_temp_c",
        (
            FeatureDef(
                "cop_efficiency",
                ("heat_output_w", "power_w", "flow_temp_c", "outdoor_temp_c"),
                0.03,
                0.02,
                200,
                "COP over its Carnot limit at the flow and outdoor temperatures",
            ),
            FeatureDef(
                "capacity_w",
                ("heat_output_w", "compressor_hz", "outdoor_temp_c"),
                0.03,
                250.0,
                200,
                "heat output at full modulation, corrected for outdoor temperature (W)",
            ),
            FeatureDef(
                "defrost_share",
                (),
                0.005,
                0.03,
                600,
                "share of readings in defrost",
            ),
            FeatureDef(
                "flow_offset_k",
                ("flow_temp_c", "return_temp_c", "heat_output_w"),
                0.05,
                0.3,
                200,
                "flow minus return sensor beyond what the heat output explains (K)",
            ),
            _repeat(),
            _error(),
        ),
        _heat_pump,
    ),
}


def extract_features(spec: FeatureSpec, reading: Reading) -> list[float]:
    """Return the raw features of one reading (``NaN`` where the reading shows none).

    ``sensor_repeat`` is ``NaN`` too: it needs the device's history (see
    :class:`FeatureTable`).
    """
    values = spec.extract(reading.metrics, reading.status)
    repeat = spec.index("sensor_repeat")
    if repeat >= 0:
        values[repeat] = _NAN
    return values


class FeatureTable:
    """Streaming features of all devices of one product model (structure of arrays).

    Per device slot and feature: level (EW mean), spread (EW variance around the level),
    trend (EW linear slope per day, Holt) and the time of its last update; per slot: the
    last main-sensor value and the last reading time.

    Args:
        spec: the product model's features.
        capacity: initial number of device slots (grows by doubling).
    """

    def __init__(self, spec: FeatureSpec, capacity: int = 64) -> None:
        self.spec = spec
        n = len(spec.features)
        self.width = n
        self.alpha = np.array([f.alpha for f in spec.features], dtype=np.float32)
        self._keep = (np.float32(1.0) - self.alpha).astype(np.float32)
        self.floor2 = np.array([f.floor**2 for f in spec.features], dtype=np.float32)
        self.trend_tau_days = _TREND_TAU_DAYS
        self._repeat = spec.index("sensor_repeat")
        self.level: F32 = np.full((capacity, n), np.nan, dtype=np.float32)
        self.spread: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.trend: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.count: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.updated_s: npt.NDArray[np.int32] = np.zeros((capacity, n), dtype=np.int32)
        self.last_primary: F32 = np.full(capacity, np.nan, dtype=np.float32)
        self.run: F32 = np.zeros(capacity, dtype=np.float32)
        self.last_ts_ms: I64 = np.full(capacity, np.iinfo(np.int64).min, dtype=np.int64)
        self.epoch_ms: int | None = None

    @property
    def capacity(self) -> int:
        """The number of slots allocated."""
        return int(self.level.shape[0])

    def ensure(self, slots: int) -> None:
        """Grow the arrays to hold at least ``slots`` slots."""
        cap = self.capacity
        if slots <= cap:
            return
        new = max(slots, 2 * cap)
        for name in ("level", "spread", "trend", "count", "updated_s", "last_primary", "run"):
            old = getattr(self, name)
            fill = np.nan if name in ("level", "last_primary") else 0
            grown = np.full((new, *old.shape[1:]), fill, dtype=old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)
        ts = np.full(new, np.iinfo(np.int64).min, dtype=np.int64)
        ts[:cap] = self.last_ts_ms
        self.last_ts_ms = ts

    def advance(
        self, readings: Sequence[Reading], slots: npt.NDArray[np.intp], ts_ms: I64
    ) -> tuple[F32, F32, npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
        """Fold ``readings`` (one per slot, slots distinct) into the slots' state.

        One compiled pass (:func:`diagnostics.kernels.advance_rows`); a reading not newer
        than its slot's last one (late) changes nothing.

        Returns:
            the slots' levels and update counts after the step, each reading's device time
            (seconds since :attr:`epoch_ms`) and which readings were late.
        """
        if self.epoch_ms is None:
            self.epoch_ms = int(ts_ms.min()) if len(ts_ms) else 0
        spec = self.spec
        extract = spec.extract
        x = np.array([extract(r.metrics, r.status) for r in readings], dtype=np.float32)
        x = x.reshape(len(readings), self.width)
        level, count, now_s, late = advance_rows(
            x,
            self._repeat,
            _RUN_FULL,
            slots,
            ts_ms,
            self.epoch_ms,
            self.level,
            self.spread,
            self.trend,
            self.count,
            self.updated_s,
            self.last_primary,
            self.run,
            self.last_ts_ms,
            self.alpha,
            self._keep,
            _TREND_TAU_DAYS,
        )
        return level, count, now_s, late

    def state_bytes(self) -> int:
        """Bytes of numpy state per device slot."""
        per_row = sum(
            getattr(self, name)[0].nbytes
            for name in ("level", "spread", "trend", "count", "updated_s", "last_primary", "run")
        )
        return int(per_row + self.last_ts_ms.itemsize)
