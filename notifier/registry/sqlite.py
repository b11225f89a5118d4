"""The device registry in the SQLite case store's file (notifier).

:class:`SqliteRegistry` runs its statements on the SQLite store's own connection and
worker thread (:meth:`notifier.sqlite.SqliteStore.registry`), each call one
``BEGIN IMMEDIATE`` transaction, so a claim and the owner loop never see half of each
other. Its tables come with the case store's migration step 5 (:data:`REGISTRY_STEPS`).

This module stays a little over 600 lines: it is one class whose methods each hold one
transaction and match :class:`notifier.postgres.PostgresRegistry` method by method, so
the two are read side by side; splitting the class would split those pairs.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Final, Protocol, TypeVar

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import OPEN_STATES, DeviceRecord
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
from notifier.rows import dt, ts
from notifier.schema import STEPS, render_step
from notifier.store import PrincipalKind

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
_OPEN: Final = tuple(sorted(OPEN_STATES))

#: Schema step 5 of the case store for SQLite (:data:`notifier.schema.STEPS`): the
#: registry's tables, and every device an older store knew registered under a product line
#: of its model (serial = device id, region of its owner, no claim code: it has its owner
#: already).
REGISTRY_STEPS: Final[tuple[str, ...]] = render_step(STEPS[4], "sqlite")


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (``BEGIN IMMEDIATE``: the write lock before the first read)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _audit(
    conn: sqlite3.Connection,
    now: datetime,
    actor: str,
    action: str,
    reason: str,
    evidence: dict[str, object],
) -> None:
    conn.execute(
        "INSERT INTO audit (case_id, at, actor, action, reason, evidence) "
        "VALUES (NULL, ?, ?, ?, ?, ?)",
        (ts(now), actor, action, reason, json.dumps(evidence, separators=(",", ":"))),
    )


class _Runner(Protocol):
    def __call__(self, job: Callable[[sqlite3.Connection], _T], /) -> Awaitable[_T]: ...


class SqliteRegistry:
    """The :class:`DeviceRegistry` in the case store's SQLite file.

    Made by :meth:`notifier.sqlite.SqliteStore.registry`; lives as long as the store.

    Args:
        run: runs a job with the store's connection on its worker thread.
    """

    def __init__(self, run: _Runner) -> None:
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

        def job(conn: sqlite3.Connection) -> ProductLine:
            with _transaction(conn):
                conn.execute(
                    "INSERT INTO product_lines (model, name, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (model) DO UPDATE SET name = excluded.name",
                    (line.model, line.name, ts(line.created_at)),
                )
                return self._line(conn, line.model)

        return await self._run(job)

    @staticmethod
    def _line(conn: sqlite3.Connection, model: str) -> ProductLine:
        row = conn.execute(
            "SELECT product_lines.*, (SELECT COUNT(*) FROM registry "
            "WHERE registry.model = product_lines.model) AS devices "
            "FROM product_lines WHERE model = ?",
            (model,),
        ).fetchone()
        return ProductLine(row["model"], row["name"], dt(row["created_at"]), row["devices"])

    async def product_lines(self) -> list[ProductLine]:
        """Return the product lines, by model, with their device counts."""

        def job(conn: sqlite3.Connection) -> list[ProductLine]:
            rows = conn.execute(
                "SELECT product_lines.*, COUNT(registry.device_id) AS devices "
                "FROM product_lines LEFT JOIN registry ON registry.model = product_lines.model "
                "GROUP BY product_lines.model ORDER BY product_lines.model"
            )
            return [
                ProductLine(r["model"], r["name"], dt(r["created_at"]), r["devices"]) for r in rows
            ]

        return await self._run(job)

    # -- devices -------------------------------------------------------------------------------

    async def register(
        self, devices: Sequence[NewDevice], *, key: bytes, now: datetime, actor: str
    ) -> list[RowOutcome]:
        """Register devices, each row on its own: a bad row is reported, the others go on.

        A row fails for a malformed value, a product line that is not registered, a
        device id or serial (within its product line) that is registered already or
        appears earlier in the same request, or a claim code another device has. A row
        without a claim code gets a new one. One transaction: either every good row is
        stored, or (the store failing) none.

        Args:
            devices: the rows.
            key: the claim-code key (:func:`claim_key`).
            now: the registration time.
            actor: who registers them (for the audit trail: ``ops:NAME``).

        Returns:
            One outcome per row, in order.
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

        def job(conn: sqlite3.Connection) -> list[RowOutcome]:
            seen_ids: dict[str, int] = {}
            seen_serials: dict[tuple[str, str], int] = {}
            seen_codes: dict[str, int] = {}
            out: list[RowOutcome] = []
            by_model: dict[str, int] = {}
            added = 0
            with _transaction(conn):
                models = {r[0] for r in conn.execute("SELECT model FROM product_lines")}
                for row in checked:
                    device, errors = row.device, list(row.errors)
                    if not errors:
                        errors = self._clashes(
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
                    conn.execute(
                        "INSERT INTO registry (device_id, model, serial, region, firmware, batch, "
                        "claim_hash, registered_at, retired_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        (
                            device.device_id,
                            device.model,
                            device.serial,
                            device.region,
                            device.firmware,
                            device.batch,
                            digests[row.index],
                            stamp,
                        ),
                    )
                    added += 1
                    by_model[device.model] = by_model.get(device.model, 0) + 1
                    seen_ids[device.device_id] = row.index
                    seen_serials[(device.model, device.serial)] = row.index
                    seen_codes[digests[row.index]] = row.index
                    out.append(RowOutcome(row.index, device.device_id, codes[row.index]))
                if added:
                    _audit(
                        conn,
                        now,
                        "ops",
                        "devices_registered",
                        f"{added} devices registered by {actor}",
                        {"actor": actor, "devices": added, "models": by_model},
                    )
            return out

        outcomes = await self._run(job)
        _LOG.info(
            "registered %d of %d devices (%s)",
            sum(o.ok for o in outcomes),
            len(outcomes),
            actor,
        )
        return outcomes

    @staticmethod
    def _clashes(
        conn: sqlite3.Connection,
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
        elif conn.execute(
            "SELECT 1 FROM registry WHERE device_id = ? UNION ALL "
            "SELECT 1 FROM devices WHERE device_id = ?",
            (device.device_id, device.device_id),
        ).fetchone():
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
        elif conn.execute(
            "SELECT 1 FROM registry WHERE model = ? AND serial = ?", serial
        ).fetchone():
            errors.append(
                ("serial", f"duplicate serial {device.serial!r}: a {device.model} has it already")
            )
        if (
            digest in seen_codes
            or conn.execute("SELECT 1 FROM registry WHERE claim_hash = ?", (digest,)).fetchone()
        ):
            errors.append(("claim_code", "another device has this claim code"))
        return errors

    async def get(self, device_id: str) -> RegisteredDevice | None:
        """Return a registered device (with its owner, if it has one)."""

        def job(conn: sqlite3.Connection) -> RegisteredDevice | None:
            row = conn.execute(
                f"{REGISTERED_SELECT} WHERE registry.device_id = ?", (device_id,)
            ).fetchone()
            return None if row is None else registered_device(row)

        return await self._run(job)

    async def note_firmware(self, device_id: str, firmware: str) -> bool:
        """Keep the firmware a device's boot event names, in the registry and its record.

        Returns:
            Whether a stored version changed (``False`` for a device not stored, or one
            that already runs it).

        Raises:
            InvalidRequestError: ``firmware`` is not a firmware version.
        """
        check_firmware(firmware)

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                changed = 0
                for table in ("registry", "devices"):
                    changed += conn.execute(
                        f"UPDATE {table} SET firmware = ? "
                        "WHERE device_id = ? AND firmware IS NOT ?",
                        (firmware, device_id, firmware),
                    ).rowcount
                return changed > 0

        return bool(await self._run(job))

    async def list(
        self,
        *,
        model: str | None = None,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[RegisteredDevice]:
        """Return registered devices by id (those after ``after``), at most ``limit``."""
        clauses: list[str] = []
        params: list[object] = []
        if model is not None:
            clauses.append("registry.model = ?")
            params.append(model)
        if state == "retired":
            clauses.append("registry.retired_at IS NOT NULL")
        elif state == "claimed":
            clauses.append("registry.retired_at IS NULL AND devices.owner_id IS NOT NULL")
        elif state == "unclaimed":
            clauses.append("registry.retired_at IS NULL AND devices.owner_id IS NULL")
        if after is not None:
            clauses.append("registry.device_id > ?")
            params.append(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(limit, 0))

        def job(conn: sqlite3.Connection) -> list[RegisteredDevice]:
            rows = conn.execute(
                f"{REGISTERED_SELECT} {where} ORDER BY registry.device_id LIMIT ?", params
            )
            return [registered_device(row) for row in rows]

        return await self._run(job)

    async def retire(self, device_id: str, *, now: datetime, actor: str) -> RegisteredDevice:
        """Take a device out of service: its claim code stops working for good.

        An owner keeps the device (and its history) in their list; a retired device
        cannot be claimed again.

        Raises:
            NotFoundError: no such device.
            ConflictError: it is retired already.
        """

        def job(conn: sqlite3.Connection) -> RegisteredDevice:
            with _transaction(conn):
                row = conn.execute(
                    f"{REGISTERED_SELECT} WHERE registry.device_id = ?", (device_id,)
                ).fetchone()
                if row is None:
                    raise NotFoundError(f"there is no registered device {device_id}")
                if row["retired_at"] is not None:
                    raise ConflictError(f"device {device_id} is retired already")
                conn.execute(
                    "UPDATE registry SET retired_at = ?, claim_hash = NULL WHERE device_id = ?",
                    (ts(now), device_id),
                )
                _audit(
                    conn,
                    now,
                    "ops",
                    "device_retired",
                    f"device {device_id} retired by {actor}",
                    {"device_id": device_id, "actor": actor},
                )
                return registered_device(
                    conn.execute(
                        f"{REGISTERED_SELECT} WHERE registry.device_id = ?", (device_id,)
                    ).fetchone()
                )

        return await self._run(job)

    # -- claiming and releasing ----------------------------------------------------------------

    async def claim(
        self, owner_id: str, code: str, *, key: bytes, label: str | None, now: datetime
    ) -> ClaimOutcome:
        """Bind the device whose claim code this is to the owner, once.

        Raises:
            InvalidRequestError: the code is malformed.
            NotFoundError: no device has this code (or the owner does not exist).
            ConflictError: the device is claimed (by this owner or another: the seller
                must release it first), or retired.
        """
        digest = claim_digest(key, code)

        def job(conn: sqlite3.Connection) -> ClaimOutcome:
            with _transaction(conn):
                if (
                    conn.execute("SELECT 1 FROM owners WHERE owner_id = ?", (owner_id,)).fetchone()
                    is None
                ):
                    raise NotFoundError("there is no such owner")
                row = conn.execute(
                    f"{REGISTERED_SELECT} WHERE registry.claim_hash = ?", (digest,)
                ).fetchone()
                if row is None:
                    raise NotFoundError("no device has this claim code")
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
                conn.execute(
                    "INSERT INTO devices (device_id, owner_id, model, firmware, label, batch) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.device_id,
                        record.owner_id,
                        record.model,
                        record.firmware,
                        record.label,
                        record.batch,
                    ),
                )
                _audit(
                    conn,
                    now,
                    "owner",
                    "device_claimed",
                    f"device {device.device_id} claimed by its owner with its claim code",
                    {"device_id": device.device_id, "owner_id": owner_id},
                )
            claimed = RegisteredDevice(
                device.device_id,
                device.model,
                device.serial,
                device.region,
                device.firmware,
                device.batch,
                device.registered_at,
                None,
                owner_id,
                claimable=False,
            )
            return ClaimOutcome(claimed, record)

        outcome = await self._run(job)
        _LOG.info("device %s claimed", outcome.device.device_id)
        return outcome

    async def release(self, owner_id: str, device_id: str, *, now: datetime) -> ReleaseOutcome:
        """Unbind an owner's device on resale; nothing of theirs stays reachable from it.

        In one transaction: the owner's open cases of the device end ``dismissed`` (an
        audited transition by the owner; their visits not yet started are cancelled), all
        their cases of it move to one anonymous device id (also where trail, tasks and
        visit notes quote the id), and the device leaves their list. Its registry entry
        and claim code stay: the next owner claims it with the label.

        Raises:
            NotFoundError: the owner has no such device.
        """
        anonymous = f"anon-{secrets.token_hex(8)}"
        stamp = ts(now)

        def job(conn: sqlite3.Connection) -> ReleaseOutcome:
            with _transaction(conn):
                if (
                    conn.execute(
                        "SELECT 1 FROM devices WHERE device_id = ? AND owner_id = ?",
                        (device_id, owner_id),
                    ).fetchone()
                    is None
                ):
                    raise NotFoundError(f"there is no device {device_id}")
                cases = conn.execute(
                    "SELECT case_id, state FROM cases WHERE device_id = ? AND owner_id = ?",
                    (device_id, owner_id),
                ).fetchall()
                ids = [row["case_id"] for row in cases]
                closed = 0
                cancelled = 0
                for row in cases:
                    if row["state"] not in OPEN_STATES:
                        continue
                    cancelled += conn.execute(
                        "UPDATE appointments SET state = 'cancelled' WHERE case_id = ? "
                        "AND (state = 'proposed' OR (state = 'booked' AND start_at > ?))",
                        (row["case_id"], stamp),
                    ).rowcount
                    conn.execute(
                        "UPDATE cases SET state = 'dismissed', pending_action = NULL, "
                        "updated_at = ? WHERE case_id = ? AND state = ?",
                        (stamp, row["case_id"], row["state"]),
                    )
                    conn.execute(
                        "INSERT INTO audit (case_id, at, actor, action, reason, evidence, "
                        "from_state, to_state) VALUES (?, ?, 'owner', 'transition', ?, '{}', ?, "
                        "'dismissed')",
                        (
                            row["case_id"],
                            stamp,
                            "the owner released the device (sold or passed on)",
                            row["state"],
                        ),
                    )
                    closed += 1
                for first in range(0, len(ids), 500):
                    chunk = ids[first : first + 500]
                    marks = ", ".join("?" for _ in chunk)
                    conn.execute(
                        f"UPDATE cases SET device_id = ? WHERE case_id IN ({marks})",
                        [anonymous, *chunk],
                    )
                    for table, column in (
                        ("cases", "evidence"),
                        ("audit", "evidence"),
                        ("audit", "reason"),
                        ("tasks", "reason"),
                        ("appointments", "note"),
                    ):
                        conn.execute(
                            f"UPDATE {table} SET {column} = REPLACE({column}, ?, ?) "
                            f"WHERE instr({column}, ?) > 0 AND case_id IN ({marks})",
                            [device_id, anonymous, device_id, *chunk],
                        )
                conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
                _audit(
                    conn,
                    now,
                    "owner",
                    "device_released",
                    f"device {device_id} released by its owner",
                    {"device_id": device_id, "owner_id": owner_id, "cases": len(ids)},
                )
            return ReleaseOutcome(device_id, len(ids), closed, cancelled, anonymous)

        outcome = await self._run(job)
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
        row = (sha256_hex(invite), owner_id, ts(expires_at))
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO invites (invite_sha256, owner_id, expires_at) VALUES (?, ?, ?)", row
            )
        )

    async def use_invite(self, invite: str, *, now: datetime) -> str:
        """Use an invite code once; return its owner's id.

        Raises:
            NotFoundError: no such invite, it was used, it expired, or its owner is gone.
        """
        digest = sha256_hex(invite)
        cutoff = ts(now)

        def job(conn: sqlite3.Connection) -> str:
            with _transaction(conn):
                conn.execute("DELETE FROM invites WHERE expires_at <= ?", (cutoff,))
                row = conn.execute(
                    "SELECT invites.owner_id FROM invites JOIN owners "
                    "ON owners.owner_id = invites.owner_id WHERE invite_sha256 = ?",
                    (digest,),
                ).fetchone()
                conn.execute("DELETE FROM invites WHERE invite_sha256 = ?", (digest,))
                if row is None:
                    raise NotFoundError("this invite is not valid: it was used, or it expired")
                return str(row[0])

        return await self._run(job)

    async def revoke_token(self, token_id: str) -> tuple[PrincipalKind, str]:
        """Revoke the token with this id (:func:`token_id`).

        Raises:
            NotFoundError: no token has this id.
        """
        if not re.fullmatch(f"[0-9a-f]{{{TOKEN_ID_CHARS}}}", token_id):
            raise NotFoundError(f"there is no token {token_id}")

        def job(conn: sqlite3.Connection) -> tuple[PrincipalKind, str]:
            with _transaction(conn):
                rows = conn.execute(
                    "SELECT token_sha256, kind, principal_id FROM tokens "
                    "WHERE substr(token_sha256, 1, ?) = ?",
                    (TOKEN_ID_CHARS, token_id),
                ).fetchall()
                if not rows:
                    raise NotFoundError(f"there is no token {token_id}")
                conn.execute(
                    "DELETE FROM tokens WHERE substr(token_sha256, 1, ?) = ?",
                    (TOKEN_ID_CHARS, token_id),
                )
                return rows[0]["kind"], rows[0]["principal_id"]

        return await self._run(job)

    async def revoke_tokens_of(self, kind: PrincipalKind, principal_id: str) -> int:
        """Revoke every token of a principal; return how many there were."""

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM tokens WHERE kind = ? AND principal_id = ?", (kind, principal_id)
            ).rowcount

        return await self._run(job)
