"""The device library without a transport: the memory store's rules, the send policy, the core.

``MemoryDeviceStore`` keeps the SQLite store's rules (the simulator's devices keep their
flash in it); ``SendQueue`` is the outbox's send policy both transports use; ``DeviceCore``
answers commands once behind the interlocks with no broker at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from device import (
    CommandResult,
    ContractError,
    DeviceCore,
    DeviceStore,
    MemoryDeviceStore,
    Refusal,
    SendQueue,
)
from device.contract import MAX_AGE_MS, encode_event, encode_reading
from device.store import DeviceState

DEV = "dev-001"
NOW_MS = 1_740_816_070_000


def reading(seq: int) -> bytes:
    return encode_reading(DEV, seq, NOW_MS + seq, {"t": float(seq)})


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DeviceState:
    if request.param == "memory":
        return MemoryDeviceStore(max_messages=5)
    return DeviceStore.open(tmp_path / "device.sqlite3", max_messages=5)


def seqs(rows: list[object]) -> list[int]:
    return [json.loads(row.payload)["seq"] for row in rows]  # type: ignore[attr-defined]


def test_both_stores_follow_the_same_rules(store: DeviceState) -> None:
    assert [store.append("t", reading, NOW_MS) for _ in range(8)] == list(range(1, 9))
    assert (store.count, store.counter("dropped")) == (5, 3)  # the oldest went first
    rows = store.pending(0, 10)
    assert seqs(rows) == [4, 5, 6, 7, 8]
    with pytest.raises(ContractError):
        store.append("t", lambda seq: encode_reading(DEV, seq, NOW_MS, {"seq": 1.0}), NOW_MS)
    assert store.seq == 8  # a refused message uses no seq
    store.remove([rows[0].id])
    store.remove([rows[1].id], counter="refused")
    store.remove([rows[2].id], counter="expired")
    assert (store.counter("refused"), store.counter("expired")) == (1, 1)
    assert seqs(store.pending(rows[3].id, 10)) == [8]
    assert store.wait_empty(0.01) is False
    store.remove([r.id for r in rows[3:]])
    assert store.wait_empty(0.01) is True

    def result(seq: int) -> bytes:
        return encode_event(DEV, seq, NOW_MS, "command_result", command_id="c-1", ok=True)

    assert store.answer("c-1", "e", result, NOW_MS, state={"reset_reason": "x"}) == 9
    assert store.answer("c-1", "e", result, NOW_MS) is None
    assert store.was_answered("c-1")
    assert not store.was_answered("c-2")
    assert store.get("reset_reason") == "x"
    store.put("reset_reason", None)
    assert store.get("reset_reason") is None
    store.close()


def test_the_send_queue_keeps_order_window_and_pace() -> None:
    store = MemoryDeviceStore()
    clock = [100.0]
    queue = SendQueue(
        store,
        clock_ms=lambda: NOW_MS,
        max_inflight=3,
        rate_per_s=2.0,
        monotonic=lambda: clock[0],
    )
    for _ in range(10):
        store.append("t", reading, NOW_MS)
    first = queue.next()
    assert seqs(first) == [1, 2, 3]  # the burst is the window
    assert queue.next(inflight=3) == []  # the window is full
    for row in first:
        queue.acked(row.id)
    queue.settle()
    assert queue.next() == []  # no token yet
    clock[0] += 1.0
    assert seqs(queue.next()) == [4, 5]  # 2 a second
    assert store.count == 7
    queue.restart()  # a new connection: from the oldest unacknowledged again
    clock[0] += 10.0
    assert seqs(queue.next()) == [4, 5, 6]
    assert queue.published == 3


def test_the_send_queue_drops_what_is_past_the_backfill_window() -> None:
    store = MemoryDeviceStore()
    now = [NOW_MS]
    queue = SendQueue(store, clock_ms=lambda: now[0], max_inflight=10)
    for _ in range(3):
        store.append("t", reading, NOW_MS)
    now[0] = NOW_MS + MAX_AGE_MS  # 35 days later: all too old to send
    store.append("t", lambda seq: encode_reading(DEV, seq, now[0], {"t": 1.0}), now[0])
    assert seqs(queue.next()) == [4]
    queue.settle()
    assert (store.count, store.counter("expired")) == (1, 3)


def test_the_core_answers_a_command_once_behind_its_interlock() -> None:
    store = MemoryDeviceStore()
    core = DeviceCore(DEV, store, clock_ms=lambda: NOW_MS, model="washer", firmware_version="1.0")
    door = {"open": True}
    restarts: list[str] = []
    core.add_interlock(lambda: Refusal("door_open", "the door is open") if door["open"] else None)
    core.on_command(
        "restart",
        lambda cmd: restarts.append(cmd.id) or CommandResult(True, "now", then=lambda: None),
    )
    core.boot()
    refused = orjson.dumps({"id": "c-1", "action": "restart"})
    assert core.handle_command(refused) is None
    door["open"] = False
    assert core.handle_command(refused) is None  # answered before: not run again
    done = orjson.dumps({"id": "c-2", "action": "restart"})
    assert core.handle_command(done) is not None  # its then: the restart
    assert core.handle_command(done) is None
    assert core.handle_command(b"{") is None
    assert restarts == ["c-2"]
    assert (core.commands, core.duplicates, core.bad_commands) == (2, 2, 1)
    events = [json.loads(row.payload) for row in store.pending(0, 10)]
    assert [e["type"] for e in events] == ["boot", "command_result", "command_result"]
    assert (events[1]["ok"], events[1]["code"]) == (False, "door_open")
    assert events[1]["detail"] == "refused: the door is open"
    assert events[2]["ok"] is True
    assert store.get("reset_reason") == "restart_command"  # for the next boot
    core.boot()
    boot = json.loads(store.pending(0, 10)[-1].payload)
    assert boot["data"]["reset_reason"] == "restart_command"
    assert boot["data"]["clean_shutdown"] is False  # never stopped cleanly
