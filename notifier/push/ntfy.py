"""ntfy topics (notifier: outbox -> push -> an ntfy server -> the owner's ntfy app).

The channel's target is the topic URL (``https://ntfy.example/mytopic``; a server
under a path prefix works too: the last path segment is the topic). The message is
published through ntfy's JSON API: a POST to the server's root with the topic in the
body (https://docs.ntfy.sh/publish/#publish-as-json). One-tap actions with a link
become ntfy ``view`` actions (``http`` ones, a background POST, when the action says
so); ntfy shows at most three. An access token (the sender's, or the channel's own
``keys["token"]``) goes in ``Authorization: Bearer``.

ntfy has no dead tokens: a topic exists as soon as someone publishes to it, so a 404
is a refusal like 401 and 403 (wrong server or access); 429 and 5xx are retried.
"""

from __future__ import annotations

import logging
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson

from notifier.model import ChannelKind, PushChannel
from notifier.push.base import CheckedHttpSender, PushMessage, PushRefusedError

__all__ = ["NtfySender", "ntfy_document", "split_topic_url"]

_LOG = logging.getLogger(__name__)
_MAX_ACTIONS: Final = 3
_URGENT: Final = 5
_DEFAULT: Final = 3


def split_topic_url(target: str) -> tuple[str, str]:
    """Split an ntfy topic URL into the server's publishing URL and the topic.

    Args:
        target: ``https://ntfy.example/mytopic`` or ``https://host/prefix/mytopic``.

    Returns:
        ``("https://ntfy.example/", "mytopic")``.

    Raises:
        PushRefusedError: not an http(s) URL ending in a topic name.
    """
    parts = urlsplit(target)
    prefix, _, topic = parts.path.rstrip("/").rpartition("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or not topic:
        raise PushRefusedError("not an ntfy topic URL")
    return urlunsplit((parts.scheme, parts.netloc, prefix + "/", "", "")), topic


def ntfy_document(topic: str, message: PushMessage) -> dict[str, Any]:
    """The ntfy JSON publishing document for a message.

    Args:
        topic: the topic name.
        message: what to publish.

    Returns:
        ``topic``, ``title``, ``message``, ``priority`` (5 if urgent, else 3), ``tags``,
        ``actions`` (those with a link, at most three) and ``click`` (``data["url"]``).
    """
    doc: dict[str, Any] = {
        "topic": topic,
        "title": message.title,
        "message": message.body,
        "priority": _URGENT if message.urgent else _DEFAULT,
        "tags": ["rotating_light"] if message.urgent else ["wrench"],
    }
    actions: list[dict[str, Any]] = []
    for action in message.actions:
        if action.url is None:
            continue  # ntfy actions need a link; the app-only ones cannot be offered here
        if action.background:
            actions.append(
                {"action": "http", "label": action.label, "url": action.url, "method": "POST"}
            )
        else:
            actions.append({"action": "view", "label": action.label, "url": action.url})
    if actions:
        doc["actions"] = actions[:_MAX_ACTIONS]
    click = message.data.get("url")
    if click:
        doc["click"] = click
    return doc


class NtfySender(CheckedHttpSender):
    """Publishes to ntfy topics.

    Args:
        token: access token for the server, if it needs one (a channel's own
            ``keys["token"]`` takes precedence).
        timeout_s: the longest one request may take.
    """

    kind: ChannelKind = "ntfy"

    def __init__(
        self, *, token: str | None = None, timeout_s: float = 10.0, allow_internal: bool = False
    ) -> None:
        super().__init__(timeout_s=timeout_s, allow_internal=allow_internal)
        self._token = token

    async def send(self, channel: PushChannel, message: PushMessage) -> None:
        """Publish the message to the channel's topic.

        Raises:
            DeliveryError: network trouble, 429 or 5xx.
            UnsafeAddressError: the server's URL or host name leads to an internal address.
            PushRefusedError: not a topic URL, or any other status outside 2xx.
        """
        try:
            server, topic = split_topic_url(channel.target)
        except PushRefusedError as exc:
            raise PushRefusedError(f"ntfy channel {channel.channel_id}: {exc}") from exc
        headers = {"Content-Type": "application/json"}
        token = channel.keys.get("token") or self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        answer = await self.checked_request(
            channel,
            server,
            data=orjson.dumps(ntfy_document(topic, message)),
            headers=headers,
        )
        self.check(channel.channel_id, answer, dead=frozenset())
        _LOG.debug("ntfy channel %s took message %s", channel.channel_id, message.message_id)
