"""Chaos benchmark: ingest on real servers while the gateway, broker, InfluxDB or disk fail.

Runs a real mosquitto and influxd (:mod:`fixloop.stack`, configured as shipped) and the
gateway as its own process (``python -m fixloop gateway``, as in production), publishes
QoS-1 telemetry from simulated devices (the project's MQTT client; a message counts as
sent once the broker acknowledged it with PUBACK) and breaks things on purpose. After
each scenario it waits for the gateway to drain and prints one line:

``scenario  sent  stored  lost  dup  drain_s  health_503``

* sent: messages the broker acknowledged to the devices;
* stored: distinct readings in InfluxDB (a reading is stored at most once: two
  readings of a device share each millisecond here, so a lost same-millisecond
  reading shows as lost too);
* lost: acknowledged readings missing from InfluxDB after the drain;
* dup: points stored twice (rows beyond the distinct readings);
* drain_s: from the end of the fault (and of publishing) until everything acknowledged
  was stored (or until nothing changed for the settle time);
* health_503: whether ``/health`` answered 503 at some point of the scenario;
* lost window (broker crashes): how long before the crash the oldest lost message was
  acknowledged, the measured counterpart of the stated bound.

Scenarios: kill -9 of the gateway at several moments, kill -9 of the broker with the
gateway up and with it down (2.5 s after the last acknowledgement, and at once: the
loss is bounded by the broker's save interval), kill -9 of influxd for a while, the
spool's disk full (a 1 MiB tmpfs when mounting is permitted, else ``spool_max_bytes``),
a slow InfluxDB (frozen with SIGSTOP most of the time), a device flooding at the
broker's limit (``mosquitto_pub -l`` processes under its user, doubled until the broker
takes no more) beside four devices at their pace, and a restart storm of many devices
reconnecting at once.

Usage::

    python bench/chaos.py            # every scenario at full length (a few minutes)
    python bench/chaos.py --quick    # short scenarios (about a minute), as the tests run
    python bench/chaos.py --quick --only gateway-kill,spool-full --json /tmp/chaos.json
    python bench/chaos.py --save-cost 600000   # broker CPU saving a backlog that size
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixloop.broker import DEFAULT_AUTOSAVE_INTERVAL_S, GATEWAY_USER
from fixloop.server import free_port
from fixloop.stack import InfluxdServer, MosquittoServer
from wire.errors import BrokerUnavailableError, PermanentError
from wire.mqtt import MqttClient
from wire.protocol.credentials import device_password

FLEET_SECRET = "chaos-fleet-secret-0123456789"
GATEWAY_PASSWORD = "chaos-gateway-password"
#: QoS-1 publishes a device keeps in flight.
WINDOW = 64
#: What a broker crash may lose, in seconds of acknowledged messages: Mosquitto 2.0 saves
#: once a whole second more than ``autosave_interval`` has passed (its check is "later
#: than", on a clock of whole seconds), so every 2 s with ``autosave_interval 1``.
SAVE_BOUND_S = DEFAULT_AUTOSAVE_INTERVAL_S + 1.0
#: Scenarios where a loss is expected: a broker crash, bounded by its save interval.
BROKER_CRASH = ("broker-kill-gw-up", "broker-kill-gw-down", "broker-kill-gw-down-at-once")
SCENARIOS = (
    "gateway-kill",
    "broker-kill-gw-up",
    "broker-kill-gw-down",
    "broker-kill-gw-down-at-once",
    "influxd-kill",
    "spool-full",
    "slow-influx",
    "flood",
    "restart-storm",
)


@dataclass(slots=True)
class Lengths:
    """How long the scenarios run: ``--quick`` or full."""

    publish_s: float
    rate: int
    influx_down_s: float
    storm_devices: int
    storm_messages: int
    settle_s: float
    drain_max_s: float
    #: flood: seconds one step of the ramp lasts (sized from the step before)
    flood_step_s: float
    #: flood: seconds the flood holds at the broker's limit once the ramp found it
    flood_hold_s: float


QUICK = Lengths(3.0, 1_000, 4.0, 200, 5, 3.0, 40.0, 1.0, 2.0)
FULL = Lengths(15.0, 2_000, 60.0, 1_000, 10, 5.0, 180.0, 2.5, 8.0)
#: flood: most publisher processes the ramp tries, and the gain that is still a rise.
FLOOD_MAX_PROCS = 16
FLOOD_GAIN = 1.1
#: flood: messages of the ramp's first step (one process), before a rate is known.
FLOOD_FIRST_LINES = 10_000
#: flood: QoS-1 messages each publisher keeps in flight (mosquitto_pub -M).
FLOOD_INFLIGHT = 64


@dataclass(slots=True)
class Result:
    """One scenario's line."""

    scenario: str
    sent: int
    stored: int
    lost: int
    dup: int
    drain_s: float
    health_503: bool
    note: str = ""
    #: After a broker crash: how long before the crash the oldest lost message was
    #: acknowledged (the measured loss window; 0 when nothing was lost).
    lost_window_s: float | None = None
    #: After a broker crash: lost messages the restarted broker had acknowledged.
    lost_after_restart: int | None = None
    #: Flood: what the flooder and the other devices saw (see :class:`Flood`).
    flood: dict[str, object] | None = None

    def line(self) -> str:
        return (
            f"{self.scenario:<28} sent {self.sent:>7,}  stored {self.stored:>7,}  "
            f"lost {self.lost:>5,}  dup {self.dup:>3}  drain {self.drain_s:6.1f} s  "
            f"health 503 {'yes' if self.health_503 else 'no ':<3} {self.note}"
            + (
                ""
                if self.lost_window_s is None
                else f" lost window {self.lost_window_s:.2f} s, "
                f"{self.lost_after_restart} lost after the restart"
            )
        ).rstrip()


