"""Health models behind one I/O-free engine (diagnostics: gateway -> here -> notifier).

Streaming features, device baselines, fleet models, failure prediction, the fault catalog
and the diagnosis policy; the service around the engine, training from InfluxDB history,
and the generic streaming detector behind ``fixloop detect``.
"""

from diagnostics.catalog import CATALOG, Degradation, FaultEntry, ModelCatalog, Remedy, Signature
from diagnostics.csvdetect import DetectSummary, detect_csv
from diagnostics.engine import FORMAT_VERSION, DiagnosticsEngine, EngineResult, ReadingScore
from diagnostics.features import FEATURE_SPECS, FeatureDef, FeatureSpec, FeatureTable
from diagnostics.fleet import FleetModel
from diagnostics.model import Contribution, Diagnosis, decode_diagnosis, encode_diagnosis
from diagnostics.policy import DiagnosisPolicy, Hypothesis, PolicyConfig
from diagnostics.predictor import TimeToFailure, TrendPredictor
from diagnostics.service import HEALTH_MEASUREMENT, DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from diagnostics.stream import StreamConfig, StreamDetector
from diagnostics.training import TrainingReport, train_from_influx

__all__ = [
    "CATALOG",
    "FEATURE_SPECS",
    "FORMAT_VERSION",
    "HEALTH_MEASUREMENT",
    "Contribution",
    "Degradation",
    "DetectSummary",
    "Diagnosis",
    "DiagnosisPolicy",
    "DiagnosticsEngine",
    "DiagnosticsService",
    "DiagnosticsSettings",
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
    "StreamConfig",
    "StreamDetector",
    "TimeToFailure",
    "TrainingReport",
    "TrendPredictor",
    "decode_diagnosis",
    "detect_csv",
    "encode_diagnosis",
    "train_from_influx",
]
