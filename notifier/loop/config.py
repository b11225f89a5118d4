"""The case machine's timing and limits (:class:`LoopConfig`), and what it holds fixed.

Part of :mod:`notifier.loop`; every collaborator of :class:`~notifier.loop.OwnerLoop`
reads its settings from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from notifier.scheduling import PlannerConfig

__all__ = ["CANCELLED", "INTERRUPTING", "MOVED", "SAFETY_FAULTS", "SERVICE", "LoopConfig"]

#: Remote actions that take the appliance out of use for a while (consent policy).
INTERRUPTING: Final = frozenset(("restart", "firmware_update", "cleaning_cycle"))
#: Faults whose urgency is critical whatever the time to failure (food, water, heat).
SAFETY_FAULTS: Final = frozenset(("refrigerant_leak",))
SERVICE: Final = "technician_visit"
#: Audit steps of a booked visit the owner moved or cancelled (its time freed).
MOVED: Final = "visit_moved"
CANCELLED: Final = "visit_cancelled"


@dataclass(frozen=True, slots=True)
class LoopConfig:
    """Timing and limits of the case machine.

    Attributes:
        command_timeout_s: how long to wait for a device's command result.
        retry_after_s: wall time before a refused or unanswered command is sent again.
        max_refusals: refusals or timeouts of one remedy before the next one.
        settle_s: device time after a fix before its scores count (a reboot, a cycle).
        verify_window_s: device time the scores must stay healthy to call it fixed.
        healthy_score: a score below this is healthy.
        healthy_share: share of scores in the window that must be healthy.
        verify_timeout_s: wall time after which a check that saw too little data fails.
        consent_expiry_s: wall time an unanswered consent request or slot offer waits.
        tick_s: how often timers (retries, checks, expiry) are looked at.
        low_rating: ratings at or below this go to a person.
        max_reschedules: how often an owner may move a booked visit; asking once more
            hands the case to a person, who agrees a time with the owner.
        reminder_before_s: how long before a booked visit the owner is reminded of it
            (once per visit; 0: never).
        firmware: the firmware version to install, by product model.
        planner: the appointment planner's settings.
        resume_opened_after_s: wall time after which a case still ``opened`` (a
            campaign's, opened by the standalone dashboard; one whose first step failed)
            gets its first step from the timers.
        lease_s: how long an instance's lease on a case lasts (it gives it up when done;
            one that died loses it after this long), and how long a timer it took stays
            hidden from the others while it handles it.
    """

    command_timeout_s: float = 30.0
    retry_after_s: float = 300.0
    max_refusals: int = 3
    settle_s: float = 600.0
    verify_window_s: float = 3_600.0
    healthy_score: float = 0.3
    healthy_share: float = 0.9
    verify_timeout_s: float = 6 * 3_600.0
    consent_expiry_s: float = 7 * 86_400.0
    tick_s: float = 1.0
    low_rating: int = 2
    max_reschedules: int = 3
    reminder_before_s: float = 86_400.0
    firmware: Mapping[str, str] = field(default_factory=dict)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    resume_opened_after_s: float = 10.0
    lease_s: float = 30.0
