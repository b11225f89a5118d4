"""A small asyncio MQTT 5 client (the wire's transport, used by the gateway and devices).

Place in the pipeline: devices publish through it to the broker, and every backend
stage (gateway, diagnostics, notifier) reads its topics through it.

The packets themselves (encoding, parsing, the errors of a bad packet) are
:mod:`wire.mqtt_packets`. This module stays whole (about 940 lines) because it is one
protocol client: connect, keep-alive, read pausing, send quota and subscriptions all
work on the state of one connection, and split they would reach into each other's.

Why not paho-mqtt: measured on the project's 2-core machines, paho's packet loop
delivers about 33,000 QoS-0 and 17,600 QoS-1 messages a second to a callback that does
nothing, a third of what Mosquitto passes through to ``mosquitto_sub``; the gateway
could never keep up with the broker. This client parses whole socket reads at once,
hands messages over in batches and lets the consumer acknowledge a batch of QoS-1
messages in one write, which is what the gateway's "acknowledge only after the durable
write" rule needs.

It speaks the subset of MQTT 5.0 (OASIS standard, 2019) that fixloop uses: CONNECT
with will, credentials, clean start, session expiry, Receive Maximum and Maximum
Packet Size; SUBSCRIBE and UNSUBSCRIBE; PUBLISH at QoS 0 and 1 in both directions with manual PUBACK
for incoming messages; PINGREQ; DISCONNECT. QoS 2 and topic aliases are not used
anywhere in fixloop and are refused.

Limits, both ways:

* We announce our Maximum Packet Size (``max_packet_size``) in CONNECT; a packet
  whose fixed header says it is larger is refused as soon as the header is read (never
  buffered): DISCONNECT with reason 0x95, then the connection is closed.
* The broker's Maximum Packet Size (CONNACK property 0x27), Receive Maximum (0x21),
  Maximum QoS (0x24) and Retain Available (0x25) are obeyed: a message the broker
  could not take is refused with :class:`~wire.errors.PermanentError` before it
  is sent, and QoS-1 publishes wait for send quota, which only the PUBACK of a packet
  id we have in flight gives back.
* Every length in a received packet is checked against the packet's end: a truncated
  or corrupt packet raises :class:`MqttProtocolError` and never reads into the next one.

Keep-alive and back-pressure. Two different things pause work:

* The application stops taking messages (the gateway's queue is full while its store
  is down). The client then stops reading the socket once ``max_buffered`` messages
  wait (TCP flow control then holds the broker), and reads again when the consumer
  has taken three quarters of them.
* The connection may silently die (a half-open TCP connection, a crashed broker).

The old check confused the two: it judged liveness by the time of the last byte read,
which cannot move while reading is paused, so a stalled consumer got a healthy
connection dropped. Now liveness is proven by the broker answering: a PINGREQ goes out
whenever we sent nothing or received nothing for half the keep-alive interval (the
broker's Server Keep Alive, property 0x13, when it sets one), and the connection is
dropped only if no answer comes within ``ping_timeout_s``. An answer is the PINGRESP,
or fresh bytes: more bytes read after the PINGREQ than the kernel held for us when we
sent it (``FIONREAD``), which the broker can only have sent after the PINGREQ went out.

While a PINGREQ is unanswered the socket is read even if the consumer is behind, so
the PINGRESP (or fresh data) is seen: the socket reader works apart from the
application's consumption. Reading stops again as soon as the answer is in. What is
read meanwhile joins the waiting messages; that overshoot is bounded: a conforming
broker sends no more unacknowledged QoS-1 messages than the Receive Maximum we
announce, which is never above ``max_buffered``, and QoS-0 traffic adds at most one
kernel socket buffer per keep-alive probe. Writes
(acknowledgements, PINGREQ) never depend on reading, so the broker's own keep-alive
check is satisfied throughout.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import ssl
import struct
import termios
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from wire.errors import BrokerUnavailableError, ConfigError, PermanentError
from wire.mqtt_packets import (
    _CONNECT,
    _DISCONNECT,
    _DISCONNECT_PACKET,
    _PINGREQ_PACKET,
    MAX_PACKET_SIZE_LIMIT,
    Connack,
    ControlPacket,
    Message,
    MqttProtocolError,
    PacketParser,
    PacketTooLargeError,
    Pingresp,
    Puback,
    Suback,
    _binary,
    _packet,
    _utf8,
    _varint,
    encode_publish,
)

__all__ = [
    "InFlight",
    "Message",
    "MqttClient",
    "MqttProtocolError",
    "MqttUsageError",
    "PacketTooLargeError",
    "Will",
]

_LOG = logging.getLogger(__name__)

#: DISCONNECT with reason 0x04, "Disconnect with Will Message" (MQTT 5.0, 3.14.2.1).
_DISCONNECT_WITH_WILL_PACKET: Final = b"\xe0\x01\x04"


# Reason codes in CONNACK that no retry can cure (MQTT 5.0, 3.2.2.2).
_CONNACK_FATAL: Final = {
    0x84: "the broker does not speak MQTT 5",
    0x85: "the client id was refused",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}

# DISCONNECT reason codes a broker sends, in words for the log (MQTT 5.0, 3.14.2.1).
_DISCONNECT_REASONS: Final = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x87: "not authorized",
    0x89: "server busy",
    0x8B: "server shutting down",
    0x8D: "keep-alive timeout",
    0x8E: "session taken over: another client connected with this client id",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x9C: "use another server",
    0x9D: "server moved",
}
# Why a connection ended when the broker closed it without a DISCONNECT. Mosquitto 2.0
# closes the older connection so when another client connects with the same client id.
_CLOSED_WITHOUT_REASON: Final = (
    "closed by the broker without a reason code (the broker stopped, or another client "
    "connected with the same client id)"
)


# Resume reading once the consumer has taken this share of the high-water mark.
_RESUME_FRACTION: Final = 4


class MqttUsageError(ConfigError):
    """The client was used out of order (for example ``connect()`` while connected)."""


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes if the connection dies.

    Attributes:
        topic: where the will is published.
        payload: the will's payload.
        qos: its QoS (0 or 1).
        retain: whether the will is retained (``status`` topics are).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _Protocol(asyncio.Protocol):
    """Socket side: parses packets as bytes arrive and wakes the client."""

    def __init__(self, client: MqttClient, parser: PacketParser) -> None:
        self._client = client
        self._parser = parser
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._on_lost(exc)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except MqttProtocolError as exc:
            self._client._protocol_error(exc)
            return
        self._client._on_data(len(data))


@dataclass(slots=True, eq=False)
class InFlight:
    """QoS-1 messages written by :meth:`MqttClient.send_many`, waiting for their PUBACKs.

    Attributes:
        outcomes: per message, ``None`` or why it could not be sent (filled by
            :meth:`acked` with the broker's refusals).
        waits: ``(index, PUBACK future)`` of each message written.
        topics: the messages' topics (for the errors).
    """

    outcomes: list[PermanentError | None]
    waits: list[tuple[int, asyncio.Future[int]]]
    topics: list[str]

    def done(self) -> bool:
        """Whether every PUBACK came (or the connection ended)."""
        return all(future.done() for _, future in self.waits)

    async def acked(self) -> list[PermanentError | None]:
        """Wait for every PUBACK; per message ``None`` when the broker took it.

        No timeout of its own: the futures end with the connection, whose keep-alive
        notices a silent broker; wrap it in :func:`asyncio.timeout` to bound it.

        Raises:
            BrokerUnavailableError: the connection dropped before every PUBACK came.
        """
        outcomes = self.outcomes
        for index, future in self.waits:
            reason = await future
            if reason >= 0x80:
                outcomes[index] = PermanentError(
                    f"the broker refused the message on {self.topics[index]} (0x{reason:02x})"
                )
        return outcomes


class MqttClient:
    """An MQTT 5 connection, used as an async context manager.

    Example::

        async with MqttClient("127.0.0.1", 1883, client_id="gw", username="u",
                              password="p", clean_start=False,
                              session_expiry_s=86_400) as client:
            await client.subscribe("devices/+/telemetry", qos=1)
            async for batch in client.batches():
                ...                      # store the batch durably, then
                client.ack_many(batch)   # acknowledge it in one write

    A client holds one connection at a time: ``connect()`` while connecting or connected
    raises :class:`MqttUsageError`; after the connection ended it may connect again.

    What the broker granted, read after ``connect()``: ``session_present``,
    ``keepalive_s`` (its Server Keep Alive if it set one), ``server_receive_maximum``
    and ``server_max_packet_size``.

    Counters for a service's metrics (they add up over the client's connections):

    * ``sessions_lost``: connections that asked to resume a session (``clean_start``
      false) and got none from the broker (``session_present`` false): what the broker
      had queued for us is gone. A client id's very first connection counts too, as the
      broker cannot tell the two apart.
    * ``pings_sent`` / ``pings_answered``: PINGREQ sent and PINGRESP received.
    * ``unknown_acks``: PUBACKs for a packet id we had not in flight (ignored).

    Args:
        host: broker host name or address.
        port: broker port.
        client_id: the MQTT client id (fixed for a persistent session).
        username: user name, or None.
        password: password, or None.
        clean_start: start a new session (True) or resume the stored one.
        session_expiry_s: how long the broker keeps the session after a disconnect.
        keepalive_s: keep-alive interval we ask for (0 = none); the broker's Server Keep
            Alive replaces it when the CONNACK carries one.
        receive_maximum: how many unacknowledged QoS-1 messages the broker may send us.
        will: the last will, or None.
        will_on_disconnect: have the broker publish the will on our DISCONNECT too
            (reason 0x04), so a clean stop announces itself as a crash does.
        tls: a TLS context, or None for plain TCP.
        connect_timeout_s: how long to wait for the TCP connection and CONNACK, and for
            a SUBACK.
        max_buffered: how many received messages may wait for the consumer before the
            client stops reading the socket (back-pressure instead of memory growth).
            ``receive_maximum`` is lowered to it if higher: the broker may have that many
            QoS-1 messages in flight to us, and we announce no more than we buffer.
        max_packet_size: the largest packet we accept, announced in CONNECT; a larger
            one closes the connection (DISCONNECT 0x95).
        publish_timeout_s: how long a QoS-1 publish waits for send quota and its PUBACK.
        ping_timeout_s: how long a PINGREQ may stay unanswered before the connection is
            taken for dead; None = the keep-alive interval, at least 5 s.

    Raises:
        ConfigError: a limit out of its range.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        keepalive_s: int = 30,
        receive_maximum: int = 65_535,
        will: Will | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
        max_buffered: int = 100_000,
        max_packet_size: int = 1_048_576,
        publish_timeout_s: float = 30.0,
        ping_timeout_s: float | None = None,
        will_on_disconnect: bool = False,
    ) -> None:
        if not 1 <= receive_maximum <= 65_535:
            raise ConfigError("receive_maximum must be between 1 and 65535")
        if max_buffered < 1:
            raise ConfigError("max_buffered must be at least 1")
        if not 0 <= keepalive_s <= 65_535:
            raise ConfigError("keepalive_s must be between 0 and 65535")
        if not 64 <= max_packet_size <= MAX_PACKET_SIZE_LIMIT:
            raise ConfigError(f"max_packet_size must be between 64 and {MAX_PACKET_SIZE_LIMIT}")
        if publish_timeout_s <= 0 or (ping_timeout_s is not None and ping_timeout_s <= 0):
            raise ConfigError("publish_timeout_s and ping_timeout_s must be positive")
        if max_buffered < receive_maximum:
            # The broker may have Receive Maximum messages in flight to us; announce no
            # more than we buffer.
            _LOG.debug(
                "%s: Receive Maximum %d lowered to max_buffered %d",
                client_id,
                receive_maximum,
                max_buffered,
            )
            receive_maximum = max_buffered
        self.host = host
        self.port = port
        self.client_id = client_id
        self._username = username
        self._password = password
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._receive_maximum = receive_maximum
        self._will = will
        self._will_on_disconnect = will_on_disconnect and will is not None
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._max_buffered = max_buffered
        self._resume_at = self._max_buffered // _RESUME_FRACTION
        self._max_packet_size = max_packet_size
        self._publish_timeout_s = publish_timeout_s
        self._ping_timeout_s = ping_timeout_s
        self._protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._connack: asyncio.Future[Connack] | None = None
        self._publishes: dict[int, asyncio.Future[int]] = {}
        self._subscribes: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        self._send_quota: asyncio.Semaphore | None = None
        self.server_receive_maximum = 65_535
        self.server_max_packet_size = MAX_PACKET_SIZE_LIMIT
        self._server_max_qos = 1
        self._server_retain = True
        self._error: BaseException | None = None
        self._connecting = False
        self._closed = True
        # Reading the socket: wanted unless the consumer is behind or gather() holds it,
        # and always while a PINGREQ waits for its answer (see the module docstring).
        self._reading = True
        self._backpressure = False
        self._gathering = False
        self._awaiting_pong = False
        self._ping_sent_at = 0.0
        self._probe_budget: int | None = None
        self._probe_read = 0
        self._ping_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_sent = 0.0
        self._last_received = 0.0
        self._keepalive_task: asyncio.Task[None] | None = None
        self.keepalive_s = keepalive_s
        self.session_present = False
        self.sessions_lost = 0
        self.pings_sent = 0
        self.pings_answered = 0
        self.unknown_acks = 0

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    @property
    def connected(self) -> bool:
        """Whether the connection is up."""
        return not self._closed and not self._connecting

    async def connect(self) -> None:
        """Open the connection and wait for the broker's CONNACK.

        Raises:
            BrokerUnavailableError: the broker cannot be reached or refused for now.
            ConfigError: the broker refused the credentials or the client id.
            MqttUsageError: the client is already connecting or connected.
        """
        if self._connecting or not self._closed:
            raise MqttUsageError(f"MQTT client {self.client_id!r} is already connected")
        self._connecting = True
        try:
            connack = await self._open()
        finally:
            self._connecting = False
        self._apply_connack(connack)

    async def _open(self) -> Connack:
        loop = self._loop = asyncio.get_running_loop()
        if self._keepalive_task is not None:  # left from a connection that died
            self._keepalive_task.cancel()
            await asyncio.wait([self._keepalive_task])
            self._keepalive_task = None
        self._error = None
        self._inbox.clear()
        self._wakeup.clear()
        self._publishes = {}
        self._subscribes = {}
        self._reading = True
        self._backpressure = self._gathering = self._awaiting_pong = False
        self._connack = loop.create_future()
        parser = PacketParser(self._inbox, self._on_control, max_packet_size=self._max_packet_size)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self, parser),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls else None,
                )
                self._protocol = protocol
                self._closed = False
                self._write(self._connect_packet())
                return await self._connack
        except (OSError, TimeoutError) as exc:
            self._abort()
            raise BrokerUnavailableError(
                f"cannot connect to MQTT broker {self.host}:{self.port}: {exc or 'timed out'}"
            ) from exc
        except BaseException:
            self._abort()
            raise

    def _apply_connack(self, connack: Connack) -> None:
        props = connack.properties
        self.session_present = connack.session_present
        self.server_receive_maximum = props.get(0x21, 65_535) or 65_535
        self._send_quota = asyncio.Semaphore(self.server_receive_maximum)
        self.server_max_packet_size = props.get(0x27, MAX_PACKET_SIZE_LIMIT)
        self._server_max_qos = props.get(0x24, 1)
        self._server_retain = bool(props.get(0x25, 1))
        # MQTT 5.0, 3.2.2.3.14: the client must use the Server Keep Alive if given.
        self.keepalive_s = props.get(0x13, self._keepalive_s)
        if not self._clean_start and not connack.session_present:
            self.sessions_lost += 1
            _LOG.warning(
                "%s: the broker has no session for us although we asked to resume one: "
                "messages it held for us are lost (expected on the client id's first "
                "connection only); sessions lost so far: %d",
                self.client_id,
                self.sessions_lost,
            )
        loop = asyncio.get_running_loop()
        self._last_received = self._last_sent = loop.time()
        if self.keepalive_s:
            self._keepalive_task = asyncio.create_task(
                self._keepalive(), name=f"mqtt-keepalive-{self.client_id}"
            )

    async def disconnect(self) -> None:
        """Send DISCONNECT (the will is then not published) and close the socket."""
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None:
            task.cancel()
            # wait() neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait([task])
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None and not self._closed:
            protocol.transport.write(
                _DISCONNECT_WITH_WILL_PACKET if self._will_on_disconnect else _DISCONNECT_PACKET
            )
            protocol.transport.close()
        self._closed = True
        self._fail(BrokerUnavailableError("client disconnected"))

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a crash would (the will fires)."""
        self._abort()

    def _abort(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        self._closed = True

    @property
    def ping_timeout_s(self) -> float:
        """How long a PINGREQ may stay unanswered before the connection is dropped."""
        if self._ping_timeout_s is not None:
            return self._ping_timeout_s
        return max(float(self.keepalive_s), 5.0)

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.keepalive_s
        timeout = self.ping_timeout_s
        tick = min(interval / 4, timeout / 2)
        while not self._closed:
            await asyncio.sleep(tick)
            if self._closed:
                return
            now = loop.time()
            if self._awaiting_pong:
                if now - self._ping_sent_at > timeout:
                    _LOG.warning(
                        "%s: no answer to PINGREQ within %.1f s; dropping the connection",
                        self.client_id,
                        timeout,
                    )
                    self._fail(
                        BrokerUnavailableError(
                            f"the broker stopped answering (no PINGRESP within {timeout:g} s)"
                        )
                    )
                    self._abort()
                    return
            elif now - self._last_sent >= interval / 2 or now - self._last_received >= interval / 2:
                self._send_ping()

    def _send_ping(self) -> None:
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        self._write(_PINGREQ_PACKET)
        self.pings_sent += 1
        self._ping_sent_at = asyncio.get_running_loop().time()
        self._awaiting_pong = True
        self._probe_read = 0
        self._probe_budget = None
        # Bytes already waiting in the kernel were sent before our PINGREQ; more than
        # these read from now on prove the broker still sends (the module docstring).
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                pass
            else:
                # Under TLS a read-ahead may sit decrypted in memory too.
                slack = 262_144 if self._tls is not None else 0
                self._probe_budget = int.from_bytes(raw, "little") + slack
        self._update_reading()

    def _pong(self) -> None:
        self._awaiting_pong = False
        self._update_reading()

    def _update_reading(self) -> None:
        # A publish waiting for its PUBACK keeps the socket read, as a ping does: a
        # consumer that publishes before it takes more (the gateway republishing a
        # stored batch) would otherwise wait for a PUBACK behind messages it never
        # reads. Memory stays bounded: the broker sends no more QoS-1 messages than
        # our Receive Maximum (at most max_buffered) unacknowledged.
        want = (
            self._awaiting_pong
            or bool(self._ping_waiters)
            or bool(self._publishes)
            or not (self._backpressure or self._gathering)
        )
        if want == self._reading:
            return
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            return
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()
        self._reading = want

    # -- protocol callbacks --------------------------------------------------------

    def _connect_packet(self) -> bytes:
        flags = 0x02 if self._clean_start else 0
        props = b""
        if self._session_expiry_s:
            props += b"\x11" + struct.pack("!I", self._session_expiry_s)
        props += b"\x21" + struct.pack("!H", self._receive_maximum)
        if self._max_packet_size < MAX_PACKET_SIZE_LIMIT:
            props += b"\x27" + struct.pack("!I", self._max_packet_size)
        body = _utf8("MQTT") + b"\x05"
        payload = _utf8(self.client_id)
        if self._will is not None:
            flags |= 0x04 | (self._will.qos << 3) | (0x20 if self._will.retain else 0)
            payload += b"\x00" + _utf8(self._will.topic) + _binary(self._will.payload)
        if self._username is not None:
            flags |= 0x80
            payload += _utf8(self._username)
        if self._password is not None:
            flags |= 0x40
            payload += _binary(self._password.encode())
        body += bytes((flags,)) + struct.pack("!H", self._keepalive_s)
        body += _varint(len(props)) + props + payload
        return _packet(_CONNECT << 4, body)

    def _on_data(self, size: int) -> None:
        loop = self._loop
        assert loop is not None
        self._last_received = loop.time()
        if self._awaiting_pong and self._probe_budget is not None:
            self._probe_read += size
            if self._probe_read > self._probe_budget:
                self._pong()
        inbox = self._inbox
        if inbox:
            self._wakeup.set()
            if len(inbox) >= self._max_buffered and not self._backpressure:
                self._backpressure = True
                self._update_reading()

    def _on_control(self, packet: ControlPacket) -> None:
        if isinstance(packet, Puback):
            future = self._publishes.pop(packet.packet_id, None)
            if future is None:
                # Not ours in flight: it must not free send quota.
                self.unknown_acks += 1
                _LOG.debug("%s: PUBACK for unknown packet id %d", self.client_id, packet[0])
                return
            if self._send_quota is not None:
                self._send_quota.release()
            if not future.done():
                future.set_result(packet.reason)
            if not self._publishes:
                self._update_reading()
        elif isinstance(packet, Pingresp):
            self.pings_answered += 1
            answered = self.pings_answered
            waiters = self._ping_waiters
            for target, waiter in waiters:
                if target <= answered and not waiter.done():
                    waiter.set_result(None)
            self._ping_waiters = [w for w in waiters if not w[1].done()]
            self._pong()
        elif isinstance(packet, Connack):
            connack = self._connack
            if connack is None or connack.done():
                raise MqttProtocolError("CONNACK outside of connecting")
            reason = packet.reason
            if reason == 0:
                connack.set_result(packet)
            elif reason in _CONNACK_FATAL:
                connack.set_exception(
                    ConfigError(
                        f"MQTT broker {self.host}:{self.port} refused client "
                        f"{self.client_id!r}: {_CONNACK_FATAL[reason]}"
                    )
                )
            else:
                connack.set_exception(
                    BrokerUnavailableError(f"MQTT broker refused the connection (0x{reason:02x})")
                )
        elif isinstance(packet, Suback):
            future = self._subscribes.pop(packet.packet_id, None)
            if future is not None and not future.done():
                codes = packet.reasons
                future.set_result(max(codes) if codes else 0x80)
        else:
            why = _DISCONNECT_REASONS.get(packet.reason, "see MQTT 5.0, 3.14.2.1")
            self._fail(
                BrokerUnavailableError(f"the broker disconnected us (0x{packet.reason:02x}: {why})")
            )

    def _protocol_error(self, exc: MqttProtocolError) -> None:
        _LOG.warning("%s: dropping the connection: %s", self.client_id, exc)
        self._fail(exc)
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is not None and not transport.is_closing():
            # MQTT 5.0, 4.13: tell the broker why, then close.
            transport.write(bytes((_DISCONNECT << 4, 1, exc.reason_code)))
            transport.close()
        self._closed = True

    def _on_lost(self, exc: Exception | None) -> None:
        self._closed = True
        why = exc or _CLOSED_WITHOUT_REASON
        self._fail(BrokerUnavailableError(f"connection to the MQTT broker lost: {why}"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(BrokerUnavailableError(str(error)))
        for pending in (self._publishes, self._subscribes):
            for future in pending.values():
                if not future.done():
                    future.set_exception(BrokerUnavailableError(str(error)))
                    # marked retrieved: a caller that no longer waits (cancelled, or
                    # waiting for an earlier one of many) must not have each logged
                    future.exception()
            pending.clear()
        waiters, self._ping_waiters = self._ping_waiters, []
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(BrokerUnavailableError(str(error)))
        quota, self._send_quota = self._send_quota, None
        if quota is not None and quota.locked():
            # Wake publishers waiting for quota; they find the connection gone.
            for _ in range(self.server_receive_maximum):
                quota.release()
        self._wakeup.set()

    def _write(self, data: bytes) -> None:
        protocol = self._protocol
        if self._closed or protocol is None or protocol.transport is None:
            raise BrokerUnavailableError("not connected to the MQTT broker")
        protocol.transport.write(data)
        loop = self._loop
        if loop is not None:
            self._last_sent = loop.time()

    def _packet_id(self) -> int:
        # Packet ids are shared by PUBLISH and SUBSCRIBE in flight (MQTT 5.0, 2.2.1).
        for _ in range(65_535):
            self._next_id = next_id = self._next_id % 65_535 + 1
            if next_id not in self._publishes and next_id not in self._subscribes:
                return next_id
        raise BrokerUnavailableError("no free packet id")  # pragma: no cover

    # -- public API ----------------------------------------------------------------

    async def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe to topic filters and wait for the SUBACK.

        Raises:
            PermanentError: the broker refused a filter (ACL or a bad filter), or the
                SUBSCRIBE would exceed the broker's Maximum Packet Size.
            BrokerUnavailableError: the connection dropped or no SUBACK came in time.
        """
        payload = b"".join(_utf8(f) + bytes((qos,)) for f in topic_filters)
        packet_id = self._packet_id()
        packet = _packet(0x82, struct.pack("!H", packet_id) + b"\x00" + payload)
        if len(packet) > self.server_max_packet_size:
            raise PermanentError(
                f"SUBSCRIBE to {list(topic_filters)} exceeds the broker's Maximum Packet Size"
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._subscribes[packet_id] = future
        try:
            self._write(packet)
            async with asyncio.timeout(self._connect_timeout_s):
                worst = await future
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"no SUBACK within {self._connect_timeout_s:g} s for {list(topic_filters)}"
            ) from exc
        finally:
            self._subscribes.pop(packet_id, None)
        if worst >= 0x80:
            raise PermanentError(
                f"the broker refused subscription to {list(topic_filters)} (0x{worst:02x})"
            )

    async def unsubscribe(self, *topic_filters: str) -> None:
        """Unsubscribe from topic filters and wait for the UNSUBACK.

        After it, the broker routes no new message to us through these filters; what
        it had already queued in our session still comes.

        Raises:
            PermanentError: the broker refused (a reason code of 0x80 or more).
            BrokerUnavailableError: the connection dropped or no UNSUBACK came in time.
        """
        packet_id = self._packet_id()
        body = struct.pack("!H", packet_id) + b"\x00" + b"".join(map(_utf8, topic_filters))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # UNSUBACKs answer from the same packet-id space as SUBACKs (MQTT 5.0, 2.2.1).
        self._subscribes[packet_id] = future
        try:
            self._write(_packet(0xA2, body))
            async with asyncio.timeout(self._connect_timeout_s):
                worst = await future
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"no UNSUBACK within {self._connect_timeout_s:g} s for {list(topic_filters)}"
            ) from exc
        finally:
            self._subscribes.pop(packet_id, None)
        if worst >= 0x80:
            raise PermanentError(
                f"the broker refused to unsubscribe {list(topic_filters)} (0x{worst:02x})"
            )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """Publish a message; at QoS 1, return after the broker's PUBACK.

        Args:
            topic: the topic name.
            payload: the payload.
            qos: 0 or 1.
            retain: ask the broker to retain it.
            timeout_s: at QoS 1, how long to wait for send quota and the PUBACK
                (default ``publish_timeout_s``). A publish that timed out stays in
                flight: its late PUBACK still frees its quota.

        Raises:
            PermanentError: the broker refused the message (for example by ACL), or
                cannot take it (over its Maximum Packet Size or Maximum QoS, or retained
                where it has no retain).
            BrokerUnavailableError: the connection dropped before the PUBACK, or no
                PUBACK came within the timeout.
        """
        if qos not in (0, 1):
            raise PermanentError("only QoS 0 and 1 are supported")
        packet = encode_publish(topic, payload, qos, retain, 0)
        if len(packet) > self.server_max_packet_size:
            raise PermanentError(
                f"message on {topic} of {len(packet)} bytes exceeds the broker's Maximum "
                f"Packet Size of {self.server_max_packet_size}"
            )
        if qos > self._server_max_qos:
            raise PermanentError(f"the broker takes no QoS-{qos} messages (on {topic})")
        if retain and not self._server_retain:
            raise PermanentError(f"the broker takes no retained messages (on {topic})")
        if qos == 0:
            self._write(packet)
            return
        quota = self._send_quota
        if quota is None:
            raise BrokerUnavailableError("not connected to the MQTT broker")
        timeout = self._publish_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                await quota.acquire()
                packet_id = self._packet_id()
                future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                self._publishes[packet_id] = future
                try:
                    self._write(encode_publish(topic, payload, 1, retain, packet_id))
                except BaseException:
                    self._publishes.pop(packet_id, None)
                    quota.release()
                    raise
                self._update_reading()
                # Cancelled or timed out, the packet id stays in flight until its PUBACK.
                reason = await future
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"no PUBACK within {timeout:g} s for a message on {topic}"
            ) from exc
        if reason >= 0x80:
            raise PermanentError(f"the broker refused the message on {topic} (0x{reason:02x})")

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes]], *, timeout_s: float | None = None
    ) -> list[PermanentError | None]:
        """Publish many QoS-1 messages in order, pipelined; return after every PUBACK.

        The packets go out in as few socket writes as the send quota allows, with no task
        per message (:meth:`send_many`, then :meth:`InFlight.acked`).

        Args:
            messages: ``(topic, payload)`` pairs, published in this order.
            timeout_s: how long to wait for send quota and every PUBACK (default
                ``publish_timeout_s``).

        Returns:
            Per message, ``None`` when the broker took it, else the
            :class:`PermanentError` saying why it refused it or could not take it.

        Raises:
            BrokerUnavailableError: the connection dropped before every PUBACK came, or
                they did not come in time (the messages stay in flight).
        """
        timeout = self._publish_timeout_s if timeout_s is None else timeout_s
        sent: InFlight | None = None
        try:
            async with asyncio.timeout(timeout):
                sent = await self.send_many(messages)
                return await sent.acked()
        except TimeoutError as exc:
            count = len(sent.waits) if sent is not None else 0
            raise BrokerUnavailableError(
                f"no PUBACK within {timeout:g} s for {count} messages"
            ) from exc

    async def send_many(
        self, messages: Sequence[tuple[str, bytes]], *, timeout_s: float | None = None
    ) -> InFlight:
        """Write many QoS-1 messages in order, pipelined; return without their PUBACKs.

        The packets go out in as few socket writes as the send quota (the broker's
        Receive Maximum) allows; this waits only for quota. The PUBACKs are awaited with
        :meth:`InFlight.acked`, so a caller can go on (the gateway stores its next batch)
        while they come.

        Args:
            messages: ``(topic, payload)`` pairs, published in this order.
            timeout_s: how long to wait for send quota (default ``publish_timeout_s``).

        Raises:
            BrokerUnavailableError: not connected, the connection dropped, or no send
                quota came in time; the messages written before stay in flight.
        """
        quota = self._send_quota
        if quota is None:
            raise BrokerUnavailableError("not connected to the MQTT broker")
        timeout = self._publish_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        sent = InFlight([None] * len(messages), [], [t for t, _ in messages])
        waits = sent.waits
        chunk: list[bytes] = []
        unsent: list[int] = []
        try:
            async with asyncio.timeout(timeout):
                for index, (topic, payload) in enumerate(messages):
                    if quota.locked() and chunk:
                        self._write(b"".join(chunk))
                        chunk, unsent = [], []
                        self._update_reading()
                    await quota.acquire()
                    packet_id = self._packet_id()
                    packet = encode_publish(topic, payload, 1, False, packet_id)
                    if len(packet) > self.server_max_packet_size:
                        quota.release()
                        sent.outcomes[index] = PermanentError(
                            f"message on {topic} of {len(packet)} bytes exceeds the "
                            f"broker's Maximum Packet Size of {self.server_max_packet_size}"
                        )
                        continue
                    future: asyncio.Future[int] = loop.create_future()
                    self._publishes[packet_id] = future
                    unsent.append(packet_id)
                    waits.append((index, future))
                    chunk.append(packet)
                if chunk:
                    self._write(b"".join(chunk))
                    chunk, unsent = [], []
                self._update_reading()
        except TimeoutError as exc:
            raise BrokerUnavailableError(f"no send quota within {timeout:g} s") from exc
        finally:
            # ids taken for packets never written get no PUBACK: give them back
            for packet_id in unsent:
                if self._publishes.pop(packet_id, None) is not None and self._send_quota:
                    self._send_quota.release()
        return sent

    async def ping(self, timeout_s: float | None = None) -> None:
        """Send a PINGREQ and wait for its PINGRESP (a round trip through the broker).

        The socket is read meanwhile even if the consumer is behind. Everything the
        broker sent before the PINGRESP has been received when this returns.

        Args:
            timeout_s: how long to wait (default ``ping_timeout_s``).

        Raises:
            BrokerUnavailableError: the connection dropped or no PINGRESP came in time.
        """
        timeout = self.ping_timeout_s if timeout_s is None else timeout_s
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._send_ping()
        self._ping_waiters.append((self.pings_sent, future))
        self._update_reading()
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError as exc:
            raise BrokerUnavailableError(f"no PINGRESP within {timeout:g} s") from exc
        finally:
            self._ping_waiters = [w for w in self._ping_waiters if w[1] is not future]
            self._update_reading()

    def ack(self, message: Message) -> None:
        """Acknowledge one QoS-1 message (send its PUBACK); a no-op for QoS 0."""
        if message.qos:
            self._write(b"\x40\x02" + message.packet_id.to_bytes(2, "big"))

    def ack_many(self, messages: Iterable[Message]) -> None:
        """Acknowledge many messages in one socket write, in the order given.

        MQTT 5.0 (4.6) asks for PUBACKs in the order the PUBLISH packets arrived.
        """
        data = b"".join(b"\x40\x02" + m.packet_id.to_bytes(2, "big") for m in messages if m.qos)
        if data:
            self._write(data)

    async def gather(self, delay_s: float) -> None:
        """Stop reading the socket for ``delay_s``, then read what piled up at once.

        Keep-alive is unaffected: an unanswered PINGREQ keeps the socket read. Nothing
        is lost: the kernel's socket buffer (and then TCP flow control) holds the data
        meanwhile.
        """
        if self._closed or self._gathering:
            await asyncio.sleep(delay_s)
            return
        self._gathering = True
        self._update_reading()
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._gathering = False
            self._update_reading()
        # The read is queued by the next poll of the event loop, behind this task's own
        # wake-up; two yields let it run before the caller takes the messages.
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    @property
    def pending(self) -> int:
        """How many received messages wait to be taken."""
        return len(self._inbox)

    def take(self, max_count: int) -> list[Message]:
        """Take up to ``max_count`` received messages without waiting."""
        inbox = self._inbox
        count = min(max_count, len(inbox))
        taken = [inbox.popleft() for _ in range(count)]
        if self._backpressure and len(inbox) <= self._resume_at:
            self._backpressure = False
            self._update_reading()
        if not inbox:
            self._wakeup.clear()
        return taken

    async def wait_messages(self, timeout_s: float | None = None) -> bool:
        """Wait until a message is waiting; return False on timeout.

        Raises:
            BrokerUnavailableError: the connection is gone and nothing is left to take.
        """
        if self._inbox:
            return True
        if self._error is not None:
            raise BrokerUnavailableError(str(self._error)) from self._error
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        if not self._inbox and self._error is not None:
            raise BrokerUnavailableError(str(self._error)) from self._error
        return bool(self._inbox)

    async def batches(self, max_count: int = 10_000) -> AsyncIterator[list[Message]]:
        """Yield lists of received messages as they arrive (at most ``max_count`` each).

        Raises:
            BrokerUnavailableError: when the connection is lost.
        """
        while True:
            await self.wait_messages()
            yield self.take(max_count)

    async def messages(self) -> AsyncIterator[Message]:
        """Yield received messages one by one.

        Raises:
            BrokerUnavailableError: when the connection is lost.
        """
        async for batch in self.batches():
            for message in batch:
                yield message
