"""The diagnostics engine: readings and events in, scores and diagnosis changes out.

:class:`DiagnosticsEngine` is pure and I/O-free (the service around it feeds it what the
gateway decoded and publishes what it returns on ``fleet/diagnoses``). For each product
model it keeps a :class:`~diagnostics.features.FeatureTable` and a
:class:`~diagnostics.baseline.BaselineTable` over device slots, scores every reading with
the device's own baseline and, once trained, the product model's
:class:`~diagnostics.fleet.FleetModel`, and hands the scores and the device's events to a
:class:`~diagnostics.policy.DiagnosisPolicy`.

The engine's parts, by job: this module routes items to product models in rounds,
handles events, scores a round and trains and saves fleet models;
:mod:`diagnostics.modelstate` holds what is kept per product model (device slots, the
tables, the detector core of metrics no file describes, the training sample);
:mod:`diagnostics.scoring` hands a round's verdicts to the policy on both scoring paths;
:mod:`diagnostics.peers` sets devices against their peers; :mod:`diagnostics.scores`
holds the types handed out (re-exported here).

A device's product model comes from its ``boot`` event (``data["model"]``) or from the
``registry`` given to the engine. The product files (:mod:`diagnostics.product`) say what
each model's features and faults are; any model is scored, described or not. A model
without a file gets the *generic product*: every metric the device sends (numbers, and
booleans as 0/1) is scored on its own, by default (``generic_scoring="detector"``) by the
detector core that ``fixloop detect`` runs (:class:`~diagnostics.detector.DetectorTable`),
so what is benchmarked offline is what runs live, with the live settings of
:data:`LIVE_DETECTOR`. A core alert event opens, through the policy, the generic
``unusual_behaviour`` diagnosis with its evidence (which metrics, how far, since when);
it closes when the core re-arms. Where a model has :data:`PEER_MIN_DEVICES` comparable
devices, each is also set against its peers (:mod:`diagnostics.peers`), so that a device
born faulty, whose own history takes the fault for its normal, is found too. With
``generic_scoring="baseline"`` each metric's streaming level is instead a feature scored
against the device's own baseline, as a product file's features are, and the policy
names ``unusual_behaviour`` from the generic product's signature. A described model's
device that sends metrics its file does not list gets those scored the same way (a
table of their own per model), next to its product features. Both mismatches are
counted (:attr:`DiagnosticsEngine.unknown_readings`,
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
``format_version`` and the models, next to a JSON manifest (``<path>.json``); see
:func:`~diagnostics.fleet.save_fleet_models`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt

from diagnostics import scoring
from diagnostics.baseline import BaselineTable
from diagnostics.catalog import ModelCatalog
from diagnostics.detector import DetectorConfig
from diagnostics.features import FeatureSpec, FeatureTable, spec_of
from diagnostics.fleet import (
    FORMAT_VERSION,
    FleetMethod,
    FleetModel,
    load_fleet_models,
    save_fleet_models,
)
from diagnostics.kernels import round_masks
from diagnostics.lifetimes import LifetimeModels, LiveLifetimes
from diagnostics.model import Diagnosis
from diagnostics.modelstate import GenericMetrics, ModelState
from diagnostics.peers import PEER_CHECKS, PEER_EVERY_S, PEER_MIN_DEVICES, PEER_Z, peer_outliers
from diagnostics.policy import DiagnosisPolicy, PolicyConfig
from diagnostics.product import ProductSet, builtin_products
from diagnostics.scores import EngineResult, Mismatch, ReadingScore, ReadingScores, ScoreColumns
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
#: How metrics no product file describes are scored (see :class:`DiagnosticsEngine`).
GenericScoring = Literal["baseline", "detector"]
#: Settings of the detector core for metrics no product file describes, in the service:
#: ``fixloop detect``'s, plus a day of each device's own time learnt before an alert (a
#: new device's on/off cycles, states and spreads are learnt, not reported, as a device's
#: baseline must cover a day before it is trusted) and the drift statistic over a long
#: baseline of 2,000 readings (a slow leak, wear, which the core's levels would follow).
LIVE_DETECTOR: Final = DetectorConfig(warmup_s=86_400.0, drift_rows=2_000.0)
_NO_SCORES: Final = np.zeros(0, dtype=np.float32)
#: The model of a device whose model is not known at all (no boot seen, no registry entry).
UNKNOWN_MODEL: Final = "unknown"
_MAX_MODEL_LENGTH: Final = 64
_count: Final = np.count_nonzero  # much cheaper than ``.any()`` on the small rows here
#: Where checkpoints pickled before :mod:`diagnostics.modelstate` held these classes
#: find them (a partition's checkpoint is a pickle of the whole engine).
_ModelState = ModelState
_Generic = GenericMetrics


def _first(pair: tuple[int, Diagnosis]) -> int:
    return pair[0]


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
        self._state: dict[str, ModelState] = {}
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

    def _model_state(self, model: str) -> ModelState:
        state = self._state.get(model)
        if state is None:
            product = self.products.get(model)
            spec = spec_of(self.products.generic if product is None else product, model)
            self._catalog(model)
            indicators = self.policy.drift_indicators(spec)
            state = self._state[model] = ModelState(
                spec,
                FeatureTable(spec),
                BaselineTable(spec, tau_days=self._tau_days, trend_features=indicators),
                described=len(spec.features),
                known=spec.listed,
                has_file=product is not None,
                indicators=indicators,
            )
        return state

    def _widen(self, state: ModelState, first: dict[str, Any]) -> None:
        """Score metrics no file describes (new columns start cold)."""
        if self.generic_scoring == "baseline":
            state.widen_baseline(first, self.policy.drift_indicators)
        else:
            state.widen_detector(first, self._detector)
        _LOG.info("%s: scoring metrics no product file lists: %s", state.spec.model, sorted(first))

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
        scores = ScoreColumns()
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
        scores: ScoreColumns,
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
        state: ModelState,
        readings: list[Reading],
        order: list[int],
        scores: ScoreColumns,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        # metrics no product file describes are scored generically (new ones get a
        # column of their own) and counted; a described model's readings usually have none
        first, extra, unlisted = state.undescribed(readings)
        model = state.spec.model
        if state.has_file:
            if unlisted:
                self.unlisted_metrics += unlisted
                self.unlisted_by_model[model] = self.unlisted_by_model.get(model, 0) + unlisted
                if first:
                    self.unlisted.setdefault(model, set()).update(first)
        else:
            self.unknown_readings += len(readings)
            self.unknown_by_model[model] = self.unknown_by_model.get(model, 0) + len(readings)
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
            state.sample(level[learn][:, : state.described], self._collect, self._rng)
        if _count(judge):
            scoring.judge(
                self.policy,
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
            _, generic = scoring.detect(
                self.policy, state, picked, [order[k] for k in extra], late[extra], caused
            )
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
        state: ModelState,
        readings: list[Reading],
        order: list[int],
        scores: ScoreColumns,
        caused: list[tuple[int, Diagnosis]],
    ) -> None:
        """A round of a model without a file: every metric on the detector core."""
        n = len(readings)
        if state.generic is None:  # readings without metrics: nothing to score
            late = np.zeros(n, dtype=np.bool_)
            score = np.zeros(n)
        else:
            late, score = scoring.detect(self.policy, state, readings, order, None, caused)
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

    # -- training ------------------------------------------------------------------------
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
        save_fleet_models(self.fleet_models, path)

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
        return cls(
            registry=registry,
            policy=policy,
            fleet_models=load_fleet_models(path),
            products=products,
            lifetimes=lifetimes,
            generic_scoring=generic_scoring,
        )

    # -- size ----------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        """Devices with scoring state."""
        return sum(s.devices for s in self._state.values())

    def state_bytes(self) -> int:
        """Approximate bytes of per-device state held (arrays, id maps, policy).

        Arrays count the rows in use (they grow by doubling, so up to twice that may be
        allocated); a device id in the slot and model maps counts about 150 bytes.
        """
        total = 0
        for state in self._state.values():
            total += state.state_bytes()
        if self.lifetimes is not None:
            total += self.lifetimes.state_bytes()
        total += 100 * len(self._models)
        total += 400 * len(self.policy.open_diagnoses()) + self.policy.predictor.state_bytes()
        return total
