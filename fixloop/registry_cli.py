"""Onboarding by command: product lines, devices, owners, technicians, tokens (composition root).

``fixloop products add|list``, ``fixloop devices import|add|list|retire``, ``fixloop owners
invite|link-subject|unlink-subject|subjects``, ``fixloop technicians add`` and ``fixloop
tokens issue|revoke`` work on the configured case store (``[notifier] store_url`` when set,
else ``[notifier] db_path`` when set, else ``cases.sqlite3`` in ``stack.data_dir``, as
``fixloop up`` keeps it) through
:mod:`notifier.registry`, the same code the ops role's REST routes use.

* Claim codes are hashed under a key derived from the fleet secret
  (:func:`notifier.registry.claim_key`): the notifier that takes the claims must have
  the same one (``stack.fleet_secret``, or the ``fleet_secret`` file of the data folder).
* A code is shown once: ``devices add`` prints it; ``devices import`` writes
  ``device_id,model,serial,claim_code`` rows for the labels to ``--labels FILE`` (mode
  0600), or to stdout. Reports and progress go to stderr.
* ``devices import`` streams the file in chunks (each chunk one transaction), names each
  bad row by its line and column, and exits 1 when any row failed.
* With ``[broker] accounts = "dynsec"`` devices added or imported get their broker
  account at once, and a retired device's account is deleted (which disconnects it),
  through Mosquitto's dynamic-security plugin (:mod:`fixloop.dynsec`); passwords are
  those derived from the fleet secret, or with ``--random-passwords`` new ones written
  to the labels file (column ``mqtt_password``) for the factory to flash.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import json
import logging
import os
import re
import sys
import time as clock
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import IO, Any, Final

from diagnostics.product import load_products
from fixloop.config import FLEET_SECRET_FILE, ensure_fleet_secret, in_data_dir
from fixloop.dynsec import DynsecClient, generate_password
from fixloop.dynsec_cli import admin_client
from fixloop.settings import Settings
from notifier.admin import Onboarding
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from notifier.model import Owner, Technician, Window
from notifier.postgres import PostgresStore
from notifier.registry import (
    DeviceRegistry,
    NewDevice,
    ParsedRow,
    ProductLine,
    RegisteredDevice,
    RowOutcome,
    claim_key,
    device_from_fields,
    new_token,
    read_device_csv,
    token_id,
)
from notifier.sqlite import SqliteStore
from notifier.store import CaseStore, PrincipalKind
from notifier.stores import case_store
from wire.errors import ConfigError, FixloopError
from wire.protocol.credentials import device_password

__all__ = [
    "COMMANDS",
    "add_device_parsers",
    "add_parsers",
    "add_product_parsers",
    "case_store_path",
    "handles",
    "run",
    "service_onboarding",
]

_LOG = logging.getLogger(__name__)

#: Top-level commands of this module (``products`` and ``devices`` are shared).
COMMANDS: Final = frozenset(("owners", "technicians", "tokens"))
_PRODUCT_ACTIONS: Final = frozenset(("add", "list"))
_DEVICE_ACTIONS: Final = frozenset(("import", "add", "list", "retire"))
_CHUNK: Final = 500
_INVITE_TTL: Final = timedelta(days=14)
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LABEL_COLUMNS: Final = ("device_id", "model", "serial", "claim_code")
_MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0, 2: sub


# -- parsers ----------------------------------------------------------------------------------


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="the data folder whose case store to use (stack.data_dir)"
    )


def add_product_parsers(product_actions: Any) -> None:
    """Add ``add`` and ``list`` to ``fixloop products``."""
    add = product_actions.add_parser(
        "add", help="register a product line (a model with a product file) for devices"
    )
    add.add_argument("model", metavar="MODEL", help="the product model (its product file's)")
    add.add_argument("--name", help="its name for people (default: the model)")
    _data_dir(add)
    listing = product_actions.add_parser("list", help="the product lines and their devices")
    _data_dir(listing)


def add_device_parsers(device_actions: Any) -> None:
    """Add ``import``, ``add``, ``list`` and ``retire`` to ``fixloop devices``."""
    imp = device_actions.add_parser(
        "import", help="register devices from a CSV file (a report per row; 1 if any failed)"
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="CSV with model,serial,...")
    imp.add_argument(
        "--labels",
        type=Path,
        metavar="OUT.csv",
        help="write device_id,model,serial,claim_code here (default: stdout)",
    )
    imp.add_argument(
        "--random-passwords",
        action="store_true",
        help="with dynsec accounts: new random broker passwords, in the labels file",
    )
    imp.add_argument(
        "--progress", action="store_true", help="report progress on stderr even into a pipe"
    )
    _data_dir(imp)

    add = device_actions.add_parser("add", help="register one device; prints its claim code")
    add.add_argument("--model", required=True, help="its product line")
    add.add_argument("--serial", required=True, help="its serial number")
    add.add_argument("--device-id", help="its id on the wire (default MODEL-SERIAL)")
    add.add_argument("--region", help="its service region (default 'default')")
    add.add_argument("--firmware", help="the firmware it leaves the factory with")
    add.add_argument("--batch", help="its production batch")
    add.add_argument("--claim-code", help="its claim code (default: a new one)")
    add.add_argument(
        "--random-password",
        action="store_true",
        help="with dynsec accounts: a new random broker password, printed once",
    )
    _data_dir(add)

    listing = device_actions.add_parser("list", help="registered devices and their state")
    listing.add_argument("--model", help="only this product line")
    listing.add_argument(
        "--state", choices=["unclaimed", "claimed", "retired"], help="only devices in this state"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _data_dir(listing)

    retire = device_actions.add_parser(
        "retire", help="take a device out of service (its claim code and broker login stop)"
    )
    retire.add_argument("device_id", metavar="DEVICE_ID")
    _data_dir(retire)


def add_parsers(commands: Any) -> None:
    """Add ``owners``, ``technicians`` and ``tokens`` to the ``fixloop`` commands."""
    owners = commands.add_parser(
        "owners", help="device owners: invite one, link their identity-provider sign-ins"
    )
    owner_actions = owners.add_subparsers(dest="owners_command", required=True, metavar="ACTION")
    invite = owner_actions.add_parser(
        "invite", help="create an owner and a one-time invite code for their app"
    )
    invite.add_argument("--name", required=True, help="how messages address them")
    invite.add_argument("--language", default="en", help="message language (en)")
    invite.add_argument("--timezone", default="UTC", help="IANA time zone (UTC)")
    invite.add_argument("--region", default="default", help="service region (default)")
    invite.add_argument(
        "--consent",
        choices=["fix_and_tell", "ask_if_interrupting", "always_ask"],
        default="ask_if_interrupting",
        help="which remote fixes may run without asking",
    )
    invite.add_argument(
        "--token", action="store_true", help="also issue an API token now (printed once)"
    )
    _data_dir(invite)
    for action, words in (
        ("link-subject", "link a sign-in of the identity provider (its sub) to an owner"),
        ("unlink-subject", "unlink a sign-in of the identity provider from an owner"),
    ):
        link = owner_actions.add_parser(action, help=words)
        link.add_argument("owner_id", metavar="OWNER_ID")
        link.add_argument("subject", metavar="SUBJECT", help="the provider's sub for the person")
        link.add_argument(
            "--issuer",
            help="the provider, as its tokens' iss says (default [notifier.oidc] issuer)",
        )
        _data_dir(link)
    subjects = owner_actions.add_parser(
        "subjects", help="the identity-provider sign-ins linked to an owner"
    )
    subjects.add_argument("owner_id", metavar="OWNER_ID")
    _data_dir(subjects)

    technicians = commands.add_parser("technicians", help="service technicians: add one")
    tech_actions = technicians.add_subparsers(
        dest="technicians_command", required=True, metavar="ACTION"
    )
    add = tech_actions.add_parser("add", help="add (or change) a technician, with an API token")
    add.add_argument("--name", required=True, help="display name")
    add.add_argument("--region", required=True, help="the region they serve")
    add.add_argument("--skills", required=True, help="parts they service, comma separated")
    add.add_argument("--id", dest="technician_id", help="their id (default: a new one)")
    add.add_argument("--timezone", default="UTC", help="IANA time zone of their hours (UTC)")
    add.add_argument(
        "--hours",
        default="mon-fri 08:00-17:00",
        help="weekly hours, e.g. 'mon-fri 08:00-17:00, sat 09:00-12:00'",
    )
    add.add_argument("--no-token", action="store_true", help="issue no API token")
    _data_dir(add)

    tokens = commands.add_parser("tokens", help="API tokens: issue and revoke")
    token_actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    issue = token_actions.add_parser("issue", help="issue a token (printed once, on stdout)")
    issue.add_argument("--role", required=True, choices=["ops", "owner", "technician"])
    issue.add_argument(
        "--id", dest="principal_id", required=True, help="owner or technician id, or ops name"
    )
    _data_dir(issue)
    revoke = token_actions.add_parser("revoke", help="revoke a token by its id, or all of someone")
    revoke.add_argument("token_id", nargs="?", metavar="TOKEN_ID", help="the id issue printed")
    revoke.add_argument("--all-of", metavar="ROLE:ID", help="every token of ops:NAME, owner:ID ...")
    _data_dir(revoke)


# -- helpers ----------------------------------------------------------------------------------


def case_store_path(settings: Settings) -> Path:
    """The SQLite case store: ``[notifier] db_path`` if set, else the stack's.

    The commands work on it unless ``[notifier] store_url`` names a PostgreSQL database.
    """
    return in_data_dir(settings).notifier.db_path


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201 - the commands' report


def _out(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the commands' output


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _key(settings: Settings) -> bytes:
    settings = ensure_fleet_secret(settings)
    assert settings.stack.fleet_secret is not None  # ensure_fleet_secret filled it in
    return claim_key(settings.stack.fleet_secret.get_secret_value())


def _fleet_secret(settings: Settings) -> str:
    settings = ensure_fleet_secret(settings)
    assert settings.stack.fleet_secret is not None
    return settings.stack.fleet_secret.get_secret_value()


def _now() -> datetime:
    return datetime.now(UTC)


async def _open(settings: Settings) -> SqliteStore | PostgresStore:
    if settings.notifier.store_url is not None:
        return await case_store(settings.notifier).open()
    path = case_store_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    return await SqliteStore(path).open()


def _hours(text: str) -> tuple[Window, ...]:
    """Parse ``mon-fri 08:00-17:00, sat 09:00-12:00`` into weekly windows."""
    windows: list[Window] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(
            r"([a-z]{3})(?:-([a-z]{3}))?\s+(\d{1,2}:\d{2})-(\d{1,2}:\d{2})", part.lower()
        )
        if match is None or match.group(1) not in _DAYS or (match.group(2) or "mon") not in _DAYS:
            raise ConfigError(f"--hours: {part!r} is not like 'mon-fri 08:00-17:00'")
        first = _DAYS.index(match.group(1))
        last = _DAYS.index(match.group(2)) if match.group(2) else first
        try:
            start = time.fromisoformat(match.group(3).zfill(5))
            end = time.fromisoformat(match.group(4).zfill(5))
        except ValueError as exc:
            raise ConfigError(f"--hours: {part!r} has a time that is not one") from exc
        if end <= start or last < first:
            raise ConfigError(f"--hours: {part!r} must end after it starts, within a week")
        windows += [Window(day, start, end) for day in range(first, last + 1)]
    return tuple(windows)


# -- broker accounts --------------------------------------------------------------------------


@dataclass
class _Accounts:
    """Device broker accounts in the dynamic-security plugin, when the settings say so."""

    settings: Settings
    random: bool = False

    @property
    def enabled(self) -> bool:
        return self.settings.broker.accounts == "dynsec"

    def passwords(self, device_ids: Sequence[str]) -> dict[str, str]:
        if self.random:
            return {device_id: generate_password() for device_id in device_ids}
        secret = _fleet_secret(self.settings)
        return {device_id: device_password(secret, device_id) for device_id in device_ids}

    async def issue(self, device_ids: Sequence[str]) -> None:
        """Enable the devices' accounts with their derived passwords (a :class:`BrokerAccounts`)."""
        await self.issue_passwords(self.passwords(device_ids))

    async def issue_passwords(self, passwords: dict[str, str]) -> None:
        if not passwords:
            return
        timeout = self.settings.broker.control_timeout_s
        async with DynsecClient(admin_client(self.settings), timeout_s=timeout) as dynsec:
            await dynsec.ensure_devices(passwords)

    async def revoke(self, device_id: str) -> None:
        timeout = self.settings.broker.control_timeout_s
        async with DynsecClient(admin_client(self.settings), timeout_s=timeout) as dynsec:
            await dynsec.revoke_device(device_id, delete=True, missing_ok=True)


