"""The PostgreSQL case store (notifier; a :class:`~notifier.store.CaseStore` for a large fleet).

The same records, rules and schema as :class:`notifier.sqlite.SqliteStore`, the embedded
default, in a PostgreSQL database reached with asyncpg: for an install that outgrows one
machine's file, or that wants its case store backed up and replicated like its other
databases. Chosen with ``[notifier] store_url = "postgresql://..."``.

How it works:

* **A pool of connections.** Each call takes a connection from an asyncpg pool for one
  statement or one transaction, so calls run side by side (SQLite's store runs them one
  at a time on its thread). ``lock_timeout`` bounds how long a statement waits for a
  row another transaction holds.
* **Migrations** from the one description of :mod:`notifier.schema`, rendered for
  PostgreSQL (:data:`MIGRATIONS`); ``schema_version`` holds the version. A store is
  migrated in one transaction under an advisory lock, so instances starting together
  migrate it once; a database from a newer fixloop, or one that holds other tables
  without ``schema_version``, is refused with :class:`~wire.errors.ConfigError`.
* **Rows** are stored as SQLite stores them (ISO 8601 UTC text, JSON text, 0/1 flags;
  text compared byte by byte), both ways by the same functions (:mod:`notifier.rows`).
* **Rules under concurrency.** What SQLite's single writer gives for free is explicit
  here. One open case per device and fault is the same partial unique index; a case move
  is the same compare-and-set ``UPDATE ... WHERE state = $n`` (PostgreSQL re-checks the
  condition after waiting for the row). A booking takes a transaction-scoped advisory
  lock on its technician before it looks for overlapping visits, and a release takes the
  same lock, so two bookings of one technician (or a booking and a release) never
  interleave. A claim locks the device's registry row, a registration the registry as a
  whole (imports are rare), a release the device; writes that must not outlive an
  erasure (a notification, a subject link) lock the owner's row for share, so an
  erasure waits for them and removes what they wrote. An invite or a one-tap link is
  used by one statement (``DELETE ... RETURNING``, ``ON CONFLICT DO NOTHING``).
* **Owner data.** As in SQLite: tokens as SHA-256 only, and erasure removes and
  anonymises the same rows, but unlike SQLite's ``secure_delete`` it cannot zero the
  old bytes: PostgreSQL keeps old row versions in its table and index files until
  ``VACUUM`` prunes them, and even a plain ``VACUUM`` may leave bytes behind (tried:
  the erased owner's id and a push token stayed in two table files; after ``VACUUM
  FULL``, which rewrites the tables, in none). An install that must have erased data off
  the disk runs ``VACUUM FULL`` on the store's tables in a maintenance window, or keeps
  the database on encrypted storage; the write-ahead log and backups keep the data
  until they are recycled.

Errors: an unreachable server, a lock held too long, a failing statement raise
:class:`~wire.errors.StoreUnavailableError` (retry); a record that breaks a rule
:class:`~notifier.errors.InvalidRequestError`; a database that cannot be used (a bad
URL, wrong credentials, a missing database, a failed migration)
:class:`~wire.errors.ConfigError`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import (
    OPEN_STATES,
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
from notifier.registry import (
    _MODEL,
    _PRINTABLE,
    _SELECT,
    TOKEN_ID_CHARS,
    ClaimOutcome,
    DeviceState,
    NewDevice,
    ProductLine,
    RegisteredDevice,
    ReleaseOutcome,
    RowOutcome,
    _Checked,
    _sha256,
    check_firmware,
    check_new_device,
    claim_digest,
    new_claim_code,
)
from notifier.registry import _device as _registered
from notifier.rows import (
    appointment_from,
    appointment_row,
    audit_from,
    audit_row,
    case_from,
    case_row,
    channel_from,
    channel_row,
    channel_secrets,
    device_from,
    device_row,
    dt,
    exported_channel,
    json_text,
    notification_from,
    notification_row,
    owner_from,
    owner_row,
    plain,
    rating_from,
    rating_row,
    redacted,
    task_from,
    task_row,
    technician_from,
    technician_row,
    timer_from,
    token_hash,
    ts,
    ts_opt,
)
from notifier.schema import render
from notifier.sqlite import _PRINCIPAL_KINDS, ERASED_OWNER
from notifier.store import CaseTimer, NewMessage, Principal, PrincipalKind
from wire.errors import ConfigError, StoreUnavailableError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresRegistry", "PostgresStore", "redacted_url"]

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Schema steps for PostgreSQL, oldest first (:data:`notifier.schema.STEPS`).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = render("postgresql")
#: The schema version this code writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_OPEN: Final = sorted(OPEN_STATES)
# Advisory lock keys (64 bit): one for migrating, one for registering devices; bookings
# lock hashtextextended('fixloop.book:' || technician_id, 0).
_MIGRATE_LOCK: Final = 0x6669_786C_6F6F_7001
_REGISTRY_LOCK: Final = 0x6669_786C_6F6F_7002
_BOOK_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtextextended('fixloop.book:' || $1, 0))"

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    _Job: TypeAlias = Callable[[_Conn], Awaitable[_T]]


def redacted_url(url: str) -> str:
    """A database URL fit for a log line: its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(a database URL that cannot be read)"


def _count(status: str) -> int:
    """Rows a statement touched, from its status (``UPDATE 3``, ``INSERT 0 1``)."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _upsert_sql(table: str, key: str, columns: Sequence[str]) -> str:
    names = ", ".join(columns)
    marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns if column != key)
    return (
        f"INSERT INTO {table} ({names}) VALUES ({marks}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


async def _upsert(conn: _Conn, table: str, key: str, row: dict[str, Any]) -> None:
    await conn.execute(_upsert_sql(table, key, list(row)), *row.values())


async def _insert(conn: _Conn, table: str, row: dict[str, Any]) -> None:
    marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})", *row.values())


def _where(clauses: list[str]) -> str:
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


class _Params:
    """Numbered parameters (``$1``, ``$2`` ...) collected while a query is built."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _raise_missing_case(exc: asyncpg.ForeignKeyViolationError, case_id: str) -> NoReturn:
    raise NotFoundError(f"no case {case_id!r}") from exc


async def _audit_event(
    conn: _Conn,
    now: datetime,
    actor: str,
    action: str,
    reason: str,
    evidence: dict[str, object],
) -> None:
    """An audit entry without a case (the registry's claims, releases, imports)."""
    await conn.execute(
        "INSERT INTO audit (case_id, at, actor, action, reason, evidence) "
        "VALUES (NULL, $1, $2, $3, $4, $5)",
        ts(now),
        actor,
        action,
        reason,
        json_text(evidence),
    )


async def _add_message(conn: _Conn, message: NewMessage) -> Notification | None:
    """:meth:`PostgresStore.add_message` inside its transaction.

    The owner's row is locked (``FOR UPDATE``) for the count and the write.
    """
    notification = message.notification
    known = await conn.fetchval(
        "SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", notification.owner_id
    )
    if known is None:
        return None
    if await conn.fetchval("SELECT 1 FROM notifications WHERE idem_key = $1", message.key):
        return None
    if notification.status == "queued" and message.max_per_day is not None:
        pushed = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE owner_id = $1 "
            "AND created_at >= $2 AND status IN ('sent', 'queued', 'failed')",
            notification.owner_id,
            ts(message.since or notification.created_at),
        )
        if pushed >= message.max_per_day:
            notification = replace(notification, status="held")
    queued = notification.status == "queued"
    row = {
        **notification_row(notification),
        "idem_key": message.key,
        "claimed_by": message.holder if queued else None,
        "claimed_until": ts(message.claim_until) if queued else None,
    }
    marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    # the owner's row lock orders writers of one key; this is belt and braces
    status = await conn.execute(
        f"INSERT INTO notifications ({', '.join(row)}) VALUES ({marks}) "
        "ON CONFLICT (idem_key) DO NOTHING",
        *row.values(),
    )
    return notification if _count(status) > 0 else None


async def _link_subject(conn: _Conn, issuer: str, subject: str, owner_id: str) -> str:
    """Link a subject unless it is linked; return the owner it stands for (in a transaction)."""
    if not issuer or not subject:
        raise InvalidRequestError("an issuer and a subject are needed")
    await conn.execute(
        "INSERT INTO owner_subjects (issuer, subject, owner_id, linked_at) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (issuer, subject) DO NOTHING",
        issuer,
        subject,
        owner_id,
        ts(datetime.now(UTC)),
    )
    linked = await conn.fetchval(
        "SELECT owner_id FROM owner_subjects WHERE issuer = $1 AND subject = $2", issuer, subject
    )
    return str(linked)


