"""Firmware layer of one simulated device (device_sim): telemetry, events, commands, faults.

A :class:`SimDevice` wraps an appliance's physics (:mod:`device_sim.appliances`) with what
a real device's firmware does: it samples every ``interval_s`` of sim time, numbers each
message with its own ``seq`` (shared by telemetry and events, as the contract says),
keeps messages in a local buffer while it is offline and publishes them late with their
original ``ts`` and ``seq`` (backfill), reboots (``boot`` events, gaps while down),
answers commands with ``command_result`` events and enforces its interlocks.

Everything here is pure: no I/O, no clocks, no global random state. Time is epoch
milliseconds handed in by :class:`device_sim.fleet.Fleet`. Output messages are
``(emit_ms, topic, payload)``: the sim time the device sent it, the topic and the bytes.
"""

from __future__ import annotations

import logging
import random
import re
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime
from typing import Final, Literal, cast

from device_sim.appliances import Appliance, Notice, make_appliance
from device_sim.described import DescribedAppliance, SimProduct
from device_sim.faults import (
    FAULTS,
    MODEL_NAMES,
    CureAction,
    FaultRecord,
    FaultSpec,
    faults_for_model,
)
from gateway.errors import ConfigError, RejectedError
from gateway.protocol import (
    Command,
    Event,
    EventKind,
    Reading,
    decode_command,
    encode_event,
    encode_reading,
    events_topic,
    status_topic,
    telemetry_topic,
)

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

BootReason = Literal["power_on", "restart_command", "firmware_update", "watchdog", "service"]


