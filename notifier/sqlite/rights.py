"""The owner's rights: export and erasure (notifier; SQLite).

An export is one read transaction over everything kept about an owner, with secrets of
push channels masked. Erasure deletes the personal rows with ``secure_delete`` on, keeps
the cases for the fleet's statistics under anonymous device ids, and checkpoints the
write-ahead log, so erased contacts do not linger in the file.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from notifier.rows import (
    appointment_from,
    audit_from,
    case_from,
    channel_from,
    channel_secrets,
    device_from,
    exported_channel,
    json_text,
    notification_from,
    owner_from,
    plain,
    rating_from,
    redacted,
    task_from,
    ts,
)
from notifier.sqlite.base import StoreBase
from notifier.sqlite.sql import in_list, transaction

_LOG = logging.getLogger(__name__)

#: What an erased owner's cases keep as their owner id.
ERASED_OWNER: Final = "erased"


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
                "UPDATE cases SET device_id = ? WHERE device_id = ? "
                f"AND {in_list('case_id', chunk)}",
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
                    f"WHERE instr({column}, ?) > 0 AND {in_list('case_id', chunk)}",
                    [old, new, old, *chunk],
                ).rowcount
    return touched


class RightsQueries(StoreBase):
    """Export and erasure of an owner's data."""

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
            with transaction(conn, immediate=False):
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
                    f"SELECT * FROM {table} WHERE {in_list('case_id', chunk)} ORDER BY {order}",
                    chunk,
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
            with transaction(conn):
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
                        f"WHERE comment IS NOT NULL AND {in_list('case_id', chunk)}",
                        chunk,
                    ).rowcount
                    touched += conn.execute(
                        "UPDATE audit SET evidence = '{}' WHERE action = 'notify' "
                        f"AND evidence != '{{}}' AND {in_list('case_id', chunk)}",
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
