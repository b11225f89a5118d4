"""The owner's devices and cases over the owner REST API, and the owner's answers.

Part of :mod:`notifier.api` (owners' apps -> here -> the case machine). Devices with
their health in plain words; cases with their history; the answers the loop waits for
(agree to a remote fix, choose a visit time, move or cancel a booked visit, rate the
outcome) go to :class:`~notifier.actions.CaseActions`. Another owner's device or case
answers 404, like one that does not exist. :data:`ROUTES` is this module's part of the
route table; :func:`device_views` is shared with the registry's routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

from aiohttp import web

from notifier.actions import HealthPoint
from notifier.api.bodies import AppointmentChoice, FixChoice, RatingRequest
from notifier.api.middleware import Route, api_path
from notifier.api.views import (
    AppointmentView,
    CaseDetailView,
    CaseList,
    CaseView,
    DeviceList,
    DeviceView,
    OfferView,
    RatingView,
)
from notifier.api.words import (
    appointment_view,
    case_history,
    case_view,
    device_label,
    health_word,
    offer_view,
    rating_view,
)
from notifier.edge import (
    ApiError,
    ErrorView,
    authenticate,
    json_response,
    owner_of,
    path_id,
    read_body,
)
from notifier.keys import ACTIONS_KEY, HEALTH_KEY, STORE_KEY
from notifier.model import CLOSED_STATES, OPEN_STATES, Appointment, Case, DeviceRecord
from notifier.openapi import Operation, QueryParam, Reply
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError

__all__ = ["ROUTES", "device_views"]

_LOG = logging.getLogger(__name__)

#: How long the device list waits for stored health before showing it as unknown.
_HEALTH_TIMEOUT_S: Final = 5.0
_ID: Final = "{id}"


async def _own_case(store: CaseStore, owner_id: str, case_id: str) -> Case:
    case = await store.get_case(case_id)
    if case is None or case.owner_id != owner_id:
        raise ApiError(404, "not_found", f"there is no case {case_id}")
    return case


async def device_views(
    request: web.Request, devices: Sequence[DeviceRecord], owner_id: str
) -> list[DeviceView]:
    """The owner's view of their devices: health in plain words and open cases."""
    store = request.app[STORE_KEY]
    open_cases: dict[str, list[Case]] = {}
    for case in await store.cases(owner_id=owner_id, states=sorted(OPEN_STATES)):
        open_cases.setdefault(case.device_id, []).append(case)
    latest: dict[str, HealthPoint] = {}
    if devices:
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                latest = await request.app[HEALTH_KEY].latest([d.device_id for d in devices])
        except (TransientError, PermanentError, TimeoutError) as exc:
            # cases still say what is wrong; only the readings are missing for now (also
            # when InfluxDB refuses the query, e.g. before the gateway made its database)
            _LOG.warning("device health unavailable for the device list: %s", exc)
    return [
        DeviceView(
            device_id=device.device_id,
            label=device.label,
            model=device.model,
            firmware=device.firmware,
            health=health_word(latest.get(device.device_id), open_cases.get(device.device_id, [])),
            open_cases=[case.case_id for case in open_cases.get(device.device_id, [])],
        )
        for device in devices
    ]


