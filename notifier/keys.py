"""Typed state of the owner REST API (notifier; built by :func:`notifier.api.create_api`).

Handlers read what :func:`~notifier.api.create_api` was given through these keys, never
through module globals, so that several apps (tests, one per store) can live side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from notifier.actions import CaseActions, HealthReader
from notifier.devicedata import DeviceData, EraseMode
from notifier.links import ActionLinks
from notifier.oidc import OidcOwners
from notifier.push.base import ChannelVerifier
from notifier.store import CaseStore

__all__ = [
    "ACTIONS_KEY",
    "ACTION_BASE_URL_KEY",
    "CHANNEL_VERIFIER_KEY",
    "CLOCK_KEY",
    "DEVICE_DATA_KEY",
    "ERASE_MODE_KEY",
    "HEALTH_KEY",
    "LINKS_KEY",
    "OIDC_KEY",
    "OPENAPI_KEY",
    "STORE_KEY",
    "WEBHOOK_INTERNAL_KEY",
]

#: The case store (owners, channels, devices, cases, appointments, the audit trail).
STORE_KEY: Final = web.AppKey("store", CaseStore)
#: The case machine the owner's and the technician's requests go to.
ACTIONS_KEY: Final = web.AppKey("actions", CaseActions)
#: Where device health (stored anomaly scores) is read from.
HEALTH_KEY: Final = web.AppKey("health", HealthReader)
#: The wall clock (UTC-aware).
CLOCK_KEY: Final = web.AppKey[Callable[[], datetime]]("clock")
#: The public base URL of the API (``https://example.org/api/v1``), if it is known.
ACTION_BASE_URL_KEY: Final = web.AppKey[str | None]("action_base_url")
#: The OpenAPI document of the app, built once with it.
OPENAPI_KEY: Final = web.AppKey[dict[str, Any]]("openapi")
#: Checks one-tap action links (``None``: links are not taken).
LINKS_KEY: Final = web.AppKey[ActionLinks | None]("links")
#: Takes the identity provider's access tokens for owners (``None``: only our tokens).
OIDC_KEY: Final = web.AppKey[OidcOwners | None]("oidc")
#: Whether webhooks may point at internal addresses (local installs and tests only).
WEBHOOK_INTERNAL_KEY: Final = web.AppKey[bool]("webhook_internal")
#: Sends the test message that re-verifies a push channel (``None``: not offered).
CHANNEL_VERIFIER_KEY: Final = web.AppKey[ChannelVerifier | None]("channel_verifier")
#: Where the owner's devices' telemetry, events and scores are (``None``: not exported
#: nor erased by the API, for installs that keep no telemetry).
DEVICE_DATA_KEY: Final = web.AppKey[DeviceData | None]("device_data")
#: What erasure does to the devices' stored points: ``delete`` or ``rekey``.
ERASE_MODE_KEY: Final = web.AppKey[EraseMode]("erase_mode")
