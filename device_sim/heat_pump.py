"""Physics of the simulated heat pump (device_sim, the hardware stand-in).

One of the three built-in product models (:mod:`device_sim.appliances`); what every
appliance shares is :mod:`device_sim.appliance`.
"""

from __future__ import annotations

import random
from typing import ClassVar, Final

from device.contract import MetricValue
from device_sim.appliance import (
    _WATER_HEAT_J_PER_L_K,
    Appliance,
    Notice,
    TempSensor,
    _relax,
)
from device_sim.environment import local_hour

__all__ = ["HeatPump"]


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
