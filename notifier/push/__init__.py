"""Push channels to the owner's phone or browser (notifier: outbox -> here -> push services).

The outbox writes a :class:`PushMessage` and hands it, with the owner's channels and
preferred kinds, to a :class:`PushDispatcher`, which tries the channels in order
through one :class:`PushSender` per kind and reports which channel delivered and
which are dead (:class:`DeliveryReport`). Each sender is an async context manager
owning one HTTP session, built by the composition root from plain arguments:

* :class:`FcmSender` (:mod:`notifier.push.fcm`): Firebase Cloud Messaging HTTP v1,
  with an OAuth 2 access token from a service account (RS256 JWT assertion), cached;
* :class:`WebPushSender` (:mod:`notifier.push.webpush`): Web Push with the payload
  encrypted for the browser's keys (RFC 8291, ``aes128gcm``) and VAPID (RFC 8292);
  :func:`generate_vapid_keys` makes the key pair for the settings;
* :class:`NtfySender` (:mod:`notifier.push.ntfy`): an ntfy server's JSON API;
* :class:`WebhookSender` (:mod:`notifier.push.webhook`): a JSON POST signed with
  HMAC-SHA256; :func:`verify_webhook_signature` is the receiver's check.

**One-tap actions** are :class:`PushAction` values carrying their own link: whoever
writes the message (the outbox, which knows the owner API's public address) builds
the URL, so senders need no URL scheme of their own. Channels that show buttons with
links (ntfy, Web Push, webhooks) carry it; FCM passes the actions to the app as JSON
in ``data["actions"]``; an action without a link is left out where a link is needed.

**Errors**: a sender raises :class:`~notifier.errors.DeliveryError` for what may pass
(5xx, 429, network trouble, timeouts; :class:`RetryLaterError` carries a
``Retry-After``), :class:`~notifier.errors.DeadTokenError` when the service says the
token or subscription is gone, and :class:`PushRefusedError` (a
:class:`~wire.errors.PermanentError`) for other refusals. Tokens, endpoints and
keys are never logged or put in error messages: only channel ids.
"""

from notifier.push.base import (
    PushAction,
    PushMessage,
    PushRefusedError,
    PushSender,
    RetryLaterError,
)
from notifier.push.dispatch import DeliveryLimits, DeliveryReport, PushDispatcher, RetryPolicy
from notifier.push.fcm import FcmSender
from notifier.push.ntfy import NtfySender
from notifier.push.webhook import WebhookSender, sign_webhook, verify_webhook_signature
from notifier.push.webpush import (
    VapidKeys,
    WebPushSender,
    encrypt_aes128gcm,
    generate_vapid_keys,
)

__all__ = [
    "DeliveryLimits",
    "DeliveryReport",
    "FcmSender",
    "NtfySender",
    "PushAction",
    "PushDispatcher",
    "PushMessage",
    "PushRefusedError",
    "PushSender",
    "RetryLaterError",
    "RetryPolicy",
    "VapidKeys",
    "WebPushSender",
    "WebhookSender",
    "encrypt_aes128gcm",
    "generate_vapid_keys",
    "sign_webhook",
    "verify_webhook_signature",
]
