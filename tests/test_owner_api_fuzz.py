"""The live owner API against generated requests: schemathesis and hypothesis.

A real notifier (its owner loop, store, MQTT and InfluxDB) serves the API; schemathesis
reads ``/openapi.json`` and sends a bounded number of generated requests per operation
(examples, boundary values, fuzzing and stateful sequences) as an owner, a technician
and ops at once (three runs side by side, each with its own fixed seed), checking every
answer against the document (status codes, headers, bodies) and that none is a 5xx.
Then hypothesis sends profile changes of every shape. Afterwards the service must
still be whole: ``/health`` green, and a new diagnosis still opens a
case and reaches the owner's store.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GATEWAY_PASSWORD, MakeMosquitto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnostics import CATALOG, Diagnosis, encode_diagnosis
from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer
from notifier.admin import Onboarding
from notifier.model import Case, CaseState, DeviceRecord, Owner, Technician, Window
from notifier.registry import ProductLine, claim_key
from notifier.service import NotifierService
from notifier.settings import NotifierSettings, PushSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.protocol import DIAGNOSES_TOPIC
from wire.settings import MqttSettings

OWNER_TOKEN = "tok-fuzz-owner-0123456789abcdef"
TECH_TOKEN = "tok-fuzz-tech-0123456789abcdef"
OPS_TOKEN = "tok-fuzz-ops-0123456789abcdef"
NOW = datetime.now(UTC).replace(microsecond=0)
ALL_WEEK = tuple(Window(day, datetime.min.time(), datetime.max.time()) for day in range(7))


def _remedy_ids(fault: str) -> tuple[str, ...]:
    return tuple(
        r.action if r.kind == "remote" else f"technician_visit:{r.part}"
        for r in CATALOG["washer"].faults[fault].remedies
    )


@dataclass
class Live:
    notifier: NotifierService
    store: SqliteStore
    base: str
    mqtt: MqttSettings


@pytest.fixture
async def live(
    tmp_path: Path, make_mosquitto: MakeMosquitto, influxd: InfluxdServer
) -> AsyncIterator[Live]:
    broker = make_mosquitto(device_ids=["fz-1", "fz-2", "fz-3"], connection_messages=False)
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    async with SqliteStore(tmp_path / "cases.sqlite3") as store:
        await store.put_owner(
            Owner("o-fuzz", "Fay", timezone="Europe/Berlin", availability=ALL_WEEK)
        )
        await store.add_token(OWNER_TOKEN, ("owner", "o-fuzz"))
        await store.put_technician(
            Technician("t-fuzz", "Tom Fuzz", "default", frozenset({"bearing", "drain_pump"}))
        )
        await store.add_token(TECH_TOKEN, ("technician", "t-fuzz"))
        for device_id in ("fz-1", "fz-2", "fz-3"):
            await store.put_device(DeviceRecord(device_id, "o-fuzz", "washer", "2.3.1"))
        opened = NOW - timedelta(hours=2)
        cases: tuple[tuple[str, CaseState, str, str | None], ...] = (
            ("c-f1", "awaiting_consent", "controller_hang", "restart"),
            ("c-f2", "resolved", "drain_clog", None),
        )
        for case_id, state, fault, pending in cases:
            await store.add_case(
                Case(
                    case_id,
                    "fz-1",
                    "o-fuzz",
                    "washer",
                    fault,
                    state,
                    "normal",
                    opened,
                    opened,
                    pending_action=pending,
                    remedies=_remedy_ids(fault),
                )
            )
        settings_ = NotifierSettings(
            db_path=tmp_path / "unused.sqlite3",
            api_port=0,
            client_id="fixloop-notifier-fuzz",
            push=PushSettings(webhook_allow_private=False),
        )
        influx = InfluxSettings(url=influxd.url, database="fuzz", timeout_s=10)
        async with InfluxClient(influx) as client:
            await client.ensure_database()
        # the onboarding routes too: ops onboard, owners claim (tests/test_registry_api.py)
        await store.add_token(OPS_TOKEN, ("ops", "fuzz-ops"))
        registry = store.registry()
        await registry.put_product_line(ProductLine("washer", "Washer", NOW))
        onboarding = Onboarding(registry, claim_key("fuzz-fleet-secret"), frozenset({"washer"}))
        async with NotifierService(
            mqtt, influx, settings_, store=store, onboarding=lambda _: onboarding
        ) as notifier:
            task = asyncio.create_task(notifier.run())
            try:
                await notifier.wait_subscribed()
                base = notifier.api_url.removesuffix("/api/v1")
                yield Live(notifier, store, base, mqtt)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _schemathesis(base: str, token: str, report: Path) -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(Path(__file__).parent / "data" / "schemathesis.toml"),
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "all",
        "--max-examples",
        "12",
        "--seed",
        "20261204",
        "--generation-deterministic",
        "--request-timeout",
        "20",
        "--workers",
        "1",
        # erasing the owner ends every later call with 401 (tests/test_erasure_e2e.py)
        "--exclude-operation-id",
        "eraseOwner",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=report.parent,  # its example database stays out of the work tree
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _service_is_whole(live: Live) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{live.base}/health") as response:
        body = await response.json()
        assert response.status == 200, body
        assert body["ok"] is True
    # the loop still works: a new diagnosis opens a case for the owner
    diagnosis = Diagnosis(
        device_id="fz-3",
        model="washer",
        fault="drain_clog",
        status="open",
        source="device",
        confidence=0.9,
        score=0.9,
        opened_at=datetime.now(UTC),
        updated_at=datetime.now(UTC),
        remedies=CATALOG["washer"].faults["drain_clog"].remedies,
    )
    client = live.mqtt.client("fuzz-publisher")
    async with client:
        await client.publish(DIAGNOSES_TOPIC, encode_diagnosis(diagnosis), qos=1)
    async with asyncio.timeout(30):
        while not await live.store.cases(device_id="fz-3"):  # noqa: ASYNC110 - the store has no event
            await asyncio.sleep(0.1)


@pytest.mark.timeout(900)
async def test_schemathesis_finds_nothing_and_the_loop_survives(live: Live, tmp_path: Path) -> None:
    # the three roles at once, as users come: each run keeps its seed and its examples,
    # and the service answers them side by side
    roles = (("owner", OWNER_TOKEN), ("technician", TECH_TOKEN), ("ops", OPS_TOKEN))
    for who, _ in roles:  # each its own folder: its report and example database
        (tmp_path / who).mkdir()
    runs = await asyncio.gather(
        *(_schemathesis(live.base, token, tmp_path / who / "junit.xml") for who, token in roles)
    )
    failures = [
        f"--- as {who}:\n{out}" for (who, _), (code, out) in zip(roles, runs, strict=True) if code
    ]
    assert not failures, "\n".join(failures)
    await _service_is_whole(live)


_TIMES = st.one_of(
    st.times().map(lambda t: t.isoformat()),
    st.times(timezones=st.timezones()).map(lambda t: t.isoformat()),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)
_PROFILE = st.fixed_dictionaries(
    {},
    optional={
        "language": st.one_of(st.sampled_from(["en", "de", "pt-BR", "", "x" * 40]), st.none()),
        "timezone": st.one_of(st.timezone_keys(), st.text(max_size=70), st.none()),
        "consent": st.one_of(
            st.sampled_from(["fix_and_tell", "ask_if_interrupting", "always_ask", ""]), st.none()
        ),
        "quiet_hours": st.one_of(
            st.none(), st.fixed_dictionaries({"start": _TIMES, "end": _TIMES})
        ),
        "channels": st.one_of(
            st.lists(st.sampled_from(["fcm", "webpush", "ntfy", "webhook", "x"]), max_size=5),
            st.none(),
        ),
    },
)


@pytest.mark.timeout(900)
async def test_generated_profile_changes_never_stop_the_service(live: Live) -> None:
    answers: list[int] = []

    async def send(body: dict[str, Any]) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.patch(
                f"{live.base}/api/v1/me",
                json=body,
                headers={"Authorization": f"Bearer {OWNER_TOKEN}"},
            ) as response,
        ):
            answers.append(response.status)
            assert response.status in (200, 400, 422), await response.text()

    loop = asyncio.get_running_loop()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_PROFILE)
    def run(body: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(send(body), loop).result(timeout=30)

    await asyncio.to_thread(run)
    assert 200 in answers
    assert 400 in answers
    # every message to this owner now meets whatever profile was stored last
    await _service_is_whole(live)
