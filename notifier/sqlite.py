"""The SQLite case store (notifier; the default :class:`~notifier.store.CaseStore`).

The owner loop, the owner API and the dashboard keep cases, appointments, ratings,
owners, the device registry, push channels, notifications, tasks and the audit trail
here. One file in WAL mode serves a small install; :class:`notifier.postgres.PostgresStore`
takes over for a large fleet behind the same protocol.

How it works:

* **One connection, one thread.** A connection belongs to the thread that made it, so
  every statement runs on a dedicated worker thread (a one-thread executor) and the
  event loop only awaits it. The worker runs one job at a time, so a job's transaction
  never interleaves with another job of the same store; ``BEGIN IMMEDIATE`` and
  ``busy_timeout`` keep other processes on the same file out of the way.
* **Migrations.** ``schema_version`` holds the file's version; :data:`MIGRATIONS` are the
  steps, oldest first, rendered for SQLite from :data:`notifier.schema.STEPS`. Opening
  an older file applies the missing steps in one transaction; a file from a newer
  fixloop is refused with :class:`~wire.errors.ConfigError`.
* **Rows** (:mod:`notifier.rows`, shared with the PostgreSQL store). Datetimes are ISO
  8601 UTC text with microseconds (fixed width, so text order is time order) and come
  back UTC-aware; tuples, dicts and sets are JSON; local times are ``HH:MM``.
* **Rules in the schema.** One open case per device and fault is a partial unique index
  over the open states; a case move is a compare-and-set ``UPDATE ... WHERE state = ?``;
  a booking checks for overlapping visits of the technician inside ``BEGIN IMMEDIATE``,
  and a release frees a booked visit only while it has not started, in the same way;
  one rating per case is the ratings table's key. Appointments, ratings and tasks need
  their case (:class:`~notifier.errors.NotFoundError` otherwise).
* **Owner data.** API tokens are kept as SHA-256 only. Erasure deletes with
  ``secure_delete`` on and checkpoints the write-ahead log, so erased contacts do not
  linger in the file. Nothing here logs contacts, names or tokens.

Errors: a locked or failing database raises :class:`~wire.errors.StoreUnavailableError`
(retry), a record that breaks a rule :class:`~notifier.errors.InvalidRequestError`, a
file that cannot be opened or migrated :class:`~wire.errors.ConfigError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Self, TypeVar

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
from notifier.registry import SqliteRegistry
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
from notifier.store import CaseTimer, NewMessage, Principal
from wire.errors import ConfigError, StoreUnavailableError

__all__ = ["ERASED_OWNER", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

#: What an erased owner's cases keep as their owner id.
ERASED_OWNER: Final = "erased"

_PRINCIPAL_KINDS: Final = frozenset(("owner", "technician", "ops"))
_OPEN: Final = tuple(sorted(OPEN_STATES))

#: Schema steps for SQLite, oldest first (:data:`notifier.schema.STEPS`): step ``n`` (from
#: 1) takes a file from version ``n - 1`` to ``n``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = render("sqlite")
#: The schema version this code writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)


# -- the store -----------------------------------------------------------------------------


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join('?' for _ in values)})"


def _owner_only(path: Path) -> None:
    """Create the database file readable by its owner only (0600), or make it so.

    It holds owners' names, contacts and push tokens; SQLite gives the write-ahead log
    and shared-memory files the database file's mode.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        for one in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if one.exists() and one.stat().st_mode & 0o077:
                one.chmod(0o600)
                _LOG.info("case store file %s made readable by its owner only", one.name)
    except OSError as exc:
        raise ConfigError(f"cannot open the case store {path}: {exc}") from exc


def _anonymise_devices(conn: sqlite3.Connection, case_ids: Sequence[str], devices: set[str]) -> int:
    """Give an erased owner's cases anonymous device ids, also where text quotes them.

    Each device gets one new random id (``anon-`` and 16 hex digits) across the owner's
    cases, so the fleet's statistics keep counting one device as one, while nothing
    leads back to the device, and so to its owner. Only the owner's own cases change: a
    device sold on keeps its id in its new owner's cases.
    """
    touched = 0
    replacements = [(device, f"anon-{secrets.token_hex(8)}") for device in sorted(devices)]
    for first in range(0, len(case_ids), 500):
        chunk = list(case_ids[first : first + 500])
        for old, new in replacements:
            touched += conn.execute(
                f"UPDATE cases SET device_id = ? WHERE device_id = ? AND {_in('case_id', chunk)}",
                [new, old, *chunk],
            ).rowcount
            for table, column in (
                ("audit", "evidence"),
                ("audit", "reason"),
                ("tasks", "reason"),
                ("appointments", "note"),
            ):
                touched += conn.execute(
                    f"UPDATE {table} SET {column} = REPLACE({column}, ?, ?) "
                    f"WHERE instr({column}, ?) > 0 AND {_in('case_id', chunk)}",
                    [old, new, old, *chunk],
                ).rowcount
    return touched


def _upsert(conn: sqlite3.Connection, table: str, key: str, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join(f":{column}" for column in row)
    updates = ", ".join(f"{column} = excluded.{column}" for column in row if column != key)
    conn.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}",
        row,
    )


def _insert(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join(f":{column}" for column in row)
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)


