"""Fault catalog per product model (diagnostics, the "Decide" step of the loop).

Product knowledge kept as data: for each product model, the faults the backend can name,
how the device's own self-diagnosis reports them (error codes, self-test codes, reset
reasons), which streaming features they move and in which direction (their *signature*,
used to name the fault behind an anomaly score), how a wear-type fault degrades toward
failure (for :mod:`diagnostics.predictor`), and the remedies in the order to try them.

==================  =========  ==========================  ========================================
fault               models     device says                 remedies, in order
==================  =========  ==========================  ========================================
bearing_wear        washer     E52 (spin, self-test)       selftest; technician: bearing
drain_clog          washer     E21 (drain, self-test)      cleaning_cycle; selftest; technician:
                                                           drain_pump
refrigerant_leak    fridge     E11 (warm cabinet), E14     selftest; technician: refrigerant_circuit
coil_fouling        heat_pump  E61 (self-test)             selftest; technician: evaporator_coil
sensor_drift        all        E31 (self-test)             selftest; technician: temperature_sensor
sensor_stuck        all        E32 (self-test)             selftest; technician: temperature_sensor
firmware_bug        all        F07                         firmware_update
crash_loop          all        boot, reason ``watchdog``   firmware_update
controller_hang     all        E90                         restart; firmware_update
==================  =========  ==========================  ========================================

A restart never cures a firmware fault and no remote command cures worn or leaking parts;
a self-test cures nothing but confirms (or rules out) the hypothesis before a visit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "CATALOG",
    "Degradation",
    "FaultEntry",
    "ModelCatalog",
    "Remedy",
    "RemedyKind",
    "Signature",
]

RemedyKind = Literal["remote", "service"]


@dataclass(frozen=True, slots=True)
class Remedy:
    """One remedy for a fault, remote (a device command) or service (a technician).

    Attributes:
        action: the device command (``restart``, ``firmware_update``, ``cleaning_cycle``,
            ``config_set``, ``selftest``) or ``technician_visit``.
        kind: ``remote`` or ``service``.
        cures: whether it can cure the fault (``False``: it only confirms or rules it out).
        part: the part a technician services or swaps, for a visit.
        note: plain words on what it can cure and when.
    """

    action: str
    kind: RemedyKind
    cures: bool
    part: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Signature:
    """How a fault moves one streaming feature.

    Attributes:
        feature: the feature's name (see :mod:`diagnostics.features`).
        direction: ``+1`` rises, ``-1`` falls, ``0`` either way.
        weight: how telling the move is for this fault (1 = decisive).
    """

    feature: str
    direction: int
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Degradation:
    """How a wear-type fault's health indicator approaches its failure limit.

    The indicator is ``feature``'s change from the device's healthy baseline; the fault
    fails when the change reaches ``failure_delta`` (its sign gives the direction, a
    ``two_sided`` indicator may go either way). The fault's progress from onset (0) to
    failure (1) grows evenly in time, and the indicator's share of its change at failure
    grows as ``progress ** shape``: ``shape`` > 1 when the indicator moves late (wear
    that accelerates, or physics that hides the first part of a fault).

    The values are the manufacturer's statement for its product: each one below says
    how it follows from the product's physics and what the indicator was measured at
    when simulated devices failed (the mean over devices; tests/test_diagnostics_catalog.py
    checks them against the simulator).

    Attributes:
        feature: the health indicator feature.
        failure_delta: the indicator's change at failure, in the feature's unit.
        shape: exponent of the indicator's share of its failure change in progress.
        two_sided: the indicator may move either way (sensor drift).
        opposite_delta: for a two-sided indicator, its change at failure when it moves
            against ``failure_delta``'s sign (``None``: ``-failure_delta``, symmetric).
    """

    feature: str
    failure_delta: float
    shape: float = 1.0
    two_sided: bool = False
    opposite_delta: float | None = None


@dataclass(frozen=True, slots=True)
class FaultEntry:
    """One named fault of a product model.

    Attributes:
        fault: the fault's name.
        title: plain words for people.
        gradual: it degrades toward a failure (else it strikes at once).
        codes: error or self-test codes by which the device reports it.
        boot_reasons: reset reasons of ``boot`` events that are evidence of it.
        cleared_by: reset reasons of ``boot`` events after which it is gone.
        quiet_close_s: a diagnosis opened by self-diagnosis closes after this long without
            new evidence (and with normal scores).
        signature: the features it moves.
        degradation: its health indicator, for wear-type faults.
        remedies: what to try, in order.
    """

    fault: str
    title: str
    gradual: bool
    codes: frozenset[str]
    remedies: tuple[Remedy, ...]
    signature: tuple[Signature, ...] = ()
    boot_reasons: frozenset[str] = frozenset()
    cleared_by: frozenset[str] = frozenset()
    quiet_close_s: float = 2 * 86_400.0
    degradation: Degradation | None = None


@dataclass(frozen=True, slots=True)
class ModelCatalog:
    """The faults of one product model, with a lookup by code and by reset reason.

    Attributes:
        model: the product model.
        faults: fault name to its entry, in catalog order.
    """

    model: str
    faults: Mapping[str, FaultEntry]

    def by_code(self, code: str) -> FaultEntry | None:
        """Return the fault a device code (``E21``) reports, or ``None``."""
        for entry in self.faults.values():
            if code in entry.codes:
                return entry
        return None

    def by_boot_reason(self, reason: str) -> FaultEntry | None:
        """Return the fault a boot's reset reason (``watchdog``) is evidence of, or ``None``."""
        for entry in self.faults.values():
            if reason in entry.boot_reasons:
                return entry
        return None


