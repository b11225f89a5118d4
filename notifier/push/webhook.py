"""Signed webhooks: the owner's own endpoint (notifier: outbox -> push -> owner's server).

The message goes as a JSON POST to the channel's URL, signed with the channel's
secret (``keys["secret"]``) the way GitHub and Stripe sign theirs: HMAC-SHA256 over
``"<timestamp>.<raw body>"``, hex, in ``X-Fixloop-Signature: sha256=<hex>``, with the
timestamp (Unix seconds) in ``X-Fixloop-Timestamp``. The receiver checks both with
:func:`verify_webhook_signature`; the timestamp bounds replays. Body::

    {"id": "...", "ts": 1767225600, "title": "...", "body": "...",
     "actions": [{"action": "accept_fix", "label": "Yes", "url": "https://..."}],
     "data": {"case_id": "..."}, "urgent": false}

``410 Gone`` retires the channel; 429 and 5xx are retried; other answers outside 2xx
are refusals.

The URL is the owner's own, so it is checked before every delivery
(:mod:`notifier.addresses`): a URL or a host name that leads to an internal address is
refused (:class:`~notifier.errors.UnsafeAddressError`, a permanent failure of the
channel) and nothing is sent. The sender's resolver checks every address a name
resolves to and hands aiohttp only those, so the name cannot point elsewhere between
the check and the connection. ``allow_internal`` turns the check off for local
installs and tests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import orjson

from notifier.model import ChannelKind, PushChannel
from notifier.push.base import CheckedHttpSender, PushMessage, PushRefusedError

__all__ = ["WebhookSender", "sign_webhook", "verify_webhook_signature"]

_LOG = logging.getLogger(__name__)
_DEAD: Final = frozenset({410})
_PREFIX: Final = "sha256="


def sign_webhook(secret: str, timestamp: str, body: bytes) -> str:
    """Return the ``X-Fixloop-Signature`` value for a webhook body.

    Args:
        secret: the channel's shared secret.
        timestamp: the ``X-Fixloop-Timestamp`` value (Unix seconds).
        body: the raw request body.

    Returns:
        ``sha256=`` and the hex HMAC-SHA256 of ``"<timestamp>.<body>"``.
    """
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return _PREFIX + mac.hexdigest()


def verify_webhook_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | datetime,
    tolerance_s: float = 300.0,
) -> bool:
    """Check a webhook's signature and freshness: the receiver's side.

    The comparison takes the same time wherever the signatures differ.

    Args:
        secret: the channel's shared secret.
        timestamp: the ``X-Fixloop-Timestamp`` header.
        body: the raw request body, exactly as received.
        signature: the ``X-Fixloop-Signature`` header.
        now: the receiver's clock (Unix seconds or an aware datetime).
        tolerance_s: how far the timestamp may be from ``now`` either way.

    Returns:
        Whether the signature is right and the timestamp within the tolerance.
    """
    text = timestamp.strip()
    if not text.isdigit():
        return False
    current = now.timestamp() if isinstance(now, datetime) else float(now)
    if abs(current - int(text)) > tolerance_s:
        return False
    given = signature.strip()
    if not given.lower().startswith(_PREFIX):
        return False
    expected = sign_webhook(secret, text, body)
    return hmac.compare_digest(
        expected.encode(), (_PREFIX + given[len(_PREFIX) :].lower()).encode()
    )


class WebhookSender(CheckedHttpSender):
    """Posts signed JSON to the owner's webhook URL (the channel's target).

    Args:
        timeout_s: the longest one request (and one name lookup) may take.
        clock: wall clock in Unix seconds (the signed timestamp).
        allow_internal: deliver to internal addresses (loopback, private networks) and
            over plain http: for local installs and tests only.
    """

    kind: ChannelKind = "webhook"

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        allow_internal: bool = False,
    ) -> None:
        super().__init__(timeout_s=timeout_s, allow_internal=allow_internal)
        self._clock = clock

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """POST the message with its timestamp and signature.

        Raises:
            DeliveryError: network trouble, a failed name lookup, 429 or 5xx.
            DeadTokenError: ``410 Gone``.
            UnsafeAddressError: the URL or its host name leads to an internal address.
            PushRefusedError: no secret on the channel, or any other status outside 2xx.
        """
        secret = channel.keys.get("secret")
        if not secret:
            raise PushRefusedError(f"webhook channel {channel.channel_id} has no secret")
        ts = int(self._clock())
        timestamp = str(ts)
        body = orjson.dumps({"ts": ts, **message.to_json()})
        answer = await self.checked_request(
            channel,
            channel.target,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-Fixloop-Timestamp": timestamp,
                "X-Fixloop-Signature": sign_webhook(secret, timestamp, body),
            },
        )
        self.check(channel.channel_id, answer, dead=_DEAD)
        _LOG.debug("webhook channel %s took message %s", channel.channel_id, message.message_id)
