"""Three notifiers side by side on one real PostgreSQL and mosquitto; one killed mid-run.

Three ``fixloop notifier`` processes share one case store (PostgreSQL) and one MQTT 5
shared group for ``fleet/diagnoses``. Sixty devices' diagnoses arrive, twice each (so
two notifiers may race on one case); the devices refuse their first command (an
interlock) and take the second. Mid-run one notifier is killed (SIGKILL: it lets go of
nothing) and started again later under its instance name, as a supervisor would (the
broker keeps its share of diagnoses for its session only; README, "Several gateways").

Then: every case has reached its next step (asked for consent, or checking a fix the
device did after a refusal and a retry from the shared timers); every owner was told
that step exactly once (the message is kept in the step's transaction); no message was
pushed twice except one the killed notifier had pushed and not yet recorded (its
second push carries the same message id); and the store's lease log shows no case
held by two notifiers at once, none of them lost a lease while holding it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import GATEWAY_PASSWORD, MakeMosquitto, device_pw

from diagnostics import Diagnosis, encode_diagnosis
from diagnostics.catalog import Remedy
from fixloop.broker import GATEWAY_USER
from fixloop.server import free_port
from fixloop.stack import InfluxdServer, MosquittoServer
from notifier.model import DeviceRecord, Owner, PushChannel
from notifier.postgres import PostgresStore
from wire.mqtt import MqttClient
from wire.protocol import DIAGNOSES_TOPIC, Event
from wire.protocol.codec import decode_command, encode_event

pytestmark = pytest.mark.integration

DEVICES = tuple(f"nd-{n:03d}" for n in range(60))
INSTANCES = ("a", "b", "c")
LEASE_S = 8.0
#: what each case's owner should have been told once, by consent policy
FIRST_MESSAGE = {"always_ask": "consent_request", "fix_and_tell": "fix_waiting"}
NEXT_STATE = {"always_ask": "awaiting_consent", "fix_and_tell": "verifying"}

LEASE_LOG = """
CREATE TABLE lease_log (
    seq BIGSERIAL PRIMARY KEY,
    lease_key TEXT NOT NULL,
    holder TEXT NOT NULL,
    until_at TEXT NOT NULL,
    event TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION log_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO lease_log (lease_key, holder, until_at, event)
            VALUES (OLD.lease_key, OLD.holder, OLD.until_at, 'drop');
        RETURN OLD;
    END IF;
    INSERT INTO lease_log (lease_key, holder, until_at, event)
        VALUES (NEW.lease_key, NEW.holder, NEW.until_at, 'take');
    RETURN NEW;
END $$;
CREATE TRIGGER lease_log AFTER INSERT OR UPDATE OR DELETE ON case_leases
    FOR EACH ROW EXECUTE FUNCTION log_lease();
"""


def policy_of(device_id: str) -> str:
    return "always_ask" if int(device_id[-3:]) % 2 else "fix_and_tell"


class NotifierProcess:
    """One ``fixloop notifier`` process of the group, under its instance name."""

    def __init__(
        self,
        broker: MosquittoServer,
        influx: InfluxdServer,
        store_url: str,
        root: Path,
        instance: str,
    ) -> None:
        self.instance = instance
        self.log = root / f"notifier-{instance}.log"
        self.env = {
            **os.environ,
            "FIXLOOP_STACK__DATA_DIR": str(root / f"data-{instance}"),
            "FIXLOOP_MQTT__HOST": broker.host,
            "FIXLOOP_MQTT__PORT": str(broker.port),
            "FIXLOOP_MQTT__USERNAME": GATEWAY_USER,
            "FIXLOOP_MQTT__PASSWORD": GATEWAY_PASSWORD,
            "FIXLOOP_INFLUX__URL": influx.url,
            "FIXLOOP_NOTIFIER__STORE_URL": store_url,
            "FIXLOOP_NOTIFIER__SHARED_GROUP": "notifiers",
            "FIXLOOP_NOTIFIER__INSTANCE": instance,
            "FIXLOOP_NOTIFIER__LEASE_S": str(LEASE_S),
            "FIXLOOP_NOTIFIER__API_PORT": str(free_port()),
            "FIXLOOP_NOTIFIER__METRICS_PORT": str(free_port()),
            "FIXLOOP_NOTIFIER__COMMAND_TIMEOUT_S": "5",
            "FIXLOOP_NOTIFIER__RETRY_AFTER_S": "2",
            "FIXLOOP_NOTIFIER__VERIFY_TIMEOUT_S": "3600",
            "FIXLOOP_NOTIFIER__PUSH__WEBHOOK_ALLOW_PRIVATE": "true",
            "FIXLOOP_NOTIFIER__PUSH__MESSAGE_BUDGET_S": "10",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fixloop", "notifier"], env=self.env, stdout=out, stderr=out
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def subscribed_times(self) -> int:
        return self.text().count(" subscribed to ")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


class Receiver:
    """The owners' webhook endpoint: keeps every push it is sent, and when it came."""

    def __init__(self) -> None:
        self.pushes: list[tuple[datetime, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.pushes.append((datetime.now(UTC), await request.json()))
        return web.Response(status=204)


async def device(broker: MosquittoServer, device_id: str, stop: asyncio.Event) -> None:
    """A device that refuses its first command (door open) and does every later one."""
    seq = 0
    async with MqttClient(
        broker.host,
        broker.port,
        client_id=device_id,
        username=device_id,
        password=device_pw(device_id),
    ) as client:
        await client.subscribe(f"devices/{device_id}/commands", qos=1)
        while not stop.is_set():
            if not await client.wait_messages(0.5):
                continue
            batch = client.take(100)
            for message in batch:
                command = decode_command(message.payload)
                seq += 1
                result = Event(
                    device_id=device_id,
                    seq=seq,
                    ts_ms=int(time.time() * 1000),
                    kind="command_result",
                    command_id=command.id,
                    ok=seq > 1,
                    detail="done" if seq > 1 else "the door is open",
                )
                await client.publish(f"devices/{device_id}/events", encode_event(result), qos=1)
            client.ack_many(batch)


def diagnosis(device_id: str, confidence: float) -> Diagnosis:
    now = datetime.now(UTC)
    return Diagnosis(
        device_id=device_id,
        model="washer",
        fault="firmware_bug",
        confidence=confidence,
        status="open",
        opened_at=now - timedelta(minutes=5),
        updated_at=now,
        score=0.8,
        source="model",
        remedies=(Remedy("restart", "remote", True),),
        evidence=("score 0.80",),
    )


async def publish_diagnoses(broker: MosquittoServer, killed: asyncio.Event) -> None:
    """Each device's diagnosis, then an update of it, paced; half of the first round
    before a notifier is killed, the rest after."""
    async with MqttClient(
        broker.host,
        broker.port,
        client_id="diagnostics-test",
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
    ) as client:
        for n, (confidence, device_id) in enumerate(
            (confidence, device_id) for confidence in (0.7, 0.9) for device_id in DEVICES
        ):
            if n == len(DEVICES) // 2:
                await killed.wait()
            payload = encode_diagnosis(diagnosis(device_id, confidence))
            await client.publish(DIAGNOSES_TOPIC, payload, qos=1)
            await asyncio.sleep(0.05)


async def seed(
    store: PostgresStore,
    hook_url: str,
    devices: Sequence[str] = DEVICES,
    consent_of: Callable[[str], str] = policy_of,
    max_per_day: int = 50,
) -> None:
    """An owner per device, with the consent ``consent_of`` gives, each with a webhook."""
    for device_id in devices:
        owner_id = f"owner-{device_id}"
        await store.put_owner(
            Owner(
                owner_id,
                owner_id,
                consent=consent_of(device_id),  # type: ignore[arg-type]
                quiet_start=None,
                quiet_end=None,
                max_per_day=max_per_day,
            )
        )
        await store.put_channel(
            PushChannel(
                f"hook-{device_id}",
                owner_id,
                "webhook",
                f"{hook_url}/{owner_id}",
                {"secret": "webhook-secret-0123456789abcdef"},
            )
        )
        await store.put_device(DeviceRecord(device_id, owner_id, "washer", "2.3.1"))


def lease_overlaps(log: list[asyncpg.Record]) -> tuple[list[str], int]:
    """Cases two holders held at once, by the store's log of takes and drops; and how
    many leases were taken over after they ran out (a holder that never let go)."""
    problems = []
    taken_over = 0
    held: dict[str, tuple[str, datetime]] = {}
    for row in log:
        key, holder = row["lease_key"], row["holder"]
        if row["event"] == "drop":
            held.pop(key, None)
            continue
        previous = held.get(key)
        if previous is not None and previous[0] != holder:
            taken_over += 1
            if previous[1] >= row["at"]:
                problems.append(f"{key}: {holder} took it at {row['at']} from {previous}")
        held[key] = (holder, datetime.fromisoformat(row["until_at"]))
    return problems, taken_over


async def test_three_notifiers_one_killed_every_case_moves_on_no_message_twice(
    make_mosquitto: MakeMosquitto,
    influxd: InfluxdServer,
    pg_url: str,
    tmp_path: Path,
) -> None:
    broker = make_mosquitto(device_ids=DEVICES)
    receiver = Receiver()
    hooks_app = web.Application()
    hooks_app.router.add_post("/hook/{owner}", receiver.handle)
    hooks = TestServer(hooks_app, host="127.0.0.1")
    await hooks.start_server()
    conn = await asyncpg.connect(pg_url)
    await conn.execute(LEASE_LOG)
    async with PostgresStore(pg_url) as store:
        await seed(store, str(hooks.make_url("/hook")))
    notifiers = [NotifierProcess(broker, influxd, pg_url, tmp_path, name) for name in INSTANCES]
    victim = notifiers[1]
    stop, killed = asyncio.Event(), asyncio.Event()
    devices = [asyncio.create_task(device(broker, d, stop)) for d in DEVICES]

    async def at_next_step(at_least: int) -> bool:
        count = await conn.fetchval(
            "SELECT count(*) FROM cases WHERE state IN ('verifying', 'awaiting_consent')"
        )
        return int(count) >= at_least

    try:
        for notifier in notifiers:
            notifier.start()
        await wait_for(
            lambda: all(n.subscribed_times() for n in notifiers), 60, "every notifier subscribed"
        )
        burst = asyncio.create_task(publish_diagnoses(broker, killed))
        await wait_for(lambda: at_next_step(12), 60, "a fifth of the cases at their next step")
        victim.kill()
        killed_at = datetime.now(UTC)
        killed.set()  # the other half of the diagnoses arrive now
        await burst
        # a supervisor starts it again, after its leases ran out
        await asyncio.sleep(LEASE_S + 2)
        victim.start()
        await wait_for(lambda: victim.subscribed_times() == 2, 60, "the victim back")
        await wait_for(lambda: at_next_step(len(DEVICES)), 240, "every case at its next step")
        await wait_for(
            lambda: conn.fetchval("SELECT count(*) = 0 FROM notifications WHERE status <> 'sent'"),
            120,
            "every message kept delivered",
        )
        await asyncio.sleep(2)  # anything pushed twice would arrive now
        rows = await conn.fetch("SELECT * FROM notifications")
        refused = {
            r["case_id"]
            for r in await conn.fetch("SELECT case_id FROM audit WHERE action = 'command_refused'")
        }
        cases = {r["device_id"]: r for r in await conn.fetch("SELECT * FROM cases")}
        log = await conn.fetch("SELECT * FROM lease_log ORDER BY seq")
    finally:
        stop.set()
        for notifier in notifiers:
            notifier.stop()
        await asyncio.gather(*devices, return_exceptions=True)
        await conn.close()
        await hooks.close()

    logs = {n.instance: n.text() for n in notifiers}
    # every case at its next step: one case per device
    assert sorted(cases) == sorted(DEVICES)
    for device_id, case in cases.items():
        assert case["state"] == NEXT_STATE[policy_of(device_id)], (device_id, case["state"])
    # no message written twice: one idempotency key each, one per case and kind
    assert all(r["idem_key"] for r in rows)
    assert len({r["idem_key"] for r in rows}) == len(rows)
    kept = Counter((r["case_id"], r["kind"]) for r in rows)
    assert max(kept.values()) == 1, kept.most_common(3)
    # every message pushed, under its own id (the message id every retry carries)
    assert all(p["id"] == p["data"]["notification_id"] for _, p in receiver.pushes)
    pushed = Counter(p["id"] for _, p in receiver.pushes)
    assert set(pushed) == {r["notification_id"] for r in rows}
    # pushed twice only where the killed notifier pushed it and died before keeping the
    # outcome (another sent it on once its claim ran out); a receiver drops the second by
    # its id, so the owner sees each message once
    repushed = [message_id for message_id, n in pushed.items() if n > 1]
    for message_id in repushed:
        first = min(at for at, p in receiver.pushes if p["id"] == message_id)
        assert first <= killed_at, message_id
    assert max(pushed.values()) <= 2, pushed.most_common(3)
    # every case's owner was told its step exactly once: the message is kept in the same
    # transaction as the step that calls for it, so no kill leaves a step untold. The
    # "refused, we try again" of a fix-and-tell case belongs to the kept refusal: a refusal
    # the killed notifier got and died before keeping was never seen, and the retry worked
    told = Counter((r["case_id"], r["kind"]) for r in rows)
    expected = Counter(
        (case["case_id"], FIRST_MESSAGE[policy_of(device_id)])
        for device_id, case in cases.items()
        if policy_of(device_id) == "always_ask" or case["case_id"] in refused
    )
    # ... and only where the killed notifier held the case
    victim_held = {
        row["lease_key"].split("/")[0]
        for row in log
        if row["event"] == "take" and row["holder"].startswith(f"{victim.instance}-")
    }
    untold = [
        device_id
        for device_id, case in cases.items()
        if policy_of(device_id) == "fix_and_tell" and case["case_id"] not in refused
    ]
    assert set(untold) <= victim_held, (untold, sorted(victim_held))
    assert told == expected
    # no case held by two notifiers at once; none ran past its lease
    overlaps, taken_over = lease_overlaps(log)
    assert overlaps == []
    for name, text in logs.items():
        assert "ran out while held" not in text, name
        assert "Traceback" not in text, name
    # the group spread the work: each notifier took leases
    holders = Counter(row["holder"].split("-")[0] for row in log if row["event"] == "take")
    assert all(holders[name] > 0 for name in INSTANCES), holders
    print(
        f"cases {len(cases)}, messages {len(rows)} kept / {len(receiver.pushes)} pushed "
        f"({len(repushed)} again after the kill), "
        f"lease takes {dict(holders)}, taken over {taken_over}"
    )
