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
    """Health models on the simulated fleet (device_sim faults as ground truth)."""
    print("simulated fleet: not measured yet")


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
