"""Physics of the three simulated product models (device_sim, the hardware stand-in).

Each :class:`Appliance` advances its own state in sim time, reports quantized sensor
values and runs its self-test. Faults reach the physics as severities in ``[0, 1]``
(:attr:`Appliance.severity`, kept by the device's firmware layer) and as the state of the
main temperature sensor (:class:`TempSensor`); the appliance never decides that a fault
exists, it only behaves accordingly. The firmware layer (:mod:`device_sim.device`) owns
sequence numbers, events, commands and connectivity.

This module builds a model's physics (:func:`make_appliance`); what every appliance
shares is :mod:`device_sim.appliance`, each model's physics its own module
(:mod:`device_sim.washer`, :mod:`device_sim.fridge`, :mod:`device_sim.heat_pump`).

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

import random
from typing import Final

from device_sim.appliance import Appliance
from device_sim.fridge import Fridge
from device_sim.heat_pump import HeatPump
from device_sim.washer import Washer
from wire.errors import ConfigError

__all__ = ["make_appliance"]


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
