"""Ops users, their passwords, sessions and roles (dashboard: the door of the ops web app).

The manufacturer's service team logs in with a user name and password; the dashboard keeps
a random session id server-side (only its SHA-256 is held, with an expiry) and gives the
browser the id in an ``HttpOnly``, ``SameSite=Strict`` cookie. Every state-changing request
must also carry the session's CSRF token in the ``X-CSRF-Token`` header (compared in
constant time), so a page on another site can neither read nor forge a request.

Passwords are stored as scrypt hashes with a random salt (``hashlib.scrypt``, RFC 7914),
encoded as ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64url, no padding). Hashing runs in a
worker thread: it is deliberately slow. Failed logins are counted per user name and per
client address; past the limit, logins are refused for a while without checking the
password.

Roles are ordered: ``viewer`` reads, ``agent`` also works person-needed cases (take over,
write to the owner, close), ``admin`` also starts campaigns.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

from gateway.errors import ConfigError

__all__ = [
    "ROLE_RANK",
    "LoginLimiter",
    "MappingUsers",
    "OpsUser",
    "Role",
    "Session",
    "SessionStore",
    "UserStore",
    "check_login",
    "has_role",
    "hash_password",
    "verify_password",
]

_LOG = logging.getLogger(__name__)

Role = Literal["viewer", "agent", "admin"]
#: Roles by rank: a role may do everything a lower one may.
ROLE_RANK: Final[Mapping[str, int]] = {"viewer": 0, "agent": 1, "admin": 2}

# scrypt cost: 2**14 x 8 x 1 uses 16 MiB and about 50 ms per hash (OWASP's minimum for
# scrypt is N=2**17 with r=8 at p=1, or the same memory spread; we keep p adjustable).
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32
# Parameters read from a stored hash are bounded so a bad entry cannot exhaust memory.
_MAX_N: Final = 2**20
_MAX_MEM: Final = 256 * 1024 * 1024


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = 1) -> str:
    """Hash a password with scrypt and a fresh random salt.

    Args:
        password: the password.
        n: CPU/memory cost (a power of two).
        r: block size.
        p: parallelism.

    Returns:
        ``scrypt$<n>$<r>$<p>$<salt>$<hash>``, for :class:`OpsUser.password_hash`.
    """
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEM, dklen=_HASH_BYTES
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a hash from :func:`hash_password`.

    A malformed hash or one with out-of-range parameters never matches.
    """
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        return False
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    if not expected or 128 * r * n * p > _MAX_MEM:
        return False
    try:
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=n,
            r=r,
            p=p,
            maxmem=_MAX_MEM,
            dklen=len(expected),
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


# A hash to check unknown user names against, so that they take as long as known ones.
_DUMMY_HASH: Final = hash_password(secrets.token_urlsafe(16))


def has_role(role: str, needed: Role) -> bool:
    """Whether ``role`` may do what ``needed`` may."""
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[needed]


@dataclass(frozen=True, slots=True)
class OpsUser:
    """A member of the manufacturer's ops team.

    Attributes:
        username: login name.
        role: ``viewer``, ``agent`` or ``admin``.
        password_hash: from :func:`hash_password`.
        name: display name (the user name when empty).
    """

    username: str
    role: Role
    password_hash: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLE_RANK:
            raise ConfigError(f"unknown ops role {self.role!r}")

    def __repr__(self) -> str:
        # the hash is not a password, but it has no business in logs either
        return f"OpsUser(username={self.username!r}, role={self.role!r})"


class UserStore(Protocol):
    """Where ops users are looked up."""

    async def get_user(self, username: str) -> OpsUser | None:
        """Return a user by login name, or ``None``."""


class MappingUsers:
    """A :class:`UserStore` over a fixed mapping of user name to user.

    Args:
        users: the users by login name.
    """

    def __init__(self, users: Mapping[str, OpsUser]) -> None:
        self._users = dict(users)

    async def get_user(self, username: str) -> OpsUser | None:
        """Return a user by login name, or ``None``."""
        return self._users.get(username)


