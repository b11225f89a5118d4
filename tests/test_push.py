"""Push channels against local receivers that check the real wire formats.

Each receiver does what the real service would: the FCM one verifies the RS256 JWT
assertion with the service account's public key before it issues an access token and
checks the bearer on every send; the Web Push one decrypts the aes128gcm body with the
subscriber's private key (its own RFC 8291 decryption, written here) and verifies the
VAPID token's ES256 signature; the webhook one checks the HMAC signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pytest_aiohttp import AiohttpServer

from notifier.errors import DeadTokenError, DeliveryError, InvalidRequestError, UnsafeAddressError
from notifier.model import PushChannel
from notifier.push import (
    DeliveryReport,
    FcmSender,
    NtfySender,
    PushAction,
    PushDispatcher,
    PushMessage,
    PushRefusedError,
    RetryLaterError,
    RetryPolicy,
    WebhookSender,
    WebPushSender,
    encrypt_aes128gcm,
    generate_vapid_keys,
    sign_webhook,
    verify_webhook_signature,
)
from notifier.push.base import b64url_decode, b64url_encode, parse_retry_after
from notifier.push.fcm import FCM_SCOPE
from notifier.push.ntfy import split_topic_url
from notifier.push.webpush import MAX_PLAINTEXT_BYTES, web_push_topic
from wire.errors import ConfigError, PermanentError

MESSAGE = PushMessage(
    title="Your washer needs a hand",
    body="We can restart it now. Shall we?",
    actions=(
        PushAction("accept_fix", "Yes, fix it", "https://api.example/cases/c1?action=accept_fix"),
        PushAction("decline_fix", "Not now", "https://api.example/cases/c1?action=decline_fix"),
        PushAction("details", "Details"),
    ),
    data={"case_id": "c1", "kind": "consent"},
    urgent=True,
    collapse_key="case-c1",
    ttl_s=600,
)


def b64d(text: str) -> bytes:
    return b64url_decode(text)


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, claims, signature = token.split(".")
    return (
        orjson.loads(b64d(header)),
        orjson.loads(b64d(claims)),
        f"{header}.{claims}".encode(),
        b64d(signature),
    )


# -- FCM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class FcmReceiver:
    """Google's token endpoint and FCM's messages:send, checking what real ones check."""

    public_key: rsa.RSAPublicKey
    email: str = "push@fixloop-test.iam.gserviceaccount.com"
    project: str = "fixloop-test"
    token_uri: str = ""
    issued: list[str] = field(default_factory=list)
    assertions: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    bearers: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    always_401: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/v1/projects/{project}/messages:send", self.send)
        return app

    async def token(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-www-form-urlencoded"
        form = parse_qs((await request.read()).decode(), strict_parsing=True)
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        header, claims, signed, signature = jwt_parts(form["assertion"][0])
        try:
            self.public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            self.problems.append("assertion signature does not verify")
            return web.json_response({"error": "invalid_grant"}, status=400)
        assert header["alg"] == "RS256"
        self.assertions.append(claims)
        token = f"ya29.test-{len(self.issued)}"
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        assert request.match_info["project"] == self.project
        bearer = request.headers.get("Authorization", "")
        self.bearers.append(bearer)
        token = bearer.removeprefix("Bearer ")
        if self.always_401 or token not in self.issued or token in self.revoked:
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "bad token"}},
                status=401,
            )
        doc = await request.json()
        self.messages.append(doc)
        target = doc["message"]["token"]
        if target == "dead-token":
            return web.json_response(
                {
                    "error": {
                        "code": 404,
                        "message": "Requested entity was not found.",
                        "status": "NOT_FOUND",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                "errorCode": "UNREGISTERED",
                            }
                        ],
                    }
                },
                status=404,
            )
        if target == "malformed-chunked":
            # the same answer in two chunks, the second after the first has been sent
            answer = web.StreamResponse(status=400)
            answer.content_type = "application/json"
            answer.enable_chunked_encoding()
            await answer.prepare(request)
            text = orjson.dumps(
                {
                    "error": {
                        "code": 400,
                        "status": "INVALID_ARGUMENT",
                        "message": "The registration token is not a valid FCM registration token",
                    }
                }
            )
            await answer.write(text[:20])
            await asyncio.sleep(0.05)  # the sender has read the first chunk by now
            await answer.write(text[20:])
            await answer.write_eof()
            return answer
        if target == "malformed-token":
            return web.json_response(
                {
                    "error": {
                        "code": 400,
                        "status": "INVALID_ARGUMENT",
                        "message": "The registration token is not a valid FCM registration token",
                    }
                },
                status=400,
            )
        if target == "bad-request":
            return web.json_response(
                {
                    "error": {
                        "code": 400,
                        "status": "INVALID_ARGUMENT",
                        "message": "Invalid value at 'message.android.ttl'",
                    }
                },
                status=400,
            )
        if target == "busy":
            return web.json_response(
                {"error": {"code": 503, "status": "UNAVAILABLE"}},
                status=503,
                headers={"Retry-After": "12"},
            )
        return web.json_response({"name": f"projects/{self.project}/messages/0:1"})


def service_account(key: rsa.RSAPrivateKey, receiver: FcmReceiver) -> dict[str, str]:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": receiver.project,
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": receiver.email,
        "token_uri": receiver.token_uri,
    }


async def fcm_setup(
    aiohttp_server: AiohttpServer, key: rsa.RSAPrivateKey, **kw: Any
) -> tuple[FcmReceiver, FcmSender]:
    receiver = FcmReceiver(key.public_key())
    server = await aiohttp_server(receiver.app())
    receiver.token_uri = str(server.make_url("/token"))
    sender = FcmSender(
        service_account(key, receiver), base_url=str(server.make_url("")), timeout_s=5, **kw
    )
    return receiver, sender


def fcm_channel(token: str) -> PushChannel:
    return PushChannel("fcm-1", "ann", "fcm", token)


async def test_fcm_assertion_token_and_message_format(
    aiohttp_server: AiohttpServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    receiver, sender = await fcm_setup(aiohttp_server, rsa_key)
    before = int(time.time())
    async with sender:
        await sender.send(fcm_channel("reg-token-1"), MESSAGE)
        await sender.send(fcm_channel("reg-token-2"), PushMessage("Done", "All fixed."))

    assert receiver.problems == []
    # one token for both sends: it was cached
    assert len(receiver.issued) == 1
    assert receiver.bearers == [f"Bearer {receiver.issued[0]}"] * 2
    (claims,) = receiver.assertions
    assert claims["iss"] == receiver.email
    assert claims["scope"] == FCM_SCOPE
    assert claims["aud"] == receiver.token_uri
    assert before <= claims["iat"] <= time.time() + 1
    assert 0 < claims["exp"] - claims["iat"] <= 3600

    first, second = (m["message"] for m in receiver.messages)
    assert first["token"] == "reg-token-1"
    assert first["notification"] == {"title": MESSAGE.title, "body": MESSAGE.body}
    assert all(isinstance(v, str) for v in first["data"].values())
    assert first["data"]["case_id"] == "c1"
    assert first["data"]["kind"] == "consent"
    assert first["data"]["message_id"] == MESSAGE.message_id
    assert orjson.loads(first["data"]["actions"]) == [
        {"action": "accept_fix", "label": "Yes, fix it", "url": MESSAGE.actions[0].url},
        {"action": "decline_fix", "label": "Not now", "url": MESSAGE.actions[1].url},
        {"action": "details", "label": "Details", "url": None},
    ]
    assert first["android"] == {
        "priority": "high",
        "ttl": "600s",
        "collapse_key": "case-c1",
        "notification": {"tag": "case-c1"},
    }
    apns = first["apns"]["headers"]
    assert apns["apns-priority"] == "10"
    assert apns["apns-collapse-id"] == "case-c1"
    assert before + 600 <= int(apns["apns-expiration"]) <= time.time() + 601
    assert second["android"]["priority"] == "normal"
    assert second["apns"]["headers"]["apns-priority"] == "5"
    assert "actions" not in second["data"]


async def test_fcm_token_is_renewed_before_it_expires(
    aiohttp_server: AiohttpServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    now = [time.time()]
    receiver, sender = await fcm_setup(aiohttp_server, rsa_key, clock=lambda: now[0])
    async with sender:
        await sender.send(fcm_channel("t"), MESSAGE)
        now[0] += 3_000  # 599 s of the token's 3,599 left: still used
        await sender.send(fcm_channel("t"), MESSAGE)
        assert len(receiver.issued) == 1
        now[0] += 560  # 39 s left: inside the renewal margin
        await sender.send(fcm_channel("t"), MESSAGE)
    assert len(receiver.issued) == 2
    assert receiver.bearers[-1] == f"Bearer {receiver.issued[1]}"


async def test_fcm_dead_and_refused_tokens(
    aiohttp_server: AiohttpServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    _, sender = await fcm_setup(aiohttp_server, rsa_key)
    async with sender:
        with pytest.raises(DeadTokenError):
            await sender.send(fcm_channel("dead-token"), MESSAGE)
        with pytest.raises(DeadTokenError):
            await sender.send(fcm_channel("malformed-token"), MESSAGE)
        with pytest.raises(DeadTokenError):  # the whole answer is read, not its first chunk
            await sender.send(fcm_channel("malformed-chunked"), MESSAGE)
        with pytest.raises(PushRefusedError) as refused:
            await sender.send(fcm_channel("bad-request"), MESSAGE)
        assert not isinstance(refused.value, DeadTokenError)
        with pytest.raises(RetryLaterError) as later:
            await sender.send(fcm_channel("busy"), MESSAGE)
        assert later.value.retry_after_s == 12


async def test_fcm_401_gets_one_fresh_token(
    aiohttp_server: AiohttpServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    receiver, sender = await fcm_setup(aiohttp_server, rsa_key)
    async with sender:
        await sender.send(fcm_channel("t"), MESSAGE)
        receiver.revoked.add(receiver.issued[0])
        await sender.send(fcm_channel("t"), MESSAGE)
        assert len(receiver.issued) == 2
        receiver.always_401 = True
        with pytest.raises(DeliveryError):
            await sender.send(fcm_channel("t"), MESSAGE)
    assert len(receiver.issued) == 3  # one refresh for the last send, not a loop


def test_fcm_refuses_an_incomplete_service_account(rsa_key: rsa.RSAPrivateKey) -> None:
    receiver = FcmReceiver(rsa_key.public_key(), token_uri="http://127.0.0.1:9/token")
    account = service_account(rsa_key, receiver)
    with pytest.raises(ConfigError):
        FcmSender({k: v for k, v in account.items() if k != "client_email"})
    with pytest.raises(ConfigError):
        FcmSender({**account, "private_key": "not a key"})
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(ConfigError):
        FcmSender({**account, "private_key": ec_pem})


# -- Web Push ----------------------------------------------------------------------------


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def decrypt_aes128gcm(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """The user agent's side of RFC 8291 section 3 and RFC 8188 section 2, step by step."""
    salt, record_size, id_len = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    as_public = body[21 : 21 + id_len]
    ciphertext = body[21 + id_len :]
    assert id_len == 65
    assert len(ciphertext) <= record_size  # one record
    ua_public = ua_private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public)
    ecdh_secret = ua_private.exchange(ec.ECDH(), peer)
    prk_key = _hmac(auth, ecdh_secret)
    ikm = _hmac(prk_key, b"WebPush: info\x00" + ua_public + as_public + b"\x01")
    prk = _hmac(salt, ikm)
    cek = _hmac(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = _hmac(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    stripped = padded.rstrip(b"\x00")
    assert stripped.endswith(b"\x02"), "the last record must end with the 0x02 delimiter"
    return stripped[:-1]


# RFC 8291 appendix A
RFC_PLAINTEXT = b"When I grow up, I want to be a watermelon"
RFC_AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
RFC_UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
RFC_UA_PUBLIC = (
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
)
RFC_AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
RFC_SALT = "DGv6ra1nlYgDCS1FRnbzlw"
RFC_BODY = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
    "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
    "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
)


def p256(raw: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64d(raw), "big"), ec.SECP256R1())


