"""The SQLite case store's file: opening it, its schema and migrations (notifier).

:func:`connect` opens the file on the store's worker thread (:mod:`notifier.sqlite.base`):
readable by its owner only, WAL mode, foreign keys, ``secure_delete``, a busy timeout,
then :func:`migrate` brings its schema to :data:`SCHEMA_VERSION`. ``schema_version``
holds the file's version; :data:`MIGRATIONS` are the steps, oldest first, rendered for
SQLite from :data:`notifier.schema.STEPS`. Opening an older file applies the missing steps
in one transaction; a file from a newer fixloop is refused with
:class:`~wire.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Final

from notifier.schema import render
from notifier.sqlite.sql import transaction
from wire.errors import ConfigError

_LOG = logging.getLogger(__name__)

#: Schema steps for SQLite, oldest first (:data:`notifier.schema.STEPS`): step ``n`` (from
#: 1) takes a file from version ``n - 1`` to ``n``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = render("sqlite")
#: The schema version this code writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)


def owner_only(path: Path) -> None:
    """Create the database file readable by its owner only (0600), or make it so.

    It holds owners' names, contacts and push tokens; SQLite gives the write-ahead log
    and shared-memory files the database file's mode.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        for one in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if one.exists() and one.stat().st_mode & 0o077:
                one.chmod(0o600)
                _LOG.info("case store file %s made readable by its owner only", one.name)
    except OSError as exc:
        raise ConfigError(f"cannot open the case store {path}: {exc}") from exc


def connect(path: Path | str, busy_timeout_s: float) -> sqlite3.Connection:
    """Open and migrate the database (on the store's worker thread).

    Raises:
        ConfigError: the file cannot be opened, is not a case store, comes from a newer
            fixloop, or a migration failed (the file is left as it was).
    """
    where = str(path)
    if where != ":memory:" and not where.startswith("file:"):
        owner_only(Path(where))
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the case store {where}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {round(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal" and where != ":memory:":
            _LOG.warning("case store %s runs in journal mode %s, not WAL", where, mode)
        conn.execute("PRAGMA foreign_keys = ON")
        # Erased owner data is overwritten with zeros rather than left in free space.
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA synchronous = FULL")
        migrate(conn, where)
    except ConfigError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise ConfigError(f"cannot open the case store {where}: {exc}") from exc
    return conn


def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring the file's schema to :data:`SCHEMA_VERSION` in one transaction."""
    steps = MIGRATIONS  # read at open time, so that tests can add a step
    with transaction(conn):
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "schema_version" in tables:
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
        elif tables:
            raise ConfigError(
                f"{where} is an SQLite file but not a fixloop case store "
                "(it has no schema_version table)"
            )
        else:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        if version > len(steps):
            raise ConfigError(
                f"the case store {where} has schema version {version}, but this fixloop "
                f"knows versions up to {len(steps)}: run a newer fixloop, or point it "
                "at another file"
            )
        for number in range(version + 1, len(steps) + 1):
            try:
                for statement in steps[number - 1]:
                    conn.execute(statement)
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"migrating the case store {where} to version {number} failed "
                    f"(the file is left at version {version}): {exc}"
                ) from exc
            conn.execute("UPDATE schema_version SET version = ?", (number,))
    if version < len(steps):
        _LOG.info("case store %s migrated from schema version %d to %d", where, version, len(steps))
