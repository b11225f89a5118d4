"""Recorded failures read from the case store for ``fixloop train`` (a real SQLite file)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from diagnostics.lifetimes import Failure
from fixloop.failures import recorded_failures
from notifier.model import Case
from notifier.sqlite import SqliteStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def case(case_id: str, device: str, state: str, **kw: object) -> Case:
    return Case(
        case_id=case_id,
        device_id=device,
        owner_id="owner-1",
        model="heat_pump",
        fault="coil_fouling",
        state=state,  # type: ignore[arg-type]
        urgency="high",
        opened_at=T0,
        updated_at=T0 + timedelta(hours=1),
        **kw,  # type: ignore[arg-type]
    )


async def test_only_cases_resolved_by_a_visit_are_failures(tmp_path: Path) -> None:
    path = tmp_path / "cases.sqlite3"
    fixed = T0 + timedelta(days=2)
    async with SqliteStore(path) as store:
        await store.add_case(case("c1", "hp-1", "resolved", appointment_id="a1", fix_at=fixed))
        await store.add_case(case("c2", "hp-2", "resolved", fix_at=fixed))  # fixed remotely
        await store.add_case(case("c3", "hp-3", "booked", appointment_id="a3"))  # not yet
        await store.add_case(case("c4", "hp-4", "dismissed", appointment_id="a4", fix_at=fixed))
    assert await recorded_failures(path) == [Failure("hp-1", "heat_pump", "coil_fouling", fixed)]


async def test_no_case_store_yet_means_no_failures(tmp_path: Path) -> None:
    assert await recorded_failures(tmp_path / "absent.sqlite3") == []
