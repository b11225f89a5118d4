"""Onboarding over the owner REST API: the ops role's registry, owners' claims (notifier).

Routes added to :func:`notifier.api.create_api` when it is given an :class:`Onboarding`
(they share its edge: auth, body checks, JSON errors, request ids, security headers, and
its OpenAPI document):

* ``/api/v1/admin/…`` for a bearer token of the ``ops`` role (``fixloop tokens issue
  --role ops``): product lines (a product model with a product file), devices (add, list,
  get, retire, bulk import from a JSON list or a CSV body with a report per row), owner
  invites, technicians, API tokens (issue, revoke).
* ``POST /api/v1/me/devices/claim``: an owner binds a device with the claim code from
  its label, once. Failed claims are counted per owner and per source address before
  the code is checked (so parallel guesses count too); past a few free ones each further
  failure doubles a wait during which claims are answered 429 with ``Retry-After``.
* ``POST /api/v1/me/devices/{id}/release``: the owner lets a device go on resale. The
  device's stored telemetry is erased (or re-keyed) as an erasure would, then its cases
  stay with the seller under an anonymous id (:meth:`notifier.registry.SqliteRegistry.release`),
  so the next owner sees none of the seller's data.
* ``POST /api/v1/invites/accept``: an invited owner's app exchanges the one-time invite
  code for an API token (no bearer token needed; the invite is the credential).

Device broker logins are issued and revoked through a
:class:`~notifier.registry.BrokerAccounts`, when one is given.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Final, Literal, cast

from aiohttp import web
from pydantic import AwareDatetime, Field, field_validator

from notifier.api import API_PREFIX, DeviceView, device_views
from notifier.edge import (
    MAX_BODY_BYTES,
    ApiError,
    Body,
    ErrorView,
    View,
    authenticate,
    error_response,
    json_response,
    owner_of,
    path_id,
    read_body,
    whole,
    zones,
)
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.keys import CLOCK_KEY, DEVICE_DATA_KEY, ERASE_MODE_KEY, OIDC_KEY, STORE_KEY
from notifier.model import ConsentPolicy, Owner, Technician, Window
from notifier.openapi import Operation, QueryParam, Reply
from notifier.registry import (
    DEVICE_COLUMNS,
    BrokerAccounts,
    DeviceRegistry,
    DeviceState,
    NewDevice,
    ParsedRow,
    ProductLine,
    RegisteredDevice,
    device_from_fields,
    new_token,
    read_device_csv,
    token_id,
)
from notifier.store import PrincipalKind
from wire.errors import ConfigError, FixloopError

__all__ = [
    "ClaimLimiter",
    "ClaimRequest",
    "DeviceRequest",
    "ImportReport",
    "ImportRequest",
    "InviteAcceptRequest",
    "InviteView",
    "Onboarding",
    "OwnerInviteRequest",
    "ProductLineList",
    "ProductLineRequest",
    "ProductLineView",
    "RegistryDeviceList",
    "RegistryDeviceView",
    "ReleaseRequest",
    "ReleasedView",
    "SubjectList",
    "SubjectRequest",
    "SubjectView",
    "TechnicianRequest",
    "TechnicianView",
    "TokenRequest",
    "TokenView",
    "install_onboarding",
]

_LOG = logging.getLogger(__name__)

#: The most rows one import request takes (larger files: the command, or several requests).
MAX_IMPORT_ROWS: Final = 1_000
_ID: Final = "{id}"
_MODEL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,39}$"
_NAME_PATTERN: Final = r"^[^\x00-\x1f\x7f]{1,80}$"
_REGION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_TIMEZONE_PATTERN: Final = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"
_LANGUAGE_PATTERN: Final = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"
_PRINCIPAL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"
_SKILL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,39}$"
# OpenID Connect Core 1.0, 2: ``sub`` is at most 255 ASCII characters; the token check
# takes any up to 255, so only control characters are refused here
_SUBJECT_PATTERN: Final = r"^[^\x00-\x1f\x7f]{1,255}$"
_ISSUER_PATTERN: Final = r"^https?://[^\x00-\x20\x7f]{1,2040}$"


# -- the claim limiter ------------------------------------------------------------------------


_LONG_AGO: Final = datetime.min.replace(tzinfo=UTC)


@dataclass(slots=True)
class _Tries:
    failures: int = 0
    blocked_until: datetime = _LONG_AGO
    last: datetime = _LONG_AGO


class ClaimLimiter:
    """Slows claim-code guessing per owner and per source address.

    Every attempt is counted as a failure *before* its code is checked, in one step with
    the check of the limits (no ``await`` between), so parallel requests cannot all slip
    through; an attempt that then succeeds takes its count back. Past ``free`` failures,
    each further one opens a wait that doubles (``backoff_s``, ``2 * backoff_s`` ... up to
    ``max_backoff_s``) during which the owner, or the address, is refused without a
    check. Counts are forgotten after ``window_s`` of quiet once the last wait ended.

    Args:
        owner_failures: free failures per owner.
        source_failures: free failures per source address (a household shares one).
        backoff_s: the first wait.
        max_backoff_s: the longest wait.
        window_s: quiet time after which failures are forgotten.
        max_keys: bound on the owners and addresses tracked (the oldest go first).

    Raises:
        ConfigError: a limit below 1 or a wait that is not positive.
    """

    def __init__(
        self,
        *,
        owner_failures: int = 5,
        source_failures: int = 10,
        backoff_s: float = 2.0,
        max_backoff_s: float = 3_600.0,
        window_s: float = 900.0,
        max_keys: int = 10_000,
    ) -> None:
        if owner_failures < 1 or source_failures < 1 or max_keys < 1:
            raise ConfigError("claim limits must be at least 1")
        if not 0 < backoff_s <= max_backoff_s or window_s <= 0:
            raise ConfigError("claim waits need 0 < backoff_s <= max_backoff_s, window_s > 0")
        self._free = {"owner": owner_failures, "source": source_failures}
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._window = timedelta(seconds=window_s)
        self._max_keys = max_keys
        self._tries: OrderedDict[tuple[str, str], _Tries] = OrderedDict()

    def _live(self, key: tuple[str, str], now: datetime) -> _Tries | None:
        tries = self._tries.get(key)
        if tries is not None and now - max(tries.last, tries.blocked_until) >= self._window:
            del self._tries[key]
            return None
        return tries

    def begin(self, keys: Sequence[tuple[str, str]], now: datetime) -> float:
        """Check the limits and count the attempt as a failure; return the wait (0: go).

        Args:
            keys: ``("owner", id)`` and ``("source", address)``.
            now: the current time.

        Returns:
            Seconds to wait before the next attempt (0: this one may go on, and is
            counted until :meth:`succeeded` takes it back).
        """
        wait = 0.0
        for key in keys:
            tries = self._live(key, now)
            if tries is not None:
                wait = max(wait, (tries.blocked_until - now).total_seconds())
        if wait > 0:
            return wait
        for key in keys:
            tries = self._live(key, now) or _Tries()
            tries.failures += 1
            tries.last = now
            free = self._free[key[0]]
            if tries.failures >= free:
                steps = min(tries.failures - free, 60)
                delay = min(self._max_backoff_s, self._backoff_s * 2.0**steps)
                tries.blocked_until = now + timedelta(seconds=delay)
            self._tries[key] = tries
            self._tries.move_to_end(key)
        while len(self._tries) > self._max_keys:
            self._tries.popitem(last=False)
        return 0.0

    def succeeded(self, keys: Sequence[tuple[str, str]]) -> None:
        """Take back the count of an attempt that succeeded (and its wait)."""
        for key in keys:
            tries = self._tries.get(key)
            if tries is None:
                continue
            tries.failures = max(tries.failures - 1, 0)
            if tries.failures == 0:
                del self._tries[key]
            elif tries.failures < self._free[key[0]]:
                tries.blocked_until = _LONG_AGO  # this attempt's own wait goes with it


def _source(request: web.Request) -> str:
    """The caller's address, an IPv6 one by its /64 (which one host usually owns)."""
    address = request.remote or "unknown"
    if ":" in address:
        groups = address.split("%")[0].split(":")
        return ":".join(groups[:4]) + "::/64"
    return address


