"""Remote fixes: choosing the next remedy, the owner's consent, sending the command.

Part of :mod:`notifier.loop` ("Act"). The catalog's remote remedies that can cure the
fault are tried first, in catalog order, each once; run at once or after the owner's
consent, as the owner's consent policy says (:data:`~notifier.loop.config.INTERRUPTING`
actions ask first under ``ask_if_interrupting``). A command runs as a task of the case
machine's task group and waits for the device's ``command_result``; a device that
refuses (an interlock: door open, mid-cycle) or does not answer is asked again after
``retry_after_s``, ``max_refusals`` times, before the next remedy. With none left a
visit is offered (:mod:`notifier.loop.visits`) or a person takes the case.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Protocol, Self

from notifier.errors import ConflictError, InvalidRequestError
from notifier.loop.config import INTERRUPTING
from notifier.loop.notices import Notice
from notifier.loop.steps import CaseSteps, has_service, next_remote
from notifier.loop.visits import Visits
from notifier.model import AuditEntry, Case
from wire.errors import PermanentError, TransientError
from wire.protocol import CommandAction, Event

__all__ = ["DeviceCommander", "RemoteFix"]

_LOG = logging.getLogger("notifier.loop")


class DeviceCommander(Protocol):
    """Sends a command and returns the device's result (``wire.commands.CommandChannel``)."""

    async def send(
        self,
        device_id: str,
        action: CommandAction,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        """Publish a command and wait for its ``command_result`` event."""


class RemoteFix:
    """A case's remote remedies, one command at a time.

    Use it as an async context manager: it owns the task group its commands run in.

    Args:
        steps: the steps every part of the case machine takes.
        visits: where a case goes when no remote remedy is left.
        commands: the command downlink.
    """

    def __init__(self, steps: CaseSteps, visits: Visits, commands: DeviceCommander) -> None:
        self._steps = steps
        self._visits = visits
        self.store = steps.store
        self.config = steps.config
        self.commands = commands
        self._group: asyncio.TaskGroup | None = None
        self._running: set[str] = set()
        self._fix_tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        # a remote fix waiting for its device (up to command_timeout_s) must not hold the
        # shutdown: it is cancelled, and the case, still in remote_fix, is taken up again
        # at the next start (_resume), as after a crash
        for task in list(self._fix_tasks):
            task.cancel()
        if group is not None:
            await group.__aexit__(exc_type, exc, tb)

    @property
    def running(self) -> int:
        """Remote fixes waiting for the device's answer right now."""
        return len(self._running)

    async def advance(self, case: Case, why: str, *, tell: Sequence[Notice] = ()) -> Case:
        """Pick the next remedy for a case that is not waiting on anything.

        ``tell``: messages to keep with that step besides its own (a new case's urgent
        safety message).
        """
        action = next_remote(case)
        if action is not None:
            owner = await self.store.get_owner(case.owner_id)
            policy = "ask_if_interrupting" if owner is None else owner.consent
            ask = policy == "always_ask" or (
                policy == "ask_if_interrupting" and action in INTERRUPTING
            )
            if ask:
                return await self._steps.move(
                    case,
                    "awaiting_consent",
                    f"{action} interrupts use; the owner's policy ({policy}) asks first",
                    evidence={"action": action, "after": why},
                    tell=[*tell, Notice("consent_request", action=action)],
                    pending_action=action,
                )
            return await self.start_fix(case, action, f"{why}; {policy} allows {action}", tell=tell)
        if has_service(case):
            return await self._visits.propose(case, f"{why}; no remote remedy left", tell=tell)
        return await self._steps.to_person(
            case, f"{why}; the catalog has no remedy for this fault", tell=tell
        )

    async def start_fix(
        self, case: Case, action: str, reason: str, *, tell: Sequence[Notice] = ()
    ) -> Case:
        """Move the case to ``remote_fix`` with ``action`` and send its command."""
        case = await self._steps.move(
            case,
            "remote_fix",
            reason,
            evidence={"action": action},
            tell=tell,
            pending_action=action,
            tried=(*case.tried, action),
        )
        await self.spawn_command(case)
        return case

    async def spawn_command(self, case: Case) -> None:
        """Send the case's pending command in a task of its own.

        The case's timer is set to when the command's answer is overdue: if this
        instance dies meanwhile, another sends it again then.
        """
        if case.case_id in self._running:
            # its command is still under way here (a next remedy chosen in its task):
            # the timers send it once that task ends
            await self._steps.set_timer(case, "retry", self.config.tick_s)
            return
        await self._steps.set_timer(
            case, "retry", self.config.command_timeout_s + self.config.lease_s
        )
        self._running.add(case.case_id)
        if self._group is None:
            raise InvalidRequestError("the case machine is not running")
        task = self._group.create_task(self.run_command(case.case_id), name=f"fix-{case.case_id}")
        self._fix_tasks.add(task)
        task.add_done_callback(self._fix_tasks.discard)

    def command_args(self, case: Case, action: str) -> dict[str, float | bool | str]:
        """The command's arguments (a firmware update names its version)."""
        if action == "firmware_update":
            version = self.config.firmware.get(case.model)
            if version is None:
                raise InvalidRequestError(f"no firmware release is set for {case.model}")
            return {"version": version}
        return {}

    async def run_command(self, case_id: str) -> None:
        """Run the case's pending command; a failure stays with this case."""
        try:
            await self.command_once(case_id)
        except PermanentError as exc:
            _LOG.warning("case %s: command step failed: %s", case_id, exc)
        except Exception:
            # a task of the case machine's group: raising here would stop every case
            self._steps.case_failed(case_id, "the remote fix")
        finally:
            self._running.discard(case_id)

    async def command_once(self, case_id: str) -> None:
        """Send the case's pending command and take the device's answer."""
        case = await self.store.get_case(case_id)
        if case is None or case.state != "remote_fix" or case.pending_action is None:
            return
        action = case.pending_action
        try:
            args = self.command_args(case, action)
        except InvalidRequestError as exc:
            async with self._steps.lock(f"{case.device_id}/{case.fault}"):
                case = await self._steps.fresh(case)
                await self._steps.audit(
                    case, "system", "command_skipped", str(exc), {"action": action}
                )
                await self.after_failed_remedy(case, str(exc))
            return
        await self._steps.audit(
            case, "system", "command", f"sent {action}", {"action": action, **args}
        )
        try:
            result: Event | None = await self.commands.send(
                case.device_id,
                action,  # type: ignore[arg-type]
                args,
                timeout_s=self.config.command_timeout_s,
            )
            error = None
        except TransientError as exc:
            result, error = None, str(exc)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            if case.state != "remote_fix":
                return
            if result is not None and result.ok:
                case = await self._steps.move(
                    case,
                    "verifying",
                    f"the device did {action}: {result.detail or 'ok'}",
                    evidence={"action": action, "detail": result.detail, "code": result.code},
                    fix_at=result.ts,
                )
                await self._steps.set_timer(case, "verify", self.config.tick_s)
                return
            reason = error or (result.detail if result is not None else None) or "no answer"
            refusals = await self.refusals(case, action)
            refused = AuditEntry(
                case_id=case.case_id,
                at=self._steps.clock(),
                actor="system",
                action="command_refused",
                reason=f"{action} not done: {reason}",
                evidence={"action": action, "reason": reason, "refusals": refusals + 1},
            )
            if refusals + 1 < self.config.max_refusals:
                # the refusal and the owner's message are one step
                tell = []
                if refusals == 0 and result is not None:
                    tell = [Notice("fix_waiting", action=action, reason=reason)]
                case = await self._steps.save(case, entries=[refused], tell=tell)
                await self._steps.set_timer(case, "retry", self.config.retry_after_s)
                return
            await self.store.add_audit(refused)
            await self.after_failed_remedy(case, f"{action} could not be done: {reason}")

    async def refusals(self, case: Case, action: str) -> int:
        """How often the device refused ``action`` or did not answer it, from the trail."""
        return sum(
            1
            for entry in await self.store.audit(case.case_id)
            if entry.action == "command_refused" and entry.evidence.get("action") == action
        )

    async def after_failed_remedy(self, case: Case, why: str) -> Case:
        """A remedy did not work: the next remote one, a visit, or a person."""
        action = next_remote(case)
        if action is not None:
            return await self.start_fix(case, action, f"{why}; trying {action} next")
        if has_service(case):
            return await self._visits.propose(case, f"{why}; a technician is needed")
        return await self._steps.to_person(case, f"{why}; nothing else to try remotely")

    # -- the owner's answer ------------------------------------------------------------
    async def accept_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner agrees to the remote fix the case waits for."""
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            if case.state != "awaiting_consent" or case.pending_action is None:
                raise ConflictError("this case is not waiting for your go-ahead")
            await self._steps.audit(
                case, "owner", "consent", f"the owner agreed to {case.pending_action}"
            )
            return await self.start_fix(case, case.pending_action, "the owner agreed")

    async def decline_fix(self, owner_id: str, case_id: str) -> Case:
        """The owner declines the remote fix; a visit is offered instead."""
        case = await self._steps.owned_case(owner_id, case_id)
        async with self._steps.lock(f"{case.device_id}/{case.fault}"):
            case = await self._steps.fresh(case)
            if case.state != "awaiting_consent":
                raise ConflictError("this case is not waiting for your go-ahead")
            await self._steps.audit(
                case, "owner", "consent", f"the owner declined {case.pending_action}"
            )
            if has_service(case):
                return await self._visits.propose(
                    case, "the owner declined the remote fix", actor="owner"
                )
            return await self._steps.move(
                case,
                "dismissed",
                "the owner declined the only remedy",
                actor="owner",
                pending_action=None,
            )
