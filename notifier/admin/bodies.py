"""What the registry's routes take in: their request bodies (notifier; ops and owners' apps).

Part of :mod:`notifier.admin`. Strict pydantic models that refuse unknown fields
(:class:`notifier.edge.Body`); a violation is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import Field, field_validator

from notifier.edge import Body, whole
from notifier.model import ConsentPolicy

__all__ = [
    "ISSUER_PATTERN",
    "MAX_IMPORT_ROWS",
    "MODEL_PATTERN",
    "SUBJECT_PATTERN",
    "ClaimRequest",
    "DeviceRequest",
    "ImportRequest",
    "InviteAcceptRequest",
    "OwnerInviteRequest",
    "ProductLineRequest",
    "ReleaseRequest",
    "SubjectRequest",
    "TechnicianRequest",
    "TokenRequest",
    "WorkingHours",
]

#: The most rows one import request takes (larger files: the command, or several requests).
MAX_IMPORT_ROWS: Final = 1_000
MODEL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,39}$"
_NAME_PATTERN: Final = r"^[^\x00-\x1f\x7f]{1,80}$"
_REGION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_TIMEZONE_PATTERN: Final = r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"
_LANGUAGE_PATTERN: Final = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$"
_PRINCIPAL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"
_SKILL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,39}$"
# OpenID Connect Core 1.0, 2: ``sub`` is at most 255 ASCII characters; the token check
# takes any up to 255, so only control characters are refused here
SUBJECT_PATTERN: Final = r"^[^\x00-\x1f\x7f]{1,255}$"
ISSUER_PATTERN: Final = r"^https?://[^\x00-\x20\x7f]{1,2040}$"


class ProductLineRequest(Body):
    """A product line to register.

    Attributes:
        model: the product model: the name of its product file (``washer``).
        name: its name for people (at most 80 characters; default: the model).
    """

    model: Annotated[str, Field(pattern=MODEL_PATTERN)]
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

    model: Annotated[str, Field(pattern=MODEL_PATTERN)]
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

    subject: Annotated[str, Field(pattern=SUBJECT_PATTERN)]
    issuer: Annotated[str, Field(pattern=ISSUER_PATTERN)] | None = None


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
