"""Weather and room temperature around one simulated device (device_sim physics input).

Outdoor temperature = seasonal mean + daily sinusoid (peak at 15:00 local) + weather noise
(an Ornstein-Uhlenbeck process, correlated over about two days). Indoor temperature =
the household's preferred room temperature + a small daily swing + a little of the
outdoor temperature + its own slow noise. Local time is UTC+1 for the whole fleet.
"""

from __future__ import annotations

import math
import random
from typing import Final

__all__ = ["UTC_OFFSET_H", "Climate", "local_hour"]

#: Local time of the simulated homes (central Europe, no daylight saving).
UTC_OFFSET_H: Final = 1.0
_HOUR_MS: Final = 3_600_000
_DAY_H: Final = 24.0
_YEAR_DAYS: Final = 365.2425
_TWO_PI: Final = 2.0 * math.pi


def local_hour(t_ms: int) -> float:
    """Return the local hour of day (0 <= h < 24) at epoch milliseconds ``t_ms``."""
    return (t_ms / _HOUR_MS + UTC_OFFSET_H) % _DAY_H


def _ou_step(x: float, dt_s: float, tau_s: float, sigma: float, rng: random.Random) -> float:
    """Advance an Ornstein-Uhlenbeck process exactly over ``dt_s`` (stable for any step)."""
    decay = math.exp(-dt_s / tau_s)
    return x * decay + sigma * math.sqrt(1.0 - decay * decay) * rng.gauss(0.0, 1.0)


class Climate:
    """Outdoor and indoor air temperature of one home, advanced step by step.

    Attributes:
        outdoor_c: the current outdoor air temperature, °C.
        indoor_c: the current room temperature where the appliance stands, °C.
    """

    __slots__ = (
        "_offset_c",
        "_rng",
        "_room_base_c",
        "_room_noise_c",
        "_weather_c",
        "indoor_c",
        "outdoor_c",
    )

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._offset_c = rng.uniform(-3.0, 3.0)
        self._weather_c = rng.gauss(0.0, 3.0)
        self._room_base_c = rng.uniform(19.5, 22.5)
        self._room_noise_c = rng.gauss(0.0, 0.3)
        self.outdoor_c = 10.0
        self.indoor_c = self._room_base_c

    def update(self, t_ms: int, dt_s: float) -> None:
        """Advance the weather noise by ``dt_s`` and recompute both temperatures at ``t_ms``."""
        rng = self._rng
        self._weather_c = _ou_step(self._weather_c, dt_s, 2.0 * 86_400.0, 3.0, rng)
        self._room_noise_c = _ou_step(self._room_noise_c, dt_s, 3.0 * 3_600.0, 0.3, rng)
        year = (t_ms / (_HOUR_MS * _DAY_H) % _YEAR_DAYS) / _YEAR_DAYS
        seasonal = 10.0 - 10.0 * math.cos(_TWO_PI * (year - 0.04))
        hour = local_hour(t_ms)
        daily = 4.0 * math.sin(_TWO_PI * (hour - 9.0) / _DAY_H)
        self.outdoor_c = seasonal + daily + self._weather_c + self._offset_c
        self.indoor_c = (
            self._room_base_c
            + 0.8 * math.sin(_TWO_PI * (hour - 11.0) / _DAY_H)
            + 0.05 * (self.outdoor_c - 10.0)
            + self._room_noise_c
        )