def test_aes128gcm_matches_rfc_8291_appendix_a() -> None:
    body = encrypt_aes128gcm(
        RFC_PLAINTEXT,
        b64d(RFC_UA_PUBLIC),
        b64d(RFC_AUTH),
        salt=b64d(RFC_SALT),
        sender_key=p256(RFC_AS_PRIVATE),
    )
    assert b64url_encode(body) == RFC_BODY
    assert decrypt_aes128gcm(b64d(RFC_BODY), p256(RFC_UA_PRIVATE), b64d(RFC_AUTH)) == (
        RFC_PLAINTEXT
    )


def test_aes128gcm_is_fresh_each_time_and_bounded() -> None:
    ua = ec.generate_private_key(ec.SECP256R1())
    ua_public = ua.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    auth = bytes(range(16))
    one = encrypt_aes128gcm(b"x" * MAX_PLAINTEXT_BYTES, ua_public, auth)
    two = encrypt_aes128gcm(b"x" * MAX_PLAINTEXT_BYTES, ua_public, auth)
    assert len(one) == 4096
    assert one[:16] != two[:16]  # a new salt and key each time
    assert decrypt_aes128gcm(one, ua, auth) == b"x" * MAX_PLAINTEXT_BYTES
    with pytest.raises(PushRefusedError):
        encrypt_aes128gcm(b"x" * (MAX_PLAINTEXT_BYTES + 1), ua_public, auth)
    with pytest.raises(PushRefusedError):
        encrypt_aes128gcm(b"x", ua_public, auth[:8])
    with pytest.raises(PushRefusedError):
        encrypt_aes128gcm(b"x", b"\x04" + bytes(64), auth)


