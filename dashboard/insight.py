"""Fleet insight from the case store's records (dashboard; no I/O).

For every fault and every group of devices (a firmware, a product model, a production
batch) the rate of devices that had a case of the fault, against the rate in the rest of
the population, flagged by a one-sided binomial test (the rule is written out in
:mod:`dashboard.stats`, beside the outcome figures). Pure functions, tested on a known
seed without a store and run in a worker thread for a big fleet; the fleet grouped once
per registry (:class:`Population`) is kept by the caller.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dashboard.stats import _UNKNOWN, _VISIT_PREFIX, DIMENSIONS, Dimension
from notifier.model import Case, DeviceRecord

__all__ = ["GroupRate", "InsightKept", "Population", "binomial_sf", "fleet_insight", "population"]


# -- insight ----------------------------------------------------------------------------


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (exact, summed in log space).

    The terms past the mode shrink geometrically, so the sum stops once they no longer
    change it; for ``k`` below the mean the complement is summed instead.
    """
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)

    def pmf(i: int) -> float:
        return math.exp(
            log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        )

    if k <= n * p:
        # the lower tail is the short sum
        lower = 0.0
        for i in range(k - 1, -1, -1):
            term = pmf(i)
            lower += term
            if term < lower * 1e-15 and i < n * p:
                break
        return min(max(1.0 - lower, 0.0), 1.0)
    upper = 0.0
    for i in range(k, n + 1):
        term = pmf(i)
        upper += term
        if term < upper * 1e-15:
            break
    return min(upper, 1.0)


@dataclass(frozen=True, slots=True)
class GroupRate:
    """How often one fault struck one group of devices, against the rest.

    Attributes:
        fault: the fault.
        dimension: ``firmware``, ``model`` or ``batch``.
        value: the group's firmware, model or batch.
        devices: devices in the group.
        affected: devices in the group that had a case of the fault.
        rest_devices: devices in the rest of the population.
        rest_affected: affected devices in the rest.
        share_of_cases: the group's share of the fault's affected devices.
        share_of_fleet: the group's share of the population.
        p_value: one-sided binomial test of ``affected`` under the rest's (smoothed) rate.
        flagged: the group clusters the fault (see the module docstring).
        open_cases: affected devices with a case of the fault still open.
        suggested_action: the remote remedy most often planned for these cases.
        models: the product models in the group.
    """

    fault: str
    dimension: Dimension
    value: str
    devices: int
    affected: int
    rest_devices: int
    rest_affected: int
    share_of_cases: float
    share_of_fleet: float
    p_value: float
    flagged: bool
    open_cases: int
    suggested_action: str | None
    models: tuple[str, ...]

    @property
    def rate(self) -> float:
        """Affected share of the group."""
        return self.affected / self.devices if self.devices else 0.0

    @property
    def rest_rate(self) -> float:
        """Affected share of the rest."""
        return self.rest_affected / self.rest_devices if self.rest_devices else 0.0

    def as_json(self) -> dict[str, Any]:
        """JSON-ready form (with the rates and their ratio)."""
        ratio = self.rate / self.rest_rate if self.rest_rate else None
        return {
            "fault": self.fault,
            "dimension": self.dimension,
            "value": self.value,
            "devices": self.devices,
            "affected": self.affected,
            "rate": round(self.rate, 5),
            "rest_devices": self.rest_devices,
            "rest_affected": self.rest_affected,
            "rest_rate": round(self.rest_rate, 5),
            "ratio": None if ratio is None else round(ratio, 3),
            "share_of_cases": round(self.share_of_cases, 4),
            "share_of_fleet": round(self.share_of_fleet, 4),
            "p_value": self.p_value,
            "flagged": self.flagged,
            "open_cases": self.open_cases,
            "suggested_action": self.suggested_action,
            "models": list(self.models),
        }


@dataclass(frozen=True, slots=True)
class Population:
    """The fleet grouped for :func:`fleet_insight`; it depends on the registry alone.

    Counting the groups is the part of the insight that grows with the fleet, so a
    caller keeps one :class:`Population` for as long as the registry stays the same and
    only the cases are counted again when they change.

    Attributes:
        registry: the devices by id.
        groups: device id to its group along each of :data:`DIMENSIONS`, in that order.
        sizes: per dimension, ``(model, group)`` to its number of devices.
        model_sizes: devices per product model.
    """

    registry: Mapping[str, DeviceRecord]
    groups: Mapping[str, tuple[str, str, str]]
    sizes: Mapping[Dimension, Mapping[tuple[str, str], int]]
    model_sizes: Mapping[str, int]


def population(devices: Iterable[DeviceRecord]) -> Population:
    """Group the fleet by every dimension (once per registry, see :class:`Population`)."""
    registry: dict[str, DeviceRecord] = {}
    groups: dict[str, tuple[str, str, str]] = {}
    sizes: dict[Dimension, Counter[tuple[str, str]]] = {d: Counter() for d in DIMENSIONS}
    model_sizes: Counter[str] = Counter()
    by_firmware, by_model, by_batch = (sizes[d] for d in DIMENSIONS)
    for device in devices:
        model = device.model
        firmware, batch = device.firmware or _UNKNOWN, device.batch or _UNKNOWN
        registry[device.device_id] = device
        groups[device.device_id] = (firmware, model, batch)
        model_sizes[model] += 1
        by_firmware[(model, firmware)] += 1
        by_model[(model, model)] += 1
        by_batch[(model, batch)] += 1
    return Population(registry, groups, sizes, model_sizes)


@dataclass(slots=True)
class _Members:
    """The affected devices of one fault in one group, counted in one pass."""

    devices: int = 0
    still_open: int = 0
    planned: dict[str, int] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)


