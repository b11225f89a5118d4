"""Devices to register: their checks, and reading them from a device file (notifier).

:func:`check_new_device` says what is wrong with a device to register (both registries
run it on every row); :func:`read_device_csv` streams a manufacturer's device file (CSV)
and :func:`device_from_fields` reads one row of it or of a JSON list, each into a
:class:`ParsedRow` that names the line and the columns at fault.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from notifier.errors import InvalidRequestError
from notifier.registry.claims import normalise_claim_code
from notifier.registry.model import NewDevice
from wire.protocol import is_valid_device_id

MODEL_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,39}")
_SERIAL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")
_REGION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_FIRMWARE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
PRINTABLE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,80}")


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
    if not MODEL_NAME.fullmatch(device.model):
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
    if device.batch is not None and not PRINTABLE.fullmatch(device.batch):
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
