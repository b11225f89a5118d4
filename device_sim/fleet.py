"""The simulated fleet's pure core (device_sim): N devices stepped through sim time, no I/O.

:class:`Fleet` builds the devices, steps them to a sim time and returns the MQTT messages
they send, built and checked by the device library (:mod:`device.core`, the code real
appliances run), injects faults and keeps their ground truth, hands commands to devices
and sends technicians. The MQTT runner (:mod:`device_sim.runner`) drives it against a
broker and publishes the devices' outboxes itself; tests and benchmarks drive it
directly. Same seed, same arguments, same calls: identical bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Final

from device_sim.described import SimProduct
from device_sim.device import DEFAULT_FIRMWARE, Outbound, SimDevice
from device_sim.faults import MODEL_NAMES, FaultRecord
from wire.errors import ConfigError

__all__ = ["Fleet", "assign_models", "device_id_for"]

_LOG = logging.getLogger(__name__)
_EVEN_MIX: Final[Mapping[str, float]] = {name: 1.0 for name in MODEL_NAMES}


def _ms(t: datetime) -> int:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ConfigError("sim times must be timezone-aware (UTC)")
    return round(t.timestamp() * 1000)


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def assign_models(count: int, mix: Mapping[str, float], described: Sequence[str] = ()) -> list[str]:
    """Assign product models to ``count`` devices in proportion to ``mix``, interleaved.

    Smooth weighted round robin: every prefix of the fleet follows the mix as closely as
    whole devices allow, so device ``i``'s model does not depend on the fleet size.
    ``described`` are the models simulated from product files, after the built-in ones.

    Raises:
        ConfigError: the mix names an unknown model or has no positive weight.
    """
    known = (*MODEL_NAMES, *(m for m in described if m not in MODEL_NAMES))
    unknown = set(mix) - set(known)
    if unknown:
        raise ConfigError(f"unknown product models {sorted(unknown)}; known: {known}")
    weights = [(name, float(mix.get(name, 0.0))) for name in known]
    weights = [(name, w) for name, w in weights if w > 0.0]
    if not weights:
        raise ConfigError("the model mix needs at least one positive weight")
    total = sum(w for _, w in weights)
    current = dict.fromkeys((name for name, _ in weights), 0.0)
    models: list[str] = []
    for _ in range(count):
        for name, w in weights:
            current[name] += w
        chosen = max(current, key=lambda n: current[n])
        current[chosen] -= total
        models.append(chosen)
    return models


def device_id_for(prefix: str, model: str, index: int) -> str:
    """Return the id of device ``index`` (``sim-washer-00000``)."""
    return f"{prefix}-{model.replace('_', '')}-{index:05d}"


class Fleet:
    """N simulated devices of mixed product models, stepped together through sim time.

    Args:
        devices: how many devices.
        start: the sim time the fleet starts at (UTC-aware).
        models: product model to weight (default: an even mix of all three).
        seed: device ``i`` draws on ``random.Random(seed + i)`` and nothing else.
        interval_s: sim seconds between two readings of a device.
        fault_rate_per_device_month: random faults per device per 30 sim days.
        outage_rate_per_device_month: random connectivity outages per device per 30 days.
        outage_mean_s: mean length of a random outage (at least a minute, at most 2 days).
        id_prefix: first part of every device id.
        firmware: the firmware version the devices start with.
        buffer_limit: messages a device keeps while offline (the oldest go first).
        products: products simulated from their product files' simulation sections
            (:func:`device_sim.described.load_sim_product`); name them in ``models``.
        publish: devices publish their outboxes into the returned messages at once
            (an instant broker); ``False`` leaves that to a transport (the runner), and
            the messages returned are only the links' ``online``/``offline``.

    Raises:
        ConfigError: an argument is out of range.
    """

    def __init__(
        self,
        devices: int = 30,
        *,
        start: datetime,
        models: Mapping[str, float] | None = None,
        seed: int = 0,
        interval_s: float = 10.0,
        fault_rate_per_device_month: float = 0.0,
        outage_rate_per_device_month: float = 0.0,
        outage_mean_s: float = 1_800.0,
        id_prefix: str = "sim",
        firmware: str = DEFAULT_FIRMWARE,
        buffer_limit: int = 20_000,
        products: Sequence[SimProduct] = (),
        publish: bool = True,
    ) -> None:
        if devices < 1:
            raise ConfigError("a fleet needs at least one device")
        if interval_s <= 0.0:
            raise ConfigError("interval_s must be positive")
        start_ms = _ms(start)
        mix = _EVEN_MIX if models is None else models
        described = {product.model: product for product in products}
        self.interval_ms = max(1, round(interval_s * 1000))
        self._now_ms = start_ms
        self._devices: list[SimDevice] = [
            SimDevice(
                device_id_for(id_prefix, model, index),
                index,
                model,
                seed=seed,
                start_ms=start_ms,
                interval_s=interval_s,
                firmware=firmware,
                fault_rate_per_device_month=fault_rate_per_device_month,
                outage_rate_per_device_month=outage_rate_per_device_month,
                outage_mean_s=outage_mean_s,
                buffer_limit=buffer_limit,
                product=described.get(model),
                publish=publish,
            )
            for index, model in enumerate(assign_models(devices, mix, list(described)))
        ]
        self._by_id = {device.device_id: device for device in self._devices}

    # -- state -----------------------------------------------------------------------
    @property
    def devices(self) -> Sequence[SimDevice]:
        """The devices, in index order."""
        return self._devices

    @property
    def device_ids(self) -> list[str]:
        """The device ids, in index order."""
        return [device.device_id for device in self._devices]

    @property
    def now(self) -> datetime:
        """The sim time the fleet has been stepped to."""
        return datetime.fromtimestamp(self._now_ms / 1000, tz=UTC)

    @property
    def now_ms(self) -> int:
        """The sim time the fleet has been stepped to, epoch milliseconds."""
        return self._now_ms

    def device(self, device_id: str) -> SimDevice:
        """Return the device ``device_id``.

        Raises:
            ConfigError: no such device.
        """
        try:
            return self._by_id[device_id]
        except KeyError as exc:
            raise ConfigError(f"no simulated device {device_id!r}") from exc

    def readings_per_device(self) -> dict[str, int]:
        """Telemetry messages each device has published itself (live and backfilled)."""
        return {d.device_id: d.readings_sent for d in self._devices}

    def events_per_device(self) -> dict[str, int]:
        """Event messages each device has published itself (live and backfilled)."""
        return {d.device_id: d.events_sent for d in self._devices}

    def ground_truth(self) -> list[FaultRecord]:
        """Every fault injected so far, by onset then device index."""
        indexed = [(r.onset, d.index, r) for d in self._devices for r in d.records]
        indexed.sort(key=itemgetter(0, 1))
        return [r for _, _, r in indexed]

    # -- time ------------------------------------------------------------------------
    def iter_until(self, t: datetime | int) -> Iterator[list[Outbound]]:
        """Step every device to ``t`` one interval at a time, yielding each interval's messages.

        Each batch holds ``(emit_ms, topic, payload)`` in the order sent (by sim time, then
        device index); ``t`` is a UTC-aware datetime or epoch milliseconds.
        """
        end_ms = t if isinstance(t, int) else _ms(t)
        while self._now_ms < end_ms:
            chunk_end = min(end_ms, self._now_ms + self.interval_ms)
            batch: list[Outbound] = []
            for device in self._devices:
                device.step_until(chunk_end, batch)
            batch.sort(key=itemgetter(0))
            self._now_ms = chunk_end
            yield batch

    def step_until(self, t: datetime | int) -> list[tuple[str, bytes]]:
        """Step every device to ``t`` and return the ``(topic, payload)`` messages sent.

        Messages come in the order sent (by sim time, then device index). Status messages
        (``online``/``offline`` on ``devices/{id}/status``) are included: ``offline``
        stands for the broker publishing the device's last will.
        """
        messages: list[tuple[str, bytes]] = []
        for batch in self.iter_until(t):
            messages += [(topic, payload) for _, topic, payload in batch]
        return messages

    def step(self, duration: timedelta | float) -> list[tuple[str, bytes]]:
        """Step every device ``duration`` (a timedelta or seconds) past :attr:`now`."""
        return self.step_until(self._now_ms + round(_seconds(duration) * 1000))

    def _at(self, at: datetime | None) -> int:
        return self._now_ms if at is None else _ms(at)

    # -- faults, commands, repairs -----------------------------------------------------
    def inject(
        self,
        device_id: str,
        fault: str,
        *,
        at: datetime | None = None,
        duration_to_failure: timedelta | float | None = None,
        value: float | None = None,
    ) -> FaultRecord:
        """Inject ``fault`` into a device and record it as ground truth.

        Args:
            device_id: the device.
            fault: the fault's name (see :data:`device_sim.faults.FAULTS`).
            at: onset (default: :attr:`now`); effects begin at the device's next tick.
            duration_to_failure: onset to failure for a gradual fault (timedelta or
                seconds; default: random within the fault's range); ignored for abrupt ones.
            value: ``sensor_stuck``: the stuck reading (default: the reading at onset);
                ``sensor_drift``: the drift at failure in K (default: ±5 K).

        Returns:
            The ground-truth record as injected (``cured_at`` empty).

        Raises:
            ConfigError: unknown device or fault, a fault the model cannot have, or one
                already in effect.
        """
        duration_s = None if duration_to_failure is None else _seconds(duration_to_failure)
        return self.device(device_id).inject(fault, self._at(at), duration_s, value)

    def schedule_outage(
        self, device_id: str, *, at: datetime | None = None, duration: timedelta | float
    ) -> None:
        """Cut a device's connectivity for ``duration``; it buffers and backfills later."""
        self.device(device_id).schedule_outage(self._at(at), round(_seconds(duration) * 1000))

    def schedule_power_cut(
        self, device_id: str, *, at: datetime | None = None, duration: timedelta | float
    ) -> None:
        """Cut a device's power for ``duration``: a gap, then a boot; its outbox survives."""
        self.device(device_id).schedule_power_cut(self._at(at), round(_seconds(duration) * 1000))

    def send_command(
        self, device_id: str, payload: bytes, *, at: datetime | int | None = None
    ) -> list[tuple[str, bytes]]:
        """Deliver a command payload to a device and return what it sends until it answered.

        The device first steps to ``at`` (default: :attr:`now`; never back in time), so
        the result may hold readings before the ``command_result`` event. A device that
        is offline then answers when it is back (its session holds the command).
        """
        device = self.device(device_id)
        at_ms = at if isinstance(at, int) else self._at(at)
        out: list[Outbound] = []
        device.handle_command(payload, max(at_ms, device.now_ms), out)
        return [(topic, body) for _, topic, body in out]

    def repair(
        self, device_id: str, part: str, *, at: datetime | None = None
    ) -> tuple[list[str], list[tuple[str, bytes]]]:
        """A technician visit: service ``part``; return the cured faults and the messages.

        The technician unplugs the appliance, so the device reboots (reset reason
        ``service``).

        Raises:
            ConfigError: unknown device, or the model has no such part.
        """
        device = self.device(device_id)
        out: list[Outbound] = []
        cured = device.repair(part, max(self._at(at), device.now_ms), out)
        _LOG.info("%s: technician serviced %s, cured %s", device_id, part, cured or "nothing")
        return cured, [(topic, body) for _, topic, body in out]