def service_onboarding(settings: Settings, store: CaseStore) -> Onboarding | None:
    """The onboarding routes for a notifier on ``store`` (``fixloop notifier``, ``fixloop up``).

    Claim codes need the fleet secret: from ``stack.fleet_secret`` or the data folder's
    ``fleet_secret`` file (never made here: a service must not invent a key the commands
    do not share); without it, claims answer 503. With ``[broker] accounts = "dynsec"``
    devices registered over the API get their broker accounts at once.
    """
    if not isinstance(store, SqliteStore | PostgresStore):
        return None
    secret = settings.stack.fleet_secret
    path = settings.stack.data_dir / FLEET_SECRET_FILE
    text = secret.get_secret_value() if secret is not None else None
    if text is None and path.is_file():
        text = path.read_text(encoding="utf-8").strip() or None
    if text is None:
        _LOG.warning(
            "no fleet secret (stack.fleet_secret, or %s): owners cannot claim devices here", path
        )
    accounts = _Accounts(settings)
    return Onboarding(
        registry=store.registry(),
        claim_key=None if text is None else claim_key(text),
        models=frozenset(load_products(settings.diagnostics.products_dir).products),
        accounts=accounts if accounts.enabled else None,
    )


# -- products ---------------------------------------------------------------------------------


async def _products(args: argparse.Namespace, settings: Settings) -> int:
    models = load_products(settings.diagnostics.products_dir).products
    store = await _open(settings)
    try:
        registry = store.registry()
        if args.products_command == "add":
            if args.model not in models:
                raise ConfigError(
                    f"no product file describes {args.model!r} (known: {', '.join(sorted(models))})"
                    ": put its file in the products folder (diagnostics.products_dir) and "
                    "check it with `fixloop products check FILE`"
                )
            line = await registry.put_product_line(
                ProductLine(args.model, args.name or args.model, _now())
            )
            _out(f"product line {line.model} ({line.name}) registered; {line.devices} devices")
            return 0
        for line in await registry.product_lines():
            known = "" if line.model in models else "  (no product file here)"
            _out(f"{line.model}\t{line.name}\t{line.devices} devices{known}")
        return 0
    finally:
        await store.close()


