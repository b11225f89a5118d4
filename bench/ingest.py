"""Ingest benchmark: a burst of telemetry through the gateway into InfluxDB.

Fires a burst of telemetry lines with C clients (``mosquitto_pub -l``) at a running
gateway (its own process, as in production) and times until every point is in
InfluxDB: at QoS 0 from one ``mosquitto_pub -l``, and at QoS 1 split over parallel
``mosquitto_pub -l`` of 25,000 lines each (one long QoS-1 input makes mosquitto_pub
give up early). In the same run the broker's own pass-through is measured as the
reference: the same bursts to ``mosquitto_sub`` writing to /dev/null. Prints
stored/sent, msg/s and the ratio gateway/reference per QoS.

Usage::

    python bench/ingest.py                   # 200,000 messages per burst, 2 rounds
    python bench/ingest.py --messages 400000 --rounds 3
    python bench/ingest.py --profile /tmp/gw.prof   # cProfile the gateway, print top
    python bench/ingest.py --gateways 3      # 1, 2 and 3 gateways in one shared group

With ``--gateways N`` it runs 1, 2, ... N gateways in one MQTT 5 shared group (a
fresh broker for each count, each gateway its own process, instance and spool) and
measures two QoS-1 figures per count: a live burst (8 parallel ``mosquitto_pub``,
timed until every point is stored) and a backlog drain (the gateways stopped with
SIGSTOP while the burst is queued for them, timed from SIGCONT until every point is
stored: the gateways' own pace, without the publishers). Prints msg/s, the ratio to
one gateway and CPU per process.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer, MosquittoServer
from wire.protocol.credentials import device_password

FLEET_SECRET = "bench-fleet-secret-0123456789"
GATEWAY_PASSWORD = "bench-gateway-password"
REF_USER, REF_PASSWORD = "bench-reference", "bench-reference-password"
CHUNK = 25_000
#: Processes whose CPU use is reported per gateway run: where the time goes.
CPU_PIDS: dict[str, int | None] = {}


def write_lines(path: Path, device_id: str, count: int, base_ms: int) -> None:
    """Write ``count`` v1 telemetry payloads of one device, one per line."""
    with path.open("w") as out:
        for seq in range(count):
            body = {
                "v": 1,
                "id": device_id,
                "seq": seq,
                "ts": base_ms + seq,
                "metrics": {
                    "drum_rpm": float(1200 + seq % 7),
                    "water_temp_c": round(40 + (seq % 100) / 10, 1),
                    "vibration_rms_g": round(0.1 + (seq % 13) / 100, 3),
                    "power_w": float(1800 + seq % 50),
                    "door_open": False,
                },
                "status": "washing",
            }
            out.write(json.dumps(body, separators=(",", ":")) + "\n")


def pub_command(broker: MosquittoServer, device_id: str, qos: int, path: Path) -> str:
    return (
        f"mosquitto_pub -h {broker.host} -p {broker.port} -i {device_id} -u {device_id} "
        f"-P {device_password(FLEET_SECRET, device_id)} -t devices/{device_id}/telemetry "
        f"-q {qos} -l < {path}"
    )


def publish(broker: MosquittoServer, files: list[tuple[str, Path]], qos: int) -> float:
    """Run one mosquitto_pub per file in parallel; return the start time."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(pub_command(broker, device, qos, path), shell=True)
        for device, path in files
    ]
    for proc in procs:
        proc.wait()
    return started


