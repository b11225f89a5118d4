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
from datetime import UTC, datetime, time, timedelta
from typing import Final

from device_sim import FaultName, FaultRecord, FleetRunner, faults_for_model
from notifier.actions import CaseActions
from notifier.model import OPEN_STATES, DeviceRecord, Owner, Technician, Window
from notifier.registry import NewDevice, ProductLine, claim_key
from notifier.store import CaseStore
from wire.errors import ConfigError, PermanentError
from wire.protocol.credentials import derive

__all__ = [
    "HISTORY_FAULTS",
    "LIVE_FAULT",
    "DemoFault",
    "DemoPeople",
    "SimulatedPeople",
    "demo_faults",
    "demo_token",
    "plan_history_faults",
    "seed_people",
]

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
    store: CaseStore, devices: Sequence[tuple[str, str, str]], fleet_secret: str
) -> DemoPeople:
    """Register devices ``(device_id, model, firmware)``, their owners, technicians, tokens.

    Each device is in the registry (its model's product line, serial = device id, region
    ``default``, its firmware and batch, as ``fixloop devices list`` shows it) and
    claimed by its owner. Idempotent: a second run with the same devices changes nothing
    that matters (registered devices keep what the registry learnt since, such as a
    newer firmware).
    """
    await _register_devices(store, devices, fleet_secret)
    owners: list[str] = []
    for index, (device_id, model, firmware) in enumerate(devices):
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
        record = await store.get_device(device_id)
        await store.put_device(
            DeviceRecord(
                device_id,
                owner_id,
                model,
                # what the notifier learnt from boot events since stays
                firmware=firmware if record is None else record.firmware or firmware,
                label=None,
                batch=_batch(index),
            )
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


def _batch(index: int) -> str:
    return f"B{index % 4 + 1:02d}"


async def _register_devices(
    store: CaseStore, devices: Sequence[tuple[str, str, str]], fleet_secret: str
) -> None:
    """Put the demo's devices in the registry, under a product line per model."""
    registry = store.registry()
    now = datetime.now(UTC)
    known = {line.model for line in await registry.product_lines()}
    for model in sorted({model for _, model, _ in devices} - known):
        await registry.put_product_line(ProductLine(model, model, now))
    rows = [
        NewDevice(device_id, model, device_id, firmware=firmware, batch=_batch(index))
        for index, (device_id, model, firmware) in enumerate(devices)
    ]
    outcomes = await registry.register(rows, key=claim_key(fleet_secret), now=now, actor="demo")
    added = sum(1 for outcome in outcomes if outcome.ok)
    if added:
        _LOG.info("demo: %d devices registered (fixloop devices list)", added)


@dataclass(frozen=True, slots=True)
class DemoFault:
    """A fault the demo injects, and how soon after its onset it is a case at the latest.

    Attributes:
        fault: the fault's name.
        lead: device time from onset by which the device has reported it (a margin
            over the simulator's longest delay), so the fault is a case by then.
    """

    fault: FaultName
    lead: timedelta


#: Faults the demo gives its fleet: ones the device reports itself, so each is a case
#: within a known device time of its onset. Slow faults (wear, clogs, leaks) are named
#: by the models only after hours of history and of drift, longer than a demo's replay
#: (measured: in 7 minutes only 1 of 3 injected faults became a case).
#: ``crash_loop``: the watchdog reboots the device 3 to 20 minutes after onset, it boots
#: within a minute; ``firmware_bug``: the first F07 within 2 hours; ``controller_hang``:
#: E90 at the next reading.
HISTORY_FAULTS: Final = (
    DemoFault("crash_loop", timedelta(minutes=25)),
    DemoFault("firmware_bug", timedelta(hours=2, minutes=10)),
    DemoFault("controller_hang", timedelta(minutes=1)),
)
#: The fault given to the live fleet: it is a case one reading after onset, so within
#: seconds at any speed.
LIVE_FAULT: Final = DemoFault("controller_hang", timedelta(minutes=1))
#: Device time between the fleet's start and the first fault, and between two onsets.
_FIRST_AFTER: Final = timedelta(minutes=5)
_SPACING: Final = timedelta(minutes=15)


def plan_history_faults(
    runner: FleetRunner,
    live_from: datetime,
    *,
    first_for: Sequence[str] = (),
    seed: int = 0,
) -> list[FaultRecord]:
    """Inject :data:`HISTORY_FAULTS` into the history the fleet replays before ``live_from``.

    Each goes in only when its lead fits between its onset and ``live_from``, so that it
    is a case by the time the replay reaches the present (a restart that replays only a
    short gap gets fewer, or none). Call before the fleet runs. The first goes to one of
    ``first_for`` (the devices of the owner whose token the banner prints): its case is
    the first one, and that owner sees it.

    Returns:
        The faults injected, in onset order.
    """
    rng = random.Random(seed)
    fleet = runner.fleet
    onset = fleet.now + _FIRST_AFTER
    planned: list[FaultRecord] = []
    taken: set[str] = set()
    for demo in HISTORY_FAULTS:
        if onset + demo.lead > live_from:
            continue
        candidates = [
            d.device_id
            for d in fleet.devices
            if demo.fault in faults_for_model(d.model) and d.device_id not in taken
        ]
        if not planned:
            candidates = [d for d in candidates if d in first_for] or candidates
        if not candidates:
            continue
        device_id = rng.choice(candidates)
        taken.add(device_id)
        planned.append(fleet.inject(device_id, demo.fault, at=onset))
        _LOG.info("demo: %s on %s from %s", demo.fault, device_id, onset.isoformat())
        onset += _SPACING
    return planned


async def demo_faults(
    runner: FleetRunner,
    *,
    every_s: float = 120.0,
    seed: int = 0,
    first_for: Sequence[str] = (),
    store: CaseStore | None = None,
) -> None:
    """Give a device of the live fleet :data:`LIVE_FAULT` every ``every_s`` seconds, forever.

    The device is one without a fault in effect or to come, and (with ``store``)
    without an open case, so that each fault opens a case of its own. The first goes
    to one of ``first_for`` when one of them is free.
    """
    rng = random.Random(seed)
    fault = LIVE_FAULT.fault
    turn = 0
    while True:
        await asyncio.sleep(every_s)
        turn += 1
        busy = (
            set()
            if store is None
            else {case.device_id for case in await store.cases(states=sorted(OPEN_STATES))}
        )
        candidates = [
            d
            for d in runner.fleet.devices
            if fault in faults_for_model(d.model)
            # none in effect or still to come (a record not cured), no open case
            and all(record.cured_at is not None for record in d.records)
            and d.device_id not in busy
        ]
        if turn == 1 and first_for:
            candidates = [d for d in candidates if d.device_id in first_for] or candidates
        if not candidates:
            continue
        device = rng.choice(candidates)
        at = runner.fleet.now + timedelta(seconds=5)
        try:
            runner.fleet.inject(device.device_id, fault, at=at)
        except ConfigError as exc:  # a demo fault is never worth ending the demo for
            _LOG.warning("demo: no fault this time: %s", exc)
            continue
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
