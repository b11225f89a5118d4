"""The SQLite case store (notifier; the default :class:`~notifier.store.CaseStore`).

The owner loop, the owner API and the dashboard keep cases, appointments, ratings,
owners, the device registry, push channels, notifications, tasks and the audit trail
here. One file in WAL mode serves a small install; :class:`notifier.postgres.PostgresStore`
takes over for a large fleet behind the same protocol.

Where things are: :mod:`notifier.sqlite.store` (:class:`SqliteStore`, joined from the
query groups), :mod:`notifier.sqlite.base` (the connection, its worker thread and
lifecycle), :mod:`notifier.sqlite.schema` (opening the file, its permissions, the
migrations), :mod:`notifier.sqlite.sql` (upsert, insert, transactions), and the queries
by concern: :mod:`notifier.sqlite.owners` (owners, tokens, subjects, devices, push
channels, used links), :mod:`notifier.sqlite.cases` (cases, the audit trail, ratings,
tasks), :mod:`notifier.sqlite.messages` (notifications, the outbox's rows),
:mod:`notifier.sqlite.visits` (technicians, appointments), :mod:`notifier.sqlite.timers`
(leases and case timers) and :mod:`notifier.sqlite.rights` (export and erasure).

How it works:

* **One connection, one thread.** A connection belongs to the thread that made it, so
  every statement runs on a dedicated worker thread (a one-thread executor) and the
  event loop only awaits it. The worker runs one job at a time, so a job's transaction
  never interleaves with another job of the same store; ``BEGIN IMMEDIATE`` and
  ``busy_timeout`` keep other processes on the same file out of the way.
* **Migrations.** ``schema_version`` holds the file's version; :data:`MIGRATIONS` are the
  steps, oldest first, rendered for SQLite from :data:`notifier.schema.STEPS`. Opening
  an older file applies the missing steps in one transaction; a file from a newer
  fixloop is refused with :class:`~wire.errors.ConfigError`.
* **Rows** (:mod:`notifier.rows`, shared with the PostgreSQL store). Datetimes are ISO
  8601 UTC text with microseconds (fixed width, so text order is time order) and come
  back UTC-aware; tuples, dicts and sets are JSON; local times are ``HH:MM``.
* **Rules in the schema.** One open case per device and fault is a partial unique index
  over the open states; a case move is a compare-and-set ``UPDATE ... WHERE state = ?``;
  a booking checks for overlapping visits of the technician inside ``BEGIN IMMEDIATE``,
  and a release frees a booked visit only while it has not started, in the same way;
  one rating per case is the ratings table's key. Appointments, ratings and tasks need
  their case (:class:`~notifier.errors.NotFoundError` otherwise).
* **Owner data.** API tokens are kept as SHA-256 only. Erasure deletes with
  ``secure_delete`` on and checkpoints the write-ahead log, so erased contacts do not
  linger in the file. Nothing here logs contacts, names or tokens.

Errors: a locked or failing database raises :class:`~wire.errors.StoreUnavailableError`
(retry), a record that breaks a rule :class:`~notifier.errors.InvalidRequestError`, a
file that cannot be opened or migrated :class:`~wire.errors.ConfigError`.
"""

from notifier.sqlite.rights import ERASED_OWNER
from notifier.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from notifier.sqlite.store import SqliteStore

__all__ = ["ERASED_OWNER", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStore"]
