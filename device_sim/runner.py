"""Runs the simulated fleet against an MQTT broker (device_sim's I/O edge; ``fixloop sim``).

The simulated devices run the device library's logic (:class:`device.DeviceCore` in each
:class:`~device_sim.device.SimDevice`); this module is their transport, the simulator's
counterpart of the library's paho-mqtt one, built for thousands of devices on one event
loop (no thread per device). Each device, while the simulation has it online, holds its
own MQTT 5 connection: client id and user name = device id, password derived from the
fleet secret, a retained last will ``offline`` on ``devices/{id}/status``, a QoS-1
subscription to ``devices/{id}/commands``, and a persistent session (a new one at the
device's first connection of the run, resumed after that).

The :class:`~device_sim.fleet.Fleet` is stepped one interval at a time as the
:class:`~device_sim.clock.SimClock` allows. After each step every connected device's
outbox is published in order through the library's send policy
(:class:`device.SendQueue`), one message in flight per device, and a message leaves the
outbox only when its PUBACK is back. When the simulation takes a device down (a reboot,
a crash, a power cut, an outage) its connection is dropped without DISCONNECT, so the
broker publishes the will and keeps its session: commands sent meanwhile wait at the
broker and are delivered when the device is back; the device answers each command id
once. A connection that ends on its own (the broker restarted) is opened again with
backoff when ``reconnect`` is on, while the device goes on buffering in its outbox.

What limits a replay: the library paces a real device's outbox at ``send_rate_per_s`` of
wall time; a replay at ``speed="max"`` runs sim time far faster than wall time, so the
runner does not pace: a device publishes as fast as the broker acknowledges, one
message at a time, and the fleet goes no faster than its slowest device's round trips.
Every message is still numbered, checked and encoded by the library's code, kept in the
outbox until acknowledged, and dropped only by the library's rules.

This module stays whole (about 650 lines): it is one transport, :class:`FleetRunner`,
whose connecting, reconnecting, publishing, command and stepping parts all work on the
same per-device links and the same fleet clock, as :mod:`device.client` is for one
device.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

from device.contract import commands_topic, status_topic
from device_sim.clock import SimClock
from device_sim.described import load_sim_product
from device_sim.device import Outbound, SimDevice
from device_sim.faults import FaultRecord, faults_to_csv
from device_sim.fleet import Fleet
from device_sim.settings import SimSettings
from wire.errors import BrokerUnavailableError, ConfigError, PermanentError
from wire.mqtt import Message, MqttClient, Will
from wire.protocol.credentials import device_password

__all__ = ["ConnectFactory", "DeviceConnection", "FleetReport", "FleetRunner", "run_fleet"]

_LOG = logging.getLogger(__name__)
#: First and longest pause before a device whose connection ended connects again.
_RECONNECT_FIRST_S: Final = 0.2
_RECONNECT_MAX_S: Final = 10.0
#: How long the broker keeps a device's session (and the commands sent to it) while the
#: device is away: the library's default.
_SESSION_EXPIRY_S: Final = 7 * 86_400


class DeviceConnection(Protocol):
    """What the runner needs of one device's MQTT connection (``MqttClient`` has it)."""

    async def connect(self) -> None:
        """Open the connection and wait for the CONNACK."""

    async def disconnect(self) -> None:
        """Close it cleanly (DISCONNECT: the broker does not publish the will)."""

    def abort(self) -> None:
        """Drop it as a crash would (the broker publishes the will)."""

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> None:
        """Publish; at QoS 1 return after the PUBACK.

        Raises:
            BrokerUnavailableError: the connection is gone, or no PUBACK came within the
                connection's publish timeout.
            PermanentError: the broker refused the message (an ACL).
        """

    def messages(self) -> AsyncIterator[Message]:
        """Yield received messages."""
        ...

    def ack(self, message: Message) -> None:
        """Acknowledge a received QoS-1 message."""


