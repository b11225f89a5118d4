"""Streaming per-device features (diagnostics, first step of "Detect").

Every telemetry :class:`~gateway.protocol.Reading` becomes a short vector of *raw
features* for its product model, as the model's product file (:mod:`diagnostics.product`)
declares them: physical quantities that stay comparable across operating states
(vibration per squared drum speed while spinning, COP against its Carnot limit, a
sensor's offset from a second sensor while idle, shares of time in a state). A raw
feature is ``NaN`` when the reading does not show it (its ``when`` condition is false).
Metrics no product file describes (every metric of a model without a file) are features
of their own, appended as they are first seen (:meth:`FeatureSpec.with_metrics`).

:class:`FeatureProgram` evaluates a product's checked expressions
(:mod:`diagnostics.expressions`) as whole-column numpy operations over a batch of
readings; nothing from a file is ever run as Python code.

:class:`FeatureTable` keeps, per device and feature, an exponentially weighted level,
spread and linear trend (per day, weighted by the time each step covers), so memory is O(1) per
metric: a few float32 numbers. The table is a structure of arrays over device slots and is
updated for a whole batch at once (a batch holds each slot at most once), by one compiled
loop in :meth:`FeatureTable.advance` (:mod:`diagnostics.kernels`).
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt

from diagnostics.expressions import STATUS, Checked
from diagnostics.kernels import advance_rows
from diagnostics.product import GenericScoring, Product, builtin_products
from gateway.errors import ConfigError
from gateway.protocol import MetricValue, Reading

__all__ = [
    "FEATURE_SPECS",
    "FeatureDef",
    "FeatureProgram",
    "FeatureSpec",
    "FeatureTable",
    "extract_features",
    "spec_of",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
_NAN: Final = math.nan
_TREND_TAU_DAYS: Final = 1.0
_RUN_FULL: Final = 20.0
_DEFAULT_GENERIC: Final = GenericScoring()


@dataclass(frozen=True, slots=True)
class FeatureDef:
    """One streaming feature of a product model.

    Attributes:
        name: the feature's name.
        metrics: the metrics it is computed from (for explanations).
        alpha: weight of a new value in the feature's level (per update).
        floor: smallest change that matters (sensor noise and quantization), feature unit.
        min_count: updates before the device's own baseline of it is trusted.
        description: plain words.
        unit: its unit.
        generic: a metric no product file describes, scored as it comes.
    """

    name: str
    metrics: tuple[str, ...]
    alpha: float
    floor: float
    min_count: int
    description: str
    unit: str = ""
    generic: bool = False


Env = dict[str, Any]
_Fn = Callable[[Env], Any]

_BINARY: Final[Mapping[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
}
_COMPARE: Final[Mapping[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
_CALLS: Final[Mapping[str, Callable[..., Any]]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "log": np.log,
}


def _compile(node: ast.expr, constants: Mapping[str, float]) -> _Fn:
    """Turn a checked expression tree into a function of the batch's columns.

    Only the node types :mod:`diagnostics.expressions` accepts reach here; each becomes a
    numpy call on whole columns (``NaN`` compares false, as in the readings themselves).
    """
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Name):
        name = node.id
        if name in constants:
            number = constants[name]
            return lambda env: number
        return lambda env: env[name]
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand, constants)
        if isinstance(node.op, ast.Not):
            return lambda env: np.logical_not(operand(env))
        if isinstance(node.op, ast.USub):
            return lambda env: np.negative(operand(env))
        return operand
    if isinstance(node, ast.BinOp):
        left = _compile(node.left, constants)
        if isinstance(node.op, ast.Pow):
            exponent = float(ast.literal_eval(node.right))
            return lambda env: np.power(left(env), exponent)
        right = _compile(node.right, constants)
        op = _BINARY[type(node.op)]
        return lambda env: op(left(env), right(env))
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, constants) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        return lambda env: functools.reduce(combine, [p(env) for p in parts])
    if isinstance(node, ast.Compare):
        return _compile_compare(node, constants)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        args = [_compile(a, constants) for a in node.args]
        name = node.func.id
        if name in ("min", "max"):
            pair = np.minimum if name == "min" else np.maximum
            return lambda env: functools.reduce(pair, [a(env) for a in args])
        fn = _CALLS[name]
        (arg,) = args
        return lambda env: fn(arg(env))
    raise TypeError(f"unchecked expression node {type(node).__name__}")  # pragma: no cover


def _member(left: _Fn, words: list[str], negate: bool) -> _Fn:
    def member(env: Env) -> Any:
        column = left(env)
        found = functools.reduce(np.logical_or, [column == w for w in words])
        return np.logical_not(found) if negate else found

    return member


def _comparison(compare: Callable[[Any, Any], Any], left: _Fn, right: _Fn) -> _Fn:
    return lambda env: compare(left(env), right(env))


def _compile_compare(node: ast.Compare, constants: Mapping[str, float]) -> _Fn:
    operands = [node.left, *node.comparators]
    tests: list[_Fn] = []
    for op, a, b in zip(node.ops, operands[:-1], operands[1:], strict=True):
        left = _compile(a, constants)
        if isinstance(op, ast.In | ast.NotIn):
            assert isinstance(b, ast.Tuple | ast.List)
            words = [str(ast.literal_eval(item)) for item in b.elts]
            negate = isinstance(op, ast.NotIn)

            tests.append(_member(left, words, negate))
            continue
        tests.append(_comparison(_COMPARE[type(op)], left, _compile(b, constants)))
    if len(tests) == 1:
        return tests[0]
    return lambda env: functools.reduce(np.logical_and, [t(env) for t in tests])


# -- the same expressions on one reading's numbers (small rounds) -----------------------


def _divide(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a != a or a == 0.0:
            return _NAN
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _power(a: float, b: float) -> float:
    try:
        value = a**b
    except OverflowError:
        return math.inf
    except ZeroDivisionError:
        return math.inf
    return _NAN if isinstance(value, complex) else value


def _fold(pick: Callable[..., float]) -> Callable[..., float]:
    def fold(*values: float) -> float:
        # numpy's minimum/maximum: any NaN wins
        return _NAN if any(v != v for v in values) else pick(values)

    return fold


def _guarded(fn: Callable[[float], float], bad: float) -> Callable[[float], float]:
    def call(value: float) -> float:
        try:
            return fn(value)
        except OverflowError:
            return math.inf
        except ValueError:
            return bad if value == 0.0 else _NAN

    return call


_SCALAR_BINARY: Final[Mapping[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _divide,
}
_SCALAR_COMPARE: Final[Mapping[type[ast.cmpop], Callable[[Any, Any], bool]]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_SCALAR_CALLS: Final[Mapping[str, Callable[..., float]]] = {
    "abs": abs,
    "sqrt": _guarded(math.sqrt, 0.0),
    "exp": _guarded(math.exp, 1.0),
    "log": _guarded(math.log, -math.inf),
    "min": _fold(min),
    "max": _fold(max),
}


def _compile_scalar(node: ast.expr, constants: Mapping[str, float]) -> _Fn:
    """The scalar twin of :func:`_compile`: the same arithmetic on one reading's numbers.

    IEEE float64 like numpy, with numpy's answers where Python would raise (division by
    zero, overflow) or differ (a NaN in ``min``/``max``), so both give the same rows.
    Common shapes (a name, a constant operand, two or three conditions) get their own
    small functions: a round of a few readings is mostly these calls.
    """
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Name):
        name = node.id
        if name in constants:
            number = constants[name]
            return lambda env: number
        return cast("_Fn", operator.itemgetter(name))
    if isinstance(node, ast.UnaryOp):
        operand = _compile_scalar(node.operand, constants)
        if isinstance(node.op, ast.Not):
            return lambda env: not operand(env)
        if isinstance(node.op, ast.USub):
            return lambda env: -operand(env)
        return operand
    if isinstance(node, ast.BinOp):
        left = _compile_scalar(node.left, constants)
        if isinstance(node.op, ast.Pow):
            exponent = float(ast.literal_eval(node.right))
            return lambda env: _power(left(env), exponent)
        op = _SCALAR_BINARY[type(node.op)]
        return _binary(op, left, node.right, constants)
    if isinstance(node, ast.BoolOp):
        parts = [_compile_scalar(v, constants) for v in node.values]
        return _both(parts) if isinstance(node.op, ast.And) else _either(parts)
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        tests: list[_Fn] = []
        for cmp, a, b in zip(node.ops, operands[:-1], operands[1:], strict=True):
            first = _compile_scalar(a, constants)
            if isinstance(cmp, ast.In | ast.NotIn):
                assert isinstance(b, ast.Tuple | ast.List)
                words = frozenset(str(ast.literal_eval(item)) for item in b.elts)
                tests.append(_scalar_member(first, words, isinstance(cmp, ast.NotIn)))
                continue
            tests.append(_binary(_SCALAR_COMPARE[type(cmp)], first, b, constants))
        return _both(tests)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        args = [_compile_scalar(a, constants) for a in node.args]
        fn = _SCALAR_CALLS[node.func.id]
        if len(args) == 1:
            (arg,) = args
            return lambda env: fn(arg(env))
        if len(args) == 2:
            pair = _min2 if node.func.id == "min" else _max2
            first, second = args
            return lambda env: pair(first(env), second(env))
        return lambda env: fn(*(a(env) for a in args))
    raise TypeError(f"unchecked expression node {type(node).__name__}")  # pragma: no cover


def _min2(a: float, b: float) -> float:
    return _NAN if a != a or b != b else min(a, b)


def _max2(a: float, b: float) -> float:
    return _NAN if a != a or b != b else max(a, b)


def _binary(
    op: Callable[[Any, Any], Any], left: _Fn, right: ast.expr, constants: Mapping[str, float]
) -> _Fn:
    if isinstance(right, ast.Constant):
        value = right.value
        return lambda env: op(left(env), value)
    if isinstance(right, ast.Name) and right.id in constants:
        number = constants[right.id]
        return lambda env: op(left(env), number)
    other = _compile_scalar(right, constants)
    return lambda env: op(left(env), other(env))


def _both(parts: list[_Fn]) -> _Fn:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        a, b = parts
        return lambda env: bool(a(env)) and bool(b(env))
    if len(parts) == 3:
        a, b, c = parts
        return lambda env: bool(a(env)) and bool(b(env)) and bool(c(env))
    return lambda env: all(p(env) for p in parts)


def _either(parts: list[_Fn]) -> _Fn:
    if len(parts) == 2:
        a, b = parts
        return lambda env: bool(a(env)) or bool(b(env))
    return lambda env: any(p(env) for p in parts)


def _scalar_member(left: _Fn, words: frozenset[str], negate: bool) -> _Fn:
    if negate:
        return lambda env: left(env) not in words
    return lambda env: left(env) in words


#: Rounds smaller than this are computed reading by reading (numpy's fixed cost per call
#: outweighs its speed on a few rows; tests hold both ways to the same rows).
_SCALAR_BELOW: Final = 24


class FeatureProgram:
    """A product's features as whole-column numpy operations over a batch of readings.

    Args:
        product: the product (its checked states and features); ``None`` for none.
        generic: metrics scored as they come, appended after the product's features.
    """

    def __init__(self, product: Product | None, generic: Sequence[str] = ()) -> None:
        self.product = product
        self.generic = tuple(generic)
        constants: dict[str, float] = {}
        self._bools: frozenset[str] = frozenset()
        self._states: list[tuple[str, _Fn]] = []
        self._features: list[tuple[_Fn | None, _Fn | None, str | None, bool]] = []
        self._scalar_states: list[tuple[str, _Fn]] = []
        self._scalar: list[tuple[_Fn | None, _Fn | None, str | None, bool]] = []
        used: dict[str, None] = {}
        if product is not None:
            constants = {c.name: c.value for c in product.constants.values()}
            self._bools = frozenset(m.name for m in product.metrics.values() if m.is_bool)

            def need(checked: Checked | None) -> _Fn | None:
                if checked is None:
                    return None
                for name in checked.names:
                    if name in product.metrics:
                        used.setdefault(name)
                return _compile(checked.tree, constants)

            def scalar(checked: Checked | None) -> _Fn | None:
                return None if checked is None else _compile_scalar(checked.tree, constants)

            for state in product.states:
                fn = need(state.condition)
                one = scalar(state.condition)
                assert fn is not None
                assert one is not None
                self._states.append((state.name, fn))
                self._scalar_states.append((state.name, one))
            for feature in product.features:
                if feature.repeat is not None:
                    used.setdefault(feature.repeat)
                as_share = feature.expr is not None and feature.expr.kind == "bool"
                self._features.append(
                    (need(feature.expr), need(feature.when), feature.repeat, as_share)
                )
                self._scalar.append(
                    (scalar(feature.expr), scalar(feature.when), feature.repeat, as_share)
                )
        self._metrics = tuple(used)
        self.width = len(self._features) + len(self.generic)

    def __reduce__(self) -> tuple[type[FeatureProgram], tuple[Product | None, tuple[str, ...]]]:
        # the compiled functions are rebuilt from the product (a pickle holds no code)
        return (FeatureProgram, (self.product, self.generic))

    def with_metrics(self, names: Sequence[str]) -> FeatureProgram:
        """Return the program with more generic metrics appended."""
        return FeatureProgram(self.product, (*self.generic, *names))

    def rows(
        self, metrics: Sequence[Mapping[str, MetricValue]], statuses: Sequence[str | None]
    ) -> F64:
        """Return the raw features of a batch (one row per reading, ``NaN`` where none)."""
        n = len(metrics)
        if n < _SCALAR_BELOW:
            return self._rows_one_by_one(metrics, statuses)
        out = np.empty((n, self.width), dtype=np.float64)
        columns: dict[str, F64] = {}

        def column(name: str) -> F64:
            found = columns.get(name)
            if found is None:
                found = columns[name] = np.fromiter(
                    (m.get(name, _NAN) for m in metrics), dtype=np.float64, count=n
                )
            return found

        if self._features:
            env: Env = {STATUS: np.array([s or "" for s in statuses], dtype=str)}
            for name in self._metrics:
                values = column(name)
                if name in self._bools:
                    # a missing true/false metric is false
                    env[name] = np.logical_and(values != 0.0, ~np.isnan(values))
                else:
                    env[name] = values
            with np.errstate(all="ignore"):
                for name, fn in self._states:
                    env[name] = np.broadcast_to(fn(env), (n,))
                for j, (value, when, repeat, as_share) in enumerate(self._features):
                    if repeat is not None:
                        out[:, j] = column(repeat)
                        continue
                    assert value is not None
                    x = value(env)
                    if as_share:
                        x = np.where(x, 1.0, 0.0)
                    if when is not None:
                        x = np.where(when(env), x, _NAN)
                    out[:, j] = x
        base = len(self._features)
        for k, name in enumerate(self.generic):
            out[:, base + k] = column(name)
        return out

    def _rows_one_by_one(
        self, metrics: Sequence[Mapping[str, MetricValue]], statuses: Sequence[str | None]
    ) -> F64:
        """:meth:`rows` reading by reading, on Python floats (the same numbers)."""
        numbers = [name for name in self._metrics if name not in self._bools]
        bools = [name for name in self._metrics if name in self._bools]
        states = self._scalar_states
        features = self._scalar
        generic = self.generic
        out: list[list[float]] = []
        for values, status in zip(metrics, statuses, strict=True):
            # numbers as sent (an int computes like its float), a missing one NaN
            env: Env = {name: values.get(name, _NAN) for name in numbers}
            env[STATUS] = status or ""
            for name in bools:
                env[name] = bool(values.get(name, False))
            for name, fn in states:
                env[name] = fn(env)
            row: list[float] = []
            for value, when, repeat, as_share in features:
                if repeat is not None:
                    row.append(float(values.get(repeat, _NAN)))
                elif when is not None and not when(env):
                    row.append(_NAN)
                elif as_share:
                    row.append(1.0 if value(env) else 0.0)  # type: ignore[misc]
                else:
                    row.append(float(value(env)))  # type: ignore[misc]
            if generic:
                row += [float(values.get(name, _NAN)) for name in generic]
            out.append(row)
        return np.array(out, dtype=np.float64).reshape(len(out), self.width)


@dataclass(frozen=True, slots=True, eq=False)
class FeatureSpec:
    """The features of one product model and how to compute them from readings.

    Attributes:
        model: the product model.
        primary_metric: the main temperature sensor's metric (for ``sensor_repeat``).
        features: the features, in vector order: the product file's, then the metrics
            no file describes (:attr:`FeatureDef.generic`).
        program: computes the raw features of a batch of readings; the repeat feature's
            slot carries the metric's own value, which :class:`FeatureTable` turns into
            the repeat share (it needs the history).
        listed: the metrics the product file lists (the rest are scored generically).
        generic: how metrics no file describes are scored.
    """

    model: str
    primary_metric: str
    features: tuple[FeatureDef, ...]
    program: FeatureProgram
    listed: frozenset[str] = frozenset()
    generic: GenericScoring = _DEFAULT_GENERIC

    @property
    def names(self) -> tuple[str, ...]:
        """The feature names, in vector order."""
        return tuple(f.name for f in self.features)

    def index(self, name: str) -> int:
        """Return the position of feature ``name`` (``-1`` when the model lacks it)."""
        names = self.names
        return names.index(name) if name in names else -1

    @property
    def repeat_index(self) -> int:
        """The position of the repeat feature (``-1``: none)."""
        product = self.program.product
        if product is None:
            return -1
        for i, feature in enumerate(product.features):
            if feature.repeat is not None:
                return i
        return -1

    def extract(self, metrics: Mapping[str, MetricValue], status: str | None) -> list[float]:
        """Return the raw features of one reading (see :attr:`program`)."""
        row: list[float] = self.program.rows([metrics], [status])[0].tolist()
        return row

    def with_metrics(self, first: Mapping[str, MetricValue]) -> FeatureSpec:
        """Return the spec with the metrics ``first`` holds appended as generic features.

        Each value (the first seen) sets the metric's noise floor: the generic scoring's
        ``relative_floor`` of it, at least ``min_floor``.
        """
        rule = self.generic
        added = tuple(
            FeatureDef(
                name,
                (name,),
                rule.alpha,
                max(rule.min_floor, rule.relative_floor * abs(float(value))),
                rule.min_count,
                f"metric {name}, as the device sends it",
                generic=True,
            )
            for name, value in first.items()
        )
        return FeatureSpec(
            self.model,
            self.primary_metric,
            (*self.features, *added),
            self.program.with_metrics(list(first)),
            self.listed,
            self.generic,
        )


def spec_of(product: Product, model: str | None = None) -> FeatureSpec:
    """Return the features of ``product`` (for devices of ``model``, default its own)."""
    features = tuple(
        FeatureDef(f.name, f.metrics, f.alpha, f.floor, f.min_count, f.description, f.unit)
        for f in product.features
    )
    return FeatureSpec(
        product.model if model is None else model,
        product.primary_metric,
        features,
        FeatureProgram(product),
        frozenset(product.metrics),
        product.generic,
    )


#: Feature specs of the built-in product models (``diagnostics/products/*.toml``).
FEATURE_SPECS: Final[Mapping[str, FeatureSpec]] = {
    model: spec_of(product) for model, product in builtin_products().products.items()
}


def extract_features(spec: FeatureSpec, reading: Reading) -> list[float]:
    """Return the raw features of one reading (``NaN`` where the reading shows none).

    ``sensor_repeat`` is ``NaN`` too: it needs the device's history (see
    :class:`FeatureTable`).
    """
    values = spec.extract(reading.metrics, reading.status)
    repeat = spec.repeat_index
    if repeat >= 0:
        values[repeat] = _NAN
    return values


class FeatureTable:
    """Streaming features of all devices of one product model (structure of arrays).

    Per device slot and feature: level (EW mean), spread (EW variance around the level),
    trend (EW linear slope per day, Holt) and the time of its last update; per slot: the
    last main-sensor value and the last reading time.

    Args:
        spec: the product model's features.
        capacity: initial number of device slots (grows by doubling).
    """

    def __init__(self, spec: FeatureSpec, capacity: int = 64) -> None:
        self.spec = spec
        n = len(spec.features)
        self.width = n
        self.alpha = np.array([f.alpha for f in spec.features], dtype=np.float32)
        self._keep = (np.float32(1.0) - self.alpha).astype(np.float32)
        self.floor2 = np.array([f.floor**2 for f in spec.features], dtype=np.float32)
        self.trend_tau_days = _TREND_TAU_DAYS
        self._repeat = spec.repeat_index
        self.level: F32 = np.full((capacity, n), np.nan, dtype=np.float32)
        self.spread: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.trend: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.count: F32 = np.zeros((capacity, n), dtype=np.float32)
        self.updated_s: npt.NDArray[np.int32] = np.zeros((capacity, n), dtype=np.int32)
        self.last_primary: F32 = np.full(capacity, np.nan, dtype=np.float32)
        self.run: F32 = np.zeros(capacity, dtype=np.float32)
        self.last_ts_ms: I64 = np.full(capacity, np.iinfo(np.int64).min, dtype=np.int64)
        self.epoch_ms: int | None = None

    @property
    def capacity(self) -> int:
        """The number of slots allocated."""
        return int(self.level.shape[0])

    def ensure(self, slots: int) -> None:
        """Grow the arrays to hold at least ``slots`` slots."""
        cap = self.capacity
        if slots <= cap:
            return
        new = max(slots, 2 * cap)
        for name in ("level", "spread", "trend", "count", "updated_s", "last_primary", "run"):
            old = getattr(self, name)
            fill = np.nan if name in ("level", "last_primary") else 0
            grown = np.full((new, *old.shape[1:]), fill, dtype=old.dtype)
            grown[:cap] = old
            setattr(self, name, grown)
        ts = np.full(new, np.iinfo(np.int64).min, dtype=np.int64)
        ts[:cap] = self.last_ts_ms
        self.last_ts_ms = ts

    def widen(self, spec: FeatureSpec) -> None:
        """Take ``spec``, the same features with more appended (new columns start empty)."""
        old = self.width
        n = len(spec.features)
        if spec.names[:old] != self.spec.names:
            raise ConfigError(f"{spec.model}: a wider spec must keep the features before it")
        self.spec = spec
        self.width = n
        self.alpha = np.array([f.alpha for f in spec.features], dtype=np.float32)
        self._keep = (np.float32(1.0) - self.alpha).astype(np.float32)
        self.floor2 = np.array([f.floor**2 for f in spec.features], dtype=np.float32)
        self._repeat = spec.repeat_index
        for name in ("level", "spread", "trend", "count", "updated_s"):
            before = getattr(self, name)
            grown = np.full((before.shape[0], n), np.nan if name == "level" else 0, before.dtype)
            grown[:, :old] = before
            setattr(self, name, grown)

    def advance(
        self, readings: Sequence[Reading], slots: npt.NDArray[np.intp], ts_ms: I64
    ) -> tuple[F32, F32, npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
        """Fold ``readings`` (one per slot, slots distinct) into the slots' state.

        One compiled pass (:func:`diagnostics.kernels.advance_rows`); a reading not newer
        than its slot's last one (late) changes nothing.

        Returns:
            the slots' levels and update counts after the step, each reading's device time
            (seconds since :attr:`epoch_ms`) and which readings were late.
        """
        if self.epoch_ms is None:
            self.epoch_ms = int(ts_ms.min()) if len(ts_ms) else 0
        rows = self.spec.program.rows([r.metrics for r in readings], [r.status for r in readings])
        x = rows.astype(np.float32)
        level, count, now_s, late = advance_rows(
            x,
            self._repeat,
            _RUN_FULL,
            slots,
            ts_ms,
            self.epoch_ms,
            self.level,
            self.spread,
            self.trend,
            self.count,
            self.updated_s,
            self.last_primary,
            self.run,
            self.last_ts_ms,
            self.alpha,
            self._keep,
            _TREND_TAU_DAYS,
        )
        return level, count, now_s, late

    def state_bytes(self) -> int:
        """Bytes of numpy state per device slot."""
        per_row = sum(
            getattr(self, name)[0].nbytes
            for name in ("level", "spread", "trend", "count", "updated_s", "last_primary", "run")
        )
        return int(per_row + self.last_ts_ms.itemsize)
