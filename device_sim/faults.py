"""Fault catalog and ground truth of the simulated fleet (device_sim, upstream of the gateway).

The simulator injects wear and faults into its devices and records each one as a
:class:`FaultRecord`: the ground truth that the diagnostics models and the owner loop are
scored against. The catalog says which product models a fault applies to, whether it
degrades slowly toward a failure time or strikes at once, and what cures it:

===================  ==========  ========================  =====================================
fault                models      kind                      cure
===================  ==========  ========================  =====================================
``bearing_wear``     washer      slow degradation          technician: part ``bearing``
``drain_clog``       washer      slow clog                 ``cleaning_cycle`` while partial
                                                           (severity < 0.9), else technician:
                                                           part ``drain_pump``
``refrigerant_leak`` fridge      slow degradation          technician: part ``refrigerant_circuit``
``coil_fouling``     heat_pump   slow degradation          technician: part ``evaporator_coil``
``sensor_drift``     all         slow degradation          technician: part ``temperature_sensor``
``sensor_stuck``     all         abrupt                    technician: part ``temperature_sensor``
``firmware_bug``     all         abrupt (error codes)      ``firmware_update`` to another version
``crash_loop``       all         abrupt (reboots, gaps)    ``firmware_update`` to another version
``controller_hang``  all         abrupt transient glitch   ``restart`` (or any reboot)
===================  ==========  ========================  =====================================

A restart never cures a firmware fault (the bug comes back with the same firmware) and no
remote command cures worn bearings, a leak or a fouled coil.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

import orjson

__all__ = [
    "FAULTS",
    "MODEL_NAMES",
    "FaultName",
    "FaultRecord",
    "FaultSpec",
    "ModelName",
    "faults_for_model",
    "faults_to_csv",
    "faults_to_json",
]

ModelName = Literal["washer", "fridge", "heat_pump"]
#: The product models the simulator knows, in a fixed order.
MODEL_NAMES: Final[tuple[ModelName, ...]] = ("washer", "fridge", "heat_pump")

FaultName = Literal[
    "bearing_wear",
    "drain_clog",
    "refrigerant_leak",
    "coil_fouling",
    "sensor_drift",
    "sensor_stuck",
    "firmware_bug",
    "crash_loop",
    "controller_hang",
]

CureAction = Literal["restart", "firmware_update", "cleaning_cycle"]


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """What a fault is and what cures it.

    Attributes:
        name: the fault's name.
        models: the product models it can strike.
        gradual: whether it degrades from onset to a failure time (else it is abrupt).
        remote_cure: the command that cures it, if any.
        repair_part: the part a technician swaps or services to cure it, if any.
        min_days: shortest random onset-to-failure time, days (gradual faults).
        max_days: longest random onset-to-failure time, days (gradual faults).
        shape: severity grows as ``progress ** shape`` (wear accelerates: shape > 1).
        description: plain words.
    """

    name: str
    models: frozenset[str]
    gradual: bool
    remote_cure: CureAction | None
    repair_part: str | None
    min_days: float
    max_days: float
    shape: float
    description: str


_ALL: Final[frozenset[str]] = frozenset(MODEL_NAMES)

#: The fault catalog, keyed by fault name.
FAULTS: Final[Mapping[str, FaultSpec]] = {
    spec.name: spec
    for spec in (
        FaultSpec(
            "bearing_wear",
            frozenset({"washer"}),
            gradual=True,
            remote_cure=None,
            repair_part="bearing",
            min_days=7.0,
            max_days=45.0,
            shape=2.0,
            description="drum bearing wear: vibration at spin rises until the bearing fails",
        ),
        FaultSpec(
            "drain_clog",
            frozenset({"washer"}),
            gradual=True,
            remote_cure="cleaning_cycle",
            repair_part="drain_pump",
            min_days=3.0,
            max_days=21.0,
            shape=1.0,
            description="drain pump clog: slow drain, error E21 when severe",
        ),
        FaultSpec(
            "refrigerant_leak",
            frozenset({"fridge"}),
            gradual=True,
            remote_cure=None,
            repair_part="refrigerant_circuit",
            min_days=10.0,
            max_days=60.0,
            shape=1.0,
            description="refrigerant leak: compressor duty and cabinet temperature rise",
        ),
        FaultSpec(
            "coil_fouling",
            frozenset({"heat_pump"}),
            gradual=True,
            remote_cure=None,
            repair_part="evaporator_coil",
            min_days=20.0,
            max_days=90.0,
            shape=1.0,
            description="fouled outdoor coil: COP and capacity fall, defrosts come more often",
        ),
        FaultSpec(
            "sensor_drift",
            _ALL,
            gradual=True,
            remote_cure=None,
            repair_part="temperature_sensor",
            min_days=5.0,
            max_days=30.0,
            shape=1.0,
            description="main temperature sensor drifts up to 5 K off (failure at full drift)",
        ),
        FaultSpec(
            "sensor_stuck",
            _ALL,
            gradual=False,
            remote_cure=None,
            repair_part="temperature_sensor",
            min_days=0.0,
            max_days=0.0,
            shape=1.0,
            description="main temperature sensor stuck at one value",
        ),
        FaultSpec(
            "firmware_bug",
            _ALL,
            gradual=False,
            remote_cure="firmware_update",
            repair_part=None,
            min_days=0.0,
            max_days=0.0,
            shape=1.0,
            description="firmware bug: spurious error codes F07 every few hours",
        ),
        FaultSpec(
            "crash_loop",
            _ALL,
            gradual=False,
            remote_cure="firmware_update",
            repair_part=None,
            min_days=0.0,
            max_days=0.0,
            shape=1.0,
            description="firmware crash loop: the watchdog reboots the device every few minutes",
        ),
        FaultSpec(
            "controller_hang",
            _ALL,
            gradual=False,
            remote_cure="restart",
            repair_part=None,
            min_days=0.0,
            max_days=0.0,
            shape=1.0,
            description="transient glitch: the control task hangs (error E90) until a reboot",
        ),
    )
}


def faults_for_model(model: str) -> tuple[str, ...]:
    """Return the built-in faults that can strike ``model``, in catalog order."""
    return tuple(name for name, spec in FAULTS.items() if model in spec.models)


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """Ground truth of one injected fault.

    Attributes:
        device_id: the device struck.
        fault: the fault's name (see :data:`FAULTS`).
        onset: when the fault began (UTC).
        failure_at: when the degradation reaches failure (UTC), or ``None`` for an abrupt
            fault. Kept as planned even when the fault was cured before.
        cured_at: when a command or a repair cured it (UTC), or ``None`` while it lasts.
        model: the device's product model.
        cured_by: what cured it (``firmware_update``, ``cleaning_cycle``, ``restart``,
            ``repair:<part>``), or ``None``.
    """

    device_id: str
    fault: str
    onset: datetime
    failure_at: datetime | None
    cured_at: datetime | None = None
    model: str = "washer"
    cured_by: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """Return the record as a flat dict of strings (ISO 8601 UTC times)."""
        return {
            "device_id": self.device_id,
            "model": self.model,
            "fault": self.fault,
            "onset": self.onset.isoformat(),
            "failure_at": None if self.failure_at is None else self.failure_at.isoformat(),
            "cured_at": None if self.cured_at is None else self.cured_at.isoformat(),
            "cured_by": self.cured_by,
        }


_CSV_COLUMNS: Final = ("device_id", "model", "fault", "onset", "failure_at", "cured_at", "cured_by")


def faults_to_csv(records: Iterable[FaultRecord]) -> str:
    """Return the ground truth as CSV with a header row (empty cells for ``None``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.to_dict().items()})
    return buffer.getvalue()


def faults_to_json(records: Iterable[FaultRecord]) -> str:
    """Return the ground truth as a JSON array of objects (``null`` for ``None``)."""
    return orjson.dumps([record.to_dict() for record in records]).decode()
