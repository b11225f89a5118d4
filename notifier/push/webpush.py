"""Web Push to the owner's browser (notifier: outbox -> push -> the browser's push service).

A browser subscription is an endpoint URL at its push service (RFC 8030) and two
keys: ``p256dh`` (the browser's P-256 public key, uncompressed, base64url) and
``auth`` (16 random bytes, base64url). The message is sent as one encrypted record:

* **Content** (RFC 8291 with the ``aes128gcm`` coding of RFC 8188): an ephemeral P-256
  key agrees a secret with ``p256dh``; HKDF-SHA256 keyed with ``auth`` and
  ``"WebPush: info" 0x00 || ua_public || as_public`` gives the input key, and HKDF with
  a random 16-byte salt gives the AES-128-GCM key (``"Content-Encoding: aes128gcm" 0x00``)
  and nonce (``"Content-Encoding: nonce" 0x00``). The body is
  ``salt || rs (uint32) || idlen || as_public || AES-GCM(plaintext || 0x02)``: one
  record, the 0x02 delimiter marking it as the last, no padding.
* **Sender** (VAPID, RFC 8292): ``Authorization: vapid t=<JWT>, k=<public key>``, the JWT
  signed ES256 (raw ``r || s``) with ``aud`` = the endpoint's origin, ``exp`` 12 hours
  ahead (at most 24 are allowed) and ``sub`` = a ``mailto:`` or ``https:`` contact. A
  token is reused per origin until an hour before it expires.
* **Headers** (RFC 8030): ``TTL``, ``Urgency`` (``high`` if urgent, else ``normal``) and
  ``Topic`` from the collapse key (at most 32 base64url characters: a longer or other
  key is replaced by a hash of it).

The plaintext is the message's JSON (:meth:`~notifier.push.base.PushMessage.to_json`
plus ``tag`` = the collapse key) for the site's service worker to show. ``404`` and
``410`` retire the subscription; 429 and 5xx are retried; other 4xx are refusals.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from notifier.model import ChannelKind, PushChannel
from notifier.push.base import (
    CheckedHttpSender,
    PushMessage,
    PushRefusedError,
    b64url_decode,
    b64url_encode,
)
from wire.errors import ConfigError

__all__ = [
    "MAX_PLAINTEXT_BYTES",
    "VapidKeys",
    "WebPushSender",
    "encrypt_aes128gcm",
    "generate_vapid_keys",
    "load_vapid_key",
    "vapid_authorization",
    "web_push_topic",
]

_LOG = logging.getLogger(__name__)
_RECORD_SIZE: Final = 4096
_SALT_BYTES: Final = 16
_TAG_BYTES: Final = 16
_POINT_BYTES: Final = 65
_AUTH_BYTES: Final = 16
_HEADER_BYTES: Final = _SALT_BYTES + 4 + 1 + _POINT_BYTES
#: The largest plaintext that fits one record in the 4096 bytes every push service
#: must accept (RFC 8030 section 7.2): 4096 - 86 (header) - 16 (tag) - 1 (delimiter).
MAX_PLAINTEXT_BYTES: Final = _RECORD_SIZE - _HEADER_BYTES - _TAG_BYTES - 1
_VAPID_TTL_S: Final = 12 * 3600
_VAPID_RENEW_S: Final = 3600
_MAX_TOPIC: Final = 32
_TOPIC_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-_")
_DEAD: Final = frozenset({404, 410})


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), as RFC 8291 and RFC 8188 use it."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _raw_public(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def encrypt_aes128gcm(
    plaintext: bytes,
    p256dh: bytes,
    auth: bytes,
    *,
    salt: bytes | None = None,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """Encrypt a Web Push payload for a subscription (RFC 8291, one aes128gcm record).

    Args:
        plaintext: the payload (at most :data:`MAX_PLAINTEXT_BYTES`).
        p256dh: the subscription's public key (65-byte uncompressed P-256 point).
        auth: the subscription's 16-byte authentication secret.
        salt: the 16-byte salt (random unless given: test vectors only).
        sender_key: the ephemeral key (new unless given: test vectors only).

    Returns:
        The request body: the aes128gcm header and the one record.

    Raises:
        PushRefusedError: the keys are malformed or the payload is too large.
    """
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise PushRefusedError(
            f"a Web Push payload must fit one record: {len(plaintext)} > {MAX_PLAINTEXT_BYTES}"
        )
    if len(auth) != _AUTH_BYTES:
        raise PushRefusedError("the subscription's auth secret is not 16 bytes")
    if len(p256dh) != _POINT_BYTES or p256dh[0] != 0x04:
        raise PushRefusedError("the subscription's p256dh is not an uncompressed P-256 point")
    try:
        receiver = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError as exc:
        raise PushRefusedError("the subscription's p256dh is not a point on P-256") from exc
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    if len(salt) != _SALT_BYTES:
        raise PushRefusedError("the aes128gcm salt must be 16 bytes")
    sender_key = ec.generate_private_key(ec.SECP256R1()) if sender_key is None else sender_key
    as_public = _raw_public(sender_key.public_key())
    shared = sender_key.exchange(ec.ECDH(), receiver)
    # RFC 8291 section 3.4: the input keying material, keyed with the auth secret
    ikm = _hkdf(auth, shared, b"WebPush: info\x00" + p256dh + as_public, 32)
    # RFC 8188 section 2.2 and 2.3: the content encryption key and the nonce
    cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    record = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    header = salt + _RECORD_SIZE.to_bytes(4, "big") + bytes([len(as_public)]) + as_public
    return header + record


@dataclass(frozen=True, slots=True)
class VapidKeys:
    """A VAPID key pair, in the forms settings and browsers want.

    Attributes:
        private_key: the raw 32-byte private scalar, base64url (for settings).
        private_key_pem: the same key as PKCS#8 PEM (for settings, if preferred).
        public_key: the uncompressed public point, base64url (the browser's
            ``applicationServerKey``).
    """

    private_key: str
    private_key_pem: str
    public_key: str


def generate_vapid_keys() -> VapidKeys:
    """Make a new VAPID key pair (P-256) for ``notifier.push.vapid_private_key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    return VapidKeys(b64url_encode(raw), pem, b64url_encode(_raw_public(key.public_key())))


