"""Device broker accounts in Mosquitto's dynamic-security plugin: what changes cost.

Starts a real mosquitto with the plugin (:mod:`fixloop.stack`, as ``fixloop up`` and
the tests run it), then, as the plugin's administrator (:mod:`fixloop.dynsec`):

* gives ``--devices`` new devices their accounts in one call (``ensure_devices``, what
  ``fixloop devices import`` does): one role and one account each;
* issues one more account, and revokes one, with that many accounts in place;
* measures how long a connected device takes to be disconnected by its revocation.

Prints one line per step: ``step  accounts  seconds``. Mosquitto 2.0's plugin rewrites
its whole file after every change, so the bulk step grows with the square of the fleet.

Usage::

    python bench/dynsec.py                 # 300 devices
    python bench/dynsec.py --devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from fixloop.broker import DYNSEC_ADMIN_USER
from fixloop.dynsec import DynsecClient
from fixloop.stack import MosquittoServer
from wire.errors import BrokerUnavailableError
from wire.mqtt import MqttClient

_ADMIN_PASSWORD = "bench-admin-password"


def _line(step: str, accounts: int, seconds: float) -> None:
    sys.stdout.write(f"{step:<24} {accounts:>8} {seconds:>9.3f}\n")
    sys.stdout.flush()


async def _run(broker: MosquittoServer, devices: int) -> None:
    admin = MqttClient(
        broker.host,
        broker.port,
        client_id="bench-admin",
        username=DYNSEC_ADMIN_USER,
        password=_ADMIN_PASSWORD,
        publish_timeout_s=600,
    )
    wanted = {f"bench-{n:06d}": f"bench-password-{n:08d}" for n in range(devices)}
    async with DynsecClient(admin, timeout_s=600) as dynsec:
        began = time.monotonic()
        await dynsec.ensure_devices(wanted)
        _line("create in one call", devices, time.monotonic() - began)
        began = time.monotonic()
        password = await dynsec.issue_device("bench-extra")
        _line("issue one", devices + 1, time.monotonic() - began)
        device = MqttClient(
            broker.host,
            broker.port,
            client_id="bench-extra",
            username="bench-extra",
            password=password,
        )
        await device.connect()
        began = time.monotonic()
        await dynsec.revoke_device("bench-extra")
        _line("revoke one", devices + 1, time.monotonic() - began)
        try:
            async with asyncio.timeout(30):
                await device.wait_messages()
        except BrokerUnavailableError:
            _line("revoke to disconnect", devices + 1, time.monotonic() - began)
        finally:
            await device.disconnect()


def main() -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=300, help="accounts to create (300)")
    args = parser.parse_args()
    sys.stdout.write(f"{'step':<24} {'accounts':>8} {'seconds':>9}\n")
    with (
        tempfile.TemporaryDirectory() as tmp,
        MosquittoServer(
            Path(tmp), dynsec_admin_password=_ADMIN_PASSWORD, connection_messages=False
        ) as broker,
    ):
        asyncio.run(_run(broker, args.devices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
