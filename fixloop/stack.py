"""Local stack runner: a real mosquitto and influxd on loopback ports.

Used by ``fixloop up`` (a small install on one machine) and by the test fixtures
(``tests/conftest.py``; their PostgreSQL is :mod:`fixloop.pgserver`, and what every
server process shares, start, stop and port, is :mod:`fixloop.server`). Each server
lives in its own directory, on a free port unless told otherwise, and is configured by
the same renderers as production (:mod:`fixloop.broker` for the broker). The runners are
synchronous: they start and stop processes and wait for them, which is what fixtures and
the command line need.
"""

from __future__ import annotations

import base64
import getpass
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fixloop.broker import (
    DEFAULT_AUTOSAVE_INTERVAL_S,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DYNSEC_ADMIN_USER,
    Listener,
    device_credentials,
    find_dynsec_plugin,
    render_acl,
    render_dynsec_config,
    render_mosquitto_conf,
    render_password_file,
)
from fixloop.server import LOOPBACK, _find_binary, _Server, _tcp_open, _write_private, free_port
from wire.errors import ConfigError
from wire.influxql import quote_ident

__all__ = ["InfluxdServer", "MosquittoServer"]


class MosquittoServer(_Server):
    """A mosquitto broker configured by :mod:`fixloop.broker`.

    Every user in ``users`` is a service user (reads all device topics, sends commands,
    talks on ``fleet/#``; the dashboard's only reads ``fleet/#``); each of ``device_ids``
    is a device user whose password derives from ``fleet_secret``.

    With ``dynsec_admin_password`` the accounts live in Mosquitto's dynamic-security
    plugin instead of a password file and ACL: the plugin's file
    (``dynamic-security.json``) is written with these accounts on the first start only,
    and from then on kept by the plugin, so accounts issued or revoked at run time
    (:mod:`fixloop.dynsec`, as ``fixloop-admin``) outlive restarts.

    Example::

        with MosquittoServer(tmp, users={"fixloop-gateway": pw}) as broker:
            connect(broker.host, broker.port)
    """

    name = "mosquitto"

    def __init__(
        self,
        root: Path,
        *,
        users: Mapping[str, str] | None = None,
        device_ids: Sequence[str] = (),
        fleet_secret: str | None = None,
        admin_users: Mapping[str, str] | None = None,
        port: int = 0,
        bind_address: str = LOOPBACK,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        persistence: bool = True,
        autosave_interval_s: int = DEFAULT_AUTOSAVE_INTERVAL_S,
        connection_messages: bool = True,
        dynsec_admin_password: str | None = None,
        dynsec_plugin: str | None = None,
        acl_file: Path | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        """Prepare a broker; nothing runs until :meth:`start`.

        Args:
            root: directory of its configuration, data and log.
            users: service users, name → password.
            device_ids: devices allowed to connect.
            fleet_secret: secret their passwords derive from (needed with ``device_ids``).
            admin_users: operators, name → password (every topic).
            port: TCP port; ``0`` picks a free one, kept across restarts.
            bind_address: address to listen on.
            max_queued_messages: per-client queue bound.
            persistence: keep sessions and queued messages across restarts.
            autosave_interval_s: seconds between saves of the in-memory database.
            connection_messages: log connects and disconnects (handy in tests).
            dynsec_admin_password: run with the dynamic-security plugin; the password of
                its administrator ``fixloop-admin``.
            dynsec_plugin: the plugin's path; found where packages install it if ``None``.
            acl_file: an ACL file to copy in place of the rendered one (the shipped
                ``docker/mosquitto/acl``, to try it on a real broker); file accounts only.
            binary: mosquitto executable; found on PATH and in ``/usr/sbin`` if ``None``.
            startup_timeout_s: how long to wait for the broker to accept connections.
            stop_timeout_s: how long to wait after SIGTERM before SIGKILL.
            die_with_parent: the broker gets SIGTERM when the thread that launched it
                ends, a kill -9 of its parent included (Linux; see :meth:`launch`).

        Raises:
            ConfigError: device ids without a fleet secret, or a name used twice.
        """
        super().__init__(
            root,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
            die_with_parent=die_with_parent,
            port=port,
        )
        self.users = dict(users or {})
        self.admin_users = dict(admin_users or {})
        self.device_ids = tuple(device_ids)
        if self.device_ids and not fleet_secret:
            raise ConfigError("mosquitto: device_ids need a fleet_secret")
        devices = device_credentials(fleet_secret or "-", self.device_ids)
        self.credentials: dict[str, str] = {}
        for group in (self.users, self.admin_users, devices):
            clash = sorted(self.credentials.keys() & group.keys())
            if clash:
                raise ConfigError(f"mosquitto: user names used twice: {clash}")
            self.credentials.update(group)
        self.bind_address = bind_address
        self.max_queued_messages = max_queued_messages
        self.persistence = persistence
        self.autosave_interval_s = autosave_interval_s
        self.connection_messages = connection_messages
        self.dynsec_admin_password = dynsec_admin_password
        if dynsec_admin_password is not None and DYNSEC_ADMIN_USER in self.credentials:
            raise ConfigError(f"mosquitto: {DYNSEC_ADMIN_USER} is the plugin's administrator")
        self._dynsec_plugin = dynsec_plugin
        if acl_file is not None and dynsec_admin_password is not None:
            raise ConfigError("mosquitto: an ACL file is not read with the dynamic-security plugin")
        self._acl_file = acl_file
        self._binary = binary

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return LOOPBACK if self.bind_address in ("", "0.0.0.0") else self.bind_address

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        """The rendered ``mosquitto.conf``."""
        return self.root / "mosquitto.conf"

    @property
    def data_dir(self) -> Path:
        """Directory of the persistence database."""
        return self.root / "data"

    @property
    def dynsec(self) -> bool:
        """Whether accounts live in the dynamic-security plugin."""
        return self.dynsec_admin_password is not None

    @property
    def dynsec_config_path(self) -> Path:
        """The plugin's configuration file (kept by the plugin once written)."""
        return self.root / "dynamic-security.json"

    def _accounts(self) -> tuple[str | None, str | None, str | None, str | None]:
        """Write the account files; return password file, ACL, plugin, plugin file."""
        if self.dynsec_admin_password is not None:
            plugin = find_dynsec_plugin(self._dynsec_plugin)
            if not self.dynsec_config_path.exists():
                devices = {d: self.credentials[d] for d in self.device_ids}
                _write_private(
                    self.dynsec_config_path,
                    render_dynsec_config(
                        admin_password=self.dynsec_admin_password,
                        service_users=self.users,
                        ops_users=self.admin_users,
                        devices=devices,
                    ),
                )
            return None, None, plugin, str(self.dynsec_config_path)
        passwd = self.root / "passwd"
        acl = self.root / "acl"
        _write_private(passwd, render_password_file(self.credentials))
        if self._acl_file is not None:
            text = self._acl_file.read_text(encoding="utf-8")
        else:
            text = render_acl(
                service_users=sorted(self.users), admin_users=sorted(self.admin_users)
            )
        _write_private(acl, text)
        return str(passwd), str(acl), None, None

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        password_file, acl_file, plugin, plugin_file = self._accounts()
        conf = render_mosquitto_conf(
            listeners=(Listener(self.port, self.bind_address or None),),
            data_dir=str(self.data_dir),
            password_file=password_file,
            acl_file=acl_file,
            dynsec_plugin=plugin,
            dynsec_config_file=plugin_file,
            persistence=self.persistence,
            autosave_interval_s=self.autosave_interval_s,
            max_queued_messages=self.max_queued_messages,
            # Its own log file, not stdout: mosquitto flushes file logs per line, and
            # start() waits for the "running" line.
            log_file=str(self.log_path),
            connection_messages=self.connection_messages,
            run_as_user=getpass.getuser(),
        )
        _write_private(self.conf_path, conf)

    def _command(self) -> list[str]:
        binary = _find_binary("mosquitto", self._binary, "mosquitto")
        return [binary, "-c", str(self.conf_path)]

    def _ready(self) -> bool:
        return " running" in self.log_tail(lines=1000) and _tcp_open(self.host, self.port)


class InfluxdServer(_Server):
    """An InfluxDB 1.x ``influxd`` with a database created, on loopback free ports.

    With ``username`` and ``password`` it enables authentication and creates that
    admin user on first start (to test 401 handling).
    """

    name = "influxd"

    def __init__(
        self,
        root: Path,
        *,
        database: str = "fixloop",
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        """Prepare an influxd; nothing runs until :meth:`start`.

        Args:
            root: directory of its configuration, data and log.
            database: database created after every start (``CREATE DATABASE`` is
                idempotent).
            port: HTTP port; ``0`` picks a free one, kept across restarts.
            username: admin user; with ``password`` it turns authentication on.
            password: password of ``username``.
            binary: influxd executable; found on PATH if ``None``.
            startup_timeout_s: how long to wait for ``/ping``.
            stop_timeout_s: how long to wait after SIGTERM before SIGKILL.
            die_with_parent: influxd gets SIGTERM when the thread that launched it ends,
                a kill -9 of its parent included (Linux; see :meth:`launch`).
        """
        super().__init__(
            root,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
            die_with_parent=die_with_parent,
            port=port,
        )
        if (username is None) != (password is None):
            raise ConfigError("influxd: username and password go together")
        self.database = database
        self.username = username
        self.password = password
        self._binary = binary
        self._rpc_port = 0

    @property
    def url(self) -> str:
        """Base URL of the HTTP API, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def conf_path(self) -> Path:
        """The rendered ``influxd.conf``."""
        return self.root / "influxd.conf"

    def _prepare(self) -> None:
        if self._rpc_port == 0:
            self._rpc_port = free_port()
        auth = "true" if self.username is not None else "false"
        root = self.root.resolve()
        conf = f"""\
# Rendered by fixloop.stack for a local influxd; not a production configuration.
reporting-disabled = true
# The backup/restore RPC port defaults to 8088 on every influxd: give each its own.
bind-address = "{LOOPBACK}:{self._rpc_port}"

[meta]
  dir = "{root / "meta"}"
  logging-enabled = false

[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "{LOOPBACK}:{self.port}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""
        _write_private(self.conf_path, conf)

    def _command(self) -> list[str]:
        binary = _find_binary("influxd", self._binary, "influxdb")
        return [binary, "-config", str(self.conf_path)]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1.0) as response:
                return bool(response.status == 204)
        except (OSError, urllib.error.URLError):
            return False

    def _after_start(self) -> None:
        if self.username is not None and self.password is not None:
            # The first user may be created without credentials; an existing user with
            # the same password makes this a no-op on restarts.
            name = self.username.replace('"', '\\"')
            secret = self.password.replace("'", "\\'")
            self.query(f"CREATE USER \"{name}\" WITH PASSWORD '{secret}' WITH ALL PRIVILEGES")
        self.create_database(self.database)

    def create_database(self, name: str) -> None:
        """Create database ``name`` (no-op when it exists)."""
        self.query(f"CREATE DATABASE {quote_ident(name)}")

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` and its data."""
        self.query(f"DROP DATABASE {quote_ident(name)}")

    def query(self, q: str, *, database: str | None = None) -> Any:
        """Run InfluxQL ``q`` via ``POST /query`` and return the decoded JSON answer.

        Raises:
            ConfigError: influxd answered an error (the test or setup is wrong).
        """
        params = {"q": q}
        if database is not None:
            params["db"] = database
        body = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}/query", data=body, method="POST")
        if self.username is not None and self.password is not None:
            # influxd 1.x reads u/p from the URL or Basic auth, never from a form body.
            pair = f"{self.username}:{self.password}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        try:
            with urllib.request.urlopen(request, timeout=10.0) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace").strip()
            raise ConfigError(f"influxd query failed ({exc.code}): {detail}") from exc
        except OSError as exc:
            raise ConfigError(f"influxd at {self.url} unreachable: {exc}") from exc
        for result in answer.get("results", []):
            if "error" in result:
                raise ConfigError(f"influxd query failed: {result['error']}")
        return answer
