"""The ops dashboard's live stream: case changes as server-sent events (dashboard).

``GET /ops/api/events`` follows :class:`~dashboard.feed.CaseFeed` while the session
lives; a session that ends (logout, expiry) ends the stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import orjson
from aiohttp import web

from dashboard.keys import (
    CLOCK_KEY,
    FEED_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    STREAMS_KEY,
)
from dashboard.middleware import COOKIE_NAME, Handler, session_of
from dashboard.views import case_json

__all__ = ["ROUTES", "end_streams"]

_LOG = logging.getLogger(__name__)


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _events(request: web.Request) -> web.StreamResponse:
    """``GET /ops/api/events``: case changes and heartbeats while the session lives.

    The session is looked at before every event and heartbeat, never extended (only a
    person's requests extend it); once it has ended (logout) or expired, the stream says
    ``logout`` and closes. Logout also wakes the stream at once, and the wait
    for the next event never outlasts the session.
    """
    session_of(request)
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
                await response.write(_sse("case", case_json(case)))
            if session is None:
                await response.write(_sse("logout", {"reason": "session ended"}))
        except (ConnectionResetError, ConnectionError):
            _LOG.debug("live stream closed by the browser")
        finally:
            streams.pop(subscription, None)
    return response


async def end_streams(app: web.Application) -> None:
    """Close every live stream (on app shutdown), so none holds the server open."""
    streams = app[STREAMS_KEY]
    for subscription in tuple(streams):
        subscription.close()


#: This module's part of the JSON API: method, path, handler (each checks its role).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (("GET", "/ops/api/events", _events),)
