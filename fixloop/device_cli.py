"""``fixloop devices import|add|list|retire``: devices onboarded by command (composition root).

The device commands of :mod:`fixloop.registry_cli` (which parses them and dispatches
here), on the configured case store through :mod:`notifier.registry`: claim codes shown
once (printed, or written to the labels file), imports streamed in chunks of one
transaction each with every bad row named by line and column, and with
``[broker] accounts = "dynsec"`` each device's broker account issued or deleted at once
(:mod:`fixloop.onboarding`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time as clock
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from fixloop.onboarding import _Accounts, _actor, _key, _now, _open, _out, _say
from fixloop.settings import Settings
from notifier.errors import InvalidRequestError
from notifier.registry import (
    DeviceRegistry,
    NewDevice,
    ParsedRow,
    RegisteredDevice,
    RowOutcome,
    device_from_fields,
    read_device_csv,
)
from wire.errors import ConfigError, FixloopError

__all__ = ["add_device", "import_devices", "list_devices", "retire_device"]

_CHUNK: Final = 500
_LABEL_COLUMNS: Final = ("device_id", "model", "serial", "claim_code")


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


async def import_devices(args: argparse.Namespace, settings: Settings) -> int:
    """Import the devices of ``args.file`` (``fixloop devices import``); return the exit status."""
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


async def add_device(args: argparse.Namespace, settings: Settings) -> int:
    """Register one device and print its claim code (``fixloop devices add``)."""
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


async def list_devices(args: argparse.Namespace, settings: Settings) -> int:
    """Print the registered devices (``fixloop devices list``)."""
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


async def retire_device(args: argparse.Namespace, settings: Settings) -> int:
    """Retire one device and delete its broker account (``fixloop devices retire``)."""
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
