"""Firmware layer of one simulated device (device_sim): the device library plus physics.

A :class:`SimDevice` is the device library's contract logic (:class:`device.DeviceCore`:
``seq``, contract checks and encoder, outbox with backfill, the boot event, commands
answered once behind the device's interlocks) on an in-memory store
(:class:`device.MemoryDeviceStore`, the simulated device's flash, which survives its
reboots), with an appliance's physics (:mod:`device_sim.appliances`) and fault injection
around it. It samples every ``interval_s`` of sim time, reboots (``boot`` events, gaps
while down), and its command handlers drive the physics; every message it sends was
built and checked by the same code a real appliance runs.

Everything here is pure: no I/O, no clocks, no global random state. Time is epoch
milliseconds handed in by :class:`device_sim.fleet.Fleet`. With ``publish=True`` the
device publishes its outbox at once into the caller's list (an instant broker: the
pure fleet for tests and benchmarks); with ``publish=False`` a transport
(:class:`device_sim.runner.FleetRunner`) publishes it through :attr:`SimDevice.sender`
and only what the broker acknowledged leaves the outbox. Output messages are
``(emit_ms, topic, payload)``: the sim time the device sent it, the topic and the bytes;
``online``/``offline`` on the status topic mark the link coming up and going down.

This module stays whole (about 690 lines): :class:`SimDevice` is one simulated device,
whose faults, outages, boots, commands and physics steps all read and change the same
state in sim time; the physics are apart (:mod:`device_sim.appliance` and one module per
model).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Final, cast

from device import (
    Command,
    CommandResult,
    DeviceCore,
    MemoryDeviceStore,
    Refusal,
    ResetReason,
    SendQueue,
)
from device import SelfTestResult as LibrarySelfTest
from device.contract import status_topic
from device.ota import version_key
from device_sim.appliance import Appliance, Notice
from device_sim.appliances import make_appliance
from device_sim.described import DescribedAppliance, SimProduct
from device_sim.faults import (
    FAULTS,
    MODEL_NAMES,
    CureAction,
    FaultRecord,
    FaultSpec,
    faults_for_model,
)
from wire.errors import ConfigError

__all__ = ["DEFAULT_FIRMWARE", "Outbound", "SimDevice"]

_LOG = logging.getLogger(__name__)

#: A message leaving a device: sim time it was sent (ms), topic, payload.
Outbound = tuple[int, str, bytes]

#: The firmware every simulated device ships with.
DEFAULT_FIRMWARE: Final = "2.3.1"
_MONTH_MS: Final = 30 * 86_400_000
_MAX_PHYSICS_STEP_S: Final = 15.0
_VERSION_RE: Final = re.compile(r"\d{1,4}(\.\d{1,4}){0,3}")
_DRIFT_K: Final = 5.0
_CLEANABLE_CLOG: Final = 0.9
_SENSOR_FAULTS: Final = frozenset({"sensor_drift", "sensor_stuck"})
_ONLINE: Final = b"online"
_OFFLINE: Final = b"offline"
#: Messages a simulated device hands its transport at a time.
_SEND_WINDOW: Final = 1_000


def _utc(t_ms: int) -> datetime:
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC)


class _ActiveFault:
    """A fault in effect on one device (mutable simulation state, not an API type)."""

    __slots__ = ("failure_ms", "name", "onset_ms", "record", "shape", "value")

    def __init__(
        self,
        name: str,
        onset_ms: int,
        failure_ms: int | None,
        record: int,
        value: float,
        shape: float,
    ) -> None:
        self.name = name
        self.onset_ms = onset_ms
        self.failure_ms = failure_ms
        self.record = record
        self.value = value
        self.shape = shape

    def severity(self, t_ms: int) -> float:
        if self.failure_ms is None:
            return 1.0
        span = max(self.failure_ms - self.onset_ms, 1)
        progress = min(1.0, max(0.0, (t_ms - self.onset_ms) / span))
        return float(progress**self.shape)


def _fault_specs(model: str, product: SimProduct | None) -> dict[str, FaultSpec]:
    """The faults that can strike a device of ``model``.

    A built-in model's own; a described product's from its file, plus the firmware faults
    every device has (and the sensor faults, with a main temperature sensor).
    """
    if product is None:
        return {name: FAULTS[name] for name in faults_for_model(model)}
    every = frozenset(MODEL_NAMES)
    specs = {
        name: spec
        for name, spec in FAULTS.items()
        if spec.models == every
        and (name not in _SENSOR_FAULTS or product.primary_metric is not None)
    }
    for fault in product.faults.values():
        specs[fault.name] = FaultSpec(
            fault.name,
            frozenset({model}),
            gradual=True,
            remote_cure=cast("CureAction | None", fault.cure),
            repair_part=fault.part,
            min_days=fault.min_days,
            max_days=fault.max_days,
            shape=fault.shape,
            description=fault.description,
        )
    return specs


class SimDevice:
    """One simulated device: the device library's logic, an appliance and its faults.

    Attributes:
        device_id: the device's id (broker user name and client id).
        index: the device's index in the fleet (its random stream is ``seed + index``).
        model: the product model.
        product: the product file's simulation, for a product not built in.
        appliance: the physics.
        core: the device library's contract logic this device runs.
        sender: the send policy of its outbox (the library's), for a transport.
        publish: whether the device publishes its outbox itself (an instant broker).
        readings_taken: readings the device took (each is published once, late or not,
            unless its outbox overflows).
        readings_sent: telemetry messages published by the device itself.
        events_sent: event messages published by the device itself.
        commands_held: commands that reached the device while it was offline and wait
            for it (with ``publish``: the broker's persistent session, modelled).
    """

    def __init__(
        self,
        device_id: str,
        index: int,
        model: str,
        *,
        seed: int,
        start_ms: int,
        interval_s: float,
        firmware: str = DEFAULT_FIRMWARE,
        fault_rate_per_device_month: float = 0.0,
        outage_rate_per_device_month: float = 0.0,
        outage_mean_s: float = 1_800.0,
        buffer_limit: int = 20_000,
        product: SimProduct | None = None,
        publish: bool = True,
    ) -> None:
        base = random.Random(seed + index)
        # two streams from the device's one seed: physics, and faults/firmware behaviour,
        # so injecting a fault by API leaves the random fault schedule unchanged
        self.rng = random.Random(base.getrandbits(64))
        self._fault_rng = random.Random(base.getrandbits(64))
        self.device_id = device_id
        self.index = index
        self.model = model
        self.product = product
        self.appliance: Appliance = (
            make_appliance(model, self.rng)
            if product is None
            else DescribedAppliance(self.rng, product)
        )
        self._specs = _fault_specs(model, product)
        self.interval_ms = max(1, round(interval_s * 1000))
        self.now_ms = start_ms
        self.next_tick_ms = start_ms + self.rng.randrange(self.interval_ms)
        self._physics_ms = start_ms
        self.publish = publish
        store = MemoryDeviceStore(max_messages=buffer_limit)
        self.core = DeviceCore(
            device_id, store, clock_ms=self._clock_ms, model=model, firmware_version=firmware
        )
        self.sender = SendQueue(store, clock_ms=self._clock_ms, max_inflight=_SEND_WINDOW)
        self._register(self.core)
        self.readings_sent = 0
        self.events_sent = 0
        self.commands_held = 0
        self._held: list[bytes] = []
        self._restart: tuple[ResetReason, str] | None = None
        self.running = False
        self.connected = False
        self._down_until_ms: int | None = start_ms
        self._outages: list[tuple[int, int]] = []
        self._power_cuts: list[tuple[int, int]] = []
        self.readings_taken = 0
        self._pending: list[_ActiveFault] = []
        self._active: dict[str, _ActiveFault] = {}
        self.records: list[FaultRecord] = []
        self._crash_ms: int | None = None
        self._bug_ms: int | None = None
        self._fault_rate_per_ms = fault_rate_per_device_month / _MONTH_MS
        self._next_fault_ms = self._draw_after(start_ms, self._fault_rate_per_ms)
        self._outage_rate_per_ms = outage_rate_per_device_month / _MONTH_MS
        self._outage_mean_ms = outage_mean_s * 1000.0
        self._next_outage_ms = self._draw_after(start_ms, self._outage_rate_per_ms)

    def _clock_ms(self) -> int:
        return self.now_ms

    # -- public state ----------------------------------------------------------------
    @property
    def firmware(self) -> str:
        """The installed firmware version."""
        return self.core.firmware_version or DEFAULT_FIRMWARE

    @property
    def seq(self) -> int:
        """The last sequence number used (the first message has seq 1)."""
        return self.core.store.seq

    @property
    def active_faults(self) -> frozenset[str]:
        """The faults in effect now."""
        return frozenset(self._active)

    @property
    def buffered(self) -> int:
        """How many messages wait in the outbox (not yet acknowledged by a broker)."""
        return self.core.store.count

    @property
    def dropped(self) -> int:
        """Messages lost because the outbox was full (the oldest go first)."""
        return self.core.store.counter("dropped")

    def severity(self, fault: str) -> float:
        """Return the current severity of ``fault`` in ``[0, 1]`` (0 when not active)."""
        active = self._active.get(fault)
        return 0.0 if active is None else active.severity(self.now_ms)

    # -- scheduling ------------------------------------------------------------------
    def _draw_after(self, t_ms: int, rate_per_ms: float) -> int | None:
        if rate_per_ms <= 0.0:
            return None
        return t_ms + max(1, round(self._fault_rng.expovariate(rate_per_ms)))

    def inject(
        self, fault: str, at_ms: int, duration_to_failure_s: float | None, value: float | None
    ) -> FaultRecord:
        """Schedule ``fault`` to begin at ``at_ms`` and record it as ground truth.

        Raises:
            ConfigError: the fault does not apply to this model, is already in effect or
                scheduled, or a gradual fault lacks a positive duration.
        """
        spec = self._specs.get(fault)
        if spec is None:
            if fault not in FAULTS:
                known = ", ".join([*FAULTS, *(f for f in self._specs if f not in FAULTS)])
                raise ConfigError(f"unknown fault {fault!r}; known: {known}")
            raise ConfigError(f"fault {fault} cannot strike a {self.model} ({self.device_id})")
        if fault in self._active or any(p.name == fault for p in self._pending):
            raise ConfigError(f"{self.device_id} already has {fault} in effect or scheduled")
        failure_ms: int | None = None
        if spec.gradual:
            if duration_to_failure_s is None:
                days = self._fault_rng.uniform(spec.min_days, spec.max_days)
                duration_to_failure_s = days * 86_400
            if duration_to_failure_s <= 0:
                raise ConfigError(f"duration to failure of {fault} must be positive")
            failure_ms = at_ms + round(duration_to_failure_s * 1000)
        if value is None and fault == "sensor_drift":
            value = _DRIFT_K if self._fault_rng.random() < 0.5 else -_DRIFT_K
        record = FaultRecord(
            device_id=self.device_id,
            fault=fault,
            onset=_utc(at_ms),
            failure_at=None if failure_ms is None else _utc(failure_ms),
            model=self.model,
        )
        self.records.append(record)
        pending = _ActiveFault(
            fault,
            at_ms,
            failure_ms,
            len(self.records) - 1,
            float("nan") if value is None else value,
            spec.shape,
        )
        self._pending.append(pending)
        self._pending.sort(key=lambda p: p.onset_ms)
        return record

    def schedule_outage(self, at_ms: int, duration_ms: int) -> None:
        """Cut the device's connectivity from ``at_ms`` for ``duration_ms`` (it keeps running)."""
        self._outages.append((at_ms, at_ms + max(1, duration_ms)))
        self._outages.sort()

    def schedule_power_cut(self, at_ms: int, duration_ms: int) -> None:
        """Cut the device's power from ``at_ms`` for ``duration_ms``.

        It stops at once (no readings meanwhile: a gap), keeps what its flash holds
        (the outbox, ``seq``, answered commands) and boots again afterwards (reset
        reason ``power_on``, not a clean shutdown).
        """
        self._power_cuts.append((at_ms, at_ms + max(1, duration_ms)))
        self._power_cuts.sort()

    def _in_outage(self, t_ms: int) -> bool:
        while self._outages and self._outages[0][1] <= t_ms:
            self._outages.pop(0)
        return bool(self._outages) and self._outages[0][0] <= t_ms

    # -- messages --------------------------------------------------------------------
    def drain(self, t_ms: int, out: list[Outbound]) -> None:
        """Publish the outbox into ``out`` at ``t_ms`` (an instant broker acknowledges all).

        Does nothing unless the device publishes itself and is connected.
        """
        if not (self.publish and self.connected) or not self.core.store.count:
            return
        sender = self.sender
        while True:
            rows = sender.next()
            for row in rows:
                out.append((t_ms, row.topic, row.payload))
                if row.topic.endswith("/telemetry"):
                    self.readings_sent += 1
                else:
                    self.events_sent += 1
                sender.acked(row.id)
            sender.settle()
            if len(rows) < sender.max_inflight:
                return

    def _event(
        self,
        kind: str,
        *,
        code: str | None = None,
        detail: str | None = None,
        data: dict[str, float | bool | str] | None = None,
    ) -> None:
        if kind == "error":
            self.core.report_error(code or "E00", detail, data=data)
        else:
            self.core.report_info(detail, code=code, data=data)

    def _notice(self, notice: Notice) -> None:
        self._event(notice.kind, code=notice.code, detail=notice.detail, data=dict(notice.data))

    def _link(self, t_ms: int, out: list[Outbound]) -> None:
        """Bring the connection up or down; on reconnect publish the backlog first."""
        wanted = self.running and not self._in_outage(t_ms)
        if wanted == self.connected:
            return
        topic = status_topic(self.device_id)
        if not wanted:
            # what the device sent before it went: out first (or left in the outbox)
            self.drain(t_ms, out)
            # the device cannot say so itself: this stands for the broker's last will
            out.append((t_ms, topic, _OFFLINE))
            self.connected = False
            return
        self.connected = True
        self.sender.restart()
        out.append((t_ms, topic, _ONLINE))
        self.drain(t_ms, out)
        if self.publish and self._held:
            # the broker delivers what waited in the device's session
            held, self._held = self._held, []
            for payload in held:
                self._command(payload, t_ms, out)

    # -- time ------------------------------------------------------------------------
    def step_until(self, t_ms: int, out: list[Outbound]) -> None:
        """Run every tick up to and including ``t_ms``, appending what the device sends."""
        while self.next_tick_ms <= t_ms:
            tick = self.next_tick_ms
            self.now_ms = tick
            self._tick(tick, out)
            self.next_tick_ms = tick + self.interval_ms
        self.now_ms = max(self.now_ms, t_ms)

    def _tick(self, t_ms: int, out: list[Outbound]) -> None:
        self._schedule(t_ms)
        while self._power_cuts and self._power_cuts[0][0] <= t_ms:
            _, back_ms = self._power_cuts.pop(0)
            if back_ms > t_ms:
                if self.running:
                    self._reboot(t_ms, "power_on", out, cured_by="power_cut")
                self._down_until_ms = max(self._down_until_ms or 0, back_ms)
        if not self.running:
            if self._down_until_ms is None or t_ms < self._down_until_ms:
                self._physics_ms = t_ms  # unpowered: no physics, no readings (a gap)
                return
            self._boot(t_ms, out)
        self._link(t_ms, out)
        self._activate(t_ms)
        self._apply_faults(t_ms)
        notices = self._physics(t_ms)
        for notice in notices:
            if notice.code == "cleaning_done":
                self._after_cleaning(t_ms)
            self._notice(notice)
        if self._bug_ms is not None and t_ms >= self._bug_ms:
            self._event("error", code="F07", detail="internal error in the control software")
            self._bug_ms = t_ms + round(self._fault_rng.uniform(1.0, 6.0) * 3_600_000)
        appliance = self.appliance
        self.core.publish_reading(appliance.metrics(), status=appliance.status())
        self.readings_taken += 1
        self.drain(t_ms, out)
        if self._crash_ms is not None and t_ms >= self._crash_ms:
            self._reboot(t_ms, "watchdog", out, cured_by="watchdog_reboot")

    def _physics(self, t_ms: int) -> list[Notice]:
        dt_s = (t_ms - self._physics_ms) / 1000.0
        self._physics_ms = t_ms
        if dt_s <= 0.0:
            return []
        steps = max(1, int(dt_s / _MAX_PHYSICS_STEP_S + 0.999))
        notices: list[Notice] = []
        sub = dt_s / steps
        for i in range(steps):
            at = t_ms - round((steps - 1 - i) * sub * 1000)
            notices += self.appliance.step(at, sub)
        return notices

    def _schedule(self, t_ms: int) -> None:
        if self._next_fault_ms is not None and t_ms >= self._next_fault_ms:
            self._random_fault(self._next_fault_ms)
            self._next_fault_ms = self._draw_after(self._next_fault_ms, self._fault_rate_per_ms)
        if self._next_outage_ms is not None and t_ms >= self._next_outage_ms:
            duration = min(
                2 * 86_400_000.0,
                max(60_000.0, self._fault_rng.expovariate(1.0 / self._outage_mean_ms)),
            )
            self.schedule_outage(self._next_outage_ms, round(duration))
            self._next_outage_ms = self._draw_after(self._next_outage_ms, self._outage_rate_per_ms)

    def _random_fault(self, at_ms: int) -> None:
        busy = set(self._active) | {p.name for p in self._pending}
        choices = [f for f in self._specs if f not in busy]
        if not choices:
            return
        fault = self._fault_rng.choice(choices)
        self.inject(fault, at_ms, None, None)

    # -- faults ----------------------------------------------------------------------
    def _activate(self, t_ms: int) -> None:
        while self._pending and self._pending[0].onset_ms <= t_ms:
            fault = self._pending.pop(0)
            self._active[fault.name] = fault
            if fault.name == "sensor_stuck" and fault.value != fault.value:  # NaN: not given
                fault.value = self.appliance.primary_c
            elif fault.name == "crash_loop":
                self._crash_ms = self._next_crash(t_ms)
            elif fault.name == "firmware_bug":
                self._bug_ms = t_ms + round(self._fault_rng.uniform(0.1, 2.0) * 3_600_000)
            elif fault.name == "controller_hang":
                self._event("error", code="E90", detail="the control task stopped responding")

    def _next_crash(self, t_ms: int) -> int:
        return t_ms + round(self._fault_rng.uniform(3.0, 20.0) * 60_000)

    def _apply_faults(self, t_ms: int) -> None:
        appliance = self.appliance
        severity: dict[str, float] = {}
        for name, fault in self._active.items():
            if self._specs[name].gradual:
                severity[name] = fault.severity(t_ms)
        appliance.severity = severity
        drift = self._active.get("sensor_drift")
        appliance.sensor.offset_c = 0.0 if drift is None else drift.value * severity["sensor_drift"]
        stuck = self._active.get("sensor_stuck")
        appliance.sensor.stuck_c = None if stuck is None else round(stuck.value, 1)
        appliance.hung = "controller_hang" in self._active

    def _cure(self, fault: str, t_ms: int, by: str) -> bool:
        active = self._active.pop(fault, None)
        if active is None:
            return False
        self.records[active.record] = replace(
            self.records[active.record], cured_at=_utc(t_ms), cured_by=by
        )
        if fault == "crash_loop":
            self._crash_ms = None
        elif fault == "firmware_bug":
            self._bug_ms = None
        self._apply_faults(t_ms)
        _LOG.debug("%s: %s cured by %s", self.device_id, fault, by)
        return True

    def _after_cleaning(self, t_ms: int) -> None:
        if self.severity("drain_clog") < _CLEANABLE_CLOG:
            self._cure("drain_clog", t_ms, "cleaning_cycle")

    def repair(self, part: str, at_ms: int, out: list[Outbound]) -> list[str]:
        """A technician services ``part`` at ``at_ms``; return the faults that cures.

        Raises:
            ConfigError: the model has no such part.
        """
        parts = {spec.repair_part for spec in self._specs.values()} - {None}
        if part not in parts:
            raise ConfigError(
                f"a {self.model} has no serviceable part {part!r}; "
                f"parts: {', '.join(sorted(p for p in parts if p))}"
            )
        self.step_until(at_ms, out)
        cured: list[str] = []
        for name in list(self._active):
            if self._specs[name].repair_part == part and self._cure(name, at_ms, f"repair:{part}"):
                cured.append(name)
        if self.running:
            # the technician unplugs the appliance to work on it
            self._reboot(at_ms, "service", out, cured_by=f"repair:{part}")
        return cured

    # -- boots -----------------------------------------------------------------------
    def _reboot(
        self,
        t_ms: int,
        reason: ResetReason,
        out: list[Outbound],
        *,
        cured_by: str,
        clean: bool = False,
    ) -> None:
        # any reboot clears a hung control task; a firmware fault survives it
        self._cure("controller_hang", t_ms, cured_by)
        if clean:
            self.core.stop()  # a commanded restart shuts down in order
        self.core.note_reset(reason)
        self.running = False
        self._crash_ms = None
        low, high = (60.0, 120.0) if reason == "firmware_update" else (30.0, 60.0)
        self._down_until_ms = t_ms + round(self._fault_rng.uniform(low, high) * 1000)
        self._link(t_ms, out)

    def _boot(self, t_ms: int, out: list[Outbound]) -> None:
        self.running = True
        self._down_until_ms = None
        self.core.boot()
        self._link(t_ms, out)
        if "crash_loop" in self._active:
            self._crash_ms = self._next_crash(t_ms)

    # -- commands --------------------------------------------------------------------
    def handle_command(self, payload: bytes, at_ms: int, out: list[Outbound]) -> None:
        """Receive a command payload at ``at_ms`` and answer it (after stepping to ``at_ms``).

        The device library decodes it, answers each command id once (a repeated id is
        not run again) behind the appliance's interlock, and stores the answer in the
        outbox. A device that is offline at ``at_ms`` holds the command until it is back
        (with ``publish``, this models the broker's persistent session; a transport that
        publishes the outbox itself delivers commands only while the device is
        connected). A payload that is not a valid command is logged and counted (there
        is no command id to answer to).
        """
        self.step_until(at_ms, out)
        if not self.connected:
            self._held.append(payload)
            self.commands_held += 1
            return
        self._command(payload, self.now_ms, out)

    def _command(self, payload: bytes, t_ms: int, out: list[Outbound]) -> None:
        then = self.receive_command(payload)
        self.drain(t_ms, out)  # the answer goes out before the device restarts
        self.after_command(then, out)

    def receive_command(self, payload: bytes) -> Callable[[], None] | None:
        """Hand a command to the device library now; return what follows its answer.

        For a transport: publish the outbox (the answer), acknowledge the command, then
        call :meth:`after_command` with what this returned.
        """
        return self.core.handle_command(payload)

    def after_command(self, then: Callable[[], None] | None, out: list[Outbound]) -> None:
        """Do what a command's answer announced (a restart), appending what it sends."""
        if then is None:
            return
        then()
        restart, self._restart = self._restart, None
        if restart is not None:
            reason, cured_by = restart
            self._reboot(self.now_ms, reason, out, cured_by=cured_by, clean=True)

    def _register(self, core: DeviceCore) -> None:
        core.add_interlock(self._interlock)
        core.on_command("restart", self._restart_command)
        # the version checks answer first, then the interlock (the handler asks it)
        core.on_command("firmware_update", self._firmware_update, interlocked=False)
        core.on_selftest(self._selftest)
        core.on_command("cleaning_cycle", self._cleaning_cycle)
        core.on_command("config_set", self._config_set)

    def _interlock(self) -> Refusal | None:
        return self.appliance.busy_reason()

    def _restart_later(self, reason: ResetReason, cured_by: str) -> Callable[[], None]:
        def restart() -> None:
            self._restart = (reason, cured_by)

        return restart

    def _restart_command(self, command: Command) -> CommandResult:
        return CommandResult(
            True,
            "restarting now; back in about a minute",
            then=self._restart_later("restart_command", "restart"),
        )

    def _firmware_update(self, command: Command) -> CommandResult:
        version = command.args.get("version")
        if not isinstance(version, str) or _VERSION_RE.fullmatch(version) is None:
            return CommandResult(False, "firmware_update needs a version like 2.4.0")
        installed = self.firmware
        if version_key(version) < version_key(installed):
            return CommandResult(
                False, f"refused: {version} is older than the installed {installed}"
            )
        if version == installed:
            return CommandResult(True, f"already on {version}; nothing to do")
        refusal = self._interlock()
        if refusal is not None:
            return CommandResult(False, refusal.detail, refusal.code)
        self.core.firmware_version = version
        for fault in ("firmware_bug", "crash_loop"):
            self._cure(fault, self.now_ms, "firmware_update")
        return CommandResult(
            True,
            f"updated from {installed} to {version}; restarting",
            code=version,
            then=self._restart_later("firmware_update", "firmware_update"),
        )

    def _selftest(self) -> LibrarySelfTest:
        result = self.appliance.selftest()
        return LibrarySelfTest(result.passed, result.code, result.detail, dict(result.data))

    def _cleaning_cycle(self, command: Command) -> CommandResult:
        ok, detail = self.appliance.start_cleaning(self.now_ms)
        return CommandResult(ok, detail)

    def _config_set(self, command: Command) -> CommandResult:
        known = dict(self.appliance.settings())
        known["interval_s"] = (1.0, 3_600.0)
        if not command.args:
            return CommandResult(False, "config_set needs at least one setting")
        for key, value in command.args.items():
            if key not in known:
                return CommandResult(
                    False, f"unknown setting {key!r}; known: {', '.join(sorted(known))}"
                )
            low, high = known[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (low <= value <= high)
            ):
                return CommandResult(False, f"{key} must be a number from {low:g} to {high:g}")
        t_ms = self.now_ms
        for key, value in command.args.items():
            number = float(value)
            if key == "interval_s":
                self.interval_ms = round(number * 1000)
                self.next_tick_ms = t_ms + self.interval_ms
            else:
                self.appliance.apply_setting(key, number)
        applied = ", ".join(f"{k}={float(v):g}" for k, v in command.args.items())
        return CommandResult(True, f"set {applied}")
