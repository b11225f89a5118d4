"""Each package's public API, pinned (STYLE.md "Do / don't" 7).

A change to a package's ``__all__`` must change the list here too, so it is a decision
and shows in review. Each name listed must import, and every name a package's
``__init__.py`` re-exports must be listed (no public name by accident).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PUBLIC_API: dict[str, list[str]] = {
    "device": [
        "COMMAND_ACTIONS",
        "EVENT_KINDS",
        "INTERRUPTING_ACTIONS",
        "REFUSAL_CODES",
        "SCHEMA_VERSION",
        "Command",
        "CommandAction",
        "CommandError",
        "CommandHandler",
        "CommandResult",
        "ContractError",
        "Device",
        "DeviceConfigError",
        "DeviceCore",
        "DeviceError",
        "DeviceSettings",
        "DeviceState",
        "DeviceStats",
        "DeviceStore",
        "Firmware",
        "Interlock",
        "MemoryDeviceStore",
        "OtaError",
        "Refusal",
        "RefusalCode",
        "ResetReason",
        "SelfTestResult",
        "SendQueue",
        "TlsSettings",
    ],
    "wire": [
        "BrokerUnavailableError",
        "ConfigError",
        "FixloopError",
        "PermanentError",
        "RejectedError",
        "StoreUnavailableError",
        "TransientError",
        "WriteRejectedError",
    ],
    "gateway": [],
    "wire.protocol": [
        "CASES_TOPIC",
        "COMMAND_ACTIONS",
        "DEVICE_ID_PATTERN",
        "DIAGNOSES_TOPIC",
        "EVENT_KINDS",
        "METRIC_NAME_PATTERN",
        "REJECTED_TOPIC",
        "SCHEMA_VERSION",
        "Command",
        "CommandAction",
        "DeviceChannel",
        "Event",
        "EventKind",
        "Limits",
        "MetricValue",
        "Reading",
        "commands_topic",
        "decode_command",
        "decode_event",
        "decode_reading",
        "encode_command",
        "encode_event",
        "encode_reading",
        "events_topic",
        "is_valid_device_id",
        "ms_to_datetime",
        "split_device_topic",
        "status_topic",
        "telemetry_topic",
    ],
    "device_sim": [
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
    ],
    "fixloop": [],
    "diagnostics": [
        "CATALOG",
        "Contribution",
        "Degradation",
        "Diagnosis",
        "DiagnosticsSettings",
        "FaultEntry",
        "ModelCatalog",
        "Remedy",
        "Signature",
        "TimeToFailure",
        "decode_diagnosis",
        "encode_diagnosis",
    ],
    "notifier": [
        "CLOSED_STATES",
        "OPEN_STATES",
        "TRANSITIONS",
        "Appointment",
        "AuditEntry",
        "Case",
        "CaseActions",
        "CaseStore",
        "ConflictError",
        "DeadTokenError",
        "DeliveryError",
        "DeviceRecord",
        "ExpiredLinkError",
        "ForbiddenError",
        "HealthPoint",
        "HealthReader",
        "IllegalTransitionError",
        "InvalidLinkError",
        "InvalidRequestError",
        "NotFoundError",
        "Notification",
        "NotifierSettings",
        "Owner",
        "PushChannel",
        "PushSettings",
        "Rating",
        "Slot",
        "Task",
        "Technician",
        "UnsafeAddressError",
        "UsedLinkError",
        "Window",
    ],
    "dashboard": [],
}


def _ruff_order(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, Classes, functions."""

    def key(name: str) -> tuple[int, str]:
        if name.isupper():
            return 0, name
        return (1, name) if name[:1].isupper() else (2, name)

    return sorted(names, key=key)


def _init_file(package: str) -> Path:
    return ROOT.joinpath(*package.split("."), "__init__.py")


def test_every_package_is_pinned() -> None:
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert top <= PUBLIC_API.keys()


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_expected_lists_are_sorted(package: str) -> None:
    expected = PUBLIC_API[package]
    assert expected == _ruff_order(expected)
    assert len(set(expected)) == len(expected)


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_all_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert list(module.__all__) == PUBLIC_API[package]


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_every_public_name_imports(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(PUBLIC_API[package])


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_every_reexport_is_listed(package: str) -> None:
    tree = ast.parse(_init_file(package).read_text(encoding="utf-8"))
    reexported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert reexported == set(PUBLIC_API[package])


def test_ruff_order_matches_ruff() -> None:
    # The helper itself, on names of each kind (it would accept a wrong list otherwise).
    assert _ruff_order(["run", "Fleet", "FAULTS", "BACKFILL_WINDOW_S", "Event"]) == [
        "BACKFILL_WINDOW_S",
        "FAULTS",
        "Event",
        "Fleet",
        "run",
    ]
