"""What the registry's routes work with, and the lookups each of them makes (notifier).

Part of :mod:`notifier.admin`: the :class:`Onboarding` the owner API is given, its app
key, and what every route module takes from a request: the onboarding, the claim key
(503 where the server has none) and the ops caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from aiohttp import web

from notifier.admin.limiter import ClaimLimiter
from notifier.edge import ApiError, ErrorView, authenticate
from notifier.openapi import Reply
from notifier.registry import BrokerAccounts, DeviceRegistry

__all__ = [
    "NO_CLAIM_KEY",
    "ONBOARDING_KEY",
    "Onboarding",
    "claim_key_of",
    "onboarding_of",
    "ops_actor",
]


@dataclass(frozen=True, slots=True)
class Onboarding:
    """What the onboarding routes work with.

    Attributes:
        registry: the device registry (``registry()`` of the SQLite or PostgreSQL store).
        claim_key: the key claim codes are hashed under
            (:func:`notifier.registry.claim_key`); ``None``: claiming and registering
            devices answer 503 (the server has no secret to hash codes with).
        models: the product models with a product file; a product line needs one.
        accounts: issues and revokes devices' broker logins (``None``: not here).
        limiter: slows claim-code guessing.
        invite_ttl: how long an owner's invite works.
    """

    registry: DeviceRegistry
    claim_key: bytes | None
    models: frozenset[str]
    accounts: BrokerAccounts | None = None
    limiter: ClaimLimiter = field(default_factory=ClaimLimiter)
    invite_ttl: timedelta = timedelta(days=14)


#: The onboarding of the app (set by :func:`notifier.admin.routes.install_onboarding`).
ONBOARDING_KEY: Final = web.AppKey("onboarding", Onboarding)


def onboarding_of(request: web.Request) -> Onboarding:
    """The onboarding of the request's app."""
    return request.app[ONBOARDING_KEY]


def claim_key_of(onboarding: Onboarding) -> bytes:
    """The key claim codes are hashed under (503 where the server has none)."""
    if onboarding.claim_key is None:
        raise ApiError(
            503,
            "unavailable",
            "claim codes are not set up here: the service needs the fleet secret",
        )
    return onboarding.claim_key


async def ops_actor(request: web.Request) -> str:
    """Authenticate an ops token; return the actor for the audit trail."""
    caller = await authenticate(request, "ops")
    return f"ops:{caller.principal_id}"


#: The reply of a route that needs the claim key (:func:`claim_key_of`).
NO_CLAIM_KEY: Final = Reply(
    503, "Claim codes are not set up here, or a store is briefly unavailable.", ErrorView
)
