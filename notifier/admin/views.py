"""What the registry's routes answer: their response bodies (notifier; -> ops and owners).

Part of :mod:`notifier.admin`. Frozen pydantic models (:class:`notifier.edge.View`),
also the OpenAPI document's schemas. Tokens, invites and claim codes appear only in the
answer that made them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from notifier.edge import View
from notifier.registry import DeviceState
from notifier.store import PrincipalKind

__all__ = [
    "ImportReport",
    "InviteView",
    "ProductLineList",
    "ProductLineView",
    "RegistryDeviceList",
    "RegistryDeviceView",
    "ReleasedView",
    "RowError",
    "RowReport",
    "SubjectList",
    "SubjectView",
    "TechnicianView",
    "TokenView",
]


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
