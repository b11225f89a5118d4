"""Who adopts a dead member's session: the bookkeeping of wire.adoption, no I/O."""

from __future__ import annotations

from wire.adoption import PeerStates, state_payload, state_topic


def told(peers: PeerStates, instance: str, state: str, now_s: float, by: str | None = None) -> None:
    payload = state_payload(state, "ingest", instance, by=by)  # type: ignore[arg-type]
    peers.note(state_topic("gateways", f"fixloop-gateway-{instance}"), payload, now_s)


def test_the_first_live_member_adopts_one_down_long_enough() -> None:
    a, b = PeerStates("ingest", "a"), PeerStates("ingest", "b")
    for peers in (a, b):
        told(peers, "a" if peers is b else "b", "up", 0.0)
        told(peers, "c", "down", 10.0)
    assert a.due(10.5, 1.0, set()) == []  # not down long enough yet
    assert a.due(11.0, 1.0, set()) == [("c", "fixloop-gateway-c")]
    assert b.due(11.0, 1.0, set()) == []  # a is live and comes first
    assert a.due(11.0, 1.0, {"c"}) == []  # already held


def test_a_member_adopted_by_another_or_back_up_is_left_alone() -> None:
    a = PeerStates("ingest", "a")
    told(a, "c", "adopted", 0.0, by="b")
    told(a, "d", "up", 0.0)
    assert a.due(100.0, 1.0, set()) == []


def test_a_held_session_lost_is_taken_again_only_after_the_grace() -> None:
    a = PeerStates("ingest", "a")
    told(a, "c", "adopted", 0.0, by="a")
    a.released("c", 50.0)  # the connection to c's session ended (c back, or the broker)
    assert a.due(50.5, 1.0, set()) == []
    assert a.due(51.0, 1.0, set()) == [("c", "fixloop-gateway-c")]
    told(a, "c", "up", 50.2)  # it was c coming back
    assert a.due(60.0, 1.0, set()) == []


def test_when_the_first_member_dies_the_next_adopts() -> None:
    b = PeerStates("ingest", "b")
    told(b, "a", "down", 0.0)
    assert b.due(5.0, 1.0, set()) == [("a", "fixloop-gateway-a")]


def test_foreign_malformed_own_and_cleared_states_are_ignored() -> None:
    a = PeerStates("ingest", "a")
    a.note(state_topic("gateways", "x"), state_payload("down", "other-group", "x"), 0.0)
    a.note(state_topic("gateways", "y"), b"not json", 0.0)
    a.note("fleet/gateways/z/retired", state_payload("down", "ingest", "z"), 0.0)
    a.note(
        state_topic("gateways", "w"), b'{"state": "gone", "group": "ingest", "instance": "w"}', 0.0
    )
    told(a, "a", "down", 0.0)  # about ourselves
    assert a.due(100.0, 1.0, set()) == []
    told(a, "c", "down", 0.0)
    a.note(state_topic("gateways", "fixloop-gateway-c"), b"", 1.0)  # retired: its state cleared
    assert a.due(100.0, 1.0, set()) == []


def test_each_role_reads_only_its_own_members_states() -> None:
    gateways = PeerStates("g", "a", "gateways")
    notifiers = PeerStates("g", "a", "notifiers")
    for peers in (gateways, notifiers):
        peers.note(
            state_topic("notifiers", "fixloop-notifier-c"), state_payload("down", "g", "c"), 0.0
        )
    assert gateways.due(100.0, 1.0, set()) == []
    assert notifiers.due(100.0, 1.0, set()) == [("c", "fixloop-notifier-c")]
    assert notifiers.state_filter == "fleet/notifiers/+/state"
