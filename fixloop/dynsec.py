"""Broker accounts at run time: a client of Mosquitto's dynamic-security plugin.

Place in the pipeline: beside it, in the composition root. Devices reach the bus only
with an account on the broker; this module issues, rotates and revokes those accounts
(and keeps the services' accounts) while the broker runs, with no restart or reload.
It speaks the plugin's control API over MQTT with the project's own client
(:class:`wire.mqtt.MqttClient`): JSON commands published on
``$CONTROL/dynamic-security/v1``, answers on ``$CONTROL/dynamic-security/v1/response``,
matched to their command by ``correlationData``.

What the plugin does that this module relies on (checked on Mosquitto 2.0.11 by
``tests/test_dynsec.py``): ``disableClient`` and ``deleteClient`` disconnect every
session of that user at once (DISCONNECT 0x98, administrative action), and a disabled
or deleted user is refused at CONNECT. The grants come from :mod:`fixloop.broker`, the
same rules as the ACL file: one role per device (Mosquitto 2.0's plugin has no ``%u``
in role topics), one role shared by the services, one by operators.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from fixloop.broker import (
    ADMIN_ACL_RULES,
    ADMIN_ROLE,
    DEVICE_ROLE_PREFIX,
    OPS_ACL_RULES,
    OPS_ROLE,
    READ_ONLY_SERVICE_USERS,
    READER_ACL_RULES,
    READER_ROLE,
    SERVICE_ACL_RULES,
    SERVICE_ROLE,
    AclRule,
    device_acl_rules,
    device_role,
)
from wire.errors import BrokerUnavailableError, PermanentError
from wire.mqtt import MqttClient

__all__ = [
    "CONTROL_TOPIC",
    "RESPONSE_TOPIC",
    "Account",
    "ControlResponse",
    "DynsecClient",
    "DynsecError",
    "IssueReport",
    "generate_password",
]

_LOG = logging.getLogger(__name__)

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = CONTROL_TOPIC + "/response"
#: Bytes of commands per message: well under the broker's 64 KiB packet limit
#: (fixloop.broker.DEFAULT_MAX_PACKET_SIZE), whose excess would cost the connection.
_BATCH_BYTES: Final = 32_768
#: Accounts per page of ``listClients``: a verbose page stays far below our client's
#: 1 MiB packet limit.
_PAGE: Final = 1_000
# The plugin's error texts for absence (Mosquitto 2.0 plugins/dynamic-security).
_CLIENT_NOT_FOUND: Final = "Client not found"
_ROLE_NOT_FOUND: Final = "Role not found"
_PASSWORD_BYTES: Final = 18


def generate_password() -> str:
    """A new random device password: 144 bits, URL-safe text (like derived ones)."""
    return secrets.token_urlsafe(_PASSWORD_BYTES)


class DynsecError(PermanentError):
    """The plugin refused a command (an unknown account, a name taken ...).

    Attributes:
        command: the command's name (``createClient`` ...).
        error: the plugin's reason, as it said it.
    """

    def __init__(self, command: str, error: str, subject: str = "") -> None:
        where = f" ({subject})" if subject else ""
        super().__init__(f"the broker refused {command}{where}: {error}")
        self.command = command
        self.error = error


@dataclass(frozen=True, slots=True)
class Account:
    """One account of the plugin.

    Attributes:
        username: the user name (a device's is its id).
        roles: names of its roles.
        disabled: refused at CONNECT (revoked).
    """

    username: str
    roles: tuple[str, ...]
    disabled: bool

    @property
    def is_device(self) -> bool:
        """Whether this is a device's account (it holds the device's own role)."""
        return DEVICE_ROLE_PREFIX + self.username in self.roles


@dataclass(frozen=True, slots=True)
class IssueReport:
    """What :meth:`DynsecClient.ensure_devices` changed.

    Attributes:
        created: devices that got an account.
        enabled: devices whose revoked account was issued again.
        unchanged: devices whose account was already enabled (password kept).
    """

    created: tuple[str, ...]
    enabled: tuple[str, ...]
    unchanged: tuple[str, ...]


class ControlResponse(BaseModel):
    """The plugin's answer to one command (an entry of its ``responses`` list).

    Attributes:
        command: the command answered.
        error: why it was refused, or ``None`` when it was carried out.
        data: what it returned (``getClient``, ``listClients`` ...).
        correlationData: the tag that matches it to its command.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    command: str
    error: str | None = None
    data: dict[str, Any] | None = None
    correlationData: str | None = None  # the plugin's field name


class _Answers(BaseModel):
    model_config = ConfigDict(extra="ignore")

    responses: list[ControlResponse]


