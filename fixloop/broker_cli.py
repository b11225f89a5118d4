"""``python -m fixloop.broker``: the broker's files written from the command line.

The production files in ``docker/`` (``--docker``), a password file from environment
variables (``passwd``) and the dynamic-security plugin's first file (``dynsec-init``),
all rendered by :mod:`fixloop.broker`, the one renderer of every Mosquitto file, so the
broker the tests run is configured like the broker we ship.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from fixloop.broker import (
    DOCKER_SERVICE_USERS,
    DYNSEC_ADMIN_USER,
    Listener,
    check_dynsec_device_id,
    device_credentials,
    render_acl,
    render_dynsec_config,
    render_mosquitto_conf,
    render_password_file,
)
from fixloop.server import _write_private
from wire.errors import ConfigError
from wire.protocol.credentials import device_password

__all__ = ["DOCKER_DYNSEC_FILE", "DOCKER_DYNSEC_PLUGIN", "docker_files", "main"]


#: Where the eclipse-mosquitto image installs the dynamic-security plugin.
DOCKER_DYNSEC_PLUGIN: Final = "/usr/lib/mosquitto_dynamic_security.so"
#: The plugin's file in the container: in a folder of the host (compose.dynsec.yaml)
#: that the broker may write, as the plugin rewrites the file at every change.
DOCKER_DYNSEC_FILE: Final = "/mosquitto/dynsec/dynamic-security.json"
_DOCKER_LISTENERS: Final = (
    # Devices, over the Internet: TLS only. Certificates: docker/README.md. Each one's
    # client id is its user name, so none can push a service off the broker.
    Listener(
        8883,
        certfile="/mosquitto/certs/server.crt",
        keyfile="/mosquitto/certs/server.key",
        username_as_client_id=True,
    ),
    # Services on the compose network (compose.yaml publishes it on the host's
    # loopback only).
    Listener(1883),
)


def docker_files() -> dict[str, str]:
    """Return the committed broker files of ``docker/`` (path relative to it → text).

    ``mosquitto.conf`` keeps accounts in the password file and ``acl``;
    ``mosquitto-dynsec.conf`` (used by ``compose.dynsec.yaml``) keeps them in the
    dynamic-security plugin.
    """
    conf = render_mosquitto_conf(
        listeners=_DOCKER_LISTENERS,
        data_dir="/mosquitto/data/",
        password_file="/mosquitto/config/passwd",
        acl_file="/mosquitto/config/acl",
    )
    acl = render_acl(service_users=DOCKER_SERVICE_USERS, admin_users=("ops",))
    dynsec = render_mosquitto_conf(
        listeners=_DOCKER_LISTENERS,
        data_dir="/mosquitto/data/",
        dynsec_plugin=DOCKER_DYNSEC_PLUGIN,
        dynsec_config_file=DOCKER_DYNSEC_FILE,
    )
    return {
        "mosquitto/mosquitto.conf": conf,
        "mosquitto/acl": acl,
        "mosquitto/mosquitto-dynsec.conf": dynsec,
    }


def _passwd_entries(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    entries: dict[str, str] = {}
    for spec in args.user:
        name, sep, var = spec.partition("=")
        if not sep or not var:
            raise ConfigError(f"--user {spec!r}: expected NAME=ENV_VAR")
        if not environ.get(var):
            raise ConfigError(f"--user {name}: environment variable {var} is not set")
        entries[name] = environ[var]
    if args.devices is not None:
        secret = environ.get(args.fleet_secret_env, "")
        if not secret:
            raise ConfigError(f"--devices: environment variable {args.fleet_secret_env} is not set")
        ids = [line.strip() for line in args.devices.read_text().splitlines()]
        devices = device_credentials(secret, [i for i in ids if i and not i.startswith("#")])
        clash = sorted(devices.keys() & entries.keys())
        if clash:
            raise ConfigError(f"--devices: {clash} are also service users")
        entries.update(devices)
    if not entries:
        raise ConfigError("passwd: give --user and/or --devices")
    return entries


def _env_entries(specs: Sequence[str], environ: Mapping[str, str], flag: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for spec in specs:
        name, sep, var = spec.partition("=")
        if not sep or not var:
            raise ConfigError(f"{flag} {spec!r}: expected NAME=ENV_VAR")
        if not environ.get(var):
            raise ConfigError(f"{flag} {name}: environment variable {var} is not set")
        entries[name] = environ[var]
    return entries


def _dynsec_init(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The plugin's first file from the ``dynsec-init`` arguments."""
    admin = environ.get(args.admin_password_env, "")
    if not admin:
        raise ConfigError(
            f"--admin-password-env: environment variable {args.admin_password_env} is not set"
        )
    devices: dict[str, str] = {}
    if args.devices is not None:
        secret = environ.get(args.fleet_secret_env, "")
        if not secret:
            raise ConfigError(f"--devices: environment variable {args.fleet_secret_env} is not set")
        for line in args.devices.read_text().splitlines():
            device_id = line.strip()
            if device_id and not device_id.startswith("#"):
                devices[check_dynsec_device_id(device_id)] = device_password(secret, device_id)
    return render_dynsec_config(
        admin_password=admin,
        service_users=_env_entries(args.user, environ, "--user"),
        ops_users=_env_entries(args.ops, environ, "--ops"),
        logins=_env_entries(args.login, environ, "--login"),
        devices=devices,
    )


