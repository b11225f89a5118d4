"""The durable spool: order, reopen, torn-record recovery, rolling, limits, SIGKILL."""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import pytest

from gateway.spool import Spool
from wire.errors import ConfigError, StoreUnavailableError

HEADER = 8


def batch(index: int, size: int = 40) -> bytes:
    head = f"telemetry,device=d{index} seq={index}i {index}".encode()
    return head + b"," + b"x" * max(0, size - len(head) - 1)


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (head := spool.peek()) is not None:
        assert spool.pop() == head
        out.append(head)
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_append_peek_pop_in_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        assert len(spool) == 0
        assert spool.peek() is None
        batches = [batch(i) for i in range(5)] + [b""]
        for item in batches:
            spool.append(item)
        assert len(spool) == 6
        assert spool.pending_bytes == sum(HEADER + len(b) for b in batches)
        assert spool.peek() == batches[0]
        assert spool.peek() == batches[0]  # peek does not consume
        assert spool.pop() == batches[0]
        assert len(spool) == 5
        assert drain(spool) == batches[1:]
        assert len(spool) == 0
        assert spool.pending_bytes == 0
        with pytest.raises(IndexError):
            spool.pop()


def test_reopen_keeps_pending_and_forgets_popped(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(6):
            spool.append(batch(i))
        spool.pop()
        spool.pop()
    with Spool(directory) as spool:
        assert len(spool) == 4
        assert spool.pending_bytes == 4 * (HEADER + 40)
        assert spool.pop() == batch(2)
    with Spool(directory) as spool:
        spool.append(batch(6))
        assert drain(spool) == [batch(3), batch(4), batch(5), batch(6)]
    with Spool(directory) as spool:
        assert len(spool) == 0
        assert spool.peek() is None


def test_torn_last_record_is_cut_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(3):
            spool.append(batch(i))
    (segment,) = segments(directory)
    size = segment.stat().st_size
    with segment.open("r+b") as file:
        file.truncate(size - 5)  # a crash in the middle of the third append
    with caplog.at_level(logging.WARNING, logger="gateway.spool"), Spool(directory) as spool:
        assert len(spool) == 2
        assert segment.stat().st_size == 2 * (HEADER + 40)
        spool.append(batch(9))
        assert drain(spool) == [batch(0), batch(1), batch(9)]
    assert "damaged bytes" in caplog.text
    (kept,) = directory.glob("corrupt-*.bin")
    record = struct.pack("<II", 40, zlib.crc32(batch(2))) + batch(2)
    assert kept.read_bytes() == record[:-5]  # set aside, not lost without a trace


def test_short_header_and_bad_crc_tails(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        spool.append(batch(0))
        spool.append(batch(1))
    (segment,) = segments(directory)
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF  # the last record's data no longer matches its CRC
    segment.write_bytes(bytes(data) + b"\x07\x00")  # plus half a header
    with Spool(directory) as spool:
        assert len(spool) == 1
        assert drain(spool) == [batch(0)]


def test_segments_roll_and_are_deleted_when_read(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    record = HEADER + 40
    with Spool(directory, segment_bytes=3 * record) as spool:
        for i in range(10):
            spool.append(batch(i))
        assert [p.name for p in segments(directory)] == [
            "00000001.seg",
            "00000002.seg",
            "00000003.seg",
            "00000004.seg",
        ]
        assert segments(directory)[0].stat().st_size == 3 * record
        for i in range(4):
            assert spool.pop() == batch(i)
        assert [p.name for p in segments(directory)] == [
            "00000002.seg",
            "00000003.seg",
            "00000004.seg",
        ]
    with Spool(directory, segment_bytes=3 * record) as spool:
        assert len(spool) == 6
        assert drain(spool) == [batch(i) for i in range(4, 10)]
        # Emptied, the spool continues in a fresh segment and the read one is deleted.
        assert [p.name for p in segments(directory)] == ["00000005.seg"]
        assert segments(directory)[0].stat().st_size == 0
        assert spool.disk_bytes == 0
        for i in (10, 11, 12):
            spool.append(batch(i))
        assert [p.name for p in segments(directory)] == ["00000005.seg"]
        assert drain(spool) == [batch(10), batch(11), batch(12)]
        assert [p.name for p in segments(directory)] == ["00000006.seg"]


def test_oversized_batch_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", segment_bytes=100) as spool:
        spool.append(batch(0))
        spool.append(batch(1, size=500))
        spool.append(batch(2))
        assert len(segments(spool.directory)) == 3
        assert drain(spool) == [batch(0), batch(1, size=500), batch(2)]


def test_full_spool_refuses_appends(tmp_path: Path) -> None:
    record = HEADER + 40
    with Spool(tmp_path / "spool", max_bytes=3 * record) as spool:
        for i in range(3):
            spool.append(batch(i))
        with pytest.raises(StoreUnavailableError, match="spool full"):
            spool.append(batch(3))
        assert len(spool) == 3
        spool.pop()
        with pytest.raises(StoreUnavailableError, match="spool full"):
            spool.append(batch(3))  # the read record is still on disk
        assert drain(spool) == [batch(1), batch(2)]
        spool.append(batch(3))
        assert drain(spool) == [batch(3)]


def test_read_space_of_the_active_segment_is_reclaimed(tmp_path: Path) -> None:
    # max_bytes bounds the disk, not the pending bytes: read records count until their
    # segment is deleted, and the writer moves on once a quarter of a segment is read.
    record = HEADER + 40
    with Spool(tmp_path / "spool", segment_bytes=8 * record, max_bytes=10 * record) as spool:
        for i in range(4):
            spool.append(batch(i))
        for i in range(2):
            assert spool.pop() == batch(i)
        assert spool.pending_bytes == 2 * record
        assert spool.disk_bytes == 4 * record
        spool.append(batch(4))  # a quarter of the segment is read: a new one starts
        assert len(segments(spool.directory)) == 2
        assert drain(spool) == [batch(2), batch(3), batch(4)]
        assert spool.disk_bytes == 0
        assert len(segments(spool.directory)) == 1
        for i in range(10):
            spool.append(batch(i))
        with pytest.raises(StoreUnavailableError, match="spool full"):
            spool.append(batch(10))
        spool.pop()
        # Read but in a segment still being read from: the disk is still full.
        with pytest.raises(StoreUnavailableError, match="spool full"):
            spool.append(batch(10))
        assert len(drain(spool)) == 9
        spool.append(batch(10))
        assert drain(spool) == [batch(10)]


def test_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        Spool(blocker / "spool")


def test_one_process_per_spool(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool"):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from gateway.spool import Spool\n"
                "from wire.errors import ConfigError\n"
                "try:\n"
                f"    Spool({str(tmp_path / 'spool')!r})\n"
                "except ConfigError:\n"
                "    sys.exit(3)\n",
            ],
            cwd=Path(__file__).resolve().parents[1],
            check=False,
            timeout=30,
        )
        assert child.returncode == 3


def test_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.close()
    spool.close()
    with pytest.raises(StoreUnavailableError):
        spool.append(b"x")


def test_threads_append_concurrently(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", fsync=False, segment_bytes=1000) as spool:

        def work(worker: int) -> None:
            for i in range(50):
                spool.append(f"w{worker} {i}".encode())

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        items = drain(spool)
    assert len(items) == 200
    for worker in range(4):
        mine = [item for item in items if item.startswith(f"w{worker} ".encode())]
        assert mine == [f"w{worker} {i}".encode() for i in range(50)]


CHILD = textwrap.dedent(
    """
    import sys
    from gateway.spool import Spool

    spool = Spool(sys.argv[1], segment_bytes=4096)
    i = 0
    while True:
        spool.append(b"batch-%08d," % i + b"y" * (i % 97))
        sys.stdout.write(f"{i}\\n")  # the acknowledgement: append has returned
        sys.stdout.flush()
        i += 1
    """
)


def test_acknowledged_batches_survive_sigkill(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert child.stdout is not None
    acknowledged = -1
    try:
        for raw in child.stdout:
            acknowledged = int(raw)
            if acknowledged >= 300:
                break
        os.kill(child.pid, signal.SIGKILL)
        for raw in child.stdout:  # acknowledgements written before the kill landed
            acknowledged = int(raw)
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert acknowledged >= 300
    with Spool(directory) as spool:
        items = drain(spool)
    expected = [b"batch-%08d," % i + b"y" * (i % 97) for i in range(len(items))]
    assert items == expected  # in order, intact, nothing invented
    # every acknowledged batch is there; at most the one being appended at the kill more
    assert acknowledged + 1 <= len(items) <= acknowledged + 2
    assert len(segments(directory)) == 1


def test_damaged_cursor_replays_rather_than_loses(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(4):
            spool.append(batch(i))
        spool.pop()
    (directory / "cursor").write_bytes(b"garbage")
    with Spool(directory) as spool:
        assert drain(spool) == [batch(i) for i in range(4)]  # one batch twice: idempotent


def test_consumed_segment_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    record = HEADER + 40
    with Spool(directory, segment_bytes=2 * record) as spool:
        for i in range(4):
            spool.append(batch(i))
        first = segments(directory)[0].read_bytes()
        spool.pop()
        spool.pop()
    # a crash after the cursor moved on but before the old segment was deleted
    (directory / "00000001.seg").write_bytes(first)
    with Spool(directory, segment_bytes=2 * record) as spool:
        assert len(spool) == 2
        assert not (directory / "00000001.seg").exists()
        assert drain(spool) == [batch(2), batch(3)]


def test_record_damaged_while_open_is_set_aside(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(3):
            spool.append(batch(i))
        (segment,) = segments(directory)
        with segment.open("r+b") as file:
            file.seek(HEADER + 40 + HEADER + 3)  # inside the second record's data
            file.write(b"#")
        assert spool.pop() == batch(0)
        assert spool.peek() is None  # the rest of the segment is set aside, not sent
        assert len(spool) == 0
        spool.append(batch(7))
        assert drain(spool) == [batch(7)]
    (kept,) = directory.glob("corrupt-*.bin")
    assert len(kept.read_bytes()) == 2 * (HEADER + 40)


def test_failed_pop_keeps_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.append(batch(0))
        spool.append(batch(1))

        def broken() -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(spool, "_save_cursor", broken)
        with pytest.raises(StoreUnavailableError, match="cursor"):
            spool.pop()
        assert len(spool) == 2
        assert spool.peek() == batch(0)
        monkeypatch.undo()
        assert drain(spool) == [batch(0), batch(1)]


def test_failed_append_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.append(batch(0))
        (segment,) = segments(spool.directory)
        size = segment.stat().st_size

        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(spool, "_sync_fd", broken)
        with pytest.raises(StoreUnavailableError, match="spool write failed"):
            spool.append(batch(1))
        monkeypatch.undo()
        assert len(spool) == 1
        assert segment.stat().st_size == size
        spool.append(batch(2))
        assert drain(spool) == [batch(0), batch(2)]


def test_cursor_is_saved_in_place_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a pop frees space, so a full disk must not stop the cursor save.
    with Spool(tmp_path / "spool") as spool:
        for i in range(3):
            spool.append(batch(i))

        def full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
        assert spool.pop() == batch(0)
        monkeypatch.undo()
    with Spool(tmp_path / "spool") as spool:
        assert drain(spool) == [batch(1), batch(2)]
