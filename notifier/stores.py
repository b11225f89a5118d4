"""Which case store to open: SQLite (the default) or PostgreSQL (notifier; for its users).

The notifier service, the dashboard service and the commands that work on the case store
(registry, products, owners, invites, tokens, ``fixloop train``) open it through
:func:`case_store`, so one setting moves them all: ``[notifier] store_url`` names a
PostgreSQL database; without it the store is the SQLite file ``[notifier] db_path``.
"""

from __future__ import annotations

from notifier.postgres import PostgresStore, redacted_url
from notifier.settings import NotifierSettings
from notifier.sqlite import SqliteStore

__all__ = ["case_store", "case_store_name"]


def case_store(settings: NotifierSettings) -> SqliteStore | PostgresStore:
    """The configured case store, not yet open (``async with`` it, or ``await .open()``).

    The SQLite file's folder is not made here: a service makes it, a reader must not.
    """
    if settings.store_url is not None:
        return PostgresStore(
            settings.store_url.get_secret_value(), pool_size=settings.store_pool_size
        )
    return SqliteStore(settings.db_path)


def case_store_name(settings: NotifierSettings) -> str:
    """The configured case store for messages: the file, or the database URL without password."""
    if settings.store_url is not None:
        return redacted_url(settings.store_url.get_secret_value())
    return str(settings.db_path)
