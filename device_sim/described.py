"""A simulated product described by a product file (device_sim, the hardware stand-in).

The three built-in appliances have their physics written out in
:mod:`device_sim.appliances`; any other product can be simulated from the
``[simulation]`` section of its product file (the same TOML file that describes the
product to the backend). The simulator reads only what it needs: the product's model,
its metrics (which are true/false), its main temperature sensor, and the section::

    [simulation.states]                  # operating states, reported as the status
    heating = { share = 0.3, mean_minutes = 40 }
    idle = { share = 0.7, mean_minutes = 90 }

    [simulation.metrics.flow_temp_c]
    level = 30               # normal level (true/false for a bool metric)
    in_state = { heating = 70 }
    noise = 0.2              # read noise (standard deviation)
    step = 0.1               # reporting step
    spread = 1.0             # device-to-device spread of the level
    daily_amplitude = 1.5    # daily cycle, peaking at daily_peak_hour (local time)
    daily_peak_hour = 15
    relax_minutes = 4        # inertia: first-order approach to the level

    [simulation.faults.electrode_wear]
    days = [6, 20]           # onset to failure, drawn at random
    shape = 1.0              # severity grows as progress ** shape
    effects = [{ metric = "flame_signal_ua", change = -4.0, states = ["heating"] }]
    selftest = { code = "E133", at = 0.5 }   # the self-test finds it from this severity
    error = { code = "E133", at = 0.95 }     # the device raises the code from this severity
    part = "ignition_electrode"              # the part a technician swaps to cure it

A fault's effect is a drift of one metric (its ``change`` at failure, in the metric's
unit), optionally only in some states. The firmware faults every device has (a firmware
bug, a crash loop, a hung controller) and, with a main temperature sensor, the sensor
faults apply as to any simulated device. This module imports nothing of the backend: it
reads the TOML itself.
"""

from __future__ import annotations

import math
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

from device.contract import MetricValue
from device_sim.appliance import Appliance, Notice
from device_sim.environment import local_hour
from wire.errors import ConfigError

__all__ = [
    "DescribedAppliance",
    "SimEffect",
    "SimFault",
    "SimMetric",
    "SimProduct",
    "SimState",
    "check_simulation",
    "load_sim_product",
]

_SECTION_KEYS: Final = frozenset({"states", "metrics", "faults"})
_STATE_KEYS: Final = frozenset({"share", "mean_minutes"})
_METRIC_KEYS: Final = frozenset(
    {
        "level",
        "in_state",
        "noise",
        "step",
        "spread",
        "daily_amplitude",
        "daily_peak_hour",
        "relax_minutes",
    }
)
_FAULT_KEYS: Final = frozenset(
    {"days", "shape", "effects", "selftest", "error", "part", "cure", "description"}
)
_EFFECT_KEYS: Final = frozenset({"metric", "change", "states"})
_CODE_KEYS: Final = frozenset({"code", "at"})
_CURES: Final = frozenset({"restart", "firmware_update"})
_TWO_PI: Final = 2.0 * math.pi


@dataclass(frozen=True, slots=True)
class SimState:
    """An operating state: its long-run share of time and its mean stay."""

    name: str
    share: float
    mean_s: float


@dataclass(frozen=True, slots=True)
class SimMetric:
    """How one metric behaves (see the module docstring for the keys)."""

    name: str
    is_bool: bool
    level: float
    in_state: Mapping[str, float]
    noise: float = 0.0
    step: float = 0.0
    spread: float = 0.0
    daily_amplitude: float = 0.0
    daily_peak_hour: float = 15.0
    relax_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SimEffect:
    """A fault's drift of one metric: its change at failure, in some states (all: empty)."""

    metric: str
    change: float
    states: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SimFault:
    """A fault the file's product can suffer, and how it shows."""

    name: str
    min_days: float
    max_days: float
    shape: float
    effects: tuple[SimEffect, ...]
    selftest: tuple[str, float] | None
    error: tuple[str, float] | None
    part: str | None
    cure: str | None
    description: str


@dataclass(frozen=True, slots=True)
class SimProduct:
    """What the simulator needs of a product file."""

    model: str
    primary_metric: str | None
    metrics: Mapping[str, SimMetric]
    states: tuple[SimState, ...]
    faults: Mapping[str, SimFault]
    source: str


