"""The notifier service: diagnoses in, cases out, commands down, owners told (notifier).

Composition of the owner loop for one process, sinks first: the case store, InfluxDB
(stored scores for verification), the command downlink, the push channels and the
outbox, the case machine, the owner REST API; then the source, a persistent QoS-1
subscription to ``fleet/diagnoses`` (a diagnosis is acknowledged only once the case
machine has stored what it decided). Every case change goes out on ``fleet/cases``.

Any number of notifiers may run side by side on one PostgreSQL store (README,
"Several notifiers"): with ``shared_group`` the broker hands each diagnosis to one of
them, each under its own ``instance`` name (its own persistent session); what they share
is in the store: a lease per case, the cases' timers as due rows, owner messages kept
once per idempotency key and claimed for delivery (:mod:`notifier.loop`,
:mod:`notifier.outbox`). Nothing a second notifier needs lives in this process's memory:
the dashboard follows ``fleet/cases`` on the broker, which every notifier publishes to.
With ``adopt_after_s`` a live notifier of the group takes over a dead one's diagnoses
session until it is back (:mod:`wire.adoption`): the broker gives a dead member's share
to no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

import orjson
from aiohttp import web

from diagnostics import decode_diagnosis
from notifier.admin import Onboarding
from notifier.api import create_api
from notifier.devicedata import InfluxDeviceData
from notifier.dispatcher import build_dispatcher
from notifier.errors import InvalidRequestError
from notifier.health import InfluxHealth
from notifier.links import ActionLinks
from notifier.loop import LoopConfig, OwnerLoop
from notifier.model import Case
from notifier.oidc import OidcOwners
from notifier.outbox import Outbox
from notifier.settings import NotifierSettings
from notifier.store import CaseStore
from notifier.stores import case_store
from wire.adoption import SessionAdoption
from wire.commands import CommandChannel
from wire.consumer import consume_forever, shared_filters
from wire.errors import BrokerUnavailableError, PermanentError, RejectedError, TransientError
from wire.influx import InfluxClient, InfluxSettings
from wire.mqtt import MqttClient, MqttUsageError, Will
from wire.protocol import CASES_TOPIC, DIAGNOSES_TOPIC, Event
from wire.settings import MqttSettings
from wire.supervisor import StageHealth, supervise

__all__ = ["NotifierService", "case_message"]

_LOG = logging.getLogger(__name__)
_BATCH_MAX: Final = 500
_DIGEST_EVERY_S: Final = 60.0
_SWEEP_EVERY_S: Final = 15.0
#: Most devices whose boot-event firmware waits to be written (a burst past it is dropped).
_MAX_PENDING_BOOTS: Final = 100_000


def _utc_now() -> datetime:
    return datetime.now(UTC)


def case_message(case: Case) -> bytes:
    """Return the JSON form of a case change for ``fleet/cases`` (no owner contacts)."""
    doc: dict[str, Any] = {
        "v": 1,
        "case_id": case.case_id,
        "device_id": case.device_id,
        "owner_id": case.owner_id,
        "model": case.model,
        "fault": case.fault,
        "state": case.state,
        "urgency": case.urgency,
        "opened_at": case.opened_at.isoformat(),
        "updated_at": case.updated_at.isoformat(),
        "confidence": round(case.confidence, 4),
        "failure_at": None if case.failure_at is None else case.failure_at.isoformat(),
        "tried": list(case.tried),
        "pending_action": case.pending_action,
        "appointment_id": case.appointment_id,
        "needs_person": case.needs_person,
        "rating": case.rating,
    }
    return orjson.dumps(doc)


class NotifierService:
    """The owner loop as a service; an async context manager, :meth:`run` until cancelled.

    Args:
        mqtt: how to reach the broker (a service user).
        influx: where the stored scores are.
        settings: the notifier's settings.
        store: a case store to use instead of opening the configured one
            (``settings.store_url``, else ``settings.db_path``).
        on_case: also called with every case change (e.g. a dashboard's live feed).
        clock: wall clock (UTC).
        onboarding: gives the device registry's routes on the owner API (the ops role's
            ``/api/v1/admin``, owners' claims) for the store (``None``: none).
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        influx: InfluxSettings,
        settings: NotifierSettings,
        *,
        store: CaseStore | None = None,
        on_case: Callable[[Case], None] | None = None,
        clock: Callable[[], datetime] = _utc_now,
        onboarding: Callable[[CaseStore], Onboarding | None] | None = None,
    ) -> None:
        self._onboarding = onboarding
        self._on_case = on_case
        self._mqtt = mqtt
        self._influx_settings = influx
        self._settings = settings
        self._clock = clock
        self._given_store = store
        self.store: CaseStore | None = store
        self.loop: OwnerLoop | None = None
        self.outbox: Outbox | None = None
        self._stack = contextlib.AsyncExitStack()
        self._publisher: MqttClient | None = None
        self._subscribed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.api_port: int | None = None
        self.diagnoses_handled = 0
        self.diagnoses_refused = 0
        self.diagnoses_failed = 0
        #: which stages are down, and restarts per stage (``/health``)
        self.stages = StageHealth()
        #: whether the ``fleet/diagnoses`` subscription is up (readiness)
        self.connected = False
        # The command channel and the case publisher keep no session: a suffix of this
        # process keeps them apart from another notifier's (a second replica), and not
        # to be guessed (a client taking an id closes the connection that held it). The
        # diagnoses consumer keeps settings.session_client_id: its session must outlive
        # restarts.
        self._boots: dict[str, str] = {}
        self._boots_waiting = asyncio.Event()
        #: firmware versions written to the registry from boot events, and boots dropped
        self.firmware_noted = 0
        self.boots_dropped = 0
        instance = secrets.token_hex(4)
        #: this run's name in the store's case leases and delivery claims (a restarted
        #: instance is a new holder: what the dead run held runs out)
        self.holder = f"{settings.instance or settings.client_id}-{instance}"
        #: MQTT client ids of the command channel and of the ``fleet/cases`` publisher
        self.command_client_id = f"{settings.client_id}-commands-{instance}"
        self.publisher_client_id = f"{settings.client_id}-cases-{instance}"
        #: announces this notifier to its shared group and adopts dead members' sessions
        self.adoption = (
            SessionAdoption(
                role="notifiers",
                group=settings.shared_group,
                instance=settings.instance,
                client_id=settings.session_client_id,
                after_s=settings.adopt_after_s,
                new_client=self._diagnoses_client,
                consume=self._consume,
            )
            if settings.adopt_after_s and settings.shared_group and settings.instance
            else None
        )

    async def __aenter__(self) -> Self:
        settings = self._settings
        stack = self._stack
        try:
            if self.store is None:
                if settings.store_url is None:
                    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
                opened = case_store(settings)
                await opened.open()
                stack.push_async_callback(opened.close)
                self.store = opened
            store: CaseStore = self.store
            influx = await stack.enter_async_context(InfluxClient(self._influx_settings))
            health = InfluxHealth(influx)
            device_data = InfluxDeviceData(influx)
            commands = await stack.enter_async_context(
                CommandChannel(
                    self._mqtt, client_id=self.command_client_id, on_event=self._note_boot
                )
            )
            self._publisher = self._mqtt.client(self.publisher_client_id)
            await self._publisher.connect()
            stack.push_async_callback(self._publisher.disconnect)
            dispatcher = await stack.enter_async_context(build_dispatcher(settings.push))
            links = self._links()
            self.outbox = Outbox(
                store,
                dispatcher,
                clock=self._clock,
                action_base_url=self._public_url(),
                links=links,
                holder=self.holder,
            )
            self.loop = await stack.enter_async_context(
                OwnerLoop(
                    store,
                    commands,
                    health,
                    self.outbox,
                    config=LoopConfig(
                        command_timeout_s=settings.command_timeout_s,
                        retry_after_s=settings.retry_after_s,
                        settle_s=settings.settle_s,
                        verify_window_s=settings.verify_window_s,
                        verify_timeout_s=settings.verify_timeout_s,
                        healthy_score=settings.healthy_score,
                        max_reschedules=settings.max_reschedules,
                        reminder_before_s=settings.reminder_before_s,
                        resume_opened_after_s=settings.resume_opened_after_s,
                        lease_s=settings.lease_s,
                        firmware=dict(settings.firmware),
                    ),
                    sink=self._publish_case,
                    clock=self._clock,
                    holder=self.holder,
                )
            )
            oidc = None
            if settings.oidc.issuer is not None:
                oidc = await stack.enter_async_context(OidcOwners(settings.oidc, store))
            app = create_api(
                store=store,
                actions=self.loop,
                health=health,
                clock=self._clock,
                action_base_url=self._public_url(),
                links=links,
                webhook_allow_private=settings.push.webhook_allow_private,
                device_data=device_data,
                erase_mode=settings.erase_device_data,
                verifier=self.outbox,
                oidc=oidc,
                onboarding=None if self._onboarding is None else self._onboarding(store),
            )
            app.router.add_get("/health", self._health)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            stack.push_async_callback(self._runner.cleanup)
            site = web.TCPSite(self._runner, settings.api_host, settings.api_port)
            await site.start()
            # the port really bound (api_port 0 picks a free one)
            self.api_port = int(self._runner.addresses[0][1])
            _LOG.info("owner API on http://%s:%s/api/v1", settings.api_host, self.api_port)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def _public_url(self) -> str | None:
        return self._settings.public_url

    def _links(self) -> ActionLinks:
        settings = self._settings
        ttl = timedelta(seconds=settings.link_ttl_s)
        if settings.link_secret is not None:
            return ActionLinks(settings.link_secret.get_secret_value(), ttl=ttl)
        if settings.public_url is not None:
            _LOG.warning(
                "no notifier link_secret set: one-tap links are signed with a key of this "
                "run only and stop working when the service restarts"
            )
        return ActionLinks(secrets.token_bytes(32), ttl=ttl)

    @property
    def api_url(self) -> str:
        """The owner API's base address."""
        return f"http://{self._settings.api_host}:{self.api_port}/api/v1"

    async def wait_subscribed(self) -> None:
        """Wait until the service is subscribed to the diagnoses."""
        await self._subscribed.wait()

    async def _publish_case(self, case: Case) -> None:
        if self._on_case is not None:
            self._on_case(case)
        if self._publisher is None:
            return
        try:
            await self._publisher.publish(CASES_TOPIC, case_message(case), qos=1)
        except BrokerUnavailableError as exc:
            _LOG.warning(
                "case %s: change not published (%s lost its broker connection: %s)",
                case.case_id,
                self._publisher.client_id,
                exc,
            )
            if not self._publisher.connected:  # a publish that timed out is still connected
                # another change may be reconnecting it already (MqttUsageError)
                with contextlib.suppress(BrokerUnavailableError, MqttUsageError):
                    await self._publisher.connect()

    async def run(self) -> None:
        """Consume diagnoses and run the case timers until cancelled.

        Raises:
            ConfigError: the broker refused our credentials.
        """
        assert self.loop is not None
        assert self.outbox is not None
        settings = self._settings
        stages = self.stages
        loop, outbox = self.loop, self.outbox
        async with asyncio.TaskGroup() as group:
            # each stage isolates a bad item itself; one that dies anyway is logged at
            # once, shown on /health and restarted, while the others go on
            group.create_task(supervise("case-timers", loop.run, stages), name="case-timers")
            group.create_task(supervise("push-delivery", outbox.run, stages), name="push-delivery")
            group.create_task(supervise("digests", self._digests, stages), name="digests")
            group.create_task(supervise("queued-sweep", self._sweep, stages), name="queued-sweep")
            group.create_task(supervise("firmware", self._keep_firmware, stages), name="firmware")
            filters = shared_filters([DIAGNOSES_TOPIC], settings.shared_group)
            if self.adoption is not None:
                filters.append(self.adoption.state_filter)
                group.create_task(supervise("adoption", self.adoption.run, stages), name="adoption")
            await supervise(
                "diagnoses",
                lambda: consume_forever(
                    self._own_diagnoses_client,
                    filters,
                    self._consume,
                    on_subscribed=self._on_subscribed,
                    on_lost=self._on_lost,
                ),
                stages,
            )

    def _diagnoses_client(self, client_id: str, will: Will | None) -> MqttClient:
        """A client for a diagnoses session: ours, or an adopted member's (with its ``will``)."""
        return self._mqtt.session_client(
            client_id,
            session_expiry_s=self._settings.session_expiry_s,
            max_buffered=_BATCH_MAX * 4,
            will=will,
        )

    def _own_diagnoses_client(self) -> MqttClient:
        """A client for our diagnoses session; in a group that adopts, its will says "down"."""
        if self.adoption is not None:
            return self.adoption.own_client()
        return self._diagnoses_client(self._settings.session_client_id, None)

    def _on_subscribed(self, client: MqttClient) -> None:
        self.connected = True
        self._subscribed.set()
        if self.adoption is not None:
            self.adoption.connected(client)

    def _on_lost(self) -> None:
        self.connected = False
        if self.adoption is not None:
            self.adoption.lost()

    async def _health(self, _request: web.Request) -> web.Response:
        """``GET /health``: 200 while every stage runs, 503 while any is down."""
        stages = self.stages
        body = {
            "ok": stages.ok,
            "down": dict(stages.down),
            "restarts": dict(stages.restarts),
            "diagnoses_failed": self.diagnoses_failed,
            "notifications_failed_internally": 0 if self.outbox is None else self.outbox.errors,
            # messages whose time budget (push.message_budget_s) ended before delivery
            "notifications_out_of_time": 0 if self.outbox is None else self.outbox.out_of_time,
        }
        return web.Response(
            body=orjson.dumps(body),
            status=200 if stages.ok else 503,
            content_type="application/json",
        )

    async def _digests(self) -> None:
        assert self.outbox is not None
        while True:
            await asyncio.sleep(_DIGEST_EVERY_S)
            await self.outbox.flush()

    def _note_boot(self, event: Event) -> None:
        """Remember the firmware a boot event names, for :meth:`_keep_firmware`.

        Called in the command channel's loop, so it only notes: the newest version per
        device, at most ``_MAX_PENDING_BOOTS`` devices waiting (a burst of reboots past
        that is counted and dropped: those devices say it again at their next boot).
        """
        if event.kind != "boot":
            return
        firmware = event.code or event.data.get("firmware")
        if not isinstance(firmware, str) or not firmware:
            return
        if event.device_id not in self._boots and len(self._boots) >= _MAX_PENDING_BOOTS:
            self.boots_dropped += 1
            return
        self._boots[event.device_id] = firmware
        self._boots_waiting.set()

    async def _keep_firmware(self) -> None:
        """Write the firmware boot events name to the device registry (and device record)."""
        assert self.store is not None
        registry = self.store.registry()
        while True:
            await self._boots_waiting.wait()
            self._boots_waiting.clear()
            boots, self._boots = self._boots, {}
            for device_id, firmware in boots.items():
                try:
                    if await registry.note_firmware(device_id, firmware):
                        self.firmware_noted += 1
                        _LOG.info("device %s runs firmware %s", device_id, firmware)
                except InvalidRequestError as exc:
                    _LOG.warning("boot event of %s: %s", device_id, exc)
                except TransientError:
                    # the store is away: keep what is not written for the next round
                    for left, version in boots.items():
                        self._boots.setdefault(left, version)
                    self._boots_waiting.set()
                    await asyncio.sleep(_SWEEP_EVERY_S)
                    break

    async def _sweep(self) -> None:
        """Deliver what the store holds as queued and nothing here took (at start, then often).

        Ops messages written by the dashboard (its own process) reach owners this way,
        and so do messages left queued by a notifier that stopped or lost its store.
        """
        assert self.outbox is not None
        while True:
            await self.outbox.sweep()
            await asyncio.sleep(_SWEEP_EVERY_S)

    async def _consume(self, client: MqttClient) -> None:
        loop = self.loop
        assert loop is not None
        while True:
            await client.wait_messages()
            messages = client.take(_BATCH_MAX)
            for message in messages:
                if self.adoption is not None and self.adoption.note(message.topic, message.payload):
                    continue
                try:
                    diagnosis = decode_diagnosis(message.payload)
                except RejectedError as exc:
                    self.diagnoses_refused += 1
                    _LOG.warning("refused a message on %s: %s", message.topic, exc)
                    continue
                try:
                    await loop.handle_diagnosis(diagnosis)
                except PermanentError as exc:
                    self.diagnoses_refused += 1
                    _LOG.warning(
                        "diagnosis %s of device %s not handled: %s",
                        diagnosis.fault,
                        diagnosis.device_id,
                        exc,
                    )
                except TransientError:
                    raise  # not acknowledged: the broker delivers it again
                except Exception:
                    # one diagnosis that trips the case machine must not stop the others
                    self.diagnoses_failed += 1
                    _LOG.exception(
                        "diagnosis %s of device %s failed; it is skipped, the others go on",
                        diagnosis.fault,
                        diagnosis.device_id,
                    )
                self.diagnoses_handled += 1
            client.ack_many(messages)