def _selftest(note: str) -> Remedy:
    return Remedy("selftest", "remote", cures=False, note=note)


def _visit(part: str, note: str) -> Remedy:
    return Remedy("technician_visit", "service", cures=True, part=part, note=note)


_SENSOR_PART: Final = "temperature_sensor"


def _common(
    primary_offset: str, offset_weight: float, drift: Degradation
) -> tuple[FaultEntry, ...]:
    """The faults every model shares (sensor and firmware), around its main sensor.

    ``offset_weight`` says how telling the main sensor's offset feature is: only a sensor
    fault moves the heat pump's and the washer's; a leak moves the fridge's a little too.
    ``drift`` is how a drifting main sensor moves that offset feature up to failure.
    """
    return (
        FaultEntry(
            "sensor_drift",
            "main temperature sensor drifting off",
            gradual=True,
            codes=frozenset({"E31"}),
            signature=(Signature(primary_offset, 0, offset_weight),),
            degradation=drift,
            remedies=(
                _selftest("compares the sensor with the reference sensor (E31 when off)"),
                _visit(_SENSOR_PART, "a new sensor cures the drift"),
            ),
        ),
        FaultEntry(
            "sensor_stuck",
            "main temperature sensor stuck at one value",
            gradual=False,
            codes=frozenset({"E32"}),
            signature=(Signature("sensor_repeat", 1, 3.0),),
            remedies=(
                _selftest("sees a frozen reading (E32)"),
                _visit(_SENSOR_PART, "a new sensor cures it"),
            ),
        ),
        FaultEntry(
            "firmware_bug",
            "firmware bug raising spurious errors",
            gradual=False,
            codes=frozenset({"F07"}),
            cleared_by=frozenset({"firmware_update"}),
            quiet_close_s=2 * 86_400.0,
            remedies=(
                Remedy(
                    "firmware_update",
                    "remote",
                    cures=True,
                    note="another firmware version cures it; a restart does not",
                ),
            ),
        ),
        FaultEntry(
            "crash_loop",
            "firmware crash loop (watchdog reboots)",
            gradual=False,
            codes=frozenset(),
            boot_reasons=frozenset({"watchdog"}),
            cleared_by=frozenset({"firmware_update"}),
            quiet_close_s=86_400.0,
            remedies=(
                Remedy(
                    "firmware_update",
                    "remote",
                    cures=True,
                    note="another firmware version cures it; a restart does not",
                ),
            ),
        ),
        FaultEntry(
            "controller_hang",
            "control task hangs",
            gradual=False,
            codes=frozenset({"E90"}),
            signature=(Signature("error_status", 1, 1.0),),
            cleared_by=frozenset(
                {"restart_command", "firmware_update", "watchdog", "service", "power_on"}
            ),
            quiet_close_s=86_400.0,
            remedies=(
                Remedy("restart", "remote", cures=True, note="any reboot clears the hang"),
                Remedy(
                    "firmware_update",
                    "remote",
                    cures=True,
                    note="if hangs come back after restarts",
                ),
            ),
        ),
    )


def _table(model: str, entries: tuple[FaultEntry, ...]) -> ModelCatalog:
    return ModelCatalog(model, {entry.fault: entry for entry in entries})


