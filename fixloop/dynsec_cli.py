"""``fixloop devices credentials``: issue and revoke device broker accounts from a shell.

Place in the pipeline: the composition root's command line, beside the broker. The
accounts live in Mosquitto's dynamic-security plugin (``[broker] accounts = "dynsec"``);
the commands reach it as its administrator (:mod:`fixloop.dynsec`), either on the
broker of ``[mqtt]`` (with ``broker.admin_password``) or on the ``fixloop up`` broker of
``stack.data_dir``. A password is printed once, on stdout alone, and kept nowhere in
clear.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
from typing import IO, Any, Final

from fixloop.config import FLEET_SECRET_FILE
from fixloop.dynsec import DynsecClient
from fixloop.settings import Settings
from wire.errors import ConfigError
from wire.mqtt import MqttClient
from wire.protocol.credentials import derive, device_password

__all__ = ["add_credentials_parser", "admin_client", "local_admin_password", "run_credentials"]

_LOCAL_HOST: Final = "127.0.0.1"


def add_credentials_parser(device_actions: Any) -> None:
    """Add ``credentials`` to the subcommands of ``fixloop devices``."""
    credentials = device_actions.add_parser(
        "credentials",
        help="issue and revoke devices' broker accounts while the broker runs (dynsec)",
    )
    actions = credentials.add_subparsers(
        dest="credentials_command", required=True, metavar="ACTION"
    )
    issue = actions.add_parser(
        "issue",
        help="give a device an account, or a new password (printed once, on stdout)",
    )
    issue.add_argument("device_id", metavar="DEVICE_ID")
    source = issue.add_mutually_exclusive_group()
    source.add_argument(
        "--password-stdin",
        action="store_true",
        help="take the password from the first line of stdin (default: a random one)",
    )
    source.add_argument(
        "--derived",
        action="store_true",
        help="the password derived from the fleet secret (devices provisioned with it, "
        "the simulator)",
    )
    revoke = actions.add_parser("revoke", help="disconnect a device now and refuse it from then on")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.add_argument(
        "--delete",
        action="store_true",
        help="remove the account and its role (a retired device) rather than disable it",
    )
    listing = actions.add_parser("list", help="the devices' accounts: id and enabled/revoked")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")


def local_admin_password(fleet_secret: str) -> str:
    """Password of ``fixloop-admin`` on the ``fixloop up`` broker (from the fleet secret).

    Derived like the local stack's service passwords, under the same purpose key.
    """
    raw = derive(fleet_secret, "service password", "fixloop-admin")[:18]
    return base64.urlsafe_b64encode(raw).decode()


def _local_fleet_secret(settings: Settings) -> str:
    if settings.stack.fleet_secret is not None:
        return settings.stack.fleet_secret.get_secret_value()
    path = settings.stack.data_dir / FLEET_SECRET_FILE
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no broker administrator: set broker.admin_password (FIXLOOP_BROKER__ADMIN_PASSWORD)"
            f" for the broker of [mqtt], or run `fixloop up` on {settings.stack.data_dir} first"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"fleet secret file {path}: {exc.strerror}") from exc
    if not secret:
        raise ConfigError(f"fleet secret file {path}: empty")
    return secret


def _local_port(settings: Settings) -> int:
    if settings.stack.mqtt_port:
        return settings.stack.mqtt_port
    path = settings.stack.data_dir / "ports.json"
    unknown = f"the fixloop up broker's port is not known ({path}): set stack.mqtt_port"
    try:
        port = json.loads(path.read_text(encoding="utf-8")).get("mqtt")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(unknown) from exc
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(unknown)
    return port


def admin_client(settings: Settings) -> MqttClient:
    """Build (not connect) the plugin administrator's MQTT client from the settings.

    Raises:
        ConfigError: accounts are not in the plugin, or no administrator is known.
    """
    broker = settings.broker
    if broker.accounts != "dynsec":
        raise ConfigError(
            'broker accounts are kept in files (broker.accounts = "file"): write the password '
            "file again (python -m fixloop.broker passwd) and reload the broker, or run it "
            'with the dynamic-security plugin (broker.accounts = "dynsec")'
        )
    client_id = f"fixloop-admin-{secrets.token_hex(4)}"
    mqtt = settings.mqtt
    if broker.admin_password is not None:
        return MqttClient(
            mqtt.host,
            mqtt.port,
            client_id=client_id,
            username=broker.admin_username,
            password=broker.admin_password.get_secret_value(),
            tls=mqtt.tls_context(),
            keepalive_s=mqtt.keepalive_s,
            connect_timeout_s=mqtt.connect_timeout_s,
            publish_timeout_s=broker.control_timeout_s,
        )
    password = local_admin_password(_local_fleet_secret(settings))
    return MqttClient(
        _LOCAL_HOST,
        _local_port(settings),
        client_id=client_id,
        username=broker.admin_username,
        password=password,
        connect_timeout_s=mqtt.connect_timeout_s,
        publish_timeout_s=broker.control_timeout_s,
    )


def _password(args: argparse.Namespace, settings: Settings, stdin: IO[str]) -> str | None:
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
        if len(password) < 12:
            raise ConfigError("--password-stdin: give a password of at least 12 characters")
        return password
    if args.derived:
        return device_password(_local_fleet_secret(settings), args.device_id)
    return None


async def _run(args: argparse.Namespace, settings: Settings, stdin: IO[str]) -> int:
    action = args.credentials_command
    password = _password(args, settings, stdin) if action == "issue" else None
    client = admin_client(settings)
    async with DynsecClient(client, timeout_s=settings.broker.control_timeout_s) as dynsec:
        if action == "issue":
            issued = await dynsec.issue_device(args.device_id, password)
            print(issued)  # noqa: T201 - the command's output: the password, once
            print(  # noqa: T201
                f"broker account of {args.device_id} issued (user name {args.device_id}); "
                "the password above is shown only now",
                file=sys.stderr,
            )
        elif action == "revoke":
            await dynsec.revoke_device(args.device_id, delete=args.delete)
            what = "deleted" if args.delete else "revoked"
            print(  # noqa: T201
                f"broker account of {args.device_id} {what}; its sessions were disconnected"
            )
        elif action == "list":
            for account in await dynsec.device_accounts():
                state = "revoked" if account.disabled else "enabled"
                if args.json:
                    line = json.dumps({"device_id": account.username, "state": state})
                else:
                    line = f"{account.username}\t{state}"
                print(line)  # noqa: T201
    return 0


def run_credentials(
    args: argparse.Namespace, settings: Settings, stdin: IO[str] | None = None
) -> int:
    """Carry out one ``devices credentials`` action; return the exit status.

    Raises:
        ConfigError: accounts are not in the plugin, or its administrator is unknown or
            refused.
        FixloopError: the broker is away or refused the command (an unknown device ...).
    """
    return asyncio.run(_run(args, settings, sys.stdin if stdin is None else stdin))
