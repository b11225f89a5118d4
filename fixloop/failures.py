"""Recorded failures, from the case store to ``fixloop train`` (composition root).

The notifier knows which devices failed and when; diagnostics learns remaining life from
them. Data flows one way (diagnostics -> notifier), so the failures go
back as data: ``fixloop`` reads them here and hands them to
:func:`diagnostics.training.train_from_influx`.

A failure is a case that ended ``resolved`` after a technician's visit: the part that was
failing was repaired or replaced at ``fix_at`` (device time of the visit). A visit often
comes before the part would have stopped, so what is learnt is the time left until a
repair was needed, never later than the failure itself.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from diagnostics.lifetimes import Failure
from notifier.settings import NotifierSettings

__all__ = ["recorded_failures"]

_LOG = logging.getLogger(__name__)
_MAX_CASES = 1_000_000


async def recorded_failures(where: Path | NotifierSettings) -> list[Failure]:
    """Failures recorded in the case store (none if there is no SQLite file yet).

    Args:
        where: the SQLite file, or the notifier's settings (``store_url`` when set,
            else ``db_path``).

    Raises:
        ConfigError: the store cannot be opened or is not a case store.
        StoreUnavailableError: the PostgreSQL server cannot be reached.
    """
    from notifier.stores import case_store

    settings = where if isinstance(where, NotifierSettings) else NotifierSettings(db_path=where)
    if settings.store_url is None and not await asyncio.to_thread(settings.db_path.exists):
        _LOG.info("no case store at %s: no recorded failures", settings.db_path)
        return []
    async with case_store(settings) as store:
        cases = await store.cases(states=["resolved"], limit=_MAX_CASES)
    return [
        Failure(case.device_id, case.model, case.fault, case.fix_at)
        for case in cases
        if case.appointment_id is not None and case.fix_at is not None
    ]
