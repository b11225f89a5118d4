"""Firmware updates over the air: download, checksum, install, report, roll back.

The library does the contract's part of a ``firmware_update`` command; the device maker's
updater does the rest through the :class:`Firmware` hooks (an A/B partition scheme, a
package manager, a container swap). The sequence:

1. The command carries ``version``, ``url`` (http or https) and ``sha256`` (hex).
2. The image is downloaded to ``<data_dir>/ota/`` (bounded size, timeout) while its
   SHA-256 is computed; a mismatch deletes it and answers ``ok: false`` with code
   ``OTA_CHECKSUM``: nothing is installed.
3. :meth:`Firmware.install` writes it to the inactive slot; the update is recorded as
   pending (version, previous version, command id, boot attempts) in the device store.
4. The ``command_result`` (``ok: true``, code = the new version) is stored, then
   :meth:`Firmware.activate` reboots into the new version.
5. At the next start the library counts the boot and asks :meth:`Firmware.boot_ok`.
   A good boot reports an ``info`` event (code = the new version, ``ok: true``). A
   failed check, a version other than the new one, or more boots than
   ``max_boot_attempts`` without a verdict (a crash loop) report an ``error`` event
   (code ``OTA_ROLLBACK``) and call :meth:`Firmware.rollback` to the previous version.

Both outcome events carry the update's ``command_id``; they are ``info``/``error``
events, not a second ``command_result`` (every command is answered exactly once).
:class:`FirmwareUpdates` runs this sequence for :class:`~device.core.DeviceCore`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from device.contract import ArgValue, Command, DataValue, EventKind
from device.errors import OtaError
from device.handlers import CommandResult, event_word
from device.store import DeviceState

__all__ = [
    "EventWriter",
    "Firmware",
    "FirmwareUpdates",
    "PendingUpdate",
    "UpdateRequest",
    "download_image",
    "parse_update",
]

_LOG = logging.getLogger(__name__)

_VERSION_RE: Final = re.compile(r"\d{1,4}(\.\d{1,4}){0,3}")
_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_CHUNK: Final = 64 * 1024


class Firmware(Protocol):
    """What the device's own updater does; the library calls these at the right moments."""

    def version(self) -> str:
        """The version running now (``2.3.1``)."""
        ...

    def install(self, image: Path, version: str) -> None:
        """Install a verified image as ``version`` into the slot that is not running.

        Raises:
            OtaError: the image cannot be installed (the result says so; nothing changes).
        """

    def activate(self) -> None:
        """Boot into the installed version (normally does not return)."""

    def boot_ok(self) -> bool:
        """After booting a new version: whether it works (the maker's own checks)."""
        ...

    def rollback(self, version: str) -> None:
        """Go back to ``version`` (the one that ran before the update).

        Raises:
            OtaError: the rollback failed.
        """


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """The arguments of a ``firmware_update`` command, checked.

    Attributes:
        version: the version to install (digits and dots, ``2.4.0``).
        url: where the image is (http or https).
        sha256: the image's SHA-256, lower-case hex.
    """

    version: str
    url: str
    sha256: str


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An installed update waiting for its first good boot (kept in the device store).

    Attributes:
        version: the new version.
        previous: the version to roll back to.
        command_id: the command that asked for it.
        attempts: boots of the new version so far.
    """

    version: str
    previous: str
    command_id: str
    attempts: int = 0

    def to_json(self) -> dict[str, object]:
        """The JSON form kept in the store."""
        return {
            "version": self.version,
            "previous": self.previous,
            "command_id": self.command_id,
            "attempts": self.attempts,
        }

    @classmethod
    def from_json(cls, value: object) -> PendingUpdate | None:
        """Read the stored form; ``None`` when there is none or it is unreadable."""
        if not isinstance(value, dict):
            return None
        version, previous = value.get("version"), value.get("previous")
        command_id, attempts = value.get("command_id"), value.get("attempts")
        if not (
            isinstance(version, str)
            and isinstance(previous, str)
            and isinstance(command_id, str)
            and isinstance(attempts, int)
        ):
            return None
        return cls(version, previous, command_id, attempts)


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a version made of digits and dots."""
    return tuple(int(part) for part in version.split("."))


