"""A live member of a shared group takes over a dead member's session (session adoption).

Place in the pipeline: beside a service's persistent, shared subscription, when
instances run side by side in an MQTT 5 shared group (the gateways' ingest, the
notifiers' diagnoses). Mosquitto hands a dead member's messages to no other member:
they wait in its session, and its share of new messages keeps going there (README,
"Several gateways", "Several notifiers"). So that the others still handle them, every
member of the group announces its state, retained, on
``fleet/<role>/<client id>/state`` (``role`` is ``gateways`` or ``notifiers``): ``up``
once subscribed, and ``down`` through its will, which the broker publishes when the
connection dies (a kill, a crash, a lost network) and, as the member asks for it in its
DISCONNECT, on a clean stop too; a retired member's state is cleared. When a member has
been down for ``after_s``, the first live member by instance name connects with the dead
one's client id, resumes its session (so its unacknowledged and queued messages and its
share of new ones come to the adopter, handled and acknowledged as its own) and
announces it as ``adopted``, with a will saying ``down`` should the adopter die too. When
the dead instance comes back under its name, the broker closes the adopter's connection
to that session (a session takeover publishes no will) and the instance announces ``up``
again.

:class:`PeerStates` is the bookkeeping, without I/O: state messages in, decisions out.
:class:`SessionAdoption` is the part a service runs: the wills, the announcements and a
task per adopted session, which reads it with the service's own consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from wire.errors import BrokerUnavailableError, ConfigError, PermanentError, TransientError
from wire.mqtt import MqttClient, Will

__all__ = ["PeerStates", "SessionAdoption", "State", "state_payload", "state_topic"]

_LOG = logging.getLogger(__name__)

State = Literal["up", "down", "adopted"]
_STATES: Final = frozenset(("up", "down", "adopted"))


def state_topic(role: str, client_id: str) -> str:
    """The topic a member's state is retained on (``role``: ``gateways``, ``notifiers``)."""
    return f"fleet/{role}/{client_id}/state"


def state_payload(state: State, group: str, instance: str, by: str | None = None) -> bytes:
    """A state message: who, in which group, and for ``adopted`` by whom."""
    body: dict[str, str] = {"state": state, "group": group, "instance": instance}
    if by is not None:
        body["by"] = by
    return orjson.dumps(body)


@dataclass(slots=True)
class _Peer:
    client_id: str
    state: State
    by: str | None
    since_s: float


@dataclass(slots=True)
class PeerStates:
    """The group's members as their state messages tell, and who should adopt whom.

    Args:
        group: the shared group; state messages of other groups are ignored.
        instance: this member's instance name.
        role: the members' kind, the second level of their state topics
            (``fleet/<role>/<client id>/state``).
    """

    group: str
    instance: str
    role: str = "gateways"
    _peers: dict[str, _Peer] = field(default_factory=dict)

    @property
    def state_filter(self) -> str:
        """The topic filter of every member's retained state."""
        return f"fleet/{self.role}/+/state"

    def state_topic(self, client_id: str) -> str:
        """The topic a member's state is retained on."""
        return state_topic(self.role, client_id)

    def is_state(self, topic: str) -> bool:
        """Whether ``topic`` is a member's state topic of this role."""
        parts = topic.split("/")
        return len(parts) == 4 and parts[:2] == ["fleet", self.role] and parts[3] == "state"

    def note(self, topic: str, payload: bytes, now_s: float) -> None:
        """Take in a state message (malformed or foreign ones are ignored)."""
        if not self.is_state(topic):
            return
        client_id = topic.split("/")[2]
        if not payload:  # cleared: the member was retired
            for name in [n for n, p in self._peers.items() if p.client_id == client_id]:
                del self._peers[name]
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict) or body.get("group") != self.group:
            return
        instance, state, by = body.get("instance"), body.get("state"), body.get("by")
        if not isinstance(instance, str) or state not in _STATES or instance == self.instance:
            return
        known = self._peers.get(instance)
        by = by if isinstance(by, str) else None
        if known is None or known.state != state or known.by != by:
            self._peers[instance] = _Peer(client_id, state, by, now_s)

    def released(self, instance: str, now_s: float) -> None:
        """This member's hold on ``instance`` ended: wait ``after_s`` before taking it again.

        The hold usually ends because the instance came back (the broker hands its
        session to it); its ``up`` may arrive a moment after, and taking the session
        back meanwhile would push the returning instance off.
        """
        peer = self._peers.get(instance)
        if peer is not None:
            peer.since_s = now_s

    def due(self, now_s: float, after_s: float, adopting: set[str]) -> list[tuple[str, str]]:
        """The members this one should adopt now: (instance, client id) pairs.

        A member is due when it has been ``down`` for ``after_s`` (or is marked adopted
        by this member, which no longer holds it), and this member is the first live
        one by name, so that all live members, seeing the same retained states, pick
        the same adopter.
        """
        live = [name for name, peer in self._peers.items() if peer.state == "up"]
        if min([*live, self.instance]) != self.instance:
            return []
        return [
            (name, peer.client_id)
            for name, peer in sorted(self._peers.items())
            if name not in adopting
            and (peer.state == "down" or (peer.state == "adopted" and peer.by == self.instance))
            and now_s - peer.since_s >= after_s
        ]


