"""Fleet model per product model (diagnostics, "Detect": each device against its peers).

A :class:`FleetModel` learns what healthy devices of one product model look like as a
whole: it is fitted on feature-level vectors collected from healthy history (flagged
points are skipped by the caller, STYLE.md rule 10) and scores a device's current levels
in ``[0, 1]``, higher = more anomalous. It covers what a device's own baseline cannot: a
device that is new, or faulty from its first day.

Two methods, chosen by name:

* ``gaussian`` (default): robust standardization (median, IQR) and a shrunk covariance
  (Ledoit-Wolf); the score is the Mahalanobis distance calibrated on the training data,
  and each feature's share of it explains the score. Scoring is one small matrix product.
* ``isolation_forest``: scikit-learn's IsolationForest on the standardized vectors
  (``score_samples`` negated), calibrated the same way; it explains with standardized
  deviations only.

``fit`` is CPU work: call it off the event loop (``asyncio.to_thread``, STYLE.md rule 13).

Trained fleet models are saved in a versioned format (:func:`save_fleet_models`): a
pickle of a dict holding ``format_version`` and the models, next to a JSON manifest
(``<path>.json``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import orjson

from wire.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "FleetMethod",
    "FleetModel",
    "load_fleet_models",
    "save_fleet_models",
]

_LOG = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
FleetMethod = Literal["gaussian", "isolation_forest"]
#: Version of the saved-model format.
FORMAT_VERSION: Final = 1
_MIN_ROWS: Final = 50
_CALIBRATION_QUANTILE: Final = 0.999
_BUILD_TOLERANCE: Final = 0.2


@dataclass(slots=True)
class FleetModel:
    """A fitted model of healthy feature levels of one product model.

    Build with :meth:`fit`. Instances pickle (plain numpy arrays and a fitted estimator).

    Attributes:
        model: the product model.
        features: the feature names, in vector order.
        method: ``gaussian`` or ``isolation_forest``.
        center: per-feature median of the training rows.
        scale: per-feature robust spread (IQR / 1.349, at least the noise floor and a
            fifth of the median).
        precision: inverse covariance of standardized rows (``gaussian``).
        reference: the calibration distance (training quantile) that maps to score 0.2.
        estimator: the fitted IsolationForest (``isolation_forest``).
        rows: how many rows it was fitted on.
    """

    model: str
    features: tuple[str, ...]
    method: FleetMethod
    center: F32
    scale: F32
    reference: float
    precision: F32 | None = None
    estimator: Any = field(default=None)
    rows: int = 0

    @classmethod
    def fit(
        cls,
        model: str,
        features: tuple[str, ...],
        rows: F32,
        floors: F32,
        *,
        method: FleetMethod = "gaussian",
        seed: int = 0,
    ) -> FleetModel:
        """Fit a fleet model on healthy feature-level rows (``NaN`` = feature not shown).

        Args:
            model: the product model.
            features: the feature names, in column order.
            rows: healthy rows, shape ``(n, len(features))``; not modified.
            floors: per-feature noise floor (the smallest spread used).
            method: ``gaussian`` or ``isolation_forest``.
            seed: random state of the isolation forest.

        Raises:
            ConfigError: too few rows, or an unknown method.
        """
        if rows.shape[0] < _MIN_ROWS:
            raise ConfigError(f"fleet model {model}: {rows.shape[0]} rows, need {_MIN_ROWS}")
        data = np.array(rows, dtype=np.float64)
        width = data.shape[1]
        center = np.zeros(width, dtype=np.float64)
        scale = np.array(floors, dtype=np.float64)
        for j in range(width):
            column = data[:, j][~np.isnan(data[:, j])]
            if column.size:
                center[j] = float(np.median(column))
                q75, q25 = np.percentile(column, [75.0, 25.0])
                # devices of one model differ by build tolerance (a heat pump's capacity by
                # ±20% across a product line): never trust a spread tighter than a fifth of
                # the typical value, however few devices trained it
                spread = max(float(q75 - q25) / 1.349, _BUILD_TOLERANCE * abs(center[j]))
                scale[j] = max(spread, scale[j])
        z = np.where(np.isnan(data), 0.0, (data - center) / scale)
        z = np.clip(z, -50.0, 50.0)
        result = cls(
            model,
            features,
            method,
            center.astype(np.float32),
            scale.astype(np.float32),
            1.0,
            rows=int(rows.shape[0]),
        )
        # scikit-learn only where a model is fitted (or an isolation forest unpickled): a
        # process scoring with Gaussian models or per-device baselines never loads it
        from sklearn.covariance import LedoitWolf
        from sklearn.ensemble import IsolationForest

        if method == "gaussian":
            cov = LedoitWolf().fit(z).covariance_
            result.precision = np.linalg.pinv(cov).astype(np.float32)
        elif method == "isolation_forest":
            forest = IsolationForest(n_estimators=100, random_state=seed, n_jobs=1)
            result.estimator = forest.fit(z.astype(np.float32))
        else:
            raise ConfigError(f"unknown fleet model method {method!r}")
        raw = result._distance(z.astype(np.float32))
        result.reference = max(float(np.quantile(raw, _CALIBRATION_QUANTILE)), 1e-6)
        _LOG.info("fleet model %s (%s) fitted on %d healthy rows", model, method, result.rows)
        return result

    def standardize(self, levels: F32) -> F32:
        """Return standardized deviations of ``levels`` rows (0 where a level is missing)."""
        z = ((levels - self.center) / self.scale).astype(np.float32)
        np.nan_to_num(z, copy=False, nan=0.0)
        clipped: F32 = np.clip(z, np.float32(-50.0), np.float32(50.0), out=z)
        return clipped

    def _distance(self, z: F32) -> npt.NDArray[np.float64]:
        if self.method == "gaussian":
            assert self.precision is not None
            distance: npt.NDArray[np.float64] = np.einsum(
                "ij,jk,ik->i", z, self.precision, z
            ).astype(np.float64)
            return distance
        # IsolationForest: higher = more anomalous after negating score_samples
        return np.asarray(-self.estimator.score_samples(z), dtype=np.float64) - 0.3

    def score(self, levels: F32) -> tuple[F32, F32]:
        """Return the scores in ``[0, 1]`` of ``levels`` rows and their standardized z.

        A row at the calibration distance scores 0.2, four times it 0.5.
        """
        if levels.shape[0] == 0:
            return np.zeros(0, dtype=np.float32), np.zeros_like(levels)
        z = self.standardize(levels)
        d = np.maximum(self._distance(z), 0.0) / (4.0 * self.reference)
        return (d / (d + 1.0)).astype(np.float32), z


def save_fleet_models(models: Mapping[str, FleetModel], path: Path) -> None:
    """Save fleet models by product model to ``path`` and a JSON manifest to ``path.json``."""
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


def load_fleet_models(path: Path) -> dict[str, FleetModel]:
    """Read the fleet models saved at ``path`` (only trusted files: it is a pickle).

    Raises:
        ConfigError: the file is missing, unreadable or of another format version.
    """
    try:
        blob = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise ConfigError(f"cannot read diagnostics models from {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: not a diagnostics model file of version {FORMAT_VERSION}")
    models: dict[str, FleetModel] = blob["fleet_models"]
    return models
