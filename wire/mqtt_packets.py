"""MQTT 5 packets (the wire's transport): encoding and parsing, no I/O.

What :class:`~wire.mqtt.MqttClient` sends and reads, as bytes: the fixed header and
variable-length integers, PUBLISH built once per message, properties read with every
length checked against the packet's end, and :class:`PacketParser`, which splits the
broker's byte stream into packets whatever the read boundaries (PUBLISH into
:class:`Message` tuples on the hot path, every other packet decoded for the client).
A packet that cannot be parsed raises :class:`MqttProtocolError`, one over the
announced Maximum Packet Size :class:`PacketTooLargeError`, as soon as its header is
read. The subset of MQTT 5.0 (OASIS standard, 2019) and the limits are described in
:mod:`wire.mqtt`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

from wire.errors import BrokerUnavailableError

__all__ = [
    "MAX_PACKET_SIZE_LIMIT",
    "Connack",
    "ControlPacket",
    "Disconnect",
    "Message",
    "MqttProtocolError",
    "PacketParser",
    "PacketTooLargeError",
    "Pingresp",
    "Puback",
    "Suback",
    "encode_publish",
]


_CONNECT: Final = 1
_CONNACK: Final = 2
_PUBLISH: Final = 3
_PUBACK: Final = 4
_SUBSCRIBE: Final = 8
_SUBACK: Final = 9
_UNSUBSCRIBE: Final = 10
_UNSUBACK: Final = 11
_PINGREQ: Final = 12
_PINGRESP: Final = 13
_DISCONNECT: Final = 14

_PINGREQ_PACKET: Final = b"\xc0\x00"
_DISCONNECT_PACKET: Final = b"\xe0\x00"

#: The largest packet MQTT 5.0 can express (a remaining length of 268,435,455).
MAX_PACKET_SIZE_LIMIT: Final = 268_435_460


# DISCONNECT reason codes we send (MQTT 5.0, 3.14.2.1).
_MALFORMED: Final = 0x81
_PROTOCOL_ERROR: Final = 0x82
_TOO_LARGE: Final = 0x95


# Property identifiers by the type of their value (MQTT 5.0, 2.2.2.2).
_BYTE_PROPS: Final = frozenset((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A))
_TWO_BYTE_PROPS: Final = frozenset((0x13, 0x21, 0x22, 0x23))
_FOUR_BYTE_PROPS: Final = frozenset((0x02, 0x11, 0x18, 0x27))
_STRING_PROPS: Final = frozenset((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F))
_USER_PROPERTY: Final = 0x26
_SUBSCRIPTION_ID: Final = 0x0B


class MqttProtocolError(BrokerUnavailableError):
    """The broker sent something this client cannot parse; the connection is dropped.

    Attributes:
        reason_code: the DISCONNECT reason code sent to the broker before closing.
    """

    reason_code = _MALFORMED


class PacketTooLargeError(MqttProtocolError):
    """The broker sent a packet over the Maximum Packet Size we announced."""

    reason_code = _TOO_LARGE


class Message(NamedTuple):
    """One PUBLISH received from the broker.

    Attributes:
        topic: the topic it was published on.
        payload: the raw payload.
        qos: 0 or 1.
        retain: whether the broker delivered it as a retained message.
        packet_id: the packet id to acknowledge (0 for QoS 0).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int


class Connack(NamedTuple):
    """A CONNACK: the broker's answer to CONNECT.

    Attributes:
        session_present: the broker resumed a stored session.
        reason: the reason code (0 = accepted).
        properties: its integer-valued properties, identifier -> value.
    """

    session_present: bool
    reason: int
    properties: dict[int, int]


class Puback(NamedTuple):
    """A PUBACK for one of our QoS-1 publishes.

    Attributes:
        packet_id: the packet id acknowledged.
        reason: the reason code (>= 0x80 = refused).
    """

    packet_id: int
    reason: int


class Suback(NamedTuple):
    """A SUBACK or UNSUBACK: one reason code per topic filter of the (UN)SUBSCRIBE.

    Attributes:
        packet_id: the (UN)SUBSCRIBE's packet id.
        reasons: the reason codes, one byte each.
    """

    packet_id: int
    reasons: bytes


class Pingresp(NamedTuple):
    """A PINGRESP, the answer to our PINGREQ."""


