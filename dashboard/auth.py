"""Ops users, their passwords, sessions and roles (dashboard: the door of the ops web app).

The manufacturer's service team logs in with a user name and password; the dashboard keeps
a random session id server-side (only its SHA-256 is held, with an expiry) and gives the
browser the id in an ``HttpOnly``, ``SameSite=Strict`` cookie, ``Secure`` whenever the
dashboard is reached over HTTPS. Every state-changing request must also carry the
session's CSRF token in the ``X-CSRF-Token`` header (compared in constant time), so a page
on another site can neither read nor forge a request. A session lives on through the
requests a person makes, not through the live stream (:meth:`SessionStore.peek`).

Passwords are stored as scrypt hashes with a random salt (``hashlib.scrypt``, RFC 7914),
encoded as ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64url, no padding). Hashing runs in a
worker thread: it is deliberately slow. Every login attempt is counted before its password
is checked, per source address and per account (:class:`LoginLimiter`); past a few free
failures each further one opens a delay that doubles, during which that source (or, for
sources the account has not logged in from, that account) is refused without checking a
password. Nobody is locked out: the right password from a clean address still gets in while
a guessing address waits.

Roles are ordered: ``viewer`` reads, ``agent`` also works person-needed cases (take over,
write to the owner, close), ``admin`` also starts campaigns.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

from wire.errors import ConfigError

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

    def peek(self, session_id: str) -> Session | None:
        """Return the live session of an id without extending it, or ``None``.

        For what the browser does on its own (the live stream and its heartbeats): only
        requests a person makes keep a session alive.
        """
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str) -> None:
        """End a session (logout); an unknown id is ignored."""
        self._sessions.pop(_digest(session_id), None)

    def end_user(self, username: str) -> int:
        """End every session of ``username`` (removed, or a new password or role).

        Returns:
            How many sessions ended.
        """
        keys = [key for key, session in self._sessions.items() if session.username == username]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def _purge(self, now: datetime) -> None:
        for key in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[key]


@dataclass(slots=True)
class _Tries:
    """Failed (or not yet judged) logins of one source or account."""

    failures: int
    #: the end of the delay the last failure opened (the failure's time, without one)
    blocked_until: datetime


class LoginLimiter:
    """Slows password guessing per source address and per account, without locking anyone out.

    Every attempt is counted *before* its password is checked, in one step with the
    check of the limits (no ``await`` in between), so parallel requests cannot all slip
    through before the first failure is counted; a login that then succeeds takes its
    count back. Past the free failures, each further failure opens a delay that doubles
    (``backoff_s``, ``2 * backoff_s`` ... up to ``max_backoff_s``) during which the
    source, or the account, is refused without checking a password. Counts are forgotten
    after ``window_s`` of quiet once the last delay ended.

    * **Per source address** (IPv6 by its /64, which one host usually owns):
      ``source_failures`` free failures, whatever the account.
    * **Per account**: ``account_failures`` free failures from all sources together
      (a guess spread over many addresses). Only a source's own free failures count
      towards its account: one source past its limit is slowed by that limit alone, so
      however long it keeps guessing, a clean address is not refused because of it.
      The account's delay applies only to sources the account has not logged in from
      lately (``trust_s``): its own people keep getting in during a spread-out guess.

    Args:
        clock: the wall clock.
        source_failures: free failures per source address.
        account_failures: free failures per account, over all sources.
        backoff_s: the first delay.
        max_backoff_s: the longest delay.
        window_s: quiet time after the last failure's delay after which failures are
            forgotten.
        trust_s: how long an address an account logged in from is spared the account's delay.
        max_keys: bound on the sources, accounts and trusted pairs tracked (oldest go first).

    Raises:
        ConfigError: a limit below 1 or a delay that is not positive.
    """

    def __init__(
        self,
        clock: Callable[[], datetime],
        *,
        source_failures: int = 5,
        account_failures: int = 20,
        backoff_s: float = 1.0,
        max_backoff_s: float = 900.0,
        window_s: float = 300.0,
        trust_s: float = 30 * 86_400.0,
        max_keys: int = 10_000,
    ) -> None:
        if source_failures < 1 or account_failures < 1 or max_keys < 1:
            raise ConfigError("login limits must be at least 1")
        if not 0 < backoff_s <= max_backoff_s or window_s <= 0 or trust_s < 0:
            raise ConfigError("login delays need 0 < backoff_s <= max_backoff_s, window_s > 0")
        self._clock = clock
        self._source_free = source_failures
        self._account_free = account_failures
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._window = timedelta(seconds=window_s)
        self._trust = timedelta(seconds=trust_s)
        self._max_keys = max_keys
        self._sources: OrderedDict[str, _Tries] = OrderedDict()
        self._accounts: OrderedDict[str, _Tries] = OrderedDict()
        self._trusted: OrderedDict[tuple[str, str], datetime] = OrderedDict()

    @staticmethod
    def source_key(address: str) -> str:
        """The key a source address is counted under (an IPv6 address by its /64)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip if ip.version == 4 else ip.ipv4_mapped)

    def delay_s(self, failures: int, free: int) -> float:
        """The delay after ``failures`` failures with ``free`` free ones (0: none)."""
        if failures < free:
            return 0.0
        steps = min(failures - free, 60)  # 2**60 s is far past any cap
        return min(self._max_backoff_s, self._backoff_s * 2.0**steps)

    def _live(self, table: OrderedDict[str, _Tries], key: str, now: datetime) -> _Tries | None:
        tries = table.get(key)
        # quiet for the window after the last failure and after its delay ended
        if tries is not None and now - tries.blocked_until >= self._window:
            del table[key]
            return None
        return tries

    def _is_trusted(self, account: str, source: str, now: datetime) -> bool:
        until = self._trusted.get((account, source))
        if until is None:
            return False
        if now >= until:
            del self._trusted[(account, source)]
            return False
        return True

    def _count(self, table: OrderedDict[str, _Tries], key: str, free: int, now: datetime) -> int:
        """Count one failure under ``key``; return the failures counted now."""
        tries = self._live(table, key, now)
        if tries is None:
            tries = table[key] = _Tries(0, now)
        tries.failures += 1
        wait = timedelta(seconds=self.delay_s(tries.failures, free))
        tries.blocked_until = max(tries.blocked_until, now + wait)
        table.move_to_end(key)
        while len(table) > self._max_keys:
            table.popitem(last=False)
        return tries.failures

    def begin(self, account: str, address: str) -> float:
        """Count one login attempt before its password is checked, or refuse it.

        Synchronous on purpose: the limits are checked and the attempt counted in one
        step, so concurrent attempts cannot pass the check before one of them is counted.

        Args:
            account: the user name as typed (compared case-insensitively).
            address: the client's address.

        Returns:
            0 when the attempt is counted and the password may be checked; else the
            seconds until this source may try this account again (nothing counted).
        """
        now = self._clock()
        account, source = account.casefold(), self.source_key(address)
        waits = [0.0]
        by_source = self._live(self._sources, source, now)
        if by_source is not None:
            waits.append((by_source.blocked_until - now).total_seconds())
        by_account = self._live(self._accounts, account, now)
        if by_account is not None and not self._is_trusted(account, source, now):
            waits.append((by_account.blocked_until - now).total_seconds())
        wait_s = max(waits)
        if wait_s > 0:
            return wait_s
        if self._count(self._sources, source, self._source_free, now) <= self._source_free:
            self._count(self._accounts, account, self._account_free, now)
        return 0.0

    def succeeded(self, account: str, address: str) -> None:
        """Take back the count of an attempt whose password was right, and trust its source.

        The count is taken back from the source and the account (a running delay ends only
        if that brings the count below the free failures); the source is spared the
        account's delay for ``trust_s``.
        """
        now = self._clock()
        account, source = account.casefold(), self.source_key(address)
        by_source = self._sources.get(source)
        counted = [(self._sources, source, self._source_free)]
        if by_source is None or by_source.failures <= self._source_free:
            counted.append((self._accounts, account, self._account_free))  # as begin() did
        for table, key, free in counted:
            tries = table.get(key)
            if tries is None:
                continue
            tries.failures = max(0, tries.failures - 1)
            if tries.failures == 0 and now >= tries.blocked_until:
                del table[key]
            elif tries.failures < free:
                tries.blocked_until = min(tries.blocked_until, now)
        if self._trust:
            self._trusted[(account, source)] = now + self._trust
            self._trusted.move_to_end((account, source))
            while len(self._trusted) > self._max_keys:
                self._trusted.popitem(last=False)
