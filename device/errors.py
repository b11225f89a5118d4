"""Errors of the device library (the device's side of the wire, before the gateway).

::

    DeviceError
    ├── ContractError       a message would break contract v1; raised before it is stored
    │                       or sent, with the gateway's reason code
    ├── DeviceConfigError   refuse to start: a bad setting, an unreadable buffer or CA file
    ├── CommandError        a command handler cannot do what was asked; its words go into
    │                       the ``command_result`` event (``ok: false``)
    └── OtaError            a firmware download, checksum, install or rollback failed
"""

from __future__ import annotations

__all__ = ["CommandError", "ContractError", "DeviceConfigError", "DeviceError", "OtaError"]


class DeviceError(Exception):
    """Root of every error the device library raises on purpose."""


class ContractError(DeviceError):
    """A message would break the device contract v1; nothing was stored or sent.

    Attributes:
        reason: the gateway's reason code for the same fault (``bad_metric_name``,
            ``bad_value``, ``too_large`` ...), so a device maker reads one vocabulary.
        detail: what is wrong, in plain words.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeviceConfigError(DeviceError):
    """A setting is wrong or a file the device needs cannot be used; do not start."""


class CommandError(DeviceError):
    """A command handler cannot do the command; the message is the result's ``detail``."""


class OtaError(DeviceError):
    """A firmware update step failed (download, checksum, install, rollback)."""
