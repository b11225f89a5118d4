"""Settings of the simulated fleet (device_sim), read once by ``fixloop`` and passed in.

``fixloop sim`` builds one :class:`SimSettings` from its TOML file and the environment
(prefix ``FIXLOOP_``) and hands it to :func:`device_sim.runner.run_fleet`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from device_sim.faults import MODEL_NAMES
from wire.protocol import Limits, is_valid_device_id

__all__ = ["BACKFILL_WINDOW_S", "SimSettings"]

#: The gateway refuses readings older than this (its backfill window), seconds.
BACKFILL_WINDOW_S: Final = Limits().max_age_ms / 1000


class SimSettings(BaseModel):
    """How to run the simulated fleet.

    Attributes:
        devices: how many devices (1 to 100,000).
        models: product model to relative weight (``{"washer": 2, "fridge": 1}``); a model
            not built in needs its product file in ``product_files``.
        product_files: product files whose ``[simulation]`` section simulates a product.
        seed: device ``i`` draws on ``random.Random(seed + i)``.
        interval_s: sim seconds between two readings of a device (1 to 3600).
        speed: sim seconds per real second, or ``"max"`` to step as fast as the broker
            takes messages. Either way sim time never passes real time: once caught up
            it proceeds at real time.
        duration_s: sim seconds to run, or ``None`` to run until stopped.
        start_offset_s: how far before now sim time starts; ``None`` = ``duration_s``
            (so the run ends about now), or now when running forever. At most the
            gateway's backfill window (35 days): older readings would be refused.
        fault_rate_per_device_month: random faults per device per 30 sim days.
        outage_rate_per_device_month: random connectivity outages per device per 30 days.
        outage_mean_s: mean length of a random outage.
        id_prefix: first part of every device id (``sim`` → ``sim-washer-00000``).
        fleet_secret: the secret device passwords derive from (``fixloop up`` fills it
            in from its data folder; ``fixloop sim`` needs it set).
        mqtt_host: the broker's host.
        mqtt_port: the broker's port.
        mqtt_tls: connect with TLS.
        mqtt_ca_file: CA bundle to verify the broker with (default: the system's).
        connect_concurrency: devices connecting at the same time.
        publish_timeout_s: longest wait for one PUBACK.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: int = Field(default=30, ge=1, le=100_000)
    models: dict[str, float] = Field(default_factory=lambda: {str(m): 1.0 for m in MODEL_NAMES})
    product_files: tuple[Path, ...] = ()
    seed: int = Field(default=0, ge=0)
    interval_s: float = Field(default=10.0, ge=1.0, le=3_600.0)
    speed: float | Literal["max"] = 1.0
    duration_s: float | None = Field(default=None, gt=0.0)
    start_offset_s: float | None = Field(default=None, ge=0.0)
    fault_rate_per_device_month: float = Field(default=0.0, ge=0.0, le=100.0)
    outage_rate_per_device_month: float = Field(default=0.0, ge=0.0, le=1_000.0)
    outage_mean_s: float = Field(default=1_800.0, ge=60.0, le=172_800.0)
    id_prefix: str = "sim"
    fleet_secret: SecretStr | None = None
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65_535)
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    connect_concurrency: int = Field(default=100, ge=1, le=10_000)
    publish_timeout_s: float = Field(default=30.0, gt=0.0)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: dict[str, float]) -> dict[str, float]:
        if any(weight < 0.0 for weight in value.values()):
            raise ValueError("model weights must not be negative")
        if not any(weight > 0.0 for weight in value.values()):
            raise ValueError(f"give at least one of {', '.join(MODEL_NAMES)} a positive weight")
        return value

    @field_validator("speed")
    @classmethod
    def _check_speed(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and not 0.0 < value <= 1_000_000.0:
            raise ValueError("speed must be above 0 and at most 1,000,000 (or 'max')")
        return value

    @field_validator("fleet_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("fleet_secret must be at least 16 characters")
        return value

    @field_validator("id_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if len(value) > 40 or not is_valid_device_id(f"{value}-heatpump-00000"):
            raise ValueError(
                "id_prefix must be up to 40 letters, digits, '_', '.', ':' or '-' "
                "and start with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _check_described(self) -> Self:
        unknown = sorted(set(self.models) - set(MODEL_NAMES))
        if unknown and not self.product_files:
            raise ValueError(
                f"models {unknown} are not built in: give their product files in product_files"
            )
        return self

    @model_validator(mode="after")
    def _check_window(self) -> Self:
        offset = self.effective_start_offset_s
        if offset > BACKFILL_WINDOW_S:
            days = BACKFILL_WINDOW_S / 86_400
            raise ValueError(
                f"sim time would start {offset / 86_400:.1f} days ago, but the gateway refuses "
                f"readings older than {days:.0f} days: shorten duration_s or set start_offset_s"
            )
        return self

    @property
    def effective_start_offset_s(self) -> float:
        """How far before now sim time starts, with the default applied."""
        if self.start_offset_s is not None:
            return self.start_offset_s
        return 0.0 if self.duration_s is None else self.duration_s

    @property
    def pace(self) -> float | None:
        """The clock's speed: a factor, or ``None`` for stepping as fast as possible."""
        return None if self.speed == "max" else float(self.speed)

    @property
    def duration(self) -> timedelta | None:
        """:attr:`duration_s` as a timedelta."""
        return None if self.duration_s is None else timedelta(seconds=self.duration_s)
