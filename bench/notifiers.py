"""Notifiers side by side: how fast case steps go through the shared store.

A case store (a private PostgreSQL, or a SQLite file) holds ``--cases`` cases waiting on
their fix check (``verifying``, timer due now) with healthy scores after the fix; 1, 2
and 3 case machines (:class:`notifier.loop.OwnerLoop`), each in its own process with
its own connections, run the timers until every case is resolved. Each case is one
step: timers taken (``FOR UPDATE SKIP LOCKED``), the case's lease taken and given up,
the case moved to ``resolved`` with its two owner messages ("fixed", "please rate") and
three lines in the trail in one transaction, the timer finished. Owners' messages are
kept, not pushed (no push service). Printed per run: steps per second, the share each
process did, its CPU seconds, and the steps checked afterwards (every case resolved
once, two messages each, no key twice).

Usage::

    python bench/notifiers.py                     # PostgreSQL, 1..3 processes, 2000 cases
    python bench/notifiers.py --cases 500 --sqlite  # one process on SQLite as well
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixloop.pgserver import PostgresServer
from notifier.actions import HealthPoint
from notifier.loop import LoopConfig, OwnerLoop
from notifier.model import Case, DeviceRecord, Owner
from notifier.outbox import Outbox
from notifier.postgres import PostgresStore
from notifier.sqlite import SqliteStore
from notifier.store import CaseTimer

Store = SqliteStore | PostgresStore
T0 = datetime.now(UTC) - timedelta(hours=2)


class Healthy:
    """Scores: every device healthy for an hour after its fix."""

    async def latest(self, device_ids: Sequence[str]) -> dict[str, HealthPoint]:
        return {}

    async def since(self, device_id: str, start: datetime) -> list[HealthPoint]:
        return [HealthPoint(start + timedelta(minutes=m), 0.05) for m in range(0, 70, 5)]


class NoDevices:
    async def send(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("no command is sent in this benchmark")


def open_store(where: str) -> Store:
    return PostgresStore(where) if where.startswith("postgresql") else SqliteStore(where)


async def seed(where: str, cases: int) -> None:
    async with open_store(where) as store:
        for n in range(cases // 10 + 1):
            await store.put_owner(
                Owner(f"o-{n}", f"Owner {n}", quiet_start=None, quiet_end=None, max_per_day=99)
            )
        for n in range(cases):
            device_id = f"d-{n:05d}"
            await store.put_device(DeviceRecord(device_id, f"o-{n // 10}", "washer", "2.3.1"))
            case = Case(
                case_id=f"c-{n:05d}",
                device_id=device_id,
                owner_id=f"o-{n // 10}",
                model="washer",
                fault="firmware_bug",
                state="verifying",
                urgency="normal",
                opened_at=T0,
                updated_at=T0,
                remedies=("restart",),
                tried=("restart",),
                fix_at=T0,
            )
            await store.add_case(case)
            await store.set_timer(CaseTimer(case.case_id, "verify", T0))


async def work(where: str, ready: Any, go: Any) -> tuple[int, float]:
    """Run one case machine's timers until no case is left to check; steps done, CPU s."""
    config = LoopConfig(settle_s=0, verify_window_s=3_000, tick_s=0.05, reminder_before_s=0)
    async with open_store(where) as store:
        outbox = Outbox(store, None)
        loop = OwnerLoop(store, NoDevices(), Healthy(), outbox, config=config)
        async with loop:
            ready.put(True)
            await asyncio.to_thread(go.wait)
            cpu = time.process_time()
            while await store.cases(states=["verifying"], limit=1):
                await loop.tick()
                await asyncio.sleep(0)
            return outbox.written // 2, time.process_time() - cpu


def worker(where: str, ready: Any, go: Any, results: Any) -> None:
    results.put(asyncio.run(work(where, ready, go)))


async def check(where: str, cases: int) -> str:
    async with open_store(where) as store:
        resolved = await store.cases(states=["resolved"], limit=cases + 1)
        messages = 0
        for n in range(cases // 10 + 1):
            messages += len(await store.notifications(f"o-{n}"))
        trail = 0
        for case in resolved[:50]:
            trail += sum(1 for e in await store.audit(case.case_id) if e.to_state == "resolved")
    ok = len(resolved) == cases and messages == 2 * cases and trail == min(50, cases)
    return f"{len(resolved)} resolved, {messages} messages kept" + ("" if ok else "  MISMATCH")


def run(where: str, cases: int, processes: int) -> None:
    asyncio.run(seed(where, cases))
    context = multiprocessing.get_context("spawn")
    results, ready, go = context.Queue(), context.Queue(), context.Event()
    procs = [
        context.Process(target=worker, args=(where, ready, go, results)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:  # every process imported, connected and its case machine started
        ready.get()
    start = time.monotonic()
    go.set()
    done = [results.get() for _ in procs]
    wall = time.monotonic() - start
    for proc in procs:
        proc.join()
    steps = sum(d for d, _ in done)
    shares = " / ".join(str(d) for d, _ in done)
    cpus = " / ".join(f"{c:.1f}" for _, c in done)
    print(
        f"  {processes} process(es): {cases} steps in {wall:.1f} s = {cases / wall:.0f} steps/s; "
        f"steps by process {shares}; CPU s {cpus}; {asyncio.run(check(where, cases))}"
        + ("" if steps == cases else f"  (steps counted {steps})")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sqlite", action="store_true", help="also one process on SQLite")
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fixloop-pg-", dir="/tmp") as root:
        Path(root).chmod(0o777)
        with PostgresServer(Path(root), durable=not args.no_fsync) as server:
            fsync = "off" if args.no_fsync else "on"
            print(f"PostgreSQL (fsync {fsync}), {args.cases} cases")
            for n, processes in enumerate(args.processes):
                database = f"bench_{n}"
                server.create_database(database)
                run(server.url(database), args.cases, processes)
    if args.sqlite:
        with tempfile.TemporaryDirectory() as folder:
            print(f"SQLite, {args.cases} cases")
            run(str(Path(folder) / "cases.sqlite3"), args.cases, 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
