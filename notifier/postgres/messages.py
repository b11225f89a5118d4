"""Owner messages in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

Notifications: a new message kept once per idempotency key (held past the owner's daily
limit) under the owner's row lock, and the outbox's claims on queued messages.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from notifier.model import Notification
from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import Params, row_count, upsert, where_sql
from notifier.rows import notification_from, notification_row, ts
from notifier.store import NewMessage

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["MessageQueries", "keep_message"]

_LOG = logging.getLogger(__name__)


async def keep_message(conn: Conn, message: NewMessage) -> Notification | None:
    """:meth:`MessageQueries.add_message` inside its transaction (a case move's too).

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
    return notification if row_count(status) > 0 else None


class MessageQueries(PooledStore):
    """The notification queries of :class:`~notifier.postgres.PostgresStore`."""

    async def add_notification(self, notification: Notification) -> None:
        """Insert or replace a notification, while its owner exists.

        The owner's row is locked for share while the notification is written, so an
        erasure running at the same time either comes first (and the message is dropped)
        or waits and removes it with the rest.
        """
        row = notification_row(notification)

        async def job(conn: Conn) -> None:
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
                await upsert(conn, "notifications", "notification_id", row)

        await self._run(job)

    async def notifications(
        self, owner_id: str, *, status: str | None = None, since: datetime | None = None
    ) -> list[Notification]:
        """Return an owner's notifications, oldest first (``since`` inclusive)."""
        p = Params()
        clauses = [f"owner_id = {p(owner_id)}"]
        if status is not None:
            clauses.append(f"status = {p(status)}")
        if since is not None:
            clauses.append(f"created_at >= {p(ts(since))}")
        sql = (
            f"SELECT * FROM notifications {where_sql(clauses)} ORDER BY created_at, notification_id"
        )

        async def job(conn: Conn) -> list[Notification]:
            return [notification_from(row) for row in await conn.fetch(sql, *p.values)]

        return await self._run(job)

    async def queued_notifications(self, *, before: datetime, limit: int) -> list[Notification]:
        """Return every owner's notifications still ``queued`` created before ``before``."""
        bound = ts(before)

        async def job(conn: Conn) -> list[Notification]:
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

        async def job(conn: Conn) -> Notification | None:
            async with conn.transaction():
                return await keep_message(conn, message)

        return await self._run(job)

    async def claim_notification(
        self, notification_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Claim a ``queued`` message for delivery unless another holder's claim runs."""

        async def job(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE notifications SET claimed_by = $1, claimed_until = $2 "
                "WHERE notification_id = $3 AND status = 'queued' AND "
                "(claimed_by IS NULL OR claimed_by = $1 OR claimed_until < $4)",
                holder,
                ts(until),
                notification_id,
                ts(now),
            )
            return row_count(status) > 0

        return await self._run(job)

    async def claim_queued(
        self, holder: str, *, now: datetime, until: datetime, before: datetime, limit: int
    ) -> list[Notification]:
        """Claim up to ``limit`` unclaimed ``queued`` messages created before ``before``.

        ``FOR UPDATE SKIP LOCKED``: notifiers sweeping at once each claim other rows.
        """

        async def job(conn: Conn) -> list[Notification]:
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

        async def job(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT DISTINCT owner_id FROM notifications WHERE status = 'held' "
                "ORDER BY owner_id LIMIT $1",
                max(limit, 0),
            )
            return [str(row[0]) for row in rows]

        return await self._run(job)
