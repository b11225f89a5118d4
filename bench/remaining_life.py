"""Remaining-life benchmark: ``fixloop ttf`` on NASA's C-MAPSS FD001 turbofan histories.

Data: ``train_FD001.txt`` only (100 engines run to failure, one row per cycle: unit,
cycle, 3 operational settings, 21 sensors); the test and RUL files are not read.

How data is held out: the 100 units are split at random (``--seed``) into ``--folds``
folds. For each fold, the other folds' units are written to a history CSV and the fold's
units to an input CSV, and ``fixloop ttf`` runs on them (through ``fixloop.cli.main``,
the command itself, with ``--cap 125``). Each held-out unit's history is cut at
``--cuts`` random cycles (uniform over 1 .. its life - 1); each cut is a separate running
unit in the input file, holding only that unit's rows up to the cut. Everything the
command learns (which metrics to use, the normalisation, the health index, the model
settings, chosen by its own cross-validation over the history's units, and the band) is
learnt from the history file alone; no held-out row is seen before it is predicted.

Scored against the true remaining life capped at 125 cycles (the usual piecewise-linear
target): RMSE over all cuts, RMSE over the cuts whose true remaining life is under the
cap (the part where wear shows), the PHM08 score (late predictions cost more), band
coverage (share of truths inside ``[low, high]``, nominal 80 %) and mean band width. The
references in the same run: predicting every unit the mean capped remaining life of the
history's rows, and predicting from age alone (the mean capped remaining life of the
history's units that lived longer than the cut's age, 0 if none did), each with the
ratio of RMSEs.
The RMSE is also given by how many rows the cut holds (short partial histories). With
``--missing``, that share of metric cells is left empty at random in both files. The
goal: RMSE <= 13 cycles.

Published figures on FD001's separate test set (one cut per unit, chosen by NASA, a
different distribution of cuts than the uniform one here): SVR 21, CNN 18.5, deep LSTM
16.1, attention CNNs 11-12.5.

Usage::

    python bench/remaining_life.py                      # 5 folds, 10 cuts per unit
    python bench/remaining_life.py --folds 5 --cuts 10 --seed 0
    python bench/remaining_life.py --missing 0.1    # 10 % of metric cells left empty
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixloop.cli import main as fixloop_main

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmapss" / "train_FD001.txt"
CAP = 125.0
COLUMNS = [
    "unit",
    "cycle",
    *(f"setting_{i}" for i in range(1, 4)),
    *(f"sensor_{i}" for i in range(1, 22)),
]


def load(path: Path) -> dict[int, np.ndarray]:
    """Each unit's rows (cycle, settings, sensors), in cycle order."""
    table = np.loadtxt(path)
    units = {}
    for unit in np.unique(table[:, 0]).astype(int):
        rows = table[table[:, 0] == unit][:, 1:]
        units[int(unit)] = rows[np.argsort(rows[:, 0], kind="stable")]
    return units


def write_rows(
    path: Path, rows: list[tuple[str, np.ndarray]], missing: float, rng: np.random.Generator
) -> None:
    """Write units' rows; a ``missing`` share of metric cells, drawn at random, left empty."""
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(COLUMNS)
        for name, block in rows:
            shape = (block.shape[0], block.shape[1] - 1)
            blank = rng.random(shape) < missing if missing > 0 else np.zeros(shape, dtype=bool)
            for row, gaps in zip(block, blank, strict=True):
                cells = ["" if gap else f"{v:.6g}" for v, gap in zip(row[1:], gaps, strict=True)]
                writer.writerow([name, f"{row[0]:g}", *cells])


def age_only(lives: np.ndarray, age: float) -> float:
    """Mean capped remaining life of the units that lived past ``age`` (0 if none did)."""
    longer = lives[lives > age]
    return float(np.mean(np.minimum(longer - age, CAP))) if longer.size else 0.0


def phm08(error: np.ndarray) -> float:
    """PHM08 challenge score (lower is better): late predictions (d > 0) cost more."""
    return float(np.sum(np.where(error < 0, np.exp(-error / 13.0), np.exp(error / 10.0)) - 1.0))


