"""The owner REST API (notifier; owners' and technicians' apps -> here -> the case machine).

Owners see their profile, push channels, devices (health in plain words) and cases (with
their history in plain words) and answer what the loop asks them: agree to a remote fix,
choose a visit time, move or cancel a booked visit, rate the outcome. Technicians see
their visits (a moved or cancelled one is gone from the list) and mark them done.
Owners can export and erase their data. ``GET /openapi.json`` describes every route.

How it works:

* **Auth.** ``Authorization: Bearer <token>``; the store says whom a token stands for
  (:meth:`~notifier.store.CaseStore.resolve_token`), or, where an identity provider is
  set up, a JWT is the provider's access token of an owner (:mod:`notifier.oidc`; its
  keys unavailable: 503; a subject linked to no owner: 403). No or an unknown token: 401
  with ``WWW-Authenticate: Bearer``; a token of the wrong kind for the route: 403. Another
  owner's device or case, or another technician's visit, answers 404, exactly like one
  that does not exist, so ids do not leak.
* **Edge.** Bodies are at most :data:`MAX_BODY_BYTES` (else 413) of JSON checked by strict
  pydantic models that refuse unknown fields; a violation is a 400 naming the field.
* **Errors.** Every error is ``{"error": {"code": ..., "message": ..., "field": ...}}``:
  :class:`~notifier.errors.NotFoundError` 404, :class:`~notifier.errors.ForbiddenError`
  403, :class:`~notifier.errors.ConflictError` and
  :class:`~notifier.errors.IllegalTransitionError` 409,
  :class:`~notifier.errors.InvalidRequestError` 422, a :class:`~wire.errors.TransientError`
  503; anything unexpected is a 500 with a generic message, logged with the request id
  (the ``X-Request-Id`` header of every response). The app keeps serving.
* **Privacy.** Owners never see scores or diagnostic evidence; push targets are masked and
  channel secrets never leave; nothing here logs contacts, tokens or targets. Responses
  with personal data are ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import importlib
import logging
import re
import uuid
import zoneinfo
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from notifier.actions import CaseActions, HealthPoint, HealthReader
from notifier.addresses import check_webhook_url
from notifier.devicedata import DeviceData, EraseMode
from notifier.edge import (
    ERROR_STATUS,
    MAX_BODY_BYTES,
    ApiError,
    Body,
    ErrorView,
    View,
    authenticate,
    error_response,
    error_status,
    json_response,
    owner_of,
    path_id,
    read_body,
    whole,
    zones,
)
from notifier.errors import (
    ConflictError,
    ForbiddenError,
    IllegalTransitionError,
    InvalidLinkError,
    InvalidRequestError,
    NotFoundError,
    UnsafeAddressError,
    UsedLinkError,
)
from notifier.keys import (
    ACTION_BASE_URL_KEY,
    ACTIONS_KEY,
    CHANNEL_VERIFIER_KEY,
    CLOCK_KEY,
    DEVICE_DATA_KEY,
    ERASE_MODE_KEY,
    HEALTH_KEY,
    LINKS_KEY,
    OIDC_KEY,
    OPENAPI_KEY,
    STORE_KEY,
    WEBHOOK_INTERNAL_KEY,
)
from notifier.links import ActionLinks, LinkGrant
from notifier.model import (
    CLOSED_STATES,
    OPEN_STATES,
    Appointment,
    AuditEntry,
    Case,
    CaseState,
    ChannelKind,
    ConsentPolicy,
    DeviceRecord,
    Owner,
    PushChannel,
    Rating,
    Urgency,
    mask_target,
)
from notifier.oidc import OidcOwners
from notifier.openapi import Operation, QueryParam, Reply, build_document
from notifier.push.base import ChannelVerifier
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from notifier.admin import Onboarding

__all__ = [
    "API_PREFIX",
    "MAX_BODY_BYTES",
    "REQUEST_ID_HEADER",
    "TAP_ACTIONS",
    "ActionLinkView",
    "AppointmentChoice",
    "AppointmentView",
    "CaseDetailView",
    "CaseList",
    "CaseView",
    "ChannelList",
    "ChannelRequest",
    "ChannelView",
    "CompleteVisitRequest",
    "DeviceList",
    "DeviceView",
    "EraseRequest",
    "ErasedView",
    "ErrorView",
    "FixChoice",
    "HealthWord",
    "OfferView",
    "ProfilePatch",
    "ProfileView",
    "RatingRequest",
    "RatingView",
    "VisitList",
    "VisitView",
    "create_api",
    "device_views",
]

_LOG = logging.getLogger(__name__)

#: Where the API's routes live.
API_PREFIX: Final = "/api/v1"
#: The header naming each request (taken from the caller when sane, else made here).
REQUEST_ID_HEADER: Final = "X-Request-Id"

#: How long the device list waits for stored health before showing it as unknown.
_HEALTH_TIMEOUT_S: Final = 5.0
#: A stored score at or above this reads "needs attention" (diagnostics' opening threshold).
_ATTENTION_SCORE: Final = 0.5
#: Most push channels one owner may keep, active or retired (issue 12).
_MAX_CHANNELS: Final = 20
#: Longest span of visits one request may list.
_MAX_VISIT_SPAN: Final = timedelta(days=92)
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LANGUAGE: Final = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"
_CHANNEL_KINDS: Final = ("fcm", "webpush", "ntfy", "webhook")
_URGENT: Final = frozenset(("high", "critical"))

HealthWord = Literal["good", "needs attention", "problem", "unknown"]
WaitingFor = Literal["your_consent", "your_choice", "your_rating"]


# -- errors at the edge ---------------------------------------------------------------------


#: aiohttp's own HTTP errors (routing, body size) -> code and plain words.
_HTTP_WORDS: Final[dict[int, tuple[str, str]]] = {
    400: ("bad_request", "the request could not be read"),
    404: ("not_found", "there is nothing at this address"),
    405: ("method_not_allowed", "this address does not take that method"),
    413: ("too_large", f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB"),
}


# -- request bodies -------------------------------------------------------------------------


#: A local wall-clock time: OpenAPI's ``time`` format is RFC 3339's, which needs an offset.
_WallClock = Annotated[
    time,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$",
            "description": "local time in the owner's zone, HH:MM (no UTC offset)",
        }
    ),
]


class QuietHours(Body):
    """Quiet hours in the owner's time zone (``end`` before ``start``: overnight).

    Attributes:
        start: local start (``HH:MM``).
        end: local end (``HH:MM``).
    """

    start: _WallClock
    end: _WallClock

    @field_validator("start", "end")
    @classmethod
    def _wall_clock(cls, value: time) -> time:
        # local wall-clock times in the owner's zone: an offset would make them
        # incomparable with the local time of day (and means nothing across DST)
        if value.tzinfo is not None:
            raise ValueError(
                "quiet hours are local times in your time zone (HH:MM), without a UTC offset"
            )
        return value


class ProfilePatch(Body):
    """Changes to the owner's profile; an absent field (or ``null``) keeps its value.

    Attributes:
        language: message language (``en``, ``de``, ``pt-BR`` ...).
        timezone: IANA time zone (``Europe/Berlin``).
        consent: which remote fixes may run without asking.
        quiet_hours: when no push may come (``null``: no quiet hours).
        channels: preferred channel kinds, first first (empty: any active channel).
    """

    language: Annotated[str, Field(pattern=_LANGUAGE, max_length=35)] | None = None
    timezone: (
        Annotated[
            str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")
        ]
        | None
    ) = None
    consent: ConsentPolicy | None = None
    quiet_hours: QuietHours | None = None
    channels: (
        Annotated[
            list[ChannelKind],
            Field(max_length=len(_CHANNEL_KINDS), json_schema_extra={"uniqueItems": True}),
        ]
        | None
    ) = None

    @field_validator("channels")
    @classmethod
    def _each_once(cls, value: list[ChannelKind] | None) -> list[ChannelKind] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("name each channel kind once")
        return value


def _b64url(value: str) -> bytes:
    """Decode unpadded (or padded) base64url; ``ValueError`` if it is not."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", value):
        raise ValueError("must be base64url (A-Z, a-z, 0-9, '-' and '_')")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except binascii.Error as exc:
        raise ValueError("must be base64url") from exc