# -- onboarding -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Onboarding:
    """What the onboarding routes work with.

    Attributes:
        registry: the device registry (``registry()`` of the SQLite or PostgreSQL store).
        claim_key: the key claim codes are hashed under
            (:func:`notifier.registry.claim_key`); ``None``: claiming and registering
            devices answer 503 (the server has no secret to hash codes with).
        models: the product models with a product file; a product line needs one.
        accounts: issues and revokes devices' broker logins (``None``: not here).
        limiter: slows claim-code guessing.
        invite_ttl: how long an owner's invite works.
    """

    registry: DeviceRegistry
    claim_key: bytes | None
    models: frozenset[str]
    accounts: BrokerAccounts | None = None
    limiter: ClaimLimiter = field(default_factory=ClaimLimiter)
    invite_ttl: timedelta = timedelta(days=14)


#: The onboarding of the app (set by :func:`install_onboarding`).
ONBOARDING_KEY: Final = web.AppKey("onboarding", Onboarding)


# -- request bodies ---------------------------------------------------------------------------


class ProductLineRequest(Body):
    """A product line to register.

    Attributes:
        model: the product model: the name of its product file (``washer``).
        name: its name for people (at most 80 characters; default: the model).
    """

    model: Annotated[str, Field(pattern=_MODEL_PATTERN)]
    name: Annotated[str, Field(pattern=_NAME_PATTERN)] | None = None


class DeviceRequest(Body):
    """A device to register.

    Attributes:
        model: its product line.
        serial: its serial number (unique within the product line).
        device_id: its id on the wire (default ``MODEL-SERIAL``).
        region: its service region (default ``default``).
        firmware: the firmware it left the factory with.
        batch: its production batch.
        claim_code: its claim code (default: a new one, answered once).
    """

    model: Annotated[str, Field(pattern=_MODEL_PATTERN)]
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")]
    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")] | None = None
    region: Annotated[str, Field(pattern=_REGION_PATTERN)] | None = None
    firmware: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")] | None = None
    batch: Annotated[str, Field(pattern=_NAME_PATTERN)] | None = None
    claim_code: Annotated[str, Field(pattern=r"^[A-Za-z0-9 -]{8,80}$")] | None = None


class ImportRequest(Body):
    """Devices to register in bulk: each row is checked on its own.

    Attributes:
        devices: the rows: objects with the columns ``model``, ``serial`` (required),
            ``device_id``, ``region``, ``firmware``, ``batch``, ``claim_code`` (text).
    """

    devices: Annotated[
        list[dict[str, Any]],
        Field(min_length=1, max_length=MAX_IMPORT_ROWS),
    ]


class OwnerInviteRequest(Body):
    """An owner to invite.

    Attributes:
        name: how messages address them.
        language: message language (default ``en``).
        timezone: IANA time zone (default ``UTC``).
        region: service region (default ``default``).
        consent: which remote fixes may run without asking.
    """

    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    language: Annotated[str, Field(pattern=_LANGUAGE_PATTERN, max_length=35)] | None = None
    timezone: Annotated[str, Field(max_length=64, pattern=_TIMEZONE_PATTERN)] | None = None
    region: Annotated[str, Field(pattern=_REGION_PATTERN)] | None = None
    consent: ConsentPolicy | None = None


class WorkingHours(Body):
    """One weekly working window (local time; it does not cross midnight).

    Attributes:
        weekday: 0 = Monday ... 6 = Sunday.
        start: local start, ``HH:MM``.
        end: local end, ``HH:MM`` (after the start).
    """

    weekday: Annotated[int, Field(ge=0, le=6)]
    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]

    @field_validator("weekday", mode="before")
    @classmethod
    def _whole_day(cls, value: object) -> object:
        return whole(value)


