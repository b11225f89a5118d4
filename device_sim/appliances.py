"""Physics of the three simulated product models (device_sim, the hardware stand-in).

Each :class:`Appliance` advances its own state in sim time, reports quantized sensor
values and runs its self-test. Faults reach the physics as severities in ``[0, 1]``
(:attr:`Appliance.severity`, kept by the device's firmware layer) and as the state of the
main temperature sensor (:class:`TempSensor`); the appliance never decides that a fault
exists, it only behaves accordingly. The firmware layer (:mod:`device_sim.device`) owns
sequence numbers, events, commands and connectivity.

Signals (units in names, quantized like real firmware reports them):

* washer: ``water_temp_c`` (0.1 °C), ``water_level_l`` (0.1 l), ``drum_rpm`` (1 rpm),
  ``vibration_rms_g`` (0.01 g), ``drain_flow_l_min`` (0.1), ``power_w`` (1 W),
  ``door_open``, ``ambient_temp_c``; status ``idle``/``filling``/``heating``/``washing``/
  ``rinsing``/``draining``/``spinning``/``cleaning``/``error``.
* fridge: ``cabinet_temp_c``, ``evaporator_temp_c`` (0.1 °C), ``compressor_on``,
  ``compressor_duty`` (fraction over the last hour, 0.01), ``power_w``, ``door_open``,
  ``ambient_temp_c``; status ``cooling``/``idle``/``defrost``/``error``.
* heat pump: ``outdoor_temp_c``, ``flow_temp_c``, ``return_temp_c`` (0.1 °C),
  ``compressor_on``, ``compressor_hz`` (1 Hz), ``heat_output_w``, ``power_w`` (1 W),
  ``cop`` (0.01, only while the compressor heats); status ``heating``/``dhw``/
  ``defrost``/``standby``/``error``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Final

from device import Refusal
from device.contract import EventKind, MetricValue
from device_sim.environment import Climate, local_hour
from wire.errors import ConfigError

__all__ = [
    "Appliance",
    "Fridge",
    "HeatPump",
    "Notice",
    "SelfTestResult",
    "TempSensor",
    "Washer",
    "make_appliance",
]

_FLATLINE_SAMPLES: Final = 30
_SENSOR_TOLERANCE_K: Final = 2.0
_WATER_HEAT_J_PER_L_K: Final = 4186.0


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the appliance wants its firmware to report as an event.

    Attributes:
        kind: the event kind (``error`` or ``info``).
        code: the error or info code (``E21``).
        detail: plain words.
        data: measured values that go with it.
    """

    kind: EventKind
    code: str
    detail: str
    data: dict[str, float | bool | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """What a device's self-test could see of its own state.

    Attributes:
        passed: no finding.
        code: ``PASS`` or the first finding's code (``E52``).
        detail: plain words about the findings.
        data: the measured values.
    """

    passed: bool
    code: str
    detail: str
    data: dict[str, float | bool | str]


class TempSensor:
    """The appliance's main temperature sensor: noise, 0.1 °C steps, drift or a stuck value.

    Attributes:
        noise_c: standard deviation of the read noise, K.
        offset_c: drift added to every read, K (set by the firmware layer from the fault).
        stuck_c: a value returned for every read while stuck, else ``None``.
    """

    __slots__ = ("_rng", "noise_c", "offset_c", "stuck_c")

    def __init__(self, rng: random.Random, noise_c: float = 0.08) -> None:
        self._rng = rng
        self.noise_c = noise_c
        self.offset_c = 0.0
        self.stuck_c: float | None = None

    def read(self, true_c: float) -> float:
        """Return what the sensor reports for the true temperature ``true_c``."""
        if self.stuck_c is not None:
            return self.stuck_c
        return round(true_c + self.offset_c + self._rng.gauss(0.0, self.noise_c), 1)


def _relax(value: float, target: float, dt_s: float, tau_s: float) -> float:
    """First-order approach of ``value`` to ``target`` over ``dt_s`` (exact, stable)."""
    return target + (value - target) * math.exp(-dt_s / tau_s)


class Appliance:
    """Base of the product models: shared sensor checks, hang handling and interfaces.

    Attributes:
        model: the product model's name.
        primary_metric: the metric name of the main temperature sensor.
        severity: fault name to current severity in ``[0, 1]`` (set by the firmware layer).
        hung: the control task hangs (``controller_hang``): the appliance stops working.
        sensor: the main temperature sensor.
    """

    model: ClassVar[str]
    primary_metric: ClassVar[str]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.climate = Climate(rng)
        self.severity: dict[str, float] = {}
        self.hung = False
        self.sensor = TempSensor(rng)
        self.primary_c = 0.0
        self._recent: deque[float] = deque(maxlen=_FLATLINE_SAMPLES)

    # -- interface ------------------------------------------------------------------
    def step(self, t_ms: int, dt_s: float) -> list[Notice]:
        """Advance the physics by ``dt_s`` seconds ending at ``t_ms``; return notices."""
        raise NotImplementedError

    def metrics(self) -> dict[str, MetricValue]:
        """Return the quantized metrics of the current state."""
        raise NotImplementedError

    def status(self) -> str:
        """Return the status word of the current state."""
        raise NotImplementedError

    def true_primary_c(self) -> float:
        """Return the true temperature the main sensor measures."""
        raise NotImplementedError

    def busy_reason(self) -> Refusal | None:
        """Return why an interrupting command must wait now, or ``None``.

        The device's interlock (:meth:`device.DeviceCore.add_interlock`): a restart,
        firmware update or cleaning cycle is refused with it, in the contract's words.
        """
        return None

    def start_cleaning(self, t_ms: int) -> tuple[bool, str]:
        """Start the model's cleaning cycle; return ``(ok, detail)``."""
        raise NotImplementedError

    def settings(self) -> dict[str, tuple[float, float]]:
        """Return the settings ``config_set`` accepts, with their allowed ranges."""
        return {}

    def apply_setting(self, key: str, value: float) -> None:
        """Apply a setting already checked against :meth:`settings`."""
        raise NotImplementedError

    def measure(self, rng: random.Random) -> tuple[bool, str, str, dict[str, float | bool | str]]:
        """Run the model-specific part of the self-test: ``(passed, code, detail, data)``."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    def sample_primary(self) -> float:
        """Read the main sensor once (call once per reading) and remember it."""
        value = self.sensor.read(self.true_primary_c())
        self.primary_c = value
        self._recent.append(value)
        return value

    def selftest(self) -> SelfTestResult:
        """Run the self-test: the model's own checks, then sensor plausibility.

        The plausibility check compares the main sensor with the control board's
        reference sensor and looks for a flat line: a live sensor's noise moves its
        0.1 °C reading now and then, a stuck one repeats the same value.
        """
        passed, code, detail, data = self.measure(self.rng)
        findings: list[tuple[str, str]] = [] if passed else [(code, detail)]
        reference_c = round(self.true_primary_c() + self.rng.gauss(0.0, 0.15), 1)
        reading_c = self.sensor.read(self.true_primary_c())
        delta_k = round(reading_c - reference_c, 1)
        flat = len(self._recent) == _FLATLINE_SAMPLES and len(set(self._recent)) == 1
        data.update({"sensor_c": reading_c, "reference_c": reference_c, "sensor_delta_k": delta_k})
        data["sensor_flatline"] = flat
        if flat:
            findings.append(("E32", "temperature sensor reading is frozen"))
        elif abs(delta_k) > _SENSOR_TOLERANCE_K:
            findings.append(
                ("E31", f"temperature sensor is {delta_k:+.1f} K off the reference sensor")
            )
        if self.hung:
            findings.append(("E90", "the control task does not respond"))
        if not findings:
            return SelfTestResult(True, "PASS", "all checks passed", data)
        words = "; ".join(f"{c}: {d}" for c, d in findings)
        return SelfTestResult(False, findings[0][0], words, data)


# ------------------------------------------------------------------------------------
# Washing machine
# ------------------------------------------------------------------------------------

# name, wash temperature °C, main wash minutes, spin rpm, weight
_PROGRAMS: Final = (
    ("cotton_40", 40.0, 35.0, 1400.0, 3.0),
    ("cotton_60", 60.0, 45.0, 1400.0, 2.0),
    ("eco_30", 30.0, 30.0, 1200.0, 3.0),
    ("quick_20", 20.0, 15.0, 800.0, 2.0),
    ("synthetics_40", 40.0, 30.0, 1000.0, 2.0),
)
# relative chance of starting a wash in each local hour
_WASH_HOURS: Final = (
    0, 0, 0, 0, 0, 0, 0.3, 1.0, 2.0, 2.0, 1.5, 1.0,
    1.0, 1.0, 1.0, 1.0, 1.2, 1.8, 2.0, 1.8, 1.2, 0.5, 0.1, 0,
)  # fmt: skip
_WASH_HOUR_SUM: Final = sum(_WASH_HOURS)
_INLET_C: Final = 15.0
_FILL_L_S: Final = 0.15
_DRAIN_L_S: Final = 0.2
_HEATER_W: Final = 2000.0
_DRAIN_TIMEOUT_S: Final = 300.0
_VIBRATION_LIMIT_G: Final = 2.5
_SAFE_SPIN_RPM: Final = 800.0
_TEST_SPIN_RPM: Final = 800.0
_TEST_VIBRATION_LIMIT_G: Final = 0.7
_TEST_DRAIN_LIMIT_S: Final = 150.0


class Washer(Appliance):
    """A front-loading washing machine with programs of fill/heat/wash/drain/rinse/spin."""

    model: ClassVar[str] = "washer"
    primary_metric: ClassVar[str] = "water_temp_c"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.washes_per_day = rng.uniform(0.4, 1.6)
        self.stages: list[tuple[str, float]] = []
        self.stage_index = 0
        self.stage_s = 0.0
        self.cleaning = False
        self.water_l = 0.0
        self.water_c = self.climate.indoor_c
        self.rpm = 0.0
        self.spin_target = 0.0
        self.imbalance = 0.0
        self.vibration_g = 0.01
        self.drain_flow_l_s = 0.0
        self.power_w = 1.5
        self.door_open = False
        self.door_close_ms: int | None = None
        self.start_after_loading = False
        self.unload_ms: int | None = None
        self.drain_alarm_sent = False
        self.vibration_alarm_sent = False
        self.last_drain_s = 0.0
        self.last_spin_vibration_g = 0.0
        self.cleanings_done = 0

    @property
    def running(self) -> bool:
        """Whether a program (wash or cleaning) is running."""
        return self.stage_index < len(self.stages)

    def true_primary_c(self) -> float:
        """Return the true drum water (or air) temperature."""
        return self.water_c

    def busy_reason(self) -> Refusal | None:
        """Refuse interruptions while a program runs or the door is open."""
        if self.running and not self.hung:
            what = "a cleaning cycle" if self.cleaning else "a wash"
            return Refusal("mid_cycle", f"{what} is running; will be possible after the cycle")
        if self.door_open:
            return Refusal("door_open", "the door is open; will be possible once it is closed")
        return None

    def _plan(self, program: tuple[str, float, float, float, float], cleaning: bool) -> None:
        _, temp_c, wash_min, spin_rpm, _ = program
        stages: list[tuple[str, float]] = [("filling", 12.0)]
        if temp_c > _INLET_C + 1.0:
            stages.append(("heating", temp_c))
        stages += [("washing", wash_min * 60.0), ("draining", 0.0)]
        if not cleaning:
            stages += [("filling", 14.0), ("rinsing", 360.0), ("draining", 0.0)]
        stages.append(("spinning", 120.0 if cleaning else 480.0))
        self.stages = stages
        self.stage_index = 0
        self.stage_s = 0.0
        self.cleaning = cleaning
        self.spin_target = spin_rpm
        self.imbalance = 0.0 if cleaning else self.rng.uniform(0.0, 0.5)
        self.drain_alarm_sent = False
        self.vibration_alarm_sent = False
        self.last_spin_vibration_g = 0.0

    def start_cleaning(self, t_ms: int) -> tuple[bool, str]:
        """Start the drum-and-drain cleaning program (hot wash, long drain, short spin)."""
        reason = self.busy_reason()
        if reason is not None:
            return False, reason.detail
        self._plan(("cleaning", 70.0, 10.0, _SAFE_SPIN_RPM, 0.0), cleaning=True)
        return True, "cleaning cycle started; it takes about 30 minutes"

    def _doors(self, t_ms: int) -> None:
        rng = self.rng
        if self.door_close_ms is not None and t_ms >= self.door_close_ms:
            self.door_open = False
            self.door_close_ms = None
            if self.start_after_loading:
                self.start_after_loading = False
                weights = [p[4] for p in _PROGRAMS]
                self._plan(rng.choices(_PROGRAMS, weights)[0], cleaning=False)
        if self.unload_ms is not None and t_ms >= self.unload_ms:
            self.unload_ms = None
            self.door_open = True
            # one owner in five leaves the door ajar to dry the drum
            ajar_s = rng.uniform(3_600.0, 21_600.0) if rng.random() < 0.2 else 0.0
            self.door_close_ms = t_ms + int(1000 * (rng.uniform(30.0, 120.0) + ajar_s))

    def step(self, t_ms: int, dt_s: float) -> list[Notice]:
        """Advance the washer by ``dt_s`` seconds."""
        self.climate.update(t_ms, dt_s)
        notices: list[Notice] = []
        if not self.running or self.hung:
            self._doors(t_ms)
        if self.hung:
            self.rpm = 0.0
            self.drain_flow_l_s = 0.0
            self.power_w = 4.0
            self._cool(dt_s)
        elif self.running:
            self._run(t_ms, dt_s, notices)
        else:
            self._idle(t_ms, dt_s)
        self._vibrate()
        return notices

    def _cool(self, dt_s: float) -> None:
        tau = 3_600.0 if self.water_l > 1.0 else 900.0
        self.water_c = _relax(self.water_c, self.climate.indoor_c, dt_s, tau)

    def _idle(self, t_ms: int, dt_s: float) -> None:
        self.rpm = 0.0
        self.drain_flow_l_s = 0.0
        self.power_w = 1.5
        self._cool(dt_s)
        if not self.start_after_loading:
            # owners start washes following a daily pattern
            rate_per_s = (
                self.washes_per_day * _WASH_HOURS[int(local_hour(t_ms))] / _WASH_HOUR_SUM / 3600.0
            )
            if self.unload_ms is None and self.rng.random() < rate_per_s * dt_s:
                self.door_open = True
                self.start_after_loading = True
                self.door_close_ms = t_ms + int(1000 * self.rng.uniform(30.0, 90.0))

    def _run(self, t_ms: int, dt_s: float, notices: list[Notice]) -> None:
        phase, target = self.stages[self.stage_index]
        self.stage_s += dt_s
        wear = self.severity.get("bearing_wear", 0.0)
        done = False
        self.drain_flow_l_s = 0.0
        if phase == "filling":
            added = min(_FILL_L_S * dt_s, target - self.water_l)
            self.water_c = (self.water_c * self.water_l + _INLET_C * added) / (self.water_l + added)
            self.water_l += added
            self.rpm = 0.0
            self.power_w = 12.0
            done = self.water_l >= target - 1e-9
        elif phase == "heating":
            self.water_c += _HEATER_W * dt_s / (max(self.water_l, 1.0) * _WATER_HEAT_J_PER_L_K)
            self.rpm = 30.0
            self.power_w = _HEATER_W + 60.0 + 40.0 * wear
            done = self.water_c >= target or self.stage_s > 5_400.0
        elif phase in ("washing", "rinsing"):
            # tumble 12 s, pause 4 s, the common rhythm of front loaders
            turning = (self.stage_s % 16.0) < 12.0
            self.rpm = 52.0 if turning else 0.0
            self.power_w = (130.0 + 80.0 * wear) if turning else 15.0
            self._cool(dt_s)
            done = self.stage_s >= target
        elif phase == "draining":
            clog = self.severity.get("drain_clog", 0.0)
            flow = _DRAIN_L_S * (1.0 - 0.95 * clog)
            self.drain_flow_l_s = flow
            self.water_l = max(0.0, self.water_l - flow * dt_s)
            self.rpm = 0.0
            self.power_w = 35.0
            if self.stage_s > _DRAIN_TIMEOUT_S and not self.drain_alarm_sent:
                self.drain_alarm_sent = True
                notices.append(
                    Notice(
                        "error",
                        "E21",
                        "water drains too slowly: check the drain pump filter",
                        {"drain_time_s": round(self.stage_s)},
                    )
                )
            done = self.water_l <= 0.0
            if done:
                self.last_drain_s = round(self.stage_s, 0)
        elif phase == "spinning":
            self.water_l = 0.0
            ramp_up = self.stage_s * 20.0
            ramp_down = max(0.0, (target - self.stage_s) * 40.0)
            self.rpm = max(0.0, min(self.spin_target, ramp_up, ramp_down))
            self.power_w = 150.0 + 250.0 * self.rpm / 1400.0 + 150.0 * wear
            self._cool(dt_s)
            done = self.stage_s >= target
        if done:
            self.stage_index += 1
            self.stage_s = 0.0
            if not self.running:
                self.rpm = 0.0
                if self.cleaning:
                    notices.append(
                        Notice(
                            "info",
                            "cleaning_done",
                            "cleaning cycle finished",
                            {"drain_time_s": self.last_drain_s},
                        )
                    )
                    self.cleanings_done += 1
                else:
                    self.unload_ms = t_ms + int(1000 * self.rng.uniform(300.0, 5_400.0))
        if phase == "spinning" and self.rpm > 300.0:
            self._spin_guard(notices)

    def _spin_vibration(self, rpm: float, imbalance: float) -> float:
        wear = self.severity.get("bearing_wear", 0.0)
        return (rpm / 1000.0) ** 2 * (0.22 + 0.25 * imbalance + 1.5 * wear)

    def _vibrate(self) -> None:
        rng = self.rng
        if self.rpm > 100.0:
            base = self._spin_vibration(self.rpm, self.imbalance)
            self.vibration_g = base * (1.0 + rng.gauss(0.0, 0.05))
            self.last_spin_vibration_g = max(self.last_spin_vibration_g, self.vibration_g)
        elif self.rpm > 0.0:
            wear = self.severity.get("bearing_wear", 0.0)
            self.vibration_g = 0.03 + 0.15 * wear + rng.gauss(0.0, 0.004)
        else:
            self.vibration_g = 0.01 + abs(rng.gauss(0.0, 0.004))

    def _spin_guard(self, notices: list[Notice]) -> None:
        # the firmware lowers the spin speed when the drum shakes too much (E52)
        if self._spin_vibration(self.rpm, self.imbalance) > _VIBRATION_LIMIT_G:
            self.spin_target = min(self.spin_target, _SAFE_SPIN_RPM)
            if not self.vibration_alarm_sent:
                self.vibration_alarm_sent = True
                notices.append(
                    Notice(
                        "error",
                        "E52",
                        "drum vibrates too much at spin; spin speed reduced",
                        {"drum_rpm": round(self.rpm)},
                    )
                )

    def status(self) -> str:
        """Return the washer's status word."""
        if self.hung:
            return "error"
        if not self.running:
            return "idle"
        if self.cleaning:
            return "cleaning"
        return self.stages[self.stage_index][0]

    def metrics(self) -> dict[str, MetricValue]:
        """Return the washer's quantized metrics."""
        return {
            "water_temp_c": self.sample_primary(),
            "water_level_l": round(self.water_l, 1),
            "drum_rpm": float(round(self.rpm)),
            "vibration_rms_g": round(max(self.vibration_g, 0.0), 2),
            "drain_flow_l_min": round(self.drain_flow_l_s * 60.0, 1),
            "power_w": float(max(0, round(self.power_w + self.rng.gauss(0.0, 1.0)))),
            "door_open": self.door_open,
            "ambient_temp_c": round(self.climate.indoor_c + self.rng.gauss(0.0, 0.1), 1),
        }

    def measure(self, rng: random.Random) -> tuple[bool, str, str, dict[str, float | bool | str]]:
        """Test spin at 800 rpm and a drain test, or a passive check while busy."""
        data: dict[str, float | bool | str] = {}
        if self.running or self.door_open:
            data["mode"] = "passive"
            data["last_drain_time_s"] = self.last_drain_s
            data["last_spin_vibration_g"] = round(self.last_spin_vibration_g, 2)
            return True, "PASS", "", data
        data["mode"] = "active"
        vibration = self._spin_vibration(_TEST_SPIN_RPM, 0.0) * (1.0 + rng.gauss(0.0, 0.03))
        clog = self.severity.get("drain_clog", 0.0)
        drain_s = 12.0 / (_DRAIN_L_S * (1.0 - 0.95 * clog)) * (1.0 + rng.gauss(0.0, 0.02))
        data["vibration_test_g"] = round(vibration, 2)
        data["drain_time_s"] = float(round(drain_s))
        if vibration > _TEST_VIBRATION_LIMIT_G:
            return False, "E52", f"drum vibration {vibration:.2f} g at 800 rpm (bearing?)", data
        if drain_s > _TEST_DRAIN_LIMIT_S:
            return False, "E21", f"drain took {drain_s:.0f} s (limit 150 s)", data
        return True, "PASS", "", data


# ------------------------------------------------------------------------------------
# Refrigerator
# ------------------------------------------------------------------------------------

_DOOR_HOURS: Final = (
    0.1, 0, 0, 0, 0, 0.2, 0.8, 2.0, 1.5, 0.8, 0.6, 0.8,
    1.5, 1.0, 0.6, 0.6, 0.8, 1.2, 2.0, 2.0, 1.2, 0.8, 0.5, 0.3,
)  # fmt: skip
_DOOR_HOUR_SUM: Final = sum(_DOOR_HOURS)
_DEFROST_EVERY_S: Final = 12 * 3_600.0
_DEFROST_S: Final = 20 * 60.0
_WARM_ALARM_C: Final = 10.0
_WARM_ALARM_S: Final = 3_600.0


class Fridge(Appliance):
    """A refrigerator: thermostat with hysteresis, compressor cycling, doors and defrost."""

    model: ClassVar[str] = "fridge"
    primary_metric: ClassVar[str] = "cabinet_temp_c"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.setpoint_c = 4.0
        self.hysteresis_k = 1.0
        self.tau_s = rng.uniform(7_000.0, 9_000.0)
        self.cool_k_s = rng.uniform(0.0050, 0.0058)
        self.door_openings_per_day = rng.uniform(10.0, 30.0)
        self.cabinet_c = self.setpoint_c + rng.uniform(-1.0, 1.0)
        self.evaporator_c = self.cabinet_c
        self.compressor_on = rng.random() < 0.4
        self.duty = 0.4
        self.door_open = False
        self.door_close_ms = 0
        self.defrost_s = 0.0
        self.since_defrost_s = rng.uniform(0.0, _DEFROST_EVERY_S)
        self.warm_s = 0.0
        self.warm_alarm_sent = False
        self.power_w = 1.5
        self.defrosting = False

    def true_primary_c(self) -> float:
        """Return the true cabinet air temperature."""
        return self.cabinet_c

    def settings(self) -> dict[str, tuple[float, float]]:
        """The thermostat setpoint can be set between 2 and 8 °C."""
        return {"setpoint_c": (2.0, 8.0)}

    def apply_setting(self, key: str, value: float) -> None:
        """Set the thermostat setpoint."""
        self.setpoint_c = value

    def start_cleaning(self, t_ms: int) -> tuple[bool, str]:
        """A fridge's cleaning cycle is a forced defrost."""
        self.since_defrost_s = _DEFROST_EVERY_S
        return True, "defrost started; it takes about 20 minutes"

    def step(self, t_ms: int, dt_s: float) -> list[Notice]:
        """Advance the fridge by ``dt_s`` seconds."""
        rng = self.rng
        self.climate.update(t_ms, dt_s)
        notices: list[Notice] = []
        if self.door_open and t_ms >= self.door_close_ms:
            self.door_open = False
        rate = self.door_openings_per_day * _DOOR_HOURS[int(local_hour(t_ms))] / _DOOR_HOUR_SUM
        if not self.door_open and rng.random() < rate / 3600.0 * dt_s:
            self.door_open = True
            self.door_close_ms = t_ms + int(1000 * rng.uniform(5.0, 40.0))
        leak = self.severity.get("refrigerant_leak", 0.0)
        measured = self.sample_primary()
        defrosting = False
        if self.hung:
            self.compressor_on = False
        elif self.defrost_s > 0.0 or self.since_defrost_s >= _DEFROST_EVERY_S:
            defrosting = True
            self.compressor_on = False
            self.since_defrost_s = 0.0
            self.defrost_s += dt_s
            if self.defrost_s >= _DEFROST_S:
                self.defrost_s = 0.0
        else:
            self.since_defrost_s += dt_s
            # the thermostat acts on what the sensor says, right or wrong
            if measured > self.setpoint_c + self.hysteresis_k:
                self.compressor_on = True
            elif measured < self.setpoint_c - self.hysteresis_k:
                self.compressor_on = False
        tau = 400.0 if self.door_open else self.tau_s
        self.cabinet_c = _relax(self.cabinet_c, self.climate.indoor_c, dt_s, tau)
        if self.compressor_on:
            self.cabinet_c -= self.cool_k_s * (1.0 - 0.75 * leak) * dt_s
        if defrosting:
            self.cabinet_c += 0.0003 * dt_s
        self.cabinet_c = max(self.cabinet_c, -18.0)
        if defrosting:
            evaporator_target = 6.0
        elif self.compressor_on:
            evaporator_target = -24.0 + 14.0 * leak
        else:
            evaporator_target = self.cabinet_c
        self.evaporator_c = _relax(self.evaporator_c, evaporator_target, dt_s, 240.0)
        on = 1.0 if self.compressor_on else 0.0
        self.duty = _relax(self.duty, on, dt_s, 3_600.0)
        if self.compressor_on:
            self.power_w = 85.0 + 10.0 * leak
        elif defrosting:
            self.power_w = 150.0
        else:
            self.power_w = 1.5
        if self.door_open:
            self.power_w += 3.0  # the lamp
        self._warm_alarm(measured, dt_s, notices)
        self.defrosting = defrosting
        return notices

    def _warm_alarm(self, measured: float, dt_s: float, notices: list[Notice]) -> None:
        if measured > _WARM_ALARM_C:
            self.warm_s += dt_s
            if self.warm_s >= _WARM_ALARM_S and not self.warm_alarm_sent:
                self.warm_alarm_sent = True
                notices.append(
                    Notice(
                        "error",
                        "E11",
                        "the cabinet has been above 10 °C for an hour",
                        {"cabinet_temp_c": measured},
                    )
                )
        else:
            self.warm_s = 0.0
            if measured < _WARM_ALARM_C - 2.0:
                self.warm_alarm_sent = False

    def status(self) -> str:
        """Return the fridge's status word."""
        if self.hung:
            return "error"
        if self.defrosting:
            return "defrost"
        return "cooling" if self.compressor_on else "idle"

    def metrics(self) -> dict[str, MetricValue]:
        """Return the fridge's quantized metrics (the cabinet reading of this step)."""
        return {
            "cabinet_temp_c": self.primary_c,
            "evaporator_temp_c": round(self.evaporator_c + self.rng.gauss(0.0, 0.1), 1),
            "compressor_on": self.compressor_on,
            "compressor_duty": round(self.duty, 2),
            "power_w": float(max(0, round(self.power_w + self.rng.gauss(0.0, 0.5)))),
            "door_open": self.door_open,
            "ambient_temp_c": round(self.climate.indoor_c + self.rng.gauss(0.0, 0.1), 1),
        }

    def measure(self, rng: random.Random) -> tuple[bool, str, str, dict[str, float | bool | str]]:
        """Measure suction pressure in a short compressor run and report duty."""
        leak = self.severity.get("refrigerant_leak", 0.0)
        pressure = 1.1 * (1.0 - 0.7 * leak) + rng.gauss(0.0, 0.02)
        data: dict[str, float | bool | str] = {
            "suction_pressure_bar": round(pressure, 2),
            "compressor_duty": round(self.duty, 2),
            "cabinet_temp_c": self.primary_c,
        }
        if pressure < 0.75:
            return False, "E14", f"suction pressure {pressure:.2f} bar is low (leak?)", data
        return True, "PASS", "", data


# ------------------------------------------------------------------------------------
# Heat pump
# ------------------------------------------------------------------------------------

_WATER_FLOW_W_PER_K: Final = 0.35 * _WATER_HEAT_J_PER_L_K
_CYCLE_S: Final = 2_400.0
_MIN_MODULATION: Final = 0.3
_DEFROST_HP_S: Final = 300.0
_APPROACH_LIMIT_K: Final = 11.0
_DHW_WINDOWS_H: Final = ((5.5, 6.2), (17.5, 18.2))


class HeatPump(Appliance):
    """An air-to-water heat pump: weather-compensated flow, modulation, hot water, defrost."""

    model: ClassVar[str] = "heat_pump"
    primary_metric: ClassVar[str] = "flow_temp_c"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.loss_w_per_k = rng.uniform(150.0, 250.0)
        self.nominal_w = rng.uniform(6_000.0, 9_000.0)
        self.room_day_c = 20.5
        self.room_night_c = 18.0
        self.flow_max_c = 55.0
        self.flow_c = 30.0
        self.return_c = 28.0
        self.compressor_on = False
        self.modulation = 0.0
        self.heat_w = 0.0
        self.power_w = 12.0
        self.cop_true = 0.0
        self.ice = rng.random() * 0.5
        self.defrost_s = 0.0
        self.mode = "standby"
        self.return_sensor = TempSensor(rng)

    def true_primary_c(self) -> float:
        """Return the true flow water temperature."""
        return self.flow_c

    def settings(self) -> dict[str, tuple[float, float]]:
        """Room setpoints and the highest flow temperature."""
        return {
            "room_setpoint_c": (16.0, 26.0),
            "room_night_setpoint_c": (14.0, 24.0),
            "flow_max_c": (35.0, 60.0),
        }

    def apply_setting(self, key: str, value: float) -> None:
        """Apply one of :meth:`settings`."""
        if key == "room_setpoint_c":
            self.room_day_c = value
        elif key == "room_night_setpoint_c":
            self.room_night_c = value
        else:
            self.flow_max_c = value

    def start_cleaning(self, t_ms: int) -> tuple[bool, str]:
        """A heat pump's cleaning cycle is a forced defrost of the outdoor coil."""
        self.ice = 1.0
        return True, "defrost started; it takes about 5 minutes (dirt on the coil stays)"

    def _capacity_w(self, outdoor_c: float) -> float:
        fouling = self.severity.get("coil_fouling", 0.0)
        factor = min(1.15, max(0.5, 0.7 + 0.015 * (outdoor_c + 7.0)))
        return self.nominal_w * factor * (1.0 - 0.3 * fouling)

    def step(self, t_ms: int, dt_s: float) -> list[Notice]:
        """Advance the heat pump by ``dt_s`` seconds."""
        self.climate.update(t_ms, dt_s)
        outdoor = self.climate.outdoor_c
        fouling = self.severity.get("coil_fouling", 0.0)
        hour = local_hour(t_ms)
        t_s = t_ms / 1000.0
        room_c = self.room_night_c if hour >= 22.0 or hour < 6.0 else self.room_day_c
        capacity = self._capacity_w(outdoor)
        dhw = any(lo <= hour < hi for lo, hi in _DHW_WINDOWS_H)
        if self.hung:
            self.mode, on, modulation, target = "error", False, 0.0, 0.0
        elif self.defrost_s > 0.0 or self.ice >= 1.0:
            self.mode, on, modulation, target = "defrost", True, 0.5, 0.0
            self.ice = 0.0
            self.defrost_s += dt_s
            if self.defrost_s >= _DEFROST_HP_S:
                self.defrost_s = 0.0
        elif dhw:
            self.mode, on, modulation, target = "dhw", True, 1.0, min(55.0, self.flow_max_c)
        else:
            demand = self.loss_w_per_k * (room_c - outdoor) if outdoor < 16.0 else 0.0
            load = demand / capacity
            target = min(self.flow_max_c, max(28.0, 25.0 + 0.9 * (20.0 - outdoor)))
            if load >= _MIN_MODULATION:
                on, modulation = True, min(load, 1.0)
            elif load > 0.0:
                # below the lowest modulation the compressor cycles on and off
                on = (t_s % _CYCLE_S) < load / _MIN_MODULATION * _CYCLE_S
                modulation = _MIN_MODULATION
            else:
                on, modulation = False, 0.0
            self.mode = "heating" if on else "standby"
        self.compressor_on = on
        self.modulation = modulation if on else 0.0
        if self.mode == "defrost":
            self.heat_w = -1_500.0
            self.flow_c = _relax(self.flow_c, self.flow_c - 8.0, dt_s, 600.0)
            self.power_w = 0.4 * self.nominal_w / 3.0
            self.cop_true = 0.0
        elif on:
            self.heat_w = capacity * self.modulation
            self.flow_c = _relax(self.flow_c, target, dt_s, 300.0)
            approach = 6.0 + 10.0 * fouling
            hot_k = self.flow_c + 273.15 + 3.0
            cold_k = outdoor + 273.15 - approach
            eta = 0.5 * (1.0 - 0.25 * fouling)
            self.cop_true = min(7.0, max(1.2, eta * hot_k / max(hot_k - cold_k, 1.0)))
            self.power_w = self.heat_w / self.cop_true + 40.0
            if outdoor < 6.0:
                # frost builds on the coil in cold, damp air; dirt makes it build faster
                hours_to_ice = 1.0 + max(0.0, outdoor) / 2.0
                self.ice += dt_s / (3_600.0 * hours_to_ice) * (1.0 + 2.0 * fouling)
        else:
            self.heat_w = 0.0
            self.cop_true = 0.0
            self.flow_c = _relax(self.flow_c, max(self.climate.indoor_c + 3.0, 22.0), dt_s, 1_800)
            self.power_w = 12.0
        self.return_c = self.flow_c - self.heat_w / _WATER_FLOW_W_PER_K
        return []

    def status(self) -> str:
        """Return the heat pump's status word."""
        return self.mode

    def metrics(self) -> dict[str, MetricValue]:
        """Return the heat pump's quantized metrics; ``cop`` only while it heats."""
        flow = self.sample_primary()
        ret = self.return_sensor.read(self.return_c)
        power = float(max(0, round(self.power_w * (1.0 + self.rng.gauss(0.0, 0.01)))))
        values: dict[str, MetricValue] = {
            "outdoor_temp_c": round(self.climate.outdoor_c + self.rng.gauss(0.0, 0.1), 1),
            "flow_temp_c": flow,
            "return_temp_c": ret,
            "compressor_on": self.compressor_on,
            "compressor_hz": float(round(20.0 + 70.0 * self.modulation))
            if self.compressor_on
            else 0.0,
            "heat_output_w": float(round(self.heat_w)),
            "power_w": power,
        }
        if self.compressor_on and self.mode != "defrost" and power > 0.0:
            # the firmware computes COP from its own sensors and its power meter
            measured_heat = _WATER_FLOW_W_PER_K * (flow - ret)
            values["cop"] = round(min(9.99, max(0.0, measured_heat / power)), 2)
        return values

    def measure(self, rng: random.Random) -> tuple[bool, str, str, dict[str, float | bool | str]]:
        """Measure the evaporator approach (coil air side) in a short test run."""
        fouling = self.severity.get("coil_fouling", 0.0)
        approach = 6.0 + 10.0 * fouling + rng.gauss(0.0, 0.3)
        data: dict[str, float | bool | str] = {
            "evaporator_approach_k": round(approach, 1),
            "outdoor_temp_c": round(self.climate.outdoor_c, 1),
        }
        if self.cop_true > 0.0:
            data["cop_estimate"] = round(self.cop_true, 2)
        if approach > _APPROACH_LIMIT_K:
            return False, "E61", f"outdoor coil passes too little air ({approach:.1f} K)", data
        return True, "PASS", "", data


_CLASSES: Final[dict[str, type[Appliance]]] = {
    "washer": Washer,
    "fridge": Fridge,
    "heat_pump": HeatPump,
}


def make_appliance(model: str, rng: random.Random) -> Appliance:
    """Build the physics of built-in product model ``model`` drawing on ``rng``.

    Raises:
        ConfigError: the model is not built in (simulate it from its product file).
    """
    found = _CLASSES.get(model)
    if found is None:
        raise ConfigError(f"no built-in physics for {model!r}; known: {sorted(_CLASSES)}")
    return found(rng)
