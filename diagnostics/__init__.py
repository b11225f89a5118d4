"""Health models behind one I/O-free engine (diagnostics: gateway -> here -> notifier).

Streaming features, device baselines, fleet models, failure prediction, the fault catalog
and the diagnosis policy.
"""

from diagnostics.catalog import CATALOG, Degradation, FaultEntry, ModelCatalog, Remedy, Signature
from diagnostics.engine import FORMAT_VERSION, DiagnosticsEngine, EngineResult, ReadingScore
from diagnostics.features import FEATURE_SPECS, FeatureDef, FeatureSpec, FeatureTable
from diagnostics.fleet import FleetModel
from diagnostics.model import Contribution, Diagnosis, decode_diagnosis, encode_diagnosis
from diagnostics.policy import DiagnosisPolicy, Hypothesis, PolicyConfig
from diagnostics.predictor import TimeToFailure, TrendPredictor

__all__ = [
    "CATALOG",
    "FEATURE_SPECS",
    "FORMAT_VERSION",
    "Contribution",
    "Degradation",
    "Diagnosis",
    "DiagnosisPolicy",
    "DiagnosticsEngine",
    "EngineResult",
    "FaultEntry",
    "FeatureDef",
    "FeatureSpec",
    "FeatureTable",
    "FleetModel",
    "Hypothesis",
    "ModelCatalog",
    "PolicyConfig",
    "ReadingScore",
    "Remedy",
    "Signature",
    "TimeToFailure",
    "TrendPredictor",
    "decode_diagnosis",
    "encode_diagnosis",
]
