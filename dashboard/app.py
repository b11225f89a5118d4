"""The manufacturer's ops web app: JSON API, live stream and page (dashboard; last stage).

:func:`create_app` builds an :class:`aiohttp.web.Application` from what the composition
root hands it: the case store, an InfluxDB client, the ops users, a live
:class:`~dashboard.feed.CaseFeed` and a :class:`~dashboard.ops.CampaignStarter`.
Everything lives under ``/ops``:

* ``/ops/`` the page (``static/index.html``, plain ES modules, uPlot vendored);
* ``/ops/login`` and ``/ops/logout``;
* ``/ops/api/...`` the JSON API the page uses (see :data:`ROUTES` below for the list);
* ``/ops/api/events`` server-sent events with every case change, for as long as the
  session lives (the stream itself never extends it);
* ``/ops/api/charts/<name>`` each chart's data as JSON, and as CSV with ``.csv`` or
  ``?format=csv`` (:mod:`dashboard.charts`).

Handlers parse, read and answer JSON; the only writes are the ops changes of
:mod:`dashboard.ops` (take over, write to the owner, close) and campaigns. Every
``/ops/api`` request needs a session; every state change also needs the session's CSRF
token in ``X-CSRF-Token``. Owners appear only by name, only on a case's page, and only
for agents and admins; their contacts and push channels are never read except to mask
them out of audit evidence.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from yarl import URL

from dashboard import charts, influxql, ops, stats
from dashboard.auth import (
    LoginLimiter,
    MappingUsers,
    OpsUser,
    Role,
    Session,
    SessionStore,
    UserStore,
    check_login,
    has_role,
)
from dashboard.feed import CaseFeed
from dashboard.fleet import LEVELS, FleetCache, FleetHealth, Snapshot, fleet_health, overview
from dashboard.history import STEP_S, HealthHistory, bucketed
from dashboard.keys import (
    ACTIONS_KEY,
    CACHE_KEY,
    CAMPAIGN_KEY,
    CLOCK_KEY,
    FEED_KEY,
    HISTORY_KEY,
    INFLUX_KEY,
    LIMITER_KEY,
    MEASUREMENTS_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    STORE_KEY,
    STREAMS_KEY,
    USERS_KEY,
)
from dashboard.settings import DashboardSettings
from notifier.actions import CaseActions
from notifier.edge import MAPPED_ERRORS, ApiError, error_status, read_body
from notifier.errors import (
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from notifier.model import OPEN_STATES, TRANSITIONS, AuditEntry, Case
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError
from wire.influx import InfluxClient

__all__ = ["COOKIE_NAME", "CSRF_HEADER", "create_app"]

_LOG = logging.getLogger(__name__)

#: The session cookie.
COOKIE_NAME: Final = "fixloop_ops"
#: The header that carries the session's CSRF token on state changes.
CSRF_HEADER: Final = "X-CSRF-Token"

STATIC_DIR: Final = Path(__file__).parent / "static"
_SAFE_METHODS: Final = frozenset(("GET", "HEAD", "OPTIONS"))
_SESSION_KEY: Final = web.RequestKey("ops_session", Session)
_RANGES: Final = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
_STAGES: Final = tuple(TRANSITIONS)
_CLOSED_PER_STAGE: Final = 50
_NAME: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_TEXT_LIMIT: Final = 4096
# Evidence keys that could hold an owner's contacts; their values never reach the page.
_CONTACT_KEYS: Final = frozenset(
    ("target", "token", "keys", "endpoint", "p256dh", "auth", "secret", "email", "phone",
     "address", "url", "channel", "channels")
)  # fmt: skip
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- JSON ------------------------------------------------------------------------------


def _json(data: Any, *, status: int = 200) -> web.Response:
    return _json_body(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status)


def _json_body(body: bytes, *, status: int = 200) -> web.Response:
    return web.Response(
        body=body,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _case_json(case: Case) -> dict[str, Any]:
    """A case for the page: no owner id, nothing of the owner."""
    return {
        "case_id": case.case_id,
        "device_id": case.device_id,
        "model": case.model,
        "fault": case.fault,
        "state": case.state,
        "open": case.is_open,
        "urgency": case.urgency,
        "opened_at": _iso(case.opened_at),
        "updated_at": _iso(case.updated_at),
        "confidence": round(case.confidence, 3),
        "failure_at": _iso(case.failure_at),
        "remedies": list(case.remedies),
        "tried": list(case.tried),
        "pending_action": case.pending_action,
        "fix_at": _iso(case.fix_at),
        "appointment_id": case.appointment_id,
        "needs_person": case.needs_person,
        "rating": case.rating,
        "evidence": list(case.evidence),
    }


def _mask(value: Any, secrets: Sequence[str]) -> Any:
    """Evidence with contact-like keys dropped and any known secret text masked."""
    if isinstance(value, Mapping):
        return {
            str(k): ("[hidden]" if str(k).lower() in _CONTACT_KEYS else _mask(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret and secret in value:
                value = value.replace(secret, "[hidden]")
        return value
    return value


def _audit_json(entry: AuditEntry, secrets: Sequence[str]) -> dict[str, Any]:
    return {
        "at": _iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "reason": _mask(entry.reason, secrets),
        "evidence": _mask(entry.evidence, secrets),
        "from_state": entry.from_state,
        "to_state": entry.to_state,
    }


async def _owner_secrets(store: CaseStore, owner_id: str) -> list[str]:
    """The texts that must never reach the page for one owner (channel targets and keys)."""
    found: list[str] = []
    for channel in await store.channels(owner_id, active_only=False):
        found.append(channel.target)
        found.extend(v for v in channel.keys.values() if len(v) >= 4)
    return sorted(set(found), key=len, reverse=True)


# -- request bodies --------------------------------------------------------------------


class _Login(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    body: str = Field(min_length=1, max_length=_TEXT_LIMIT)
    title: str | None = Field(default=None, max_length=200)


class _Close(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: Literal["resolved", "dismissed"]
    note: str | None = Field(default=None, max_length=_TEXT_LIMIT)


class _Campaign(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fault: str = Field(pattern=_NAME.pattern)
    dimension: stats.Dimension
    value: str = Field(min_length=1, max_length=128)
    action: str = Field(pattern=_NAME.pattern)
    reason: str | None = Field(default=None, max_length=500)
    model: str | None = Field(default=None, max_length=128)


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        return await read_body(request, model, empty_is_object=True)
    except ApiError as exc:
        raise InvalidRequestError(f"invalid request: {exc.message}") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise InvalidRequestError("the request body is too large") from exc


# -- middlewares -----------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MAPPED_ERRORS as exc:
        status, _code = error_status(exc) or (500, "internal_error")
        return _error(status, str(exc))
    except TransientError as exc:
        _LOG.warning("%s %s: a store is unavailable: %s", request.method, request.path, exc)
        return _error(503, "a data store is unavailable; try again shortly")
    except PermanentError as exc:
        _LOG.warning("%s %s failed: %s", request.method, request.path, exc)
        return _error(502, "a data store refused the request")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
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
# extend it, so an open page alone never keeps a session alive (issue 12).
_PASSIVE: Final = frozenset(("/ops/api/events",))
_BACKGROUND_HEADER: Final = "X-Ops-Background"


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _public(request.path):
        return await handler(request)
    session_id = request.cookies.get(COOKIE_NAME)
    sessions = request.app[SESSIONS_KEY]
    passive = request.path in _PASSIVE or request.headers.get(_BACKGROUND_HEADER) == "1"
    lookup = sessions.peek if passive else sessions.get
    session = lookup(session_id) if session_id else None
    if session is None:
        return _error(401, "log in first")
    if request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            return _error(403, "missing or wrong CSRF token")
    request[_SESSION_KEY] = session
    return await handler(request)


def _session(request: web.Request, role: Role = "viewer") -> Session:
    session = request[_SESSION_KEY]
    if not has_role(session.role, role):
        raise ForbiddenError(f"this needs the {role} role")
    return session


# -- page, login, session --------------------------------------------------------------


async def _root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ops/")


async def _index(request: web.Request) -> web.StreamResponse:
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


async def _login(request: web.Request) -> web.StreamResponse:
    if not _same_origin(request):
        return _error(403, "cross-site login refused")
    form = request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
    if form:
        data = await request.post()
        raw: dict[str, Any] = {k: data.get(k) for k in ("username", "password")}
    else:
        try:
            loaded = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return _error(400, "send the user name and password as a form or JSON")
        raw = loaded if isinstance(loaded, dict) else {}
    try:
        login = _Login.model_validate(raw)
    except ValidationError:
        return _error(400, "send a user name and a password")
    limiter, source = request.app[LIMITER_KEY], _client(request)
    # counted before the password is checked, with no await in between (issue 12)
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
        return _error(401, "wrong user name or password")
    limiter.succeeded(login.username, source)
    await _audit_login(request, "login", user.username, source)
    session_id, session = request.app[SESSIONS_KEY].create(user)
    response: web.StreamResponse
    if form:
        response = web.Response(status=303, headers={"Location": "/ops/"})
    else:
        response = _json(_session_json(session, user))
    response.set_cookie(COOKIE_NAME, session_id, **_cookie_attributes(request))
    return response


def _cookie_attributes(request: web.Request) -> dict[str, Any]:
    """The session cookie's attributes (the same when it is set and when it is deleted).

    ``SameSite=Strict`` breaks no flow here: a link into the dashboard from another site
    arrives without the cookie, but it only loads the page, whose own API requests are
    same-site and carry it. ``Secure`` whenever the dashboard is reached over HTTPS
    (:meth:`DashboardSettings.secure_cookie`; issue 12).
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
        "expires_at": _iso(session.expires_at),
    }