#: One visible character: blanks and controls (C0, C1, Unicode spaces) spelled out, so
#: that the schema's regex (ECMA 262), pydantic's (Rust) and Python's mean the same.
_BLANKS: Final = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_SEEN: Final = f"[^{_BLANKS}]"
_SEEN_PART: Final = f"[^{_BLANKS}/?#]"
_TargetUrl = Annotated[
    str,
    Field(min_length=1, max_length=2048, pattern=rf"^https?://{_SEEN}+$"),
]
_HttpsUrl = Annotated[
    str,
    Field(min_length=1, max_length=2048, pattern=rf"^https://{_SEEN}+$"),
]


class WebPushKeys(Body):
    """Keys of a Web Push subscription (RFC 8291), as the browser gives them.

    Attributes:
        p256dh: the subscription's P-256 public key, uncompressed (65 bytes), base64url.
        auth: the 16-byte authentication secret, base64url.
    """

    # the schema says all the form can say: 65 bytes starting 0x04 ("B"), 16 bytes; whether
    # the point lies on the curve is checked when the channel is registered (422)
    p256dh: Annotated[str, Field(pattern=r"^B[A-Za-z0-9_-]{86}=?$")]
    auth: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{22}(==)?$")]

    def point_on_curve(self) -> bool:
        """Whether ``p256dh`` is a point on the P-256 curve."""
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _b64url(self.p256dh))
        except ValueError:
            return False
        return True


class WebPushChannel(Body):
    """A browser's Web Push subscription.

    Attributes:
        kind: ``webpush``.
        target: the subscription's endpoint (https).
        keys: the subscription's keys.
    """

    kind: Literal["webpush"]
    target: _HttpsUrl
    keys: WebPushKeys


class FcmChannel(Body):
    """A Firebase Cloud Messaging registration token of the owner's app.

    Attributes:
        kind: ``fcm``.
        target: the registration token.
        keys: none.
    """

    kind: Literal["fcm"]
    target: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[!-~]+$")]
    keys: Annotated[dict[str, str], Field(max_length=0)] = Field(default_factory=dict)


class NtfyKeys(Body):
    """Credentials of an ntfy topic.

    Attributes:
        token: an ntfy access token for a protected topic.
    """

    token: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[!-~]+$")] | None = None


class NtfyChannel(Body):
    """An ntfy topic.

    Attributes:
        kind: ``ntfy``.
        target: the topic URL (``https://ntfy.sh/my-topic``).
        keys: optional credentials.
    """

    kind: Literal["ntfy"]
    target: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2048,
            pattern=rf"^https?://{_SEEN_PART}+/+{_SEEN_PART}{_SEEN}*$",
        ),
    ]
    keys: NtfyKeys = Field(default_factory=NtfyKeys)


class WebhookKeys(Body):
    """The webhook's signing secret.

    Attributes:
        secret: shared secret the deliveries are signed with (16 to 256 characters).
    """

    secret: Annotated[str, Field(min_length=16, max_length=256)]


class WebhookChannel(Body):
    """A webhook the owner runs (home automation).

    Where it may point is checked once the body is read (:mod:`notifier.addresses`):
    an https URL without credentials to a public host; a URL to ``localhost`` or to an
    internal address is refused with 422 (unless this install allows internal webhooks).

    Attributes:
        kind: ``webhook``.
        target: https URL to a public host.
        keys: the signing secret.
    """

    kind: Literal["webhook"]
    target: _TargetUrl
    keys: WebhookKeys


class ChannelRequest(
    RootModel[
        Annotated[
            WebPushChannel | FcmChannel | NtfyChannel | WebhookChannel,
            Field(discriminator="kind"),
        ]
    ]
):
    """A push channel to register: ``kind`` says which of the four it is."""

    model_config = ConfigDict(strict=True, frozen=True)


class FixChoice(Body):
    """The owner's answer to a remote fix that waits for consent.

    Attributes:
        accept: ``true`` runs it now, ``false`` declines it (a visit is offered instead).
    """

    accept: bool


_CHOICES: Final = ("slot", "other_times", "decline")