@dataclass
class PushService:
    """A browser's push service and the browser behind it (it holds the private key)."""

    ua_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = b"0123456789abcdef"
    origin: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    vapid: list[dict[str, Any]] = field(default_factory=list)
    keys_seen: list[str] = field(default_factory=list)

    @property
    def p256dh(self) -> str:
        return b64url_encode(
            self.ua_key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/push/{subscription}", self.push)
        return app

    def check_vapid(self, value: str) -> None:
        scheme, _, params = value.partition(" ")
        assert scheme == "vapid"
        fields = dict(p.strip().split("=", 1) for p in params.split(","))
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64d(fields["k"]))
        header, claims, signed, signature = jwt_parts(fields["t"])
        assert header == {"typ": "JWT", "alg": "ES256"}
        assert len(signature) == 64
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        public.verify(der, signed, ec.ECDSA(hashes.SHA256()))  # raises if forged
        now = time.time()
        assert claims["aud"] == self.origin
        assert now < claims["exp"] <= now + 24 * 3600
        assert claims["sub"] == "mailto:ops@fixloop.example"
        self.vapid.append(claims)
        self.keys_seen.append(fields["k"])

    async def push(self, request: web.Request) -> web.Response:
        self.check_vapid(request.headers["Authorization"])
        self.headers.append(dict(request.headers))
        assert request.headers["Content-Encoding"] == "aes128gcm"
        plaintext = decrypt_aes128gcm(await request.read(), self.ua_key, self.auth)
        self.received.append(orjson.loads(plaintext))
        status = {"gone": 410, "unknown": 404, "throttled": 429, "bad": 400}.get(
            request.match_info["subscription"], 201
        )
        return web.Response(status=status, headers={"Retry-After": "3"} if status == 429 else {})


async def webpush_setup(
    aiohttp_server: AiohttpServer, **kw: Any
) -> tuple[PushService, WebPushSender, Callable[[str], PushChannel]]:
    service = PushService()
    server = await aiohttp_server(service.app())
    service.origin = f"http://127.0.0.1:{server.port}"
    keys = generate_vapid_keys()
    sender = WebPushSender(
        keys.private_key,
        subject="mailto:ops@fixloop.example",
        timeout_s=5,
        allow_internal=True,  # the push service stands in on 127.0.0.1
        **kw,
    )
    assert sender.public_key == keys.public_key

    def channel(subscription: str) -> PushChannel:
        return PushChannel(
            f"wp-{subscription}",
            "ann",
            "webpush",
            str(server.make_url(f"/push/{subscription}")),
            {"p256dh": service.p256dh, "auth": b64url_encode(service.auth)},
        )

    return service, sender, channel


async def test_webpush_is_encrypted_for_the_browser_and_signed(
    aiohttp_server: AiohttpServer,
) -> None:
    service, sender, channel = await webpush_setup(aiohttp_server)
    async with sender:
        await sender.send(channel("live"), MESSAGE)
        await sender.send(channel("live"), PushMessage("Done", "All fixed.", ttl_s=0))

    first, second = service.received
    assert first == {
        "id": MESSAGE.message_id,
        "title": MESSAGE.title,
        "body": MESSAGE.body,
        "actions": [a.to_json() for a in MESSAGE.actions],
        "data": {"case_id": "c1", "kind": "consent"},
        "urgent": True,
        "tag": "case-c1",
    }
    assert second["title"] == "Done"
    assert "tag" not in second
    h1, h2 = service.headers
    assert (h1["TTL"], h1["Urgency"], h1["Topic"]) == ("600", "high", "case-c1")
    assert (h2["TTL"], h2["Urgency"]) == ("0", "normal")
    assert "Topic" not in h2
    assert service.keys_seen == [sender.public_key] * 2


