"""The diagnostics engine: readings and events in, scores and diagnosis changes out.

:class:`DiagnosticsEngine` is pure and I/O-free (the service around it feeds it what the
gateway decoded and publishes what it returns on ``fleet/diagnoses``). For each product
model it keeps a :class:`~diagnostics.features.FeatureTable` and a
:class:`~diagnostics.baseline.BaselineTable` over device slots, scores every reading with
the device's own baseline and, once trained, the product model's
:class:`~diagnostics.fleet.FleetModel`, and hands the scores and the device's events to a
:class:`~diagnostics.policy.DiagnosisPolicy`.

A device's product model comes from its ``boot`` event (``data["model"]``) or from the
``registry`` given to the engine. The product files (:mod:`diagnostics.product`) say what
each model's features and faults are; any model is scored, described or not. A model
without a file gets the *generic product*: every metric the device sends (numbers, and
booleans as 0/1) is scored on its own, by default (``generic_scoring="detector"``) by the
detector core that ``fixloop detect`` runs (:class:`~diagnostics.detector.DetectorTable`,
one slot per device, one column per metric, NaN where a reading lacks one; the reading's
own time in seconds), so what is benchmarked offline is what runs live. The live settings
(:data:`LIVE_DETECTOR`) add to ``fixloop detect``'s two things a service needs: a first
day of each device's own time learnt before it may raise an alert (as a device's baseline
must cover a day before it is trusted), and the drift statistic against a long baseline
(a slow leak or wear, which the core's levels would follow). A core alert event opens,
through the policy, the generic ``unusual_behaviour`` diagnosis with its evidence (which
metrics, how far, since when); it closes when the core re-arms. Where a model has
:data:`PEER_MIN_DEVICES` comparable devices, each is also set against its peers every
:data:`PEER_EVERY_S` of device time (:func:`peer_outliers`), so that a device born
faulty, whose own history takes the fault for its normal, is found too. With
``generic_scoring="baseline"`` each metric's streaming level is instead a feature scored
against the device's own baseline, as a product file's features are, and the policy
names ``unusual_behaviour`` from the generic product's signature. A
described model's device that sends metrics its file does not list gets those scored
the same way (a table of their own per model), next to its product features. Both
mismatches are counted (:attr:`DiagnosticsEngine.unknown_readings`,
:attr:`DiagnosticsEngine.unlisted_metrics`). A device whose model is not known at all
(no boot seen, not in the registry) is scored as model ``unknown``.

With learnt remaining-life models (``lifetimes``, from ``fixloop train``), the engine keeps
hourly means of the metrics they read for the devices of their product models (bounded,
:class:`~diagnostics.lifetimes.HourlyMeans`), and a diagnosis's time to failure comes
from them for that model and fault, else from the indicator's trend.

A reading older than the device's last one (out of order) is scored against the
current state but changes nothing: late data is history, never a live spike. In-order
backfill is processed normally on its own timestamps.

Trained fleet models are saved in a versioned format: a pickle of a dict holding
``format_version`` and the models, next to a JSON manifest (``<path>.json``).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast, overload

import numpy as np
import numpy.typing as npt
import orjson

from diagnostics.baseline import BaselineRows, BaselineTable
from diagnostics.catalog import ModelCatalog
from diagnostics.csvdetect import surprise
from diagnostics.detector import DetectorConfig, DetectorTable, SlotLevels, StepResult
from diagnostics.features import FeatureSpec, FeatureTable, spec_of
from diagnostics.fleet import FleetMethod, FleetModel
from diagnostics.kernels import round_masks
from diagnostics.lifetimes import LifetimeModels, LiveLifetimes
from diagnostics.model import Contribution, Diagnosis
from diagnostics.policy import DiagnosisPolicy, PolicyConfig
from diagnostics.product import ProductSet, builtin_products
from wire.errors import ConfigError
from wire.protocol import Event, Reading

__all__ = [
    "FORMAT_VERSION",
    "LIVE_DETECTOR",
    "PEER_CHECKS",
    "PEER_EVERY_S",
    "PEER_MIN_DEVICES",
    "PEER_Z",
    "UNKNOWN_MODEL",
    "DiagnosticsEngine",
    "EngineResult",
    "GenericScoring",
    "Mismatch",
    "ReadingScore",
    "ReadingScores",
    "peer_outliers",
]

_LOG = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
#: How metrics no product file describes are scored (see :class:`DiagnosticsEngine`).
GenericScoring = Literal["baseline", "detector"]
#: Settings of the detector core for metrics no product file describes, in the service:
#: ``fixloop detect``'s, plus a day of each device's own time learnt before an alert (a
#: new device's on/off cycles, states and spreads are learnt, not reported) and the
#: drift statistic over a long baseline of 2,000 readings (a slow leak, wear).
LIVE_DETECTOR: Final = DetectorConfig(warmup_s=86_400.0, drift_rows=2_000.0)
#: Version of the saved-model format.
FORMAT_VERSION: Final = 1
_MAX_TRAINING_ROWS: Final = 40_000
_NO_SCORES: Final = np.zeros(0, dtype=np.float32)
#: The model of a device whose model is not known at all (no boot seen, no registry entry).
UNKNOWN_MODEL: Final = "unknown"
_MAX_MODEL_LENGTH: Final = 64


@dataclass(frozen=True, slots=True)
class Mismatch:
    """What one product model's devices send that no product file describes.

    Attributes:
        model: the product model (:data:`UNKNOWN_MODEL` for devices that never said).
        has_file: whether a product file describes the model.
        count: without a file, its readings (every metric scored generically); with
            one, the metric values its file does not list.
        metrics: the metrics concerned, sorted: without a file every metric seen, with
            one those its file does not list.
    """

    model: str
    has_file: bool
    count: int
    metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadingScore:
    """The score of one reading.

    Attributes:
        device_id: the device.
        ts_ms: the reading's own time.
        score: combined anomaly score in ``[0, 1]`` (higher = more anomalous; at least the
            policy's open threshold while a wear indicator drifts away, see the trend trigger).
        baseline: the device-baseline score.
        fleet: the fleet-model score (0 without a fleet model, or once the device's own
            baseline is warm for most features).
        late: the reading was older than the device's last one: scored, changed nothing.
    """

    device_id: str
    ts_ms: int
    score: float
    baseline: float
    fleet: float
    late: bool = False


@dataclass(frozen=True, slots=True)
class ReadingScores(Sequence[ReadingScore]):
    """The scores of many readings, held by column; a sequence of :class:`ReadingScore`.

    The engine scores readings in arrays and the service writes them out column by
    column, so a round's scores are never turned into one object per reading unless a
    caller indexes or iterates.

    Attributes:
        device_ids: each reading's device.
        ts_ms: each reading's own time.
        score: combined anomaly scores (see :attr:`ReadingScore.score`).
        baseline: device-baseline scores.
        fleet: fleet-model scores.
        late: which readings were late.
    """

    device_ids: tuple[str, ...] = ()
    ts_ms: tuple[int, ...] = ()
    score: tuple[float, ...] = ()
    baseline: tuple[float, ...] = ()
    fleet: tuple[float, ...] = ()
    late: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.device_ids)

    @overload
    def __getitem__(self, index: int) -> ReadingScore: ...

    @overload
    def __getitem__(self, index: slice) -> ReadingScores: ...

    def __getitem__(self, index: int | slice) -> ReadingScore | ReadingScores:
        if isinstance(index, slice):
            return ReadingScores(*(column[index] for column in self._columns()))
        return ReadingScore(*(column[index] for column in self._columns()))

    def __iter__(self) -> Iterator[ReadingScore]:
        return map(ReadingScore, *self._columns())

    def _columns(self) -> tuple[tuple[Any, ...], ...]:
        return (self.device_ids, self.ts_ms, self.score, self.baseline, self.fleet, self.late)


@dataclass(slots=True)
class _ScoreColumns:
    """The columns of :class:`ReadingScores` while a batch is being scored (private)."""

    device_ids: list[str] = field(default_factory=list)
    ts_ms: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    fleet: list[float] = field(default_factory=list)
    late: list[bool] = field(default_factory=list)

    def freeze(self) -> ReadingScores:
        return ReadingScores(
            tuple(self.device_ids),
            tuple(self.ts_ms),
            tuple(self.score),
            tuple(self.baseline),
            tuple(self.fleet),
            tuple(self.late),
        )


@dataclass(frozen=True, slots=True)
class EngineResult:
    """What one call of :meth:`DiagnosticsEngine.process` produced.

    Attributes:
        scores: one per reading of a device of known model, in input order per device.
        diagnoses: diagnosis changes (open, update, closed), in the order they happened.
    """

    scores: ReadingScores
    diagnoses: tuple[Diagnosis, ...]


_NO_TIME: Final = np.iinfo(np.int64).min
#: Peer checks of metrics no file describes: how often (device time), from how many
#: comparable devices, how far (in the peers' spread) a device must stand, at how many
#: checks in a row, before a case opens; a device is back once under half that far.
PEER_EVERY_S: Final = 3_600.0
PEER_MIN_DEVICES: Final = 20
PEER_Z: Final = 6.0
PEER_CHECKS: Final = 2
_PEER_MIN_ROWS: Final = 100
#: From this many readings the metric columns are gathered column by column.
_BY_COLUMN: Final = 64


@dataclass(slots=True)
class _Generic:
    """The metrics of one product model that no file describes, on the detector core.

    One slot per device, one column per metric in the order first seen (private).
    ``last_ts_ms`` keeps the engine's rule for late readings: not newer than the device's
    last one (the core itself takes an equal time as a repeat).
    """

    table: DetectorTable
    names: tuple[str, ...]
    slots: dict[str, int] = field(default_factory=dict)
    last_ts_ms: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: per slot, whether its alert was up at its last row (the policy hears of the fall)
    was_up: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    #: device time of the last peer check, and per slot the checks in a row it stood out
    peer_at_ms: int = _NO_TIME
    peer_runs: dict[int, int] = field(default_factory=dict)

    def widen(self, names: Sequence[str]) -> None:
        self.table.add_columns(len(names))
        self.names = (*self.names, *names)

    def slots_of(self, device_ids: Sequence[str]) -> npt.NDArray[np.intp]:
        slots = self.slots
        found = [slots.get(d) for d in device_ids]
        if None in found:
            found = [slots.setdefault(d, len(slots)) for d in device_ids]
            table = self.table
            if len(slots) > table.n_slots:
                grow = max(len(slots) - table.n_slots, table.n_slots, 16)
                table.add_slots(grow)
                more = np.full(grow, _NO_TIME, dtype=np.int64)
                self.last_ts_ms = np.concatenate([self.last_ts_ms, more])
                self.was_up = np.concatenate([self.was_up, np.zeros(grow, dtype=np.bool_)])
        return np.array(found, dtype=np.intp)

    def step(
        self,
        slots: npt.NDArray[np.intp],
        ts_ms: I64,
        values: F64,
        late: npt.NDArray[np.bool_] | None,
    ) -> tuple[StepResult, npt.NDArray[np.bool_]]:
        """Score and learn one round (each slot at most once); late rows are scored only."""
        last = self.last_ts_ms
        stale = ts_ms <= last[slots]
        if late is not None:
            stale |= late
        t_s = ts_ms / 1000.0
        table = self.table
        if not _count(stale):
            result = table.step(slots, t_s, values)
        else:
            live = ~stale
            parts = [
                (rows, table.step(slots[rows], t_s[rows], values[rows], learn=learn))
                for rows, learn in ((np.flatnonzero(live), True), (np.flatnonzero(stale), False))
            ]
            n = len(slots)
            result = StepResult(
                np.empty(n),
                np.empty(n, dtype=np.bool_),
                np.empty(n, dtype=np.bool_),
                np.empty((n, values.shape[1])),
                np.empty(n, dtype=np.int8),
            )
            for rows, part in parts:
                result.score[rows] = part.score
                result.event[rows] = part.event
                result.active[rows] = part.active
                result.deviation[rows] = part.deviation
                result.flags[rows] = part.flags
        fresh = slots[~stale]
        last[fresh] = ts_ms[~stale]
        return result, stale

    def values(self, readings: Sequence[Reading]) -> F64:
        """The readings' metrics as rows (NaN where a reading lacks one, booleans 0/1)."""
        n = len(readings)
        names = self.names
        nan = math.nan
        if n < _BY_COLUMN:
            rows: F64 = np.array(
                [[r.metrics.get(name, nan) for name in names] for r in readings], dtype=np.float64
            ).reshape(n, len(names))
            return rows
        metrics = [r.metrics for r in readings]
        rows = np.empty((n, len(names)), dtype=np.float64)
        for j, name in enumerate(names):
            rows[:, j] = np.fromiter((m.get(name, nan) for m in metrics), np.float64, n)
        return rows


@dataclass(slots=True)
class _ModelState:
    """Everything the engine keeps for one product model (mutable, private).

    ``described`` is how many of the spec's features come from a product file;
    ``known`` the metrics scored either way; ``has_file`` whether a product file
    describes the model. Metrics no file describes are scored by ``generic``, the
    detector core (for a model without a file: all of them).
    """

    spec: FeatureSpec
    features: FeatureTable
    baseline: BaselineTable
    described: int = 0
    known: frozenset[str] = frozenset()
    has_file: bool = False
    slots: dict[str, int] = field(default_factory=dict)
    watched: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(64, dtype=np.bool_))
    fleet: FleetModel | None = None
    training: list[F32] = field(default_factory=list)
    training_seen: int = 0
    training_held: int = 0
    indicators: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, np.bool_))
    generic: _Generic | None = None

    def slot(self, device_id: str) -> int:
        slot = self.slots.get(device_id)
        if slot is None:
            slot = self.slots[device_id] = len(self.slots)
            if slot >= self.features.capacity:
                self.features.ensure(slot + 1)
                self.baseline.ensure(slot + 1)
                grown = np.zeros(self.features.capacity, dtype=np.bool_)
                grown[: len(self.watched)] = self.watched
                self.watched = grown
        return slot