def reference(
    broker: MosquittoServer, files: list[tuple[str, Path]], qos: int, count: int
) -> float:
    """Time the broker passing the burst to mosquitto_sub (to /dev/null); msg/s."""
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-u",
            REF_USER,
            "-P",
            REF_PASSWORD,
            "-i",
            f"ref-{qos}-{time.time_ns()}",
            "-q",
            str(qos),
            "-t",
            "devices/+/telemetry",
            "-C",
            str(count),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    cpu_before = cpu_seconds(broker.pid), cpu_seconds(sub.pid)
    started = publish(broker, files, qos)
    cpu_after = cpu_seconds(broker.pid), cpu_seconds(sub.pid)
    try:
        sub.wait(timeout=300)
    except subprocess.TimeoutExpired:
        sub.kill()
        print(f"  reference QoS {qos}: mosquitto_sub did not get all {count} messages")
        return float("nan")
    elapsed = time.perf_counter() - started
    print(
        f"  reference QoS {qos} CPU over {elapsed:.1f} s (until the last publisher ended): "
        f"broker {cpu_after[0] - cpu_before[0]:.1f} s, "
        f"mosquitto_sub {cpu_after[1] - cpu_before[1]:.1f} s",
        flush=True,
    )
    return count / elapsed


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics_value(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def count_points(influx: InfluxdServer, prefix: str) -> int:
    answer = influx.query(
        f"SELECT COUNT(seq) FROM telemetry WHERE device =~ /^{prefix}/", database="fixloop"
    )
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def through_gateway(
    broker: MosquittoServer,
    influx: InfluxdServer,
    metrics_port: int,
    files: list[tuple[str, Path]],
    qos: int,
    count: int,
    prefix: str,
) -> tuple[float, int]:
    """Time the burst until the gateway has stored every point; (msg/s, stored)."""
    before = metrics_value(metrics_port, "fixloop_gateway_stored_points_total")
    cpu_before = {name: cpu_seconds(pid) for name, pid in CPU_PIDS.items()}
    started = publish(broker, files, qos)
    published_s = time.perf_counter() - started
    deadline = time.perf_counter() + 600
    while metrics_value(metrics_port, "fixloop_gateway_stored_points_total") - before < count:
        if time.perf_counter() > deadline:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in CPU_PIDS.items()}
    print(
        f"  QoS {qos} publishers done at {published_s:.1f} s, all stored at {elapsed:.1f} s; CPU: "
        + ", ".join(
            f"{name} {seconds:.1f} s ({seconds / elapsed:.0%})" for name, seconds in used.items()
        ),
        flush=True,
    )
    return count / elapsed, count_points(influx, prefix)