#: The fault catalog, keyed by product model.
CATALOG: Final[Mapping[str, ModelCatalog]] = {
    "washer": _table(
        "washer",
        (
            FaultEntry(
                "bearing_wear",
                "drum bearing wear",
                gradual=True,
                codes=frozenset({"E52"}),
                signature=(
                    Signature("spin_vibration", 1, 1.0),
                    Signature("tumble_power_w", 1, 0.5),
                ),
                # spin vibration per (krpm)^2 is 0.22 g + 0.25 g x load imbalance + 1.5 g x
                # wear, and wear grows as progress squared: +1.5 at failure, shape 2
                # (measured at failure: +1.45 to +1.50, mean +1.48, 10 washers)
                degradation=Degradation("spin_vibration", 1.5, 2.0),
                remedies=(
                    _selftest("spins at 800 rpm and measures vibration (E52 when worn)"),
                    _visit("bearing", "a new bearing cures it; no remote command does"),
                ),
            ),
            FaultEntry(
                "drain_clog",
                "drain pump clogging",
                gradual=True,
                codes=frozenset({"E21"}),
                signature=(Signature("drain_flow_l_min", -1, 1.0),),
                # drain flow is 12 l/min x (1 - 0.95 x clog), the clog growing evenly: a
                # full clog takes 95 % of it, -11.4 l/min, shape 1 (measured: -11.4, 6 washers)
                degradation=Degradation("drain_flow_l_min", -11.4, 1.0),
                remedies=(
                    Remedy(
                        "cleaning_cycle",
                        "remote",
                        cures=True,
                        note="clears a partial clog; not a pump that barely drains",
                    ),
                    _selftest("times a drain (E21 when slower than 150 s)"),
                    _visit("drain_pump", "a serviced drain pump cures any clog"),
                ),
            ),
            # the drum sensor reads its full 5 K drift against the room sensor once the
            # drum has cooled to room temperature: +-5 K, shape 1 (measured: 4.97 to 5.02)
            *_common("idle_temp_offset_k", 2.0, Degradation("idle_temp_offset_k", 5.0, 1.0, True)),
        ),
    ),
    "fridge": _table(
        "fridge",
        (
            FaultEntry(
                "refrigerant_leak",
                "refrigerant leak",
                gradual=True,
                codes=frozenset({"E11", "E14"}),
                signature=(
                    Signature("evaporator_on_c", 1, 1.0),
                    Signature("power_on_w", 1, 1.0),
                    Signature("compressor_duty", 1, 0.3),
                    Signature("duty_per_lift", 1, 0.3),
                ),
                # while cooling, the evaporator heads for -24 C + 14 K x leak (time constant
                # 4 min) and the compressor keeps 1 - 0.75 x leak of its cooling. Healthy,
                # it cools in short runs that start at cabinet temperature, averaging -14
                # to -16.5 C. With the charge gone the compressor can no longer hold the
                # cabinet and runs without pause at -10 C: a rise of 4 to 6.5 K, not 14.
                # The first part of a leak lengthens the runs, so the evaporator gets
                # closer to its (rising) target and the two nearly cancel: the indicator
                # moves late, as progress ** 2.7. Measured at failure: +4.7 to +6.5 K, mean
                # +5.7 K (12 fridges); best shape over their progress 2.67.
                degradation=Degradation("evaporator_on_c", 5.7, 2.7),
                remedies=(
                    _selftest("measures suction pressure (E14 when low)"),
                    _visit("refrigerant_circuit", "sealing and recharging cures it"),
                ),
            ),
            # evaporator minus the cabinet sensor while the compressor rests: a sensor
            # reading 5 K low raises it by 5 K, but one reading 5 K high lowers it by only
            # about 4 K: the feature keeps the evaporator only within 8 K below the
            # reading, that is within 3 K of the true cabinet temperature, and so drops
            # the coldest readings of each rest, which a healthy level (about -3 K)
            # includes. Measured at failure: +4.86 to +5.03 K (mean +4.94) and -3.89 to
            # -4.17 K (mean -4.03), 6 fridges each way; shape 1.
            *_common(
                "evaporator_off_offset_k",
                1.0,
                Degradation("evaporator_off_offset_k", 4.9, 1.0, True, opposite_delta=-4.0),
            ),
        ),
    ),
    "heat_pump": _table(
        "heat_pump",
        (
            FaultEntry(
                "coil_fouling",
                "fouled outdoor coil",
                gradual=True,
                codes=frozenset({"E61"}),
                signature=(
                    Signature("cop_efficiency", -1, 1.0),
                    Signature("capacity_w", -1, 0.7),
                    Signature("defrost_share", 1, 0.3),
                ),
                # COP is 0.5 x (1 - 0.25 x fouling) of the Carnot COP at an outdoor coil
                # 6 K + 10 K x fouling below the air; the feature compares with the limit
                # at 6 K, so fully fouled it is 0.375 x D / (D + 10), D = flow - outdoor +
                # 9 K (about 40-50 K in heating weather), against 0.5 healthy: -0.17 to
                # -0.2 (the 40 W pumps shave a little off both), about even in progress.
                # Measured at failure: -0.17 to -0.20, mean -0.18 (6 heat pumps); shape 1.
                degradation=Degradation("cop_efficiency", -0.18, 1.0),
                remedies=(
                    _selftest("measures the evaporator approach (E61 when the coil is fouled)"),
                    _visit("evaporator_coil", "cleaning or swapping the coil cures it"),
                ),
            ),
            # flow minus return sensor beyond what the heat output explains is the flow
            # sensor's offset itself: +-5 K at failure, shape 1 (measured: 4.99 to 5.01)
            *_common("flow_offset_k", 2.0, Degradation("flow_offset_k", 5.0, 1.0, True)),
        ),
    ),
}
