"""Fault catalog per product model (diagnostics, the "Decide" step of the loop).

Product knowledge kept as data: for each product model, the faults the backend can name,
how the device's own self-diagnosis reports them (error codes, self-test codes, reset
reasons), which streaming features they move and in which direction (their *signature*,
used to name the fault behind an anomaly score), how a wear-type fault degrades toward
failure (for :mod:`diagnostics.predictor`), and the remedies in the order to try them.

The entries come from the ``[faults]`` tables of the product files
(:mod:`diagnostics.product`; the built-in ones are ``diagnostics/products/*.toml``, where
each failure level says how it follows from the product's physics and what simulated
devices measured at failure). This module holds the types and builds a
:class:`ModelCatalog` from a product (:func:`catalog_of`); :data:`CATALOG` is the built-in
set. A restart never cures a firmware fault and no remote command cures worn or leaking
parts; a self-test cures nothing but confirms (or rules out) the hypothesis before a visit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from diagnostics.product import builtin_catalog

if TYPE_CHECKING:
    from diagnostics.product import Product

__all__ = [
    "ANY_FEATURE",
    "CATALOG",
    "Degradation",
    "FaultEntry",
    "ModelCatalog",
    "Remedy",
    "RemedyKind",
    "Signature",
    "catalog_of",
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
        skill: the technician's skill a visit needs (``refrigeration``), if stated.
    """

    action: str
    kind: RemedyKind
    cures: bool
    part: str | None = None
    note: str = ""
    skill: str | None = None


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

    The values are the manufacturer's statement for its product, in its product file
    (``failure = {...}`` of a fault): the built-in files say next to each how it follows
    from the product's physics and what the indicator was measured at when simulated
    devices failed (the mean over devices; tests/test_diagnostics_catalog.py checks them
    against the simulator).

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


_SIGNATURE_DIRECTIONS: Final = {"up": 1, "down": -1, "either": 0}
#: The feature name of a signature that covers every feature no product file describes
#: (written ``signature = "any"``): the generic ``unusual_behaviour`` fault's.
ANY_FEATURE: Final = "*"


def _remedy(table: Mapping[str, Any]) -> Remedy:
    action = str(table["action"])
    service = action == "technician_visit"
    return Remedy(
        action,
        "service" if service else "remote",
        cures=bool(table.get("cures", action != "selftest")),
        part=str(table["part"]) if table.get("part") else None,
        note=str(table.get("note", "")),
        skill=str(table["skill"]) if table.get("skill") else None,
    )


def _signature(raw: Any) -> tuple[Signature, ...]:
    if raw == "any":
        return (Signature(ANY_FEATURE, 0, 1.0),)
    terms: list[Signature] = []
    for feature, value in dict(raw).items():
        if isinstance(value, str):
            terms.append(Signature(feature, _SIGNATURE_DIRECTIONS[value]))
        else:
            direction = _SIGNATURE_DIRECTIONS[value["direction"]]
            terms.append(Signature(feature, direction, float(value.get("weight", 1.0))))
    return tuple(terms)


def _degradation(raw: Mapping[str, Any] | None) -> Degradation | None:
    if raw is None:
        return None
    opposite = raw.get("opposite_change")
    return Degradation(
        str(raw["feature"]),
        float(raw["change"]),
        float(raw.get("shape", 1.0)),
        bool(raw.get("two_sided", False)),
        None if opposite is None else float(opposite),
    )


def catalog_of(product: Product) -> ModelCatalog:
    """Build the fault catalog of a product from its (checked) file."""
    entries: dict[str, FaultEntry] = {}
    for decl in product.faults:
        table = decl.table
        entries[decl.name] = FaultEntry(
            decl.name,
            str(table["title"]),
            gradual=bool(table.get("gradual", False)),
            codes=frozenset(table.get("codes", ())),
            remedies=tuple(_remedy(r) for r in table["remedies"]),
            signature=_signature(table.get("signature", {})),
            boot_reasons=frozenset(table.get("boot_reasons", ())),
            cleared_by=frozenset(table.get("cleared_by", ())),
            quiet_close_s=float(table.get("quiet_close_s", 2 * 86_400.0)),
            degradation=_degradation(table.get("failure")),
        )
    return ModelCatalog(product.model, entries)


#: The fault catalog of the built-in product models (``diagnostics/products/*.toml``),
#: keyed by product model. The engine uses the catalogs of the products it was given
#: (built-in files and a products folder); this is the built-in set.
CATALOG: Final[Mapping[str, ModelCatalog]] = builtin_catalog()
