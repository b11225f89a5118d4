"""The local stack's accounts (``fixloop up``): services, ops users, client ids, broker.

Every secret here derives from the data folder's fleet secret, so a restart finds the
same ones: the service users' broker passwords (:func:`service_password`), the
dashboard's demo ops user while the ops users file has none, the MQTT client ids of the
stack's parts (:func:`stack_client_ids`), the accounts of the services and simulated
devices in the dynamic-security plugin, and the end of broker sessions that client ids
of an earlier version left behind.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Final

from dashboard.auth import MappingUsers, OpsUser, UserStore, hash_password
from dashboard.users import OpsUsersFile
from fixloop.broker import DYNSEC_ADMIN_USER
from fixloop.dynsec import DynsecClient
from fixloop.opsusers import ops_users_file
from fixloop.settings import Settings
from fixloop.stack import MosquittoServer
from wire.errors import BrokerUnavailableError
from wire.mqtt import MqttClient
from wire.protocol.credentials import derive
from wire.settings import MqttSettings

__all__ = ["service_password", "stack_client_ids"]

_LOG = logging.getLogger(__name__)


def _ops_users(settings: Settings, fleet_secret: str) -> tuple[UserStore, str]:
    """The dashboard's ops users, and how to log in, for the banner.

    The users of the data folder's ops users file (``fixloop ops-users add``), read again
    when it changes; only while it has none, the demo's ``ops`` user with a password
    derived from the fleet secret.

    Raises:
        ConfigError: the users file cannot be read or is malformed.
    """
    path = ops_users_file(settings)
    from_file = OpsUsersFile(path)
    found = from_file.load()
    if found:
        names = ", ".join(sorted(found))
        return from_file, f"log in as an ops user of {path}: {names}"
    password = derive(fleet_secret, "demo ops password", "ops").hex()[:16]
    demo = MappingUsers({"ops": OpsUser("ops", "admin", hash_password(password), "Ops")})
    return demo, f"log in as ops, password {password}"


def service_password(fleet_secret: str, user: str) -> str:
    """Password of a service user of the local stack (a key of its own, not a device's)."""
    return base64.urlsafe_b64encode(derive(fleet_secret, "service password", user)[:18]).decode()


async def _ensure_accounts(
    broker: MosquittoServer,
    admin_password: str,
    services: Mapping[str, str],
    devices: Mapping[str, str],
) -> None:
    """Give the stack's services and simulated devices their accounts in the plugin.

    The plugin's file outlives a run (accounts issued or revoked meanwhile stay so); a
    data folder that held fewer devices, or whose simulated devices were revoked, gets
    them (again) here, as the simulated fleet needs every one of its devices.
    """
    admin = MqttClient(
        broker.host,
        broker.port,
        client_id="fixloop-up-admin",
        username=DYNSEC_ADMIN_USER,
        password=admin_password,
    )
    async with DynsecClient(admin) as dynsec:
        await dynsec.ensure_service_accounts(services)
        report = await dynsec.ensure_devices(devices)
    if report.created or report.enabled:
        _LOG.info(
            "broker accounts: %d simulated devices added, %d revoked ones issued again",
            len(report.created),
            len(report.enabled),
        )


#: Client ids the stack's parts used before they had a suffix of their own.
_LEGACY_CLIENT_IDS: Final = frozenset(
    ("fixloop-gateway", "fixloop-diagnostics", "fixloop-notifier")
)


def stack_client_ids(fleet_secret: str) -> dict[str, str]:
    """The MQTT client ids of the stack's parts (``gateway``, ``diagnostics``, ``notifier``).

    Each is the part's name with a suffix derived from the data folder's fleet secret:
    the same at every start (the broker keeps the gateway's and the diagnostics'
    persistent sessions for these ids), unlike any other stack's, and not to be guessed
    by a device. The broker lets any client with valid credentials take over a client
    id (the older connection is closed), so a device, or a second service process left
    with the default id, could otherwise push a part of the stack off the broker.
    """
    suffix = derive(fleet_secret, "stack client id", "suffix").hex()[:8]
    return {part: f"fixloop-{part}-{suffix}" for part in ("gateway", "diagnostics", "notifier")}


async def _retire_sessions(mqtt: MqttSettings, client_ids: Iterable[str]) -> None:
    """End the broker sessions of client ids the stack no longer uses.

    A data folder of an earlier version holds persistent sessions for the bare part
    names; the broker would go on queueing every device message for them until they
    expire (a week for the gateway's). A clean start discards a session, and a
    session expiry of 0 ends the new one at the disconnect.
    """
    for client_id in sorted(client_ids):
        with contextlib.suppress(BrokerUnavailableError):
            async with mqtt.client(client_id, clean_start=True, session_expiry_s=0):
                pass