class AppointmentChoice(Body):
    """The owner's answer to a visit offer or a booked visit: exactly one of the three.

    ``null`` counts as absent; the schema says so with its ``oneOf``.

    Attributes:
        slot: index of the chosen slot in the offer.
        other_times: ask for other times (for a booked visit: move it, freeing its time).
        decline: no visit wanted (for a booked visit: cancel it, freeing its time).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": [name],
                    "properties": {
                        name: {"not": {"type": "null"}},
                        **{other: {"type": "null"} for other in _CHOICES if other != name},
                    },
                }
                for name in _CHOICES
            ]
        }
    )

    slot: Annotated[int, Field(ge=0, le=99)] | None = None
    other_times: Literal[True] | None = None
    decline: Literal[True] | None = None

    @field_validator("slot", mode="before")
    @classmethod
    def _whole_slot(cls, value: object) -> object:
        return whole(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> AppointmentChoice:
        given = [v for v in (self.slot, self.other_times, self.decline) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of slot, other_times or decline")
        return self


class RatingRequest(Body):
    """The owner's rating of a resolved case.

    Attributes:
        stars: 1 (bad) to 5 (great).
        comment: optional words (at most 2000 characters).
        nothing_wrong: the owner says there was nothing wrong with the device.
    """

    stars: Annotated[int, Field(ge=1, le=5)]
    comment: Annotated[str, Field(max_length=2000)] | None = None
    nothing_wrong: bool = False

    @field_validator("stars", mode="before")
    @classmethod
    def _whole_stars(cls, value: object) -> object:
        return whole(value)


class EraseRequest(Body):
    """Confirmation that the owner's data is to be erased.

    Attributes:
        confirm: must be ``erase``.
    """

    confirm: Literal["erase"]


class CompleteVisitRequest(Body):
    """The technician's report of a visit.

    Attributes:
        note: what was done (at most 2000 characters).
    """

    note: Annotated[str, Field(max_length=2000)] | None = None


# -- response bodies ------------------------------------------------------------------------


class QuietHoursView(View):
    """Quiet hours, local ``HH:MM``.

    Attributes:
        start: local start.
        end: local end.
    """

    start: str
    end: str


class ProfileView(View):
    """The owner's profile.

    Attributes:
        name: how messages address them.
        language: message language.
        timezone: IANA time zone.
        region: service region.
        consent: which remote fixes may run without asking.
        quiet_hours: when no push comes (``null``: none).
        channels: preferred channel kinds, first first.
        max_per_day: notifications per day before the rest go into a digest.
    """

    name: str
    language: str
    timezone: str
    region: str
    consent: ConsentPolicy
    quiet_hours: QuietHoursView | None
    channels: list[ChannelKind]
    max_per_day: int


class ChannelView(View):
    """A registered push channel (its target masked, its secrets never shown).

    Attributes:
        channel_id: id.
        kind: which service.
        target: the target, masked.
        active: whether pushes go to it (``false``: retired after failing or being
            called dead; re-verify it to use it again).
        created_at: when it was registered.
    """

    channel_id: str
    kind: ChannelKind
    target: str
    active: bool
    created_at: AwareDatetime | None


class ChannelList(View):
    """The owner's push channels, active and retired, oldest first.

    Attributes:
        channels: the channels.
    """

    channels: list[ChannelView]


class DeviceView(View):
    """A device and how it is doing, in plain words.

    Attributes:
        device_id: id.
        label: the owner's name for it.
        model: product model.
        firmware: installed firmware version.
        health: ``good``, ``needs attention``, ``problem`` or ``unknown`` (no reading yet).
        open_cases: ids of its open cases, newest first.
    """

    device_id: str
    label: str | None
    model: str
    firmware: str | None
    health: HealthWord
    open_cases: list[str]


class DeviceList(View):
    """The owner's devices.

    Attributes:
        devices: the devices, by id.
    """

    devices: list[DeviceView]


class CaseView(View):
    """A case as its owner sees it.

    Attributes:
        case_id: id.
        device_id: the device.
        device_label: the owner's name for the device.
        title: the problem in plain words.
        state: lifecycle stage.
        open: whether it is still being worked on.
        urgency: how soon it matters.
        waiting_for: what the loop waits for from the owner, if anything.
        pending_fix: the remote fix waiting for consent or its result.
        appointment_id: the current appointment.
        rating: the owner's stars, once rated.
        opened_at: when it opened.
        updated_at: last change.
    """

    case_id: str
    device_id: str
    device_label: str | None
    title: str
    state: CaseState
    open: bool
    urgency: Urgency
    waiting_for: WaitingFor | None
    pending_fix: str | None
    appointment_id: str | None
    rating: int | None
    opened_at: AwareDatetime
    updated_at: AwareDatetime


class CaseDetailView(CaseView):
    """A case with its history in plain words.

    Attributes:
        history: what happened, oldest first, one sentence each.
    """

    history: list[str]


class CaseList(View):
    """The owner's cases, newest first.

    Attributes:
        cases: the cases.
    """

    cases: list[CaseView]


class SlotView(View):
    """A visit time on offer.

    Attributes:
        index: what to send back to choose it.
        start: start (UTC).
        end: end (UTC).
        technician: who would come.
    """

    index: int
    start: AwareDatetime
    end: AwareDatetime
    technician: str | None


class OfferView(View):
    """The visit times on offer for a case.

    Attributes:
        appointment_id: the proposal (``null``: nothing on offer).
        slots: the times, in the offer's order.
    """

    appointment_id: str | None
    slots: list[SlotView]


class AppointmentView(View):
    """A booked (or done, or cancelled) visit, as the owner sees it.

    Attributes:
        appointment_id: id.
        case_id: the case.
        state: ``proposed``, ``booked``, ``done`` or ``cancelled``.
        start: start (UTC).
        end: end (UTC).
        technician: who comes.
    """

    appointment_id: str
    case_id: str
    state: str
    start: AwareDatetime | None
    end: AwareDatetime | None
    technician: str | None


class RatingView(View):
    """A stored rating.

    Attributes:
        case_id: the case.
        stars: 1 to 5.
        comment: the owner's words.
        nothing_wrong: the owner said there was nothing wrong.
        at: when.
    """

    case_id: str
    stars: int
    comment: str | None
    nothing_wrong: bool
    at: AwareDatetime


class ActionLinkView(View):
    """What a one-tap action link will do (``POST`` the same link to do it).

    Attributes:
        case_id: the case.
        action: the action (``accept_fix``, ``choose_slot:0``, ``rate_good`` ...).
        title: the case's problem in plain words, in the owner's language.
        does: what the action does, in plain words.
        expires_at: when the link stops working.
    """

    case_id: str
    action: str
    title: str
    does: str
    expires_at: AwareDatetime


class ErasedView(View):
    """The result of an erasure.

    Attributes:
        erased: always ``true``.
        rows: how many stored rows were removed or anonymised.
    """

    erased: bool
    rows: int


class VisitView(View):
    """A visit as its technician sees it.

    Attributes:
        appointment_id: id.
        case_id: the case.
        device_id: the device.
        model: product model.
        fault: the diagnosed fault.
        part: the part to service.
        state: ``booked``, ``done`` or ``cancelled``.
        start: start (UTC).
        end: end (UTC).
        note: the technician's note once done.
        evidence: the diagnosis's facts in plain words.
    """

    appointment_id: str
    case_id: str
    device_id: str | None
    model: str | None
    fault: str | None
    part: str | None
    state: str
    start: AwareDatetime | None
    end: AwareDatetime | None
    note: str | None
    evidence: list[str]


class VisitList(View):
    """A technician's visits, by start.

    Attributes:
        visits: the visits.
    """

    visits: list[VisitView]


# -- plain words ----------------------------------------------------------------------------

_HistoryEntry = tuple[datetime, str, str | None, str | None]


def _load_messages() -> ModuleType | None:
    """The message catalogue (:mod:`notifier.messages`), or ``None`` where it is missing."""
    try:
        return importlib.import_module("notifier.messages")
    except ModuleNotFoundError as exc:
        if exc.name != "notifier.messages":
            raise  # the catalogue is there but broken: that must show
        return None


#: The catalogue's ``fault_title(fault, model, language)``, if installed.
_CATALOG_TITLE: Final[Callable[[str, str, str], str] | None] = getattr(
    _load_messages(), "fault_title", None
)
#: The catalogue's ``plain_history(entries, language, timezone)``, if installed.
_CATALOG_HISTORY: Final[Callable[[Sequence[_HistoryEntry], str, str], list[str]] | None] = getattr(
    _load_messages(), "plain_history", None
)

_STATE_WORDS: Final[dict[str, str]] = {
    "opened": "We noticed something that needs looking at",
    "awaiting_consent": "We asked you before fixing it remotely",
    "remote_fix": "We started fixing it remotely",
    "verifying": "We are checking that it works properly again",
    "appointment_proposed": "We offered times for a technician visit",
    "booked": "A technician visit was booked",
    "visited": "The technician has been",
    "resolved": "It is fixed",
    "dismissed": "We closed it: nothing more needs doing",
    "escalated": "A person from our team is looking at it",
    "expired": "We closed it",
}


def _title(case: Case, language: str) -> str:
    if _CATALOG_TITLE is not None:
        return str(_CATALOG_TITLE(case.fault, case.model, language))
    return case.fault.replace("_", " ").strip().capitalize() or "A problem"


def _history(trail: Sequence[AuditEntry], owner: Owner) -> list[str]:
    entries: list[_HistoryEntry] = [(e.at, e.action, e.from_state, e.to_state) for e in trail]
    if _CATALOG_HISTORY is not None:
        return [str(line) for line in _CATALOG_HISTORY(entries, owner.language, owner.timezone)]
    zone = zoneinfo.ZoneInfo(owner.timezone) if owner.timezone in zones() else UTC
    lines: list[str] = []
    for at, _action, from_state, to_state in entries:
        # only state changes are told: the other entries are the loop's own bookkeeping
        if to_state is None or to_state == from_state or to_state not in _STATE_WORDS:
            continue
        when = at.astimezone(zone).strftime("%d %b %Y, %H:%M")
        lines.append(f"{when}: {_STATE_WORDS[to_state]}.")
    return lines


def _waiting_for(case: Case) -> WaitingFor | None:
    if case.state == "awaiting_consent":
        return "your_consent"
    if case.state == "appointment_proposed":
        return "your_choice"
    if case.state == "resolved" and case.rating is None:
        return "your_rating"
    return None


def _case_view(case: Case, label: str | None, language: str) -> CaseView:
    return CaseView(
        case_id=case.case_id,
        device_id=case.device_id,
        device_label=label,
        title=_title(case, language),
        state=case.state,
        open=case.is_open,
        urgency=case.urgency,
        waiting_for=_waiting_for(case),
        pending_fix=case.pending_action,
        appointment_id=case.appointment_id,
        rating=case.rating,
        opened_at=case.opened_at,
        updated_at=case.updated_at,
    )


def _health_word(point: HealthPoint | None, open_cases: Sequence[Case]) -> HealthWord:
    if any(case.urgency in _URGENT for case in open_cases):
        return "problem"
    if open_cases:
        return "needs attention"
    if point is None:
        return "unknown"
    return "needs attention" if point.score >= _ATTENTION_SCORE else "good"


def _profile_view(owner: Owner) -> ProfileView:
    quiet = (
        None
        if owner.quiet_start is None or owner.quiet_end is None
        else QuietHoursView(
            start=owner.quiet_start.strftime("%H:%M"), end=owner.quiet_end.strftime("%H:%M")
        )
    )
    return ProfileView(
        name=owner.name,
        language=owner.language,
        timezone=owner.timezone,
        region=owner.region,
        consent=owner.consent,
        quiet_hours=quiet,
        channels=list(owner.channels),
        max_per_day=owner.max_per_day,
    )


def _channel_view(channel: PushChannel) -> ChannelView:
    return ChannelView(
        channel_id=channel.channel_id,
        kind=channel.kind,
        target=mask_target(channel.target),
        active=channel.active,
        created_at=channel.created_at,
    )


def _rating_view(rating: Rating) -> RatingView:
    return RatingView(
        case_id=rating.case_id,
        stars=rating.stars,
        comment=rating.comment,
        nothing_wrong=rating.nothing_wrong,
        at=rating.at,
    )


# -- request helpers ------------------------------------------------------------------------


#: What OpenAPI's ``date-time`` format means (RFC 3339 section 5.6), nothing looser.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _query_time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    if _RFC3339.fullmatch(text) is None:
        message = f"{name}: must be an RFC 3339 time like 2025-03-01T08:00:00Z"
        raise ApiError(400, "invalid_query", message, name)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        message = f"{name}: must be an ISO 8601 time like 2025-03-01T08:00:00Z"
        raise ApiError(400, "invalid_query", message, name) from exc
    if value.tzinfo is None:
        message = f"{name}: must say its time zone (Z or +01:00)"
        raise ApiError(400, "invalid_query", message, name)
    return value.astimezone(UTC)


async def _own_case(store: CaseStore, owner_id: str, case_id: str) -> Case:
    case = await store.get_case(case_id)
    if case is None or case.owner_id != owner_id:
        raise ApiError(404, "not_found", f"there is no case {case_id}")
    return case


async def _label(store: CaseStore, device_id: str) -> str | None:
    device = await store.get_device(device_id)
    return None if device is None else device.label


class _Names:
    """Technician names, looked up once per request."""

    def __init__(self, store: CaseStore) -> None:
        self._store = store
        self._names: dict[str, str | None] = {}

    async def name(self, technician_id: str | None) -> str | None:
        if technician_id is None:
            return None
        if technician_id not in self._names:
            technician = await self._store.get_technician(technician_id)
            self._names[technician_id] = None if technician is None else technician.name
        return self._names[technician_id]


async def _offer_view(store: CaseStore, proposal: Appointment | None) -> OfferView:
    if proposal is None:
        return OfferView(appointment_id=None, slots=[])
    names = _Names(store)
    slots = [
        SlotView(
            index=index,
            start=slot.start,
            end=slot.end,
            technician=await names.name(slot.technician_id),
        )
        for index, slot in enumerate(proposal.offered)
    ]
    return OfferView(appointment_id=proposal.appointment_id, slots=slots)


async def _appointment_view(store: CaseStore, appointment: Appointment) -> AppointmentView:
    return AppointmentView(
        appointment_id=appointment.appointment_id,
        case_id=appointment.case_id,
        state=appointment.state,
        start=appointment.start,
        end=appointment.end,
        technician=await _Names(store).name(appointment.technician_id),
    )


def _visit_view(appointment: Appointment, case: Case | None) -> VisitView:
    return VisitView(
        appointment_id=appointment.appointment_id,
        case_id=appointment.case_id,
        device_id=None if case is None else case.device_id,
        model=None if case is None else case.model,
        fault=None if case is None else case.fault,
        part=appointment.part,
        state=appointment.state,
        start=appointment.start,
        end=appointment.end,
        note=appointment.note,
        evidence=[] if case is None else list(case.evidence),
    )


# -- owner handlers ---------------------------------------------------------------------------


async def _get_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    return json_response(_profile_view(owner))


async def _patch_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    patch = await read_body(request, ProfilePatch)
    changes: dict[str, Any] = {}
    if patch.language is not None:
        changes["language"] = patch.language
    if patch.timezone is not None:
        if patch.timezone not in zones():
            # a well-formed name this machine's zone database does not know: 422
            message = f"timezone: {patch.timezone!r} is not an IANA time zone (like Europe/Berlin)"
            raise ApiError(422, "invalid_request", message, "timezone")
        changes["timezone"] = patch.timezone
    if patch.consent is not None:
        changes["consent"] = patch.consent
    if "quiet_hours" in patch.model_fields_set:
        quiet = patch.quiet_hours
        if quiet is not None and quiet.start == quiet.end:
            message = "quiet_hours: must not start and end at the same time"
            raise ApiError(422, "invalid_request", message, "quiet_hours")
        changes["quiet_start"] = None if quiet is None else quiet.start
        changes["quiet_end"] = None if quiet is None else quiet.end
    if patch.channels is not None:
        changes["channels"] = tuple(patch.channels)
    if changes:
        owner = replace(owner, **changes)
        await request.app[STORE_KEY].put_owner(owner)
    return json_response(_profile_view(owner))


async def _list_channels(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    # retired ones too: they count towards the limit, and the owner re-verifies or removes them
    channels = await request.app[STORE_KEY].channels(owner.owner_id, active_only=False)
    return json_response(ChannelList(channels=[_channel_view(channel) for channel in channels]))


def _channel_keys(
    body: WebPushChannel | FcmChannel | NtfyChannel | WebhookChannel,
) -> dict[str, str]:
    if isinstance(body, WebPushChannel):
        return {"p256dh": body.keys.p256dh, "auth": body.keys.auth}
    if isinstance(body, WebhookChannel):
        return {"secret": body.keys.secret}
    if isinstance(body, NtfyChannel) and body.keys.token is not None:
        return {"token": body.keys.token}
    return {}


async def _add_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    body = (await read_body(request, ChannelRequest, tags=_CHANNEL_KINDS)).root
    if not isinstance(body, FcmChannel):  # an FCM target is a token, not an address
        try:
            check_webhook_url(body.target, allow_internal=request.app[WEBHOOK_INTERNAL_KEY])
        except UnsafeAddressError as exc:
            raise ApiError(422, "unsafe_target", f"target: {exc}", "target") from exc
    if isinstance(body, WebPushChannel) and not body.keys.point_on_curve():
        message = "keys.p256dh: is not a point on the P-256 curve"
        raise ApiError(422, "invalid_keys", message, "keys.p256dh")
    store = request.app[STORE_KEY]
    keys = _channel_keys(body)
    existing = await store.channels(owner.owner_id, active_only=False)
    for channel in existing:
        if channel.kind == body.kind and channel.target == body.target:
            # the same subscription again (an app reinstall): refresh its keys, keep its id
            # and its state: a retired channel comes back only by re-verification (issue 12)
            renewed = replace(channel, keys=keys)
            await store.put_channel(renewed)
            return json_response(_channel_view(renewed))
    if len(existing) >= _MAX_CHANNELS:  # retired ones too: they are kept until removed
        raise InvalidRequestError(
            f"at most {_MAX_CHANNELS} push channels: remove one you no longer use first"
        )
    channel = PushChannel(
        channel_id=f"ch-{uuid.uuid4().hex}",
        owner_id=owner.owner_id,
        kind=body.kind,
        target=body.target,
        keys=keys,
        active=True,
        created_at=request.app[CLOCK_KEY](),
    )
    await store.put_channel(channel)
    return json_response(_channel_view(channel), 201)


async def _verify_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    channel_id = path_id(request)
    store = request.app[STORE_KEY]
    channel = next(
        (
            c
            for c in await store.channels(owner.owner_id, active_only=False)
            if c.channel_id == channel_id
        ),
        None,
    )
    if channel is None:
        raise ApiError(404, "not_found", f"there is no push channel {channel_id}")
    verifier = request.app[CHANNEL_VERIFIER_KEY]
    if verifier is None:
        raise ApiError(503, "unavailable", "push delivery is not running here")
    if not await verifier.verify_channel(owner, channel):
        raise ApiError(
            409,
            "not_verified",
            "the test message did not reach the channel; it stays as it was",
        )
    return json_response(_channel_view(replace(channel, active=True, failures=0)))


async def _delete_channel(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    channel_id = path_id(request)
    if not await request.app[STORE_KEY].delete_channel(owner.owner_id, channel_id):
        raise ApiError(404, "not_found", f"there is no push channel {channel_id}")
    return web.Response(status=204)


async def device_views(
    request: web.Request, devices: Sequence[DeviceRecord], owner_id: str
) -> list[DeviceView]:
    """The owner's view of their devices: health in plain words and open cases."""
    store = request.app[STORE_KEY]
    open_cases: dict[str, list[Case]] = {}
    for case in await store.cases(owner_id=owner_id, states=sorted(OPEN_STATES)):
        open_cases.setdefault(case.device_id, []).append(case)
    latest: dict[str, HealthPoint] = {}
    if devices:
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                latest = await request.app[HEALTH_KEY].latest([d.device_id for d in devices])
        except (TransientError, PermanentError, TimeoutError) as exc:
            # cases still say what is wrong; only the readings are missing for now (also
            # when InfluxDB refuses the query, e.g. before the gateway made its database)
            _LOG.warning("device health unavailable for the device list: %s", exc)
    return [
        DeviceView(
            device_id=device.device_id,
            label=device.label,
            model=device.model,
            firmware=device.firmware,
            health=_health_word(latest.get(device.device_id), open_cases.get(device.device_id, [])),
            open_cases=[case.case_id for case in open_cases.get(device.device_id, [])],
        )
        for device in devices
    ]


