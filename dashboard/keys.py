"""Typed state of the ops dashboard (built by :func:`dashboard.app.create_app`).

Handlers read what :func:`~dashboard.app.create_app` was given through these keys, never
through module globals, so that several apps (tests, benchmarks) can live side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final

from aiohttp import web

from dashboard.auth import LoginLimiter, SessionStore, UserStore
from dashboard.feed import CaseFeed, Subscription
from dashboard.fleet import FleetCache
from dashboard.history import HealthHistory
from dashboard.influxql import Measurements
from dashboard.ops import CampaignStarter
from dashboard.settings import DashboardSettings
from notifier.actions import CaseActions
from notifier.store import CaseStore
from wire.influx import InfluxClient

__all__ = [
    "ACTIONS_KEY",
    "CACHE_KEY",
    "CAMPAIGN_KEY",
    "CLOCK_KEY",
    "FEED_KEY",
    "HISTORY_KEY",
    "INFLUX_KEY",
    "LIMITER_KEY",
    "MEASUREMENTS_KEY",
    "SESSIONS_KEY",
    "SETTINGS_KEY",
    "STORE_KEY",
    "STREAMS_KEY",
    "USERS_KEY",
]

#: The case store (read; written only by the ops changes of :mod:`dashboard.ops`).
STORE_KEY: Final = web.AppKey("store", CaseStore)
#: InfluxDB, where telemetry, scores and device events are read (``None``: no charts).
INFLUX_KEY: Final = web.AppKey[InfluxClient | None]("influx")
#: The case machine's requests (``None``: none offered).
ACTIONS_KEY: Final = web.AppKey[CaseActions | None]("actions")
#: Starts pre-emptive campaigns (``None``: the campaign button answers 503).
CAMPAIGN_KEY: Final = web.AppKey[CampaignStarter | None]("campaign")
#: The ops users.
USERS_KEY: Final = web.AppKey("users", UserStore)
#: Server-side sessions.
SESSIONS_KEY: Final = web.AppKey("sessions", SessionStore)
#: Failed-login counter.
LIMITER_KEY: Final = web.AppKey("limiter", LoginLimiter)
#: Live case changes.
FEED_KEY: Final = web.AppKey("feed", CaseFeed)
#: The live streams open now, each with its session id (ended at logout and on shutdown).
STREAMS_KEY: Final = web.AppKey[dict[Subscription, str]]("streams")
#: Short-lived cache of fleet-wide reads.
CACHE_KEY: Final = web.AppKey("cache", FleetCache)
#: The fleet's health per step over time (``None``: no InfluxDB, no such chart).
HISTORY_KEY: Final = web.AppKey[HealthHistory | None]("history")
#: The wall clock (UTC-aware).
CLOCK_KEY: Final = web.AppKey[Callable[[], datetime]]("clock")
#: The dashboard's settings.
SETTINGS_KEY: Final = web.AppKey("settings", DashboardSettings)
#: The InfluxDB measurement names read.
MEASUREMENTS_KEY: Final = web.AppKey("measurements", Measurements)
