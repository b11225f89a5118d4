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
from any thread; handlers run on the library's worker thread.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Final, Literal, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device.contract import (
    COMMAND_ACTIONS,
    INTERRUPTING_ACTIONS,
    MAX_AGE_MS,
    WORD_PATTERN,
    Command,
    CommandAction,
    DataValue,
    EventKind,
    Refusal,
    commands_topic,
    decode_command,
    encode_event,
    encode_reading,
    events_topic,
    status_topic,
    telemetry_topic,
)
from device.errors import CommandError, ContractError, DeviceConfigError, DeviceError, OtaError
from device.ota import Firmware, PendingUpdate, download_image, parse_update, version_key
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

ResetReason = Literal["power_on", "restart_command", "firmware_update", "watchdog", "service"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
#: How long the network thread waits for traffic before it looks at the outbox again.
_TICK_S: Final = 0.05
#: Messages read from the outbox at a time.
_BATCH: Final = 200
#: Spare minute: a message this close to the gateway's backfill window is not sent.
_EXPIRY_MARGIN_MS: Final = 60_000
_COMMAND_QUEUE: Final = 100
_SETTLE_S: Final = 5.0
_GOODBYE_S: Final = 2.0
_WORD_RE: Final = re.compile(WORD_PATTERN)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command handler did; becomes the ``command_result`` event.

    Attributes:
        ok: whether the device did it.
        detail: plain words for people (why not, or what happens now).
        code: a short word (an error code, the new firmware version).
        data: named values to report with it.
        then: run after the result is stored and the command acknowledged (and, when
            connected, published): the restart itself, so the answer is not lost with
            the process.
    """

    ok: bool
    detail: str | None = None
    code: str | None = None
    data: Mapping[str, DataValue] = field(default_factory=dict)
    then: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """A self-test's verdict; becomes a ``selftest`` event.

    Attributes:
        passed: whether everything passed.
        code: verdict or first fault code (``PASS``, ``E21``).
        detail: what was found, in plain words.
        data: the measurements.
    """

    passed: bool
    code: str | None = None
    detail: str | None = None
    data: Mapping[str, DataValue] = field(default_factory=dict)


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


#: A command handler: gets the command, returns what it did.
CommandHandler = Callable[[Command], CommandResult]
#: An interlock: ``None`` when the action is safe now, else why not.
Interlock = Callable[[], Refusal | None]


@dataclass(slots=True)
class _Connection:
    """State of one MQTT connection (a new paho client per connection)."""

    generation: int
    started: float
    ready: bool = False
    refused_by_broker: bool = False
    error: str | None = None
    inflight: dict[int, int] = field(default_factory=dict)
    queue: deque[tuple[int, str, bytes, int]] = field(default_factory=deque)
    cursor: int = 0
    seen_appends: int = -1
    acked: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)


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


def _word(value: str | None) -> str | None:
    """``value`` when it can be an event ``code``, else ``None`` (a free-form version)."""
    if value is None or _WORD_RE.fullmatch(value) is None:
        return None
    return value


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
        self._clock = clock
        self._handlers: dict[str, tuple[CommandHandler, bool]] = {}
        self._interlocks: list[tuple[Interlock, frozenset[str]]] = []
        self._store: DeviceStore | None = None
        self._tls: ssl.SSLContext | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._incoming: queue.Queue[_Incoming | None] = queue.Queue(_COMMAND_QUEUE)
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._tokens = float(settings.max_inflight)
        self._tokens_at = time.monotonic()
        self._published = 0
        self._connects = 0
        self._commands = 0
        self._duplicates = 0
        self._bad_commands = 0
        self._last_error: str | None = None

    # -- registration -------------------------------------------------------------------
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
        if action not in COMMAND_ACTIONS:
            raise ContractError("bad_command", f"unknown action {action!r}")
        self._handlers[action] = (handler, interlocked)

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
        wanted = frozenset(actions)
        unknown = sorted(wanted - COMMAND_ACTIONS)
        if unknown:
            raise ContractError("bad_command", f"unknown actions {unknown}")
        self._interlocks.append((check, wanted))

    def on_selftest(self, run: Callable[[], SelfTestResult]) -> None:
        """Answer ``selftest`` commands by running ``run``.

        The device publishes the ``selftest`` event (with the command's id) and then
        the ``command_result``.
        """

        def handle(command: Command) -> CommandResult:
            result = run()
            self.report_selftest(result, command_id=command.id)
            verdict = "passed" if result.passed else f"found {result.detail or result.code}"
            data = dict(result.data)
            data["passed"] = result.passed
            return CommandResult(True, f"self-test {verdict}"[:500], result.code, data)

        self.on_command("selftest", handle)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, report the boot, check a pending update, start connecting.

        Raises:
            DeviceConfigError: the store or a TLS file cannot be used.
            DeviceError: already started.
        """
        if self._store is not None:
            raise DeviceError(f"{self.device_id} is already started")
        self._tls = self._tls_context()
        settings = self.settings
        store = DeviceStore.open(
            settings.data_dir / "device.sqlite3",
            max_messages=settings.max_buffered,
            fsync=settings.fsync,
        )
        self._store = store
        self._stopping.clear()
        try:
            self._boot(store)
        except BaseException:
            self._store = None
            store.close()
            raise
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
        store = self._store
        if store is None:
            return
        self._incoming_put(None)
        deadline = time.monotonic() + timeout_s
        if len(self._threads) > 1:
            self._threads[1].join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self._threads[0].join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        store.put("running", False)
        self._store = None
        store.close()

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
        """Whether the broker connection is up."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the broker connection; return whether it is up."""
        return self._connected.wait(timeout_s)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the broker acknowledged every stored message."""
        return self._require_store().wait_empty(timeout_s)

    def stats(self) -> DeviceStats:
        """The device's counters now."""
        store = self._require_store()
        return DeviceStats(
            connected=self.connected,
            seq=store.seq,
            buffered=store.count,
            dropped=store.counter("dropped"),
            expired=store.counter("expired"),
            refused=store.counter("refused"),
            published=self._published,
            connects=self._connects,
            commands=self._commands,
            duplicates=self._duplicates,
            bad_commands=self._bad_commands,
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
        ts_ms, now_ms = self._ts_ms(ts)
        device_id = self.device_id

        def build(seq: int) -> bytes:
            return encode_reading(device_id, seq, ts_ms, metrics, status, now_ms=now_ms)

        return self._append(telemetry_topic(device_id), build, ts_ms)

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
        return self._event("error", ts, code=code, detail=detail, data=data)

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
        return self._event("info", ts, code=code, detail=detail, data=data)

    def report_selftest(
        self, result: SelfTestResult, *, command_id: str | None = None, ts: datetime | None = None
    ) -> int:
        """Report a self-test's verdict as a ``selftest`` event; return its ``seq``.

        Raises:
            ContractError: the event breaks the contract (nothing is stored).
        """
        return self._event(
            "selftest",
            ts,
            code=result.code,
            command_id=command_id,
            ok=result.passed,
            detail=result.detail,
            data=result.data,
        )

    def _event(
        self,
        kind: EventKind,
        ts: datetime | None,
        *,
        code: str | None = None,
        command_id: str | None = None,
        ok: bool | None = None,
        detail: str | None = None,
        data: Mapping[str, DataValue] | None = None,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        ts_ms, now_ms = self._ts_ms(ts)
        device_id = self.device_id

        def build(seq: int) -> bytes:
            return encode_event(
                device_id,
                seq,
                ts_ms,
                kind,
                code=code,
                command_id=command_id,
                ok=ok,
                detail=detail,
                data=data,
                now_ms=now_ms,
            )

        return self._append(events_topic(device_id), build, ts_ms, state=state)

    def _append(
        self,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        return self._require_store().append(topic, build, ts_ms, state=state)

    def _ts_ms(self, ts: datetime | None) -> tuple[int, int]:
        now_ms = int(self._clock() * 1000)
        if ts is None:
            return now_ms, now_ms
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ContractError("bad_ts", "timestamps must be timezone-aware (UTC)")
        return (ts - _EPOCH) // _MS, now_ms

    def _require_store(self) -> DeviceStore:
        store = self._store
        if store is None:
            raise DeviceError(f"{self.device_id} is not started")
        return store

    # -- boot and OTA -------------------------------------------------------------------
    def _firmware_version(self) -> str | None:
        if self._firmware is not None:
            return self._firmware.version()
        return self.settings.firmware

    def _boot(self, store: DeviceStore) -> None:
        stored = store.get("reset_reason")
        reason = stored if isinstance(stored, str) else "power_on"
        clean = store.get("running") is not True
        version = self._firmware_version()
        data: dict[str, DataValue] = {"reset_reason": reason, "clean_shutdown": clean}
        if version is not None:
            data["firmware"] = version[:200]
        if self.settings.model is not None:
            data["model"] = self.settings.model[:200]
        self._event(
            "boot",
            None,
            code=_word(version),
            data=data,
            state={"reset_reason": None, "running": True},
        )
        _LOG.info("%s booted (%s, firmware %s)", self.device_id, reason, version)
        pending = PendingUpdate.from_json(store.get("ota"))
        if pending is not None and self._firmware is not None:
            self._check_update(store, self._firmware, pending)

    def _check_update(self, store: DeviceStore, firmware: Firmware, pending: PendingUpdate) -> None:
        attempts = pending.attempts + 1
        store.put("ota", {**pending.to_json(), "attempts": attempts})
        running = firmware.version()
        if running != pending.version:
            self._event(
                "error",
                None,
                code="OTA_BOOT_FAILED",
                command_id=pending.command_id,
                ok=False,
                detail=f"firmware {pending.version} did not boot; running {running}",
                data={"version": pending.version, "running": running},
                state={"ota": None},
            )
            return
        verdict: bool | None = None
        if attempts <= self.settings.max_boot_attempts:
            try:
                verdict = firmware.boot_ok()
            except Exception:
                _LOG.exception("%s: the boot check of %s failed", self.device_id, pending.version)
                verdict = False
        if verdict:
            self._event(
                "info",
                None,
                code=_word(pending.version),
                command_id=pending.command_id,
                ok=True,
                detail=f"firmware {pending.version} is running (was {pending.previous})",
                data={"version": pending.version, "previous": pending.previous},
                state={"ota": None},
            )
            return
        why = (
            "failed its boot check"
            if verdict is False
            else f"stopped {attempts - 1} times before its boot check"
        )
        self._event(
            "error",
            None,
            code="OTA_ROLLBACK",
            command_id=pending.command_id,
            ok=False,
            detail=f"firmware {pending.version} {why}; rolling back to {pending.previous}",
            data={"version": pending.version, "previous": pending.previous},
            state={"ota": None, "reset_reason": "firmware_update"},
        )
        _LOG.warning("%s: rolling back %s to %s", self.device_id, running, pending.previous)
        try:
            firmware.rollback(pending.previous)
        except OtaError as exc:
            self._event(
                "error",
                None,
                code="OTA_ROLLBACK_FAILED",
                command_id=pending.command_id,
                ok=False,
                detail=f"rollback to {pending.previous} failed: {exc}"[:500],
            )

    def _firmware_update(
        self, command: Command, firmware: Firmware
    ) -> tuple[CommandResult, dict[str, object | None]]:
        try:
            request = parse_update(command.args)
        except OtaError as exc:
            return CommandResult(False, str(exc)), {}
        installed = firmware.version()
        if request.version == installed:
            return CommandResult(True, f"already on {installed}; nothing to do"), {}
        try:
            older = version_key(request.version) < version_key(installed)
        except ValueError:
            older = False  # an installed version of another scheme: no order to keep
        if older:
            detail = f"{request.version} is older than the installed {installed}; not installed"
            return CommandResult(False, detail), {}
        try:
            image = download_image(
                request,
                self.settings.data_dir / "ota",
                max_bytes=self.settings.max_image_bytes,
                timeout_s=self.settings.download_timeout_s,
            )
        except OtaError as exc:
            code = "OTA_CHECKSUM" if "checksum" in str(exc) else "OTA_DOWNLOAD"
            _LOG.warning("%s: %s", self.device_id, exc)
            return CommandResult(False, str(exc)[:500], code), {}
        try:
            firmware.install(image, request.version)
        except OtaError as exc:
            return CommandResult(False, f"install failed: {exc}"[:500], "OTA_INSTALL"), {}
        finally:
            image.unlink(missing_ok=True)
        pending = PendingUpdate(request.version, installed, command.id)
        result = CommandResult(
            True,
            f"updated from {installed} to {request.version}; restarting",
            _word(request.version),
            then=firmware.activate,
        )
        return result, {"ota": pending.to_json(), "reset_reason": "firmware_update"}

    # -- commands -----------------------------------------------------------------------
    def _incoming_put(self, item: _Incoming | None) -> bool:
        try:
            self._incoming.put(item, timeout=0 if item is not None else 5.0)
        except queue.Full:
            return False
        return True

    def _work(self) -> None:
        while True:
            item = self._incoming.get()
            if item is None:
                return
            then = None
            try:
                then = self._handle(item.payload)
            finally:
                done = threading.Event()
                self._acks.put(_Ack(item.generation, item.mid, item.qos, done))
            if then is not None:
                # the restart comes last: answer stored, command acknowledged, answer sent
                done.wait(_SETTLE_S)
                self._require_store().wait_empty(_SETTLE_S)
                try:
                    then()
                except Exception:
                    _LOG.exception("%s: the action after a command failed", self.device_id)

    def _handle(self, payload: bytes) -> Callable[[], None] | None:
        store = self._require_store()
        try:
            command = decode_command(payload)
        except ContractError as exc:
            self._bad_commands += 1
            _LOG.warning("%s: a command breaks the contract: %s", self.device_id, exc)
            return None
        if store.was_answered(command.id):
            self._duplicates += 1
            _LOG.info("%s: command %s was answered before", self.device_id, command.id)
            return None
        result, state = self._run(command)
        seq = self._answer(store, command, result, state)
        if seq is None:
            self._duplicates += 1
            return None
        self._commands += 1
        _LOG.info(
            "%s: %s (command %s): ok=%s %s",
            self.device_id,
            command.action,
            command.id,
            result.ok,
            result.detail or "",
        )
        return result.then if result.ok else None

    def _answer(
        self,
        store: DeviceStore,
        command: Command,
        result: CommandResult,
        state: Mapping[str, object | None],
    ) -> int | None:
        ts_ms, _ = self._ts_ms(None)
        device_id = self.device_id

        def build(seq: int, answer: CommandResult = result) -> bytes:
            return encode_event(
                device_id,
                seq,
                ts_ms,
                "command_result",
                code=answer.code,
                command_id=command.id,
                ok=answer.ok,
                detail=answer.detail,
                data=answer.data,
            )

        try:
            seq = store.answer(command.id, events_topic(device_id), build, ts_ms, state=state)
        except ContractError as exc:
            _LOG.error(
                "%s: the answer to %s breaks the contract: %s", self.device_id, command.id, exc
            )
            safe = CommandResult(False, f"the device's answer broke the contract ({exc.reason})")
            seq = store.answer(
                command.id,
                events_topic(device_id),
                lambda seq: build(seq, safe),
                ts_ms,
            )
        return seq

    def _run(self, command: Command) -> tuple[CommandResult, dict[str, object | None]]:
        action = command.action
        registered = self._handlers.get(action)
        firmware = self._firmware if action == "firmware_update" else None
        if registered is None and firmware is None:
            return CommandResult(False, f"this device does not do {action}"), {}
        if registered is None or registered[1]:
            refused = self._refusal(action)
            if refused is not None:
                return refused, {}
        state: dict[str, object | None] = {}
        try:
            if registered is not None:
                result = registered[0](command)
            elif firmware is not None:
                result, state = self._firmware_update(command, firmware)
            else:  # pragma: no cover - excluded above
                return CommandResult(False, f"this device does not do {action}"), {}
        except CommandError as exc:
            return CommandResult(False, str(exc)[:500]), {}
        except Exception as exc:
            _LOG.exception("%s: the %s handler failed", self.device_id, action)
            return CommandResult(False, f"{action} failed ({type(exc).__name__})"), {}
        if result.ok and result.then is not None and action == "restart":
            state["reset_reason"] = "restart_command"
        return result, state

    def _refusal(self, action: str) -> CommandResult | None:
        for check, actions in self._interlocks:
            if action not in actions:
                continue
            try:
                refusal = check()
            except Exception:
                # unknown is not safe; no refusal code, as none of them is the reason
                _LOG.exception("%s: an interlock failed; refusing %s", self.device_id, action)
                return CommandResult(False, "refused: the device could not check it is safe now")
            if refusal is not None:
                return CommandResult(False, refusal.detail, refusal.code)
        return None

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
            self._settle(conn)
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
            self._settle(conn)
            self._pump(client, conn)
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
        client.subscribe(commands_topic(self.device_id), qos=1)
        client.publish(status_topic(self.device_id), b"online", qos=1, retain=True)
        self._connected.set()
        _LOG.info(
            "%s: connected to %s:%d (session %s)",
            self.device_id,
            self.settings.host,
            self.settings.port,
            "resumed" if flags.session_present else "new",
        )

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
        if reason.is_failure:
            _LOG.error("%s: the broker refused message %d: %s", self.device_id, row, reason)
            conn.refused.append(row)
        else:
            conn.acked.append(row)
            self._published += 1

    def _send_acks(self, client: mqtt.Client, conn: _Connection) -> None:
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return
            if ack.generation == conn.generation and ack.qos:
                client.ack(ack.mid, ack.qos)
            ack.done.set()

    def _settle(self, conn: _Connection) -> None:
        store = self._store
        if store is None:
            return
        for rows, counter in (
            (conn.acked, None),
            (conn.refused, "refused"),
            (conn.expired, "expired"),
        ):
            if rows:
                store.remove(rows, counter=counter)
                rows.clear()

    def _pump(self, client: mqtt.Client, conn: _Connection) -> None:
        store = self._store
        if store is None:
            return
        settings = self.settings
        now = time.monotonic()
        self._tokens = min(
            float(settings.max_inflight),
            self._tokens + (now - self._tokens_at) * settings.send_rate_per_s,
        )
        self._tokens_at = now
        oldest_ms = int(self._clock() * 1000) - MAX_AGE_MS + _EXPIRY_MARGIN_MS
        while len(conn.inflight) < settings.max_inflight and self._tokens >= 1.0:
            if not conn.queue:
                appends = store.appended
                if appends == conn.seen_appends:
                    return  # nothing new since the outbox was last read empty
                rows = store.pending(conn.cursor, _BATCH)
                if not rows:
                    conn.seen_appends = appends
                    return
                conn.queue.extend((r.id, r.topic, r.payload, r.ts_ms) for r in rows)
            row_id, topic, payload, ts_ms = conn.queue.popleft()
            conn.cursor = row_id
            if ts_ms < oldest_ms:
                conn.expired.append(row_id)
                continue
            info = client.publish(topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # the connection is going; the next one starts from the outbox
            conn.inflight[info.mid] = row_id
            self._tokens -= 1.0

    def _goodbye(self, client: mqtt.Client, conn: _Connection) -> None:
        """Clean stop: retained ``offline`` (a clean disconnect suppresses the will)."""
        self._send_acks(client, conn)
        info = client.publish(status_topic(self.device_id), b"offline", qos=1, retain=True)
        deadline = time.monotonic() + _GOODBYE_S
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=_TICK_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        client.disconnect()
