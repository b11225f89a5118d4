"""What every simulated appliance shares (device_sim, the hardware stand-in).

:class:`Appliance` is the physics' side of a simulated device: it advances its state in
sim time, reports quantized sensor values and runs its self-test; faults reach it as
severities in ``[0, 1]`` (:attr:`Appliance.severity`) and as the state of the main
temperature sensor (:class:`TempSensor`). The three built-in models are
:mod:`device_sim.washer`, :mod:`device_sim.fridge` and :mod:`device_sim.heat_pump`
(built by :func:`device_sim.appliances.make_appliance`); :mod:`device_sim.described`
simulates any other product from its product file.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar, Final

from device import Refusal
from device.contract import EventKind, MetricValue
from device_sim.environment import Climate

__all__ = ["Appliance", "Notice", "SelfTestResult", "TempSensor"]


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
