"""The sim clock (paced and stepping, never ahead of real time) and the sim settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from device_sim import BACKFILL_WINDOW_S, SimClock, SimSettings
from wire.errors import ConfigError

SECRET = "a-fleet-secret-of-some-length"


class FakeTime:
    def __init__(self, wall_s: float) -> None:
        self.wall_s = wall_s
        self.mono_s = 100.0
        self.slept: list[float] = []

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.wall_s += seconds
        self.mono_s += seconds


def clock(fake: FakeTime, start: datetime, speed: float | None) -> SimClock:
    return SimClock(start, speed, wall_time=fake.wall, monotonic=fake.mono, sleep=fake.sleep)


async def test_paced_clock_runs_speed_times_faster_then_at_real_time() -> None:
    now = datetime(2024, 3, 1, tzinfo=UTC)
    fake = FakeTime(now.timestamp())
    sim = clock(fake, now - timedelta(hours=2), 1000.0)
    await sim.wait_until(sim.start_ms + 3_600_000)  # one sim hour
    assert sum(fake.slept) == pytest.approx(3.6, abs=0.01)
    assert sim.now_ms() >= sim.start_ms + 3_600_000
    fake.slept.clear()
    target = round((now + timedelta(seconds=30)).timestamp() * 1000)
    await sim.wait_until(target)  # past real time: only real time gets there
    assert fake.wall_s >= now.timestamp() + 30.0
    assert sim.now_ms() == round(fake.wall_s * 1000)  # caught up: sim time = real time


async def test_stepping_clock_never_sleeps_in_the_past() -> None:
    now = datetime(2024, 3, 1, tzinfo=UTC)
    fake = FakeTime(now.timestamp())
    sim = clock(fake, now - timedelta(days=7), None)
    assert sim.stepping
    await sim.wait_until(sim.start_ms + 6 * 86_400_000)
    assert sum(fake.slept) == 0.0
    assert sim.now() == now - timedelta(days=1)
    await sim.wait_until(round(now.timestamp() * 1000) + 5_000)
    assert sum(fake.slept) >= 5.0


def test_clock_refuses_naive_start_and_bad_speed() -> None:
    with pytest.raises(ConfigError):
        SimClock(datetime(2024, 1, 1))
    with pytest.raises(ConfigError):
        SimClock(datetime(2024, 1, 1, tzinfo=UTC), 0.0)


def test_settings_defaults_and_validation() -> None:
    settings = SimSettings(fleet_secret=SECRET)
    assert settings.devices == 30
    assert settings.interval_s == 10.0
    assert settings.pace == 1.0
    assert settings.effective_start_offset_s == 0.0
    assert SimSettings(fleet_secret=SECRET, speed="max").pace is None
    week = SimSettings(fleet_secret=SECRET, duration_s=7 * 86_400)
    assert week.effective_start_offset_s == 7 * 86_400
    bad = [
        {"devices": 0},
        {"speed": 0},
        {"speed": "fast"},
        {"interval_s": 0.5},
        {"models": {"washer": 0.0}},
        {"models": {"toaster": 1.0}},
        {"duration_s": BACKFILL_WINDOW_S + 86_400},
        {"fleet_secret": "short"},
        {"id_prefix": "bad/prefix"},
        {"mqtt_port": 0},
        {"unknown": 1},
    ]
    for overrides in bad:
        with pytest.raises(ValidationError):
            SimSettings(**{"fleet_secret": SECRET, **overrides})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"refuses readings older"):
        SimSettings(fleet_secret=SECRET, duration_s=40 * 86_400)
    assert "a-fleet" not in repr(settings)