async def test_webpush_dead_throttled_and_refused(aiohttp_server: AiohttpServer) -> None:
    _, sender, channel = await webpush_setup(aiohttp_server)
    async with sender:
        with pytest.raises(DeadTokenError):
            await sender.send(channel("gone"), MESSAGE)
        with pytest.raises(DeadTokenError):
            await sender.send(channel("unknown"), MESSAGE)
        with pytest.raises(RetryLaterError) as later:
            await sender.send(channel("throttled"), MESSAGE)
        assert later.value.retry_after_s == 3
        with pytest.raises(PushRefusedError):
            await sender.send(channel("bad"), MESSAGE)
        broken = PushChannel("wp-x", "ann", "webpush", channel("live").target, {"auth": "AAAA"})
        with pytest.raises(PushRefusedError):
            await sender.send(broken, MESSAGE)


def test_vapid_keys_load_in_both_forms() -> None:
    keys = generate_vapid_keys()
    from_raw = WebPushSender(keys.private_key, subject="mailto:a@b.example")
    from_pem = WebPushSender(keys.private_key_pem, subject="https://fixloop.example/contact")
    assert from_raw.public_key == from_pem.public_key == keys.public_key
    assert len(b64d(keys.public_key)) == 65
    for bad in ("not-a-key", b64url_encode(b"short"), "-----BEGIN PRIVATE KEY-----\nxx\n"):
        with pytest.raises(ConfigError):
            WebPushSender(bad, subject="mailto:a@b.example")
    with pytest.raises(ConfigError):
        WebPushSender(keys.private_key, subject="ops@fixloop.example")


def test_topic_is_at_most_32_base64url_characters() -> None:
    assert web_push_topic("case-c1") == "case-c1"
    long_one = web_push_topic("case:" + "x" * 60)
    other = web_push_topic("case:" + "x" * 59 + "y")
    for topic in (long_one, other, web_push_topic("käse/1")):
        assert 0 < len(topic) <= 32
        assert set(topic) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert long_one != other


# -- ntfy --------------------------------------------------------------------------------


@dataclass
class NtfyServer:
    published: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    status: int = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.publish)
        app.router.add_post("/ntfy/", self.publish)
        return app

    async def publish(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.auth.append(request.headers.get("Authorization"))
        self.published.append(await request.json())
        return web.json_response({"id": "abc"}, status=self.status)


async def test_ntfy_publishes_json_with_bearer(aiohttp_server: AiohttpServer) -> None:
    ntfy = NtfyServer()
    server = await aiohttp_server(ntfy.app())
    topic_url = str(server.make_url("/fixloop-ann"))
    message = PushMessage(
        "Visit booked",
        "Tina comes on Tuesday.",
        actions=(
            PushAction("open", "Open", "https://api.example/cases/c1"),
            PushAction("confirm", "Confirm", "https://api.example/cases/c1/confirm", True),
            PushAction("app_only", "In the app"),
        ),
        data={"url": "https://api.example/cases/c1"},
    )
    async with NtfySender(token="tk_server", timeout_s=5, allow_internal=True) as sender:
        await sender.send(PushChannel("n1", "ann", "ntfy", topic_url), message)
        await sender.send(PushChannel("n2", "ann", "ntfy", topic_url, {"token": "tk_own"}), MESSAGE)
        prefixed = str(server.make_url("/ntfy/fixloop-bob"))
        await sender.send(PushChannel("n3", "bob", "ntfy", prefixed), MESSAGE)
    normal, urgent, prefixed_doc = ntfy.published
    assert normal == {
        "topic": "fixloop-ann",
        "title": "Visit booked",
        "message": "Tina comes on Tuesday.",
        "priority": 3,
        "tags": ["wrench"],
        "actions": [
            {"action": "view", "label": "Open", "url": "https://api.example/cases/c1"},
            {
                "action": "http",
                "label": "Confirm",
                "url": "https://api.example/cases/c1/confirm",
                "method": "POST",
            },
        ],
        "click": "https://api.example/cases/c1",
    }
    assert urgent["priority"] == 5
    assert [a["label"] for a in urgent["actions"]] == ["Yes, fix it", "Not now"]
    assert ntfy.auth == ["Bearer tk_server", "Bearer tk_own", "Bearer tk_server"]
    assert prefixed_doc["topic"] == "fixloop-bob"
    assert ntfy.paths == ["/", "/", "/ntfy/"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, PushRefusedError),
        (403, PushRefusedError),
        (404, PushRefusedError),
        (429, RetryLaterError),
        (502, RetryLaterError),
    ],
)
async def test_ntfy_errors(aiohttp_server: AiohttpServer, status: int, error: type) -> None:
    ntfy = NtfyServer(status=status)
    server = await aiohttp_server(ntfy.app())
    async with NtfySender(timeout_s=5, allow_internal=True) as sender:
        with pytest.raises(error) as raised:
            await sender.send(PushChannel("n1", "ann", "ntfy", str(server.make_url("/t"))), MESSAGE)
    assert not isinstance(raised.value, DeadTokenError)  # ntfy topics never die
    assert ntfy.auth == [None]


def test_ntfy_topic_urls() -> None:
    assert split_topic_url("https://ntfy.example/mytopic") == ("https://ntfy.example/", "mytopic")
    assert split_topic_url("https://h.example:8443/a/b/") == ("https://h.example:8443/a/", "b")
    for bad in ("https://ntfy.example/", "mytopic", "ftp://ntfy.example/t"):
        with pytest.raises(PushRefusedError):
            split_topic_url(bad)


