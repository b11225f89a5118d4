"""The owner's account over the owner REST API: profile, push channels, export, erasure.

Part of :mod:`notifier.api` (owners' apps -> here -> the case store). ``/me`` is the
profile (language, time zone, consent, quiet hours, channel order); ``/me/channels`` the
push channels (registered, re-verified with a test message, removed); ``/me/export``
and ``/me/export/device-data`` everything kept about the owner and sent by their
devices; ``DELETE /me`` erases it. :data:`ROUTES` is this module's part of the route table.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import UTC
from typing import Any, Final

from aiohttp import web

from notifier.addresses import check_webhook_url
from notifier.api.bodies import (
    CHANNEL_KINDS,
    ChannelRequest,
    EraseRequest,
    FcmChannel,
    NtfyChannel,
    ProfilePatch,
    WebhookChannel,
    WebPushChannel,
)
from notifier.api.middleware import (
    REQUEST_ID_HEADER,
    SECURITY_HEADERS,
    Route,
    api_path,
    request_id_of,
)
from notifier.api.views import ChannelList, ChannelView, ErasedView, ProfileView
from notifier.api.words import channel_view, profile_view
from notifier.edge import (
    ApiError,
    ErrorView,
    authenticate,
    json_response,
    owner_of,
    path_id,
    read_body,
    zones,
)
from notifier.errors import InvalidRequestError, UnsafeAddressError
from notifier.keys import (
    CHANNEL_VERIFIER_KEY,
    CLOCK_KEY,
    DEVICE_DATA_KEY,
    ERASE_MODE_KEY,
    STORE_KEY,
    WEBHOOK_INTERNAL_KEY,
)
from notifier.model import PushChannel
from notifier.openapi import Operation, Reply
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError

__all__ = ["ROUTES"]

_LOG = logging.getLogger(__name__)

#: Most push channels one owner may keep, active or retired.
_MAX_CHANNELS: Final = 20
_ID: Final = "{id}"

# -- owner handlers ---------------------------------------------------------------------------


async def _get_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    return json_response(profile_view(owner))


async def _patch_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    patch = await read_body(request, ProfilePatch)
    changes: dict[str, Any] = {}
    if patch.language is not None:
        changes["language"] = patch.language
    if patch.timezone is not None:
        if patch.timezone not in zones():
            # a well-formed name this machine's zone database does not know: 422
            message = f"timezone: {patch.timezone!r} is not an IANA time zone (like Europe/Berlin)"
            raise ApiError(422, "invalid_request", message, "timezone")
        changes["timezone"] = patch.timezone
    if patch.consent is not None:
        changes["consent"] = patch.consent
    if "quiet_hours" in patch.model_fields_set:
        quiet = patch.quiet_hours
        if quiet is not None and quiet.start == quiet.end:
            message = "quiet_hours: must not start and end at the same time"
            raise ApiError(422, "invalid_request", message, "quiet_hours")
        changes["quiet_start"] = None if quiet is None else quiet.start
        changes["quiet_end"] = None if quiet is None else quiet.end
    if patch.channels is not None:
        changes["channels"] = tuple(patch.channels)
    if changes:
        owner = replace(owner, **changes)
        await request.app[STORE_KEY].put_owner(owner)
    return json_response(profile_view(owner))


async def _list_channels(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    # retired ones too: they count towards the limit, and the owner re-verifies or removes them
    channels = await request.app[STORE_KEY].channels(owner.owner_id, active_only=False)
    return json_response(ChannelList(channels=[channel_view(channel) for channel in channels]))


def _channel_keys(
    body: WebPushChannel | FcmChannel | NtfyChannel | WebhookChannel,
) -> dict[str, str]:
    if isinstance(body, WebPushChannel):
        return {"p256dh": body.keys.p256dh, "auth": body.keys.auth}
    if isinstance(body, WebhookChannel):
        return {"secret": body.keys.secret}
    if isinstance(body, NtfyChannel) and body.keys.token is not None:
        return {"token": body.keys.token}
    return {}


async def _add_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    body = (await read_body(request, ChannelRequest, tags=CHANNEL_KINDS)).root
    if not isinstance(body, FcmChannel):  # an FCM target is a token, not an address
        try:
            check_webhook_url(body.target, allow_internal=request.app[WEBHOOK_INTERNAL_KEY])
        except UnsafeAddressError as exc:
            raise ApiError(422, "unsafe_target", f"target: {exc}", "target") from exc
    if isinstance(body, WebPushChannel) and not body.keys.point_on_curve():
        message = "keys.p256dh: is not a point on the P-256 curve"
        raise ApiError(422, "invalid_keys", message, "keys.p256dh")
    store = request.app[STORE_KEY]
    keys = _channel_keys(body)
    existing = await store.channels(owner.owner_id, active_only=False)
    for channel in existing:
        if channel.kind == body.kind and channel.target == body.target:
            # the same subscription again (an app reinstall): refresh its keys, keep its id
            # and its state: a retired channel comes back only by re-verification
            renewed = replace(channel, keys=keys)
            await store.put_channel(renewed)
            return json_response(channel_view(renewed))
    if len(existing) >= _MAX_CHANNELS:  # retired ones too: they are kept until removed
        raise InvalidRequestError(
            f"at most {_MAX_CHANNELS} push channels: remove one you no longer use first"
        )
    channel = PushChannel(
        channel_id=f"ch-{uuid.uuid4().hex}",
        owner_id=owner.owner_id,
        kind=body.kind,
        target=body.target,
        keys=keys,
        active=True,
        created_at=request.app[CLOCK_KEY](),
    )
    await store.put_channel(channel)
    return json_response(channel_view(channel), 201)


async def _verify_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    channel_id = path_id(request)
    store = request.app[STORE_KEY]
    channel = next(
        (
            c
            for c in await store.channels(owner.owner_id, active_only=False)
            if c.channel_id == channel_id
        ),
        None,
    )
    if channel is None:
        raise ApiError(404, "not_found", f"there is no push channel {channel_id}")
    verifier = request.app[CHANNEL_VERIFIER_KEY]
    if verifier is None:
        raise ApiError(503, "unavailable", "push delivery is not running here")
    if not await verifier.verify_channel(owner, channel):
        raise ApiError(
            409,
            "not_verified",
            "the test message did not reach the channel; it stays as it was",
        )
    return json_response(channel_view(replace(channel, active=True, failures=0)))


async def _delete_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    channel_id = path_id(request)
    if not await request.app[STORE_KEY].delete_channel(owner.owner_id, channel_id):
        raise ApiError(404, "not_found", f"there is no push channel {channel_id}")
    return web.Response(status=204)


async def _export_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    data = await request.app[STORE_KEY].export_owner(owner.owner_id)
    day = request.app[CLOCK_KEY]().astimezone(UTC).strftime("%Y-%m-%d")
    response = web.json_response(data)
    response.headers["Content-Disposition"] = f'attachment; filename="fixloop-data-{day}.json"'
    return response


async def _owner_device_ids(store: CaseStore, owner_id: str) -> list[str]:
    """Every device the owner has or had a case about (their data in InfluxDB)."""
    ids = {device.device_id for device in await store.devices(owner_id)}
    ids |= {case.device_id for case in await store.cases(owner_id=owner_id, limit=1_000_000)}
    return sorted(ids)


async def _export_telemetry(request: web.Request) -> web.StreamResponse:
    owner = owner_of(await authenticate(request, "owner"))
    data = request.app[DEVICE_DATA_KEY]
    devices = await _owner_device_ids(request.app[STORE_KEY], owner.owner_id)
    day = request.app[CLOCK_KEY]().astimezone(UTC).strftime("%Y-%m-%d")
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="fixloop-device-data-{day}.jsonl"',
            "Cache-Control": "no-store",
            REQUEST_ID_HEADER: request_id_of(request),
            **SECURITY_HEADERS,
        }
    )
    lines = data.export(devices) if data is not None and devices else None
    # the first point is read before the answer starts, so that InfluxDB being away is a
    # proper 503 rather than a broken download
    first = None if lines is None else await anext(aiter(lines), None)
    await response.prepare(request)
    if lines is not None and first is not None:
        await response.write(first)
        try:
            async for line in lines:
                await response.write(line)
        except (TransientError, PermanentError):
            # the answer has begun: all that is left is to cut it short, visibly
            _LOG.warning("device data export of an owner broke off", exc_info=True)
            raise
    await response.write_eof()
    return response


async def _delete_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    await read_body(request, EraseRequest)
    store = request.app[STORE_KEY]
    data = request.app[DEVICE_DATA_KEY]
    if data is not None:
        # the devices' points first: should InfluxDB be away, nothing is erased yet and
        # the owner (whose token still works) can simply ask again
        devices = await _owner_device_ids(store, owner.owner_id)
        if devices:
            await data.erase(devices, mode=request.app[ERASE_MODE_KEY])
    rows = await store.erase_owner(owner.owner_id)
    _LOG.info("an owner erased their data (%d rows)", rows)
    return json_response(ErasedView(erased=True, rows=rows))


# -- routes ---------------------------------------------------------------------------------

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            api_path("/me"),
            "getProfile",
            "The owner's profile",
            "owner",
            "owner",
            replies=(Reply(200, "The profile.", ProfileView),),
        ),
        _get_me,
    ),
    (
        Operation(
            "PATCH",
            api_path("/me"),
            "updateProfile",
            "Change language, time zone, consent, quiet hours or channel order",
            "owner",
            "owner",
            body=ProfilePatch,
            replies=(Reply(200, "The changed profile.", ProfileView),),
        ),
        _patch_me,
    ),
    (
        Operation(
            "DELETE",
            api_path("/me"),
            "eraseOwner",
            "Erase the owner's data",
            "owner",
            "owner",
            body=EraseRequest,
            replies=(Reply(200, "Erased; the token no longer works.", ErasedView),),
            description=(
                "Contacts, push channels, tokens, notifications and devices go; cases and "
                "ratings stay for the fleet's statistics without the owner's id or comments."
            ),
        ),
        _delete_me,
    ),
    (
        Operation(
            "GET",
            api_path("/me/export"),
            "exportOwner",
            "Everything kept about the owner, as a JSON file",
            "owner",
            "owner",
            replies=(
                Reply(
                    200,
                    "The owner's data.",
                    schema={"type": "object"},
                    headers=(("Content-Disposition", "attachment; filename=..."),),
                ),
            ),
        ),
        _export_me,
    ),
    (
        Operation(
            "GET",
            api_path("/me/export/device-data"),
            "exportDeviceData",
            "Everything the owner's devices sent and what was made of it, as JSON lines",
            "owner",
            "owner",
            replies=(
                Reply(
                    200,
                    "One JSON object a line: a point of telemetry, a device event or a "
                    "health score (`measurement`, `device`, `time` and the point's values), "
                    "device by device, oldest first; streamed.",
                    schema={"type": "string"},
                    media_type="application/x-ndjson",
                    headers=(("Content-Disposition", "attachment; filename=..."),),
                ),
            ),
        ),
        _export_telemetry,
    ),
    (
        Operation(
            "GET",
            api_path("/me/channels"),
            "listChannels",
            "The owner's push channels",
            "owner",
            "owner",
            replies=(Reply(200, "The channels, active and retired, targets masked.", ChannelList),),
        ),
        _list_channels,
    ),
    (
        Operation(
            "POST",
            api_path("/me/channels"),
            "addChannel",
            "Register a push channel (FCM, Web Push, ntfy or a webhook)",
            "owner",
            "owner",
            body=ChannelRequest,
            replies=(
                Reply(201, "Registered; the target masked, secrets not shown.", ChannelView),
                Reply(
                    200,
                    "The same channel was registered before: its keys refreshed, its state "
                    "kept (a retired one stays retired until re-verified).",
                    ChannelView,
                ),
            ),
            description=(
                "An owner keeps at most 20 channels, retired ones included (422 past that: "
                "remove one first)."
            ),
        ),
        _add_channel,
    ),
    (
        Operation(
            "POST",
            api_path(f"/me/channels/{_ID}/verify"),
            "verifyChannel",
            "Re-verify a push channel with a test message",
            "owner",
            "owner",
            replies=(
                Reply(200, "The test message was taken: the channel is active.", ChannelView),
                Reply(409, "The test message was not taken: the channel is unchanged.", ErrorView),
                Reply(
                    503,
                    "Push delivery is not running here, or a store is briefly unavailable.",
                    ErrorView,
                ),
            ),
            description=(
                "Sends a test message over this channel only. If its push service takes "
                "it, the channel is active again with no failures counted; otherwise it "
                "stays as it was. This is the only way a retired channel comes back."
            ),
        ),
        _verify_channel,
    ),
    (
        Operation(
            "DELETE",
            api_path(f"/me/channels/{_ID}"),
            "deleteChannel",
            "Remove a push channel",
            "owner",
            "owner",
            replies=(Reply(204, "Removed."),),
        ),
        _delete_channel,
    ),
)
