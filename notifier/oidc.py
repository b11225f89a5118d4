"""Owners' identity from the manufacturer's identity provider (notifier; owner API -> here).

A manufacturer's app already signs its users in with its own OpenID Connect provider, so
the owner API takes that provider's access tokens (JWT, RFC 9068) beside fixloop's own
bearer tokens, and maps them to owners by subject: the pair (``iss``, ``sub``) is linked
to one owner in the case store (:meth:`~notifier.store.CaseStore.owner_of_subject`).

How it works:

* **Keys.** :class:`ProviderKeys` fetches the provider's JSON Web Key Set from
  ``jwks_url``, or from the ``jwks_uri`` of ``{issuer}/.well-known/openid-configuration``
  (OpenID Connect Discovery 1.0; that document's ``issuer`` must be the configured one,
  §4.3). Keys are used for ``jwks_ttl_s``, then fetched again. A token naming a key id
  (``kid``) the set lacks makes it fetch the set anew (the provider rotated its keys),
  but never more often than ``refetch_min_interval_s``, so tokens with made-up key ids
  cannot make us hammer the provider. One fetch runs at a time. If a fetch fails, the
  keys already held stay in use (a provider that is briefly down does not sign everyone
  out); with no key for the token a failed fetch answers 503, never a crash.
* **Requests out.** Every request to the provider has a deadline (``timeout_s``),
  follows no redirect and reads at most :data:`MAX_DOCUMENT_BYTES`. Provider URLs must
  be ``https`` without credentials (plain ``http`` only with ``allow_http``, for tests
  and local installs); the issuer is configured by the operator, so it may be internal.
* **Signatures.** RS256 (RSA keys of at least 2048 bits) and ES256 (P-256) only: a token
  whose header names ``none``, an HMAC algorithm or anything else is refused before any
  key is looked at, and the key must be of the algorithm's type, so a public key can
  never serve as an HMAC secret (algorithm confusion). Keys the set marks for
  encryption, keys with private parts, and keys bound (``alg``) to another algorithm are
  ignored. Headers that point at keys elsewhere (``jku``, ``x5u``, ``jwk``) are never
  followed; a ``crit`` header is refused (RFC 7515 §4.1.11).
* **Claims.** ``iss`` must be the issuer exactly, ``aud`` must name the audience,
  ``exp`` and ``iat`` must be there and ``sub`` a non-empty string; ``exp``, ``nbf``
  (when present) and ``iat`` are checked against the clock with ``leeway_s``.
* **Owners.** A subject linked to no owner is refused (:class:`UnknownSubjectError`, 403)
  unless ``auto_create`` is on: then its first request makes a new owner (named by the
  token's ``given_name`` or ``name`` if it carries one) and links the subject to it, in
  one store transaction. Nothing here logs tokens, subjects or names.

Errors (under :mod:`wire.errors`): :class:`InvalidAccessTokenError` (a
``PermanentError``: the API answers 401), :class:`UnknownSubjectError` (a
:class:`~notifier.errors.ForbiddenError`: 403), :class:`KeysUnavailableError` (a
``TransientError``: 503, try again).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from notifier.errors import ForbiddenError
from notifier.model import Owner
from notifier.store import CaseStore
from wire.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from notifier.settings import OidcSettings

__all__ = [
    "ALGORITHMS",
    "MAX_DOCUMENT_BYTES",
    "MAX_TOKEN_CHARS",
    "AccessClaims",
    "InvalidAccessTokenError",
    "KeysUnavailableError",
    "OidcOwners",
    "ProviderKeys",
    "UnknownSubjectError",
    "looks_like_jwt",
    "url_problem",
]

_LOG = logging.getLogger(__name__)

#: The signing algorithms taken, with the key type each needs.
ALGORITHMS: Final[Mapping[str, str]] = {"RS256": "RSA", "ES256": "EC"}
#: The longest token looked at (longer: 401 without parsing).
MAX_TOKEN_CHARS: Final = 8_192
#: The largest discovery document or key set read from the provider.
MAX_DOCUMENT_BYTES: Final = 256 * 1024
#: Most keys taken from one key set.
_MAX_KEYS: Final = 64
_MIN_RSA_BITS: Final = 2_048
_MAX_SUBJECT_CHARS: Final = 255
_MAX_NAME_CHARS: Final = 80
_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_LANGUAGE: Final = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")


class InvalidAccessTokenError(PermanentError):
    """The token is not a valid access token of the provider for this API (401)."""


class UnknownSubjectError(ForbiddenError):
    """A valid token whose subject is linked to no owner, and owners are not made (403)."""


class KeysUnavailableError(TransientError):
    """The provider's keys could not be fetched, and none held can check the token (503)."""


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token has the form of a JWT (three base64url parts)."""
    return len(token) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(token) is not None


def url_problem(url: str, *, allow_http: bool = False) -> str | None:
    """Say what keeps ``url`` from being a provider URL, or ``None`` if it may be one.

    Args:
        url: the issuer, key set or discovery URL.
        allow_http: plain ``http`` is allowed (tests and local installs).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a URL"
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        return "must be an https URL" if not allow_http else "must be an http(s) URL"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not hold credentials"
    if port == 0:
        return "has port 0"
    if parts.fragment:
        return "must not have a fragment"
    return None


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """One signing key of the provider: its id, its algorithm and the public key."""

    kid: str | None
    algorithm: str
    key: Any