#: Builds a device's connection from its id, password, last will and whether it starts a
#: new session (its first connection of the run) or resumes the one the broker kept.
ConnectFactory = Callable[[str, str, Will, bool], DeviceConnection]


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What a run published (acknowledged by the broker) and the faults' ground truth.

    Attributes:
        start: sim time the run started at.
        end: sim time the run reached.
        readings_per_device: telemetry messages published per device.
        events_per_device: event messages published per device.
        status_messages: retained ``online``/``offline`` status messages published.
        commands_received: commands handed to the devices (each answered once).
        buffered_at_end: messages still in the devices' outboxes when the run stopped.
        dropped: messages lost to full outboxes.
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
    connects: int = 0

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


class _Link:
    """One device's connection as the runner keeps it."""

    __slots__ = ("client", "device", "generation", "lock", "reconnecting", "sessions", "up")

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.client: DeviceConnection | None = None
        self.generation = 0  # connections opened or dropped so far
        self.sessions = 0  # connections that reached CONNACK
        self.lock = asyncio.Lock()
        self.up = asyncio.Event()
        self.reconnecting = False


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
        reconnect: a device whose connection ends on its own (the broker restarted,
            another client connected with its id) connects again with backoff, as a
            real one would, buffering meanwhile, and the run goes on; without it the
            run ends with the error.
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
            publish=False,
        )
        self.clock = SimClock(start, settings.pace)
        self._connect = connect or self._mqtt_connection
        self._links = {device.device_id: _Link(device) for device in self.fleet.devices}
        self._reconnect = reconnect
        self._secret = ""
        self._tls_context: ssl.SSLContext | None = None
        self._limit = asyncio.Semaphore(settings.connect_concurrency)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        self._readings: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._status = 0
        self._commands = 0
        self._connects = 0
        self._start = start

    # -- connections -------------------------------------------------------------------
    def connected(self, device_id: str) -> bool:
        """Whether the device's MQTT connection is up now.

        Raises:
            ConfigError: no such device.
        """
        link = self._links.get(device_id)
        if link is None:
            raise ConfigError(f"no simulated device {device_id!r}")
        return link.client is not None

    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.mqtt_tls:
            return None
        ca_file = self.settings.mqtt_ca_file
        try:
            return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the MQTT CA file {ca_file}: {exc}") from exc

    def _mqtt_connection(
        self, device_id: str, password: str, will: Will, clean_start: bool
    ) -> DeviceConnection:
        return MqttClient(
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            client_id=device_id,
            username=device_id,
            password=password,
            clean_start=clean_start,
            session_expiry_s=_SESSION_EXPIRY_S,
            keepalive_s=30,
            will=will,
            tls=self._tls_context,
            publish_timeout_s=self.settings.publish_timeout_s,
        )

    async def __aenter__(self) -> Self:
        self._tls_context = self._tls()
        if self.settings.fleet_secret is None:
            raise ConfigError(
                "setting sim.fleet_secret: required to derive the devices' broker passwords"
            )
        self._secret = self.settings.fleet_secret.get_secret_value()
        # Devices power on now: each runs its first tick (its phase within the first
        # interval), boots and connects, so it answers commands at once rather than up
        # to one interval later.
        powered_on: list[Outbound] = []
        for device in self.fleet.devices:
            device.step_until(device.next_tick_ms, powered_on)
        try:
            await self._apply(powered_on)
        except BaseExceptionGroup as errors:
            await self._close(goodbye=False)
            raise _first_error(errors) from errors
        except BaseException:
            await self._close(goodbye=False)
            raise
        _LOG.info(
            "sim: %d devices connected to %s:%d",
            sum(1 for link in self._links.values() if link.client is not None),
            self.settings.mqtt_host,
            self.settings.mqtt_port,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(goodbye=exc_type is None)

    async def _close(self, *, goodbye: bool) -> None:
        """End every connection; a clean end says ``offline`` first (as the library does)."""

        async def close(link: _Link) -> None:
            client, link.client = link.client, None
            link.up.clear()
            if client is None:
                return
            try:
                if goodbye:
                    topic = status_topic(link.device.device_id)
                    await self._publish(link, client, topic, b"offline")
                await client.disconnect()
            except BrokerUnavailableError:
                client.abort()

        async with asyncio.TaskGroup() as group:
            for link in self._links.values():
                group.create_task(close(link))

    async def _open(self, link: _Link, *, retrying: bool = False) -> bool:
        """Connect a device that wants to be online; return whether it is connected.

        A failure with ``reconnect`` during a run leaves the device offline and tries
        again later (``retrying``: the caller is that later).

        Raises:
            BrokerUnavailableError: the broker cannot be reached (without ``reconnect``
                during a run, or at the start).
            ConfigError: the broker refused the device's credentials.
        """
        device = link.device
        device_id = device.device_id
        will = Will(status_topic(device_id), b"offline", qos=1, retain=True)
        client = self._connect(
            device_id, device_password(self._secret, device_id), will, link.sessions == 0
        )
        try:
            async with self._limit:
                await client.connect()
                await client.subscribe(commands_topic(device_id), qos=1)
        except BrokerUnavailableError:
            client.abort()
            if not self._reconnect or self._group is None:
                raise
            if not retrying:
                self._reconnect_later(link)
            return False
        link.client = client
        link.generation += 1
        link.sessions += 1
        self._connects += 1
        device.sender.restart()  # a new connection starts from the oldest unacknowledged
        link.up.set()
        await self._publish(link, client, status_topic(device_id), b"online")
        return link.client is client

    def _drop(self, link: _Link) -> None:
        """The device went down: drop its connection as a crash would (the will fires)."""
        client, link.client = link.client, None
        link.up.clear()
        if client is not None:
            link.generation += 1
            client.abort()

    def _lost(self, link: _Link, client: DeviceConnection, error: BaseException) -> None:
        """A connection ended on its own; reconnect later, or end the run."""
        if link.client is not client:
            return  # already dropped or replaced
        if not self._reconnect or self._group is None:
            raise BrokerUnavailableError(
                f"{link.device.device_id}: lost its broker connection: {error}"
            ) from error
        _LOG.warning("sim device %s lost its broker connection: %s", link.device.device_id, error)
        self._drop(link)
        self._reconnect_later(link)

    def _reconnect_later(self, link: _Link) -> None:
        if link.reconnecting or self._group is None:
            return
        link.reconnecting = True
        task = self._group.create_task(self._reconnect_loop(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect_loop(self, link: _Link) -> None:
        """Try again with jittered exponential backoff while the device wants to be online.

        A refusal of the credentials (``ConfigError``) ends the run, as at the start.
        """
        backoff_s = _RECONNECT_FIRST_S
        try:
            while True:
                await asyncio.sleep(backoff_s * (0.5 + random.random()))
                backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)
                async with link.lock:
                    if link.client is not None or not link.device.connected:
                        return  # back already, or the device went down meanwhile
                    if await self._open(link, retrying=True):
                        self.reconnects += 1
                        _LOG.info("sim device %s reconnected", link.device.device_id)
                        await self._send(link)
                        return
        finally:
            link.reconnecting = False

    # -- publishing --------------------------------------------------------------------
    async def _publish(
        self, link: _Link, client: DeviceConnection, topic: str, payload: bytes
    ) -> bool | None:
        """Publish one message at QoS 1 and wait for its PUBACK.

        Returns:
            True when acknowledged, False when the connection broke (the message stays
            in the outbox), None when the broker refused it for good (an ACL; the
            library drops and counts such a message rather than block the rest).
        """
        channel = topic.rsplit("/", 1)[1]
        try:
            # the connection's own publish timeout bounds the wait for the PUBACK
            await client.publish(topic, payload, qos=1, retain=channel == "status")
        except BrokerUnavailableError as exc:
            self._lost(link, client, exc)
            return False
        except PermanentError as exc:
            _LOG.error("sim device %s: %s", link.device.device_id, exc)
            return None
        if channel == "telemetry":
            self._readings[link.device.device_id] += 1
        elif channel == "events":
            self._events[link.device.device_id] += 1
        else:
            self._status += 1
        return True

    async def _send(self, link: _Link) -> None:
        """Publish the device's outbox in order; each message leaves it on its PUBACK."""
        sender = link.device.sender
        try:
            while (client := link.client) is not None:
                rows = sender.next()
                if not rows:
                    return
                for row in rows:
                    done = await self._publish(link, client, row.topic, row.payload)
                    if done is None:
                        sender.refused(row.id)
                    elif done:
                        sender.acked(row.id)
                    else:
                        return  # the rest waits in the outbox for the next connection
        finally:
            sender.settle()

    async def _serve(self, link: _Link, changes: list[bytes]) -> None:
        """Follow the device's link changes in order, then publish its outbox."""
        async with link.lock:
            await self._follow(link, changes)
            if link.client is not None:
                await self._send(link)

    async def _follow(self, link: _Link, changes: list[bytes]) -> None:
        for change in changes:
            if change == b"offline":
                self._drop(link)
            elif link.client is None and not link.reconnecting:
                await self._open(link)

    async def _apply(self, batch: list[Outbound]) -> None:
        """Act on one step of the fleet: link changes, then every outbox to publish."""
        changes: dict[str, list[bytes]] = {}
        for _, topic, payload in batch:
            changes.setdefault(topic.split("/", 2)[1], []).append(payload)
        async with asyncio.TaskGroup() as group:
            for device_id, link in self._links.items():
                mine = changes.get(device_id)
                if mine is not None or (link.client is not None and link.device.buffered):
                    group.create_task(self._serve(link, mine or []))

    # -- running -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> FleetReport:
        """Run until the settings' duration has passed in sim time or ``stop`` is set.

        A message the broker refuses for good (an ACL) is dropped and counted as
        ``refused`` in the device's store, as the library does.

        Raises:
            BrokerUnavailableError: a connection dropped or a PUBACK did not come in
                time (without ``reconnect``).
        """
        began = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for link in self._links.values():
                    self._tasks.add(group.create_task(self._listen(link)))
                try:
                    await self._drive(stop)
                finally:
                    self._group = None
                    for task in self._tasks:
                        task.cancel()
                    self._tasks.clear()
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
            connects=self._connects,
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
                await self._apply(batch)

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

    async def repair(self, device_id: str, part: str) -> list[str]:
        """A technician services ``part`` of a device now; return the faults cured.

        The device reboots (reset reason ``service``); what it sends is published like
        anything else.

        Raises:
            ConfigError: unknown device, or the model has no such part.
        """
        cured, changes = self.fleet.repair(device_id, part, at=self.fleet.now)
        link = self._links[device_id]
        await self._serve(link, [payload for _, payload in changes])
        return list(cured)

    # -- commands ----------------------------------------------------------------------
    async def _listen(self, link: _Link) -> None:
        """Hand the device the commands its connections receive, for the whole run."""
        device = link.device
        topic = commands_topic(device.device_id)
        while True:
            await link.up.wait()
            client = link.client
            if client is None:  # pragma: no cover - up is cleared with the client
                await asyncio.sleep(0)
                continue
            try:
                async for message in client.messages():
                    if message.topic != topic:
                        client.ack(message)
                        continue
                    await self._command(link, client, message)
            except BrokerUnavailableError as exc:
                # dropped on purpose, replaced, or lost: wait for the next connection
                async with link.lock:
                    self._lost(link, client, exc)

    async def _command(self, link: _Link, client: DeviceConnection, message: Message) -> None:
        """Answer one command; not acknowledged if the device is down by then.

        An unacknowledged command is delivered again when the device's session resumes;
        the library answers a command id once, however often it comes.
        """
        device = link.device
        async with link.lock:
            if link.client is not client:
                return
            changes: list[Outbound] = []
            device.step_until(max(self.clock.now_ms(), device.now_ms), changes)
            await self._follow(link, [payload for _, _, payload in changes])
            if link.client is not client or not device.connected:
                return
            self._commands += 1
            then = device.receive_command(message.payload)
            await self._send(link)  # the answer goes out before anything it announced
            if link.client is not client:
                return
            client.ack(message)
            after: list[Outbound] = []
            device.after_command(then, after)
            await self._follow(link, [payload for _, _, payload in after])
            if link.client is not None:
                await self._send(link)


async def run_fleet(settings: SimSettings, *, stop: asyncio.Event | None = None) -> FleetReport:
    """Connect the simulated fleet to the settings' broker and run it (``fixloop sim``).

    Runs for ``settings.duration_s`` of sim time, or until ``stop`` is set.

    Raises:
        BrokerUnavailableError: the broker cannot be reached or dropped a connection.
        ConfigError: the broker refused the devices' credentials, or a bad TLS setting.
    """
    async with FleetRunner(settings) as runner:
        return await runner.run(stop)
