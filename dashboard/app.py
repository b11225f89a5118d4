"""The manufacturer's ops web app: JSON API, live stream and page (dashboard; last stage).

:func:`create_app` builds an :class:`aiohttp.web.Application` from what the composition
root hands it: the case store, an InfluxDB client, the ops users, a live
:class:`~dashboard.feed.CaseFeed` and a :class:`~dashboard.ops.CampaignStarter`.
Everything lives under ``/ops``:

* ``/ops/`` the page (``static/index.html``, plain ES modules, uPlot vendored);
* ``/ops/login`` and ``/ops/logout``;
* ``/ops/api/...`` the JSON API the page uses (see :data:`ROUTES` below for the list;
  the handlers are in :mod:`dashboard.routes`, grouped by what they show);
* ``/ops/api/events`` server-sent events with every case change, for as long as the
  session lives (the stream itself never extends it);
* ``/ops/api/charts/<name>`` each chart's data as JSON, and as CSV with ``.csv`` or
  ``?format=csv`` (:mod:`dashboard.charts`).

Handlers parse, read and answer JSON; the only writes are the ops changes of
:mod:`dashboard.ops` (take over, write to the owner, close) and campaigns. Every
``/ops/api`` request needs a session; every state change also needs the session's CSRF
token in ``X-CSRF-Token``. Owners appear only by name, only on a case's page, and only
for agents and admins; their contacts and push channels are never read except to mask
them out of audit evidence. The checks every request passes are in
:mod:`dashboard.middleware`; the live stream is :mod:`dashboard.live`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from dashboard import influxql, ops
from dashboard.auth import (
    LoginLimiter,
    MappingUsers,
    OpsUser,
    SessionStore,
    UserStore,
)
from dashboard.feed import CaseFeed
from dashboard.fleet import FleetCache
from dashboard.history import HealthHistory
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
from dashboard.live import ROUTES as LIVE_ROUTES
from dashboard.live import end_streams
from dashboard.middleware import (
    COOKIE_NAME,
    CSRF_HEADER,
    Handler,
    auth_middleware,
    error_middleware,
    headers_middleware,
)
from dashboard.routes import cases, fleet, session
from dashboard.routes.session import STATIC_DIR
from dashboard.settings import DashboardSettings
from notifier.actions import CaseActions
from notifier.store import CaseStore
from wire.influx import InfluxClient

__all__ = ["COOKIE_NAME", "CSRF_HEADER", "ROUTES", "create_app"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


#: The JSON API: method, path, handler (each handler checks the role it needs).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    *session.ROUTES,
    *fleet.ROUTES,
    *cases.ROUTES,
    *LIVE_ROUTES,
)


async def _close_cache(app: web.Application) -> None:
    await app[CACHE_KEY].close()
    history = app[HISTORY_KEY]
    if history is not None:
        await history.close()


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
    app = web.Application(
        middlewares=[error_middleware, headers_middleware, auth_middleware],
        client_max_size=256 * 1024,
    )
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
        heard_window_s=fleet.heard_window_s(config),
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
    app.router.add_get("/ops", session.root)
    app.router.add_get("/ops/", session.index)
    app.router.add_post("/ops/login", session.log_in)
    app.router.add_post("/ops/logout", session.log_out)
    app.router.add_static("/ops/static/", STATIC_DIR, append_version=False)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(_close_cache)
    return app
