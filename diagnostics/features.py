"""Streaming per-device features (diagnostics, first step of "Detect").

Every telemetry :class:`~wire.protocol.Reading` becomes a short vector of *raw
features* for its product model, as the model's product file (:mod:`diagnostics.product`)
declares them: physical quantities that stay comparable across operating states
(vibration per squared drum speed while spinning, COP against its Carnot limit, a
sensor's offset from a second sensor while idle, shares of time in a state). A raw
feature is ``NaN`` when the reading does not show it (its ``when`` condition is false).
Metrics no product file describes (every metric of a model without a file) are features
of their own, appended as they are first seen (:meth:`FeatureSpec.with_metrics`).

:class:`FeatureProgram` turns a product's checked expressions
(:mod:`diagnostics.expressions`) into register instructions that one compiled loop
(:func:`diagnostics.kernels.feature_rows`) runs over a batch of readings; nothing from a
file is ever run as Python code.

:class:`FeatureTable` keeps, per device and feature, an exponentially weighted level,
spread and linear trend (per day, weighted by the time each step covers), so memory is O(1) per
metric: a few float32 numbers. The table is a structure of arrays over device slots and is
updated for a whole batch at once (a batch holds each slot at most once), by one compiled
loop in :meth:`FeatureTable.advance` (:mod:`diagnostics.kernels`).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from diagnostics import kernels
from diagnostics.expressions import STATUS
from diagnostics.kernels import advance_rows
from diagnostics.product import GenericScoring, Product, builtin_products
from wire.errors import ConfigError
from wire.protocol import MetricValue, Reading

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


_BINARY: Final[Mapping[type[ast.AST], int]] = {
    ast.Add: kernels.OP_ADD,
    ast.Sub: kernels.OP_SUB,
    ast.Mult: kernels.OP_MUL,
    ast.Div: kernels.OP_DIV,
    ast.Lt: kernels.OP_LT,
    ast.LtE: kernels.OP_LE,
    ast.Gt: kernels.OP_GT,
    ast.GtE: kernels.OP_GE,
    ast.Eq: kernels.OP_EQ,
    ast.NotEq: kernels.OP_NE,
}
_UNARY_CALLS: Final[Mapping[str, int]] = {
    "abs": kernels.OP_ABS,
    "sqrt": kernels.OP_SQRT,
    "exp": kernels.OP_EXP,
    "log": kernels.OP_LOG,
}


class _Assembler:
    """Turns checked expression trees into register instructions (private).

    Every node gets a register of its own; a condition is 1.0 or 0.0. Only the node
    types :mod:`diagnostics.expressions` accepts reach here.
    """

    def __init__(self, product: Product | None) -> None:
        self.code: list[tuple[int, int, int, int]] = []
        self.consts: list[float] = []
        self.columns: dict[str, int] = {}
        self.words: dict[str, int] = {}
        self.names: dict[str, int] = {}  # states already computed, by register
        self.registers = 0
        self.constants = (
            {} if product is None else {c.name: c.value for c in product.constants.values()}
        )
        self.bools = (
            frozenset()
            if product is None
            else frozenset(m.name for m in product.metrics.values() if m.is_bool)
        )

    def emit(self, op: int, a: int = 0, b: int = 0) -> int:
        dst = self.registers
        self.registers += 1
        self.code.append((op, dst, a, b))
        return dst

    def column(self, metric: str) -> int:
        return self.columns.setdefault(metric, len(self.columns))

    def const(self, value: float) -> int:
        self.consts.append(float(value))
        return len(self.consts) - 1

    def word(self, word: str) -> int:
        return self.words.setdefault(word, len(self.words))

    def node(self, node: ast.expr) -> int:
        if isinstance(node, ast.Constant):
            assert isinstance(node.value, int | float)
            return self.emit(kernels.OP_CONST, self.const(node.value))
        if isinstance(node, ast.Name):
            name = node.id
            if name in self.names:
                return self.names[name]
            if name in self.constants:
                return self.emit(kernels.OP_CONST, self.const(self.constants[name]))
            op = kernels.OP_TRUTH if name in self.bools else kernels.OP_METRIC
            return self.emit(op, self.column(name))
        if isinstance(node, ast.UnaryOp):
            operand = self.node(node.operand)
            if isinstance(node.op, ast.Not):
                return self.emit(kernels.OP_NOT, operand)
            if isinstance(node.op, ast.USub):
                return self.emit(kernels.OP_NEG, operand)
            return operand
        if isinstance(node, ast.BinOp):
            left = self.node(node.left)
            if isinstance(node.op, ast.Pow):
                exponent = float(ast.literal_eval(node.right))
                return self.emit(kernels.OP_POW, left, self.const(exponent))
            return self.emit(_BINARY[type(node.op)], left, self.node(node.right))
        if isinstance(node, ast.BoolOp):
            op = kernels.OP_AND if isinstance(node.op, ast.And) else kernels.OP_OR
            return self.chain(op, [self.node(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            args = [self.node(a) for a in node.args]
            name = node.func.id
            if name in ("min", "max"):
                return self.chain(kernels.OP_MIN if name == "min" else kernels.OP_MAX, args)
            return self.emit(_UNARY_CALLS[name], args[0])
        raise TypeError(f"unchecked expression node {type(node).__name__}")  # pragma: no cover

    def chain(self, op: int, registers: list[int]) -> int:
        result = registers[0]
        for other in registers[1:]:
            result = self.emit(op, result, other)
        return result

    def compare(self, node: ast.Compare) -> int:
        operands = [node.left, *node.comparators]
        tests: list[int] = []
        for cmp, a, b in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if isinstance(a, ast.Name) and a.id == STATUS:
                tests.append(self.status_test(cmp, b))
                continue
            if isinstance(b, ast.Name) and b.id == STATUS:
                tests.append(self.status_test(cmp, a))
                continue
            tests.append(self.emit(_BINARY[type(cmp)], self.node(a), self.node(b)))
        return self.chain(kernels.OP_AND, tests)

    def status_test(self, cmp: ast.cmpop, other: ast.expr) -> int:
        if isinstance(other, ast.Tuple | ast.List):
            words = [str(ast.literal_eval(item)) for item in other.elts]
        else:
            words = [str(ast.literal_eval(other))]
        found = self.chain(
            kernels.OP_OR, [self.emit(kernels.OP_STATUS, self.word(w)) for w in words]
        )
        if isinstance(cmp, ast.NotEq | ast.NotIn):
            return self.emit(kernels.OP_NOT, found)
        return found


#: From this many readings the metric columns are gathered column by column (fewer
#: conversions per value), below it row by row (fewer calls per round).
_BY_COLUMN: Final = 64


class FeatureProgram:
    """A product's features, run over a batch of readings by one compiled loop.

    The checked expressions of the product file become register instructions
    (:class:`_Assembler`) that :func:`diagnostics.kernels.feature_rows` runs row by row:
    nothing from a file is ever run as Python code, and a round of a few readings costs
    about what a round of many does per reading.

    Args:
        product: the product (its checked states and features); ``None`` for none.
        generic: metrics scored as they come, appended after the product's features.
    """

    def __init__(self, product: Product | None, generic: Sequence[str] = ()) -> None:
        self.product = product
        self.generic = tuple(generic)
        asm = _Assembler(product)
        column = 0
        if product is not None:
            for state in product.states:
                asm.names[state.name] = asm.node(state.condition.tree)
            for feature in product.features:
                if feature.repeat is not None:
                    value = asm.emit(kernels.OP_METRIC, asm.column(feature.repeat))
                    asm.code.append((kernels.OP_OUT, column, value, -1))
                else:
                    assert feature.expr is not None
                    value = asm.node(feature.expr.tree)
                    when = -1 if feature.when is None else asm.node(feature.when.tree)
                    share = feature.expr.kind == "bool"
                    op = kernels.OP_OUT_SHARE if share else kernels.OP_OUT
                    asm.code.append((op, column, value, when))
                column += 1
        for name in self.generic:
            value = asm.emit(kernels.OP_METRIC, asm.column(name))
            asm.code.append((kernels.OP_OUT, column, value, -1))
            column += 1
        self.width = column
        self._code = np.array(asm.code, dtype=np.int64).reshape(len(asm.code), 4)
        self._consts = np.array(asm.consts, dtype=np.float64)
        self._columns = tuple(asm.columns)
        self._words = dict(asm.words)
        self._registers = max(asm.registers, 1)

    def __reduce__(self) -> tuple[type[FeatureProgram], tuple[Product | None, tuple[str, ...]]]:
        # rebuilt from the product (a pickle of the engine holds no program)
        return (FeatureProgram, (self.product, self.generic))

    def with_metrics(self, names: Sequence[str]) -> FeatureProgram:
        """Return the program with more generic metrics appended."""
        return FeatureProgram(self.product, (*self.generic, *names))

    def rows(
        self, metrics: Sequence[Mapping[str, MetricValue]], statuses: Sequence[str | None]
    ) -> F64:
        """Return the raw features of a batch (one row per reading, ``NaN`` where none)."""
        n = len(metrics)
        names = self._columns
        # a bool metric arrives as True/False: 1.0/0.0 here; a missing metric is NaN
        if n < _BY_COLUMN:
            x = np.array(
                [[m.get(name, _NAN) for name in names] for m in metrics], dtype=np.float64
            ).reshape(n, len(names))
        else:
            x = np.empty((n, len(names)), dtype=np.float64)
            for j, name in enumerate(names):
                x[:, j] = np.fromiter((m.get(name, _NAN) for m in metrics), np.float64, n)
        words = self._words
        status = np.array([words.get(s or "", -1) for s in statuses], dtype=np.int64)
        rows: F64 = kernels.feature_rows(
            self._code, self._consts, x, status, self._registers, self.width
        )
        return rows


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
