"""The case machine (notifier, "Decide", "Act", "Verify", "Close" of the loop).

:class:`OwnerLoop` turns :class:`~diagnostics.Diagnosis` messages into cases and carries
each case through its lifecycle (:data:`notifier.model.TRANSITIONS`):

1. **open** one case per device and fault (a repeated diagnosis updates it), with an
   urgency from the predicted time to failure;
2. **remote fix** first: the catalog's remote remedies that can cure the fault, in
   catalog order, each once; run at once or after the owner's consent, as the owner's
   consent policy says; a device that refuses (an interlock: door open, mid-cycle) or does
   not answer is asked again later, a few times, before the next remedy;
3. **verify** from the stored scores: after a settling time the device's scores must stay
   at its healthy baseline for a window of device time, and the fault must not come back;
4. **appointment** when no remote remedy is left: the planner's best slots before the
   predicted failure; the owner books one, asks for others or declines; until the visit
   starts the owner may move it (its time is freed and new slots offered, a few times
   before a person takes over) or cancel it; the technician completes the visit and the
   device is verified again;
5. **close**: resolved with the owner told and asked once for a rating; a low rating, a
   comment or "nothing was wrong" hands the case to a person.

Every decision is written to the audit trail with its reason and evidence. Commands run
as tasks of the loop's task group; a lock per case keeps a diagnosis, a command result
and an owner's request from interleaving on one case, and the store's compare-and-set on
the state catches anything else.

**Side by side**. Any number of case machines may share one store (notifier
instances on PostgreSQL; one on SQLite takes the same paths). The lock per case is a
lease in the store (:meth:`~notifier.store.CaseStore.take_lease`) on the case's key
(device and fault), held by one instance while it handles the case and expiring after
``lease_s``, so a case is handled by one instance at a time and a dead instance's cases
move on. A case's timer (a command to send again, a fix to check) is a row in the store:
any instance takes the due ones (``FOR UPDATE SKIP LOCKED``), and a remote fix waiting
for its device keeps a timer too, so a fix whose instance died is sent again elsewhere.
A step and the message it calls for are one transaction
(:meth:`~notifier.loop.steps.CaseSteps.commit`, with a :class:`StepNotifier`): an
instance that dies mid-step never leaves a case moved and its owner not told.

**Where each part is.** :mod:`notifier.loop.machine` (:class:`OwnerLoop`: diagnoses in,
timers, ratings; it composes the others), :mod:`notifier.loop.remote` (step 2),
:mod:`notifier.loop.verification` (step 3), :mod:`notifier.loop.visits` (step 4),
:mod:`notifier.loop.steps` (what every step shares: the lock and lease, the audit trail,
a move with its messages), :mod:`notifier.loop.notices` (:class:`Notice`, what the owner
is told, and the notifier interfaces), :mod:`notifier.loop.config` (:class:`LoopConfig`).
"""

from notifier.loop.config import LoopConfig
from notifier.loop.machine import OwnerLoop
from notifier.loop.notices import Notice, OwnerNotifier, StepNotifier, notice_key
from notifier.loop.remote import DeviceCommander
from notifier.loop.steps import CaseSink

__all__ = [
    "CaseSink",
    "DeviceCommander",
    "LoopConfig",
    "Notice",
    "OwnerLoop",
    "OwnerNotifier",
    "StepNotifier",
    "notice_key",
]
