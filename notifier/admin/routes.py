"""The registry's part of the owner API's route table (notifier; built into the owner API).

:func:`install_onboarding` gives the app its :class:`~notifier.admin.onboarding.Onboarding`
and returns the routes, in the order of the OpenAPI document: the ops role's device
registry, then its owners, technicians, tokens and sign-ins, then the owners' claims,
releases and invites.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from notifier.admin import claims, devices, people
from notifier.admin.onboarding import ONBOARDING_KEY, Onboarding
from notifier.api.middleware import Route

__all__ = ["ROUTES", "install_onboarding"]

#: Every route of the registry, in the order of the OpenAPI document.
ROUTES: Final[tuple[Route, ...]] = (*devices.ROUTES, *people.ROUTES, *claims.ROUTES)


def install_onboarding(app: web.Application, onboarding: Onboarding) -> tuple[Route, ...]:
    """Give ``app`` the onboarding; return its routes for the app's route table."""
    app[ONBOARDING_KEY] = onboarding
    return ROUTES
