"""The device's half of contract v1 without a transport (the start of the pipeline).

:class:`DeviceCore` is everything a device does that is not moving bytes: it numbers and
checks every message against the contract and stores it in the outbox before it may
leave (:mod:`device.store`), reports the boot, decodes commands, answers each command id
once behind the device's interlocks, runs the firmware-update state machine
(:class:`~device.ota.FirmwareUpdates`) and keeps the counters. What handlers and
self-tests return, and the hooks a device registers, are :mod:`device.handlers`.
:class:`~device.sender.SendQueue` is the outbox's send policy for one connection: in
order, a bounded number in flight, at a pace, messages past the gateway's backfill
window dropped and counted, each one removed only when the broker has acknowledged it.

Two transports use them: :class:`device.client.Device` (paho-mqtt, one process per
appliance, threads) and the simulator's fleet runner (``device_sim``: thousands of
simulated appliances on one asyncio loop). Both publish what the same code built.

Nothing here starts a thread or opens a socket; a caller that shares a core between
threads calls :meth:`DeviceCore.handle_command` from one thread at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from device.contract import (
    COMMAND_ACTIONS,
    INTERRUPTING_ACTIONS,
    Command,
    CommandAction,
    DataValue,
    EventKind,
    check_device_id,
    decode_command,
    encode_event,
    encode_reading,
    events_topic,
    telemetry_topic,
)
from device.errors import CommandError, ContractError, DeviceConfigError
from device.handlers import CommandHandler, CommandResult, Interlock, SelfTestResult, event_word
from device.ota import Firmware, FirmwareUpdates, PendingUpdate
from device.store import DeviceState

__all__ = [
    "CommandHandler",
    "CommandResult",
    "DeviceCore",
    "Interlock",
    "ResetReason",
    "SelfTestResult",
]

_LOG = logging.getLogger(__name__)

ResetReason = Literal["power_on", "restart_command", "firmware_update", "watchdog", "service"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
#: The reset reason a successful command that restarts the device leaves for the next boot.
_RESTARTS: Final[Mapping[str, ResetReason]] = {
    "restart": "restart_command",
    "firmware_update": "firmware_update",
}


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class DeviceCore:
    """One device's contract logic on a store; no transport, no threads.

    Args:
        device_id: the device's id (topic and payload id).
        store: where the outbox, ``seq``, answered commands and state are kept.
        clock_ms: the device's wall clock, epoch milliseconds UTC (``ts`` of messages
            taken "now", and the backfill window).
        model: product model, reported in the ``boot`` event.
        firmware_version: firmware version for the ``boot`` event when no ``firmware``
            hooks are given.
        firmware: OTA hooks; with them ``firmware_update`` commands are handled
            (download, checksum, install, activate, boot check, rollback).
        ota_dir: where firmware images are downloaded (needed with ``firmware``).
        max_boot_attempts: boots of a new firmware without a verdict before it is
            rolled back (a crash loop).
        max_image_bytes: largest firmware image accepted.
        download_timeout_s: limit on connecting to the image server and on each read.

    Raises:
        ContractError: ``device_id`` breaks the id pattern.
    """

    def __init__(
        self,
        device_id: str,
        store: DeviceState,
        *,
        clock_ms: Callable[[], int] = _wall_ms,
        model: str | None = None,
        firmware_version: str | None = None,
        firmware: Firmware | None = None,
        ota_dir: Path | None = None,
        max_boot_attempts: int = 3,
        max_image_bytes: int = 256 * 1024 * 1024,
        download_timeout_s: float = 60.0,
    ) -> None:
        if firmware is not None and ota_dir is None:
            raise DeviceConfigError(f"{device_id}: firmware hooks need an ota_dir")
        self.device_id = check_device_id(device_id)
        self.store = store
        self.model = model
        self.firmware_version = firmware_version
        self._clock_ms = clock_ms
        self._firmware = firmware
        self._telemetry_topic = telemetry_topic(device_id)
        self._events_topic = events_topic(device_id)
        self._handlers: dict[str, tuple[CommandHandler, bool]] = {}
        self._interlocks: list[tuple[Interlock, frozenset[str]]] = []
        self.commands = 0
        self.duplicates = 0
        self.bad_commands = 0
        #: the firmware-update state machine, with OTA hooks
        self._updates = (
            None
            if firmware is None or ota_dir is None
            else FirmwareUpdates(
                self.device_id,
                firmware,
                ota_dir,
                store,
                self._event,
                max_boot_attempts=max_boot_attempts,
                max_image_bytes=max_image_bytes,
                download_timeout_s=download_timeout_s,
            )
        )

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

    def add_interlock(
        self, check: Interlock, actions: Iterable[CommandAction] = INTERRUPTING_ACTIONS
    ) -> None:
        """Guard ``actions`` with ``check``: it returns a :class:`Refusal` when unsafe now.

        By default the actions that interrupt use: restart, firmware update, cleaning
        cycle. A check that raises refuses too (without a refusal code).

        Raises:
            ContractError: an unknown action.
        """
        wanted = frozenset(actions)
        unknown = sorted(wanted - COMMAND_ACTIONS)
        if unknown:
            raise ContractError("bad_command", f"unknown actions {unknown}")
        self._interlocks.append((check, wanted))

    def on_selftest(self, run: Callable[[], SelfTestResult]) -> None:
        """Answer ``selftest`` commands by running ``run``.

        The device stores the ``selftest`` event (with the command's id) and then the
        ``command_result``.
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
    def boot(self) -> None:
        """Report the boot and settle a pending firmware update.

        The ``boot`` event carries the reset reason and whether the last run stopped
        cleanly; a pending update is confirmed (good boot) or rolled back.
        """
        store = self.store
        stored = store.get("reset_reason")
        reason = stored if isinstance(stored, str) else "power_on"
        clean = store.get("running") is not True
        version = self._firmware_version()
        data: dict[str, DataValue] = {"reset_reason": reason, "clean_shutdown": clean}
        if version is not None:
            data["firmware"] = version[:200]
        if self.model is not None:
            data["model"] = self.model[:200]
        self._event(
            "boot",
            None,
            code=event_word(version),
            data=data,
            state={"reset_reason": None, "running": True},
        )
        _LOG.debug("%s booted (%s, firmware %s)", self.device_id, reason, version)
        pending = PendingUpdate.from_json(store.get("ota"))
        if pending is not None and self._updates is not None:
            self._updates.settle(pending)

    def stop(self) -> None:
        """Note a clean stop (the next ``boot`` event says ``clean_shutdown: true``)."""
        self.store.put("running", False)

    def note_reset(self, reason: ResetReason) -> None:
        """Keep why the device is about to restart, for the next ``boot`` event."""
        self.store.put("reset_reason", reason)

    # -- messages -----------------------------------------------------------------------
    def publish_reading(
        self,
        metrics: Mapping[str, float | bool],
        *,
        status: str | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Check a reading, number it and store it in the outbox; return its ``seq``.

        Args:
            metrics: name to finite number or bool (1-64 metrics).
            status: operating state, a short word.
            ts: when it was taken (UTC-aware); now when ``None``.

        Raises:
            ContractError: the reading breaks the contract (nothing is stored).
        """
        ts_ms, now_ms = self._ts_ms(ts)
        device_id = self.device_id

        def build(seq: int) -> bytes:
            return encode_reading(device_id, seq, ts_ms, metrics, status, now_ms=now_ms)

        return self.store.append(self._telemetry_topic, build, ts_ms)

    def report_error(
        self,
        code: str,
        detail: str | None = None,
        *,
        data: Mapping[str, DataValue] | None = None,
        ts: datetime | None = None,
    ) -> int:
        """Store an error code (``E21``) as an ``error`` event; return its ``seq``.

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
        """Store something worth keeping as an ``info`` event; return its ``seq``.

        Raises:
            ContractError: the event breaks the contract (nothing is stored).
        """
        return self._event("info", ts, code=code, detail=detail, data=data)

    def report_selftest(
        self, result: SelfTestResult, *, command_id: str | None = None, ts: datetime | None = None
    ) -> int:
        """Store a self-test's verdict as a ``selftest`` event; return its ``seq``.

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

        return self.store.append(self._events_topic, build, ts_ms, state=state)

    def _ts_ms(self, ts: datetime | None) -> tuple[int, int]:
        now_ms = self._clock_ms()
        if ts is None:
            return now_ms, now_ms
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ContractError("bad_ts", "timestamps must be timezone-aware (UTC)")
        return (ts - _EPOCH) // _MS, now_ms

    # -- commands -----------------------------------------------------------------------
    def handle_command(self, payload: bytes) -> Callable[[], None] | None:
        """Decode a command, run it once behind the interlocks, store its one answer.

        A payload that breaks the contract is logged and counted (there is no id to
        answer to); a command id answered before is not run again. The caller
        acknowledges the command to the broker after this returns (the answer is
        stored by then) and, when connected, lets the outbox drain before it calls
        what this returns.

        Returns:
            What to do after the answer is out (a successful command's ``then``).
        """
        store = self.store
        try:
            command = decode_command(payload)
        except ContractError as exc:
            self.bad_commands += 1
            _LOG.warning("%s: a command breaks the contract: %s", self.device_id, exc)
            return None
        if store.was_answered(command.id):
            self.duplicates += 1
            _LOG.info("%s: command %s was answered before", self.device_id, command.id)
            return None
        result, state = self._run(command)
        seq = self._answer(command, result, state)
        if seq is None:
            self.duplicates += 1
            return None
        self.commands += 1
        _LOG.debug(
            "%s: %s (command %s): ok=%s %s",
            self.device_id,
            command.action,
            command.id,
            result.ok,
            result.detail or "",
        )
        return result.then if result.ok else None

    def _answer(
        self, command: Command, result: CommandResult, state: Mapping[str, object | None]
    ) -> int | None:
        ts_ms, _ = self._ts_ms(None)
        device_id, store, topic = self.device_id, self.store, self._events_topic

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
            return store.answer(command.id, topic, build, ts_ms, state=state)
        except ContractError as exc:
            _LOG.error(
                "%s: the answer to %s breaks the contract: %s", self.device_id, command.id, exc
            )
            safe = CommandResult(False, f"the device's answer broke the contract ({exc.reason})")
            return store.answer(command.id, topic, lambda seq: build(seq, safe), ts_ms)

    def _run(self, command: Command) -> tuple[CommandResult, dict[str, object | None]]:
        action = command.action
        registered = self._handlers.get(action)
        updates = self._updates if action == "firmware_update" else None
        if registered is None and updates is None:
            return CommandResult(False, f"this device does not do {action}"), {}
        if registered is None or registered[1]:
            refused = self._refusal(action)
            if refused is not None:
                return refused, {}
        state: dict[str, object | None] = {}
        try:
            if registered is not None:
                result = registered[0](command)
            elif updates is not None:
                result, state = updates.run(command)
            else:  # pragma: no cover - excluded above
                return CommandResult(False, f"this device does not do {action}"), {}
        except CommandError as exc:
            return CommandResult(False, str(exc)[:500]), {}
        except Exception as exc:
            _LOG.exception("%s: the %s handler failed", self.device_id, action)
            return CommandResult(False, f"{action} failed ({type(exc).__name__})"), {}
        if result.ok and result.then is not None and action in _RESTARTS:
            state.setdefault("reset_reason", _RESTARTS[action])
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

    # -- firmware -----------------------------------------------------------------------
    def _firmware_version(self) -> str | None:
        if self._firmware is not None:
            return self._firmware.version()
        return self.firmware_version
