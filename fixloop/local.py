"""``fixloop up``: the whole local stack in one command, for a first-time user.

Starts (sinks first, sources last) a mosquitto and an influxd from the PATH on
loopback ports with their data in one folder, the gateway, the diagnostics service,
the notifier (the owner loop and its REST API, with simulated owners and technicians
playing their part) and a simulated fleet;
prints where everything is; on Ctrl-C stops the fleet first, lets the gateway drain,
then stops the gateway and the servers. The data folder it holds is
:mod:`fixloop.datafolder`, the accounts it makes :mod:`fixloop.stackaccounts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from pydantic import SecretStr

from dashboard.app import create_app
from dashboard.feed import CaseFeed
from dashboard.keys import SESSIONS_KEY, STREAMS_KEY
from dashboard.service import follow_users
from dashboard.users import OpsUsersFile
from device_sim import FleetRunner
from diagnostics.service import DiagnosticsService
from fixloop.broker import GATEWAY_USER
from fixloop.config import ensure_fleet_secret
from fixloop.datafolder import _SIM_CLOCK_FILE, _folder_lock, _history_to_replay, _ports
from fixloop.demo import DemoPeople, SimulatedPeople, demo_faults, plan_history_faults, seed_people
from fixloop.dynsec_cli import local_admin_password
from fixloop.onboarding import service_onboarding
from fixloop.settings import Settings, StackSettings
from fixloop.stack import InfluxdServer, MosquittoServer
from fixloop.stackaccounts import (
    _LEGACY_CLIENT_IDS,
    _ensure_accounts,
    _ops_users,
    _retire_sessions,
    service_password,
    stack_client_ids,
)
from gateway.service import Gateway
from notifier.loop import OwnerLoop
from notifier.service import NotifierService
from wire.influx import InfluxClient
from wire.protocol.credentials import device_password
from wire.settings import MqttSettings

__all__ = ["run_local_stack"]

_LOG = logging.getLogger(__name__)

_STATUS_EVERY_S: Final = 15.0
_DRAIN_TIMEOUT_S: Final = 15.0
_DEMO_VERIFY: Final = {"settle_s": 60.0, "verify_window_s": 180.0, "retry_after_s": 30.0}


class _Campaigns:
    """The dashboard's campaign button, carried out by the case machine."""

    def __init__(self, loop: OwnerLoop) -> None:
        self._loop = loop

    async def start(self, device_ids: Sequence[str], action: str, reason: str) -> int:
        return await self._loop.start_campaign(device_ids, action, reason)


@contextlib.asynccontextmanager
async def _serve(app: web.Application, port: int) -> AsyncIterator[str]:
    """Serve an aiohttp app on loopback; yield its address."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = int(runner.addresses[0][1])
        yield f"http://127.0.0.1:{bound}/ops/"
    finally:
        await runner.cleanup()


def _banner(
    data_dir: Path,
    broker: MosquittoServer,
    influx: InfluxdServer,
    metrics_port: int | None,
    models: Counter[str],
    speed: object,
    trained: list[str],
    api_url: str,
    owner_token: str,
    dashboard_url: str,
    ops_login: str,
) -> str:
    fleet = ", ".join(f"{count} {model}" for model, count in sorted(models.items()))
    return "\n".join(
        [
            "",
            "fixloop is up",
            f"  broker    mqtt://{broker.host}:{broker.port}  "
            + (
                "(accounts in the dynamic-security plugin: fixloop devices credentials "
                "issue|revoke|list)"
                if broker.dynsec
                else f"(password file and ACL in {broker.root})"
            ),
            f"  InfluxDB  {influx.url}  database {influx.database}",
            f"            try: influx -port {influx.port} -database {influx.database} "
            "-execute 'SELECT COUNT(seq) FROM telemetry'",
            f"  gateway   http://127.0.0.1:{metrics_port}/metrics  and  /health",
            "  health    diagnoses on fleet/diagnoses, scores in measurement health; "
            + (
                f"fleet models for {', '.join(trained)}"
                if trained
                else "per-device baselines only (run `fixloop train` once there is history)"
            ),
            f"  dashboard {dashboard_url}  ({ops_login})",
            f"  owners    {api_url}  (OpenAPI at {api_url.removesuffix('/api/v1')}/openapi.json)",
            f"            try: curl -H 'Authorization: Bearer {owner_token}' {api_url}/cases",
            f"  fleet     {sum(models.values())} simulated devices ({fleet}), speed {speed}",
            f"  data      {data_dir}",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


async def _report(
    gateway: Gateway, diagnostics: DiagnosticsService, notifier: NotifierService
) -> None:
    metrics = gateway.metrics
    while True:
        await asyncio.sleep(_STATUS_EVERY_S)
        _LOG.info(
            "received %d, stored %d, rejected %d, spooled batches %d, lag %.1f s, "
            "scored %d, diagnosis changes %d, cases handled %d, owner messages %d",
            sum(metrics.received.values()),
            metrics.stored,
            sum(metrics.rejected.values()),
            metrics.spool_batches,
            metrics.lag_s(),
            diagnostics.readings_scored,
            diagnostics.diagnoses_published,
            notifier.diagnoses_handled,
            0 if notifier.outbox is None else notifier.outbox.written,
        )


async def _keep_sim_clock(data_dir: Path, runner: FleetRunner) -> None:
    """Keep the simulated clock in the data folder (also written on the way out)."""
    path = data_dir / _SIM_CLOCK_FILE
    try:
        while True:
            path.write_text(f"{runner.fleet.now.timestamp():.3f}\n")
            await asyncio.sleep(_STATUS_EVERY_S / 3)
    finally:
        with contextlib.suppress(OSError):
            path.write_text(f"{runner.fleet.now.timestamp():.3f}\n")


def _unless_set(chosen: set[str], **defaults: object) -> dict[str, object]:
    """The stack's defaults for the settings the user did not set."""
    return {key: value for key, value in defaults.items() if key not in chosen}


