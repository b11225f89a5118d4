"""What the owner REST API takes in: its request bodies (notifier; owners' apps -> here).

Strict pydantic models that refuse unknown fields (:class:`notifier.edge.Body`); the
handlers read them with :func:`notifier.edge.read_body`, so a violation is a 400 naming
the field. Checks a schema cannot say (a Web Push key on the curve, a webhook's address)
are made where the body is used.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import time
from typing import Annotated, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import (
    ConfigDict,
    Field,
    RootModel,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from notifier.edge import Body, whole
from notifier.model import ChannelKind, ConsentPolicy

__all__ = [
    "CHANNEL_KINDS",
    "AppointmentChoice",
    "ChannelRequest",
    "CompleteVisitRequest",
    "EraseRequest",
    "FcmChannel",
    "FixChoice",
    "NtfyChannel",
    "NtfyKeys",
    "ProfilePatch",
    "QuietHours",
    "RatingRequest",
    "WebPushChannel",
    "WebPushKeys",
    "WebhookChannel",
    "WebhookKeys",
]

#: The push channel kinds an owner may register.
CHANNEL_KINDS: Final = ("fcm", "webpush", "ntfy", "webhook")
_LANGUAGE: Final = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"

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
            Field(max_length=len(CHANNEL_KINDS), json_schema_extra={"uniqueItems": True}),
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
