"""Stopping background tasks: the caller's own cancellation is never swallowed."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from wire.tasks import cancel_and_wait


class _Worker:
    """A task that runs until cancelled, then takes until ``release`` to finish stopping."""

    def __init__(self) -> None:
        self.started, self.stopping, self.release = (asyncio.Event() for _ in range(3))
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            # the stopper cancelled us and is now waiting for us to end
            self.stopping.set()
            await self.release.wait()


async def test_the_callers_cancellation_propagates() -> None:
    worker = _Worker()
    await worker.started.wait()
    stopper = asyncio.create_task(cancel_and_wait(worker.task))
    await worker.stopping.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    worker.release.set()
    await asyncio.wait([worker.task])
    assert worker.task.cancelled()


async def test_the_old_way_swallowed_it() -> None:
    """The pattern cancel_and_wait replaces: the stopper ends as if never cancelled."""

    async def old_stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    worker = _Worker()
    await worker.started.wait()
    stopper = asyncio.create_task(old_stop(worker.task))
    await worker.stopping.wait()
    stopper.cancel()
    worker.release.set()
    await stopper  # no CancelledError: the caller's cancellation is lost
    assert not stopper.cancelled()


async def test_tasks_are_cancelled_and_waited_for() -> None:
    workers = [_Worker() for _ in range(3)]
    for worker in workers:
        worker.release.set()
        await worker.started.wait()
    tasks = [worker.task for worker in workers]
    await cancel_and_wait(tasks[0], None, *tasks[1:])
    assert all(task.cancelled() for task in tasks)
    await cancel_and_wait()  # nothing to stop
    await cancel_and_wait(*tasks)  # already ended: nothing happens


async def test_a_task_that_failed_raises_unless_its_error_is_ignored() -> None:
    async def fails() -> None:
        raise LookupError("gone")

    task = asyncio.create_task(fails())
    await asyncio.wait([task])
    with pytest.raises(LookupError):
        await cancel_and_wait(task)
    await cancel_and_wait(task, ignore=(LookupError,))


async def test_a_task_that_finished_is_no_error() -> None:
    async def done() -> int:
        return 1

    task = asyncio.create_task(done())
    await asyncio.wait([task])
    await cancel_and_wait(task)
    assert task.result() == 1
