"""The owner loop (notifier: diagnostics -> here -> dashboard).

Only the light parts are re-exported here: the records of the loop, its error tree,
the store and request interfaces, and the settings. Import the working parts from
their modules: ``notifier.loop`` (``OwnerLoop``, the case machine), ``notifier.sqlite``
(``SqliteStore``), ``notifier.postgres`` (``PostgresStore``), ``notifier.stores`` (which
of the two to open), ``notifier.scheduling`` (the appointment planner),
``notifier.messages`` (the owner's messages), ``notifier.push`` (push channels),
``notifier.outbox`` (``Outbox``), ``notifier.links`` (signed one-tap action links),
``notifier.addresses`` (where webhooks may point), ``notifier.api`` (the owner REST API)
and ``notifier.service`` (``NotifierService``).
"""

from notifier.actions import CaseActions, HealthPoint, HealthReader
from notifier.errors import (
    ConflictError,
    DeadTokenError,
    DeliveryError,
    ExpiredLinkError,
    ForbiddenError,
    IllegalTransitionError,
    InvalidLinkError,
    InvalidRequestError,
    NotFoundError,
    UnsafeAddressError,
    UsedLinkError,
)
from notifier.model import (
    CLOSED_STATES,
    OPEN_STATES,
    TRANSITIONS,
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Notification,
    Owner,
    PushChannel,
    Rating,
    Slot,
    Task,
    Technician,
    Window,
)
from notifier.settings import NotifierSettings, PushSettings
from notifier.store import CaseStore

__all__ = [
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
]
