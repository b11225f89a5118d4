"""The device's on-disk state: outbox of unsent messages, ``seq``, answered commands.

Every telemetry and event message goes into the outbox first and leaves it only when
the broker has acknowledged it (PUBACK), so the outbox is the offline buffer too: what
was taken while the device had no connection, or lost power, is published later with
its original ``ts`` and ``seq`` (backfill). The sequence number is kept in the same
database and advanced in the same transaction as the message it numbers, so it survives
restarts and never repeats.

The store is one SQLite file in WAL mode. Durability (the ``fsync`` setting):

* ``"always"`` (default): SQLite ``synchronous=FULL``; the WAL is fsynced at every
  commit, so a message is on the storage medium when ``publish_reading`` returns and
  survives a power cut.
* ``"normal"``: ``synchronous=NORMAL``; commits are not fsynced one by one (the WAL is
  synced at checkpoints). A crash or kill of the program loses nothing; a power cut may
  lose the last messages. Less wear on cheap flash.

The outbox is bounded (``max_messages``): when full, the oldest message is dropped and
counted (``dropped``), so the newest readings survive a long outage. Messages older than
the gateway's backfill window are dropped when they would be sent (``expired``), and
messages the broker refuses for good (an ACL) are dropped and counted (``refused``).

:class:`MemoryDeviceStore` keeps the same state in memory, with the same rules: for the
simulator (``device_sim``), whose thousands of devices keep their "flash" in the
process, and for tests. :class:`DeviceState` is what the library needs of either.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal, NamedTuple, Protocol, Self

from device.errors import DeviceConfigError

__all__ = ["DeviceState", "DeviceStore", "FsyncPolicy", "MemoryDeviceStore", "OutboxRow"]

FsyncPolicy = Literal["always", "normal"]

#: Command ids remembered as answered (the newest); older duplicates are beyond any
#: broker's redelivery.
_ANSWERED_KEEP: Final = 10_000
_COUNTERS: Final = ("dropped", "expired", "refused")
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS outbox ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
    " payload BLOB NOT NULL, ts_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS answered ("
    " n INTEGER PRIMARY KEY AUTOINCREMENT, command_id TEXT NOT NULL UNIQUE,"
    " at_ms INTEGER NOT NULL)",
)


def _known_counter(name: str) -> str:
    """Return ``name`` if it is a kept counter (``dropped``, ``expired``, ``refused``).

    Raises:
        DeviceConfigError: it is not.
    """
    if name not in _COUNTERS:
        raise DeviceConfigError(f"unknown counter {name!r}")
    return name


class _Numbered:
    """What both stores keep alike: the last ``seq`` and the messages stored since opened."""

    _seq: int
    _appended: int

    @property
    def seq(self) -> int:
        """The last sequence number used (0 before the first message)."""
        return self._seq

    @property
    def appended(self) -> int:
        """Messages stored since the store was opened (tells a reader that more came)."""
        return self._appended


class OutboxRow(NamedTuple):
    """One message waiting for its PUBACK (a named tuple: cheap to make per message).

    Attributes:
        id: position in the outbox (increasing; the send order).
        topic: where it goes.
        payload: the encoded message.
        ts_ms: the message's own ``ts`` (for the backfill window).
    """

    id: int
    topic: str
    payload: bytes
    ts_ms: int


class DeviceState(Protocol):
    """What the device library keeps across restarts: outbox, ``seq``, answers, state.

    :class:`DeviceStore` (SQLite, on the device's storage) and
    :class:`MemoryDeviceStore` (in memory) have it; both are thread-safe.
    """

    @property
    def seq(self) -> int:
        """The last sequence number used (0 before the first message)."""
        ...

    @property
    def appended(self) -> int:
        """Messages stored since the store was opened (tells a reader that more came)."""
        ...

    @property
    def count(self) -> int:
        """Messages in the outbox."""
        ...

    def append(
        self,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        """Number a message with the next ``seq``, encode it and store it; return the seq."""
        ...

    def answer(
        self,
        command_id: str,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int | None:
        """Store a command's result and the command as answered; ``None`` if it was."""
        ...

    def was_answered(self, command_id: str) -> bool:
        """Whether a result for ``command_id`` was stored before."""
        ...

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` messages after outbox position ``after_id``, oldest first."""
        ...

    def remove(self, ids: Sequence[int], *, counter: str | None = None) -> None:
        """Remove messages (acknowledged, or given up on and counted in ``counter``)."""
        ...

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty; return whether it is."""
        ...

    def counter(self, name: str) -> int:
        """A kept counter: ``dropped``, ``expired`` or ``refused``."""
        ...

    def get(self, key: str) -> object | None:
        """A JSON value kept under ``key``, or ``None``."""
        ...

    def put(self, key: str, value: object | None) -> None:
        """Keep a JSON value under ``key``; ``None`` forgets the key."""
        ...

    def close(self) -> None:
        """Release the store."""
        ...


class DeviceStore(_Numbered):
    """The device's SQLite state; thread-safe (one connection behind a lock).

    Open with :meth:`open`; close with :meth:`close` or a ``with`` block.

    Attributes:
        path: the database file.
        max_messages: outbox bound.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, max_messages: int) -> None:
        self.path = path
        self.max_messages = max_messages
        self._db = db
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._count = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._seq = int(self._state("seq") or 0)
        self._appended = 0

    @classmethod
    def open(
        cls, path: Path, *, max_messages: int = 100_000, fsync: FsyncPolicy = "always"
    ) -> Self:
        """Open (or create) the store at ``path``.

        Raises:
            DeviceConfigError: the file cannot be opened or is not this store.
        """
        if max_messages < 1:
            raise DeviceConfigError(f"max_messages must be at least 1 (got {max_messages})")
        if fsync not in ("always", "normal"):
            raise DeviceConfigError(f"fsync must be 'always' or 'normal' (got {fsync!r})")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if fsync == 'always' else 'NORMAL'}")
            for statement in _SCHEMA:
                db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise DeviceConfigError(f"cannot open the device store {path}: {exc}") from exc
        return cls(path, db, max_messages)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _state(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _put(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _bump(self, db: sqlite3.Connection, counter: str, by: int) -> None:
        if by:
            current = int(self._state(counter) or 0)
            self._put(db, counter, str(current + by))

    def _insert(self, db: sqlite3.Connection, topic: str, payload: bytes, ts_ms: int) -> None:
        dropped = 0
        while self._count >= self.max_messages:
            db.execute("DELETE FROM outbox WHERE id = (SELECT MIN(id) FROM outbox)")
            self._count -= 1
            dropped += 1
        self._bump(db, "dropped", dropped)
        db.execute(
            "INSERT INTO outbox (topic, payload, ts_ms) VALUES (?, ?, ?)", (topic, payload, ts_ms)
        )
        self._count += 1

    # -- outbox -------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Messages in the outbox."""
        return self._count

    def append(
        self,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        """Number a message with the next ``seq``, encode it and store it durably.

        Args:
            topic: where it goes.
            build: encodes the message for a given ``seq`` (may raise
                :class:`~device.errors.ContractError`: then nothing is stored and the
                ``seq`` is not used).
            ts_ms: the message's ``ts``.
            state: named values to keep (or, for ``None``, forget) in the same
                transaction as the message (see :meth:`put`).

        Returns:
            The message's ``seq``.
        """
        with self._changed:
            seq = self._seq + 1
            payload = build(seq)
            with self._tx() as db:
                self._insert(db, topic, payload, ts_ms)
                self._put(db, "seq", str(seq))
                for key, value in (state or {}).items():
                    self._keep(db, key, value)
            self._seq = seq
            self._appended += 1
            self._changed.notify_all()
            return seq

    def answer(
        self,
        command_id: str,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int | None:
        """Store a command's result and remember the command as answered, atomically.

        ``state`` is kept in the same transaction, as with :meth:`append`.

        Returns:
            The result's ``seq``, or ``None`` when the command was answered before
            (nothing is stored).
        """
        with self._changed:
            if self._answered(command_id):
                return None
            seq = self._seq + 1
            payload = build(seq)
            with self._tx() as db:
                self._insert(db, topic, payload, ts_ms)
                self._put(db, "seq", str(seq))
                for key, value in (state or {}).items():
                    self._keep(db, key, value)
                db.execute(
                    "INSERT INTO answered (command_id, at_ms) VALUES (?, ?)", (command_id, ts_ms)
                )
                db.execute(
                    "DELETE FROM answered WHERE n <= (SELECT MAX(n) FROM answered) - ?",
                    (_ANSWERED_KEEP,),
                )
            self._seq = seq
            self._appended += 1
            self._changed.notify_all()
            return seq

    def _answered(self, command_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM answered WHERE command_id = ?", (command_id,)
        ).fetchone()
        return row is not None

    def was_answered(self, command_id: str) -> bool:
        """Whether a result for ``command_id`` was stored before."""
        with self._lock:
            return self._answered(command_id)

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` messages after outbox position ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, ts_ms FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxRow(int(i), str(t), bytes(p), int(ts)) for i, t, p, ts in rows]

    def remove(self, ids: Sequence[int], *, counter: str | None = None) -> None:
        """Remove messages (acknowledged, or given up on and counted in ``counter``)."""
        if not ids:
            return
        if counter is not None:
            _known_counter(counter)
        with self._changed:
            with self._tx() as db:
                removed = 0
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    cursor = db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                    removed += cursor.rowcount
                if counter is not None:
                    self._bump(db, counter, removed)
            self._count -= removed
            self._changed.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty; return whether it is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout=timeout_s)

    def counter(self, name: str) -> int:
        """A persisted counter: ``dropped``, ``expired`` or ``refused``."""
        with self._lock:
            return int(self._state(_known_counter(name)) or 0)

    # -- named state --------------------------------------------------------------------
    def get(self, key: str) -> object | None:
        """A JSON value kept under ``key`` (OTA progress, reset reason), or ``None``."""
        with self._lock:
            value = self._state(f"kv:{key}")
        return None if value is None else json.loads(value)

    def put(self, key: str, value: object | None) -> None:
        """Keep a JSON value under ``key``, durably; ``None`` forgets the key."""
        with self._lock, self._tx() as db:
            self._keep(db, key, value)

    def _keep(self, db: sqlite3.Connection, key: str, value: object | None) -> None:
        if value is None:
            db.execute("DELETE FROM state WHERE key = ?", (f"kv:{key}",))
        else:
            self._put(db, f"kv:{key}", json.dumps(value))


