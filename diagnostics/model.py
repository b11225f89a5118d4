"""The :class:`Diagnosis` that diagnostics publishes on ``fleet/diagnoses``, and its codec.

A diagnosis names one fault hypothesis for one device, with its confidence, the
predicted time to failure (wear-type faults), the features that drove it, the remedies
from the fault catalog in the order to try, and the evidence (device codes, scores).
``status`` says whether this message opens, updates or closes it; a device has at most
one open diagnosis per fault, identified by :attr:`Diagnosis.key`. Each opening of it
has a stable id (:attr:`Diagnosis.id`: device, fault and the device time it opened),
carried by its open, update and closed messages alike: it comes from the device's own
data, so two diagnostics workers that score the same readings (a partition moved from
one to the other, ARCHITECTURE "Diagnostics partitioned by device") give the same id,
and a consumer can tell a repeated message from a new diagnosis. The JSON form (orjson) is
what the notifier reads; decoding refuses anything malformed with a
:class:`~wire.errors.RejectedError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import orjson

from diagnostics.catalog import Remedy
from diagnostics.predictor import TimeToFailure
from wire.errors import RejectedError

__all__ = [
    "DIAGNOSIS_VERSION",
    "Contribution",
    "Diagnosis",
    "DiagnosisStatus",
    "decode_diagnosis",
    "encode_diagnosis",
]

#: Version of the JSON form of a diagnosis.
DIAGNOSIS_VERSION: Final = 1
DiagnosisStatus = Literal["open", "update", "closed"]
_STATUSES: Final = frozenset(("open", "update", "closed"))
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One feature's part in a score.

    Attributes:
        feature: the feature's name.
        metrics: the metrics it is computed from.
        z: its signed deviation, in units of its healthy spread.
        share: its share of the evidence for the named fault, in ``[0, 1]``.
    """

    feature: str
    metrics: tuple[str, ...]
    z: float
    share: float


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """One fault hypothesis for one device.

    Attributes:
        device_id: the device.
        model: its product model.
        fault: the fault named (catalog name, or ``unknown``).
        confidence: how sure, in ``[0, 1]``.
        status: ``open``, ``update`` or ``closed``.
        opened_at: when it opened (the device's own reading time, UTC).
        updated_at: the device time of this change (UTC).
        score: the anomaly score that goes with it, in ``[0, 1]``.
        source: ``model`` (scores), ``device`` (self-diagnosis) or ``both``.
        time_to_failure: predicted time to failure for a wear-type fault, else ``None``.
        drivers: the features that drove it, largest share first.
        remedies: what to try, in order (from the fault catalog).
        evidence: short plain-word facts (``code E21 at ...``, ``score 0.71``).
    """

    device_id: str
    model: str
    fault: str
    confidence: float
    status: DiagnosisStatus
    opened_at: datetime
    updated_at: datetime
    score: float
    source: Literal["model", "device", "both"]
    time_to_failure: TimeToFailure | None = None
    drivers: tuple[Contribution, ...] = ()
    remedies: tuple[Remedy, ...] = ()
    evidence: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The diagnosis id: ``device_id/fault`` (one open per device and fault)."""
        return f"{self.device_id}/{self.fault}"

    @property
    def id(self) -> str:
        """This opening's stable id: ``device_id/fault/opened_at`` (epoch ms, device time)."""
        opened_ms = (self.opened_at - _EPOCH) // _MS
        return f"{self.device_id}/{self.fault}/{opened_ms}"


def encode_diagnosis(diagnosis: Diagnosis) -> bytes:
    """Return the JSON form of ``diagnosis`` for ``fleet/diagnoses``."""
    ttf = diagnosis.time_to_failure
    return orjson.dumps(
        {
            "v": DIAGNOSIS_VERSION,
            "id": diagnosis.id,
            "device_id": diagnosis.device_id,
            "model": diagnosis.model,
            "fault": diagnosis.fault,
            "confidence": round(diagnosis.confidence, 4),
            "status": diagnosis.status,
            "opened_at": diagnosis.opened_at.isoformat(),
            "updated_at": diagnosis.updated_at.isoformat(),
            "score": round(diagnosis.score, 4),
            "source": diagnosis.source,
            "time_to_failure": None
            if ttf is None
            else {
                "p10_s": round(ttf.p10_s, 1),
                "p50_s": round(ttf.p50_s, 1),
                "p90_s": round(ttf.p90_s, 1),
                "progress": round(ttf.progress, 4),
            },
            "drivers": [
                {
                    "feature": c.feature,
                    "metrics": list(c.metrics),
                    "z": round(c.z, 3),
                    "share": round(c.share, 4),
                }
                for c in diagnosis.drivers
            ],
            "remedies": [
                {
                    "action": r.action,
                    "kind": r.kind,
                    "cures": r.cures,
                    "part": r.part,
                    "note": r.note,
                    "skill": r.skill,
                }
                for r in diagnosis.remedies
            ],
            "evidence": list(diagnosis.evidence),
        }
    )


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise TypeError("a time must be an ISO 8601 string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("a time must carry its UTC offset")
    return parsed


def decode_diagnosis(payload: bytes) -> Diagnosis:
    """Build a :class:`Diagnosis` from its JSON form.

    Raises:
        RejectedError: the payload is not a version-1 diagnosis.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RejectedError("bad_diagnosis", f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != DIAGNOSIS_VERSION:
        raise RejectedError("bad_version", f"expected diagnosis version {DIAGNOSIS_VERSION}")
    if obj.get("status") not in _STATUSES or obj.get("source") not in ("model", "device", "both"):
        raise RejectedError("bad_diagnosis", "unknown status or source")
    try:
        ttf = obj["time_to_failure"]
        return Diagnosis(
            device_id=str(obj["device_id"]),
            model=str(obj["model"]),
            fault=str(obj["fault"]),
            confidence=float(obj["confidence"]),
            status=obj["status"],
            opened_at=_time(obj["opened_at"]),
            updated_at=_time(obj["updated_at"]),
            score=float(obj["score"]),
            source=obj["source"],
            time_to_failure=None
            if ttf is None
            else TimeToFailure(
                float(ttf["p10_s"]),
                float(ttf["p50_s"]),
                float(ttf["p90_s"]),
                float(ttf["progress"]),
            ),
            drivers=tuple(
                Contribution(
                    str(c["feature"]),
                    tuple(str(m) for m in c["metrics"]),
                    float(c["z"]),
                    float(c["share"]),
                )
                for c in obj["drivers"]
            ),
            remedies=tuple(
                Remedy(
                    str(r["action"]),
                    "service" if r["kind"] == "service" else "remote",
                    bool(r["cures"]),
                    None if r["part"] is None else str(r["part"]),
                    str(r["note"]),
                    None if r.get("skill") is None else str(r["skill"]),
                )
                for r in obj["remedies"]
            ),
            evidence=tuple(str(e) for e in obj["evidence"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RejectedError("bad_diagnosis", f"not a diagnosis: {exc}") from exc
