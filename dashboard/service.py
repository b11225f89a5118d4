"""The dashboard as its own service: case store, InfluxDB and ``fleet/cases`` in, ops app out.

Composition for one process (``fixloop dashboard``), sinks first: the case store (the
notifier's SQLite file; read, and written only by the ops changes of
:mod:`dashboard.ops`), InfluxDB (charts and scores), the live
:class:`~dashboard.feed.CaseFeed`, the ops web app on ``host:port``; then the source, a
live QoS-1 subscription to ``fleet/cases`` (a clean session: what happened while away is
read from the store, not replayed).

Each message on ``fleet/cases`` names a changed case. The notifier stores a change
before it publishes it, so the dashboard reads that case from the store, which also holds
what the message leaves out (remedies, evidence), and hands it to the feed: the open
pages update and the cache of fleet-wide reads applies it. A case the store cannot give
now (not there, or the store busy) is taken from the message itself. After every
(re)subscription the cache is told to read the store again, for the changes missed while
away.

Ops users come from :class:`~dashboard.users.OpsUsersFile`, watched while the service
runs: removing a user, or changing their password or role, ends their sessions at once.
Campaigns: the case machine runs in the notifier, so this service opens a campaign's
cases in the case store (:class:`~dashboard.ops.StoredCampaigns`) and the notifier's
timers give them their first step within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

import orjson
from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from dashboard.app import create_app
from dashboard.auth import SessionStore
from dashboard.feed import CaseFeed, Subscription
from dashboard.keys import SESSIONS_KEY, STREAMS_KEY
from dashboard.ops import StoredCampaigns
from dashboard.settings import DashboardSettings
from dashboard.users import OpsUsersFile
from notifier.model import Case, CaseState, Urgency
from notifier.postgres import PostgresStore
from notifier.sqlite import SqliteStore
from notifier.store import CaseStore
from wire.consumer import consume_forever
from wire.errors import ConfigError, RejectedError, TransientError
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import MqttClient
from wire.protocol import CASES_TOPIC
from wire.settings import MqttSettings
from wire.supervisor import StageHealth, supervise

__all__ = ["DashboardService", "decode_case_change", "follow_users"]

_LOG = logging.getLogger(__name__)

_BATCH_MAX: Final = 500
_USERS_POLL_S: Final = 2.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def follow_users(
    users: OpsUsersFile,
    sessions: SessionStore | None,
    streams: dict[Subscription, str],
    ended: Callable[[int], None] = lambda count: None,
    *,
    poll_s: float = _USERS_POLL_S,
) -> None:
    """End the sessions of ops users removed, or whose password or role changed, for ever.

    Used by ``fixloop dashboard`` and ``fixloop up`` alike: the users file is read again
    every ``poll_s``; a changed user's sessions end and their open live pages close now
    (as a logout does), not at the next heartbeat. ``ended`` hears how many sessions each
    change ended. A file that cannot be read leaves the users read before in force.
    """
    await asyncio.to_thread(users.changed_users)  # what is in force now
    while True:
        await asyncio.sleep(poll_s)
        try:
            changed = await asyncio.to_thread(users.changed_users)
        except ConfigError as exc:
            _LOG.error("%s; the users read before stay in force", exc)
            continue
        if not changed or sessions is None:
            continue
        for username in sorted(changed):
            count = sessions.end_user(username)
            ended(count)
            _LOG.info("ops user %s was removed or changed: %d sessions ended", username, count)
        for subscription, session_id in tuple(streams.items()):
            if sessions.peek(session_id) is None:
                subscription.close()


class _CaseChange(BaseModel):
    """A ``fleet/cases`` message (``notifier.service.case_message``), at the edge."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: Literal[1]
    case_id: str = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=128)
    owner_id: str = Field(max_length=128)
    model: str = Field(max_length=128)
    fault: str = Field(max_length=128)
    state: CaseState
    urgency: Urgency
    opened_at: AwareDatetime
    updated_at: AwareDatetime
    confidence: float = Field(0.0, ge=0, le=1)
    failure_at: AwareDatetime | None = None
    tried: tuple[str, ...] = ()
    pending_action: str | None = None
    appointment_id: str | None = None
    needs_person: str | None = None
    rating: int | None = Field(None, ge=1, le=5)


