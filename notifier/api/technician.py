"""The technician's visits over the owner REST API (notifier; technicians' apps -> here).

Part of :mod:`notifier.api`. A technician lists their booked and done visits in a
window of time (a moved or cancelled one is gone from the list) and marks one done;
another technician's visit answers 404. :data:`ROUTES` is this module's part of the
route table.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from notifier.api.bodies import CompleteVisitRequest
from notifier.api.middleware import Route, api_path
from notifier.api.views import VisitList, VisitView
from notifier.api.words import visit_view
from notifier.edge import ApiError, ErrorView, authenticate, json_response, path_id, read_body
from notifier.keys import ACTIONS_KEY, CLOCK_KEY, STORE_KEY
from notifier.openapi import Operation, QueryParam, Reply

__all__ = ["ROUTES"]

#: Longest span of visits one request may list.
_MAX_VISIT_SPAN: Final = timedelta(days=92)
_ID: Final = "{id}"

# -- request helpers ------------------------------------------------------------------------


#: What OpenAPI's ``date-time`` format means (RFC 3339 section 5.6), nothing looser.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _query_time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    if _RFC3339.fullmatch(text) is None:
        message = f"{name}: must be an RFC 3339 time like 2025-03-01T08:00:00Z"
        raise ApiError(400, "invalid_query", message, name)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        message = f"{name}: must be an ISO 8601 time like 2025-03-01T08:00:00Z"
        raise ApiError(400, "invalid_query", message, name) from exc
    if value.tzinfo is None:
        message = f"{name}: must say its time zone (Z or +01:00)"
        raise ApiError(400, "invalid_query", message, name)
    return value.astimezone(UTC)


# -- technician handlers --------------------------------------------------------------------


async def _list_visits(request: web.Request) -> web.Response:
    caller = await authenticate(request, "technician")
    now = request.app[CLOCK_KEY]()
    since = _query_time(request, "from") or now - timedelta(days=7)
    until = _query_time(request, "to") or since + timedelta(days=30)
    # well-formed times that make no window are a 422, like any other sound request
    # that cannot be done (the document cannot say "after from")
    if until <= since:
        raise ApiError(422, "invalid_range", "to: must be after from", "to")
    if until - since > _MAX_VISIT_SPAN:
        message = f"to: at most {_MAX_VISIT_SPAN.days} days after from"
        raise ApiError(422, "invalid_range", message, "to")
    store = request.app[STORE_KEY]
    visits = await store.appointments(
        technician_id=caller.principal_id,
        states=["booked", "done"],  # a moved or cancelled visit is no longer the technician's
        since=since,
        until=until,
    )
    views = [visit_view(visit, await store.get_case(visit.case_id)) for visit in visits]
    return json_response(VisitList(visits=views))


async def _complete_visit(request: web.Request) -> web.Response:
    caller = await authenticate(request, "technician")
    appointment_id = path_id(request)
    store = request.app[STORE_KEY]
    visit = await store.get_appointment(appointment_id)
    if visit is None or visit.technician_id != caller.principal_id or visit.state == "proposed":
        raise ApiError(404, "not_found", f"there is no visit {appointment_id}")
    body = await read_body(request, CompleteVisitRequest)
    note = None if body.note is None else body.note.strip() or None
    done = await request.app[ACTIONS_KEY].complete_visit(caller.principal_id, appointment_id, note)
    return json_response(visit_view(done, await store.get_case(done.case_id)))


# -- routes ---------------------------------------------------------------------------------

_VISIT_TIME: Final[dict[str, Any]] = {"type": "string", "format": "date-time"}

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            api_path("/technician/visits"),
            "listVisits",
            "The technician's visits",
            "technician",
            "technician",
            query=(
                QueryParam("from", "earliest start (default: a week ago)", _VISIT_TIME),
                QueryParam("to", "latest start (default: 30 days after from)", _VISIT_TIME),
            ),
            replies=(
                Reply(200, "The visits, by start.", VisitList),
                Reply(
                    422,
                    "`to` is not after `from`, or more than 62 days after it.",
                    ErrorView,
                ),
            ),
        ),
        _list_visits,
    ),
    (
        Operation(
            "POST",
            api_path(f"/technician/visits/{_ID}/complete"),
            "completeVisit",
            "Mark a visit done",
            "technician",
            "technician",
            body=CompleteVisitRequest,
            replies=(Reply(200, "The visit.", VisitView),),
        ),
        _complete_visit,
    ),
)