#: Results of :func:`fleet_insight` by fault, with the cases they were counted from.
InsightKept = MutableMapping[str, tuple[tuple[Case, ...], list["GroupRate"]]]


def fleet_insight(
    devices: Sequence[DeviceRecord],
    cases: Sequence[Case],
    *,
    min_devices: int = 3,
    min_ratio: float = 2.0,
    alpha: float = 1e-3,
    grouped: Population | None = None,
    kept: InsightKept | None = None,
) -> list[GroupRate]:
    """Rate of each fault in each group against the rest; flagged groups first.

    Args:
        devices: the fleet.
        cases: the cases to count (a device counts once per fault).
        min_devices: fewest affected devices for a flag.
        min_ratio: least ratio of the group's rate to the rest's for a flag.
        alpha: significance level of the binomial test.
        grouped: ``devices`` grouped by :func:`population` before (saves the pass over
            the fleet; it must be of the same devices).
        kept: the results of earlier calls by fault, updated here; a fault whose cases
            are the same as then is not counted again, so a case change recounts its
            own fault only. Use one per ``grouped`` and settings.

    Returns:
        One entry per fault and group with at least one affected device: flagged ones
        first (most significant first), then the rest by p-value.
    """
    fleet = grouped if grouped is not None else population(devices)
    registry = fleet.registry
    by_fault: dict[str, list[Case]] = {}
    for case in cases:
        if case.device_id in registry:
            mine = by_fault.get(case.fault)
            if mine is None:
                mine = by_fault[case.fault] = []
            mine.append(case)
    results: list[GroupRate] = []
    for fault, mine in sorted(by_fault.items()):
        counted = tuple(mine)
        earlier = kept.get(fault) if kept is not None else None
        # tuples compare element by element, identical records first: cheap when equal
        if earlier is not None and earlier[0] == counted:
            rates = earlier[1]
        else:
            rates = _fault_rates(fault, counted, fleet, min_devices, min_ratio, alpha)
            if kept is not None:
                kept[fault] = (counted, rates)
        results.extend(rates)
    if kept is not None:
        for gone in kept.keys() - by_fault.keys():
            del kept[gone]
    results.sort(key=lambda r: (not r.flagged, r.p_value, -r.affected, r.fault, r.value))
    return results


def _fault_rates(
    fault: str,
    cases: Sequence[Case],
    fleet: Population,
    min_devices: int,
    min_ratio: float,
    alpha: float,
) -> list[GroupRate]:
    """Every group's rate of one fault (``cases``: the fault's, of registered devices)."""
    registry, groups = fleet.registry, fleet.groups
    # affected device -> how often each first remote remedy was planned for it
    hit: dict[str, dict[str, int]] = {}
    still_open: set[str] = set()
    for case in cases:
        device_id = case.device_id
        planned = hit.get(device_id)
        if planned is None:
            planned = hit[device_id] = {}
        for remedy in case.remedies:
            if not remedy.startswith(_VISIT_PREFIX):
                planned[remedy] = planned.get(remedy, 0) + 1
                break
        if case.is_open:
            still_open.add(device_id)
    fault_models = {registry[d].model for d in hit}
    size_of_population = sum(fleet.model_sizes[m] for m in fault_models)
    rates: list[GroupRate] = []
    for index, dimension in enumerate(DIMENSIONS):
        group_sizes: Counter[str] = Counter()
        for (model, group), n in fleet.sizes[dimension].items():
            if model in fault_models:
                group_sizes[group] += n
        members: dict[str, _Members] = {}
        for device_id, planned in hit.items():
            mine = groups[device_id]
            tally = members.get(mine[index])
            if tally is None:
                tally = members[mine[index]] = _Members()
            tally.devices += 1
            if device_id in still_open:
                tally.still_open += 1
            if planned:
                counts = tally.planned
                for remedy, n in planned.items():
                    counts[remedy] = counts.get(remedy, 0) + n
            tally.models.add(mine[1])
        for group, tally in members.items():
            rates.append(
                _rate(
                    fault,
                    dimension,
                    group,
                    group_sizes[group],
                    tally,
                    size_of_population,
                    len(hit),
                    min_devices,
                    min_ratio,
                    alpha,
                )
            )
    return rates


def _rate(
    fault: str,
    dimension: Dimension,
    group: str,
    size: int,
    members: _Members,
    population: int,
    total: int,
    min_devices: int,
    min_ratio: float,
    alpha: float,
) -> GroupRate:
    count = members.devices
    rest_devices = population - size
    rest_affected = total - count
    rest_rate = rest_affected / rest_devices if rest_devices else 0.0
    rate = count / size if size else 0.0
    if rest_devices <= 0:
        p_value = 1.0  # nothing to compare with
    else:
        # the rest's rate with half a pseudo-case (Jeffreys), so that peers without a case
        # do not make a single affected device infinitely significant
        expected = (rest_affected + 0.5) / (rest_devices + 1)
        p_value = binomial_sf(count, size, expected)
    flagged = (
        rest_devices > 0
        and count >= min_devices
        and (rest_rate == 0.0 or rate >= min_ratio * rest_rate)
        and p_value < alpha
    )
    # the most planned remedy; a tie goes to the first by name, so answers are stable
    suggested = min(members.planned.items(), key=lambda item: (-item[1], item[0]), default=None)
    return GroupRate(
        fault=fault,
        dimension=dimension,
        value=group,
        devices=size,
        affected=count,
        rest_devices=rest_devices,
        rest_affected=rest_affected,
        share_of_cases=count / total if total else 0.0,
        share_of_fleet=size / population if population else 0.0,
        p_value=p_value,
        flagged=flagged,
        open_cases=members.still_open,
        suggested_action=None if suggested is None else suggested[0],
        models=tuple(sorted(members.models)),
    )
