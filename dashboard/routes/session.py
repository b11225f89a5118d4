"""The ops dashboard's page, login, logout and session routes (dashboard).

Logins are throttled per source and per account before the password is checked and
audited; the session lives in a cookie with a CSRF token beside it.
"""

from __future__ import annotations

import hmac
import logging
import math
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from yarl import URL

from dashboard.auth import (
    OpsUser,
    Session,
    check_login,
)
from dashboard.keys import (
    CLOCK_KEY,
    LIMITER_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    STORE_KEY,
    STREAMS_KEY,
    USERS_KEY,
)
from dashboard.middleware import COOKIE_NAME, Handler, send_error, send_json, session_of
from dashboard.views import iso
from notifier.model import AuditEntry
from wire.errors import PermanentError, TransientError

__all__ = ["ROUTES", "STATIC_DIR", "index", "log_in", "log_out", "root"]

_LOG = logging.getLogger(__name__)


STATIC_DIR: Final = Path(__file__).parent.parent / "static"


class _Login(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


async def root(request: web.Request) -> web.StreamResponse:
    """``GET /ops``: to the page."""
    raise web.HTTPFound("/ops/")


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /ops/``: the page."""
    response = web.FileResponse(STATIC_DIR / "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


def _client(request: web.Request) -> str:
    """The client's address: the peer, or what trusted proxies say it is.

    ``X-Forwarded-For`` is believed only when the peer is a trusted proxy, and then
    read from the right (the hop the nearest proxy saw) past every trusted proxy, so a
    client cannot choose its address by sending the header itself.
    """
    peer = request.remote or "unknown"
    proxies = request.app[SETTINGS_KEY].trusted_proxies
    if not proxies:
        return peer
    try:
        hop: IPv4Address | IPv6Address = ip_address(peer)
    except ValueError:
        return peer
    hops = [
        part.strip()
        for header in request.headers.getall("X-Forwarded-For", ())
        for part in header.split(",")
    ]
    client = hop
    while any(client in network for network in proxies) and hops:
        try:
            client = ip_address(hops.pop())
        except ValueError:
            break
    return str(client)


def _same_origin(request: web.Request) -> bool:
    """Whether a login comes from the dashboard's own page (or sends no ``Origin``).

    Its own page is where it is served, or its ``public_url`` (behind a TLS-terminating
    proxy the browser's origin is ``https://...`` while the request arrives as HTTP).
    """
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    url = URL(origin)
    if url.host is None:
        return False
    if f"{url.host}:{url.port}" == f"{request.url.host}:{request.url.port}":
        return True
    public = request.app[SETTINGS_KEY].public_url
    return public is not None and (url.scheme, url.host, url.port) == (
        public.scheme,
        public.host,
        public.port,
    )


async def log_in(request: web.Request) -> web.StreamResponse:
    """``POST /ops/login``: check a user name and password (throttled), start a session."""
    if not _same_origin(request):
        return send_error(403, "cross-site login refused")
    form = request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
    if form:
        data = await request.post()
        raw: dict[str, Any] = {k: data.get(k) for k in ("username", "password")}
    else:
        try:
            loaded = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return send_error(400, "send the user name and password as a form or JSON")
        raw = loaded if isinstance(loaded, dict) else {}
    try:
        login = _Login.model_validate(raw)
    except ValidationError:
        return send_error(400, "send a user name and a password")
    limiter, source = request.app[LIMITER_KEY], _client(request)
    # counted before the password is checked, with no await in between
    wait_s = limiter.begin(login.username, source)
    if wait_s > 0:
        await _audit_login(request, "login_throttled", login.username, source, wait_s)
        retry_s = max(1, math.ceil(wait_s))
        return web.Response(
            body=orjson.dumps(
                {
                    "error": f"too many failed logins; try again in {retry_s} s",
                    "retry_after_s": retry_s,
                }
            ),
            status=429,
            content_type="application/json",
            headers={"Retry-After": str(retry_s)},
        )
    user = await check_login(request.app[USERS_KEY], login.username, login.password)
    if user is None:
        await _audit_login(request, "login_failed", login.username, source)
        return send_error(401, "wrong user name or password")
    limiter.succeeded(login.username, source)
    await _audit_login(request, "login", user.username, source)
    session_id, session = request.app[SESSIONS_KEY].create(user)
    response: web.StreamResponse
    if form:
        response = web.Response(status=303, headers={"Location": "/ops/"})
    else:
        response = send_json(_session_json(session, user))
    response.set_cookie(COOKIE_NAME, session_id, **_cookie_attributes(request))
    return response


def _cookie_attributes(request: web.Request) -> dict[str, Any]:
    """The session cookie's attributes (the same when it is set and when it is deleted).

    ``SameSite=Strict`` breaks no flow here: a link into the dashboard from another site
    arrives without the cookie, but it only loads the page, whose own API requests are
    same-site and carry it. ``Secure`` whenever the dashboard is reached over HTTPS
    (:meth:`DashboardSettings.secure_cookie`).
    """
    secure = request.app[SETTINGS_KEY].secure_cookie(over_tls=request.secure)
    return {"path": "/ops", "httponly": True, "samesite": "Strict", "secure": secure}


_LOGIN_REASONS: Final = {
    "login": "ops user logged in",
    "login_failed": "wrong user name or password",
    "login_throttled": "refused without checking the password: too many failed logins",
}


async def _audit_login(
    request: web.Request,
    action: Literal["login", "login_failed", "login_throttled"],
    username: str,
    source: str,
    retry_after_s: float | None = None,
) -> None:
    """Record a login, a failed one or a refused one in the audit trail (and the log).

    The user name is kept only if such a user exists: a password typed into the name
    field must not end up in the trail. If the store cannot take the entry, the log
    line (``security event``) still has it and the login is answered as usual.
    """
    known = await request.app[USERS_KEY].get_user(username) is not None
    evidence: dict[str, Any] = {"user": username if known else None, "source": source}
    if retry_after_s is not None:
        evidence["retry_after_s"] = round(retry_after_s, 1)
    log = _LOG.info if action == "login" else _LOG.warning
    log(
        "security event %s: user %s from %s",
        action,
        username if known else "(unknown)",
        source,
    )
    try:
        await request.app[STORE_KEY].add_audit(
            AuditEntry(
                case_id=None,
                at=request.app[CLOCK_KEY](),
                actor="ops",
                action=action,
                reason=_LOGIN_REASONS[action],
                evidence=evidence,
            )
        )
    except (TransientError, PermanentError, OSError):
        _LOG.exception("security event %s from %s not kept in the audit trail", action, source)


def _session_json(session: Session, user: OpsUser | None = None) -> dict[str, Any]:
    return {
        "username": session.username,
        "name": (user.name if user is not None and user.name else session.username),
        "role": session.role,
        "csrf_token": session.csrf_token,
        "expires_at": iso(session.expires_at),
    }


async def log_out(request: web.Request) -> web.StreamResponse:
    """``POST /ops/logout``: end the session (its live streams end too)."""
    session_id = request.cookies.get(COOKIE_NAME)
    if session_id:
        request.app[SESSIONS_KEY].end(session_id)
        # the session's live streams end now, not at their next heartbeat
        for subscription, stream_session in tuple(request.app[STREAMS_KEY].items()):
            if hmac.compare_digest(stream_session.encode(), session_id.encode()):
                subscription.close()
    response = send_json({"ok": True})
    response.del_cookie(COOKIE_NAME, **_cookie_attributes(request))
    return response


async def _whoami(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    user = await request.app[USERS_KEY].get_user(session.username)
    return send_json(_session_json(session, user))


async def _ping(request: web.Request) -> web.StreamResponse:
    session_of(request)
    return send_json({"ok": True})


#: This module's part of the JSON API: method, path, handler (each checks its role).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/ops/api/session", _whoami),
    ("GET", "/ops/api/ping", _ping),
)
