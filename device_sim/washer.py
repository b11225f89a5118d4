"""Physics of the simulated washing machine (device_sim, the hardware stand-in).

One of the three built-in product models (:mod:`device_sim.appliances`); what every
appliance shares is :mod:`device_sim.appliance`.
"""

from __future__ import annotations

import random
from typing import ClassVar, Final

from device import Refusal
from device.contract import MetricValue
from device_sim.appliance import (
    _WATER_HEAT_J_PER_L_K,
    Appliance,
    Notice,
    _relax,
)
from device_sim.environment import local_hour

__all__ = ["Washer"]


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