_count: Final = np.count_nonzero  # much cheaper than ``.any()`` on the small rows here


def _first(pair: tuple[int, Diagnosis]) -> int:
    return pair[0]


def peer_outliers(
    levels: SlotLevels, names: Sequence[str], *, warmup_s: float = 0.0
) -> tuple[dict[int, tuple[Contribution, ...]], set[int], dict[int, int]]:
    """Slots whose metrics stand far from their peers', and slots back among them.

    Per metric, the slots compared are those past their warm-up (:data:`_PEER_MIN_ROWS`
    rows and ``warmup_s`` of their own time) where the metric has changed and does not
    switch between states (a switching metric's level says how it is used, not how it
    is). With at least :data:`PEER_MIN_DEVICES` of them, a slot's deviation is its slow
    level's distance from their median over the peers' spread: the larger of the
    median absolute deviation (x 1.4826) and the median of the slots' own long-run
    spreads, so that a fleet of near-identical devices does not make noise news.

    Returns:
        the slots with a metric :data:`PEER_Z` or more away (drivers, largest first),
        the slots compared whose metrics are all under half that, and per slot compared
        the most peers it had.
    """
    level, spread = levels.level, levels.spread
    elapsed = np.nan_to_num(levels.elapsed_s, nan=np.inf)
    warm = (levels.rows >= _PEER_MIN_ROWS) & (elapsed >= warmup_s)
    deviation = np.full(level.shape, np.nan)
    peers: dict[int, int] = {}
    for c in range(min(level.shape[1], len(names))):
        members = np.flatnonzero(
            warm & levels.scored[:, c] & ~levels.switches[:, c] & np.isfinite(level[:, c])
        )
        if members.size < PEER_MIN_DEVICES:
            continue
        values = level[members, c]
        center = float(np.median(values))
        mad = 1.4826 * float(np.median(np.abs(values - center)))
        scale = max(mad, float(np.median(spread[members, c])), 1e-12 * (1.0 + abs(center)))
        deviation[members, c] = (values - center) / scale
        for slot in members.tolist():
            peers[slot] = max(peers.get(slot, 0), int(members.size))
    far: dict[int, tuple[Contribution, ...]] = {}
    near: set[int] = set()
    for slot in peers:
        row = deviation[slot]
        size = np.abs(np.nan_to_num(row, nan=0.0))
        if size.max() >= PEER_Z:
            order = [int(c) for c in np.argsort(-size) if size[c] >= PEER_Z]
            total = float(size[order].sum())
            far[slot] = tuple(
                Contribution(names[c], (names[c],), round(float(row[c]), 3), size[c] / total)
                for c in order[:5]
            )
        elif size.max() < PEER_Z / 2:
            near.add(slot)
    return far, near, peers


