"""Owners in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

Owners, their API tokens and identity-provider subjects, their devices and push
channels (a deleted channel is masked in their cases' audit trail), and one-tap links.
The owner's export and erasure are :mod:`notifier.postgres.rights`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import DeviceRecord, Owner, PushChannel
from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import row_count, upsert
from notifier.rows import (
    channel_from,
    channel_row,
    channel_secrets,
    device_from,
    device_row,
    json_text,
    owner_from,
    owner_row,
    redacted,
    token_hash,
    ts,
)
from notifier.store import PRINCIPAL_KINDS, Principal

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
        if kind not in PRINCIPAL_KINDS:
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
