"""Owners in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

Owners, their API tokens and identity-provider subjects, their devices and push
channels, one-tap links, and the owner's rights: an export of everything kept about
them and erasure.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import DeviceRecord, Owner, PushChannel
from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import row_count, upsert
from notifier.rows import (
    appointment_from,
    audit_from,
    case_from,
    channel_from,
    channel_row,
    channel_secrets,
    device_from,
    device_row,
    exported_channel,
    json_text,
    notification_from,
    owner_from,
    owner_row,
    plain,
    rating_from,
    redacted,
    task_from,
    token_hash,
    ts,
)
from notifier.sqlite import _PRINCIPAL_KINDS, ERASED_OWNER
from notifier.store import Principal

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["OwnerQueries"]

_LOG = logging.getLogger(__name__)


async def _link_subject(conn: Conn, issuer: str, subject: str, owner_id: str) -> str:
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


async def _anonymise_devices(conn: Conn, case_ids: list[str], devices: set[str]) -> int:
    """Give an erased owner's cases anonymous device ids, also where text quotes them.

    As :func:`notifier.sqlite._anonymise_devices`: one new ``anon-`` id per device across
    the owner's cases; only the owner's own cases change.
    """
    touched = 0
    for old in sorted(devices):
        new = f"anon-{secrets.token_hex(8)}"
        touched += row_count(
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
            touched += row_count(
                await conn.execute(
                    f"UPDATE {table} SET {column} = REPLACE({column}, $1, $2) "
                    f"WHERE strpos({column}, $1) > 0 AND case_id = ANY($3::text[])",
                    old,
                    new,
                    case_ids,
                )
            )
    return touched


class OwnerQueries(PooledStore):
    """The owner queries of :class:`~notifier.postgres.PostgresStore`."""

    # -- owners, tokens, devices, channels -----------------------------------------------------

    async def put_owner(self, owner: Owner) -> None:
        """Insert or replace an owner."""
        row = owner_row(owner)
        await self._run(lambda conn: upsert(conn, "owners", "owner_id", row))

    async def get_owner(self, owner_id: str) -> Owner | None:
        """Return an owner."""

        async def job(conn: Conn) -> Owner | None:
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
        await self._run(lambda conn: upsert(conn, "tokens", "token_sha256", row))

    async def resolve_token(self, token: str) -> Principal | None:
        """Return who a token stands for, or ``None`` for an unknown token."""
        digest = token_hash(token)

        async def job(conn: Conn) -> Principal | None:
            row = await conn.fetchrow(
                "SELECT kind, principal_id FROM tokens WHERE token_sha256 = $1", digest
            )
            return None if row is None else (row["kind"], row["principal_id"])

        return await self._run(job)

    async def owner_of_subject(self, issuer: str, subject: str) -> str | None:
        """Return the owner an identity provider's subject stands for, or ``None``."""

        async def job(conn: Conn) -> str | None:
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

        async def job(conn: Conn) -> str:
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

        async def job(conn: Conn) -> str:
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
                    await upsert(conn, "owners", "owner_id", owner_row(owner))
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

        async def job(conn: Conn) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT issuer, subject FROM owner_subjects WHERE owner_id = $1 "
                "ORDER BY issuer, subject",
                owner_id,
            )
            return [(str(row[0]), str(row[1])) for row in rows]

        return await self._run(job)

    async def unlink_subject(self, issuer: str, subject: str, owner_id: str) -> bool:
        """Unlink a provider's subject from an owner; ``False`` if it was not theirs."""

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM owner_subjects WHERE issuer = $1 AND subject = $2 AND owner_id = $3",
                issuer,
                subject,
                owner_id,
            )
            return row_count(status) > 0

        return await self._run(job)

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device registry entry."""
        row = device_row(device)
        await self._run(lambda conn: upsert(conn, "devices", "device_id", row))

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """Return a device's registry entry."""

        async def job(conn: Conn) -> DeviceRecord | None:
            row = await conn.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
            return None if row is None else device_from(row)

        return await self._run(job)

    async def devices(self, owner_id: str | None = None) -> list[DeviceRecord]:
        """Return the devices of one owner, or all, by device id."""

        async def job(conn: Conn) -> list[DeviceRecord]:
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
        await self._run(lambda conn: upsert(conn, "channels", "channel_id", row))

    async def channels(self, owner_id: str, *, active_only: bool = True) -> list[PushChannel]:
        """Return an owner's push channels, oldest first (unknown times first)."""
        where = "owner_id = $1 AND active = 1" if active_only else "owner_id = $1"

        async def job(conn: Conn) -> list[PushChannel]:
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

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE channels SET active = $1, failures = $2 WHERE channel_id = $3",
                int(active),
                failures,
                channel_id,
            )
            return row_count(status) > 0

        return await self._run(job)

    async def delete_channel(self, owner_id: str, channel_id: str) -> bool:
        """Delete one of an owner's push channels, masking it in their cases' audit trail."""

        async def job(conn: Conn) -> bool:
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

        async def job(conn: Conn) -> bool:
            async with conn.transaction():
                await conn.execute("DELETE FROM used_links WHERE expires_at < $1", cutoff)
                status = await conn.execute(
                    "INSERT INTO used_links (link_id, expires_at) VALUES ($1, $2) "
                    "ON CONFLICT (link_id) DO NOTHING",
                    link_id,
                    until,
                )
                return row_count(status) > 0

        return await self._run(job)

    # -- the owner's rights --------------------------------------------------------------------

    async def export_owner(self, owner_id: str) -> dict[str, Any]:
        """Return everything kept about an owner, as JSON-serialisable data.

        The same keys and forms as :meth:`notifier.sqlite.SqliteStore.export_owner`,
        read in one repeatable-read transaction (one consistent picture).
        """

        async def job(conn: Conn) -> dict[str, Any]:
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

        async def job(conn: Conn) -> int:
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
                    touched += row_count(await conn.execute(sql, owner_id))
                touched += row_count(
                    await conn.execute(
                        "UPDATE cases SET owner_id = $1 WHERE owner_id = $2",
                        ERASED_OWNER,
                        owner_id,
                    )
                )
                touched += row_count(
                    await conn.execute(
                        "UPDATE ratings SET comment = NULL "
                        "WHERE comment IS NOT NULL AND case_id = ANY($1::text[])",
                        ids,
                    )
                )
                touched += row_count(
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