async def _list_devices(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    devices = await request.app[STORE_KEY].devices(owner.owner_id)
    return json_response(DeviceList(devices=await device_views(request, devices, owner.owner_id)))


async def _get_device(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    device_id = path_id(request)
    device = await request.app[STORE_KEY].get_device(device_id)
    if device is None or device.owner_id != owner.owner_id:
        raise ApiError(404, "not_found", f"there is no device {device_id}")
    (view,) = await device_views(request, [device], owner.owner_id)
    return json_response(view)


async def _list_cases(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    which = request.query.get("state")
    states: list[str] | None
    if which is None:
        states = None
    elif which == "open":
        states = sorted(OPEN_STATES)
    elif which == "closed":
        states = sorted(CLOSED_STATES)
    else:
        raise ApiError(400, "invalid_query", "state: must be open or closed", "state")
    store = request.app[STORE_KEY]
    cases = await store.cases(owner_id=owner.owner_id, states=states)
    labels = {device.device_id: device.label for device in await store.devices(owner.owner_id)}
    views = [case_view(case, labels.get(case.device_id), owner.language) for case in cases]
    return json_response(CaseList(cases=views))


async def _get_case(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    view = case_view(case, await device_label(store, case.device_id), owner.language)
    history = case_history(await store.audit(case.case_id), owner)
    return json_response(CaseDetailView(**view.model_dump(), history=history))


async def _post_fix(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    choice = await read_body(request, FixChoice)
    actions = request.app[ACTIONS_KEY]
    if choice.accept:
        case = await actions.accept_fix(owner.owner_id, case.case_id)
    else:
        case = await actions.decline_fix(owner.owner_id, case.case_id)
    return json_response(case_view(case, await device_label(store, case.device_id), owner.language))


async def _current_proposal(store: CaseStore, case: Case) -> Appointment | None:
    proposals = await store.appointments(case_id=case.case_id, states=["proposed"])
    for proposal in proposals:
        if proposal.appointment_id == case.appointment_id:
            return proposal
    return proposals[-1] if proposals else None


async def _get_slots(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    return json_response(await offer_view(store, await _current_proposal(store, case)))


async def _post_appointment(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    choice = await read_body(request, AppointmentChoice)
    actions = request.app[ACTIONS_KEY]
    if choice.slot is not None:
        booked = await actions.choose_slot(owner.owner_id, case.case_id, choice.slot)
        return json_response(await appointment_view(store, booked), 201)
    if choice.other_times:
        proposal = await actions.request_other_slots(owner.owner_id, case.case_id)
        return json_response(await offer_view(store, proposal))
    case = await actions.decline_visit(owner.owner_id, case.case_id)
    return json_response(case_view(case, await device_label(store, case.device_id), owner.language))


async def _post_rating(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    body = await read_body(request, RatingRequest)
    comment = None if body.comment is None else body.comment.strip() or None
    rating = await request.app[ACTIONS_KEY].rate(
        owner.owner_id, case.case_id, body.stars, comment, nothing_wrong=body.nothing_wrong
    )
    return json_response(rating_view(rating), 201)


# -- routes ---------------------------------------------------------------------------------

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            api_path("/devices"),
            "listDevices",
            "The owner's devices and how they are doing",
            "owner",
            "owner",
            replies=(Reply(200, "The devices.", DeviceList),),
        ),
        _list_devices,
    ),
    (
        Operation(
            "GET",
            api_path(f"/devices/{_ID}"),
            "getDevice",
            "One device and how it is doing",
            "owner",
            "owner",
            replies=(Reply(200, "The device.", DeviceView),),
        ),
        _get_device,
    ),
    (
        Operation(
            "GET",
            api_path("/cases"),
            "listCases",
            "The owner's cases, newest first",
            "owner",
            "owner",
            query=(
                QueryParam(
                    "state",
                    "only open or only closed cases",
                    {"type": "string", "enum": ["open", "closed"]},
                ),
            ),
            replies=(Reply(200, "The cases.", CaseList),),
        ),
        _list_cases,
    ),
    (
        Operation(
            "GET",
            api_path(f"/cases/{_ID}"),
            "getCase",
            "One case with its history in plain words",
            "owner",
            "owner",
            replies=(Reply(200, "The case.", CaseDetailView),),
        ),
        _get_case,
    ),
    (
        Operation(
            "POST",
            api_path(f"/cases/{_ID}/fix"),
            "answerFix",
            "Agree to (or decline) the remote fix the case waits for",
            "owner",
            "owner",
            body=FixChoice,
            replies=(Reply(200, "The case after the answer.", CaseView),),
        ),
        _post_fix,
    ),
    (
        Operation(
            "GET",
            api_path(f"/cases/{_ID}/slots"),
            "listSlots",
            "The visit times on offer",
            "owner",
            "owner",
            replies=(Reply(200, "The offer (empty when nothing is on offer).", OfferView),),
        ),
        _get_slots,
    ),
    (
        Operation(
            "POST",
            api_path(f"/cases/{_ID}/appointment"),
            "answerAppointment",
            "Choose a visit time, ask for other times, or decline the visit",
            "owner",
            "owner",
            body=AppointmentChoice,
            replies=(
                Reply(201, "Booked (for `slot`).", AppointmentView),
                Reply(
                    200,
                    "The new offer (`other_times`) or the case (`decline`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/OfferView"},
                            {"$ref": "#/components/schemas/CaseView"},
                        ]
                    },
                ),
                Reply(
                    409,
                    "Nothing is on offer or booked; the booked visit has started, is past or "
                    "was completed; no other time is free; or the visit was moved too often "
                    "(a person takes over). The message says which.",
                    ErrorView,
                ),
            ),
            description=(
                "Before a visit is booked: choose one of the offered times, ask for others, "
                "or decline. After booking and until the visit starts: `other_times` moves "
                "it (its time is freed for others at once and new times are offered; after "
                "a few moves a person calls the owner instead) and `decline` cancels it."
            ),
        ),
        _post_appointment,
    ),
    (
        Operation(
            "POST",
            api_path(f"/cases/{_ID}/rating"),
            "rateCase",
            "Rate how a resolved case went",
            "owner",
            "owner",
            body=RatingRequest,
            replies=(Reply(201, "The stored rating.", RatingView),),
        ),
        _post_rating,
    ),
)
