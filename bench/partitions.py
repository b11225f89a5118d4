"""Partitioned diagnostics benchmark: throughput with 1, 2, 3 workers, and the broker's cost.

Two measurements on private servers (mosquitto, influxd, PostgreSQL for the leases):

1. **Workers**: N worker processes (``tests/partition_worker.py``: leases in PostgreSQL,
   checkpoints every ``--checkpoint-s`` (2 s) or
   ``--checkpoint-messages`` (2,000), items held ``--reorder-hold-s`` (2 s) for order,
   baselines-only engines, scores not written)
   start and share
   the partitions; then they are frozen (SIGSTOP), a simulated fleet's messages
   (telemetry and events) are published on ``fleet/partitions/{p}/...`` and queued by the
   broker, and the workers are thawed (SIGCONT): the time until the last item is handled
   (from the workers' own logs) gives msg/s, printed with a ratio to one worker and each
   process's CPU seconds in the drain (the publisher is not running then).
2. **Republish**: the same messages queued in the gateway's session on
   ``devices/{id}/...``, then drained by the gateway into InfluxDB, once with
   ``republish_partitions`` 0 and once with the partitions, a ``mosquitto_sub`` taking the
   republished messages as the workers would; off and on alternate for ``--rounds``.
   Printed: the gateway's msg/s and CPU seconds, the messages the broker took and sent,
   the broker's CPU seconds (per 1,000 device messages), and per round the ratios of on
   to off (measured in the same run, minutes apart).

The machine has 2 cores shared by the broker, the workers and everything else on it (and
by other work: figures vary between runs), so the ratio says what 2 cores allow, not what
N machines would.

Usage::

    python bench/partitions.py                # 400 devices, 2 days, 12 partitions, 2 rounds
    python bench/partitions.py --devices 300 --days 3 --workers 1,2,3 --rounds 3
    python bench/partitions.py --workers ''   # the republish only (off and on, 2 rounds)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_sim.fleet import Fleet
from fixloop.broker import GATEWAY_USER
from fixloop.pgserver import PostgresServer
from fixloop.stack import InfluxdServer, MosquittoServer
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from wire.influx import InfluxSettings
from wire.mqtt import MqttClient
from wire.partitions import partition_of, partition_topic
from wire.settings import MqttSettings

GATEWAY_PASSWORD = "bench-gateway-password"
ADMIN, ADMIN_PASSWORD = "bench-admin", "bench-admin-password"
WORKER = Path(__file__).resolve().parent.parent / "tests" / "partition_worker.py"
CLIENT_ID = "bench-diag"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fleet_messages(devices: int, days: float, seed: int) -> list[tuple[str, bytes]]:
    """Telemetry and events of a simulated fleet, in the order the devices sent them."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=days + 0.1)
    fleet = Fleet(devices, start=start, seed=seed, interval_s=300.0)
    messages: list[tuple[str, bytes]] = []
    for batch in fleet.iter_until(start + timedelta(days=days)):
        for _, topic, payload in batch:
            if topic.endswith(("/telemetry", "/events")):
                messages.append((topic, payload))
    return messages


def new_broker(root: Path) -> MosquittoServer:
    return MosquittoServer(
        root,
        users={GATEWAY_USER: GATEWAY_PASSWORD},
        admin_users={ADMIN: ADMIN_PASSWORD},
        max_queued_messages=0,
        connection_messages=False,
        die_with_parent=True,
    ).start()


