"""Runs the simulated fleet against an MQTT broker (device_sim's I/O edge; ``fixloop sim``).

Each device gets its own MQTT connection (client id and user name = device id, password
derived from the fleet secret), a retained last will ``offline`` on
``devices/{id}/status``, and a QoS-1 subscription to ``devices/{id}/commands``. The
:class:`~device_sim.fleet.Fleet` is stepped one interval at a time as the
:class:`~device_sim.clock.SimClock` allows; every message it sends goes out at QoS 1 and
counts once its PUBACK is back. Commands are handed to the device at the current sim
time and its answers published on ``devices/{id}/events``. Everything runs on one event
loop (no thread per device), so thousands of devices fit in one process.

While the simulation takes a device offline (a reboot, a crash, an outage) its connection
stays open but silent: the device buffers, and the ``offline`` status the broker would
publish from the last will is published by the runner in its place. Commands that reach
an offline device are lost, as they would be with a clean session.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

from device_sim.clock import SimClock
from device_sim.described import load_sim_product
from device_sim.device import Outbound
from device_sim.faults import FaultRecord, faults_to_csv
from device_sim.fleet import Fleet
from device_sim.settings import SimSettings
from gateway.errors import BrokerUnavailableError, ConfigError
from gateway.protocol import commands_topic, status_topic
from gateway.protocol.credentials import device_password
from gateway.protocol.mqtt import Message, MqttClient, Will

__all__ = ["ConnectFactory", "DeviceConnection", "FleetReport", "FleetRunner", "run_fleet"]

_LOG = logging.getLogger(__name__)
#: First and longest pause before a device whose connection ended connects again.
_RECONNECT_FIRST_S: Final = 0.2
_RECONNECT_MAX_S: Final = 10.0


class DeviceConnection(Protocol):
    """What the runner needs of one device's MQTT connection (``MqttClient`` has it)."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Publish; at QoS 1 return after the PUBACK."""

    def messages(self) -> AsyncIterator[Message]:
        """Yield received messages."""
        ...

    def ack(self, message: Message) -> None:
        """Acknowledge a received QoS-1 message."""


