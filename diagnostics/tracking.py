"""What the diagnosis policy keeps per device (diagnostics, "Decide").

The mutable, private records :class:`~diagnostics.policy.DiagnosisPolicy` follows
between readings: an open diagnosis (:class:`_Case`, whose record is built only when it
is sent or read), a device's hysteresis counters (:class:`_DeviceState`) and a detector
alert on its way to a diagnosis (:class:`_Alert`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from diagnostics.model import Contribution, Diagnosis
from diagnostics.naming import _Named
from diagnostics.predictor import TimeToFailure
from wire.protocol import ms_to_datetime

__all__: list[str] = []


Source = Literal["model", "device", "both"]


class _Case:
    """An open diagnosis and what the policy needs to keep it (mutable, private).

    The latest fields are kept as they change; :attr:`diagnosis` builds the record from
    them only when it is sent or read.
    """

    __slots__ = (
        "_built",
        "_drivers_from",
        "_stale",
        "confidence",
        "device_id",
        "drivers",
        "evidence",
        "fault",
        "from_model",
        "last_code_ms",
        "last_sent_ms",
        "model",
        "score",
        "sent",
        "source",
        "time_to_failure",
        "updated_ms",
    )

    def __init__(
        self, diagnosis: Diagnosis, *, from_model: bool, last_code_ms: int | None, ts_ms: int
    ) -> None:
        self._built = diagnosis
        self._stale = False
        self._drivers_from: _Named | None = None
        self.device_id = diagnosis.device_id
        self.model = diagnosis.model
        self.fault = diagnosis.fault
        self.from_model = from_model
        self.last_code_ms = last_code_ms
        self.last_sent_ms = ts_ms
        self.sent = diagnosis
        self.updated_ms = ts_ms
        self.score = diagnosis.score
        self.confidence = diagnosis.confidence
        self.drivers = diagnosis.drivers
        self.source: Source = diagnosis.source
        self.time_to_failure = diagnosis.time_to_failure
        self.evidence = diagnosis.evidence

    def revise(
        self,
        ts_ms: int,
        *,
        score: float | None,
        confidence: float | None,
        drivers: _Named | None,
        source: Source | None,
        evidence: str | None,
        time_to_failure: TimeToFailure | None,
    ) -> None:
        """Take a reading's or a code's changes (the record is built later, if at all)."""
        self._stale = True
        self.updated_ms = ts_ms
        if score is not None:
            self.score = score
        if confidence is not None:
            self.confidence = confidence
        if drivers is not None:
            self._drivers_from = drivers
        if source is not None:
            self.source = source
        if evidence is not None:
            self.evidence = (*self.evidence[-9:], evidence)
        self.time_to_failure = time_to_failure

    @property
    def diagnosis(self) -> Diagnosis:
        """The diagnosis as it stands now (status ``update`` once anything revised it)."""
        if self._stale:
            if self._drivers_from is not None:
                self.drivers = self._drivers_from.drivers
                self._drivers_from = None
            self._built = replace(
                self._built,
                status="update",
                updated_at=ms_to_datetime(self.updated_ms),
                score=self.score,
                confidence=self.confidence,
                drivers=self.drivers,
                source=self.source,
                time_to_failure=self.time_to_failure,
                evidence=self.evidence,
            )
            self._stale = False
        return self._built


@dataclass(slots=True)
class _DeviceState:
    above: int = 0
    above_since_ms: int = 0
    below: int = 0
    rival: str | None = None
    rival_count: int = 0
    cases: dict[str, _Case] = field(default_factory=dict)


@dataclass(slots=True)
class _Alert:
    """A detector alert of one device, as the policy follows it (mutable, private).

    Attributes:
        since_ms: device time of the alert's event (its rising edge).
        rows: readings since then, the event's included.
        above: those that scored at or above the open threshold.
        peak: the highest score so far.
        drivers: the metrics that moved at the strongest reading.
        case: the diagnosis it opened, once it lasted long enough.
    """

    since_ms: int
    rows: int = 0
    above: int = 0
    peak: float = 0.0
    drivers: tuple[Contribution, ...] = ()
    case: _Case | None = None
