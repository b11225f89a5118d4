"""``fixloop ttf``: remaining life learnt from run-to-failure histories, CSV in, CSV out.

Synthetic fleets only: each unit wears at its own rate from its own start level, one
metric shows the wear (noisily), one is noise, one never changes, and in one fleet a
setting column switches the unit between operating regimes that shift every metric.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from diagnostics.remaining import RemainingConfig, UnitHistory, fit_remaining_life
from diagnostics.ttfcsv import predict_csv
from fixloop.cli import main
from wire.errors import ConfigError

HEADER = ["unit", "cycle", "temp", "noise", "const", "status"]
#: Small settings for the tests that call the library (the command's own defaults are
#: exercised end to end once).
QUICK = (RemainingConfig(max_iter=60, learning_rate=0.15),)


@pytest.fixture(autouse=True)
def _no_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fixloop.toml from the developer's folder


def unit_rows(name: str, seed: int, regimes: bool = False) -> list[list[str]]:
    """One unit's whole life: cycles 1..L, the last one its failure."""
    rng = np.random.default_rng(seed)
    life = int(rng.integers(60, 140))
    start = float(rng.normal(0, 0.5))
    rows = []
    for cycle in range(1, life + 1):
        wear = max(0.0, (cycle - life * 0.4) / (life * 0.6)) ** 2 * 5.0
        setting = int(rng.integers(0, 3)) if regimes else 0
        shift = setting * 20.0
        temp = 50.0 + start + wear + shift + float(rng.normal(0, 0.4))
        noise = shift + float(rng.normal(0, 1.0))
        cells = [name, str(cycle), f"{temp:.3f}", f"{noise:.3f}", "7", "ok"]
        if regimes:
            cells.append(str(setting * 10))
        rows.append(cells)
    return rows


