"""The PostgreSQL case store's connections and schema (notifier; :mod:`notifier.postgres`).

A pool of asyncpg connections (:class:`PooledStore`: open, close, run a job with one
connection and turn asyncpg's errors into the store's), and the migrations of
:mod:`notifier.schema` rendered for PostgreSQL, applied under an advisory lock
(:func:`migrate`).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from notifier.errors import InvalidRequestError
from notifier.postgres.sql import MIGRATE_LOCK
from notifier.schema import render
from wire.errors import ConfigError, StoreUnavailableError

if TYPE_CHECKING:
    from notifier.postgres.sql import Conn, Job

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PooledStore", "migrate", "redacted_url"]

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Schema steps for PostgreSQL, oldest first (:data:`notifier.schema.STEPS`).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = render("postgresql")
#: The schema version this code writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)


def redacted_url(url: str) -> str:
    """A database URL fit for a log line: its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(a database URL that cannot be read)"


async def migrate(conn: Conn, where: str) -> None:
    """Migrate the database ``where`` names to :data:`SCHEMA_VERSION`, once, in one transaction.

    Raises:
        ConfigError: the database is not a case store, comes from a newer fixloop,
            or a migration failed (the database is left as it was).
        StoreUnavailableError: the server failed.
    """
    steps = MIGRATIONS  # read at open time, so that tests can add a step
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            tables = {
                row[0]
                for row in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()"
                )
            }
            if "schema_version" in tables:
                version = int(await conn.fetchval("SELECT version FROM schema_version"))
            elif tables:
                raise ConfigError(
                    f"{where} holds tables but is not a fixloop case store "
                    "(it has no schema_version table)"
                )
            else:
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            if version > len(steps):
                raise ConfigError(
                    f"the case store {where} has schema version {version}, but this "
                    f"fixloop knows versions up to {len(steps)}: run a newer fixloop, or "
                    "point it at another database"
                )
            for number in range(version + 1, len(steps) + 1):
                try:
                    for statement in steps[number - 1]:
                        await conn.execute(statement)
                except asyncpg.PostgresError as exc:
                    raise ConfigError(
                        f"migrating the case store {where} to version {number} failed "
                        f"(the database is left at version {version}): {exc}"
                    ) from exc
                await conn.execute("UPDATE schema_version SET version = $1", number)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreUnavailableError(f"the case store {where} failed: {exc}") from exc
    if version < len(steps):
        _LOG.info("case store %s migrated from schema version %d to %d", where, version, len(steps))


class PooledStore:
    """The pool of connections a :class:`~notifier.postgres.PostgresStore` runs its queries on.

    Opens the pool and migrates the database (:meth:`open`), closes it, and runs a
    query's job with one connection (:meth:`_run`); the query classes build on it.

    Args:
        url: ``postgresql://user:password@host:port/database`` (libpq's URL and its
            query options, ``sslmode`` for one).
        pool_size: at most this many connections at once.
        lock_timeout_s: how long a statement waits for a row or lock another
            transaction holds before :class:`~wire.errors.StoreUnavailableError`.
        connect_timeout_s: how long opening a connection may take.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        lock_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                f"{redacted_url(url)} is not a PostgreSQL URL (postgresql://user@host/db)"
            )
        if pool_size < 1:
            raise ConfigError(f"pool_size must be at least 1, not {pool_size}")
        if lock_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("the case store's timeouts must be positive")
        self._url = url
        self._pool_size = pool_size
        self._lock_timeout_s = lock_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def where(self) -> str:
        """The database, for messages (without its password)."""
        return redacted_url(self._url)

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect, and migrate the database to :data:`SCHEMA_VERSION`.

        Returns:
            The store itself.

        Raises:
            ConfigError: the URL, credentials or database are wrong, the database is not
                a case store or comes from a newer fixloop, or a migration failed (the
                database is left as it was).
            StoreUnavailableError: the server cannot be reached.
        """
        if self._pool is not None:
            return self
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout_s,
                server_settings={
                    "application_name": "fixloop",
                    "lock_timeout": str(round(self._lock_timeout_s * 1000)),
                },
            )
        except (
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidPasswordError,
            ValueError,
        ) as exc:
            raise ConfigError(f"cannot open the case store {self.where}: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(
                f"the case store {self.where} cannot be reached: {exc}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn, self.where)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        return self

    async def close(self) -> None:
        """Close the pool's connections (closing twice is harmless)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, job: Job[_T]) -> _T:
        """Run ``job`` with a connection of the pool."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the case store is not open")
        try:
            async with pool.acquire(timeout=self._connect_timeout_s) as conn:
                return await job(conn)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise InvalidRequestError(f"the record breaks a rule of the case store: {exc}") from exc
        except asyncpg.DataError as exc:
            # a value PostgreSQL cannot keep (a NUL character in text): sending it again
            # would fail again
            raise InvalidRequestError(f"the case store cannot keep a value: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"the case store failed: {exc}") from exc
