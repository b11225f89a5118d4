"""The device registry's rows, read the same by both registries (notifier).

A registered device is its ``registry`` row joined with the case store's ``devices`` row
that names its owner (:data:`REGISTERED_SELECT`); :func:`registered_device` reads such a
row (``sqlite3.Row`` or asyncpg's ``Record``) back into a
:class:`~notifier.registry.model.RegisteredDevice`.
"""

from __future__ import annotations

from typing import Final

from notifier.registry.model import RegisteredDevice
from notifier.rows import Row, dt


def registered_device(row: Row) -> RegisteredDevice:
    """The registered device a :data:`REGISTERED_SELECT` row describes."""
    return RegisteredDevice(
        device_id=row["device_id"],
        model=row["model"],
        serial=row["serial"],
        region=row["region"],
        firmware=row["firmware"],
        batch=row["batch"],
        registered_at=dt(row["registered_at"]),
        retired_at=None if row["retired_at"] is None else dt(row["retired_at"]),
        owner_id=row["owner_id"],
        claimable=row["claim_hash"] is not None
        and row["retired_at"] is None
        and row["owner_id"] is None,
    )


REGISTERED_SELECT: Final = (
    "SELECT registry.*, devices.owner_id AS owner_id FROM registry "
    "LEFT JOIN devices ON devices.device_id = registry.device_id"
)
