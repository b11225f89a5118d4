"""Local stack runner: a real mosquitto, influxd and PostgreSQL on loopback ports.

Used by ``fixloop up`` (a small install on one machine) and by the test fixtures
(``tests/conftest.py``; PostgreSQL serves the case store's tests only). Each server
lives in its own directory, on a free port unless told otherwise, and is configured by
the same renderers as production (:mod:`fixloop.broker` for the broker). The runners are
synchronous: they start and stop processes and wait for them, which is what fixtures and
the command line need.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import getpass
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

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
from wire.errors import ConfigError
from wire.influxql import quote_ident

__all__ = ["InfluxdServer", "MosquittoServer", "PostgresServer", "free_port"]

LOOPBACK: Final = "127.0.0.1"
_POLL_S: Final = 0.02
_LOG = logging.getLogger(__name__)
_LOG_TAIL_LINES: Final = 15
# Debian installs mosquitto in /usr/sbin, which a non-root PATH often lacks.
_EXTRA_BIN_DIRS: Final = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _find_binary(name: str, binary: str | None, package: str) -> str:
    hint = f"install it: apt-get install {package}"
    if binary is not None:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return binary
        found = shutil.which(binary)
        if found is None:
            raise ConfigError(f"{name} binary {binary!r} not found; {hint}")
        return found
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_BIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise ConfigError(f"{name} not found on PATH; {hint}")
    return found


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


#: prctl(2) option: the signal a process gets when the thread that started it ends.
_PR_SET_PDEATHSIG: Final = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child get SIGTERM when its parent dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere ``None``, and a server left
    behind by a killed parent is stopped at the next start instead (the pid file). The
    C function is looked up here, in the parent, so the child between fork and exec
    runs no more than one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    option = ctypes.c_int(_PR_SET_PDEATHSIG)
    sigterm = ctypes.c_ulong(signal.SIGTERM)
    zero = ctypes.c_ulong(0)

    def arm() -> None:
        prctl(option, sigterm, zero, zero, zero)
        if os.getppid() != parent:  # the parent died before the call above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class _Server:
    """Process handling shared by the servers: start, wait until ready, stop, restart."""

    name: str = "server"

    def __init__(
        self,
        root: Path,
        *,
        startup_timeout_s: float,
        stop_timeout_s: float,
        die_with_parent: bool = False,
    ) -> None:
        self.root = Path(root)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._deadline = 0.0

    @property
    def log_path(self) -> Path:
        """File that collects the server's log and console output."""
        return self.root / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        """File holding the pid of the server this folder's last start spawned."""
        return self.root / f"{self.name}.pid"

    def _stop_leftover(self) -> None:
        """Stop a server an earlier run of this folder left behind (that run was killed).

        Only a live process whose command line names this folder is stopped, so a reused
        pid of another program is left alone.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.root).encode() not in cmdline or pid == os.getpid():
            return
        _LOG.warning(
            "stopping the %s an earlier run left behind on %s (pid %d)", self.name, self.root, pid
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def _prepare(self) -> None:
        """Write configuration files; called before every start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _after_start(self) -> None:
        """Run once the server answers (create databases ...)."""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines the server logged since its last start."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start the server and wait until it is ready (:meth:`launch`, :meth:`wait_ready`).

        Returns:
            ``self``.

        Raises:
            ConfigError: the binary is missing, or the server exits or does not get ready
                within ``startup_timeout_s`` (the message carries the end of its log).
        """
        if self.running:
            return self
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the server process without waiting for it to be ready.

        With ``die_with_parent`` the kernel stops the server (SIGTERM) when the thread
        that launched it ends, so call this from a thread that lives as long as the
        program (the main thread), and wait with :meth:`wait_ready` from any thread.

        Raises:
            ConfigError: the binary is missing.
        """
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self._prepare()
        command = self._command()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = self._spawn(command, log)
        self.pid_path.write_text(f"{self._proc.pid}\n")
        self._deadline = time.monotonic() + self.startup_timeout_s

    def wait_ready(self) -> Self:
        """Wait until the launched server answers, then run its first-start work.

        Returns:
            ``self``.

        Raises:
            ConfigError: not launched, or the server exits or does not get ready within
                ``startup_timeout_s`` of its launch (the message carries the end of its log).
        """
        proc = self._proc
        if proc is None:
            raise ConfigError(f"{self.name} was not launched")
        # Alive first, then ready: a foreign server that grabbed our port in the meantime
        # must not pass for ours.
        while proc.poll() is not None or not self._ready():
            if proc.poll() is not None:
                code = proc.returncode
                self._proc = None
                raise ConfigError(self._failure(f"exited with status {code}"))
            if time.monotonic() > self._deadline:
                self.kill()
                raise ConfigError(self._failure(f"not ready after {self.startup_timeout_s:g} s"))
            time.sleep(_POLL_S)
        try:
            self._after_start()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, command: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        # Own session: a Ctrl-C meant for the test run or `fixloop up` must not reach the
        # server before we stop it in order.
        return subprocess.Popen(
            command,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal() if self.die_with_parent else None,
        )

    def _failure(self, what: str) -> str:
        tail = self.log_tail().replace("\n", "\n  ")
        return f"{self.name} {what} (log {self.log_path}):\n  {tail}"

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``stop_timeout_s``; wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash: nothing is saved) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
        self._port = port

    @property
    def port(self) -> int:
        """TCP port of the broker (picked on first use when constructed with ``0``)."""
        if self._port == 0:
            self._port = free_port()
        return self._port

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
        )
        if (username is None) != (password is None):
            raise ConfigError("influxd: username and password go together")
        self.database = database
        self.username = username
        self.password = password
        self._binary = binary
        self._port = port
        self._rpc_port = 0

    @property
    def port(self) -> int:
        """HTTP port (picked on first use when constructed with ``0``)."""
        if self._port == 0:
            self._port = free_port()
        return self._port

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return LOOPBACK

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