# -- webhooks ----------------------------------------------------------------------------

SECRET = "whsec-0123456789abcdef"


@dataclass
class HookReceiver:
    """The owner's endpoint; checks signatures, keeps raw requests."""

    raw: list[tuple[str, bytes, str]] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    status: int = 204

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook/{name}", self.hook)
        return app

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers["X-Fixloop-Timestamp"]
        signature = request.headers["X-Fixloop-Signature"]
        self.raw.append((ts, body, signature))
        ok = verify_webhook_signature(SECRET, ts, body, signature, now=time.time())
        self.verified.append(ok)
        if not ok:
            return web.Response(status=401)
        name = request.match_info["name"]
        return web.Response(status={"gone": 410, "busy": 503, "odd": 422}.get(name, self.status))


async def test_webhook_is_signed_and_verifiable(aiohttp_server: AiohttpServer) -> None:
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())
    channel = PushChannel(
        "h1", "ann", "webhook", str(server.make_url("/hook/a")), {"secret": SECRET}
    )
    async with WebhookSender(allow_internal=True, timeout_s=5) as sender:
        await sender.send(channel, MESSAGE)
    assert receiver.verified == [True]
    ts, body, signature = receiver.raw[0]
    assert signature.startswith("sha256=")
    assert len(signature) == 7 + 64
    doc = orjson.loads(body)
    assert doc == {
        "id": MESSAGE.message_id,
        "ts": int(ts),
        "title": MESSAGE.title,
        "body": MESSAGE.body,
        "actions": [a.to_json() for a in MESSAGE.actions],
        "data": {"case_id": "c1", "kind": "consent"},
        "urgent": True,
    }
    now = float(ts)
    assert verify_webhook_signature(
        SECRET, ts, body, signature.upper().replace("SHA256", "sha256"), now=now
    )
    tampered = body.replace(b"Your washer", b"Your dryer")
    assert not verify_webhook_signature(SECRET, ts, tampered, signature, now=now)
    assert not verify_webhook_signature("other-secret", ts, body, signature, now=now)
    assert not verify_webhook_signature(SECRET, str(int(ts) + 1), body, signature, now=now)
    assert not verify_webhook_signature(SECRET, ts, body, signature, now=now + 301)
    assert not verify_webhook_signature(SECRET, ts, body, signature[7:], now=now)
    assert not verify_webhook_signature(SECRET, "soon", body, signature, now=now)


async def test_webhook_statuses(aiohttp_server: AiohttpServer) -> None:
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())

    def hook(name: str, keys: dict[str, str] | None = None) -> PushChannel:
        target = str(server.make_url(f"/hook/{name}"))
        return PushChannel(
            f"h-{name}", "ann", "webhook", target, {"secret": SECRET} if keys is None else keys
        )

    async with WebhookSender(allow_internal=True, timeout_s=5) as sender:
        with pytest.raises(DeadTokenError):
            await sender.send(hook("gone"), MESSAGE)
        with pytest.raises(RetryLaterError):
            await sender.send(hook("busy"), MESSAGE)
        with pytest.raises(PushRefusedError):
            await sender.send(hook("odd"), MESSAGE)
        with pytest.raises(PushRefusedError):
            await sender.send(hook("a", {}), MESSAGE)  # no secret: nothing sent
        with pytest.raises(PushRefusedError):  # a wrong secret: the receiver says 401
            await sender.send(hook("a", {"secret": "wrong"}), MESSAGE)
    assert receiver.verified == [True, True, True, False]


def test_signature_helper_is_hmac_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign_webhook(SECRET, "1700000000", b"{}") == f"sha256={expected}"


# -- plumbing ----------------------------------------------------------------------------


