"""A local PostgreSQL server (fixloop, the local stack), for the case store's tests.

The PostgreSQL case store (:mod:`notifier.postgres`) is tested against a real server:
``tests/conftest.py`` starts one with :class:`PostgresServer` in a temporary folder on a
free loopback port. Synchronous, like the other runners (:mod:`fixloop.server`).
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from fixloop.server import LOOPBACK, _find_binary, _Server
from wire.errors import ConfigError

__all__ = ["PostgresServer"]


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
    # Fast shutdown: clients are disconnected, data kept. SIGTERM would wait for every
    # client to leave, and a pool keeps its connections.
    stop_signal = signal.SIGINT

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
            port=port,
        )
        self.database = database
        self.superuser = superuser
        self.durable = durable
        self.max_connections = max_connections
        self._bin_dir = bin_dir
        self._run_as = run_as

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

    def _spawn_options(self) -> dict[str, Any]:
        return self._as_user(self._user())

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