class PostgresServer(_Server):
    """A PostgreSQL server (Debian's ``postgresql``) in its own folder on a free loopback port.

    ``initdb`` makes the cluster on first start (superuser ``superuser``, trust
    authentication on loopback TCP only: no Unix socket); the database ``database`` is
    created after every start if missing. PostgreSQL refuses to run as root: when this
    process is root, ``initdb`` and ``postgres`` run as the unprivileged ``run_as`` user
    (``postgres`` when it exists, else ``nobody``), and ``root`` is handed to it, so
    ``root`` and its parents must be open to that user (a folder in ``/tmp``).

    For tests, ``durable=False`` turns off ``fsync`` and synchronous commits: fast,
    and a machine crash may lose the data.
    """

    name = "postgres"

    def __init__(
        self,
        root: Path,
        *,
        database: str = "fixloop",
        superuser: str = "fixloop",
        port: int = 0,
        bin_dir: str | None = None,
        run_as: str | None = None,
        durable: bool = True,
        max_connections: int = 100,
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        die_with_parent: bool = False,
    ) -> None:
        """Prepare a PostgreSQL server; nothing runs until :meth:`start`.

        Args:
            root: directory of its data (``root/data``) and log.
            database: database created after a start when missing.
            superuser: the cluster's superuser (trusted on loopback).
            port: TCP port; ``0`` picks a free one, kept across restarts.
            bin_dir: folder of ``initdb``, ``postgres``, ``pg_isready`` and ``psql``;
                the newest ``/usr/lib/postgresql/*/bin`` (Debian) or PATH if ``None``.
            run_as: the user to run as when this process is root (see above).
            durable: whether commits are flushed to disk (``False``: tests only).
            max_connections: PostgreSQL's ``max_connections``.
            startup_timeout_s: how long to wait until it accepts connections.
            stop_timeout_s: how long to wait after SIGINT (fast shutdown) before SIGKILL.
            die_with_parent: the server gets SIGTERM when the thread that launched it
                ends (Linux; see :meth:`launch`).
        """
        super().__init__(
            root,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
            die_with_parent=die_with_parent,
        )
        self.database = database
        self.superuser = superuser
        self.durable = durable
        self.max_connections = max_connections
        self._port = port
        self._bin_dir = bin_dir
        self._run_as = run_as

    @property
    def port(self) -> int:
        """TCP port (picked on first use when constructed with ``0``)."""
        if self._port == 0:
            self._port = free_port()
        return self._port

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return LOOPBACK

    @property
    def data_dir(self) -> Path:
        """The cluster's data folder."""
        return self.root / "data"

    def url(self, database: str | None = None) -> str:
        """A ``postgresql://`` URL of ``database`` (the default database if ``None``)."""
        name = urllib.parse.quote(database or self.database, safe="")
        return f"postgresql://{self.superuser}@{LOOPBACK}:{self.port}/{name}"

    def _binary(self, name: str) -> str:
        if self._bin_dir is None:
            debian = sorted(
                Path("/usr/lib/postgresql").glob("*/bin"),
                key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
            )
            self._bin_dir = str(debian[-1]) if debian else ""
        if self._bin_dir:
            found = Path(self._bin_dir) / name
            if found.is_file() and os.access(found, os.X_OK):
                return str(found)
        return _find_binary(name, None, "postgresql")

    def _user(self) -> tuple[int, int] | None:
        """The uid and gid to run the server as (``None``: as this process)."""
        if os.geteuid() != 0:
            return None
        names = [self._run_as] if self._run_as else ["postgres", "nobody"]
        for name in names:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return entry.pw_uid, entry.pw_gid
        raise ConfigError(f"postgres refuses to run as root, and there is no user {names[0]!r}")

    def _prepare(self) -> None:
        user = self._user()
        if user is not None:
            for parent in self.root.resolve().parents:
                mode = parent.stat()
                if not mode.st_mode & 0o001 and mode.st_uid != user[0]:
                    raise ConfigError(
                        f"postgres runs as an unprivileged user, who cannot enter {parent}: "
                        f"put its folder elsewhere (in /tmp, for one), not in {self.root}"
                    )
            os.chown(self.root, *user)
            os.chmod(self.root, 0o700)
        if (self.data_dir / "PG_VERSION").is_file():
            return
        command = [
            self._binary("initdb"),
            *("--pgdata", str(self.data_dir), "--username", self.superuser),
            *("--auth", "trust", "--encoding", "UTF8", "--locale", "C.UTF-8"),
        ]
        if not self.durable:
            command.append("--no-sync")
        with self.log_path.open("ab") as log:
            done = subprocess.run(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                **self._as_user(user),
            )
        if done.returncode != 0:
            raise ConfigError(self._failure(f"initdb exited with status {done.returncode}"))

    @staticmethod
    def _as_user(user: tuple[int, int] | None) -> dict[str, Any]:
        if user is None:
            return {}
        return {"user": user[0], "group": user[1], "extra_groups": []}

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": str(self.max_connections),
            "logging_collector": "off",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [self._binary("postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _spawn(self, command: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal() if self.die_with_parent else None,
            **self._as_user(self._user()),
        )

    def stop(self) -> None:
        """Stop the server: fast shutdown (SIGINT: clients are disconnected, data kept).

        SIGTERM would wait for every client to leave, and a pool keeps its connections.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def _ready(self) -> bool:
        done = subprocess.run(
            [self._binary("pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return done.returncode == 0

    def _after_start(self) -> None:
        found = self.execute(
            f"SELECT 1 FROM pg_database WHERE datname = {_pg_literal(self.database)}"
        )
        if not found.strip():
            self.create_database(self.database)

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """Create database ``name``, a copy of ``template`` if given."""
        copy = "" if template is None else f" TEMPLATE {_pg_ident(template)}"
        self.execute(f"CREATE DATABASE {_pg_ident(name)}{copy}")

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` (closing its sessions) if it exists."""
        self.execute(f"DROP DATABASE IF EXISTS {_pg_ident(name)} WITH (FORCE)")

    def dump(self, database: str) -> bytes:
        """Every row of ``database`` as ``pg_dump --data-only`` writes them (for checks)."""
        done = subprocess.run(
            [
                self._binary("pg_dump"),
                *("--data-only", "--host", LOOPBACK, "--port", str(self.port)),
                *("--username", self.superuser, "--dbname", database),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60.0,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigError(f"pg_dump failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def execute(self, sql: str, *, database: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` as the superuser and return its output (tuples only).

        Raises:
            ConfigError: the statement failed (the message carries PostgreSQL's).
        """
        done = subprocess.run(
            [
                self._binary("psql"),
                "--no-psqlrc",
                "--quiet",
                "--tuples-only",
                "--no-align",
                "--set",
                "ON_ERROR_STOP=1",
                "--host",
                LOOPBACK,
                "--port",
                str(self.port),
                "--username",
                self.superuser,
                "--dbname",
                database,
                "--command",
                sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60.0,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigError(f"psql failed: {done.stderr.strip()}")
        return done.stdout


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pg_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