def decode_case_change(payload: bytes) -> Case:
    """Build a :class:`~notifier.model.Case` from a ``fleet/cases`` message.

    The message carries no remedies or evidence; those stay empty.

    Raises:
        RejectedError: the payload is not a version-1 case change.
    """
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RejectedError("bad_case", f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise RejectedError("bad_version", "expected case change version 1")
    try:
        change = _CaseChange.model_validate(doc)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise RejectedError("bad_case", f"{where}: {problem['msg']}") from exc
    return Case(
        case_id=change.case_id,
        device_id=change.device_id,
        owner_id=change.owner_id,
        model=change.model,
        fault=change.fault,
        state=change.state,
        urgency=change.urgency,
        opened_at=change.opened_at.astimezone(UTC),
        updated_at=change.updated_at.astimezone(UTC),
        confidence=change.confidence,
        failure_at=None if change.failure_at is None else change.failure_at.astimezone(UTC),
        tried=change.tried,
        pending_action=change.pending_action,
        appointment_id=change.appointment_id,
        needs_person=change.needs_person,
        rating=change.rating,
    )


class DashboardService:
    """The ops dashboard as a service; an async context manager, :meth:`run` until cancelled.

    Args:
        mqtt: how to reach the broker (the ``fixloop-dashboard`` service user).
        influx: where telemetry, scores and device events are read.
        settings: the dashboard's settings (address, users file ...).
        db_path: the case store the notifier keeps (``notifier.db_path``); it must exist.
        store: a case store to use instead of opening ``db_path``.
        store_url: the notifier's PostgreSQL case store (``notifier.store_url``), opened
            instead of ``db_path``.
        store_pool_size: connections to that database at most.
        clock: the wall clock (UTC-aware).
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        influx: InfluxSettings,
        settings: DashboardSettings,
        *,
        db_path: Path | None = None,
        store: CaseStore | None = None,
        store_url: str | None = None,
        store_pool_size: int = 10,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if store is None and db_path is None and store_url is None:
            raise ConfigError("the dashboard needs the case store: db_path, store_url or store")
        self._mqtt = mqtt
        self._influx_settings = influx
        self._settings = settings
        self._db_path = db_path
        self._store_url = store_url
        self._store_pool_size = store_pool_size
        self._clock = clock
        self.store: CaseStore | None = store
        self.users = OpsUsersFile(settings.users_file)
        self.feed = CaseFeed()
        self.client_id = f"{settings.client_id}-{secrets.token_hex(4)}"
        self._opened: SqliteStore | PostgresStore | None = None
        self._influx: InfluxClient | None = None
        self._runner: web.AppRunner | None = None
        self._sessions: SessionStore | None = None
        self._streams: dict[Subscription, str] = {}
        self._subscribed = asyncio.Event()
        #: the port the dashboard listens on (the real one when 0 was asked)
        self.port: int | None = None
        #: whether the ``fleet/cases`` subscription is up
        self.connected = False
        #: case changes taken from ``fleet/cases``
        self.case_changes = 0
        #: messages on ``fleet/cases`` that were not a case change
        self.case_changes_refused = 0
        #: case changes shown from the message because the store could not give the case
        self.case_changes_from_message = 0
        #: sessions ended because their user was removed or changed
        self.sessions_ended = 0
        #: the stages' state: down while restarting after an unforeseen error
        self.stages = StageHealth()

    @property
    def url(self) -> str:
        """Where the dashboard's page is served."""
        return f"http://{self._settings.host}:{self.port}/ops/"

    @property
    def sessions(self) -> int:
        """Sessions held now."""
        return 0 if self._sessions is None else len(self._sessions)

    async def __aenter__(self) -> Self:
        settings = self._settings
        if not self.users.load():
            raise ConfigError(
                f"no ops users in {settings.users_file}: add one with "
                "`fixloop ops-users add NAME --role admin`"
            )
        if (
            self.store is None
            and self._store_url is None
            and self._db_path is not None
            and not self._db_path.is_file()
        ):
            raise ConfigError(
                f"case store {self._db_path} not found: start the notifier first, or set "
                "notifier.db_path to its case store"
            )
        try:
            if self.store is None:
                if self._store_url is not None:
                    self._opened = await PostgresStore(
                        self._store_url, pool_size=self._store_pool_size
                    ).open()
                else:
                    assert self._db_path is not None
                    self._opened = await SqliteStore(self._db_path).open()
                self.store = self._opened
            self._influx = InfluxClient(self._influx_settings)
            await self._influx.__aenter__()
            app = create_app(
                store=self.store,
                influx=self._influx,
                actions=None,
                users=self.users,
                clock=self._clock,
                campaign=StoredCampaigns(self.store, self._clock),
                feed=self.feed,
                settings=settings,
            )
            self._sessions = app[SESSIONS_KEY]
            self._streams = app[STREAMS_KEY]
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, settings.host, settings.port)
            await site.start()
            addresses = self._runner.addresses
            self.port = int(addresses[0][1]) if addresses else settings.port
        except BaseException:
            await self._close()
            raise
        _LOG.info(
            "dashboard on %s for %d ops users (users file %s)",
            self.url,
            len(self.users.users()),
            settings.users_file,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # ends the live streams first (on_shutdown)
        self.feed.close()
        influx, self._influx = self._influx, None
        if influx is not None:
            await influx.__aexit__(None, None, None)
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.close()

    async def wait_subscribed(self) -> None:
        """Wait until the service is subscribed to ``fleet/cases``."""
        await self._subscribed.wait()

    async def run(self) -> None:
        """Follow ``fleet/cases`` and the users file until cancelled.

        Raises:
            ConfigError: the broker refused our credentials.
        """
        async with asyncio.TaskGroup() as group:
            group.create_task(
                supervise("ops-users", self._watch_users, self.stages), name="ops-users"
            )
            await supervise(
                "case-feed",
                lambda: consume_forever(
                    lambda: self._mqtt.client(
                        self.client_id, clean_start=True, max_buffered=_BATCH_MAX * 4
                    ),
                    [CASES_TOPIC],
                    self._consume,
                    on_subscribed=self._on_subscribed,
                    on_lost=self._on_lost,
                ),
                self.stages,
            )

    def _on_subscribed(self, _client: MqttClient) -> None:
        self.connected = True
        # changes published while we were away are in the store only: read it again
        self.feed.touch()
        self._subscribed.set()

    def _on_lost(self) -> None:
        self.connected = False

    async def _consume(self, client: MqttClient) -> None:
        store = self.store
        assert store is not None
        while True:
            await client.wait_messages()
            messages = client.take(_BATCH_MAX)
            for message in messages:
                try:
                    change = decode_case_change(message.payload)
                except RejectedError as exc:
                    self.case_changes_refused += 1
                    _LOG.warning("refused a message on %s: %s", message.topic, exc)
                    continue
                try:
                    stored = await store.get_case(change.case_id)
                except TransientError as exc:
                    _LOG.warning("case %s: store unavailable (%s)", change.case_id, exc)
                    stored = None
                if stored is None:
                    self.case_changes_from_message += 1
                self.feed.publish(change if stored is None else stored)
                self.case_changes += 1
            client.ack_many(messages)

    async def _watch_users(self) -> None:
        """End the sessions of users removed, or whose password or role changed."""

        def ended(count: int) -> None:
            self.sessions_ended += count

        await follow_users(self.users, self._sessions, self._streams, ended)