@dataclass(frozen=True, slots=True)
class _Services:
    """The running stages of the local stack."""

    gateway: Gateway
    diagnostics: DiagnosticsService
    notifier: NotifierService
    #: further stages, by name: each is started with the others and runs until the stop
    extra: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = field(default_factory=list)


async def _start_broker(
    steps: contextlib.AsyncExitStack,
    broker: MosquittoServer,
    admin_password: str | None,
    gateway_password: str,
    secret: str,
    device_ids: Sequence[str],
) -> None:
    """Step: mosquitto up, with the gateway's and the devices' accounts."""
    # Launched from this (the main) thread: the servers get SIGTERM when it ends, so a
    # kill -9 of `fixloop up` takes them along; a leftover of an older run
    # is stopped by launch() itself.
    steps.callback(broker.stop)
    broker.launch()
    await asyncio.to_thread(broker.wait_ready)
    if admin_password is not None:
        await _ensure_accounts(
            broker,
            admin_password,
            {GATEWAY_USER: gateway_password},
            {device_id: device_password(secret, device_id) for device_id in device_ids},
        )


async def _start_influxd(steps: contextlib.AsyncExitStack, influx: InfluxdServer) -> None:
    """Step: influxd up (and, on the way out, said to stop after every service)."""
    steps.callback(influx.stop)
    steps.callback(_LOG.info, "stopping influxd and mosquitto")
    influx.launch()
    await asyncio.to_thread(influx.wait_ready)


