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
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from notifier.addresses import check_webhook_url, resolve_public
from notifier.errors import UnsafeAddressError
from notifier.model import ChannelKind, PushChannel
from notifier.push_base import HttpSender, PushMessage, PushRefusedError

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


class _CheckedResolver(AbstractResolver):
    """Resolves through the event loop and refuses names that lead to internal addresses."""

    def __init__(self, *, timeout_s: float, allow_internal: bool) -> None:
        self._timeout_s = timeout_s
        self._allow_internal = allow_internal

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await resolve_public(
            host, port, timeout_s=self._timeout_s, allow_internal=self._allow_internal
        )
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=found_family,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for found_family, address in found
            if family == socket.AF_UNSPEC or found_family == family
        ]

    async def close(self) -> None:
        return None


class WebhookSender(HttpSender):
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
        super().__init__(timeout_s=timeout_s)
        self._clock = clock
        self._allow_internal = allow_internal

    def connector(self) -> aiohttp.BaseConnector:
        """A connector whose resolver lets only checked addresses through (no DNS cache)."""
        resolver = _CheckedResolver(timeout_s=self._timeout_s, allow_internal=self._allow_internal)
        return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, family=socket.AF_UNSPEC)

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
        try:
            check_webhook_url(channel.target, allow_internal=self._allow_internal)
            answer = await self.request(
                channel.channel_id,
                channel.target,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Fixloop-Timestamp": timestamp,
                    "X-Fixloop-Signature": sign_webhook(secret, timestamp, body),
                },
            )
        except UnsafeAddressError as exc:
            _LOG.warning(
                "webhook channel %s: not sent, its URL leads to an internal address (%s)",
                channel.channel_id,
                exc,
            )
            raise UnsafeAddressError(
                f"webhook channel {channel.channel_id}: refused, it leads to an internal address"
            ) from exc
        self.check(channel.channel_id, answer, dead=_DEAD)
        _LOG.debug("webhook channel %s took message %s", channel.channel_id, message.message_id)
