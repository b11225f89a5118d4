"""The ops dashboard's middlewares and JSON answers: errors, security headers, sessions.

Every request passes :func:`error_middleware` (the owner loop's errors as statuses,
:data:`notifier.edge.ERROR_STATUS`), :func:`headers_middleware` (CSP and friends) and
:func:`auth_middleware` (a session for everything under ``/ops/api/``, a CSRF token for
every change). Handlers answer with :func:`send_json` and :func:`send_error`, read bodies
with :func:`read_json` and check roles with :func:`session_of`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web
from pydantic import BaseModel

from dashboard.auth import (
    Role,
    Session,
    has_role,
)
from dashboard.keys import (
    SESSIONS_KEY,
)
from notifier.edge import MAPPED_ERRORS, ApiError, error_status, read_body
from notifier.errors import (
    ForbiddenError,
    InvalidRequestError,
)
from wire.errors import PermanentError, TransientError

__all__ = [
    "COOKIE_NAME",
    "CSRF_HEADER",
    "Handler",
    "auth_middleware",
    "error_middleware",
    "headers_middleware",
    "read_json",
    "send_error",
    "send_json",
    "send_json_body",
    "session_of",
]

_LOG = logging.getLogger(__name__)


#: The session cookie.
COOKIE_NAME: Final = "fixloop_ops"


#: The header that carries the session's CSRF token on state changes.
CSRF_HEADER: Final = "X-CSRF-Token"


_SAFE_METHODS: Final = frozenset(("GET", "HEAD", "OPTIONS"))


_SESSION_KEY: Final = web.RequestKey("ops_session", Session)


_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def send_json(data: Any, *, status: int = 200) -> web.Response:
    """Answer ``data`` as JSON (never cached)."""
    return send_json_body(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status)


def send_json_body(body: bytes, *, status: int = 200) -> web.Response:
    """Answer JSON already encoded (never cached)."""
    return web.Response(
        body=body,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def send_error(status: int, message: str, **extra: Any) -> web.Response:
    """Answer an error: ``{"error": message, ...}`` with ``status``."""
    return send_json({"error": message, **extra}, status=status)


async def read_json(request: web.Request, model: type[BaseModel]) -> Any:
    """Read a JSON body into ``model`` (an empty body is ``{}``); refused: 422."""
    try:
        return await read_body(request, model, empty_is_object=True)
    except ApiError as exc:
        raise InvalidRequestError(f"invalid request: {exc.message}") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise InvalidRequestError("the request body is too large") from exc


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer the owner loop's errors with their status, store outages with 503/502."""
    try:
        return await handler(request)
    except MAPPED_ERRORS as exc:
        status, _code = error_status(exc) or (500, "internal_error")
        return send_error(status, str(exc))
    except TransientError as exc:
        _LOG.warning("%s %s: a store is unavailable: %s", request.method, request.path, exc)
        return send_error(503, "a data store is unavailable; try again shortly")
    except PermanentError as exc:
        _LOG.warning("%s %s failed: %s", request.method, request.path, exc)
        return send_error(502, "a data store refused the request")


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Set the security headers (CSP, no sniffing, no framing, no referrer)."""
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def _public(path: str) -> bool:
    return not path.startswith("/ops/api/") and path != "/ops/logout"


# Requests the page makes on its own (the live stream and its reconnects, refreshes after
# a live change, which say so in _BACKGROUND_HEADER): they need a session but do not
# extend it, so an open page alone never keeps a session alive.
_PASSIVE: Final = frozenset(("/ops/api/events",))


_BACKGROUND_HEADER: Final = "X-Ops-Background"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a session under ``/ops/api/`` and its CSRF token for every change."""
    if _public(request.path):
        return await handler(request)
    session_id = request.cookies.get(COOKIE_NAME)
    sessions = request.app[SESSIONS_KEY]
    passive = request.path in _PASSIVE or request.headers.get(_BACKGROUND_HEADER) == "1"
    lookup = sessions.peek if passive else sessions.get
    session = lookup(session_id) if session_id else None
    if session is None:
        return send_error(401, "log in first")
    if request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            return send_error(403, "missing or wrong CSRF token")
    request[_SESSION_KEY] = session
    return await handler(request)


def session_of(request: web.Request, role: Role = "viewer") -> Session:
    """The request's session, if its role is at least ``role`` (else 403)."""
    session = request[_SESSION_KEY]
    if not has_role(session.role, role):
        raise ForbiddenError(f"this needs the {role} role")
    return session
