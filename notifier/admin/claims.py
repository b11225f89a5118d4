"""Owners' claims, releases and invites over the owner API (notifier; owners' apps -> here).

Part of :mod:`notifier.admin`:

* ``POST /api/v1/me/devices/claim``: an owner binds a device with the claim code from
  its label, once. Failed claims are counted per owner and per source address before
  the code is checked (so parallel guesses count too); past a few free ones each further
  failure doubles a wait during which claims are answered 429 with ``Retry-After``.
* ``POST /api/v1/me/devices/{id}/release``: the owner lets a device go on resale. The
  device's stored telemetry is erased (or re-keyed) as an erasure would, then its cases
  stay with the seller under an anonymous id (:meth:`notifier.registry.SqliteRegistry.release`),
  so the next owner sees none of the seller's data.
* ``POST /api/v1/invites/accept``: an invited owner's app exchanges the one-time invite
  code for an API token (no bearer token needed; the invite is the credential).

:data:`ROUTES` is this module's part of the route table.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from notifier.admin.bodies import ClaimRequest, InviteAcceptRequest, ReleaseRequest
from notifier.admin.onboarding import NO_CLAIM_KEY, claim_key_of, onboarding_of
from notifier.admin.views import ReleasedView, TokenView
from notifier.api.cases import device_views
from notifier.api.middleware import Handler, Route, api_path
from notifier.api.views import DeviceView
from notifier.edge import (
    ApiError,
    ErrorView,
    authenticate,
    error_response,
    json_response,
    owner_of,
    path_id,
    read_body,
)
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.keys import CLOCK_KEY, DEVICE_DATA_KEY, ERASE_MODE_KEY, STORE_KEY
from notifier.openapi import Operation, Reply
from notifier.registry import new_token, token_id

__all__ = ["ROUTES"]

_ID: Final = "{id}"


def _source(request: web.Request) -> str:
    """The caller's address, an IPv6 one by its /64 (which one host usually owns)."""
    address = request.remote or "unknown"
    if ":" in address:
        groups = address.split("%")[0].split(":")
        return ":".join(groups[:4]) + "::/64"
    return address