@contextmanager
def _transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """One transaction: ``BEGIN IMMEDIATE`` takes the write lock before the first read."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _link_subject(conn: sqlite3.Connection, issuer: str, subject: str, owner_id: str) -> str:
    """Link a subject unless it is linked; return the owner it stands for (in a transaction)."""
    if not issuer or not subject:
        raise InvalidRequestError("an issuer and a subject are needed")
    conn.execute(
        "INSERT INTO owner_subjects (issuer, subject, owner_id, linked_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (issuer, subject) DO NOTHING",
        (issuer, subject, owner_id, ts(datetime.now(UTC))),
    )
    row = conn.execute(
        "SELECT owner_id FROM owner_subjects WHERE issuer = ? AND subject = ?", (issuer, subject)
    ).fetchone()
    return str(row[0])


def _add_message(conn: sqlite3.Connection, message: NewMessage) -> Notification | None:
    """:meth:`SqliteStore.add_message` inside its transaction."""
    notification, key, max_per_day = message.notification, message.key, message.max_per_day
    holder, claim_until, since = message.holder, message.claim_until, message.since
    if (
        conn.execute("SELECT 1 FROM owners WHERE owner_id = ?", (notification.owner_id,)).fetchone()
        is None
    ):
        return None
    if conn.execute("SELECT 1 FROM notifications WHERE idem_key = ?", (key,)).fetchone():
        return None
    if notification.status == "queued" and max_per_day is not None:
        pushed = conn.execute(
            "SELECT count(*) FROM notifications WHERE owner_id = ? AND created_at >= ? "
            "AND status IN ('sent', 'queued', 'failed')",
            (notification.owner_id, ts(since or notification.created_at)),
        ).fetchone()[0]
        if pushed >= max_per_day:
            notification = replace(notification, status="held")
    queued = notification.status == "queued"
    row = {
        **notification_row(notification),
        "idem_key": key,
        "claimed_by": holder if queued else None,
        "claimed_until": ts(claim_until) if queued else None,
    }
    _insert(conn, "notifications", row)
    return notification


def _constraint(exc: sqlite3.IntegrityError) -> str:
    return getattr(exc, "sqlite_errorname", "")


def _raise_missing_case(exc: sqlite3.IntegrityError, case_id: str) -> NoReturn:
    """Raise :class:`NotFoundError` for a record whose case is missing, else ``exc``."""
    if _constraint(exc) == "SQLITE_CONSTRAINT_FOREIGNKEY":
        raise NotFoundError(f"no case {case_id!r}") from exc
    raise exc


class SqliteStore:
    """The case store in one SQLite file (WAL mode), or in memory for tests.

    Use as ``async with SqliteStore(path) as store:``, or ``store = await
    SqliteStore(path).open()`` and later ``await store.close()``. Implements
    :class:`~notifier.store.CaseStore`.

    Args:
        path: the database file (created if missing, its folder must exist), or
            ``":memory:"`` for a private in-memory store.
        busy_timeout_s: how long a statement waits for another process's lock before
            :class:`~wire.errors.StoreUnavailableError`.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        if busy_timeout_s < 0:
            raise ConfigError(f"busy_timeout_s must not be negative, not {busy_timeout_s}")
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Open the file, set it up (WAL, foreign keys, busy timeout) and migrate it.

        Returns:
            The store itself.

        Raises:
            ConfigError: the file cannot be opened, is not a case store, comes from a
                newer fixloop, or a migration failed (the file is left as it was).
        """
        if self._conn is not None:
            return self
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-store")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        return self

    async def close(self) -> None:
        """Close the connection and stop the worker thread (closing twice is harmless)."""
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if executor is None:
            return
        try:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _connect(self) -> sqlite3.Connection:
        """Open and migrate the database (on the worker thread)."""
        where = str(self._path)
        if where != ":memory:" and not where.startswith("file:"):
            _owner_only(Path(where))
        try:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the case store {where}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal" and where != ":memory:":
                _LOG.warning("case store %s runs in journal mode %s, not WAL", where, mode)
            conn.execute("PRAGMA foreign_keys = ON")
            # Erased owner data is overwritten with zeros rather than left in free space.
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn, where)
        except ConfigError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigError(f"cannot open the case store {where}: {exc}") from exc
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection, where: str) -> None:
        steps = MIGRATIONS  # read at open time, so that tests can add a step
        with _transaction(conn):
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "schema_version" in tables:
                version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
            elif tables:
                raise ConfigError(
                    f"{where} is an SQLite file but not a fixloop case store "
                    "(it has no schema_version table)"
                )
            else:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            if version > len(steps):
                raise ConfigError(
                    f"the case store {where} has schema version {version}, but this fixloop "
                    f"knows versions up to {len(steps)}: run a newer fixloop, or point it "
                    "at another file"
                )
            for number in range(version + 1, len(steps) + 1):
                try:
                    for statement in steps[number - 1]:
                        conn.execute(statement)
                except sqlite3.Error as exc:
                    raise ConfigError(
                        f"migrating the case store {where} to version {number} failed "
                        f"(the file is left at version {version}): {exc}"
                    ) from exc
                conn.execute("UPDATE schema_version SET version = ?", (number,))
        if version < len(steps):
            _LOG.info(
                "case store %s migrated from schema version %d to %d", where, version, len(steps)
            )

    async def _run(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``job`` with the connection on the worker thread."""
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise StoreUnavailableError("the case store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job, conn)
        except sqlite3.IntegrityError as exc:
            raise InvalidRequestError(f"the record breaks a rule of the case store: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the case store failed: {exc}") from exc

    def registry(self) -> SqliteRegistry:
        """The device registry kept in this file (:mod:`notifier.registry`)."""
        return SqliteRegistry(self._run)

    # -- owners, tokens, devices, channels -----------------------------------------------------

    async def put_owner(self, owner: Owner) -> None:
        """Insert or replace an owner."""
        row = owner_row(owner)
        await self._run(lambda conn: _upsert(conn, "owners", "owner_id", row))

    async def get_owner(self, owner_id: str) -> Owner | None:
        """Return an owner."""

        def job(conn: sqlite3.Connection) -> Owner | None:
            row = conn.execute("SELECT * FROM owners WHERE owner_id = ?", (owner_id,)).fetchone()
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

        def job(conn: sqlite3.Connection) -> Principal | None:
            row = conn.execute(
                "SELECT kind, principal_id FROM tokens WHERE token_sha256 = ?", (digest,)
            ).fetchone()
            return None if row is None else (row["kind"], row["principal_id"])

        return await self._run(job)

    async def owner_of_subject(self, issuer: str, subject: str) -> str | None:
        """Return the owner an identity provider's subject stands for, or ``None``."""

        def job(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT owner_id FROM owner_subjects WHERE issuer = ? AND subject = ?",
                (issuer, subject),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._run(job)

    async def link_subject(self, issuer: str, subject: str, owner_id: str) -> None:
        """Link a provider's subject to an existing owner (an owner may have several).

        Linking a subject again to the same owner changes nothing.

        Raises:
            NotFoundError: there is no such owner.
            ConflictError: the subject stands for another owner already.
        """

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                known = conn.execute("SELECT 1 FROM owners WHERE owner_id = ?", (owner_id,))
                if known.fetchone() is None:
                    raise NotFoundError(f"there is no owner {owner_id}")
                linked = _link_subject(conn, issuer, subject, owner_id)
            if linked != owner_id:
                raise ConflictError("that subject stands for another owner already")

        await self._run(job)

    async def adopt_subject(self, issuer: str, subject: str, owner: Owner) -> str:
        """Return the subject's owner id, storing ``owner`` for it first if it has none.

        One transaction: two first sign-ins of one subject at once make one owner.
        """

        def job(conn: sqlite3.Connection) -> str:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT owner_id FROM owner_subjects WHERE issuer = ? AND subject = ?",
                    (issuer, subject),
                ).fetchone()
                if row is not None:
                    return str(row[0])
                _upsert(conn, "owners", "owner_id", owner_row(owner))
                return _link_subject(conn, issuer, subject, owner.owner_id)

        return await self._run(job)

    async def subjects_of(self, owner_id: str) -> list[tuple[str, str]]:
        """Return the provider subjects (``iss``, ``sub``) linked to an owner, sorted."""

        def job(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT issuer, subject FROM owner_subjects WHERE owner_id = ? "
                "ORDER BY issuer, subject",
                (owner_id,),
            )
            return [(str(row[0]), str(row[1])) for row in rows]

        return await self._run(job)

    async def unlink_subject(self, issuer: str, subject: str, owner_id: str) -> bool:
        """Unlink a provider's subject from an owner.

        The owner's tokens of that subject stop working at once (each request looks the
        link up); the owner and their data stay.

        Returns:
            ``False`` when the subject was not linked to this owner (nothing changed).
        """

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                gone = conn.execute(
                    "DELETE FROM owner_subjects WHERE issuer = ? AND subject = ? AND owner_id = ?",
                    (issuer, subject, owner_id),
                )
                return gone.rowcount > 0

        return await self._run(job)

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device registry entry."""
        row = device_row(device)
        await self._run(lambda conn: _upsert(conn, "devices", "device_id", row))

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return a device's registry entry."""

        def job(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            return None if row is None else device_from(row)

        return await self._run(job)

    async def devices(self, owner_id: str | None = None) -> list[DeviceRecord]:
        """Return the devices of one owner, or all, by device id."""

        def job(conn: sqlite3.Connection) -> list[DeviceRecord]:
            if owner_id is None:
                rows = conn.execute("SELECT * FROM devices ORDER BY device_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM devices WHERE owner_id = ? ORDER BY device_id", (owner_id,)
                )
            return [device_from(row) for row in rows]

        return await self._run(job)

    async def put_channel(self, channel: PushChannel) -> None:
        """Insert or replace a push channel."""
        row = channel_row(channel)
        await self._run(lambda conn: _upsert(conn, "channels", "channel_id", row))

    async def channels(self, owner_id: str, *, active_only: bool = True) -> list[PushChannel]:
        """Return an owner's push channels, oldest first (unknown times first)."""

        def job(conn: sqlite3.Connection) -> list[PushChannel]:
            where = "owner_id = ? AND active = 1" if active_only else "owner_id = ?"
            rows = conn.execute(
                f"SELECT * FROM channels WHERE {where} ORDER BY created_at, rowid", (owner_id,)
            )
            return [channel_from(row) for row in rows]

        return await self._run(job)

    async def update_channel_state(self, channel_id: str, *, active: bool, failures: int) -> bool:
        """Change a stored channel's ``active`` and ``failures`` only; never re-create it."""
        if failures < 0:
            raise InvalidRequestError(f"failures must not be negative, got {failures}")

        def job(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE channels SET active = ?, failures = ? WHERE channel_id = ?",
                (int(active), failures, channel_id),
            )
            return cursor.rowcount > 0

        return await self._run(job)

    async def delete_channel(self, owner_id: str, channel_id: str) -> bool:
        """Delete one of an owner's push channels (with ``secure_delete``: zeroed on disk).

        Audit evidence of the owner's cases that quotes the channel's target or a key is
        masked first, as an export would show it, so nothing of the channel stays.
        """

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT * FROM channels WHERE channel_id = ? AND owner_id = ?",
                    (channel_id, owner_id),
                ).fetchone()
                if row is None:
                    return False
                secrets = channel_secrets([channel_from(row)])
                trail = conn.execute(
                    "SELECT audit.seq, audit.evidence FROM audit JOIN cases "
                    "ON cases.case_id = audit.case_id WHERE cases.owner_id = ?",
                    (owner_id,),
                ).fetchall()
                for seq, text in trail:
                    evidence = json.loads(text)
                    masked = redacted(evidence, secrets)
                    if masked != evidence:
                        conn.execute(
                            "UPDATE audit SET evidence = ? WHERE seq = ?", (json_text(masked), seq)
                        )
                conn.execute("DELETE FROM channels WHERE channel_id = ?", (channel_id,))
            return True

        deleted = await self._run(job)
        if deleted:
            _LOG.info("deleted push channel %s", channel_id)
        return deleted

    async def use_link(self, link_id: str, expires_at: datetime, *, now: datetime) -> bool:
        """Record a one-tap link's use; ``False`` if it was used before.

        Uses of links expired before ``now`` are forgotten on the way (they no longer work).
        """
        row = {"link_id": link_id, "expires_at": ts(expires_at)}
        cutoff = ts(now)

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM used_links WHERE expires_at < ?", (cutoff,))
                cursor = conn.execute(
                    "INSERT INTO used_links (link_id, expires_at) VALUES (:link_id, :expires_at) "
                    "ON CONFLICT (link_id) DO NOTHING",
                    row,
                )
                return cursor.rowcount > 0

        return await self._run(job)

    # -- cases and the audit trail -------------------------------------------------------------

    async def add_case(self, case: Case) -> None:
        """Insert a new case.

        Raises:
            ConflictError: a case with that id exists, or an open case for the same
                device and fault exists (one open case per device and fault).
        """
        row = case_row(case)

        def job(conn: sqlite3.Connection) -> None:
            try:
                _insert(conn, "cases", row)
            except sqlite3.IntegrityError as exc:
                if _constraint(exc) == "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise ConflictError(f"case {case.case_id!r} exists") from exc
                if _constraint(exc) == "SQLITE_CONSTRAINT_UNIQUE":
                    raise ConflictError(
                        f"device {case.device_id!r} has an open case for {case.fault!r}"
                    ) from exc
                raise

        await self._run(job)

    async def get_case(self, case_id: str) -> Case | None:
        """Return a case."""

        def job(conn: sqlite3.Connection) -> Case | None:
            row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else case_from(row)

        return await self._run(job)

    async def open_case(self, device_id: str, fault: str) -> Case | None:
        """Return the open case of a device and fault, if any."""

        def job(conn: sqlite3.Connection) -> Case | None:
            row = conn.execute(
                f"SELECT * FROM cases WHERE device_id = ? AND fault = ? AND {_in('state', _OPEN)}",
                (device_id, fault, *_OPEN),
            ).fetchone()
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
        owner are kept (or lost) together.

        Returns:
            Each message as kept (``None``: its key was kept before, or no owner).

        Raises:
            ConflictError: the stored case moved on (or does not exist), or the new
                state would give the device a second open case for the fault.
        """
        row = case_row(case)
        updates = ", ".join(f"{column} = :{column}" for column in row if column != "case_id")
        params = {**row, "expected_state": expected_state}

        entries = [] if audit is None else [audit] if isinstance(audit, AuditEntry) else audit
        entry_rows = [audit_row(entry) for entry in entries]

        def job(conn: sqlite3.Connection) -> list[Notification | None]:
            with _transaction(conn):
                try:
                    cursor = conn.execute(
                        f"UPDATE cases SET {updates} "
                        "WHERE case_id = :case_id AND state = :expected_state",
                        params,
                    )
                except sqlite3.IntegrityError as exc:
                    if _constraint(exc) == "SQLITE_CONSTRAINT_UNIQUE":
                        raise ConflictError(
                            f"device {case.device_id!r} has another open case for {case.fault!r}"
                        ) from exc
                    raise
                if cursor.rowcount == 0:
                    raise ConflictError(
                        f"case {case.case_id!r} is not in state {expected_state!r} "
                        "(or does not exist)"
                    )
                for entry_row in entry_rows:
                    _insert(conn, "audit", entry_row)
                return [_add_message(conn, message) for message in messages]

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
        clauses: list[str] = []
        params: list[Any] = []
        if owner_id is not None:
            clauses.append("owner_id = ?")
            params.append(owner_id)
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if states is not None:
            if not states:
                return []
            clauses.append(_in("state", states))
            params.extend(states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(limit, 0))

        def job(conn: sqlite3.Connection) -> list[Case]:
            rows = conn.execute(
                f"SELECT * FROM cases {where} ORDER BY opened_at DESC, case_id DESC LIMIT ?",
                params,
            )
            return [case_from(row) for row in rows]

        return await self._run(job)

    async def add_audit(self, entry: AuditEntry) -> None:
        """Append to the audit trail (never changed or removed, except by erasure)."""
        row = audit_row(entry)
        await self._run(lambda conn: _insert(conn, "audit", row))

    async def audit(self, case_id: str) -> list[AuditEntry]:
        """Return a case's audit trail, oldest first (entries of one instant as written)."""

        def job(conn: sqlite3.Connection) -> list[AuditEntry]:
            rows = conn.execute(
                "SELECT * FROM audit WHERE case_id = ? ORDER BY at, seq", (case_id,)
            )
            return [audit_from(row) for row in rows]

        return await self._run(job)

    # -- notifiers side by side: leases and timers ---------------------------------------------
    # One process holds the file's write lock at a time (BEGIN IMMEDIATE), so a lease or a
    # timer is taken by a plain read-then-write; the same calls as PostgreSQL's.

    async def take_lease(self, key: str, holder: str, *, now: datetime, until: datetime) -> bool:
        """Take (or extend) the lease on ``key`` for ``holder``; ``False`` while another's runs."""
        params = {"key": key, "holder": holder, "now": ts(now), "until": ts(until)}

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO case_leases (lease_key, holder, until_at) "
                    "VALUES (:key, :holder, :until) ON CONFLICT (lease_key) DO UPDATE "
                    "SET holder = excluded.holder, until_at = excluded.until_at "
                    "WHERE case_leases.holder = :holder OR case_leases.until_at < :now",
                    params,
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def drop_lease(self, key: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``key``; ``False`` if it was no longer theirs."""

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM case_leases WHERE lease_key = ? AND holder = ?", (key, holder)
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def set_timer(self, timer: CaseTimer, *, replace: bool = True) -> None:
        """Set a case's timer (``replace=False``: only if it has none)."""
        row = {"case_id": timer.case_id, "what": timer.what, "due_at": ts(timer.due)}
        conflict = "DO UPDATE SET what = excluded.what, due_at = excluded.due_at"

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "INSERT INTO case_timers (case_id, what, due_at) "
                    "VALUES (:case_id, :what, :due_at) "
                    f"ON CONFLICT (case_id) {conflict if replace else 'DO NOTHING'}",
                    row,
                )

        await self._run(job)

    async def get_timer(self, case_id: str) -> CaseTimer | None:
        """Return a case's timer."""

        def job(conn: sqlite3.Connection) -> CaseTimer | None:
            row = conn.execute("SELECT * FROM case_timers WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else timer_from(row)

        return await self._run(job)

    async def take_timers(
        self, *, now: datetime, hold_until: datetime, limit: int
    ) -> list[CaseTimer]:
        """Take up to ``limit`` due timers, pushing each forward to ``hold_until``."""
        hold = ts(hold_until)

        def job(conn: sqlite3.Connection) -> list[CaseTimer]:
            with _transaction(conn):
                rows = conn.execute(
                    "SELECT * FROM case_timers WHERE due_at <= ? ORDER BY due_at, case_id LIMIT ?",
                    (ts(now), max(limit, 0)),
                ).fetchall()
                conn.executemany(
                    "UPDATE case_timers SET due_at = ? WHERE case_id = ?",
                    [(hold, row["case_id"]) for row in rows],
                )
            return [replace(timer_from(row), due=hold_until) for row in rows]

        return await self._run(job)

    async def finish_timer(self, timer: CaseTimer) -> bool:
        """Remove a taken timer unless it was set again since."""

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM case_timers WHERE case_id = ? AND due_at = ?",
                    (timer.case_id, ts(timer.due)),
                )
                return cursor.rowcount > 0

        return await self._run(job)

    # -- technicians and appointments ----------------------------------------------------------

    async def put_technician(self, technician: Technician) -> None:
        """Insert or replace a technician."""
        row = technician_row(technician)
        await self._run(lambda conn: _upsert(conn, "technicians", "technician_id", row))

    async def get_technician(self, technician_id: str) -> Technician | None:
        """Return a technician."""

        def job(conn: sqlite3.Connection) -> Technician | None:
            row = conn.execute(
                "SELECT * FROM technicians WHERE technician_id = ?", (technician_id,)
            ).fetchone()
            return None if row is None else technician_from(row)

        return await self._run(job)

    async def technicians(self, region: str | None = None) -> list[Technician]:
        """Return the technicians (of one region), by id."""

        def job(conn: sqlite3.Connection) -> list[Technician]:
            if region is None:
                rows = conn.execute("SELECT * FROM technicians ORDER BY technician_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM technicians WHERE region = ? ORDER BY technician_id", (region,)
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

        def job(conn: sqlite3.Connection) -> None:
            try:
                _upsert(conn, "appointments", "appointment_id", row)
            except sqlite3.IntegrityError as exc:
                _raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def book(self, appointment: Appointment) -> None:
        """Store an appointment as ``booked``, atomically refusing a double booking.

        Visits are half-open ``[start, end)``: one may start when another ends.

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

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                clash = conn.execute(
                    "SELECT appointment_id FROM appointments "
                    "WHERE technician_id = ? AND state = 'booked' AND appointment_id != ? "
                    "AND start_at < ? AND end_at > ? LIMIT 1",
                    (row["technician_id"], row["appointment_id"], row["end_at"], row["start_at"]),
                ).fetchone()
                if clash is not None:
                    raise ConflictError(
                        f"technician {appointment.technician_id!r} is booked then "
                        f"(appointment {clash[0]!r})"
                    )
                try:
                    _upsert(conn, "appointments", "appointment_id", row)
                except sqlite3.IntegrityError as exc:
                    _raise_missing_case(exc, appointment.case_id)

        await self._run(job)

    async def release(self, appointment_id: str, *, now: datetime) -> Appointment:
        """Cancel a booked visit that has not started, freeing the technician's time.

        The check and the change are one ``BEGIN IMMEDIATE`` transaction, so a release
        never interleaves with a :meth:`book` of the same time: whichever comes second
        sees the first.

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
        cutoff = ts(now)

        def job(conn: sqlite3.Connection) -> Appointment:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT * FROM appointments WHERE appointment_id = ?", (appointment_id,)
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"no appointment {appointment_id!r}")
                appointment = appointment_from(row)
                if appointment.state != "booked":
                    raise ConflictError(f"the visit is {appointment.state}, not booked")
                if row["start_at"] is None or row["start_at"] <= cutoff:
                    raise ConflictError("the visit has started already")
                conn.execute(
                    "UPDATE appointments SET state = 'cancelled' "
                    "WHERE appointment_id = ? AND state = 'booked'",
                    (appointment_id,),
                )
            return replace(appointment, state="cancelled")

        return await self._run(job)

    async def get_appointment(self, appointment_id: str) -> Appointment | None:
        """Return an appointment."""

        def job(conn: sqlite3.Connection) -> Appointment | None:
            row = conn.execute(
                "SELECT * FROM appointments WHERE appointment_id = ?", (appointment_id,)
            ).fetchone()
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
        clauses: list[str] = []
        params: list[Any] = []
        if technician_id is not None:
            clauses.append("technician_id = ?")
            params.append(technician_id)
        if case_id is not None:
            clauses.append("case_id = ?")
            params.append(case_id)
        if states is not None:
            if not states:
                return []
            clauses.append(_in("state", states))
            params.extend(states)
        if since is not None:
            clauses.append("start_at >= ?")
            params.append(ts(since))
        if until is not None:
            clauses.append("start_at < ?")
            params.append(ts(until))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def job(conn: sqlite3.Connection) -> list[Appointment]:
            rows = conn.execute(
                f"SELECT * FROM appointments {where} "
                "ORDER BY start_at IS NULL, start_at, appointment_id",
                params,
            )
            return [appointment_from(row) for row in rows]

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

        def job(conn: sqlite3.Connection) -> None:
            try:
                _insert(conn, "ratings", row)
            except sqlite3.IntegrityError as exc:
                if _constraint(exc) == "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise ConflictError(f"case {rating.case_id!r} is rated already") from exc
                if _constraint(exc) == "SQLITE_CONSTRAINT_CHECK":
                    raise InvalidRequestError(
                        f"a rating is 1 to 5 stars, not {rating.stars}"
                    ) from exc
                _raise_missing_case(exc, rating.case_id)

        await self._run(job)

    async def get_rating(self, case_id: str) -> Rating | None:
        """Return a case's rating."""

        def job(conn: sqlite3.Connection) -> Rating | None:
            row = conn.execute("SELECT * FROM ratings WHERE case_id = ?", (case_id,)).fetchone()
            return None if row is None else rating_from(row)

        return await self._run(job)

    async def ratings(self, since: datetime | None = None) -> list[Rating]:
        """Return ratings, oldest first (``since`` inclusive)."""
        bound = ts_opt(since)

        def job(conn: sqlite3.Connection) -> list[Rating]:
            if bound is None:
                rows = conn.execute("SELECT * FROM ratings ORDER BY at, case_id")
            else:
                rows = conn.execute(
                    "SELECT * FROM ratings WHERE at >= ? ORDER BY at, case_id", (bound,)
                )
            return [rating_from(row) for row in rows]

        return await self._run(job)

    async def add_notification(self, notification: Notification) -> None:
        """Insert or replace a notification, while its owner exists.

        A delivery still under way when its owner erased their data finishes by storing
        its outcome: checked in the same step as the write, an erased owner's message is
        dropped rather than brought back (with their name and the device's label).
        """
        row = notification_row(notification)

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                known = conn.execute(
                    "SELECT 1 FROM owners WHERE owner_id = ?", (notification.owner_id,)
                ).fetchone()
                if known is None:
                    _LOG.info(
                        "notification %s not kept: its owner is gone",
                        notification.notification_id,
                    )
                    return
                _upsert(conn, "notifications", "notification_id", row)

        await self._run(job)

    async def notifications(
        self, owner_id: str, *, status: str | None = None, since: datetime | None = None
    ) -> list[Notification]:
        """Return an owner's notifications, oldest first (``since`` inclusive)."""
        clauses = ["owner_id = ?"]
        params: list[Any] = [owner_id]
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(ts(since))
        where = " AND ".join(clauses)

        def job(conn: sqlite3.Connection) -> list[Notification]:
            rows = conn.execute(
                f"SELECT * FROM notifications WHERE {where} ORDER BY created_at, notification_id",
                params,
            )
            return [notification_from(row) for row in rows]

        return await self._run(job)

    async def queued_notifications(self, *, before: datetime, limit: int) -> list[Notification]:
        """Return every owner's notifications still ``queued`` created before ``before``.

        Oldest first, at most ``limit``: what no delivery took, because the message was
        written by another process (the dashboard's ops messages), the notifier stopped
        before delivering it, or the store was away when the outcome was to be kept.
        """

        def job(conn: sqlite3.Connection) -> list[Notification]:
            rows = conn.execute(
                "SELECT * FROM notifications WHERE status = 'queued' AND created_at < ?"
                " ORDER BY created_at, notification_id LIMIT ?",
                (ts(before), limit),
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
        """Keep a new owner message once per ``key`` (held past ``max_per_day``)."""

        def job(conn: sqlite3.Connection) -> Notification | None:
            with _transaction(conn):
                return _add_message(
                    conn, NewMessage(notification, key, holder, claim_until, max_per_day, since)
                )

        return await self._run(job)

    async def claim_notification(
        self, notification_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Claim a ``queued`` message for delivery unless another holder's claim runs."""

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cursor = conn.execute(
                    "UPDATE notifications SET claimed_by = :holder, claimed_until = :until "
                    "WHERE notification_id = :id AND status = 'queued' AND "
                    "(claimed_by IS NULL OR claimed_by = :holder OR claimed_until < :now)",
                    {"holder": holder, "until": ts(until), "id": notification_id, "now": ts(now)},
                )
                return cursor.rowcount > 0

        return await self._run(job)

    async def claim_queued(
        self, holder: str, *, now: datetime, until: datetime, before: datetime, limit: int
    ) -> list[Notification]:
        """Claim up to ``limit`` unclaimed ``queued`` messages created before ``before``."""

        def job(conn: sqlite3.Connection) -> list[Notification]:
            with _transaction(conn):
                rows = conn.execute(
                    "SELECT * FROM notifications WHERE status = 'queued' AND created_at < ? "
                    "AND (claimed_by IS NULL OR claimed_until < ?) "
                    "ORDER BY created_at, notification_id LIMIT ?",
                    (ts(before), ts(now), max(limit, 0)),
                ).fetchall()
                conn.executemany(
                    "UPDATE notifications SET claimed_by = ?, claimed_until = ? "
                    "WHERE notification_id = ?",
                    [(holder, ts(until), row["notification_id"]) for row in rows],
                )
            return [notification_from(row) for row in rows]

        return await self._run(job)

    async def held_owners(self, *, limit: int = 1000) -> list[str]:
        """Owners with ``held`` messages."""

        def job(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT owner_id FROM notifications WHERE status = 'held' "
                "ORDER BY owner_id LIMIT ?",
                (max(limit, 0),),
            )
            return [str(row[0]) for row in rows]

        return await self._run(job)

    async def add_task(self, task: Task) -> None:
        """Insert or replace a task for a person.

        Raises:
            NotFoundError: its case does not exist.
        """
        row = task_row(task)

        def job(conn: sqlite3.Connection) -> None:
            try:
                _upsert(conn, "tasks", "task_id", row)
            except sqlite3.IntegrityError as exc:
                _raise_missing_case(exc, task.case_id)

        await self._run(job)

    async def tasks(self, *, state: str | None = None, case_id: str | None = None) -> list[Task]:
        """Return tasks, oldest first."""
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if case_id is not None:
            clauses.append("case_id = ?")
            params.append(case_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def job(conn: sqlite3.Connection) -> list[Task]:
            rows = conn.execute(f"SELECT * FROM tasks {where} ORDER BY created_at, task_id", params)
            return [task_from(row) for row in rows]

        return await self._run(job)

    # -- the owner's rights --------------------------------------------------------------------

    async def export_owner(self, owner_id: str) -> dict[str, Any]:
        """Return everything kept about an owner, as JSON-serialisable data.

        Keys: ``owner`` (``None`` for an unknown owner), ``devices``, ``channels`` (kind
        and a masked target, no secrets), ``cases`` (each with its ``audit`` trail, where
        evidence quoting a channel's target or key shows the mask instead),
        ``appointments``, ``ratings``, ``notifications`` and ``tasks``. Datetimes are ISO
        8601 UTC text, local times ``HH:MM``. API tokens are not exported: only their
        hashes are kept.
        """

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            # one read transaction: a consistent picture even while the loop writes
            with _transaction(conn, immediate=False):
                owner = conn.execute(
                    "SELECT * FROM owners WHERE owner_id = ?", (owner_id,)
                ).fetchone()
                devices = conn.execute(
                    "SELECT * FROM devices WHERE owner_id = ? ORDER BY device_id", (owner_id,)
                ).fetchall()
                channels = [
                    channel_from(row)
                    for row in conn.execute(
                        "SELECT * FROM channels WHERE owner_id = ? ORDER BY created_at, rowid",
                        (owner_id,),
                    )
                ]
                # the audit trail's evidence may quote a target or key: masked like the channels
                secrets = channel_secrets(channels)
                cases = [
                    case_from(row)
                    for row in conn.execute(
                        "SELECT * FROM cases WHERE owner_id = ? ORDER BY opened_at, case_id",
                        (owner_id,),
                    )
                ]
                ids = [case.case_id for case in cases]
                case_rows: list[dict[str, Any]] = []
                for case in cases:
                    trail = conn.execute(
                        "SELECT * FROM audit WHERE case_id = ? ORDER BY at, seq", (case.case_id,)
                    )
                    audit = [redacted(plain(audit_from(row)), secrets) for row in trail]
                    case_rows.append({**plain(case), "audit": audit})
                appointments = self._of_cases(
                    conn, "appointments", ids, "start_at IS NULL, start_at, appointment_id"
                )
                ratings = self._of_cases(conn, "ratings", ids, "at, case_id")
                tasks = self._of_cases(conn, "tasks", ids, "created_at, task_id")
                notifications = conn.execute(
                    "SELECT * FROM notifications WHERE owner_id = ? "
                    "ORDER BY created_at, notification_id",
                    (owner_id,),
                ).fetchall()
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

    @staticmethod
    def _of_cases(
        conn: sqlite3.Connection, table: str, case_ids: list[str], order: str
    ) -> list[sqlite3.Row]:
        rows: list[sqlite3.Row] = []
        # chunks stay below SQLite's limit on host parameters
        for first in range(0, len(case_ids), 500):
            chunk = case_ids[first : first + 500]
            rows.extend(
                conn.execute(
                    f"SELECT * FROM {table} WHERE {_in('case_id', chunk)} ORDER BY {order}", chunk
                )
            )
        return rows

    async def erase_owner(self, owner_id: str) -> int:
        """Erase an owner and everything personal about them; return the rows touched.

        Deleted: the owner, their API tokens, links to identity-provider subjects, push
        channels, notifications and the registry entries of their devices. Kept for the
        fleet's statistics: their cases (owner id set to :data:`ERASED_OWNER`, each device
        id replaced by an anonymous ``anon-`` id, also where the trail, tasks and visit
        notes quote it), appointments, tasks, ratings (comments removed) and the audit
        trail (``notify`` entries lose their evidence, which may name contacts). A
        tombstone without any identifier (``owner_erased``, with counts) is added to the
        trail. The write-ahead log is then checkpointed so that the erased data leaves the
        files on disk (deleted content is zeroed by ``secure_delete``).
        """

        def job(conn: sqlite3.Connection) -> int:
            touched = 0
            with _transaction(conn):
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT case_id FROM cases WHERE owner_id = ?", (owner_id,)
                    )
                ]
                devices = {
                    row[0]
                    for row in conn.execute(
                        "SELECT device_id FROM devices WHERE owner_id = ? "
                        "UNION SELECT device_id FROM cases WHERE owner_id = ?",
                        (owner_id, owner_id),
                    )
                }
                touched += _anonymise_devices(conn, ids, devices)
                for sql in (
                    "DELETE FROM owners WHERE owner_id = ?",
                    "DELETE FROM tokens WHERE kind = 'owner' AND principal_id = ?",
                    "DELETE FROM owner_subjects WHERE owner_id = ?",
                    "DELETE FROM invites WHERE owner_id = ?",
                    # the registry's claims and releases name the owner: the events stay
                    "UPDATE audit SET evidence = json_remove(evidence, '$.owner_id') "
                    "WHERE case_id IS NULL AND json_extract(evidence, '$.owner_id') = ?",
                    "DELETE FROM channels WHERE owner_id = ?",
                    "DELETE FROM notifications WHERE owner_id = ?",
                    "DELETE FROM devices WHERE owner_id = ?",
                ):
                    touched += conn.execute(sql, (owner_id,)).rowcount
                touched += conn.execute(
                    "UPDATE cases SET owner_id = ? WHERE owner_id = ?", (ERASED_OWNER, owner_id)
                ).rowcount
                for first in range(0, len(ids), 500):
                    chunk = ids[first : first + 500]
                    touched += conn.execute(
                        "UPDATE ratings SET comment = NULL "
                        f"WHERE comment IS NOT NULL AND {_in('case_id', chunk)}",
                        chunk,
                    ).rowcount
                    touched += conn.execute(
                        "UPDATE audit SET evidence = '{}' WHERE action = 'notify' "
                        f"AND evidence != '{{}}' AND {_in('case_id', chunk)}",
                        chunk,
                    ).rowcount
                conn.execute(
                    "INSERT INTO audit (case_id, at, actor, action, reason, evidence) "
                    "VALUES (NULL, ?, 'system', 'owner_erased', ?, ?)",
                    (
                        ts(datetime.now(UTC)),
                        "an owner's personal data was erased at their request",
                        json_text({"rows": touched, "cases": len(ids), "devices": len(devices)}),
                    ),
                )
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:
                _LOG.warning(
                    "erased owner data stays in the case store's write-ahead log until the "
                    "next checkpoint: a reader held it"
                )
            return touched

        touched = await self._run(job)
        _LOG.info("erased an owner from the case store: %d rows touched", touched)
        return touched