async def _anonymise_devices(conn: _Conn, case_ids: list[str], devices: set[str]) -> int:
    """Give an erased owner's cases anonymous device ids, also where text quotes them.

    As :func:`notifier.sqlite._anonymise_devices`: one new ``anon-`` id per device across
    the owner's cases; only the owner's own cases change.
    """
    touched = 0
    for old in sorted(devices):
        new = f"anon-{secrets.token_hex(8)}"
        touched += _count(
            await conn.execute(
                "UPDATE cases SET device_id = $1 WHERE device_id = $2 "
                "AND case_id = ANY($3::text[])",
                new,
                old,
                case_ids,
            )
        )
        for table, column in (
            ("audit", "evidence"),
            ("audit", "reason"),
            ("tasks", "reason"),
            ("appointments", "note"),
        ):
            touched += _count(
                await conn.execute(
                    f"UPDATE {table} SET {column} = REPLACE({column}, $1, $2) "
                    f"WHERE strpos({column}, $1) > 0 AND case_id = ANY($3::text[])",
                    old,
                    new,
                    case_ids,
                )
            )
    return touched


class PostgresStore:
    """The case store in a PostgreSQL database. Implements :class:`~notifier.store.CaseStore`.

    Use as ``async with PostgresStore(url) as store:``, or ``store = await
    PostgresStore(url).open()`` and later ``await store.close()``.

    Args:
        url: ``postgresql://user:password@host:port/database`` (libpq's URL and its
            query options, ``sslmode`` for one).
        pool_size: at most this many connections at once.
        lock_timeout_s: how long a statement waits for a row or lock another
            transaction holds before :class:`~wire.errors.StoreUnavailableError`.
        connect_timeout_s: how long opening a connection may take.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        lock_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                f"{redacted_url(url)} is not a PostgreSQL URL (postgresql://user@host/db)"
            )
        if pool_size < 1:
            raise ConfigError(f"pool_size must be at least 1, not {pool_size}")
        if lock_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("the case store's timeouts must be positive")
        self._url = url
        self._pool_size = pool_size
        self._lock_timeout_s = lock_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def where(self) -> str:
        """The database, for messages (without its password)."""
        return redacted_url(self._url)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect, and migrate the database to :data:`SCHEMA_VERSION`.

        Returns:
            The store itself.

        Raises:
            ConfigError: the URL, credentials or database are wrong, the database is not
                a case store or comes from a newer fixloop, or a migration failed (the
                database is left as it was).
            StoreUnavailableError: the server cannot be reached.
        """
        if self._pool is not None:
            return self
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout_s,
                server_settings={
                    "application_name": "fixloop",
                    "lock_timeout": str(round(self._lock_timeout_s * 1000)),
                },
            )
        except (
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidPasswordError,
            ValueError,
        ) as exc:
            raise ConfigError(f"cannot open the case store {self.where}: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(
                f"the case store {self.where} cannot be reached: {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return self

    async def close(self) -> None:
        """Close the pool's connections (closing twice is harmless)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _migrate(self, conn: _Conn) -> None:
        steps = MIGRATIONS  # read at open time, so that tests can add a step
        where = self.where
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
                tables = {
                    row[0]
                    for row in await conn.fetch(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema()"
                    )
                }
                if "schema_version" in tables:
                    version = int(await conn.fetchval("SELECT version FROM schema_version"))
                elif tables:
                    raise ConfigError(
                        f"{where} holds tables but is not a fixloop case store "
                        "(it has no schema_version table)"
                    )
                else:
                    await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                    await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                    version = 0
                if version > len(steps):
                    raise ConfigError(
                        f"the case store {where} has schema version {version}, but this "
                        f"fixloop knows versions up to {len(steps)}: run a newer fixloop, or "
                        "point it at another database"
                    )
                for number in range(version + 1, len(steps) + 1):
                    try:
                        for statement in steps[number - 1]:
                            await conn.execute(statement)
                    except asyncpg.PostgresError as exc:
                        raise ConfigError(
                            f"migrating the case store {where} to version {number} failed "
                            f"(the database is left at version {version}): {exc}"
                        ) from exc
                    await conn.execute("UPDATE schema_version SET version = $1", number)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StoreUnavailableError(f"the case store {where} failed: {exc}") from exc
        if version < len(steps):
            _LOG.info(
                "case store %s migrated from schema version %d to %d", where, version, len(steps)
            )

    async def _run(self, job: _Job[_T]) -> _T:
        """Run ``job`` with a connection of the pool."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the case store is not open")
        try:
            async with pool.acquire(timeout=self._connect_timeout_s) as conn:
                return await job(conn)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise InvalidRequestError(f"the record breaks a rule of the case store: {exc}") from exc
        except asyncpg.DataError as exc:
            # a value PostgreSQL cannot keep (a NUL character in text): sending it again
            # would fail again
            raise InvalidRequestError(f"the case store cannot keep a value: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"the case store failed: {exc}") from exc

    def registry(self) -> PostgresRegistry:
        """The device registry kept in this database (:mod:`notifier.registry`)."""
        return PostgresRegistry(self._run)

    # -- owners, tokens, devices, channels -----------------------------------------------------

    async def put_owner(self, owner: Owner) -> None:
        """Insert or replace an owner."""
        row = owner_row(owner)
        await self._run(lambda conn: _upsert(conn, "owners", "owner_id", row))

    async def get_owner(self, owner_id: str) -> Owner | None:
        """Return an owner."""

        async def job(conn: _Conn) -> Owner | None:
            row = await conn.fetchrow("SELECT * FROM owners WHERE owner_id = $1", owner_id)
            return None if row is None else owner_from(row)

        return await self._run(job)

    async def add_token(self, token: str, principal: Principal) -> None:
        """Remember an API token (only its SHA-256 is kept) for a principal.

        Raises:
            InvalidRequestError: an empty token or an unknown principal kind.
        """
        kind, principal_id = principal
        if not token:
            raise InvalidRequestError("an API token must not be empty")
        if kind not in _PRINCIPAL_KINDS:
            raise InvalidRequestError(f"unknown principal kind {kind!r}")
        row = {"token_sha256": token_hash(token), "kind": kind, "principal_id": principal_id}
        await self._run(lambda conn: _upsert(conn, "tokens", "token_sha256", row))

    async def resolve_token(self, token: str) -> Principal | None:
        """Return who a token stands for, or ``None`` for an unknown token."""
        digest = token_hash(token)

        async def job(conn: _Conn) -> Principal | None:
            row = await conn.fetchrow(
                "SELECT kind, principal_id FROM tokens WHERE token_sha256 = $1", digest
            )
            return None if row is None else (row["kind"], row["principal_id"])

        return await self._run(job)

    async def owner_of_subject(self, issuer: str, subject: str) -> str | None:
        """Return the owner an identity provider's subject stands for, or ``None``."""

        async def job(conn: _Conn) -> str | None:
            found = await conn.fetchval(
                "SELECT owner_id FROM owner_subjects WHERE issuer = $1 AND subject = $2",
                issuer,
                subject,
            )
            return None if found is None else str(found)

        return await self._run(job)

    async def link_subject(self, issuer: str, subject: str, owner_id: str) -> None:
        """Link a provider's subject to an existing owner (an owner may have several).

        Raises:
            NotFoundError: there is no such owner.
            ConflictError: the subject stands for another owner already.
        """

        async def job(conn: _Conn) -> str:
            async with conn.transaction():
                known = await conn.fetchval(
                    "SELECT 1 FROM owners WHERE owner_id = $1 FOR SHARE", owner_id
                )
                if known is None:
                    raise NotFoundError(f"there is no owner {owner_id}")
                return await _link_subject(conn, issuer, subject, owner_id)

        if await self._run(job) != owner_id:
            raise ConflictError("that subject stands for another owner already")

    async def adopt_subject(self, issuer: str, subject: str, owner: Owner) -> str:
        """Return the subject's owner id, storing ``owner`` for it first if it has none.

        The link is written first: of two first sign-ins of one subject at once, the
        second waits on the link's key and then finds the first's owner.
        """
        if not issuer or not subject:
            raise InvalidRequestError("an issuer and a subject are needed")

        async def job(conn: _Conn) -> str:
            async with conn.transaction():
                made = await conn.fetchval(
                    "INSERT INTO owner_subjects (issuer, subject, owner_id, linked_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (issuer, subject) DO NOTHING "
                    "RETURNING owner_id",
                    issuer,
                    subject,
                    owner.owner_id,
                    ts(datetime.now(UTC)),
                )
                if made is not None:
                    await _upsert(conn, "owners", "owner_id", owner_row(owner))
                    return str(made)
            found = await conn.fetchval(
                "SELECT owner_id FROM owner_subjects WHERE issuer = $1 AND subject = $2",
                issuer,
                subject,
            )
            return str(found)

        return await self._run(job)

    async def subjects_of(self, owner_id: str) -> list[tuple[str, str]]:
        """Return the provider subjects (``iss``, ``sub``) linked to an owner, sorted."""

        async def job(conn: _Conn) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT issuer, subject FROM owner_subjects WHERE owner_id = $1 "
                "ORDER BY issuer, subject",
                owner_id,
            )
            return [(str(row[0]), str(row[1])) for row in rows]

        return await self._run(job)

    async def unlink_subject(self, issuer: str, subject: str, owner_id: str) -> bool:
        """Unlink a provider's subject from an owner; ``False`` if it was not theirs."""

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM owner_subjects WHERE issuer = $1 AND subject = $2 AND owner_id = $3",
                issuer,
                subject,
                owner_id,
            )
            return _count(status) > 0

        return await self._run(job)

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device registry entry."""
        row = device_row(device)
        await self._run(lambda conn: _upsert(conn, "devices", "device_id", row))

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return a device's registry entry."""

        async def job(conn: _Conn) -> DeviceRecord | None:
            row = await conn.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
            return None if row is None else device_from(row)

        return await self._run(job)

    async def devices(self, owner_id: str | None = None) -> list[DeviceRecord]:
        """Return the devices of one owner, or all, by device id."""

        async def job(conn: _Conn) -> list[DeviceRecord]:
            if owner_id is None:
                rows = await conn.fetch("SELECT * FROM devices ORDER BY device_id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM devices WHERE owner_id = $1 ORDER BY device_id", owner_id
                )
            return [device_from(row) for row in rows]

        return await self._run(job)

    async def put_channel(self, channel: PushChannel) -> None:
        """Insert or replace a push channel."""
        row = channel_row(channel)
        await self._run(lambda conn: _upsert(conn, "channels", "channel_id", row))

    async def channels(self, owner_id: str, *, active_only: bool = True) -> list[PushChannel]:
        """Return an owner's push channels, oldest first (unknown times first)."""
        where = "owner_id = $1 AND active = 1" if active_only else "owner_id = $1"

        async def job(conn: _Conn) -> list[PushChannel]:
            rows = await conn.fetch(
                f"SELECT * FROM channels WHERE {where} ORDER BY created_at NULLS FIRST, seq",
                owner_id,
            )
            return [channel_from(row) for row in rows]

        return await self._run(job)

    async def update_channel_state(self, channel_id: str, *, active: bool, failures: int) -> bool:
        """Change a stored channel's ``active`` and ``failures`` only; never re-create it."""
        if failures < 0:
            raise InvalidRequestError(f"failures must not be negative, got {failures}")

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "UPDATE channels SET active = $1, failures = $2 WHERE channel_id = $3",
                int(active),
                failures,
                channel_id,
            )
            return _count(status) > 0

        return await self._run(job)

    async def delete_channel(self, owner_id: str, channel_id: str) -> bool:
        """Delete one of an owner's push channels, masking it in their cases' audit trail."""

        async def job(conn: _Conn) -> bool:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT * FROM channels WHERE channel_id = $1 AND owner_id = $2 FOR UPDATE",
                    channel_id,
                    owner_id,
                )
                if row is None:
                    return False
                masks = channel_secrets([channel_from(row)])
                trail = await conn.fetch(
                    "SELECT audit.seq, audit.evidence FROM audit JOIN cases "
                    "ON cases.case_id = audit.case_id WHERE cases.owner_id = $1",
                    owner_id,
                )
                for seq, text in trail:
                    evidence = json.loads(text)
                    masked = redacted(evidence, masks)
                    if masked != evidence:
                        await conn.execute(
                            "UPDATE audit SET evidence = $1 WHERE seq = $2", json_text(masked), seq
                        )
                await conn.execute("DELETE FROM channels WHERE channel_id = $1", channel_id)
            return True

        deleted = await self._run(job)
        if deleted:
            _LOG.info("deleted push channel %s", channel_id)
        return deleted

    async def use_link(self, link_id: str, expires_at: datetime, *, now: datetime) -> bool:
        """Record a one-tap link's use; ``False`` if it was used before."""
        until = ts(expires_at)
        cutoff = ts(now)

        async def job(conn: _Conn) -> bool:
            async with conn.transaction():
                await conn.execute("DELETE FROM used_links WHERE expires_at < $1", cutoff)
                status = await conn.execute(
                    "INSERT INTO used_links (link_id, expires_at) VALUES ($1, $2) "
                    "ON CONFLICT (link_id) DO NOTHING",
                    link_id,
                    until,
                )
                return _count(status) > 0

        return await self._run(job)

    # -- cases and the audit trail -------------------------------------------------------------

    async def add_case(self, case: Case) -> None:
        """Insert a new case.

        Raises:
            ConflictError: a case with that id exists, or an open case for the same
                device and fault exists (one open case per device and fault).
        """
        row = case_row(case)

        async def job(conn: _Conn) -> None:
            try:
                await _insert(conn, "cases", row)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "cases_pkey":
                    raise ConflictError(f"case {case.case_id!r} exists") from exc
                raise ConflictError(
                    f"device {case.device_id!r} has an open case for {case.fault!r}"
                ) from exc

        await self._run(job)

    async def get_case(self, case_id: str) -> Case | None:
        """Return a case."""

        async def job(conn: _Conn) -> Case | None:
            row = await conn.fetchrow("SELECT * FROM cases WHERE case_id = $1", case_id)
            return None if row is None else case_from(row)

        return await self._run(job)

    async def open_case(self, device_id: str, fault: str) -> Case | None:
        """Return the open case of a device and fault, if any."""

        async def job(conn: _Conn) -> Case | None:
            row = await conn.fetchrow(
                "SELECT * FROM cases WHERE device_id = $1 AND fault = $2 "
                "AND state = ANY($3::text[])",
                device_id,
                fault,
                _OPEN,
            )
            return None if row is None else case_from(row)

        return await self._run(job)

    async def update_case(
        self,
        case: Case,
        *,
        expected_state: str,
        audit: AuditEntry | Sequence[AuditEntry] | None = None,
        messages: Sequence[NewMessage] = (),
    ) -> list[Notification | None]:
        """Replace a case if its stored state is still ``expected_state``.

        ``audit`` is appended and ``messages`` kept (as by :meth:`add_message`) in the
        same transaction, so the change, its lines in the trail and what it tells the
        owner are kept (or lost) together. The owners' rows are locked before the case's,
        in the order :meth:`erase_owner` takes them.

        Returns:
            Each message as kept (``None``: its key was kept before, or no owner).

        Raises:
            ConflictError: the stored case moved on (or does not exist), or the new
                state would give the device a second open case for the fault.
        """
        row = case_row(case)
        columns = [column for column in row if column != "case_id"]
        updates = ", ".join(f"{column} = ${i}" for i, column in enumerate(columns, start=3))
        values = [row[column] for column in columns]

        entries = [] if audit is None else [audit] if isinstance(audit, AuditEntry) else audit
        entry_rows = [audit_row(entry) for entry in entries]
        owners = sorted({message.notification.owner_id for message in messages})

        async def job(conn: _Conn) -> list[Notification | None]:
            async with conn.transaction():
                for owner_id in owners:
                    await conn.execute(
                        "SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id
                    )
                try:
                    status = await conn.execute(
                        f"UPDATE cases SET {updates} WHERE case_id = $1 AND state = $2",
                        case.case_id,
                        expected_state,
                        *values,
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise ConflictError(
                        f"device {case.device_id!r} has another open case for {case.fault!r}"
                    ) from exc
                if _count(status) == 0:
                    raise ConflictError(
                        f"case {case.case_id!r} is not in state {expected_state!r} "
                        "(or does not exist)"
                    )
                for entry_row in entry_rows:
                    await _insert(conn, "audit", entry_row)
                return [await _add_message(conn, message) for message in messages]

        return await self._run(job)

    async def cases(
        self,
        *,
        owner_id: str | None = None,
        device_id: str | None = None,
        states: Sequence[str] | None = None,
        limit: int = 1000,
    ) -> list[Case]:
        """Return cases, newest first, filtered by owner, device and states."""
        p = _Params()
        clauses: list[str] = []
        if owner_id is not None:
            clauses.append(f"owner_id = {p(owner_id)}")
        if device_id is not None:
            clauses.append(f"device_id = {p(device_id)}")
        if states is not None:
            if not states:
                return []
            clauses.append(f"state = ANY({p(list(states))}::text[])")
        sql = (
            f"SELECT * FROM cases {_where(clauses)} "
            f"ORDER BY opened_at DESC, case_id DESC LIMIT {p(max(limit, 0))}"
        )

        async def job(conn: _Conn) -> list[Case]:
            return [case_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    async def add_audit(self, entry: AuditEntry) -> None:
        """Append to the audit trail (never changed or removed, except by erasure)."""
        row = audit_row(entry)
        await self._run(lambda conn: _insert(conn, "audit", row))

    async def audit(self, case_id: str) -> list[AuditEntry]:
        """Return a case's audit trail, oldest first (entries of one instant as written)."""

        async def job(conn: _Conn) -> list[AuditEntry]:
            rows = await conn.fetch(
                "SELECT * FROM audit WHERE case_id = $1 ORDER BY at, seq", case_id
            )
            return [audit_from(row) for row in rows]

        return await self._run(job)

    # -- notifiers side by side: leases and timers ---------------------------------------------

    async def take_lease(self, key: str, holder: str, *, now: datetime, until: datetime) -> bool:
        """Take (or extend) the lease on ``key`` for ``holder``; ``False`` while another's runs.

        One statement: two notifiers asking at once are ordered by the row's lock, and
        the second sees the first's lease (PostgreSQL re-checks the ``WHERE`` after the
        wait).
        """

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "INSERT INTO case_leases (lease_key, holder, until_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (lease_key) DO UPDATE "
                "SET holder = excluded.holder, until_at = excluded.until_at "
                "WHERE case_leases.holder = $2 OR case_leases.until_at < $4",
                key,
                holder,
                ts(until),
                ts(now),
            )
            return _count(status) > 0

        return await self._run(job)

    async def drop_lease(self, key: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``key``; ``False`` if it was no longer theirs."""

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM case_leases WHERE lease_key = $1 AND holder = $2", key, holder
            )
            return _count(status) > 0

        return await self._run(job)

    async def set_timer(self, timer: CaseTimer, *, replace: bool = True) -> None:
        """Set a case's timer (``replace=False``: only if it has none)."""
        conflict = "DO UPDATE SET what = excluded.what, due_at = excluded.due_at"

        async def job(conn: _Conn) -> None:
            await conn.execute(
                "INSERT INTO case_timers (case_id, what, due_at) VALUES ($1, $2, $3) "
                f"ON CONFLICT (case_id) {conflict if replace else 'DO NOTHING'}",
                timer.case_id,
                timer.what,
                ts(timer.due),
            )

        await self._run(job)

    async def get_timer(self, case_id: str) -> CaseTimer | None:
        """Return a case's timer."""

        async def job(conn: _Conn) -> CaseTimer | None:
            row = await conn.fetchrow("SELECT * FROM case_timers WHERE case_id = $1", case_id)
            return None if row is None else timer_from(row)

        return await self._run(job)

    async def take_timers(
        self, *, now: datetime, hold_until: datetime, limit: int
    ) -> list[CaseTimer]:
        """Take up to ``limit`` due timers, pushing each forward to ``hold_until``.

        ``FOR UPDATE SKIP LOCKED``: notifiers taking timers at the same moment each get
        other rows, none waits for another.
        """

        async def job(conn: _Conn) -> list[CaseTimer]:
            rows = await conn.fetch(
                "UPDATE case_timers SET due_at = $1 WHERE case_id IN ("
                "SELECT case_id FROM case_timers WHERE due_at <= $2 "
                "ORDER BY due_at, case_id LIMIT $3 FOR UPDATE SKIP LOCKED) "
                "RETURNING case_id, what, due_at",
                ts(hold_until),
                ts(now),
                max(limit, 0),
            )
            return sorted((timer_from(row) for row in rows), key=lambda timer: timer.case_id)

        return await self._run(job)

    async def finish_timer(self, timer: CaseTimer) -> bool:
        """Remove a taken timer unless it was set again since."""

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM case_timers WHERE case_id = $1 AND due_at = $2",
                timer.case_id,
                ts(timer.due),
            )
            return _count(status) > 0

        return await self._run(job)

    # -- technicians and appointments ----------------------------------------------------------

    async def put_technician(self, technician: Technician) -> None:
        """Insert or replace a technician."""
        row = technician_row(technician)
        await self._run(lambda conn: _upsert(conn, "technicians", "technician_id", row))

    async def get_technician(self, technician_id: str) -> Technician | None:
        """Return a technician."""

        async def job(conn: _Conn) -> Technician | None:
            row = await conn.fetchrow(
                "SELECT * FROM technicians WHERE technician_id = $1", technician_id
            )
            return None if row is None else technician_from(row)

        return await self._run(job)

    async def technicians(self, region: str | None = None) -> list[Technician]:
        """Return the technicians (of one region), by id."""

        async def job(conn: _Conn) -> list[Technician]:
            if region is None:
                rows = await conn.fetch("SELECT * FROM technicians ORDER BY technician_id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM technicians WHERE region = $1 ORDER BY technician_id", region
                )
            return [technician_from(row) for row in rows]

        return await self._run(job)

    async def put_appointment(self, appointment: Appointment) -> None:
        """Insert or replace an appointment that is not ``booked`` (use :meth:`book`).

        Raises:
            InvalidRequestError: the appointment is ``booked``.
            NotFoundError: its case does not exist.
        """
        if appointment.state == "booked":
            raise InvalidRequestError("a booked appointment is stored with book()")
        row = appointment_row(appointment)

        async def job(conn: _Conn) -> None:
            try:
                await _upsert(conn, "appointments", "appointment_id", row)
            except asyncpg.ForeignKeyViolationError as exc:
                _raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def book(self, appointment: Appointment) -> None:
        """Store an appointment as ``booked``, atomically refusing a double booking.

        Visits are half-open ``[start, end)``. The check and the write are one
        transaction holding the technician's advisory lock, which every booking and
        release of that technician takes first: whichever comes second sees the first.

        Raises:
            ConflictError: the technician has another booked visit overlapping it.
            InvalidRequestError: the technician, start or end is missing, or the end is
                not after the start.
            NotFoundError: its case does not exist.
        """
        if appointment.technician_id is None or appointment.start is None:
            raise InvalidRequestError("a booking needs a technician, a start and an end")
        if appointment.end is None:
            raise InvalidRequestError("a booking needs a technician, a start and an end")
        if appointment.end <= appointment.start:
            raise InvalidRequestError("a booking must end after it starts")
        row = appointment_row(replace(appointment, state="booked"))

        async def job(conn: _Conn) -> None:
            async with conn.transaction():
                await conn.execute(_BOOK_LOCK, row["technician_id"])
                clash = await conn.fetchval(
                    "SELECT appointment_id FROM appointments "
                    "WHERE technician_id = $1 AND state = 'booked' AND appointment_id != $2 "
                    "AND start_at < $3 AND end_at > $4 LIMIT 1",
                    row["technician_id"],
                    row["appointment_id"],
                    row["end_at"],
                    row["start_at"],
                )
                if clash is not None:
                    raise ConflictError(
                        f"technician {appointment.technician_id!r} is booked then "
                        f"(appointment {clash!r})"
                    )
                try:
                    await _upsert(conn, "appointments", "appointment_id", row)
                except asyncpg.ForeignKeyViolationError as exc:
                    _raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def release(self, appointment_id: str, *, now: datetime) -> Appointment:
        """Cancel a booked visit that has not started, freeing the technician's time.

        Under the technician's booking lock, like :meth:`book`.

        Raises:
            NotFoundError: no such appointment.
            ConflictError: it is not booked (done, cancelled, only proposed), or it has
                started already.
        """
        cutoff = ts(now)

        async def job(conn: _Conn) -> Appointment:
            async with conn.transaction():
                technician = await conn.fetchval(
                    "SELECT technician_id FROM appointments WHERE appointment_id = $1",
                    appointment_id,
                )
                if technician is not None:
                    await conn.execute(_BOOK_LOCK, technician)
                row = await conn.fetchrow(
                    "SELECT * FROM appointments WHERE appointment_id = $1 FOR UPDATE",
                    appointment_id,
                )
                if row is None:
                    raise NotFoundError(f"no appointment {appointment_id!r}")
                appointment = appointment_from(row)
                if appointment.state != "booked":
                    raise ConflictError(f"the visit is {appointment.state}, not booked")
                if row["start_at"] is None or row["start_at"] <= cutoff:
                    raise ConflictError("the visit has started already")
                await conn.execute(
                    "UPDATE appointments SET state = 'cancelled' "
                    "WHERE appointment_id = $1 AND state = 'booked'",
                    appointment_id,
                )
            return replace(appointment, state="cancelled")

        return await self._run(job)

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        """Return an appointment."""

        async def job(conn: _Conn) -> Appointment | None:
            row = await conn.fetchrow(
                "SELECT * FROM appointments WHERE appointment_id = $1", appointment_id
            )
            return None if row is None else appointment_from(row)

        return await self._run(job)

    async def appointments(
        self,
        *,
        technician_id: str | None = None,
        case_id: str | None = None,
        states: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Appointment]:
        """Return appointments by start time (``since <= start < until``).

        Appointments without a start (proposals) come last, and only when neither
        ``since`` nor ``until`` is given.
        """
        p = _Params()
        clauses: list[str] = []
        if technician_id is not None:
            clauses.append(f"technician_id = {p(technician_id)}")
        if case_id is not None:
            clauses.append(f"case_id = {p(case_id)}")
        if states is not None:
            if not states:
                return []
            clauses.append(f"state = ANY({p(list(states))}::text[])")
        if since is not None:
            clauses.append(f"start_at >= {p(ts(since))}")
        if until is not None:
            clauses.append(f"start_at < {p(ts(until))}")
        sql = (
            f"SELECT * FROM appointments {_where(clauses)} "
            "ORDER BY start_at IS NULL, start_at, appointment_id"
        )

        async def job(conn: _Conn) -> list[Appointment]:
            return [appointment_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    # -- ratings, notifications, tasks ---------------------------------------------------------

    async def add_rating(self, rating: Rating) -> None:
        """Store the rating of a case.

        Raises:
            ConflictError: the case is rated already (one rating per case).
            NotFoundError: the case does not exist.
            InvalidRequestError: the stars are not 1 to 5.
        """
        row = rating_row(rating)

        async def job(conn: _Conn) -> None:
            try:
                await _insert(conn, "ratings", row)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(f"case {rating.case_id!r} is rated already") from exc
            except asyncpg.CheckViolationError as exc:
                raise InvalidRequestError(f"a rating is 1 to 5 stars, not {rating.stars}") from exc
            except asyncpg.ForeignKeyViolationError as exc:
                _raise_missing_case(exc, rating.case_id)

        await self._run(job)

    async def get_rating(self, case_id: str) -> Rating | None:
        """Return a case's rating."""

        async def job(conn: _Conn) -> Rating | None:
            row = await conn.fetchrow("SELECT * FROM ratings WHERE case_id = $1", case_id)
            return None if row is None else rating_from(row)

        return await self._run(job)

    async def ratings(self, since: datetime | None = None) -> list[Rating]:
        """Return ratings, oldest first (``since`` inclusive)."""
        bound = ts_opt(since)

        async def job(conn: _Conn) -> list[Rating]:
            if bound is None:
                rows = await conn.fetch("SELECT * FROM ratings ORDER BY at, case_id")
            else:
                rows = await conn.fetch(
                    "SELECT * FROM ratings WHERE at >= $1 ORDER BY at, case_id", bound
                )
            return [rating_from(row) for row in rows]

        return await self._run(job)

    async def add_notification(self, notification: Notification) -> None:
        """Insert or replace a notification, while its owner exists.

        The owner's row is locked for share while the notification is written, so an
        erasure running at the same time either comes first (and the message is dropped)
        or waits and removes it with the rest.
        """
        row = notification_row(notification)

        async def job(conn: _Conn) -> None:
            async with conn.transaction():
                known = await conn.fetchval(
                    "SELECT 1 FROM owners WHERE owner_id = $1 FOR SHARE", notification.owner_id
                )
                if known is None:
                    _LOG.info(
                        "notification %s not kept: its owner is gone",
                        notification.notification_id,
                    )
                    return
                await _upsert(conn, "notifications", "notification_id", row)

        await self._run(job)

    async def notifications(
        self, owner_id: str, *, status: str | None = None, since: datetime | None = None
    ) -> list[Notification]:
        """Return an owner's notifications, oldest first (``since`` inclusive)."""
        p = _Params()
        clauses = [f"owner_id = {p(owner_id)}"]
        if status is not None:
            clauses.append(f"status = {p(status)}")
        if since is not None:
            clauses.append(f"created_at >= {p(ts(since))}")
        sql = f"SELECT * FROM notifications {_where(clauses)} ORDER BY created_at, notification_id"

        async def job(conn: _Conn) -> list[Notification]:
            return [notification_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    async def queued_notifications(self, *, before: datetime, limit: int) -> list[Notification]:
        """Return every owner's notifications still ``queued`` created before ``before``."""
        bound = ts(before)

        async def job(conn: _Conn) -> list[Notification]:
            rows = await conn.fetch(
                "SELECT * FROM notifications WHERE status = 'queued' AND created_at < $1"
                " ORDER BY created_at, notification_id LIMIT $2",
                bound,
                max(limit, 0),
            )
            return [notification_from(row) for row in rows]

        return await self._run(job)

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
        """Keep a new owner message once per ``key`` (held past ``max_per_day``).

        The owner's row is locked (``FOR UPDATE``) for the count and the write, so two
        notifiers writing to one owner at once count each other's messages, and an
        erasure waits for it as for :meth:`add_notification`.
        """
        message = NewMessage(notification, key, holder, claim_until, max_per_day, since)

        async def job(conn: _Conn) -> Notification | None:
            async with conn.transaction():
                return await _add_message(conn, message)

        return await self._run(job)

    async def claim_notification(
        self, notification_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Claim a ``queued`` message for delivery unless another holder's claim runs."""

        async def job(conn: _Conn) -> bool:
            status = await conn.execute(
                "UPDATE notifications SET claimed_by = $1, claimed_until = $2 "
                "WHERE notification_id = $3 AND status = 'queued' AND "
                "(claimed_by IS NULL OR claimed_by = $1 OR claimed_until < $4)",
                holder,
                ts(until),
                notification_id,
                ts(now),
            )
            return _count(status) > 0

        return await self._run(job)

    async def claim_queued(
        self, holder: str, *, now: datetime, until: datetime, before: datetime, limit: int
    ) -> list[Notification]:
        """Claim up to ``limit`` unclaimed ``queued`` messages created before ``before``.

        ``FOR UPDATE SKIP LOCKED``: notifiers sweeping at once each claim other rows.
        """

        async def job(conn: _Conn) -> list[Notification]:
            rows = await conn.fetch(
                "UPDATE notifications SET claimed_by = $1, claimed_until = $2 "
                "WHERE notification_id IN ("
                "SELECT notification_id FROM notifications WHERE status = 'queued' "
                "AND created_at < $3 AND (claimed_by IS NULL OR claimed_until < $4) "
                "ORDER BY created_at, notification_id LIMIT $5 FOR UPDATE SKIP LOCKED) "
                "RETURNING *",
                holder,
                ts(until),
                ts(before),
                ts(now),
                max(limit, 0),
            )
            found = [notification_from(row) for row in rows]
            return sorted(found, key=lambda n: (n.created_at, n.notification_id))

        return await self._run(job)

    async def held_owners(self, *, limit: int = 1000) -> list[str]:
        """Owners with ``held`` messages."""

        async def job(conn: _Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT DISTINCT owner_id FROM notifications WHERE status = 'held' "
                "ORDER BY owner_id LIMIT $1",
                max(limit, 0),
            )
            return [str(row[0]) for row in rows]

        return await self._run(job)

    async def add_task(self, task: Task) -> None:
        """Insert or replace a task for a person.

        Raises:
            NotFoundError: its case does not exist.
        """
        row = task_row(task)

        async def job(conn: _Conn) -> None:
            try:
                await _upsert(conn, "tasks", "task_id", row)
            except asyncpg.ForeignKeyViolationError as exc:
                _raise_missing_case(exc, task.case_id)

        await self._run(job)

    async def tasks(self, *, state: str | None = None, case_id: str | None = None) -> list[Task]:
        """Return tasks, oldest first."""
        p = _Params()
        clauses: list[str] = []
        if state is not None:
            clauses.append(f"state = {p(state)}")
        if case_id is not None:
            clauses.append(f"case_id = {p(case_id)}")
        sql = f"SELECT * FROM tasks {_where(clauses)} ORDER BY created_at, task_id"

        async def job(conn: _Conn) -> list[Task]:
            return [task_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    # -- the owner's rights --------------------------------------------------------------------

    async def export_owner(self, owner_id: str) -> dict[str, Any]:
        """Return everything kept about an owner, as JSON-serialisable data.

        The same keys and forms as :meth:`notifier.sqlite.SqliteStore.export_owner`,
        read in one repeatable-read transaction (one consistent picture).
        """

        async def job(conn: _Conn) -> dict[str, Any]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                owner = await conn.fetchrow("SELECT * FROM owners WHERE owner_id = $1", owner_id)
                devices = await conn.fetch(
                    "SELECT * FROM devices WHERE owner_id = $1 ORDER BY device_id", owner_id
                )
                channels = [
                    channel_from(row)
                    for row in await conn.fetch(
                        "SELECT * FROM channels WHERE owner_id = $1 "
                        "ORDER BY created_at NULLS FIRST, seq",
                        owner_id,
                    )
                ]
                masks = channel_secrets(channels)
                cases = [
                    case_from(row)
                    for row in await conn.fetch(
                        "SELECT * FROM cases WHERE owner_id = $1 ORDER BY opened_at, case_id",
                        owner_id,
                    )
                ]
                ids = [case.case_id for case in cases]
                trails: dict[str, list[Any]] = {case_id: [] for case_id in ids}
                for row in await conn.fetch(
                    "SELECT * FROM audit WHERE case_id = ANY($1::text[]) ORDER BY at, seq", ids
                ):
                    trails[row["case_id"]].append(redacted(plain(audit_from(row)), masks))
                case_rows = [{**plain(case), "audit": trails[case.case_id]} for case in cases]
                appointments = await conn.fetch(
                    "SELECT * FROM appointments WHERE case_id = ANY($1::text[]) "
                    "ORDER BY start_at IS NULL, start_at, appointment_id",
                    ids,
                )
                ratings = await conn.fetch(
                    "SELECT * FROM ratings WHERE case_id = ANY($1::text[]) ORDER BY at, case_id",
                    ids,
                )
                tasks = await conn.fetch(
                    "SELECT * FROM tasks WHERE case_id = ANY($1::text[]) "
                    "ORDER BY created_at, task_id",
                    ids,
                )
                notifications = await conn.fetch(
                    "SELECT * FROM notifications WHERE owner_id = $1 "
                    "ORDER BY created_at, notification_id",
                    owner_id,
                )
            return {
                "owner": None if owner is None else plain(owner_from(owner)),
                "devices": [plain(device_from(row)) for row in devices],
                "channels": [exported_channel(channel) for channel in channels],
                "cases": case_rows,
                "appointments": [plain(appointment_from(row)) for row in appointments],
                "ratings": [plain(rating_from(row)) for row in ratings],
                "notifications": [plain(notification_from(row)) for row in notifications],
                "tasks": [plain(task_from(row)) for row in tasks],
            }

        return await self._run(job)

    async def erase_owner(self, owner_id: str) -> int:
        """Erase an owner and everything personal about them; return the rows touched.

        The same rows go and change as in :meth:`notifier.sqlite.SqliteStore.erase_owner`,
        in one transaction; see the module's notes on what stays on disk until ``VACUUM``.
        """

        async def job(conn: _Conn) -> int:
            touched = 0
            async with conn.transaction():
                # first: writes that check the owner (notifications, links) wait or see none
                await conn.execute("SELECT 1 FROM owners WHERE owner_id = $1 FOR UPDATE", owner_id)
                ids = [
                    row[0]
                    for row in await conn.fetch(
                        "SELECT case_id FROM cases WHERE owner_id = $1", owner_id
                    )
                ]
                devices = {
                    row[0]
                    for row in await conn.fetch(
                        "SELECT device_id FROM devices WHERE owner_id = $1 "
                        "UNION SELECT device_id FROM cases WHERE owner_id = $1",
                        owner_id,
                    )
                }
                touched += await _anonymise_devices(conn, ids, devices)
                for sql in (
                    "DELETE FROM owners WHERE owner_id = $1",
                    "DELETE FROM tokens WHERE kind = 'owner' AND principal_id = $1",
                    "DELETE FROM owner_subjects WHERE owner_id = $1",
                    "DELETE FROM invites WHERE owner_id = $1",
                    # the registry's claims and releases name the owner: the events stay
                    "UPDATE audit SET evidence = (evidence::jsonb - 'owner_id')::text "
                    "WHERE case_id IS NULL AND evidence::jsonb ->> 'owner_id' = $1",
                    "DELETE FROM channels WHERE owner_id = $1",
                    "DELETE FROM notifications WHERE owner_id = $1",
                    "DELETE FROM devices WHERE owner_id = $1",
                ):
                    touched += _count(await conn.execute(sql, owner_id))
                touched += _count(
                    await conn.execute(
                        "UPDATE cases SET owner_id = $1 WHERE owner_id = $2",
                        ERASED_OWNER,
                        owner_id,
                    )
                )
                touched += _count(
                    await conn.execute(
                        "UPDATE ratings SET comment = NULL "
                        "WHERE comment IS NOT NULL AND case_id = ANY($1::text[])",
                        ids,
                    )
                )
                touched += _count(
                    await conn.execute(
                        "UPDATE audit SET evidence = '{}' WHERE action = 'notify' "
                        "AND evidence != '{}' AND case_id = ANY($1::text[])",
                        ids,
                    )
                )
                await conn.execute(
                    "INSERT INTO audit (case_id, at, actor, action, reason, evidence) "
                    "VALUES (NULL, $1, 'system', 'owner_erased', $2, $3)",
                    ts(datetime.now(UTC)),
                    "an owner's personal data was erased at their request",
                    json_text({"rows": touched, "cases": len(ids), "devices": len(devices)}),
                )
            return touched

        touched = await self._run(job)
        _LOG.info("erased an owner from the case store: %d rows touched", touched)
        return touched


class PostgresRegistry:
    """The :class:`~notifier.registry.DeviceRegistry` in the case store's PostgreSQL database.

    Made by :meth:`PostgresStore.registry`; the same rules and outcomes as
    :class:`~notifier.registry.SqliteRegistry`, with the row locks the module describes.

    Args:
        run: runs a job with a connection of the store's pool.
    """

    def __init__(self, run: Callable[[_Job[Any]], Awaitable[Any]]) -> None:
        self._run = run

    # -- product lines -------------------------------------------------------------------------

    async def put_product_line(self, line: ProductLine) -> ProductLine:
        """Register a product line; an existing one keeps its date and takes the new name.

        Raises:
            InvalidRequestError: the model or name breaks the rules.
        """
        if not _MODEL.fullmatch(line.model):
            raise InvalidRequestError(
                f"{line.model!r} is not a product model name (lower-case letters, digits, _)"
            )
        if not _PRINTABLE.fullmatch(line.name):
            raise InvalidRequestError("a product line's name is 1 to 80 printable characters")

        async def job(conn: _Conn) -> ProductLine:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO product_lines (model, name, created_at) VALUES ($1, $2, $3) "
                    "ON CONFLICT (model) DO UPDATE SET name = excluded.name",
                    line.model,
                    line.name,
                    ts(line.created_at),
                )
                row = await conn.fetchrow(
                    "SELECT product_lines.*, (SELECT COUNT(*) FROM registry "
                    "WHERE registry.model = product_lines.model) AS devices "
                    "FROM product_lines WHERE model = $1",
                    line.model,
                )
            assert row is not None
            return _line(row)

        result: ProductLine = await self._run(job)
        return result

    async def product_lines(self) -> list[ProductLine]:
        """Return the product lines, by model, with their device counts."""

        async def job(conn: _Conn) -> list[ProductLine]:
            rows = await conn.fetch(
                "SELECT product_lines.*, COUNT(registry.device_id) AS devices "
                "FROM product_lines LEFT JOIN registry ON registry.model = product_lines.model "
                "GROUP BY product_lines.model ORDER BY product_lines.model"
            )
            return [_line(row) for row in rows]

        result: list[ProductLine] = await self._run(job)
        return result

    # -- devices -------------------------------------------------------------------------------

    async def register(
        self, devices: Sequence[NewDevice], *, key: bytes, now: datetime, actor: str
    ) -> list[RowOutcome]:
        """Register devices, each row on its own: a bad row is reported, the others go on.

        As :meth:`notifier.registry.SqliteRegistry.register`, in one transaction that
        holds the registry's advisory lock (two imports at once take turns).
        """
        checked = [
            _Checked(i, device, check_new_device(device)) for i, device in enumerate(devices)
        ]
        codes: dict[int, str] = {}
        digests: dict[int, str] = {}
        for row in checked:
            if row.errors:
                continue
            code = row.device.claim_code or new_claim_code()
            codes[row.index] = code
            digests[row.index] = claim_digest(key, code)
        stamp = ts(now)

        async def job(conn: _Conn) -> list[RowOutcome]:
            seen_ids: dict[str, int] = {}
            seen_serials: dict[tuple[str, str], int] = {}
            seen_codes: dict[str, int] = {}
            out: list[RowOutcome] = []
            by_model: dict[str, int] = {}
            added = 0
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _REGISTRY_LOCK)
                models = {r[0] for r in await conn.fetch("SELECT model FROM product_lines")}
                for row in checked:
                    device, errors = row.device, list(row.errors)
                    if not errors:
                        errors = await _clashes(
                            conn,
                            row,
                            models,
                            digests[row.index],
                            seen_ids,
                            seen_serials,
                            seen_codes,
                        )
                    if errors:
                        out.append(RowOutcome(row.index, device.device_id, None, tuple(errors)))
                        continue
                    await conn.execute(
                        "INSERT INTO registry (device_id, model, serial, region, firmware, batch, "
                        "claim_hash, registered_at, retired_at) "
                        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)",
                        device.device_id,
                        device.model,
                        device.serial,
                        device.region,
                        device.firmware,
                        device.batch,
                        digests[row.index],
                        stamp,
                    )
                    added += 1
                    by_model[device.model] = by_model.get(device.model, 0) + 1
                    seen_ids[device.device_id] = row.index
                    seen_serials[(device.model, device.serial)] = row.index
                    seen_codes[digests[row.index]] = row.index
                    out.append(RowOutcome(row.index, device.device_id, codes[row.index]))
                if added:
                    await _audit_event(
                        conn,
                        now,
                        "ops",
                        "devices_registered",
                        f"{added} devices registered by {actor}",
                        {"actor": actor, "devices": added, "models": by_model},
                    )
            return out

        outcomes: list[RowOutcome] = await self._run(job)
        _LOG.info(
            "registered %d of %d devices (%s)",
            sum(o.ok for o in outcomes),
            len(outcomes),
            actor,
        )
        return outcomes

    async def get(self, device_id: str) -> RegisteredDevice | None:
        """Return a registered device (with its owner, if it has one)."""

        async def job(conn: _Conn) -> RegisteredDevice | None:
            row = await conn.fetchrow(f"{_SELECT} WHERE registry.device_id = $1", device_id)
            return None if row is None else _registered(row)

        result: RegisteredDevice | None = await self._run(job)
        return result

    async def note_firmware(self, device_id: str, firmware: str) -> bool:
        """Keep the firmware a device's boot event names, in the registry and its record.

        Returns:
            Whether a stored version changed.

        Raises:
            InvalidRequestError: ``firmware`` is not a firmware version.
        """
        check_firmware(firmware)

        async def job(conn: _Conn) -> bool:
            changed = 0
            async with conn.transaction():
                for table in ("registry", "devices"):
                    status = await conn.execute(
                        f"UPDATE {table} SET firmware = $1 "
                        "WHERE device_id = $2 AND firmware IS DISTINCT FROM $1",
                        firmware,
                        device_id,
                    )
                    changed += int(str(status).rsplit(" ", 1)[-1])
            return changed > 0

        result: bool = await self._run(job)
        return result

    async def list(
        self,
        *,
        model: str | None = None,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[RegisteredDevice]:
        """Return registered devices by id (those after ``after``), at most ``limit``."""
        p = _Params()
        clauses: list[str] = []
        if model is not None:
            clauses.append(f"registry.model = {p(model)}")
        if state == "retired":
            clauses.append("registry.retired_at IS NOT NULL")
        elif state == "claimed":
            clauses.append("registry.retired_at IS NULL AND devices.owner_id IS NOT NULL")
        elif state == "unclaimed":
            clauses.append("registry.retired_at IS NULL AND devices.owner_id IS NULL")
        if after is not None:
            clauses.append(f"registry.device_id > {p(after)}")
        sql = f"{_SELECT} {_where(clauses)} ORDER BY registry.device_id LIMIT {p(max(limit, 0))}"

        async def job(conn: _Conn) -> list[RegisteredDevice]:
            return [_registered(row) for row in await conn.fetch(sql, *p.values)]

        result: list[RegisteredDevice] = await self._run(job)
        return result

    async def retire(self, device_id: str, *, now: datetime, actor: str) -> RegisteredDevice:
        """Take a device out of service: its claim code stops working for good.

        Raises:
            NotFoundError: no such device.
            ConflictError: it is retired already.
        """

        async def job(conn: _Conn) -> RegisteredDevice:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT retired_at FROM registry WHERE device_id = $1 FOR UPDATE", device_id
                )
                if row is None:
                    raise NotFoundError(f"there is no registered device {device_id}")
                if row["retired_at"] is not None:
                    raise ConflictError(f"device {device_id} is retired already")
                await conn.execute(
                    "UPDATE registry SET retired_at = $1, claim_hash = NULL WHERE device_id = $2",
                    ts(now),
                    device_id,
                )
                await _audit_event(
                    conn,
                    now,
                    "ops",
                    "device_retired",
                    f"device {device_id} retired by {actor}",
                    {"device_id": device_id, "actor": actor},
                )
                retired = await conn.fetchrow(f"{_SELECT} WHERE registry.device_id = $1", device_id)
            assert retired is not None
            return _registered(retired)

        result: RegisteredDevice = await self._run(job)
        return result

    # -- claiming and releasing ----------------------------------------------------------------

    async def claim(
        self, owner_id: str, code: str, *, key: bytes, label: str | None, now: datetime
    ) -> ClaimOutcome:
        """Bind the device whose claim code this is to the owner, once.

        The device's registry row is locked first: of two claims at once, the second
        waits and then finds the device owned.

        Raises:
            InvalidRequestError: the code is malformed.
            NotFoundError: no device has this code (or the owner does not exist).
            ConflictError: the device is claimed (by this owner or another), or retired.
        """
        digest = claim_digest(key, code)

        async def job(conn: _Conn) -> ClaimOutcome:
            async with conn.transaction():
                owner = await conn.fetchval(
                    "SELECT 1 FROM owners WHERE owner_id = $1 FOR SHARE", owner_id
                )
                if owner is None:
                    raise NotFoundError("there is no such owner")
                locked = await conn.fetchval(
                    "SELECT device_id FROM registry WHERE claim_hash = $1 FOR UPDATE", digest
                )
                if locked is None:
                    raise NotFoundError("no device has this claim code")
                # read after the lock: a claim that held it is committed now
                row = await conn.fetchrow(f"{_SELECT} WHERE registry.device_id = $1", locked)
                assert row is not None
                device = _registered(row)
                if device.retired_at is not None:
                    raise ConflictError("this device is out of service and cannot be claimed")
                if device.owner_id == owner_id:
                    raise ConflictError("this device is yours already")
                if device.owner_id is not None:
                    raise ConflictError(
                        "this device has an owner: they release it in their app first"
                    )
                record = DeviceRecord(
                    device.device_id,
                    owner_id,
                    device.model,
                    firmware=device.firmware,
                    label=label,
                    batch=device.batch,
                )
                await _insert(conn, "devices", device_row(record))
                await _audit_event(
                    conn,
                    now,
                    "owner",
                    "device_claimed",
                    f"device {device.device_id} claimed by its owner with its claim code",
                    {"device_id": device.device_id, "owner_id": owner_id},
                )
            claimed = replace(device, owner_id=owner_id, claimable=False)
            return ClaimOutcome(claimed, record)

        outcome: ClaimOutcome = await self._run(job)
        _LOG.info("device %s claimed", outcome.device.device_id)
        return outcome

    async def release(self, owner_id: str, device_id: str, *, now: datetime) -> ReleaseOutcome:
        """Unbind an owner's device on resale; nothing of theirs stays reachable from it.

        As :meth:`notifier.registry.SqliteRegistry.release`, with the device's rows
        locked first.

        Raises:
            NotFoundError: the owner has no such device.
        """
        anonymous = f"anon-{secrets.token_hex(8)}"
        stamp = ts(now)

        async def job(conn: _Conn) -> ReleaseOutcome:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM registry WHERE device_id = $1 FOR UPDATE", device_id
                )
                mine = await conn.fetchval(
                    "SELECT 1 FROM devices WHERE device_id = $1 AND owner_id = $2 FOR UPDATE",
                    device_id,
                    owner_id,
                )
                if mine is None:
                    raise NotFoundError(f"there is no device {device_id}")
                cases = await conn.fetch(
                    "SELECT case_id, state FROM cases WHERE device_id = $1 AND owner_id = $2 "
                    "FOR UPDATE",
                    device_id,
                    owner_id,
                )
                ids = [row["case_id"] for row in cases]
                closed = 0
                cancelled = 0
                for row in cases:
                    if row["state"] not in OPEN_STATES:
                        continue
                    cancelled += _count(
                        await conn.execute(
                            "UPDATE appointments SET state = 'cancelled' WHERE case_id = $1 "
                            "AND (state = 'proposed' OR (state = 'booked' AND start_at > $2))",
                            row["case_id"],
                            stamp,
                        )
                    )
                    await conn.execute(
                        "UPDATE cases SET state = 'dismissed', pending_action = NULL, "
                        "updated_at = $1 WHERE case_id = $2 AND state = $3",
                        stamp,
                        row["case_id"],
                        row["state"],
                    )
                    await conn.execute(
                        "INSERT INTO audit (case_id, at, actor, action, reason, evidence, "
                        "from_state, to_state) VALUES ($1, $2, 'owner', 'transition', $3, '{}', "
                        "$4, 'dismissed')",
                        row["case_id"],
                        stamp,
                        "the owner released the device (sold or passed on)",
                        row["state"],
                    )
                    closed += 1
                await conn.execute(
                    "UPDATE cases SET device_id = $1 WHERE case_id = ANY($2::text[])",
                    anonymous,
                    ids,
                )
                for table, column in (
                    ("cases", "evidence"),
                    ("audit", "evidence"),
                    ("audit", "reason"),
                    ("tasks", "reason"),
                    ("appointments", "note"),
                ):
                    await conn.execute(
                        f"UPDATE {table} SET {column} = REPLACE({column}, $1, $2) "
                        f"WHERE strpos({column}, $1) > 0 AND case_id = ANY($3::text[])",
                        device_id,
                        anonymous,
                        ids,
                    )
                await conn.execute("DELETE FROM devices WHERE device_id = $1", device_id)
                await _audit_event(
                    conn,
                    now,
                    "owner",
                    "device_released",
                    f"device {device_id} released by its owner",
                    {"device_id": device_id, "owner_id": owner_id, "cases": len(ids)},
                )
            return ReleaseOutcome(device_id, len(ids), closed, cancelled, anonymous)

        outcome: ReleaseOutcome = await self._run(job)
        _LOG.info(
            "device %s released: %d cases kept anonymously, %d closed",
            device_id,
            outcome.cases_kept,
            outcome.cases_closed,
        )
        return outcome

    # -- invites and tokens --------------------------------------------------------------------

    async def add_invite(self, invite: str, owner_id: str, expires_at: datetime) -> None:
        """Keep an invite code's digest for an owner until it expires."""
        values = (_sha256(invite), owner_id, ts(expires_at))

        async def job(conn: _Conn) -> None:
            await conn.execute(
                "INSERT INTO invites (invite_sha256, owner_id, expires_at) VALUES ($1, $2, $3)",
                *values,
            )

        await self._run(job)

    async def use_invite(self, invite: str, *, now: datetime) -> str:
        """Use an invite code once; return its owner's id.

        Raises:
            NotFoundError: no such invite, it was used, it expired, or its owner is gone.
        """
        digest = _sha256(invite)
        cutoff = ts(now)

        async def job(conn: _Conn) -> str:
            async with conn.transaction():
                await conn.execute("DELETE FROM invites WHERE expires_at <= $1", cutoff)
                owner_id = await conn.fetchval(
                    "DELETE FROM invites WHERE invite_sha256 = $1 RETURNING owner_id", digest
                )
                known = (
                    None
                    if owner_id is None
                    else await conn.fetchval(
                        "SELECT 1 FROM owners WHERE owner_id = $1 FOR SHARE", owner_id
                    )
                )
            if known is None:
                raise NotFoundError("this invite is not valid: it was used, or it expired")
            return str(owner_id)

        result: str = await self._run(job)
        return result

    async def revoke_token(self, token_id: str) -> tuple[PrincipalKind, str]:
        """Revoke the token with this id (:func:`~notifier.registry.token_id`).

        Raises:
            NotFoundError: no token has this id.
        """
        if not re.fullmatch(f"[0-9a-f]{{{TOKEN_ID_CHARS}}}", token_id):
            raise NotFoundError(f"there is no token {token_id}")

        async def job(conn: _Conn) -> tuple[PrincipalKind, str]:
            rows = await conn.fetch(
                "DELETE FROM tokens WHERE left(token_sha256, $1) = $2 RETURNING kind, principal_id",
                TOKEN_ID_CHARS,
                token_id,
            )
            if not rows:
                raise NotFoundError(f"there is no token {token_id}")
            return rows[0]["kind"], rows[0]["principal_id"]

        result: tuple[PrincipalKind, str] = await self._run(job)
        return result

    async def revoke_tokens_of(self, kind: PrincipalKind, principal_id: str) -> int:
        """Revoke every token of a principal; return how many there were."""

        async def job(conn: _Conn) -> int:
            return _count(
                await conn.execute(
                    "DELETE FROM tokens WHERE kind = $1 AND principal_id = $2", kind, principal_id
                )
            )

        result: int = await self._run(job)
        return result


def _line(row: asyncpg.Record) -> ProductLine:
    return ProductLine(row["model"], row["name"], dt(row["created_at"]), int(row["devices"]))


async def _clashes(
    conn: _Conn,
    row: _Checked,
    models: set[str],
    digest: str,
    seen_ids: dict[str, int],
    seen_serials: dict[tuple[str, str], int],
    seen_codes: dict[str, int],
) -> list[tuple[str, str]]:
    """What makes a well-formed row clash with the registry or an earlier row."""
    device = row.device
    errors: list[tuple[str, str]] = []
    if device.model not in models:
        errors.append(
            (
                "model",
                f"unknown model {device.model!r}: register its product line first "
                "(fixloop products add MODEL)",
            )
        )
    if device.device_id in seen_ids:
        errors.append(
            ("device_id", f"{device.device_id!r} is also row {seen_ids[device.device_id] + 1}")
        )
    elif await conn.fetchval(
        "SELECT 1 FROM registry WHERE device_id = $1 UNION ALL "
        "SELECT 1 FROM devices WHERE device_id = $1",
        device.device_id,
    ):
        errors.append(("device_id", f"{device.device_id!r} is registered already"))
    serial = (device.model, device.serial)
    if serial in seen_serials:
        errors.append(
            (
                "serial",
                f"duplicate serial {device.serial!r} of {device.model}: also row "
                f"{seen_serials[serial] + 1}",
            )
        )
    elif await conn.fetchval(
        "SELECT 1 FROM registry WHERE model = $1 AND serial = $2", device.model, device.serial
    ):
        errors.append(
            ("serial", f"duplicate serial {device.serial!r}: a {device.model} has it already")
        )
    if digest in seen_codes or await conn.fetchval(
        "SELECT 1 FROM registry WHERE claim_hash = $1", digest
    ):
        errors.append(("claim_code", "another device has this claim code"))
    return errors