async def _claim(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    body = await read_body(request, ClaimRequest)
    onboarding = onboarding_of(request)
    key = claim_key_of(onboarding)
    keys = [("owner", owner.owner_id), ("source", _source(request))]
    clock = request.app[CLOCK_KEY]
    wait = onboarding.limiter.begin(keys, clock())
    if wait > 0:
        response = ApiError(
            429,
            "too_many_attempts",
            f"too many wrong claim codes: try again in {max(int(wait), 1)} s",
        )
        raise _RetryLater(response, wait)
    try:
        outcome = await onboarding.registry.claim(
            owner.owner_id, body.claim_code, key=key, label=body.label, now=clock()
        )
    except InvalidRequestError as exc:
        raise ApiError(422, "invalid_claim_code", f"claim_code: {exc}", "claim_code") from exc
    except NotFoundError as exc:
        # the same answer for a wrong code as for no device: nothing to learn from it
        raise ApiError(404, "not_found", "no device has this claim code") from exc
    except ConflictError:
        onboarding.limiter.succeeded(keys)  # the code was right: no guess to slow down
        raise
    onboarding.limiter.succeeded(keys)
    (view,) = await device_views(request, [outcome.record], owner.owner_id)
    return json_response(view, 201)


class _RetryLater(ApiError):
    """A 429 whose ``Retry-After`` the handler wrapper sets."""

    def __init__(self, error: ApiError, wait_s: float) -> None:
        super().__init__(error.status, error.code, error.message, error.field)
        self.wait_s = wait_s


def _with_retry_after(
    handler: Handler,
) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _RetryLater as exc:
            return error_response(
                exc.status,
                exc.code,
                exc.message,
                **{"Retry-After": str(max(int(exc.wait_s + 0.999), 1))},
            )

    return wrapped


async def _release(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    device_id = path_id(request)
    await read_body(request, ReleaseRequest)
    store = request.app[STORE_KEY]
    device = await store.get_device(device_id)
    if device is None or device.owner_id != owner.owner_id:
        raise ApiError(404, "not_found", f"there is no device {device_id}")
    data = request.app[DEVICE_DATA_KEY]
    if data is not None:
        # the device's points first: should InfluxDB be away, nothing has changed yet and
        # the owner can simply ask again
        await data.erase([device_id], mode=request.app[ERASE_MODE_KEY])
    outcome = await onboarding_of(request).registry.release(
        owner.owner_id, device_id, now=request.app[CLOCK_KEY]()
    )
    return json_response(
        ReleasedView(
            device_id=outcome.device_id,
            cases_kept=outcome.cases_kept,
            cases_closed=outcome.cases_closed,
            visits_cancelled=outcome.visits_cancelled,
        )
    )


async def _accept_invite(request: web.Request) -> web.Response:
    body = await read_body(request, InviteAcceptRequest)
    onboarding = onboarding_of(request)
    keys = [("source", _source(request))]
    clock = request.app[CLOCK_KEY]
    wait = onboarding.limiter.begin(keys, clock())
    if wait > 0:
        raise _RetryLater(
            ApiError(429, "too_many_attempts", "too many wrong invites from here: wait a little"),
            wait,
        )
    try:
        owner_id = await onboarding.registry.use_invite(body.invite, now=clock())
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    onboarding.limiter.succeeded(keys)
    token = new_token()
    await request.app[STORE_KEY].add_token(token, ("owner", owner_id))
    return json_response(
        TokenView(token=token, token_id=token_id(token), role="owner", principal_id=owner_id),
        201,
    )


# -- routes ---------------------------------------------------------------------------------

_TOO_MANY: Final = Reply(
    429,
    "Too many wrong codes from this owner or address: wait as long as `Retry-After` says.",
    ErrorView,
    headers=(("Retry-After", "seconds to wait"),),
)

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "POST",
            api_path("/me/devices/claim"),
            "claimDevice",
            "Add a device to the owner's with the claim code from its label",
            "owner",
            "owner",
            body=ClaimRequest,
            replies=(
                Reply(201, "The device is the owner's now.", DeviceView),
                Reply(404, "No device has this claim code.", ErrorView),
                Reply(
                    409,
                    "The device is the owner's already, has another owner (who must "
                    "release it first), or is out of service.",
                    ErrorView,
                ),
                Reply(422, "This is not a claim code (8 to 64 letters and digits).", ErrorView),
                _TOO_MANY,
                NO_CLAIM_KEY,
            ),
            description=(
                "Wrong codes are counted per owner and per address; after a few, claims "
                "wait longer and longer (429)."
            ),
        ),
        _with_retry_after(_claim),
    ),
    (
        Operation(
            "POST",
            api_path(f"/me/devices/{_ID}/release"),
            "releaseDevice",
            "Let a device go (sold or given away): the next owner sees none of your data",
            "owner",
            "owner",
            body=ReleaseRequest,
            replies=(Reply(200, "Released.", ReleasedView),),
            description=(
                "The device leaves your list; its stored telemetry is erased (or kept "
                "anonymously, as the manufacturer chose for erasures); your cases of it "
                "stay in your history without the device's id, open ones end, visits not "
                "yet started are cancelled. The next owner claims it with its label."
            ),
        ),
        _release,
    ),
    (
        Operation(
            "POST",
            api_path("/invites/accept"),
            "acceptInvite",
            "Exchange an owner's one-time invite for an API token",
            "owner",
            None,
            body=InviteAcceptRequest,
            replies=(
                Reply(201, "The owner's token (shown once).", TokenView),
                Reply(404, "The invite is not valid: used, expired or unknown.", ErrorView),
                _TOO_MANY,
            ),
            description="The invite is the credential: no token is needed. It works once.",
        ),
        _with_retry_after(_accept_invite),
    ),
)
