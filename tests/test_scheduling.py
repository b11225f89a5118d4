"""The appointment planner: who may come, when, and what the owner is offered."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifier.errors import ConflictError, InvalidRequestError
from notifier.model import Appointment, Owner, Slot, Technician, Urgency, Window
from notifier.scheduling import PlannerConfig, check_bookable, plan_slots, urgency_from
from wire.errors import ConfigError

MONDAY = datetime(2025, 1, 6, tzinfo=UTC)  # a Monday in winter (no DST anywhere near)
H = timedelta(hours=1)
ALL_DAY = tuple(Window(d, time(0), time(0)) for d in range(7))  # 00:00 to midnight
WEEKDAYS = tuple(Window(d, time(8), time(17)) for d in range(5))
#: every candidate, in time order: no spacing, a long offer, nothing preferred
EVERYTHING = PlannerConfig(offer=10_000, spacing_s=0, load_weight=0)
DEFAULT = PlannerConfig()
#: one day from MONDAY 00:00, no lead time
MONDAY_ONLY = replace(EVERYTHING, lead_s=0, horizon_normal_s=86_400)


def tech(
    tech_id: str = "tina",
    *,
    region: str = "north",
    skills: Sequence[str] = ("bearing",),
    timezone: str = "UTC",
    hours: tuple[Window, ...] = WEEKDAYS,
) -> Technician:
    return Technician(tech_id, tech_id.title(), region, frozenset(skills), timezone, hours)


def owner(**kwargs: object) -> Owner:
    base = Owner("ann", "Ann", region="north", quiet_start=None, quiet_end=None)
    return replace(base, **kwargs)  # type: ignore[arg-type]


def visit(tech_id: str, start: datetime, hours: float = 2, state: str = "booked") -> Appointment:
    return Appointment(
        f"a-{tech_id}-{start.isoformat()}",
        "case",
        tech_id,
        start,
        start + timedelta(hours=hours),
        state,  # type: ignore[arg-type]
    )


def plan(
    technicians: Sequence[Technician] = (),
    *,
    booked: Sequence[Appointment] = (),
    who: Owner | None = None,
    part: str | None = "bearing",
    urgency: Urgency = "normal",
    now: datetime = MONDAY,
    failure_at: datetime | None = None,
    exclude: Sequence[Slot] = (),
    config: PlannerConfig = DEFAULT,
) -> list[Slot]:
    return plan_slots(
        technicians=technicians or [tech()],
        booked=booked,
        owner=who or owner(),
        part=part,
        urgency=urgency,
        now=now,
        failure_at=failure_at,
        exclude=exclude,
        config=config,
    )


def starts(slots: Sequence[Slot]) -> list[datetime]:
    return [s.start for s in slots]


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """An instant ``day`` days after MONDAY (UTC)."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute)


def grid(first: datetime, last: datetime) -> list[datetime]:
    out = []
    while first <= last:
        out.append(first)
        first += timedelta(minutes=30)
    return out


# -- who may come ---------------------------------------------------------------------------
def test_only_technicians_of_the_region_with_the_skill() -> None:
    crew = [
        tech("anna", skills=("bearing",)),
        tech("ben", region="south", skills=("bearing",)),
        tech("cleo", skills=("drain_pump",)),
    ]
    config = replace(EVERYTHING, horizon_normal_s=3 * 86_400)
    bearing = {s.technician_id for s in plan(crew, part="bearing", config=config)}
    assert bearing == {"anna"}
    pump = {s.technician_id for s in plan(crew, part="drain_pump", config=config)}
    assert pump == {"cleo"}
    anyone = {s.technician_id for s in plan(crew, part=None, config=config)}
    assert anyone == {"anna", "cleo"}
    assert plan(crew, part="compressor") == []
    assert plan(crew, who=owner(region="east")) == []


def test_a_technician_with_an_unknown_time_zone_is_left_out() -> None:
    crew = [tech("anna", timezone="Mars/Olympus"), tech("ben")]
    assert {s.technician_id for s in plan(crew)} == {"ben"}


def test_an_owner_with_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        plan(who=owner(timezone="Nowhere/Land"))