class MemoryDeviceStore(_Numbered):
    """The device's state in memory, with :class:`DeviceStore`'s rules; thread-safe.

    What a simulated device keeps on its flash: it lives as long as the object, so it
    survives the simulated device's reboots and power cuts (the process is the flash).

    Attributes:
        max_messages: outbox bound.
    """

    def __init__(self, *, max_messages: int = 100_000) -> None:
        if max_messages < 1:
            raise DeviceConfigError(f"max_messages must be at least 1 (got {max_messages})")
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._outbox: dict[int, OutboxRow] = {}
        self._next_id = 1
        self._seq = 0
        self._appended = 0
        self._answered: set[str] = set()
        self._answer_order: deque[str] = deque()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._state: dict[str, str] = {}
        self._waiting = 0

    def close(self) -> None:
        """Nothing to release (the state stays with the object)."""

    @property
    def count(self) -> int:
        """Messages in the outbox."""
        return len(self._outbox)

    def _insert(self, topic: str, payload: bytes, ts_ms: int) -> None:
        outbox = self._outbox
        while len(outbox) >= self.max_messages:
            del outbox[next(iter(outbox))]
            self._counters["dropped"] += 1
        row_id = self._next_id
        self._next_id = row_id + 1
        outbox[row_id] = OutboxRow(row_id, topic, payload, ts_ms)

    def _keep(self, state: Mapping[str, object | None] | None) -> None:
        for key, value in (state or {}).items():
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = json.dumps(value)

    def append(
        self,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int:
        """Number a message with the next ``seq``, encode it and store it.

        ``build`` may raise :class:`~device.errors.ContractError`: then nothing is
        stored and the ``seq`` is not used. Returns the message's ``seq``.
        """
        with self._changed:
            seq = self._seq + 1
            payload = build(seq)
            self._insert(topic, payload, ts_ms)
            if state:
                self._keep(state)
            self._seq = seq
            self._appended += 1
            return seq

    def answer(
        self,
        command_id: str,
        topic: str,
        build: Callable[[int], bytes],
        ts_ms: int,
        *,
        state: Mapping[str, object | None] | None = None,
    ) -> int | None:
        """Store a command's result and remember the command as answered, together.

        Returns:
            The result's ``seq``, or ``None`` when the command was answered before.
        """
        with self._changed:
            if command_id in self._answered:
                return None
            seq = self._seq + 1
            payload = build(seq)
            self._insert(topic, payload, ts_ms)
            self._keep(state)
            self._answered.add(command_id)
            self._answer_order.append(command_id)
            if len(self._answer_order) > _ANSWERED_KEEP:
                self._answered.discard(self._answer_order.popleft())
            self._seq = seq
            self._appended += 1
            return seq

    def was_answered(self, command_id: str) -> bool:
        """Whether a result for ``command_id`` was stored before."""
        with self._lock:
            return command_id in self._answered

    def pending(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` messages after outbox position ``after_id``, oldest first."""
        rows: list[OutboxRow] = []
        with self._lock:
            for row_id, row in self._outbox.items():
                if row_id > after_id:
                    rows.append(row)
                    if len(rows) >= limit:
                        break
        return rows

    def remove(self, ids: Sequence[int], *, counter: str | None = None) -> None:
        """Remove messages (acknowledged, or given up on and counted in ``counter``)."""
        if counter is not None:
            _known_counter(counter)
        with self._changed:
            outbox = self._outbox
            before = len(outbox)
            for row_id in ids:
                outbox.pop(row_id, None)
            removed = before - len(outbox)
            if counter is not None:
                self._counters[counter] += removed
            if self._waiting and not outbox:
                self._changed.notify_all()  # only wait_empty waits

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty; return whether it is."""
        with self._changed:
            self._waiting += 1
            try:
                return self._changed.wait_for(lambda: not self._outbox, timeout=timeout_s)
            finally:
                self._waiting -= 1

    def counter(self, name: str) -> int:
        """A kept counter: ``dropped``, ``expired`` or ``refused``."""
        return self._counters[_known_counter(name)]

    def get(self, key: str) -> object | None:
        """A JSON value kept under ``key`` (OTA progress, reset reason), or ``None``."""
        with self._lock:
            value = self._state.get(key)
        return None if value is None else json.loads(value)

    def put(self, key: str, value: object | None) -> None:
        """Keep a JSON value under ``key``; ``None`` forgets the key."""
        with self._lock:
            self._keep({key: value})
