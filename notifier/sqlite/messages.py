"""The owners' notifications: the outbox's rows (notifier; SQLite).

Messages are kept once per idempotency key, held past an owner's daily limit, and
claimed for delivery by one notifier at a time (:mod:`notifier.outbox`); a delivery
finishing after its owner was erased keeps nothing.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from datetime import datetime
from typing import Any

from notifier.model import Notification
from notifier.rows import notification_from, notification_row, ts
from notifier.sqlite.base import StoreBase
from notifier.sqlite.sql import insert, transaction, upsert
from notifier.store import NewMessage

_LOG = logging.getLogger(__name__)


def keep_message(conn: sqlite3.Connection, message: NewMessage) -> Notification | None:
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
    insert(conn, "notifications", row)
    return notification


class MessageQueries(StoreBase):
    """Notifications: kept, listed, claimed for delivery."""

    async def add_notification(self, notification: Notification) -> None:
        """Insert or replace a notification, while its owner exists.

        A delivery still under way when its owner erased their data finishes by storing
        its outcome: checked in the same step as the write, an erased owner's message is
        dropped rather than brought back (with their name and the device's label).
        """
        row = notification_row(notification)

        def job(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                known = conn.execute(
                    "SELECT 1 FROM owners WHERE owner_id = ?", (notification.owner_id,)
                ).fetchone()
                if known is None:
                    _LOG.info(
                        "notification %s not kept: its owner is gone",
                        notification.notification_id,
                    )
                    return
                upsert(conn, "notifications", "notification_id", row)

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
            with transaction(conn):
                return keep_message(
                    conn, NewMessage(notification, key, holder, claim_until, max_per_day, since)
                )

        return await self._run(job)

    async def claim_notification(
        self, notification_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Claim a ``queued`` message for delivery unless another holder's claim runs."""

        def job(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
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
            with transaction(conn):
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
