"""Owners, technicians, API tokens and sign-ins over the owner API, for the ops role (notifier).

Part of :mod:`notifier.admin` (ops -> here -> the case store): invite an owner (a
one-time code their app exchanges for a token), link or unlink the identity provider's
sign-ins that act as an owner, add a technician, issue and revoke API tokens.
:data:`ROUTES` is this module's part of the route table.
"""

from __future__ import annotations

import logging
import re
from datetime import time
from typing import Final, Literal

from aiohttp import web

from notifier.admin.bodies import (
    ISSUER_PATTERN,
    SUBJECT_PATTERN,
    OwnerInviteRequest,
    SubjectRequest,
    TechnicianRequest,
    TokenRequest,
)
from notifier.admin.onboarding import onboarding_of, ops_actor
from notifier.admin.views import InviteView, SubjectList, SubjectView, TechnicianView, TokenView
from notifier.api.middleware import Handler, Route, api_path
from notifier.edge import ApiError, ErrorView, json_response, path_id, read_body, zones
from notifier.errors import NotFoundError
from notifier.keys import CLOCK_KEY, OIDC_KEY, STORE_KEY
from notifier.model import Owner, Technician, Window
from notifier.openapi import Operation, QueryParam, Reply
from notifier.registry import new_token, token_id

__all__ = ["ROUTES"]

_LOG = logging.getLogger(__name__)

_ID: Final = "{id}"