# -- when -----------------------------------------------------------------------------------
def test_working_hours_and_availability_meet_across_two_time_zones() -> None:
    # New York 09:00-17:00 (UTC-5 in January) is 14:00-22:00 UTC; Berlin 14:00-18:00
    # (UTC+1) is 13:00-17:00 UTC: together 14:00-17:00 UTC, room for 2 h visits
    # starting 14:00, 14:30 and 15:00 UTC.
    ny = tech(timezone="America/New_York", hours=(Window(0, time(9), time(17)),))
    berlin = owner(timezone="Europe/Berlin", availability=(Window(0, time(14), time(18)),))
    config = replace(EVERYTHING, horizon_normal_s=6 * 86_400)
    got = plan([ny], who=berlin, now=MONDAY - timedelta(days=1), config=config)
    assert starts(got) == [at(0, 14), at(0, 14, 30), at(0, 15)]
    assert all(s.end - s.start == 2 * H for s in got)


def test_empty_availability_means_eight_to_eight_owner_local() -> None:
    # Tokyo (UTC+9): 08:00-20:00 local is 23:00-11:00 UTC
    anytime = tech(hours=ALL_DAY)
    tokyo = owner(timezone="Asia/Tokyo")
    got = plan(
        [anytime],
        who=tokyo,
        now=at(0, 10),
        config=replace(EVERYTHING, lead_s=0, horizon_normal_s=86_400),
    )
    assert starts(got) == grid(at(0, 23), at(1, 9))


def test_quiet_hours_over_midnight_are_kept_free() -> None:
    late = owner(quiet_start=time(21), quiet_end=time(6), availability=ALL_DAY)
    config = replace(EVERYTHING, lead_s=0, horizon_normal_s=86_400)
    got = plan([tech(hours=ALL_DAY)], who=late, config=config)
    # 06:00 to 21:00 leaves 2 h visits from 06:00 to 19:00
    assert starts(got) == grid(at(0, 6), at(0, 19))


def test_quiet_hours_within_a_day() -> None:
    nap = owner(quiet_start=time(12), quiet_end=time(14), availability=ALL_DAY)
    config = replace(EVERYTHING, lead_s=0, horizon_normal_s=86_400)
    got = plan([tech(hours=(Window(0, time(8), time(18)),))], who=nap, config=config)
    assert starts(got) == [*grid(at(0, 8), at(0, 10)), *grid(at(0, 14), at(0, 16))]


def test_quiet_hours_follow_the_owner_time_zone() -> None:
    # 22:00-07:00 in New York (UTC-5) is 03:00-12:00 UTC
    ny = owner(
        timezone="America/New_York", availability=ALL_DAY, quiet_start=time(22), quiet_end=time(7)
    )
    config = replace(EVERYTHING, lead_s=0, horizon_normal_s=86_400)
    got = plan([tech(hours=ALL_DAY)], who=ny, config=config)
    assert starts(got) == [*grid(at(0, 0), at(0, 1)), *grid(at(0, 12), at(1, 0))]


def test_a_window_ending_at_midnight() -> None:
    evening = tech(hours=(Window(0, time(20), time(0)),))
    config = MONDAY_ONLY
    got = plan([evening], who=owner(availability=ALL_DAY), config=config)
    assert starts(got) == grid(at(0, 20), at(0, 22))


def test_booked_visits_and_the_gap_after_and_before_them_are_never_offered() -> None:
    monday = tech(hours=(Window(0, time(8), time(17)),))
    config = MONDAY_ONLY
    got = plan([monday], booked=[visit("tina", at(0, 10))], config=config)
    # busy 10:00-12:00 plus 30 min either side: free from 12:30; 08:00 would end 10:00,
    # inside the gap before the visit
    assert starts(got) == grid(at(0, 12, 30), at(0, 15))
    assert all(not (s.start < at(0, 12, 30) and s.end > at(0, 9, 30)) for s in got)


def test_only_booked_visits_hold_time_and_only_their_technician_s() -> None:
    monday = tech(hours=(Window(0, time(8), time(12)),))
    config = MONDAY_ONLY
    others = [
        visit("tina", at(0, 8), 4, state="cancelled"),
        visit("tina", at(0, 8), 4, state="proposed"),
        visit("ben", at(0, 8), 4),
    ]
    assert starts(plan([monday], booked=others, config=config)) == grid(at(0, 8), at(0, 10))


