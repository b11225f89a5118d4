"""What every push channel shares (notifier: outbox -> push -> push services).

The message the outbox hands to :mod:`notifier.push`, the :class:`PushSender` protocol
each channel kind implements, the errors a sender raises beyond
:mod:`notifier.errors`, and :class:`HttpSender`, the HTTP plumbing of the senders:
one :class:`aiohttp.ClientSession` per sender, ``asyncio.timeout`` on every request,
and status codes mapped onto the error tree. Tokens, endpoints and keys never appear
in an error message or a log line: only the channel id does.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import logging
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, Protocol, Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from notifier.addresses import check_webhook_url, resolve_public
from notifier.errors import (
    DeadTokenError,
    DeliveryError,
    InvalidRequestError,
    UnsafeAddressError,
)
from notifier.model import ChannelKind, Owner, PushChannel
from wire.errors import ConfigError, PermanentError

__all__ = [
    "ChannelVerifier",
    "CheckedHttpSender",
    "HttpAnswer",
    "HttpSender",
    "PushAction",
    "PushMessage",
    "PushRefusedError",
    "PushSender",
    "RetryLaterError",
    "b64url_decode",
    "b64url_encode",
    "parse_retry_after",
]

_LOG = logging.getLogger(__name__)
#: The most of a push service's answer we read (error documents are small).
_MAX_ANSWER_BYTES: Final = 64 * 1024


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2), as JWTs and Web Push keys use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding.

    Raises:
        ValueError: ``text`` is not base64url.
    """
    stripped = text.strip().rstrip("=")
    return base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True)


@dataclass(frozen=True, slots=True)
class PushAction:
    """A one-tap action on a message.

    The link is built by whoever writes the message (the outbox knows the owner API's
    public address); channels that can open links (ntfy, Web Push, webhooks, the app
    through FCM data) carry it, and an action without a link is still offered where the
    app itself handles ``action_id``.

    Attributes:
        action_id: what the tap means (``accept_fix``, ``choose_slot:0``, ``rate_good`` ...).
        label: the button's words.
        url: where a tap goes, if the message has a link for it.
        background: ``True``: a tap sends a POST to ``url`` without opening anything
            (ntfy's ``http`` action); ``False``: a tap opens ``url`` (ntfy's ``view``).
    """

    action_id: str
    label: str
    url: str | None = None
    background: bool = False

    def to_json(self) -> dict[str, Any]:
        """The action as a JSON object (``action``, ``label``, ``url``)."""
        return {"action": self.action_id, "label": self.label, "url": self.url}


def _new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class PushMessage:
    """What to push to an owner.

    Attributes:
        title: short title.
        body: plain words.
        actions: one-tap actions, in the order they are shown.
        data: string keys and values for the app (``case_id``, ``kind``, ``url`` ...).
        urgent: deliver at high priority (wakes the phone, rings through ntfy).
        collapse_key: a newer message with the same key replaces an undelivered older one.
        ttl_s: how long a push service may keep the message for an offline device.
        message_id: stable id of the message: every retry and channel carries the same one,
            so that receivers can drop duplicates.

    Raises:
        InvalidRequestError: a negative ``ttl_s`` or a ``data`` value that is not a string.
    """

    title: str
    body: str
    actions: tuple[PushAction, ...] = ()
    data: Mapping[str, str] = field(default_factory=dict)
    urgent: bool = False
    collapse_key: str | None = None
    ttl_s: int = 86_400
    message_id: str = field(default_factory=_new_message_id)

    def __post_init__(self) -> None:
        if self.ttl_s < 0:
            raise InvalidRequestError(f"ttl_s must not be negative, got {self.ttl_s}")
        for key, value in self.data.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidRequestError(f"push data must map strings to strings ({key!r})")

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON object (the Web Push payload and the webhook body).

        Returns:
            ``id``, ``title``, ``body``, ``actions`` (``action``, ``label``, ``url``),
            ``data`` and ``urgent``.
        """
        return {
            "id": self.message_id,
            "title": self.title,
            "body": self.body,
            "actions": [action.to_json() for action in self.actions],
            "data": dict(self.data),
            "urgent": self.urgent,
        }


class PushSender(Protocol):
    """Delivers messages over one kind of channel.

    Attributes:
        kind: the channel kind it serves.
    """

    kind: ChannelKind

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """Deliver ``message`` to ``channel``.

        Raises:
            DeliveryError: the service is away or throttles (5xx, 429, network, timeout):
                retry later (:class:`RetryLaterError` says when, if the service did).
            DeadTokenError: the token or subscription is gone: retire the channel.
            PermanentError: any other refusal (:class:`PushRefusedError`): do not retry.
        """
        ...


class ChannelVerifier(Protocol):
    """Re-verifies an owner's push channel (:meth:`notifier.outbox.Outbox.verify_channel`)."""

    async def verify_channel(self, owner: Owner, channel: PushChannel) -> bool:
        """Send a test message over ``channel`` only; make it active if it arrives.

        Returns:
            Whether the channel took the test message (and is active now).
        """
        ...


class PushRefusedError(PermanentError):
    """A push service refused the message for good (a 4xx other than a dead token)."""