async def test_timeouts_and_unreachable_services_are_delivery_errors(
    aiohttp_server: AiohttpServer,
) -> None:
    answer = asyncio.Event()  # the slow service answers only once the test lets it

    async def slow(request: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook/slow", slow)
    server = await aiohttp_server(app)
    slow_hook = PushChannel(
        "h-slow", "ann", "webhook", str(server.make_url("/hook/slow")), {"secret": SECRET}
    )
    closed = PushChannel(
        "h-closed", "ann", "webhook", "http://127.0.0.1:9/hook", {"secret": SECRET}
    )
    async with WebhookSender(allow_internal=True, timeout_s=0.2) as sender:
        # the sender's own timeout ends the wait; the test's bound only stops a hang
        async with asyncio.timeout(30):
            with pytest.raises(DeliveryError, match="timed out"):
                await sender.send(slow_hook, MESSAGE)
        answer.set()
        with pytest.raises(DeliveryError, match="unreachable") as unreachable:
            await sender.send(closed, MESSAGE)
    assert "127.0.0.1" not in str(unreachable.value)


async def test_a_sender_must_be_opened() -> None:
    channel = PushChannel("h1", "ann", "webhook", "http://127.0.0.1:9/hook", {"secret": SECRET})
    with pytest.raises(PushRefusedError, match="not open"):
        await WebhookSender(allow_internal=True).send(channel, MESSAGE)


def test_message_checks_its_data() -> None:
    with pytest.raises(InvalidRequestError):
        PushMessage("t", "b", data={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequestError):
        PushMessage("t", "b", ttl_s=-1)
    assert PushMessage("t", "b").message_id != PushMessage("t", "b").message_id


def test_retry_after_in_both_forms() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_nothing_secret_is_logged(
    aiohttp_server: AiohttpServer, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver, fcm = await fcm_setup(aiohttp_server, rsa_key)
    hooks = HookReceiver()
    hook_server = await aiohttp_server(hooks.app())
    channels = [
        PushChannel("fcm-a", "ann", "fcm", "dead-token"),
        PushChannel("fcm-b", "ann", "fcm", "busy"),
        PushChannel(
            "hook-1", "ann", "webhook", str(hook_server.make_url("/hook/gone")), {"secret": SECRET}
        ),
    ]
    async with fcm, WebhookSender(allow_internal=True, timeout_s=5) as hook:
        dispatcher = PushDispatcher({"fcm": fcm, "webhook": hook}, attempts=2, sleep=no_sleep)
        report = await dispatcher.deliver(channels, (), MESSAGE)
    assert report.delivered_via is None
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("notifier")]
    assert ours
    text = " ".join([*ours, *report.errors])
    for secret in ("dead-token", "busy", "/hook/gone", SECRET, *receiver.issued):
        assert secret not in text
    assert "fcm-a" in text
    assert "fcm-b" in text
    assert "hook-1" in text
    assert [c.channel_id for c in report.retired] == ["fcm-a", "hook-1"]


# -- the dispatcher ----------------------------------------------------------------------


async def no_sleep(delay_s: float) -> None:
    return None


@dataclass
class Scripted:
    """Webhook and ntfy receivers that answer each path from a script of statuses."""

    script: dict[str, list[int]]
    calls: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        name = request.path.strip("/") or (await request.json())["topic"]
        self.calls.append(name)
        statuses = self.script.get(name, [204])
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return web.Response(status=status, headers=self.headers if status == 429 else {})


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


async def dispatch_setup(
    aiohttp_server: AiohttpServer, script: dict[str, list[int]]
) -> tuple[Scripted, Callable[[str, str], PushChannel], Sleeps]:
    scripted = Scripted(script)
    server = await aiohttp_server(scripted.app())

    def channel(kind: str, name: str) -> PushChannel:
        if kind == "ntfy":
            return PushChannel(name, "ann", "ntfy", str(server.make_url(f"/{name}")))
        return PushChannel(
            name, "ann", "webhook", str(server.make_url(f"/{name}")), {"secret": SECRET}
        )

    return scripted, channel, Sleeps()


async def test_dispatcher_follows_preference_order(aiohttp_server: AiohttpServer) -> None:
    scripted, channel, sleeps = await dispatch_setup(aiohttp_server, {})
    hook, topic = channel("webhook", "hook-a"), channel("ntfy", "topic-a")
    async with (
        WebhookSender(allow_internal=True, timeout_s=5) as wh,
        NtfySender(timeout_s=5, allow_internal=True) as nt,
    ):
        dispatcher = PushDispatcher({"webhook": wh, "ntfy": nt}, sleep=sleeps)
        report = await dispatcher.deliver([hook, topic], ["ntfy"], MESSAGE)
        assert report == DeliveryReport(topic, (), 1, ())
        report = await dispatcher.deliver([hook, topic], [], MESSAGE)
        assert report.delivered_via == hook
        inactive = PushChannel("hook-old", "ann", "webhook", hook.target, hook.keys, active=False)
        assert dispatcher.order([inactive, hook, topic], ["ntfy", "webhook", "ntfy"]) == [
            topic,
            hook,
        ]
    assert scripted.calls == ["topic-a", "hook-a"]
    assert sleeps.delays == []


async def test_dispatcher_retries_503_with_backoff_then_succeeds(
    aiohttp_server: AiohttpServer,
) -> None:
    scripted, channel, sleeps = await dispatch_setup(
        aiohttp_server, {"hook-a": [503, 503, 503, 204]}
    )
    async with WebhookSender(allow_internal=True, timeout_s=5) as wh:
        dispatcher = PushDispatcher(
            {"webhook": wh},
            attempts=4,
            base_delay_s=1.0,
            max_delay_s=3.0,
            sleep=sleeps,
            rng=random.Random(7),
        )
        report = await dispatcher.deliver([channel("webhook", "hook-a")], [], MESSAGE)
    assert report.delivered_via is not None
    assert report.delivered_via.channel_id == "hook-a"
    assert report.attempts == 4
    assert len(report.errors) == 3
    assert all("503" in e for e in report.errors)
    assert scripted.calls == ["hook-a"] * 4
    # equal jitter: each pause in [step/2, step], steps 1, 2, 3 (capped)
    assert len(sleeps.delays) == 3
    for delay, step in zip(sleeps.delays, (1.0, 2.0, 3.0), strict=True):
        assert step / 2 <= delay <= step


async def test_dispatcher_retires_dead_token_and_uses_next(aiohttp_server: AiohttpServer) -> None:
    scripted, channel, sleeps = await dispatch_setup(aiohttp_server, {"hook-dead": [410]})
    dead, alive = channel("webhook", "hook-dead"), channel("ntfy", "topic-b")
    async with (
        WebhookSender(allow_internal=True, timeout_s=5) as wh,
        NtfySender(timeout_s=5, allow_internal=True) as nt,
    ):
        dispatcher = PushDispatcher({"webhook": wh, "ntfy": nt}, sleep=sleeps)
        report = await dispatcher.deliver([alive, dead], ["webhook"], MESSAGE)
    assert report.delivered_via == alive
    retired = PushChannel(
        dead.channel_id, "ann", "webhook", dead.target, dead.keys, active=False, failures=1
    )
    assert report.retired == (retired,)
    assert report.updated == (retired,)  # the one that delivered had no failures to reset
    assert report.attempts == 2
    assert scripted.calls == ["hook-dead", "topic-b"]  # the dead one tried once, no retry
    assert sleeps.delays == []


async def test_dispatcher_all_channels_failing(aiohttp_server: AiohttpServer) -> None:
    scripted, channel, sleeps = await dispatch_setup(
        aiohttp_server, {"hook-a": [500], "hook-b": [400], "topic-c": [403]}
    )
    channels = [
        channel("webhook", "hook-a"),
        channel("webhook", "hook-b"),
        channel("ntfy", "topic-c"),
    ]
    fcm_only = PushChannel("fcm-1", "ann", "fcm", "token")
    async with (
        WebhookSender(allow_internal=True, timeout_s=5) as wh,
        NtfySender(timeout_s=5, allow_internal=True) as nt,
    ):
        dispatcher = PushDispatcher({"webhook": wh, "ntfy": nt}, attempts=3, sleep=sleeps)
        report = await dispatcher.deliver([*channels, fcm_only], ["fcm"], MESSAGE)
    assert report.delivered_via is None
    assert not report.delivered
    assert report.retired == ()
    assert report.attempts == 3 + 1 + 1  # 5xx retried, refusals not
    assert scripted.calls == ["hook-a"] * 3 + ["hook-b", "topic-c"]
    assert len(sleeps.delays) == 2
    assert "no sender" in report.errors[0]
    assert len(report.errors) == 6


async def test_dispatcher_honours_retry_after(aiohttp_server: AiohttpServer) -> None:
    scripted, channel, sleeps = await dispatch_setup(aiohttp_server, {"hook-a": [429, 204]})
    scripted.headers = {"Retry-After": "7"}
    async with WebhookSender(allow_internal=True, timeout_s=5) as wh:
        dispatcher = PushDispatcher({"webhook": wh}, max_delay_s=10.0, sleep=sleeps)
        report = await dispatcher.deliver([channel("webhook", "hook-a")], [], MESSAGE)
        assert report.delivered
        assert sleeps.delays == [7.0]

        # asked to wait longer than the policy's longest pause: the next channel now
        scripted.script["hook-b"] = [429, 204]
        scripted.headers = {"Retry-After": "3600"}
        report = await dispatcher.deliver(
            [channel("webhook", "hook-b"), channel("webhook", "hook-c")], [], MESSAGE
        )
    assert report.delivered_via is not None
    assert report.delivered_via.channel_id == "hook-c"
    assert sleeps.delays == [7.0]
    assert scripted.calls == ["hook-a", "hook-a", "hook-b", "hook-c"]


def test_retry_policy_is_checked() -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError):
        RetryPolicy(base_delay_s=5, max_delay_s=1)
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=30)
    rng = random.Random(1)
    steps = [policy.backoff_s(n, rng) for n in range(10)]
    assert all(0.25 <= s <= 30 for s in steps)
    assert steps[-1] >= 15  # capped at the longest pause, jittered in its upper half
    assert isinstance(PushRefusedError("x"), PermanentError)