def start_gateway(
    broker: MosquittoServer,
    influx: InfluxdServer,
    root: Path,
    metrics_port: int,
    profile: str | None,
    instance: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``fixloop gateway`` in its own process; return once it is connected.

    ``extra_env`` adds settings (for example ``FIXLOOP_GATEWAY__REPUBLISH_PARTITIONS``).
    """
    shared = (
        {"FIXLOOP_GATEWAY__SHARED_GROUP": "ingest", "FIXLOOP_GATEWAY__INSTANCE": instance}
        if instance
        else {}
    )
    env = {
        **os.environ,
        **shared,
        "FIXLOOP_MQTT__HOST": broker.host,
        "FIXLOOP_MQTT__PORT": str(broker.port),
        "FIXLOOP_MQTT__USERNAME": GATEWAY_USER,
        "FIXLOOP_MQTT__PASSWORD": GATEWAY_PASSWORD,
        "FIXLOOP_INFLUX__URL": influx.url,
        "FIXLOOP_GATEWAY__SPOOL_DIR": str(root / "spool"),
        "FIXLOOP_GATEWAY__METRICS_PORT": str(metrics_port),
        **(extra_env or {}),
    }
    command = [sys.executable]
    if profile and profile.endswith(".txt"):  # sampling profile, little overhead
        command = ["py-spy", "record", "--format", "raw", "-r", "250", "-o", profile, "--"]
        command += [sys.executable]
    elif profile:
        command += ["-m", "cProfile", "-o", profile]
    command += ["-m", "fixloop", "--log-level", "WARNING", "gateway"]
    proc = subprocess.Popen(command, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if metrics_value(metrics_port, "fixloop_gateway_mqtt_connected") == 1:
                time.sleep(0.5)
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per burst")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each measurement")
    parser.add_argument("--profile", help="cProfile the gateway into this file and print the top")
    parser.add_argument(
        "--gateways",
        type=int,
        default=0,
        help="measure 1..N gateways in one shared group instead (QoS 1 only)",
    )
    args = parser.parse_args()
    if args.gateways:
        scale(args.gateways, args.messages, args.rounds)
        return
    count = args.messages
    chunks = max(1, count // CHUNK)
    rounds = args.rounds
    q0_devices = [f"q0-{r}" for r in range(rounds)] + [f"r0-{r}" for r in range(rounds)]
    q1_devices = [f"q1-{r}-{k}" for r in range(rounds) for k in range(chunks)]
    q1_devices += [f"r1-{r}-{k}" for r in range(rounds) for k in range(chunks)]

    with tempfile.TemporaryDirectory(prefix="fixloop-bench-") as tmp:
        root = Path(tmp)
        base_ms = int(time.time() * 1000) - 86_400_000
        print(f"writing bursts of {count:,} messages ...", flush=True)
        burst: dict[str, list[tuple[str, Path]]] = {}
        for name in q0_devices:
            path = root / f"{name}.txt"
            write_lines(path, name, count, base_ms)
            burst[name] = [(name, path)]
        for r in range(rounds):
            for kind in ("q1", "r1"):
                files = []
                for k in range(chunks):
                    device = f"{kind}-{r}-{k}"
                    path = root / f"{device}.txt"
                    write_lines(path, device, count // chunks, base_ms)
                    files.append((device, path))
                burst[f"{kind}-{r}"] = files

        def make_broker(name: str) -> MosquittoServer:
            return MosquittoServer(
                root / name,
                users={GATEWAY_USER: GATEWAY_PASSWORD, REF_USER: REF_PASSWORD},
                device_ids=q0_devices + q1_devices,
                fleet_secret=FLEET_SECRET,
                max_queued_messages=count * 2,
                connection_messages=False,
            )

        # Two brokers of the same configuration: the reference bursts must not also
        # reach the gateway (it would ingest them and compete for the CPU).
        broker = make_broker("mosquitto")
        ref_broker = make_broker("mosquitto-reference")
        influx = InfluxdServer(root / "influxd")
        with broker, ref_broker, influx:
            metrics_port = _free_port()
            gateway = start_gateway(broker, influx, root, metrics_port, args.profile)
            gateway_pid = python_pid(gateway.pid)
            CPU_PIDS.update(gateway=gateway_pid, broker=broker.pid, influxd=influx.pid)
            results: dict[int, list[tuple[float, float, int]]] = {0: [], 1: []}
            try:
                for r in range(rounds):
                    for qos in (0, 1):
                        kind = f"r{qos}-{r}"
                        ref = reference(ref_broker, burst[kind], qos, count)
                        kind = f"q{qos}-{r}"
                        sent = count // chunks * chunks if qos else count
                        rate, stored = through_gateway(
                            broker, influx, metrics_port, burst[kind], qos, sent, kind
                        )
                        results[qos].append((rate, ref, stored))
                        print(
                            f"round {r + 1} QoS {qos}: gateway {rate:9,.0f} msg/s  "
                            f"reference {ref:9,.0f} msg/s  ratio {rate / ref:.2f}  "
                            f"stored/sent {stored:,}/{sent:,}",
                            flush=True,
                        )
            finally:
                os.kill(gateway_pid, signal.SIGTERM)  # under py-spy: the profiled child
                gateway.wait(60)
        print()
        print("QoS  sent      stored    stored/sent  gateway msg/s  reference msg/s  ratio")
        for qos in (0, 1):
            sent = count // chunks * chunks if qos else count
            best = max(results[qos], key=lambda item: item[0] / item[1])
            for rate, ref, stored in results[qos]:
                mark = "*" if (rate, ref, stored) == best else " "
                print(
                    f"{qos}{mark}   {sent:<9,} {stored:<9,} {stored / sent:<12.4f} "
                    f"{rate:<14,.0f} {ref:<16,.0f} {rate / ref:.2f}"
                )
        print("(* best ratio of the rounds; every round is shown)")
        if args.profile and args.profile.endswith(".txt"):
            print()
            print_collapsed(Path(args.profile))
        elif args.profile:
            print()
            stats = pstats.Stats(args.profile)
            stats.sort_stats("tottime").print_stats(18)


def scale(max_gateways: int, count: int, rounds: int) -> None:
    """1..max_gateways gateways in one shared group: live burst and backlog drain."""
    chunks = max(1, count // CHUNK)
    sent = count // chunks * chunks
    plan = [
        (n, r, mode)
        for n in range(1, max_gateways + 1)
        for r in range(rounds)
        for mode in ("live", "drain")
    ]
    device_ids = [f"s{n}-{r}-{mode}-{k}" for n, r, mode in plan for k in range(chunks)]
    with tempfile.TemporaryDirectory(prefix="fixloop-bench-") as tmp:
        root = Path(tmp)
        base_ms = int(time.time() * 1000) - 86_400_000
        print(f"writing {len(plan)} bursts of {sent:,} QoS-1 messages ...", flush=True)
        files: dict[tuple[int, int, str], list[tuple[str, Path]]] = {}
        for n, r, mode in plan:
            files[n, r, mode] = []
            for k in range(chunks):
                device = f"s{n}-{r}-{mode}-{k}"
                path = root / f"{device}.txt"
                write_lines(path, device, sent // chunks, base_ms)
                files[n, r, mode].append((device, path))
        influx = InfluxdServer(root / "influxd")
        results: dict[tuple[int, str], list[Burst]] = {}
        with influx:
            # Rounds outside, counts inside: the machine's drift (other work) spreads
            # over every count instead of favouring the first.
            for r in range(rounds):
                for n in range(1, max_gateways + 1):
                    # A fresh broker per run: a stopped gateway's persistent session
                    # would stay in the group and take its share (README, "Several
                    # gateways").
                    broker = MosquittoServer(
                        root / f"mosquitto-{n}-{r}",
                        users={GATEWAY_USER: GATEWAY_PASSWORD},
                        device_ids=device_ids,
                        fleet_secret=FLEET_SECRET,
                        max_queued_messages=count * 2,
                        connection_messages=False,
                    )
                    with broker:
                        ports = [_free_port() for _ in range(n)]
                        procs = [
                            start_gateway(
                                broker,
                                influx,
                                root / f"gw-{n}-{r}",
                                ports[i],
                                None,
                                instance=f"g{i}",
                            )
                            for i in range(n)
                        ]
                        try:
                            for mode in ("live", "drain"):
                                burst = scaled_burst(
                                    broker, influx, procs, ports, files[n, r, mode], sent, mode
                                )
                                results.setdefault((n, mode), []).append(burst)
                        finally:
                            for proc in procs:
                                proc.terminate()
                            for proc in procs:
                                proc.wait(60)
        print()
        print(f"CPU seconds per {sent:,} messages (mean of the rounds), ratio = mean msg/s")
        print("over the mean msg/s of one gateway")
        print("gateways  mode   msg/s per round          ratio  gateways  broker  influxd  all")
        for mode in ("live", "drain"):
            one = mean([b.rate for b in results[1, mode]])
            for n in range(1, max_gateways + 1):
                runs = results[n, mode]
                listed = ", ".join(f"{b.rate:,.0f}" for b in runs)
                gw = mean([b.gateways_cpu for b in runs])
                broker_cpu = mean([b.broker_cpu for b in runs])
                influx_cpu = mean([b.influxd_cpu for b in runs])
                print(
                    f"{n:<9} {mode:<6} {listed:<24} {mean([b.rate for b in runs]) / one:<6.2f} "
                    f"{gw:<9.2f} {broker_cpu:<7.2f} {influx_cpu:<8.2f} "
                    f"{gw + broker_cpu + influx_cpu:.2f}"
                )


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True, slots=True)
class Burst:
    """One burst through the group: msg/s and CPU seconds used meanwhile."""

    rate: float
    gateways_cpu: float
    broker_cpu: float
    influxd_cpu: float


def scaled_burst(
    broker: MosquittoServer,
    influx: InfluxdServer,
    procs: list[subprocess.Popen[bytes]],
    ports: list[int],
    files: list[tuple[str, Path]],
    sent: int,
    mode: str,
) -> Burst:
    """One QoS-1 burst through the group, timed from the start (live) or SIGCONT (drain)."""

    def stored() -> float:
        return sum(metrics_value(port, "fixloop_gateway_stored_points_total") for port in ports)

    before = stored()
    pids = {f"gateway {i}": proc.pid for i, proc in enumerate(procs)}
    pids.update(broker=broker.pid or 0, influxd=influx.pid or 0)
    if mode == "drain":
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        try:
            publish(broker, files, 1)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGCONT)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter() if mode == "drain" else publish(broker, files, 1)
    deadline = time.perf_counter() + 600
    while stored() - before < sent and time.perf_counter() < deadline:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    used = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    in_db = count_points(influx, files[0][0].rsplit("-", 1)[0] + "-")
    print(
        f"  {len(procs)} gateway(s) {mode}: {sent / elapsed:9,.0f} msg/s, {elapsed:.1f} s, "
        f"stored/sent {in_db:,}/{sent:,}; CPU: "
        + ", ".join(f"{name} {sec:.1f} s ({sec / elapsed:.0%})" for name, sec in used.items()),
        flush=True,
    )
    return Burst(
        rate=sent / elapsed,
        gateways_cpu=sum(sec for name, sec in used.items() if name.startswith("gateway")),
        broker_cpu=used["broker"],
        influxd_cpu=used["influxd"],
    )


def python_pid(pid: int) -> int:
    """The gateway's Python process: ``pid`` itself, or its child when run by py-spy."""
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if children or "py-spy" not in Path(f"/proc/{pid}/cmdline").read_text():
            return int(children[0]) if children else pid
        time.sleep(0.05)
    return pid


def print_collapsed(path: Path, top: int = 25) -> None:
    """Summarise a py-spy collapsed-stack file: share of samples per function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].split(":")[0] for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    print(f"gateway samples: {total}")
    print("own share  inclusive  function")
    for frame, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        print(f"{count / total:8.1%}  {inclusive[frame] / total:9.1%}  {frame}")


def _free_port() -> int:
    from fixloop.server import free_port

    return free_port()


if __name__ == "__main__":
    main()