class TechnicianRequest(Body):
    """A technician to add (or change, by id).

    Attributes:
        name: display name.
        region: the region they serve.
        skills: the parts they service (``bearing`` ...).
        technician_id: their id (default: a new one).
        timezone: IANA time zone of their hours (default ``UTC``).
        hours: weekly working windows (default: Monday to Friday, 08:00 to 17:00).
        issue_token: also issue them an API token (default yes).
    """

    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    region: Annotated[str, Field(pattern=_REGION_PATTERN)]
    skills: Annotated[
        list[Annotated[str, Field(pattern=_SKILL_PATTERN)]], Field(min_length=1, max_length=40)
    ]
    technician_id: Annotated[str, Field(pattern=_PRINCIPAL_PATTERN)] | None = None
    timezone: Annotated[str, Field(max_length=64, pattern=_TIMEZONE_PATTERN)] | None = None
    hours: Annotated[list[WorkingHours], Field(max_length=28)] | None = None
    issue_token: bool = True


class TokenRequest(Body):
    """An API token to issue.

    Attributes:
        role: ``owner``, ``technician`` or ``ops``.
        principal_id: the owner's or technician's id, or the ops person's name.
    """

    role: Literal["owner", "technician", "ops"]
    principal_id: Annotated[str, Field(pattern=_PRINCIPAL_PATTERN)]


class SubjectRequest(Body):
    """A person of the manufacturer's identity provider to link to an owner.

    Attributes:
        subject: the provider's ``sub`` for the person.
        issuer: the provider, as its tokens' ``iss`` names it (default: the one
            configured here, ``[notifier.oidc] issuer``).
    """

    subject: Annotated[str, Field(pattern=_SUBJECT_PATTERN)]
    issuer: Annotated[str, Field(pattern=_ISSUER_PATTERN)] | None = None


class ClaimRequest(Body):
    """A claim code from a device's label.

    Attributes:
        claim_code: the code (dashes and blanks do not matter, nor upper or lower case).
        label: the owner's name for the device (``kitchen``).
    """

    claim_code: Annotated[str, Field(min_length=1, max_length=80)]
    label: Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]{1,60}$")] | None = None


class ReleaseRequest(Body):
    """Confirmation that a device is to be released.

    Attributes:
        confirm: must be ``release``.
    """

    confirm: Literal["release"]


class InviteAcceptRequest(Body):
    """An owner's invite code.

    Attributes:
        invite: the code from the invitation.
    """

    invite: Annotated[str, Field(min_length=1, max_length=128)]


# -- response bodies --------------------------------------------------------------------------


class ProductLineView(View):
    """A product line.

    Attributes:
        model: the product model.
        name: its name for people.
        created_at: when it was registered.
        devices: devices registered of it.
        product_file: whether a product file describes the model here.
    """

    model: str
    name: str
    created_at: AwareDatetime
    devices: int
    product_file: bool


class ProductLineList(View):
    """The product lines.

    Attributes:
        product_lines: by model.
    """

    product_lines: list[ProductLineView]


class RegistryDeviceView(View):
    """A registered device.

    Attributes:
        device_id: its id.
        model: its product line.
        serial: its serial number.
        region: its service region.
        firmware: its firmware, if known.
        batch: its production batch, if known.
        state: ``unclaimed``, ``claimed`` or ``retired``.
        owner_id: its owner, if any.
        registered_at: when it was registered.
        retired_at: when it was retired.
        claim_code: its claim code: only in the answer that registered it.
    """

    device_id: str
    model: str
    serial: str
    region: str
    firmware: str | None
    batch: str | None
    state: DeviceState
    owner_id: str | None
    registered_at: AwareDatetime
    retired_at: AwareDatetime | None
    claim_code: str | None = None


class RegistryDeviceList(View):
    """A page of registered devices.

    Attributes:
        devices: by id.
        next: the ``after`` of the next page (``null``: this is the last).
    """

    devices: list[RegistryDeviceView]
    next: str | None


class RowError(View):
    """What is wrong with a row.

    Attributes:
        column: the column (empty: the row as a whole).
        message: plain words.
    """

    column: str
    message: str


class RowReport(View):
    """What became of one row of an import.

    Attributes:
        row: its line in the CSV body (the header is line 1), or its number in the list
            (1 first).
        device_id: its device id, if it could be read.
        status: ``added`` or ``failed``.
        claim_code: the claim code to print on its label (added rows only).
        errors: what is wrong (failed rows).
    """

    row: int
    device_id: str | None
    status: Literal["added", "failed"]
    claim_code: str | None = None
    errors: list[RowError] = Field(default_factory=list)


class ImportReport(View):
    """The result of an import.

    Attributes:
        added: rows registered.
        failed: rows refused.
        rows: one report a row, in order.
        without_broker_login: devices registered whose broker account could not be
            issued (the broker was away): `fixloop devices credentials issue` gives it.
    """

    added: int
    failed: int
    rows: list[RowReport]
    without_broker_login: list[str] = Field(default_factory=list)


class InviteView(View):
    """An invited owner.

    Attributes:
        owner_id: the new owner's id.
        invite: the one-time invite code (shown once; its app exchanges it for a token).
        expires_at: until when it works.
    """

    owner_id: str
    invite: str
    expires_at: AwareDatetime


class TechnicianView(View):
    """A technician.

    Attributes:
        technician_id: their id.
        name: display name.
        region: the region they serve.
        skills: the parts they service.
        token: their API token (shown once), if one was issued.
        token_id: its id, to revoke it.
    """

    technician_id: str
    name: str
    region: str
    skills: list[str]
    token: str | None
    token_id: str | None


class TokenView(View):
    """An API token (shown once: only its digest is kept).

    Attributes:
        token: the bearer token.
        token_id: its id, to revoke it.
        role: who it is for.
        principal_id: their id.
    """

    token: str
    token_id: str
    role: PrincipalKind
    principal_id: str


