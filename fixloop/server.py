"""A local server process (fixloop, the local stack): what every runner shares.

:class:`_Server` starts a server in its own directory, waits until it is ready, stops it
(a leftover from a killed parent first, by its pid file) and restarts it on the same
port; the runners (:class:`~fixloop.stack.MosquittoServer`,
:class:`~fixloop.stack.InfluxdServer`, :class:`~fixloop.pgserver.PostgresServer`) add
their configuration, command line and readiness check. Synchronous, for fixtures and
the command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from wire.errors import ConfigError

__all__ = ["LOOPBACK", "free_port", "lasting_port"]


LOOPBACK: Final = "127.0.0.1"
_POLL_S: Final = 0.02
_LOG = logging.getLogger(__name__)
_LOG_TAIL_LINES: Final = 15
_EPHEMERAL_RANGE_FILE: Final = "/proc/sys/net/ipv4/ip_local_port_range"
_DEFAULT_EPHEMERAL: Final = (32768, 60999)
# Lasting ports are picked at random from here up to the ephemeral range.
_LASTING_FIRST: Final = 20000
# Debian installs mosquitto in /usr/sbin, which a non-root PATH often lacks.
_EXTRA_BIN_DIRS: Final = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default if unknown)."""
    try:
        low, high = (int(part) for part in Path(_EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return (low, high) if 0 < low <= high < 65536 else _DEFAULT_EPHEMERAL


def lasting_port(host: str = LOOPBACK, taken: frozenset[int] = frozenset()) -> int:
    """Return a free TCP port outside the kernel's ephemeral range, for a server kept long.

    A port from :func:`free_port` lies in the range the kernel hands to outgoing
    connections, so between choosing it and binding it (or between two runs that reuse
    it) any client on the machine, including the stack's own, may hold it as its local
    port and the bind fails. Ports below the range are never handed out that way.

    Args:
        host: the address to bind.
        taken: ports already chosen for something else.

    Raises:
        ConfigError: no port below the ephemeral range is free.
    """
    low, _ = ephemeral_range()
    first = min(_LASTING_FIRST, max(1024, low // 2))
    candidates = list(range(first, low))
    random.shuffle(candidates)
    for port in candidates:
        if port not in taken and port_free(port, host):
            return port
    raise ConfigError(f"no free TCP port on {host} between {first} and {low - 1}")


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a server could listen on ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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
    #: The signal that asks the server to stop.
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(
        self,
        root: Path,
        *,
        startup_timeout_s: float,
        stop_timeout_s: float,
        die_with_parent: bool = False,
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self._port = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._deadline = 0.0

    @property
    def port(self) -> int:
        """TCP port (picked on first use when constructed with ``0``, kept across restarts)."""
        if self._port == 0:
            self._port = free_port()
        return self._port

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return LOOPBACK

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
            **self._spawn_options(),
        )

    def _spawn_options(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` arguments of this server (none by default)."""
        return {}

    def _failure(self, what: str) -> str:
        tail = self.log_tail().replace("\n", "\n  ")
        return f"{self.name} {what} (log {self.log_path}):\n  {tail}"

    def stop(self) -> None:
        """Stop the server: ``stop_signal``, then SIGKILL after ``stop_timeout_s``; wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
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


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
