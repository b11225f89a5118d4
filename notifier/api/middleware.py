"""The owner REST API's edge middleware and what its route modules share (notifier).

Every answer of the API passes :func:`edge_middleware`: it names the request
(:data:`REQUEST_ID_HEADER`), turns errors into the API's JSON error body with their
status (see :mod:`notifier.api`), logs what is unexpected and sets the security
headers. The route modules take the path prefix, the handler and route types from here.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from notifier.edge import MAX_BODY_BYTES, ApiError, error_response, error_status
from notifier.errors import (
    ConflictError,
    ForbiddenError,
    IllegalTransitionError,
    InvalidRequestError,
    NotFoundError,
)
from notifier.openapi import Operation
from wire.errors import TransientError

__all__ = [
    "API_PREFIX",
    "REQUEST_ID_HEADER",
    "SECURITY_HEADERS",
    "Handler",
    "Route",
    "api_path",
    "edge_middleware",
    "request_id_of",
]

_LOG = logging.getLogger(__name__)

#: Where the API's routes live.
API_PREFIX: Final = "/api/v1"
#: The header naming each request (taken from the caller when sane, else made here).
REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Sent with every answer of the API (a page sets a looser CSP of its own first).
SECURITY_HEADERS: Final[dict[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: One row of a route table: what the OpenAPI document says of a route, and its handler.
Route = tuple[Operation, Handler]


def api_path(path: str) -> str:
    """The full path of a route: ``/me`` -> ``/api/v1/me``."""
    return f"{API_PREFIX}{path}"


# -- errors at the edge ---------------------------------------------------------------------


#: aiohttp's own HTTP errors (routing, body size) -> code and plain words.
_HTTP_WORDS: Final[dict[int, tuple[str, str]]] = {
    400: ("bad_request", "the request could not be read"),
    404: ("not_found", "there is nothing at this address"),
    405: ("method_not_allowed", "this address does not take that method"),
    413: ("too_large", f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB"),
}


def request_id_of(request: web.Request) -> str:
    """The request's id: the caller's ``X-Request-Id`` when sane, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _from_http(exc: web.HTTPException) -> web.Response:
    code, words = _HTTP_WORDS.get(exc.status, ("http_error", exc.reason.lower()))
    response = error_response(exc.status, code, words)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, JSON errors and the last line of defence."""
    request_id = request_id_of(request)
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
        if exc.status == 401:
            error = "invalid_token" if exc.code == "invalid_token" else None
            response.headers["WWW-Authenticate"] = f'Bearer error="{error}"' if error else "Bearer"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _from_http(exc)
    except (NotFoundError, ForbiddenError, ConflictError, InvalidRequestError) as exc:
        status, code = error_status(exc) or (500, "internal_error")
        response = error_response(status, code, str(exc) or code.replace("_", " "))
    except IllegalTransitionError as exc:
        response = error_response(409, "illegal_transition", str(exc) or "the case has moved on")
    except TransientError:
        _LOG.warning(
            "request %s %s %s: a store or service is briefly unavailable",
            request_id,
            request.method,
            request.path,
            exc_info=True,
        )
        response = error_response(
            503, "unavailable", "please try again in a moment", **{"Retry-After": "5"}
        )
    except Exception:
        # the last line of defence: a bug answers 500, is logged, and the app goes on
        _LOG.exception("request %s %s %s failed", request_id, request.method, request.path)
        response = error_response(500, "internal_error", "something went wrong on our side")
    if response.prepared:  # a streamed answer set its headers before it began
        return response
    response.headers[REQUEST_ID_HEADER] = request_id
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith(API_PREFIX):
        response.headers.setdefault("Cache-Control", "no-store")
    return response
