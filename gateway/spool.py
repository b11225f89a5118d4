r"""Durable on-disk spool for batches that could not reach InfluxDB (the writer's fallback).

The gateway acknowledges an MQTT message only after its point is in InfluxDB or in this
spool, so :meth:`Spool.append` returns only once the batch is in the kernel (it survives
a SIGKILL of the process) and, with ``fsync=True`` (the default), on the disk (it
survives a power loss). The writer drains the spool oldest first with :meth:`Spool.peek`
and :meth:`Spool.pop` once InfluxDB is back.

On disk, a spool is one directory:

* ``00000001.seg``, ``00000002.seg`` ...: append-only segments. Each record is a header
  of two little-endian unsigned 32-bit integers, the data length and the CRC-32 of the
  data, then the data (one batch: line-protocol lines joined by ``\n``). A new segment
  starts once a record would take the current one past ``segment_bytes``.
* ``cursor``: the read position (segment number, offset) and its CRC-32, replaced
  atomically (write, sync, rename) by every :meth:`Spool.pop`. Segments before the
  cursor are deleted once the cursor has moved past them. Replayed space is reclaimed
  in the active segment too: when the spool empties, or once a quarter of
  ``segment_bytes`` of the segment being written has been read, the next record goes to
  a new segment, so the read part can be deleted.
* ``lock``: an exclusive ``flock`` so that two processes never share one spool.

Recovery on open: every pending record is read and its CRC checked (so opening a large
spool reads it once). A torn record at the end of a segment (short header, short data or a
bad CRC, left by a crash during an append, so never acknowledged) ends the intact part:
the bytes from there on are copied to ``corrupt-<segment>-<offset>.bin``, so that even a
damaged acknowledged record is never lost without a trace, and truncated away with a
warning. Popped batches are not replayed, except that a crash between the caller's write
to InfluxDB and its :meth:`Spool.pop` replays that one batch, which is harmless: points
carry their device's series and timestamp, so a rewrite overwrites itself.

The API is synchronous and thread-safe (one lock); appends are small, so callers may run
them directly or through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from wire.errors import ConfigError, PermanentError, StoreUnavailableError

__all__ = ["Spool"]

_LOG = logging.getLogger(__name__)

_HEADER: Final = struct.Struct("<II")  # data length, CRC-32 of the data
_CURSOR: Final = struct.Struct("<QQI")  # segment number, offset, CRC-32 of the first 16 bytes
_SEGMENT_SUFFIX: Final = ".seg"
_CURSOR_NAME: Final = "cursor"
_LOCK_NAME: Final = "lock"
_MAX_RECORD_DATA: Final = 0xFFFF_FFFF


def _segment_name(number: int) -> str:
    return f"{number:08d}{_SEGMENT_SUFFIX}"


class Spool:
    """A directory of append-only segment files holding batches oldest first.

    Args:
        directory: where the spool lives; created if missing.
        segment_bytes: start a new segment once a record would take the current one past
            this size.
        max_bytes: most bytes of segment files on disk (pending records, and read ones
            not yet reclaimed); appends beyond it raise :class:`StoreUnavailableError`.
        fsync: sync data (``fdatasync``) and directory changes before returning, so
            acknowledged batches survive a power loss; without it they survive a crash of
            the process only.

    Raises:
        ConfigError: the directory cannot be created or written, or another process holds
            the spool.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        max_bytes: int = 10 * 1024**3,
        fsync: bool = True,
    ) -> None:
        if segment_bytes <= _HEADER.size or max_bytes <= 0:
            raise ConfigError("spool segment_bytes and max_bytes must be positive")
        self._dir = Path(directory)
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd = -1
        self._write_fd = -1
        self._read_fd = -1
        self._read_fd_segment = 0
        # Segment number -> size in bytes, for every segment from the read segment on.
        self._sizes: dict[int, int] = {}
        self._read_segment = 0
        self._read_offset = 0
        self._write_segment = 0
        self._roll_next = False
        self._count = 0
        self._pending = 0
        # The record last read at the cursor (segment, offset, record length, data), so
        # that ``pop`` after ``peek`` does not read the batch again.
        self._head: tuple[int, int, int, bytes] | None = None
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"spool directory {self._dir} is not writable: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise ConfigError(f"spool {self._dir} is in use by another process") from exc
        try:
            self._recover()
        except OSError as exc:
            self._close_fds()
            raise ConfigError(f"spool {self._dir} cannot be opened: {exc}") from exc

    # -- recovery ---------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self._dir / _segment_name(number)

    def _list_segments(self) -> list[int]:
        numbers = []
        for path in self._dir.iterdir():
            stem = path.name.removesuffix(_SEGMENT_SUFFIX)
            if path.name.endswith(_SEGMENT_SUFFIX) and stem.isdigit():
                numbers.append(int(stem))
        return sorted(numbers)

    def _load_cursor(self) -> tuple[int, int] | None:
        try:
            raw = (self._dir / _CURSOR_NAME).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) == _CURSOR.size:
            segment, offset, crc = _CURSOR.unpack(raw)
            if zlib.crc32(raw[:16]) == crc:
                return segment, offset
        _LOG.warning(
            "spool %s: cursor file is damaged; replaying from the oldest segment", self._dir
        )
        return None

    def _recover(self) -> None:
        segments = self._list_segments()
        cursor = self._load_cursor()
        if cursor is not None and segments and cursor[0] >= segments[0]:
            read_segment, read_offset = cursor
            for number in segments:
                if number < read_segment:  # consumed; a crash came before its deletion
                    self._path(number).unlink()
            segments = [number for number in segments if number >= read_segment]
            if not segments or segments[0] != read_segment:
                # The cursor's segment is gone: everything before the next one was read.
                read_segment = segments[0] if segments else read_segment
                read_offset = 0
        else:
            read_segment, read_offset = (segments[0] if segments else 1), 0
        if not segments:
            segments = [read_segment]
            self._create_segment(read_segment)
        self._read_segment = read_segment
        self._read_offset = read_offset
        if cursor is None:
            # A cursor file from the start: with a full disk it is rewritten in place.
            self._save_cursor()
        self._write_segment = segments[-1]
        self._sizes = dict.fromkeys(segments, 0)
        self._tally()
        self._write_fd = os.open(self._path(self._write_segment), os.O_WRONLY | os.O_APPEND)
        if self._count:
            _LOG.info(
                "spool %s: %d batches (%d bytes) pending", self._dir, self._count, self._pending
            )

    def _tally(self) -> None:
        """Check every pending record and recount; set damaged tails aside."""
        self._head = None
        count = pending = 0
        for number in sorted(self._sizes):
            start = self._read_offset if number == self._read_segment else 0
            size, records = self._scan(number, start)
            if number == self._read_segment and start > size:
                _LOG.warning(
                    "spool %s: cursor is past the end of %s; resetting it",
                    self._dir,
                    _segment_name(number),
                )
                self._read_offset = start = size
            self._sizes[number] = size
            count += records
            pending += size - start
        self._count = count
        self._pending = pending

    def _scan(self, number: int, start: int) -> tuple[int, int]:
        """Verify a segment's records from ``start``; cut off a damaged tail.

        A short header, short data or a bad CRC ends the intact part: usually a record
        torn by a crash during its append (never acknowledged). The bytes from there to
        the end are copied to ``corrupt-<segment>-<offset>.bin`` (so that nothing
        acknowledged is lost without a trace) and truncated away with a warning.

        Returns:
            The segment's size after the cut, and the number of intact records from
            ``start``.
        """
        path = self._path(number)
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if start >= size:
                return size, 0
            offset, count = start, 0
            file.seek(start)
            while offset < size:
                header = file.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                length, crc = _HEADER.unpack(header)
                data = file.read(length)
                if len(data) < length or zlib.crc32(data) != crc:
                    break
                offset += _HEADER.size + length
                count += 1
            if offset == size:
                return size, count
            file.seek(offset)
            damaged = file.read()
        name = f"corrupt-{number:08d}-{offset}.bin"
        _LOG.warning(
            "spool %s: %s has %d damaged bytes at offset %d (a torn append?); moved them to %s",
            self._dir,
            path.name,
            size - offset,
            offset,
            name,
        )
        (self._dir / name).write_bytes(damaged)
        with path.open("r+b") as file:
            file.truncate(offset)
            self._sync_fd(file.fileno())
        return offset, count

    def _create_segment(self, number: int) -> None:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self._sync_dir()

    # -- durability helpers -----------------------------------------------------------

    def _sync_fd(self, fd: int) -> None:
        if self._fsync:
            os.fdatasync(fd)

    def _sync_dir(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _save_cursor(self) -> None:
        head = struct.pack("<QQ", self._read_segment, self._read_offset)
        raw = head + struct.pack("<I", zlib.crc32(head))
        tmp = self._dir / (_CURSOR_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, raw)
                self._sync_fd(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._dir / _CURSOR_NAME)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # A full disk must not stop the spool from draining (only a pop frees space):
            # overwrite the cursor in place, in blocks it already has. Its 20 bytes sit in
            # one sector, and its CRC catches a torn write (then the spool replays from the
            # oldest segment, which is harmless).
            with contextlib.suppress(OSError):
                tmp.unlink()
            fd = os.open(self._dir / _CURSOR_NAME, os.O_WRONLY)
            try:
                os.pwrite(fd, raw, 0)
                self._sync_fd(fd)
            finally:
                os.close(fd)
        self._sync_dir()

    # -- public API -------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The spool's directory."""
        return self._dir

    @property
    def pending_bytes(self) -> int:
        """Bytes of pending records on disk, headers included."""
        return self._pending

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk: what ``max_bytes`` bounds."""
        return sum(self._sizes.values())

    def __len__(self) -> int:
        """Number of pending batches."""
        return self._count

    def append(self, batch: bytes) -> None:
        r"""Store one batch durably; return only once it is safe to acknowledge.

        Args:
            batch: line-protocol lines joined by ``\n``.

        Raises:
            StoreUnavailableError: the spool is full (``max_bytes``) or the disk refused
                the write; nothing was stored, do not acknowledge.
            PermanentError: the batch is larger than a record can hold (4 GiB).
        """
        if len(batch) > _MAX_RECORD_DATA:
            raise PermanentError(f"a batch of {len(batch)} bytes is larger than a spool record")
        record = _HEADER.pack(len(batch), zlib.crc32(batch)) + batch
        with self._lock:
            self._check_open()
            used = sum(self._sizes.values())
            if used + len(record) > self._max_bytes:
                raise StoreUnavailableError(
                    f"spool full: {used} bytes on disk ({self._pending} pending), "
                    f"limit {self._max_bytes}"
                )
            try:
                size = self._sizes[self._write_segment]
                # The reader is in this segment and has read a good part of it: start a
                # new one so the read part can be deleted once the reader leaves it.
                reclaim = (
                    self._read_segment == self._write_segment
                    and self._read_offset * 4 >= self._segment_bytes
                )
                if (
                    self._roll_next
                    or reclaim
                    or (size and size + len(record) > self._segment_bytes)
                ):
                    self._roll()
                    size = 0
                self._write_all(record, size)
            except OSError as exc:
                raise StoreUnavailableError(f"spool write failed: {exc}") from exc
            self._sizes[self._write_segment] = size + len(record)
            self._count += 1
            self._pending += len(record)

    def _write_all(self, record: bytes, size: int) -> None:
        view = memoryview(record)
        try:
            while view:
                written = os.write(self._write_fd, view)
                view = view[written:]
            self._sync_fd(self._write_fd)
        except OSError:
            # Leave no partial record behind for the next append to follow; if even that
            # fails, the next append starts a new segment (readers stop at ``size``).
            try:
                os.ftruncate(self._write_fd, size)
            except OSError:
                self._roll_next = True
            raise

    def _roll(self) -> None:
        self._sync_fd(self._write_fd)
        number = self._write_segment + 1
        self._create_segment(number)
        fd = os.open(self._path(number), os.O_WRONLY | os.O_APPEND)
        os.close(self._write_fd)
        self._write_fd = fd
        self._write_segment = number
        self._sizes[number] = 0
        self._roll_next = False

    def peek(self) -> bytes | None:
        """The oldest pending batch, or ``None`` when the spool is empty.

        Raises:
            StoreUnavailableError: the spool cannot be read.
        """
        with self._lock:
            self._check_open()
            if not self._count:
                return None
            try:
                head = self._read_head()
            except OSError as exc:
                raise StoreUnavailableError(f"spool read failed: {exc}") from exc
            return None if head is None else head[1]

    def pop(self) -> bytes:
        """Remove the oldest pending batch, durably, and return it.

        Raises:
            IndexError: the spool is empty.
            StoreUnavailableError: the spool cannot be read or the cursor not saved.
        """
        with self._lock:
            self._check_open()
            if not self._count:
                raise IndexError("pop from an empty spool")
            try:
                head = self._read_head()
            except OSError as exc:
                raise StoreUnavailableError(f"spool read failed: {exc}") from exc
            if head is None:
                raise IndexError("pop from an empty spool")
            length, data = head
            before = (self._read_segment, self._read_offset)
            self._read_offset += length
            self._advance()
            try:
                self._save_cursor()
            except OSError as exc:
                # Not popped: a retry must not skip to the next batch unwritten.
                self._read_segment, self._read_offset = before
                raise StoreUnavailableError(f"spool cursor could not be saved: {exc}") from exc
            self._count -= 1
            self._pending -= length
            try:
                if not self._count and self._read_offset:
                    self._reset_empty()
                self._drop_consumed()
            except OSError as exc:  # the next open deletes it; nothing is lost
                _LOG.warning("spool %s: could not reclaim read segments: %s", self._dir, exc)
            return data

    def _reset_empty(self) -> None:
        """Everything is read: continue in a fresh segment so the old one can go.

        Crash-safe in this order: the new segment exists (directory synced) before the
        cursor points at it, and the old one is deleted only after.
        """
        self._roll()
        self._read_segment, self._read_offset = self._write_segment, 0
        self._head = None
        self._save_cursor()

    def _read_head(self) -> tuple[int, bytes] | None:
        """Read the record at the cursor: (record length with header, data).

        A record that fails its CRC now (it passed when the spool was opened) means the
        file changed underneath: recheck everything pending, which sets the damaged part
        aside, and read again.
        """
        for _ in range(2):
            self._advance()
            if not self._count:
                return None
            head = self._head
            if head is not None and head[:2] == (self._read_segment, self._read_offset):
                return head[2], head[3]
            fd = self._read_fd_for(self._read_segment)
            header = os.pread(fd, _HEADER.size, self._read_offset)
            if len(header) == _HEADER.size:
                length, crc = _HEADER.unpack(header)
                data = os.pread(fd, length, self._read_offset + _HEADER.size)
                if len(data) == length and zlib.crc32(data) == crc:
                    size = _HEADER.size + length
                    self._head = (self._read_segment, self._read_offset, size, data)
                    return size, data
            _LOG.error("spool %s: a pending record is damaged; rechecking the spool", self._dir)
            self._tally()
        raise StoreUnavailableError(f"spool {self._dir} keeps returning damaged records")

    def _read_fd_for(self, number: int) -> int:
        if self._read_fd_segment != number:
            if self._read_fd >= 0:
                os.close(self._read_fd)
                self._read_fd = -1
            self._read_fd = os.open(self._path(number), os.O_RDONLY)
            self._read_fd_segment = number
        return self._read_fd

    def _advance(self) -> None:
        """Move the cursor off the end of a finished segment onto the next one."""
        while (
            self._read_segment < self._write_segment
            and self._read_offset >= self._sizes[self._read_segment]
        ):
            self._read_segment += 1
            self._read_offset = 0

    def _drop_consumed(self) -> None:
        """Delete segments the cursor has left (after the cursor is saved)."""
        for number in [n for n in self._sizes if n < self._read_segment]:
            del self._sizes[number]
            if self._read_fd_segment == number and self._read_fd >= 0:
                os.close(self._read_fd)
                self._read_fd = -1
                self._read_fd_segment = 0
            with contextlib.suppress(FileNotFoundError):
                self._path(number).unlink()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailableError(f"spool {self._dir} is closed")

    def close(self) -> None:
        """Sync and close the spool's files (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._write_fd >= 0:
                with contextlib.suppress(OSError):
                    self._sync_fd(self._write_fd)
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_write_fd", "_read_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
