"""A service's persistent MQTT subscription, kept alive across broker outages.

The gateway and the diagnostics service both consume device topics the same way: a
fixed client id with a persistent session (so the broker queues while they are away),
consumption that starts before the SUBACK (a resumed session delivers its queue at
once, ahead of the SUBACK, which would otherwise wait behind it), and reconnection
with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from wire.errors import BrokerUnavailableError
from wire.mqtt import MqttClient

__all__ = ["consume_forever", "shared_filters"]

_LOG = logging.getLogger(__name__)
#: A connection that lasted this long resets the reconnect backoff.
_STABLE_S: Final = 5.0


def shared_filters(filters: Sequence[str], group: str | None) -> list[str]:
    """Prefix topic filters with an MQTT 5 shared-subscription group, if one is set."""
    return [f"$share/{group}/{f}" if group else f for f in filters]


async def consume_forever(
    new_client: Callable[[], MqttClient],
    filters: Sequence[str],
    consume: Callable[[MqttClient], Coroutine[Any, Any, None]],
    *,
    on_subscribed: Callable[[MqttClient], None] | None = None,
    on_lost: Callable[[], None] | None = None,
    retry_max_s: float = 30.0,
) -> None:
    """Connect, subscribe at QoS 1 and run ``consume(client)``; reconnect until cancelled.

    Args:
        new_client: builds a fresh (unconnected) client for each attempt.
        filters: topic filters to subscribe to.
        consume: reads the client's messages; returns or raises when the connection ends.
        on_subscribed: called once the broker granted the subscription.
        on_lost: called after every connection ends (also a failed attempt).
        retry_max_s: the longest pause between attempts.

    Raises:
        ConfigError: the broker refused the credentials (no retry cures that).
        PermanentError: the broker refused the subscription.
    """
    backoff_s = 0.2
    while True:
        client = new_client()
        subscribed_at: float | None = None
        try:
            async with client, asyncio.TaskGroup() as tasks:
                tasks.create_task(consume(client), name=f"consume-{client.client_id}")
                await client.subscribe(*filters, qos=1)
                subscribed_at = time.monotonic()
                _LOG.info(
                    "%s subscribed to %s (session resumed: %s)",
                    client.client_id,
                    list(filters),
                    client.session_present,
                )
                if on_subscribed is not None:
                    on_subscribed(client)
        except* BrokerUnavailableError as errors:
            # Only a connection that lasted resets the backoff: one taken over again and
            # again (a second client with our id) must not make us hammer the broker.
            lasted_s = 0.0 if subscribed_at is None else time.monotonic() - subscribed_at
            if lasted_s >= _STABLE_S:
                backoff_s = 0.2
            _LOG.warning(
                "%s lost its broker connection%s: %s; reconnecting in about %.1f s",
                client.client_id,
                f" after {lasted_s:.0f} s" if subscribed_at is not None else "",
                errors.exceptions[0],
                backoff_s,
            )
        finally:
            if on_lost is not None:
                on_lost()
        await asyncio.sleep(backoff_s * (0.5 + random.random()))
        backoff_s = min(backoff_s * 2, retry_max_s)