def _key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("["):
            table = line.strip("[]").split("#")[0].strip().replace('"', "")
            lines.setdefault(table, number)
            continue
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*=", line)
        if match:
            key = f"{table}.{match.group(1)}" if table else match.group(1)
            lines.setdefault(key, number)
    return lines


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = _key_lines(text)
        self.problems: list[str] = []

    def problem(self, key: str, why: str) -> None:
        probe, line = key, 0
        while probe and not line:
            line = self.lines.get(probe, 0)
            probe = probe.rpartition(".")[0]
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: {key}: {why}")

    def table(self, value: Any, key: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        for name in value:
            if allowed is not None and name not in allowed:
                self.problem(f"{key}.{name}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
        return value

    def number(self, table: Mapping[str, Any], key: str, name: str, default: float | None) -> float:
        value = table.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.problem(f"{key}.{name}", f"must be a number, not {value!r}")
            return 0.0
        return float(value)

    def code(self, raw: Any, key: str) -> tuple[str, float] | None:
        if raw is None:
            return None
        table = self.table(raw, key, _CODE_KEYS)
        code = table.get("code")
        if not isinstance(code, str) or not code:
            self.problem(f"{key}.code", "must be a device code such as E133")
            return None
        at = self.number(table, key, "at", 0.5)
        if not 0.0 <= at <= 1.0:
            self.problem(f"{key}.at", "must be a severity from 0 to 1")
        return code, at


def _metric(reader: _Reader, name: str, raw: Any, is_bool: bool, states: set[str]) -> SimMetric:
    key = f"simulation.metrics.{name}"
    table = reader.table(raw, key, _METRIC_KEYS)
    level_raw = table.get("level", False if is_bool else None)
    numeric = isinstance(level_raw, int | float) and not isinstance(level_raw, bool)
    if (is_bool and not isinstance(level_raw, bool)) or (not is_bool and not numeric):
        reader.problem(f"{key}.level", "must be true/false" if is_bool else "must be a number")
        level_raw = 0
    elif isinstance(level_raw, int | float) and not math.isfinite(level_raw):
        reader.problem(f"{key}.level", "must be finite")
        level_raw = 0
    level = float(level_raw) if isinstance(level_raw, int | float) else 0.0
    in_state: dict[str, float] = {}
    for state, value in reader.table(table.get("in_state", {}), f"{key}.in_state", None).items():
        if state not in states:
            reader.problem(f"{key}.in_state", f"unknown state {state!r}")
        if (
            is_bool != isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            reader.problem(f"{key}.in_state.{state}", "must be of the metric's kind")
            continue
        in_state[state] = float(value)
    values = {
        k: reader.number(table, key, k, d)
        for k, d in (
            ("noise", 0.0),
            ("step", 0.0),
            ("spread", 0.0),
            ("daily_amplitude", 0.0),
            ("daily_peak_hour", 15.0),
            ("relax_minutes", 0.0),
        )
    }
    for k in ("noise", "step", "spread", "relax_minutes"):
        if values[k] < 0.0:
            reader.problem(f"{key}.{k}", "must not be negative")
    if is_bool and any(table.get(k) for k in ("noise", "spread", "daily_amplitude")):
        reader.problem(key, "a true/false metric has no noise, spread or daily cycle")
    return SimMetric(
        name,
        is_bool,
        level,
        in_state,
        values["noise"],
        values["step"],
        values["spread"],
        values["daily_amplitude"],
        values["daily_peak_hour"] % 24.0,
        values["relax_minutes"] * 60.0,
    )


def _fault(
    reader: _Reader, name: str, raw: Any, metrics: Mapping[str, SimMetric], states: set[str]
) -> SimFault:
    key = f"simulation.faults.{name}"
    table = reader.table(raw, key, _FAULT_KEYS)
    days = table.get("days", [5, 20])
    if (
        not isinstance(days, list)
        or len(days) != 2
        or not all(isinstance(d, int | float) and not isinstance(d, bool) for d in days)
        or not 0 < days[0] <= days[1] < 10_000
    ):
        reader.problem(f"{key}.days", "must be [shortest, longest] days to failure (0 to 10,000)")
        days = [5, 20]
    shape = reader.number(table, key, "shape", 1.0)
    if shape <= 0.0:
        reader.problem(f"{key}.shape", "must be above 0")
    effects: list[SimEffect] = []
    raw_effects = table.get("effects", [])
    if not isinstance(raw_effects, list) or not raw_effects:
        reader.problem(f"{key}.effects", "needs a list of one or more effects")
        raw_effects = []
    for i, item in enumerate(raw_effects):
        ekey = f"{key}.effects"
        effect = reader.table(item, ekey, _EFFECT_KEYS)
        metric = effect.get("metric")
        if not isinstance(metric, str) or metric not in metrics or metrics[metric].is_bool:
            reader.problem(ekey, f"effect {i + 1}: {metric!r} is not a numeric simulated metric")
            continue
        where = effect.get("states", [])
        if not isinstance(where, list) or not set(where) <= states:
            reader.problem(ekey, f"effect {i + 1}: states must be simulated states")
            where = []
        change = reader.number(effect, ekey, "change", None)
        effects.append(SimEffect(metric, change, frozenset(where)))
    part = table.get("part")
    if part is not None and (not isinstance(part, str) or not part):
        reader.problem(f"{key}.part", "must be a part name")
        part = None
    cure = table.get("cure")
    if cure is not None and cure not in _CURES:
        reader.problem(f"{key}.cure", f"must be one of {sorted(_CURES)}")
        cure = None
    if part is None and cure is None:
        reader.problem(key, "needs a part (a technician cures it) or a remote cure")
    description = table.get("description", f"{name} (from {reader.source})")
    return SimFault(
        name,
        float(days[0]),
        float(days[1]),
        shape,
        tuple(effects),
        reader.code(table.get("selftest"), f"{key}.selftest"),
        reader.code(table.get("error"), f"{key}.error"),
        part,
        cure,
        str(description),
    )


def _read(text: str, source: str) -> tuple[SimProduct | None, list[str]]:
    reader = _Reader(text, source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{source}: not valid TOML: {exc}"]
    head = doc.get("product", {})
    model = head.get("model") if isinstance(head, dict) else None
    if not isinstance(model, str) or not model:
        reader.problem("product.model", "missing (required)")
        model = ""
    declared = doc.get("metrics", {})
    declared = declared if isinstance(declared, dict) else {}
    primary = head.get("primary_metric") if isinstance(head, dict) else None
    section = reader.table(doc.get("simulation", {}), "simulation", _SECTION_KEYS)
    states: list[SimState] = []
    for name, raw in reader.table(section.get("states", {}), "simulation.states", None).items():
        skey = f"simulation.states.{name}"
        table = reader.table(raw, skey, _STATE_KEYS)
        share = reader.number(table, skey, "share", None)
        mean_min = reader.number(table, skey, "mean_minutes", None)
        if share <= 0.0 or mean_min <= 0.0:
            reader.problem(skey, "share and mean_minutes must be above 0")
            continue
        states.append(SimState(name, share, mean_min * 60.0))
    if not states:
        reader.problem("simulation.states", "needs one or more operating states")
    names = {s.name for s in states}
    metrics: dict[str, SimMetric] = {}
    raw_metrics = reader.table(section.get("metrics", {}), "simulation.metrics", None)
    for name, raw in raw_metrics.items():
        entry = declared.get(name)
        if not isinstance(entry, dict):
            reader.problem(f"simulation.metrics.{name}", "not a metric of the [metrics] table")
            continue
        metrics[name] = _metric(reader, name, raw, entry.get("unit") == "bool", names)
    if not metrics:
        reader.problem("simulation.metrics", "needs one or more simulated metrics")
    if primary is not None and primary not in metrics:
        reader.problem("product.primary_metric", f"{primary!r} is not simulated")
    faults: dict[str, SimFault] = {}
    raw_faults = reader.table(section.get("faults", {}), "simulation.faults", None)
    for name, raw in raw_faults.items():
        faults[name] = _fault(reader, name, raw, metrics, names)
    if reader.problems:
        return None, reader.problems
    product = SimProduct(
        model,
        primary if isinstance(primary, str) else None,
        metrics,
        tuple(states),
        faults,
        source,
    )
    return product, []


def load_sim_product(path: Path) -> SimProduct:
    """Read the simulation section of the product file at ``path``.

    Raises:
        ConfigError: the file cannot be read, or its simulation section is wrong.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    product, problems = _read(text, str(path))
    if product is None:
        raise ConfigError("\n".join(problems))
    return product


def check_simulation(path: Path) -> list[str]:
    """Return the problems of the simulation section of the file at ``path`` (none: fine)."""
    try:
        load_sim_product(path)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


def _quantize(value: float, step: float) -> float:
    if step <= 0.0:
        return value
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return round(round(value / step) * step, digits)


class DescribedAppliance(Appliance):
    """The physics of a product described by its file's simulation section.

    Args:
        rng: the device's physics random stream.
        product: the product's simulation.
    """

    model: ClassVar[str] = "described"
    primary_metric: ClassVar[str] = ""

    def __init__(self, rng: random.Random, product: SimProduct) -> None:
        super().__init__(rng)
        self.product = product
        self._offset = {m.name: rng.gauss(0.0, m.spread) for m in product.metrics.values()}
        self._phase_h = rng.uniform(-1.0, 1.0)
        shares = [s.share for s in product.states]
        self.state = rng.choices(product.states, shares)[0]
        self._left_s = rng.expovariate(1.0 / self.state.mean_s)
        self._weights = [s.share / s.mean_s for s in product.states]
        self.values: dict[str, float] = {
            m.name: m.in_state.get(self.state.name, m.level) + self._offset[m.name]
            for m in product.metrics.values()
        }
        self._raised: set[str] = set()

    def _target(self, metric: SimMetric, t_ms: int) -> float:
        target = metric.in_state.get(self.state.name, metric.level)
        if metric.is_bool:
            return target
        target += self._offset[metric.name]
        if metric.daily_amplitude:
            hour = local_hour(t_ms) + self._phase_h
            target += metric.daily_amplitude * math.cos(
                _TWO_PI * (hour - metric.daily_peak_hour) / 24.0
            )
        for name, severity in self.severity.items():
            fault = self.product.faults.get(name)
            if fault is None:
                continue
            for effect in fault.effects:
                if effect.metric == metric.name and (
                    not effect.states or self.state.name in effect.states
                ):
                    target += effect.change * severity
        return target

    def step(self, t_ms: int, dt_s: float) -> list[Notice]:
        """Advance the product by ``dt_s`` seconds: states, metric levels, device codes."""
        rng = self.rng
        self.climate.update(t_ms, dt_s)
        if not self.hung:
            self._left_s -= dt_s
            while self._left_s <= 0.0:
                self.state = rng.choices(self.product.states, self._weights)[0]
                self._left_s += rng.expovariate(1.0 / self.state.mean_s)
        for metric in self.product.metrics.values():
            target = self._target(metric, t_ms)
            if metric.is_bool or metric.relax_s <= 0.0:
                self.values[metric.name] = target
            else:
                old = self.values[metric.name]
                self.values[metric.name] = target + (old - target) * math.exp(
                    -dt_s / metric.relax_s
                )
        notices: list[Notice] = []
        for name, fault in self.product.faults.items():
            severity = self.severity.get(name, 0.0)
            if fault.error is None or severity < fault.error[1]:
                self._raised.discard(name)
                continue
            if name not in self._raised:
                self._raised.add(name)
                notices.append(Notice("error", fault.error[0], fault.description))
        return notices

    def true_primary_c(self) -> float:
        """Return the true value of the main temperature sensor's metric."""
        primary = self.product.primary_metric
        return 0.0 if primary is None else self.values[primary]

    def status(self) -> str:
        """Return the current operating state (``error`` while the controller hangs)."""
        return "error" if self.hung else self.state.name

    def metrics(self) -> dict[str, MetricValue]:
        """Return the metrics as the product reports them (noise, reporting step)."""
        out: dict[str, MetricValue] = {}
        primary = self.product.primary_metric
        for metric in self.product.metrics.values():
            value = self.values[metric.name]
            if metric.is_bool:
                out[metric.name] = bool(value)
            elif metric.name == primary:
                out[metric.name] = self.sample_primary()
            else:
                noisy = value + (self.rng.gauss(0.0, metric.noise) if metric.noise else 0.0)
                out[metric.name] = _quantize(noisy, metric.step)
        return out

    def start_cleaning(self, t_ms: int) -> tuple[bool, str]:
        """A described product has no cleaning cycle."""
        return False, "refused: this product has no cleaning cycle"

    def measure(self, rng: random.Random) -> tuple[bool, str, str, dict[str, float | bool | str]]:
        """Find a fault the file says the self-test sees at its current severity."""
        data: dict[str, float | bool | str] = {
            name: round(value, 3) for name, value in self.values.items()
        }
        for name, fault in self.product.faults.items():
            severity = self.severity.get(name, 0.0)
            if fault.selftest is not None and severity >= fault.selftest[1]:
                return False, fault.selftest[0], fault.description, data
        return True, "PASS", "", data
