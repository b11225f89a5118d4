"""Reading a product file (diagnostics, product knowledge): TOML to a checked product.

Every table, key, name, unit and expression of a product file is checked here; each
problem is collected with the file, the line, the key and why
(:class:`~diagnostics.product_model.ProductProblem`), so a refused file lists all of
them at once. :mod:`diagnostics.product` (the format, the entry points and the set of
products) calls :func:`_read`.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, Final

from diagnostics.expressions import (
    STATUS,
    Checked,
    ExpressionError,
    Kind,
    Unit,
    check_expression,
    format_unit,
    parse_unit,
)
from diagnostics.product_model import (
    ConstantDef,
    FaultDecl,
    FeatureDecl,
    GenericScoring,
    MetricDef,
    Product,
    ProductProblem,
    StateDef,
)
from wire.protocol import COMMAND_ACTIONS, METRIC_NAME_PATTERN

__all__: list[str] = []


_NAME_RE: Final = re.compile(METRIC_NAME_PATTERN)
_MODEL_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VISIT: Final = "technician_visit"
_ACTIONS: Final = frozenset(COMMAND_ACTIONS) | {_VISIT}
_DIRECTIONS: Final = {"up": 1, "down": -1, "either": 0}

_TOP_KEYS: Final = frozenset(
    {"product", "metrics", "constants", "states", "features", "faults", "generic", "simulation"}
)
_PRODUCT_KEYS: Final = frozenset({"model", "title", "primary_metric", "description"})
_METRIC_KEYS: Final = frozenset({"unit", "healthy", "description"})
_CONSTANT_KEYS: Final = frozenset({"value", "unit", "description"})
_FEATURE_KEYS: Final = frozenset(
    {"expr", "when", "repeat", "unit", "alpha", "floor", "min_count", "description", "metrics"}
)
_FAULT_KEYS: Final = frozenset(
    {
        "title",
        "gradual",
        "codes",
        "boot_reasons",
        "cleared_by",
        "quiet_close_s",
        "signature",
        "failure",
        "remedies",
    }
)
_FAILURE_KEYS: Final = frozenset({"feature", "change", "shape", "two_sided", "opposite_change"})
_REMEDY_KEYS: Final = frozenset({"action", "part", "skill", "note", "cures"})
_SIGNATURE_KEYS: Final = frozenset({"direction", "weight"})
_GENERIC_KEYS: Final = frozenset({"alpha", "min_count", "relative_floor", "min_floor"})


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to the line they are written on (tables and ``key =`` lines).

    A light scan, not a TOML parser: enough to point at a key in an error message.
    """
    lines: dict[str, int] = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("["):
            name = line.strip("[]").split("#")[0].strip().replace('"', "")
            table = name
            lines.setdefault(name, number)
            continue
        match = re.match(r'([A-Za-z0-9_."\- ]+?)\s*=', line)
        if match and not line.startswith("#"):
            key = match.group(1).replace('"', "").replace(" ", "")
            full = f"{table}.{key}" if table else key
            lines.setdefault(full, number)
            # the keys of an inline table on the same line
            for inner in re.finditer(r"[{,]\s*([A-Za-z0-9_]+)\s*=", line[match.end() :]):
                lines.setdefault(f"{full}.{inner.group(1)}", number)
    return lines


