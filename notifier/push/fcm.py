"""Firebase Cloud Messaging (notifier: outbox -> push -> FCM -> the owner's app).

FCM's HTTP v1 API (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages)
authenticates with an OAuth 2 access token. The token comes from the service account
by the JWT bearer grant (RFC 7523, Google's "OAuth 2.0 for server to server
applications"): an RS256-signed assertion with ``iss`` = the account's e-mail,
``scope`` = firebase.messaging, ``aud`` = its ``token_uri``, valid for one hour, is
exchanged at ``token_uri``; the access token is kept until a minute before it expires.

Answers (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode):
``404``/``UNREGISTERED`` and a ``400 INVALID_ARGUMENT`` about the registration token
retire the channel; other 400s and 403s are refusals (``SENDER_ID_MISMATCH`` too: it
points at our own configuration as often as at the token, so it never retires one);
a 401 gets one fresh access token and then counts as a delivery failure; 429 and 5xx
are retried, after ``Retry-After`` when FCM sends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from notifier.errors import DeadTokenError, DeliveryError
from notifier.model import ChannelKind, PushChannel
from notifier.push.base import (
    HttpAnswer,
    HttpSender,
    PushMessage,
    PushRefusedError,
    RetryLaterError,
    b64url_encode,
)
from wire.errors import ConfigError

__all__ = ["FCM_SCOPE", "FcmSender", "fcm_message"]

_LOG = logging.getLogger(__name__)

#: The OAuth 2 scope FCM's HTTP v1 API needs.
FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_ASSERTION_S: Final = 3600  # Google accepts assertions valid for at most one hour
_EARLY_S: Final = 60.0  # fetch a new access token this long before the old one expires
_MAX_COLLAPSE: Final = 64  # apns-collapse-id is at most 64 bytes


def fcm_message(token: str, message: PushMessage, *, now_s: float) -> dict[str, Any]:
    """The FCM v1 ``messages:send`` request body for one registration token.

    One-tap actions travel in ``data["actions"]`` as a JSON list of ``action``,
    ``label``, ``url`` (FCM data values must be strings; the app draws the buttons).

    Args:
        token: the registration token.
        message: what to send.
        now_s: the wall clock in Unix seconds (for ``apns-expiration``).

    Returns:
        ``{"message": {...}}``.
    """
    data = dict(message.data)
    if message.actions:
        data.setdefault("actions", orjson.dumps([a.to_json() for a in message.actions]).decode())
    data.setdefault("message_id", message.message_id)
    android: dict[str, Any] = {
        "priority": "high" if message.urgent else "normal",
        "ttl": f"{message.ttl_s}s",
    }
    apns_headers = {
        "apns-priority": "10" if message.urgent else "5",
        "apns-push-type": "alert",
        # 0 means "deliver now or never" to APNs, as a TTL of 0 does to FCM
        "apns-expiration": str(int(now_s) + message.ttl_s if message.ttl_s else 0),
    }
    if message.collapse_key:
        android["collapse_key"] = message.collapse_key
        # the drawer keeps one notification per key, as apns-collapse-id does on iOS: a
        # message pushed again (a notifier killed before it kept "sent") replaces the first
        android["notification"] = {"tag": message.collapse_key}
        apns_headers["apns-collapse-id"] = message.collapse_key.encode()[:_MAX_COLLAPSE].decode(
            "utf-8", "ignore"
        )
    return {
        "message": {
            "token": token,
            "notification": {"title": message.title, "body": message.body},
            "data": data,
            "android": android,
            "apns": {"headers": apns_headers},
        }
    }


def _fcm_error(answer: HttpAnswer) -> tuple[str, str, str]:
    """``(status, errorCode, message)`` of an FCM error document (empty when absent)."""
    try:
        doc = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return "", "", ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return "", "", ""
    code = ""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
            code = detail["errorCode"]
            break
    return str(error.get("status", "")), code, str(error.get("message", ""))


class FcmSender(HttpSender):
    """Sends through FCM HTTP v1 as a service account.

    Args:
        service_account: the service account JSON: ``client_email``, ``private_key``
            (PEM, RSA), ``project_id``, ``token_uri``.
        base_url: the FCM API root.
        token_uri: where to exchange the assertion (default: the account's ``token_uri``).
        timeout_s: the longest one request may take.
        clock: wall clock in Unix seconds.

    Raises:
        ConfigError: the service account lacks a field or its key is not an RSA key.
    """

    kind: ChannelKind = "fcm"

    def __init__(
        self,
        service_account: Mapping[str, Any],
        *,
        base_url: str = "https://fcm.googleapis.com",
        token_uri: str | None = None,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(timeout_s=timeout_s)
        missing = [
            name
            for name in ("client_email", "private_key", "project_id")
            if not isinstance(service_account.get(name), str) or not service_account[name]
        ]
        given_uri = token_uri or service_account.get("token_uri")
        uri = given_uri if isinstance(given_uri, str) else ""
        if not uri:
            missing.append("token_uri")
        if missing:
            raise ConfigError(f"the FCM service account lacks {', '.join(missing)}")
        try:
            key = serialization.load_pem_private_key(
                str(service_account["private_key"]).encode(), password=None
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError("the FCM service account's private_key is not a PEM key") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("the FCM service account's private_key is not an RSA key")
        self._key = key
        self._key_id = service_account.get("private_key_id")
        self._email = str(service_account["client_email"])
        self._project = str(service_account["project_id"])
        self._token_uri = uri
        self._send_url = f"{base_url.rstrip('/')}/v1/projects/{self._project}/messages:send"
        self._clock = clock
        self._access: tuple[str, float] | None = None  # token, expiry (Unix seconds)
        self._lock = asyncio.Lock()

    def assertion(self) -> str:
        """A fresh signed JWT assertion (RS256) for the token exchange (CPU: use a thread)."""
        now = int(self._clock())
        header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
        if isinstance(self._key_id, str) and self._key_id:
            header["kid"] = self._key_id
        claims = {
            "iss": self._email,
            "scope": FCM_SCOPE,
            "aud": self._token_uri,
            "iat": now,
            "exp": now + _ASSERTION_S,
        }
        signing = f"{b64url_encode(orjson.dumps(header))}.{b64url_encode(orjson.dumps(claims))}"
        signature = self._key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64url_encode(signature)}"

    async def _access_token(self, channel_id: str, *, stale: str | None = None) -> str:
        """The cached access token, or a new one (``stale``: the one FCM just refused)."""
        async with self._lock:
            cached = self._access
            if cached is not None and cached[0] != stale and cached[1] - _EARLY_S > self._clock():
                return cached[0]
            assertion = await asyncio.to_thread(self.assertion)
            answer = await self.request(
                channel_id,
                self._token_uri,
                data={"grant_type": _GRANT, "assertion": assertion},
            )
            if answer.status == 429 or answer.status >= 500:
                raise RetryLaterError(
                    f"FCM token exchange: HTTP {answer.status}", answer.retry_after_s
                )
            if answer.status != 200:
                _LOG.error(
                    "the FCM token exchange refused the service account: HTTP %s", answer.status
                )
                raise PushRefusedError(f"FCM token exchange refused: HTTP {answer.status}")
            try:
                doc = orjson.loads(answer.body)
                token = doc["access_token"]
                lifetime_s = float(doc.get("expires_in", 3600))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DeliveryError("FCM token exchange: answer not understood") from exc
            if not isinstance(token, str) or not token:
                raise DeliveryError("FCM token exchange: no access token in the answer")
            self._access = (token, self._clock() + lifetime_s)
            return token

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """Send the message to the channel's registration token.

        Raises:
            DeliveryError: network trouble, 429, 5xx, or a 401 after a fresh access token.
            DeadTokenError: the token is unregistered or invalid.
            PushRefusedError: any other refusal.
        """
        body = orjson.dumps(fcm_message(channel.target, message, now_s=self._clock()))
        token = await self._access_token(channel.channel_id)
        for fresh in (False, True):
            answer = await self.request(
                channel.channel_id,
                self._send_url,
                data=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            if answer.status != 401:
                break
            if fresh:
                raise DeliveryError(f"fcm channel {channel.channel_id}: HTTP 401 twice")
            token = await self._access_token(channel.channel_id, stale=token)
        self._check_fcm(channel.channel_id, answer)
        _LOG.debug("fcm channel %s took message %s", channel.channel_id, message.message_id)

    def _check_fcm(self, channel_id: str, answer: HttpAnswer) -> None:
        if 200 <= answer.status < 300:
            return
        status, code, text = _fcm_error(answer)
        what = f"fcm channel {channel_id}: HTTP {answer.status} {code or status}".rstrip()
        if answer.status == 404 or "UNREGISTERED" in (status, code):
            raise DeadTokenError(what)
        if (
            answer.status == 400
            and "INVALID_ARGUMENT" in (status, code)
            and "token" in text.lower()
        ):
            raise DeadTokenError(what)
        if answer.status == 429 or answer.status >= 500:
            raise RetryLaterError(what, answer.retry_after_s)
        raise PushRefusedError(what)