class RetryLaterError(DeliveryError):
    """A push service is away or throttles (429, 5xx).

    Attributes:
        retry_after_s: how long the service asked us to wait (``Retry-After``), if it did.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3).

    Args:
        value: the header: delay seconds or an HTTP date.
        now: the current time for a date (default: the wall clock).

    Returns:
        The delay in seconds (never negative), or ``None`` without a usable header.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC) if now is None else now
    return max(0.0, (when - current).total_seconds())


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read an answer's body to its end, keeping at most ``limit`` bytes.

    ``StreamReader.read(n)`` returns what has arrived so far, which for a chunked answer
    can be its first chunk only; an FCM or Web Push error body cut there is not JSON.

    Args:
        content: the response's body stream.
        limit: how many bytes to keep; the rest is not read.

    Returns:
        The body, or its first ``limit`` bytes.
    """
    body = bytearray()
    while len(body) < limit:
        chunk = await content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A push service's answer.

    Attributes:
        status: HTTP status.
        body: the start of the body (at most 64 KiB).
        retry_after_s: the parsed ``Retry-After``, if any.
    """

    status: int
    body: bytes
    retry_after_s: float | None


class HttpSender(abc.ABC):
    """The HTTP side of a sender: one session, a deadline on every request.

    Subclasses implement :meth:`send` (and so the :class:`PushSender` protocol). Use
    them with ``async with``; a request outside raises :class:`PushRefusedError`.

    Args:
        timeout_s: the longest one request may take.

    Raises:
        ConfigError: ``timeout_s`` is not positive.
    """

    kind: ChannelKind

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"push timeout_s must be positive, got {timeout_s}")
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def connector(self) -> aiohttp.BaseConnector | None:
        """The connector of the sender's session (``None``: aiohttp's default).

        Called once, when the sender is opened; a sender that must control where it
        connects (the webhook sender's address check) returns its own.
        """
        return None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            connector=self.connector(),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"User-Agent": "fixloop-notifier"},
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

    @abc.abstractmethod
    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """Deliver ``message`` to ``channel`` (see :meth:`PushSender.send`)."""

    async def request(
        self, channel_id: str, url: str, *, method: str = "POST", **kwargs: Any
    ) -> HttpAnswer:
        """Make one request, never following redirects.

        Args:
            channel_id: for error messages (the URL never appears in them).
            url: where to.
            method: HTTP method.
            **kwargs: passed to :meth:`aiohttp.ClientSession.request`.

        Returns:
            The answer, whatever its status.

        Raises:
            DeliveryError: network trouble or the deadline passed.
            PushRefusedError: the sender is not open.
        """
        session = self._session
        if session is None:
            raise PushRefusedError(f"the {self.kind} sender is not open: use 'async with'")
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                session.request(method, url, allow_redirects=False, **kwargs) as response,
            ):
                body = await read_bounded(response.content, _MAX_ANSWER_BYTES)
                return HttpAnswer(
                    response.status, body, parse_retry_after(response.headers.get("Retry-After"))
                )
        except TimeoutError as exc:
            raise DeliveryError(f"{self.kind} channel {channel_id}: timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            # the exception's text names the host: keep only its type
            raise DeliveryError(
                f"{self.kind} channel {channel_id}: unreachable ({type(exc).__name__})"
            ) from exc

    def check(self, channel_id: str, answer: HttpAnswer, *, dead: frozenset[int]) -> None:
        """Map a non-2xx answer onto the error tree (2xx returns).

        Args:
            channel_id: for the error message.
            answer: the service's answer.
            dead: statuses that mean the token or subscription is gone.

        Raises:
            DeadTokenError: a status in ``dead``.
            RetryLaterError: 429 or 5xx.
            PushRefusedError: anything else (3xx, other 4xx).
        """
        status = answer.status
        if 200 <= status < 300:
            return
        what = f"{self.kind} channel {channel_id}: HTTP {status}"
        if status in dead:
            raise DeadTokenError(what)
        if status == 429 or status >= 500:
            raise RetryLaterError(what, answer.retry_after_s)
        raise PushRefusedError(what)


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


class CheckedHttpSender(HttpSender):
    """A sender whose targets come from owners: it never connects inside the network.

    Owners give the URL a message goes to (a webhook, an ntfy server, a browser's Web
    Push endpoint), so an owner could point it at the manufacturer's own network. Every
    target URL must be public ``https`` (no credentials, no internal literal address,
    no ``localhost``), and the connection goes only to resolved addresses that were
    checked (no DNS cache, so a name cannot change its answer between check and use).

    Args:
        timeout_s: the longest one request (and one name lookup) may take.
        allow_internal: deliver to internal addresses (loopback, private networks) and
            over plain http: for local installs and tests only.
    """

    def __init__(self, *, timeout_s: float = 10.0, allow_internal: bool = False) -> None:
        super().__init__(timeout_s=timeout_s)
        self._allow_internal = allow_internal

    def connector(self) -> aiohttp.BaseConnector:
        """A connector whose resolver lets only checked addresses through (no DNS cache)."""
        resolver = _CheckedResolver(timeout_s=self._timeout_s, allow_internal=self._allow_internal)
        return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, family=socket.AF_UNSPEC)

    async def checked_request(self, channel: PushChannel, url: str, **kwargs: Any) -> HttpAnswer:
        """:meth:`HttpSender.request` to ``url`` once it is known to lead outside.

        Raises:
            UnsafeAddressError: the URL or its host name leads to an internal address
                (logged with the channel; a permanent failure of the channel).
            DeliveryError: network trouble or a failed name lookup.
        """
        try:
            check_webhook_url(url, allow_internal=self._allow_internal)
            return await self.request(channel.channel_id, url, **kwargs)
        except UnsafeAddressError as exc:
            _LOG.warning(
                "%s channel %s: not sent, its URL leads to an internal address (%s)",
                channel.kind,
                channel.channel_id,
                exc,
            )
            raise UnsafeAddressError(
                f"{channel.kind} channel {channel.channel_id}: refused, it leads to an "
                "internal address"
            ) from exc
