"""The push dispatcher a notifier's settings call for (notifier: outbox -> push).

Place in the pipeline: the notifier service (:mod:`notifier.service`) opens it once and
hands it to the :class:`~notifier.outbox.Outbox`, which delivers every owner message
through it. It opens one sender per push kind the settings allow (ntfy and webhooks
always, FCM with a service account, Web Push with a VAPID key) and closes them with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson

from notifier.push import (
    DeliveryLimits,
    FcmSender,
    NtfySender,
    PushDispatcher,
    PushSender,
    WebhookSender,
    WebPushSender,
)
from notifier.settings import PushSettings

__all__ = ["build_dispatcher"]


@contextlib.asynccontextmanager
async def build_dispatcher(settings: PushSettings) -> AsyncIterator[PushDispatcher]:
    """Open the push senders the settings allow and yield a dispatcher over them."""
    async with contextlib.AsyncExitStack() as stack:
        senders: dict[str, PushSender] = {}
        senders["ntfy"] = await stack.enter_async_context(
            NtfySender(
                token=None
                if settings.ntfy_token is None
                else settings.ntfy_token.get_secret_value(),
                timeout_s=settings.timeout_s,
                allow_internal=settings.webhook_allow_private,
            )
        )
        senders["webhook"] = await stack.enter_async_context(
            WebhookSender(
                timeout_s=settings.timeout_s, allow_internal=settings.webhook_allow_private
            )
        )
        if settings.fcm_service_account is not None:
            account = orjson.loads(settings.fcm_service_account.read_bytes())
            senders["fcm"] = await stack.enter_async_context(
                FcmSender(account, base_url=settings.fcm_base_url, timeout_s=settings.timeout_s)
            )
        if settings.vapid_private_key is not None:
            senders["webpush"] = await stack.enter_async_context(
                WebPushSender(
                    settings.vapid_private_key.get_secret_value(),
                    subject=settings.vapid_subject,
                    timeout_s=settings.timeout_s,
                    allow_internal=settings.webhook_allow_private,
                )
            )
        yield PushDispatcher(
            senders,
            attempts=settings.attempts,
            max_failures=settings.max_failures,
            limits=DeliveryLimits(
                workers=settings.workers,
                per_owner=settings.per_owner,
                per_channel=settings.per_channel,
                budget_s=settings.message_budget_s,
            ),
        )