def run(data: Path, folds: int, cuts: int, seed: int, missing: float = 0.0) -> int:
    units = load(data)
    names = sorted(units)
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(names, rng.permutation(len(names)) % folds, strict=True))
    gaps = np.random.default_rng([seed, 1])  # its own stream: cuts do not depend on --missing
    truth_all, pred_all, low_all, high_all, base_all, age_all = [], [], [], [], [], []
    lengths_all = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ttf-bench-") as tmp:
        folder = Path(tmp)
        for fold in range(folds):
            train = [u for u in names if fold_of[u] != fold]
            held = [u for u in names if fold_of[u] == fold]
            write_rows(folder / "hist.csv", [(str(u), units[u]) for u in train], missing, gaps)
            running, truth = [], {}
            for u in held:
                life = units[u].shape[0]
                for keep in sorted(rng.choice(np.arange(1, life), size=cuts, replace=False)):
                    name = f"{u}@{keep}"
                    running.append((name, units[u][:keep]))
                    truth[name] = min(float(units[u][-1, 0] - units[u][keep - 1, 0]), CAP)
            write_rows(folder / "in.csv", running, missing, gaps)
            out = folder / "out.csv"
            fold_start = time.perf_counter()
            code = fixloop_main(
                [
                    "--log-level", "WARNING", "ttf",
                    "--history", str(folder / "hist.csv"),
                    "--input", str(folder / "in.csv"),
                    "-o", str(out),
                    "--unit-column", "unit", "--time-column", "cycle",
                    "--cap", f"{CAP:g}",
                    "--progress",
                ]
            )  # fmt: skip
            if code != 0:
                print(f"fixloop ttf failed on fold {fold + 1} (exit {code})", file=sys.stderr)
                return code
            with out.open(encoding="utf-8") as stream:
                predicted = {r["unit"]: r for r in csv.DictReader(stream)}
            # reference: the history's mean capped remaining life, for every unit
            mean_rul = float(
                np.mean(
                    np.concatenate(
                        [np.minimum(units[u][-1, 0] - units[u][:, 0], CAP) for u in train]
                    )
                )
            )
            lengths_all.append(np.array([int(n.split("@")[1]) for n in truth]))
            fold_truth = np.array([truth[n] for n in truth])
            fold_pred = np.array([float(predicted[n]["remaining"]) for n in truth])
            truth_all.append(fold_truth)
            pred_all.append(fold_pred)
            low_all.append(np.array([float(predicted[n]["low"]) for n in truth]))
            high_all.append(np.array([float(predicted[n]["high"]) for n in truth]))
            base_all.append(np.full(len(truth), mean_rul))
            # reference: age only (the mean capped remaining life of the history's units
            # that lived longer than this cut's age)
            lives = np.array([units[u][-1, 0] for u in train])
            ages = [units[int(n.split("@")[0])][int(n.split("@")[1]) - 1, 0] for n in truth]
            age_all.append(np.array([age_only(lives, a) for a in ages]))
            rmse = math.sqrt(float(np.mean((fold_pred - fold_truth) ** 2)))
            print(
                f"fold {fold + 1}/{folds}: {len(train)} histories, {len(truth)} cuts of"
                f" {len(held)} units, RMSE {rmse:.2f}, {time.perf_counter() - fold_start:.0f} s",
                flush=True,
            )
    truth_v = np.concatenate(truth_all)
    pred_v = np.concatenate(pred_all)
    low_v, high_v = np.concatenate(low_all), np.concatenate(high_all)
    base_v = np.concatenate(base_all)
    age_v = np.concatenate(age_all)
    error = pred_v - truth_v
    rmse = math.sqrt(float(np.mean(error**2)))
    base_rmse = math.sqrt(float(np.mean((base_v - truth_v) ** 2)))
    wearing = truth_v < CAP
    rmse_wearing = math.sqrt(float(np.mean(error[wearing] ** 2)))
    base_wearing = math.sqrt(float(np.mean((base_v - truth_v)[wearing] ** 2)))
    age_rmse = math.sqrt(float(np.mean((age_v - truth_v) ** 2)))
    age_wearing = math.sqrt(float(np.mean((age_v - truth_v)[wearing] ** 2)))
    coverage = float(np.mean((low_v <= truth_v) & (truth_v <= high_v)))
    width = float(np.mean(high_v - low_v))
    print()
    print(
        f"C-MAPSS FD001 train file, {folds}-fold cross-validation over units, seed {seed},"
        f" {missing:.0%} of metric cells missing"
    )
    print(f"cuts scored: {truth_v.size} ({int(wearing.sum())} with true remaining < {CAP:g})")
    print(f"{'':28}{'fixloop ttf':>12}{'mean RUL':>10}{'ratio':>8}{'age only':>10}{'ratio':>8}")
    for label, ours, base, age in (
        ("RMSE, all cuts", rmse, base_rmse, age_rmse),
        ("RMSE, true RUL < 125", rmse_wearing, base_wearing, age_wearing),
    ):
        print(f"{label:28}{ours:12.2f}{base:10.2f}{ours / base:8.2f}{age:10.2f}{ours / age:8.2f}")
    lengths = np.concatenate(lengths_all)
    for label, lo, hi in (("1-10", 1, 10), ("11-50", 11, 50), ("over 50", 51, 10**9)):
        part = (lengths >= lo) & (lengths <= hi)
        if part.any():
            part_rmse = math.sqrt(float(np.mean(error[part] ** 2)))
            print(
                f"{'RMSE, ' + label + ' rows given':28}{part_rmse:12.2f}   ({int(part.sum())} cuts)"
            )
    print(f"{'PHM08 score per cut':28}{phm08(error) / error.size:12.2f}")
    print(f"{'band coverage (80 % band)':28}{coverage:12.1%}")
    print(f"{'mean band width (cycles)':28}{width:12.1f}")
    print(f"goal RMSE <= 13: {'met' if rmse <= 13 else 'NOT met'}")
    print(f"time: {time.perf_counter() - started:.0f} s")
    print(
        f"reproduce: python bench/remaining_life.py --folds {folds} --cuts {cuts} --seed {seed}"
        + (f" --missing {missing:g}" if missing else "")
    )
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="train_FD001.txt")
    parser.add_argument("--folds", type=int, default=5, help="folds over units (5)")
    parser.add_argument("--cuts", type=int, default=10, help="random cuts per held-out unit (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and cuts (0)")
    parser.add_argument(
        "--missing",
        type=float,
        default=0.0,
        help="share of metric cells left empty at random in both files (0)",
    )
    args = parser.parse_args()
    return run(args.data, args.folds, args.cuts, args.seed, args.missing)


if __name__ == "__main__":
    sys.exit(cli())
