"""Prometheus text exposition (format 0.0.4) of every fixloop service's ``/metrics``.

One writer for the gateway (:mod:`gateway.metrics`) and the services the composition
root serves (:mod:`fixloop.observe`). Each service keeps its counters as plain numbers
bumped on its event loop and describes them as :class:`Metric` families when scraped;
``prometheus-client`` is not used (see ARCHITECTURE.md, "Metrics").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = ["CONTENT_TYPE", "Metric", "render_metrics"]

#: The ``Content-Type`` of the text format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family and its samples.

    Attributes:
        name: the full name (``fixloop_notifier_diagnoses_handled_total``).
        kind: ``counter`` or ``gauge``.
        help: one line on what it counts.
        samples: (labels, value) pairs; no labels: one sample with ``{}``.
    """

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]] = field(default_factory=tuple)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_metrics(metrics: Sequence[Metric]) -> str:
    """Render metric families in Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            text = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
            lines.append(
                f"{metric.name}{{{text}}} {_number(value)}"
                if text
                else f"{metric.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"
