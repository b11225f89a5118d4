"""Command downlink: publish a command to a device and wait for its result event.

The services that decide on remote fixes (the notifier) hold a :class:`CommandChannel`;
it publishes ``{id, action, args}`` on ``devices/{id}/commands`` at QoS 1 and matches
the device's ``command_result`` event on ``devices/{id}/events`` by command id. Every
other event it reads is handed to ``on_event`` when given (the notifier keeps the
firmware that boot events name).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final, Self

from wire.errors import BrokerUnavailableError, RejectedError, TransientError
from wire.mqtt import MqttClient
from wire.protocol.codec import decode_event, encode_command
from wire.protocol.model import Command, CommandAction, Event
from wire.protocol.topics import commands_topic, is_valid_device_id, split_device_topic
from wire.settings import MqttSettings
from wire.tasks import cancel_and_wait

__all__ = ["CommandChannel", "CommandTimeoutError"]

_LOG = logging.getLogger(__name__)
#: Longest pause between two attempts to reconnect the channel.
_RETRY_MAX_S: Final = 30.0


class CommandTimeoutError(TransientError):
    """The device did not answer a command in time (offline, or busy)."""


class CommandChannel:
    """Send commands to devices and await their results; an async context manager.

    Args:
        mqtt: how to reach the broker (a service user allowed to write commands).
        client_id: MQTT client id of this channel.
        clock: wall clock in seconds (for the event time window).
        on_event: called with every valid event read (it must not block: it runs in the
            loop that matches results).
    """

    def __init__(
        self,
        mqtt: MqttSettings,
        *,
        client_id: str = "fixloop-commands",
        clock: Callable[[], float] = time.time,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._client = mqtt.client(client_id)
        self._clock = clock
        self._on_event = on_event
        self._waiting: dict[str, asyncio.Future[Event]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.connect()
        await self._client.subscribe("devices/+/events", qos=1)
        self._listener = asyncio.create_task(self._listen(), name="command-results")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._listener, ignore=(BrokerUnavailableError,))
        await self._client.disconnect()

    async def _listen(self) -> None:
        """Match results until cancelled; reconnect with backoff when the connection ends.

        Commands sent while the connection is down fail with ``BrokerUnavailableError``
        (a transient error their sender retries); the channel itself never gives up.
        """
        client = self._client
        backoff_s = 0.2
        while True:
            try:
                await self._match(client)
            except BrokerUnavailableError as exc:
                _LOG.warning(
                    "%s lost its broker connection: %s; reconnecting in about %.1f s",
                    client.client_id,
                    exc,
                    backoff_s,
                )
            await asyncio.sleep(backoff_s * (0.5 + random.random()))
            backoff_s = min(backoff_s * 2, _RETRY_MAX_S)
            try:
                await client.connect()
                await client.subscribe("devices/+/events", qos=1)
            except BrokerUnavailableError as exc:
                _LOG.warning("%s cannot reconnect yet: %s", client.client_id, exc)
                await client.disconnect()  # not subscribed: start over
                continue
            _LOG.info("%s reconnected", client.client_id)
            backoff_s = 0.2

    async def _match(self, client: MqttClient) -> None:
        async for batch in client.batches():
            now_ms = int(self._clock() * 1000)
            for message in batch:
                target = split_device_topic(message.topic)
                if target is None or (not self._waiting and self._on_event is None):
                    continue
                try:
                    event = decode_event(target[0], message.payload, now_ms)
                except RejectedError:
                    continue  # the gateway reports refused events; nothing to match here
                if self._on_event is not None:
                    try:
                        self._on_event(event)
                    except Exception:
                        # a listener's bug must not stop command results from matching
                        _LOG.exception("event listener failed on %s", message.topic)
                if event.kind != "command_result" or event.command_id is None:
                    continue
                future = self._waiting.get(event.command_id)
                if future is not None and not future.done():
                    future.set_result(event)
            client.ack_many(batch)

    async def send(
        self,
        device_id: str,
        action: CommandAction,
        args: Mapping[str, float | bool | str] | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> Event:
        """Publish a command and wait for the device's ``command_result`` event.

        Returns:
            The result event (``ok`` says whether the device did it, ``detail`` why not).

        Raises:
            CommandTimeoutError: no result within ``timeout_s``.
            BrokerUnavailableError: the broker connection is gone.
            PermanentError: the broker refused the command (ACL).
        """
        if not is_valid_device_id(device_id):
            raise RejectedError("bad_id", f"{device_id!r} is not a valid device id")
        command = Command(id=uuid.uuid4().hex, action=action, args=dict(args or {}))
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiting[command.id] = future
        try:
            await self._client.publish(commands_topic(device_id), encode_command(command), qos=1)
            _LOG.info("sent %s to device %s (command %s)", action, device_id, command.id)
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError as exc:
            raise CommandTimeoutError(
                f"device {device_id} did not answer {action} within {timeout_s:g} s"
            ) from exc
        finally:
            self._waiting.pop(command.id, None)