async def _invite_owner(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    body = await read_body(request, OwnerInviteRequest)
    if body.timezone is not None and body.timezone not in zones():
        message = f"timezone: {body.timezone!r} is not an IANA time zone (like Europe/Berlin)"
        raise ApiError(422, "invalid_request", message, "timezone")
    onboarding = onboarding_of(request)
    owner = Owner(
        owner_id=f"o-{new_token()[:16]}",
        name=body.name,
        language=body.language or "en",
        timezone=body.timezone or "UTC",
        region=body.region or "default",
        consent=body.consent or "ask_if_interrupting",
    )
    await request.app[STORE_KEY].put_owner(owner)
    invite = new_token()
    expires_at = request.app[CLOCK_KEY]() + onboarding.invite_ttl
    await onboarding.registry.add_invite(invite, owner.owner_id, expires_at)
    _LOG.info("owner %s invited by %s", owner.owner_id, actor)
    return json_response(
        InviteView(owner_id=owner.owner_id, invite=invite, expires_at=expires_at), 201
    )


_WORKDAY: Final = tuple(Window(day, time(8, 0), time(17, 0)) for day in range(5))


async def _add_technician(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    body = await read_body(request, TechnicianRequest)
    if body.timezone is not None and body.timezone not in zones():
        message = f"timezone: {body.timezone!r} is not an IANA time zone (like Europe/Berlin)"
        raise ApiError(422, "invalid_request", message, "timezone")
    hours: tuple[Window, ...] = _WORKDAY
    if body.hours is not None:
        windows = [
            Window(h.weekday, time.fromisoformat(h.start), time.fromisoformat(h.end))
            for h in body.hours
        ]
        if any(w.end <= w.start for w in windows):
            message = "hours: each window ends after it starts (and not past midnight)"
            raise ApiError(422, "invalid_request", message, "hours")
        hours = tuple(windows)
    technician = Technician(
        technician_id=body.technician_id or f"t-{new_token()[:16]}",
        name=body.name,
        region=body.region,
        skills=frozenset(body.skills),
        timezone=body.timezone or "UTC",
        hours=hours,
    )
    store = request.app[STORE_KEY]
    await store.put_technician(technician)
    token = None
    if body.issue_token:
        token = new_token()
        await store.add_token(token, ("technician", technician.technician_id))
    _LOG.info("technician %s added by %s", technician.technician_id, actor)
    return json_response(
        TechnicianView(
            technician_id=technician.technician_id,
            name=technician.name,
            region=technician.region,
            skills=sorted(technician.skills),
            token=token,
            token_id=None if token is None else token_id(token),
        ),
        201,
    )


async def _issue_token(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    body = await read_body(request, TokenRequest)
    store = request.app[STORE_KEY]
    if body.role == "owner" and await store.get_owner(body.principal_id) is None:
        raise ApiError(404, "not_found", f"there is no owner {body.principal_id}")
    if body.role == "technician" and await store.get_technician(body.principal_id) is None:
        raise ApiError(404, "not_found", f"there is no technician {body.principal_id}")
    token = new_token()
    await store.add_token(token, (body.role, body.principal_id))
    _LOG.info("a %s token issued by %s", body.role, actor)
    return json_response(
        TokenView(
            token=token, token_id=token_id(token), role=body.role, principal_id=body.principal_id
        ),
        201,
    )


async def _revoke_token(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    wanted = path_id(request)
    try:
        kind, _ = await onboarding_of(request).registry.revoke_token(wanted)
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    _LOG.info("a %s token revoked by %s", kind, actor)
    return web.Response(status=204)


async def _subject_owner(request: web.Request) -> tuple[str, str]:
    """The ops caller and the owner whose sign-ins a subjects route is about (404: none)."""
    actor = await ops_actor(request)
    owner_id = path_id(request)
    if await request.app[STORE_KEY].get_owner(owner_id) is None:
        raise ApiError(404, "not_found", f"there is no owner {owner_id}")
    return actor, owner_id


def _issuer(request: web.Request, given: str | None) -> str:
    """The issuer a link is for: the one given, else the configured provider's."""
    if given is not None:
        return given
    oidc = request.app[OIDC_KEY]
    if oidc is None:
        message = "issuer: name the provider (no identity provider is configured here)"
        raise ApiError(422, "invalid_request", message, "issuer")
    return oidc.issuer


async def _list_subjects(request: web.Request) -> web.Response:
    _, owner_id = await _subject_owner(request)
    found = await request.app[STORE_KEY].subjects_of(owner_id)
    views = [SubjectView(owner_id=owner_id, issuer=i, subject=s) for i, s in found]
    return json_response(SubjectList(owner_id=owner_id, subjects=views))


async def _link_subject(request: web.Request) -> web.Response:
    actor, owner_id = await _subject_owner(request)
    body = await read_body(request, SubjectRequest)
    issuer = _issuer(request, body.issuer)
    # ConflictError (the subject is another owner's) answers 409 through the edge
    await request.app[STORE_KEY].link_subject(issuer, body.subject, owner_id)
    # the subject itself is the provider's identifier of a person: not logged
    _LOG.info("an identity-provider sign-in linked to owner %s by %s", owner_id, actor)
    return json_response(SubjectView(owner_id=owner_id, issuer=issuer, subject=body.subject), 201)


async def _unlink_subject(request: web.Request) -> web.Response:
    actor, owner_id = await _subject_owner(request)
    subject = request.query.get("subject")
    if subject is None or not re.fullmatch(SUBJECT_PATTERN, subject):
        raise ApiError(400, "invalid_query", "subject: the provider's sub is needed", "subject")
    given = request.query.get("issuer")
    if given is not None and not re.fullmatch(ISSUER_PATTERN, given):
        raise ApiError(400, "invalid_query", "issuer: must be the provider's URL", "issuer")
    issuer = _issuer(request, given)
    if not await request.app[STORE_KEY].unlink_subject(issuer, subject, owner_id):
        raise ApiError(404, "not_found", f"that sign-in is not linked to owner {owner_id}")
    _LOG.info("an identity-provider sign-in unlinked from owner %s by %s", owner_id, actor)
    return web.Response(status=204)


# -- routes ---------------------------------------------------------------------------------

#: Where an owner's linked identity-provider sign-ins are.
_SUBJECTS: Final = f"/admin/owners/{_ID}/subjects"
_NO_OWNER: Final = Reply(404, "No such owner.", ErrorView)
_NO_ISSUER: Final = Reply(422, "No issuer given and no identity provider configured.", ErrorView)


def _subjects_route(
    method: Literal["GET", "POST", "DELETE"],
    operation_id: str,
    summary: str,
    handler: Handler,
    *,
    replies: tuple[Reply, ...],
    body: type[SubjectRequest] | None = None,
    query: tuple[QueryParam, ...] = (),
    description: str = "",
) -> Route:
    """A route of an owner's linked sign-ins: ``/admin/owners/{id}/subjects``, ops only."""
    operation = Operation(
        method,
        api_path(_SUBJECTS),
        operation_id,
        summary,
        "admin",
        "ops",
        body=body,
        query=query,
        replies=replies,
        description=description,
    )
    return operation, handler


ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "POST",
            api_path("/admin/owners"),
            "inviteOwner",
            "Create an owner and a one-time invite for their app",
            "admin",
            "ops",
            body=OwnerInviteRequest,
            replies=(Reply(201, "The owner and the invite (shown once).", InviteView),),
        ),
        _invite_owner,
    ),
    _subjects_route(
        "GET",
        "listOwnerSubjects",
        "The identity-provider sign-ins linked to an owner",
        _list_subjects,
        replies=(Reply(200, "The linked subjects.", SubjectList), _NO_OWNER),
    ),
    _subjects_route(
        "POST",
        "linkOwnerSubject",
        "Link a person of the identity provider (its subject) to an owner",
        _link_subject,
        body=SubjectRequest,
        replies=(
            Reply(201, "Linked (linking it again changes nothing).", SubjectView),
            _NO_OWNER,
            Reply(409, "The subject stands for another owner already.", ErrorView),
            _NO_ISSUER,
        ),
        description=(
            "From then on the provider's access tokens of that subject act as this "
            "owner (`[notifier.oidc]`); an owner may have several."
        ),
    ),
    _subjects_route(
        "DELETE",
        "unlinkOwnerSubject",
        "Unlink a person of the identity provider from an owner",
        _unlink_subject,
        query=(
            QueryParam(
                "subject",
                "the provider's `sub`",
                {"type": "string", "pattern": SUBJECT_PATTERN},
                required=True,
            ),
            QueryParam(
                "issuer",
                "the provider (default: the one configured here)",
                {"type": "string", "pattern": ISSUER_PATTERN},
            ),
        ),
        replies=(
            Reply(204, "Unlinked: its tokens no longer act as the owner."),
            Reply(404, "No such owner, or the subject is not linked to them.", ErrorView),
            _NO_ISSUER,
        ),
    ),
    (
        Operation(
            "POST",
            api_path("/admin/technicians"),
            "addTechnician",
            "Add (or change) a technician, with an API token",
            "admin",
            "ops",
            body=TechnicianRequest,
            replies=(Reply(201, "The technician (and the token, shown once).", TechnicianView),),
        ),
        _add_technician,
    ),
    (
        Operation(
            "POST",
            api_path("/admin/tokens"),
            "issueToken",
            "Issue an API token for an owner, a technician or an ops person",
            "admin",
            "ops",
            body=TokenRequest,
            replies=(
                Reply(201, "The token (shown once) and its id.", TokenView),
                Reply(404, "No such owner or technician.", ErrorView),
            ),
        ),
        _issue_token,
    ),
    (
        Operation(
            "DELETE",
            api_path(f"/admin/tokens/{_ID}"),
            "revokeToken",
            "Revoke an API token by its id",
            "admin",
            "ops",
            replies=(Reply(204, "Revoked: it no longer works."),),
        ),
        _revoke_token,
    ),
)