# -- devices ----------------------------------------------------------------------------------


def _row_text(where: str, row: int, column: str, words: str) -> str:
    return f"{where}:{row}: {column}: {words}" if column else f"{where}:{row}: {words}"


@dataclass
class _Import:
    """One import's running state: duplicates within the file, counts, the labels."""

    where: str
    labels: Any
    accounts: _Accounts
    added: int = 0
    failed: int = 0
    without_login: int = 0
    seen_ids: dict[str, int] | None = None
    seen_serials: dict[tuple[str, str], int] | None = None
    pending: list[tuple[int, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen_ids = {}
        self.seen_serials = {}

    def earlier(self, row: ParsedRow) -> list[tuple[str, str]]:
        """Clashes of a row with an earlier row of the same file (beyond one chunk)."""
        assert self.seen_ids is not None
        assert self.seen_serials is not None
        device = row.device
        if device is None:
            return []
        errors: list[tuple[str, str]] = []
        first = self.seen_ids.get(device.device_id)
        if first is not None:
            errors.append(("device_id", f"{device.device_id!r} is also line {first}"))
        serial = self.seen_serials.get((device.model, device.serial))
        if serial is not None:
            errors.append(
                (
                    "serial",
                    f"duplicate serial {device.serial!r} of {device.model}: also line {serial}",
                )
            )
        if not errors:
            self.seen_ids[device.device_id] = row.line
            self.seen_serials[(device.model, device.serial)] = row.line
        return errors

    def fail(self, row: int, errors: Sequence[tuple[str, str]]) -> None:
        self.failed += 1
        self.pending.extend((row, column, words) for column, words in errors)

    def report(self) -> None:
        """Say the failures of the chunk, in file order."""
        for row, column, words in sorted(self.pending, key=lambda item: item[0]):
            _say(_row_text(self.where, row, column, words))
        self.pending.clear()


async def _import_chunk(
    registry: DeviceRegistry, state: _Import, rows: list[ParsedRow], key: bytes
) -> None:
    ready: list[ParsedRow] = []
    for row in rows:
        errors = list(row.errors) or state.earlier(row)
        if errors:
            state.fail(row.line, errors)
        else:
            ready.append(row)
    devices: list[NewDevice] = [row.device for row in ready if row.device is not None]
    outcomes = await registry.register(devices, key=key, now=_now(), actor=_actor())
    added: list[tuple[ParsedRow, RowOutcome]] = []
    for row, outcome in zip(ready, outcomes, strict=True):
        if outcome.ok:
            added.append((row, outcome))
        else:
            state.fail(row.line, outcome.errors)
    passwords: dict[str, str] = {}
    if state.accounts.enabled and added:
        passwords = state.accounts.passwords([o.device_id for _, o in added])
        try:
            await state.accounts.issue_passwords(passwords)
        except FixloopError as exc:
            # registered already: their labels are written all the same, the accounts wait
            state.without_login += len(added)
            _say(f"{state.where}: broker accounts of {len(added)} devices not issued: {exc}")
    for row, outcome in added:
        device = row.device
        assert device is not None
        line = [device.device_id, device.model, device.serial, outcome.claim_code or ""]
        if state.accounts.random:
            line.append(passwords.get(device.device_id, ""))
        state.labels.writerow(line)
    state.added += len(added)
    state.report()


def _count_rows(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return None


def _chunks(rows: Iterator[ParsedRow]) -> Iterator[list[ParsedRow]]:
    chunk: list[ParsedRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_labels(path: Path | None) -> tuple[IO[str], bool]:
    if path is None:
        return sys.stdout, False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigError(f"--labels {path}: {exc.strerror}") from exc
    return os.fdopen(fd, "w", encoding="utf-8", newline=""), True


async def _import(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = args.file
    key = _key(settings)
    accounts = _Accounts(settings, random=args.random_passwords)
    if args.random_passwords and not accounts.enabled:
        raise ConfigError("--random-passwords needs broker accounts in dynsec (broker.accounts)")
    total = _count_rows(path)
    shown = args.progress or sys.stderr.isatty()
    store = await _open(settings)
    sink, owned = _open_labels(args.labels)
    try:
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow([*_LABEL_COLUMNS, *(["mqtt_password"] if args.random_passwords else [])])
        state = _Import(str(path), writer, accounts)
        registry = store.registry()
        started = clock.monotonic()
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                for chunk in _chunks(read_device_csv(f)):
                    await _import_chunk(registry, state, chunk, key)
                    sink.flush()  # the chunk is stored: its claim codes must not be lost
                    if shown:
                        done = state.added + state.failed
                        of = f"/{total:,}" if total else ""
                        _say(f"devices import: {done:,}{of} rows, {state.failed:,} failed")
        except InvalidRequestError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
        except csv.Error as exc:
            raise ConfigError(f"{path}: not a CSV file the reader understands: {exc}") from exc
    finally:
        if owned:
            sink.close()
        await store.close()
    seconds = clock.monotonic() - started
    _say(
        f"devices import: {state.added + state.failed:,} rows: {state.added:,} added, "
        f"{state.failed:,} failed ({seconds:.1f} s)"
        + (f"; claim codes in {args.labels}" if args.labels and state.added else "")
        + (
            "; broker accounts issued"
            if accounts.enabled and state.added and not state.without_login
            else ""
        )
    )
    if state.without_login:
        _say(
            f"devices import: {state.without_login:,} devices registered without a broker "
            "account: give them one with `fixloop devices credentials issue DEVICE_ID`"
        )
    return 1 if state.failed or state.without_login else 0


async def _add(args: argparse.Namespace, settings: Settings) -> int:
    fields = {
        "model": args.model,
        "serial": args.serial,
        "device_id": args.device_id,
        "region": args.region,
        "firmware": args.firmware,
        "batch": args.batch,
        "claim_code": args.claim_code,
    }
    row = device_from_fields(1, {k: v for k, v in fields.items() if v is not None})
    flags = {"device_id": "--device-id", "claim_code": "--claim-code"}
    if row.errors or row.device is None:
        for column, words in row.errors:
            _say(f"fixloop: {flags.get(column, '--' + column)}: {words}")
        return 1
    accounts = _Accounts(settings, random=args.random_password)
    key = _key(settings)
    store = await _open(settings)
    try:
        (outcome,) = await store.registry().register(
            [row.device], key=key, now=_now(), actor=_actor()
        )
    finally:
        await store.close()
    if not outcome.ok:
        for column, words in outcome.errors:
            _say(f"fixloop: {flags.get(column, '--' + column)}: {words}")
        return 1
    _out(f"{outcome.device_id}\tclaim code {outcome.claim_code}")
    if accounts.enabled:
        passwords = accounts.passwords([outcome.device_id])
        await accounts.issue_passwords(passwords)
        if args.random_password:
            _out(f"{outcome.device_id}\tbroker password {passwords[outcome.device_id]}")
    _say(f"device {outcome.device_id} registered; its claim code is shown only now")
    return 0


def _device_line(device: RegisteredDevice, as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "device_id": device.device_id,
                "model": device.model,
                "serial": device.serial,
                "region": device.region,
                "firmware": device.firmware,
                "batch": device.batch,
                "state": device.state,
                "owner_id": device.owner_id,
                "registered_at": device.registered_at.isoformat(),
            }
        )
    cells = [
        device.device_id,
        device.model,
        device.serial,
        device.region,
        device.firmware or "-",
        device.state,
        device.owner_id or "-",
    ]
    return "\t".join(cells)


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    store = await _open(settings)
    try:
        registry = store.registry()
        after: str | None = None
        while True:
            page = await registry.list(model=args.model, state=args.state, after=after, limit=1000)
            for device in page:
                _out(_device_line(device, args.json))
            if len(page) < 1000:
                return 0
            after = page[-1].device_id
    finally:
        await store.close()


async def _retire(args: argparse.Namespace, settings: Settings) -> int:
    accounts = _Accounts(settings)
    store = await _open(settings)
    try:
        registry = store.registry()
        if await registry.get(args.device_id) is None:
            raise ConfigError(f"there is no registered device {args.device_id}")
        if accounts.enabled:
            # first: should the broker be away, nothing has changed and a retry finishes it
            await accounts.revoke(args.device_id)
        try:
            device = await registry.retire(args.device_id, now=_now(), actor=_actor())
        except FixloopError as exc:
            raise ConfigError(str(exc)) from exc
    finally:
        await store.close()
    _out(
        f"device {device.device_id} retired: its claim code no longer works"
        + ("; its broker account is deleted" if accounts.enabled else "")
    )
    return 0


# -- owners, technicians, tokens --------------------------------------------------------------


async def _invite(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(args.timezone)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"--timezone: {args.timezone!r} is not an IANA time zone") from exc
    owner = Owner(
        owner_id=f"o-{new_token()[:16]}",
        name=args.name,
        language=args.language,
        timezone=args.timezone,
        region=args.region,
        consent=args.consent,
    )
    invite = new_token()
    expires_at = _now() + _INVITE_TTL
    store = await _open(settings)
    try:
        await store.put_owner(owner)
        await store.registry().add_invite(invite, owner.owner_id, expires_at)
        token = None
        if args.token:
            token = new_token()
            await store.add_token(token, ("owner", owner.owner_id))
    finally:
        await store.close()
    _out(f"owner\t{owner.owner_id}")
    _out(f"invite\t{invite}")
    if token is not None:
        _out(f"token\t{token}")
    _say(
        f"owner {owner.owner_id} invited: their app exchanges the invite for a token at "
        f"POST /api/v1/invites/accept until {expires_at:%Y-%m-%d %H:%M} UTC; shown only now"
    )
    return 0


async def _subjects(args: argparse.Namespace, settings: Settings) -> int:
    issuer = getattr(args, "issuer", None) or settings.notifier.oidc.issuer
    if args.owners_command != "subjects":
        if issuer is None:
            raise ConfigError("--issuer: needed, as [notifier.oidc] names no issuer")
        if not 0 < len(args.subject) <= _MAX_SUBJECT_CHARS or not args.subject.isprintable():
            raise ConfigError("SUBJECT: the provider's sub, 1 to 255 printable characters")
    store = await _open(settings)
    try:
        if await store.get_owner(args.owner_id) is None:
            raise ConfigError(f"OWNER_ID: there is no owner {args.owner_id}")
        if args.owners_command == "subjects":
            for found_issuer, subject in await store.subjects_of(args.owner_id):
                _out(f"{found_issuer}\t{subject}")
            return 0
        assert issuer is not None
        if args.owners_command == "link-subject":
            try:
                await store.link_subject(issuer, args.subject, args.owner_id)
            except ConflictError as exc:
                raise ConfigError(f"SUBJECT: {exc}") from exc
            _out(f"{args.subject} of {issuer} linked to owner {args.owner_id}")
            return 0
        if not await store.unlink_subject(issuer, args.subject, args.owner_id):
            _say(f"{args.subject} of {issuer} is not linked to owner {args.owner_id}")
            return 1
        _out(f"{args.subject} of {issuer} unlinked from owner {args.owner_id}")
        return 0
    finally:
        await store.close()


async def _technician(args: argparse.Namespace, settings: Settings) -> int:
    skills = frozenset(s.strip() for s in args.skills.split(",") if s.strip())
    if not skills or not all(re.fullmatch(r"[a-z][a-z0-9_]{0,39}", s) for s in skills):
        raise ConfigError("--skills: part names like bearing,drain_pump, comma separated")
    technician = Technician(
        technician_id=args.technician_id or f"t-{new_token()[:16]}",
        name=args.name,
        region=args.region,
        skills=skills,
        timezone=args.timezone,
        hours=_hours(args.hours),
    )
    store = await _open(settings)
    try:
        await store.put_technician(technician)
        token = None
        if not args.no_token:
            token = new_token()
            await store.add_token(token, ("technician", technician.technician_id))
    finally:
        await store.close()
    _out(f"technician\t{technician.technician_id}")
    if token is not None:
        _out(f"token\t{token}")
        _say(f"token id {token_id(token)} (to revoke it); the token is shown only now")
    return 0


_ROLES: Final[dict[str, PrincipalKind]] = {
    "ops": "ops",
    "owner": "owner",
    "technician": "technician",
}


async def _tokens(args: argparse.Namespace, settings: Settings) -> int:
    store = await _open(settings)
    try:
        if args.tokens_command == "issue":
            role = _ROLES[args.role]
            if role == "owner" and await store.get_owner(args.principal_id) is None:
                raise ConfigError(f"--id: there is no owner {args.principal_id}")
            if role == "technician" and await store.get_technician(args.principal_id) is None:
                raise ConfigError(f"--id: there is no technician {args.principal_id}")
            token = new_token()
            await store.add_token(token, (role, args.principal_id))
            _out(token)
            _say(
                f"{role} token for {args.principal_id} issued, id {token_id(token)} (to revoke "
                "it); the token above is shown only now"
            )
            return 0
        registry = store.registry()
        if args.all_of is not None:
            kind, _, principal = args.all_of.partition(":")
            if kind not in _ROLES or not principal:
                raise ConfigError("--all-of: ROLE:ID with ROLE ops, owner or technician")
            count = await registry.revoke_tokens_of(_ROLES[kind], principal)
            _out(f"{count} tokens of {kind} {principal} revoked")
            return 0
        if args.token_id is None:
            raise ConfigError("tokens revoke: give TOKEN_ID or --all-of ROLE:ID")
        try:
            kind, principal = await registry.revoke_token(args.token_id)
        except NotFoundError as exc:
            raise ConfigError(str(exc)) from exc
        _out(f"token {args.token_id} of {kind} {principal} revoked")
        return 0
    finally:
        await store.close()


# -- entry ------------------------------------------------------------------------------------


def handles(args: argparse.Namespace) -> bool:
    """Whether this module carries out the parsed command."""
    if args.command in COMMANDS:
        return True
    if args.command == "products":
        return getattr(args, "products_command", None) in _PRODUCT_ACTIONS
    if args.command == "devices":
        return getattr(args, "devices_command", None) in _DEVICE_ACTIONS
    return False


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Carry out one onboarding command; return the exit status.

    Raises:
        ConfigError: a wrong argument, an unreadable file, an unknown model or device.
        FixloopError: the case store or the broker failed.
    """
    if args.command == "products":
        return asyncio.run(_products(args, settings))
    if args.command == "devices":
        if args.devices_command == "import" and not args.file.is_file():
            raise ConfigError(f"{args.file}: no such file")
        action = {"import": _import, "add": _add, "list": _list, "retire": _retire}
        return asyncio.run(action[args.devices_command](args, settings))
    if args.command == "owners":
        if args.owners_command == "invite":
            return asyncio.run(_invite(args, settings))
        return asyncio.run(_subjects(args, settings))
    if args.command == "technicians":
        return asyncio.run(_technician(args, settings))
    return asyncio.run(_tokens(args, settings))
