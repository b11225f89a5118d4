"""The PostgreSQL case store (notifier; a :class:`~notifier.store.CaseStore` for a large fleet).

The same records, rules and schema as :class:`notifier.sqlite.SqliteStore`, the embedded
default, in a PostgreSQL database reached with asyncpg: for an install that outgrows one
machine's file, or that wants its case store backed up and replicated like its other
databases. Chosen with ``[notifier] store_url = "postgresql://..."``.

How it works:

* **A pool of connections.** Each call takes a connection from an asyncpg pool for one
  statement or one transaction, so calls run side by side (SQLite's store runs them one
  at a time on its thread). ``lock_timeout`` bounds how long a statement waits for a
  row another transaction holds.
* **Migrations** from the one description of :mod:`notifier.schema`, rendered for
  PostgreSQL (:data:`MIGRATIONS`); ``schema_version`` holds the version. A store is
  migrated in one transaction under an advisory lock, so instances starting together
  migrate it once; a database from a newer fixloop, or one that holds other tables
  without ``schema_version``, is refused with :class:`~wire.errors.ConfigError`.
* **Rows** are stored as SQLite stores them (ISO 8601 UTC text, JSON text, 0/1 flags;
  text compared byte by byte), both ways by the same functions (:mod:`notifier.rows`).
* **Rules under concurrency.** What SQLite's single writer gives for free is explicit
  here. One open case per device and fault is the same partial unique index; a case move
  is the same compare-and-set ``UPDATE ... WHERE state = $n`` (PostgreSQL re-checks the
  condition after waiting for the row). A booking takes a transaction-scoped advisory
  lock on its technician before it looks for overlapping visits, and a release takes the
  same lock, so two bookings of one technician (or a booking and a release) never
  interleave. A claim locks the device's registry row, a registration the registry as a
  whole (imports are rare), a release the device; writes that must not outlive an
  erasure (a notification, a subject link) lock the owner's row for share, so an
  erasure waits for them and removes what they wrote. An invite or a one-tap link is
  used by one statement (``DELETE ... RETURNING``, ``ON CONFLICT DO NOTHING``).
* **Owner data.** As in SQLite: tokens as SHA-256 only, and erasure removes and
  anonymises the same rows, but unlike SQLite's ``secure_delete`` it cannot zero the
  old bytes: PostgreSQL keeps old row versions in its table and index files until
  ``VACUUM`` prunes them, and even a plain ``VACUUM`` may leave bytes behind (tried:
  the erased owner's id and a push token stayed in two table files; after ``VACUUM
  FULL``, which rewrites the tables, in none). An install that must have erased data off
  the disk runs ``VACUUM FULL`` on the store's tables in a maintenance window, or keeps
  the database on encrypted storage; the write-ahead log and backups keep the data
  until they are recycled.

Errors: an unreachable server, a lock held too long, a failing statement raise
:class:`~wire.errors.StoreUnavailableError` (retry); a record that breaks a rule
:class:`~notifier.errors.InvalidRequestError`; a database that cannot be used (a bad
URL, wrong credentials, a missing database, a failed migration)
:class:`~wire.errors.ConfigError`.

Where each part is: :mod:`notifier.postgres.store` (:class:`PostgresStore`, composed of
the query classes below), :mod:`notifier.postgres.connect` (the pool, the migrations,
:func:`redacted_url`), :mod:`notifier.postgres.sql` (statement building blocks, lock
keys), :mod:`notifier.postgres.owners` (owners, tokens, subjects, devices, channels,
one-tap links), :mod:`notifier.postgres.cases` (cases, audit trail, ratings, tasks),
:mod:`notifier.postgres.messages` (notifications and the outbox's claims),
:mod:`notifier.postgres.visits` (technicians and appointments),
:mod:`notifier.postgres.timers` (leases and timers), :mod:`notifier.postgres.rights`
(the owner's export and erasure) and :mod:`notifier.postgres.registry`
(:class:`PostgresRegistry`).
"""

from notifier.postgres.connect import MIGRATIONS, SCHEMA_VERSION, redacted_url
from notifier.postgres.registry import PostgresRegistry
from notifier.postgres.store import PostgresStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresRegistry", "PostgresStore", "redacted_url"]