def _read_key(jwk: Mapping[str, Any]) -> _Key | None:
    """The signing key a JWK describes, or ``None`` for one not taken (with why, logged)."""
    kty, kid = jwk.get("kty"), jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    if jwk.get("use", "sig") != "sig":
        return None  # an encryption key: not for signatures
    if "d" in jwk:
        _LOG.warning("the identity provider's key set shows a private key (%s): ignored", kid)
        return None
    algorithm = next((alg for alg, key_type in ALGORITHMS.items() if key_type == kty), None)
    if algorithm is None or jwk.get("alg", algorithm) != algorithm:
        return None
    if kty == "EC" and jwk.get("crv") != "P-256":
        return None
    try:
        key = jwt.PyJWK(dict(jwk), algorithm).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
        _LOG.warning("the identity provider's key %s cannot be read: %s", kid, exc)
        return None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            _LOG.warning("the identity provider's key %s is shorter than 2048 bits", kid)
            return None
    elif not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return _Key(kid, algorithm, key)


def _read_key_set(document: Any) -> list[_Key]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysUnavailableError("the identity provider's key set has no 'keys' list")
    keys = [
        key
        for jwk in document["keys"][:_MAX_KEYS]
        if isinstance(jwk, dict) and (key := _read_key(jwk)) is not None
    ]
    if not keys:
        _LOG.warning("the identity provider's key set holds no RS256 or ES256 signing key")
    return keys


