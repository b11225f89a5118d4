"""Errors of the owner loop, under the shared tree of :mod:`wire.errors`.

::

    FixloopError
    ├── TransientError
    │   ├── DeliveryError          a push service is away or throttles: retry with backoff
    │   └── CaseBusyError          another notifier holds the case's lease: retry later
    ├── PermanentError
    │   ├── IllegalTransitionError a case cannot move to that state
    │   ├── NotFoundError          no such case, device, owner, slot (API: 404)
    │   ├── ForbiddenError         not this owner's or technician's (API: 403/404)
    │   │   └── InvalidLinkError   a one-tap link tampered with or for something else (403)
    │   │       └── ExpiredLinkError   a one-tap link past its expiry (API: 410)
    │   ├── ConflictError          the slot was taken, the case moved on (API: 409)
    │   │   └── UsedLinkError      a one-tap link that was used already (API: 409)
    │   ├── InvalidRequestError    a request that cannot be carried out (API: 400/422)
    │   │   └── UnsafeAddressError a webhook pointing at an internal address (API: 422)
    │   └── DeadTokenError         the push service says the token is gone: retire it
    └── ConfigError
"""

from __future__ import annotations

from wire.errors import PermanentError, TransientError

__all__ = [
    "CaseBusyError",
    "ConflictError",
    "DeadTokenError",
    "DeliveryError",
    "ExpiredLinkError",
    "ForbiddenError",
    "IllegalTransitionError",
    "InvalidLinkError",
    "InvalidRequestError",
    "NotFoundError",
    "UnsafeAddressError",
    "UsedLinkError",
]


class DeliveryError(TransientError):
    """A push service did not take a message now (5xx, 429, network): retry later."""


class CaseBusyError(TransientError):
    """Another notifier instance held a case's lease for longer than a lease lasts."""


class IllegalTransitionError(PermanentError):
    """A case was asked to move to a state its lifecycle does not allow."""


class NotFoundError(PermanentError):
    """The thing asked for does not exist."""


class ForbiddenError(PermanentError):
    """The caller may not see or act on the thing asked for."""


class ConflictError(PermanentError):
    """The request clashes with the current state (a slot taken, a case moved on)."""


class InvalidRequestError(PermanentError):
    """The request is well-formed but cannot be carried out as asked."""


class DeadTokenError(PermanentError):
    """The push service says the token or subscription no longer exists."""


class InvalidLinkError(ForbiddenError):
    """A one-tap action link whose signature does not hold, or that is for another case."""


class ExpiredLinkError(InvalidLinkError):
    """A one-tap action link past its expiry."""


class UsedLinkError(ConflictError):
    """A one-tap action link that was used already (each works once)."""


class UnsafeAddressError(InvalidRequestError):
    """A webhook URL that points, or resolves, at an internal address (or is no https URL)."""