async def _run_stages(
    services: _Services,
    runner: FleetRunner,
    people: DemoPeople,
    data_dir: Path,
    stack: StackSettings,
    banner: Callable[[Counter[str]], str],
    stop: asyncio.Event,
) -> None:
    """Step: every stage in one task group until ``stop``; a crashed stage ends them all.

    Raises:
        Exception: the error a stage (or the start-up) ended with, as it raised it.
    """
    gateway, diagnostics, notifier = services.gateway, services.diagnostics, services.notifier
    assert notifier.store is not None
    assert notifier.loop is not None
    try:
        async with asyncio.TaskGroup() as stages:
            forever = [
                stages.create_task(gateway.run(), name="gateway"),
                stages.create_task(diagnostics.run(), name="diagnostics"),
                stages.create_task(notifier.run(), name="notifier"),
                stages.create_task(_report(gateway, diagnostics, notifier), name="status"),
            ]
            forever.extend(stages.create_task(start(), name=name) for name, start in services.extra)
            try:
                async with asyncio.timeout(30):
                    await gateway.wait_subscribed()
                    await diagnostics.wait_subscribed()
                    await notifier.wait_subscribed()
                shown = (
                    [d.device_id for d in await notifier.store.devices(people.owners[0])]
                    if people.owners
                    else []
                )
                # Faults a device reports only after a while go into the history the
                # fleet replays, so each is a case by the time it reaches the present;
                # the live fleet gets faults that are cases at once.
                planned = plan_history_faults(runner, datetime.now(UTC), first_for=shown)
                async with runner:
                    forever.append(
                        stages.create_task(_keep_sim_clock(data_dir, runner), name="sim-clock")
                    )
                    simulated = SimulatedPeople(notifier.store, notifier.loop, runner)
                    forever.append(stages.create_task(simulated.run(), name="people"))
                    if stack.demo_fault_every_s > 0:
                        live = demo_faults(
                            runner,
                            every_s=stack.demo_fault_every_s,
                            first_for=() if planned else shown,
                            store=notifier.store,
                        )
                        forever.append(stages.create_task(live, name="faults"))
                    models = Counter(str(d.model) for d in runner.fleet.devices)
                    print(  # noqa: T201 - the command's own output for the user
                        banner(models), file=sys.stdout, flush=True
                    )
                    fleet_report = await runner.run(stop)
                    _LOG.info("simulated fleet stopped: %s", fleet_report.summary())
                await stop.wait()  # the fleet may end first (a set duration): stay up
                # Sources are stopped: give the gateway a moment to store what it holds.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_DRAIN_TIMEOUT_S):
                        await gateway.drain()
            finally:
                for task in reversed(forever):
                    task.cancel()
    except BaseExceptionGroup as group:
        # one error is the stack's error, as the stage (or the start-up) raised it
        raise group.exceptions[0]  # noqa: B904 - the group stays its context


