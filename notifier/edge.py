"""The owner API's edge, shared by its route modules and the ops dashboard (notifier).

:mod:`notifier.api` (owners, technicians) and :mod:`notifier.admin` (the ops role's
onboarding, claims) answer through the same pieces: the error every route raises
(:class:`ApiError`) and the JSON it becomes, request and response body bases, the body,
path and time-zone checks, and bearer-token authentication (fixloop's tokens, or an
identity provider's access token of an owner). The ops dashboard answers the owner
loop's errors with the same statuses (:data:`ERROR_STATUS`) and reads its bodies with
:func:`read_body` too.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from notifier.errors import (
    ConflictError,
    ExpiredLinkError,
    ForbiddenError,
    IllegalTransitionError,
    InvalidLinkError,
    InvalidRequestError,
    NotFoundError,
    UnsafeAddressError,
    UsedLinkError,
)
from notifier.keys import OIDC_KEY, STORE_KEY
from notifier.model import Owner
from notifier.oidc import InvalidAccessTokenError, OidcOwners, UnknownSubjectError, looks_like_jwt
from notifier.store import Principal, PrincipalKind

__all__ = [
    "ERROR_STATUS",
    "MAPPED_ERRORS",
    "MAX_BODY_BYTES",
    "ApiError",
    "Body",
    "Caller",
    "ErrorDetail",
    "ErrorView",
    "View",
    "authenticate",
    "error_response",
    "error_status",
    "json_response",
    "owner_of",
    "path_id",
    "read_body",
    "whole",
    "zones",
]

#: The largest request body taken (larger: 413).
MAX_BODY_BYTES: Final = 64 * 1024
#: Longest id taken in a path (longer ones cannot exist: 404).
_MAX_ID_CHARS: Final = 128
#: Longest token looked up (longer ones cannot exist: 401).
_MAX_TOKEN_CHARS: Final = 512

_M = TypeVar("_M", bound=BaseModel)

#: Errors of the owner loop -> HTTP status and code (first match wins: subclasses first),
#: for every web app: the owner and admin APIs and the ops dashboard.
ERROR_STATUS: Final[tuple[tuple[type[Exception], int, str], ...]] = (
    (ExpiredLinkError, 410, "link_expired"),
    (InvalidLinkError, 403, "invalid_link"),
    (UsedLinkError, 409, "link_used"),
    (UnsafeAddressError, 422, "unsafe_target"),
    (NotFoundError, 404, "not_found"),
    (ForbiddenError, 403, "forbidden"),
    (IllegalTransitionError, 409, "illegal_transition"),
    (ConflictError, 409, "conflict"),
    (InvalidRequestError, 422, "invalid_request"),
)

#: Every error type :data:`ERROR_STATUS` has a status for (for an ``except`` clause).
MAPPED_ERRORS: Final = tuple(kind for kind, _status, _code in ERROR_STATUS)


def error_status(exc: BaseException) -> tuple[int, str] | None:
    """The HTTP status and error code of an owner-loop error, or None if it has none."""
    for kind, status, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return status, code
    return None


class ApiError(Exception):
    """An HTTP error answer, raised by a handler and written by the error middleware."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class Body(BaseModel):
    """A request body: strict JSON types, unknown fields refused."""

    # strict: JSON types as written (no "true" for true); unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@functools.cache
def zones() -> frozenset[str]:
    """The IANA time zones this machine knows."""
    return frozenset(zoneinfo.available_timezones())


