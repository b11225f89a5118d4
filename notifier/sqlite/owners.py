"""Owners, their sign-ins, devices, push channels and one-tap links (notifier; SQLite).

The owner side of :class:`notifier.sqlite.SqliteStore`: owners, API tokens (kept as
SHA-256 only), identity-provider subjects linked to owners, the owners' devices, their
push channels (deleted with ``secure_delete``, audit evidence quoting them masked first)
and the one-tap links already used.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import DeviceRecord, Owner, PushChannel
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
from notifier.sqlite.base import StoreBase
from notifier.sqlite.sql import transaction, upsert
from notifier.store import PRINCIPAL_KINDS, Principal

_LOG = logging.getLogger(__name__)


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


class OwnerQueries(StoreBase):
    """Owners, tokens, subjects, devices, push channels and used links."""

    async def put_owner(self, owner: Owner) -> None:
        """Insert or replace an owner."""
        row = owner_row(owner)
        await self._run(lambda conn: upsert(conn, "owners", "owner_id", row))

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
        if kind not in PRINCIPAL_KINDS:
            raise InvalidRequestError(f"unknown principal kind {kind!r}")
        row = {"token_sha256": token_hash(token), "kind": kind, "principal_id": principal_id}
        await self._run(lambda conn: upsert(conn, "tokens", "token_sha256", row))

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
            with transaction(conn):
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
            with transaction(conn):
                row = conn.execute(
                    "SELECT owner_id FROM owner_subjects WHERE issuer = ? AND subject = ?",
                    (issuer, subject),
                ).fetchone()
                if row is not None:
                    return str(row[0])
                upsert(conn, "owners", "owner_id", owner_row(owner))
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
            with transaction(conn):
                gone = conn.execute(
                    "DELETE FROM owner_subjects WHERE issuer = ? AND subject = ? AND owner_id = ?",
                    (issuer, subject, owner_id),
                )
                return gone.rowcount > 0

        return await self._run(job)

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device registry entry."""
        row = device_row(device)
        await self._run(lambda conn: upsert(conn, "devices", "device_id", row))

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
        await self._run(lambda conn: upsert(conn, "channels", "channel_id", row))

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
            with transaction(conn):
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
            with transaction(conn):
                conn.execute("DELETE FROM used_links WHERE expires_at < ?", (cutoff,))
                cursor = conn.execute(
                    "INSERT INTO used_links (link_id, expires_at) VALUES (:link_id, :expires_at) "
                    "ON CONFLICT (link_id) DO NOTHING",
                    row,
                )
                return cursor.rowcount > 0

        return await self._run(job)
