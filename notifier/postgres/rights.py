"""The owner's rights: export and erasure (notifier; PostgreSQL, :mod:`notifier.postgres`).

An export is one repeatable-read transaction over everything kept about an owner, with
secrets of push channels masked. Erasure removes and anonymises the same rows as SQLite's
in one transaction, after locking the owner's row so that writes checking the owner wait
for it; the package's notes say what stays on disk until ``VACUUM FULL``.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from notifier.postgres.connect import PooledStore
from notifier.postgres.sql import row_count
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
from notifier.sqlite import ERASED_OWNER

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn

__all__ = ["RightsQueries"]

_LOG = logging.getLogger(__name__)


async def _anonymise_devices(conn: Conn, case_ids: list[str], devices: set[str]) -> int:
    """Give an erased owner's cases anonymous device ids, also where text quotes them.

    As :func:`notifier.sqlite.rights._anonymise_devices`: one new ``anon-`` id per device across
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


class RightsQueries(PooledStore):
    """The export and erasure queries of :class:`~notifier.postgres.PostgresStore`."""

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