def test_lead_time_and_horizon_follow_urgency() -> None:
    crew = [tech(hours=ALL_DAY)]
    anyone = owner(availability=ALL_DAY)
    now = at(0, 9, 10)
    for urgency, lead_h, horizon_d in (
        ("critical", 2, 2),
        ("high", 6, 5),
        ("normal", 12, 14),
        ("low", 12, 28),
    ):
        got = plan(crew, who=anyone, urgency=urgency, now=now, config=EVERYTHING)  # type: ignore[arg-type]
        assert got, urgency
        assert got[0].start >= now + lead_h * H
        assert got[0].start - (now + lead_h * H) < timedelta(minutes=30)  # first grid step
        assert max(starts(got)) <= now + timedelta(days=horizon_d)
        assert max(starts(got)) > now + timedelta(days=horizon_d) - timedelta(minutes=30)


# -- the predicted failure ------------------------------------------------------------------
def test_slots_end_before_the_predicted_failure() -> None:
    failure = at(1, 15)  # Tuesday 15:00
    got = plan(urgency="high", now=at(0, 6), failure_at=failure, config=EVERYTHING)
    assert got
    assert all(s.end <= failure for s in got)
    assert got[-1].end == failure
    assert all(s.score > 0 for s in got)
    # with margin: of two slots, the one further from the failure scores higher
    assert [s.score for s in got] == sorted((s.score for s in got), reverse=True)


def test_a_technician_in_time_beats_one_only_free_after_the_failure() -> None:
    early = tech("anna", hours=(Window(1, time(8), time(12)),))  # Tuesday
    late = tech("ben", hours=(Window(2, time(8), time(12)),))  # Wednesday
    failure = at(1, 18)
    got = plan([late, early], now=at(0, 6), failure_at=failure, urgency="high")
    assert {s.technician_id for s in got} == {"anna"}
    assert all(s.end <= failure and s.score > 0 for s in got)


def test_nothing_before_the_failure_offers_the_earliest_after_it_with_lower_scores() -> None:
    failure = at(0, 9)  # a visit from now plus the lead time (08:00) would end too late
    got = plan(urgency="critical", now=at(0, 6), failure_at=failure)
    assert got
    assert all(s.score < 0 for s in got)
    assert got[0].start == at(0, 8)  # the earliest start there is (now + 2 h, in hours)
    assert starts(got) == sorted(starts(got))
    # a failure already past is the same
    past = plan(urgency="critical", now=at(0, 6), failure_at=at(0, 5))
    assert past == got


def test_nothing_at_all_gives_nothing() -> None:
    weekend = tech(hours=(Window(5, time(8), time(12)),))
    assert plan([weekend], urgency="critical", now=at(0, 6)) == []
    assert (
        plan_slots(
            technicians=[],
            booked=[],
            owner=owner(),
            part=None,
            urgency="low",
            now=MONDAY,
            failure_at=None,
        )
        == []
    )


# -- the offer ------------------------------------------------------------------------------
def test_offer_is_spaced_not_three_adjacent_steps() -> None:
    got = plan(now=at(0, 6), urgency="critical")
    assert len(got) == 3
    assert all(abs(a.start - b.start) >= 2 * H for a in got for b in got if a is not b)
    # without the spacing rule the best three would be adjacent half hours
    tight = plan(now=at(0, 6), urgency="critical", config=PlannerConfig(spacing_s=0))
    assert starts(tight) == [at(0, 8), at(0, 8, 30), at(0, 9)]
    assert starts(got) == [at(0, 8), at(0, 10), at(0, 12)]
    assert [s.score for s in got] == sorted((s.score for s in got), reverse=True)


def test_other_times_give_new_slots() -> None:
    first = plan(now=at(0, 6), urgency="high")
    second = plan(now=at(0, 6), urgency="high", exclude=first)
    third = plan(now=at(0, 6), urgency="high", exclude=[*first, *second])
    assert first
    assert second
    assert third
    offered = [*first, *second, *third]
    for i, a in enumerate(offered):
        for b in offered[i + 1 :]:
            assert not (a.start < b.end and b.start < a.end), (a, b)


