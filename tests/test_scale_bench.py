"""bench/scale.py in its smallest mode: it runs, its figures parse, nothing lost or doubled.

The bench starts its own servers (PostgreSQL, influxd, mosquitto) and the real fixloop
commands, kills one process of each stage mid-burst and prints its table; this test
keeps it from rotting by running 2 gateways, 2 diagnostics workers and 2 notifiers on
9 devices' two days and reading the printed row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parent.parent / "bench" / "scale.py"


def table(output: str) -> list[dict[str, float]]:
    """The rows of the printed figures, by column name (numbers without separators)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("size  sent"))
    names = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        values = line.split()
        assert len(values) == len(names), line
        rows.append(
            {name: float(value.replace(",", "")) for name, value in zip(names, values, strict=True)}
        )
    return rows


def test_the_smallest_scale_run_loses_nothing_and_doubles_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "2", "--devices", "9", "--days", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = table(done.stdout)
    assert row["size"] == 2
    assert row["sent"] > 10_000
    assert row["stored"] == row["sent"]
    assert row["lost"] == 0
    assert row["dup.stored"] == 0
    # the injected faults are each diagnosed, none twice, no healthy device
    assert row["faults"] == 4
    assert row["missed"] == 0
    assert row["opened-twice"] == 0
    assert row["false"] == 0
    assert row["opened"] >= row["faults"]
    # a case per faulty device, none without a diagnosis, every owner told, no message
    # kept twice
    assert row["faults"] <= row["cases"] <= row["opened"]
    assert row["untold"] == 0
    assert row["msgs"] >= row["cases"]
    assert row["msgs-twice"] == 0
    assert row["keys-twice"] == 0
    # every message pushed; again only if the killed notifier pushed it before it died
    # (the same message id: README, "Several notifiers")
    assert row["pushed"] >= row["msgs"]
    assert row["pushed-twice"] <= 1
    assert row["ingest/s"] > 0
    # one process of each stage was killed mid-burst, with SIGKILL
    kills = next(line for line in done.stdout.splitlines() if line.startswith("size 2 kills:"))
    assert kills.count("SIGKILLed") == 3
    assert "limit on" in done.stdout