def parse_update(args: Mapping[str, ArgValue]) -> UpdateRequest:
    """Check a ``firmware_update`` command's arguments.

    Raises:
        OtaError: a missing or malformed ``version``, ``url`` or ``sha256``.
    """
    version, url, sha256 = args.get("version"), args.get("url"), args.get("sha256")
    if not isinstance(version, str) or _VERSION_RE.fullmatch(version) is None:
        raise OtaError("firmware_update needs a version like 2.4.0")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise OtaError("firmware_update needs the image's http(s) url")
    if not isinstance(sha256, str) or _SHA256_RE.fullmatch(sha256) is None:
        raise OtaError("firmware_update needs the image's sha256 (64 hex digits)")
    return UpdateRequest(version, url, sha256.lower())


def _copy(source: BinaryIO, out: BinaryIO, hash_chunk: Callable[[bytes], None], limit: int) -> int:
    size = 0
    while chunk := source.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise OtaError(f"the image is larger than {limit} bytes")
        hash_chunk(chunk)
        out.write(chunk)
    return size


def download_image(
    request: UpdateRequest, folder: Path, *, max_bytes: int, timeout_s: float
) -> Path:
    """Download an image and check its SHA-256 while it arrives.

    Args:
        request: what to fetch and the checksum it must have.
        folder: where images are kept (created if missing).
        max_bytes: larger images are refused.
        timeout_s: limit on the connection and on each read.

    Returns:
        The verified image file.

    Raises:
        OtaError: the download failed, was too large, or the checksum differs (the
            partial or wrong file is deleted).
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"firmware-{request.version}.img"
    part = target.with_suffix(".part")
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(request.url, timeout=timeout_s) as response,
            part.open("wb") as out,
        ):
            size = _copy(response, out, digest.update, max_bytes)
    except OtaError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, urllib.error.URLError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise OtaError(f"download of {request.version} failed: {exc}") from exc
    if digest.hexdigest() != request.sha256:
        part.unlink(missing_ok=True)
        raise OtaError(
            f"checksum mismatch: the image of {request.version} is not the one announced"
        )
    part.replace(target)
    _LOG.info("firmware %s downloaded (%d bytes, sha256 checked)", request.version, size)
    return target


class EventWriter(Protocol):
    """How the updates store an event: the device core's own writer (numbered, checked)."""

    def __call__(
        self,
        kind: EventKind,
        ts: datetime | None,
        *,
        code: str | None = None,
        command_id: str | None = None,
        ok: bool | None = None,
        detail: str | None = None,
        data: Mapping[str, DataValue] | None = None,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        """Store an event; return its ``seq``."""
        ...


class FirmwareUpdates:
    """One device's firmware updates: the ``firmware_update`` command and the boot after.

    The steps of the module's sequence that run on the device: :meth:`run` does steps 1
    to 3 and leaves the restart to the command's ``then`` (step 4); :meth:`settle` is
    step 5, at the next boot.

    Args:
        device_id: the device (for the log).
        firmware: the device maker's updater hooks.
        ota_dir: where images are downloaded.
        store: the device store (the pending update is kept there).
        report: stores the outcome events.
        max_boot_attempts: boots of a new firmware without a verdict before it is
            rolled back (a crash loop).
        max_image_bytes: largest firmware image accepted.
        download_timeout_s: limit on connecting to the image server and on each read.
    """

    def __init__(
        self,
        device_id: str,
        firmware: Firmware,
        ota_dir: Path,
        store: DeviceState,
        report: EventWriter,
        *,
        max_boot_attempts: int,
        max_image_bytes: int,
        download_timeout_s: float,
    ) -> None:
        self.device_id = device_id
        self.store = store
        self._firmware = firmware
        self._ota_dir = ota_dir
        self._report = report
        self._max_boot_attempts = max_boot_attempts
        self._max_image_bytes = max_image_bytes
        self._download_timeout_s = download_timeout_s

    def settle(self, pending: PendingUpdate) -> None:
        """At a boot, confirm the pending update (a good boot) or roll it back."""
        firmware = self._firmware
        store = self.store
        attempts = pending.attempts + 1
        store.put("ota", {**pending.to_json(), "attempts": attempts})
        running = firmware.version()
        if running != pending.version:
            self._report(
                "error",
                None,
                code="OTA_BOOT_FAILED",
                command_id=pending.command_id,
                ok=False,
                detail=f"firmware {pending.version} did not boot; running {running}",
                data={"version": pending.version, "running": running},
                state={"ota": None},
            )
            return
        verdict: bool | None = None
        if attempts <= self._max_boot_attempts:
            try:
                verdict = firmware.boot_ok()
            except Exception:
                _LOG.exception("%s: the boot check of %s failed", self.device_id, pending.version)
                verdict = False
        if verdict:
            self._report(
                "info",
                None,
                code=event_word(pending.version),
                command_id=pending.command_id,
                ok=True,
                detail=f"firmware {pending.version} is running (was {pending.previous})",
                data={"version": pending.version, "previous": pending.previous},
                state={"ota": None},
            )
            return
        why = (
            "failed its boot check"
            if verdict is False
            else f"stopped {attempts - 1} times before its boot check"
        )
        self._report(
            "error",
            None,
            code="OTA_ROLLBACK",
            command_id=pending.command_id,
            ok=False,
            detail=f"firmware {pending.version} {why}; rolling back to {pending.previous}",
            data={"version": pending.version, "previous": pending.previous},
            state={"ota": None, "reset_reason": "firmware_update"},
        )
        _LOG.warning("%s: rolling back %s to %s", self.device_id, running, pending.previous)
        try:
            firmware.rollback(pending.previous)
        except OtaError as exc:
            self._report(
                "error",
                None,
                code="OTA_ROLLBACK_FAILED",
                command_id=pending.command_id,
                ok=False,
                detail=f"rollback to {pending.previous} failed: {exc}"[:500],
            )

    def run(self, command: Command) -> tuple[CommandResult, dict[str, object | None]]:
        """Do a ``firmware_update`` command; return its result and the state to keep."""
        firmware = self._firmware
        try:
            request = parse_update(command.args)
        except OtaError as exc:
            return CommandResult(False, str(exc)), {}
        installed = firmware.version()
        if request.version == installed:
            return CommandResult(True, f"already on {installed}; nothing to do"), {}
        try:
            older = version_key(request.version) < version_key(installed)
        except ValueError:
            older = False  # an installed version of another scheme: no order to keep
        if older:
            detail = f"{request.version} is older than the installed {installed}; not installed"
            return CommandResult(False, detail), {}
        try:
            image = download_image(
                request,
                self._ota_dir,
                max_bytes=self._max_image_bytes,
                timeout_s=self._download_timeout_s,
            )
        except OtaError as exc:
            code = "OTA_CHECKSUM" if "checksum" in str(exc) else "OTA_DOWNLOAD"
            _LOG.warning("%s: %s", self.device_id, exc)
            return CommandResult(False, str(exc)[:500], code), {}
        try:
            firmware.install(image, request.version)
        except OtaError as exc:
            return CommandResult(False, f"install failed: {exc}"[:500], "OTA_INSTALL"), {}
        finally:
            image.unlink(missing_ok=True)
        pending = PendingUpdate(request.version, installed, command.id)
        result = CommandResult(
            True,
            f"updated from {installed} to {request.version}; restarting",
            event_word(request.version),
            then=firmware.activate,
        )
        return result, {"ota": pending.to_json(), "reset_reason": "firmware_update"}