async def _logout(request: web.Request) -> web.StreamResponse:
    session_id = request.cookies.get(COOKIE_NAME)
    if session_id:
        request.app[SESSIONS_KEY].end(session_id)
        # the session's live streams end now, not at their next heartbeat
        for subscription, stream_session in tuple(request.app[STREAMS_KEY].items()):
            if hmac.compare_digest(stream_session.encode(), session_id.encode()):
                subscription.close()
    response = _json({"ok": True})
    response.del_cookie(COOKIE_NAME, **_cookie_attributes(request))
    return response


async def _whoami(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    user = await request.app[USERS_KEY].get_user(session.username)
    return _json(_session_json(session, user))


async def _ping(request: web.Request) -> web.StreamResponse:
    _session(request)
    return _json({"ok": True})


# -- fleet -----------------------------------------------------------------------------


def _iso_ms(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat()


def _heard_window_s(settings: DashboardSettings) -> float:
    """How far back readings are looked for to learn when a device was last heard from."""
    return max(86_400.0, 4 * settings.silent_after_s)


def _now_ms(request: web.Request) -> int:
    return int(request.app[CLOCK_KEY]().timestamp() * 1000)


async def _health(request: web.Request, snapshot: Snapshot) -> FleetHealth:
    """The devices' levels (kept while registry and signals stay and nobody turns silent)."""
    settings = request.app[SETTINGS_KEY]
    cache = request.app[CACHE_KEY]
    now_ms = _now_ms(request)
    inputs = (snapshot.devices, snapshot.scores, snapshot.heard)
    health: FleetHealth | None = cache.reused("fleet_health", inputs)
    if health is None or not health.holds_at(now_ms):
        health = await asyncio.to_thread(
            fleet_health,
            snapshot.devices,
            snapshot.scores,
            healthy_below=settings.healthy_below,
            anomalous_from=settings.anomalous_from,
            heard=snapshot.heard,
            now_ms=now_ms,
            silent_after_s=settings.silent_after_s,
        )
        cache.remember("fleet_health", inputs, health)
    return health


async def _fleet(request: web.Request) -> web.StreamResponse:
    _session(request)
    settings = request.app[SETTINGS_KEY]
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    kept = cache.derived(snapshot, "fleet")
    if kept is None or not kept[1].holds_at(_now_ms(request)):
        # the device half is kept while the registry and the signals stay the same
        health = await _health(request, snapshot)
        data = await asyncio.to_thread(
            overview,
            snapshot,
            healthy_below=settings.healthy_below,
            anomalous_from=settings.anomalous_from,
            iso=_iso_ms,
            health=health,
        )
        kept = (data, health)
        cache.keep(snapshot, "fleet", kept)
    data = dict(kept[0])
    data["generated_at"] = _iso(request.app[CLOCK_KEY]())
    data["scores_available"] = request.app[INFLUX_KEY] is not None
    data["silent_after_s"] = settings.silent_after_s
    return _json(data)


async def _products(request: web.Request) -> web.StreamResponse:
    """What devices send that no product file describes, per model (diagnostics counts it).

    A model without a file is scored generically from every metric it sends; a model
    whose file misses some of its metrics has those scored the same way. Each row: the
    model, whether a file describes it, the count (readings without a file, or values
    of unlisted metrics), the metrics concerned, the devices of the model in the
    registry and when it was last counted.
    """
    _session(request)
    influx = request.app[INFLUX_KEY]
    if influx is None:
        return _json({"available": False, "models": []})
    found, snapshot = await asyncio.gather(
        influxql.product_mismatches(influx, measurements=request.app[MEASUREMENTS_KEY]),
        request.app[CACHE_KEY].snapshot(),
    )
    devices: Counter[str] = Counter(d.model for d in snapshot.devices.values())
    return _json(
        {
            "available": True,
            "models": [
                {
                    "model": m.model,
                    "has_file": m.has_file,
                    "count": m.count,
                    "metrics": list(m.metrics),
                    "devices": devices.get(m.model, 0),
                    "at": _iso_ms(m.at_ms),
                }
                for m in found
            ],
        }
    )


async def _devices(request: web.Request) -> web.StreamResponse:
    """Devices matching a filter (model, firmware, batch, state, an id prefix), worst first."""
    _session(request)
    query = request.query
    try:
        limit = min(max(int(query.get("limit", "100")), 1), 1000)
    except ValueError as exc:
        raise InvalidRequestError("limit must be a number") from exc
    wanted_state = query.get("state")
    if wanted_state is not None and wanted_state not in LEVELS:
        raise InvalidRequestError(f"state is one of {', '.join(LEVELS)}")
    snapshot = await request.app[CACHE_KEY].snapshot()
    levels = (await _health(request, snapshot)).levels
    prefix = query.get("q", "")
    rows: list[tuple[float, dict[str, Any]]] = []
    for device in snapshot.devices.values():
        if any(
            query.get(name) is not None and query.get(name) != (getattr(device, name) or "unknown")
            for name in ("model", "firmware", "batch")
        ):
            continue
        if prefix and not device.device_id.startswith(prefix):
            continue
        level = levels.get(device.device_id, "unknown")
        if wanted_state is not None and level != wanted_state:
            continue
        latest = snapshot.scores.get(device.device_id)
        heard = snapshot.heard.get(device.device_id)
        row = {
            "device_id": device.device_id,
            "model": device.model,
            "firmware": device.firmware,
            "batch": device.batch,
            "score": None if latest is None else round(latest[1], 4),
            "state": level,
            "last_heard_at": None if heard is None else _iso_ms(heard),
        }
        rows.append((-1.0 if latest is None else latest[1], row))
    rows.sort(key=lambda item: (-item[0], item[1]["device_id"]))
    return _json({"total": len(rows), "devices": [row for _, row in rows[:limit]]})


def _time_range(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    query = request.query
    settings = request.app[SETTINGS_KEY]
    if "start" in query or "end" in query:
        try:
            start = datetime.fromisoformat(query["start"])
            end = datetime.fromisoformat(query["end"]) if "end" in query else now
        except (KeyError, ValueError) as exc:
            raise InvalidRequestError("start and end are ISO 8601 times with a zone") from exc
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidRequestError("start and end need a time zone (UTC: 'Z' or '+00:00')")
        start, end = start.astimezone(UTC), end.astimezone(UTC)
    else:
        span = _RANGES.get(query.get("range", "24h"))
        if span is None:
            raise InvalidRequestError(f"range is one of {', '.join(_RANGES)}")
        start, end = now - span, now
    if end <= start:
        raise InvalidRequestError("the range must end after it starts")
    if end - start > timedelta(days=settings.max_range_days):
        raise InvalidRequestError(f"a range is at most {settings.max_range_days} days")
    return start, end


def _marks(
    audits: Mapping[str, Sequence[AuditEntry]],
    events: Sequence[dict[str, Any]],
    cases: Sequence[Case],
    start: datetime,
    end: datetime,
) -> list[dict[str, Any]]:
    """Diagnoses, commands, case steps and device events in ``[start, end)``, by time."""
    marks: list[dict[str, Any]] = []
    for case_id, trail in audits.items():
        for entry in trail:
            if not start <= entry.at < end:
                continue
            if entry.action == "transition" and entry.to_state == "opened":
                kind, label = "diagnosis", entry.reason
            elif entry.action in ("command", "command_result", "command_skipped"):
                kind, label = "command", entry.reason
            elif entry.action == "transition":
                kind, label = "case", f"{entry.from_state} → {entry.to_state}"
            else:
                continue
            marks.append(
                {"at_ms": int(entry.at.timestamp() * 1000), "kind": kind, "label": label,
                 "case_id": case_id}
            )  # fmt: skip
    for event in events:
        kind = "command" if event.get("command_id") else "event"
        label = str(event.get("kind"))
        if event.get("code"):
            label += f" {event['code']}"
        if event.get("ok") is not None:
            label += " ok" if event["ok"] else " failed"
        marks.append({"at_ms": event["at_ms"], "kind": kind, "label": label, "case_id": None})
    for case in cases:
        if case.is_open and case.failure_at is not None:
            marks.append(
                {"at_ms": int(case.failure_at.timestamp() * 1000), "kind": "failure",
                 "label": f"predicted {case.fault} failure", "case_id": case.case_id}
            )  # fmt: skip
    marks.sort(key=lambda m: m["at_ms"])
    return marks


async def _device(request: web.Request) -> web.StreamResponse:
    _session(request)
    app = request.app
    store = app[STORE_KEY]
    device_id = request.match_info["device_id"]
    device = await store.get_device(device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id}")
    now = app[CLOCK_KEY]()
    start, end = _time_range(request, now)
    influx = app[INFLUX_KEY]
    measurements = app[MEASUREMENTS_KEY]
    cases = await store.cases(device_id=device_id, limit=50)
    recent = cases[:20]
    trails, secrets = await asyncio.gather(
        asyncio.gather(*(store.audit(c.case_id) for c in recent)),
        _owner_secrets(store, device.owner_id),
    )
    audits = {case.case_id: trail for case, trail in zip(recent, trails, strict=True)}
    series: influxql.DeviceSeries | None = None
    events: list[dict[str, Any]] = []
    signals = influxql.DeviceSignals(scores={}, heard={}, boots={})
    if influx is not None:
        series, events, signals = await asyncio.gather(
            influxql.device_series(
                influx,
                device_id,
                start,
                end,
                max_points=app[SETTINGS_KEY].max_points,
                measurements=measurements,
            ),
            influxql.device_events(influx, device_id, start, end, measurements=measurements),
            # its newest score, reading and boot: this device's only, not the fleet's
            influxql.device_signals(
                influx,
                readings_since=now - timedelta(seconds=_heard_window_s(app[SETTINGS_KEY])),
                measurements=measurements,
                device_id=device_id,
            ),
        )
    marks = _marks(audits, events, cases, start, end)
    for mark in marks:
        mark["label"] = _mask(mark["label"], secrets)
    # the firmware its newest boot event names, when it has one; its level and last word
    boot = signals.boots.get(device_id)
    heard = signals.heard.get(device_id)
    settings = app[SETTINGS_KEY]
    level = fleet_health(
        {device_id: device},
        signals.scores,
        healthy_below=settings.healthy_below,
        anomalous_from=settings.anomalous_from,
        heard=signals.heard,
        now_ms=int(now.timestamp() * 1000),
        silent_after_s=settings.silent_after_s,
    ).levels[device_id]
    return _json(
        {
            "device": {
                "device_id": device.device_id,
                "model": device.model,
                "firmware": device.firmware if boot is None else boot[1],
                "firmware_from": "registry" if boot is None else "boot event",
                "firmware_reported_at": None if boot is None else _iso_ms(boot[0]),
                "batch": device.batch,
                "state": level,
                "last_heard_at": None if heard is None else _iso_ms(heard),
            },
            "range": {
                "start": _iso(start),
                "end": _iso(end),
                "bucket_s": None if series is None else series.bucket_s,
                "max_points": app[SETTINGS_KEY].max_points,
            },
            "telemetry": None
            if series is None
            else {"times_ms": series.times_ms, "metrics": series.metrics},
            "score": None
            if series is None
            else {
                "times_ms": series.score_times_ms,
                "score": series.score,
                "score_max": series.score_max,
                "baseline": series.baseline,
            },
            "events": [
                {k: _mask(v, secrets) if isinstance(v, str) else v for k, v in e.items()}
                for e in events
            ],
            "marks": marks,
            "cases": [_case_json(c) for c in cases],
        }
    )


# -- cases -----------------------------------------------------------------------------


async def _board(request: web.Request) -> web.StreamResponse:
    _session(request)
    try:
        per_stage = min(max(int(request.query.get("per_stage", "100")), 1), 1000)
    except ValueError as exc:
        raise InvalidRequestError("per_stage must be a number") from exc
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    wanted = request.query.get("model")
    key = ("board", per_stage, wanted or None)
    body: bytes | None = cache.derived(snapshot, key)
    if body is None:
        stages: defaultdict[str, list[Case]] = defaultdict(list)
        counts: Counter[str] = Counter()
        for case in snapshot.cases:
            if wanted and case.model != wanted:
                continue
            counts[case.state] += 1
            limit = per_stage if case.state in OPEN_STATES else min(per_stage, _CLOSED_PER_STAGE)
            if len(stages[case.state]) < limit:
                stages[case.state].append(case)
        body = orjson.dumps(
            {
                "stages": [
                    {
                        "state": state,
                        "open": state in OPEN_STATES,
                        "count": counts.get(state, 0),
                        # a card is rendered once per case record, not once per answer
                        "cases": [cache.rendered(c, _case_json) for c in stages.get(state, [])],
                    }
                    for state in _STAGES
                ]
            }
        )
        cache.keep(snapshot, key, body)
    return _json_body(body)


async def _case(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    store = request.app[STORE_KEY]
    case_id = request.match_info["case_id"]
    case = await store.get_case(case_id)
    if case is None:
        raise NotFoundError(f"no case {case_id}")
    trail, rating, appointments, tasks, secrets = await asyncio.gather(
        store.audit(case_id),
        store.get_rating(case_id),
        store.appointments(case_id=case_id),
        store.tasks(case_id=case_id),
        _owner_secrets(store, case.owner_id),
    )
    data: dict[str, Any] = {
        "case": _case_json(case),
        "audit": [_audit_json(e, secrets) for e in trail],
        "rating": None
        if rating is None
        else {
            "stars": rating.stars,
            "comment": _mask(rating.comment, secrets),
            "nothing_wrong": rating.nothing_wrong,
            "at": _iso(rating.at),
        },
        "appointments": [
            {
                "appointment_id": a.appointment_id,
                "technician_id": a.technician_id,
                "start": _iso(a.start),
                "end": _iso(a.end),
                "state": a.state,
                "part": a.part,
                "note": _mask(a.note, secrets),
            }
            for a in appointments
        ],
        "tasks": [_task_json(t) for t in tasks],
        "owner": None,
    }
    if has_role(session.role, "agent"):
        # the one place an owner shows: by name, for a person who may write to them
        owner = await store.get_owner(case.owner_id)
        if owner is not None:
            data["owner"] = {"name": owner.name, "language": owner.language}
    return _json(data)


def _task_json(task: Any) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "case_id": task.case_id,
        "reason": task.reason,
        "created_at": _iso(task.created_at),
        "state": task.state,
        "assignee": task.assignee,
    }


async def _queue(request: web.Request) -> web.StreamResponse:
    _session(request)
    store = request.app[STORE_KEY]
    cache = request.app[CACHE_KEY]
    tasks = [*await store.tasks(state="open"), *await store.tasks(state="taken")]
    tasks.sort(key=lambda t: t.created_at)
    # every task's case at once (from the snapshot the feed keeps current), not one by one
    cases = await cache.cases_by_id(t.case_id for t in tasks)
    rows = []
    for task in tasks:
        case = cases.get(task.case_id)
        rows.append(
            {
                **_task_json(task),
                "case": None if case is None else cache.rendered(case, _case_json),
            }
        )
    return _json({"tasks": rows})


def _changed(request: web.Request, case: Case | None = None) -> None:
    """Tell the feed (and so every cache that follows it) about a change made here."""
    feed = request.app[FEED_KEY]
    if case is None:
        feed.touch()
    else:
        feed.publish(case)


async def _take(request: web.Request) -> web.StreamResponse:
    session = _session(request, "agent")
    task = await ops.take_over(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        request.app[CLOCK_KEY],
        override=has_role(session.role, "admin"),
    )
    # only the task changed: no case, nothing fleet-wide (the queue reads tasks each time)
    return _json({"task": _task_json(task)})


async def _message(request: web.Request) -> web.StreamResponse:
    session = _session(request, "agent")
    body: _Message = await _body(request, _Message)
    notification = await ops.write_to_owner(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        body.body,
        request.app[CLOCK_KEY],
        title=body.title,
        override=has_role(session.role, "admin"),
    )
    return _json(
        {
            "notification_id": notification.notification_id,
            "case_id": notification.case_id,
            "kind": notification.kind,
            "status": notification.status,
        },
        status=201,
    )


async def _close(request: web.Request) -> web.StreamResponse:
    session = _session(request, "agent")
    body: _Close = await _body(request, _Close)
    task, case = await ops.close_task(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        body.outcome,
        request.app[CLOCK_KEY],
        note=body.note,
        override=has_role(session.role, "admin"),
    )
    _changed(request, case)
    return _json({"task": _task_json(task), "case": _case_json(case)})


# -- appointments, outcomes, insight ---------------------------------------------------


def _week_start(request: web.Request, now: datetime) -> datetime:
    raw = request.query.get("week")
    try:
        day = date.fromisoformat(raw) if raw else now.date()
    except ValueError as exc:
        raise InvalidRequestError("week is a date, YYYY-MM-DD") from exc
    monday = day - timedelta(days=day.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=UTC)


async def _appointments(request: web.Request) -> web.StreamResponse:
    _session(request)
    store = request.app[STORE_KEY]
    start = _week_start(request, request.app[CLOCK_KEY]())
    end = start + timedelta(days=7)
    visits, technicians, snapshot = await asyncio.gather(
        store.appointments(since=start, until=end),
        store.technicians(),
        request.app[CACHE_KEY].snapshot(),
    )
    names = {t.technician_id: t.name for t in technicians}
    cases = snapshot.by_id
    rows = []
    for visit in visits:
        case = cases.get(visit.case_id)
        rows.append(
            {
                "appointment_id": visit.appointment_id,
                "case_id": visit.case_id,
                "state": visit.state,
                "start": _iso(visit.start),
                "end": _iso(visit.end),
                "technician_id": visit.technician_id,
                "technician": names.get(visit.technician_id or ""),
                "part": visit.part,
                "device_id": None if case is None else case.device_id,
                "model": None if case is None else case.model,
                "fault": None if case is None else case.fault,
            }
        )
    return _json(
        {
            "week_start": start.date().isoformat(),
            "days": [(start + timedelta(days=i)).date().isoformat() for i in range(7)],
            "previous": (start - timedelta(days=7)).date().isoformat(),
            "next": end.date().isoformat(),
            "appointments": rows,
        }
    )


def _since(request: web.Request, default_days: int) -> datetime | None:
    raw = request.query.get("days", str(default_days))
    try:
        days = int(raw)
    except ValueError as exc:
        raise InvalidRequestError("days must be a whole number") from exc
    if days <= 0:
        return None
    return request.app[CLOCK_KEY]() - timedelta(days=min(days, 3650))


async def _outcomes(request: web.Request) -> web.StreamResponse:
    _session(request)
    since = _since(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("outcomes", request.query.get("days", "0"))
    data = cache.derived(snapshot, key)
    if data is None:
        cases = [c for c in snapshot.cases if since is None or c.opened_at >= since]
        ratings, visited = await cache.outcome_records()
        resolved_at = await cache.resolved_at(cases)
        data = await asyncio.to_thread(
            stats.outcomes, cases, ratings, snapshot.devices, resolved_at, visited
        )
        data["since"] = _iso(since)
        cache.keep(snapshot, key, data)
    return _json(data)


async def _insight(request: web.Request) -> web.StreamResponse:
    _session(request)
    since = _since(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("insight", request.query.get("days", "0"))
    data = cache.derived(snapshot, key)
    if data is None:
        cases = [c for c in snapshot.cases if since is None or c.opened_at >= since]
        # the registry's groups are kept while the registry stays the same
        grouped = cache.reused("population", (snapshot.devices,))
        if grouped is None:
            grouped = await asyncio.to_thread(stats.population, snapshot.devices.values())
            cache.remember("population", (snapshot.devices,), grouped)
        # and each fault's rates while its cases stay the same: a change recounts one fault
        kept: stats.InsightKept | None = cache.reused(key, (grouped,))
        if kept is None:
            kept = {}
            cache.remember(key, (grouped,), kept)
        groups = await asyncio.to_thread(
            stats.fleet_insight,
            list(snapshot.devices.values()),
            cases,
            grouped=grouped,
            kept=kept,
        )
        data = {
            "since": _iso(since),
            "devices": len(snapshot.devices),
            "flagged": [g.as_json() for g in groups if g.flagged],
            "groups": [g.as_json() for g in groups if not g.flagged][:100],
        }
        cache.keep(snapshot, key, data)
    return _json(data)


# -- charts ----------------------------------------------------------------------------

#: Most buckets of the fleet's health over time (the page draws one point per bucket).
_CHART_POINTS: Final = 100
_HEALTH_COLUMNS: Final = ("time", *LEVELS)


def _chart_days(request: web.Request, default: int) -> int:
    raw = request.query.get("days", str(default))
    try:
        days = int(raw)
    except ValueError as exc:
        raise InvalidRequestError("days must be a whole number") from exc
    if not 1 <= days <= 730:
        raise InvalidRequestError("days is from 1 to 730")
    return days


async def _health_chart(request: web.Request) -> charts.Table:
    """Devices per level in each bucket of a range (``range=24h``, or ``start``/``end``).

    Each bucket holds the mean over the counted steps in it (:mod:`dashboard.history`);
    a bucket is never narrower than a step. ``pending``: steps still being counted (the
    page asks again until there are none).
    """
    app = request.app
    settings, history = app[SETTINGS_KEY], app[HISTORY_KEY]
    start, end = _time_range(request, app[CLOCK_KEY]())
    width_s = max(influxql.bucket_s(start, end, _CHART_POINTS), STEP_S)
    meta = {
        "start": _iso(start),
        "end": _iso(end),
        "bucket_s": width_s,
        "step_s": STEP_S,
        "silent_after_s": settings.silent_after_s,
        "available": history is not None,
    }
    if history is None:
        return charts.Table("fleet-health", _HEALTH_COLUMNS, [], {**meta, "pending": 0})
    steps, pending = await history.counts(start, end)
    rows = [
        (_iso_ms(bucket), *means)
        for bucket, means in bucketed(steps, int(start.timestamp() * 1000), width_s * 1000)
    ]
    return charts.Table("fleet-health", _HEALTH_COLUMNS, rows, {**meta, "pending": pending})


async def _cases_chart(request: web.Request) -> charts.Table:
    """Cases opened and resolved per day, with the median time to resolution."""
    days = _chart_days(request, 30)
    cache = request.app[CACHE_KEY]
    today = request.app[CLOCK_KEY]().astimezone(UTC).date()
    snapshot = await cache.snapshot()
    key = ("chart", "cases", days, today)
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        resolved_at = await cache.resolved_at(snapshot.cases)
        rows = await asyncio.to_thread(
            stats.cases_by_day,
            snapshot.cases,
            resolved_at,
            start=today - timedelta(days=days - 1),
            end=today,
        )
        table = charts.Table.of(
            "cases", ("day", "opened", "resolved", "median_resolution_h"), rows, {"days": days}
        )
        cache.keep(snapshot, key, table)
    return table


async def _fixes_chart(request: web.Request) -> charts.Table:
    """Per day: resolutions, the share fixed remotely, ratings and their mean."""
    days = _chart_days(request, 30)
    cache = request.app[CACHE_KEY]
    today = request.app[CLOCK_KEY]().astimezone(UTC).date()
    snapshot = await cache.snapshot()
    key = ("chart", "fixes", days, today)
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        ratings, visited = await cache.outcome_records()
        resolved_at = await cache.resolved_at(snapshot.cases)
        rows = await asyncio.to_thread(
            stats.fixes_by_day,
            snapshot.cases,
            resolved_at,
            visited,
            ratings,
            start=today - timedelta(days=days - 1),
            end=today,
        )
        columns = ("day", "resolved", "fixed_remotely", "fixed_remotely_share", "ratings",
                   "mean_stars")  # fmt: skip
        table = charts.Table.of("fixes", columns, rows, {"days": days})
        cache.keep(snapshot, key, table)
    return table


async def _failures_chart(request: web.Request) -> charts.Table:
    """The share of devices of each firmware and batch with a case (``days=0``: all time)."""
    since = _since(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("chart", "failure-rates", request.query.get("days", "0"))
    table: charts.Table | None = cache.derived(snapshot, key)
    if table is None:
        rows = await asyncio.to_thread(
            stats.failure_rates, snapshot.devices.values(), snapshot.cases, since=since
        )
        columns = ("dimension", "model", "group", "devices", "failed", "failure_rate")
        table = charts.Table.of("failure-rates", columns, rows, {"since": _iso(since)})
        cache.keep(snapshot, key, table)
    return table


_CHART_TABLES: Final[dict[str, Callable[[web.Request], Awaitable[charts.Table]]]] = {
    "fleet-health": _health_chart,
    "cases": _cases_chart,
    "fixes": _fixes_chart,
    "failure-rates": _failures_chart,
}


async def _chart(request: web.Request) -> web.StreamResponse:
    """``GET /ops/api/charts/{name}``: its data as JSON, or CSV (``.csv``, ``?format=csv``)."""
    _session(request)
    raw = request.match_info["chart"]
    name = raw.removesuffix(".csv")
    wanted = request.query.get("format", "csv" if raw.endswith(".csv") else "json")
    if wanted not in ("json", "csv"):
        raise InvalidRequestError("format is json or csv")
    build = _CHART_TABLES.get(name)
    if build is None:
        raise NotFoundError(f"no chart {name}; charts: {', '.join(charts.CHARTS)}")
    table = await build(request)
    if wanted == "json":
        return _json(table.as_json())
    filename = charts.csv_filename(name, request.app[CLOCK_KEY]())
    return web.Response(
        body=charts.to_csv(table),
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


async def _campaign(request: web.Request) -> web.StreamResponse:
    session = _session(request, "admin")
    body: _Campaign = await _body(request, _Campaign)
    starter = request.app[CAMPAIGN_KEY]
    if starter is None:
        return _error(503, "campaigns are not available in this install")
    snapshot = await request.app[CACHE_KEY].snapshot()
    device_ids = sorted(
        device.device_id
        for device in snapshot.devices.values()
        if stats.group_of(device, body.dimension) == body.value
        and (body.model is None or device.model == body.model)
    )
    if not device_ids:
        raise NotFoundError(f"no devices with {body.dimension} {body.value}")
    reason = body.reason or (
        f"pre-emptive {body.action} for {body.fault} on {body.dimension} {body.value}, "
        f"started by {session.username}"
    )
    started = await starter.start(device_ids, body.action, reason)
    await request.app[STORE_KEY].add_audit(
        AuditEntry(
            case_id=None,
            at=request.app[CLOCK_KEY](),
            actor="ops",
            action="campaign",
            reason=reason,
            evidence={
                "user": session.username,
                "fault": body.fault,
                "dimension": body.dimension,
                "value": body.value,
                "action": body.action,
                "devices": len(device_ids),
                "cases": started,
            },
        )
    )
    _LOG.info(
        "campaign %s for %s on %s %s by %s: %d devices, %d cases",
        body.action,
        body.fault,
        body.dimension,
        body.value,
        session.username,
        len(device_ids),
        started,
    )
    _changed(request)
    return _json({"devices": len(device_ids), "cases": started}, status=201)


# -- live stream -----------------------------------------------------------------------


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _events(request: web.Request) -> web.StreamResponse:
    """``GET /ops/api/events``: case changes and heartbeats while the session lives.

    The session is looked at before every event and heartbeat, never extended (only a
    person's requests extend it); once it has ended (logout) or expired, the stream says
    ``logout`` and closes (issue 12). Logout also wakes the stream at once, and the wait
    for the next event never outlasts the session.
    """
    _session(request)
    app = request.app
    sessions, clock = app[SESSIONS_KEY], app[CLOCK_KEY]
    session_id = request.cookies.get(COOKIE_NAME, "")
    heartbeat_s = app[SETTINGS_KEY].heartbeat_s
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    streams = app[STREAMS_KEY]
    async with app[FEED_KEY].subscribe() as subscription:
        streams[subscription] = session_id
        try:
            await response.write(b"retry: 3000\n\n" + _sse("hello", {"ok": True}))
            reported = 0
            session = sessions.peek(session_id)
            while session is not None:
                left_s = (session.expires_at - clock()).total_seconds()
                beat = False
                try:
                    async with asyncio.timeout(max(0.0, min(heartbeat_s, left_s))):
                        case = await subscription.get()
                except TimeoutError:
                    case, beat = None, True
                session = sessions.peek(session_id)
                if session is None:
                    break
                if beat:
                    await response.write(b": keep-alive\n\n")
                    continue
                if case is None:
                    break  # the feed ended (shutdown)
                if subscription.dropped != reported:
                    reported = subscription.dropped
                    await response.write(_sse("dropped", {"dropped": reported}))
                await response.write(_sse("case", _case_json(case)))
            if session is None:
                await response.write(_sse("logout", {"reason": "session ended"}))
        except (ConnectionResetError, ConnectionError):
            _LOG.debug("live stream closed by the browser")
        finally:
            streams.pop(subscription, None)
    return response


async def _end_streams(app: web.Application) -> None:
    streams = app[STREAMS_KEY]
    for subscription in tuple(streams):
        subscription.close()


async def _close_cache(app: web.Application) -> None:
    await app[CACHE_KEY].close()
    history = app[HISTORY_KEY]
    if history is not None:
        await history.close()


# -- the app ---------------------------------------------------------------------------

#: The JSON API: method, path, handler (each handler checks the role it needs).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/ops/api/session", _whoami),
    ("GET", "/ops/api/ping", _ping),
    ("GET", "/ops/api/fleet", _fleet),
    ("GET", "/ops/api/devices", _devices),
    ("GET", "/ops/api/products", _products),
    ("GET", "/ops/api/devices/{device_id}", _device),
    ("GET", "/ops/api/cases", _board),
    ("GET", "/ops/api/cases/{case_id}", _case),
    ("GET", "/ops/api/queue", _queue),
    ("POST", "/ops/api/tasks/{task_id}/take", _take),
    ("POST", "/ops/api/tasks/{task_id}/message", _message),
    ("POST", "/ops/api/tasks/{task_id}/close", _close),
    ("GET", "/ops/api/appointments", _appointments),
    ("GET", "/ops/api/outcomes", _outcomes),
    ("GET", "/ops/api/insight", _insight),
    ("GET", "/ops/api/charts/{chart}", _chart),
    ("POST", "/ops/api/campaigns", _campaign),
    ("GET", "/ops/api/events", _events),
)


def create_app(
    *,
    store: CaseStore,
    influx: InfluxClient | None,
    actions: CaseActions | None,
    users: Mapping[str, OpsUser] | UserStore,
    clock: Callable[[], datetime] = _utcnow,
    campaign: ops.CampaignStarter | None = None,
    feed: CaseFeed | None = None,
    settings: DashboardSettings | None = None,
    measurements: influxql.Measurements | None = None,
) -> web.Application:
    """Build the ops dashboard.

    Args:
        store: the case store (opened; the caller closes it).
        influx: InfluxDB for charts and scores (opened), or ``None``.
        actions: the case machine's requests, or ``None``.
        users: the ops users, by login name or as a user store.
        clock: the wall clock (UTC-aware).
        campaign: starts pre-emptive campaigns, or ``None`` (then 503).
        feed: live case changes to stream (a private one when ``None``).
        settings: the dashboard's settings (defaults when ``None``).
        measurements: the InfluxDB measurement names (the pipeline's when ``None``).

    Returns:
        The application; serve it, or mount it, with ``/ops`` as its root.
    """
    config = settings or DashboardSettings()
    names = measurements or influxql.Measurements()
    live = feed or CaseFeed()
    app = web.Application(middlewares=[_errors, _headers, _auth], client_max_size=256 * 1024)
    app[STORE_KEY] = store
    app[INFLUX_KEY] = influx
    app[ACTIONS_KEY] = actions
    app[CAMPAIGN_KEY] = campaign
    app[USERS_KEY] = MappingUsers(users) if isinstance(users, Mapping) else users
    app[SESSIONS_KEY] = SessionStore(
        clock, idle_s=config.session_idle_s, max_age_s=config.session_max_s
    )
    app[LIMITER_KEY] = LoginLimiter(
        clock,
        source_failures=config.login_max_failures,
        account_failures=config.login_account_failures,
        backoff_s=config.login_backoff_s,
        max_backoff_s=config.login_max_backoff_s,
        window_s=config.login_window_s,
    )
    app[FEED_KEY] = live
    app[STREAMS_KEY] = {}
    cache = app[CACHE_KEY] = FleetCache(
        store,
        influx,
        live,
        cache_s=config.cache_s,
        measurements=names,
        clock=clock,
        heard_window_s=_heard_window_s(config),
    )

    async def registry() -> tuple[Collection[str], int | None]:
        snapshot = await cache.snapshot()
        newest = max((at for at, _ in snapshot.scores.values()), default=None)
        return snapshot.devices.keys(), newest

    app[HISTORY_KEY] = (
        None
        if influx is None
        else HealthHistory(
            influx,
            registry,
            silent_after_s=config.silent_after_s,
            healthy_below=config.healthy_below,
            anomalous_from=config.anomalous_from,
            clock=clock,
            measurements=names,
            keep_days=config.max_range_days + 1,
        )
    )
    app[CLOCK_KEY] = clock
    app[SETTINGS_KEY] = config
    app[MEASUREMENTS_KEY] = names
    app.router.add_get("/ops", _root)
    app.router.add_get("/ops/", _index)
    app.router.add_post("/ops/login", _login)
    app.router.add_post("/ops/logout", _logout)
    app.router.add_static("/ops/static/", STATIC_DIR, append_version=False)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_shutdown.append(_end_streams)
    app.on_cleanup.append(_close_cache)
    return app
