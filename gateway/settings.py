"""Settings of the gateway stage: ingest, spool, validation limits.

Built once by ``fixloop`` from a TOML file and ``FIXLOOP_`` variables and passed to
constructors; nothing here reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wire.protocol.codec import Limits

__all__ = ["GatewaySettings"]

#: Longest client id we make (MQTT 5 lets brokers refuse more than 23; Mosquitto takes 65535).
_MAX_CLIENT_ID = 64


class GatewaySettings(BaseModel):
    """The ingest pipeline (section ``[gateway]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field("fixloop-gateway", min_length=1, max_length=64)
    session_expiry_s: int = Field(7 * 86_400, ge=0, description="broker keeps our queue")
    shared_group: str | None = Field(
        None,
        pattern=r"^[^/+#]+$",
        description="MQTT 5 shared-subscription group to spread load over gateways",
    )
    instance: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,31}$",
        description="this gateway's stable name among several: its session and spool",
    )
    republish_partitions: int = Field(
        0,
        ge=0,
        le=4_096,
        description="republish stored device messages on this many diagnostics partitions"
        " (0: off; diagnostics' partitions must match)",
    )
    adopt_after_s: float | None = Field(
        None,
        gt=0,
        description="with instance: take over a member's session after it died this long",
    )
    batch_max_points: int = Field(5_000, ge=1, le=100_000)
    batch_linger_s: float = Field(0.1, ge=0, le=10)
    max_pending_batches: int = Field(8, ge=1, le=1_000)
    receive_maximum: int = Field(65_535, ge=1, le=65_535)
    spool_dir: Path = Path(".fixloop/spool")
    spool_fsync: bool = True
    spool_max_bytes: int = Field(10 * 2**30, ge=2**20)
    retry_max_s: float = Field(30.0, gt=0)
    stall_after_s: float = Field(
        60.0, gt=0, description="/health is 503 once messages wait this long unstored"
    )
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")
    max_payload_bytes: int = Field(16_384, ge=256, le=1_048_576)
    max_metrics: int = Field(64, ge=1, le=1_000)
    max_age_s: int = Field(35 * 86_400, ge=60, description="backfill window")
    max_future_s: int = Field(300, ge=0)
    max_abs_value: float = Field(1e12, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if self.adopt_after_s is not None and not (self.shared_group and self.instance):
            msg = "adopt_after_s needs shared_group and instance"
            raise ValueError(msg)
        if len(self.session_client_id) > _MAX_CLIENT_ID:
            msg = f"client_id and instance together exceed {_MAX_CLIENT_ID} characters"
            raise ValueError(msg)
        return self

    @property
    def session_client_id(self) -> str:
        """The MQTT client id of this gateway's persistent session.

        ``client_id`` alone for a single gateway; ``client_id-instance`` when the
        gateway is one of several, so each keeps its own session at the broker (two
        clients with one id push each other off) and a restarted instance gets back
        what the broker held for it (README, "Several gateways").
        """
        return f"{self.client_id}-{self.instance}" if self.instance else self.client_id

    @property
    def instance_spool_dir(self) -> Path:
        """This gateway's spool: ``spool_dir``, or ``spool_dir/instance`` for one of several."""
        return self.spool_dir / self.instance if self.instance else self.spool_dir

    def limits(self) -> Limits:
        """Return the validation limits as the codec takes them."""
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            max_metrics=self.max_metrics,
            max_age_ms=self.max_age_s * 1000,
            max_future_ms=self.max_future_s * 1000,
            max_abs_value=self.max_abs_value,
        )