# -- failures in a row ---------------------------------------------------------------------


async def test_failures_are_counted_reset_on_success_and_retire_at_the_limit(
    aiohttp_server: AiohttpServer,
) -> None:
    scripted, channel, sleeps = await dispatch_setup(
        aiohttp_server, {"hook-a": [400], "hook-b": [204]}
    )
    flaky = replace(channel("webhook", "hook-a"), failures=1)
    backup = replace(channel("webhook", "hook-b"), failures=4)
    async with WebhookSender(allow_internal=True, timeout_s=5) as wh:
        dispatcher = PushDispatcher({"webhook": wh}, max_failures=3, sleep=sleeps)
        report = await dispatcher.deliver([flaky, backup], [], MESSAGE)
        # the refusing channel counts one more; the one that took it is back to 0
        assert report.delivered_via == replace(backup, failures=0)
        assert report.updated == (replace(flaky, failures=2), replace(backup, failures=0))
        assert report.retired == ()

        report = await dispatcher.deliver([replace(flaky, failures=2)], [], MESSAGE)
    # the third failure in a row reaches the limit: retired like a dead token
    gone = replace(flaky, failures=3, active=False)
    assert report.updated == (gone,)
    assert report.retired == (gone,)
    assert dispatcher.order([gone, backup], []) == [backup]
    assert scripted.calls == ["hook-a", "hook-b", "hook-a"]


async def test_a_clean_success_changes_no_record(aiohttp_server: AiohttpServer) -> None:
    _, channel, sleeps = await dispatch_setup(aiohttp_server, {})
    async with WebhookSender(allow_internal=True, timeout_s=5) as wh:
        report = await PushDispatcher({"webhook": wh}, sleep=sleeps).deliver(
            [channel("webhook", "hook-a")], [], MESSAGE
        )
    assert report.delivered
    assert report.updated == ()


def test_max_failures_is_checked() -> None:
    with pytest.raises(ConfigError):
        PushDispatcher({}, max_failures=0)


# -- webhooks and internal addresses -------------------------------------------------------


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[str]]], list[str]]:
    """Answers name lookups of the running loop from a table; returns the names asked."""
    asked: list[str] = []

    def install(table: dict[str, list[str]]) -> list[str]:
        loop = asyncio.get_running_loop()

        async def getaddrinfo(host: str, port: int, **_kw: Any) -> list[Any]:
            asked.append(host)
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "unknown name")
            return [
                (
                    socket.AF_INET6 if ":" in addr else socket.AF_INET,
                    socket.SOCK_STREAM,
                    6,
                    "",
                    (addr, port, 0, 0) if ":" in addr else (addr, port),
                )
                for addr in table[host]
            ]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        return asked

    return install


async def test_webhook_to_an_internal_address_is_refused_unless_allowed(
    aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())
    channel = PushChannel(
        "h-local", "ann", "webhook", str(server.make_url("/hook/a")), {"secret": SECRET}
    )
    caplog.set_level(logging.WARNING, logger="notifier.push.webhook")
    async with WebhookSender(timeout_s=5) as sender:
        with pytest.raises(UnsafeAddressError) as refused:
            await sender.send(channel, MESSAGE)
    assert isinstance(refused.value, PermanentError)
    assert "h-local" in str(refused.value)
    assert "127.0.0.1" not in str(refused.value)
    assert receiver.raw == []
    assert "h-local" in caplog.text
    assert "internal address" in caplog.text
    async with WebhookSender(timeout_s=5, allow_internal=True) as sender:
        await sender.send(channel, MESSAGE)
    assert receiver.verified == [True]


