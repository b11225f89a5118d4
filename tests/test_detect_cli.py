"""``fixloop detect``: a CSV time series in, the same rows out with anomaly scores.

Synthetic files only: irregular timestamps with a gap, a constant column, a text column,
``;`` with decimal commas, stdout output, and one clear line for every refusal.
"""

from __future__ import annotations

import csv
import io
import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from diagnostics.csvdetect import detect_csv
from fixloop.cli import main

WARMUP = 120


@pytest.fixture(autouse=True)
def _no_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fixloop.toml from the developer's folder


def pump_rows(n: int = 550, shift_at: int = 250, seed: int = 2) -> list[list[str]]:
    """Rows of a pump log: time, flow, temperature, constant voltage, a status word."""
    rng = np.random.default_rng(seed)
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    rows, t = [], 0.0
    temperature = 40.0
    for i in range(n):
        t += float(rng.choice([1.0, 1.0, 2.0]))
        if i == 200:
            t += 900.0  # fifteen minutes offline
        temperature += float(rng.normal(0, 0.03))
        flow = 12.0 + float(rng.normal(0, 0.2)) - (1.0 if shift_at <= i < shift_at + 80 else 0.0)
        stamp = (start + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append([stamp, f"{flow:.3f}", f"{temperature:.3f}", "230", "running"])
    return rows


def write_csv(path: Path, rows: list[list[str]], sep: str = ",") -> Path:
    header = ["time", "flow_l_min", "water_temp_c", "voltage_v", "status"]
    lines = [sep.join(header)] + [sep.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_output(text: str, sep: str = ",") -> tuple[list[str], list[list[str]]]:
    table = list(csv.reader(io.StringIO(text), delimiter=sep))
    return table[0], table[1:]


def test_round_trip_keeps_rows_and_adds_scores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_csv(tmp_path / "pump.csv", pump_rows())
    out = tmp_path / "scored.csv"
    caplog.set_level(logging.INFO)
    assert main(["detect", str(source), "-o", str(out), "--warmup-rows", str(WARMUP)]) == 0

    in_lines = source.read_text().splitlines()
    out_lines = out.read_text().splitlines()
    assert len(out_lines) == len(in_lines)
    for original, scored in zip(in_lines, out_lines, strict=True):
        assert scored.startswith(original + ",")  # the row itself is untouched
    header, rows = read_output(out.read_text())
    assert header[-2:] == ["anomaly_score", "anomaly"]
    scores = np.array([float(row[-2]) for row in rows])
    flags = np.array([int(row[-1]) for row in rows])
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_array_equal(flags, (scores >= 0.5).astype(int))
    assert np.all(scores[:WARMUP] == 0)
    assert flags[250:330].mean() > 0.8  # the flow drop
    assert flags[WARMUP:250].mean() < 0.05  # the gap at row 200 is no alarm
    assert flags[-50:].mean() < 0.3  # and the alarm mostly ends some time after it
    assert scores[-50:].max() < 0.75 < scores[260:330].min()
    assert "not numeric: status" in caplog.text
    assert "not scored: voltage_v" in caplog.text


def test_semicolons_and_decimal_commas(tmp_path: Path) -> None:
    rows = [[row[0], row[1].replace(".", ","), *row[2:]] for row in pump_rows()]
    source = write_csv(tmp_path / "pump.csv", rows, sep=";")
    out = tmp_path / "scored.csv"
    summary = detect_csv(source, out, warmup_rows=WARMUP)
    assert summary.columns == ("flow_l_min", "water_temp_c", "voltage_v")
    assert summary.timestamp_column == "time"
    header, scored = read_output(out.read_text(), sep=";")
    assert header[-2:] == ["anomaly_score", "anomaly"]
    assert scored[0][1] == rows[0][1]  # "12,xxx" kept as written
    assert summary.anomalies == sum(int(row[-1]) for row in scored) > 0


def test_stdout_when_no_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "pump.csv", pump_rows(n=200))
    assert main(["detect", str(source), "--warmup-rows", str(WARMUP)]) == 0
    captured = capsys.readouterr()
    header, rows = read_output(captured.out)
    assert header[-1] == "anomaly"
    assert len(rows) == 200
    assert "rows," not in captured.err  # no progress lines into a pipe by default


def test_numeric_timestamp_column_and_progress(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["t_s,a,b"] + [
        f"{1000 + 2 * i},{rng.normal():.4f},{100 + rng.normal():.4f}" for i in range(300)
    ]
    source = tmp_path / "plain.csv"
    source.write_text("\n".join(lines) + "\n")
    progress = io.StringIO()
    sink = io.StringIO()
    summary = detect_csv(source, sink, timestamp_column="t_s", warmup_rows=100, progress=progress)
    assert summary.columns == ("a", "b")
    assert summary.rows == 300
    assert sink.getvalue().splitlines()[1].startswith(lines[1] + ",")


def test_the_command_runs_as_a_program(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "pump.csv", pump_rows(n=150))
    done = subprocess.run(
        [sys.executable, "-m", "fixloop", "detect", str(source), "--warmup-rows", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith(",anomaly_score,anomaly")
    assert len(done.stdout.splitlines()) == 151


def refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["detect", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line
    return err[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refusal(capsys, str(tmp_path / "nope.csv"))
    assert line == f"fixloop: error: input file not found: {tmp_path / 'nope.csv'}"


def test_empty_file_and_header_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert refusal(capsys, str(empty)).endswith("empty.csv is empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("time,flow\n")
    assert "has a header but no data rows" in refusal(capsys, str(header_only))


def test_no_numeric_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "words.csv"
    source.write_text("time,status\n2024-01-01T00:00:00,ok\n2024-01-01T00:00:01,ok\n")
    assert "no numeric column to watch (columns: time, status)" in refusal(capsys, str(source))


def test_unparsable_timestamp_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = pump_rows(n=300)
    rows[250][0] = "yesterday"
    source = write_csv(tmp_path / "pump.csv", rows)
    out = tmp_path / "scored.csv"
    line = refusal(capsys, str(source), "-o", str(out))
    assert "line 252: cannot read timestamp 'yesterday' in column 'time'" in line
    assert not out.exists()  # no half-written output left behind
    assert list(tmp_path.glob(".scored.csv.*")) == []


def test_time_going_back_is_refused_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = pump_rows(n=300)
    rows[149], rows[150] = rows[150], rows[149]
    source = write_csv(tmp_path / "pump.csv", rows)
    line = refusal(capsys, str(source), "-o", str(tmp_path / "out.csv"))
    assert "line 152: timestamp" in line
    assert "earlier than line 151's" in line


def test_unknown_timestamp_column_and_ragged_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "pump.csv", pump_rows(n=50))
    line = refusal(capsys, str(source), "--timestamp-column", "when")
    assert "has no column 'when'" in line
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3\n")
    assert "line 3: 1 fields where the header has 2" in refusal(capsys, str(ragged))
