"""Products as data: product files, their checks, the products folder, the generic product
and a fourth simulated product described only by a file (tests/data/products/boiler.toml)."""

from __future__ import annotations

import pickle
import shutil
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from device_sim import Fleet
from device_sim.described import check_simulation, load_sim_product
from diagnostics.engine import DiagnosticsEngine
from diagnostics.features import FEATURE_SPECS, spec_of
from diagnostics.model import Diagnosis
from diagnostics.product import (
    GENERIC_MODEL,
    ProductError,
    builtin_products,
    check_product_file,
    load_products,
    parse_product,
)
from diagnostics.service import load_engine
from diagnostics.settings import DiagnosticsSettings
from fixloop.cli import main
from wire.errors import ConfigError
from wire.protocol import Event, Reading, decode_event, decode_reading

FOLDER = Path(__file__).parent / "data" / "products"
BUILTIN = Path(__file__).parent.parent / "diagnostics" / "products"
START = datetime(2025, 1, 6, tzinfo=UTC)
ONSET = START + timedelta(days=3)

MINIMAL = """
[product]
model = "kettle"

[metrics]
water_temp_c = { unit = "degC" }
power_w = { unit = "W" }
lid_open = { unit = "bool" }

[states]
boiling = "power_w > 1000 and not lid_open"

[features.heating_power_w]
expr = "power_w"
when = "boiling"
alpha = 0.1
floor = 5
min_count = 10

[faults.scale]
title = "limescale"
gradual = true
codes = ["E7"]
signature = { heating_power_w = "down" }
failure = { feature = "heating_power_w", change = -200 }
remedies = [{ action = "technician_visit", part = "element" }]
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ProductError) as caught:
        parse_product(text, "k.toml")
    return [str(p) for p in caught.value.problems]


# -- the files ----------------------------------------------------------------------------


def test_builtin_files_check_clean_and_hold_the_three_products() -> None:
    products = builtin_products()
    assert set(products.products) == {"washer", "fridge", "heat_pump"}
    assert products.generic.model == GENERIC_MODEL
    assert "unusual_behaviour" in products.generic.catalog.faults
    for path in sorted(BUILTIN.glob("*.toml")):
        assert check_product_file(path) == [], path
    assert FEATURE_SPECS["washer"].names == (
        "spin_vibration",
        "tumble_power_w",
        "drain_flow_l_min",
        "idle_temp_offset_k",
        "sensor_repeat",
        "error_status",
    )


def test_features_are_computed_from_the_expressions() -> None:
    spec = spec_of(parse_product(MINIMAL))
    rows = spec.program.rows(
        [
            {"water_temp_c": 90.0, "power_w": 2000.0, "lid_open": False},
            {"water_temp_c": 90.0, "power_w": 2000.0, "lid_open": True},
            {"water_temp_c": 20.0, "power_w": 0.0},
            {"water_temp_c": 20.0},  # a missing metric: no value, no error
        ],
        ["heating", None, "idle", "idle"],
    )
    assert rows[0, 0] == 2000.0
    assert np.isnan(rows[1:, 0]).all()
    washer = FEATURE_SPECS["washer"]
    spin = washer.extract(
        {"vibration_rms_g": 0.5, "drum_rpm": 1000.0, "power_w": 300.0}, "spinning"
    )
    assert spin[0] == pytest.approx(0.5)
    tumble = washer.extract({"drum_rpm": 52.0, "power_w": 131.0}, "washing")
    assert tumble[1] == 131.0
    assert tumble[5] == 0.0  # not in status error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ('expr = "power_w"', "features.heating_power_w.unit"),  # placeholder: no problem
        ('expr = "power_w"\nbogus = 1', "features.heating_power_w.bogus: unknown key"),
        ('expr = "power_w +"', "bad expression 'power_w +': not an expression"),
        ('expr = "power_w + water_temp_c"', "unit clash: adding W and K"),
        ('expr = "pressure_bar"', "unknown name 'pressure_bar'"),
        ("expr = \"__import__('os')\"", "function '__import__' is not allowed"),
        ('expr = "power_w.real"', "Attribute is not allowed"),
        ('expr = "power_w if lid_open else 0"', "IfExp is not allowed"),
        ('expr = "lid_open + 1"', "is a bool, not a number"),
        ('expr = "power_w"\nunit = "K"', "unit clash: declared 'K'"),
    ],
)
def test_bad_product_files_are_refused_with_line_key_and_why(change: str, expected: str) -> None:
    text = MINIMAL.replace('expr = "power_w"', change, 1)
    if change == 'expr = "power_w"':
        parse_product(text)
        return
    problems = _problems(text)
    assert any(expected in p for p in problems), problems
    # each problem points at a line of the feature's table
    start = next(i for i, t in enumerate(text.splitlines(), 1) if "[features.heating_power_w]" in t)
    for problem in problems:
        line = int(problem.split(":")[1])
        assert start <= line <= start + 7, problem


def test_other_mistakes_are_refused() -> None:
    assert any("missing [product]" in p for p in _problems("[metrics]\n"))
    assert any("not valid TOML" in p for p in _problems("[product\n"))
    bad_signature = MINIMAL.replace('heating_power_w = "down"', 'nothing = "down"')
    assert any("unknown feature 'nothing'" in p for p in _problems(bad_signature))
    bad_action = MINIMAL.replace('action = "technician_visit"', 'action = "reboot_twice"')
    assert any("unknown action 'reboot_twice'" in p for p in _problems(bad_action))
    no_failure = MINIMAL.replace('failure = { feature = "heating_power_w", change = -200 }\n', "")
    assert any("needs a failure table" in p for p in _problems(no_failure))
    bad_unit = MINIMAL.replace('power_w = { unit = "W" }', 'power_w = { unit = "W//" }')
    assert any("metrics.power_w.unit" in p for p in _problems(bad_unit))


def test_products_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["products", "check", str(FOLDER / "boiler.toml")]) == 0
    assert "ok: model boiler" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('expr = "power_w"', 'expr = "power_w + water_temp_c"'))
    assert main(["products", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:14: features.heating_power_w.expr: bad expression" in out
    assert "unit clash: adding W and K" in out
    broken_sim = tmp_path / "sim.toml"
    broken_sim.write_text(MINIMAL + "\n[simulation.states]\non = { share = 1, mean_minutes = 5 }\n")
    assert check_simulation(broken_sim)  # no simulated metrics
    assert main(["products", "check", str(broken_sim)]) == 1


# -- the products folder ------------------------------------------------------------------


def test_products_folder_adds_and_overrides(tmp_path: Path) -> None:
    shutil.copy(FOLDER / "boiler.toml", tmp_path / "boiler.toml")
    washer = (BUILTIN / "washer.toml").read_text()
    (tmp_path / "my_washer.toml").write_text(
        washer.replace('title = "front-loading washing machine"', 'title = "our washer"')
    )
    products = load_products(tmp_path)
    assert set(products.products) == {"washer", "fridge", "heat_pump", "boiler"}
    assert products.products["washer"].title == "our washer"
    engine = load_engine(
        DiagnosticsSettings(model_path=tmp_path / "none.pkl", products_dir=tmp_path)
    )
    assert engine.products.get("boiler") is not None
    shutil.copy(FOLDER / "boiler.toml", tmp_path / "again.toml")
    with pytest.raises(ConfigError, match="both describe model 'boiler'"):
        load_products(tmp_path)
    with pytest.raises(ConfigError):
        load_products(tmp_path / "missing")
    # a bad file in the folder stops the service at start, naming its line and key
    (tmp_path / "again.toml").unlink()
    (tmp_path / "kettle.toml").write_text(
        MINIMAL.replace("[product]\n", '[product]\ncolour = "red"\n')
    )
    with pytest.raises(ProductError, match=r"kettle\.toml:\d+: product\.colour: unknown key"):
        load_engine(DiagnosticsSettings(model_path=tmp_path / "none.pkl", products_dir=tmp_path))


# -- a fourth product, described only by a file -------------------------------------------


@cache
def boiler_stream() -> tuple[tuple[Reading | Event, ...], dict[str, str]]:
    fleet = Fleet(
        8,
        start=START,
        seed=3,
        interval_s=120,
        models={"boiler": 1.0},
        products=[load_sim_product(FOLDER / "boiler.toml")],
    )
    ids = fleet.device_ids
    truth = {ids[1]: "electrode_wear", ids[2]: "pressure_loss"}
    for device_id, fault in truth.items():
        fleet.inject(device_id, fault, at=ONSET, duration_to_failure=timedelta(days=4))
    items: list[Reading | Event] = []
    for batch in fleet.iter_until(START + timedelta(days=8)):
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
    return tuple(items), truth


def _opened(engine: DiagnosticsEngine) -> list[Diagnosis]:
    items, _ = boiler_stream()
    opened: list[Diagnosis] = []
    for i in range(0, len(items), 2_000):
        opened += [d for d in engine.process(items[i : i + 2_000]).diagnoses if d.status == "open"]
    return opened


def test_a_product_described_only_by_a_file_is_simulated_detected_and_named() -> None:
    items, truth = boiler_stream()
    readings = [i for i in items if isinstance(i, Reading)]
    assert {"flame_signal_ua", "pressure_bar", "burner_on"} <= set(readings[0].metrics)
    assert {r.status for r in readings} == {"heating", "hot_water", "idle"}
    engine = DiagnosticsEngine(products=load_products(FOLDER))
    opened = _opened(engine)
    first = {}
    for d in opened:
        first.setdefault(d.device_id, d)
    assert {k: d.fault for k, d in first.items()} == truth  # named right, no false alarm
    for d in first.values():
        assert d.model == "boiler"
        assert d.opened_at > ONSET
        assert d.opened_at < ONSET + timedelta(days=4)  # before failure
        assert d.remedies[-1].part in ("ignition_electrode", "expansion_vessel")
    assert engine.unknown_readings == 0
    assert engine.unlisted_metrics == 0


def test_a_model_without_a_file_is_scored_generically_with_evidence() -> None:
    _, truth = boiler_stream()
    engine = DiagnosticsEngine()  # the built-in products only: no boiler file
    opened = _opened(engine)
    leak = next(d for d, f in truth.items() if f == "pressure_loss")
    assert [(d.device_id, d.fault) for d in opened] == [(leak, "unusual_behaviour")]
    (diagnosis,) = opened  # the leak, and nothing on the healthy boilers
    assert ONSET < diagnosis.opened_at < ONSET + timedelta(days=4)  # before failure
    assert diagnosis.model == "boiler"
    assert diagnosis.drivers[0].feature == "pressure_bar"
    assert diagnosis.drivers[0].z < 0
    assert "since 2025-01-" in diagnosis.evidence[0]
    assert "pressure_bar" in diagnosis.evidence[1]
    assert [r.action for r in diagnosis.remedies] == ["selftest", "technician_visit"]
    assert engine.unknown_readings > 0
    # the engine with its generic columns still pickles
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.unknown_readings == engine.unknown_readings


def test_metrics_a_file_does_not_list_are_scored_and_counted() -> None:
    engine = DiagnosticsEngine(registry={"w1": "washer"})
    day_ms = 86_400_000
    items: list[Reading | Event] = []
    rng = np.random.default_rng(5)
    for k in range(600):
        # a sensor reads with some noise (a metric that never moved is not scored)
        humidity = round((40.0 if k < 500 else 90.0) + float(rng.normal(0.0, 0.5)), 1)
        metrics = {"drum_rpm": 0.0, "water_level_l": 0.0, "humidity_pct": humidity}
        items.append(Reading("w1", k + 1, 1_000_000 + k * day_ms // 200, metrics, "idle"))
    result = engine.process(items)
    assert len(result.scores) == 600
    assert engine.unlisted_metrics == 600
    assert engine.unlisted == {"washer": {"humidity_pct"}}
    assert engine.unknown_readings == 0
    assert any(d.fault == "unusual_behaviour" for d in result.diagnoses)


def test_small_and_large_rounds_compute_the_same_features() -> None:
    # a round of a few readings and a large one give the same rows
    items, _ = boiler_stream()
    washer = Fleet(6, start=START, seed=11, interval_s=300)
    readings = [i for i in items if isinstance(i, Reading)][:400]
    for batch in washer.iter_until(START + timedelta(days=1)):
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                readings.append(decode_reading(device_id, payload, ts))
    specs = dict(FEATURE_SPECS)
    boiler = load_products(FOLDER).get("boiler")
    assert boiler is not None
    specs["boiler"] = spec_of(boiler)
    models = {"boiler": "boiler", "washer": "washer", "fridge": "fridge", "heatpump": "heat_pump"}
    for model, spec in specs.items():
        mine = [r for r in readings if models[r.device_id.split("-")[1]] == model]
        assert len(mine) > 50, model
        metrics, statuses = [r.metrics for r in mine], [r.status for r in mine]
        whole = spec.program.rows(metrics, statuses)
        pieces = np.concatenate(
            [
                spec.program.rows(metrics[i : i + 5], statuses[i : i + 5])
                for i in range(0, len(mine), 5)
            ]
        )
        assert np.array_equal(whole, pieces, equal_nan=True), model
    # where Python would raise (division by zero, overflow, a negative square root) the
    # compiled loop gives numpy's answer
    odd = parse_product(
        MINIMAL.replace(
            'expr = "power_w"',
            'expr = "max(power_w, 0) / (power_w - power_w) + log(abs(power_w) / (abs(power_w)'
            " + 1)) + sqrt(power_w / abs(power_w)) + exp(power_w / (abs(power_w) + 1) * 1000)"
            ' + (power_w / (abs(power_w) + 1)) ** -2"',
        ).replace('when = "boiling"\n', "")
    )
    spec = spec_of(odd)
    powers = (0.0, -1.0, 4.0, 1e308, 2.5)
    cases: list[dict[str, float]] = [{"power_w": v} for v in powers]
    got = spec.program.rows([*cases, {}], [None] * (len(cases) + 1))[:, 0]
    p = np.array(powers)
    with np.errstate(all="ignore"):
        a = np.abs(p)
        expected = (
            np.maximum(p, 0.0) / (p - p)
            + np.log(a / (a + 1))
            + np.sqrt(p / a)
            + np.exp(p / (a + 1) * 1000)
            + np.power(p / (a + 1), -2.0)
        )
    assert np.array_equal(got[:-1], expected, equal_nan=True)
    assert np.isnan(got[-1])  # a missing metric


def test_unlisted_metrics_beside_a_fleet_model() -> None:
    from diagnostics.fleet import FleetModel

    spec = FEATURE_SPECS["washer"]
    rng = np.random.default_rng(2)
    rows = rng.normal(0.0, 1.0, (400, len(spec.names))).astype(np.float32)
    floors = np.full(len(spec.names), 0.1, np.float32)
    fleet = FleetModel.fit("washer", spec.names, rows, floors)
    engine = DiagnosticsEngine(registry={"w1": "washer"}, fleet_models={"washer": fleet})
    items: list[Reading | Event] = [
        Reading(
            "w1",
            k + 1,
            1_000_000 + k * 120_000,
            {
                "drum_rpm": 0.0,
                "water_level_l": 0.0,
                "water_temp_c": 20.0,
                "ambient_temp_c": 20.0,
                "extra_v": (3.0 if k < 1300 else 30.0) + 0.1 * (k % 7),
            },
            "idle",
        )
        for k in range(1500)
    ]
    result = engine.process(items)
    assert len(result.scores) == 1500
    assert engine.unlisted == {"washer": {"extra_v"}}
    assert max(s.fleet for s in result.scores) > 0.0  # the fleet model scored the cold device
    opened = [d for d in result.diagnoses if d.status == "open"]
    assert [d.fault for d in opened] == ["unusual_behaviour"]
    assert opened[0].drivers[0].feature == "extra_v"


@pytest.mark.parametrize("name", ["washer", "heat_pump"])
def test_a_damaged_file_is_refused_never_crashes(name: str) -> None:
    # every line deleted, or its value replaced with the wrong kind of thing
    text = (BUILTIN / f"{name}.toml").read_text()
    lines = text.splitlines()
    values = ['"x"', "[]", "{}", "-1", "1e400", "true", '"a +"', "[1, 2]", "{ x = 1 }"]
    refused = 0
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        variants = ["\n".join(lines[:i] + lines[i + 1 :])]
        if "=" in line and not line.lstrip().startswith("["):
            key = line.split("=", 1)[0]
            variants += ["\n".join([*lines[:i], f"{key}= {v}", *lines[i + 1 :]]) for v in values]
        for variant in variants:
            problems: tuple[object, ...] = ()
            try:
                parse_product(variant, "damaged.toml")
            except ProductError as exc:
                problems = exc.problems
            refused += bool(problems)
            assert all(str(p).startswith("damaged.toml") for p in problems)
    assert refused > 300


def test_a_damaged_simulation_section_is_refused_never_crashes(tmp_path: Path) -> None:
    text = (FOLDER / "boiler.toml").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[simulation"))
    values = ['"x"', "[]", "{}", "-1", "1e400", "true", "[1, 2]", "{ x = 1 }"]
    path = tmp_path / "damaged.toml"
    refused = 0
    for i in range(start, len(lines)):
        line = lines[i]
        if "=" not in line or line.startswith("["):
            continue
        key = line.split("=", 1)[0]
        for v in values:
            path.write_text("\n".join([*lines[:i], f"{key}= {v}", *lines[i + 1 :]]))
            found = check_simulation(path)
            refused += bool(found)
            assert all(p.startswith(str(path)) for p in found)
    assert refused > 50