async def _list_devices(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    devices = await request.app[STORE_KEY].devices(owner.owner_id)
    return json_response(DeviceList(devices=await device_views(request, devices, owner.owner_id)))


async def _get_device(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    device_id = path_id(request)
    device = await request.app[STORE_KEY].get_device(device_id)
    if device is None or device.owner_id != owner.owner_id:
        raise ApiError(404, "not_found", f"there is no device {device_id}")
    (view,) = await device_views(request, [device], owner.owner_id)
    return json_response(view)


async def _list_cases(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    which = request.query.get("state")
    states: list[str] | None
    if which is None:
        states = None
    elif which == "open":
        states = sorted(OPEN_STATES)
    elif which == "closed":
        states = sorted(CLOSED_STATES)
    else:
        raise ApiError(400, "invalid_query", "state: must be open or closed", "state")
    store = request.app[STORE_KEY]
    cases = await store.cases(owner_id=owner.owner_id, states=states)
    labels = {device.device_id: device.label for device in await store.devices(owner.owner_id)}
    views = [_case_view(case, labels.get(case.device_id), owner.language) for case in cases]
    return json_response(CaseList(cases=views))


async def _get_case(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    view = _case_view(case, await _label(store, case.device_id), owner.language)
    history = _history(await store.audit(case.case_id), owner)
    return json_response(CaseDetailView(**view.model_dump(), history=history))


async def _post_fix(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    choice = await read_body(request, FixChoice)
    actions = request.app[ACTIONS_KEY]
    if choice.accept:
        case = await actions.accept_fix(owner.owner_id, case.case_id)
    else:
        case = await actions.decline_fix(owner.owner_id, case.case_id)
    return json_response(_case_view(case, await _label(store, case.device_id), owner.language))


async def _current_proposal(store: CaseStore, case: Case) -> Appointment | None:
    proposals = await store.appointments(case_id=case.case_id, states=["proposed"])
    for proposal in proposals:
        if proposal.appointment_id == case.appointment_id:
            return proposal
    return proposals[-1] if proposals else None


async def _get_slots(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    return json_response(await _offer_view(store, await _current_proposal(store, case)))


async def _post_appointment(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    choice = await read_body(request, AppointmentChoice)
    actions = request.app[ACTIONS_KEY]
    if choice.slot is not None:
        booked = await actions.choose_slot(owner.owner_id, case.case_id, choice.slot)
        return json_response(await _appointment_view(store, booked), 201)
    if choice.other_times:
        proposal = await actions.request_other_slots(owner.owner_id, case.case_id)
        return json_response(await _offer_view(store, proposal))
    case = await actions.decline_visit(owner.owner_id, case.case_id)
    return json_response(_case_view(case, await _label(store, case.device_id), owner.language))


async def _post_rating(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    store = request.app[STORE_KEY]
    case = await _own_case(store, owner.owner_id, path_id(request))
    body = await read_body(request, RatingRequest)
    comment = None if body.comment is None else body.comment.strip() or None
    rating = await request.app[ACTIONS_KEY].rate(
        owner.owner_id, case.case_id, body.stars, comment, nothing_wrong=body.nothing_wrong
    )
    return json_response(_rating_view(rating), 201)


async def _export_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    data = await request.app[STORE_KEY].export_owner(owner.owner_id)
    day = request.app[CLOCK_KEY]().astimezone(UTC).strftime("%Y-%m-%d")
    response = web.json_response(data)
    response.headers["Content-Disposition"] = f'attachment; filename="fixloop-data-{day}.json"'
    return response


async def _owner_device_ids(store: CaseStore, owner_id: str) -> list[str]:
    """Every device the owner has or had a case about (their data in InfluxDB)."""
    ids = {device.device_id for device in await store.devices(owner_id)}
    ids |= {case.device_id for case in await store.cases(owner_id=owner_id, limit=1_000_000)}
    return sorted(ids)


async def _export_telemetry(request: web.Request) -> web.StreamResponse:
    owner = owner_of(await authenticate(request, "owner"))
    data = request.app[DEVICE_DATA_KEY]
    devices = await _owner_device_ids(request.app[STORE_KEY], owner.owner_id)
    day = request.app[CLOCK_KEY]().astimezone(UTC).strftime("%Y-%m-%d")
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="fixloop-device-data-{day}.jsonl"',
            "Cache-Control": "no-store",
            REQUEST_ID_HEADER: _request_id(request),
            **_SECURITY_HEADERS,
        }
    )
    lines = data.export(devices) if data is not None and devices else None
    # the first point is read before the answer starts, so that InfluxDB being away is a
    # proper 503 rather than a broken download
    first = None if lines is None else await anext(aiter(lines), None)
    await response.prepare(request)
    if lines is not None and first is not None:
        await response.write(first)
        try:
            async for line in lines:
                await response.write(line)
        except (TransientError, PermanentError):
            # the answer has begun: all that is left is to cut it short, visibly
            _LOG.warning("device data export of an owner broke off", exc_info=True)
            raise
    await response.write_eof()
    return response


async def _delete_me(request: web.Request) -> web.Response:
    owner = owner_of(await authenticate(request, "owner"))
    await read_body(request, EraseRequest)
    store = request.app[STORE_KEY]
    data = request.app[DEVICE_DATA_KEY]
    if data is not None:
        # the devices' points first: should InfluxDB be away, nothing is erased yet and
        # the owner (whose token still works) can simply ask again
        devices = await _owner_device_ids(store, owner.owner_id)
        if devices:
            await data.erase(devices, mode=request.app[ERASE_MODE_KEY])
    rows = await store.erase_owner(owner.owner_id)
    _LOG.info("an owner erased their data (%d rows)", rows)
    return json_response(ErasedView(erased=True, rows=rows))


# -- technician handlers --------------------------------------------------------------------


async def _list_visits(request: web.Request) -> web.Response:
    caller = await authenticate(request, "technician")
    now = request.app[CLOCK_KEY]()
    since = _query_time(request, "from") or now - timedelta(days=7)
    until = _query_time(request, "to") or since + timedelta(days=30)
    # well-formed times that make no window are a 422, like any other sound request
    # that cannot be done (the document cannot say "after from")
    if until <= since:
        raise ApiError(422, "invalid_range", "to: must be after from", "to")
    if until - since > _MAX_VISIT_SPAN:
        message = f"to: at most {_MAX_VISIT_SPAN.days} days after from"
        raise ApiError(422, "invalid_range", message, "to")
    store = request.app[STORE_KEY]
    visits = await store.appointments(
        technician_id=caller.principal_id,
        states=["booked", "done"],  # a moved or cancelled visit is no longer the technician's
        since=since,
        until=until,
    )
    views = [_visit_view(visit, await store.get_case(visit.case_id)) for visit in visits]
    return json_response(VisitList(visits=views))


async def _complete_visit(request: web.Request) -> web.Response:
    caller = await authenticate(request, "technician")
    appointment_id = path_id(request)
    store = request.app[STORE_KEY]
    visit = await store.get_appointment(appointment_id)
    if visit is None or visit.technician_id != caller.principal_id or visit.state == "proposed":
        raise ApiError(404, "not_found", f"there is no visit {appointment_id}")
    body = await read_body(request, CompleteVisitRequest)
    note = None if body.note is None else body.note.strip() or None
    done = await request.app[ACTIONS_KEY].complete_visit(caller.principal_id, appointment_id, note)
    return json_response(_visit_view(done, await store.get_case(done.case_id)))


# -- one-tap action links ---------------------------------------------------------------------

#: The actions a one-tap link may carry -> what they do (``choose_slot:N`` books slot ``N``
#: of the offer, ``rate:N`` rates ``N`` of 5; the others take no number).
TAP_ACTIONS: Final[dict[str, str]] = {
    "accept_fix": "Yes, go ahead with the remote fix",
    "decline_fix": "No remote fix, thanks (a technician visit is offered instead)",
    "choose_slot": "Book visit time {n}",
    "other_times": "Ask for other visit times",
    "decline_visit": "No visit, thanks",
    "rate_good": "Rate it: it went well",
    "rate_bad": "Rate it: it did not go so well",
    "nothing_wrong": "Tell us nothing was wrong in the first place",
    "rate": "Rate it {n} of 5",
}
#: Stars of the rating buttons; "nothing was wrong" is neutral about the service itself
#: and hands the case to a person through its flag.
_TAP_STARS: Final[dict[str, int]] = {"rate_good": 5, "rate_bad": 2, "nothing_wrong": 3}
_NUMBERED: Final[dict[str, tuple[int, int]]] = {"choose_slot": (0, 99), "rate": (1, 5)}
#: Sent with every answer of the API (a page sets a looser CSP of its own first).
_SECURITY_HEADERS: Final[dict[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_PAGE_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    # the link is the credential: it must not leak to another site as a referrer
    "Referrer-Policy": "no-referrer",
}
_PAGE_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;"
    "line-height:1.5}button{font-size:1.1rem;padding:.7rem 1.4rem}"
)


@dataclass(frozen=True, slots=True)
class _Tap:
    """A checked one-tap link: what it allows, on which case, for whom."""

    grant: LinkGrant
    name: str
    number: int | None
    case: Case
    owner: Owner


def _tap_action(action: str) -> tuple[str, int | None]:
    """Split ``choose_slot:1`` into its name and number (400 for anything unknown)."""
    name, sep, arg = action.partition(":")
    if name in _NUMBERED and sep and arg.isascii() and arg.isdigit() and len(arg) <= 2:
        low, high = _NUMBERED[name]
        if low <= int(arg) <= high:
            return name, int(arg)
    elif name in TAP_ACTIONS and name not in _NUMBERED and not sep:
        return name, None
    raise ApiError(400, "invalid_query", "action: not an action a link can carry", "action")


def _does(tap: _Tap) -> str:
    words = TAP_ACTIONS[tap.name]
    if tap.number is None:
        return words
    return words.format(n=tap.number + 1 if tap.name == "choose_slot" else tap.number)


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "").lower()


def _page(status: int, heading: str, text: str, *, button: str | None = None) -> web.Response:
    """A small page for a link opened in a browser (no script; a form posts the link)."""
    form = (
        ""
        if button is None
        else f'<form method="post"><button type="submit">{html.escape(button)}</button></form>'
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(heading)}</title><style>{_PAGE_STYLE}</style></head>"
        f"<body><h1>{html.escape(heading)}</h1><p>{html.escape(text)}</p>{form}</body></html>"
    )
    response = web.Response(text=body, status=status, content_type="text/html")
    response.headers.update(_PAGE_HEADERS)
    return response


def _error_page(exc: Exception) -> web.Response | None:
    """The page for an error a link can meet, or ``None`` to let the JSON answer it."""
    if isinstance(exc, ApiError):
        return _page(exc.status, "This link did not work", exc.message)
    for kind, status, _code in ERROR_STATUS:
        if isinstance(exc, kind):
            return _page(status, "This link did not work", str(exc) or "open the app instead")
    return None


async def _checked_tap(request: web.Request) -> _Tap:
    case_id = path_id(request)
    name, number = _tap_action(request.query.get("action", ""))
    links = request.app[LINKS_KEY]
    if links is None:
        raise InvalidLinkError("one-tap links are not taken here: open the app to answer")
    grant = links.verify(
        request.query.get("token", ""),
        case_id,
        request.query["action"],
        now=request.app[CLOCK_KEY](),
    )
    store = request.app[STORE_KEY]
    case = await store.get_case(case_id)
    owner = None if case is None else await store.get_owner(case.owner_id)
    if case is None or owner is None:
        raise ApiError(404, "not_found", f"there is no case {case_id}")
    return _Tap(grant, name, number, case, owner)


async def _get_tap(request: web.Request) -> web.Response:
    try:
        tap = await _checked_tap(request)
    except Exception as exc:
        page = _error_page(exc) if _wants_html(request) else None
        if page is None:
            raise
        return page
    title = _title(tap.case, tap.owner.language)
    until = tap.grant.expires_at.strftime("%d %b %Y, %H:%M UTC")
    if _wants_html(request):
        text = f"Tap the button to confirm. This link works once, until {until}."
        return _page(200, title, text, button=_does(tap))
    view = ActionLinkView(
        case_id=tap.case.case_id,
        action=request.query["action"],
        title=title,
        does=_does(tap),
        expires_at=tap.grant.expires_at,
    )
    response = json_response(view)
    response.headers.update(_PAGE_HEADERS)
    return response


async def _perform_tap(request: web.Request, tap: _Tap) -> tuple[BaseModel, int]:
    """Use the link once and make the same request to the case machine as its route."""
    store, actions = request.app[STORE_KEY], request.app[ACTIONS_KEY]
    now = request.app[CLOCK_KEY]()
    if not await store.use_link(tap.grant.link_id, tap.grant.expires_at, now=now):
        raise UsedLinkError("this link was used already: open the app to see where things stand")
    owner_id, case_id, language = tap.owner.owner_id, tap.case.case_id, tap.owner.language
    _LOG.info("case %s: one-tap link %s used", case_id, tap.name)
    if tap.name in ("accept_fix", "decline_fix", "decline_visit"):
        answer = {
            "accept_fix": actions.accept_fix,
            "decline_fix": actions.decline_fix,
            "decline_visit": actions.decline_visit,
        }[tap.name]
        case = await answer(owner_id, case_id)
        return _case_view(case, await _label(store, case.device_id), language), 200
    if tap.name == "choose_slot":
        assert tap.number is not None
        booked = await actions.choose_slot(owner_id, case_id, tap.number)
        return await _appointment_view(store, booked), 201
    if tap.name == "other_times":
        return await _offer_view(store, await actions.request_other_slots(owner_id, case_id)), 200
    stars = tap.number if tap.name == "rate" else _TAP_STARS[tap.name]
    assert stars is not None
    rating = await actions.rate(
        owner_id, case_id, stars, None, nothing_wrong=tap.name == "nothing_wrong"
    )
    return _rating_view(rating), 201


async def _post_tap(request: web.Request) -> web.Response:
    try:
        tap = await _checked_tap(request)
        view, status = await _perform_tap(request, tap)
    except Exception as exc:
        page = _error_page(exc) if _wants_html(request) else None
        if page is None:
            raise
        return page
    if _wants_html(request):
        text = "We have your answer. The app shows what happens next."
        return _page(status, "Thank you", text)
    response = json_response(view, status)
    response.headers.update(_PAGE_HEADERS)
    return response


async def _get_openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


# -- the route table ------------------------------------------------------------------------

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ID = "{id}"


def _p(path: str) -> str:
    return f"{API_PREFIX}{path}"


_VISIT_TIME: Final[dict[str, Any]] = {"type": "string", "format": "date-time"}
_TAP_ACTION_PATTERN: Final = (
    "^("
    + "|".join(sorted(name for name in TAP_ACTIONS if name not in _NUMBERED))
    + "|choose_slot:[0-9]{1,2}|rate:[1-5])$"
)
_TAP_QUERY: Final = (
    QueryParam(
        "action",
        "the action (`accept_fix`, `decline_fix`, `choose_slot:N`, `other_times`, "
        "`decline_visit`, `rate_good`, `rate_bad`, `nothing_wrong`, `rate:N`)",
        {"type": "string", "maxLength": 32, "pattern": _TAP_ACTION_PATTERN},
        required=True,
    ),
    QueryParam(
        "token",
        "the link's signed token: `{expires}.{nonce}.{mac}`",
        {"type": "string", "maxLength": 128},
        required=True,
    ),
)

_ROUTES: Final[tuple[tuple[Operation, _Handler], ...]] = (
    (
        Operation(
            "GET",
            "/openapi.json",
            "getOpenApi",
            "This document",
            "meta",
            None,
            replies=(Reply(200, "The OpenAPI 3.1 document.", schema={"type": "object"}),),
        ),
        _get_openapi,
    ),
    (
        Operation(
            "GET",
            _p("/me"),
            "getProfile",
            "The owner's profile",
            "owner",
            "owner",
            replies=(Reply(200, "The profile.", ProfileView),),
        ),
        _get_me,
    ),
    (
        Operation(
            "PATCH",
            _p("/me"),
            "updateProfile",
            "Change language, time zone, consent, quiet hours or channel order",
            "owner",
            "owner",
            body=ProfilePatch,
            replies=(Reply(200, "The changed profile.", ProfileView),),
        ),
        _patch_me,
    ),
    (
        Operation(
            "DELETE",
            _p("/me"),
            "eraseOwner",
            "Erase the owner's data",
            "owner",
            "owner",
            body=EraseRequest,
            replies=(Reply(200, "Erased; the token no longer works.", ErasedView),),
            description=(
                "Contacts, push channels, tokens, notifications and devices go; cases and "
                "ratings stay for the fleet's statistics without the owner's id or comments."
            ),
        ),
        _delete_me,
    ),
    (
        Operation(
            "GET",
            _p("/me/export"),
            "exportOwner",
            "Everything kept about the owner, as a JSON file",
            "owner",
            "owner",
            replies=(
                Reply(
                    200,
                    "The owner's data.",
                    schema={"type": "object"},
                    headers=(("Content-Disposition", "attachment; filename=..."),),
                ),
            ),
        ),
        _export_me,
    ),
    (
        Operation(
            "GET",
            _p("/me/export/device-data"),
            "exportDeviceData",
            "Everything the owner's devices sent and what was made of it, as JSON lines",
            "owner",
            "owner",
            replies=(
                Reply(
                    200,
                    "One JSON object a line: a point of telemetry, a device event or a "
                    "health score (`measurement`, `device`, `time` and the point's values), "
                    "device by device, oldest first; streamed.",
                    schema={"type": "string"},
                    media_type="application/x-ndjson",
                    headers=(("Content-Disposition", "attachment; filename=..."),),
                ),
            ),
        ),
        _export_telemetry,
    ),
    (
        Operation(
            "GET",
            _p("/me/channels"),
            "listChannels",
            "The owner's push channels",
            "owner",
            "owner",
            replies=(Reply(200, "The channels, active and retired, targets masked.", ChannelList),),
        ),
        _list_channels,
    ),
    (
        Operation(
            "POST",
            _p("/me/channels"),
            "addChannel",
            "Register a push channel (FCM, Web Push, ntfy or a webhook)",
            "owner",
            "owner",
            body=ChannelRequest,
            replies=(
                Reply(201, "Registered; the target masked, secrets not shown.", ChannelView),
                Reply(
                    200,
                    "The same channel was registered before: its keys refreshed, its state "
                    "kept (a retired one stays retired until re-verified).",
                    ChannelView,
                ),
            ),
            description=(
                "An owner keeps at most 20 channels, retired ones included (422 past that: "
                "remove one first)."
            ),
        ),
        _add_channel,
    ),
    (
        Operation(
            "POST",
            _p(f"/me/channels/{_ID}/verify"),
            "verifyChannel",
            "Re-verify a push channel with a test message",
            "owner",
            "owner",
            replies=(
                Reply(200, "The test message was taken: the channel is active.", ChannelView),
                Reply(409, "The test message was not taken: the channel is unchanged.", ErrorView),
                Reply(
                    503,
                    "Push delivery is not running here, or a store is briefly unavailable.",
                    ErrorView,
                ),
            ),
            description=(
                "Sends a test message over this channel only. If its push service takes "
                "it, the channel is active again with no failures counted; otherwise it "
                "stays as it was. This is the only way a retired channel comes back."
            ),
        ),
        _verify_channel,
    ),
    (
        Operation(
            "DELETE",
            _p(f"/me/channels/{_ID}"),
            "deleteChannel",
            "Remove a push channel",
            "owner",
            "owner",
            replies=(Reply(204, "Removed."),),
        ),
        _delete_channel,
    ),
    (
        Operation(
            "GET",
            _p("/devices"),
            "listDevices",
            "The owner's devices and how they are doing",
            "owner",
            "owner",
            replies=(Reply(200, "The devices.", DeviceList),),
        ),
        _list_devices,
    ),
    (
        Operation(
            "GET",
            _p(f"/devices/{_ID}"),
            "getDevice",
            "One device and how it is doing",
            "owner",
            "owner",
            replies=(Reply(200, "The device.", DeviceView),),
        ),
        _get_device,
    ),
    (
        Operation(
            "GET",
            _p("/cases"),
            "listCases",
            "The owner's cases, newest first",
            "owner",
            "owner",
            query=(
                QueryParam(
                    "state",
                    "only open or only closed cases",
                    {"type": "string", "enum": ["open", "closed"]},
                ),
            ),
            replies=(Reply(200, "The cases.", CaseList),),
        ),
        _list_cases,
    ),
    (
        Operation(
            "GET",
            _p(f"/cases/{_ID}"),
            "getCase",
            "One case with its history in plain words",
            "owner",
            "owner",
            replies=(Reply(200, "The case.", CaseDetailView),),
        ),
        _get_case,
    ),
    (
        Operation(
            "POST",
            _p(f"/cases/{_ID}/fix"),
            "answerFix",
            "Agree to (or decline) the remote fix the case waits for",
            "owner",
            "owner",
            body=FixChoice,
            replies=(Reply(200, "The case after the answer.", CaseView),),
        ),
        _post_fix,
    ),
    (
        Operation(
            "GET",
            _p(f"/cases/{_ID}/slots"),
            "listSlots",
            "The visit times on offer",
            "owner",
            "owner",
            replies=(Reply(200, "The offer (empty when nothing is on offer).", OfferView),),
        ),
        _get_slots,
    ),
    (
        Operation(
            "POST",
            _p(f"/cases/{_ID}/appointment"),
            "answerAppointment",
            "Choose a visit time, ask for other times, or decline the visit",
            "owner",
            "owner",
            body=AppointmentChoice,
            replies=(
                Reply(201, "Booked (for `slot`).", AppointmentView),
                Reply(
                    200,
                    "The new offer (`other_times`) or the case (`decline`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/OfferView"},
                            {"$ref": "#/components/schemas/CaseView"},
                        ]
                    },
                ),
                Reply(
                    409,
                    "Nothing is on offer or booked; the booked visit has started, is past or "
                    "was completed; no other time is free; or the visit was moved too often "
                    "(a person takes over). The message says which.",
                    ErrorView,
                ),
            ),
            description=(
                "Before a visit is booked: choose one of the offered times, ask for others, "
                "or decline. After booking and until the visit starts: `other_times` moves "
                "it (its time is freed for others at once and new times are offered; after "
                "a few moves a person calls the owner instead) and `decline` cancels it."
            ),
        ),
        _post_appointment,
    ),
    (
        Operation(
            "POST",
            _p(f"/cases/{_ID}/rating"),
            "rateCase",
            "Rate how a resolved case went",
            "owner",
            "owner",
            body=RatingRequest,
            replies=(Reply(201, "The stored rating.", RatingView),),
        ),
        _post_rating,
    ),
    (
        Operation(
            "GET",
            _p(f"/cases/{_ID}/tap"),
            "describeActionLink",
            "What a one-tap action link from a push message will do",
            "links",
            None,
            query=_TAP_QUERY,
            replies=(
                Reply(200, "What the link does (a browser: a page to confirm).", ActionLinkView),
                Reply(403, "The link is not valid (changed, or for another case).", ErrorView),
                Reply(410, "The link has expired.", ErrorView),
            ),
            description=(
                "The link is its own credential: no token is needed. Nothing changes here; "
                "a browser (``Accept: text/html``) gets a small page whose button posts the "
                "link."
            ),
        ),
        _get_tap,
    ),
    (
        Operation(
            "POST",
            _p(f"/cases/{_ID}/tap"),
            "useActionLink",
            "Do what a one-tap action link from a push message says, once",
            "links",
            None,
            query=_TAP_QUERY,
            replies=(
                Reply(
                    200,
                    "Answered: the case (`accept_fix`, `decline_fix`, `decline_visit`) or the "
                    "new offer (`other_times`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/CaseView"},
                            {"$ref": "#/components/schemas/OfferView"},
                        ]
                    },
                ),
                Reply(
                    201,
                    "Booked (`choose_slot:N`) or rated (`rate_good`, `rate_bad`, "
                    "`nothing_wrong`, `rate:N`).",
                    None,
                    schema={
                        "oneOf": [
                            {"$ref": "#/components/schemas/AppointmentView"},
                            {"$ref": "#/components/schemas/RatingView"},
                        ]
                    },
                ),
                Reply(403, "The link is not valid (changed, or for another case).", ErrorView),
                Reply(
                    409,
                    "The link was used already, or the case has moved on (for "
                    "`other_times`: the booked visit has started, is past or was completed, "
                    "or was moved too often; the message says which).",
                    ErrorView,
                ),
                Reply(410, "The link has expired.", ErrorView),
                Reply(422, "The action cannot be carried out (no such slot).", ErrorView),
            ),
            description=(
                "The same request to the case machine as the matching owner route "
                "(`answerFix`, `answerAppointment`, `rateCase`), authorised by the link's "
                "signed token instead of a bearer token: it allows that one action on that "
                "one case, once, until it expires. A browser (``Accept: text/html``) gets "
                "a page instead of JSON."
            ),
        ),
        _post_tap,
    ),
    (
        Operation(
            "GET",
            _p("/technician/visits"),
            "listVisits",
            "The technician's visits",
            "technician",
            "technician",
            query=(
                QueryParam("from", "earliest start (default: a week ago)", _VISIT_TIME),
                QueryParam("to", "latest start (default: 30 days after from)", _VISIT_TIME),
            ),
            replies=(
                Reply(200, "The visits, by start.", VisitList),
                Reply(
                    422,
                    "`to` is not after `from`, or more than 62 days after it.",
                    ErrorView,
                ),
            ),
        ),
        _list_visits,
    ),
    (
        Operation(
            "POST",
            _p(f"/technician/visits/{_ID}/complete"),
            "completeVisit",
            "Mark a visit done",
            "technician",
            "technician",
            body=CompleteVisitRequest,
            replies=(Reply(200, "The visit.", VisitView),),
        ),
        _complete_visit,
    ),
)


