"""One-tap action links over the owner REST API (notifier; a push message's button -> here).

Part of :mod:`notifier.api`. A link carries its own credential, a signed token for one
action on one case (:mod:`notifier.links`): ``GET`` says what it will do (a browser gets
a small page whose button posts the link), ``POST`` does it once, making the same
request to the case machine as the matching owner route. :data:`ROUTES` is this
module's part of the route table.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from pydantic import BaseModel

from notifier.api.middleware import Route, api_path
from notifier.api.views import ActionLinkView
from notifier.api.words import (
    appointment_view,
    case_title,
    case_view,
    device_label,
    offer_view,
    rating_view,
)
from notifier.edge import ERROR_STATUS, ApiError, ErrorView, json_response, path_id
from notifier.errors import InvalidLinkError, UsedLinkError
from notifier.keys import ACTIONS_KEY, CLOCK_KEY, LINKS_KEY, STORE_KEY
from notifier.links import LinkGrant
from notifier.model import Case, Owner
from notifier.openapi import Operation, QueryParam, Reply

__all__ = ["ROUTES", "TAP_ACTIONS"]

_LOG = logging.getLogger(__name__)

_ID: Final = "{id}"

# -- one-tap action links ---------------------------------------------------------------------

#: The actions a one-tap link may carry -> what they do (``choose_slot:N`` books slot ``N``
#: of the offer, ``rate:N`` rates ``N`` of 5; the others take no number).
TAP_ACTIONS: Final[dict[str, str]] = {
    "accept_fix": "Yes, go ahead with the remote fix",
    "decline_fix": "No remote fix, thanks (a technician visit is offered instead)",
    "choose_slot": "Book visit time {n}",
    "other_times": "Ask for other visit times",
    "decline_visit": "No visit, thanks",
    "rate_good": "Rate it: it went well",
    "rate_bad": "Rate it: it did not go so well",
    "nothing_wrong": "Tell us nothing was wrong in the first place",
    "rate": "Rate it {n} of 5",
}
#: Stars of the rating buttons; "nothing was wrong" is neutral about the service itself
#: and hands the case to a person through its flag.
_TAP_STARS: Final[dict[str, int]] = {"rate_good": 5, "rate_bad": 2, "nothing_wrong": 3}
_NUMBERED: Final[dict[str, tuple[int, int]]] = {"choose_slot": (0, 99), "rate": (1, 5)}
_PAGE_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    # the link is the credential: it must not leak to another site as a referrer
    "Referrer-Policy": "no-referrer",
}
_PAGE_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;"
    "line-height:1.5}button{font-size:1.1rem;padding:.7rem 1.4rem}"
)


@dataclass(frozen=True, slots=True)
class _Tap:
    """A checked one-tap link: what it allows, on which case, for whom."""

    grant: LinkGrant
    name: str
    number: int | None
    case: Case
    owner: Owner


def _tap_action(action: str) -> tuple[str, int | None]:
    """Split ``choose_slot:1`` into its name and number (400 for anything unknown)."""
    name, sep, arg = action.partition(":")
    if name in _NUMBERED and sep and arg.isascii() and arg.isdigit() and len(arg) <= 2:
        low, high = _NUMBERED[name]
        if low <= int(arg) <= high:
            return name, int(arg)
    elif name in TAP_ACTIONS and name not in _NUMBERED and not sep:
        return name, None
    raise ApiError(400, "invalid_query", "action: not an action a link can carry", "action")


def _does(tap: _Tap) -> str:
    words = TAP_ACTIONS[tap.name]
    if tap.number is None:
        return words
    return words.format(n=tap.number + 1 if tap.name == "choose_slot" else tap.number)


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "").lower()


def _page(status: int, heading: str, text: str, *, button: str | None = None) -> web.Response:
    """A small page for a link opened in a browser (no script; a form posts the link)."""
    form = (
        ""
        if button is None
        else f'<form method="post"><button type="submit">{html.escape(button)}</button></form>'
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(heading)}</title><style>{_PAGE_STYLE}</style></head>"
        f"<body><h1>{html.escape(heading)}</h1><p>{html.escape(text)}</p>{form}</body></html>"
    )
    response = web.Response(text=body, status=status, content_type="text/html")
    response.headers.update(_PAGE_HEADERS)
    return response


def _error_page(exc: Exception) -> web.Response | None:
    """The page for an error a link can meet, or ``None`` to let the JSON answer it."""
    if isinstance(exc, ApiError):
        return _page(exc.status, "This link did not work", exc.message)
    for kind, status, _code in ERROR_STATUS:
        if isinstance(exc, kind):
            return _page(status, "This link did not work", str(exc) or "open the app instead")
    return None


async def _checked_tap(request: web.Request) -> _Tap:
    case_id = path_id(request)
    name, number = _tap_action(request.query.get("action", ""))
    links = request.app[LINKS_KEY]
    if links is None:
        raise InvalidLinkError("one-tap links are not taken here: open the app to answer")
    grant = links.verify(
        request.query.get("token", ""),
        case_id,
        request.query["action"],
        now=request.app[CLOCK_KEY](),
    )
    store = request.app[STORE_KEY]
    case = await store.get_case(case_id)
    owner = None if case is None else await store.get_owner(case.owner_id)
    if case is None or owner is None:
        raise ApiError(404, "not_found", f"there is no case {case_id}")
    return _Tap(grant, name, number, case, owner)


async def _get_tap(request: web.Request) -> web.Response:
    try:
        tap = await _checked_tap(request)
    except Exception as exc:
        page = _error_page(exc) if _wants_html(request) else None
        if page is None:
            raise
        return page
    title = case_title(tap.case, tap.owner.language)
    until = tap.grant.expires_at.strftime("%d %b %Y, %H:%M UTC")
    if _wants_html(request):
        text = f"Tap the button to confirm. This link works once, until {until}."
        return _page(200, title, text, button=_does(tap))
    view = ActionLinkView(
        case_id=tap.case.case_id,
        action=request.query["action"],
        title=title,
        does=_does(tap),
        expires_at=tap.grant.expires_at,
    )
    response = json_response(view)
    response.headers.update(_PAGE_HEADERS)
    return response


async def _perform_tap(request: web.Request, tap: _Tap) -> tuple[BaseModel, int]:
    """Use the link once and make the same request to the case machine as its route."""
    store, actions = request.app[STORE_KEY], request.app[ACTIONS_KEY]
    now = request.app[CLOCK_KEY]()
    if not await store.use_link(tap.grant.link_id, tap.grant.expires_at, now=now):
        raise UsedLinkError("this link was used already: open the app to see where things stand")
    owner_id, case_id, language = tap.owner.owner_id, tap.case.case_id, tap.owner.language
    _LOG.info("case %s: one-tap link %s used", case_id, tap.name)
    if tap.name in ("accept_fix", "decline_fix", "decline_visit"):
        answer = {
            "accept_fix": actions.accept_fix,
            "decline_fix": actions.decline_fix,
            "decline_visit": actions.decline_visit,
        }[tap.name]
        case = await answer(owner_id, case_id)
        return case_view(case, await device_label(store, case.device_id), language), 200
    if tap.name == "choose_slot":
        assert tap.number is not None
        booked = await actions.choose_slot(owner_id, case_id, tap.number)
        return await appointment_view(store, booked), 201
    if tap.name == "other_times":
        return await offer_view(store, await actions.request_other_slots(owner_id, case_id)), 200
    stars = tap.number if tap.name == "rate" else _TAP_STARS[tap.name]
    assert stars is not None
    rating = await actions.rate(
        owner_id, case_id, stars, None, nothing_wrong=tap.name == "nothing_wrong"
    )
    return rating_view(rating), 201


async def _post_tap(request: web.Request) -> web.Response:
    try:
        tap = await _checked_tap(request)
        view, status = await _perform_tap(request, tap)
    except Exception as exc:
        page = _error_page(exc) if _wants_html(request) else None
        if page is None:
            raise
        return page
    if _wants_html(request):
        text = "We have your answer. The app shows what happens next."
        return _page(status, "Thank you", text)
    response = json_response(view, status)
    response.headers.update(_PAGE_HEADERS)
    return response


# -- routes ---------------------------------------------------------------------------------

_TAP_ACTION_PATTERN: Final = (
    "^("
    + "|".join(sorted(name for name in TAP_ACTIONS if name not in _NUMBERED))
    + "|choose_slot:[0-9]{1,2}|rate:[1-5])$"
)
_TAP_QUERY: Final = (
    QueryParam(
        "action",
        "the action (`accept_fix`, `decline_fix`, `choose_slot:N`, `other_times`, "
        "`decline_visit`, `rate_good`, `rate_bad`, `nothing_wrong`, `rate:N`)",
        {"type": "string", "maxLength": 32, "pattern": _TAP_ACTION_PATTERN},
        required=True,
    ),
    QueryParam(
        "token",
        "the link's signed token: `{expires}.{nonce}.{mac}`",
        {"type": "string", "maxLength": 128},
        required=True,
    ),
)

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            api_path(f"/cases/{_ID}/tap"),
            "describeActionLink",
            "What a one-tap action link from a push message will do",
            "links",
            None,
            query=_TAP_QUERY,
            replies=(
                Reply(200, "What the link does (a browser: a page to confirm).", ActionLinkView),
                Reply(403, "The link is not valid (changed, or for another case).", ErrorView),
                Reply(410, "The link has expired.", ErrorView),
            ),
            description=(
                "The link is its own credential: no token is needed. Nothing changes here; "
                "a browser (``Accept: text/html``) gets a small page whose button posts the "
                "link."
            ),
        ),
        _get_tap,
    ),
    (
        Operation(
            "POST",
            api_path(f"/cases/{_ID}/tap"),
            "useActionLink",
            "Do what a one-tap action link from a push message says, once",
            "links",
            None,
            query=_TAP_QUERY,
            replies=(
                Reply(
                    200,
                    "Answered: the case (`accept_fix`, `decline_fix`, `decline_visit`) or the "
                    "new offer (`other_times`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/CaseView"},
                            {"$ref": "#/components/schemas/OfferView"},
                        ]
                    },
                ),
                Reply(
                    201,
                    "Booked (`choose_slot:N`) or rated (`rate_good`, `rate_bad`, "
                    "`nothing_wrong`, `rate:N`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/AppointmentView"},
                            {"$ref": "#/components/schemas/RatingView"},
                        ]
                    },
                ),
                Reply(403, "The link is not valid (changed, or for another case).", ErrorView),
                Reply(
                    409,
                    "The link was used already, or the case has moved on (for "
                    "`other_times`: the booked visit has started, is past or was completed, "
                    "or was moved too often; the message says which).",
                    ErrorView,
                ),
                Reply(410, "The link has expired.", ErrorView),
                Reply(422, "The action cannot be carried out (no such slot).", ErrorView),
            ),
            description=(
                "The same request to the case machine as the matching owner route "
                "(`answerFix`, `answerAppointment`, `rateCase`), authorised by the link's "
                "signed token instead of a bearer token: it allows that one action on that "
                "one case, once, until it expires. A browser (``Accept: text/html``) gets "
                "a page instead of JSON."
            ),
        ),
        _post_tap,
    ),
)
