"""The device registry in the PostgreSQL case store (notifier; :mod:`notifier.postgres`).

:class:`PostgresRegistry` keeps :mod:`notifier.registry`'s product lines, registered
devices, claims, releases, invites and token revocations in the case store's database,
with the rules and outcomes of :class:`~notifier.registry.SqliteRegistry`: a claim locks
the device's registry row, a registration the registry as a whole (an advisory lock;
imports are rare), a release the device.

This module stays a little over 600 lines on purpose: it is one class, the whole
registry interface on PostgreSQL, best read in one piece beside the SQLite one.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import OPEN_STATES, DeviceRecord
from notifier.postgres.sql import REGISTRY_LOCK, Params, insert, row_count, where_sql
from notifier.registry.claims import TOKEN_ID_CHARS, claim_digest, new_claim_code, sha256_hex
from notifier.registry.csvimport import MODEL_NAME, PRINTABLE, check_firmware, check_new_device
from notifier.registry.model import (
    CheckedDevice,
    ClaimOutcome,
    DeviceState,
    NewDevice,
    ProductLine,
    RegisteredDevice,
    ReleaseOutcome,
    RowOutcome,
)
from notifier.registry.rows import REGISTERED_SELECT, registered_device
from notifier.rows import device_row, dt, json_text, ts
from notifier.store import PrincipalKind

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn, Job

__all__ = ["PostgresRegistry"]

_LOG = logging.getLogger(__name__)


async def _audit_event(
    conn: Conn,
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


class PostgresRegistry:
    """The :class:`~notifier.registry.DeviceRegistry` in the case store's PostgreSQL database.

    Made by :meth:`PostgresStore.registry`; the same rules and outcomes as
    :class:`~notifier.registry.SqliteRegistry`, with the row locks the module describes.

    Args:
        run: runs a job with a connection of the store's pool.
    """

    def __init__(self, run: Callable[[Job[Any]], Awaitable[Any]]) -> None:
        self._run = run

    # -- product lines -------------------------------------------------------------------------

    async def put_product_line(self, line: ProductLine) -> ProductLine:
        """Register a product line; an existing one keeps its date and takes the new name.

        Raises:
            InvalidRequestError: the model or name breaks the rules.
        """
        if not MODEL_NAME.fullmatch(line.model):
            raise InvalidRequestError(
                f"{line.model!r} is not a product model name (lower-case letters, digits, _)"
            )
        if not PRINTABLE.fullmatch(line.name):
            raise InvalidRequestError("a product line's name is 1 to 80 printable characters")

        async def job(conn: Conn) -> ProductLine:
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

        async def job(conn: Conn) -> list[ProductLine]:
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
            CheckedDevice(i, device, check_new_device(device)) for i, device in enumerate(devices)
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

        async def job(conn: Conn) -> list[RowOutcome]:
            seen_ids: dict[str, int] = {}
            seen_serials: dict[tuple[str, str], int] = {}
            seen_codes: dict[str, int] = {}
            out: list[RowOutcome] = []
            by_model: dict[str, int] = {}
            added = 0
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK)
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

        async def job(conn: Conn) -> RegisteredDevice | None:
            row = await conn.fetchrow(
                f"{REGISTERED_SELECT} WHERE registry.device_id = $1", device_id
            )
            return None if row is None else registered_device(row)

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

        async def job(conn: Conn) -> bool:
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
        p = Params()
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
        order = f"ORDER BY registry.device_id LIMIT {p(max(limit, 0))}"
        sql = f"{REGISTERED_SELECT} {where_sql(clauses)} {order}"

        async def job(conn: Conn) -> list[RegisteredDevice]:
            return [registered_device(row) for row in await conn.fetch(sql, *p.values)]

        result: list[RegisteredDevice] = await self._run(job)
        return result

    async def retire(self, device_id: str, *, now: datetime, actor: str) -> RegisteredDevice:
        """Take a device out of service: its claim code stops working for good.

        Raises:
            NotFoundError: no such device.
            ConflictError: it is retired already.
        """

        async def job(conn: Conn) -> RegisteredDevice:
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
                retired = await conn.fetchrow(
                    f"{REGISTERED_SELECT} WHERE registry.device_id = $1", device_id
                )
            assert retired is not None
            return registered_device(retired)

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

        async def job(conn: Conn) -> ClaimOutcome:
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
                row = await conn.fetchrow(
                    f"{REGISTERED_SELECT} WHERE registry.device_id = $1", locked
                )
                assert row is not None
                device = registered_device(row)
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
                await insert(conn, "devices", device_row(record))
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

        async def job(conn: Conn) -> ReleaseOutcome:
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
                    cancelled += row_count(
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
        values = (sha256_hex(invite), owner_id, ts(expires_at))

        async def job(conn: Conn) -> None:
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
        digest = sha256_hex(invite)
        cutoff = ts(now)

        async def job(conn: Conn) -> str:
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

        async def job(conn: Conn) -> tuple[PrincipalKind, str]:
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

        async def job(conn: Conn) -> int:
            return row_count(
                await conn.execute(
                    "DELETE FROM tokens WHERE kind = $1 AND principal_id = $2", kind, principal_id
                )
            )

        result: int = await self._run(job)
        return result


def _line(row: asyncpg.Record) -> ProductLine:
    return ProductLine(row["model"], row["name"], dt(row["created_at"]), int(row["devices"]))


async def _clashes(
    conn: Conn,
    row: CheckedDevice,
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
