"""The MQTT client on its own: parser properties, a scripted broker, and real mosquitto.

Three layers:

* Property-based: packets built by a reference encoder written here (independent of the
  client's encoder) are split at random points and fed to :class:`PacketParser`; the
  same packets must come out. Truncated and corrupted packets raise
  :class:`MqttProtocolError` and nothing else.
* A scripted broker (an asyncio server on 127.0.0.1 in the test) checks each rule of the
  client: Server Keep Alive, Maximum Packet Size both ways, PUBACKs for unknown packet
  ids, the publish timeout, connect twice, the lost-session counter, and keep-alive
  while the application reads nothing.
* Conformance against the real mosquitto: keep-alive, Receive Maximum, packet size and
  session resumption.

No test asserts a duration: waits are for counts and events, under generous timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from conftest import DEVICE_IDS, FLEET_SECRET, GATEWAY_PASSWORD, MakeMosquitto, device_pw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixloop.broker import GATEWAY_USER
from fixloop.stack import MosquittoServer
from wire.errors import BrokerUnavailableError, PermanentError
from wire.mqtt import MqttClient, MqttUsageError, Will
from wire.mqtt_packets import (
    Connack,
    ControlPacket,
    Disconnect,
    Message,
    MqttProtocolError,
    PacketParser,
    PacketTooLargeError,
    Pingresp,
    Puback,
    Suback,
)

WAIT_S = 30.0  # a bound for things that happen at once; never a measured duration

# -- a reference encoder (MQTT 5.0, section 2 and 3), independent of the client ----------


def ref_varint(value: int) -> bytes:
    """Variable byte integer (2.2.3), least significant group first."""
    assert 0 <= value < 1 << 28
    out = []
    while True:
        value, low = divmod(value, 128)
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def ref_string(raw: bytes) -> bytes:
    """Two-byte length, then the bytes (UTF-8 string or binary data)."""
    return len(raw).to_bytes(2, "big") + raw


BYTE_IDS = (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A)
TWO_BYTE_IDS = (0x13, 0x21, 0x22)
FOUR_BYTE_IDS = (0x02, 0x11, 0x18, 0x27)
STRING_IDS = (0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F)
SUBSCRIPTION_ID = 0x0B
USER_PROPERTY = 0x26

Prop = tuple[int, Any]


def ref_property(ident: int, value: Any) -> bytes:
    """One property: identifier, then its value by type (2.2.2.2)."""
    head = bytes((ident,))
    if ident in BYTE_IDS:
        return head + bytes((value,))
    if ident in TWO_BYTE_IDS:
        return head + int(value).to_bytes(2, "big")
    if ident in FOUR_BYTE_IDS:
        return head + int(value).to_bytes(4, "big")
    if ident == SUBSCRIPTION_ID:
        return head + ref_varint(value)
    if ident == USER_PROPERTY:
        return head + ref_string(value[0]) + ref_string(value[1])
    return head + ref_string(value)


def ref_properties(props: list[Prop]) -> bytes:
    """A property block: its length, then the properties."""
    block = b"".join(ref_property(i, v) for i, v in props)
    return ref_varint(len(block)) + block


def int_props(props: list[Prop]) -> dict[int, int]:
    """What the parser keeps of a property list: the integer-valued ones."""
    return {
        i: v
        for i, v in props
        if i in BYTE_IDS or i in TWO_BYTE_IDS or i in FOUR_BYTE_IDS or i == SUBSCRIPTION_ID
    }


def ref_packet(kind: int, flags: int, body: bytes) -> bytes:
    """Fixed header (type and flags, remaining length), then the body."""
    return bytes(((kind << 4) | flags,)) + ref_varint(len(body)) + body


# -- strategies: (encoded bytes, expected parse, positions where a cut must fail) ------

Expected = Message | ControlPacket
Case = tuple[bytes, Expected, int, frozenset[int]]  # first byte, expected, header len, must-fail

short_bytes = st.binary(max_size=12)


def prop_strategy(ids: tuple[int, ...]) -> st.SearchStrategy[Prop]:
    """Properties of the given identifiers with values of the right type."""
    choices: list[st.SearchStrategy[Prop]] = []
    for ident in ids:
        if ident in BYTE_IDS:
            value: st.SearchStrategy[Any] = st.integers(0, 255)
        elif ident in TWO_BYTE_IDS:
            value = st.integers(0, 65_535)
        elif ident in FOUR_BYTE_IDS:
            value = st.integers(0, 2**32 - 1)
        elif ident == SUBSCRIPTION_ID:
            value = st.integers(1, (1 << 28) - 1)
        elif ident == USER_PROPERTY:
            value = st.tuples(short_bytes, short_bytes)
        else:
            value = short_bytes
        choices.append(st.tuples(st.just(ident), value))
    return st.one_of(choices)


def prop_lists(ids: tuple[int, ...]) -> st.SearchStrategy[list[Prop]]:
    """Property lists without a repeated identifier (user properties may repeat)."""
    return st.lists(
        prop_strategy(ids),
        max_size=4,
        unique_by=lambda prop: prop[0] if prop[0] != USER_PROPERTY else object(),
    )


PUBLISH_PROP_IDS = (0x01, 0x02, 0x03, 0x08, 0x09, SUBSCRIPTION_ID, USER_PROPERTY)
ANY_PROP_IDS = BYTE_IDS + TWO_BYTE_IDS + FOUR_BYTE_IDS + STRING_IDS + (USER_PROPERTY,)


@st.composite
def publishes(draw: st.DrawFn) -> tuple[bytes, Expected, frozenset[int]]:
    """A PUBLISH; a cut before the payload must fail."""
    topic = draw(st.text(min_size=1, max_size=30).filter(lambda t: "\x00" not in t))
    payload = draw(st.binary(max_size=300))
    qos = draw(st.integers(0, 1))
    retain = draw(st.booleans())
    packet_id = draw(st.integers(1, 65_535)) if qos else 0
    props = draw(prop_lists(PUBLISH_PROP_IDS))
    head = ref_string(topic.encode())
    if qos:
        head += packet_id.to_bytes(2, "big")
    head += ref_properties(props)
    packet = ref_packet(3, (qos << 1) | int(retain), head + payload)
    return packet, Message(topic, payload, qos, retain, packet_id), frozenset(range(len(head)))


@st.composite
def pubacks(draw: st.DrawFn) -> tuple[bytes, Expected, frozenset[int]]:
    """A PUBACK in its three forms; cuts into the packet id or properties fail."""
    packet_id = draw(st.integers(1, 65_535))
    form = draw(st.integers(0, 2))
    reason = draw(st.sampled_from((0x00, 0x10, 0x80, 0x87, 0x97))) if form else 0
    props = draw(prop_lists((0x1F, USER_PROPERTY))) if form == 2 else []
    body = packet_id.to_bytes(2, "big")
    if form:
        body += bytes((reason,))
    if form == 2:
        body += ref_properties(props)
    fail = {0, 1} | set(range(4, len(body)))
    return ref_packet(4, 0, body), Puback(packet_id, reason), frozenset(fail)


@st.composite
def connacks(draw: st.DrawFn) -> tuple[bytes, Expected, frozenset[int]]:
    """A CONNACK with properties; a cut anywhere but after the reason fails."""
    present = draw(st.booleans())
    reason = draw(st.sampled_from((0x00, 0x80, 0x86, 0x88, 0x97)))
    props = draw(prop_lists(ANY_PROP_IDS))
    body = bytes((int(present), reason)) + ref_properties(props)
    fail = {0, 1} | set(range(3, len(body)))
    return ref_packet(2, 0, body), Connack(present, reason, int_props(props)), frozenset(fail)


@st.composite
def subacks(draw: st.DrawFn) -> tuple[bytes, Expected, frozenset[int]]:
    """A SUBACK; a cut before its reason codes fails."""
    packet_id = draw(st.integers(1, 65_535))
    props = draw(prop_lists((0x1F, USER_PROPERTY)))
    reasons = draw(st.binary(min_size=1, max_size=5))
    head = packet_id.to_bytes(2, "big") + ref_properties(props)
    packet = ref_packet(9, 0, head + reasons)
    return packet, Suback(packet_id, reasons), frozenset(range(len(head)))


@st.composite
def disconnects(draw: st.DrawFn) -> tuple[bytes, Expected, frozenset[int]]:
    """A DISCONNECT; a cut inside its properties fails."""
    reason = draw(st.sampled_from((0x00, 0x8B, 0x8E, 0x93, 0x95)))
    props = draw(prop_lists((0x11, 0x1F, 0x1C, USER_PROPERTY)))
    with_props = draw(st.booleans())
    body = bytes((reason,)) + (ref_properties(props) if with_props else b"")
    fail = set(range(2, len(body)))
    expected = Disconnect(reason, int_props(props) if with_props else {})
    return ref_packet(14, 0, body), expected, frozenset(fail)


pingresps = st.just((b"\xd0\x00", Pingresp(), frozenset[int]()))
packets = st.one_of(publishes(), pubacks(), connacks(), subacks(), disconnects(), pingresps)


def parse_chunks(
    chunks: list[bytes], max_packet_size: int | None = None, *, whole: bool = False
) -> list[Expected]:
    """Feed ``chunks`` one by one; everything parsed, in stream order.

    With ``whole``, no bytes of an incomplete packet may be left over.
    """
    inbox: deque[Message] = deque()
    out: list[Expected] = []

    def control(packet: ControlPacket) -> None:
        out.extend(inbox)
        inbox.clear()
        out.append(packet)

    kw = {} if max_packet_size is None else {"max_packet_size": max_packet_size}
    parser = PacketParser(inbox, control, **kw)
    for chunk in chunks:
        parser.feed(chunk)
        out.extend(inbox)
        inbox.clear()
    assert parser.buffered == 0 or not whole
    return out


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at the given positions."""
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(st.lists(packets, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_split_stream_gives_the_same_packets(
    cases: list[tuple[bytes, Expected, frozenset[int]]], cuts: list[int]
) -> None:
    """Any split of a valid byte stream parses to the packets encoded, in order."""
    stream = b"".join(packet for packet, _, _ in cases)
    expected = [packet for _, packet, _ in cases]
    assert parse_chunks(split(stream, cuts), whole=True) == expected
    assert parse_chunks([bytes((b,)) for b in stream], whole=True) == expected


def body_of(packet: bytes) -> bytes:
    """The body of an encoded packet (after its fixed header)."""
    pos = 1
    length = 0
    shift = 0
    while True:
        byte = packet[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    body = packet[pos:]
    assert len(body) == length
    return body


def truncated(packet: bytes, keep: int) -> bytes:
    """The packet with its body cut to ``keep`` bytes and the length saying so."""
    return bytes((packet[0],)) + ref_varint(keep) + body_of(packet)[:keep]


@PROPERTY_SETTINGS
@given(packets, st.data())
def test_truncated_packets_raise_protocol_errors(
    case: tuple[bytes, Expected, frozenset[int]], data: st.DataObject
) -> None:
    """A body cut short inside a length-prefixed field raises, and never reads on.

    A valid packet follows the cut one: a parser that read past the packet end would
    take its bytes for the missing field instead of raising.
    """
    packet, _, must_fail = case
    if not must_fail:
        return
    keep = data.draw(st.sampled_from(sorted(must_fail)))
    follower = data.draw(packets)[0]
    with pytest.raises(MqttProtocolError):
        parse_chunks([truncated(packet, keep) + follower])


@PROPERTY_SETTINGS
@given(packets, st.data())
def test_any_truncation_raises_only_protocol_errors(
    case: tuple[bytes, Expected, frozenset[int]], data: st.DataObject
) -> None:
    """A cut anywhere (also where the rest is valid) raises nothing but MqttProtocolError."""
    packet, _, _ = case
    keep = data.draw(st.integers(0, len(body_of(packet))))
    with suppress(MqttProtocolError):
        parse_chunks([truncated(packet, keep)])


@PROPERTY_SETTINGS
@given(
    st.sampled_from(
        [
            (0x02, 0x13),
            (0x02, 0x27),
            (0x02, 0x12),
            (0x02, USER_PROPERTY),
            (0x02, SUBSCRIPTION_ID),
            (0x03, 0x03),
            (0x03, 0x02),
            (0x04, 0x1F),
            (0x0E, 0x11),
        ]
    ),
    st.data(),
)
def test_truncated_property_raises(kind_and_prop: tuple[int, int], data: st.DataObject) -> None:
    """The last property cut short, its block's length adjusted, raises MqttProtocolError."""
    kind, ident = kind_and_prop
    prop = data.draw(prop_strategy((ident,)))
    encoded = ref_property(*prop)
    if ident == SUBSCRIPTION_ID and len(encoded) < 3:
        prop = (ident, 1 << 20)  # a multi-byte varint to cut into
        encoded = ref_property(*prop)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    block = encoded[:cut]
    props = ref_varint(len(block)) + block
    if kind == 0x02:
        body = b"\x00\x00" + props
    elif kind == 0x03:
        body = ref_string(b"a/b") + props + b"payload"
    elif kind == 0x04:
        body = b"\x00\x01\x00" + props
    else:
        body = b"\x00" + props
    flags = 0
    with pytest.raises(MqttProtocolError):
        parse_chunks([ref_packet(kind, flags, body) + b"\xd0\x00"])


@PROPERTY_SETTINGS
@given(
    st.lists(packets, min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_corrupt_streams_raise_only_protocol_errors(
    cases: list[tuple[bytes, Expected, frozenset[int]]],
    damage: list[tuple[int, int]],
    cuts: list[int],
) -> None:
    """Bytes overwritten anywhere: the parser parses or raises MqttProtocolError, only."""
    stream = bytearray(b"".join(packet for packet, _, _ in cases))
    for where, value in damage:
        stream[where % len(stream)] = value
    with suppress(MqttProtocolError):
        parse_chunks(split(bytes(stream), cuts))


@PROPERTY_SETTINGS
@given(st.binary(min_size=1, max_size=400))
def test_random_bytes_raise_only_protocol_errors(stream: bytes) -> None:
    """Noise is parsed or refused with MqttProtocolError, never another exception."""
    with suppress(MqttProtocolError):
        parse_chunks([stream])


def test_too_large_packet_is_refused_from_its_header() -> None:
    """A packet over the limit is refused when its fixed header is read, not buffered."""
    header = b"\x30" + ref_varint(10_000_000)
    with pytest.raises(PacketTooLargeError):
        parse_chunks([header, b"\x00\x03abc"], max_packet_size=1_000)
    packet = ref_packet(3, 0, ref_string(b"t") + b"\x00" + b"x" * 993)
    assert len(packet) == 1_000
    assert parse_chunks([packet], max_packet_size=1_000) == [Message("t", b"x" * 993, 0, False, 0)]
    with pytest.raises(PacketTooLargeError):
        parse_chunks([packet + b"x"], max_packet_size=999)


# -- a scripted broker ---------------------------------------------------------------


class BrokerSide:
    """The broker's end of one client connection, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read_packet(self) -> tuple[int, bytes]:
        """The next packet from the client: (first byte, body)."""
        async with asyncio.timeout(WAIT_S):
            first = (await self.reader.readexactly(1))[0]
            length = 0
            shift = 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            return first, await self.reader.readexactly(length)

    async def read_until_closed(self) -> bytes:
        """Everything the client sends until it closes the connection."""
        async with asyncio.timeout(WAIT_S):
            return await self.reader.read()

    def send(self, data: bytes) -> None:
        """Write to the client."""
        self.writer.write(data)

    async def accept(
        self, *, session_present: bool = False, props: list[Prop] | None = None
    ) -> dict[int, int]:
        """Read the CONNECT, answer CONNACK; the CONNECT's integer properties."""
        first, body = await self.read_packet()
        assert first == 0x10
        assert body[:7] == b"\x00\x04MQTT\x05"
        pos = 10  # protocol name, level, flags, keep alive
        length = 0
        shift = 0
        while True:
            byte = body[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        found: dict[int, int] = {}
        end = pos + length
        while pos < end:
            ident = body[pos]
            size = {0x11: 4, 0x21: 2, 0x27: 4, 0x22: 2, 0x17: 1, 0x19: 1}[ident]
            found[ident] = int.from_bytes(body[pos + 1 : pos + 1 + size], "big")
            pos += 1 + size
        found[-1] = int.from_bytes(body[8:10], "big")  # the keep alive asked for
        connack = bytes((int(session_present), 0)) + ref_properties(props or [])
        self.send(ref_packet(2, 0, connack))
        return found


class FakeBroker:
    """A TCP server on 127.0.0.1; each accepted connection is queued for the test."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[BrokerSide] = asyncio.Queue()
        self.sides: list[BrokerSide] = []
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side = BrokerSide(reader, writer)
        self.sides.append(side)
        await self.connections.put(side)

    async def next_connection(self) -> BrokerSide:
        """The next client that connected."""
        async with asyncio.timeout(WAIT_S):
            return await self.connections.get()

    def client(self, **kw: Any) -> MqttClient:
        """A client of this broker."""
        kw.setdefault("client_id", "test-client")
        return MqttClient("127.0.0.1", self.port, **kw)


@asynccontextmanager
async def fake_broker() -> AsyncIterator[FakeBroker]:
    """A started scripted broker, closed afterwards with its connections."""
    broker = FakeBroker()
    server = await asyncio.start_server(broker._accept, "127.0.0.1", 0)
    broker.port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield broker
    finally:
        for side in broker.sides:
            side.writer.transport.abort()
        for side in broker.sides:
            with suppress(OSError):
                await side.writer.wait_closed()


async def connected(
    broker: FakeBroker,
    client: MqttClient,
    *,
    session_present: bool = False,
    props: list[Prop] | None = None,
) -> tuple[BrokerSide, dict[int, int]]:
    """Connect ``client`` to the scripted broker, which answers with ``props``."""
    connecting = asyncio.create_task(client.connect())
    side = await broker.next_connection()
    found = await side.accept(session_present=session_present, props=props)
    async with asyncio.timeout(WAIT_S):
        await connecting
    return side, found


async def until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Wait until ``condition()`` holds (checked every few milliseconds)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - client counters have no event to wait on
            await asyncio.sleep(0.005)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """A PUBLISH from the broker, by the reference encoder."""
    head = ref_string(topic.encode()) + (packet_id.to_bytes(2, "big") if qos else b"")
    return ref_packet(3, qos << 1, head + b"\x00" + payload)


def topic_of(body: bytes) -> str:
    """The topic of a PUBLISH body the client sent."""
    return body[2 : 2 + int.from_bytes(body[:2], "big")].decode()


async def test_server_keep_alive_is_honoured() -> None:
    """CONNACK's Server Keep Alive (0x13) replaces the 60 s asked for: PINGREQs come."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=60, ping_timeout_s=WAIT_S)
        side, found = await connected(broker, client, props=[(0x13, 1)])
        assert found[-1] == 60
        assert client.keepalive_s == 1
        for _ in range(2):
            assert await side.read_packet() == (0xC0, b"")
            side.send(b"\xd0\x00")
        await until(lambda: client.pings_answered == 2)
        assert client.connected
        await client.disconnect()


async def test_silent_broker_is_dropped_after_the_ping_timeout() -> None:
    """A PINGREQ left unanswered ends the connection (reported to the consumer)."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=1, ping_timeout_s=0.5)
        side, _ = await connected(broker, client)
        assert await side.read_packet() == (0xC0, b"")
        with pytest.raises(BrokerUnavailableError, match="PINGRESP"):
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
        assert not client.connected
        await client.disconnect()


async def test_keepalive_works_while_the_application_reads_nothing() -> None:
    """A consumer that takes nothing does not stop PINGRESPs: the connection stays up.

    The broker sends far more than ``max_buffered`` messages, so the client stops
    reading for back-pressure; PINGREQs still go out and their PINGRESPs, queued
    behind the messages, are read.
    """
    async with fake_broker() as broker:
        client = broker.client(
            keepalive_s=1, ping_timeout_s=WAIT_S, receive_maximum=10, max_buffered=10
        )
        side, _ = await connected(broker, client)
        flood = 2_000
        side.send(b"".join(publish_packet("t/flood", bytes(1_000)) for _ in range(flood)))
        await until(lambda: client.pending >= 10)
        pings = 0
        while pings < 6:
            first, body = await side.read_packet()
            assert (first, body) == (0xC0, b"")
            pings += 1
            side.send(b"\xd0\x00")
        await until(lambda: client.pings_answered >= 5)
        assert client.connected
        assert client.pending <= flood
        # The consumer comes back: everything is there, in order.
        taken = client.take(flood)
        assert all(m.topic == "t/flood" for m in taken)
        while len(taken) < flood:
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
            taken += client.take(flood)
        assert len(taken) == flood
        await client.disconnect()


async def test_max_packet_size_is_announced_and_a_larger_packet_refused() -> None:
    """Our Maximum Packet Size goes out in CONNECT; a larger packet ends the connection.

    Only the header of the big PUBLISH is sent: the client refuses it from that, with
    DISCONNECT 0x95, instead of waiting to buffer it.
    """
    async with fake_broker() as broker:
        client = broker.client(max_packet_size=1_024, keepalive_s=0)
        side, found = await connected(broker, client)
        assert found[0x27] == 1_024
        side.send(b"\x30" + ref_varint(100_000) + b"\x00\x03a/b")
        with pytest.raises(BrokerUnavailableError) as raised:
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
        assert isinstance(raised.value.__cause__, PacketTooLargeError)
        assert await side.read_until_closed() == b"\xe0\x01\x95"
        assert not client.connected
        await client.disconnect()


async def test_broker_maximum_packet_size_is_obeyed() -> None:
    """A message over the broker's Maximum Packet Size (0x27) is refused, never sent."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0)
        side, _ = await connected(broker, client, props=[(0x27, 200)])
        assert client.server_max_packet_size == 200
        for qos in (0, 1):
            with pytest.raises(PermanentError, match="Maximum Packet Size"):
                await client.publish("t/big", bytes(300), qos=qos)
        await client.publish("t/small", b"ok", qos=0)
        first, body = await side.read_packet()
        assert first == 0x30
        assert topic_of(body) == "t/small"
        assert client.connected
        await client.disconnect()


async def test_unknown_puback_frees_no_send_quota() -> None:
    """A PUBACK for a packet id not in flight is counted and ignored.

    With the broker's Receive Maximum of 1, message B must wait for A's PUBACK; a
    stray PUBACK before must not let it through (a QoS-0 message sent after B starts
    shows the order on the wire).
    """
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0)
        side, _ = await connected(broker, client, props=[(0x21, 1)])
        side.send(ref_packet(4, 0, (4242).to_bytes(2, "big")))
        await until(lambda: client.unknown_acks == 1)
        a = asyncio.create_task(client.publish("t/a", b"a", qos=1))
        first, body = await side.read_packet()
        assert (first, topic_of(body)) == (0x32, "t/a")
        a_id = body[5:7]
        b = asyncio.create_task(client.publish("t/b", b"b", qos=1))
        for _ in range(5):
            await asyncio.sleep(0)
        await client.publish("t/c", b"c", qos=0)
        first, body = await side.read_packet()
        assert (first, topic_of(body)) == (0x30, "t/c")
        assert not a.done()
        assert not b.done()
        side.send(b"\x40\x02" + a_id)
        first, body = await side.read_packet()
        assert (first, topic_of(body)) == (0x32, "t/b")
        side.send(b"\x40\x02" + body[5:7])
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(a, b)
        assert client.unknown_acks == 1
        await client.disconnect()


async def test_qos1_publish_times_out_and_its_late_puback_frees_the_quota() -> None:
    """No PUBACK: publish raises after its timeout; a late PUBACK still frees quota."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0)
        side, _ = await connected(broker, client, props=[(0x21, 1)])
        async with asyncio.timeout(WAIT_S):  # a publish without a timeout fails here
            with pytest.raises(BrokerUnavailableError, match="no PUBACK"):
                await client.publish("t/a", b"a", qos=1, timeout_s=0.2)
        first, body = await side.read_packet()
        assert (first, topic_of(body)) == (0x32, "t/a")
        # Quota is still held by the timed-out message: the next one waits for it.
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(BrokerUnavailableError, match="no PUBACK"):
                await client.publish("t/b", b"b", qos=1, timeout_s=0.2)
        side.send(b"\x40\x02" + body[5:7])
        await client.publish("t/c", b"c", qos=0)
        first, body = await side.read_packet()
        assert topic_of(body) == "t/c"
        publishing = asyncio.create_task(client.publish("t/d", b"d", qos=1))
        first, body = await side.read_packet()
        assert (first, topic_of(body)) == (0x32, "t/d")
        side.send(b"\x40\x02" + body[5:7])
        async with asyncio.timeout(WAIT_S):
            await publishing
        assert client.unknown_acks == 0
        await client.disconnect()


async def test_connect_twice_is_refused() -> None:
    """connect() while connecting or connected raises; after disconnect it may again."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0)
        first = asyncio.create_task(client.connect())
        await asyncio.sleep(0)
        with pytest.raises(MqttUsageError):
            await client.connect()
        side = await broker.next_connection()
        await side.accept()
        async with asyncio.timeout(WAIT_S):
            await first
        with pytest.raises(MqttUsageError):
            await client.connect()
        assert broker.connections.empty()
        await client.disconnect()
        assert await side.read_until_closed() == b"\xe0\x00"
        side, _ = await connected(broker, client)
        assert client.connected
        await client.disconnect()


async def test_lost_session_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Asking to resume a session and getting none raises ``sessions_lost`` and logs."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0, clean_start=False, session_expiry_s=600)
        with caplog.at_level(logging.WARNING, logger="wire.mqtt"):
            await connected(broker, client, session_present=False)
        assert client.sessions_lost == 1
        assert any("no session" in r.getMessage() for r in caplog.records)
        await client.disconnect()
        await connected(broker, client, session_present=True)
        assert client.session_present
        assert client.sessions_lost == 1
        await client.disconnect()
        fresh = broker.client(keepalive_s=0, clean_start=True)
        await connected(broker, fresh, session_present=False)
        assert fresh.sessions_lost == 0
        await fresh.disconnect()


async def test_receive_maximum_is_never_above_max_buffered() -> None:
    """We announce no more messages in flight than we buffer before pausing."""
    async with fake_broker() as broker:
        client = broker.client(keepalive_s=0, receive_maximum=500, max_buffered=10)
        _, found = await connected(broker, client)
        assert found[0x21] == 10
        await client.disconnect()
        client = broker.client(keepalive_s=0, receive_maximum=500, max_buffered=10_000)
        _, found = await connected(broker, client)
        assert found[0x21] == 500
        await client.disconnect()


# -- conformance against mosquitto ---------------------------------------------------


class TunedMosquitto(MosquittoServer):
    """The test broker with extra configuration lines after the rendered ones."""

    def __init__(self, root: Path, *, extra: list[str], **kw: Any) -> None:
        super().__init__(root, **kw)
        self.extra = extra

    def _prepare(self) -> None:
        super()._prepare()
        with self.conf_path.open("a") as conf:
            conf.write("\n".join(["", *self.extra, ""]))


def gateway_client(broker: MosquittoServer, client_id: str, **kw: Any) -> MqttClient:
    """A client of the service user (reads every device topic)."""
    return MqttClient(
        broker.host,
        broker.port,
        client_id=client_id,
        username=GATEWAY_USER,
        password=GATEWAY_PASSWORD,
        **kw,
    )


def device_client(broker: MosquittoServer, device_id: str = DEVICE_IDS[0]) -> MqttClient:
    """A device's client (publishes under its own id)."""
    return MqttClient(
        broker.host,
        broker.port,
        client_id=device_id,
        username=device_id,
        password=device_pw(device_id),
        keepalive_s=0,
    )


TELEMETRY = f"devices/{DEVICE_IDS[0]}/telemetry"


@pytest.fixture
def tuned_mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """mosquitto with max_keepalive 10 (its least) and a Receive Maximum of 3 for its clients."""
    server = TunedMosquitto(
        tmp_path / "mosquitto",
        extra=["max_keepalive 10", "max_inflight_messages 3"],
        users={GATEWAY_USER: GATEWAY_PASSWORD},
        device_ids=DEVICE_IDS,
        fleet_secret=FLEET_SECRET,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_mosquitto_keepalive_while_the_application_reads_nothing(
    tuned_mosquitto: MosquittoServer,
) -> None:
    """mosquitto's Server Keep Alive is used, and a stalled consumer stays connected.

    A client asking for 60 s must use mosquitto's ``max_keepalive`` of 10 s. Then a
    consumer asking for 4 s (mosquitto drops a client silent for 1.5 times that) takes
    nothing while a device floods it past ``max_buffered``: the client keeps pinging and
    reading PINGRESPs, and the connection outlives several keep-alive periods (where the
    old check, on the time of the last byte read, dropped it). The stall is counted in
    keep-alive periods, so the shorter one shows the same in less time.
    """
    broker = tuned_mosquitto
    async with gateway_client(broker, "asks-long", keepalive_s=60) as client:
        assert client.keepalive_s == 10
    async with (
        gateway_client(
            broker, "stalled", keepalive_s=4, receive_maximum=10, max_buffered=10
        ) as client,
        device_client(broker) as device,
    ):
        assert client.keepalive_s == 4
        await client.subscribe(TELEMETRY, qos=0)
        for n in range(3_000):
            await device.publish(TELEMETRY, n.to_bytes(4, "big") * 250)
        await until(lambda: client.pending >= 10)
        before = client.pings_answered
        await until(lambda: client.pings_answered >= before + 4, timeout_s=120)
        assert client.connected
        taken: list[Message] = []
        while len(taken) < 3_000:
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
            taken += client.take(1_000)
        assert [int.from_bytes(m.payload[:4], "big") for m in taken] == list(range(3_000))


async def test_mosquitto_receive_maximum_both_ways(tuned_mosquitto: MosquittoServer) -> None:
    """mosquitto sends at most our Receive Maximum unacknowledged; we obey its own.

    The device's client gets mosquitto's Receive Maximum (3) and publishes 20 QoS-1
    messages through that window. The consumer announced 5: the first delivery stops
    at 5 until it acknowledges. (mosquitto 2.0.11 sends all it queued once PUBACKs
    come, past the window; the client takes that too, so only the first window is
    asserted.)
    """
    broker = tuned_mosquitto
    async with (
        gateway_client(broker, "bounded", receive_maximum=5, keepalive_s=0) as client,
        device_client(broker) as device,
    ):
        assert device.server_receive_maximum == 3
        await client.subscribe(TELEMETRY, qos=1)
        await asyncio.gather(*(device.publish(TELEMETRY, b"%d" % n, qos=1) for n in range(20)))
        await until(lambda: client.pending >= 5)
        await client.ping(WAIT_S)  # whatever mosquitto would send has arrived now
        assert client.pending == 5
        got: list[bytes] = []
        while len(got) < 20:
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
            batch = client.take(100)
            got += [m.payload for m in batch]
            client.ack_many(batch)
        assert sorted(got, key=int) == [b"%d" % n for n in range(20)]
        await client.ping(WAIT_S)
        assert client.pending == 0


async def test_mosquitto_packet_size_both_ways(mosquitto: MosquittoServer) -> None:
    """mosquitto's Maximum Packet Size is obeyed; ours keeps big messages away from us."""
    async with (
        gateway_client(mosquitto, "small", max_packet_size=4_096, keepalive_s=0) as client,
        device_client(mosquitto) as device,
    ):
        assert client.server_max_packet_size == 65_536
        with pytest.raises(PermanentError, match="Maximum Packet Size"):
            await device.publish(TELEMETRY, bytes(70_000), qos=1)
        await client.subscribe(TELEMETRY, qos=1)
        await device.publish(TELEMETRY, bytes(8_000), qos=1)
        await device.publish(TELEMETRY, b"small", qos=1)
        async with asyncio.timeout(WAIT_S):
            await client.wait_messages()
        assert [m.payload for m in client.take(10)] == [b"small"]
        await client.ping(WAIT_S)
        assert client.connected
        assert device.connected


async def test_mosquitto_session_resumption(make_mosquitto: MakeMosquitto) -> None:
    """A stored session resumes with its queue; one the broker lost is counted."""
    broker = make_mosquitto(persistence=False)

    def resuming() -> MqttClient:
        return gateway_client(broker, "resumer", clean_start=False, session_expiry_s=600)

    async with resuming() as client:
        assert client.sessions_lost == 1  # the first connection of the client id
        await client.subscribe(TELEMETRY, qos=1)
    async with device_client(broker) as device:
        await device.publish(TELEMETRY, b"while away", qos=1)
    async with resuming() as client:
        assert client.session_present
        assert client.sessions_lost == 0
        async with asyncio.timeout(WAIT_S):
            await client.wait_messages()
        batch = client.take(10)
        assert [m.payload for m in batch] == [b"while away"]
        client.ack_many(batch)
    await asyncio.to_thread(broker.restart)  # no persistence: the session is gone
    async with resuming() as client:
        assert not client.session_present
        assert client.sessions_lost == 1


async def test_mosquitto_unsubscribe_stops_routing_but_keeps_the_queue(
    mosquitto: MosquittoServer,
) -> None:
    """After UNSUBACK nothing new is routed to the session; what was queued still comes."""

    def member() -> MqttClient:
        return gateway_client(mosquitto, "leaver", clean_start=False, session_expiry_s=600)

    async with member() as client:
        await client.subscribe(TELEMETRY, qos=1)
    async with device_client(mosquitto) as device:
        await device.publish(TELEMETRY, b"queued", qos=1)
        async with member() as client:
            await client.unsubscribe(TELEMETRY)
            await device.publish(TELEMETRY, b"after", qos=1)
            await client.unsubscribe(TELEMETRY)  # no subscription any more: 0x11, no error
            await client.subscribe(f"devices/{DEVICE_IDS[0]}/events", qos=1)
            await device.publish(f"devices/{DEVICE_IDS[0]}/events", b"marker", qos=1)
            got: list[bytes] = []
            async with asyncio.timeout(WAIT_S):
                while b"marker" not in got:
                    await client.wait_messages()
                    batch = client.take(10)
                    client.ack_many(batch)
                    got += [m.payload for m in batch]
    assert got == [b"queued", b"marker"]


async def test_a_publish_gets_its_puback_while_the_consumer_is_full(
    mosquitto: MosquittoServer,
) -> None:
    """A consumer that publishes before it takes more gets its PUBACK all the same.

    The client holds ``max_buffered`` unacknowledged messages, so it stops reading for
    back-pressure; a QoS-1 publish it makes then (the gateway republishing a stored
    batch before acknowledging it) must still read its PUBACK, else neither side moves.
    """
    async with (
        gateway_client(mosquitto, "full", keepalive_s=0, receive_maximum=10, max_buffered=10)
        as client,
        device_client(mosquitto) as device,
    ):  # fmt: skip
        await client.subscribe(TELEMETRY, qos=1)
        for n in range(50):
            await device.publish(TELEMETRY, n.to_bytes(4, "big"), qos=1)
        await until(lambda: client.pending >= 10)
        await client.publish("fleet/partitions/0/x/telemetry", b"again", qos=1, timeout_s=30)
        taken: list[Message] = []
        while len(taken) < 50:
            async with asyncio.timeout(WAIT_S):
                await client.wait_messages()
            batch = client.take(100)
            client.ack_many(batch)
            taken += batch
        assert [int.from_bytes(m.payload, "big") for m in taken] == list(range(50))


async def test_mosquitto_publishes_the_will_on_a_disconnect_that_asks_for_it(
    mosquitto: MosquittoServer,
) -> None:
    """DISCONNECT with reason 0x04 has the broker publish the will; a plain one does not."""
    topic = "fleet/gateways/leaver/state"
    async with gateway_client(mosquitto, "watcher") as watcher:
        await watcher.subscribe(topic, qos=1)
        for asks in (False, True):
            will = Will(topic, b"asked" if asks else b"plain", retain=False)
            async with gateway_client(mosquitto, "leaver", will=will, will_on_disconnect=asks):
                pass
        got: list[bytes] = []
        async with asyncio.timeout(WAIT_S):
            while b"asked" not in got:  # a will of the first would have come before
                await watcher.wait_messages()
                got += [m.payload for m in watcher.take(10)]
        assert got == [b"asked"]


async def test_publish_many_sends_in_order_within_the_send_quota(
    mosquitto: MosquittoServer,
) -> None:
    """Many QoS-1 messages go out in order, never more in flight than the broker allows."""
    async with (
        gateway_client(mosquitto, "reader", keepalive_s=0) as reader,
        gateway_client(mosquitto, "writer", keepalive_s=0) as writer,
    ):
        await reader.subscribe("fleet/many/#", qos=1)
        writer.server_max_packet_size = 200  # as if the broker took no bigger packet
        sends = [(f"fleet/many/{n % 7}", n.to_bytes(4, "big")) for n in range(3_000)]
        sends.insert(10, ("fleet/many/big", bytes(500)))
        outcomes = await writer.publish_many(sends, timeout_s=60)
        assert [i for i, o in enumerate(outcomes) if o is not None] == [10]
        taken: list[Message] = []
        while len(taken) < 3_000:
            async with asyncio.timeout(WAIT_S):
                await reader.wait_messages()
            batch = reader.take(5_000)
            reader.ack_many(batch)
            taken += batch
        assert [int.from_bytes(m.payload, "big") for m in taken] == list(range(3_000))
        assert not writer._publishes  # every packet id given back