@pytest.mark.parametrize(
    "host", ["127。0。0。1", "127．0．0．1", "１２７.０.０.１", "127｡0｡0｡1", "①②⑦.0.0.1"]
)
async def test_a_unicode_spelling_of_loopback_reaches_nothing(
    aiohttp_server: AiohttpServer, host: str
) -> None:
    # the HTTP client would map these to 127.0.0.1 through IDNA and skip the resolver
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())
    target = f"https://{host}:{server.port}/hook/a"
    channel = PushChannel("h-uni", "ann", "webhook", target, {"secret": SECRET})
    async with WebhookSender(timeout_s=5) as sender:
        with pytest.raises(UnsafeAddressError):
            await sender.send(channel, MESSAGE)
    assert receiver.raw == []


@pytest.mark.parametrize(
    "answers",
    [["127.0.0.1"], ["93.184.215.14", "10.0.0.7"], ["::1"], ["::ffff:169.254.169.254"]],
)
async def test_a_name_that_resolves_inside_is_refused_before_connecting(
    aiohttp_server: AiohttpServer,
    fake_dns: Callable[[dict[str, list[str]]], list[str]],
    answers: list[str],
) -> None:
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())
    asked = fake_dns({"hooks.example.net": answers})
    target = f"https://hooks.example.net:{server.port}/hook/a"
    channel = PushChannel("h-dns", "ann", "webhook", target, {"secret": SECRET})
    async with WebhookSender(timeout_s=5) as sender:
        with pytest.raises(UnsafeAddressError, match="internal address"):
            await sender.send(channel, MESSAGE)
    assert asked == ["hooks.example.net"]
    assert receiver.raw == []


async def test_the_checked_address_is_the_one_connected_to(
    aiohttp_server: AiohttpServer, fake_dns: Callable[[dict[str, list[str]]], list[str]]
) -> None:
    # allowed internal: the name resolves through the same checked resolver and is used
    receiver = HookReceiver()
    server = await aiohttp_server(receiver.app())
    fake_dns({"hooks.home.test": ["127.0.0.1"]})
    target = f"http://hooks.home.test:{server.port}/hook/a"
    channel = PushChannel("h-home", "ann", "webhook", target, {"secret": SECRET})
    async with WebhookSender(timeout_s=5, allow_internal=True) as sender:
        await sender.send(channel, MESSAGE)
    assert receiver.verified == [True]


async def test_a_name_that_does_not_resolve_is_a_delivery_error(
    fake_dns: Callable[[dict[str, list[str]]], list[str]],
) -> None:
    fake_dns({})
    channel = PushChannel(
        "h-none", "ann", "webhook", "https://nowhere.example.net/h", {"secret": SECRET}
    )
    async with WebhookSender(timeout_s=5) as sender:
        with pytest.raises(DeliveryError):
            await sender.send(channel, MESSAGE)


async def test_a_refused_webhook_counts_as_a_failed_delivery(
    aiohttp_server: AiohttpServer,
) -> None:
    scripted, channel, sleeps = await dispatch_setup(aiohttp_server, {})
    hook, topic = channel("webhook", "hook-a"), channel("ntfy", "topic-a")
    async with (
        WebhookSender(timeout_s=5) as wh,
        NtfySender(timeout_s=5, allow_internal=True) as nt,
    ):
        dispatcher = PushDispatcher({"webhook": wh, "ntfy": nt}, max_failures=1, sleep=sleeps)
        report = await dispatcher.deliver([hook, topic], [], MESSAGE)
    assert report.delivered_via == topic
    assert report.attempts == 2  # a refusal is not retried
    assert report.retired == (replace(hook, failures=1, active=False),)
    assert scripted.calls == ["topic-a"]  # nothing reached the internal webhook
    assert sleeps.delays == []


async def test_ntfy_and_webpush_targets_inside_the_network_are_refused(
    aiohttp_server: AiohttpServer,
) -> None:
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app)
    keys = generate_vapid_keys()
    p256dh = b64url_encode(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    webpush_keys = {"p256dh": p256dh, "auth": b64url_encode(b"0123456789abcdef")}
    targets = (
        f"http://127.0.0.1:{server.port}/topic",
        f"https://127.0.0.1:{server.port}/topic",
        f"https://localhost:{server.port}/topic",
        f"https://[::ffff:127.0.0.1]:{server.port}/topic",
        f"https://2130706433:{server.port}/topic",
    )
    async with (
        NtfySender(timeout_s=5) as ntfy,
        WebPushSender(keys.private_key, subject="mailto:ops@fixloop.example", timeout_s=5) as wp,
    ):
        for n, target in enumerate(targets):
            topic = PushChannel(f"nt-{n}", "owner-1", "ntfy", target)
            with pytest.raises(UnsafeAddressError, match="internal address"):
                await ntfy.send(topic, MESSAGE)
            endpoint = PushChannel(f"wp-{n}", "owner-1", "webpush", target, keys=webpush_keys)
            with pytest.raises(UnsafeAddressError, match="internal address"):
                await wp.send(endpoint, MESSAGE)
    assert hits == []
    # the same senders deliver there once internal targets are allowed (a local install)
    async with NtfySender(timeout_s=5, allow_internal=True) as ntfy:
        await ntfy.send(PushChannel("nt-ok", "owner-1", "ntfy", targets[0]), MESSAGE)
    assert hits == ["/"]