def write(path: Path, rows: list[list[str]], header: list[str] = HEADER, sep: str = ",") -> Path:
    text = sep.join(header) + "\n" + "".join(sep.join(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def fleet(units: int, first_seed: int, regimes: bool = False) -> dict[str, list[list[str]]]:
    return {f"u{s}": unit_rows(f"u{s}", s, regimes) for s in range(first_seed, first_seed + units)}


def cut(rows: list[list[str]], keep: int) -> tuple[list[list[str]], float]:
    """The first ``keep`` rows and the true remaining cycles after them."""
    return rows[:keep], float(rows[-1][1]) - float(rows[keep - 1][1])


def read_out(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    folder = tmp_path_factory.mktemp("ttf")
    history = fleet(30, 0)
    hist = write(folder / "hist.csv", [r for rows in history.values() for r in rows])
    running, truth = [], {}
    rng = np.random.default_rng(99)
    for name, rows in fleet(12, 100).items():
        keep = int(rng.integers(3, len(rows)))
        part, remaining = cut(rows, keep)
        running.extend(part)
        truth[name] = remaining
    return hist, write(folder / "in.csv", running), truth


def run(*args: str) -> int:
    return main(["ttf", *args])


def test_end_to_end_predicts_each_unit_better_than_the_mean_life(
    files: tuple[Path, Path, dict[str, float]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hist, running, truth = files
    out = tmp_path / "out.csv"
    code = run(
        "--history", str(hist), "--input", str(running), "-o", str(out),
        "--time-column", "cycle", "--progress",
    )  # fmt: skip
    assert code == 0
    rows = read_out(out)
    assert list(rows[0]) == ["unit", "remaining", "low", "high"]
    assert [r["unit"] for r in rows] == list(truth)  # one row per unit, in input order
    errors, inside = [], 0
    for r in rows:
        remaining, low, high = float(r["remaining"]), float(r["low"]), float(r["high"])
        assert 0 <= low <= remaining <= high
        errors.append(remaining - truth[r["unit"]])
        inside += low <= truth[r["unit"]] <= high
    rmse = math.sqrt(float(np.mean(np.square(errors))))
    reference = float(np.std(list(truth.values())))  # the best constant guess
    assert rmse < 0.7 * reference
    assert inside >= 6  # an 80 % band holds most of 12 units
    err = capsys.readouterr().err
    assert "ttf: reading" in err
    assert "fold 3/3" in err


def test_uses_only_each_units_own_rows(
    files: tuple[Path, Path, dict[str, float]], tmp_path: Path
) -> None:
    hist, running, _ = files
    text = running.read_text(encoding="utf-8").splitlines()
    header, body = text[0], text[1:]
    alone = [line for line in body if line.startswith("u100,")]
    others = [line for line in body if not line.startswith("u100,")]
    # the other units' values scrambled: u100's prediction must not move
    scrambled = [
        ",".join([*cells[:2], str(float(cells[2]) * 3), *cells[3:]])
        for cells in (line.split(",") for line in others)
    ]
    predictions = []
    for lines in (alone, others[:40] + alone + others[40:], scrambled + alone):
        path = tmp_path / "one.csv"
        path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
        out = tmp_path / "one_out.csv"
        predict_csv(hist, path, out, time_column="cycle", candidates=QUICK)
        predictions.append(next(r for r in read_out(out) if r["unit"] == "u100"))
    assert predictions[0] == predictions[1] == predictions[2]


def test_short_histories_missing_values_and_a_cap(tmp_path: Path) -> None:
    history = fleet(20, 0)
    hist = write(tmp_path / "h.csv", [r for rows in history.values() for r in rows])
    one = unit_rows("new", 500)[:1]
    gappy = unit_rows("gappy", 501)[:50]
    for row in gappy[10:30]:
        row[2] = "NaN"
    gappy[40][3] = ""
    running = write(tmp_path / "in.csv", one + gappy)
    out = tmp_path / "out.csv"
    predict_csv(hist, running, out, time_column="cycle", cap=40, candidates=QUICK)
    rows = read_out(out)
    assert [r["unit"] for r in rows] == ["new", "gappy"]
    for r in rows:
        assert 0 <= float(r["low"]) <= float(r["remaining"]) <= float(r["high"]) <= 40
    assert float(rows[0]["remaining"]) > 30  # one healthy row: far from failure, near the cap


def test_operating_regimes_are_found_and_normalised() -> None:
    histories, columns = [], ("temp", "noise", "const", "setting")
    for name, rows in fleet(24, 0, regimes=True).items():
        values = np.array([[float(c) for c in (r[2], r[3], r[4], r[6])] for r in rows])
        times = np.array([float(r[1]) for r in rows])
        histories.append(UnitHistory(name, times, values))
    model = fit_remaining_life(histories, columns, candidates=QUICK)
    assert model.regimes == 3
    assert model.used_columns == ("temp", "noise")  # setting and constant set aside
    late = [
        UnitHistory(h.unit, h.times[: len(h.times) - 5], h.values[: len(h.times) - 5])
        for h in histories[:6]
    ]
    for p in model.predict(late):
        assert p.remaining < 30  # five cycles before failure, seen through the regime shifts


def test_semicolons_and_decimal_commas(tmp_path: Path) -> None:
    rows = [r for rows in fleet(6, 0).values() for r in rows]
    semi = [[c.replace(".", ",") for c in r] for r in rows]
    hist = write(tmp_path / "h.csv", semi, sep=";")
    running = write(tmp_path / "in.csv", semi[:20], sep=";")
    out = tmp_path / "out.csv"
    predict_csv(hist, running, out, time_column="cycle", candidates=QUICK)
    assert [r["unit"] for r in read_out(out)] == ["u0"]


# -- refusals ----------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    rows = [r for rows in fleet(5, 0).values() for r in rows]
    return write(tmp_path / "h.csv", rows), rows


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fixloop: error: ")
    assert len(err.strip().splitlines()) == 1
    return err


def test_refuses_a_missing_unit_or_time_column(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, _ = small
    err = refused(capsys, "--history", str(hist), "--input", str(hist))
    assert "no time column 'time'" in err
    assert "--time-column" in err
    err = refused(
        capsys, "--history", str(hist), "--input", str(hist), "--time-column", "cycle",
        "--unit-column", "engine",
    )  # fmt: skip
    assert "no unit column 'engine'" in err


def test_refuses_no_numeric_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hist = write(tmp_path / "h.csv", [["a", "1", "x"], ["a", "2", "y"]], ["unit", "time", "state"])
    err = refused(capsys, "--history", str(hist), "--input", str(hist))
    assert "no numeric metric column" in err


def test_refuses_a_time_that_is_not_a_number_with_its_line(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, rows = small
    bad = [list(r) for r in rows]
    bad[6][1] = "2024-05-01"
    path = write(tmp_path / "bad.csv", bad)
    err = refused(capsys, "--history", str(path), "--input", str(hist), "--time-column", "cycle")
    assert "line 8" in err
    assert "not a number" in err


def test_refuses_time_going_back_with_both_lines(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, rows = small
    running = write(tmp_path / "in.csv", [rows[0], rows[1], rows[2], rows[0]])
    err = refused(capsys, "--history", str(hist), "--input", str(running), "--time-column", "cycle")
    assert "line 5" in err
    assert "goes back" in err
    assert "line 4" in err


def test_refuses_input_without_a_history_metric(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, rows = small
    running = write(
        tmp_path / "in.csv", [r[:2] + r[3:] for r in rows[:5]], [h for h in HEADER if h != "temp"]
    )
    err = refused(capsys, "--history", str(hist), "--input", str(running), "--time-column", "cycle")
    assert "lacks metric column(s) of the history: temp" in err


def test_refuses_a_row_without_a_unit_and_a_bad_cell(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, rows = small
    no_unit = [list(r) for r in rows[:4]]
    no_unit[2][0] = " "
    running = write(tmp_path / "in.csv", no_unit)
    err = refused(capsys, "--history", str(hist), "--input", str(running), "--time-column", "cycle")
    assert "line 4: no unit" in err
    text_cell = [list(r) for r in rows[:4]]
    text_cell[1][3] = "high"
    running = write(tmp_path / "in2.csv", text_cell)
    err = refused(capsys, "--history", str(hist), "--input", str(running), "--time-column", "cycle")
    assert "line 3: noise = 'high' is not a number" in err


def test_refuses_a_history_of_one_row_and_too_few_histories(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, rows = small
    one = write(tmp_path / "one.csv", [*rows, ["lonely", "1", "50", "0", "7", "ok"]])
    err = refused(capsys, "--history", str(one), "--input", str(one), "--time-column", "cycle")
    assert "unit lonely has one row" in err
    two = write(tmp_path / "two.csv", [r for r in rows if r[0] in ("u0", "u1")])
    err = refused(capsys, "--history", str(two), "--input", str(two), "--time-column", "cycle")
    assert "need at least 3 run-to-failure histories" in err


def test_refuses_missing_empty_and_header_only_files(
    small: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hist, _ = small
    err = refused(capsys, "--history", str(tmp_path / "nope.csv"), "--input", str(hist))
    assert "file not found" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    err = refused(capsys, "--history", str(hist), "--input", str(empty), "--time-column", "cycle")
    assert "is empty" in err
    header_only = write(tmp_path / "header.csv", [])
    err = refused(
        capsys, "--history", str(hist), "--input", str(header_only), "--time-column", "cycle"
    )
    assert "no data rows" in err


def test_long_histories_are_learnt_from_a_bounded_share_of_prefixes() -> None:
    histories = []
    for name, rows in fleet(12, 0).items():
        values = np.array([[float(r[2]), float(r[3])] for r in rows])
        histories.append(UnitHistory(name, np.array([float(r[1]) for r in rows]), values))
    bounded = (RemainingConfig(max_iter=60, learning_rate=0.15, max_prefixes=300),)
    model = fit_remaining_life(histories, ("temp", "noise"), candidates=bounded)
    late = [UnitHistory(h.unit, h.times[:-3], h.values[:-3]) for h in histories[:4]]
    assert all(p.remaining < 40 for p in model.predict(late))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cap": 0.0}, "cap must be a positive number"),
        ({"windows": (30, 5)}, "increasing order"),
        ({"coverage": 1.0}, "coverage must be between 0 and 1"),
        ({"folds": 1}, "folds must be at least 2"),
        ({"max_prefixes": 10}, "max_prefixes must be at least 100"),
    ],
)
def test_settings_are_checked_when_built(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RemainingConfig(**settings)  # type: ignore[arg-type]