class SubjectView(View):
    """A provider subject linked to an owner.

    Attributes:
        owner_id: the owner its tokens stand for.
        issuer: the provider (``iss``).
        subject: the person there (``sub``).
    """

    owner_id: str
    issuer: str
    subject: str


class SubjectList(View):
    """The provider subjects linked to an owner.

    Attributes:
        owner_id: the owner.
        subjects: by issuer, then subject.
    """

    owner_id: str
    subjects: list[SubjectView]


class ReleasedView(View):
    """What a release did.

    Attributes:
        device_id: the device, now without an owner.
        cases_kept: your cases of it, kept in your history (no longer linked to it).
        cases_closed: of those, the open ones that ended.
        visits_cancelled: visits not yet started that were cancelled.
    """

    device_id: str
    cases_kept: int
    cases_closed: int
    visits_cancelled: int


# -- helpers ----------------------------------------------------------------------------------


def _onboarding(request: web.Request) -> Onboarding:
    return request.app[ONBOARDING_KEY]


def _key(onboarding: Onboarding) -> bytes:
    if onboarding.claim_key is None:
        raise ApiError(
            503,
            "unavailable",
            "claim codes are not set up here: the service needs the fleet secret",
        )
    return onboarding.claim_key


def _device_view(device: RegisteredDevice, claim_code: str | None = None) -> RegistryDeviceView:
    return RegistryDeviceView(
        device_id=device.device_id,
        model=device.model,
        serial=device.serial,
        region=device.region,
        firmware=device.firmware,
        batch=device.batch,
        state=device.state,
        owner_id=device.owner_id,
        registered_at=device.registered_at,
        retired_at=device.retired_at,
        claim_code=claim_code,
    )


def _line_view(line: ProductLine, models: frozenset[str]) -> ProductLineView:
    return ProductLineView(
        model=line.model,
        name=line.name,
        created_at=line.created_at,
        devices=line.devices,
        product_file=line.model in models,
    )


async def _ops(request: web.Request) -> str:
    """Authenticate an ops token; return the actor for the audit trail."""
    caller = await authenticate(request, "ops")
    return f"ops:{caller.principal_id}"


async def _issue_logins(onboarding: Onboarding, device_ids: Sequence[str]) -> list[str]:
    """Issue broker logins; return the devices whose login could not be issued."""
    if onboarding.accounts is None:
        return []
    if not device_ids:
        return []
    try:
        await onboarding.accounts.issue(device_ids)
    except FixloopError as exc:
        _LOG.warning("broker logins of %d devices not issued: %s", len(device_ids), exc)
        return list(device_ids)
    return []


# -- admin handlers ---------------------------------------------------------------------------


async def _list_lines(request: web.Request) -> web.Response:
    await _ops(request)
    onboarding = _onboarding(request)
    lines = await onboarding.registry.product_lines()
    return json_response(
        ProductLineList(product_lines=[_line_view(x, onboarding.models) for x in lines])
    )


async def _add_line(request: web.Request) -> web.Response:
    actor = await _ops(request)
    body = await read_body(request, ProductLineRequest)
    onboarding = _onboarding(request)
    if body.model not in onboarding.models:
        message = (
            f"model: no product file describes {body.model!r} here (known: "
            f"{', '.join(sorted(onboarding.models))}); add it to the products folder and "
            "check it with `fixloop products check`"
        )
        raise ApiError(422, "unknown_model", message, "model")
    now = request.app[CLOCK_KEY]()
    line = await onboarding.registry.put_product_line(
        ProductLine(body.model, body.name or body.model, now)
    )
    _LOG.info("product line %s registered by %s", line.model, actor)
    return json_response(_line_view(line, onboarding.models), 201)


def _report(
    rows: Sequence[ParsedRow], outcomes: dict[int, tuple[str | None, list[RowError]]]
) -> ImportReport:
    reports: list[RowReport] = []
    for row in rows:
        code, errors = outcomes.get(row.line, (None, []))
        all_errors = [RowError(column=c, message=m) for c, m in row.errors] + errors
        reports.append(
            RowReport(
                row=row.line,
                device_id=None if row.device is None else row.device.device_id,
                status="failed" if all_errors else "added",
                claim_code=None if all_errors else code,
                errors=all_errors,
            )
        )
    added = sum(1 for r in reports if r.status == "added")
    return ImportReport(added=added, failed=len(reports) - added, rows=reports)


async def _register(
    request: web.Request, rows: Sequence[ParsedRow], actor: str
) -> tuple[dict[int, tuple[str | None, list[RowError]]], list[str]]:
    """Register the rows that could be read; their outcomes by row, devices left without login."""
    onboarding = _onboarding(request)
    key = _key(onboarding)
    ready = [row for row in rows if row.device is not None]
    devices: list[NewDevice] = [row.device for row in ready if row.device is not None]
    outcomes = await onboarding.registry.register(
        devices, key=key, now=request.app[CLOCK_KEY](), actor=actor
    )
    by_row: dict[int, tuple[str | None, list[RowError]]] = {}
    for row, outcome in zip(ready, outcomes, strict=True):
        by_row[row.line] = (
            outcome.claim_code,
            [RowError(column=c, message=m) for c, m in outcome.errors],
        )
    failed = await _issue_logins(onboarding, [o.device_id for o in outcomes if o.ok])
    if failed:
        # registered all the same; `fixloop devices credentials issue` gives them one
        _LOG.warning("%d devices registered without a broker login", len(failed))
    return by_row, failed


#: Columns whose error on a well-formed row means the value is taken.
_TAKEN: Final = frozenset(("device_id", "serial", "claim_code"))


