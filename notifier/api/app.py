"""The owner REST API's app factory (notifier; owners' and technicians' apps -> here).

:func:`create_api` builds the app: its state (:mod:`notifier.keys`), the edge
middleware, the route table put together from each route module's part, and the
OpenAPI document served at ``GET /openapi.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from aiohttp import web

from notifier.actions import CaseActions, HealthReader
from notifier.api import account, cases, taps, technician
from notifier.api.middleware import API_PREFIX, REQUEST_ID_HEADER, Route, edge_middleware
from notifier.devicedata import DeviceData, EraseMode
from notifier.edge import MAX_BODY_BYTES, ErrorView
from notifier.keys import (
    ACTION_BASE_URL_KEY,
    ACTIONS_KEY,
    CHANNEL_VERIFIER_KEY,
    CLOCK_KEY,
    DEVICE_DATA_KEY,
    ERASE_MODE_KEY,
    HEALTH_KEY,
    LINKS_KEY,
    OIDC_KEY,
    OPENAPI_KEY,
    STORE_KEY,
    WEBHOOK_INTERNAL_KEY,
)
from notifier.links import ActionLinks
from notifier.oidc import OidcOwners
from notifier.openapi import Operation, Reply, build_document
from notifier.push.base import ChannelVerifier
from notifier.store import CaseStore

if TYPE_CHECKING:
    from notifier.admin import Onboarding

__all__ = ["ROUTES", "create_api"]


async def _get_openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


#: The route table: each module's part, in the order of the OpenAPI document.
ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            "/openapi.json",
            "getOpenApi",
            "This document",
            "meta",
            None,
            replies=(Reply(200, "The OpenAPI 3.1 document.", schema={"type": "object"}),),
        ),
        _get_openapi,
    ),
    *account.ROUTES,
    *cases.ROUTES,
    *taps.ROUTES,
    *technician.ROUTES,
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _server_url(action_base_url: str | None) -> str | None:
    if action_base_url is None:
        return None
    return action_base_url.rstrip("/").removesuffix(API_PREFIX) or None


def create_api(
    *,
    store: CaseStore,
    actions: CaseActions,
    health: HealthReader,
    clock: Callable[[], datetime] = _utc_now,
    action_base_url: str | None = None,
    links: ActionLinks | None = None,
    webhook_allow_private: bool = False,
    device_data: DeviceData | None = None,
    erase_mode: EraseMode = "delete",
    verifier: ChannelVerifier | None = None,
    oidc: OidcOwners | None = None,
    onboarding: Onboarding | None = None,
) -> web.Application:
    """Build the owner REST API.

    Args:
        store: the case store.
        actions: the case machine the owners' and technicians' requests go to.
        health: where device health is read from.
        clock: the wall clock (UTC-aware).
        action_base_url: the public URL the API is reached at
            (``https://fixloop.example.org``, with or without ``/api/v1``), named as
            the server of the OpenAPI document.
        links: checks the one-tap action links of push messages (``None``: links are
            refused with 403).
        webhook_allow_private: accept webhooks to internal addresses and over plain
            http (local installs and tests only).
        device_data: where the owners' devices' points are kept, exported with the
            owner's data and erased with it (``None``: the API touches no telemetry).
        erase_mode: what an erasure does to those points: ``delete`` them, or ``rekey``
            them to anonymous device ids first (history kept, linked to no one).
        verifier: sends the test message that re-verifies a push channel (``None``:
            re-verification answers 503).
        oidc: takes owners' access tokens of the manufacturer's identity provider
            (``None``: only the store's tokens).
        onboarding: the device registry's routes: ``/api/v1/admin/…`` for the ops role,
            owners' claims and releases, invites (:mod:`notifier.admin`; ``None``: none).

    Returns:
        The app: routes under ``/api/v1`` and ``GET /openapi.json``.
    """
    app = web.Application(middlewares=[edge_middleware], client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[ACTIONS_KEY] = actions
    app[HEALTH_KEY] = health
    app[CLOCK_KEY] = clock
    app[ACTION_BASE_URL_KEY] = action_base_url
    app[LINKS_KEY] = links
    app[WEBHOOK_INTERNAL_KEY] = webhook_allow_private
    app[CHANNEL_VERIFIER_KEY] = verifier
    app[DEVICE_DATA_KEY] = device_data
    app[ERASE_MODE_KEY] = erase_mode
    app[OIDC_KEY] = oidc
    routes = ROUTES
    if onboarding is not None:
        from notifier.admin import install_onboarding  # it builds on this module's edge

        routes = (*ROUTES, *install_onboarding(app, onboarding))
    for operation, handler in routes:
        app.router.add_route(operation.method, operation.path, handler, name=operation.operation_id)
    app[OPENAPI_KEY] = build_document(
        [operation for operation, _ in routes],
        title="fixloop owner API",
        version="1",
        description=(
            "What device owners and technicians ask of fixloop: devices and how they are "
            "doing, cases and their history, remote-fix consent, visit times, ratings, "
            "push channels, data export and erasure."
        ),
        error_model=ErrorView,
        server_url=_server_url(action_base_url),
        request_id_header=REQUEST_ID_HEADER,
    )
    return app