def whole(value: object) -> object:
    """``4.0`` as ``4``: JSON Schema's ``integer`` includes it; ``4.5`` stays refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class View(BaseModel):
    """A response body."""

    model_config = ConfigDict(frozen=True)


class ErrorDetail(View):
    """What went wrong.

    Attributes:
        code: machine-readable reason (``not_found``, ``invalid_body`` ...).
        message: plain words.
        field: the body field or query parameter at fault, if one is.
    """

    code: str
    message: str
    field: str | None = None


class ErrorView(View):
    """Every error answer.

    Attributes:
        error: what went wrong.
    """

    error: ErrorDetail


def json_response(view: BaseModel, status: int = 200) -> web.Response:
    """``view`` as a JSON answer."""
    return web.Response(
        body=view.model_dump_json().encode("utf-8"),
        status=status,
        content_type="application/json",
    )


def error_response(
    status: int, code: str, message: str, field: str | None = None, **headers: str
) -> web.Response:
    """The error answer every route gives: ``{"error": {"code", "message", "field"}}``."""
    response = json_response(
        ErrorView(error=ErrorDetail(code=code, message=message, field=field)), status
    )
    response.headers.update(headers)
    return response


def _clean_message(text: str) -> str:
    return text.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _invalid_body(exc: ValidationError, *, tags: Sequence[str]) -> ApiError:
    """The 400 for the first thing wrong with a body, naming its field."""
    first = exc.errors(include_url=False)[0]
    loc = list(first["loc"])
    if tags and loc:
        loc = loc[1:]  # a discriminated union puts the tag ahead of the field
    kind = first["type"]
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", "the body is not valid JSON")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        words = f"kind must be one of {', '.join(tags)}"
        return ApiError(400, "invalid_body", words, "kind")
    field = ".".join(str(part) for part in loc) or None
    if kind == "extra_forbidden":
        words = "is not a known field"
    elif kind == "missing":
        words = "is required"
    else:
        words = _clean_message(str(first["msg"]))
    if field is None:
        if kind in ("model_type", "dict_type", "model_attributes_type"):
            return ApiError(400, "invalid_body", "the body must be a JSON object")
        return ApiError(400, "invalid_body", words)
    return ApiError(400, "invalid_body", f"{field}: {words}", field)


async def read_body(
    request: web.Request,
    model: type[_M],
    *,
    tags: Sequence[str] = (),
    empty_is_object: bool = False,
) -> _M:
    """Read and check a JSON body (size, media type, schema).

    The owner and admin APIs and the ops dashboard read their bodies with it.

    Args:
        request: the request.
        model: the body's model.
        tags: for a model that is a union told apart by ``kind``, the kinds it takes.
        empty_is_object: read an empty body as ``{}`` (else it is refused).

    Raises:
        ApiError: 400 naming the first field at fault, 415 for another media type.
        web.HTTPRequestEntityTooLarge: a body larger than :data:`MAX_BODY_BYTES`.
    """
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY_BYTES, actual_size=request.content_length
        )
    no_body = empty_is_object and request.content_length == 0  # nothing to be JSON
    if "Content-Type" in request.headers and not no_body:
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = await request.read()  # the app's client_max_size stops longer chunked bodies (413)
    if len(raw) > MAX_BODY_BYTES:  # an app whose client_max_size is larger (the dashboard)
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(raw))
    if not raw.strip():
        if not empty_is_object:
            raise ApiError(400, "invalid_body", "the request needs a JSON body")
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid_body(exc, tags=tags) from exc


def path_id(request: web.Request, name: str = "id") -> str:
    """The id in the path (too long to exist: 404)."""
    value = request.match_info[name]
    if not value or len(value) > _MAX_ID_CHARS:
        raise ApiError(404, "not_found", "there is nothing at this address")
    return value


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the principal's id (and the owner, for owner routes)."""

    principal_id: str
    owner: Owner | None = None


_UNAUTHORIZED_WORDS: Final = "sign in again: the request needs a valid token"
_FORBIDDEN_WORDS: Final[dict[str, str]] = {
    "owner": "this is for device owners",
    "technician": "this is for technicians",
    "ops": "this is for the operations team",
}


async def authenticate(request: web.Request, kind: PrincipalKind) -> Caller:
    """Who calls, by their bearer token: one of ``kind``, else 401 or 403.

    A token the store does not know may be the identity provider's access token of an
    owner (:mod:`notifier.oidc`).
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", _UNAUTHORIZED_WORDS)
    principal = None
    if len(token) <= _MAX_TOKEN_CHARS:
        principal = await request.app[STORE_KEY].resolve_token(token)
    if principal is None and looks_like_jwt(token):
        principal = await _provider_principal(request.app[OIDC_KEY], token)
    if principal is None:
        raise ApiError(401, "invalid_token", _UNAUTHORIZED_WORDS)
    principal_kind, principal_id = principal
    if principal_kind != kind:
        raise ApiError(403, "forbidden", _FORBIDDEN_WORDS[kind])
    if kind != "owner":
        return Caller(principal_id)
    owner = await request.app[STORE_KEY].get_owner(principal_id)
    if owner is None:
        # a token left behind by an erased owner stands for no one
        raise ApiError(401, "invalid_token", _UNAUTHORIZED_WORDS)
    return Caller(principal_id, owner)


async def _provider_principal(oidc: OidcOwners | None, token: str) -> Principal | None:
    """The owner an identity provider's access token stands for (``None``: none taken)."""
    if oidc is None:
        return None
    try:
        return ("owner", await oidc.owner_id(token))
    except InvalidAccessTokenError as exc:
        raise ApiError(401, "invalid_token", f"sign in again: {exc}") from exc
    except UnknownSubjectError as exc:
        raise ApiError(403, "unknown_owner", str(exc)) from exc


def owner_of(caller: Caller) -> Owner:
    """The owner calling (on an owner route)."""
    if caller.owner is None:  # pragma: no cover - owner routes authenticate as owners
        raise ApiError(403, "forbidden", _FORBIDDEN_WORDS["owner"])
    return caller.owner
