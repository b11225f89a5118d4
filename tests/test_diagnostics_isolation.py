"""One reading that trips the diagnostics engine never stops the fleet's scoring."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from diagnostics.engine import EngineResult, ReadingScores
from diagnostics.service import DiagnosticsService
from diagnostics.settings import DiagnosticsSettings
from wire.influx import InfluxSettings
from wire.mqtt import Message
from wire.protocol import Event, Reading
from wire.settings import MqttSettings

T0_MS = 1_796_000_000_000


def _reading(device_id: str, seq: int) -> Message:
    body = {"v": 1, "id": device_id, "seq": seq, "ts": T0_MS + seq, "metrics": {"t": 1.5}}
    return Message(f"devices/{device_id}/telemetry", orjson.dumps(body), 1, False, seq + 1)


@dataclass
class PoisonedEngine:
    """Scores every reading, except that any round holding ``bad`` raises."""

    bad: str
    seen: list[str] = field(default_factory=list)

    def process(self, items: Sequence[Reading | Event]) -> EngineResult:
        if any(item.device_id == self.bad for item in items):
            raise ZeroDivisionError("an unforeseen bug")
        self.seen.extend(item.device_id for item in items)
        return EngineResult(
            ReadingScores(
                tuple(i.device_id for i in items),
                tuple(i.ts_ms for i in items),
                tuple(0.1 for _ in items),
                tuple(0.1 for _ in items),
                tuple(0.0 for _ in items),
                tuple(False for _ in items),
            ),
            (),
        )


@dataclass
class ScriptedClient:
    """Hands out one batch of messages, records the acknowledgements, then waits."""

    batch: list[Message]
    acked: list[int] = field(default_factory=list)
    given: bool = False

    async def wait_messages(self) -> None:
        if self.given:
            await asyncio.Event().wait()

    def take(self, _limit: int) -> list[Message]:
        self.given = True
        return self.batch

    def ack_many(self, messages: Sequence[Message]) -> None:
        self.acked.extend(m.packet_id for m in messages)

    async def publish(self, *_args: Any, **_kw: Any) -> None:
        raise AssertionError("no diagnosis expected")


async def test_a_reading_that_trips_the_engine_is_skipped_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = PoisonedEngine(bad="dev-bad")
    service = DiagnosticsService(
        MqttSettings(host="127.0.0.1", port=1),
        InfluxSettings(url="http://127.0.0.1:1"),
        DiagnosticsSettings(write_scores=False),
        engine=engine,  # type: ignore[arg-type]
        clock=lambda: T0_MS / 1000 + 60,
    )
    batch = [_reading("dev-a", 1), _reading("dev-bad", 2), _reading("dev-b", 3)]
    client = ScriptedClient(batch)
    caplog.set_level(logging.ERROR, logger="diagnostics.service")
    task = asyncio.create_task(service._consume(client))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        while not client.acked:  # noqa: ASYNC110 - the scripted client has no event
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.seen == ["dev-a", "dev-b"]
    assert service.items_failed == 1
    assert service.readings_scored == 2
    assert client.acked == [2, 3, 4]
    assert "device dev-bad" in caplog.text