class ProviderKeys:
    """The provider's signing keys: fetched, kept for a while, fetched again on rotation.

    Use it with ``async with`` (it owns an HTTP session).

    Args:
        issuer: the issuer URL (for discovery and to check the discovery document).
        jwks_url: the key set's URL (``None``: discovered from the issuer).
        ttl_s: how long fetched keys are used before they are fetched again.
        refetch_min_interval_s: least time between two fetches.
        timeout_s: the longest one request may take.
        allow_http: plain-http provider URLs are allowed.
        monotonic: the clock for the two intervals (seconds).
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str | None = None,
        ttl_s: float = 3_600.0,
        refetch_min_interval_s: float = 30.0,
        timeout_s: float = 5.0,
        allow_http: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._jwks_url = jwks_url
        self._ttl_s = ttl_s
        self._min_interval_s = refetch_min_interval_s
        self._timeout_s = timeout_s
        self._allow_http = allow_http
        self._monotonic = monotonic
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._keys: list[_Key] | None = None  # None: never fetched
        self._fetched_at = 0.0
        self._tried_at: float | None = None
        self._last_failed = False
        #: fetches of the key set tried, and of those failed
        self.fetches = 0
        self.failures = 0

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"User-Agent": "fixloop-notifier", "Accept": "application/json"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def key_for(self, kid: str | None, algorithm: str) -> Any:
        """The public key that checks a token with this header.

        Args:
            kid: the token's ``kid`` (``None``: the set's only key for the algorithm).
            algorithm: the token's ``alg`` (one of :data:`ALGORITHMS`).

        Returns:
            The key (a ``cryptography`` public key of the algorithm's type).

        Raises:
            InvalidAccessTokenError: the provider has no such key.
            KeysUnavailableError: the keys could not be fetched, and none held fits.
        """
        # one request makes at most one fetch, however many wait for the lock
        seen = self.fetches
        expired = self._monotonic() - self._fetched_at >= self._ttl_s
        # past the TTL with keys held, a request does not wait for a fetch under way
        if self._keys is None or (expired and not self._lock.locked()):
            await self._refresh(seen)
        key = self._find(kid, algorithm)
        if key is None and self._keys is not None:
            # an unknown key id: the provider may have rotated its keys since
            await self._refresh(seen)
            key = self._find(kid, algorithm)
        if key is not None:
            return key.key
        if self._keys is None or self._last_failed:
            raise KeysUnavailableError("the identity provider's keys cannot be fetched just now")
        raise InvalidAccessTokenError("the token is signed with a key the provider does not list")

    def _find(self, kid: str | None, algorithm: str) -> _Key | None:
        fitting = [key for key in self._keys or () if key.algorithm == algorithm]
        if kid is not None:
            return next((key for key in fitting if key.kid == kid), None)
        return fitting[0] if len(fitting) == 1 else None

    async def _refresh(self, seen: int) -> None:
        """Fetch the key set, unless a fetch was tried after the ``seen``-th or too lately."""
        async with self._lock:
            now = self._monotonic()
            tried = self._tried_at
            if self.fetches != seen or (tried is not None and now - tried < self._min_interval_s):
                return
            self._tried_at = now
            self.fetches += 1
            try:
                keys = _read_key_set(await self._get_json(await self._key_set_url()))
            except KeysUnavailableError as exc:
                self.failures += 1
                self._last_failed = True
                held = "the keys held stay in use" if self._keys else "no keys are held"
                _LOG.warning("identity provider keys not fetched: %s; %s", exc, held)
                return
            self._keys, self._fetched_at, self._last_failed = keys, now, False
            _LOG.info("identity provider keys fetched: %d signing keys", len(keys))

    async def _key_set_url(self) -> str:
        if self._jwks_url is not None:
            return self._jwks_url
        document = await self._get_json(self._issuer.rstrip("/") + _DISCOVERY_PATH)
        if not isinstance(document, dict) or document.get("issuer") != self._issuer:
            # OpenID Connect Discovery 1.0, 4.3: the document must name our issuer exactly
            raise KeysUnavailableError("the discovery document names another issuer")
        url = document.get("jwks_uri")
        if not isinstance(url, str):
            raise KeysUnavailableError("the discovery document has no jwks_uri")
        problem = url_problem(url, allow_http=self._allow_http)
        if problem is not None:
            raise KeysUnavailableError(f"the discovery document's jwks_uri {problem}")
        return url

    async def _get_json(self, url: str) -> Any:
        session = self._session
        if session is None:
            raise KeysUnavailableError("the provider's keys are not open: use 'async with'")
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise KeysUnavailableError(f"{url} answered HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise KeysUnavailableError(
                            f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes"
                        )
        except TimeoutError as exc:
            raise KeysUnavailableError(f"{url} did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise KeysUnavailableError(f"{url} is unreachable ({type(exc).__name__})") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise KeysUnavailableError(f"{url} answered something that is not JSON") from exc


# -- tokens and owners --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a checked access token says.

    Attributes:
        issuer: ``iss``.
        subject: ``sub``.
        claims: every claim of the token.
    """

    issuer: str
    subject: str
    claims: Mapping[str, Any]


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidAccessTokenError(f"the token's {name} is not a number")
    return float(value)


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _new_owner(claims: Mapping[str, Any]) -> Owner:
    """An owner for a first sign-in, with what the token says of the person (if anything)."""
    name = next(
        (
            value.strip()
            for key in ("given_name", "name")
            if isinstance(value := claims.get(key), str) and value.strip()
        ),
        "",
    )
    owner = Owner(owner_id=f"owner-{secrets.token_hex(8)}", name=name[:_MAX_NAME_CHARS])
    locale = claims.get("locale")
    if isinstance(locale, str) and _LANGUAGE.fullmatch(locale.replace("_", "-")):
        owner = replace(owner, language=locale.replace("_", "-"))
    zone = claims.get("zoneinfo")
    if isinstance(zone, str) and zone in _zones():
        owner = replace(owner, timezone=zone)
    return owner


class OidcOwners:
    """Checks the provider's access tokens and says which owner each stands for.

    Use it with ``async with`` (its :class:`ProviderKeys` own an HTTP session).

    Args:
        settings: the provider's settings (``issuer`` and ``audience`` must be set).
        store: where subjects are linked to owners.
        clock: wall clock for ``exp``, ``nbf`` and ``iat`` (seconds since the epoch).
        monotonic: clock for the key cache.

    Raises:
        ValueError: ``settings`` names no issuer or audience.
    """

    def __init__(
        self,
        settings: OidcSettings,
        store: CaseStore,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.issuer is None or settings.audience is None:
            raise ValueError("an OpenID Connect provider needs an issuer and an audience")
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway_s = settings.leeway_s
        self._auto_create = settings.auto_create
        self._store = store
        self._clock = clock
        self.keys = ProviderKeys(
            issuer=settings.issuer,
            jwks_url=settings.jwks_url,
            ttl_s=settings.jwks_ttl_s,
            refetch_min_interval_s=settings.refetch_min_interval_s,
            timeout_s=settings.timeout_s,
            allow_http=settings.allow_http,
            monotonic=monotonic,
        )

    @property
    def issuer(self) -> str:
        """The provider's issuer URL (the ``iss`` its tokens must carry)."""
        return self._issuer

    async def __aenter__(self) -> Self:
        await self.keys.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.keys.__aexit__(exc_type, exc, tb)

    async def verify(self, token: str) -> AccessClaims:
        """Check an access token: its form, signature and claims.

        Raises:
            InvalidAccessTokenError: the token is not valid here (the message says why).
            KeysUnavailableError: the provider's keys cannot be had just now.
        """
        if not looks_like_jwt(token):
            raise InvalidAccessTokenError("the token is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:  # also an unsupported "crit" extension
            raise InvalidAccessTokenError("the token cannot be read") from exc
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise InvalidAccessTokenError("the token must be signed with RS256 or ES256")
        if "crit" in header:
            raise InvalidAccessTokenError("the token names critical header extensions")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidAccessTokenError("the token's kid is not a string")
        key = await self.keys.key_for(kid, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["iss", "aud", "exp", "iat", "sub"],
                    # the times are checked below, against our clock
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise InvalidAccessTokenError("the token's signature does not hold") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidAccessTokenError("the token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidAccessTokenError("the token is from another issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidAccessTokenError(f"the token has no {exc.claim} claim") from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidAccessTokenError("the token cannot be read") from exc
        self._check_times(claims)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 0 < len(subject) <= _MAX_SUBJECT_CHARS:
            raise InvalidAccessTokenError("the token's sub is not a usable subject")
        return AccessClaims(self._issuer, subject, claims)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now, leeway = self._clock(), self._leeway_s
        expires = _number(claims, "exp")
        not_before = _number(claims, "nbf")
        issued = _number(claims, "iat")
        if expires is not None and now >= expires + leeway:
            raise InvalidAccessTokenError("the token has expired")
        if not_before is not None and now + leeway < not_before:
            raise InvalidAccessTokenError("the token is not valid yet")
        if issued is not None and now + leeway < issued:
            raise InvalidAccessTokenError("the token was issued in the future")

    async def owner_id(self, token: str) -> str:
        """Check an access token and return the owner it stands for.

        Raises:
            InvalidAccessTokenError: the token is not valid here.
            UnknownSubjectError: the subject is linked to no owner (and owners are not made).
            KeysUnavailableError: the provider's keys cannot be had just now.
        """
        found = await self.verify(token)
        owner_id = await self._store.owner_of_subject(found.issuer, found.subject)
        if owner_id is not None:
            return owner_id
        if not self._auto_create:
            raise UnknownSubjectError(
                "this sign-in is not linked to an owner here; the manufacturer's support "
                "can link it"
            )
        owner_id = await self._store.adopt_subject(
            found.issuer, found.subject, _new_owner(found.claims)
        )
        _LOG.info("a first sign-in from the identity provider made owner %s", owner_id)
        return owner_id
