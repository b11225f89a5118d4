"""Partition leases and checkpoints of partitioned diagnostics (a shared store).

Pipeline place: beside the diagnostics workers (:mod:`diagnostics.partition`). Each
partition of the devices is held by at most one worker at a time under a lease with an
expiry and an *epoch* (raised at every claim); a worker keeps its partitions by renewing
their leases, gives up what exceeds its fair share when another worker joins, and takes
over the partitions of a worker that stopped renewing. Writes of a partition's state are
fenced by owner and epoch, so a worker that lost a lease (paused, cut off) cannot
overwrite its successor's state.

Per partition the store keeps the last *checkpoint* (the pickled state of that
partition's engine) and the keys of the diagnosis changes published since it: a worker
taking over replays the messages after the checkpoint (the partition's MQTT session
holds them until a checkpoint covers them) and skips publishing what its predecessor
already published.

Two stores: :class:`SoleOwnerStore` (one worker holds every partition, state in memory:
the default of ``fixloop up`` with SQLite, where no shared database exists) and
:class:`PostgresPartitionStore` (any number of workers; leases use the server's clock, so
workers' clocks need not agree; claims take free or expired partitions with
``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from wire.errors import ConfigError, StoreUnavailableError

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "Holding",
    "PartitionStore",
    "PostgresPartitionStore",
    "Saved",
    "SoleOwnerStore",
]


@dataclass(frozen=True, slots=True)
class Holding:
    """What a worker holds after a lease round.

    Attributes:
        leases: partition to the epoch of this worker's lease on it.
        fair_share: how many partitions each live worker should hold at most.
        workers: live workers (those that renewed within the lease time).
    """

    leases: dict[int, int]
    fair_share: int
    workers: int


@dataclass(frozen=True, slots=True)
class Saved:
    """A partition's stored state.

    Attributes:
        checkpoint: the pickled state, or ``None`` before the first checkpoint.
        published: keys of the diagnosis changes published after that checkpoint.
    """

    checkpoint: bytes | None
    published: frozenset[str]


class PartitionStore(Protocol):
    """Leases and state of the partitions, shared by the workers."""

    async def hold(self, worker: str, partitions: int, ttl_s: float) -> Holding:
        """Renew this worker's leases, claim free or expired ones up to its fair share."""
        ...

    async def release(self, worker: str, partition: int, epoch: int) -> None:
        """Give a partition up (after its last checkpoint) for another worker to claim."""
        ...

    async def load(self, partition: int) -> Saved:
        """The partition's last checkpoint and what was published after it."""
        ...

    async def save(self, worker: str, partition: int, epoch: int, checkpoint: bytes) -> bool:
        """Store a checkpoint (and forget the published keys); False if the lease is lost."""
        ...

    async def note_published(
        self, worker: str, partition: int, epoch: int, keys: Iterable[str]
    ) -> bool:
        """Remember published diagnosis changes; False if the lease is lost."""
        ...

    async def holders(self) -> dict[str, int]:
        """How many partitions each worker holds under a live lease, by worker."""
        ...


