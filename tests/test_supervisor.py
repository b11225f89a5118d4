"""A stage that dies is logged at once, shown as down, and restarted; the others go on."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wire.errors import ConfigError
from wire.supervisor import StageHealth, supervise


async def test_a_dying_stage_is_logged_shown_down_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = StageHealth()
    runs = 0
    resumed = asyncio.Event()
    release = asyncio.Event()

    async def stage() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            await release.wait()
            raise TypeError(f"bad item {runs}")
        resumed.set()
        await asyncio.Event().wait()

    caplog.set_level(logging.ERROR, logger="wire.supervisor")
    task = asyncio.create_task(supervise("digests", stage, health, first_pause_s=0.05))
    await asyncio.sleep(0)
    assert health.ok
    release.set()
    async with asyncio.timeout(5):
        while not health.down:  # noqa: ASYNC110 - polls a plain dict, no event to await
            await asyncio.sleep(0.005)
    assert health.down == {"digests": "TypeError: bad item 1"}
    assert "stage digests died" in caplog.text
    assert "bad item 1" in caplog.text
    async with asyncio.timeout(5):
        await resumed.wait()
    assert health.ok
    assert health.restarts == {"digests": 2}
    assert runs == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_configuration_error_is_not_restarted() -> None:
    health = StageHealth()

    async def stage() -> None:
        raise ConfigError("the broker refused our credentials")

    with pytest.raises(ConfigError):
        await supervise("diagnoses", stage, health, first_pause_s=0.01)
    assert health.restarts == {}


async def test_cancelling_the_supervisor_cancels_the_stage() -> None:
    health = StageHealth()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stage() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(supervise("timers", stage, health))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert health.restarts == {}