class DiagnosticsEngine:
    """Scores readings and turns scores and device events into diagnoses (no I/O).

    Args:
        registry: device id to product model, for devices whose boot event is not seen.
        policy: thresholds of the diagnosis policy.
        fleet_models: trained fleet models by product model (see :meth:`fit_fleet_models`).
        collect_training: keep a sample of healthy feature levels for fitting fleet models
            (this share of healthy updates, 0 = none).
        seed: seed of the training sample.
        baseline_tau_days: memory of the per-device baselines.
        products: the product models described by files (default: the built-in ones).
        detector: settings of the detector core for metrics no file describes (default:
            :data:`LIVE_DETECTOR`).
        generic_scoring: how metrics no file describes are scored: ``detector`` (the
            default: the detector core, as ``fixloop detect``) or ``baseline`` (their
            streaming levels against the device's baseline, as product features).
        lifetimes: remaining-life models learnt from recorded failures (``fixloop train``).

    Attributes:
        unknown_readings: readings of devices whose model no product file describes
            (scored with the generic product).
        unlisted_metrics: metric values in readings of described models that their file
            does not list (scored generically next to the product's features).
        unlisted: per described model, the metrics seen that its file does not list.
        unknown_by_model: :attr:`unknown_readings` per model.
        unlisted_by_model: :attr:`unlisted_metrics` per model.
        late_readings: readings older than their device's last one.
        lifetimes: the learnt remaining-life models and the hourly means they read.
    """

    def __init__(
        self,
        *,
        registry: Mapping[str, str] | None = None,
        policy: PolicyConfig | None = None,
        fleet_models: Mapping[str, FleetModel] | None = None,
        collect_training: float = 0.0,
        seed: int = 0,
        baseline_tau_days: float = 20.0,
        products: ProductSet | None = None,
        detector: DetectorConfig | None = None,
        lifetimes: LifetimeModels | None = None,
        generic_scoring: GenericScoring = "detector",
    ) -> None:
        self.products = builtin_products() if products is None else products
        self._detector = LIVE_DETECTOR if detector is None else detector
        self.generic_scoring = generic_scoring
        self._models: dict[str, str] = dict(registry or {})
        self._catalogs: dict[str, ModelCatalog] = {}
        self.policy = DiagnosisPolicy(policy, self._catalogs)
        self._collect = collect_training
        self._rng = np.random.default_rng(seed)
        self._tau_days = baseline_tau_days
        self._state: dict[str, _ModelState] = {}
        self.unknown_readings = 0
        self.unlisted_metrics = 0
        self.unlisted: dict[str, set[str]] = {}
        self.unknown_by_model: dict[str, int] = {}
        self.unlisted_by_model: dict[str, int] = {}
        self._firmware: dict[str, str] = {}
        self.late_readings = 0
        self.lifetimes: LiveLifetimes | None = None
        if lifetimes is not None and lifetimes.models:
            self.lifetimes = LiveLifetimes(lifetimes)
            self.policy.lifetimes = self.lifetimes
            _LOG.info(
                "remaining life learnt from failures for %s",
                ", ".join(f"{m}/{f}" for m, f in sorted(lifetimes.models)),
            )
        for model, fleet in (fleet_models or {}).items():
            self.set_fleet_model(model, fleet)
        if not fleet_models:
            _LOG.info("no fleet model trained: scoring with per-device baselines only")

    # -- models ------------------------------------------------------------------------
    def _described(self, model: str) -> FeatureSpec:
        product = self.products.get(model)
        if product is None:
            known = sorted(self.products.products)
            raise ConfigError(f"no product file for model {model!r}; described: {known}")
        return spec_of(product)

    def _catalog(self, model: str) -> ModelCatalog:
        """The faults the policy may name for ``model``: its file's, then the generic ones."""
        catalog = self._catalogs.get(model)
        if catalog is None:
            product = self.products.get(model)
            generic = self.products.generic.catalog.faults
            own = {} if product is None else dict(product.catalog.faults)
            rest = {f: e for f, e in generic.items() if f not in own}
            catalog = self._catalogs[model] = ModelCatalog(model, {**own, **rest})
        return catalog

    def _model_state(self, model: str) -> _ModelState:
        state = self._state.get(model)
        if state is None:
            product = self.products.get(model)
            spec = spec_of(self.products.generic if product is None else product, model)
            self._catalog(model)
            indicators = self.policy.drift_indicators(spec)
            state = self._state[model] = _ModelState(
                spec,
                FeatureTable(spec),
                BaselineTable(spec, tau_days=self._tau_days, trend_features=indicators),
                described=len(spec.features),
                known=spec.listed,
                has_file=product is not None,
                indicators=indicators,
            )
        return state

    def _widen(self, state: _ModelState, first: dict[str, Any]) -> None:
        """Score metrics no file describes (new columns start cold)."""
        if self.generic_scoring == "baseline":
            self._widen_baseline(state, first)
            return
        state.known = state.known | first.keys()
        names = tuple(first)
        if state.generic is None:
            state.generic = _Generic(DetectorTable(0, len(names), self._detector), names)
        else:
            state.generic.widen(names)
        _LOG.info("%s: scoring metrics no product file lists: %s", state.spec.model, sorted(first))

    def _widen_baseline(self, state: _ModelState, first: dict[str, Any]) -> None:
        """Append metrics no file describes to a model's features (new columns start cold)."""
        spec = state.spec.with_metrics(first)
        state.spec = spec
        state.known = state.known | first.keys()
        state.features.widen(spec)
        old = state.baseline
        width = len(old.min_count)
        indicators = self.policy.drift_indicators(spec)
        new = BaselineTable(
            spec,
            tau_days=old.tau_days,
            freeze_z=old.freeze_z,
            warmup_s=old.warmup_s,
            capacity=old.capacity,
            trend_features=indicators,
        )
        for name in ("mean", "var", "count", "learnt_s", "first_s", "side_z"):
            getattr(new, name)[:, :width] = getattr(old, name)
        # the tracked (wear indicator) columns are the product's own: the same runs
        new.run_s[:] = old.run_s
        new.run_side[:] = old.run_side
        state.baseline = new
        state.indicators = indicators
        _LOG.info("%s: scoring metrics no product file lists: %s", spec.model, sorted(first))

    def model_of(self, device_id: str) -> str | None:
        """Return the product model of ``device_id`` if known."""
        return self._models.get(device_id)

    def set_fleet_model(self, model: str, fleet: FleetModel) -> None:
        """Use a trained fleet model for product model ``model``.

        Raises:
            ConfigError: no product file describes the model, or the fleet model's
                features differ from the file's.
        """
        spec = self._described(model)
        if fleet.features != spec.names:
            raise ConfigError(f"fleet model for {model} has other features than {spec.names}")
        self._model_state(model).fleet = fleet

    @property
    def fleet_models(self) -> dict[str, FleetModel]:
        """The trained fleet models, by product model."""
        return {m: s.fleet for m, s in self._state.items() if s.fleet is not None}

    def mismatches(self) -> list[Mismatch]:
        """Per product model, what its devices sent that no product file describes.

        Models whose devices sent nothing undescribed are left out; counts are since
        this engine started.
        """
        found: list[Mismatch] = []
        for model, state in sorted(self._state.items()):
            if state.has_file:
                count = self.unlisted_by_model.get(model, 0)
                metrics = self.unlisted.get(model, set())
            else:
                count = self.unknown_by_model.get(model, 0)
                metrics = set(state.known)
            if count:
                found.append(Mismatch(model, state.has_file, count, tuple(sorted(metrics))))
        return found

    # -- the stream --------------------------------------------------------------------
    def process(self, items: Iterable[Reading | Event]) -> EngineResult:
        """Score readings and handle events (any mix of devices); return what changed.

        Each device's items keep their order: the n-th item of every device in ``items``
        goes into the n-th round, so a round holds each device at most once and its
        readings are scored together, whatever the events of other devices around them.
        Diagnosis changes come out in the order of the items that caused them.
        """
        batch = items if isinstance(items, Sequence) else list(items)
        rounds: list[list[int]] = [[]]
        seen: dict[str, int] = {}
        for i, item in enumerate(batch):
            device_id = item.device_id
            n = seen.get(device_id, 0)
            seen[device_id] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(i)
        scores = _ScoreColumns()
        caused: list[tuple[int, Diagnosis]] = []
        for members in rounds:
            self._round_of_items(batch, members, scores, caused)
        if len(caused) > 1:
            caused.sort(key=_first)
        return EngineResult(scores.freeze(), tuple(d for _, d in caused))

    def _round_of_items(
        self,
        batch: Sequence[Reading | Event],
        members: list[int],
        scores: _ScoreColumns,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        # distinct devices: their events and readings do not interact, events go first
        models = self._models
        by_model: dict[str, list[int]] = {}
        for i in members:
            item = batch[i]
            if isinstance(item, Reading):
                model = models.get(item.device_id)
                if model is None:
                    model = UNKNOWN_MODEL
                group = by_model.get(model)
                if group is None:
                    by_model[model] = [i]
                else:
                    group.append(i)
            else:
                caused += [(i, d) for d in self._event(item)]
        for model, group in by_model.items():
            readings = cast("list[Reading]", [batch[i] for i in group])
            self._round(self._model_state(model), readings, group, scores, caused)

    def _event(self, event: Event) -> list[Diagnosis]:
        if event.kind == "boot":
            model = event.data.get("model")
            if isinstance(model, str) and 0 < len(model) <= _MAX_MODEL_LENGTH:
                self._models[event.device_id] = model
        model_name = self._models.get(event.device_id)
        if model_name is None:
            return []
        state = self._state.get(model_name)
        generic_slot: int | None = None
        if state is not None:
            slot = state.slots.get(event.device_id)
            if slot is not None and event.ts_ms < int(state.features.last_ts_ms[slot]):
                return []  # out of order: history, not live evidence
            if state.generic is not None:
                generic_slot = state.generic.slots.get(event.device_id)
                if (
                    generic_slot is not None
                    and event.ts_ms < state.generic.last_ts_ms[generic_slot]
                ):
                    return []
        if event.kind == "boot":
            firmware = event.data.get("firmware")
            before = self._firmware.get(event.device_id)
            if isinstance(firmware, str):
                self._firmware[event.device_id] = firmware
                if before is not None and before != firmware and state is not None:
                    slot = state.slots.get(event.device_id)
                    if slot is not None:
                        # new firmware runs the device its own way: learn its normal anew
                        state.baseline.forget(slot)
                    if state.generic is not None and generic_slot is not None:
                        state.generic.table.reset_slots([generic_slot])
        self._catalog(model_name)
        diagnoses = self.policy.on_event(event, model_name)
        if state is not None and event.device_id in state.slots:
            state.watched[state.slots[event.device_id]] = self.policy.is_watched(event.device_id)
        return diagnoses

    def _round(
        self,
        state: _ModelState,
        readings: list[Reading],
        order: list[int],
        scores: _ScoreColumns,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        # metrics no product file describes are scored generically (new ones get a
        # column of their own) and counted; a described model's readings usually have none
        known = state.known
        first: dict[str, Any] = {}
        extra: list[int] = []  # readings with metrics the file does not list
        if state.has_file:
            listed = state.spec.listed
            unlisted = 0
            for k, reading in enumerate(readings):
                metrics = reading.metrics
                if listed.issuperset(metrics):
                    continue
                extra.append(k)
                for name, value in metrics.items():  # in the reading's order: deterministic
                    if name not in listed:
                        unlisted += 1
                        if name not in known:
                            first.setdefault(name, value)
            if unlisted:
                self.unlisted_metrics += unlisted
                model = state.spec.model
                self.unlisted_by_model[model] = self.unlisted_by_model.get(model, 0) + unlisted
                if first:
                    self.unlisted.setdefault(state.spec.model, set()).update(first)
        else:
            self.unknown_readings += len(readings)
            model = state.spec.model
            self.unknown_by_model[model] = self.unknown_by_model.get(model, 0) + len(readings)
            for reading in readings:
                metrics = reading.metrics
                if not known.issuperset(metrics):
                    for name, value in metrics.items():
                        if name not in known:
                            first.setdefault(name, value)
        if first:
            self._widen(state, first)
        if state.generic is None:
            extra = []  # scored as product features (the baseline way), or nothing to score
        elif not state.has_file:
            self._generic_round(state, readings, order, scores, caused)
            return
        features = state.features
        baseline = state.baseline
        slot_of = state.slots.get
        device_ids = [r.device_id for r in readings]
        found = [slot_of(d) for d in device_ids]
        if None in found:
            found = [state.slot(d) for d in device_ids]
        slots = np.array(found, dtype=np.intp)
        ts_ms = np.array([r.ts_ms for r in readings], dtype=np.int64)
        level, count, now_s, late = features.advance(readings, slots, ts_ms)
        any_late = _count(late) > 0
        live = ~late
        if any_late:
            self.late_readings += int(_count(late))
        rows = baseline.assess(slots, level, now_s, count)
        level, bz, bscore = rows.level, rows.z, rows.score
        cold = rows.warm_features * 2 < bz.shape[1]
        fleet = state.fleet
        fscore: F32 | None = None
        if fleet is not None and _count(cold):
            # the fleet model speaks for devices whose own baseline is still cold (new, or
            # faulty from day one); a warm baseline knows the device better than its peers
            own = level[:, : len(fleet.features)]
            fscore = np.where(cold, fleet.score(own)[0], np.float32(0.0))
        cfg = self.policy.config
        # the trend trigger: a wear indicator drifting steadily away from the device's
        # baseline counts as an anomaly long before its z alone would score
        flags = baseline.drift(slots, bz, features, now_s, live, cfg.trend_rule)
        # the baseline learns from the device's own readings while cold, whatever the fleet
        # thinks of them (else a device a little off its peers would never warm up); once
        # warm it learns only while neither it nor the policy sees anything amiss
        watched = state.watched[slots]
        score, drift, learn, judge = round_masks(
            bscore,
            _NO_SCORES if fscore is None else fscore,
            cold,
            flags,
            watched,
            late,
            cfg.open_threshold,
            cfg.close_threshold,
        )
        drifting: npt.NDArray[np.bool_] | None = None
        if _count(drift):
            drifting = np.zeros(bz.shape, dtype=np.bool_)
            drifting[:, baseline.trend_columns] = flags
        baseline.learn(slots, level, now_s, learn, bz, features.trend[slots])
        if self._collect > 0.0 and state.described:
            self._sample(state, level[learn][:, : state.described])
        if _count(judge):
            self._judge(
                state,
                readings,
                order,
                slots,
                np.flatnonzero(judge),
                rows,
                level,
                score,
                drifting,
                caused,
            )
        reported: list[float] = score.tolist()
        if extra:
            # the unlisted metrics on the detector core: the reading's score is the higher
            picked = [readings[k] for k in extra]
            _, generic = self._detect(state, picked, [order[k] for k in extra], late[extra], caused)
            for k, value in zip(extra, generic.tolist(), strict=True):
                reported[k] = max(reported[k], value)
        if self.lifetimes is not None and self.lifetimes.watches(state.spec.model):
            self.lifetimes.observe(state.spec.model, readings, late.tolist())
        scores.device_ids += device_ids
        scores.ts_ms += ts_ms.tolist()
        scores.score += reported
        scores.baseline += bscore.tolist()
        scores.fleet += [0.0] * len(readings) if fscore is None else fscore.tolist()
        scores.late += late.tolist()

    def _generic_round(
        self,
        state: _ModelState,
        readings: list[Reading],
        order: list[int],
        scores: _ScoreColumns,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        """A round of a model without a file: every metric on the detector core."""
        n = len(readings)
        if state.generic is None:  # readings without metrics: nothing to score
            late = np.zeros(n, dtype=np.bool_)
            score = np.zeros(n)
        else:
            late, score = self._detect(state, readings, order, None, caused)
        if _count(late):
            self.late_readings += int(_count(late))
        values: list[float] = score.tolist()
        late_list: list[bool] = late.tolist()
        if self.lifetimes is not None and self.lifetimes.watches(state.spec.model):
            self.lifetimes.observe(state.spec.model, readings, late_list)
        scores.device_ids += [r.device_id for r in readings]
        scores.ts_ms += [r.ts_ms for r in readings]
        scores.score += values
        scores.baseline += values
        scores.fleet += [0.0] * n
        scores.late += late_list

    def _detect(
        self,
        state: _ModelState,
        readings: list[Reading],
        order: list[int],
        late: npt.NDArray[np.bool_] | None,
        caused: list[tuple[int, Diagnosis]],
    ) -> tuple[npt.NDArray[np.bool_], F64]:
        """Step the model's detector table with ``readings`` and hand its verdicts on.

        Returns:
            which readings were late (scored, nothing learnt) and each reading's score
            (``fixloop detect``'s scale: 0.5 at the core's operating point).
        """
        generic = state.generic
        assert generic is not None
        device_ids = [r.device_id for r in readings]
        ts_ms = np.array([r.ts_ms for r in readings], dtype=np.int64)
        slots = generic.slots_of(device_ids)
        result, stale = generic.step(slots, ts_ms, generic.values(readings), late)
        score = surprise(result.score, generic.table.config.alpha)
        # the policy hears of the rows whose alert is up, or was up at the slot's last row
        was_up = generic.was_up
        heard = (result.active | was_up[slots]) & ~stale
        if _count(heard):
            picked = np.flatnonzero(heard)
            rows: list[int] = picked.tolist()
            made = self.policy.on_detections(
                [device_ids[k] for k in rows], state.spec.model, generic.names,
                ts_ms[picked].tolist(), score[picked], result.event[picked],
                result.active[picked], result.deviation[picked],
            )  # fmt: skip
            caused += [(order[rows[k]], d) for k, d in made]
        live = ~stale
        was_up[slots[live]] = result.active[live]
        if _count(live):
            now_ms = int(ts_ms[live].max())
            if now_ms - generic.peer_at_ms >= PEER_EVERY_S * 1000:
                generic.peer_at_ms = now_ms
                peered = self._peer_check(state.spec.model, generic, now_ms)
                caused += [(max(order), d) for d in peered]
        return stale, score

    def _peer_check(self, model: str, generic: _Generic, now_ms: int) -> list[Diagnosis]:
        """Compare each device's metrics with its peers' (where enough are comparable)."""
        config = generic.table.config
        far, near, peers = peer_outliers(
            generic.table.levels(), generic.names, warmup_s=config.warmup_s
        )
        ids = {slot: device for device, slot in generic.slots.items()}
        runs = generic.peer_runs
        made: list[Diagnosis] = []
        for slot in sorted(runs.keys() - far.keys()):
            del runs[slot]
        for slot, drivers in sorted(far.items()):
            runs[slot] = runs.get(slot, 0) + 1
            if runs[slot] >= PEER_CHECKS:
                made += self.policy.on_peers(ids[slot], model, now_ms, drivers, peers[slot])
        for slot in sorted(near):
            made += self.policy.on_peers(ids[slot], model, now_ms, (), peers[slot])
        return made

    def _judge(
        self,
        state: _ModelState,
        readings: list[Reading],
        order: list[int],
        slots: npt.NDArray[np.intp],
        picked: npt.NDArray[np.intp],
        rows: BaselineRows,
        level: F32,
        score: F32,
        drifting: npt.NDArray[np.bool_] | None,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        """Hand the ``picked`` rows' deviations to the policy (watched or scoring high)."""
        bz = rows.z[picked]
        mean = rows.mean[picked]
        level = level[picked]
        fleet = state.fleet
        if fleet is not None:
            # the fleet model knows the product's own features; the rest have no peers
            width = len(fleet.features)
            fz = np.zeros_like(bz)
            fz[:, :width] = fleet.standardize(level[:, :width])
            center = np.full(bz.shape[1], np.nan, dtype=np.float32)
            center[:width] = fleet.center
            # per feature the stronger witness: the device's own baseline, or its peers
            z = np.where(np.abs(bz) >= np.abs(fz), bz, fz)
            reference = np.where(rows.warm[picked], mean, center)
        else:
            z, reference = bz, mean
        change = level - reference
        members = picked.tolist()
        made, watched = self.policy.on_scores(
            [readings[i].device_id for i in members],
            state.spec,
            [readings[i].ts_ms for i in members],
            score[picked],
            z,
            change,
            None if drifting is None else drifting[picked],
        )
        if made:
            caused += [(order[members[k]], d) for k, d in made]
        state.watched[slots[picked]] = watched

    # -- training ------------------------------------------------------------------------
    def _sample(self, state: _ModelState, rows: F32) -> None:
        if rows.shape[0] == 0:
            return
        take = self._rng.random(rows.shape[0]) < self._collect
        picked = rows[take]
        if picked.shape[0] == 0:
            return
        state.training_seen += picked.shape[0]
        state.training.append(picked.copy())
        state.training_held += picked.shape[0]
        if state.training_held > 2 * _MAX_TRAINING_ROWS:
            merged = np.concatenate(state.training)
            keep = self._rng.choice(merged.shape[0], _MAX_TRAINING_ROWS, replace=False)
            state.training = [merged[np.sort(keep)]]
            state.training_held = _MAX_TRAINING_ROWS

    def training_rows(self, model: str) -> F32:
        """Return the healthy feature-level rows sampled so far for ``model`` (a copy)."""
        state = self._state.get(model)
        if state is None or not state.training:
            return np.zeros((0, len(self._described(model).features)), dtype=np.float32)
        return np.concatenate(state.training)

    def fit_fleet_models(
        self, *, method: FleetMethod = "gaussian", seed: int = 0
    ) -> dict[str, FleetModel]:
        """Fit and use a fleet model per product model from the sampled healthy rows.

        CPU work: call it off the event loop (``asyncio.to_thread``). Models with too few
        rows are left without one (and logged).
        """
        fitted: dict[str, FleetModel] = {}
        for model in sorted(self._state):
            state = self._state[model]
            if not state.described:
                continue  # no product file: no features shared across the fleet
            own = state.spec.features[: state.described]
            rows = self.training_rows(model)
            floors = np.array([f.floor for f in own], dtype=np.float32)
            names = tuple(f.name for f in own)
            try:
                fleet = FleetModel.fit(model, names, rows, floors, method=method, seed=seed)
            except ConfigError as exc:
                _LOG.warning("no fleet model for %s: %s", model, exc)
                continue
            self._state[model].fleet = fleet
            fitted[model] = fleet
        return fitted

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Save the trained fleet models to ``path`` and a JSON manifest to ``path.json``."""
        models = self.fleet_models
        blob: dict[str, Any] = {"format_version": FORMAT_VERSION, "fleet_models": models}
        path.write_bytes(pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))
        manifest = {
            "format_version": FORMAT_VERSION,
            "models": {
                m: {"method": f.method, "features": list(f.features), "rows": f.rows}
                for m, f in models.items()
            },
        }
        path.with_name(path.name + ".json").write_bytes(
            orjson.dumps(manifest, option=orjson.OPT_INDENT_2)
        )

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        registry: Mapping[str, str] | None = None,
        policy: PolicyConfig | None = None,
        products: ProductSet | None = None,
        lifetimes: LifetimeModels | None = None,
        generic_scoring: GenericScoring = "detector",
    ) -> DiagnosticsEngine:
        """Build an engine with the fleet models saved at ``path`` (only trusted files).

        Raises:
            ConfigError: the file is missing, unreadable or of another format version.
        """
        try:
            blob = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise ConfigError(f"cannot read diagnostics models from {path}: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path}: not a diagnostics model file of version {FORMAT_VERSION}")
        return cls(
            registry=registry,
            policy=policy,
            fleet_models=blob["fleet_models"],
            products=products,
            lifetimes=lifetimes,
            generic_scoring=generic_scoring,
        )

    # -- size ----------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        """Devices with scoring state."""
        return sum(
            len(s.slots) if s.has_file or s.generic is None else len(s.generic.slots)
            for s in self._state.values()
        )

    def state_bytes(self) -> int:
        """Approximate bytes of per-device state held (arrays, id maps, policy).

        Arrays count the rows in use (they grow by doubling, so up to twice that may be
        allocated); a device id in the slot and model maps counts about 150 bytes.
        """
        total = 0
        for state in self._state.values():
            rows = len(state.slots)
            total += rows * (state.features.state_bytes() + state.baseline.state_bytes() + 1)
            total += 150 * len(state.slots)
            generic = state.generic
            if generic is not None and generic.table.n_slots:
                per_slot = generic.table.state_bytes() // generic.table.n_slots
                total += len(generic.slots) * (per_slot + 8 + (0 if state.has_file else 150))
        if self.lifetimes is not None:
            total += self.lifetimes.state_bytes()
        total += 100 * len(self._models)
        total += 400 * len(self.policy.open_diagnoses()) + self.policy.predictor.state_bytes()
        return total