def load_vapid_key(text: str) -> ec.EllipticCurvePrivateKey:
    """Read a VAPID private key: PEM, or base64url of the raw 32-byte scalar.

    Raises:
        ConfigError: not a P-256 private key in either form.
    """
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = b64url_decode(text)
            if len(raw) != 32:
                raise ConfigError("a raw VAPID private key is 32 bytes (base64url)")
            key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError("the VAPID private key is neither PEM nor base64url raw P-256") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("the VAPID private key must be a P-256 (prime256v1) key")
    return key


def _origin(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise PushRefusedError("the Web Push endpoint is not an http(s) URL")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def vapid_authorization(
    key: ec.EllipticCurvePrivateKey, audience: str, subject: str, *, expires_s: int
) -> str:
    """The VAPID ``Authorization`` header value (RFC 8292 section 3).

    Args:
        key: the VAPID private key.
        audience: the push service's origin (``https://push.example``).
        subject: the contact (``mailto:`` or ``https:``).
        expires_s: the token's ``exp`` (Unix seconds, at most 24 hours ahead).

    Returns:
        ``vapid t=<JWT>, k=<base64url public key>``.
    """
    header = b64url_encode(orjson.dumps({"typ": "JWT", "alg": "ES256"}))
    claims = b64url_encode(orjson.dumps({"aud": audience, "exp": expires_s, "sub": subject}))
    signing = f"{header}.{claims}"
    r, s = decode_dss_signature(key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
    # JWS ES256 wants the fixed-size r || s, not the DER that cryptography returns
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    public = b64url_encode(_raw_public(key.public_key()))
    return f"vapid t={signing}.{b64url_encode(signature)}, k={public}"


def web_push_topic(collapse_key: str) -> str:
    """A ``Topic`` header value for a collapse key (RFC 8030 section 5.4).

    A key of at most 32 base64url characters is used as it is; any other is replaced
    by the first 32 characters of its SHA-256 in base64url, so that distinct keys stay
    distinct.
    """
    if 0 < len(collapse_key) <= _MAX_TOPIC and set(collapse_key) <= _TOPIC_CHARS:
        return collapse_key
    return b64url_encode(hashlib.sha256(collapse_key.encode()).digest())[:_MAX_TOPIC]


class WebPushSender(CheckedHttpSender):
    """Sends encrypted Web Push messages, identified by VAPID.

    Args:
        private_key: VAPID private key (PEM, or base64url of the raw 32-byte scalar).
        subject: contact for the push services (``mailto:`` or ``https:``).
        timeout_s: the longest one request may take.
        clock: wall clock in Unix seconds.

    Raises:
        ConfigError: the key is not a P-256 private key or the subject not a contact.
    """

    kind: ChannelKind = "webpush"

    def __init__(
        self,
        private_key: str,
        *,
        subject: str,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        allow_internal: bool = False,
    ) -> None:
        super().__init__(timeout_s=timeout_s, allow_internal=allow_internal)
        if not subject.startswith(("mailto:", "https:")):
            raise ConfigError("the VAPID subject must be a mailto: or https: contact")
        self._key = load_vapid_key(private_key)
        self._subject = subject
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}  # origin -> header, exp

    @property
    def public_key(self) -> str:
        """The VAPID public key (base64url) browsers subscribe with."""
        return b64url_encode(_raw_public(self._key.public_key()))

    def _authorization(self, origin: str) -> str:
        now = self._clock()
        cached = self._tokens.get(origin)
        if cached is not None and cached[1] - _VAPID_RENEW_S > now:
            return cached[0]
        expires_s = int(now) + _VAPID_TTL_S
        value = vapid_authorization(self._key, origin, self._subject, expires_s=expires_s)
        if len(self._tokens) >= 256:
            self._tokens.clear()
        self._tokens[origin] = (value, float(expires_s))
        return value

    def _prepare(self, channel: PushChannel, message: PushMessage) -> tuple[bytes, dict[str, str]]:
        try:
            p256dh = b64url_decode(channel.keys["p256dh"])
            auth = b64url_decode(channel.keys["auth"])
        except (KeyError, ValueError) as exc:
            raise PushRefusedError(
                f"webpush channel {channel.channel_id} lacks usable p256dh and auth keys"
            ) from exc
        payload = message.to_json()
        if message.collapse_key:
            payload["tag"] = message.collapse_key
        try:
            body = encrypt_aes128gcm(orjson.dumps(payload), p256dh, auth)
            origin = _origin(channel.target)
        except PushRefusedError as exc:
            raise PushRefusedError(f"webpush channel {channel.channel_id}: {exc}") from exc
        headers = {
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(message.ttl_s),
            "Urgency": "high" if message.urgent else "normal",
            "Authorization": self._authorization(origin),
        }
        if message.collapse_key:
            headers["Topic"] = web_push_topic(message.collapse_key)
        return body, headers

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """Encrypt the message for the subscription and post it to its endpoint.

        Raises:
            DeliveryError: network trouble, 429 or 5xx.
            DeadTokenError: ``404`` or ``410``: the subscription is gone.
            UnsafeAddressError: the endpoint or its host name leads to an internal address.
            PushRefusedError: malformed keys, a payload too large, or another 4xx.
        """
        # ECDH, HKDF and the ES256 signature are CPU work: keep them off the event loop
        body, headers = await asyncio.to_thread(self._prepare, channel, message)
        answer = await self.checked_request(channel, channel.target, data=body, headers=headers)
        self.check(channel.channel_id, answer, dead=_DEAD)
        _LOG.debug("webpush channel %s took message %s", channel.channel_id, message.message_id)
