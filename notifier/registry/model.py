"""The device registry's records and roles (notifier).

The records the registry keeps and answers with (product lines, devices to register and
registered, what a registration, claim or release did, a token just issued), and the two
roles: :class:`DeviceRegistry`, what the admin API, the owner's claim and the commands
need of a registry (SQLite: :class:`notifier.registry.SqliteRegistry`, PostgreSQL:
:class:`notifier.postgres.PostgresRegistry`), and :class:`BrokerAccounts`, where devices'
broker logins are issued and revoked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from notifier.model import DeviceRecord
from notifier.store import PrincipalKind

DeviceState = Literal["unclaimed", "claimed", "retired"]


@dataclass(frozen=True, slots=True)
class ProductLine:
    """A product line the registry takes devices of.

    Attributes:
        model: the product model (the name of its product file).
        name: its name for people (``Aquaclean 7``).
        created_at: when it was registered.
        devices: devices registered of it (retired ones too).
    """

    model: str
    name: str
    created_at: datetime
    devices: int = 0


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device to register.

    Attributes:
        device_id: its id on the wire (MQTT user and topics).
        model: its product line.
        serial: its serial number (unique within the product line).
        region: its service region.
        firmware: the firmware it left the factory with, if known.
        batch: its production batch, if known.
        claim_code: its claim code (``None``: one is made).
    """

    device_id: str
    model: str
    serial: str
    region: str = "default"
    firmware: str | None = None
    batch: str | None = None
    claim_code: str | None = None


@dataclass(frozen=True, slots=True)
class RegisteredDevice:
    """A device in the registry.

    Attributes:
        device_id: its id.
        model: its product line.
        serial: its serial number.
        region: its service region.
        firmware: its firmware, if known.
        batch: its production batch, if known.
        registered_at: when it was registered.
        retired_at: when it was retired (``None``: in service).
        owner_id: who owns it now (``None``: no one).
        claimable: whether it has a claim code that works now.
    """

    device_id: str
    model: str
    serial: str
    region: str
    firmware: str | None
    batch: str | None
    registered_at: datetime
    retired_at: datetime | None = None
    owner_id: str | None = None
    claimable: bool = False

    @property
    def state(self) -> DeviceState:
        """``retired``, ``claimed`` (it has an owner) or ``unclaimed``."""
        if self.retired_at is not None:
            return "retired"
        return "claimed" if self.owner_id is not None else "unclaimed"


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of one device of a bulk registration.

    Attributes:
        index: its position in the request (0 first).
        device_id: its id.
        claim_code: the claim code to print on its label (only for one made here or
            given; ``None`` when the row failed).
        errors: what is wrong, as ``(column, words)``; empty: registered.
    """

    index: int
    device_id: str
    claim_code: str | None = None
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the device was registered."""
        return not self.errors


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """A device bound to its new owner.

    Attributes:
        device: the registry entry (now with its owner).
        record: the case store's device entry the owner loop reads.
    """

    device: RegisteredDevice
    record: DeviceRecord


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    """What a release did.

    Attributes:
        device_id: the device, now without an owner.
        cases_kept: the seller's cases of it, kept under an anonymous device id.
        cases_closed: of those, the open ones that ended ``dismissed``.
        visits_cancelled: visits not yet started that were cancelled.
        anonymous_id: the id the seller's cases now name.
    """

    device_id: str
    cases_kept: int
    cases_closed: int
    visits_cancelled: int
    anonymous_id: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An API token just issued (the token itself is never kept).

    Attributes:
        token: the bearer token (shown once).
        token_id: its id, to revoke it.
        kind: who it is for (``owner``, ``technician``, ``ops``).
        principal_id: their id.
    """

    token: str
    token_id: str
    kind: PrincipalKind
    principal_id: str


@dataclass(frozen=True, slots=True)
class CheckedDevice:
    """A registration row after its own checks (errors empty: ready to insert)."""

    index: int
    device: NewDevice
    errors: list[tuple[str, str]] = field(default_factory=list)


# -- roles --------------------------------------------------------------------------------------


class BrokerAccounts(Protocol):
    """Where devices' MQTT credentials are issued and revoked (a role).

    The seam to the broker: an implementation issues a device's login when it is
    registered and revokes it when it is retired (revoking disconnects it), without a
    broker restart (Mosquitto's dynamic-security plugin, for one). Without one,
    devices log in with the password derived from the fleet secret
    (:func:`wire.protocol.credentials.device_password`) and the broker's password
    file is written when the stack starts.
    """

    async def issue(self, device_ids: Sequence[str]) -> None:
        """Make sure the devices have an enabled broker login (few round trips)."""

    async def revoke(self, device_id: str) -> None:
        """Remove the device's broker login and disconnect it if connected."""


class DeviceRegistry(Protocol):
    """What the admin API, the owner's claim and the commands need of the registry."""

    async def put_product_line(self, line: ProductLine) -> ProductLine:
        """Register a product line (its name is updated if it exists)."""

    async def product_lines(self) -> list[ProductLine]:
        """Return the product lines, by model, with their device counts."""

    async def register(
        self, devices: Sequence[NewDevice], *, key: bytes, now: datetime, actor: str
    ) -> list[RowOutcome]:
        """Register devices; each row on its own, the others go on."""

    async def get(self, device_id: str) -> RegisteredDevice | None:
        """Return a registered device."""

    async def note_firmware(self, device_id: str, firmware: str) -> bool:
        """Keep the firmware a device's boot event names; whether anything changed."""

    async def list(
        self,
        *,
        model: str | None = None,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[RegisteredDevice]:
        """Return registered devices by id, after ``after``."""

    async def retire(self, device_id: str, *, now: datetime, actor: str) -> RegisteredDevice:
        """Take a device out of service: its claim code stops working."""

    async def claim(
        self, owner_id: str, code: str, *, key: bytes, label: str | None, now: datetime
    ) -> ClaimOutcome:
        """Bind the device whose claim code this is to the owner."""

    async def release(self, owner_id: str, device_id: str, *, now: datetime) -> ReleaseOutcome:
        """Unbind an owner's device, leaving nothing of theirs reachable from it."""

    async def add_invite(self, invite: str, owner_id: str, expires_at: datetime) -> None:
        """Keep an invite code (its digest) for an owner until it expires."""

    async def use_invite(self, invite: str, *, now: datetime) -> str:
        """Use an invite once; return its owner's id."""

    async def revoke_token(self, token_id: str) -> tuple[PrincipalKind, str]:
        """Revoke the token with this id; return whom it stood for."""

    async def revoke_tokens_of(self, kind: PrincipalKind, principal_id: str) -> int:
        """Revoke every token of a principal; return how many."""