class Disconnect(NamedTuple):
    """A DISCONNECT from the broker.

    Attributes:
        reason: the reason code.
        properties: its integer-valued properties.
    """

    reason: int
    properties: dict[int, int]


ControlPacket = Connack | Puback | Suback | Pingresp | Disconnect


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    """Encode a PUBLISH packet (no properties).

    Args:
        topic: the topic name.
        payload: the payload.
        qos: 0 or 1.
        retain: the retain flag.
        packet_id: the packet id (ignored at QoS 0).

    Returns:
        The packet's bytes.
    """
    head = _utf8(topic)
    if qos:
        head += struct.pack("!H", packet_id)
    return _packet(0x30 | (qos << 1) | int(retain), head + b"\x00" + payload)


def _read_varint(buf: bytearray | bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a variable byte integer that must end before ``end``; (value, next pos)."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise MqttProtocolError("truncated variable byte integer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttProtocolError("malformed variable byte integer")


def _parse_properties(buf: bytearray | bytes, pos: int, limit: int) -> tuple[dict[int, int], int]:
    """Parse a property block that must end by ``limit``; keep the integer properties.

    Returns:
        The integer-valued properties and the position after the block.

    Raises:
        MqttProtocolError: the block or one of its properties runs past its end, or an
            identifier is unknown.
    """
    length, pos = _read_varint(buf, pos, limit)
    end = pos + length
    if end > limit:
        raise MqttProtocolError("property block runs past the end of the packet")
    found: dict[int, int] = {}
    while pos < end:
        ident = buf[pos]
        pos += 1
        if ident in _BYTE_PROPS:
            if pos + 1 > end:
                raise MqttProtocolError(f"truncated property 0x{ident:02x}")
            found[ident] = buf[pos]
            pos += 1
        elif ident in _TWO_BYTE_PROPS:
            if pos + 2 > end:
                raise MqttProtocolError(f"truncated property 0x{ident:02x}")
            found[ident] = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif ident in _FOUR_BYTE_PROPS:
            if pos + 4 > end:
                raise MqttProtocolError(f"truncated property 0x{ident:02x}")
            found[ident] = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif ident == _SUBSCRIPTION_ID:
            found[ident], pos = _read_varint(buf, pos, end)
        elif ident in _STRING_PROPS or ident == _USER_PROPERTY:
            for _ in range(2 if ident == _USER_PROPERTY else 1):
                if pos + 2 > end:
                    raise MqttProtocolError(f"truncated property 0x{ident:02x}")
                pos += 2 + ((buf[pos] << 8) | buf[pos + 1])
                if pos > end:
                    raise MqttProtocolError(f"truncated property 0x{ident:02x}")
        else:
            raise MqttProtocolError(f"unknown property 0x{ident:02x}")
    return found, end


def _decode_control(first: int, body: bytes) -> ControlPacket:
    """Decode a packet other than PUBLISH from its first byte and its body."""
    kind = first >> 4
    if first & 0x0F:
        raise MqttProtocolError(f"reserved flags set in packet type {kind}")
    size = len(body)
    if kind == _PUBACK:
        if size < 2:
            raise MqttProtocolError("PUBACK shorter than its packet id")
        reason = body[2] if size > 2 else 0
        if size > 3:
            _, end = _parse_properties(body, 3, size)
            if end != size:
                raise MqttProtocolError("bytes after the PUBACK's properties")
        return Puback((body[0] << 8) | body[1], reason)
    if kind == _CONNACK:
        if size < 2:
            raise MqttProtocolError("CONNACK shorter than two bytes")
        if body[0] & 0xFE:
            raise MqttProtocolError("reserved CONNACK flags set")
        props: dict[int, int] = {}
        # A broker that does not speak MQTT 5 may answer in MQTT 3's two bytes.
        if size > 2:
            props, end = _parse_properties(body, 2, size)
            if end != size:
                raise MqttProtocolError("bytes after the CONNACK's properties")
        return Connack(bool(body[0] & 1), body[1], props)
    if kind in (_SUBACK, _UNSUBACK):
        if size < 3:
            raise MqttProtocolError("SUBACK shorter than its packet id and properties")
        _, end = _parse_properties(body, 2, size)
        return Suback((body[0] << 8) | body[1], body[end:])
    if kind == _PINGRESP:
        if size:
            raise MqttProtocolError("PINGRESP with a body")
        return Pingresp()
    if kind == _DISCONNECT:
        reason = body[0] if size else 0
        props = {}
        if size > 1:
            props, end = _parse_properties(body, 1, size)
            if end != size:
                raise MqttProtocolError("bytes after the DISCONNECT's properties")
        return Disconnect(reason, props)
    raise MqttProtocolError(f"unexpected packet type {kind} from the broker")


class PacketParser:
    """Splits the broker's byte stream into packets, whatever the read boundaries.

    PUBLISH packets become :class:`Message` tuples appended to ``inbox`` (the hot path);
    every other packet is decoded and handed to ``on_control``.

    Args:
        inbox: where received messages go.
        on_control: called with each other packet, in stream order.
        max_packet_size: the largest packet accepted (the whole packet, header included).
    """

    def __init__(
        self,
        inbox: deque[Message],
        on_control: Callable[[ControlPacket], None],
        *,
        max_packet_size: int = MAX_PACKET_SIZE_LIMIT,
    ) -> None:
        self.inbox = inbox
        self._on_control = on_control
        self._max_packet_size = max_packet_size
        self._buf = bytearray()
        self._topics: dict[bytes, str] = {}

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet waiting for the rest."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Parse ``data`` with what was left over; keep an incomplete packet's bytes.

        Raises:
            MqttProtocolError: a malformed packet; the stream cannot be resynchronised.
            PacketTooLargeError: a packet over ``max_packet_size`` (known from its header).
        """
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        inbox = self.inbox
        topics = self._topics
        max_size = self._max_packet_size
        new_message = tuple.__new__  # skips the NamedTuple's Python-level __new__
        try:
            while size - pos >= 2:
                first = buf[pos]
                # Remaining length: a variable byte integer of at most four bytes; one
                # or two bytes (packets under 16 KiB) take the short way.
                byte = buf[pos + 1]
                if byte < 0x80:
                    length = byte
                    i = pos + 2
                elif size - pos >= 3 and buf[pos + 2] < 0x80:
                    length = (byte & 0x7F) | (buf[pos + 2] << 7)
                    i = pos + 3
                else:
                    i = pos + 1
                    length = 0
                    shift = 0
                    complete = False
                    while i < size:
                        byte = buf[i]
                        i += 1
                        length |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            complete = True
                            break
                        shift += 7
                        if shift > 21:
                            raise MqttProtocolError("malformed remaining length")
                    if not complete:
                        break
                end = i + length
                if end - pos > max_size:
                    raise PacketTooLargeError(
                        f"the broker sent a packet of {end - pos} bytes, over our "
                        f"Maximum Packet Size of {max_size}"
                    )
                if end > size:
                    break
                if first >> 4 == 3:  # PUBLISH
                    # Every length is checked against the packet's end.
                    if length < 4:
                        raise MqttProtocolError("PUBLISH shorter than a topic and properties")
                    j = i + 2 + ((buf[i] << 8) | buf[i + 1])
                    qos = first & 6
                    if qos:
                        if qos != 2:
                            raise MqttProtocolError(f"QoS {qos >> 1} is not supported")
                        if j + 2 >= end:
                            raise MqttProtocolError("PUBLISH topic runs past the packet end")
                        packet_id = (buf[j] << 8) | buf[j + 1]
                        if not packet_id:
                            raise MqttProtocolError("QoS-1 PUBLISH with packet id 0")
                        k = j + 2
                    else:
                        if j >= end:
                            raise MqttProtocolError("PUBLISH topic runs past the packet end")
                        packet_id = 0
                        k = j
                    raw_topic = bytes(buf[i + 2 : j])
                    topic = topics.get(raw_topic)
                    if topic is None:
                        if not raw_topic:
                            raise MqttProtocolError("empty topic (topic aliases are not used)")
                        try:
                            topic = raw_topic.decode()
                        except UnicodeDecodeError as exc:
                            raise MqttProtocolError("PUBLISH topic is not UTF-8") from exc
                        if len(topics) < 100_000:
                            topics[raw_topic] = topic
                    if buf[k]:
                        _, k = _parse_properties(buf, k, end)
                    else:
                        k += 1
                    inbox.append(
                        new_message(
                            Message,
                            (topic, bytes(buf[k:end]), qos >> 1, bool(first & 1), packet_id),
                        )
                    )
                else:
                    self._on_control(_decode_control(first, bytes(buf[i:end])))
                pos = end
        finally:
            if pos:
                del buf[:pos]