async def check_login(users: UserStore, username: str, password: str) -> OpsUser | None:
    """Return the user if the password is right (hashing in a worker thread), else ``None``."""
    user = await users.get_user(username)
    encoded = user.password_hash if user is not None else _DUMMY_HASH
    matched = await asyncio.to_thread(verify_password, password, encoded)
    return user if matched and user is not None else None


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in ops user.

    Attributes:
        username: who.
        role: their role at login.
        csrf_token: the token state-changing requests must carry.
        created_at: login time.
        expires_at: when the session ends (extended on use, up to ``created_at`` plus
            the absolute limit).
    """

    username: str
    role: Role
    csrf_token: str
    created_at: datetime
    expires_at: datetime


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class SessionStore:
    """Server-side sessions in memory, keyed by the SHA-256 of the session id.

    Sessions last ``idle_s`` after their last use, and never longer than ``max_age_s``
    after login. The store holds at most ``max_sessions``; past that, expired ones go
    first, then the oldest.

    Args:
        clock: the wall clock (UTC-aware).
        idle_s: how long an unused session lives.
        max_age_s: how long any session lives.
        max_sessions: bound on the number kept.
    """

    def __init__(
        self,
        clock: Callable[[], datetime],
        *,
        idle_s: float = 3600.0,
        max_age_s: float = 12 * 3600.0,
        max_sessions: int = 10_000,
    ) -> None:
        self._clock = clock
        self._idle = timedelta(seconds=idle_s)
        self._max_age = timedelta(seconds=max_age_s)
        self._max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user: OpsUser) -> tuple[str, Session]:
        """Start a session for ``user``; return the session id (for the cookie) and it."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(
            username=user.username,
            role=user.role,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=min(now + self._idle, now + self._max_age),
        )
        if len(self._sessions) >= self._max_sessions:
            self._purge(now)
        while len(self._sessions) >= self._max_sessions:
            self._sessions.popitem(last=False)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """Return the live session of an id (and extend it), or ``None``."""
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now >= session.expires_at:
            del self._sessions[key]
            return None
        extended = min(now + self._idle, session.created_at + self._max_age)
        if extended > session.expires_at:
            session = replace(session, expires_at=extended)
            self._sessions[key] = session
        return session

    def end(self, session_id: str) -> None:
        """End a session (logout); an unknown id is ignored."""
        self._sessions.pop(_digest(session_id), None)

    def _purge(self, now: datetime) -> None:
        for key in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[key]


class LoginLimiter:
    """Counts failed logins per user name and per client address in a sliding window.

    Args:
        clock: the wall clock.
        max_failures: failures in the window after which logins are refused.
        window_s: the window, also how long the refusal lasts after the last failure.
        max_keys: bound on the names and addresses tracked (oldest go first).
    """

    def __init__(
        self,
        clock: Callable[[], datetime],
        *,
        max_failures: int = 5,
        window_s: float = 300.0,
        max_keys: int = 10_000,
    ) -> None:
        self._clock = clock
        self._max = max_failures
        self._window = timedelta(seconds=window_s)
        self._max_keys = max_keys
        self._failures: OrderedDict[str, deque[datetime]] = OrderedDict()

    def _recent(self, key: str, now: datetime) -> deque[datetime] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and now - times[0] >= self._window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after_s(self, *keys: str) -> float:
        """Seconds until a login for these keys is allowed again (0: allowed now)."""
        now = self._clock()
        wait_s = 0.0
        for key in keys:
            times = self._recent(key, now)
            if times is not None and len(times) >= self._max:
                until = times[-self._max] + self._window
                wait_s = max(wait_s, (until - now).total_seconds())
        return wait_s

    def failed(self, *keys: str) -> None:
        """Count one failed login for each key."""
        now = self._clock()
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                times = self._failures[key] = deque(maxlen=self._max)
            times.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of these keys."""
        for key in keys:
            self._failures.pop(key, None)