class _Reader:
    """Collects the problems of one file while it is read (private)."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = _key_lines(text)
        self.problems: list[ProductProblem] = []

    def line(self, key: str) -> int:
        while key:
            found = self.lines.get(key)
            if found:
                return found
            key = key.rpartition(".")[0]
        return 0

    def problem(self, key: str, why: str) -> None:
        self.problems.append(ProductProblem(self.source, self.line(key), key, why))

    def table(self, value: Any, key: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problem(key, f"must be a table, not {type(value).__name__}")
            return {}
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    where = f"{key}.{name}" if key else name
                    self.problem(where, f"unknown key; allowed: {', '.join(sorted(allowed))}")
        return value

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        name: str,
        default: float | None,
        low: float | None = None,
        high: float | None = None,
        *,
        integer: bool = False,
        above: bool = False,
    ) -> float:
        value = table.get(name, default)
        where = f"{key}.{name}"
        if value is None:
            self.problem(where, "missing (required)")
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(where, f"must be a number, not {value!r}")
            return math.nan
        if integer and not isinstance(value, int):
            self.problem(where, f"must be a whole number, not {value!r}")
        if not math.isfinite(value):
            self.problem(where, "must be finite")
        elif low is not None and (value <= low if above else value < low):
            self.problem(where, f"must be {'above' if above else 'at least'} {low:g}")
        elif high is not None and value > high:
            self.problem(where, f"must be at most {high:g}")
        return float(value)

    def text(self, table: Mapping[str, Any], key: str, name: str, default: str | None) -> str:
        value = table.get(name, default)
        if value is None:
            self.problem(f"{key}.{name}", "missing (required)")
            return ""
        if not isinstance(value, str):
            self.problem(f"{key}.{name}", f"must be text, not {value!r}")
            return ""
        return value

    def words(self, table: Mapping[str, Any], key: str, name: str) -> frozenset[str]:
        value = table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(f"{key}.{name}", "must be a list of words")
            return frozenset()
        return frozenset(value)

    def expression(
        self, text: Any, key: str, names: Mapping[str, tuple[Kind, Unit | None]]
    ) -> Checked | None:
        if not isinstance(text, str):
            self.problem(key, f"must be an expression in quotes, not {text!r}")
            return None
        try:
            return check_expression(text, names)
        except ExpressionError as exc:
            at = "" if exc.column is None else f" (at column {exc.column + 1})"
            self.problem(key, f"bad expression {text!r}: {exc.why}{at}")
            return None

    def unit(self, text: Any, key: str) -> Unit | None:
        if not isinstance(text, str):
            self.problem(key, f"must be a unit in quotes, not {text!r}")
            return None
        try:
            return parse_unit(text)
        except ExpressionError as exc:
            self.problem(key, exc.why)
            return None


def _whole(value: float) -> int:
    """A count read with :meth:`_Reader.number` (1 where it was refused: reported)."""
    return int(value) if math.isfinite(value) and value >= 1 else 1


def _metrics(reader: _Reader, raw: Any) -> dict[str, MetricDef]:
    metrics: dict[str, MetricDef] = {}
    for name, value in reader.table(raw, "metrics", None).items():
        key = f"metrics.{name}"
        if not _NAME_RE.fullmatch(name):
            reader.problem(key, f"not a metric name (pattern {METRIC_NAME_PATTERN})")
        entry = reader.table(value, key, _METRIC_KEYS)
        unit = reader.text(entry, key, "unit", None)
        if unit and unit != "bool":
            reader.unit(unit, f"{key}.unit")
        healthy: tuple[float, float] | None = None
        bounds = entry.get("healthy")
        if bounds is not None:
            if (
                not isinstance(bounds, list)
                or len(bounds) != 2
                or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
                or not bounds[0] < bounds[1]
            ):
                reader.problem(f"{key}.healthy", "must be [low, high] with low < high")
            elif unit == "bool":
                reader.problem(f"{key}.healthy", "a bool metric has no healthy range")
            else:
                healthy = (float(bounds[0]), float(bounds[1]))
        description = reader.text(entry, key, "description", "")
        metrics[name] = MetricDef(name, unit, healthy, description)
    return metrics


def _constants(reader: _Reader, raw: Any, taken: Mapping[str, object]) -> dict[str, ConstantDef]:
    constants: dict[str, ConstantDef] = {}
    for name, value in reader.table(raw, "constants", None).items():
        key = f"constants.{name}"
        if name in taken or name == STATUS:
            reader.problem(key, "name already used by a metric")
        entry = reader.table(value, key, _CONSTANT_KEYS)
        number = reader.number(entry, key, "value", None)
        unit = reader.text(entry, key, "unit", "")
        reader.unit(unit, f"{key}.unit")
        constants[name] = ConstantDef(name, number, unit)
    return constants


def _names(
    metrics: Mapping[str, MetricDef], constants: Mapping[str, ConstantDef]
) -> dict[str, tuple[Kind, Unit | None]]:
    names: dict[str, tuple[Kind, Unit | None]] = {STATUS: ("status", None)}
    for metric in metrics.values():
        if metric.is_bool:
            names[metric.name] = ("bool", None)
        else:
            try:
                names[metric.name] = ("number", parse_unit(metric.unit))
            except ExpressionError:
                names[metric.name] = ("number", None)  # reported with the metric
    for constant in constants.values():
        try:
            names[constant.name] = ("number", parse_unit(constant.unit))
        except ExpressionError:
            names[constant.name] = ("number", None)
    return names


def _states(
    reader: _Reader, raw: Any, names: dict[str, tuple[Kind, Unit | None]]
) -> tuple[StateDef, ...]:
    states: list[StateDef] = []
    for name, text in reader.table(raw, "states", None).items():
        key = f"states.{name}"
        if name in names:
            reader.problem(key, "name already used by a metric or constant")
            continue
        checked = reader.expression(text, key, names)
        if checked is not None and checked.kind != "bool":
            reader.problem(key, f"a state must be a condition, not a number: {text!r}")
            checked = None
        names[name] = ("bool", None)  # later states and features may use it
        if checked is not None:
            states.append(StateDef(name, checked))
    return tuple(states)


def _feature_metrics(
    checked: Sequence[Checked | None], states: Mapping[str, StateDef], metrics: Mapping[str, Any]
) -> tuple[str, ...]:
    out: dict[str, None] = {}

    def add(names: Sequence[str]) -> None:
        for name in names:
            if name in metrics:
                out.setdefault(name)
            elif name in states:
                add(states[name].condition.names)

    for item in checked:
        if item is not None:
            add(item.names)
    return tuple(out)


def _features(
    reader: _Reader,
    raw: Any,
    names: Mapping[str, tuple[Kind, Unit | None]],
    metrics: Mapping[str, MetricDef],
    states: Sequence[StateDef],
) -> tuple[FeatureDecl, ...]:
    features: list[FeatureDecl] = []
    by_state = {s.name: s for s in states}
    repeats = 0
    for name, value in reader.table(raw, "features", None).items():
        key = f"features.{name}"
        if not _NAME_RE.fullmatch(name):
            reader.problem(key, f"not a feature name (pattern {METRIC_NAME_PATTERN})")
        entry = reader.table(value, key, _FEATURE_KEYS)
        expr: Checked | None = None
        when: Checked | None = None
        repeat = entry.get("repeat")
        unit_text = entry.get("unit")
        if ("expr" in entry) == (repeat is not None):
            reader.problem(key, "needs exactly one of expr (a value) and repeat (a metric)")
        if repeat is not None:
            repeats += 1
            if not isinstance(repeat, str) or repeat not in metrics:
                reader.problem(f"{key}.repeat", f"unknown metric {repeat!r}")
                repeat = None
            elif repeats > 1:
                reader.problem(f"{key}.repeat", "only one repeat feature per product")
            if "when" in entry:
                reader.problem(f"{key}.when", "a repeat feature follows every reading")
            if unit_text not in (None, "1", ""):
                reader.problem(f"{key}.unit", "a repeat feature is a share (unit 1)")
            unit_text = "1"
        if "expr" in entry:
            expr = reader.expression(entry["expr"], f"{key}.expr", names)
        if "when" in entry:
            when = reader.expression(entry["when"], f"{key}.when", names)
            if when is not None and when.kind != "bool":
                reader.problem(f"{key}.when", "must be a condition, not a number")
        if expr is not None:
            found = () if expr.kind == "bool" else expr.unit
            if unit_text is None:
                unit_text = format_unit(found) if found is not None else "1"
            else:
                declared = reader.unit(unit_text, f"{key}.unit")
                if declared is not None and found is not None and declared != found:
                    reader.problem(
                        f"{key}.unit",
                        f"unit clash: declared {unit_text!r} but the expression gives "
                        f"{format_unit(found)!r}",
                    )
        explicit = entry.get("metrics")
        if explicit is None:
            used = _feature_metrics([expr, when], by_state, metrics)
            if repeat is not None:
                used = (repeat,)
        elif isinstance(explicit, list) and all(m in metrics for m in explicit):
            used = tuple(explicit)
        else:
            reader.problem(f"{key}.metrics", "must list metrics of the file")
            used = ()
        features.append(
            FeatureDecl(
                name,
                expr,
                when,
                repeat if isinstance(repeat, str) else None,
                unit_text if isinstance(unit_text, str) else "1",
                reader.number(entry, key, "alpha", None, 0.0, 1.0, above=True),
                reader.number(entry, key, "floor", None, 0.0, above=True),
                _whole(reader.number(entry, key, "min_count", None, 1, integer=True)),
                reader.text(entry, key, "description", ""),
                used,
            )
        )
    return tuple(features)


def _faults(reader: _Reader, raw: Any, features: Sequence[FeatureDecl]) -> tuple[FaultDecl, ...]:
    names = {f.name for f in features}
    faults: list[FaultDecl] = []
    codes_seen: dict[str, str] = {}
    for name, value in reader.table(raw, "faults", None).items():
        key = f"faults.{name}"
        if not _NAME_RE.fullmatch(name):
            reader.problem(key, f"not a fault name (pattern {METRIC_NAME_PATTERN})")
        entry = reader.table(value, key, _FAULT_KEYS)
        reader.text(entry, key, "title", None)
        gradual = entry.get("gradual", False)
        if not isinstance(gradual, bool):
            reader.problem(f"{key}.gradual", "must be true or false")
        for code in reader.words(entry, key, "codes"):
            if code in codes_seen:
                reader.problem(f"{key}.codes", f"code {code} already names {codes_seen[code]}")
            codes_seen[code] = name
        reader.words(entry, key, "boot_reasons")
        reader.words(entry, key, "cleared_by")
        reader.number(entry, key, "quiet_close_s", 2 * 86_400.0, 0.0, above=True)
        _signature(reader, entry.get("signature", {}), f"{key}.signature", names)
        failure = entry.get("failure")
        if failure is not None:
            fkey = f"{key}.failure"
            table = reader.table(failure, fkey, _FAILURE_KEYS)
            feature = reader.text(table, fkey, "feature", None)
            if feature and feature not in names:
                reader.problem(f"{fkey}.feature", f"unknown feature {feature!r}")
            change = reader.number(table, fkey, "change", None)
            if change == 0.0:
                reader.problem(f"{fkey}.change", "must not be 0")
            reader.number(table, fkey, "shape", 1.0, 0.0, above=True)
            if not isinstance(table.get("two_sided", False), bool):
                reader.problem(f"{fkey}.two_sided", "must be true or false")
            if "opposite_change" in table:
                reader.number(table, fkey, "opposite_change", None)
        elif gradual is True:
            reader.problem(key, "a gradual fault needs a failure table (its health indicator)")
        remedies = entry.get("remedies")
        if not isinstance(remedies, list) or not remedies:
            reader.problem(f"{key}.remedies", "needs a list of one or more remedies, in order")
        else:
            for i, remedy in enumerate(remedies):
                rkey = f"{key}.remedies"
                table = reader.table(remedy, rkey, _REMEDY_KEYS)
                action = reader.text(table, rkey, "action", None)
                if action and action not in _ACTIONS:
                    known = ", ".join(sorted(_ACTIONS))
                    reader.problem(
                        rkey, f"remedy {i + 1}: unknown action {action!r}; known: {known}"
                    )
                for word in ("part", "skill", "note"):
                    reader.text(table, rkey, word, "")
                if not isinstance(table.get("cures", True), bool):
                    reader.problem(rkey, f"remedy {i + 1}: cures must be true or false")
        faults.append(FaultDecl(name, entry))
    return tuple(faults)


def _signature(reader: _Reader, raw: Any, key: str, names: set[str]) -> None:
    if raw == "any":
        return
    for feature, value in reader.table(raw, key, None).items():
        where = f"{key}.{feature}"
        if feature not in names:
            reader.problem(where, f"unknown feature {feature!r}")
        if isinstance(value, str):
            if value not in _DIRECTIONS:
                reader.problem(where, f"direction must be one of {sorted(_DIRECTIONS)}")
            continue
        table = reader.table(value, where, _SIGNATURE_KEYS)
        if table.get("direction") not in _DIRECTIONS:
            reader.problem(where, f"direction must be one of {sorted(_DIRECTIONS)}")
        reader.number(table, where, "weight", 1.0, 0.0, above=True)


def _generic(reader: _Reader, raw: Any, base: GenericScoring) -> GenericScoring:
    table = reader.table(raw, "generic", _GENERIC_KEYS)
    return GenericScoring(
        reader.number(table, "generic", "alpha", base.alpha, 0.0, 1.0, above=True),
        _whole(reader.number(table, "generic", "min_count", base.min_count, 1, integer=True)),
        reader.number(table, "generic", "relative_floor", base.relative_floor, 0.0, above=True),
        reader.number(table, "generic", "min_floor", base.min_floor, 0.0, above=True),
    )


def _read(
    text: str, source: str, base: GenericScoring | None = None
) -> tuple[Product | None, list[ProductProblem]]:
    reader = _Reader(text, source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else 0
        return None, [ProductProblem(source, line, "", f"not valid TOML: {exc}")]
    reader.table(doc, "", _TOP_KEYS)
    head = reader.table(doc.get("product", {}), "product", _PRODUCT_KEYS)
    if "product" not in doc:
        reader.problem("product", "missing [product] table (model = ...)")
    model = reader.text(head, "product", "model", None)
    if model and not _MODEL_RE.fullmatch(model):
        reader.problem("product.model", "must be lower-case letters, digits and _ (at most 32)")
    metrics = _metrics(reader, doc.get("metrics", {}))
    primary = reader.text(head, "product", "primary_metric", "")
    if primary and primary not in metrics:
        reader.problem("product.primary_metric", f"unknown metric {primary!r}")
    constants = _constants(reader, doc.get("constants", {}), metrics)
    names = _names(metrics, constants)
    states = _states(reader, doc.get("states", {}), names)
    features = _features(reader, doc.get("features", {}), names, metrics, states)
    faults = _faults(reader, doc.get("faults", {}), features)
    generic = _generic(reader, doc.get("generic", {}), base or GenericScoring())
    simulation = reader.table(doc.get("simulation", {}), "simulation", None)
    if reader.problems:
        return None, reader.problems
    product = Product(
        model,
        reader.text(head, "product", "title", model),
        primary,
        metrics,
        constants,
        states,
        features,
        faults,
        generic,
        simulation,
        source,
    )
    return product, []
