"""The expression language of product files (diagnostics: product knowledge as data).

A product file (:mod:`diagnostics.products`) says how its operating states and derived
features follow from the metrics a device sends, in small expressions::

    spinning = "drum_rpm >= 600"
    spin_vibration = "vibration_rms_g / (drum_rpm / krpm) ** 2"
    tumbling = "status in ('washing', 'rinsing') and 40 <= drum_rpm <= 60"

An expression is parsed with :mod:`ast` and only a whitelist is accepted: numbers, names
(metrics, constants, states and ``status``), ``+ - * / **`` (a number as exponent),
comparisons (chained too), ``and``/``or``/``not``, ``status == 'word'`` and
``status in ('a', 'b')``, and the functions ``abs``, ``min``, ``max``, ``sqrt``, ``exp``
and ``log``. Nothing is ever evaluated by Python: :mod:`diagnostics.features` turns a
checked expression into whole-column numpy operations over a batch of readings.

Every name carries a unit and the checker keeps track of them: adding, subtracting or
comparing quantities of different units is refused (a *unit clash*), products and
quotients combine units, a bare number adapts to what it is added to. Temperatures in
``degC`` count as kelvin (a difference of two temperatures is in ``K``). Booleans (``bool``
metrics, states, comparisons) are conditions, never numbers, except as a whole feature
(its value is then 1 or 0, e.g. a share of time in a state).

This module is pure Python (no numpy), so the fault catalog can be read without it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Literal

from wire.errors import ConfigError

__all__ = [
    "FUNCTIONS",
    "STATUS",
    "Checked",
    "ExpressionError",
    "Kind",
    "Unit",
    "check_expression",
    "format_unit",
    "parse_unit",
]

#: The name of a reading's status word in expressions.
STATUS: Final = "status"
#: The functions an expression may call.
FUNCTIONS: Final = frozenset({"abs", "min", "max", "sqrt", "exp", "log"})
_MAX_LENGTH: Final = 500
_MAX_NODES: Final = 200
_SYMBOL: Final = re.compile(r"[A-Za-z%][A-Za-z0-9_%]*")
_ALIASES: Final = {"degC": "K", "°C": "K", "C": "K", "1": "", "%": ""}

#: A unit: base symbols with their (non-zero) exponents, sorted; ``()`` is a pure number.
Unit = tuple[tuple[str, Fraction], ...]
#: What an expression yields: a number, a condition, the status word or a string literal.
Kind = Literal["number", "bool", "status", "text"]


class ExpressionError(ConfigError):
    """An expression is not in the language, names something unknown, or mixes units.

    Attributes:
        why: what is wrong, in plain words.
        column: where in the expression (0-based), when known.
    """

    def __init__(self, why: str, column: int | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.column = column


def parse_unit(text: str) -> Unit:
    """Parse a unit such as ``W``, ``l/min``, ``g/krpm^2``, ``1/K``, ``degC`` or ``1``.

    Raises:
        ExpressionError: the text is not a unit.
    """
    powers: dict[str, Fraction] = {}
    cleaned = text.replace(" ", "")
    if cleaned in ("", "1"):
        return ()
    parts = re.split(r"([*/])", cleaned)
    for sign, part in zip(["*", *parts[1::2]], parts[0::2], strict=True):
        symbol, _, exponent = part.partition("^")
        symbol = _ALIASES.get(symbol, symbol)
        if not part or (symbol and not _SYMBOL.fullmatch(symbol)):
            raise ExpressionError(f"{text!r} is not a unit ({part!r})")
        try:
            power = Fraction(exponent) if exponent else Fraction(1)
        except ValueError as exc:
            raise ExpressionError(f"{text!r} is not a unit (exponent {exponent!r})") from exc
        if sign == "/":
            power = -power
        if symbol:
            powers[symbol] = powers.get(symbol, Fraction(0)) + power
    return tuple(sorted((s, p) for s, p in powers.items() if p != 0))


def format_unit(unit: Unit | None) -> str:
    """Return a unit as text (``W/K``; ``1`` for a pure number)."""
    if unit is None:
        return "any"
    up = [s if p == 1 else f"{s}^{p}" for s, p in unit if p > 0]
    down = [s if p == -1 else f"{s}^{-p}" for s, p in unit if p < 0]
    text = "*".join(up) or "1"
    return text + "".join(f"/{d}" for d in down)


def _times(a: Unit, b: Unit, sign: int = 1) -> Unit:
    powers = dict(a)
    for s, p in b:
        powers[s] = powers.get(s, Fraction(0)) + sign * p
    return tuple(sorted((s, p) for s, p in powers.items() if p != 0))


def _power(a: Unit, exponent: Fraction) -> Unit:
    return tuple(sorted((s, p * exponent) for s, p in a if p * exponent != 0))


@dataclass(frozen=True, slots=True)
class Checked:
    """A checked expression.

    Attributes:
        text: the expression as written.
        tree: its syntax tree (only whitelisted nodes).
        kind: ``number`` or ``bool``.
        unit: its unit (numbers; ``None`` for a bare number, which fits any unit).
        names: the names it reads (metrics, constants, states, ``status``), in order.
    """

    text: str
    tree: ast.expr
    kind: Kind
    unit: Unit | None
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Typed:
    kind: Kind
    unit: Unit | None = None


_NUMBER_OPS: Final = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
_COMPARE_OPS: Final = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)


class _Checker:
    def __init__(self, names: Mapping[str, tuple[Kind, Unit | None]]) -> None:
        self.names = names
        self.used: dict[str, None] = {}
        self.nodes = 0

    def fail(self, node: ast.AST, why: str) -> ExpressionError:
        return ExpressionError(why, getattr(node, "col_offset", None))

    def number(self, node: ast.expr) -> Unit | None:
        typed = self.visit(node)
        if typed.kind != "number":
            raise self.fail(node, f"{ast.unparse(node)!r} is a {typed.kind}, not a number")
        return typed.unit

    def condition(self, node: ast.expr) -> None:
        typed = self.visit(node)
        if typed.kind != "bool":
            raise self.fail(
                node, f"{ast.unparse(node)!r} is a {typed.kind}, not a condition (compare it)"
            )

    def same(self, node: ast.AST, a: Unit | None, b: Unit | None, what: str) -> Unit | None:
        if a is None:
            return b
        if b is None or a == b:
            return a
        raise self.fail(node, f"unit clash: {what} {format_unit(a)} and {format_unit(b)}")

    def visit(self, node: ast.expr) -> _Typed:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise self.fail(node, "expression too long")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise self.fail(node, f"{value!r} is not allowed (numbers and 'words' only)")
            if isinstance(value, str):
                return _Typed("text")
            return _Typed("number", None)
        if isinstance(node, ast.Name):
            found = self.names.get(node.id)
            if found is None:
                raise self.fail(node, f"unknown name {node.id!r} (not a metric, constant or state)")
            self.used.setdefault(node.id)
            return _Typed(found[0], found[1])
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                self.condition(node.operand)
                return _Typed("bool")
            if isinstance(node.op, ast.USub | ast.UAdd):
                return _Typed("number", self.number(node.operand))
            raise self.fail(node, f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.BoolOp):
            for part in node.values:
                self.condition(part)
            return _Typed("bool")
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(node, f"{type(node).__name__} is not allowed in an expression")

    def binop(self, node: ast.BinOp) -> _Typed:
        op = node.op
        if not isinstance(op, _NUMBER_OPS):
            raise self.fail(node, f"operator {type(op).__name__} is not allowed")
        left = self.number(node.left)
        if isinstance(op, ast.Pow):
            exponent = node.right
            sign = 1
            if isinstance(exponent, ast.UnaryOp) and isinstance(exponent.op, ast.USub):
                exponent, sign = exponent.operand, -1
            if not (
                isinstance(exponent, ast.Constant)
                and isinstance(exponent.value, int | float)
                and not isinstance(exponent.value, bool)
            ):
                raise self.fail(node.right, "the exponent of ** must be a number")
            self.nodes += 1
            power = Fraction(exponent.value).limit_denominator(1000) * sign
            return _Typed("number", None if left is None else _power(left, power))
        right = self.number(node.right)
        if isinstance(op, ast.Add | ast.Sub):
            return _Typed("number", self.same(node, left, right, "adding"))
        if left is None and right is None:
            return _Typed("number", None)
        sign = 1 if isinstance(op, ast.Mult) else -1
        return _Typed("number", _times(left or (), right or (), sign))

    def compare(self, node: ast.Compare) -> _Typed:
        operands = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                self.membership(node, a, b)
                continue
            if not isinstance(op, _COMPARE_OPS):
                raise self.fail(node, f"comparison {type(op).__name__} is not allowed")
            ta, tb = self.visit(a), self.visit(b)
            kinds = {ta.kind, tb.kind}
            if kinds == {"status", "text"} and isinstance(op, ast.Eq | ast.NotEq):
                continue
            if kinds != {"number"}:
                raise self.fail(
                    node,
                    f"cannot compare a {ta.kind} with a {tb.kind} "
                    "(numbers with numbers, status == 'word')",
                )
            self.same(node, ta.unit, tb.unit, "comparing")
        return _Typed("bool")

    def membership(self, node: ast.AST, a: ast.expr, b: ast.expr) -> None:
        if self.visit(a).kind != "status" or not isinstance(b, ast.Tuple | ast.List):
            raise self.fail(node, "'in' only as status in ('word', ...)")
        for item in b.elts:
            if not (isinstance(item, ast.Constant) and isinstance(item.value, str)):
                raise self.fail(item, "status in (...) takes words in quotes")
            self.nodes += 1

    def call(self, node: ast.Call) -> _Typed:
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in FUNCTIONS:
            name = ast.unparse(func)
            raise self.fail(node, f"function {name!r} is not allowed; allowed: {sorted(FUNCTIONS)}")
        if node.keywords or not node.args:
            raise self.fail(node, f"{func.id}() takes one or more numbers, no keywords")
        units = [self.number(arg) for arg in node.args]
        if func.id in ("min", "max"):
            if len(units) < 2:
                raise self.fail(node, f"{func.id}() takes two or more numbers")
            unit: Unit | None = None
            for u in units:
                unit = self.same(node, unit, u, f"{func.id}() of")
            return _Typed("number", unit)
        if len(units) != 1:
            raise self.fail(node, f"{func.id}() takes one number")
        (unit,) = units
        if func.id == "abs":
            return _Typed("number", unit)
        if func.id == "sqrt":
            if unit is None:
                return _Typed("number", None)
            root = _power(unit, Fraction(1, 2))
            return _Typed("number", root)
        if unit not in (None, ()):
            raise self.fail(node, f"{func.id}() needs a pure number, not {format_unit(unit)}")
        return _Typed("number", ())


def check_expression(text: str, names: Mapping[str, tuple[Kind, Unit | None]]) -> Checked:
    """Parse and check one expression against the names it may read.

    Args:
        text: the expression.
        names: every name it may use, with its kind and unit (``status`` is a ``status``).

    Raises:
        ExpressionError: it is not in the language, reads an unknown name, or clashes units.
    """
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("an expression must be non-empty text")
    if len(text) > _MAX_LENGTH:
        raise ExpressionError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        column = None if exc.offset is None else exc.offset - 1
        raise ExpressionError(f"not an expression: {exc.msg}", column) from exc
    checker = _Checker(names)
    typed = checker.visit(tree.body)
    if typed.kind not in ("number", "bool"):
        raise ExpressionError(f"an expression must give a number or a condition, not {typed.kind}")
    return Checked(text, tree.body, typed.kind, typed.unit, tuple(checker.used))
