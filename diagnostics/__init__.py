"""Health models (diagnostics: gateway -> here -> notifier).

Only the light, pure-Python parts are re-exported here: the ``Diagnosis`` message and
its codec, the fault catalog, the time-to-failure type and the settings. Every
``fixloop`` command reads the settings, and re-exporting the engine here would make
the gateway import numpy, scikit-learn and scipy (about 1.4 s and 100 MB) for nothing.
Import the heavy parts from their modules: ``diagnostics.engine`` (the I/O-free
``DiagnosticsEngine``), ``diagnostics.service`` (``DiagnosticsService``),
``diagnostics.training`` (``train_from_influx``), ``diagnostics.detector``
(``DetectorTable``: the one streaming detection core, many slots stepped by a compiled
loop), ``diagnostics.stream`` (``StreamDetector``, one stream on that core) and
``diagnostics.csvdetect`` (``detect_csv``, ``fixloop detect`` on that core).
"""

from diagnostics.catalog import CATALOG, Degradation, FaultEntry, ModelCatalog, Remedy, Signature
from diagnostics.model import Contribution, Diagnosis, decode_diagnosis, encode_diagnosis
from diagnostics.predictor import TimeToFailure
from diagnostics.settings import DiagnosticsSettings

__all__ = [
    "CATALOG",
    "Contribution",
    "Degradation",
    "Diagnosis",
    "DiagnosticsSettings",
    "FaultEntry",
    "ModelCatalog",
    "Remedy",
    "Signature",
    "TimeToFailure",
    "decode_diagnosis",
    "encode_diagnosis",
]