#: Builds a device's connection from its id, password and last will.
ConnectFactory = Callable[[str, str, Will], DeviceConnection]


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What a run published (acknowledged by the broker) and the faults' ground truth.

    Attributes:
        start: sim time the run started at.
        end: sim time the run reached.
        readings_per_device: telemetry messages published per device.
        events_per_device: event messages published per device.
        status_messages: retained ``online``/``offline`` status messages published.
        commands_received: commands delivered to the devices' connections.
        buffered_at_end: messages still in offline buffers when the run stopped.
        dropped: messages lost to full offline buffers.
        faults: the ground truth of every fault injected.
        wall_s: real seconds the run took.
    """

    start: datetime
    end: datetime
    readings_per_device: Mapping[str, int]
    events_per_device: Mapping[str, int]
    status_messages: int
    commands_received: int
    buffered_at_end: int
    dropped: int
    faults: tuple[FaultRecord, ...]
    wall_s: float

    def summary(self) -> str:
        """One line for logs: what the run published."""
        return (
            f"{len(self.readings_per_device)} devices, {self.readings_total} readings, "
            f"{self.events_total} events, {len(self.faults)} faults, "
            f"{self.buffered_at_end} still buffered, {self.dropped} dropped, "
            f"{self.wall_s:.1f} s"
        )

    def write_ground_truth(self, path: Path) -> None:
        """Write the injected faults as CSV (see :func:`device_sim.faults.faults_to_csv`)."""
        path.write_text(faults_to_csv(self.faults), encoding="utf-8")

    @property
    def readings_total(self) -> int:
        """Telemetry messages published by the whole fleet."""
        return sum(self.readings_per_device.values())

    @property
    def events_total(self) -> int:
        """Event messages published by the whole fleet."""
        return sum(self.events_per_device.values())

    @property
    def messages_total(self) -> int:
        """Telemetry and event messages published (status messages not included)."""
        return self.readings_total + self.events_total


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class FleetRunner:
    """The simulated fleet connected to a broker, as an async context manager.

    Example::

        async with FleetRunner(settings) as runner:
            report = await runner.run(stop=stop_event)

    Args:
        settings: the fleet's settings.
        start: the sim start time (default: now minus the settings' start offset).
        connect: builds a device's connection (default: :class:`MqttClient` to the
            settings' broker); tests may hand in their own.
        reconnect: a device whose connection ends (the broker restarted, another
            client connected with its id) connects again with backoff, as a real one
            would, and the run goes on; without it the run ends with the error.
    """

    def __init__(
        self,
        settings: SimSettings,
        *,
        start: datetime | None = None,
        connect: ConnectFactory | None = None,
        reconnect: bool = False,
    ) -> None:
        if start is None:
            now = datetime.now(UTC).replace(microsecond=0)
            start = now - timedelta(seconds=settings.effective_start_offset_s)
        self.settings = settings
        self.fleet = Fleet(
            settings.devices,
            start=start,
            models=settings.models,
            products=[load_sim_product(path) for path in settings.product_files],
            seed=settings.seed,
            interval_s=settings.interval_s,
            fault_rate_per_device_month=settings.fault_rate_per_device_month,
            outage_rate_per_device_month=settings.outage_rate_per_device_month,
            outage_mean_s=settings.outage_mean_s,
            id_prefix=settings.id_prefix,
        )
        self.clock = SimClock(start, settings.pace)
        self._connect = connect or self._mqtt_connection
        self._clients: dict[str, DeviceConnection] = {}
        self._reconnect = reconnect
        self._secret = ""
        # per device: reconnections so far, and one reconnection at a time
        self._generation: Counter[str] = Counter()
        self._reconnecting: dict[str, asyncio.Lock] = {}
        self.reconnects = 0
        self._stack = AsyncExitStack()
        self._readings: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._status = 0
        self._commands = 0
        self._start = start

    # -- connections -------------------------------------------------------------------
    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.mqtt_tls:
            return None
        ca_file = self.settings.mqtt_ca_file
        try:
            return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the MQTT CA file {ca_file}: {exc}") from exc

    def _mqtt_connection(self, device_id: str, password: str, will: Will) -> DeviceConnection:
        return MqttClient(
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            client_id=device_id,
            username=device_id,
            password=password,
            clean_start=True,
            session_expiry_s=0,
            keepalive_s=30,
            will=will,
            tls=self._tls_context,
        )

    async def __aenter__(self) -> Self:
        self._tls_context = self._tls()
        limit = asyncio.Semaphore(self.settings.connect_concurrency)
        if self.settings.fleet_secret is None:
            raise ConfigError(
                "setting sim.fleet_secret: required to derive the devices' broker passwords"
            )
        secret = self._secret = self.settings.fleet_secret.get_secret_value()

        async def connect(device_id: str) -> None:
            will = Will(status_topic(device_id), b"offline", qos=1, retain=True)
            client = self._connect(device_id, device_password(secret, device_id), will)
            async with limit:
                await self._stack.enter_async_context(client)
                self._clients[device_id] = client
                await client.subscribe(commands_topic(device_id), qos=1)

        try:
            async with asyncio.TaskGroup() as group:
                for device_id in self.fleet.device_ids:
                    group.create_task(connect(device_id))
        except BaseExceptionGroup as errors:
            await self._stack.aclose()
            raise _first_error(errors) from errors
        except BaseException:
            await self._stack.aclose()
            raise
        _LOG.info(
            "sim: %d devices connected to %s:%d",
            len(self._clients),
            self.settings.mqtt_host,
            self.settings.mqtt_port,
        )
        # Devices power on as soon as they are connected: each runs its first tick (its
        # phase within the first interval) now, so it boots and answers commands at
        # once rather than up to one interval later.
        powered_on: list[Outbound] = []
        for device in self.fleet.devices:
            device.step_until(device.next_tick_ms, powered_on)
        powered_on.sort(key=itemgetter(0))
        try:
            await self._publish_batch(powered_on)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                # a clean disconnect suppresses the will: say goodbye ourselves
                async with asyncio.TaskGroup() as group:
                    for device_id in self._clients:
                        group.create_task(
                            self._publish(device_id, [(status_topic(device_id), b"offline")])
                        )
        finally:
            await self._stack.aclose()

    # -- running -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> FleetReport:
        """Run until the settings' duration has passed in sim time or ``stop`` is set.

        Raises:
            BrokerUnavailableError: a connection dropped or a PUBACK did not come in time.
            PermanentError: the broker refused a message (ACL).
        """
        began = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                listeners = [
                    group.create_task(self._listen(device_id)) for device_id in self._clients
                ]
                try:
                    await self._drive(stop)
                finally:
                    for listener in listeners:
                        listener.cancel()
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from errors
        return self.report(time.monotonic() - began)

    def report(self, wall_s: float = 0.0) -> FleetReport:
        """What has been published so far."""
        ids = self.fleet.device_ids
        devices = self.fleet.devices
        return FleetReport(
            start=self._start,
            end=self.fleet.now,
            readings_per_device={i: self._readings[i] for i in ids},
            events_per_device={i: self._events[i] for i in ids},
            status_messages=self._status,
            commands_received=self._commands,
            buffered_at_end=sum(d.buffered for d in devices),
            dropped=sum(d.dropped for d in devices),
            faults=tuple(self.fleet.ground_truth()),
            wall_s=wall_s,
        )

    async def _drive(self, stop: asyncio.Event | None) -> None:
        fleet, clock = self.fleet, self.clock
        duration = self.settings.duration_s
        end_ms = None if duration is None else clock.start_ms + round(duration * 1000)
        while end_ms is None or fleet.now_ms < end_ms:
            if stop is not None and stop.is_set():
                return
            # a paced clock that fell behind catches up in one go
            target = max(fleet.now_ms + fleet.interval_ms, clock.now_ms())
            if end_ms is not None:
                target = min(target, end_ms)
            if not await self._wait(target, stop):
                return
            for batch in fleet.iter_until(target):
                await self._publish_batch(batch)

    async def _wait(self, t_ms: int, stop: asyncio.Event | None) -> bool:
        if stop is None:
            await self.clock.wait_until(t_ms)
            return True
        clock_task = asyncio.create_task(self.clock.wait_until(t_ms))
        stop_task = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait((clock_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (clock_task, stop_task):
                task.cancel()
            await asyncio.gather(clock_task, stop_task, return_exceptions=True)
        return not stop.is_set()

    async def _publish_batch(self, batch: list[Outbound]) -> None:
        by_device: dict[str, list[tuple[str, bytes]]] = {}
        for _, topic, payload in batch:
            by_device.setdefault(topic.split("/", 2)[1], []).append((topic, payload))
        async with asyncio.TaskGroup() as group:
            for device_id, messages in by_device.items():
                group.create_task(self._publish(device_id, messages))

    async def _publish(self, device_id: str, messages: list[tuple[str, bytes]]) -> None:
        timeout_s = self.settings.publish_timeout_s
        for topic, payload in messages:
            channel = topic.rsplit("/", 1)[1]
            while True:
                generation = self._generation[device_id]
                try:
                    async with asyncio.timeout(timeout_s):
                        await self._clients[device_id].publish(
                            topic, payload, qos=1, retain=channel == "status"
                        )
                    break
                except TimeoutError as exc:
                    raise BrokerUnavailableError(
                        f"{device_id}: no PUBACK within {timeout_s} s on {topic}"
                    ) from exc
                except BrokerUnavailableError as exc:
                    if not self._reconnect:
                        raise
                    # sent again on the new connection: at worst a duplicate, which the
                    # gateway stores once (same device, same time)
                    await self._connect_again(device_id, generation, exc)
            if channel == "telemetry":
                self._readings[device_id] += 1
            elif channel == "events":
                self._events[device_id] += 1
            else:
                self._status += 1

    async def repair(self, device_id: str, part: str) -> list[str]:
        """A technician services ``part`` of a connected device now; return the faults cured.

        The device reboots (reset reason ``service``) and its messages are published
        like any other.

        Raises:
            ConfigError: unknown device, or the model has no such part.
        """
        cured, messages = self.fleet.repair(device_id, part, at=self.fleet.now)
        if device_id in self._clients:
            await self._publish(device_id, messages)
        return list(cured)

    async def _listen(self, device_id: str) -> None:
        topic = commands_topic(device_id)
        while True:
            generation = self._generation[device_id]
            client = self._clients[device_id]
            try:
                async for message in client.messages():
                    if message.topic == topic:
                        self._commands += 1
                        answers = self.fleet.send_command(
                            device_id, message.payload, at=self.clock.now_ms()
                        )
                        await self._publish(device_id, answers)
                    client.ack(message)
            except BrokerUnavailableError as exc:
                if not self._reconnect:
                    raise
                await self._connect_again(device_id, generation, exc)
            else:
                return

    async def _connect_again(
        self, device_id: str, generation: int, error: BrokerUnavailableError
    ) -> None:
        """Replace a device's lost connection, unless another task already did.

        Tries with jittered exponential backoff until it succeeds; a refusal of the
        credentials (``ConfigError``) ends the run, as at the start.
        """
        lock = self._reconnecting.setdefault(device_id, asyncio.Lock())
        async with lock:
            if self._generation[device_id] != generation:
                return  # the listener or a publisher reconnected it meanwhile
            _LOG.warning("sim device %s lost its broker connection: %s", device_id, error)
            backoff_s = _RECONNECT_FIRST_S
            while True:
                await asyncio.sleep(backoff_s * (0.5 + random.random()))
                backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)
                will = Will(status_topic(device_id), b"offline", qos=1, retain=True)
                client = self._connect(device_id, device_password(self._secret, device_id), will)
                try:
                    await self._stack.enter_async_context(client)
                    await client.subscribe(commands_topic(device_id), qos=1)
                except BrokerUnavailableError as exc:
                    _LOG.warning("sim device %s cannot reconnect yet: %s", device_id, exc)
                    continue
                break
            self._clients[device_id] = client
            self._generation[device_id] += 1
            self.reconnects += 1
            _LOG.info("sim device %s reconnected", device_id)
        if self.fleet.device(device_id).connected:
            # the broker may have published the will ("offline") when the old one ended
            await self._publish(device_id, [(status_topic(device_id), b"online")])


async def run_fleet(settings: SimSettings, *, stop: asyncio.Event | None = None) -> FleetReport:
    """Connect the simulated fleet to the settings' broker and run it (``fixloop sim``).

    Runs for ``settings.duration_s`` of sim time, or until ``stop`` is set.

    Raises:
        BrokerUnavailableError: the broker cannot be reached or dropped a connection.
        ConfigError: the broker refused the devices' credentials, or a bad TLS setting.
    """
    async with FleetRunner(settings) as runner:
        return await runner.run(stop)
