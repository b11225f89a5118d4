"""Simulated fleet: the device library plus product physics, wear and faults; MQTT runner.

It stands in for hardware in tests, demos and benchmarks. Each simulated appliance runs
the device library's logic (:mod:`device`), so every simulated run also exercises the
library; of the backend it imports only the shared device protocol and MQTT client
(:mod:`wire.protocol`, :mod:`wire.mqtt`) and the error tree.
"""

from device_sim.appliance import SelfTestResult
from device_sim.clock import SimClock
from device_sim.device import DEFAULT_FIRMWARE, Outbound, SimDevice
from device_sim.faults import (
    FAULTS,
    MODEL_NAMES,
    FaultName,
    FaultRecord,
    FaultSpec,
    ModelName,
    faults_for_model,
    faults_to_csv,
    faults_to_json,
)
from device_sim.fleet import Fleet, assign_models, device_id_for
from device_sim.runner import ConnectFactory, DeviceConnection, FleetReport, FleetRunner, run_fleet
from device_sim.settings import BACKFILL_WINDOW_S, SimSettings

__all__ = [
    "BACKFILL_WINDOW_S",
    "DEFAULT_FIRMWARE",
    "FAULTS",
    "MODEL_NAMES",
    "ConnectFactory",
    "DeviceConnection",
    "FaultName",
    "FaultRecord",
    "FaultSpec",
    "Fleet",
    "FleetReport",
    "FleetRunner",
    "ModelName",
    "Outbound",
    "SelfTestResult",
    "SimClock",
    "SimDevice",
    "SimSettings",
    "assign_models",
    "device_id_for",
    "faults_for_model",
    "faults_to_csv",
    "faults_to_json",
    "run_fleet",
]
