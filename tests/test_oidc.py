"""Owners signing in with an OpenID Connect provider: a local provider the tests start.

The provider is a real HTTP server on 127.0.0.1 (aiohttp's test server) serving a
discovery document and a JSON Web Key Set of keys each test generates; tokens are signed
by the test with those keys (PyJWT) or built by hand where PyJWT would refuse to build
them (``alg: none``, HS256 keyed with the public key). The key cache's own clock is a
hand-moved one, so TTL and refetch intervals pass without sleeping. The last tests go
through the real notifier service (mosquitto, influxd, the SQLite store) and its owner
API.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import GATEWAY_PASSWORD, MakeMosquitto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from pydantic import ValidationError

from fixloop.broker import GATEWAY_USER
from fixloop.stack import InfluxdServer
from notifier.admin import Onboarding
from notifier.errors import ConflictError, NotFoundError
from notifier.model import Owner
from notifier.oidc import (
    InvalidAccessTokenError,
    KeysUnavailableError,
    OidcOwners,
    UnknownSubjectError,
    looks_like_jwt,
    url_problem,
)
from notifier.service import NotifierService
from notifier.settings import NotifierSettings, OidcSettings
from notifier.sqlite import SqliteStore
from wire.influx import InfluxClient, InfluxSettings
from wire.settings import MqttSettings

AUDIENCE = "https://api.fixloop.test"
REALM = "/realms/acme"
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- a local identity provider ----------------------------------------------------------------


@dataclass
class SigningKey:
    """A key pair of the provider: its id, algorithm, private key and public JWK."""

    kid: str
    algorithm: str
    private: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def jwk(self) -> dict[str, Any]:
        doc = json.loads(_public_jwk(self.private))
        doc.update({"kid": self.kid, "use": "sig"})
        doc.update(self.extra)
        return dict(doc)

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def _public_jwk(private: Any) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        return str(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return str(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))


def rsa_key(kid: str, bits: int = 2048, **extra: Any) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(65537, bits), extra)


def ec_key(kid: str, **extra: Any) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()), extra)


class Provider:
    """What the local provider serves, and what it was asked."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = [rsa_key("rsa-1"), ec_key("ec-1")]
        self.extra_jwks: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.issuer = ""
        self.discovery_issuer: str | None = None
        self.jwks_uri: str | None = None
        self.server: TestServer | None = None
        self.hold: asyncio.Event | None = None  # set: key set answers wait for it
        self.waiting = asyncio.Event()  # a key set request waits for hold

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"{REALM}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{REALM}/protocol/certs", self._jwks)
        return app

    def _seen(self, request: web.Request) -> None:
        # the request the notifier makes: a GET asking for JSON, no body
        assert request.method == "GET"
        assert "application/json" in request.headers.get("Accept", "")
        assert request.can_read_body is False
        self.requests.append(request.path)

    async def _discovery(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response(
            {
                "issuer": self.discovery_issuer or self.issuer,
                "jwks_uri": self.jwks_uri or f"{self.issuer}/protocol/certs",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self._seen(request)
        if self.hold is not None:
            self.waiting.set()
            await self.hold.wait()
        return web.json_response({"keys": [k.jwk() for k in self.keys] + self.extra_jwks})

    def fetches(self) -> int:
        return sum(path.endswith("/certs") for path in self.requests)

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-7f3a",
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 300,
            "scope": "openid profile",
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str = "rsa-1", *, key: SigningKey | None = None, **changes: Any) -> str:
        key = key or self.key(kid)
        return jwt.encode(
            self.claims(**changes),
            key.private,
            algorithm=key.algorithm,
            headers={"kid": kid, "typ": "at+jwt"},
        )


@pytest.fixture
async def provider(aiohttp_server: ServerFactory) -> Provider:
    provider = Provider()
    server = await aiohttp_server(provider.app())
    provider.server = server
    provider.issuer = f"http://127.0.0.1:{server.port}{REALM}"
    return provider


class Clock:
    """The key cache's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    store = await SqliteStore(":memory:").open()
    try:
        await store.put_owner(Owner("owner-ada", "Ada"))
        yield store
    finally:
        await store.close()


@dataclass
class Rig:
    provider: Provider
    store: SqliteStore
    clock: Clock
    owners: OidcOwners


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(provider: Provider, store: SqliteStore) -> AsyncIterator[MakeRig]:
    opened: list[OidcOwners] = []

    async def make(**settings: Any) -> Rig:
        values: dict[str, Any] = {
            "issuer": provider.issuer,
            "audience": AUDIENCE,
            "allow_http": True,
            "refetch_min_interval_s": 30.0,
            "jwks_ttl_s": 600.0,
        }
        values.update(settings)
        clock = Clock()
        owners = OidcOwners(OidcSettings(**values), store, monotonic=clock)
        await owners.__aenter__()
        opened.append(owners)
        return Rig(provider, store, clock, owners)

    try:
        yield make
    finally:
        for owners in opened:
            await owners.__aexit__(None, None, None)


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    made = await make_rig()
    await made.store.link_subject(made.provider.issuer, "user-7f3a", "owner-ada")
    return made


def _by_hand(header: dict[str, Any], claims: dict[str, Any], rsa_private: Any = None) -> str:
    """A token PyJWT would not build; RS256-signed with ``rsa_private`` (else unsigned)."""
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(claims).encode())
    signature = b""
    if rsa_private is not None:
        signature = rsa_private.sign(f"{head}.{body}".encode(), PKCS1v15(), SHA256())
    return f"{head}.{body}.{_b64(signature)}"


async def _refused(rig: Rig, token: str, words: str) -> None:
    with pytest.raises(InvalidAccessTokenError, match=words):
        await rig.owners.owner_id(token)


# -- tokens that hold --------------------------------------------------------------------------


async def test_a_valid_rs256_token_stands_for_the_linked_owner(rig: Rig) -> None:
    assert await rig.owners.owner_id(rig.provider.token("rsa-1")) == "owner-ada"
    # discovery first, then the key set named there; once
    assert rig.provider.requests == [
        f"{REALM}/.well-known/openid-configuration",
        f"{REALM}/protocol/certs",
    ]
    assert await rig.owners.owner_id(rig.provider.token("rsa-1")) == "owner-ada"
    assert rig.provider.fetches() == 1


async def test_a_valid_es256_token_and_an_audience_list(rig: Rig) -> None:
    token = rig.provider.token("ec-1", aud=["other-api", AUDIENCE])
    assert await rig.owners.owner_id(token) == "owner-ada"


async def test_a_configured_jwks_url_skips_discovery(make_rig: MakeRig, provider: Provider) -> None:
    made = await make_rig(jwks_url=f"{provider.issuer}/protocol/certs")
    await made.store.link_subject(provider.issuer, "user-7f3a", "owner-ada")
    assert await made.owners.owner_id(provider.token()) == "owner-ada"
    assert provider.requests == [f"{REALM}/protocol/certs"]


async def test_a_token_without_kid_uses_the_only_key_of_its_algorithm(rig: Rig) -> None:
    key = rig.provider.key("ec-1")
    token = jwt.encode(rig.provider.claims(), key.private, algorithm="ES256")
    assert "kid" not in jwt.get_unverified_header(token)
    assert await rig.owners.owner_id(token) == "owner-ada"
    rig.provider.keys.append(ec_key("ec-2"))
    rig.clock.now += 601  # past the TTL: the set now has two ES256 keys
    with pytest.raises(InvalidAccessTokenError, match="key the provider does not list"):
        await rig.owners.owner_id(token)


async def test_time_claims_are_checked_with_leeway(make_rig: MakeRig, provider: Provider) -> None:
    made = await make_rig(leeway_s=30)
    await made.store.link_subject(provider.issuer, "user-7f3a", "owner-ada")
    now = int(time.time())
    # within the leeway either way
    assert await made.owners.owner_id(provider.token(exp=now - 10)) == "owner-ada"
    assert await made.owners.owner_id(provider.token(nbf=now + 10, iat=now + 10)) == "owner-ada"
    await _refused(made, provider.token(exp=now - 60), "expired")
    await _refused(made, provider.token(nbf=now + 120), "not valid yet")
    await _refused(made, provider.token(iat=now + 120, nbf=None), "issued in the future")
    await _refused(made, provider.token(exp="soon"), "exp is not a number")
    await _refused(made, provider.token(exp=None), "no exp claim")
    await _refused(made, provider.token(iat=None), "no iat claim")


async def test_expired_token(rig: Rig) -> None:
    await _refused(rig, rig.provider.token(exp=int(time.time()) - 3600), "expired")


async def test_wrong_audience(rig: Rig) -> None:
    await _refused(rig, rig.provider.token(aud="https://another.api"), "another audience")
    await _refused(rig, rig.provider.token(aud=None), "no aud claim")


async def test_wrong_issuer(rig: Rig) -> None:
    # signed with the provider's own key, but naming another issuer
    token = rig.provider.token(iss="https://evil.example/realms/acme")
    await _refused(rig, token, "another issuer")
    await _refused(rig, rig.provider.token(iss=rig.provider.issuer + "/"), "another issuer")


async def test_subject_must_be_a_string(rig: Rig) -> None:
    await _refused(rig, rig.provider.token(sub=None), "no sub claim")
    await _refused(rig, rig.provider.token(sub=""), "sub is not a usable subject")


# -- rotation and the key cache ------------------------------------------------------------------


async def test_an_unknown_kid_refetches_the_keys_after_rotation(rig: Rig) -> None:
    provider = rig.provider
    old = provider.token("rsa-1")
    assert await rig.owners.owner_id(old) == "owner-ada"
    assert provider.fetches() == 1
    # the provider rotates: a new key replaces the old one
    provider.keys = [rsa_key("rsa-2"), provider.key("ec-1")]
    rig.clock.now += 31
    assert await rig.owners.owner_id(provider.token("rsa-2")) == "owner-ada"
    assert provider.fetches() == 2
    # the old key is gone from the set: its tokens stop working (no new fetch: too soon)
    await _refused(rig, old, "key the provider does not list")
    assert provider.fetches() == 2


async def test_refetches_for_unknown_kids_are_rate_limited(rig: Rig) -> None:
    provider = rig.provider
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    stranger = rsa_key("made-up")
    await _refused(rig, provider.token(key=stranger, kid="made-up"), "does not list")
    assert provider.fetches() == 1  # just fetched: an unknown kid does not fetch again
    rig.clock.now += 31
    for n in range(5):
        rig.clock.now += 5  # 25 s in all: below refetch_min_interval_s
        await _refused(rig, provider.token(key=stranger, kid=f"made-up-{n}"), "does not list")
    assert provider.fetches() == 2  # the first unknown kid fetched once; the rest did not
    rig.clock.now += 30
    await _refused(rig, provider.token(key=stranger, kid="made-up-9"), "does not list")
    assert provider.fetches() == 3


async def test_keys_are_fetched_again_after_the_ttl(rig: Rig) -> None:
    assert await rig.owners.owner_id(rig.provider.token()) == "owner-ada"
    rig.clock.now += 599
    assert await rig.owners.owner_id(rig.provider.token()) == "owner-ada"
    assert rig.provider.fetches() == 1
    rig.clock.now += 2
    assert await rig.owners.owner_id(rig.provider.token()) == "owner-ada"
    assert rig.provider.fetches() == 2


async def test_a_slow_refetch_past_the_ttl_does_not_hold_up_other_requests(rig: Rig) -> None:
    provider = rig.provider
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    rig.clock.now += 601
    provider.hold = asyncio.Event()
    first = asyncio.create_task(rig.owners.owner_id(provider.token("rsa-1")))
    async with asyncio.timeout(5):
        await provider.waiting.wait()  # the refetch has reached the provider, which waits
    # meanwhile another request is served at once with the keys held
    async with asyncio.timeout(2):
        assert await rig.owners.owner_id(provider.token("ec-1")) == "owner-ada"
    assert not first.done()
    provider.hold.set()
    assert await first == "owner-ada"
    assert provider.fetches() == 2


async def test_concurrent_first_requests_fetch_the_keys_once(rig: Rig) -> None:
    tokens = [rig.provider.token("rsa-1"), rig.provider.token("ec-1")] * 10
    found = await asyncio.gather(*(rig.owners.owner_id(t) for t in tokens))
    assert set(found) == {"owner-ada"}
    assert rig.provider.requests.count(f"{REALM}/.well-known/openid-configuration") == 1
    assert rig.provider.fetches() == 1


async def test_provider_down_keeps_the_held_keys_and_answers_unavailable_for_new_ones(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    provider = rig.provider
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    assert provider.server is not None
    await provider.server.close()
    caplog.set_level(logging.WARNING, logger="notifier.oidc")
    # held keys: still taken, also once the TTL has passed and the refetch fails
    rig.clock.now += 601
    assert await rig.owners.owner_id(provider.token("ec-1")) == "owner-ada"
    assert rig.owners.keys.failures == 1
    assert "the keys held stay in use" in caplog.text
    # a key we never saw: we cannot tell, so "try again", not "invalid"
    with pytest.raises(KeysUnavailableError):
        await rig.owners.owner_id(provider.token(key=rsa_key("rsa-new"), kid="rsa-new"))
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    # tokens are never logged
    assert provider.token("rsa-1")[:40] not in caplog.text


async def test_provider_down_from_the_start(make_rig: MakeRig, provider: Provider) -> None:
    assert provider.server is not None
    await provider.server.close()
    made = await make_rig()
    with pytest.raises(KeysUnavailableError):
        await made.owners.owner_id(provider.token())
    with pytest.raises(KeysUnavailableError):
        await made.owners.owner_id(provider.token())
    assert made.owners.keys.fetches == 1  # the second did not try again: rate limit


async def test_a_provider_answering_errors_or_nonsense(
    make_rig: MakeRig,
    provider: Provider,
    aiohttp_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        if request.path.endswith("/certs"):
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if request.path.endswith("/big"):
            return web.Response(body=b"{" + b" " * (300 * 1024) + b"}")
        if request.path.endswith("/chunked"):
            # a valid key set sent in many small pieces: read whole, not the first piece
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            text = json.dumps({"keys": [provider.key("rsa-1").jwk()], "pad": " " * 50_000})
            for start in range(0, len(text), 1000):
                await response.write(text[start : start + 1000].encode())
            await response.write_eof()
            return response
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    for url, words in (
        (f"{base}/certs", "not JSON"),
        (f"{base}/big", "more than"),
        (f"{base}/gone", "HTTP 500"),
    ):
        made = await make_rig(jwks_url=url)
        with pytest.raises(KeysUnavailableError):
            await made.owners.owner_id(provider.token())
        assert made.owners.keys.failures == 1
        assert words in caplog.text
    made = await make_rig(jwks_url=f"{base}/chunked")
    await made.store.link_subject(provider.issuer, "user-7f3a", "owner-ada")
    assert await made.owners.owner_id(provider.token()) == "owner-ada"


async def test_discovery_must_name_our_issuer(make_rig: MakeRig, provider: Provider) -> None:
    provider.discovery_issuer = "https://someone.else/realms/acme"
    made = await make_rig()
    with pytest.raises(KeysUnavailableError):
        await made.owners.owner_id(provider.token())
    assert provider.fetches() == 0


async def test_discovered_jwks_uri_must_be_https_unless_allowed(
    make_rig: MakeRig, provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    # the issuer may be plain http here (allowed), but the document's key URL is not
    provider.jwks_uri = "ftp://127.0.0.1/certs"
    made = await make_rig()
    with pytest.raises(KeysUnavailableError):
        await made.owners.owner_id(provider.token())
    assert "jwks_uri must be an http(s) URL" in caplog.text


async def test_weak_encryption_and_foreign_keys_are_ignored(rig: Rig) -> None:
    provider = rig.provider
    weak = rsa_key("rsa-weak", bits=1024)
    enc = rsa_key("rsa-enc", use="enc")
    bound = rsa_key("rsa-384", alg="RS384")
    provider.keys += [weak, enc, bound]
    provider.extra_jwks.append({"kty": "oct", "kid": "hmac", "k": _b64(b"0" * 32)})
    provider.extra_jwks.append({**provider.key("rsa-1").jwk(), "kid": "with-d", "d": "AQAB"})
    provider.extra_jwks.append("not a key")  # type: ignore[arg-type]
    weak_token = _by_hand({"alg": "RS256", "kid": weak.kid}, provider.claims(), weak.private)
    await _refused(rig, weak_token, "does not list")
    for key in (enc, bound):
        await _refused(rig, provider.token(key=key, kid=key.kid), "does not list")
    # the good keys of the same set still work
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    assert await rig.owners.owner_id(provider.token("ec-1")) == "owner-ada"


# -- forged tokens -------------------------------------------------------------------------------


async def test_alg_none_is_refused(rig: Rig) -> None:
    for alg in ("none", "None", "NONE"):
        token = _by_hand({"alg": alg, "kid": "rsa-1"}, rig.provider.claims())
        await _refused(rig, token, "RS256 or ES256")
    assert rig.provider.requests == []  # refused before any key was looked up


async def test_hs256_keyed_with_the_public_key_is_refused(rig: Rig) -> None:
    provider = rig.provider
    key = provider.key("rsa-1")
    claims = provider.claims()
    for secret in (key.public_pem(), json.dumps(key.jwk()).encode(), key.jwk()["n"].encode()):
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            head = _b64(json.dumps({"alg": alg, "kid": "rsa-1", "typ": "JWT"}).encode())
            body = _b64(json.dumps(claims).encode())
            mac = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
            await _refused(rig, f"{head}.{body}.{_b64(mac)}", "RS256 or ES256")


async def test_an_algorithm_that_does_not_fit_the_key_is_refused(rig: Rig) -> None:
    provider = rig.provider
    assert await rig.owners.owner_id(provider.token("rsa-1")) == "owner-ada"
    # ES256 claimed for the RSA key's id, signed with some P-256 key
    token = provider.token(key=ec_key("x"), kid="rsa-1")
    await _refused(rig, token, "does not list")
    # RS256 claimed for the EC key's id
    await _refused(rig, provider.token(key=rsa_key("x"), kid="ec-1"), "does not list")


async def test_tampered_tokens_are_refused(rig: Rig) -> None:
    provider = rig.provider
    good = provider.token("rsa-1")
    head, body, signature = good.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    await _refused(rig, f"{head}.{body}.{flipped}", "signature does not hold")
    other = _b64(json.dumps(provider.claims(sub="user-other")).encode())
    await _refused(rig, f"{head}.{other}.{signature}", "signature does not hold")
    await _refused(rig, f"{head}.{body}.", "signature does not hold")
    # signed by a key of the same id that the provider never had
    await _refused(rig, provider.token(key=rsa_key("rsa-1"), kid="rsa-1"), "does not hold")
    ec_good = provider.token("ec-1")
    head, body, signature = ec_good.split(".")
    await _refused(rig, f"{head}.{body}.{signature[::-1]}", "cannot be read|does not hold")
    await _refused(rig, f"{head}.{body}.{signature[:-4]}AAAA", "signature does not hold")


async def test_malformed_tokens_are_refused(rig: Rig) -> None:
    await _refused(rig, "a.b.c", "cannot be read")
    await _refused(rig, "x" * 9000 + ".a.b", "not a JWT")
    crit = _by_hand(
        {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]},
        rig.provider.claims(),
        rig.provider.key("rsa-1").private,
    )
    await _refused(rig, crit, "cannot be read|critical")
    # the same, without crit, holds: crit alone made the difference
    plain = _by_hand(
        {"alg": "RS256", "kid": "rsa-1"}, rig.provider.claims(), rig.provider.key("rsa-1").private
    )
    assert await rig.owners.owner_id(plain) == "owner-ada"
    assert looks_like_jwt(rig.provider.token())
    assert not looks_like_jwt("tok-alice-0123456789")


# -- subjects and owners ---------------------------------------------------------------------------


async def test_an_unknown_subject_is_refused_when_owners_are_not_made(rig: Rig) -> None:
    with pytest.raises(UnknownSubjectError, match="not linked to an owner"):
        await rig.owners.owner_id(rig.provider.token(sub="user-new"))
    assert await rig.store.owner_of_subject(rig.provider.issuer, "user-new") is None


async def test_an_unknown_subject_becomes_an_owner_once_when_allowed(
    make_rig: MakeRig, provider: Provider
) -> None:
    made = await make_rig(auto_create=True)
    token = provider.token(
        sub="user-new", given_name="Grace", locale="de_DE", zoneinfo="Europe/Berlin"
    )
    found = await asyncio.gather(*(made.owners.owner_id(token) for _ in range(8)))
    assert len(set(found)) == 1  # eight first requests at once, one owner
    owner = await made.store.get_owner(found[0])
    assert owner is not None
    assert (owner.name, owner.language, owner.timezone) == ("Grace", "de-DE", "Europe/Berlin")
    assert await made.store.owner_of_subject(provider.issuer, "user-new") == found[0]
    # a token without profile claims: defaults, no name
    other = await made.owners.owner_id(provider.token(sub="user-bare", zoneinfo="Mars/Base"))
    bare = await made.store.get_owner(other)
    assert bare is not None
    assert other != found[0]
    assert (bare.name, bare.language, bare.timezone) == ("", "en", "UTC")


async def test_subject_links_in_the_store(store: SqliteStore) -> None:
    await store.put_owner(Owner("owner-bob", "Bob"))
    await store.link_subject("https://idp", "s-1", "owner-ada")
    await store.link_subject("https://idp", "s-1", "owner-ada")  # again: no change
    await store.link_subject("https://other-idp", "s-1", "owner-bob")
    await store.link_subject("https://idp", "s-2", "owner-ada")  # one owner, two subjects
    with pytest.raises(ConflictError):
        await store.link_subject("https://idp", "s-1", "owner-bob")
    with pytest.raises(NotFoundError):
        await store.link_subject("https://idp", "s-9", "owner-nobody")
    assert await store.owner_of_subject("https://idp", "s-1") == "owner-ada"
    assert await store.owner_of_subject("https://other-idp", "s-1") == "owner-bob"
    assert await store.owner_of_subject("https://idp", "s-9") is None
    assert await store.adopt_subject("https://idp", "s-1", Owner("owner-x", "X")) == "owner-ada"
    assert await store.get_owner("owner-x") is None
    assert await store.subjects_of("owner-ada") == [("https://idp", "s-1"), ("https://idp", "s-2")]
    assert not await store.unlink_subject("https://idp", "s-1", "owner-bob")  # not Bob's
    assert await store.unlink_subject("https://idp", "s-2", "owner-ada")
    assert not await store.unlink_subject("https://idp", "s-2", "owner-ada")  # gone already
    assert await store.subjects_of("owner-ada") == [("https://idp", "s-1")]
    assert await store.owner_of_subject("https://idp", "s-2") is None
    await store.link_subject("https://idp", "s-2", "owner-ada")
    await store.erase_owner("owner-ada")
    assert await store.owner_of_subject("https://idp", "s-1") is None
    assert await store.owner_of_subject("https://idp", "s-2") is None
    assert await store.owner_of_subject("https://other-idp", "s-1") == "owner-bob"


# -- settings ------------------------------------------------------------------------------------


def test_settings_need_https_and_an_audience() -> None:
    assert OidcSettings().issuer is None  # off by default
    with pytest.raises(ValidationError, match="must be an https URL"):
        OidcSettings(issuer="http://idp.example/realms/acme", audience=AUDIENCE)
    with pytest.raises(ValidationError, match="audience is needed"):
        OidcSettings(issuer="https://idp.example/realms/acme")
    with pytest.raises(ValidationError, match="jwks_url: must not hold credentials"):
        OidcSettings(issuer="https://idp.example", audience=AUDIENCE, jwks_url="https://u:p@idp/k")
    with pytest.raises(ValidationError, match="issuer is needed"):
        OidcSettings(audience=AUDIENCE)
    local = OidcSettings(issuer="http://127.0.0.1:8080/r", audience=AUDIENCE, allow_http=True)
    assert local.allow_http
    assert NotifierSettings(oidc={"issuer": "https://idp.example", "audience": "a"}).oidc.issuer
    assert url_problem("https://idp.example/r") is None
    assert url_problem("https://idp.example/r#x") == "must not have a fragment"
    assert url_problem("https:///r") == "has no host"


# -- through the notifier service and its owner API ------------------------------------------------


@dataclass
class Live:
    provider: Provider
    store: SqliteStore
    base: str
    token: str
    ops: str


@pytest.fixture
async def live(
    tmp_path: Path,
    make_mosquitto: MakeMosquitto,
    influxd: InfluxdServer,
    provider: Provider,
) -> AsyncIterator[Live]:
    broker = make_mosquitto(device_ids=["oi-1"], connection_messages=False)
    mqtt = MqttSettings(
        host=broker.host, port=broker.port, username=GATEWAY_USER, password=GATEWAY_PASSWORD
    )
    influx = InfluxSettings(url=influxd.url, database="oidc", timeout_s=10)
    async with InfluxClient(influx) as client:
        await client.ensure_database()
    settings = NotifierSettings(
        db_path=tmp_path / "cases.sqlite3",
        api_port=0,
        client_id="fixloop-notifier-oidc",
        oidc=OidcSettings(
            issuer=provider.issuer, audience=AUDIENCE, allow_http=True, refetch_min_interval_s=0
        ),
    )
    async with SqliteStore(settings.db_path) as store:
        await store.put_owner(Owner("owner-ada", "Ada", timezone="Europe/Paris"))
        await store.add_token("tok-ada-0123456789abcdef", ("owner", "owner-ada"))
        await store.put_owner(Owner("owner-bob", "Bob"))
        await store.add_token("tok-ops-0123456789abcdef", ("ops", "olga"))
        await store.link_subject(provider.issuer, "user-7f3a", "owner-ada")
        registry = store.registry()
        async with NotifierService(
            mqtt,
            influx,
            settings,
            store=store,
            onboarding=lambda _: Onboarding(registry, None, frozenset()),
        ) as notifier:
            yield Live(
                provider,
                store,
                notifier.api_url,
                "tok-ada-0123456789abcdef",
                "tok-ops-0123456789abcdef",
            )


async def _get(url: str, token: str) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        return response.status, await response.json(), response.headers


async def test_an_owner_reads_their_profile_with_a_provider_token(live: Live) -> None:
    status, body, _ = await _get(f"{live.base}/me", live.provider.token("rsa-1"))
    assert status == 200, body
    assert (body["name"], body["timezone"]) == ("Ada", "Europe/Paris")
    status, body, _ = await _get(f"{live.base}/me", live.provider.token("ec-1"))
    assert status == 200, body
    # fixloop's own token works beside it
    status, body, _ = await _get(f"{live.base}/me", live.token)
    assert (status, body["name"]) == (200, "Ada")
    # an owner's provider token is not a technician's
    status, body, _ = await _get(f"{live.base}/technician/visits", live.provider.token())
    assert (status, body["error"]["code"]) == (403, "forbidden")


async def test_the_owner_api_answers_bad_provider_tokens_clearly(live: Live) -> None:
    provider = live.provider
    expired = provider.token(exp=int(time.time()) - 3600)
    status, body, headers = await _get(f"{live.base}/me", expired)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert body["error"]["message"] == "sign in again: the token has expired"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    status, body, _ = await _get(f"{live.base}/me", provider.token(aud="https://other"))
    assert (status, body["error"]["message"]) == (
        401,
        "sign in again: the token is for another audience",
    )
    forged = _by_hand({"alg": "none", "kid": "rsa-1"}, provider.claims())
    status, body, _ = await _get(f"{live.base}/me", forged)
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    status, body, _ = await _get(f"{live.base}/me", provider.token(sub="user-unlinked"))
    assert (status, body["error"]["code"]) == (403, "unknown_owner")
    assert "not linked to an owner" in body["error"]["message"]


async def test_the_owner_api_answers_503_while_the_provider_is_down(live: Live) -> None:
    provider = live.provider
    status, _, _ = await _get(f"{live.base}/me", provider.token("rsa-1"))
    assert status == 200
    assert provider.server is not None
    await provider.server.close()
    # the held key still works
    status, _, _ = await _get(f"{live.base}/me", provider.token("ec-1"))
    assert status == 200
    status, body, headers = await _get(
        f"{live.base}/me", provider.token(key=rsa_key("rsa-2"), kid="rsa-2")
    )
    assert (status, body["error"]["code"]) == (503, "unavailable")
    assert headers["Retry-After"] == "5"


async def _call(method: str, url: str, token: str, **kw: Any) -> tuple[int, dict[str, Any] | None]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url, headers={"Authorization": f"Bearer {token}"}, **kw
        ) as response,
    ):
        body = None if response.status == 204 else await response.json()
        return response.status, body


async def test_ops_link_and_unlink_a_provider_subject_over_the_admin_api(live: Live) -> None:
    subjects = f"{live.base}/admin/owners/owner-bob/subjects"
    bobs = live.provider.token(sub="user-b0b")
    status, body, _ = await _get(f"{live.base}/me", bobs)
    assert (status, body["error"]["code"]) == (403, "unknown_owner")
    # only the ops role links
    status, _ = await _call("POST", subjects, live.token, json={"subject": "user-b0b"})
    assert status == 403
    # no issuer given: the configured provider's
    status, linked = await _call("POST", subjects, live.ops, json={"subject": "user-b0b"})
    assert (status, linked) == (
        201,
        {"owner_id": "owner-bob", "issuer": live.provider.issuer, "subject": "user-b0b"},
    )
    status, body, _ = await _get(f"{live.base}/me", bobs)
    assert (status, body["name"]) == (200, "Bob")
    status, listed = await _call("GET", subjects, live.ops)
    assert status == 200
    assert listed == {"owner_id": "owner-bob", "subjects": [linked]}
    # Ada's subject stays Ada's; an unknown owner is 404
    status, body = await _call("POST", subjects, live.ops, json={"subject": "user-7f3a"})
    assert status == 409, body
    status, _ = await _call(
        "POST", f"{live.base}/admin/owners/nobody/subjects", live.ops, json={"subject": "x"}
    )
    assert status == 404
    # unlinking someone else's subject changes nothing
    status, _ = await _call("DELETE", subjects, live.ops, params={"subject": "user-7f3a"})
    assert status == 404
    assert await live.store.owner_of_subject(live.provider.issuer, "user-7f3a") == "owner-ada"
    status, body = await _call("DELETE", subjects, live.ops, params={})
    assert status == 400, body
    status, _ = await _call("DELETE", subjects, live.ops, params={"subject": "user-b0b"})
    assert status == 204
    status, body, _ = await _get(f"{live.base}/me", bobs)
    assert (status, body["error"]["code"]) == (403, "unknown_owner")
    status, listed = await _call("GET", subjects, live.ops)
    assert listed == {"owner_id": "owner-bob", "subjects": []}
    # Bob is still there, with his own token's data
    assert await live.store.get_owner("owner-bob") is not None