def test_a_declined_time_is_declined_whoever_the_technician() -> None:
    crew = [tech("anna"), tech("ben")]
    first = plan(crew, now=at(0, 6), urgency="critical")
    again = plan(crew, now=at(0, 6), urgency="critical", exclude=first)
    assert again
    assert all(not (a.start < b.end and b.start < a.end) for a in first for b in again)


def test_a_less_busy_technician_gets_the_same_time() -> None:
    busy = tech("anna")
    free = tech("ben")
    booked = [visit("anna", at(0, 15))]  # Monday afternoon, far from the morning
    got = plan([busy, free], booked=booked, now=at(0, 6), urgency="critical")
    assert got[0].start == at(0, 8)
    assert got[0].technician_id == "ben"
    # with no booking the tie goes to the first id
    even = plan([free, busy], now=at(0, 6), urgency="critical")
    assert even[0].technician_id == "anna"


def test_the_same_question_gets_the_same_answer() -> None:
    crew = [
        tech(f"t{i}", timezone=tz)
        for i, tz in enumerate(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"] * 3)
    ]
    booked = [visit(f"t{i}", at(i % 5, 8 + i % 7)) for i in range(12)]
    args = {"booked": booked, "now": at(0, 3), "urgency": "high", "failure_at": at(3, 12)}
    first = plan(crew, **args)  # type: ignore[arg-type]
    assert first
    shuffled = list(crew)
    random.Random(7).shuffle(shuffled)
    assert plan(shuffled, **args) == first  # type: ignore[arg-type]
    assert plan(crew, **args) == first  # type: ignore[arg-type]


def test_slots_are_utc() -> None:
    got = plan([tech(timezone="Europe/Berlin")], now=at(0, 6))
    assert got
    assert all(s.start.tzinfo is UTC and s.end.tzinfo is UTC for s in got)


# -- daylight saving ------------------------------------------------------------------------
BERLIN = ZoneInfo("Europe/Berlin")


def berlin_plan(now: datetime, hours: tuple[Window, ...]) -> list[Slot]:
    crew = [tech(timezone="Europe/Berlin", hours=hours)]
    who = owner(timezone="Europe/Berlin", availability=ALL_DAY)
    return plan(
        crew, who=who, now=now, config=replace(EVERYTHING, lead_s=0, horizon_normal_s=4 * 86_400)
    )


def test_spring_forward_keeps_working_hours_in_local_time() -> None:
    # Sunday 30 March 2025: 02:00 CET becomes 03:00 CEST
    got = berlin_plan(
        datetime(2025, 3, 28, tzinfo=UTC), tuple(Window(d, time(8), time(10)) for d in range(7))
    )
    assert starts(got) == [
        datetime(2025, 3, 28, 7, tzinfo=UTC),  # Friday 08:00 CET
        datetime(2025, 3, 29, 7, tzinfo=UTC),  # Saturday 08:00 CET
        datetime(2025, 3, 30, 6, tzinfo=UTC),  # Sunday 08:00 CEST
        datetime(2025, 3, 31, 6, tzinfo=UTC),  # Monday 08:00 CEST
    ]
    assert all(s.start.astimezone(BERLIN).time() == time(8) for s in got)


def test_fall_back_keeps_working_hours_in_local_time() -> None:
    # Sunday 26 October 2025: 03:00 CEST becomes 02:00 CET
    got = berlin_plan(
        datetime(2025, 10, 24, tzinfo=UTC), tuple(Window(d, time(8), time(10)) for d in range(7))
    )
    assert starts(got) == [
        datetime(2025, 10, 24, 6, tzinfo=UTC),  # Friday 08:00 CEST
        datetime(2025, 10, 25, 6, tzinfo=UTC),  # Saturday 08:00 CEST
        datetime(2025, 10, 26, 7, tzinfo=UTC),  # Sunday 08:00 CET
        datetime(2025, 10, 27, 7, tzinfo=UTC),  # Monday 08:00 CET
    ]


def test_a_window_over_the_spring_change_is_an_hour_shorter() -> None:
    # 01:00-05:00 on the change day is 00:00-03:00 UTC: three real hours
    got = berlin_plan(datetime(2025, 3, 29, 12, tzinfo=UTC), (Window(6, time(1), time(5)),))
    day = datetime(2025, 3, 30, tzinfo=UTC)
    assert starts(got) == [day, day + timedelta(minutes=30), day + H]


def test_a_window_over_the_fall_change_is_an_hour_longer() -> None:
    # 01:00-05:00 on the change day is 23:00 (Saturday) to 04:00 UTC: five real hours
    got = berlin_plan(datetime(2025, 10, 25, 12, tzinfo=UTC), (Window(6, time(1), time(5)),))
    assert starts(got) == grid(
        datetime(2025, 10, 25, 23, tzinfo=UTC), datetime(2025, 10, 26, 2, tzinfo=UTC)
    )


def test_window_edges_in_the_gap_or_the_repeat_are_taken_inward() -> None:
    # spring: 02:30 does not exist; a window 02:30-06:00 starts at 03:30 CEST (01:30 UTC)
    spring = berlin_plan(datetime(2025, 3, 29, 12, tzinfo=UTC), (Window(6, time(2, 30), time(6)),))
    assert spring[0].start == datetime(2025, 3, 30, 1, 30, tzinfo=UTC)
    # fall: 02:30 happens twice; a window 02:30-06:00 starts at the second (01:30 UTC)
    fall = berlin_plan(datetime(2025, 10, 25, 12, tzinfo=UTC), (Window(6, time(2, 30), time(6)),))
    assert fall[0].start == datetime(2025, 10, 26, 1, 30, tzinfo=UTC)
    # and a window 00:00-02:30 ends at the first 02:30 (00:30 UTC)
    early = berlin_plan(datetime(2025, 10, 25, 12, tzinfo=UTC), (Window(6, time(0), time(2, 30)),))
    assert early[-1].end == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)