async def _add_device(request: web.Request) -> web.Response:
    actor = await _ops(request)
    body = await read_body(request, DeviceRequest)
    row = device_from_fields(1, body.model_dump(exclude_none=True))
    outcomes, _ = await _register(request, [row], actor)
    report = _report([row], outcomes)
    only = report.rows[0]
    if only.status == "failed":
        first = only.errors[0]
        taken = row.device is not None and first.column in _TAKEN
        status, code = (409, "conflict") if taken else (422, "invalid_request")
        raise ApiError(status, code, f"{first.column}: {first.message}", first.column or None)
    assert row.device is not None
    device = await _onboarding(request).registry.get(row.device.device_id)
    if device is None:  # pragma: no cover - it was registered in this request
        raise ApiError(503, "unavailable", "please try again in a moment")
    return json_response(_device_view(device, only.claim_code), 201)


def _parse_csv_body(raw: bytes) -> list[ParsedRow]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_body", "the CSV body must be UTF-8") from exc
    try:
        rows = list(read_device_csv(text.splitlines()))
    except InvalidRequestError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from exc
    if len(rows) > MAX_IMPORT_ROWS:
        raise ApiError(
            400, "invalid_body", f"at most {MAX_IMPORT_ROWS} rows a request (use the command)"
        )
    if not rows:
        raise ApiError(400, "invalid_body", "the CSV body has no device rows")
    return rows


async def _import_devices(request: web.Request) -> web.Response:
    actor = await _ops(request)
    if request.content_type == "text/csv":
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY_BYTES, actual_size=request.content_length
            )
        rows = _parse_csv_body(await request.read())
    else:
        body = await read_body(request, ImportRequest)
        rows = [device_from_fields(i + 1, fields) for i, fields in enumerate(body.devices)]
    outcomes, without_login = await _register(request, rows, actor)
    report = _report(rows, outcomes)
    return json_response(report.model_copy(update={"without_broker_login": without_login}))


_STATES: Final = ("unclaimed", "claimed", "retired")


async def _list_registry(request: web.Request) -> web.Response:
    await _ops(request)
    query = request.query
    model = query.get("model")
    if model is not None and not re.fullmatch(_MODEL_PATTERN, model):
        raise ApiError(400, "invalid_query", "model: is not a product model name", "model")
    state = query.get("state")
    if state is not None and state not in _STATES:
        raise ApiError(
            400, "invalid_query", "state: must be unclaimed, claimed or retired", "state"
        )
    after = query.get("after")
    if after is not None and not 1 <= len(after) <= 64:
        raise ApiError(400, "invalid_query", "after: must be a device id", "after")
    text = query.get("limit", "100")
    if not re.fullmatch(r"[1-9][0-9]{0,2}|1000", text):
        raise ApiError(400, "invalid_query", "limit: must be 1 to 1000", "limit")
    limit = int(text)
    found = await _onboarding(request).registry.list(
        model=model,
        state=cast(DeviceState | None, state),
        after=after,
        limit=limit + 1,
    )
    page = found[:limit]
    return json_response(
        RegistryDeviceList(
            devices=[_device_view(d) for d in page],
            next=page[-1].device_id if len(found) > limit else None,
        )
    )


async def _get_registered(request: web.Request) -> web.Response:
    await _ops(request)
    device_id = path_id(request)
    device = await _onboarding(request).registry.get(device_id)
    if device is None:
        raise ApiError(404, "not_found", f"there is no registered device {device_id}")
    return json_response(_device_view(device))


async def _retire(request: web.Request) -> web.Response:
    actor = await _ops(request)
    device_id = path_id(request)
    onboarding = _onboarding(request)
    if await onboarding.registry.get(device_id) is None:
        raise ApiError(404, "not_found", f"there is no registered device {device_id}")
    if onboarding.accounts is not None:
        # first: should the broker be away, nothing has changed and a retry finishes it
        await onboarding.accounts.revoke(device_id)
    device = await onboarding.registry.retire(device_id, now=request.app[CLOCK_KEY](), actor=actor)
    return json_response(_device_view(device))


async def _invite_owner(request: web.Request) -> web.Response:
    actor = await _ops(request)
    body = await read_body(request, OwnerInviteRequest)
    if body.timezone is not None and body.timezone not in zones():
        message = f"timezone: {body.timezone!r} is not an IANA time zone (like Europe/Berlin)"
        raise ApiError(422, "invalid_request", message, "timezone")
    onboarding = _onboarding(request)
    owner = Owner(
        owner_id=f"o-{new_token()[:16]}",
        name=body.name,
        language=body.language or "en",
        timezone=body.timezone or "UTC",
        region=body.region or "default",
        consent=body.consent or "ask_if_interrupting",
    )
    await request.app[STORE_KEY].put_owner(owner)
    invite = new_token()
    expires_at = request.app[CLOCK_KEY]() + onboarding.invite_ttl
    await onboarding.registry.add_invite(invite, owner.owner_id, expires_at)
    _LOG.info("owner %s invited by %s", owner.owner_id, actor)
    return json_response(
        InviteView(owner_id=owner.owner_id, invite=invite, expires_at=expires_at), 201
    )


_WORKDAY: Final = tuple(Window(day, time(8, 0), time(17, 0)) for day in range(5))


async def _add_technician(request: web.Request) -> web.Response:
    actor = await _ops(request)
    body = await read_body(request, TechnicianRequest)
    if body.timezone is not None and body.timezone not in zones():
        message = f"timezone: {body.timezone!r} is not an IANA time zone (like Europe/Berlin)"
        raise ApiError(422, "invalid_request", message, "timezone")
    hours: tuple[Window, ...] = _WORKDAY
    if body.hours is not None:
        windows = [
            Window(h.weekday, time.fromisoformat(h.start), time.fromisoformat(h.end))
            for h in body.hours
        ]
        if any(w.end <= w.start for w in windows):
            message = "hours: each window ends after it starts (and not past midnight)"
            raise ApiError(422, "invalid_request", message, "hours")
        hours = tuple(windows)
    technician = Technician(
        technician_id=body.technician_id or f"t-{new_token()[:16]}",
        name=body.name,
        region=body.region,
        skills=frozenset(body.skills),
        timezone=body.timezone or "UTC",
        hours=hours,
    )
    store = request.app[STORE_KEY]
    await store.put_technician(technician)
    token = None
    if body.issue_token:
        token = new_token()
        await store.add_token(token, ("technician", technician.technician_id))
    _LOG.info("technician %s added by %s", technician.technician_id, actor)
    return json_response(
        TechnicianView(
            technician_id=technician.technician_id,
            name=technician.name,
            region=technician.region,
            skills=sorted(technician.skills),
            token=token,
            token_id=None if token is None else token_id(token),
        ),
        201,
    )


