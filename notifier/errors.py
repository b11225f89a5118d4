"""Errors of the owner loop, under the shared tree of :mod:`gateway.errors`.

::

    FixloopError
    ├── TransientError
    │   └── DeliveryError          a push service is away or throttles: retry with backoff
    ├── PermanentError
    │   ├── IllegalTransitionError a case cannot move to that state
    │   ├── NotFoundError          no such case, device, owner, slot (API: 404)
    │   ├── ForbiddenError         not this owner's or technician's (API: 403/404)
    │   ├── ConflictError          the slot was taken, the case moved on (API: 409)
    │   ├── InvalidRequestError    a request that cannot be carried out (API: 400/422)
    │   └── DeadTokenError         the push service says the token is gone: retire it
    └── ConfigError
"""

from __future__ import annotations

from gateway.errors import PermanentError, TransientError

__all__ = [
    "ConflictError",
    "DeadTokenError",
    "DeliveryError",
    "ForbiddenError",
    "IllegalTransitionError",
    "InvalidRequestError",
    "NotFoundError",
]


class DeliveryError(TransientError):
    """A push service did not take a message now (5xx, 429, network): retry later."""


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