# -- the app --------------------------------------------------------------------------------


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _from_http(exc: web.HTTPException) -> web.Response:
    code, words = _HTTP_WORDS.get(exc.status, ("http_error", exc.reason.lower()))
    response = error_response(exc.status, code, words)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def _edge(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Request id, JSON errors and the last line of defence."""
    request_id = _request_id(request)
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field)
        if exc.status == 401:
            error = "invalid_token" if exc.code == "invalid_token" else None
            response.headers["WWW-Authenticate"] = f'Bearer error="{error}"' if error else "Bearer"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _from_http(exc)
    except (NotFoundError, ForbiddenError, ConflictError, InvalidRequestError) as exc:
        status, code = error_status(exc) or (500, "internal_error")
        response = error_response(status, code, str(exc) or code.replace("_", " "))
    except IllegalTransitionError as exc:
        response = error_response(409, "illegal_transition", str(exc) or "the case has moved on")
    except TransientError:
        _LOG.warning(
            "request %s %s %s: a store or service is briefly unavailable",
            request_id,
            request.method,
            request.path,
            exc_info=True,
        )
        response = error_response(
            503, "unavailable", "please try again in a moment", **{"Retry-After": "5"}
        )
    except Exception:
        # the last line of defence: a bug answers 500, is logged, and the app goes on
        _LOG.exception("request %s %s %s failed", request_id, request.method, request.path)
        response = error_response(500, "internal_error", "something went wrong on our side")
    if response.prepared:  # a streamed answer set its headers before it began
        return response
    response.headers[REQUEST_ID_HEADER] = request_id
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith(API_PREFIX):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _server_url(action_base_url: str | None) -> str | None:
    if action_base_url is None:
        return None
    return action_base_url.rstrip("/").removesuffix(API_PREFIX) or None


def create_api(
    *,
    store: CaseStore,
    actions: CaseActions,
    health: HealthReader,
    clock: Callable[[], datetime] = _utc_now,
    action_base_url: str | None = None,
    links: ActionLinks | None = None,
    webhook_allow_private: bool = False,
    device_data: DeviceData | None = None,
    erase_mode: EraseMode = "delete",
    verifier: ChannelVerifier | None = None,
    oidc: OidcOwners | None = None,
    onboarding: Onboarding | None = None,
) -> web.Application:
    """Build the owner REST API.

    Args:
        store: the case store.
        actions: the case machine the owners' and technicians' requests go to.
        health: where device health is read from.
        clock: the wall clock (UTC-aware).
        action_base_url: the public URL the API is reached at
            (``https://fixloop.example.org``, with or without ``/api/v1``), named as
            the server of the OpenAPI document.
        links: checks the one-tap action links of push messages (``None``: links are
            refused with 403).
        webhook_allow_private: accept webhooks to internal addresses and over plain
            http (local installs and tests only).
        device_data: where the owners' devices' points are kept, exported with the
            owner's data and erased with it (``None``: the API touches no telemetry).
        erase_mode: what an erasure does to those points: ``delete`` them, or ``rekey``
            them to anonymous device ids first (history kept, linked to no one).
        verifier: sends the test message that re-verifies a push channel (``None``:
            re-verification answers 503).
        oidc: takes owners' access tokens of the manufacturer's identity provider
            (``None``: only the store's tokens).
        onboarding: the device registry's routes: ``/api/v1/admin/…`` for the ops role,
            owners' claims and releases, invites (:mod:`notifier.admin`; ``None``: none).

    Returns:
        The app: routes under ``/api/v1`` and ``GET /openapi.json``.
    """
    app = web.Application(middlewares=[_edge], client_max_size=MAX_BODY_BYTES)
    app[STORE_KEY] = store
    app[ACTIONS_KEY] = actions
    app[HEALTH_KEY] = health
    app[CLOCK_KEY] = clock
    app[ACTION_BASE_URL_KEY] = action_base_url
    app[LINKS_KEY] = links
    app[WEBHOOK_INTERNAL_KEY] = webhook_allow_private
    app[CHANNEL_VERIFIER_KEY] = verifier
    app[DEVICE_DATA_KEY] = device_data
    app[ERASE_MODE_KEY] = erase_mode
    app[OIDC_KEY] = oidc
    routes = _ROUTES
    if onboarding is not None:
        from notifier.admin import install_onboarding  # it builds on this module's edge

        routes = (*_ROUTES, *install_onboarding(app, onboarding))
    for operation, handler in routes:
        app.router.add_route(operation.method, operation.path, handler, name=operation.operation_id)
    app[OPENAPI_KEY] = build_document(
        [operation for operation, _ in routes],
        title="fixloop owner API",
        version="1",
        description=(
            "What device owners and technicians ask of fixloop: devices and how they are "
            "doing, cases and their history, remote-fix consent, visit times, ratings, "
            "push channels, data export and erasure."
        ),
        error_model=ErrorView,
        server_url=_server_url(action_base_url),
        request_id_header=REQUEST_ID_HEADER,
    )
    return app