async def _issue_token(request: web.Request) -> web.Response:
    actor = await _ops(request)
    body = await read_body(request, TokenRequest)
    store = request.app[STORE_KEY]
    if body.role == "owner" and await store.get_owner(body.principal_id) is None:
        raise ApiError(404, "not_found", f"there is no owner {body.principal_id}")
    if body.role == "technician" and await store.get_technician(body.principal_id) is None:
        raise ApiError(404, "not_found", f"there is no technician {body.principal_id}")
    token = new_token()
    await store.add_token(token, (body.role, body.principal_id))
    _LOG.info("a %s token issued by %s", body.role, actor)
    return json_response(
        TokenView(
            token=token, token_id=token_id(token), role=body.role, principal_id=body.principal_id
        ),
        201,
    )


async def _revoke_token(request: web.Request) -> web.Response:
    actor = await _ops(request)
    wanted = path_id(request)
    try:
        kind, _ = await _onboarding(request).registry.revoke_token(wanted)
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    _LOG.info("a %s token revoked by %s", kind, actor)
    return web.Response(status=204)


async def _known_owner(request: web.Request) -> str:
    owner_id = path_id(request)
    if await request.app[STORE_KEY].get_owner(owner_id) is None:
        raise ApiError(404, "not_found", f"there is no owner {owner_id}")
    return owner_id


def _issuer(request: web.Request, given: str | None) -> str:
    """The issuer a link is for: the one given, else the configured provider's."""
    if given is not None:
        return given
    oidc = request.app[OIDC_KEY]
    if oidc is None:
        message = "issuer: name the provider (no identity provider is configured here)"
        raise ApiError(422, "invalid_request", message, "issuer")
    return oidc.issuer


async def _list_subjects(request: web.Request) -> web.Response:
    await _ops(request)
    owner_id = await _known_owner(request)
    found = await request.app[STORE_KEY].subjects_of(owner_id)
    views = [SubjectView(owner_id=owner_id, issuer=i, subject=s) for i, s in found]
    return json_response(SubjectList(owner_id=owner_id, subjects=views))


async def _link_subject(request: web.Request) -> web.Response:
    actor = await _ops(request)
    owner_id = await _known_owner(request)
    body = await read_body(request, SubjectRequest)
    issuer = _issuer(request, body.issuer)
    # ConflictError (the subject is another owner's) answers 409 through the edge
    await request.app[STORE_KEY].link_subject(issuer, body.subject, owner_id)
    # the subject itself is the provider's identifier of a person: not logged
    _LOG.info("an identity-provider sign-in linked to owner %s by %s", owner_id, actor)
    return json_response(SubjectView(owner_id=owner_id, issuer=issuer, subject=body.subject), 201)


async def _unlink_subject(request: web.Request) -> web.Response:
    actor = await _ops(request)
    owner_id = await _known_owner(request)
    subject = request.query.get("subject")
    if subject is None or not re.fullmatch(_SUBJECT_PATTERN, subject):
        raise ApiError(400, "invalid_query", "subject: the provider's sub is needed", "subject")
    given = request.query.get("issuer")
    if given is not None and not re.fullmatch(_ISSUER_PATTERN, given):
        raise ApiError(400, "invalid_query", "issuer: must be the provider's URL", "issuer")
    issuer = _issuer(request, given)
    if not await request.app[STORE_KEY].unlink_subject(issuer, subject, owner_id):
        raise ApiError(404, "not_found", f"that sign-in is not linked to owner {owner_id}")
    _LOG.info("an identity-provider sign-in unlinked from owner %s by %s", owner_id, actor)
    return web.Response(status=204)


# -- owner handlers ---------------------------------------------------------------------------


