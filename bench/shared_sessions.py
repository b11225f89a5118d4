"""What Mosquitto does with a shared subscriber that dies: who gets its messages.

The several-gateways design (README, "Several gateways") rests on this. Two members
of ``$share/g/devices/+/telemetry`` on a private broker (the tests' configuration):
A announces Receive Maximum 5 and never acknowledges, B acknowledges everything. 40
QoS-1 messages are published; then A dies (killed: no DISCONNECT; or a clean
DISCONNECT), 20 more are published, and A's client id comes back (or not) after a
wait. Each scenario runs on a fresh broker so no session of another is left in the
group. Prints per scenario what A held, what B got of it, how the 20 later ones were
split, what A got back, and how many of the 60 no one received.

Usage::

    python bench/shared_sessions.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixloop.broker import GATEWAY_USER
from fixloop.stack import MosquittoServer
from wire.mqtt import Message, MqttClient
from wire.protocol.credentials import device_password

SECRET = "bench-fleet-secret-0123456789"
PASSWORD = "bench-gateway-password"
FILTER = "$share/g/devices/+/telemetry"
DEVICE = "dev-001"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    persistent: bool
    session_expiry_s: int
    clean_disconnect: bool
    wait_s: float
    comes_back: bool


SCENARIOS = (
    Scenario("clean session, killed", False, 0, False, 1.0, False),
    Scenario("persistent, killed, back after 1 s", True, 3600, False, 1.0, True),
    Scenario("persistent, DISCONNECT, back after 1 s", True, 3600, True, 1.0, True),
    Scenario("persistent (expiry 2 s), killed, back after 3 s", True, 2, False, 3.0, True),
)


def member(broker: MosquittoServer, client_id: str, scenario: Scenario | None) -> MqttClient:
    persistent = scenario is not None and scenario.persistent
    return MqttClient(
        broker.host,
        broker.port,
        client_id=client_id,
        username=GATEWAY_USER,
        password=PASSWORD,
        clean_start=not persistent,
        session_expiry_s=scenario.session_expiry_s if scenario and persistent else 0,
        receive_maximum=5 if scenario is not None else 1000,
    )


async def collect(client: MqttClient, *, ack: bool, quiet_s: float = 1.0) -> set[int]:
    got: list[Message] = []
    while await client.wait_messages(quiet_s):
        batch = client.take(10_000)
        got += batch
        if ack:
            client.ack_many(batch)
    return {int(m.payload) for m in got}


async def publish(broker: MosquittoServer, seqs: range) -> None:
    password = device_password(SECRET, DEVICE)
    async with MqttClient(
        broker.host, broker.port, client_id=DEVICE, username=DEVICE, password=password
    ) as client:
        for seq in seqs:
            await client.publish(f"devices/{DEVICE}/telemetry", str(seq).encode(), qos=1)


async def run(broker: MosquittoServer, scenario: Scenario) -> str:
    a = member(broker, "member-a", scenario)
    b = member(broker, "member-b", None)
    await a.connect()
    await a.subscribe(FILTER)
    async with b:
        await b.subscribe(FILTER)
        await publish(broker, range(40))
        held = await collect(a, ack=False)
        by_b = await collect(b, ack=True)
        a_share = set(range(40)) - by_b
        if scenario.clean_disconnect:
            await a.disconnect()
        else:
            a.abort()
        await asyncio.sleep(scenario.wait_s)
        handed_over = await collect(b, ack=True) & a_share
        await publish(broker, range(100, 120))
        later_b = await collect(b, ack=True)
        by_b |= handed_over | later_b
        back: set[int] = set()
        present = "-"
        if scenario.comes_back:
            returned = member(broker, "member-a", scenario)
            async with returned:
                present = str(returned.session_present)
                await returned.subscribe(FILTER)
                back = await collect(returned, ack=True, quiet_s=1.5)
    everything = set(range(40)) | set(range(100, 120))
    lost = everything - by_b - back
    return (
        f"{scenario.name:<48} {len(held)}/{len(a_share) - len(held):<9} "
        f"{len(handed_over):<11} {len(later_b & set(range(100, 120))):>2}/20       "
        f"{present:<8} {len(back):<7} {len(lost)}"
    )


async def main() -> None:
    print(f"{'scenario':<48} A held     B got of   later to  A back:  A got   lost")
    print(f"{'':<48} fl./queued A's share  B         session  back    (of 60)")
    for scenario in SCENARIOS:
        with tempfile.TemporaryDirectory(prefix="fixloop-shared-") as tmp:
            broker = MosquittoServer(
                Path(tmp),
                users={GATEWAY_USER: PASSWORD},
                device_ids=[DEVICE],
                fleet_secret=SECRET,
                connection_messages=False,
            )
            with broker:
                print(await run(broker, scenario), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
