"""The device store: outbox bound and drop counter, seq across restarts, answered commands.

And the device's own checks: a message that breaks the contract raises before anything is
stored, with no broker at all (the library refuses it on the device).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device import ContractError, Device, DeviceConfigError, DeviceError, DeviceSettings
from device.contract import encode_event, encode_reading
from device.store import DeviceStore
from fixloop.server import free_port

DEV = "dev-001"
NOW_MS = 1_740_816_070_000


def reading(seq: int) -> bytes:
    return encode_reading(DEV, seq, NOW_MS + seq, {"t": float(seq)})


def test_seq_survives_a_restart_and_never_repeats(tmp_path: Path) -> None:
    path = tmp_path / "device.sqlite3"
    with DeviceStore.open(path) as store:
        assert [store.append("t", reading, NOW_MS) for _ in range(3)] == [1, 2, 3]
    with DeviceStore.open(path) as store:
        assert store.seq == 3
        assert store.count == 3
        assert store.append("t", reading, NOW_MS) == 4
        rows = store.pending(0, 10)
    assert [json.loads(r.payload)["seq"] for r in rows] == [1, 2, 3, 4]


def test_a_full_outbox_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "device.sqlite3"
    with DeviceStore.open(path, max_messages=5) as store:
        for _ in range(8):
            store.append("t", reading, NOW_MS)
        assert store.count == 5
        assert store.counter("dropped") == 3
        seqs = [json.loads(r.payload)["seq"] for r in store.pending(0, 10)]
    assert seqs == [4, 5, 6, 7, 8]
    with DeviceStore.open(path, max_messages=5) as store:
        assert store.counter("dropped") == 3  # persisted


def test_a_message_that_breaks_the_contract_uses_no_seq(tmp_path: Path) -> None:
    with DeviceStore.open(tmp_path / "s.sqlite3") as store:
        store.append("t", reading, NOW_MS)
        with pytest.raises(ContractError):
            store.append("t", lambda seq: encode_reading(DEV, seq, NOW_MS, {"seq": 1.0}), NOW_MS)
        assert (store.seq, store.count) == (1, 1)
        assert store.append("t", reading, NOW_MS) == 2


def test_removed_messages_are_gone_and_counted_by_cause(tmp_path: Path) -> None:
    with DeviceStore.open(tmp_path / "s.sqlite3") as store:
        for _ in range(6):
            store.append("t", reading, NOW_MS)
        ids = [r.id for r in store.pending(0, 10)]
        store.remove(ids[:2])
        store.remove(ids[2:3], counter="refused")
        store.remove(ids[3:5], counter="expired")
        assert store.count == 1
        assert [r.id for r in store.pending(0, 10)] == ids[5:]
        assert (store.counter("refused"), store.counter("expired")) == (1, 2)
        assert store.counter("dropped") == 0
        assert store.pending(ids[5], 10) == []
        assert store.wait_empty(0.01) is False
        store.remove(ids[5:])
        assert store.wait_empty(0.01) is True


def test_a_command_is_answered_once_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"

    def result(seq: int) -> bytes:
        return encode_event(DEV, seq, NOW_MS, "command_result", command_id="c-1", ok=True)

    with DeviceStore.open(path) as store:
        assert store.answer("c-1", "e", result, NOW_MS, state={"reset_reason": "x"}) == 1
        assert store.answer("c-1", "e", result, NOW_MS) is None
        assert store.was_answered("c-1")
        assert not store.was_answered("c-2")
        assert store.get("reset_reason") == "x"
    with DeviceStore.open(path) as store:
        assert store.was_answered("c-1")
        assert store.answer("c-1", "e", result, NOW_MS) is None
        assert store.count == 1


def test_state_is_kept_with_the_message_or_not_at_all(tmp_path: Path) -> None:
    with DeviceStore.open(tmp_path / "s.sqlite3") as store:
        store.put("ota", {"version": "2.0.0"})
        with pytest.raises(ContractError):
            store.append("e", lambda seq: b"" + reading(-1), NOW_MS, state={"ota": None})
        assert store.get("ota") == {"version": "2.0.0"}
        store.append("e", reading, NOW_MS, state={"ota": None, "running": True})
        assert store.get("ota") is None
        assert store.get("running") is True


def test_fsync_policies_set_sqlite_synchronous(tmp_path: Path) -> None:
    for policy, level in (("always", 2), ("normal", 1)):
        path = tmp_path / f"{policy}.sqlite3"
        with DeviceStore.open(path, fsync=policy) as store:  # type: ignore[arg-type]
            store.append("t", reading, NOW_MS)
            assert store._db.execute("PRAGMA synchronous").fetchone()[0] == level
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(DeviceConfigError):
        DeviceStore.open(tmp_path / "x.sqlite3", fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(DeviceConfigError):
        DeviceStore.open(tmp_path / "y.sqlite3", max_messages=0)


def test_settings_are_checked_when_built(tmp_path: Path) -> None:
    for bad in (
        {"device_id": "dev 1"},
        {"host": ""},
        {"port": 0},
        {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0},
        {"send_rate_per_s": 0.0},
        {"max_buffered": 0},
        {"fsync": "sometimes"},
    ):
        values: dict[str, object] = {"device_id": DEV, "host": "127.0.0.1", "data_dir": tmp_path}
        values.update(bad)
        with pytest.raises(DeviceConfigError):
            DeviceSettings(**values)  # type: ignore[arg-type]
    settings = DeviceSettings.from_env(
        {
            "FIXLOOP_DEVICE_ID": DEV,
            "FIXLOOP_DEVICE_HOST": "broker.example",
            "FIXLOOP_DEVICE_PORT": "8883",
            "FIXLOOP_DEVICE_DATA_DIR": str(tmp_path),
            "FIXLOOP_DEVICE_PASSWORD": "pw",
            "FIXLOOP_DEVICE_CA_FILE": "/etc/ca.pem",
        }
    )
    assert (settings.device_id, settings.port, settings.password) == (DEV, 8883, "pw")
    assert settings.tls is not None
    assert settings.tls.ca_file == Path("/etc/ca.pem")
    assert "pw" not in repr(settings)
    with pytest.raises(DeviceConfigError, match="FIXLOOP_DEVICE_HOST"):
        DeviceSettings.from_env({"FIXLOOP_DEVICE_ID": DEV, "FIXLOOP_DEVICE_DATA_DIR": "/x"})


def offline_device(tmp_path: Path) -> Device:
    # a port nobody listens on: the device runs, stores, and keeps trying to connect
    return Device(DeviceSettings(DEV, "127.0.0.1", tmp_path, port=free_port(), reconnect_min_s=5.0))


def test_the_device_refuses_contract_violations_before_storing(tmp_path: Path) -> None:
    dev = offline_device(tmp_path)
    with pytest.raises(DeviceError, match="not started"):
        dev.publish_reading({"t": 1.0})
    with dev:
        seq = dev.publish_reading({"t": 1.0}, status="idle")
        cases: list[tuple[str, dict[str, object]]] = [
            ("bad_metric_name", {"metrics": {"water temp": 1.0}}),
            ("bad_metric_name", {"metrics": {"status": 1.0}}),
            ("bad_value", {"metrics": {"t": float("nan")}}),
            ("bad_value", {"metrics": {"t": "hot"}}),
            ("bad_metrics", {"metrics": {}}),
            ("bad_status", {"metrics": {"t": 1.0}, "status": "spin cycle"}),
            ("bad_ts", {"metrics": {"t": 1.0}, "ts": datetime(2025, 1, 1)}),
            ("too_old", {"metrics": {"t": 1.0}, "ts": datetime.now(UTC) - timedelta(days=36)}),
            ("in_future", {"metrics": {"t": 1.0}, "ts": datetime.now(UTC) + timedelta(hours=1)}),
        ]
        for reason, kw in cases:
            with pytest.raises(ContractError) as info:
                dev.publish_reading(
                    kw["metrics"],  # type: ignore[arg-type]
                    status=kw.get("status"),  # type: ignore[arg-type]
                    ts=kw.get("ts"),  # type: ignore[arg-type]
                )
            assert info.value.reason == reason, kw
        for reason, call in (
            ("bad_event", lambda: dev.report_error("E 21")),
            ("bad_event", lambda: dev.report_info("two\nlines")),
            ("bad_event", lambda: dev.report_info("ok", data={"x": [1]})),  # type: ignore[dict-item]
        ):
            with pytest.raises(ContractError) as info:
                call()
            assert info.value.reason == reason
        stats = dev.stats()
        assert stats.seq == seq  # nothing was numbered, nothing stored
        assert stats.buffered == seq
        assert not stats.connected
        assert dev.report_error("E21", "drain pump blocked") == seq + 1
