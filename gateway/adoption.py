"""Which dead gateway's session a live one takes over (several gateways, issue 15).

Place in the pipeline: beside the ingest of :mod:`gateway.service`, when gateways run
side by side in a shared group. Mosquitto hands a dead member's messages to no other
member: they wait in its session, and its share of new messages keeps going there
(README, "Several gateways"). So that the others still store them, every gateway of
the group announces its state, retained, on ``fleet/gateways/<client id>/state``:
``up`` once subscribed, and ``down`` through its will, which the broker publishes when
the connection dies (a kill, a crash, a lost network) and, as the gateway asks for it
in its DISCONNECT, on a clean stop too; a retired member's state is cleared. When a
member has been down for ``adopt_after_s``, the first live member by instance name
connects with the dead one's client id, resumes its session (so its unacknowledged
and queued messages and its share of new ones come to the adopter, stored and
acknowledged as its own) and announces it as ``adopted``, with a will saying ``down``
should the adopter die too. When the dead instance comes back under its name, the
broker closes the adopter's connection to that session (a session takeover publishes
no will) and the instance announces ``up`` again.

This module is the bookkeeping only, without I/O: state messages in, decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

__all__ = ["STATE_FILTER", "PeerStates", "state_payload", "state_topic"]

#: Retained state of each gateway of a shared group, by client id.
STATE_FILTER: Final = "fleet/gateways/+/state"

State = Literal["up", "down", "adopted"]
_STATES: Final = frozenset(("up", "down", "adopted"))


def state_topic(client_id: str) -> str:
    """The topic a gateway's state is retained on."""
    return f"fleet/gateways/{client_id}/state"


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
        instance: this gateway's instance name.
    """

    group: str
    instance: str
    _peers: dict[str, _Peer] = field(default_factory=dict)

    def note(self, topic: str, payload: bytes, now_s: float) -> None:
        """Take in a state message (malformed or foreign ones are ignored)."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[:2] != ["fleet", "gateways"] or parts[3] != "state":
            return
        if not payload:  # cleared: the member was retired
            for name in [n for n, p in self._peers.items() if p.client_id == parts[2]]:
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
            self._peers[instance] = _Peer(parts[2], state, by, now_s)

    def released(self, instance: str, now_s: float) -> None:
        """This gateway's hold on ``instance`` ended: wait ``after_s`` before taking it again.

        The hold usually ends because the instance came back (the broker hands its
        session to it); its ``up`` may arrive a moment after, and taking the session
        back meanwhile would push the returning instance off.
        """
        peer = self._peers.get(instance)
        if peer is not None:
            peer.since_s = now_s

    def due(self, now_s: float, after_s: float, adopting: set[str]) -> list[tuple[str, str]]:
        """The members this gateway should adopt now: (instance, client id) pairs.

        A member is due when it has been ``down`` for ``after_s`` (or is marked adopted
        by this gateway, which no longer holds it), and this gateway is the first live
        member by name, so that all live members, seeing the same retained states, pick
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
