"""The engine's generic scoring on the detector core (``generic_scoring="detector"``, the default).

Unit tests, no I/O but temporary files: devices of a model no product file describes
(and metrics a file does not list) are scored by the same core as ``fixloop detect``,
with the same scores for the same rows and settings; a lasting change opens
``unusual_behaviour`` with the detector's evidence, a healthy device raises nothing, late
rows change nothing.
"""

from __future__ import annotations

import csv
import math
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from device_sim import Fleet
from device_sim.described import load_sim_product
from diagnostics.csvdetect import OPERATING_POINT, detect_csv
from diagnostics.engine import LIVE_DETECTOR, DiagnosticsEngine
from diagnostics.model import Diagnosis
from wire.protocol import Event, Reading, decode_event, decode_reading

PRODUCTS = Path(__file__).parent / "data" / "products"

START_S = 1_736_121_600  # 2025-01-06 00:00 UTC
STEP_S = 300
DAY_ROWS = 86_400 // STEP_S


def compressor(device: str, days: float, seed: int, fault_at: int | None = None) -> list[Reading]:
    """A compressor every 5 minutes: a daily swing, noise, an on/off valve; a fault adds 3 A."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(int(days * DAY_ROWS)):
        t = START_S + i * STEP_S
        phase = 2 * math.pi * (t % 86_400) / 86_400
        current = 8.0 + 0.2 * float(rng.normal())
        if fault_at is not None and i >= fault_at:
            current += 3.0
        metrics: dict[str, float | bool] = {
            "discharge_c": round(70.0 + 3.0 * math.sin(phase) + 0.5 * float(rng.normal()), 2),
            "current_a": round(current, 3),
            "valve_open": bool(rng.random() < 0.5),
        }
        out.append(Reading(device, i + 1, t * 1000, metrics))
    return out


def run(
    engine: DiagnosticsEngine, readings: list[Reading | Event], chunk: int = 500
) -> tuple[list[float], list[Diagnosis]]:
    scores: list[float] = []
    diagnoses: list[Diagnosis] = []
    for i in range(0, len(readings), chunk):
        result = engine.process(readings[i : i + chunk])
        scores += [s.score for s in result.scores]
        diagnoses += result.diagnoses
    return scores, diagnoses


def test_live_generic_scores_are_fixloop_detect_scores(tmp_path: Path) -> None:
    readings = compressor("c1", 4, seed=1, fault_at=3 * DAY_ROWS)
    engine = DiagnosticsEngine(registry={"c1": "compressor"}, generic_scoring="detector")
    live, _ = run(engine, list(readings))
    path = tmp_path / "c1.csv"
    names = list(readings[0].metrics)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", *names])
        for r in readings:
            writer.writerow([r.ts_ms // 1000, *(float(r.metrics[n]) for n in names)])
    summary = detect_csv(path, tmp_path / "out.csv", config=LIVE_DETECTOR)
    assert summary.timestamp_column == "time"
    with (tmp_path / "out.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    offline = np.array([float(r["anomaly_score"]) for r in rows])
    events = np.array([r["anomaly"] == "1" for r in rows])
    ours = np.array(live)
    # fixloop detect holds a row that is not an event just under the operating point
    held = np.where(events, ours, np.minimum(ours, OPERATING_POINT - 1e-6))
    assert np.allclose(held, offline, atol=2e-6, rtol=0.0)
    assert events.any()
    assert np.all(ours[events] >= OPERATING_POINT)
    assert engine.unknown_readings == len(readings)


def test_an_unknown_product_s_lasting_fault_opens_unusual_behaviour_with_evidence() -> None:
    fault_at = 4 * DAY_ROWS + 37
    streams = [compressor("c0", 6, seed=0, fault_at=fault_at)]
    streams += [compressor(f"c{k}", 6, seed=k) for k in range(1, 6)]
    items: list[Reading | Event] = [r for group in zip(*streams, strict=True) for r in group]
    engine = DiagnosticsEngine(
        registry={f"c{k}": "compressor" for k in range(6)}, generic_scoring="detector"
    )
    _, diagnoses = run(engine, items, chunk=600)
    opened = [d for d in diagnoses if d.status == "open"]
    assert [(d.device_id, d.fault) for d in opened] == [("c0", "unusual_behaviour")]
    (case,) = opened
    assert case.model == "compressor"
    assert case.drivers[0].feature == "current_a"
    assert case.drivers[0].z > 3.0
    assert case.opened_at.timestamp() >= START_S + fault_at * STEP_S
    fault_day = "2025-01-10T"
    assert f"unusual since {fault_day}" in case.evidence[0]
    assert "current_a +" in case.evidence[1]
    assert [r.action for r in case.remedies] == ["selftest", "technician_visit"]
    # the case follows the alert: it closes when the core re-arms (the change is learnt)
    closed = [d for d in diagnoses if d.status == "closed"]
    assert [d.device_id for d in closed] == ["c0"]
    assert engine.devices == 6
    assert engine.state_bytes() > 0


def test_late_rows_change_nothing_and_the_engine_pickles_mid_stream() -> None:
    readings = compressor("c1", 2, seed=3)
    engine = DiagnosticsEngine(registry={"c1": "compressor"}, generic_scoring="detector")
    twin = DiagnosticsEngine(registry={"c1": "compressor"}, generic_scoring="detector")
    half = len(readings) // 2
    run(engine, list(readings[:half]))
    run(twin, list(readings[:half]))
    late = Reading("c1", 99_999, readings[10].ts_ms, {"current_a": 50.0, "discharge_c": 0.0})
    again = Reading("c1", 99_998, readings[half - 1].ts_ms, {"current_a": 50.0})
    result = engine.process([late])
    assert result.scores[0].late
    assert result.scores[0].score > 0.5
    assert engine.process([again]).scores[0].late  # the same time as the last: late too
    assert engine.late_readings == 2
    clone = pickle.loads(pickle.dumps(engine))
    rest: list[Reading | Event] = list(readings[half:])
    assert run(clone, rest)[0] == run(twin, rest)[0] == run(engine, rest)[0]


def test_a_checkpoint_naming_the_engines_former_classes_still_loads() -> None:
    # a partition's checkpoint is a pickle of the whole engine; those written before the
    # per-model state moved to diagnostics.modelstate name it in diagnostics.engine
    readings = compressor("c1", 2, seed=3)
    engine = DiagnosticsEngine(registry={"c1": "compressor"}, generic_scoring="detector")
    half = len(readings) // 2
    run(engine, list(readings[:half]))
    blob = pickle.dumps(engine, 2)  # protocol 2 names each class in plain text
    for new, old in (
        (b"cdiagnostics.modelstate\nModelState\n", b"cdiagnostics.engine\n_ModelState\n"),
        (b"cdiagnostics.modelstate\nGenericMetrics\n", b"cdiagnostics.engine\n_Generic\n"),
    ):
        assert new in blob
        blob = blob.replace(new, old)
    assert b"diagnostics.modelstate" not in blob
    clone = pickle.loads(blob)
    rest: list[Reading | Event] = list(readings[half:])
    assert run(clone, rest) == run(engine, rest)


def test_unlisted_metrics_of_a_described_model_run_on_the_core() -> None:
    engine = DiagnosticsEngine(registry={"w1": "washer"}, generic_scoring="detector")
    rng = np.random.default_rng(4)
    items: list[Reading | Event] = []
    for k in range(1500):
        humidity = 40.0 + float(rng.normal()) + (25.0 if k >= 1200 else 0.0)
        metrics = {"drum_rpm": 0.0, "water_level_l": 0.0, "humidity_pct": round(humidity, 2)}
        items.append(Reading("w1", k + 1, START_S * 1000 + k * STEP_S * 1000, metrics, "idle"))
    scores, diagnoses = run(engine, items)
    assert len(scores) == 1500
    assert engine.unlisted == {"washer": {"humidity_pct"}}
    assert engine.unlisted_metrics == 1500
    opened = [d for d in diagnoses if d.status == "open"]
    assert [(d.fault, d.drivers[0].feature) for d in opened] == [
        ("unusual_behaviour", "humidity_pct")
    ]
    assert opened[0].opened_at.timestamp() >= START_S + 1200 * STEP_S
    assert max(scores[1200:1210]) >= 0.5  # the reading's score is the higher of the two


def test_new_metrics_widen_the_table_and_new_firmware_relearns() -> None:
    engine = DiagnosticsEngine(registry={"c1": "compressor"}, generic_scoring="detector")
    first = compressor("c1", 1, seed=5)
    installed = Event(
        device_id="c1", seq=0, ts_ms=first[0].ts_ms - 1, kind="boot", data={"firmware": "0"}
    )
    only_current = [
        Reading(r.device_id, r.seq, r.ts_ms, {"current_a": r.metrics["current_a"]}) for r in first
    ]
    run(engine, [installed, *only_current])
    later = [Reading(r.device_id, r.seq + 1000, r.ts_ms + 86_400_000, r.metrics) for r in first]
    boot = Event(
        device_id="c1", seq=5000, ts_ms=later[0].ts_ms, kind="boot", data={"firmware": "1"}
    )
    scores, _ = run(engine, [boot, *later])
    assert len(scores) == len(later)
    assert all(0.0 <= s <= 1.0 for s in scores)
    # the new firmware's device is learnt anew: no column is scored in its first rows
    assert scores[:5] == [0.0] * 5


def test_a_fleet_of_a_product_that_switches_states_raises_no_case_without_its_file() -> None:
    # Boilers (tests/data/products/boiler.toml) switch between idle, heating and hot
    # water: burner on/off, fan speed steps, gas and flame only while firing, flow and
    # return temperatures relaxing toward each state's level. Without the file, every
    # metric is scored generically; switching between known states is no anomaly.
    start = datetime(2025, 1, 6, tzinfo=UTC)
    fleet = Fleet(
        24,
        start=start,
        seed=21,
        interval_s=120,
        models={"boiler": 1.0},
        products=[load_sim_product(PRODUCTS / "boiler.toml")],
    )
    engine = DiagnosticsEngine()
    opened: list[Diagnosis] = []
    readings = 0
    for batch in fleet.iter_until(start + timedelta(days=6)):
        items: list[Reading | Event] = []
        for ts, topic, payload in batch:
            _, device_id, channel = topic.split("/")
            if channel == "telemetry":
                items.append(decode_reading(device_id, payload, ts))
            elif channel == "events":
                items.append(decode_event(device_id, payload, ts))
        result = engine.process(items)
        readings += len(result.scores)
        opened += [d for d in result.diagnoses if d.status == "open"]
    assert readings > 24 * 6 * 700
    assert engine.unknown_readings == readings  # all scored generically
    assert [(d.device_id, d.fault, d.drivers[0].feature) for d in opened] == []


def fleet_of_compressors(
    count: int, days: float, born_faulty: str | None = None, repaired_at: int | None = None
) -> list[Reading | Event]:
    """Compressors in time order, each a little off the others; one may be born faulty."""
    rng = np.random.default_rng(41)
    streams = []
    for k in range(count):
        device = f"cmp-{k:02d}"
        offset = float(rng.normal(0.0, 0.15))
        fault_at = 0 if device == born_faulty else None
        rows = compressor(device, days, seed=100 + k, fault_at=fault_at)
        for i, r in enumerate(rows):
            current = float(r.metrics["current_a"]) + offset
            if device == born_faulty and repaired_at is not None and i >= repaired_at:
                current -= 3.0
            r.metrics["current_a"] = round(current, 3)
        streams.append(rows)
    return [r for rows in zip(*streams, strict=True) for r in rows]


def test_a_device_born_faulty_is_found_against_its_peers_and_closed_once_repaired() -> None:
    # from its first reading on, one compressor draws 3 A more than the others: its own
    # history learns that as its normal, its 23 peers do not
    items = fleet_of_compressors(24, 4.0, born_faulty="cmp-07", repaired_at=3 * DAY_ROWS)
    engine = DiagnosticsEngine(registry={f"cmp-{k:02d}": "compressor" for k in range(24)})
    _, diagnoses = run(engine, items, chunk=24)
    assert [(d.device_id, d.status) for d in diagnoses if d.status != "update"] == [
        ("cmp-07", "open"),
        ("cmp-07", "closed"),
    ]
    opened, closed = (d for d in diagnoses if d.status != "update")
    assert opened.fault == "unusual_behaviour"
    assert opened.drivers[0].feature == "current_a"
    assert opened.drivers[0].z > 6.0  # in the peers' spread, above their median
    assert "unlike its 23 peers" in opened.evidence[0]
    # opened on its second check past the first day, closed soon after the repair
    assert START_S + 86_400 < opened.opened_at.timestamp() < START_S + 86_400 + 3 * 3_600
    repair_s = START_S + 3 * 86_400
    # the slow level takes hours back under half the distance; the way back, news to
    # the device's own history, opens nothing
    assert repair_s < closed.updated_at.timestamp() < repair_s + 12 * 3_600
    assert "back among its peers" in closed.evidence[-1]


def test_too_few_peers_compare_nothing() -> None:
    items = fleet_of_compressors(12, 2.5, born_faulty="cmp-07")
    engine = DiagnosticsEngine(registry={f"cmp-{k:02d}": "compressor" for k in range(12)})
    _, diagnoses = run(engine, items, chunk=12)
    assert diagnoses == []  # its own history holds the 3 A as normal; 11 peers are too few
