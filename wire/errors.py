"""Error tree shared by every fixloop stage (wire: the most upstream package).

::

    FixloopError
    ├── TransientError        retry with backoff (broker or InfluxDB away, timeouts)
    │   ├── BrokerUnavailableError
    │   └── StoreUnavailableError
    ├── PermanentError        count, log, quarantine, go on (bad input, refused writes)
    │   ├── RejectedError     a device message refused by validation; carries a reason code
    │   └── WriteRejectedError  InfluxDB refused points (400) that must not be retried
    └── ConfigError           refuse to start: a wrong setting, a missing binary
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "FixloopError",
    "PermanentError",
    "RejectedError",
    "StoreUnavailableError",
    "TransientError",
    "WriteRejectedError",
]


class FixloopError(Exception):
    """Root of every error fixloop raises on purpose."""


class TransientError(FixloopError):
    """A failure that may go away: retry with backoff."""


class BrokerUnavailableError(TransientError):
    """The MQTT broker cannot be reached or dropped the connection."""


class StoreUnavailableError(TransientError):
    """A store (InfluxDB, the case store) cannot be reached or answered 401/403/404/5xx."""


class PermanentError(FixloopError):
    """A failure that retrying will not cure: count it, log it, set it aside, go on."""


class RejectedError(PermanentError):
    """A device message refused by validation.

    Attributes:
        reason: a short machine-readable code (``too_large``, ``bad_json``, ``nan`` ...).
        detail: a human-readable explanation, safe to publish on ``fleet/rejected``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class WriteRejectedError(PermanentError):
    """InfluxDB refused points with a 400 that splitting the batch cannot cure."""


class ConfigError(FixloopError):
    """A setting is wrong or something needed to start is missing: refuse to start."""
