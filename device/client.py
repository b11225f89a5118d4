"""One device speaking contract v1 over MQTT 5 with paho-mqtt (the start of the pipeline).

A :class:`Device` is what an appliance's program embeds::

    settings = DeviceSettings(device_id="washer-0042", host="mqtt.example.com", port=8883,
                              data_dir=Path("/var/lib/appliance"), password=...,
                              tls=TlsSettings(ca_file=Path("/etc/appliance/ca.pem")))
    device = Device(settings)
    device.add_interlock(door_interlock)          # refuse restarts while the door is open
    device.on_command("restart", restart)         # returns a CommandResult
    with device:                                  # start: boot event, connect, backfill
        while True:
            device.publish_reading({"water_temp_c": 41.5, "door_open": False},
                                   status="washing")

What it does for the program:

* **Connection**: client id and user name = the device id; password or client
  certificate; TLS with the broker's CA. A persistent session (clean start off, session
  expiry ``session_expiry_s``), so commands sent while the device is offline or
  rebooting wait at the broker and arrive after it reconnects. Reconnects back off
  exponentially from ``reconnect_min_s`` to ``reconnect_max_s`` with jitter (a random
  delay between half and all of the current step), so a fleet does not reconnect in
  step after a broker restart.
* **Status**: last will ``offline`` (retained, QoS 1) on ``devices/{id}/status``;
  ``online`` (retained) after each connect; ``offline`` on a clean stop.
* **Messages**: :meth:`Device.publish_reading` and the ``report_*`` methods check the
  message against the contract (:class:`~device.errors.ContractError` otherwise),
  number it with the next ``seq`` and store it in the on-disk outbox
  (:mod:`device.store`) before they return. A network thread publishes the outbox in
  order at QoS 1, at most ``send_rate_per_s`` messages a second and ``max_inflight``
  unacknowledged, and deletes each message when its PUBACK arrives. Offline, messages
  wait in the outbox (bounded; the oldest are dropped and counted) and are published
  later with their original ``ts`` and ``seq``; a message published twice (a PUBACK
  lost in a disconnect) is the same point at the gateway.
* **Commands**: handlers per action run one at a time on a worker thread, behind the
  interlocks (a refusal answers ``ok: false`` with the refusal's code and
  ``refused: <words>``). Each command is answered with exactly one ``command_result``
  event; the answer and the command id are stored in one transaction, and the command
  is acknowledged to the broker only after that, so a redelivered or repeated command id
  is recognised (also after a restart) and not run again.
* **Boot**: a ``boot`` event at every start (firmware, model, ``reset_reason``, whether
  the last run stopped cleanly), and the outcome of a pending firmware update
  (:mod:`device.ota`).

The library is synchronous and thread-based, like paho-mqtt itself: the program calls it
from any thread; handlers run on the library's worker thread. Everything but the
transport (contract checks, ``seq``, outbox and send policy, commands, interlocks, OTA)
is :mod:`device.core`, which the simulator (``device_sim``) runs on its own transport.

This module stays whole (about 710 lines): it is one transport, :class:`Device`, whose
network thread, command worker and the program's calls share one connection's state
(the paho client, the send queue, the connected and stopping events); split, each part
would reach into the others'.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Final, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device.contract import (
    COMMAND_ACTIONS,
    INTERRUPTING_ACTIONS,
    CommandAction,
    DataValue,
    commands_topic,
    status_topic,
)
from device.core import (
    CommandHandler,
    CommandResult,
    DeviceCore,
    Interlock,
    ResetReason,
    SelfTestResult,
)
from device.errors import ContractError, DeviceConfigError, DeviceError
from device.ota import Firmware
from device.sender import SendQueue
from device.settings import DeviceSettings
from device.store import DeviceStore

__all__ = [
    "CommandHandler",
    "CommandResult",
    "Device",
    "DeviceStats",
    "Interlock",
    "ResetReason",
    "SelfTestResult",
]

_LOG = logging.getLogger(__name__)

#: How long the network thread waits for traffic before it looks at the outbox again.
_TICK_S: Final = 0.05
_COMMAND_QUEUE: Final = 100
_SETTLE_S: Final = 5.0
_GOODBYE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """A snapshot of the device's counters.

    Attributes:
        connected: whether the broker connection is up.
        seq: the last sequence number used.
        buffered: messages in the outbox (not yet acknowledged by the broker).
        dropped: messages dropped because the outbox was full (ever, persisted).
        expired: messages dropped as older than the backfill window (ever, persisted).
        refused: messages the broker refused for good, e.g. its ACL (ever, persisted).
        published: messages acknowledged by the broker since start.
        connects: successful connects since start.
        commands: commands answered since start.
        duplicates: repeated command ids ignored since start.
        bad_commands: command payloads that break the contract since start.
        last_error: the last connection error, in words.
    """

    connected: bool
    seq: int
    buffered: int
    dropped: int
    expired: int
    refused: int
    published: int
    connects: int
    commands: int
    duplicates: int
    bad_commands: int
    last_error: str | None


@dataclass(slots=True)
class _Connection:
    """State of one MQTT connection (a new paho client per connection)."""

    generation: int
    started: float
    ready: bool = False
    refused_by_broker: bool = False
    error: str | None = None
    inflight: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Incoming:
    generation: int
    mid: int
    qos: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Ack:
    generation: int
    mid: int
    qos: int
    done: threading.Event


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho-mqtt 2.x drops the socket of a failed handshake without closing it (an untrusted
    broker certificate would leak one socket per reconnect attempt).
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class Device:
    """One device on contract v1; start with :meth:`start` or a ``with`` block.

    Args:
        settings: connection, store and limits.
        firmware: OTA hooks; with them ``firmware_update`` commands are handled
            (download, checksum, install, activate, boot check, rollback).
        clock: wall clock in seconds (``ts`` of messages taken "now").
    """

    def __init__(
        self,
        settings: DeviceSettings,
        *,
        firmware: Firmware | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self._firmware = firmware
        self._clock_ms = lambda: int(clock() * 1000)
        self._registrations: list[Callable[[DeviceCore], None]] = []
        self._core: DeviceCore | None = None
        self._sender: SendQueue | None = None
        self._tls: ssl.SSLContext | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._incoming: queue.Queue[_Incoming | None] = queue.Queue(_COMMAND_QUEUE)
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._connects = 0
        self._last_error: str | None = None

    # -- registration -------------------------------------------------------------------
    def _register(self, actions: Iterable[str], step: Callable[[DeviceCore], None]) -> None:
        unknown = sorted(set(actions) - COMMAND_ACTIONS)
        if unknown:  # refused now, not at start
            raise ContractError("bad_command", f"unknown actions {unknown}")
        self._registrations.append(step)
        if self._core is not None:
            step(self._core)

    def on_command(
        self, action: CommandAction, handler: CommandHandler, *, interlocked: bool = True
    ) -> None:
        """Handle ``action`` with ``handler``.

        Args:
            action: one of the contract's actions.
            handler: does the command; raise :class:`~device.errors.CommandError` to
                answer ``ok: false`` with its message.
            interlocked: pass the interlocks that guard ``action`` first (see
                :meth:`add_interlock`); ``False`` skips them for this handler.

        Raises:
            ContractError: ``action`` is not one of the contract's actions.
        """
        self._register(
            (action,), lambda core: core.on_command(action, handler, interlocked=interlocked)
        )

    def command(
        self, action: CommandAction, *, interlocked: bool = True
    ) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator form of :meth:`on_command`."""

        def register(handler: CommandHandler) -> CommandHandler:
            self.on_command(action, handler, interlocked=interlocked)
            return handler

        return register

    def add_interlock(
        self, check: Interlock, actions: Iterable[CommandAction] = INTERRUPTING_ACTIONS
    ) -> None:
        """Guard ``actions`` with ``check``: it returns a :class:`Refusal` when unsafe now.

        By default the actions that interrupt use: restart, firmware update, cleaning
        cycle. A check that raises refuses too (without a refusal code).
        """
        wanted = tuple(actions)
        self._register(wanted, lambda core: core.add_interlock(check, wanted))

    def on_selftest(self, run: Callable[[], SelfTestResult]) -> None:
        """Answer ``selftest`` commands by running ``run``.

        The device publishes the ``selftest`` event (with the command's id) and then
        the ``command_result``.
        """
        self._register((), lambda core: core.on_selftest(run))

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, report the boot, check a pending update, start connecting.

        Raises:
            DeviceConfigError: the store or a TLS file cannot be used.
            DeviceError: already started.
        """
        if self._core is not None:
            raise DeviceError(f"{self.device_id} is already started")
        self._tls = self._tls_context()
        settings = self.settings
        store = DeviceStore.open(
            settings.data_dir / "device.sqlite3",
            max_messages=settings.max_buffered,
            fsync=settings.fsync,
        )
        core = DeviceCore(
            self.device_id,
            store,
            clock_ms=self._clock_ms,
            model=settings.model,
            firmware_version=settings.firmware,
            firmware=self._firmware,
            ota_dir=settings.data_dir / "ota",
            max_boot_attempts=settings.max_boot_attempts,
            max_image_bytes=settings.max_image_bytes,
            download_timeout_s=settings.download_timeout_s,
        )
        for step in self._registrations:
            step(core)
        self._stopping.clear()
        try:
            core.boot()
        except BaseException:
            store.close()
            raise
        self._core = core
        self._sender = SendQueue(
            store,
            clock_ms=self._clock_ms,
            max_inflight=settings.max_inflight,
            rate_per_s=settings.send_rate_per_s,
        )
        self._threads = [
            threading.Thread(target=self._network, name=f"{self.device_id}-mqtt", daemon=True),
            threading.Thread(target=self._work, name=f"{self.device_id}-commands", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current command, say ``offline``, disconnect and close the store.

        Messages not yet acknowledged stay in the outbox for the next start.
        """
        core = self._core
        if core is None:
            return
        self._incoming_put(None)
        deadline = time.monotonic() + timeout_s
        if len(self._threads) > 1:
            self._threads[1].join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self._threads[0].join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        core.stop()
        self._core = None
        self._sender = None
        core.store.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up and takes this device's commands."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for :attr:`connected`; return whether it is."""
        return self._connected.wait(timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the broker acknowledged every stored message."""
        return self._require_core().store.wait_empty(timeout_s)

    def stats(self) -> DeviceStats:
        """The device's counters now."""
        core = self._require_core()
        store = core.store
        sender = self._sender
        return DeviceStats(
            connected=self.connected,
            seq=store.seq,
            buffered=store.count,
            dropped=store.counter("dropped"),
            expired=store.counter("expired"),
            refused=store.counter("refused"),
            published=0 if sender is None else sender.published,
            connects=self._connects,
            commands=core.commands,
            duplicates=core.duplicates,
            bad_commands=core.bad_commands,
            last_error=self._last_error,
        )

    # -- messages -----------------------------------------------------------------------
    def publish_reading(
        self,
        metrics: Mapping[str, float | bool],
        *,
        status: str | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Store a reading for publishing; it is on disk when this returns.

        Args:
            metrics: name to finite number or bool (1-64 metrics).
            status: operating state, a short word.
            ts: when it was taken (UTC-aware); now when ``None``.

        Returns:
            The reading's ``seq``.

        Raises:
            ContractError: the reading breaks the contract (nothing is stored).
        """
        return self._require_core().publish_reading(metrics, status=status, ts=ts)

    def report_error(
        self,
        code: str,
        detail: str | None = None,
        *,
        data: Mapping[str, DataValue] | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Report an error code (``E21``) as an ``error`` event; return its ``seq``.

        Raises:
            ContractError: the event breaks the contract (nothing is stored).
        """
        return self._require_core().report_error(code, detail, data=data, ts=ts)

    def report_info(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        data: Mapping[str, DataValue] | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Report something worth keeping as an ``info`` event; return its ``seq``.

        Raises:
            ContractError: the event breaks the contract (nothing is stored).
        """
        return self._require_core().report_info(detail, code=code, data=data, ts=ts)

    def report_selftest(
        self, result: SelfTestResult, *, command_id: str | None = None, ts: datetime | None = None
    ) -> int:
        """Report a self-test's verdict as a ``selftest`` event; return its ``seq``.

        Raises:
            ContractError: the event breaks the contract (nothing is stored).
        """
        return self._require_core().report_selftest(result, command_id=command_id, ts=ts)

    def _require_core(self) -> DeviceCore:
        core = self._core
        if core is None:
            raise DeviceError(f"{self.device_id} is not started")
        return core

    # -- commands -----------------------------------------------------------------------
    def _incoming_put(self, item: _Incoming | None) -> bool:
        try:
            self._incoming.put(item, timeout=0 if item is not None else 5.0)
        except queue.Full:
            return False
        return True

    def _work(self) -> None:
        core = self._require_core()
        while True:
            item = self._incoming.get()
            if item is None:
                return
            then = None
            try:
                then = core.handle_command(item.payload)
            finally:
                done = threading.Event()
                self._acks.put(_Ack(item.generation, item.mid, item.qos, done))
            if then is not None:
                # the restart comes last: answer stored, command acknowledged, answer sent
                done.wait(_SETTLE_S)
                core.store.wait_empty(_SETTLE_S)
                try:
                    then()
                except Exception:
                    _LOG.exception("%s: the action after a command failed", self.device_id)

    # -- connection ---------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if tls is None:
            return None
        try:
            context = ssl.create_default_context(
                cafile=None if tls.ca_file is None else str(tls.ca_file)
            )
            if tls.cert_file is not None:
                context.load_cert_chain(tls.cert_file, tls.key_file)
            context.sslsocket_class = _ClosingSSLSocket
        except (OSError, ssl.SSLError) as exc:
            raise DeviceConfigError(f"{self.device_id}: cannot load TLS files: {exc}") from exc
        return context

    def _new_client(self, conn: _Connection) -> mqtt.Client:
        settings = self.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            userdata=conn,
            manual_ack=True,
        )
        client.connect_timeout = settings.connect_timeout_s
        client.max_inflight_messages = settings.max_inflight
        username = settings.username or settings.device_id
        if settings.password is not None or settings.tls is None:
            client.username_pw_set(username, settings.password)
        elif settings.username is not None:
            client.username_pw_set(username)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.will_set(status_topic(settings.device_id), b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    def _backoff_s(self, attempt: int) -> float:
        settings = self.settings
        step = min(settings.reconnect_max_s, settings.reconnect_min_s * 2 ** min(attempt - 1, 30))
        return random.uniform(step / 2, step)  # jitter, not a secret

    def _fail(self, error: str) -> None:
        if error != self._last_error:
            _LOG.warning("%s: %s", self.device_id, error)
        self._last_error = error

    def _network(self) -> None:
        settings = self.settings
        attempt = 0
        while not self._stopping.is_set():
            self._generation += 1
            conn = _Connection(self._generation, time.monotonic())
            client = self._new_client(conn)
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = settings.session_expiry_s
            try:
                client.connect(
                    settings.host,
                    settings.port,
                    keepalive=settings.keepalive_s,
                    clean_start=False,
                    properties=properties,
                )
            except OSError as exc:
                self._fail(f"cannot connect to {settings.host}:{settings.port}: {exc}")
            else:
                if self._serve(client, conn):
                    attempt = 0
            self._connected.clear()
            self._require_sender().settle()
            del client
            if self._stopping.is_set():
                return
            attempt += 1
            self._stopping.wait(self._backoff_s(attempt))

    def _serve(self, client: mqtt.Client, conn: _Connection) -> bool:
        """Run one connection until it drops or the device stops; return if it was up."""
        limit_s = self.settings.connect_timeout_s
        while not self._stopping.is_set():
            rc = client.loop(timeout=_TICK_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                why = rc.name if conn.error is None else f"{rc.name}: {conn.error}"
                if conn.ready:
                    self._fail(f"connection lost ({why})")
                elif not conn.refused_by_broker:
                    # a TLS refusal (unknown CA, no certificate) shows here, in paho's words
                    self._fail(f"connection closed before it was accepted ({why})")
                return conn.ready
            if not conn.ready:
                if time.monotonic() - conn.started > limit_s:
                    self._fail(f"no CONNACK within {limit_s:g} s")
                    client.disconnect()
                    return False
                continue
            self._send_acks(client, conn)
            sender = self._require_sender()
            sender.settle()
            self._pump(client, conn, sender)
        if conn.ready:
            self._goodbye(client, conn)
        return conn.ready

    def _on_connect(
        self,
        client: mqtt.Client,
        conn: _Connection,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            conn.refused_by_broker = True
            self._fail(f"the broker refused the connection: {reason}")
            return
        conn.ready = True
        self._connects += 1
        self._require_sender().restart()
        client.subscribe(commands_topic(self.device_id), qos=1)
        client.publish(status_topic(self.device_id), b"online", qos=1, retain=True)
        if flags.session_present:
            self._connected.set()  # the broker kept the subscription: commands flow now
        _LOG.info(
            "%s: connected to %s:%d (session %s)",
            self.device_id,
            self.settings.host,
            self.settings.port,
            "resumed" if flags.session_present else "new",
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        conn: _Connection,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        # up once the broker took the command subscription: a command sent after
        # wait_connected() returns reaches this device even on its first session
        if conn.ready:
            self._connected.set()

    def _on_log(self, client: mqtt.Client, conn: _Connection, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and conn.error is None:
            conn.error = text  # the first error says why; later ones are consequences

    def _on_message(
        self, client: mqtt.Client, conn: _Connection, message: mqtt.MQTTMessage
    ) -> None:
        if message.topic != commands_topic(self.device_id):
            if message.qos:
                client.ack(message.mid, message.qos)
            return
        item = _Incoming(conn.generation, message.mid, message.qos, bytes(message.payload))
        if not self._incoming_put(item):
            # not acknowledged: the broker delivers it again after the next connect
            _LOG.warning("%s: command queue full; a command waits for redelivery", self.device_id)

    def _on_publish(
        self,
        client: mqtt.Client,
        conn: _Connection,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        row = conn.inflight.pop(mid, None)
        if row is None:
            return  # the status message
        sender = self._require_sender()
        if reason.is_failure:
            _LOG.error("%s: the broker refused message %d: %s", self.device_id, row, reason)
            sender.refused(row)
        else:
            sender.acked(row)

    def _send_acks(self, client: mqtt.Client, conn: _Connection) -> None:
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return
            if ack.generation == conn.generation and ack.qos:
                client.ack(ack.mid, ack.qos)
            ack.done.set()

    def _require_sender(self) -> SendQueue:
        sender = self._sender
        if sender is None:
            raise DeviceError(f"{self.device_id} is not started")
        return sender

    def _pump(self, client: mqtt.Client, conn: _Connection, sender: SendQueue) -> None:
        for row in sender.next(len(conn.inflight)):
            info = client.publish(row.topic, row.payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # the connection is going; the next one starts from the outbox
            conn.inflight[info.mid] = row.id

    def _goodbye(self, client: mqtt.Client, conn: _Connection) -> None:
        """Clean stop: retained ``offline`` (a clean disconnect suppresses the will)."""
        self._send_acks(client, conn)
        info = client.publish(status_topic(self.device_id), b"offline", qos=1, retain=True)
        deadline = time.monotonic() + _GOODBYE_S
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=_TICK_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        client.disconnect()