def _write_new(path: Path, text: str, *, replace: bool) -> None:
    """Write a private file; an existing one only with ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise ConfigError(
            f"{path} exists: it holds the broker's accounts as they are now (issued and "
            "revoked ones included); give --force to replace it"
        ) from exc
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Command line: write the docker broker files or a password file.

    ``python -m fixloop.broker --docker [--output-dir docker]`` writes ``docker/mosquitto/
    mosquitto.conf`` and ``acl``. ``python -m fixloop.broker passwd FILE --user
    NAME=ENV_VAR ... [--devices IDS_FILE --fleet-secret-env VAR]`` writes a password file.
    ``python -m fixloop.broker dynsec-init FILE --admin-password-env VAR [--user
    NAME=ENV_VAR ...] [--ops NAME=ENV_VAR ...] [--login NAME=ENV_VAR ...] [--devices
    IDS_FILE]`` writes the dynamic-security plugin's first file (never over an existing
    one without ``--force``). Passwords are read from environment variables so they never
    appear in ``ps`` or the shell history.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m fixloop.broker", description=__doc__)
    parser.add_argument("--docker", action="store_true", help="write docker/mosquitto files")
    parser.add_argument("--output-dir", type=Path, default=Path("docker"))
    sub = parser.add_subparsers(dest="command")
    pw = sub.add_parser("passwd", help="write a mosquitto password file")
    pw.add_argument("output", type=Path)
    pw.add_argument("--user", action="append", default=[], metavar="NAME=ENV_VAR")
    pw.add_argument("--devices", type=Path, help="file of device ids, one per line")
    pw.add_argument("--fleet-secret-env", default="FIXLOOP_STACK__FLEET_SECRET")
    init = sub.add_parser("dynsec-init", help="write the first file of the dynamic-security plugin")
    init.add_argument("output", type=Path)
    init.add_argument(
        "--admin-password-env",
        required=True,
        metavar="ENV_VAR",
        help=f"variable holding the password of {DYNSEC_ADMIN_USER}, the plugin's administrator",
    )
    init.add_argument(
        "--user", action="append", default=[], metavar="NAME=ENV_VAR", help="a service account"
    )
    init.add_argument(
        "--ops", action="append", default=[], metavar="NAME=ENV_VAR", help="an operator"
    )
    init.add_argument(
        "--login",
        action="append",
        default=[],
        metavar="NAME=ENV_VAR",
        help="an account that may only log in (a healthcheck)",
    )
    init.add_argument("--devices", type=Path, help="file of device ids, one per line")
    init.add_argument("--fleet-secret-env", default="FIXLOOP_STACK__FLEET_SECRET")
    init.add_argument(
        "--force", action="store_true", help="replace an existing file (its accounts are lost)"
    )
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        if args.command == "passwd":
            entries = _passwd_entries(args, env)
            _write_private(args.output, render_password_file(entries))
            sys.stdout.write(f"wrote {len(entries)} users to {args.output}\n")
        elif args.command == "dynsec-init":
            _write_new(args.output, _dynsec_init(args, env), replace=args.force)
            sys.stdout.write(f"wrote the dynamic-security plugin's first file {args.output}\n")
        elif args.docker:
            for rel, text in docker_files().items():
                target = args.output_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                sys.stdout.write(f"wrote {target}\n")
        else:
            parser.print_usage(sys.stderr)
            return 2
    except (ConfigError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