def _on_client(command: str, username: str, **fields: object) -> dict[str, object]:
    return {"command": command, "username": username, **fields}


def _role_command(command: str, name: str, rules: Iterable[AclRule]) -> dict[str, object]:
    return {"command": command, "rolename": name, "acls": [rule.to_json() for rule in rules]}


def _account(raw: Mapping[str, Any]) -> Account:
    roles = tuple(
        str(role["rolename"])
        for role in raw.get("roles") or ()
        if isinstance(role, Mapping) and "rolename" in role
    )
    return Account(str(raw["username"]), roles, bool(raw.get("disabled", False)))


class DynsecClient:
    """A connection to the dynamic-security plugin, used as an async context manager.

    Example::

        admin = settings.mqtt.client("fixloop-admin-1")   # user fixloop-admin
        async with DynsecClient(admin) as dynsec:
            password = await dynsec.issue_device("boiler-0001")
            await dynsec.revoke_device("boiler-0002")

    Args:
        mqtt: an unconnected client logged in as a plugin administrator (role
            ``fixloop-dynsec-admin``); it is connected here and closed on exit.
        timeout_s: how long a command may wait for its answer.

    Raises:
        ConfigError: (on enter) the broker refused the administrator's credentials.
        BrokerUnavailableError: the broker cannot be reached, or an answer did not
            come within ``timeout_s``.
        DynsecError: the plugin refused a command.
    """

    def __init__(self, mqtt: MqttClient, *, timeout_s: float = 10.0) -> None:
        self._mqtt = mqtt
        self._timeout_s = timeout_s
        self._waiting: dict[str, asyncio.Future[ControlResponse]] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._mqtt.connect()
        try:
            await self._mqtt.subscribe(RESPONSE_TOPIC, qos=1)
        except BaseException:
            await self._mqtt.disconnect()
            raise
        self._reader = asyncio.create_task(self._read(), name="dynsec-responses")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])
        await self._mqtt.disconnect()
        self._fail(BrokerUnavailableError("dynamic-security client closed"))

    # -- transport ---------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for batch in self._mqtt.batches():
                self._mqtt.ack_many(batch)
                for message in batch:
                    if message.topic == RESPONSE_TOPIC:
                        self._dispatch(message.payload)
        except BrokerUnavailableError as exc:
            self._fail(exc)

    def _dispatch(self, payload: bytes) -> None:
        try:
            responses = _Answers.model_validate_json(payload).responses
        except ValidationError:
            _LOG.warning("dynamic-security: an answer that is not the plugin's JSON, ignored")
            return
        for response in responses:
            key = response.correlationData
            future = self._waiting.pop(key, None) if key is not None else None
            if future is not None and not future.done():
                future.set_result(response)

    def _fail(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(BrokerUnavailableError(str(error)))

    async def execute(self, commands: Sequence[Mapping[str, object]]) -> list[ControlResponse]:
        """Send commands (in as few messages as fit) and return their answers in order.

        A refused command does not raise here: its answer carries ``error``.

        Raises:
            BrokerUnavailableError: not connected, the connection dropped, or answers did
                not come within ``timeout_s``.
        """
        if self._reader is None:
            raise BrokerUnavailableError("dynamic-security client is not connected")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ControlResponse]] = []
        batches: list[list[dict[str, object]]] = [[]]
        size = 0
        for command in commands:
            key = f"{self._prefix}-{next(self._ids)}"
            entry = {**command, "correlationData": key}
            length = len(json.dumps(entry))
            if batches[-1] and size + length > _BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(entry)
            size += length
            future: asyncio.Future[ControlResponse] = loop.create_future()
            self._waiting[key] = future
            futures.append(future)
        try:
            async with asyncio.timeout(self._timeout_s * len(batches)):
                for batch in batches:
                    if batch:
                        payload = json.dumps({"commands": batch}).encode()
                        await self._mqtt.publish(CONTROL_TOPIC, payload, qos=1)
                return [await future for future in futures]
        except PermanentError as exc:
            raise DynsecError(
                "commands",
                f"{exc} (is the dynamic-security plugin loaded, and this account its "
                "administrator?)",
            ) from exc
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"the dynamic-security plugin did not answer within {self._timeout_s:g} s "
                "(is it loaded? `plugin` in mosquitto.conf)"
            ) from exc
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
            for entry in itertools.chain.from_iterable(batches):
                self._waiting.pop(str(entry["correlationData"]), None)

    async def run(self, commands: Sequence[Mapping[str, object]]) -> list[dict[str, Any]]:
        """Like :meth:`execute`, but a refused command raises.

        Returns:
            Each command's ``data`` (empty when it returns none).

        Raises:
            DynsecError: the first command the plugin refused.
            BrokerUnavailableError: as :meth:`execute`.
        """
        responses = await self.execute(commands)
        for command, response in zip(commands, responses, strict=True):
            if response.error is not None:
                subject = command.get("username") or command.get("rolename") or ""
                raise DynsecError(response.command, response.error, str(subject))
        return [response.data or {} for response in responses]

    # -- reading -----------------------------------------------------------------------

    async def get_account(self, username: str) -> Account | None:
        """Return the account ``username``, or ``None`` if there is none."""
        (response,) = await self.execute([_on_client("getClient", username)])
        if response.error == _CLIENT_NOT_FOUND:
            return None
        if response.error is not None:
            raise DynsecError(response.command, response.error, username)
        client = (response.data or {}).get("client")
        if not isinstance(client, Mapping):
            raise DynsecError("getClient", "answer without a client", username)
        return _account(client)

    async def accounts(self) -> list[Account]:
        """Every account of the plugin, in its order (read a page at a time)."""
        found: list[Account] = []
        while True:
            (data,) = await self.run(
                [{"command": "listClients", "verbose": True, "count": _PAGE, "offset": len(found)}]
            )
            page = [_account(raw) for raw in data.get("clients", ()) if isinstance(raw, Mapping)]
            found += page
            total = int(data.get("totalCount", 0))
            if not page or len(found) >= total:
                return found

    async def roles(self) -> set[str]:
        """Names of every role of the plugin."""
        names: list[str] = []
        while True:
            (data,) = await self.run(
                [{"command": "listRoles", "verbose": False, "count": _PAGE, "offset": len(names)}]
            )
            page = [str(name) for name in data.get("roles", ())]
            names += page
            if not page or len(names) >= int(data.get("totalCount", 0)):
                return set(names)

    async def device_accounts(self) -> list[Account]:
        """The accounts of devices (those holding their own device role)."""
        return [account for account in await self.accounts() if account.is_device]

    # -- devices -----------------------------------------------------------------------

    async def issue_device(self, device_id: str, password: str | None = None) -> str:
        """Give ``device_id`` an account with ``password`` (generated when ``None``).

        A device without an account gets one, with its role (its own topics only). A
        device that has one, revoked or not, gets the new password: its sessions are
        disconnected first, so nothing stays logged in with the old one.

        Returns:
            The password, to hand to the device once (it is not kept in clear).

        Raises:
            ConfigError: the id breaks the device id pattern.
            DynsecError: the plugin refused a step.
        """
        role = device_role(device_id)
        password = generate_password() if password is None else password
        account, role_exists = await self._lookup(device_id, role)
        commands = [
            _role_command(
                "modifyRole" if role_exists else "createRole", role, device_acl_rules(device_id)
            )
        ]
        if account is None:
            commands.append(self._create(device_id, password, role, "device"))
        else:
            commands += [
                _on_client("disableClient", device_id),
                _on_client("setClientPassword", device_id, password=password),
            ]
            if role not in account.roles:
                commands.append(_on_client("addClientRole", device_id, rolename=role))
            commands.append(_on_client("enableClient", device_id))
        await self.run(commands)
        _LOG.info(
            "broker account of device %s %s",
            device_id,
            "created" if account is None else "issued a new password",
        )
        return password

    async def revoke_device(
        self, device_id: str, *, delete: bool = False, missing_ok: bool = False
    ) -> bool:
        """Revoke ``device_id``'s account: its sessions end now, it cannot log in again.

        Args:
            device_id: the device.
            delete: remove the account and its role (a retired device) rather than
                disable it (a later :meth:`issue_device` gives it a new password).
            missing_ok: a device without an account is not an error (a device
                registered before its accounts moved to the plugin, retired now).

        Returns:
            Whether there was an account to revoke.

        Raises:
            DynsecError: the device has no account (``error`` "Client not found") and
                not ``missing_ok``, or the plugin refused a step.
        """
        role = device_role(device_id)
        commands = [_on_client("deleteClient" if delete else "disableClient", device_id)]
        if delete:
            commands.append({"command": "deleteRole", "rolename": role})
        answers = await self.execute(commands)
        account = answers[0]
        if account.error == _CLIENT_NOT_FOUND and missing_ok:
            found = False
        elif account.error is not None:
            raise DynsecError(account.command, account.error, device_id)
        else:
            found = True
        for answer in answers[1:]:
            if answer.error not in (None, _ROLE_NOT_FOUND):
                raise DynsecError(answer.command, str(answer.error), role)
        if found:
            _LOG.info(
                "broker account of device %s %s", device_id, "deleted" if delete else "disabled"
            )
        return found

    async def ensure_devices(
        self, passwords: Mapping[str, str], *, enable: bool = True
    ) -> IssueReport:
        """Make sure each device has an enabled account, in few round trips.

        Missing accounts are created with the given password. A revoked (disabled)
        account gets the given password and is enabled again when ``enable``; an enabled
        one is left as it is (its password too).

        Args:
            passwords: device id → password.
            enable: issue revoked accounts again.

        Raises:
            ConfigError: a device id breaks the pattern.
            DynsecError: the plugin refused a step.
        """
        roles_wanted = {device_id: device_role(device_id) for device_id in passwords}
        existing = {account.username: account for account in await self.accounts()}
        roles = await self.roles()
        commands: list[dict[str, object]] = []
        created: list[str] = []
        enabled: list[str] = []
        unchanged: list[str] = []
        for device_id, password in passwords.items():
            role = roles_wanted[device_id]
            account = existing.get(device_id)
            if role not in roles:
                commands.append(_role_command("createRole", role, device_acl_rules(device_id)))
            if account is None:
                commands.append(self._create(device_id, password, role, "device"))
                created.append(device_id)
                continue
            if role not in account.roles:
                commands.append(_on_client("addClientRole", device_id, rolename=role))
            if account.disabled and enable:
                commands += [
                    _on_client("setClientPassword", device_id, password=password),
                    _on_client("enableClient", device_id),
                ]
                enabled.append(device_id)
            else:
                unchanged.append(device_id)
        if commands:
            await self.run(commands)
        return IssueReport(tuple(created), tuple(enabled), tuple(unchanged))

    # -- services ----------------------------------------------------------------------

    async def ensure_service_accounts(
        self,
        services: Mapping[str, str],
        ops: Mapping[str, str] | None = None,
        admins: Mapping[str, str] | None = None,
    ) -> None:
        """Make sure the service, operator and administrator accounts exist as given.

        The roles are created, or set to the current grants of :mod:`fixloop.broker`;
        each account is created, or gets the given password and its role, and is
        enabled. A read-only service (the dashboard) gets the reader role, and loses the
        service role should an older file have given it.

        Args:
            services: backend services (gateway, diagnostics, notifier, dashboard),
                name → password.
            ops: operators, name → password.
            admins: further administrators of the plugin, name → password.

        Raises:
            DynsecError: the plugin refused a step.
        """
        writers = {n: p for n, p in services.items() if n not in READ_ONLY_SERVICE_USERS}
        readers = {n: p for n, p in services.items() if n in READ_ONLY_SERVICE_USERS}
        groups = (
            (SERVICE_ROLE, SERVICE_ACL_RULES, writers, "fixloop service"),
            (READER_ROLE, READER_ACL_RULES, readers, "fixloop service"),
            (OPS_ROLE, OPS_ACL_RULES, ops or {}, "operator"),
            (ADMIN_ROLE, ADMIN_ACL_RULES, admins or {}, "administers the dynamic-security plugin"),
        )
        existing = {account.username: account for account in await self.accounts()}
        roles = await self.roles()
        commands: list[dict[str, object]] = []
        for role, rules, accounts, text in groups:
            commands.append(
                _role_command("modifyRole" if role in roles else "createRole", role, rules)
            )
            for name, password in accounts.items():
                account = existing.get(name)
                if account is None:
                    commands.append(self._create(name, password, role, text))
                    continue
                commands.append(_on_client("setClientPassword", name, password=password))
                if role not in account.roles:
                    commands.append(_on_client("addClientRole", name, rolename=role))
                if role == READER_ROLE and SERVICE_ROLE in account.roles:
                    # a file from before the dashboard was read-only
                    commands.append(_on_client("removeClientRole", name, rolename=SERVICE_ROLE))
                if account.disabled:
                    commands.append(_on_client("enableClient", name))
        await self.run(commands)

    # -- helpers -----------------------------------------------------------------------

    async def _lookup(self, username: str, role: str) -> tuple[Account | None, bool]:
        client, role_answer = await self.execute(
            [
                _on_client("getClient", username),
                {"command": "getRole", "rolename": role},
            ]
        )
        if client.error not in (None, _CLIENT_NOT_FOUND):
            raise DynsecError(client.command, str(client.error), username)
        if role_answer.error not in (None, _ROLE_NOT_FOUND):
            raise DynsecError(role_answer.command, str(role_answer.error), role)
        account = None
        raw = (client.data or {}).get("client")
        if client.error is None and isinstance(raw, Mapping):
            account = _account(raw)
        return account, role_answer.error is None

    @staticmethod
    def _create(username: str, password: str, role: str, text: str) -> dict[str, object]:
        return {
            "command": "createClient",
            "username": username,
            "password": password,
            "textname": text,
            "roles": [{"rolename": role}],
        }