class SessionAdoption:
    """Announce this member's state and hold dead members' sessions; :meth:`run` it.

    The service subscribes its own session to :attr:`state_filter` too, gives every
    message it receives (on its session or an adopted one) to :meth:`note` first, builds
    its own client with :meth:`own_client` (its will says ``down``), and tells
    :meth:`connected` and :meth:`lost`.

    Args:
        role: the members' kind (``gateways``, ``notifiers``): their state topics.
        group: the shared group.
        instance: this member's instance name.
        client_id: this member's session client id.
        after_s: how long a member stays down before it is adopted.
        new_client: builds an unconnected client for a session (client id) with a will,
            as the service builds its own (persistent session, same limits).
        consume: reads an adopted session's messages as the service reads its own;
            returns or raises when the connection ends.
        on_hold: called with 1 when a hold on a dead member's session starts and with
            -1 when it ends (a service's own metrics), besides :attr:`held`.
    """

    def __init__(
        self,
        *,
        role: str,
        group: str,
        instance: str,
        client_id: str,
        after_s: float,
        new_client: Callable[[str, Will], MqttClient],
        consume: Callable[[MqttClient], Coroutine[Any, Any, None]],
        on_hold: Callable[[int], None] | None = None,
    ) -> None:
        self.peers = PeerStates(group, instance, role)
        self._client_id = client_id
        self._after_s = after_s
        self._new_client = new_client
        self._consume = consume
        self._on_hold = on_hold
        #: instances whose sessions this member holds now
        self._adopting: set[str] = set()
        self._client: MqttClient | None = None
        self._announce = asyncio.Event()  # a new connection: say "up" at once
        #: sessions of dead members held now, and takeovers so far
        self.held = 0
        self.adoptions = 0

    @property
    def state_filter(self) -> str:
        """What the service's own session subscribes to besides its messages."""
        return self.peers.state_filter

    def state_topic(self, client_id: str | None = None) -> str:
        """Where a member's state is retained (this member's by default)."""
        return self.peers.state_topic(client_id or self._client_id)

    def will(self, client_id: str | None = None, instance: str | None = None) -> Will:
        """The broker says ``down`` for us (or for the member we hold) if we die."""
        peers = self.peers
        down = state_payload("down", peers.group, instance or peers.instance)
        return Will(self.state_topic(client_id), down)

    def own_client(self) -> MqttClient:
        """A client for this member's own session, its will saying ``down``."""
        return self._new_client(self._client_id, self.will())

    def note(self, topic: str, payload: bytes) -> bool:
        """Take in a message if it is a member's state; whether it was one."""
        if not self.peers.is_state(topic):
            return False
        self.peers.note(topic, payload, time.monotonic())
        return True

    def connected(self, client: MqttClient) -> None:
        """The service's own session is subscribed on ``client``: announce ``up``."""
        self._client = client
        self._announce.set()

    def lost(self) -> None:
        """The service's own connection ended."""
        self._client = None

    def _hold(self, change: int) -> None:
        self.held += change
        if change > 0:
            self.adoptions += 1
        if self._on_hold is not None:
            self._on_hold(change)

    async def run(self) -> None:
        """Announce that we are up; adopt members that died, until cancelled."""
        peers = self.peers
        after_s = self._after_s
        up = state_payload("up", peers.group, peers.instance)
        announced: MqttClient | None = None
        async with asyncio.TaskGroup() as tasks:
            while True:
                try:
                    async with asyncio.timeout(min(1.0, after_s / 2)):
                        await self._announce.wait()
                except TimeoutError:
                    pass
                self._announce.clear()
                client = self._client
                if client is None:
                    continue
                if client is not announced:
                    try:
                        await client.publish(self.state_topic(), up, qos=1, retain=True)
                    except BrokerUnavailableError:
                        continue
                    announced = client
                for instance, client_id in peers.due(time.monotonic(), after_s, self._adopting):
                    self._adopting.add(instance)
                    tasks.create_task(self._adopt(instance, client_id), name=f"adopt-{client_id}")

    async def _adopt(self, instance: str, client_id: str) -> None:
        """Hold a dead member's session: handle and acknowledge its messages as ours.

        Ends when the connection does: the member came back under its name (the broker
        hands it its session) or the broker went away.
        """
        peers = self.peers
        client = self._new_client(client_id, self.will(client_id, instance))
        adopted = state_payload("adopted", peers.group, instance, by=peers.instance)
        holding = False
        try:
            async with client:
                holding = True
                self._hold(1)
                _LOG.warning(
                    "%s is down: %s holds its session until it is back", client_id, self._client_id
                )
                await client.publish(self.state_topic(client_id), adopted, qos=1, retain=True)
                await self._consume(client)
        except TransientError as exc:  # the broker or the service's store went away
            _LOG.warning("%s's session is no longer held here: %s", client_id, exc)
        except (ConfigError, PermanentError) as exc:
            _LOG.error("cannot hold %s's session: %s", client_id, exc)
        finally:
            if holding:
                self._hold(-1)
            self._adopting.discard(instance)
            peers.released(instance, time.monotonic())
