"""The people of the local demo: owners, technicians and their habits (``fixloop up``).

A simulated fleet needs somebody to own it. :func:`seed_people` registers an owner
for every two devices (mixed languages, time zones and consent policies), a few
technicians who between them service every part, and API tokens derived from the
fleet secret (so that ``fixloop up`` can print one that works again next time).
:class:`SimulatedPeople` then plays their part: owners answer consent requests, book
the first slot offered and rate resolved cases; technicians arrive, service the part
on the simulated device and complete the visit. Everything goes through the same
case machine requests as the owner REST API.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import time, timedelta
from typing import Final

from device_sim import FaultName, FleetRunner, faults_for_model
from gateway.errors import ConfigError, PermanentError
from gateway.protocol.credentials import derive
from notifier.actions import CaseActions
from notifier.model import DeviceRecord, Owner, Technician, Window
from notifier.store import CaseStore

__all__ = ["DemoPeople", "SimulatedPeople", "demo_faults", "demo_token", "seed_people"]

_LOG = logging.getLogger(__name__)

_NAMES: Final = (
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Elif",
    "Finn",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kai",
    "Lena",
    "Mila",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sami",
    "Tara",
    "Umut",
)
_PLACES: Final = (("en", "Europe/London"), ("de", "Europe/Berlin"), ("en", "America/New_York"))
_POLICIES: Final = ("ask_if_interrupting", "fix_and_tell", "always_ask")
_WORKDAY: Final = tuple(Window(d, time(8), time(18)) for d in range(6))
_TECHNICIANS: Final = (
    ("tech-1", "Tomasz Nowak", frozenset({"bearing", "drain_pump", "temperature_sensor"})),
    ("tech-2", "Priya Shah", frozenset({"refrigerant_circuit", "temperature_sensor"})),
    ("tech-3", "Lukas Weber", frozenset({"evaporator_coil", "temperature_sensor", "drain_pump"})),
)


def demo_token(fleet_secret: str, principal: str) -> str:
    """The API token of a demo person, derived from the fleet secret (stable across runs)."""
    return derive(fleet_secret, "demo api token", principal).hex()[:40]


@dataclass(frozen=True, slots=True)
class DemoPeople:
    """Who :func:`seed_people` registered.

    Attributes:
        owners: owner ids, in device order.
        technicians: technician ids.
        first_owner_token: an API token of the first owner (for the banner).
    """

    owners: tuple[str, ...]
    technicians: tuple[str, ...]
    first_owner_token: str


async def seed_people(
    store: CaseStore, devices: Sequence[tuple[str, str]], fleet_secret: str
) -> DemoPeople:
    """Register owners for ``(device_id, model)`` pairs, technicians and their tokens.

    Idempotent: a second run with the same devices changes nothing that matters.
    """
    owners: list[str] = []
    for index, (device_id, model) in enumerate(devices):
        number = index // 2
        owner_id = f"owner-{number:04d}"
        if owner_id not in owners:
            owners.append(owner_id)
            language, zone = _PLACES[number % len(_PLACES)]
            await store.put_owner(
                Owner(
                    owner_id,
                    _NAMES[number % len(_NAMES)],
                    language=language,
                    timezone=zone,
                    consent=_POLICIES[number % len(_POLICIES)],
                )
            )
            await store.add_token(demo_token(fleet_secret, owner_id), ("owner", owner_id))
        await store.put_device(
            DeviceRecord(device_id, owner_id, model, label=None, batch=f"B{index % 4 + 1:02d}")
        )
    for technician_id, name, skills in _TECHNICIANS:
        await store.put_technician(
            Technician(technician_id, name, "default", skills, "Europe/Berlin", _WORKDAY)
        )
        await store.add_token(
            demo_token(fleet_secret, technician_id), ("technician", technician_id)
        )
    return DemoPeople(
        tuple(owners),
        tuple(t[0] for t in _TECHNICIANS),
        demo_token(fleet_secret, owners[0]) if owners else "",
    )


#: Faults the demo gives its fleet in turn: mostly remote-curable, some for a technician.
_DEMO_FAULTS: Final[tuple[tuple[FaultName, float | None], ...]] = (
    ("controller_hang", None),
    ("firmware_bug", None),
    ("drain_clog", 6.0),
    ("crash_loop", None),
    ("bearing_wear", 2.0),
    ("refrigerant_leak", 3.0),
)


async def demo_faults(
    runner: FleetRunner,
    *,
    every_s: float = 120.0,
    seed: int = 0,
    first_for: Sequence[str] = (),
) -> None:
    """Give a random device of the live fleet a fault every ``every_s`` seconds, forever.

    Wear faults reach failure in a few hours, so that a demo sees them coming. The first
    fault goes to one of ``first_for`` (the devices of the owner whose token the banner
    prints), so that the owner one tries the API as sees a case of their own.
    """
    rng = random.Random(seed)
    turn = 0
    while True:
        await asyncio.sleep(every_s)
        fault, hours = _DEMO_FAULTS[turn % len(_DEMO_FAULTS)]
        turn += 1
        candidates = [
            d
            for d in runner.fleet.devices
            if fault in faults_for_model(d.model) and not d.active_faults
        ]
        if turn == 1 and first_for:
            candidates = [d for d in candidates if d.device_id in first_for] or candidates
        if not candidates:
            continue
        device = rng.choice(candidates)
        at = runner.fleet.now + timedelta(seconds=5)
        duration = None if hours is None else timedelta(hours=hours)
        runner.fleet.inject(device.device_id, fault, at=at, duration_to_failure=duration)
        _LOG.info("demo: %s on %s from %s", fault, device.device_id, at.isoformat())


class SimulatedPeople:
    """Owners and technicians of the demo, acting on their cases every few seconds.

    Args:
        store: the case store (read).
        actions: the case machine (act).
        runner: the simulated fleet (technicians repair its devices).
        every_s: how often they look at their cases.
        seed: their whims (ratings) are drawn from this.
    """

    def __init__(
        self,
        store: CaseStore,
        actions: CaseActions,
        runner: FleetRunner,
        *,
        every_s: float = 5.0,
        seed: int = 0,
    ) -> None:
        self._store = store
        self._actions = actions
        self._runner = runner
        self._every_s = every_s
        self._rng = random.Random(seed)
        self.acted = 0

    async def run(self) -> None:
        """Act until cancelled."""
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.act_once()
            except PermanentError as exc:
                _LOG.info("a simulated person could not act: %s", exc)

    async def act_once(self) -> int:
        """Answer, book, repair and rate what is waiting; return how many acts."""
        acts = 0
        store, actions = self._store, self._actions
        for case in await store.cases(states=["awaiting_consent"]):
            await actions.accept_fix(case.owner_id, case.case_id)
            acts += 1
        for case in await store.cases(states=["appointment_proposed"]):
            await actions.choose_slot(case.owner_id, case.case_id, 0)
            acts += 1
        for visit in await store.appointments(states=["booked"]):
            visited = await store.get_case(visit.case_id)
            if visited is None or visit.technician_id is None:
                continue
            try:
                await self._runner.repair(visited.device_id, visit.part or "")
            except ConfigError as exc:
                _LOG.info("technician could not service %s: %s", visited.device_id, exc)
            await actions.complete_visit(visit.technician_id, visit.appointment_id, "serviced")
            acts += 1
        for case in await store.cases(states=["resolved"]):
            if case.rating is None and await store.get_rating(case.case_id) is None:
                stars = self._rng.choices((5, 4, 3, 2), weights=(70, 20, 6, 4))[0]
                await actions.rate(case.owner_id, case.case_id, stars)
                acts += 1
        self.acted += acts
        return acts
