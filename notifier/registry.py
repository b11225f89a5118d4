"""The device registry: product lines, devices, claim codes, invites (notifier; in the case store).

The manufacturer registers product lines (a product model: the name of a product file,
see :mod:`diagnostics.product`) and the devices it makes (model, serial, service region,
firmware, batch). Each device carries a claim code, printed on the appliance or its QR
label: an owner's app posts it to bind the device to the owner (:meth:`claim`), once, and
the owner releases it when selling it on (:meth:`release`). Ops invite owners (a one-time
invite code the owner's app exchanges for a token) and issue and revoke API tokens.

How it works:

* **Where.** The tables live in the case store, created by its migration step 5
  (:data:`REGISTRY_STEPS` for SQLite, from :data:`notifier.schema.STEPS`, which also
  registers every device an older store already knew, under a product line of its
  model). :class:`SqliteRegistry` runs its statements on the SQLite store's own
  connection and worker thread (:meth:`notifier.sqlite.SqliteStore.registry`), so a
  claim and the owner loop never see half of each other;
  :class:`notifier.postgres.PostgresRegistry` does the same in PostgreSQL with row
  locks (:meth:`notifier.postgres.PostgresStore.registry`).
* **Ownership.** The registry keeps what the factory knows; who owns a device is the case
  store's ``devices`` table, which the owner loop reads. A claim adds the device there (in
  the same transaction that checks the code), a release removes it.
* **Claim codes** are 12 characters of Crockford's base32 (60 random bits, shown as
  ``XXXX-XXXX-XXXX``), or the manufacturer's own. Only an HMAC-SHA256 of the normalised
  code is kept, under a key derived with HKDF from a server secret (:func:`claim_key`),
  so the table alone does not let anyone try codes offline. A code is looked up by that
  digest; it works while the device is unowned and not retired, so the label still works
  for the next owner after a release.
* **Release on resale.** The seller's cases of the device stay theirs, under an anonymous
  device id (``anon-`` and random hex, also where their evidence, trail, tasks and visit
  notes quote it), and any still open end ``dismissed`` (visits not yet started cancelled), so
  that nothing of theirs is reachable from the device's id by the next owner.
  Notifications and ratings belong to those cases and stay with them.
* **Invites and tokens.** Invite codes and tokens are kept as SHA-256 digests only (both
  are long random strings); an invite works once, until it expires. A token's id is the
  first 12 hex digits of its digest: enough to name it for revocation, useless to sign in.
* **Audit.** Claims, releases, retirements and imports are written to the case store's
  audit trail (no case; the owner's id in the evidence, which erasure removes).

Errors: :class:`~notifier.errors.NotFoundError` (no such device, code or invite),
:class:`~notifier.errors.ConflictError` (claimed already, retired, duplicate serial),
:class:`~notifier.errors.InvalidRequestError` (a value that breaks a rule).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, Protocol, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import OPEN_STATES, DeviceRecord
from notifier.rows import Row, dt, ts
from notifier.schema import STEPS, render_step
from notifier.store import PrincipalKind
from wire.protocol import is_valid_device_id

__all__ = [
    "CLAIM_CODE_ALPHABET",
    "DEVICE_COLUMNS",
    "REGISTRY_STEPS",
    "TOKEN_ID_CHARS",
    "BrokerAccounts",
    "ClaimOutcome",
    "DeviceRegistry",
    "DeviceState",
    "NewDevice",
    "ParsedRow",
    "ProductLine",
    "RegisteredDevice",
    "ReleaseOutcome",
    "RowOutcome",
    "SqliteRegistry",
    "TokenInfo",
    "check_firmware",
    "check_new_device",
    "claim_digest",
    "claim_key",
    "device_from_fields",
    "new_claim_code",
    "new_token",
    "normalise_claim_code",
    "read_device_csv",
    "token_id",
]

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Crockford's base32: no I, L, O or U, so a code read off a label is not misread.
CLAIM_CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CODE_CHARS: Final = 12
_MIN_CODE_CHARS: Final = 8
_MAX_CODE_CHARS: Final = 64
#: Hex digits of a token's digest that name it (48 bits).
TOKEN_ID_CHARS: Final = 12
_MODEL: Final = re.compile(r"[a-z][a-z0-9_]{0,39}")
_SERIAL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
_REGION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_FIRMWARE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
_PRINTABLE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,80}")
_SALT: Final = b"fixloop claim codes v1"
_OPEN: Final = tuple(sorted(OPEN_STATES))

DeviceState = Literal["unclaimed", "claimed", "retired"]

#: Schema step 5 of the case store for SQLite (:data:`notifier.schema.STEPS`): the
#: registry's tables, and every device an older store knew registered under a product line
#: of its model (serial = device id, region of its owner, no claim code: it has its owner
#: already).
REGISTRY_STEPS: Final[tuple[str, ...]] = render_step(STEPS[4], "sqlite")


# -- claim codes, invites and tokens ------------------------------------------------------------


def claim_key(server_secret: str) -> bytes:
    """The 32-byte key claim codes are hashed under, derived from a server secret (HKDF).

    Args:
        server_secret: the install's secret (``fixloop`` uses the fleet secret).
    """
    if not server_secret:
        raise InvalidRequestError("the claim-code key needs a server secret")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=b"fixloop claim code")
    return hkdf.derive(server_secret.encode("utf-8"))


def new_claim_code() -> str:
    """A fresh claim code: 12 random base32 characters as ``XXXX-XXXX-XXXX``."""
    raw = "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(_CODE_CHARS))
    return "-".join(raw[i : i + 4] for i in range(0, _CODE_CHARS, 4))


def normalise_claim_code(code: str) -> str:
    """A claim code as it is hashed: upper case, without blanks and dashes, misreads mended.

    ``O`` reads as ``0`` and ``I`` or ``L`` as ``1`` (Crockford's rule), so a code typed
    from a label matches however it was read.

    Raises:
        InvalidRequestError: fewer than 8 or more than 64 letters and digits, or other
            characters.
    """
    text = re.sub(r"[\s-]+", "", code).upper().translate(str.maketrans("OIL", "011"))
    if not re.fullmatch(r"[A-Z0-9]+", text):
        raise InvalidRequestError("a claim code has only letters and digits (and dashes)")
    if not _MIN_CODE_CHARS <= len(text) <= _MAX_CODE_CHARS:
        raise InvalidRequestError(
            f"a claim code has {_MIN_CODE_CHARS} to {_MAX_CODE_CHARS} letters and digits"
        )
    return text


def claim_digest(key: bytes, code: str) -> str:
    """The stored form of a claim code: HMAC-SHA256 of its normalised text, hex."""
    return hmac.new(key, normalise_claim_code(code).encode("ascii"), hashlib.sha256).hexdigest()


def new_token() -> str:
    """A fresh API token or invite code (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_id(token: str) -> str:
    """The id that names a token (the first hex digits of its stored digest)."""
    return _sha256(token)[:TOKEN_ID_CHARS]


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProductLine:
    """A product line the registry takes devices of.

    Attributes:
        model: the product model (the name of its product file).
        name: its name for people (``Aquaclean 7``).
        created_at: when it was registered.
        devices: devices registered of it (retired ones too).
    """

    model: str
    name: str
    created_at: datetime
    devices: int = 0


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device to register.

    Attributes:
        device_id: its id on the wire (MQTT user and topics).
        model: its product line.
        serial: its serial number (unique within the product line).
        region: its service region.
        firmware: the firmware it left the factory with, if known.
        batch: its production batch, if known.
        claim_code: its claim code (``None``: one is made).
    """

    device_id: str
    model: str
    serial: str
    region: str = "default"
    firmware: str | None = None
    batch: str | None = None
    claim_code: str | None = None


@dataclass(frozen=True, slots=True)
class RegisteredDevice:
    """A device in the registry.

    Attributes:
        device_id: its id.
        model: its product line.
        serial: its serial number.
        region: its service region.
        firmware: its firmware, if known.
        batch: its production batch, if known.
        registered_at: when it was registered.
        retired_at: when it was retired (``None``: in service).
        owner_id: who owns it now (``None``: no one).
        claimable: whether it has a claim code that works now.
    """

    device_id: str
    model: str
    serial: str
    region: str
    firmware: str | None
    batch: str | None
    registered_at: datetime
    retired_at: datetime | None = None
    owner_id: str | None = None
    claimable: bool = False

    @property
    def state(self) -> DeviceState:
        """``retired``, ``claimed`` (it has an owner) or ``unclaimed``."""
        if self.retired_at is not None:
            return "retired"
        return "claimed" if self.owner_id is not None else "unclaimed"


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of one device of a bulk registration.

    Attributes:
        index: its position in the request (0 first).
        device_id: its id.
        claim_code: the claim code to print on its label (only for one made here or
            given; ``None`` when the row failed).
        errors: what is wrong, as ``(column, words)``; empty: registered.
    """

    index: int
    device_id: str
    claim_code: str | None = None
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the device was registered."""
        return not self.errors


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """A device bound to its new owner.

    Attributes:
        device: the registry entry (now with its owner).
        record: the case store's device entry the owner loop reads.
    """

    device: RegisteredDevice
    record: DeviceRecord


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    """What a release did.

    Attributes:
        device_id: the device, now without an owner.
        cases_kept: the seller's cases of it, kept under an anonymous device id.
        cases_closed: of those, the open ones that ended ``dismissed``.
        visits_cancelled: visits not yet started that were cancelled.
        anonymous_id: the id the seller's cases now name.
    """

    device_id: str
    cases_kept: int
    cases_closed: int
    visits_cancelled: int
    anonymous_id: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An API token just issued (the token itself is never kept).

    Attributes:
        token: the bearer token (shown once).
        token_id: its id, to revoke it.
        kind: who it is for (``owner``, ``technician``, ``ops``).
        principal_id: their id.
    """

    token: str
    token_id: str
    kind: PrincipalKind
    principal_id: str


@dataclass(frozen=True, slots=True)
class _Checked:
    """A registration row after its own checks (errors empty: ready to insert)."""

    index: int
    device: NewDevice
    errors: list[tuple[str, str]] = field(default_factory=list)


# -- roles --------------------------------------------------------------------------------------


class BrokerAccounts(Protocol):
    """Where devices' MQTT credentials are issued and revoked (a role).

    The seam to the broker: an implementation issues a device's login when it is
    registered and revokes it when it is retired (revoking disconnects it), without a
    broker restart (Mosquitto's dynamic-security plugin, for one). Without one,
    devices log in with the password derived from the fleet secret
    (:func:`wire.protocol.credentials.device_password`) and the broker's password
    file is written when the stack starts.
    """

    async def issue(self, device_ids: Sequence[str]) -> None:
        """Make sure the devices have an enabled broker login (few round trips)."""

    async def revoke(self, device_id: str) -> None:
        """Remove the device's broker login and disconnect it if connected."""


class DeviceRegistry(Protocol):
    """What the admin API, the owner's claim and the commands need of the registry."""

    async def put_product_line(self, line: ProductLine) -> ProductLine:
        """Register a product line (its name is updated if it exists)."""

    async def product_lines(self) -> list[ProductLine]:
        """Return the product lines, by model, with their device counts."""

    async def register(
        self, devices: Sequence[NewDevice], *, key: bytes, now: datetime, actor: str
    ) -> list[RowOutcome]:
        """Register devices; each row on its own, the others go on."""

    async def get(self, device_id: str) -> RegisteredDevice | None:
        """Return a registered device."""

    async def note_firmware(self, device_id: str, firmware: str) -> bool:
        """Keep the firmware a device's boot event names; whether anything changed."""

    async def list(
        self,
        *,
        model: str | None = None,
        state: DeviceState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[RegisteredDevice]:
        """Return registered devices by id, after ``after``."""

    async def retire(self, device_id: str, *, now: datetime, actor: str) -> RegisteredDevice:
        """Take a device out of service: its claim code stops working."""

    async def claim(
        self, owner_id: str, code: str, *, key: bytes, label: str | None, now: datetime
    ) -> ClaimOutcome:
        """Bind the device whose claim code this is to the owner."""

    async def release(self, owner_id: str, device_id: str, *, now: datetime) -> ReleaseOutcome:
        """Unbind an owner's device, leaving nothing of theirs reachable from it."""

    async def add_invite(self, invite: str, owner_id: str, expires_at: datetime) -> None:
        """Keep an invite code (its digest) for an owner until it expires."""

    async def use_invite(self, invite: str, *, now: datetime) -> str:
        """Use an invite once; return its owner's id."""

    async def revoke_token(self, token_id: str) -> tuple[PrincipalKind, str]:
        """Revoke the token with this id; return whom it stood for."""

    async def revoke_tokens_of(self, kind: PrincipalKind, principal_id: str) -> int:
        """Revoke every token of a principal; return how many."""


# -- rows ----------------------------------------------------------------------------------------


def _device(row: Row) -> RegisteredDevice:
    return RegisteredDevice(
        device_id=row["device_id"],
        model=row["model"],
        serial=row["serial"],
        region=row["region"],
        firmware=row["firmware"],
        batch=row["batch"],
        registered_at=dt(row["registered_at"]),
        retired_at=None if row["retired_at"] is None else dt(row["retired_at"]),
        owner_id=row["owner_id"],
        claimable=row["claim_hash"] is not None
        and row["retired_at"] is None
        and row["owner_id"] is None,
    )


_SELECT: Final = (
    "SELECT registry.*, devices.owner_id AS owner_id FROM registry "
    "LEFT JOIN devices ON devices.device_id = registry.device_id"
)


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


def check_firmware(firmware: str) -> str:
    """Return ``firmware`` if it is a firmware version as the registry keeps them.

    Raises:
        InvalidRequestError: it is not (1 to 32 letters, digits and ``._+-``).
    """
    if not _FIRMWARE.fullmatch(firmware):
        raise InvalidRequestError(f"{firmware[:40]!r} is not a firmware version")
    return firmware


def check_new_device(device: NewDevice) -> list[tuple[str, str]]:
    """What is wrong with a device to register, as ``(column, words)`` (empty: nothing)."""
    errors: list[tuple[str, str]] = []
    if not is_valid_device_id(device.device_id):
        errors.append(
            (
                "device_id",
                f"{device.device_id!r} is not a device id (letters, digits and _ . : -, "
                "starting with a letter or digit, at most 64)",
            )
        )
    if not _MODEL.fullmatch(device.model):
        errors.append(("model", f"{device.model!r} is not a product model name"))
    if not _SERIAL.fullmatch(device.serial):
        errors.append(
            (
                "serial",
                f"{device.serial!r} is not a serial number (letters, digits and . _ / -, "
                "at most 64)",
            )
        )
    if not _REGION.fullmatch(device.region):
        errors.append(("region", f"{device.region!r} is not a region name"))
    if device.firmware is not None and not _FIRMWARE.fullmatch(device.firmware):
        errors.append(("firmware", f"{device.firmware!r} is not a firmware version"))
    if device.batch is not None and not _PRINTABLE.fullmatch(device.batch):
        errors.append(("batch", "a batch is 1 to 80 printable characters"))
    if device.claim_code is not None:
        try:
            normalise_claim_code(device.claim_code)
        except InvalidRequestError as exc:
            errors.append(("claim_code", str(exc)))
    return errors


#: The columns of a device file (CSV) or the fields of a device row (JSON); the first
#: two are required. ``device_id`` defaults to ``MODEL-SERIAL``, ``region`` to ``default``,
#: ``claim_code`` to a new code.
DEVICE_COLUMNS: Final = (
    "model",
    "serial",
    "device_id",
    "region",
    "firmware",
    "batch",
    "claim_code",
)
_REQUIRED: Final = ("model", "serial")


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """One row of a device file or list, read.

    Attributes:
        line: where it is: its line in a file (the header is line 1), or its number in a
            list (1 first).
        device: the device it describes (``None``: it could not be read).
        errors: what is wrong, as ``(column, words)``.
    """

    line: int
    device: NewDevice | None
    errors: tuple[tuple[str, str], ...] = ()


def device_from_fields(line: int, fields: Mapping[str, object]) -> ParsedRow:
    """Read one device row (CSV columns or JSON fields); blank values count as absent."""
    errors: list[tuple[str, str]] = []
    values: dict[str, str] = {}
    for name, value in fields.items():
        if name not in DEVICE_COLUMNS:
            errors.append((str(name), f"unknown column (known: {', '.join(DEVICE_COLUMNS)})"))
        elif value is None:
            continue
        elif not isinstance(value, str):
            errors.append((name, "must be text"))
        elif value.strip():
            values[name] = value.strip()
    for name in _REQUIRED:
        if name not in values and not any(column == name for column, _ in errors):
            errors.append((name, "is required"))
    if errors:
        return ParsedRow(line, None, tuple(errors))
    device = NewDevice(
        device_id=values.get("device_id", f"{values['model']}-{values['serial']}"),
        model=values["model"],
        serial=values["serial"],
        region=values.get("region", "default"),
        firmware=values.get("firmware"),
        batch=values.get("batch"),
        claim_code=values.get("claim_code"),
    )
    problems = check_new_device(device)
    if "device_id" not in values:
        # the id was made from the serial: a bad serial says it once, else the serial is
        # what to change (or a device_id to give)
        bad_serial = any(column == "serial" for column, _ in problems)
        problems = [
            ("serial", f"{words}; or give a device_id column")
            if column == "device_id"
            else (column, words)
            for column, words in problems
            if not (column == "device_id" and bad_serial)
        ]
    return ParsedRow(line, None if problems else device, tuple(problems))


def read_device_csv(lines: Iterable[str]) -> Iterator[ParsedRow]:
    """Read a device file (CSV, ``,`` or ``;`` separated, a header row naming the columns).

    Rows are read one by one, so a file of any length streams. Blank lines are skipped;
    a row with fewer values than the header has blanks for the rest, one with more is
    refused.

    Raises:
        InvalidRequestError: the header is missing, names an unknown or a repeated column,
            or lacks a required one (the file is refused as a whole).
    """
    source = iter(lines)
    header_line = next(source, None)
    if header_line is None or not header_line.strip():
        raise InvalidRequestError(
            f"line 1: the file needs a header row naming its columns ({', '.join(DEVICE_COLUMNS)})"
        )
    separator = ";" if header_line.count(";") > header_line.count(",") else ","
    header = [
        name.strip().lstrip("\ufeff").lower()
        for name in next(csv.reader([header_line], delimiter=separator))
    ]
    unknown = [name for name in header if name not in DEVICE_COLUMNS]
    if unknown:
        raise InvalidRequestError(
            f"line 1: unknown column {unknown[0]!r} (known: {', '.join(DEVICE_COLUMNS)})"
        )
    repeated = [name for name in header if header.count(name) > 1]
    if repeated:
        raise InvalidRequestError(f"line 1: column {repeated[0]!r} is named twice")
    missing = [name for name in _REQUIRED if name not in header]
    if missing:
        raise InvalidRequestError(f"line 1: the header lacks the required column {missing[0]!r}")
    reader = csv.reader(source, delimiter=separator)
    for cells in reader:
        line = reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            yield ParsedRow(
                line,
                None,
                (("", f"has {len(cells)} values, the header names {len(header)} columns"),),
            )
            continue
        # a spreadsheet may drop a row's empty cells at its end: they are blank
        cells += [""] * (len(header) - len(cells))
        yield device_from_fields(line, dict(zip(header, cells, strict=True)))


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
        if not _MODEL.fullmatch(line.model):
            raise InvalidRequestError(
                f"{line.model!r} is not a product model name (lower-case letters, digits, _)"
            )
        if not _PRINTABLE.fullmatch(line.name):
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
            _Checked(i, device, check_new_device(device)) for i, device in enumerate(devices)
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
        row: _Checked,
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
            row = conn.execute(f"{_SELECT} WHERE registry.device_id = ?", (device_id,)).fetchone()
            return None if row is None else _device(row)

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
            rows = conn.execute(f"{_SELECT} {where} ORDER BY registry.device_id LIMIT ?", params)
            return [_device(row) for row in rows]

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
                    f"{_SELECT} WHERE registry.device_id = ?", (device_id,)
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
                return _device(
                    conn.execute(f"{_SELECT} WHERE registry.device_id = ?", (device_id,)).fetchone()
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
                row = conn.execute(f"{_SELECT} WHERE registry.claim_hash = ?", (digest,)).fetchone()
                if row is None:
                    raise NotFoundError("no device has this claim code")
                device = _device(row)
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
        row = (_sha256(invite), owner_id, ts(expires_at))
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
        digest = _sha256(invite)
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