def test_quiet_hours_on_a_dst_day_stay_in_local_time() -> None:
    # quiet until 07:00 local: 06:00 UTC before the spring change, 05:00 UTC after it
    crew = [tech(timezone="Europe/Berlin", hours=ALL_DAY)]
    who = owner(
        timezone="Europe/Berlin", availability=ALL_DAY, quiet_start=time(22), quiet_end=time(7)
    )
    got = plan(
        crew,
        who=who,
        now=datetime(2025, 3, 29, tzinfo=UTC),
        config=replace(EVERYTHING, lead_s=0, horizon_normal_s=2 * 86_400),
    )
    firsts = sorted({s.start.date(): s.start for s in reversed(got)}.values())
    assert firsts[:2] == [
        datetime(2025, 3, 29, 6, tzinfo=UTC),
        datetime(2025, 3, 30, 5, tzinfo=UTC),
    ]
    assert all(time(7) <= s.start.astimezone(BERLIN).time() for s in got)
    assert all(s.end.astimezone(BERLIN).time() <= time(22) for s in got)


# -- urgency --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("left", "expected"),
    [
        (timedelta(days=-1), "critical"),
        (timedelta(0), "critical"),
        (timedelta(days=2) - timedelta(seconds=1), "critical"),
        (timedelta(days=2), "high"),
        (timedelta(days=7) - timedelta(seconds=1), "high"),
        (timedelta(days=7), "normal"),
        (timedelta(days=30) - timedelta(seconds=1), "normal"),
        (timedelta(days=30), "low"),
        (timedelta(days=400), "low"),
    ],
)
def test_urgency_from_time_to_failure(left: timedelta, expected: str) -> None:
    assert urgency_from(MONDAY + left, MONDAY) == expected


def test_urgency_unknown_failure_and_safety() -> None:
    assert urgency_from(None, MONDAY) == "normal"
    assert urgency_from(None, MONDAY, safety=True) == "critical"
    assert urgency_from(MONDAY + timedelta(days=300), MONDAY, safety=True) == "critical"


def test_urgency_wants_aware_times() -> None:
    with pytest.raises(InvalidRequestError):
        urgency_from(datetime(2025, 1, 6), MONDAY)
    with pytest.raises(InvalidRequestError):
        plan(now=datetime(2025, 1, 6))


