"""The quick chaos scenarios (bench/chaos.py) on real servers: nothing acknowledged is lost.

The durability goals as assertions: 0 lost in every scenario except a broker crash, whose
loss stays within the broker's save bound; no point stored twice; a full spool disk
turns ``/health`` red instead of silently stalling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixloop.broker import DEFAULT_AUTOSAVE_INTERVAL_S

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
#: Mosquitto 2.0 saves every ``autosave_interval + 1`` s (see bench/chaos.py).
SAVE_BOUND_S = DEFAULT_AUTOSAVE_INTERVAL_S + 1.0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.exists(), done.stdout + done.stderr
    return {r["scenario"]: r for r in json.loads(out.read_text())}


@pytest.mark.timeout(300)
def test_every_scenario_ran_and_stored_without_duplicates(
    results: dict[str, dict[str, object]],
) -> None:
    assert set(results) == {
        "gateway-kill",
        "broker-kill-gw-up",
        "broker-kill-gw-down",
        "broker-kill-gw-down-at-once",
        "influxd-kill",
        "spool-full",
        "slow-influx",
        "flood",
        "restart-storm",
    }
    for name, result in results.items():
        assert isinstance(result["sent"], int)
        assert result["sent"] > 0, name
        assert result["dup"] == 0, name


@pytest.mark.parametrize(
    "name",
    [
        "gateway-kill",
        "broker-kill-gw-down",
        "influxd-kill",
        "spool-full",
        "slow-influx",
        "flood",
        "restart-storm",
    ],
)
def test_nothing_acknowledged_is_lost(results: dict[str, dict[str, object]], name: str) -> None:
    result = results[name]
    assert result["lost"] == 0, result
    assert result["stored"] == result["sent"], result


def test_a_broker_crash_loses_at_most_its_save_bound(
    results: dict[str, dict[str, object]],
) -> None:
    # Only messages acknowledged within the save bound before the crash may be lost
    # (with a little slack for the save itself on a busy machine).
    for name in ("broker-kill-gw-up", "broker-kill-gw-down-at-once"):
        window = results[name]["lost_window_s"]
        assert isinstance(window, float | int)
        assert window <= SAVE_BOUND_S + 0.5, results[name]
        # What the restarted broker acknowledged reaches the gateway's resumed session.
        assert results[name]["lost_after_restart"] == 0, results[name]


def test_a_full_spool_disk_turns_health_red(results: dict[str, dict[str, object]]) -> None:
    assert results["spool-full"]["health_503"] is True


def test_a_flood_at_the_brokers_limit_costs_the_other_devices_nothing(
    results: dict[str, dict[str, object]],
) -> None:
    flood = results["flood"]["flood"]
    assert isinstance(flood, dict)
    # the ramp went on until the broker took no more (or the most processes it tries)
    procs = [step[0] for step in flood["steps"]]
    assert procs[:2] == [1, 2], flood  # then doubling, and the hold at the best count
    assert len(procs) >= 3, flood
    assert flood["levelled"] or 16 in procs, flood
    assert flood["flooder_sent"] > 0, flood
    assert flood["flooder_lost"] == 0, flood
    assert flood["others_sent"] > 0, flood
    assert flood["others_lost"] == 0, flood
    assert flood["broker_dropped"] <= 0, flood  # -1: the broker had not said yet
