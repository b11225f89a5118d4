"""The cases' routes of the ops dashboard: board, queue, tasks, visits, campaigns (dashboard).

A case and its history, the person-needed queue and its tasks, visits, outcomes and
insight.

Reads come from the case store; the few changes a person may make go through
:mod:`dashboard.ops` and the case machine's requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from dashboard import insight, ops, stats
from dashboard.auth import (
    has_role,
)
from dashboard.keys import (
    CACHE_KEY,
    CAMPAIGN_KEY,
    CLOCK_KEY,
    FEED_KEY,
    STORE_KEY,
)
from dashboard.middleware import (
    Handler,
    read_json,
    send_error,
    send_json,
    send_json_body,
    session_of,
)
from dashboard.views import audit_json, case_json, iso, mask_secrets, owner_secrets
from notifier.errors import (
    InvalidRequestError,
    NotFoundError,
)
from notifier.model import OPEN_STATES, TRANSITIONS, AuditEntry, Case

__all__ = ["ROUTES", "since_param"]

_LOG = logging.getLogger(__name__)


_STAGES: Final = tuple(TRANSITIONS)


_CLOSED_PER_STAGE: Final = 50


_NAME: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


_TEXT_LIMIT: Final = 4096


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    body: str = Field(min_length=1, max_length=_TEXT_LIMIT)
    title: str | None = Field(default=None, max_length=200)


class _Close(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    outcome: Literal["resolved", "dismissed"]
    note: str | None = Field(default=None, max_length=_TEXT_LIMIT)


class _Campaign(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fault: str = Field(pattern=_NAME.pattern)
    dimension: stats.Dimension
    value: str = Field(min_length=1, max_length=128)
    action: str = Field(pattern=_NAME.pattern)
    reason: str | None = Field(default=None, max_length=500)
    model: str | None = Field(default=None, max_length=128)


async def _board(request: web.Request) -> web.StreamResponse:
    session_of(request)
    try:
        per_stage = min(max(int(request.query.get("per_stage", "100")), 1), 1000)
    except ValueError as exc:
        raise InvalidRequestError("per_stage must be a number") from exc
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    wanted = request.query.get("model")
    key = ("board", per_stage, wanted or None)
    body: bytes | None = cache.derived(snapshot, key)
    if body is None:
        stages: defaultdict[str, list[Case]] = defaultdict(list)
        counts: Counter[str] = Counter()
        for case in snapshot.cases:
            if wanted and case.model != wanted:
                continue
            counts[case.state] += 1
            limit = per_stage if case.state in OPEN_STATES else min(per_stage, _CLOSED_PER_STAGE)
            if len(stages[case.state]) < limit:
                stages[case.state].append(case)
        body = orjson.dumps(
            {
                "stages": [
                    {
                        "state": state,
                        "open": state in OPEN_STATES,
                        "count": counts.get(state, 0),
                        # a card is rendered once per case record, not once per answer
                        "cases": [cache.rendered(c, case_json) for c in stages.get(state, [])],
                    }
                    for state in _STAGES
                ]
            }
        )
        cache.keep(snapshot, key, body)
    return send_json_body(body)


async def _case(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    store = request.app[STORE_KEY]
    case_id = request.match_info["case_id"]
    case = await store.get_case(case_id)
    if case is None:
        raise NotFoundError(f"no case {case_id}")
    trail, rating, appointments, tasks, secrets = await asyncio.gather(
        store.audit(case_id),
        store.get_rating(case_id),
        store.appointments(case_id=case_id),
        store.tasks(case_id=case_id),
        owner_secrets(store, case.owner_id),
    )
    data: dict[str, Any] = {
        "case": case_json(case),
        "audit": [audit_json(e, secrets) for e in trail],
        "rating": None
        if rating is None
        else {
            "stars": rating.stars,
            "comment": mask_secrets(rating.comment, secrets),
            "nothing_wrong": rating.nothing_wrong,
            "at": iso(rating.at),
        },
        "appointments": [
            {
                "appointment_id": a.appointment_id,
                "technician_id": a.technician_id,
                "start": iso(a.start),
                "end": iso(a.end),
                "state": a.state,
                "part": a.part,
                "note": mask_secrets(a.note, secrets),
            }
            for a in appointments
        ],
        "tasks": [_task_json(t) for t in tasks],
        "owner": None,
    }
    if has_role(session.role, "agent"):
        # the one place an owner shows: by name, for a person who may write to them
        owner = await store.get_owner(case.owner_id)
        if owner is not None:
            data["owner"] = {"name": owner.name, "language": owner.language}
    return send_json(data)


def _task_json(task: Any) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "case_id": task.case_id,
        "reason": task.reason,
        "created_at": iso(task.created_at),
        "state": task.state,
        "assignee": task.assignee,
    }


async def _queue(request: web.Request) -> web.StreamResponse:
    session_of(request)
    store = request.app[STORE_KEY]
    cache = request.app[CACHE_KEY]
    tasks = [*await store.tasks(state="open"), *await store.tasks(state="taken")]
    tasks.sort(key=lambda t: t.created_at)
    # every task's case at once (from the snapshot the feed keeps current), not one by one
    cases = await cache.cases_by_id(t.case_id for t in tasks)
    rows = []
    for task in tasks:
        case = cases.get(task.case_id)
        rows.append(
            {
                **_task_json(task),
                "case": None if case is None else cache.rendered(case, case_json),
            }
        )
    return send_json({"tasks": rows})


def _changed(request: web.Request, case: Case | None = None) -> None:
    """Tell the feed (and so every cache that follows it) about a change made here."""
    feed = request.app[FEED_KEY]
    if case is None:
        feed.touch()
    else:
        feed.publish(case)


async def _take(request: web.Request) -> web.StreamResponse:
    session = session_of(request, "agent")
    task = await ops.take_over(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        request.app[CLOCK_KEY],
        override=has_role(session.role, "admin"),
    )
    # only the task changed: no case, nothing fleet-wide (the queue reads tasks each time)
    return send_json({"task": _task_json(task)})


async def _message(request: web.Request) -> web.StreamResponse:
    session = session_of(request, "agent")
    body: _Message = await read_json(request, _Message)
    notification = await ops.write_to_owner(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        body.body,
        request.app[CLOCK_KEY],
        title=body.title,
        override=has_role(session.role, "admin"),
    )
    return send_json(
        {
            "notification_id": notification.notification_id,
            "case_id": notification.case_id,
            "kind": notification.kind,
            "status": notification.status,
        },
        status=201,
    )


async def _close(request: web.Request) -> web.StreamResponse:
    session = session_of(request, "agent")
    body: _Close = await read_json(request, _Close)
    task, case = await ops.close_task(
        request.app[STORE_KEY],
        request.match_info["task_id"],
        session.username,
        body.outcome,
        request.app[CLOCK_KEY],
        note=body.note,
        override=has_role(session.role, "admin"),
    )
    _changed(request, case)
    return send_json({"task": _task_json(task), "case": case_json(case)})


def _week_start(request: web.Request, now: datetime) -> datetime:
    raw = request.query.get("week")
    try:
        day = date.fromisoformat(raw) if raw else now.date()
    except ValueError as exc:
        raise InvalidRequestError("week is a date, YYYY-MM-DD") from exc
    monday = day - timedelta(days=day.weekday())
    return datetime(monday.year, monday.month, monday.day, tzinfo=UTC)


async def _appointments(request: web.Request) -> web.StreamResponse:
    session_of(request)
    store = request.app[STORE_KEY]
    start = _week_start(request, request.app[CLOCK_KEY]())
    end = start + timedelta(days=7)
    visits, technicians, snapshot = await asyncio.gather(
        store.appointments(since=start, until=end),
        store.technicians(),
        request.app[CACHE_KEY].snapshot(),
    )
    names = {t.technician_id: t.name for t in technicians}
    cases = snapshot.by_id
    rows = []
    for visit in visits:
        case = cases.get(visit.case_id)
        rows.append(
            {
                "appointment_id": visit.appointment_id,
                "case_id": visit.case_id,
                "state": visit.state,
                "start": iso(visit.start),
                "end": iso(visit.end),
                "technician_id": visit.technician_id,
                "technician": names.get(visit.technician_id or ""),
                "part": visit.part,
                "device_id": None if case is None else case.device_id,
                "model": None if case is None else case.model,
                "fault": None if case is None else case.fault,
            }
        )
    return send_json(
        {
            "week_start": start.date().isoformat(),
            "days": [(start + timedelta(days=i)).date().isoformat() for i in range(7)],
            "previous": (start - timedelta(days=7)).date().isoformat(),
            "next": end.date().isoformat(),
            "appointments": rows,
        }
    )


def since_param(request: web.Request, default_days: int) -> datetime | None:
    """The ``days`` query parameter as a start time (``None``: all time; else 422)."""
    raw = request.query.get("days", str(default_days))
    try:
        days = int(raw)
    except ValueError as exc:
        raise InvalidRequestError("days must be a whole number") from exc
    if days <= 0:
        return None
    return request.app[CLOCK_KEY]() - timedelta(days=min(days, 3650))


async def _outcomes(request: web.Request) -> web.StreamResponse:
    session_of(request)
    since = since_param(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("outcomes", request.query.get("days", "0"))
    data = cache.derived(snapshot, key)
    if data is None:
        cases = [c for c in snapshot.cases if since is None or c.opened_at >= since]
        ratings, visited = await cache.outcome_records()
        resolved_at = await cache.resolved_at(cases)
        data = await asyncio.to_thread(
            stats.outcomes, cases, ratings, snapshot.devices, resolved_at, visited
        )
        data["since"] = iso(since)
        cache.keep(snapshot, key, data)
    return send_json(data)


async def _insight(request: web.Request) -> web.StreamResponse:
    session_of(request)
    since = since_param(request, 0)
    cache = request.app[CACHE_KEY]
    snapshot = await cache.snapshot()
    key = ("insight", request.query.get("days", "0"))
    data = cache.derived(snapshot, key)
    if data is None:
        cases = [c for c in snapshot.cases if since is None or c.opened_at >= since]
        # the registry's groups are kept while the registry stays the same
        grouped = cache.reused("population", (snapshot.devices,))
        if grouped is None:
            grouped = await asyncio.to_thread(insight.population, snapshot.devices.values())
            cache.remember("population", (snapshot.devices,), grouped)
        # and each fault's rates while its cases stay the same: a change recounts one fault
        kept: insight.InsightKept | None = cache.reused(key, (grouped,))
        if kept is None:
            kept = {}
            cache.remember(key, (grouped,), kept)
        groups = await asyncio.to_thread(
            insight.fleet_insight,
            list(snapshot.devices.values()),
            cases,
            grouped=grouped,
            kept=kept,
        )
        data = {
            "since": iso(since),
            "devices": len(snapshot.devices),
            "flagged": [g.as_json() for g in groups if g.flagged],
            "groups": [g.as_json() for g in groups if not g.flagged][:100],
        }
        cache.keep(snapshot, key, data)
    return send_json(data)


async def _campaign(request: web.Request) -> web.StreamResponse:
    session = session_of(request, "admin")
    body: _Campaign = await read_json(request, _Campaign)
    starter = request.app[CAMPAIGN_KEY]
    if starter is None:
        return send_error(503, "campaigns are not available in this install")
    snapshot = await request.app[CACHE_KEY].snapshot()
    device_ids = sorted(
        device.device_id
        for device in snapshot.devices.values()
        if stats.group_of(device, body.dimension) == body.value
        and (body.model is None or device.model == body.model)
    )
    if not device_ids:
        raise NotFoundError(f"no devices with {body.dimension} {body.value}")
    reason = body.reason or (
        f"pre-emptive {body.action} for {body.fault} on {body.dimension} {body.value}, "
        f"started by {session.username}"
    )
    started = await starter.start(device_ids, body.action, reason)
    await request.app[STORE_KEY].add_audit(
        AuditEntry(
            case_id=None,
            at=request.app[CLOCK_KEY](),
            actor="ops",
            action="campaign",
            reason=reason,
            evidence={
                "user": session.username,
                "fault": body.fault,
                "dimension": body.dimension,
                "value": body.value,
                "action": body.action,
                "devices": len(device_ids),
                "cases": started,
            },
        )
    )
    _LOG.info(
        "campaign %s for %s on %s %s by %s: %d devices, %d cases",
        body.action,
        body.fault,
        body.dimension,
        body.value,
        session.username,
        len(device_ids),
        started,
    )
    _changed(request)
    return send_json({"devices": len(device_ids), "cases": started}, status=201)


#: This module's part of the JSON API: method, path, handler (each checks its role).
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/ops/api/cases", _board),
    ("GET", "/ops/api/cases/{case_id}", _case),
    ("GET", "/ops/api/queue", _queue),
    ("POST", "/ops/api/tasks/{task_id}/take", _take),
    ("POST", "/ops/api/tasks/{task_id}/message", _message),
    ("POST", "/ops/api/tasks/{task_id}/close", _close),
    ("GET", "/ops/api/appointments", _appointments),
    ("GET", "/ops/api/outcomes", _outcomes),
    ("GET", "/ops/api/insight", _insight),
    ("POST", "/ops/api/campaigns", _campaign),
)
