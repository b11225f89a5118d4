"""Stopping background tasks without swallowing the caller's cancellation (wire: every stage).

``task.cancel()`` followed by ``with suppress(CancelledError): await task`` looks right
but is not: if the *caller* is cancelled while it waits (a shutdown, a timeout around
it), that ``CancelledError`` is its own, and the ``suppress`` swallows it, so the caller
carries on as if nothing happened. :func:`cancel_and_wait` waits with
:func:`asyncio.wait`, which neither raises the tasks' ``CancelledError`` nor catches the
caller's.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(
    *tasks: asyncio.Future[Any] | None, ignore: tuple[type[BaseException], ...] = ()
) -> None:
    """Cancel the tasks and wait until each has ended.

    Args:
        *tasks: the tasks (``None`` entries are skipped).
        ignore: errors a task may have ended with that are no news at this point (the
            first other error a task ended with is raised, as awaiting it would).

    Raises:
        asyncio.CancelledError: the caller itself was cancelled while waiting.
    """
    running = [task for task in tasks if task is not None]
    if not running:
        return
    for task in running:
        task.cancel()
    await asyncio.wait(running)
    for task in running:
        if task.cancelled():
            continue
        error = task.exception()
        if error is not None and not isinstance(error, ignore):
            raise error