async def _claim(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    body = await read_body(request, ClaimRequest)
    onboarding = _onboarding(request)
    key = _key(onboarding)
    keys = [("owner", owner.owner_id), ("source", _source(request))]
    clock = request.app[CLOCK_KEY]
    wait = onboarding.limiter.begin(keys, clock())
    if wait > 0:
        response = ApiError(
            429,
            "too_many_attempts",
            f"too many wrong claim codes: try again in {max(int(wait), 1)} s",
        )
        raise _RetryLater(response, wait)
    try:
        outcome = await onboarding.registry.claim(
            owner.owner_id, body.claim_code, key=key, label=body.label, now=clock()
        )
    except InvalidRequestError as exc:
        raise ApiError(422, "invalid_claim_code", f"claim_code: {exc}", "claim_code") from exc
    except NotFoundError as exc:
        # the same answer for a wrong code as for no device: nothing to learn from it
        raise ApiError(404, "not_found", "no device has this claim code") from exc
    except ConflictError:
        onboarding.limiter.succeeded(keys)  # the code was right: no guess to slow down
        raise
    onboarding.limiter.succeeded(keys)
    (view,) = await device_views(request, [outcome.record], owner.owner_id)
    return json_response(view, 201)


class _RetryLater(ApiError):
    """A 429 whose ``Retry-After`` the handler wrapper sets."""

    def __init__(self, error: ApiError, wait_s: float) -> None:
        super().__init__(error.status, error.code, error.message, error.field)
        self.wait_s = wait_s


def _with_retry_after(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _RetryLater as exc:
            return error_response(
                exc.status,
                exc.code,
                exc.message,
                **{"Retry-After": str(max(int(exc.wait_s + 0.999), 1))},
            )

    return wrapped


async def _release(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    device_id = path_id(request)
    await read_body(request, ReleaseRequest)
    store = request.app[STORE_KEY]
    device = await store.get_device(device_id)
    if device is None or device.owner_id != owner.owner_id:
        raise ApiError(404, "not_found", f"there is no device {device_id}")
    data = request.app[DEVICE_DATA_KEY]
    if data is not None:
        # the device's points first: should InfluxDB be away, nothing has changed yet and
        # the owner can simply ask again
        await data.erase([device_id], mode=request.app[ERASE_MODE_KEY])
    outcome = await _onboarding(request).registry.release(
        owner.owner_id, device_id, now=request.app[CLOCK_KEY]()
    )
    return json_response(
        ReleasedView(
            device_id=outcome.device_id,
            cases_kept=outcome.cases_kept,
            cases_closed=outcome.cases_closed,
            visits_cancelled=outcome.visits_cancelled,
        )
    )


async def _accept_invite(request: web.Request) -> web.Response:
    body = await read_body(request, InviteAcceptRequest)
    onboarding = _onboarding(request)
    keys = [("source", _source(request))]
    clock = request.app[CLOCK_KEY]
    wait = onboarding.limiter.begin(keys, clock())
    if wait > 0:
        raise _RetryLater(
            ApiError(429, "too_many_attempts", "too many wrong invites from here: wait a little"),
            wait,
        )
    try:
        owner_id = await onboarding.registry.use_invite(body.invite, now=clock())
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    onboarding.limiter.succeeded(keys)
    token = new_token()
    await request.app[STORE_KEY].add_token(token, ("owner", owner_id))
    return json_response(
        TokenView(token=token, token_id=token_id(token), role="owner", principal_id=owner_id),
        201,
    )


# -- the route table --------------------------------------------------------------------------


def _p(path: str) -> str:
    return f"{API_PREFIX}{path}"


_TOO_MANY: Final = Reply(
    429,
    "Too many wrong codes from this owner or address: wait as long as `Retry-After` says.",
    ErrorView,
    headers=(("Retry-After", "seconds to wait"),),
)
_NO_KEY: Final = Reply(
    503, "Claim codes are not set up here, or a store is briefly unavailable.", ErrorView
)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTES: Final[tuple[tuple[Operation, _Handler], ...]] = (
    (
        Operation(
            "GET",
            _p("/admin/product-lines"),
            "listProductLines",
            "The product lines and how many devices each has",
            "admin",
            "ops",
            replies=(Reply(200, "The product lines, by model.", ProductLineList),),
        ),
        _list_lines,
    ),
    (
        Operation(
            "POST",
            _p("/admin/product-lines"),
            "addProductLine",
            "Register a product line (a product model with a product file)",
            "admin",
            "ops",
            body=ProductLineRequest,
            replies=(
                Reply(201, "Registered (an existing one takes the new name).", ProductLineView),
                Reply(422, "No product file describes the model here.", ErrorView),
            ),
        ),
        _add_line,
    ),
    (
        Operation(
            "GET",
            _p("/admin/devices"),
            "listRegisteredDevices",
            "Registered devices, a page at a time",
            "admin",
            "ops",
            query=(
                QueryParam(
                    "model", "only this product line", {"type": "string", "pattern": _MODEL_PATTERN}
                ),
                QueryParam(
                    "state",
                    "only devices in this state",
                    {"type": "string", "enum": list(_STATES)},
                ),
                QueryParam(
                    "after",
                    "the page after this device id (the previous page's `next`)",
                    {"type": "string", "minLength": 1, "maxLength": 64},
                ),
                QueryParam(
                    "limit",
                    "devices a page (1 to 1000, default 100)",
                    {"type": "string", "pattern": "^([1-9][0-9]{0,2}|1000)$"},
                ),
            ),
            replies=(Reply(200, "A page of devices, by id.", RegistryDeviceList),),
        ),
        _list_registry,
    ),
    (
        Operation(
            "POST",
            _p("/admin/devices"),
            "addDevice",
            "Register one device; its claim code is answered once",
            "admin",
            "ops",
            body=DeviceRequest,
            replies=(
                Reply(201, "Registered, with its claim code.", RegistryDeviceView),
                Reply(
                    409,
                    "The device id, the serial (in its product line) or the claim code is taken.",
                    ErrorView,
                ),
                Reply(
                    422, "The product line is not registered, or a value breaks a rule.", ErrorView
                ),
                _NO_KEY,
            ),
        ),
        _add_device,
    ),
    (
        Operation(
            "POST",
            _p("/admin/device-imports"),
            "importDevices",
            "Register devices in bulk, with a report per row",
            "admin",
            "ops",
            body=ImportRequest,
            replies=(
                Reply(
                    200,
                    "One report a row: added ones with their claim codes (shown once), "
                    "failed ones with each column that is wrong.",
                    ImportReport,
                ),
                _NO_KEY,
            ),
            description=(
                "Each row is checked and registered on its own; a bad row does not stop "
                "the others. The body is a JSON object with a `devices` list, or a CSV "
                f"file (`Content-Type: text/csv`, columns {', '.join(DEVICE_COLUMNS)}; "
                f"`model` and `serial` required) of at most {MAX_IMPORT_ROWS} rows and "
                f"{MAX_BODY_BYTES // 1024} KiB; larger files: `fixloop devices import`."
            ),
        ),
        _import_devices,
    ),
    (
        Operation(
            "GET",
            _p(f"/admin/devices/{_ID}"),
            "getRegisteredDevice",
            "One registered device",
            "admin",
            "ops",
            replies=(Reply(200, "The device.", RegistryDeviceView),),
        ),
        _get_registered,
    ),
    (
        Operation(
            "POST",
            _p(f"/admin/devices/{_ID}/retire"),
            "retireDevice",
            "Take a device out of service (its claim code and broker login stop working)",
            "admin",
            "ops",
            replies=(
                Reply(200, "Retired.", RegistryDeviceView),
                Reply(409, "It is retired already.", ErrorView),
            ),
        ),
        _retire,
    ),
    (
        Operation(
            "POST",
            _p("/admin/owners"),
            "inviteOwner",
            "Create an owner and a one-time invite for their app",
            "admin",
            "ops",
            body=OwnerInviteRequest,
            replies=(Reply(201, "The owner and the invite (shown once).", InviteView),),
        ),
        _invite_owner,
    ),
    (
        Operation(
            "GET",
            _p(f"/admin/owners/{_ID}/subjects"),
            "listOwnerSubjects",
            "The identity-provider sign-ins linked to an owner",
            "admin",
            "ops",
            replies=(
                Reply(200, "The linked subjects.", SubjectList),
                Reply(404, "No such owner.", ErrorView),
            ),
        ),
        _list_subjects,
    ),
    (
        Operation(
            "POST",
            _p(f"/admin/owners/{_ID}/subjects"),
            "linkOwnerSubject",
            "Link a person of the identity provider (its subject) to an owner",
            "admin",
            "ops",
            body=SubjectRequest,
            replies=(
                Reply(201, "Linked (linking it again changes nothing).", SubjectView),
                Reply(404, "No such owner.", ErrorView),
                Reply(409, "The subject stands for another owner already.", ErrorView),
                Reply(422, "No issuer given and no identity provider configured.", ErrorView),
            ),
            description=(
                "From then on the provider's access tokens of that subject act as this "
                "owner (`[notifier.oidc]`); an owner may have several."
            ),
        ),
        _link_subject,
    ),
    (
        Operation(
            "DELETE",
            _p(f"/admin/owners/{_ID}/subjects"),
            "unlinkOwnerSubject",
            "Unlink a person of the identity provider from an owner",
            "admin",
            "ops",
            query=(
                QueryParam(
                    "subject",
                    "the provider's `sub`",
                    {"type": "string", "pattern": _SUBJECT_PATTERN},
                    required=True,
                ),
                QueryParam(
                    "issuer",
                    "the provider (default: the one configured here)",
                    {"type": "string", "pattern": _ISSUER_PATTERN},
                ),
            ),
            replies=(
                Reply(204, "Unlinked: its tokens no longer act as the owner."),
                Reply(404, "No such owner, or the subject is not linked to them.", ErrorView),
                Reply(422, "No issuer given and no identity provider configured.", ErrorView),
            ),
        ),
        _unlink_subject,
    ),
    (
        Operation(
            "POST",
            _p("/admin/technicians"),
            "addTechnician",
            "Add (or change) a technician, with an API token",
            "admin",
            "ops",
            body=TechnicianRequest,
            replies=(Reply(201, "The technician (and the token, shown once).", TechnicianView),),
        ),
        _add_technician,
    ),
    (
        Operation(
            "POST",
            _p("/admin/tokens"),
            "issueToken",
            "Issue an API token for an owner, a technician or an ops person",
            "admin",
            "ops",
            body=TokenRequest,
            replies=(
                Reply(201, "The token (shown once) and its id.", TokenView),
                Reply(404, "No such owner or technician.", ErrorView),
            ),
        ),
        _issue_token,
    ),
    (
        Operation(
            "DELETE",
            _p(f"/admin/tokens/{_ID}"),
            "revokeToken",
            "Revoke an API token by its id",
            "admin",
            "ops",
            replies=(Reply(204, "Revoked: it no longer works."),),
        ),
        _revoke_token,
    ),
    (
        Operation(
            "POST",
            _p("/me/devices/claim"),
            "claimDevice",
            "Add a device to the owner's with the claim code from its label",
            "owner",
            "owner",
            body=ClaimRequest,
            replies=(
                Reply(201, "The device is the owner's now.", DeviceView),
                Reply(404, "No device has this claim code.", ErrorView),
                Reply(
                    409,
                    "The device is the owner's already, has another owner (who must "
                    "release it first), or is out of service.",
                    ErrorView,
                ),
                Reply(422, "This is not a claim code (8 to 64 letters and digits).", ErrorView),
                _TOO_MANY,
                _NO_KEY,
            ),
            description=(
                "Wrong codes are counted per owner and per address; after a few, claims "
                "wait longer and longer (429)."
            ),
        ),
        _with_retry_after(_claim),
    ),
    (
        Operation(
            "POST",
            _p(f"/me/devices/{_ID}/release"),
            "releaseDevice",
            "Let a device go (sold or given away): the next owner sees none of your data",
            "owner",
            "owner",
            body=ReleaseRequest,
            replies=(Reply(200, "Released.", ReleasedView),),
            description=(
                "The device leaves your list; its stored telemetry is erased (or kept "
                "anonymously, as the manufacturer chose for erasures); your cases of it "
                "stay in your history without the device's id, open ones end, visits not "
                "yet started are cancelled. The next owner claims it with its label."
            ),
        ),
        _release,
    ),
    (
        Operation(
            "POST",
            _p("/invites/accept"),
            "acceptInvite",
            "Exchange an owner's one-time invite for an API token",
            "owner",
            None,
            body=InviteAcceptRequest,
            replies=(
                Reply(201, "The owner's token (shown once).", TokenView),
                Reply(404, "The invite is not valid: used, expired or unknown.", ErrorView),
                _TOO_MANY,
            ),
            description="The invite is the credential: no token is needed. It works once.",
        ),
        _with_retry_after(_accept_invite),
    ),
)


def install_onboarding(
    app: web.Application, onboarding: Onboarding
) -> tuple[tuple[Operation, _Handler], ...]:
    """Give ``app`` the onboarding; return its routes for the app's route table."""
    app[ONBOARDING_KEY] = onboarding
    return _ROUTES
