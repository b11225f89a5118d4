"""Health-model benchmark: the streaming anomaly detector on SKAB, and the simulated fleet.

SKAB part (Skoltech Anomaly Benchmark, a water-pump test bed: 8 sensors at 1 Hz, 34
labelled files with valve closures, leaks, cavitation ...), with SKAB's own outlier
protocol: in each file the first 400 rows are the training part (the detector's warm-up,
labels unused) and the rest is the test part. Point-wise F1, FAR (false-alarm rate,
FP / (FP + TN)) and MAR (missed-alarm rate, FN / (FN + TP)) are pooled over every test
point, at the detector's own operating threshold (calibrated on the training part only).
In the same run an sklearn IsolationForest is measured as the reference: fitted on each
file's training part, alarmed above the 99th percentile of its own training scores.
Published leaderboard figures are printed beside them (not measured here). Also prints
the detector's scoring throughput (rows/s, warm-up fitting included).

The data (GPL-3.0) is read from ``shared/datasets/skab/`` and never copied.

Usage::

    python bench/diagnostics.py                  # --part all
    python bench/diagnostics.py --part skab --data /path/to/skab --per-file
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diagnostics.stream import StreamConfig, StreamDetector

DEFAULT_SKAB = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "skab"
TRAIN_ROWS = 400
SKAB_FOLDERS = ("valve1", "valve2", "other")
NOT_SENSORS = frozenset({"datetime", "anomaly", "changepoint"})
#: Published outlier-detection results (SKAB README leaderboard): F1, FAR %, MAR %.
LEADERBOARD = (
    ("Conv-AE (published)", 0.78, 13.55, 28.02),
    ("MSET (published)", 0.78, 39.73, 14.13),
    ("Isolation forest (published)", 0.29, None, None),
)


@dataclass(frozen=True, slots=True)
class SkabFile:
    name: str
    seconds: np.ndarray
    values: np.ndarray
    labels: np.ndarray


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, alarms: np.ndarray, labels: np.ndarray) -> None:
        self.tp += int(np.sum(alarms & labels))
        self.fp += int(np.sum(alarms & ~labels))
        self.fn += int(np.sum(~alarms & labels))
        self.tn += int(np.sum(~alarms & ~labels))

    def f1(self) -> float:
        return 2 * self.tp / max(1, 2 * self.tp + self.fp + self.fn)

    def far(self) -> float:
        return self.fp / max(1, self.fp + self.tn)

    def mar(self) -> float:
        return self.fn / max(1, self.fn + self.tp)


def load_skab(root: Path) -> list[SkabFile]:
    """Read the 34 labelled files: sensor columns, seconds, point labels."""
    files = []
    for folder in SKAB_FOLDERS:
        paths = sorted((root / folder).glob("*.csv"), key=lambda p: int(p.stem))
        for path in paths:
            with path.open(newline="") as handle:
                reader = csv.reader(handle, delimiter=";")
                header = next(reader)
                rows = [row for row in reader if row]
            sensors = [i for i, name in enumerate(header) if name not in NOT_SENSORS]
            label = header.index("anomaly")
            seconds = np.array(
                [datetime.fromisoformat(row[0]).replace(tzinfo=UTC).timestamp() for row in rows]
            )
            values = np.array([[float(row[i]) for i in sensors] for row in rows])
            labels = np.array([float(row[label]) > 0 for row in rows])
            files.append(SkabFile(f"{folder}/{path.name}", seconds, values, labels))
    return files


def isolation_forest_alarms(values: np.ndarray, seed: int) -> np.ndarray:
    """Reference: IsolationForest fitted on the training part, 99th-percentile threshold."""
    from sklearn.ensemble import IsolationForest

    model = IsolationForest(random_state=seed).fit(values[:TRAIN_ROWS])
    scores = -model.score_samples(values)  # higher = more anomalous
    return scores > np.quantile(scores[:TRAIN_ROWS], 0.99)


def skab(root: Path, per_file: bool = False, seed: int = 0) -> dict[str, Counts]:
    """Measure the detector and the IsolationForest reference on SKAB; print the table."""
    if not root.is_dir():
        print(f"SKAB: data not found at {root} (--data PATH)")
        return {}
    files = load_skab(root)
    test_rows = sum(len(f.labels) - TRAIN_ROWS for f in files)
    anomalous = sum(int(f.labels[TRAIN_ROWS:].sum()) for f in files)
    print(f"SKAB: {len(files)} files, {test_rows} test rows, {anomalous} anomalous")
    ours, forest = Counts(), Counts()
    scored_rows, scoring_s = 0, 0.0
    config = StreamConfig(warmup_rows=TRAIN_ROWS)
    for item in files:
        detector = StreamDetector(config)
        started = time.perf_counter()
        scores = detector.score_stream(item.values, item.seconds)
        scoring_s += time.perf_counter() - started
        scored_rows += len(scores)
        truth = item.labels[TRAIN_ROWS:]
        alarms = scores[TRAIN_ROWS:] >= detector.threshold
        ours.add(alarms, truth)
        forest.add(isolation_forest_alarms(item.values, seed)[TRAIN_ROWS:], truth)
        if per_file:
            one = Counts()
            one.add(alarms, truth)
            print(
                f"  {item.name:<15} F1 {one.f1():.2f}  FP {one.fp:4d}  FN {one.fn:4d}"
                f"  TP {one.tp:4d}  TN {one.tn:4d}"
            )
    print(f"\n{'model':<34}{'F1':>6}{'FAR %':>9}{'MAR %':>9}")
    for name, counts in (
        ("StreamDetector (measured)", ours),
        ("IsolationForest (measured)", forest),
    ):
        print(f"{name:<34}{counts.f1():>6.2f}{counts.far() * 100:>9.2f}{counts.mar() * 100:>9.2f}")
    for name, f1, far, mar in LEADERBOARD:
        far_text = f"{far:>9.2f}" if far is not None else f"{'-':>9}"
        mar_text = f"{mar:>9.2f}" if mar is not None else f"{'-':>9}"
        print(f"{name:<34}{f1:>6.2f}{far_text}{mar_text}")
    print(f"\nStreamDetector throughput: {scored_rows / scoring_s:,.0f} rows/s (one core)")
    return {"stream": ours, "isolation_forest": forest}


def simulated_fleet() -> None:
    """Health models on the simulated fleet (device_sim faults as ground truth).

    A healthy training fleet first (its sampled feature levels fit the fleet models,
    saved and loaded back), then an evaluation fleet of other devices with one fault
    injected into a share of them at a random onset after a warm-up. Size from the
    environment: ``SIM_DEVICES`` (90), ``SIM_DAYS`` (30), ``SIM_TRAIN_DEVICES`` (60),
    ``SIM_TRAIN_DAYS`` (7), ``SIM_FAULTY_SHARE`` (0.5), ``SIM_INTERVAL_S`` (60),
    ``SIM_SEED`` (7); e.g. ``SIM_DEVICES=300`` for the full fleet-month.
    """
    import os
    import random
    import tempfile
    from datetime import timedelta

    from device_sim import FAULTS, Fleet, faults_for_model
    from diagnostics.engine import DiagnosticsEngine

    env = os.environ.get
    devices = int(env("SIM_DEVICES", "90"))
    days = float(env("SIM_DAYS", "30"))
    train_devices = int(env("SIM_TRAIN_DEVICES", "60"))
    train_days = float(env("SIM_TRAIN_DAYS", "7"))
    share = float(env("SIM_FAULTY_SHARE", "0.5"))
    interval_s = float(env("SIM_INTERVAL_S", "60"))
    seed = int(env("SIM_SEED", "7"))
    warmup_days = 3.0
    start = datetime(2025, 1, 6, tzinfo=UTC)
    print(
        f"simulated fleet: train {train_devices} healthy devices x {train_days:g} days, "
        f"evaluate {devices} devices x {days:g} days at {interval_s:g} s"
    )

    # -- training on a separate healthy fleet -------------------------------------------
    trainer = DiagnosticsEngine(collect_training=0.02, seed=seed)
    train_fleet = Fleet(train_devices, start=start, seed=seed + 10_000, interval_s=interval_s)
    t0 = time.perf_counter()
    _sim_run(train_fleet, trainer, start + timedelta(days=train_days), None)
    fit_t = time.perf_counter()
    fitted = trainer.fit_fleet_models(seed=seed)
    print(
        f"  training: {time.perf_counter() - t0:.0f} s (fit {time.perf_counter() - fit_t:.1f} s), "
        + ", ".join(f"{m} {f.rows} rows" for m, f in fitted.items())
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.pkl"
        trainer.save(path)
        engine = DiagnosticsEngine.load(path)

    # -- evaluation fleet with injected faults -------------------------------------------
    fleet = Fleet(devices, start=start, seed=seed, interval_s=interval_s)
    rng = random.Random(seed)
    end = start + timedelta(days=days)
    for device in fleet.devices:
        if rng.random() >= share:
            continue
        onset = start + timedelta(days=rng.uniform(warmup_days, days - 1.0))
        left_days = (end - onset).total_seconds() / 86_400
        choices = [
            f
            for f in faults_for_model(device.model)
            if not FAULTS[f].gradual or FAULTS[f].min_days <= left_days
        ]
        fault = rng.choice(choices)
        spec = FAULTS[fault]
        duration = None
        if spec.gradual:
            # failure inside the window, so lead time is measurable
            duration = timedelta(days=rng.uniform(spec.min_days, min(spec.max_days, left_days)))
        fleet.inject(device.device_id, fault, at=onset, duration_to_failure=duration)
    opened: dict[str, list[tuple[int, str]]] = {}
    elapsed, readings = _sim_run(fleet, engine, end, opened)
    truth = fleet.ground_truth()
    _sim_report(fleet, engine, truth, opened, start, end, elapsed, readings)


def _sim_run(fleet, engine, until, opened):  # type: ignore[no-untyped-def]
    """Stream the fleet into the engine; return engine seconds and readings scored."""
    from gateway.protocol import decode_event, decode_reading

    elapsed = 0.0
    readings = 0
    for batch in fleet.iter_until(until):
        items = []
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
        t = time.perf_counter()
        result = engine.process(items)
        elapsed += time.perf_counter() - t
        readings += len(result.scores)
        if opened is not None:
            for d in result.diagnoses:
                if d.status == "open":
                    ts_ms = round(d.updated_at.timestamp() * 1000)
                    opened.setdefault(d.device_id, []).append((ts_ms, d.fault))
    return elapsed, readings


def _sim_report(fleet, engine, truth, opened, start, end, elapsed, readings):  # type: ignore[no-untyped-def]
    """Print recall, false alarms, lead time, right fault, throughput and state size."""
    end_ms = round(end.timestamp() * 1000)
    start_ms = round(start.timestamp() * 1000)
    onset_of = {r.device_id: round(r.onset.timestamp() * 1000) for r in truth}
    false_alarms = 0
    healthy_ms = 0
    for device_id in fleet.device_ids:
        onset = onset_of.get(device_id, end_ms)
        healthy_ms += onset - start_ms
        false_alarms += sum(1 for ts, _ in opened.get(device_id, []) if ts < onset)
    healthy_days = healthy_ms / 86_400_000
    detected = 0
    before_failure = 0
    right = 0
    leads: list[float] = []
    per_fault: dict[str, list[int]] = {}
    for r in truth:
        onset = round(r.onset.timestamp() * 1000)
        failure = None if r.failure_at is None else round(r.failure_at.timestamp() * 1000)
        hits = [(ts, f) for ts, f in opened.get(r.device_id, []) if ts >= onset]
        row = per_fault.setdefault(r.fault, [0, 0, 0])
        row[0] += 1
        if not hits:
            continue
        detected += 1
        row[1] += 1
        first_ts, first_fault = hits[0]
        named = [f for _, f in hits]
        if first_fault == r.fault or (first_fault == "unknown" and r.fault in named):
            right += 1
            row[2] += 1
        if failure is not None and first_ts <= failure:
            before_failure += 1
            leads.append((failure - first_ts) / (failure - onset))
        elif failure is None:
            before_failure += 1
    n = max(len(truth), 1)
    print(f"  faults injected: {len(truth)} on {fleet.devices.__len__()} devices")
    print(f"  recall (any diagnosis after onset): {detected / n:.1%} ({detected}/{len(truth)})")
    print(f"  recall before failure:              {before_failure / n:.1%}")
    print(
        f"  false alarms: {false_alarms} in {healthy_days:.0f} healthy device-days = "
        f"{1000 * false_alarms / max(healthy_days, 1e-9):.2f} per 1,000 device-days"
    )
    if leads:
        print(
            f"  lead time before failure, share of degradation: median {np.median(leads):.0%} "
            f"(p25 {np.percentile(leads, 25):.0%}, n={len(leads)} gradual faults)"
        )
    print(f"  right fault named first: {right / max(detected, 1):.1%} ({right}/{detected})")
    for fault, (count, hit, ok) in sorted(per_fault.items()):
        print(f"    {fault:17s} injected {count:3d} detected {hit:3d} named right {ok:3d}")
    per_device = engine.state_bytes() / max(engine.devices, 1)
    print(
        f"  throughput: {readings / elapsed:,.0f} device updates/s on one core "
        f"({readings:,} readings in {elapsed:.1f} s of engine time)"
    )
    print(
        f"  state: {per_device:,.0f} bytes per device -> "
        f"{per_device * 1e6 / 2**30:.2f} GiB for 1M devices"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["skab", "sim", "all"], default="all")
    parser.add_argument("--data", type=Path, default=DEFAULT_SKAB, help="SKAB data folder")
    parser.add_argument("--per-file", action="store_true", help="SKAB figures per file")
    parser.add_argument("--seed", type=int, default=0, help="IsolationForest seed")
    args = parser.parse_args()
    if args.part in {"skab", "all"}:
        skab(args.data, per_file=args.per_file, seed=args.seed)
    if args.part in {"sim", "all"}:
        simulated_fleet()


if __name__ == "__main__":
    main()