# -- booking time ---------------------------------------------------------------------------
def test_check_bookable_refuses_a_slot_taken_meanwhile() -> None:
    tina = tech()
    slot = Slot("tina", at(0, 10), at(0, 12))
    check_bookable(slot, tina, [], PlannerConfig())
    with pytest.raises(ConflictError):
        check_bookable(slot, tina, [visit("tina", at(0, 11))], PlannerConfig())
    # inside the travel gap is a conflict too, past it is not
    with pytest.raises(ConflictError):
        check_bookable(slot, tina, [visit("tina", at(0, 12, 15))], PlannerConfig())
    check_bookable(slot, tina, [visit("tina", at(0, 12, 30))], PlannerConfig())
    check_bookable(slot, tina, [visit("tina", at(0, 7, 30))], PlannerConfig())
    # others' visits and cancelled ones do not count
    check_bookable(
        slot,
        tina,
        [visit("ben", at(0, 10)), visit("tina", at(0, 10), state="cancelled")],
        PlannerConfig(),
    )


def test_check_bookable_refuses_a_slot_outside_working_hours() -> None:
    tina = tech()
    with pytest.raises(InvalidRequestError):
        check_bookable(Slot("tina", at(0, 16), at(0, 18)), tina, [], PlannerConfig())
    with pytest.raises(InvalidRequestError):
        check_bookable(Slot("tina", at(5, 10), at(5, 12)), tina, [], PlannerConfig())  # Saturday
    with pytest.raises(InvalidRequestError):
        check_bookable(Slot("ben", at(0, 10), at(0, 12)), tina, [], PlannerConfig())
    with pytest.raises(InvalidRequestError):
        check_bookable(Slot("tina", at(0, 12), at(0, 10)), tina, [], PlannerConfig())


def test_a_booked_offer_is_not_offered_again_and_passes_the_check_before() -> None:
    got = plan(now=at(0, 6), urgency="critical")
    tina = tech()
    for slot in got:
        check_bookable(slot, tina, [], PlannerConfig())
    booked = [visit("tina", got[0].start)]
    with pytest.raises(ConflictError):
        check_bookable(got[0], tina, booked, PlannerConfig())
    again = plan(now=at(0, 6), urgency="critical", booked=booked)
    assert got[0].start not in starts(again)
    for slot in again:
        check_bookable(slot, tina, booked, PlannerConfig())


# -- settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"visit_s": 0},
        {"step_s": -1},
        {"offer": 0},
        {"horizon_low_s": float("nan")},
        {"lead_s": -1},
        {"min_gap_s": -5},
        {"day_start": time(20), "day_end": time(8)},
    ],
)
def test_config_refuses_nonsense(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PlannerConfig(**bad)  # type: ignore[arg-type]


# -- properties -----------------------------------------------------------------------------
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]
#: instants around both 2025 Berlin and New York DST changes, and plain weeks
STARTS = [
    datetime(2025, 1, 6, tzinfo=UTC),
    datetime(2025, 3, 7, tzinfo=UTC),
    datetime(2025, 3, 27, tzinfo=UTC),
    datetime(2025, 4, 4, tzinfo=UTC),
    datetime(2025, 10, 24, tzinfo=UTC),
    datetime(2025, 10, 31, tzinfo=UTC),
]