class SoleOwnerStore:
    """One worker holds every partition; checkpoints live in memory (no shared store)."""

    def __init__(self) -> None:
        self._saved: dict[int, Saved] = {}

    async def hold(self, worker: str, partitions: int, ttl_s: float) -> Holding:
        """Every partition, epoch 1."""
        return Holding(dict.fromkeys(range(partitions), 1), partitions, 1)

    async def release(self, worker: str, partition: int, epoch: int) -> None:
        """Nothing to release: no other worker exists."""

    async def load(self, partition: int) -> Saved:
        """The checkpoint kept in memory, if any."""
        return self._saved.get(partition, Saved(None, frozenset()))

    async def save(self, worker: str, partition: int, epoch: int, checkpoint: bytes) -> bool:
        """Keep the checkpoint."""
        self._saved[partition] = Saved(checkpoint, frozenset())
        return True

    async def note_published(
        self, worker: str, partition: int, epoch: int, keys: Iterable[str]
    ) -> bool:
        """Remember the keys next to the checkpoint."""
        saved = self._saved.get(partition, Saved(None, frozenset()))
        self._saved[partition] = Saved(saved.checkpoint, saved.published | set(keys))
        return True

    async def holders(self) -> dict[str, int]:
        """Nobody is named: the sole worker holds what it was given, without leases."""
        return {}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS diagnostics_workers (
    worker text PRIMARY KEY,
    seen_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS diagnostics_partitions (
    partition integer PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    checkpoint bytea,
    checkpoint_at timestamptz,
    published text[] NOT NULL DEFAULT '{}'
);
"""


class PostgresPartitionStore:
    """Leases and checkpoints in PostgreSQL; an async context manager.

    Its tables, ``diagnostics_partitions`` and ``diagnostics_workers``, are created when
    missing.

    Args:
        url: ``postgresql://user:password@host:5432/db``.
        connect_timeout_s: how long to wait for a connection.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        self._url = url
        self._timeout_s = connect_timeout_s
        self._pool: asyncpg.Pool[Any] | None = None

    async def __aenter__(self) -> Self:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=4,
                timeout=self._timeout_s,
                server_settings={"application_name": "fixloop-diagnostics"},
            )
            # one creator at a time when several workers start together
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(7311)")
                await conn.execute(_SCHEMA)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError,
                asyncpg.InvalidCatalogNameError, ValueError) as exc:  # fmt: skip
            raise ConfigError(f"cannot open the partition store: {exc}") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"partition store unreachable: {exc}") from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _run(self, how: str, query: str, *args: Any) -> Any:
        import asyncpg

        assert self._pool is not None, "use the store as an async context manager"
        try:
            async with self._pool.acquire() as conn:
                return await getattr(conn, how)(query, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"partition store: {exc}") from exc

    async def hold(self, worker: str, partitions: int, ttl_s: float) -> Holding:
        """Renew, count live workers, shed nothing (the worker does), claim up to the share.

        Raises:
            StoreUnavailableError: PostgreSQL cannot be reached.
        """
        import asyncpg

        assert self._pool is not None, "use the store as an async context manager"
        ttl = timedelta(seconds=ttl_s)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO diagnostics_partitions (partition) "
                    "SELECT generate_series(0, $1::int - 1) ON CONFLICT DO NOTHING",
                    partitions,
                )
                await conn.execute(
                    "INSERT INTO diagnostics_workers (worker, seen_at) VALUES ($1, now()) "
                    "ON CONFLICT (worker) DO UPDATE SET seen_at = now()",
                    worker,
                )
                await conn.execute(
                    "DELETE FROM diagnostics_workers WHERE seen_at < now() - 10 * $1::interval",
                    ttl,
                )
                workers = await conn.fetchval(
                    "SELECT count(*) FROM diagnostics_workers WHERE seen_at > now() - $1::interval",
                    ttl,
                )
                rows = await conn.fetch(
                    "UPDATE diagnostics_partitions SET expires_at = now() + $2::interval "
                    "WHERE owner = $1 AND expires_at > now() AND partition < $3 "
                    "RETURNING partition, epoch",
                    worker,
                    ttl,
                    partitions,
                )
                leases = {int(r["partition"]): int(r["epoch"]) for r in rows}
                share = math.ceil(partitions / max(1, int(workers)))
                if len(leases) < share:
                    claimed = await conn.fetch(
                        "UPDATE diagnostics_partitions SET owner = $1, epoch = epoch + 1, "
                        "expires_at = now() + $2::interval WHERE partition IN ("
                        "SELECT partition FROM diagnostics_partitions WHERE partition < $4 "
                        "AND (owner IS NULL OR expires_at <= now()) ORDER BY partition "
                        "LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING partition, epoch",
                        worker,
                        ttl,
                        share - len(leases),
                        partitions,
                    )
                    leases.update({int(r["partition"]): int(r["epoch"]) for r in claimed})
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"partition store: {exc}") from exc
        return Holding(leases, share, int(workers))

    async def release(self, worker: str, partition: int, epoch: int) -> None:
        """Free the partition if this worker still holds it under ``epoch``."""
        await self._run(
            "execute",
            "UPDATE diagnostics_partitions SET owner = NULL, expires_at = NULL "
            "WHERE partition = $1 AND owner = $2 AND epoch = $3",
            partition,
            worker,
            epoch,
        )

    async def load(self, partition: int) -> Saved:
        """The partition's checkpoint and the keys published after it."""
        row = await self._run(
            "fetchrow",
            "SELECT checkpoint, published FROM diagnostics_partitions WHERE partition = $1",
            partition,
        )
        if row is None:
            return Saved(None, frozenset())
        return Saved(row["checkpoint"], frozenset(row["published"]))

    async def save(self, worker: str, partition: int, epoch: int, checkpoint: bytes) -> bool:
        """Store the checkpoint under the lease; forget the published keys it covers."""
        done = await self._run(
            "fetchval",
            "UPDATE diagnostics_partitions SET checkpoint = $4, checkpoint_at = now(), "
            "published = '{}' WHERE partition = $1 AND owner = $2 AND epoch = $3 "
            "AND expires_at > now() RETURNING partition",
            partition,
            worker,
            epoch,
            checkpoint,
        )
        return done is not None

    async def note_published(
        self, worker: str, partition: int, epoch: int, keys: Iterable[str]
    ) -> bool:
        """Add ``keys`` to the partition's published list under the lease."""
        done = await self._run(
            "fetchval",
            "UPDATE diagnostics_partitions SET published = published || $4::text[] "
            "WHERE partition = $1 AND owner = $2 AND epoch = $3 AND expires_at > now() "
            "RETURNING partition",
            partition,
            worker,
            epoch,
            list(keys),
        )
        return done is not None

    async def holders(self) -> dict[str, int]:
        """Live leases counted by worker (none before the tables exist)."""
        rows = await self._run(
            "fetch",
            "SELECT owner, count(*) AS held FROM diagnostics_partitions "
            "WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner",
        )
        return {str(r["owner"]): int(r["held"]) for r in rows}
