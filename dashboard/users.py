"""Ops users kept in a file (dashboard: who may log in), managed by ``fixloop ops-users``.

The file is JSON, ``{"v": 1, "users": {"alice": {"role": "admin", "name": "Alice",
"password_hash": "scrypt$..."}}}``: only scrypt hashes (:func:`dashboard.auth.hash_password`)
are kept, never a password. Changes are read-modify-write under an exclusive lock on a
``.lock`` file beside it, and written to a temporary file that replaces the old one
(mode 0600), so two commands never lose each other's change and a running dashboard
never reads half a file.

:class:`OpsUsersFile` is also the dashboard's :class:`~dashboard.auth.UserStore`: it reads
the file again whenever it changed, so a user added or a password changed works at the
next login without a restart. :meth:`OpsUsersFile.changed_users` tells the service whose
sessions to end (removed users, new passwords, other roles).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from dashboard.auth import ROLE_RANK, OpsUser, Role
from notifier.errors import ConflictError, InvalidRequestError, NotFoundError
from wire.errors import ConfigError

__all__ = [
    "MIN_PASSWORD_CHARS",
    "USERNAME_PATTERN",
    "OpsUsersFile",
    "check_password",
    "check_username",
]

_LOG = logging.getLogger(__name__)

_VERSION: Final = 1
#: A login name: a letter or digit, then letters, digits and ``._@-`` (an e-mail works).
USERNAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
#: The shortest password ``fixloop ops-users`` accepts.
MIN_PASSWORD_CHARS: Final = 12
_MAX_PASSWORD_CHARS: Final = 1024
_NAME_LIMIT: Final = 120


def check_username(username: str) -> str:
    """Return ``username`` if it is a valid login name.

    Raises:
        InvalidRequestError: it is not.
    """
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise InvalidRequestError(
            f"user name {username!r}: 1-64 letters, digits and ._@-, starting with a letter "
            "or digit"
        )
    return username


def check_password(password: str) -> str:
    """Return ``password`` if it is long enough (and not absurdly long).

    Raises:
        InvalidRequestError: it is too short or too long.
    """
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidRequestError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > _MAX_PASSWORD_CHARS:
        raise InvalidRequestError(f"a password has at most {_MAX_PASSWORD_CHARS} characters")
    return password


_ROLES: Final[dict[str, Role]] = {"viewer": "viewer", "agent": "agent", "admin": "admin"}


def _role(value: object) -> Role:
    role = _ROLES.get(value) if isinstance(value, str) else None
    if role is None:
        raise InvalidRequestError(f"role {value!r}: one of {', '.join(ROLE_RANK)}")
    return role


@dataclass(frozen=True, slots=True)
class _Signature:
    """What tells a rewritten file from the one read before (a replace changes the inode)."""

    inode: int
    mtime_ns: int
    size: int


class OpsUsersFile:
    """The ops users file; a :class:`~dashboard.auth.UserStore` that follows its changes.

    Args:
        path: the file (created by the first :meth:`add`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._users: dict[str, OpsUser] = {}
        self._signature: _Signature | None = None
        # the users as :meth:`changed_users` last saw them
        self._known: dict[str, OpsUser] = {}

    # -- reading ---------------------------------------------------------------------

    def _stat(self) -> _Signature | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"ops users file {self.path}: {exc.strerror}") from exc
        return _Signature(st.st_ino, st.st_mtime_ns, st.st_size)

    def _parse(self, raw: bytes) -> dict[str, OpsUser]:
        where = f"ops users file {self.path}"
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("v") != _VERSION:
            raise ConfigError(f"{where}: not a version {_VERSION} users file")
        entries = doc.get("users")
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: 'users' must be a table")
        users: dict[str, OpsUser] = {}
        for username, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("password_hash"), str):
                raise ConfigError(f"{where}: user {username!r} has no password hash")
            try:
                users[username] = OpsUser(
                    username=check_username(username),
                    role=_role(entry.get("role")),
                    password_hash=entry["password_hash"],
                    name=str(entry.get("name") or ""),
                )
            except InvalidRequestError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        return users

    def load(self) -> dict[str, OpsUser]:
        """Read the file now (a missing file holds no users).

        Raises:
            ConfigError: the file cannot be read or is malformed.
        """
        signature = self._stat()
        if signature is None:
            users: dict[str, OpsUser] = {}
        else:
            try:
                raw = self.path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"ops users file {self.path}: {exc.strerror}") from exc
            users = self._parse(raw)
        self._users, self._signature = users, signature
        return dict(users)

    def refresh(self) -> None:
        """Read the file again if it changed since it was last read.

        Raises:
            ConfigError: the new file cannot be read or is malformed (the users read
                before stay in force).
        """
        if self._stat() != self._signature:
            self.load()

    def changed_users(self) -> set[str]:
        """Read the file again if it changed; return whose access changed since last asked.

        Returns:
            The users removed, or whose password or role changed, since the previous
            call (their sessions should end); empty on the first call.

        Raises:
            ConfigError: the new file cannot be read or is malformed (the users read
                before stay in force).
        """
        self.refresh()
        before, self._known = self._known, dict(self._users)
        return {
            name
            for name, user in before.items()
            if name not in self._users
            or self._users[name].password_hash != user.password_hash
            or self._users[name].role != user.role
        }

    async def get_user(self, username: str) -> OpsUser | None:
        """Return a user by login name, or ``None`` (the file is read again if it changed).

        A file made unreadable since keeps the users read before in force (and is logged).
        """
        try:
            await asyncio.to_thread(self.refresh)
        except ConfigError as exc:
            _LOG.error("%s; the users read before stay in force", exc)
        return self._users.get(username)

    def users(self) -> list[OpsUser]:
        """The users as last read, by login name."""
        return [self._users[name] for name in sorted(self._users)]

    # -- changing --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, OpsUser]]:
        """Hold the lock, yield the users read under it, write them back if no error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users = self.load()
            yield users
            self._write(users)
        finally:
            os.close(fd)

    def _write(self, users: Mapping[str, OpsUser]) -> None:
        doc: dict[str, Any] = {
            "v": _VERSION,
            "users": {
                name: {"role": user.role, "name": user.name, "password_hash": user.password_hash}
                for name, user in sorted(users.items())
            },
        }
        raw = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.load()

    def add(self, username: str, role: str, password_hash: str, name: str = "") -> OpsUser:
        """Add a user.

        Args:
            username: the login name.
            role: ``viewer``, ``agent`` or ``admin``.
            password_hash: from :func:`dashboard.auth.hash_password`.
            name: display name.

        Raises:
            ConflictError: the user exists.
            InvalidRequestError: a bad name or role.
        """
        user = OpsUser(check_username(username), _role(role), password_hash, _display_name(name))
        with self._locked() as users:
            if username in users:
                raise ConflictError(f"ops user {username} exists (change the password: passwd)")
            users[username] = user
        _LOG.info("ops user %s added (%s)", username, user.role)
        return user

    def set_password(self, username: str, password_hash: str) -> None:
        """Give a user a new password (their sessions end at the running dashboard).

        Raises:
            NotFoundError: no such user.
        """
        with self._locked() as users:
            user = users.get(username)
            if user is None:
                raise NotFoundError(f"no ops user {username}")
            users[username] = OpsUser(user.username, user.role, password_hash, user.name)
        _LOG.info("ops user %s: password changed", username)

    def remove(self, username: str) -> None:
        """Remove a user (their sessions end at the running dashboard).

        Raises:
            NotFoundError: no such user.
        """
        with self._locked() as users:
            if users.pop(username, None) is None:
                raise NotFoundError(f"no ops user {username}")
        _LOG.info("ops user %s removed", username)


def _display_name(name: str) -> str:
    text = " ".join(name.split())
    if len(text) > _NAME_LIMIT:
        raise InvalidRequestError(f"a display name has at most {_NAME_LIMIT} characters")
    return text