def payload(device_id: str, seq: int, base_ms: int) -> bytes:
    """A reading; two consecutive readings share a millisecond."""
    body = {
        "v": 1,
        "id": device_id,
        "seq": seq,
        "ts": base_ms + seq // 2,
        "metrics": {
            "drum_rpm": float(1200 + seq % 7),
            "water_temp_c": round(40 + (seq % 100) / 10, 1),
            "vibration_rms_g": round(0.1 + (seq % 13) / 100, 3),
            "power_w": float(1800 + seq % 50),
            "door_open": False,
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(slots=True)
class Device:
    """A simulated device: publishes at QoS 1 and remembers what the broker acknowledged."""

    device_id: str
    broker: MosquittoServer
    base_ms: int
    acked: set[int] = field(default_factory=set)
    acked_at: dict[int, float] = field(default_factory=dict)
    #: (acknowledged at, seconds from publish to PUBACK) of every acknowledged message
    latencies: list[tuple[float, float]] = field(default_factory=list)
    next_seq: int = 0
    client: MqttClient | None = None

    async def connect(self) -> MqttClient:
        while True:
            client = MqttClient(
                self.broker.host,
                self.broker.port,
                client_id=self.device_id,
                username=self.device_id,
                password=device_password(FLEET_SECRET, self.device_id),
                connect_timeout_s=5.0,
            )
            try:
                await client.connect()
            except BrokerUnavailableError:
                await asyncio.sleep(0.1 + random.random() * 0.2)
                continue
            self.client = client
            return client

    async def publish(self, seq: int) -> None:
        client = self.client or await self.connect()
        topic = f"devices/{self.device_id}/telemetry"
        began = time.monotonic()
        try:
            async with asyncio.timeout(10):
                await client.publish(topic, payload(self.device_id, seq, self.base_ms), qos=1)
        except (BrokerUnavailableError, TimeoutError, PermanentError):
            if self.client is client:
                self.client = None
                client.abort()
            return
        self.acked.add(seq)
        now = self.acked_at[seq] = time.monotonic()
        self.latencies.append((now, now - began))

    async def run(
        self,
        rate: float,
        until: float,
        count: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Publish at ``rate`` msg/s until ``until`` (loop time), ``count`` messages or
        ``stop``."""
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(WINDOW)
        tasks: set[asyncio.Task[None]] = set()
        started = loop.time()
        sent = 0
        while (
            loop.time() < until
            and (count is None or sent < count)
            and (stop is None or not stop.is_set())
        ):
            if self.client is None:
                await self.connect()
            await window.acquire()
            seq = self.next_seq
            self.next_seq += 1
            task = asyncio.create_task(self.publish(seq))
            tasks.add(task)

            def done(finished: asyncio.Task[None]) -> None:
                tasks.discard(finished)
                window.release()

            task.add_done_callback(done)
            sent += 1
            if rate:
                delay = started + sent / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        if tasks:
            await asyncio.gather(*tasks)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(BrokerUnavailableError):
                await client.disconnect()


class Stack:
    """The servers and the gateway process of one benchmark run."""

    def __init__(self, root: Path, device_ids: list[str]) -> None:
        self.root = root
        self.broker = MosquittoServer(
            root / "mosquitto",
            users={GATEWAY_USER: GATEWAY_PASSWORD},
            device_ids=device_ids,
            fleet_secret=FLEET_SECRET,
            connection_messages=False,
        )
        self.influx = InfluxdServer(root / "influxd")
        self.metrics_port = free_port()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.spool_dir = root / "spool"
        self.gateway_env: dict[str, str] = {}

    def start_gateway(self, **settings: str) -> None:
        self.gateway_env = {f"FIXLOOP_GATEWAY__{k.upper()}": v for k, v in settings.items()}
        env = {
            **os.environ,
            "FIXLOOP_MQTT__HOST": self.broker.host,
            "FIXLOOP_MQTT__PORT": str(self.broker.port),
            "FIXLOOP_MQTT__USERNAME": GATEWAY_USER,
            "FIXLOOP_MQTT__PASSWORD": GATEWAY_PASSWORD,
            "FIXLOOP_INFLUX__URL": self.influx.url,
            "FIXLOOP_INFLUX__TIMEOUT_S": "2",
            "FIXLOOP_GATEWAY__SPOOL_DIR": str(self.spool_dir),
            "FIXLOOP_GATEWAY__METRICS_PORT": str(self.metrics_port),
            "FIXLOOP_GATEWAY__RETRY_MAX_S": "1",
            "FIXLOOP_GATEWAY__STALL_AFTER_S": "3",
            **self.gateway_env,
        }
        log = (self.root / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "fixloop", "--log-level", "WARNING", "gateway"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        gateway = self.gateway
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if gateway.poll() is not None:
                raise SystemExit(f"the gateway exited; see {self.root / 'gateway.log'}")
            with contextlib.suppress(OSError, ValueError):
                if self.health()[1].get("mqtt_connected"):
                    return
            time.sleep(0.05)
        raise SystemExit("the gateway did not connect")

    def kill_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.kill()
            self.gateway.wait()
            self.gateway = None

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(30)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
            self.gateway = None

    def health(self) -> tuple[int, dict[str, object]]:
        url = f"http://127.0.0.1:{self.metrics_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def stored(self, prefix: str) -> tuple[int, int, dict[str, set[int]]]:
        """(rows, distinct readings, device -> seqs) stored for devices under ``prefix``."""
        answer = self.influx.query(
            f"SELECT seq FROM telemetry WHERE device =~ /^{prefix}-/ GROUP BY device",
            database="fixloop",
        )
        seqs: dict[str, set[int]] = {}
        rows = 0
        for series in answer["results"][0].get("series") or []:
            values = [int(v[1]) for v in series["values"]]
            rows += len(values)
            seqs[series["tags"]["device"]] = set(values)
        return rows, sum(len(s) for s in seqs.values()), seqs

    def metric(self, name: str) -> float:
        """The gateway's ``fixloop_gateway_<name>`` summed over its labels (``/metrics``)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key.split("{", 1)[0] == f"fixloop_gateway_{name}":
                total += float(value)
        return total

    def count(self, prefix: str) -> int:
        answer = self.influx.query(
            f"SELECT COUNT(seq) FROM telemetry WHERE device =~ /^{prefix}-/",
            database="fixloop",
        )
        series = answer["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0


class Watch:
    """Polls ``/health`` during a scenario; remembers whether it was ever 503."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen_503 = False
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            if self.stack.gateway is not None:
                try:
                    status, _ = await asyncio.to_thread(self.stack.health)
                except (OSError, ValueError):
                    status = 0
                self.seen_503 |= status == 503
            await asyncio.sleep(0.25)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def drain(stack: Stack, prefix: str, devices: list[Device], lengths: Lengths) -> float:
    """Wait until every acknowledged reading is stored, or nothing changed for a while."""
    sent = sum(len(d.acked) for d in devices)
    started = time.monotonic()
    last, last_change = -1, started
    while time.monotonic() - started < lengths.drain_max_s:
        count = await asyncio.to_thread(stack.count, prefix)
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if count >= sent:
            _, _, seqs = await asyncio.to_thread(stack.stored, prefix)
            if all(d.acked <= seqs.get(d.device_id, set()) for d in devices):
                return now - started
        if now - last_change > lengths.settle_s:
            break
        await asyncio.sleep(0.2)
    return last_change - started


async def publish_all(devices: list[Device], rate: float, seconds: float) -> None:
    until = asyncio.get_running_loop().time() + seconds
    per_device = rate / len(devices)
    await asyncio.gather(*(d.run(per_device, until) for d in devices))


async def later(delay_s: float, action: Callable[[], Awaitable[None] | None]) -> None:
    await asyncio.sleep(delay_s)
    outcome = action()
    if outcome is not None:
        await outcome


async def in_thread(action: Callable[[], object]) -> None:
    await asyncio.to_thread(action)


def tally(
    stack: Stack,
    name: str,
    prefix: str,
    devices: list[Device],
    drain_s: float,
    watch: Watch,
    crash_at: float | None,
) -> Result:
    rows, distinct, seqs = stack.stored(prefix)
    sent = sum(len(d.acked) for d in devices)
    missing = [(d, d.acked - seqs.get(d.device_id, set())) for d in devices]
    lost = sum(len(m) for _, m in missing)
    result = Result(name, sent, distinct, lost, rows - distinct, round(drain_s, 1), watch.seen_503)
    if crash_at is not None:
        times = [d.acked_at[seq] for d, m in missing for seq in m]
        result.lost_window_s = round(crash_at - min(times, default=crash_at), 2)
        result.lost_after_restart = sum(1 for t in times if t > crash_at)
    return result


def flood_lines(device_id: str, seqs: range, base_ms: int) -> bytes:
    """:func:`payload` lines for ``seqs``, one per line, built without a JSON encoder."""
    head = f'{{"v":1,"id":"{device_id}","seq":'
    return "".join(
        f'{head}{seq},"ts":{base_ms + seq // 2},"metrics":{{"drum_rpm":{1200 + seq % 7}.0,'
        f'"water_temp_c":{40 + (seq % 100) / 10},"vibration_rms_g":'
        f'{round(0.1 + (seq % 13) / 100, 3)},"power_w":{1800 + seq % 50}.0,'
        f'"door_open":false}}}}\n'
        for seq in seqs
    ).encode()


def write_flood_lines(path: Path, device_id: str, seqs: range, base_ms: int) -> None:
    path.write_bytes(flood_lines(device_id, seqs, base_ms))


@dataclass(slots=True)
class Flood:
    """One device flooding the broker with QoS-1 telemetry, as fast as it takes it.

    The device publishes through ``mosquitto_pub -l`` processes (its user, a client id
    each), fed from files so no Python sits in the flood's path: the ramp doubles the
    processes (1, 2, 4 ...; each step sized to last ``flood_step_s`` at the rate of the
    step before) until the broker's acceptance rate rises by less than ``FLOOD_GAIN``;
    the flood then holds at the best count for ``flood_hold_s``. A process that exits 0
    had every line acknowledged (mosquitto_pub waits for the PUBACKs before it
    disconnects); one that fails counts nothing as sent.
    """

    device_id: str
    stack: Stack
    base_ms: int
    root: Path
    acked: set[int] = field(default_factory=set)
    next_seq: int = 0
    #: (processes, messages/s the broker acknowledged) of every step
    steps: list[tuple[int, float]] = field(default_factory=list)
    failed: int = 0
    held_s: float = 0.0
    #: whether the rate stopped rising before FLOOD_MAX_PROCS processes
    levelled: bool = False

    async def step(self, procs: int, lines: int) -> tuple[float, float]:
        """Publish ``lines`` per process from ``procs`` processes; (msg/s, seconds)."""
        broker = self.stack.broker
        password = device_password(FLEET_SECRET, self.device_id)
        ranges = [
            range(self.next_seq + k * lines, self.next_seq + (k + 1) * lines) for k in range(procs)
        ]
        self.next_seq += procs * lines
        files = []
        for k, seqs in enumerate(ranges):
            path = self.root / f"flood-{k}.txt"
            await asyncio.to_thread(write_flood_lines, path, self.device_id, seqs, self.base_ms)
            files.append(path)
        command = [
            "mosquitto_pub", "-h", broker.host, "-p", str(broker.port),
            "-u", self.device_id, "-P", password, "-t", f"devices/{self.device_id}/telemetry",
            "-q", "1", "-M", str(FLOOD_INFLIGHT), "-l",
        ]  # fmt: skip
        started = time.monotonic()
        running = []
        for k, path in enumerate(files):
            with path.open("rb") as lines_in:
                running.append(
                    await asyncio.create_subprocess_exec(
                        *command, "-i", f"{self.device_id}-p{k}", stdin=lines_in,
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                    )
                )  # fmt: skip
        codes = await asyncio.gather(*(proc.wait() for proc in running))
        took = time.monotonic() - started
        acked = 0
        for code, seqs in zip(codes, ranges, strict=True):
            if code == 0:
                self.acked.update(seqs)
                acked += len(seqs)
            else:
                self.failed += 1
        for path in files:
            path.unlink()
        return acked / took, took

    async def run(self, lengths: Lengths) -> None:
        """Ramp up to the broker's limit, then hold there."""
        best_rate, best_procs, procs, last_rate = 0.0, 1, 1, 0.0
        while procs <= FLOOD_MAX_PROCS:
            total = FLOOD_FIRST_LINES if not last_rate else last_rate * lengths.flood_step_s
            rate, _ = await self.step(procs, max(1, round(total / procs)))
            self.steps.append((procs, rate))
            last_rate = rate
            if rate < best_rate * FLOOD_GAIN:
                self.levelled = True
                if rate > best_rate:
                    best_rate, best_procs = rate, procs
                break
            best_rate, best_procs = rate, procs
            procs *= 2
        per_proc = max(1, round(best_rate * lengths.flood_hold_s / best_procs))
        rate, self.held_s = await self.step(best_procs, per_proc)
        self.steps.append((best_procs, rate))

    @property
    def limit(self) -> float:
        """The broker's acceptance rate for the flooder: the best step's."""
        return max((rate for _, rate in self.steps), default=0.0)


def p99_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


async def flood_scenario(
    stack: Stack, lengths: Lengths, devices: list[Device], base_ms: int
) -> tuple[Flood, str]:
    """A device floods at the broker's limit while the others publish at their pace."""
    flooder, others = devices[0], devices[1:]
    flood = Flood(flooder.device_id, stack, base_ms, stack.root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    per_device = lengths.rate / 2 / len(others)
    publishing = asyncio.gather(*(d.run(per_device, loop.time() + 600, stop=stop) for d in others))
    try:
        await asyncio.sleep(1.0)  # the others alone: their PUBACK latency without a flood
        flood_began = time.monotonic()
        await flood.run(lengths)
    finally:
        stop.set()
        await publishing
    alone = [lat for d in others for at, lat in d.latencies if at < flood_began]
    during = [lat for d in others for at, lat in d.latencies if at >= flood_began]
    steps = ", ".join(f"{procs}: {rate:,.0f}" for procs, rate in flood.steps)
    note = (
        f"(flood at the broker's limit, {flood.limit:,.0f} msg/s"
        + ("" if flood.levelled else f", still rising at {FLOOD_MAX_PROCS} processes")
        + f"; processes: msg/s {steps}; "
        f"held {flood.held_s:.1f} s; others' PUBACK p99 {p99_ms(alone):.0f} ms alone, "
        f"{p99_ms(during):.0f} ms in the flood)"
    )
    return flood, note


async def scenario(
    name: str, stack: Stack, lengths: Lengths, prefix: str, ids: list[str]
) -> Result:
    base_ms = int(time.time() * 1000) - 3_600_000
    devices = [Device(i, stack.broker, base_ms) for i in ids]
    rate, seconds = lengths.rate, lengths.publish_s
    note = ""
    mounted: Path | None = None
    crash_at: float | None = None

    def kill_broker() -> None:
        nonlocal crash_at
        crash_at = time.monotonic()
        stack.broker.kill()

    async with Watch(stack) as watch:
        if name == "gateway-kill":
            # kill -9 at three moments of the burst, each restarted half a second later.
            seconds *= 2

            async def kill_restart() -> None:
                loop = asyncio.get_running_loop()
                start = loop.time()
                for moment in (0.2, 0.5, 0.8):
                    await asyncio.sleep(max(0.0, start + seconds * moment - loop.time()))
                    await in_thread(stack.kill_gateway)
                    await asyncio.sleep(0.5)
                    await in_thread(stack.start_gateway)

            await asyncio.gather(publish_all(devices, rate, seconds), kill_restart())
        elif name == "broker-kill-gw-up":

            async def crash() -> None:
                await in_thread(kill_broker)
                await asyncio.sleep(2.0)
                await in_thread(stack.broker.start)

            await asyncio.gather(publish_all(devices, rate, seconds), later(seconds / 2, crash))
            note = f"(bound: {SAVE_BOUND_S:g} s of messages)"
        elif name in ("broker-kill-gw-down", "broker-kill-gw-down-at-once"):
            await in_thread(stack.kill_gateway)
            await publish_all(devices, rate, seconds)
            wait_s = SAVE_BOUND_S + 0.5 if name == "broker-kill-gw-down" else 0.0
            await asyncio.sleep(wait_s)
            await in_thread(kill_broker)
            await in_thread(stack.broker.start)
            await in_thread(stack.start_gateway)
            note = f"(broker killed {wait_s:g} s after the last ack; bound: {SAVE_BOUND_S:g} s)"
        elif name == "influxd-kill":
            await in_thread(stack.influx.kill)
            await publish_all(devices, rate, max(seconds, lengths.influx_down_s))
            await in_thread(stack.influx.start)
            note = f"(influxd down {max(seconds, lengths.influx_down_s):g} s)"
        elif name == "spool-full":
            mounted = await asyncio.to_thread(mount_small_spool, stack)
            await in_thread(stack.kill_gateway)
            if mounted is not None:
                stack.spool_dir = mounted
                await in_thread(stack.start_gateway)
                note = "(spool on a 1 MiB tmpfs)"
            else:
                await in_thread(lambda: stack.start_gateway(spool_max_bytes=str(2**20)))
                note = "(spool_max_bytes 1 MiB)"
            await in_thread(stack.influx.kill)
            # Enough to fill the spool several times over; the broker holds the rest.
            await publish_all(devices, rate * 3, max(seconds, lengths.influx_down_s))
            await asyncio.sleep(1.0)
            await in_thread(stack.influx.start)
        elif name == "slow-influx":
            # influxd frozen 0.8 s of every second: writes time out or crawl.
            pid = stack.influx.pid
            assert pid is not None

            async def freeze() -> None:
                loop = asyncio.get_running_loop()
                end = loop.time() + seconds
                while loop.time() < end:
                    os.kill(pid, signal.SIGSTOP)
                    await asyncio.sleep(0.8)
                    os.kill(pid, signal.SIGCONT)
                    await asyncio.sleep(0.2)

            try:
                await asyncio.gather(publish_all(devices, rate, seconds), freeze())
            finally:
                os.kill(pid, signal.SIGCONT)
        elif name == "flood":
            flood, note = await flood_scenario(stack, lengths, devices, base_ms)
            # the flooder's messages are told apart from the others' by its device id
            devices[0].acked = flood.acked
        elif name == "restart-storm":
            count = lengths.storm_messages

            async def round_of_all() -> None:
                await asyncio.gather(*(d.connect() for d in devices))
                until = asyncio.get_running_loop().time() + 60
                await asyncio.gather(*(d.run(0, until, count) for d in devices))

            await round_of_all()
            # Every device drops at once (no DISCONNECT, as a power cut), then all return.
            for device in devices:
                if device.client is not None:
                    device.client.abort()
                    device.client = None
            await round_of_all()
            note = f"({len(devices)} devices reconnecting at once)"
        for device in devices:
            await device.close()
        drain_s = await drain(stack, prefix, devices, lengths)
        result = tally(stack, name, prefix, devices, drain_s, watch, crash_at)
        if name == "flood":
            report = result.flood = await asyncio.to_thread(flood_report, stack, devices, flood)
            note += (
                f" flooder sent {report['flooder_sent']:,} lost {report['flooder_lost']:,};"
                f" others sent {report['others_sent']:,} lost {report['others_lost']:,};"
                f" broker dropped {report['broker_dropped']:,.0f},"
                f" gateway rejected {report['gateway_rejected']:,.0f}"
            )
    if mounted is not None:
        await in_thread(stack.stop_gateway)
        stack.spool_dir = stack.root / "spool"
        await asyncio.to_thread(unmount, mounted)
        await in_thread(stack.start_gateway)
    result.note = note
    return result


def flood_report(stack: Stack, devices: list[Device], flood: Flood) -> dict[str, object]:
    """What the flooder and the other devices got, and what the broker and gateway counted."""
    _, _, seqs = stack.stored(devices[0].device_id.rsplit("-", 1)[0])
    others = devices[1:]
    return {
        "limit_msg_s": round(flood.limit),
        "levelled": flood.levelled,
        "steps": flood.steps,
        "flooder_sent": len(flood.acked),
        "flooder_stored": len(seqs.get(flood.device_id, set())),
        "flooder_lost": len(flood.acked - seqs.get(flood.device_id, set())),
        "flooder_failed_processes": flood.failed,
        "others_sent": sum(len(d.acked) for d in others),
        "others_lost": sum(len(d.acked - seqs.get(d.device_id, set())) for d in others),
        # the broker's own count of messages it dropped (its $SYS, every 10 s), and what
        # the gateway refused: no per-device limit exists to count the flooder against
        "broker_dropped": stack.metric("broker_dropped_messages"),
        "gateway_rejected": stack.metric("rejected_total"),
    }


def mount_small_spool(stack: Stack) -> Path | None:
    """A 1 MiB tmpfs for the spool, or ``None`` when mounting is not permitted."""
    target = stack.root / "small-spool"
    target.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    return target if done.returncode == 0 else None


def unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True, check=False)


def device_ids(name: str, lengths: Lengths) -> list[str]:
    short = "".join(part[0] for part in name.split("-"))
    if name == "restart-storm":
        return [f"x-{short}-{i:04d}" for i in range(lengths.storm_devices)]
    if name == "flood":
        return [f"x-{short}-{i:04d}" for i in range(5)]  # the flooder and four others
    return [f"x-{short}-{i:04d}" for i in range(4)]


async def run(names: list[str], lengths: Lengths) -> list[Result]:
    plan = {name: device_ids(name, lengths) for name in names}
    every = [i for ids in plan.values() for i in ids]
    results = []
    with tempfile.TemporaryDirectory(prefix="fixloop-chaos-") as tmp:
        stack = Stack(Path(tmp), every)
        with stack.broker, stack.influx:
            try:
                await asyncio.to_thread(stack.start_gateway)
                # A session younger than the save bound is itself lost in a broker crash:
                # let the broker save the gateway's before anything fails.
                await asyncio.sleep(SAVE_BOUND_S + 0.5)
                for name, ids in plan.items():
                    prefix = ids[0].rsplit("-", 1)[0]
                    result = await scenario(name, stack, lengths, prefix, ids)
                    print(result.line(), flush=True)
                    results.append(result)
            finally:
                stack.stop_gateway()
                mounted = stack.root / "small-spool"
                if mounted.is_dir():
                    unmount(mounted)
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def save_cost(count: int) -> None:
    """Print what saving every second costs the broker with ``count`` messages queued.

    The gateway's session exists but the gateway is away, so the broker queues a burst
    for it (``mosquitto_pub -l`` at QoS 1, 25,000 lines each, as bench/ingest.py); its
    CPU over 10 s is then mostly the saves of the whole database.
    """
    chunk = 25_000
    ids = [f"x-sc-{k:04d}" for k in range(max(1, count // chunk))]
    with tempfile.TemporaryDirectory(prefix="fixloop-chaos-") as tmp:
        root = Path(tmp)
        stack = Stack(root, ids)
        with stack.broker, stack.influx:
            stack.start_gateway()
            stack.kill_gateway()
            broker = stack.broker
            assert broker.pid is not None
            before = cpu_seconds(broker.pid)
            time.sleep(10)
            idle = (cpu_seconds(broker.pid) - before) / 10
            base_ms = int(time.time() * 1000) - 3_600_000
            procs = []
            for device in ids:
                path = root / f"{device}.txt"
                with path.open("w") as out:
                    for seq in range(count // len(ids)):
                        out.write(payload(device, seq, base_ms).decode() + "\n")
                password = device_password(FLEET_SECRET, device)
                command = [
                    "mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-i", device,
                    "-u", device, "-P", password, "-t", f"devices/{device}/telemetry",
                    "-q", "1", "-l",
                ]  # fmt: skip
                with path.open("rb") as lines:
                    procs.append(subprocess.Popen(command, stdin=lines))
            for proc in procs:
                proc.wait()
            time.sleep(3)
            before = cpu_seconds(broker.pid)
            time.sleep(10)
            busy = (cpu_seconds(broker.pid) - before) / 10
            size_mb = (broker.data_dir / "mosquitto.db").stat().st_size / 1e6
    print(
        f"{count:,} messages queued: broker CPU {busy:.1%} of a core (idle: {idle:.1%}), "
        f"database {size_mb:.1f} MB written every save"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short scenarios (the tests')")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--save-cost", type=int, metavar="N", help="only measure saves with N messages queued"
    )
    args = parser.parse_args(argv)
    if args.save_cost:
        save_cost(args.save_cost)
        return 0
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    lengths = QUICK if args.quick else FULL
    results = asyncio.run(run(names, lengths))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    unexpected = [r for r in results if r.lost and r.scenario not in BROKER_CRASH]
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
