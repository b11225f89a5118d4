"""A product model as data (diagnostics, product knowledge): what a product file says.

The frozen records :mod:`diagnostics.product` builds from a product file (its metrics,
constants, states, features, faults and generic scoring) and the problems it reports
while reading one. Read files through :mod:`diagnostics.product`, which re-exports these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diagnostics.expressions import Checked
from wire.errors import ConfigError

if TYPE_CHECKING:
    from diagnostics.catalog import ModelCatalog

__all__ = [
    "ConstantDef",
    "FaultDecl",
    "FeatureDecl",
    "GenericScoring",
    "MetricDef",
    "Product",
    "ProductError",
    "ProductProblem",
    "StateDef",
]


@dataclass(frozen=True, slots=True)
class ProductProblem:
    """One thing wrong in a product file.

    Attributes:
        source: the file (or a name for text not from a file).
        line: the line of the key (1-based), 0 when not known.
        key: the dotted key (``features.spin_vibration.expr``).
        why: what is wrong.
    """

    source: str
    line: int
    key: str
    why: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.key}: {self.why}" if self.key else f"{where}: {self.why}"


class ProductError(ConfigError):
    """A product file is refused (every problem found is listed).

    Attributes:
        problems: what is wrong, in file order.
    """

    def __init__(self, problems: Sequence[ProductProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class MetricDef:
    """A metric a product's devices send.

    Attributes:
        name: the metric's name in telemetry.
        unit: its unit as written (``bool`` for true/false).
        healthy: the range a healthy device keeps it in, if stated.
        description: plain words.
    """

    name: str
    unit: str
    healthy: tuple[float, float] | None = None
    description: str = ""

    @property
    def is_bool(self) -> bool:
        """Whether the metric is true/false."""
        return self.unit == "bool"


@dataclass(frozen=True, slots=True)
class ConstantDef:
    """A named constant of a product's physics (``krpm = 1000 rpm``)."""

    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True, slots=True)
class StateDef:
    """An operating state: a condition on a reading (``spinning``: ``drum_rpm >= 600``)."""

    name: str
    condition: Checked


@dataclass(frozen=True, slots=True)
class FeatureDecl:
    """A derived feature as the file declares it.

    Attributes:
        name: the feature's name.
        expr: its value (a number, or a condition counted as 1 or 0), unless ``repeat``.
        when: the condition under which a reading shows it (else the reading has none).
        repeat: a metric whose exact repeats the feature follows (a stuck sensor): the
            share of the last readings it has kept one value.
        unit: its unit.
        alpha: weight of a new value in its streaming level.
        floor: smallest change that matters, in its unit.
        min_count: updates before a device's own baseline of it is trusted.
        description: plain words.
        metrics: the metrics it is computed from (for explanations).
    """

    name: str
    expr: Checked | None
    when: Checked | None
    repeat: str | None
    unit: str
    alpha: float
    floor: float
    min_count: int
    description: str
    metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FaultDecl:
    """A fault as the file declares it (raw values, checked; see :func:`catalog_of`)."""

    name: str
    table: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class GenericScoring:
    """How metrics no file describes are scored (each metric its own feature).

    Attributes:
        alpha: weight of a new value in the metric's streaming level.
        min_count: updates before a device's own baseline of it is trusted.
        relative_floor: smallest change that matters, as a share of the metric's first
            value seen (a metric's scale is not known beforehand).
        min_floor: the smallest change that matters at least (booleans: a share of time).
    """

    alpha: float = 0.1
    min_count: int = 60
    relative_floor: float = 0.02
    min_floor: float = 0.05


@dataclass(frozen=True, slots=True)
class Product:
    """A product model as its file describes it.

    Attributes:
        model: the product model's id (devices say it in their boot event).
        title: plain words.
        primary_metric: the main temperature sensor's metric (``""``: none).
        metrics: the metrics, by name, in file order.
        constants: named constants, by name.
        states: the operating states, in file order.
        features: the derived features, in vector order.
        faults: the fault catalog, in file order.
        generic: how metrics the file does not list are scored.
        simulation: the ``[simulation]`` section, for the simulator (may be empty).
        source: where it was read from.
    """

    model: str
    title: str
    primary_metric: str
    metrics: Mapping[str, MetricDef]
    constants: Mapping[str, ConstantDef]
    states: tuple[StateDef, ...]
    features: tuple[FeatureDecl, ...]
    faults: tuple[FaultDecl, ...]
    generic: GenericScoring = field(default_factory=GenericScoring)
    simulation: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def catalog(self) -> ModelCatalog:
        """The fault catalog of the model (see :mod:`diagnostics.catalog`)."""
        from diagnostics.catalog import catalog_of  # the catalog module reads this one

        return catalog_of(self)
