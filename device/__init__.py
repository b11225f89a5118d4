"""fixloop-device: the device side of contract v1 on paho-mqtt, for appliances to embed.

It connects (password or client certificate, TLS), keeps a persistent session, says
``online``/``offline`` (last will), keeps every message in an on-disk outbox until the
broker has it (backfill after an outage, ``seq`` that survives restarts), runs command
handlers behind the device's interlocks and answers each command once, updates firmware
over the air with a checksum and a rollback, and refuses a message that would break the
contract before it leaves the device. It imports nothing of the fixloop backend.
"""

from device.client import Device, DeviceStats
from device.contract import (
    COMMAND_ACTIONS,
    EVENT_KINDS,
    INTERRUPTING_ACTIONS,
    REFUSAL_CODES,
    SCHEMA_VERSION,
    Command,
    CommandAction,
    Refusal,
    RefusalCode,
)
from device.core import (
    CommandHandler,
    CommandResult,
    DeviceCore,
    Interlock,
    ResetReason,
    SelfTestResult,
)
from device.errors import CommandError, ContractError, DeviceConfigError, DeviceError, OtaError
from device.ota import Firmware
from device.sender import SendQueue
from device.settings import DeviceSettings, TlsSettings
from device.store import DeviceState, DeviceStore, MemoryDeviceStore

__all__ = [
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
]