async def publish_all(broker: MosquittoServer, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 as the operator, pipelined in chunks, in order."""
    async with MqttClient(
        broker.host, broker.port, client_id="bench-pub", username=ADMIN, password=ADMIN_PASSWORD
    ) as client:
        for i in range(0, len(messages), 5_000):
            chunk = messages[i : i + 5_000]
            await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in chunk))


def handled_times(logs: list[Path]) -> list[int]:
    times: list[int] = []
    for log in logs:
        if log.exists():
            times += [int(line.split(b"\t")[4]) for line in log.read_bytes().splitlines()]
    return sorted(times)


async def owners(pg: PostgresServer, database: str) -> list[int]:
    """Partitions held per worker (sorted), from the lease table."""
    import asyncpg

    conn = await asyncpg.connect(pg.url(database))
    try:
        rows = await conn.fetch(
            "SELECT owner, count(*) AS n FROM diagnostics_partitions "
            "WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner"
        )
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()
    return sorted(int(r["n"]) for r in rows)


async def workers_run(
    root: Path,
    run: str,
    n: int,
    messages: list[tuple[str, bytes]],
    partitions: int,
    influx: InfluxdServer,
    pg: PostgresServer,
    checkpoint_s: float,
    checkpoint_messages: int,
    reorder_hold_s: float,
) -> float:
    """Start ``n`` workers, let them share the partitions, freeze them, queue the
    messages, thaw them and time the drain; return msg/s."""
    run_root = root / f"workers-{run}"
    run_root.mkdir()
    broker = new_broker(run_root / "broker")
    database = f"bench_leases_{run.replace('-', '_')}"
    pg.create_database(database)
    procs: list[asyncio.subprocess.Process] = []
    try:
        config = {
            "host": broker.host,
            "port": broker.port,
            "username": GATEWAY_USER,
            "password": GATEWAY_PASSWORD,
            "influx_url": influx.url,
            "lease_url": pg.url(database),
            "diagnostics": {
                "client_id": CLIENT_ID,
                "model_path": str(run_root / "no-model.pkl"),
                "partitions": partitions,
                "lease_ttl_s": 300.0,  # no failover here: frozen workers keep their leases
                "checkpoint_every_s": checkpoint_s,
                "checkpoint_max_messages": checkpoint_messages,
                "reorder_hold_s": reorder_hold_s,
                "write_scores": False,
                "lifetime_backfill": False,
            },
        }
        logs = []
        for i in range(n):
            path = run_root / f"w{i}.json"
            path.write_bytes(orjson.dumps({**config, "worker": f"w{i}"}))
            logs.append(run_root / f"w{i}.handled")
            with (run_root / f"w{i}.out").open("wb") as out:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        str(WORKER),
                        str(path),
                        str(logs[-1]),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        share = -(-partitions // n)
        balanced = [share] * (partitions // share) + (
            [partitions % share] if partitions % share else []
        )
        deadline = time.monotonic() + 300
        while sorted(balanced) != await owners(pg, database) or any(
            b"served by" not in (run_root / f"w{i}.out").read_bytes() for i in range(n)
        ):
            if time.monotonic() > deadline or any(p.returncode is not None for p in procs):
                print(f"  {n} worker(s): the partitions were not shared; see {run_root}")
                return float("nan")
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)  # every partition connected and subscribed
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        on_partitions = []
        for topic, payload in messages:
            _, device_id, channel = topic.split("/")
            number = partition_of(device_id, partitions)
            on_partitions.append((partition_topic(number, device_id, channel), payload))  # type: ignore[arg-type]
        queued = time.perf_counter()
        await publish_all(broker, on_partitions)
        queued = time.perf_counter() - queued
        cpu_before = [cpu_seconds(p.pid) for p in procs]
        broker_cpu = cpu_seconds(broker.pid)
        thawed = time.monotonic_ns()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        total = len(messages)
        while sum(log.read_bytes().count(b"\n") for log in logs if log.exists()) < total:
            if time.monotonic() > deadline + 900 or any(p.returncode is not None for p in procs):
                print(f"  {n} worker(s): not all {total} handled; see {run_root}", flush=True)
                return float("nan")
            await asyncio.sleep(0.1)
        last = handled_times(logs)[-1]
        rate = total / ((last - thawed) / 1e9)
        cpus = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu_before, strict=True)]
        print(
            f"  {n} worker(s), partitions held {await owners(pg, database)}: {rate:,.0f} msg/s"
            f" (queued in {queued:.1f} s, drained in {(last - thawed) / 1e9:.1f} s); CPU s in"
            " the drain: "
            + ", ".join(f"w{i} {c:.1f}" for i, c in enumerate(cpus))
            + f", broker {cpu_seconds(broker.pid) - broker_cpu:.1f}",
            flush=True,
        )
        return rate
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
        broker.stop()


async def gateway_run(
    root: Path,
    messages: list[tuple[str, bytes]],
    partitions: int,
    influx: InfluxdServer,
    run: int = 0,
) -> tuple[float, float, int]:
    """Drain the queued messages through the gateway; (msg/s, broker CPU s, broker msgs)."""
    run_root = root / f"gateway-{partitions}-{run}"
    run_root.mkdir()
    broker = new_broker(run_root / "broker")
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx_settings = InfluxSettings(url=influx.url, database=f"bench_rp{partitions}_{run}")
    settings = GatewaySettings(
        spool_dir=run_root / "spool", metrics_port=0, republish_partitions=partitions
    )
    sub: asyncio.subprocess.Process | None = None
    total = len(messages)
    try:
        async with Gateway(mqtt, influx_settings, settings) as gateway:
            task = asyncio.create_task(gateway.run())
            await gateway.wait_subscribed()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await publish_all(broker, messages)
        if partitions:
            sub = await asyncio.create_subprocess_exec(
                "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-u", ADMIN,
                "-P", ADMIN_PASSWORD, "-i", "bench-workers", "-q", "1",
                "-t", "fleet/partitions/#", "-C", str(total),
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.sleep(0.5)
        before = cpu_seconds(broker.pid)
        async with Gateway(mqtt, influx_settings, settings) as gateway:
            started = time.perf_counter()
            own_cpu = time.process_time()  # this process is the gateway in the drain
            task = asyncio.create_task(gateway.run())
            try:
                deadline = time.monotonic() + 900
                while gateway.metrics.acked < total and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
                    await asyncio.sleep(0.02)
                if sub is not None:
                    await asyncio.wait_for(sub.wait(), 600)
                elapsed = time.perf_counter() - started
                own_cpu = time.process_time() - own_cpu
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        broker_cpu = cpu_seconds(broker.pid) - before
        # PUBLISH packets through the broker in the drain: to the gateway, and with
        # partitions, from the gateway and to the workers' stand-in
        broker_messages = total * (3 if partitions else 1)
        print(
            f"  republish {'on, ' + str(partitions) + ' partitions' if partitions else 'off'}: "
            f"gateway {total / elapsed:,.0f} msg/s, broker {broker_messages:,} PUBLISH "
            f"packets in the drain, broker CPU {broker_cpu:.1f} s "
            f"({broker_cpu / total * 1e3 * 1e3:.0f} ms per 1,000 device messages); gateway "
            f"CPU {own_cpu:.1f} s of {elapsed:.1f} s",
            flush=True,
        )
        return total / elapsed, broker_cpu, broker_messages
    finally:
        if sub is not None and sub.returncode is None:
            sub.kill()
        broker.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=400)
    parser.add_argument("--days", type=float, default=2.0)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--workers", default="1,2,3", help="'' for none")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint-s", type=float, default=2.0)
    parser.add_argument("--checkpoint-messages", type=int, default=2_000)
    parser.add_argument("--reorder-hold-s", type=float, default=2.0)
    parser.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each worker count and republish setting"
    )
    args = parser.parse_args()
    # the sessions' first connections find no session to resume: expected, not news
    logging.getLogger("wire.mqtt").setLevel(logging.ERROR)
    messages = fleet_messages(args.devices, args.days, args.seed)
    print(
        f"{len(messages):,} messages of {args.devices} simulated devices over {args.days:g} "
        f"days; {args.partitions} partitions; {os.cpu_count()} cores",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="fixloop-bench-part-", dir="/tmp"))
    try:
        influx = InfluxdServer(root / "influxd", die_with_parent=True).start()
        # its own folder in /tmp: the server's unprivileged user must reach it
        pg_root = Path(tempfile.mkdtemp(prefix="fixloop-bench-pg-", dir="/tmp"))
        pg = PostgresServer(pg_root, durable=False, die_with_parent=True).start()
        try:
            print("Workers (queued partition messages drained by N worker processes):")
            counts = [int(x) for x in args.workers.split(",") if x]
            rates: dict[int, list[float]] = {n: [] for n in counts}
            for round_ in range(args.rounds):  # alternating, so drift hits every count
                for n in counts:
                    run = f"{n}-{round_}"
                    rates[n].append(
                        await workers_run(
                            root,
                            run,
                            n,
                            messages,
                            args.partitions,
                            influx,
                            pg,
                            args.checkpoint_s,
                            args.checkpoint_messages,
                            args.reorder_hold_s,
                        )
                    )
            best = {n: max(r) for n, r in rates.items()}
            if best.get(1):
                print(
                    "  ratio to one worker (best of each): "
                    + ", ".join(f"{n}: {r / best[1]:.2f}" for n, r in best.items()),
                    flush=True,
                )
            if not args.gateway:
                return
            print("Republish (queued device messages drained by the gateway into InfluxDB):")
            for round_ in range(args.rounds):  # off and on alternate: drift hits both
                off = await gateway_run(root, messages, 0, influx, round_)
                on = await gateway_run(root, messages, args.partitions, influx, round_)
                print(
                    f"  round {round_ + 1}, with republish: gateway throughput "
                    f"x{on[0] / off[0]:.2f}, broker CPU x{on[1] / off[1]:.2f}, broker "
                    f"PUBLISH packets x{on[2] / off[2]:.0f}",
                    flush=True,
                )
        finally:
            pg.stop()
            influx.stop()
            shutil.rmtree(pg_root, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