async def run_local_stack(settings: Settings, stop: asyncio.Event) -> None:
    """Run broker, InfluxDB, gateway and simulated fleet until ``stop`` is set.

    Raises:
        ConfigError: a binary is missing, a port is taken, or a setting is wrong.
    """
    settings = ensure_fleet_secret(settings)
    stack = settings.stack
    data_dir = stack.data_dir.resolve()
    assert stack.fleet_secret is not None  # ensure_fleet_secret filled it in
    secret = stack.fleet_secret.get_secret_value()
    gateway_password = service_password(secret, GATEWAY_USER)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = _ports(
        data_dir,
        {
            "mqtt": stack.mqtt_port,
            "influx": stack.influx_port,
            "gateway_metrics": settings.gateway.metrics_port
            if "metrics_port" in settings.gateway.model_fields_set
            else 0,
            "owner_api": settings.notifier.api_port
            if "api_port" in settings.notifier.model_fields_set
            else 0,
            "dashboard": stack.dashboard_port,
        },
    )
    mqtt_port = ports["mqtt"]

    chosen = settings.sim.model_fields_set
    # A first look should show history, not an empty chart: unless told otherwise the
    # fleet replays the last hours as fast as the stack takes them, then lives on in
    # real time (the simulator's clock never runs ahead of the wall clock).
    demo = {
        "start_offset_s": _history_to_replay(data_dir) if "start_offset_s" not in chosen else None,
        "speed": "max" if "speed" not in chosen else None,
    }
    sim_settings = settings.sim.model_copy(
        update={
            "fleet_secret": SecretStr(secret),
            "mqtt_host": "127.0.0.1",
            "mqtt_port": mqtt_port,
            "mqtt_tls": False,
        }
        | {key: value for key, value in demo.items() if value is not None}
    )
    # a simulated device whose connection ends (a second client with its id) connects
    # again rather than ending the demo
    runner = FleetRunner(sim_settings, reconnect=True)
    device_ids = runner.fleet.device_ids
    admin_password = local_admin_password(secret) if settings.broker.accounts == "dynsec" else None
    broker = MosquittoServer(
        data_dir / "mosquitto",
        users={GATEWAY_USER: gateway_password},
        device_ids=device_ids,
        fleet_secret=secret,
        port=mqtt_port,
        connection_messages=False,
        die_with_parent=True,
        dynsec_admin_password=admin_password,
    )
    influx = InfluxdServer(data_dir / "influxdb", port=ports["influx"], die_with_parent=True)
    client_ids = stack_client_ids(secret)
    gateway_settings = settings.gateway.model_copy(
        update={"spool_dir": data_dir / "spool"}
        | {"metrics_port": ports["gateway_metrics"]}
        | _unless_set(settings.gateway.model_fields_set, client_id=client_ids["gateway"])
    )
    mqtt = MqttSettings(
        host=broker.host, port=mqtt_port, username=GATEWAY_USER, password=gateway_password
    )

    # Named steps, sinks first: the servers, the services, the dashboard; then every stage
    # runs in one task group with the fleet (the source) last. Leaving undoes the steps
    # in reverse; a stage that crashes stops the whole stack at once.
    async with contextlib.AsyncExitStack() as steps:
        # One stack per data folder: a second `fixloop up` on it would start a second
        # broker and InfluxDB on the same files (and stop the first's as left behind)
        steps.enter_context(_folder_lock(data_dir))
        _LOG.info("starting mosquitto and influxd in %s", data_dir)
        await _start_broker(steps, broker, admin_password, gateway_password, secret, device_ids)
        await _start_influxd(steps, influx)
        influx_settings = settings.influx.model_copy(
            update={"url": influx.url, "flavor": "v1", "database": influx.database}
        )
        diagnostics_settings = settings.diagnostics.model_copy(
            update=_unless_set(
                settings.diagnostics.model_fields_set,
                model_path=data_dir / "models" / "diagnostics.pkl",
                client_id=client_ids["diagnostics"],
            )
        )
        notifier_settings = settings.notifier.model_copy(
            update=(
                {}
                if "db_path" in settings.notifier.model_fields_set
                else {"db_path": data_dir / "cases.sqlite3"}
            )
            | {"api_port": ports["owner_api"]}
            | _unless_set(settings.notifier.model_fields_set, client_id=client_ids["notifier"])
            # a demo shows a fix verified in minutes, not in the production hour
            | {
                key: value
                for key, value in _DEMO_VERIFY.items()
                if key not in settings.notifier.model_fields_set
            }
        )
        in_use = {
            gateway_settings.client_id,
            diagnostics_settings.client_id,
            notifier_settings.client_id,
        }
        await _retire_sessions(mqtt, _LEGACY_CLIENT_IDS - in_use)
        feed = CaseFeed()
        services = _Services(
            gateway=await steps.enter_async_context(
                Gateway(mqtt, influx_settings, gateway_settings)
            ),
            diagnostics=await steps.enter_async_context(
                DiagnosticsService(mqtt, influx_settings, diagnostics_settings)
            ),
            notifier=await steps.enter_async_context(
                NotifierService(
                    mqtt,
                    influx_settings,
                    notifier_settings,
                    on_case=feed.publish,
                    onboarding=lambda store: service_onboarding(settings, store),
                )
            ),
        )
        dashboard_influx = await steps.enter_async_context(InfluxClient(influx_settings))
        notifier = services.notifier
        assert notifier.store is not None
        assert notifier.loop is not None
        people = await seed_people(
            notifier.store,
            [(d.device_id, str(d.model), d.firmware) for d in runner.fleet.devices],
            secret,
        )
        users, ops_login = _ops_users(settings, secret)
        app = create_app(
            store=notifier.store,
            influx=dashboard_influx,
            actions=notifier.loop,
            users=users,
            campaign=_Campaigns(notifier.loop),
            feed=feed,
            settings=settings.dashboard,
        )
        dashboard = await steps.enter_async_context(_serve(app, ports["dashboard"]))
        if isinstance(users, OpsUsersFile):
            # a user removed or changed with `fixloop ops-users` loses their open sessions
            services.extra.append(
                ("ops-users", lambda: follow_users(users, app[SESSIONS_KEY], app[STREAMS_KEY]))
            )

        def banner(models: Counter[str]) -> str:
            assert services.diagnostics.engine is not None
            return _banner(
                data_dir,
                broker,
                influx,
                services.gateway.metrics_port,
                models,
                sim_settings.speed,
                sorted(services.diagnostics.engine.fleet_models),
                notifier.api_url,
                people.first_owner_token,
                dashboard,
                ops_login,
            )

        await _run_stages(services, runner, people, data_dir, stack, banner, stop)
    _LOG.info("fixloop stopped; data kept in %s", data_dir)