half_hours = st.integers(min_value=0, max_value=47).map(lambda n: time(n // 2, 30 * (n % 2)))


@st.composite
def windows(draw: st.DrawFn) -> tuple[Window, ...]:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, 44))
        end = draw(st.integers(start + 1, 48))
        out.append(
            Window(
                draw(st.integers(0, 6)),
                time(start // 2, 30 * (start % 2)),
                time(0) if end == 48 else time(end // 2, 30 * (end % 2)),
            )
        )
    return tuple(out)


def wall_inside(instant: datetime, zone: ZoneInfo, spans: Sequence[Window]) -> bool:
    local = instant.astimezone(zone)
    wall = local.time().replace(tzinfo=None)
    for w in spans:
        if w.weekday != local.weekday():
            continue
        if w.start <= wall and (w.end == time(0) or wall < w.end):
            return True
    return False


def wall_quiet(instant: datetime, zone: ZoneInfo, start: time, end: time) -> bool:
    wall = instant.astimezone(zone).time().replace(tzinfo=None)
    if start == end:
        return False
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end


def samples(slot: Slot) -> list[datetime]:
    points = []
    t = slot.start
    while t < slot.end:
        points.append(t)
        t += timedelta(minutes=5)
    return [*points, slot.end - timedelta(seconds=1)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    base=st.sampled_from(STARTS),
    offset_min=st.integers(0, 7 * 24 * 60),
    urgency=st.sampled_from(["critical", "high", "normal", "low"]),
)
def test_planned_slots_keep_every_rule(
    data: st.DataObject, base: datetime, offset_min: int, urgency: Urgency
) -> None:
    now = base + timedelta(minutes=offset_min)
    crew = [
        tech(
            f"t{i}",
            skills=data.draw(st.sampled_from([("bearing",), ("drain_pump",), ("bearing", "x")])),
            timezone=data.draw(st.sampled_from(ZONES)),
            hours=data.draw(st.one_of(windows(), st.sampled_from([WEEKDAYS, ALL_DAY]))),
            region=data.draw(st.sampled_from(["north", "north", "south"])),
        )
        for i in range(data.draw(st.integers(1, 4)))
    ]
    booked = [
        visit(
            f"t{data.draw(st.integers(0, len(crew) - 1))}",
            now + timedelta(minutes=15 * data.draw(st.integers(-8, 4 * 24 * 4))),
            hours=data.draw(st.sampled_from([0.5, 1, 2, 3])),
        )
        for _ in range(data.draw(st.integers(0, 25)))
    ]
    quiet = data.draw(st.one_of(st.none(), st.tuples(half_hours, half_hours)))
    who = owner(
        timezone=data.draw(st.sampled_from(ZONES)),
        availability=data.draw(st.one_of(windows(), st.just(()))),
        quiet_start=None if quiet is None else quiet[0],
        quiet_end=None if quiet is None else quiet[1],
    )
    failure_at = data.draw(
        st.one_of(st.none(), st.integers(-24, 30 * 24).map(lambda h: now + timedelta(hours=h)))
    )
    config = PlannerConfig()
    got = plan(
        crew, booked=booked, who=who, urgency=urgency, now=now, failure_at=failure_at, config=config
    )
    again = plan(
        list(reversed(crew)),
        booked=booked,
        who=who,
        urgency=urgency,
        now=now,
        failure_at=failure_at,
        config=config,
    )
    assert got == again

    by_id = {t.technician_id: t for t in crew}
    owner_zone = ZoneInfo(who.timezone)
    availability = who.availability or tuple(Window(d, time(8), time(20)) for d in range(7))
    gap = timedelta(seconds=config.min_gap_s)
    assert len(got) <= config.offer
    assert [s.score for s in got] == sorted((s.score for s in got), reverse=True)
    for slot in got:
        technician = by_id[slot.technician_id]
        assert technician.region == "north"
        assert "bearing" in technician.skills
        assert slot.end - slot.start == timedelta(seconds=config.visit_s)
        assert now + config.lead_for(urgency) <= slot.start <= now + config.horizon_for(urgency)
        tech_zone = ZoneInfo(technician.timezone)
        for point in samples(slot):
            assert wall_inside(point, tech_zone, technician.hours), (slot, point)
            assert wall_inside(point, owner_zone, availability), (slot, point)
            if quiet is not None:
                assert not wall_quiet(point, owner_zone, *quiet), (slot, point)
        for other in booked:
            if other.technician_id != slot.technician_id:
                continue
            assert other.start is not None
            assert other.end is not None
            assert slot.end + gap <= other.start or other.end + gap <= slot.start
        check_bookable(slot, technician, booked, config)
        if failure_at is not None:
            assert (slot.score > 0) == (slot.end <= failure_at)
    for i, a in enumerate(got):
        for b in got[i + 1 :]:
            assert abs(a.start - b.start) >= timedelta(seconds=config.spacing_s)
    if failure_at is not None and any(s.score > 0 for s in got):
        assert all(s.score > 0 for s in got)  # slots after the failure only when none before

    # asking for other times never repeats one
    others = plan(
        crew,
        booked=booked,
        who=who,
        urgency=urgency,
        now=now,
        failure_at=failure_at,
        exclude=got,
        config=config,
    )
    for a in got:
        for b in others:
            assert not (a.start < b.end and b.start < a.end)
