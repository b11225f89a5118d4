"""The case store interface (notifier; read by the dashboard).

Cases, appointments, ratings, owners, the device registry, push channels, notifications,
tasks for people and the audit trail live behind :class:`CaseStore`. The default
implementation is SQLite in WAL mode (:class:`notifier.sqlite.SqliteStore`);
:class:`notifier.postgres.PostgresStore` keeps the same in PostgreSQL for a large fleet
(:func:`notifier.stores.case_store` opens the configured one). Both build their tables
from one schema description (:mod:`notifier.schema`) and pass the same tests.

Every method is a coroutine: an implementation does its blocking I/O off the event loop.
Writes that must not race (booking a slot, moving a case) are atomic in the store:
:meth:`CaseStore.update_case` is a compare-and-set on the case state, and
:meth:`CaseStore.book` refuses an overlapping visit of the same technician, and
:meth:`CaseStore.release` frees a booked visit's time only while it has not started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

from notifier.model import (
    Appointment,
    AuditEntry,
    Case,
    DeviceRecord,
    Notification,
    Owner,
    PushChannel,
    Rating,
    Task,
    Technician,
)

if TYPE_CHECKING:  # the registry module imports this one
    from notifier.registry import DeviceRegistry

__all__ = [
    "PRINCIPAL_KINDS",
    "CaseStore",
    "CaseTimer",
    "NewMessage",
    "Principal",
    "PrincipalKind",
    "TimerKind",
]

PrincipalKind = Literal["owner", "technician", "ops"]
#: every :data:`PrincipalKind`, to check a kind read from outside
PRINCIPAL_KINDS: Final[frozenset[str]] = frozenset(get_args(PrincipalKind))
#: Who an API token stands for: ``(kind, id)``.
Principal = tuple[PrincipalKind, str]


#: What a case's timer does when due: send its command again, or check the fix.
TimerKind = Literal["retry", "verify"]


@dataclass(frozen=True, slots=True)
class CaseTimer:
    """A case's timer: one per case, a row in the store (notifiers share them).

    Attributes:
        case_id: the case.
        what: what to do when it is due.
        due: when it is due (as stored: a timer being handled is pushed forward).
    """

    case_id: str
    what: TimerKind
    due: datetime


@dataclass(frozen=True, slots=True)
class NewMessage:
    """An owner message to keep once (:meth:`CaseStore.add_message`).

    Attributes:
        notification: the message, ``queued`` or ``held``.
        key: its idempotency key (unique in the store).
        holder: who claims it for delivery, if it is kept ``queued``.
        claim_until: until when.
        max_per_day: the owner's daily limit (``None``: not counted, an urgent one).
        since: the start of the day counted.
    """

    notification: Notification
    key: str
    holder: str
    claim_until: datetime
    max_per_day: int | None = None
    since: datetime | None = None


class CaseStore(Protocol):
    """What the owner loop, the owner API and the dashboard need to keep.

    Lookups return ``None`` (or an empty list) for what does not exist; writes of a
    record whose id exists replace it (``put_*``) unless said otherwise.
    """

    async def close(self) -> None:
        """Release the store."""

    # -- owners, tokens, devices, channels -----------------------------------------
    async def put_owner(self, owner: Owner) -> None:
        """Insert or replace an owner."""

    async def get_owner(self, owner_id: str) -> Owner | None:
        """Return an owner."""

    async def add_token(self, token: str, principal: Principal) -> None:
        """Remember an API token (only its hash is kept) for a principal."""

    async def resolve_token(self, token: str) -> Principal | None:
        """Return who a token stands for, or ``None`` for an unknown token."""

    async def owner_of_subject(self, issuer: str, subject: str) -> str | None:
        """Return the owner an identity provider's subject (``iss``, ``sub``) stands for."""

    async def link_subject(self, issuer: str, subject: str, owner_id: str) -> None:
        """Link a provider's subject to an existing owner (it may have several)."""

    async def adopt_subject(self, issuer: str, subject: str, owner: Owner) -> str:
        """Return the subject's owner id, storing ``owner`` for it first if it has none."""

    async def subjects_of(self, owner_id: str) -> list[tuple[str, str]]:
        """Return the provider subjects (``iss``, ``sub``) linked to an owner, sorted."""

    async def unlink_subject(self, issuer: str, subject: str, owner_id: str) -> bool:
        """Unlink a provider's subject from an owner; ``False`` if it was not theirs."""

    def registry(self) -> DeviceRegistry:
        """The device registry kept beside the cases (:mod:`notifier.registry`)."""

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device registry entry."""

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return a device's registry entry."""

    async def devices(self, owner_id: str | None = None) -> list[DeviceRecord]:
        """Return the devices of one owner, or all."""

    async def put_channel(self, channel: PushChannel) -> None:
        """Insert or replace a push channel."""

    async def channels(self, owner_id: str, *, active_only: bool = True) -> list[PushChannel]:
        """Return an owner's push channels, oldest first."""

    async def update_channel_state(self, channel_id: str, *, active: bool, failures: int) -> bool:
        """Change a stored channel's delivery state (whether it is used, failures in a row).

        Nothing else of the channel changes, and a channel removed meanwhile is not made
        again.

        Returns:
            Whether the channel exists.
        """

    async def delete_channel(self, owner_id: str, channel_id: str) -> bool:
        """Remove one of an owner's push channels for good (target and secrets too).

        Notifications keep the id of the channel that delivered them; the audit trail's
        evidence never quotes a target or key.

        Returns:
            Whether the owner had that channel.
        """

    async def use_link(self, link_id: str, expires_at: datetime, *, now: datetime) -> bool:
        """Record that a one-tap action link was used; each works once.

        Args:
            link_id: the link's id (a hash of its token).
            expires_at: when the link expires (the record may be forgotten after).
            now: the current time: records of links that expired before it may go.

        Returns:
            ``True`` the first time, ``False`` if the link was used before.
        """

    # -- cases and the audit trail --------------------------------------------------
    async def add_case(self, case: Case) -> None:
        """Insert a new case.

        Raises:
            ConflictError: a case with that id exists, or an open case for the same
                device and fault exists (one open case per device and fault).
        """

    async def get_case(self, case_id: str) -> Case | None:
        """Return a case."""

    async def open_case(self, device_id: str, fault: str) -> Case | None:
        """Return the open case of a device and fault, if any."""

    async def update_case(
        self,
        case: Case,
        *,
        expected_state: str,
        audit: AuditEntry | Sequence[AuditEntry] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> list[Notification | None]:
        """Replace a case if its stored state is still ``expected_state``.

        ``audit`` (one entry or several) is appended and ``messages`` are kept as by
        :meth:`add_message`, in the same transaction: a case's step, its lines in the
        trail and what it tells the owner are kept, or lost, together.

        Returns:
            Each message as kept (``None``: its key was kept before, or no owner).

        Raises:
            ConflictError: the stored case moved on (or does not exist).
        """

    async def cases(
        self,
        *,
        owner_id: str | None = None,
        device_id: str | None = None,
        states: Sequence[str] | None = None,
        limit: int = 1000,
    ) -> list[Case]:
        """Return cases, newest first, filtered by owner, device and states."""

    async def add_audit(self, entry: AuditEntry) -> None:
        """Append to the audit trail (never changed or removed, except by erasure)."""

    async def audit(self, case_id: str) -> list[AuditEntry]:
        """Return a case's audit trail, oldest first."""

    # -- notifiers side by side: leases and timers ----------------------------------
    async def take_lease(self, key: str, holder: str, *, now: datetime, until: datetime) -> bool:
        """Take (or extend) the lease on ``key`` for ``holder`` until ``until``.

        Returns:
            ``True`` if ``holder`` holds it now: it was free, expired before ``now``, or
            ``holder``'s already; ``False`` while another holder's lease runs.
        """

    async def drop_lease(self, key: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``key``.

        Returns:
            Whether ``holder`` still held it (``False``: it ran out and was taken, or
            it ran out and is free).
        """

    async def set_timer(self, timer: CaseTimer, *, replace: bool = True) -> None:
        """Set a case's timer (``replace=False``: only if the case has none)."""

    async def get_timer(self, case_id: str) -> CaseTimer | None:
        """Return a case's timer."""

    async def take_timers(
        self, *, now: datetime, hold_until: datetime, limit: int
    ) -> list[CaseTimer]:
        """Take up to ``limit`` timers due at ``now``, earliest first.

        Each is pushed forward to ``hold_until`` as it is taken, so another caller does
        not take it meanwhile (PostgreSQL skips rows another transaction holds), and a
        caller that dies leaves it to fire again then. The timers come back as stored.
        """

    async def finish_timer(self, timer: CaseTimer) -> bool:
        """Remove a taken timer unless it was set again since (its ``due`` changed).

        Returns:
            Whether it was removed.
        """

    async def postpone_timer(self, timer: CaseTimer, due: datetime) -> bool:
        """Move a taken timer to ``due`` unless it was set again since (its ``due`` changed).

        A timer set meanwhile (the case's next step, here or by another instance) is
        newer than the one taken and stays.

        Returns:
            Whether it was moved.
        """

    # -- technicians and appointments ----------------------------------------------
    async def put_technician(self, technician: Technician) -> None:
        """Insert or replace a technician."""

    async def get_technician(self, technician_id: str) -> Technician | None:
        """Return a technician."""

    async def technicians(self, region: str | None = None) -> list[Technician]:
        """Return the technicians (of one region)."""

    async def put_appointment(self, appointment: Appointment) -> None:
        """Insert or replace an appointment that is not ``booked`` (use :meth:`book`)."""

    async def book(self, appointment: Appointment) -> None:
        """Store an appointment as ``booked``, atomically refusing a double booking.

        Raises:
            ConflictError: the technician has another booked visit overlapping it.
        """

    async def release(self, appointment_id: str, *, now: datetime) -> Appointment:
        """Cancel a booked visit that has not started, freeing the technician's time.

        Atomic like :meth:`book`: the visit is cancelled only if it is still booked and
        starts after ``now``, and a booking made afterwards may take its time at once.

        Args:
            appointment_id: the booked visit.
            now: the current time (UTC); a visit starting at or before it is too late.

        Returns:
            The visit as it is now stored (``cancelled``).

        Raises:
            NotFoundError: no such appointment.
            ConflictError: it is not booked (done, cancelled, only proposed), or it has
                started already.
        """

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        """Return an appointment."""

    async def appointments(
        self,
        *,
        technician_id: str | None = None,
        case_id: str | None = None,
        states: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Appointment]:
        """Return appointments by start time (``since``/``until`` bound the start)."""

    # -- ratings, notifications, tasks ---------------------------------------------
    async def add_rating(self, rating: Rating) -> None:
        """Store the rating of a case.

        Raises:
            ConflictError: the case is rated already (one rating per case).
        """

    async def get_rating(self, case_id: str) -> Rating | None:
        """Return a case's rating."""

    async def ratings(self, since: datetime | None = None) -> list[Rating]:
        """Return ratings, oldest first."""

    async def add_notification(self, notification: Notification) -> None:
        """Insert or replace a notification."""

    async def notifications(
        self, owner_id: str, *, status: str | None = None, since: datetime | None = None
    ) -> list[Notification]:
        """Return an owner's notifications, oldest first."""

    async def queued_notifications(self, *, before: datetime, limit: int) -> list[Notification]:
        """Every owner's notifications still ``queued`` made before ``before``, oldest first."""

    async def add_message(
        self,
        notification: Notification,
        *,
        key: str,
        holder: str,
        claim_until: datetime,
        max_per_day: int | None = None,
        since: datetime | None = None,
    ) -> Notification | None:
        """Keep a new owner message once: its idempotency ``key`` is unique.

        A ``queued`` message past the owner's ``max_per_day`` (messages ``sent``,
        ``queued`` or ``failed`` created from ``since``, counted in the same transaction)
        is kept ``held`` instead; a ``queued`` one is claimed for delivery by ``holder``
        until ``claim_until``.

        Returns:
            The message as kept, or ``None`` when ``key`` was kept before (or its owner
            is gone).
        """

    async def claim_notification(
        self, notification_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Claim a ``queued`` message for delivery until ``until``.

        Returns:
            ``False`` if it is not queued, or another holder's claim runs past ``now``.
        """

    async def claim_queued(
        self, holder: str, *, now: datetime, until: datetime, before: datetime, limit: int
    ) -> list[Notification]:
        """Claim up to ``limit`` ``queued`` messages nobody holds, oldest first.

        Only messages created before ``before``; PostgreSQL skips rows another
        transaction holds.
        """

    async def held_owners(self, *, limit: int = 1000) -> list[str]:
        """Owners with ``held`` messages (to send them a digest)."""

    async def add_task(self, task: Task) -> None:
        """Insert or replace a task for a person."""

    async def tasks(self, *, state: str | None = None, case_id: str | None = None) -> list[Task]:
        """Return tasks, oldest first."""

    # -- the owner's rights -----------------------------------------------------------
    async def export_owner(self, owner_id: str) -> dict[str, Any]:
        """Return everything kept about an owner, as JSON-serialisable data."""

    async def erase_owner(self, owner_id: str) -> int:
        """Erase an owner and everything personal about them; return rows removed.

        Cases and ratings are kept for the fleet's statistics with the owner's id,
        comments and contacts removed; channels, tokens, notifications go.
        """
