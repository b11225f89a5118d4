"""``fixloop detect``: a CSV time series in, the same rows out with anomaly scores.

Synthetic files only: irregular timestamps with a gap, a constant column, a text column,
``;`` with decimal commas, stdout output, one clear line for every refusal (a file that
cannot be read as CSV), and no refusal over data quality (times going back or unreadable,
a flat start, leading zeros): those are counted warnings.
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

from diagnostics.csvdetect import OPERATING_POINT, detect_csv
from fixloop.cli import main

WARMUP = 120
THRESHOLD = OPERATING_POINT


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
    # the flag marks alert events, and the score crosses the threshold exactly there
    np.testing.assert_array_equal(flags, (scores >= THRESHOLD).astype(int))
    assert flags[:WARMUP].sum() == 0  # no alert before the warm-up rows
    assert scores[20:WARMUP].max() > 0  # but rows are scored from the first tens on
    assert flags[250:270].sum() == 1  # the flow drop is one event, raised at once
    assert flags[WARMUP:250].sum() == 0  # the gap at row 200 is no alarm
    assert flags[270:].sum() <= 1  # the drop's end, at most, and nothing else
    assert "not numeric: status" in caplog.text
    assert "not scored: voltage_v" in caplog.text
    assert scores[250:270].max() >= 0.5 > scores[WARMUP:250].max()


def test_the_score_column_is_the_tail_probability_on_a_log_scale() -> None:
    from diagnostics.csvdetect import surprise

    alpha = 1e-3
    tails = np.array([1.0, 0.1, alpha, alpha**2, 1e-300])
    np.testing.assert_allclose(surprise(1.0 - tails, alpha), [0.0, 1 / 6, 0.5, 1.0, 1.0])
    assert f"{surprise(np.zeros(1), alpha)[0]:.6f}" == "0.000000"  # never "-0.000000"


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
    assert summary.not_scored == ("voltage_v",)


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


def test_unreadable_timestamp_is_counted_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = pump_rows(n=300)
    rows[250][0] = "yesterday"
    source = write_csv(tmp_path / "pump.csv", rows)
    out = tmp_path / "scored.csv"
    assert main(["detect", str(source), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 301
    assert "1 cells in column 'time' were not times" in caplog.text


def test_time_going_back_is_scored_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = pump_rows(n=300)
    rows[149], rows[150] = rows[150], rows[149]
    rows[200][0] = rows[10][0]  # far back
    source = write_csv(tmp_path / "pump.csv", rows)
    out = tmp_path / "out.csv"
    caplog.set_level(logging.WARNING)
    assert main(["detect", str(source), "-o", str(out)]) == 0
    _, scored = read_output(out.read_text())
    assert len(scored) == 300
    assert "2 rows earlier than the row before them (first at line 152)" in caplog.text
    summary = detect_csv(source, io.StringIO())
    assert summary.late_rows == 2


def test_flat_start_and_leading_zeros_are_not_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    lines = ["t_s,power_w,count"]
    for i in range(600):
        power = 0.0 if i < 300 else 50.0 + rng.normal(0, 1.0)
        if i == 500:
            power = 80.0  # one clear spike once the signal has settled
        lines.append(f"{i * 60},{power:.3f},7")
    source = tmp_path / "zeros.csv"
    source.write_text("\n".join(lines) + "\n")
    sink = io.StringIO()
    summary = detect_csv(source, sink, timestamp_column="t_s")
    assert summary.rows == 600
    assert summary.not_scored == ("count",)
    flags = np.array([int(row[-1]) for row in read_output(sink.getvalue())[1]])
    assert flags[:300].sum() == 0  # a column that never moved is not scored
    assert flags[500] == 1
    assert summary.flat_start == (("power_w", 300),)  # counted, per column
    assert summary.flat_stretches == ()
    assert summary.missing_cells == 0


def test_flat_stretches_and_missing_cells_are_counted_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(6)
    lines = ["t_s,pressure_bar,flow"]
    for i in range(1200):
        pressure = f"{1.6 + rng.normal(0, 0.05):.3f}"
        if 300 <= i < 450 or 900 <= i < 1001:
            pressure = "0.000"  # two stretches of zeros: a sensor dropping out
        flow = "" if i % 50 == 7 else f"{3.0 + rng.normal(0, 0.1):.3f}"
        if 600 <= i < 720:
            flow = "3.000" if i % 10 else "NA"  # stuck, with gaps: still one stretch
        lines.append(f"{i * 60},{pressure},{flow}")
    source = tmp_path / "stuck.csv"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scored.csv"
    caplog.set_level(logging.WARNING)
    assert main(["detect", str(source), "-o", str(out), "--timestamp-column", "t_s"]) == 0
    assert len(read_output(out.read_text())[1]) == 1200
    summary = detect_csv(source, io.StringIO(), timestamp_column="t_s")
    # 1,000 repeats of 0 for 150 rows, 100 for 101 rows: both flat stretches
    assert summary.flat_stretches == (("pressure_bar", 2), ("flow", 1))
    assert summary.missing_cells == 21 + 12  # empty cells, and NA while stuck
    assert summary.flat_start == ()
    assert "3 flat stretches" in caplog.text
    assert "pressure_bar (2), flow (1)" in caplog.text
    assert "33 cells were empty or marked missing" in caplog.text


def test_unknown_timestamp_column_and_ragged_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "pump.csv", pump_rows(n=50))
    line = refusal(capsys, str(source), "--timestamp-column", "when")
    assert "has no column 'when'" in line
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3\n")
    assert "line 3: 1 fields where the header has 2" in refusal(capsys, str(ragged))


@pytest.mark.parametrize("unit", [1, 1000])
def test_a_numeric_time_column_named_like_time_is_read_as_epoch(tmp_path: Path, unit: int) -> None:
    rng = np.random.default_rng(5)
    lines = ["timestamp,value,label"]
    for i in range(400):
        value = 10.0 + rng.normal(0, 0.5) + (8.0 if i == 300 else 0.0)
        lines.append(f"{(1_700_000_000 + 300 * i) * unit},{value:.3f},{int(i == 300)}")
    source = tmp_path / "epoch.csv"
    source.write_text("\n".join(lines) + "\n")
    sink = io.StringIO()
    summary = detect_csv(source, sink)
    assert summary.timestamp_column == "timestamp"
    assert summary.columns == ("value",)  # the label column is never watched
    assert "label" in summary.ignored
    assert summary.gaps == 0  # steps of 300 s either way, so no gap is seen
    flags = [int(row[-1]) for row in read_output(sink.getvalue())[1]]
    assert flags[300] == 1


def test_epoch_milliseconds_are_read_as_seconds() -> None:
    from diagnostics.csvread import _numeric_time

    sample = [[str(1_700_000_000_000 + 300_000 * i), "1.0"] for i in range(50)]
    assert _numeric_time(["ts", "value"], sample, ",") == (0, 0.001)
    seconds = [[str(1_700_000_000 + 300 * i), "1.0"] for i in range(50)]
    assert _numeric_time(["ts", "value"], seconds, ",") == (0, 1.0)
    assert _numeric_time(["reading", "value"], seconds, ",") == (None, 1.0)  # not named so
    shuffled = [[str(v), "1.0"] for v in np.random.default_rng(1).permutation(50)]
    assert _numeric_time(["ts", "value"], shuffled, ",") == (None, 1.0)  # not a clock
