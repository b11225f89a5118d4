"""Device broker accounts issued and revoked at run time.

Against a real mosquitto with its dynamic-security plugin (``dynsec_mosquitto``): an
issued device connects and publishes on its own topics only; revoking it disconnects
its live session at once and refuses it at CONNECT, all on the same broker process;
the service accounts do what the ACL file lets them do. The rendered files are checked
against what the plugin and ``mosquitto_passwd`` expect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from conftest import (
    DEVICE_IDS,
    DYNSEC_ADMIN_PASSWORD,
    GATEWAY_PASSWORD,
    MakeMosquitto,
    device_pw,
)

from fixloop.broker import (
    DASHBOARD_USER,
    DEVICE_ROLE_PREFIX,
    DYNSEC_ADMIN_USER,
    GATEWAY_USER,
    OPS_ROLE,
    READER_ACL_RULES,
    READER_ROLE,
    SERVICE_ROLE,
    Listener,
    device_acl_rules,
    render_dynsec_config,
    render_mosquitto_conf,
)
from fixloop.dynsec import CONTROL_TOPIC, DynsecClient, DynsecError
from fixloop.stack import MosquittoServer
from wire.errors import BrokerUnavailableError, ConfigError, PermanentError
from wire.mqtt import MqttClient

WAIT_S = 10.0  # a bound for things that happen at once; never a measured duration


def _client(broker: MosquittoServer, user: str, password: str, client_id: str = "") -> MqttClient:
    return MqttClient(
        broker.host,
        broker.port,
        client_id=client_id or user,
        username=user,
        password=password,
        connect_timeout_s=WAIT_S,
        publish_timeout_s=WAIT_S,
    )


def _admin(broker: MosquittoServer) -> DynsecClient:
    return DynsecClient(_client(broker, DYNSEC_ADMIN_USER, DYNSEC_ADMIN_PASSWORD, "admin-test"))


@asynccontextmanager
async def _listening(broker: MosquittoServer, *filters: str) -> AsyncIterator[MqttClient]:
    async with _client(broker, GATEWAY_USER, GATEWAY_PASSWORD, "gw-test") as gateway:
        await gateway.subscribe(*filters, qos=1)
        yield gateway


async def _next_message(client: MqttClient) -> tuple[str, bytes]:
    assert await client.wait_messages(WAIT_S), "no message came"
    (message,) = client.take(1)
    client.ack(message)
    return message.topic, message.payload


async def _is_disconnected(client: MqttClient) -> BrokerUnavailableError:
    """Wait (bounded) until the broker ends the session; return what the client saw."""

    async def drain() -> None:
        while True:
            await client.wait_messages()
            client.ack_many(client.take(100))

    with pytest.raises(BrokerUnavailableError) as lost:
        await asyncio.wait_for(drain(), WAIT_S)
    return lost.value


# -- rendering ------------------------------------------------------------------------


def test_dynsec_config_stores_passwords_as_the_plugin_checks_them() -> None:
    config = json.loads(
        render_dynsec_config(
            admin_password="admin-pw",
            service_users={GATEWAY_USER: "gw-pw", DASHBOARD_USER: "db-pw"},
            ops_users={"ops": "ops-pw"},
            devices={"dev:1": "dev-pw"},
        )
    )
    clients = {c["username"]: c for c in config["clients"]}
    for user, password in (
        (DYNSEC_ADMIN_USER, "admin-pw"),
        (GATEWAY_USER, "gw-pw"),
        ("ops", "ops-pw"),
        ("dev:1", "dev-pw"),
    ):
        entry = clients[user]
        salt = base64.b64decode(entry["salt"])
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, entry["iterations"], 64)
        assert base64.b64decode(entry["password"]) == digest
        assert len(salt) == 12
    assert clients["dev:1"]["roles"] == [{"rolename": DEVICE_ROLE_PREFIX + "dev:1"}]
    assert clients["ops"]["roles"] == [{"rolename": OPS_ROLE}]
    assert clients[GATEWAY_USER]["roles"] == [{"rolename": SERVICE_ROLE}]
    # the dashboard only follows fleet/#: it sends nothing
    assert clients[DASHBOARD_USER]["roles"] == [{"rolename": READER_ROLE}]
    roles = {r["rolename"]: r["acls"] for r in config["roles"]}
    assert roles[READER_ROLE] == [r.to_json() for r in READER_ACL_RULES]
    assert {r["acltype"] for r in roles[READER_ROLE]} == {
        "subscribePattern",
        "publishClientReceive",
    }
    assert roles[DEVICE_ROLE_PREFIX + "dev:1"] == [r.to_json() for r in device_acl_rules("dev:1")]
    # nothing is granted by default, being sent included (as with the ACL file)
    assert config["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


def test_dynsec_config_refuses_names_used_twice_and_bad_device_ids() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        render_dynsec_config(admin_password="a", service_users={"x": "1"}, devices={"x": "2"})
    with pytest.raises(ConfigError, match="device id pattern"):
        render_dynsec_config(admin_password="a", devices={"a/b": "2"})
    with pytest.raises(ConfigError, match="empty password"):
        render_dynsec_config(admin_password="")


def test_broker_config_takes_one_account_store() -> None:
    common = {"listeners": (Listener(1883),), "data_dir": "/d"}
    with pytest.raises(ConfigError, match="either"):
        render_mosquitto_conf(**common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="either"):
        render_mosquitto_conf(
            **common,  # type: ignore[arg-type]
            password_file="/p",
            acl_file="/a",
            dynsec_plugin="/x.so",
            dynsec_config_file="/c.json",
        )
    conf = render_mosquitto_conf(
        **common,  # type: ignore[arg-type]
        dynsec_plugin="/x.so",
        dynsec_config_file="/c.json",
    )
    assert "plugin /x.so\nplugin_opt_config_file /c.json\n" in conf
    assert "password_file" not in conf
    assert "acl_file" not in conf


# -- against the plugin --------------------------------------------------------------


async def test_issued_device_publishes_on_its_own_topics_only(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    async with _admin(broker) as admin:
        password = await admin.issue_device("boiler-0042")
    async with (
        _listening(broker, "devices/+/telemetry") as gateway,
        _client(broker, "boiler-0042", password) as device,
    ):
        await device.publish("devices/boiler-0042/telemetry", b"mine", qos=1)
        assert await _next_message(gateway) == ("devices/boiler-0042/telemetry", b"mine")
        with pytest.raises(PermanentError, match="0x87"):
            await device.publish(f"devices/{DEVICE_IDS[0]}/telemetry", b"theirs", qos=1)
        with pytest.raises(PermanentError, match="refused subscription"):
            await device.subscribe(f"devices/{DEVICE_IDS[0]}/commands")
        with pytest.raises(PermanentError, match="0x87"):
            await device.publish(CONTROL_TOPIC, b'{"commands":[]}', qos=1)
        # its commands reach it
        await device.subscribe("devices/boiler-0042/commands")
        await gateway.publish("devices/boiler-0042/commands", b"reboot", qos=1)
        assert await _next_message(device) == ("devices/boiler-0042/commands", b"reboot")
        # the refused message never reached the gateway
        await gateway.ping(WAIT_S)
        assert gateway.pending == 0


async def test_revoking_disconnects_the_device_at_once_and_refuses_it_after(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    pid = broker.pid
    device_id = DEVICE_IDS[0]  # an account of the first configuration file
    async with _admin(broker) as admin, _client(broker, device_id, device_pw(device_id)) as device:
        await device.subscribe(f"devices/{device_id}/commands")
        await device.publish(f"devices/{device_id}/telemetry", b"before", qos=1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await admin.revoke_device(device_id)
        lost = await _is_disconnected(device)
        took_s = loop.time() - began
        assert "0x98" in str(lost)  # administrative action
        with pytest.raises(ConfigError, match=r"not authorized|bad user name"):
            await _client(broker, device_id, device_pw(device_id), "again").connect()
        account = await admin.get_account(device_id)
        assert account is not None
        assert account.disabled
        # issued again: a new password, the old one is refused
        password = await admin.issue_device(device_id)
        assert password != device_pw(device_id)
        with pytest.raises(ConfigError, match=r"not authorized|bad user name"):
            await _client(broker, device_id, device_pw(device_id), "old").connect()
        async with _client(broker, device_id, password, "new") as again:
            await again.publish(f"devices/{device_id}/telemetry", b"after", qos=1)
    assert broker.pid == pid  # no broker restart
    # far below the bound: the plugin kicks the session while answering the command
    assert took_s < WAIT_S


async def test_deleting_an_account_disconnects_and_forgets_the_device(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    pid = broker.pid
    async with _admin(broker) as admin:
        password = await admin.issue_device("retired-1", "a-given-password-123")
        assert password == "a-given-password-123"
        async with _client(broker, "retired-1", password) as device:
            await admin.revoke_device("retired-1", delete=True)
            await _is_disconnected(device)
        with pytest.raises(ConfigError):
            await _client(broker, "retired-1", password, "again").connect()
        assert await admin.get_account("retired-1") is None
        assert DEVICE_ROLE_PREFIX + "retired-1" not in await admin.roles()
        with pytest.raises(DynsecError, match="Client not found") as refused:
            await admin.revoke_device("retired-1")
        assert refused.value.error == "Client not found"
        assert await admin.revoke_device("retired-1", delete=True, missing_ok=True) is False
        assert await admin.revoke_device(DEVICE_IDS[0], delete=True, missing_ok=True) is True
        assert await admin.get_account(DEVICE_IDS[0]) is None
    assert broker.pid == pid


async def test_a_second_session_of_the_same_device_is_disconnected_too(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    async with _admin(broker) as admin:
        password = await admin.issue_device("twin")
        async with (
            _client(broker, "twin", password, "twin-a") as first,
            _client(broker, "twin", password, "twin-b") as second,
        ):
            await admin.revoke_device("twin")
            await _is_disconnected(first)
            await _is_disconnected(second)


async def test_accounts_and_grants_outlive_a_broker_restart(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    async with _admin(broker) as admin:
        password = await admin.issue_device("kept")
        await admin.revoke_device(DEVICE_IDS[1])
    broker.restart()  # the plugin's file is kept, not written again from the settings
    async with _client(broker, "kept", password) as device:
        await device.publish("devices/kept/telemetry", b"x", qos=1)
    with pytest.raises(ConfigError):
        await _client(broker, DEVICE_IDS[1], device_pw(DEVICE_IDS[1])).connect()


async def test_ensure_devices_creates_the_missing_and_reissues_the_revoked(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    wanted = {d: device_pw(d) for d in (*DEVICE_IDS, "dev-new")}
    async with _admin(broker) as admin:
        await admin.revoke_device(DEVICE_IDS[2])
        report = await admin.ensure_devices(wanted)
        assert report.created == ("dev-new",)
        assert report.enabled == (DEVICE_IDS[2],)
        assert set(report.unchanged) == set(DEVICE_IDS[:2])
        devices = {a.username for a in await admin.device_accounts()}
        assert devices == set(wanted)
        again = await admin.ensure_devices(wanted)
        assert again.created == again.enabled == ()
    for device_id, password in wanted.items():
        async with _client(broker, device_id, password) as device:
            await device.publish(f"devices/{device_id}/status", b"online", qos=1)


async def test_service_accounts_read_devices_command_them_and_talk_on_fleet(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    services = {name: f"{name}-password" for name in ("fixloop-diagnostics", "fixloop-notifier")}
    async with _admin(broker) as admin:
        await admin.ensure_service_accounts(
            {GATEWAY_USER: "rotated-gateway-password", **services}, ops={"ops": "ops-password"}
        )
        accounts = {a.username: a for a in await admin.accounts()}
        assert all(SERVICE_ROLE in accounts[name].roles for name in services)
    with pytest.raises(ConfigError):  # the password was set again
        await _client(broker, GATEWAY_USER, GATEWAY_PASSWORD).connect()
    device_id = DEVICE_IDS[0]
    for name, password in services.items():
        async with (
            _client(broker, name, password) as service,
            _client(broker, device_id, device_pw(device_id), f"d-{name}") as device,
        ):
            await service.subscribe(
                "devices/+/telemetry", f"$share/{name}/devices/+/events", "fleet/#"
            )
            await service.subscribe("$SYS/broker/publish/messages/dropped")
            await device.subscribe(f"devices/{device_id}/commands")
            await device.publish(f"devices/{device_id}/telemetry", b"t", qos=1)
            await device.publish(f"devices/{device_id}/events", b"e", qos=1)
            await service.publish("fleet/cases", b"c", qos=1)
            expected = {f"devices/{device_id}/{c}" for c in ("telemetry", "events")}
            expected.add("fleet/cases")
            seen: set[str] = set()
            async with asyncio.timeout(WAIT_S):
                while not expected <= seen:
                    seen.add((await _next_message(service))[0])
            await service.publish(f"devices/{device_id}/commands", b"go", qos=1)
            assert await _next_message(device) == (f"devices/{device_id}/commands", b"go")
            # a service may not speak for a device nor administer the plugin
            for topic in (f"devices/{device_id}/telemetry", CONTROL_TOPIC):
                with pytest.raises(PermanentError, match="0x87"):
                    await service.publish(topic, b"x", qos=1)
    async with _client(broker, "ops", "ops-password") as ops:
        await ops.subscribe("#", "$SYS/broker/uptime")
        await ops.publish("anything/at/all", b"x", qos=1)
        with pytest.raises(PermanentError, match="0x87"):
            await ops.publish(CONTROL_TOPIC, b'{"commands":[]}', qos=1)


async def test_an_account_that_is_not_an_administrator_gets_no_answers(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    client = DynsecClient(_client(broker, GATEWAY_USER, GATEWAY_PASSWORD, "not-admin"))
    with pytest.raises(PermanentError, match="refused subscription"):
        await client.__aenter__()
    assert not client._mqtt.connected  # the connection was closed


async def test_a_broker_without_the_plugin_refuses_the_commands(
    make_mosquitto: MakeMosquitto,
) -> None:
    broker = make_mosquitto(admin_users={DYNSEC_ADMIN_USER: DYNSEC_ADMIN_PASSWORD})
    client = _client(broker, DYNSEC_ADMIN_USER, DYNSEC_ADMIN_PASSWORD)
    async with DynsecClient(client) as admin:
        with pytest.raises(DynsecError, match="plugin loaded"):
            await admin.issue_device("nobody-listens")


def test_a_dynsec_broker_refuses_the_administrator_name_for_another_account(
    make_mosquitto: MakeMosquitto,
) -> None:
    with pytest.raises(ConfigError, match="administrator"):
        make_mosquitto(users={DYNSEC_ADMIN_USER: "x"}, dynsec_admin_password=DYNSEC_ADMIN_PASSWORD)


async def test_the_dashboard_account_only_reads_fleet_topics(
    dynsec_mosquitto: MosquittoServer,
) -> None:
    broker = dynsec_mosquitto
    device_id = DEVICE_IDS[0]
    async with _admin(broker) as admin:
        # an account from an older file, with the full service role
        await admin.ensure_service_accounts({"fixloop-notifier": "notifier-password"})
        await admin.run(
            [
                {
                    "command": "createClient",
                    "username": DASHBOARD_USER,
                    "password": "old-dashboard-password",
                    "roles": [{"rolename": SERVICE_ROLE}],
                }
            ]
        )
        await admin.ensure_service_accounts({DASHBOARD_USER: "dashboard-password"})
        accounts = {a.username: a for a in await admin.accounts()}
        assert set(accounts[DASHBOARD_USER].roles) == {READER_ROLE}
    async with (
        _client(broker, DASHBOARD_USER, "dashboard-password") as dashboard,
        _client(broker, "fixloop-notifier", "notifier-password") as notifier,
        _client(broker, device_id, device_pw(device_id), "d-reader") as device,
    ):
        await dashboard.subscribe("fleet/#")
        await device.subscribe(f"devices/{device_id}/commands")
        await notifier.publish("fleet/cases", b"c", qos=1)
        assert await _next_message(dashboard) == ("fleet/cases", b"c")
        for topic in ("fleet/cases", f"devices/{device_id}/commands", CONTROL_TOPIC):
            with pytest.raises(PermanentError, match="0x87"):
                await dashboard.publish(topic, b"x", qos=1)
        with pytest.raises(PermanentError, match="refused subscription"):
            await dashboard.subscribe(f"devices/{device_id}/telemetry")
        await notifier.publish(f"devices/{device_id}/commands", b"go", qos=1)
        assert await _next_message(device) == (f"devices/{device_id}/commands", b"go")