def _utc(t_ms: int) -> datetime:
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


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
    """One simulated device: an appliance plus its firmware.

    Attributes:
        device_id: the device's id (broker user name and client id).
        index: the device's index in the fleet (its random stream is ``seed + index``).
        model: the product model.
        product: the product file's simulation, for a product not built in.
        firmware: the installed firmware version.
        appliance: the physics.
        seq: the last sequence number used (the first message has seq 1).
        readings_sent: telemetry messages handed out (live or backfilled).
        events_sent: event messages handed out (live or backfilled).
        dropped: messages lost because the offline buffer was full.
        commands_missed: commands that arrived while the device was offline.
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
        self.firmware = firmware
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
        self.seq = 0
        self.readings_sent = 0
        self.events_sent = 0
        self.dropped = 0
        self.commands_missed = 0
        self.running = False
        self.connected = False
        self._down_until_ms: int | None = start_ms
        self._boot_reason: BootReason = "power_on"
        self._buffer: deque[tuple[str, bytes]] = deque()
        self._buffer_limit = buffer_limit
        self._outages: list[tuple[int, int]] = []
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

    # -- public state ----------------------------------------------------------------
    @property
    def active_faults(self) -> frozenset[str]:
        """The faults in effect now."""
        return frozenset(self._active)

    @property
    def buffered(self) -> int:
        """How many messages wait in the offline buffer."""
        return len(self._buffer)

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

    def _in_outage(self, t_ms: int) -> bool:
        while self._outages and self._outages[0][1] <= t_ms:
            self._outages.pop(0)
        return bool(self._outages) and self._outages[0][0] <= t_ms

    # -- messages --------------------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _send(self, t_ms: int, topic: str, payload: bytes, out: list[Outbound]) -> None:
        if self.connected:
            out.append((t_ms, topic, payload))
            if topic.endswith("/telemetry"):
                self.readings_sent += 1
            else:
                self.events_sent += 1
            return
        if len(self._buffer) >= self._buffer_limit:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append((topic, payload))

    def _event(
        self,
        t_ms: int,
        kind: EventKind,
        out: list[Outbound],
        *,
        code: str | None = None,
        command_id: str | None = None,
        ok: bool | None = None,
        detail: str | None = None,
        data: dict[str, float | bool | str] | None = None,
    ) -> None:
        event = Event(
            self.device_id,
            self._next_seq(),
            t_ms,
            kind,
            code=code,
            command_id=command_id,
            ok=ok,
            detail=detail,
            data={} if data is None else data,
        )
        self._send(t_ms, events_topic(self.device_id), encode_event(event), out)

    def _notice(self, t_ms: int, notice: Notice, out: list[Outbound]) -> None:
        self._event(
            t_ms, notice.kind, out, code=notice.code, detail=notice.detail, data=dict(notice.data)
        )

    def _link(self, t_ms: int, out: list[Outbound]) -> None:
        """Bring the connection up or down; on reconnect publish the backlog first."""
        wanted = self.running and not self._in_outage(t_ms)
        if wanted == self.connected:
            return
        topic = status_topic(self.device_id)
        if not wanted:
            # the device cannot say so itself: this stands for the broker's last will
            out.append((t_ms, topic, _OFFLINE))
            self.connected = False
            return
        self.connected = True
        out.append((t_ms, topic, _ONLINE))
        backlog, self._buffer = self._buffer, deque()
        for topic_, payload in backlog:
            self._send(t_ms, topic_, payload, out)

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
        if not self.running:
            if self._down_until_ms is None or t_ms < self._down_until_ms:
                self._physics_ms = t_ms  # unpowered: no physics, no readings (a gap)
                return
            self._boot(t_ms, out)
        self._link(t_ms, out)
        self._activate(t_ms, out)
        self._apply_faults(t_ms)
        notices = self._physics(t_ms)
        for notice in notices:
            if notice.code == "cleaning_done":
                self._after_cleaning(t_ms)
            self._notice(t_ms, notice, out)
        if self._bug_ms is not None and t_ms >= self._bug_ms:
            self._event(
                t_ms, "error", out, code="F07", detail="internal error in the control software"
            )
            self._bug_ms = t_ms + round(self._fault_rng.uniform(1.0, 6.0) * 3_600_000)
        appliance = self.appliance
        metrics = appliance.metrics()
        reading = Reading(self.device_id, self._next_seq(), t_ms, metrics, appliance.status())
        self._send(t_ms, telemetry_topic(self.device_id), encode_reading(reading), out)
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
    def _activate(self, t_ms: int, out: list[Outbound]) -> None:
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
                self._event(
                    t_ms, "error", out, code="E90", detail="the control task stopped responding"
                )

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
    def _reboot(self, t_ms: int, reason: BootReason, out: list[Outbound], *, cured_by: str) -> None:
        # any reboot clears a hung control task; a firmware fault survives it
        self._cure("controller_hang", t_ms, cured_by)
        self.running = False
        self._crash_ms = None
        low, high = (60.0, 120.0) if reason == "firmware_update" else (30.0, 60.0)
        self._down_until_ms = t_ms + round(self._fault_rng.uniform(low, high) * 1000)
        self._boot_reason = reason
        self._link(t_ms, out)

    def _boot(self, t_ms: int, out: list[Outbound]) -> None:
        self.running = True
        self._down_until_ms = None
        self._link(t_ms, out)
        self._event(
            t_ms,
            "boot",
            out,
            code=self.firmware,
            data={
                "model": self.model,
                "firmware": self.firmware,
                "reset_reason": self._boot_reason,
            },
        )
        if "crash_loop" in self._active:
            self._crash_ms = self._next_crash(t_ms)

    # -- commands --------------------------------------------------------------------
    def handle_command(self, payload: bytes, at_ms: int, out: list[Outbound]) -> None:
        """Receive a command payload at ``at_ms`` and answer it (after stepping to ``at_ms``).

        A device that is offline at ``at_ms`` never sees the command (counted in
        :attr:`commands_missed`); a payload that is not a valid command is logged and
        dropped (there is no command id to answer to).
        """
        self.step_until(at_ms, out)
        t_ms = self.now_ms
        if not self.connected:
            self.commands_missed += 1
            return
        try:
            command = decode_command(payload)
        except RejectedError as exc:
            _LOG.warning("%s: dropped a bad command: %s", self.device_id, exc)
            return
        action = command.action
        if action == "restart":
            self._restart(command, t_ms, out)
        elif action == "firmware_update":
            self._firmware_update(command, t_ms, out)
        elif action == "selftest":
            self._selftest(command, t_ms, out)
        elif action == "cleaning_cycle":
            ok, detail = self.appliance.start_cleaning(t_ms)
            self._result(command, t_ms, out, ok=ok, detail=detail)
        else:
            self._config_set(command, t_ms, out)

    def _result(
        self,
        command: Command,
        t_ms: int,
        out: list[Outbound],
        *,
        ok: bool,
        detail: str,
        code: str | None = None,
        data: dict[str, float | bool | str] | None = None,
    ) -> None:
        self._event(
            t_ms,
            "command_result",
            out,
            command_id=command.id,
            ok=ok,
            detail=detail,
            code=code,
            data=data,
        )

    def _refusal(self) -> str | None:
        reason = self.appliance.busy_reason()
        return None if reason is None else f"refused: {reason}"

    def _restart(self, command: Command, t_ms: int, out: list[Outbound]) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._result(command, t_ms, out, ok=False, detail=refusal)
            return
        self._result(command, t_ms, out, ok=True, detail="restarting now; back in about a minute")
        self._reboot(t_ms, "restart_command", out, cured_by="restart")

    def _firmware_update(self, command: Command, t_ms: int, out: list[Outbound]) -> None:
        version = command.args.get("version")
        if not isinstance(version, str) or _VERSION_RE.fullmatch(version) is None:
            self._result(
                command, t_ms, out, ok=False, detail="firmware_update needs a version like 2.4.0"
            )
            return
        if _version_key(version) < _version_key(self.firmware):
            self._result(
                command,
                t_ms,
                out,
                ok=False,
                detail=f"refused: {version} is older than the installed {self.firmware}",
            )
            return
        if version == self.firmware:
            self._result(command, t_ms, out, ok=True, detail=f"already on {version}; nothing to do")
            return
        refusal = self._refusal()
        if refusal is not None:
            self._result(command, t_ms, out, ok=False, detail=refusal)
            return
        previous, self.firmware = self.firmware, version
        for fault in ("firmware_bug", "crash_loop"):
            self._cure(fault, t_ms, "firmware_update")
        self._result(
            command,
            t_ms,
            out,
            ok=True,
            code=version,
            detail=f"updated from {previous} to {version}; restarting",
        )
        self._reboot(t_ms, "firmware_update", out, cured_by="firmware_update")

    def _selftest(self, command: Command, t_ms: int, out: list[Outbound]) -> None:
        result = self.appliance.selftest()
        data = dict(result.data)
        self._event(
            t_ms,
            "selftest",
            out,
            code=result.code,
            command_id=command.id,
            ok=result.passed,
            detail=result.detail,
            data=data,
        )
        verdict = "passed" if result.passed else f"found {result.detail}"
        data["passed"] = result.passed
        self._result(
            command,
            t_ms,
            out,
            ok=True,
            code=result.code,
            detail=f"self-test {verdict}"[:500],
            data=data,
        )

    def _config_set(self, command: Command, t_ms: int, out: list[Outbound]) -> None:
        known = dict(self.appliance.settings())
        known["interval_s"] = (1.0, 3_600.0)
        if not command.args:
            self._result(
                command, t_ms, out, ok=False, detail="config_set needs at least one setting"
            )
            return
        for key, value in command.args.items():
            if key not in known:
                self._result(
                    command,
                    t_ms,
                    out,
                    ok=False,
                    detail=f"unknown setting {key!r}; known: {', '.join(sorted(known))}",
                )
                return
            low, high = known[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (low <= value <= high)
            ):
                self._result(
                    command,
                    t_ms,
                    out,
                    ok=False,
                    detail=f"{key} must be a number from {low:g} to {high:g}",
                )
                return
        for key, value in command.args.items():
            number = float(value)
            if key == "interval_s":
                self.interval_ms = round(number * 1000)
                self.next_tick_ms = t_ms + self.interval_ms
            else:
                self.appliance.apply_setting(key, number)
        applied = ", ".join(f"{k}={float(v):g}" for k, v in command.args.items())
        self._result(command, t_ms, out, ok=True, detail=f"set {applied}")
