"""Verification: is the device right after a remote fix or a visit?

Part of :mod:`notifier.loop` ("Verify"). From the stored scores: after ``settle_s`` of
device time the device's scores must stay at its healthy baseline for
``verify_window_s`` (``healthy_share`` of them under ``healthy_score``), and the fault
must not come back. A check that sees too little data fails after
``verify_timeout_s``. A failed check after a visit hands the case to a person; after a
remote fix, the next remedy is tried (:mod:`notifier.loop.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from notifier.actions import HealthPoint, HealthReader
from notifier.loop.notices import Notice
from notifier.loop.remote import RemoteFix
from notifier.loop.steps import CaseSteps
from notifier.model import Case

__all__ = ["Verification"]


class Verification:
    """Checks verifying cases and resolves or fails them.

    Args:
        steps: the steps every part of the case machine takes.
        remote: where a failed remote fix goes on.
        health: the stored scores.
    """

    def __init__(self, steps: CaseSteps, remote: RemoteFix, health: HealthReader) -> None:
        self._steps = steps
        self._remote = remote
        self.config = steps.config
        self.health = health

    async def verify(self, case: Case) -> Case:
        """Check a verifying case's scores; resolve, fail, or look again later."""
        assert case.fix_at is not None
        config = self.config
        start = case.fix_at + timedelta(seconds=config.settle_s)
        points = await self.health.since(case.device_id, start)
        evidence = _health_evidence(points, config.healthy_score)
        span_s = (points[-1].at - start).total_seconds() if points else 0.0
        if span_s >= config.verify_window_s:
            window = [p for p in points if (p.at - start).total_seconds() <= config.verify_window_s]
            healthy = sum(1 for p in window if p.score < config.healthy_score)
            if healthy >= config.healthy_share * len(window):
                return await self.resolved(case, evidence)
            return await self.not_verified(
                case,
                f"only {healthy} of {len(window)} scores healthy in the check window",
                evidence,
            )
        waited_s = (self._steps.clock() - case.updated_at).total_seconds()
        if waited_s >= config.verify_timeout_s:
            return await self.not_verified(
                case, f"too little data after the fix ({len(points)} scores)", evidence
            )
        await self._steps.set_timer(case, "verify", config.tick_s)
        return case

    async def resolved(self, case: Case, evidence: dict[str, Any]) -> Case:
        """Resolve a verified case; the owner is told and asked for a rating."""
        visited = case.appointment_id is not None
        last = case.tried[-1] if case.tried else None
        return await self._steps.move(
            case,
            "resolved",
            "the device's scores stayed at its healthy baseline after the fix",
            evidence=evidence,
            tell=[
                Notice("resolved" if visited else "fixed_remotely", action=last),
                Notice("rating_request"),
            ],
        )

    async def not_verified(self, case: Case, why: str, evidence: dict[str, Any]) -> Case:
        """A check failed: a person after a visit, else the next remedy."""
        await self._steps.audit(case, "system", "verification_failed", why, evidence)
        if case.appointment_id is not None:
            return await self._steps.to_person(case, f"still not right after the visit: {why}")
        return await self._remote.after_failed_remedy(case, f"the check failed: {why}")


def _health_evidence(points: Sequence[HealthPoint], healthy: float) -> dict[str, Any]:
    if not points:
        return {"scores": 0}
    scores = [p.score for p in points]
    return {
        "scores": len(scores),
        "healthy": sum(1 for s in scores if s < healthy),
        "max": round(max(scores), 3),
        "from": points[0].at.isoformat(),
        "to": points[-1].at.isoformat(),
    }
