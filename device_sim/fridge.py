"""Physics of the simulated refrigerator (device_sim, the hardware stand-in).

One of the three built-in product models (:mod:`device_sim.appliances`); what every
appliance shares is :mod:`device_sim.appliance`.
"""

from __future__ import annotations

import random
from typing import ClassVar, Final

from device.contract import MetricValue
from device_sim.appliance import (
    Appliance,
    Notice,
    _relax,
)
from device_sim.environment import local_hour

__all__ = ["Fridge"]


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
