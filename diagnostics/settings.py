"""Settings of the diagnostics stage (section ``[diagnostics]``), passed in by ``fixloop``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["DiagnosticsSettings"]


class DiagnosticsSettings(BaseModel):
    """The diagnostics service and ``fixloop train``.

    Attributes:
        client_id: MQTT client id (fixed: the broker keeps a session for it).
        session_expiry_s: how long the broker keeps the session while the service is away.
        shared_group: MQTT 5 shared-subscription group to spread devices over workers.
        model_path: where ``fixloop train`` saves the fleet models and the service loads
            them; without a file the service scores with per-device baselines only.
        batch_max: most messages handled in one step.
        write_scores: write each reading's scores to InfluxDB (measurement ``health``).
        train_days: how much history ``fixloop train`` reads from InfluxDB.
        train_window_s: the span of one InfluxDB query while training.
        train_sample: share of healthy updates kept as training rows.
        products_dir: a folder of product files (``*.toml``) next to the built-in ones; a
            file there may describe a new model or override a built-in one. Read at start.
        generic_scoring: how metrics no product file describes are scored: ``detector``
            (the default: the detector core of ``fixloop detect``) or ``baseline``
            (streaming levels against the device's baseline).
        lifetime_backfill: at start, fill the hourly means the learnt remaining-life
            models read from the last ``train_days`` of telemetry in InfluxDB.
        metrics_host: where ``fixloop diagnostics`` serves ``/metrics`` and ``/health``
            (``0.0.0.0`` in a container, so the compose network can scrape it).
        metrics_port: their port (0: a free one).
        partitions: spread the devices over this many partitions, each handled by one
            worker at a time (:mod:`diagnostics.partition`); the gateway's
            ``republish_partitions`` must be the same. 0 (the default): no partitions,
            the service reads the device topics itself.
        lease_url: PostgreSQL database of the partitions' leases and checkpoints
            (``postgresql://user:password@host/db``), for several workers; without it one
            worker holds every partition and keeps its checkpoints in memory.
        lease_ttl_s: how long a partition's lease lasts unrenewed (renewed every third
            of it, at least every 5 s): a dead worker's partitions move after about
            this long.
        checkpoint_every_s: how often a partition's state is checkpointed (and the
            messages it covers acknowledged): a partition that moves replays this much.
        checkpoint_max_messages: a checkpoint at the latest after this many messages of
            a partition. Mosquitto sends a backlog on as the earlier messages are
            acknowledged, so this paces a partition's catch-up (``bench/partitions.py``).
        reorder_hold_s: a partition holds each device item this long after it arrived
            and scores a device's held items in ``(ts, seq)`` order, so that readings
            reaching the partition out of order through different gateways are scored
            in order (:mod:`diagnostics.partition`). 0: no hold.
        reorder_max_items: at most this many items held per partition; beyond it the
            oldest arrivals are released early. The default is a gateway's largest
            batch (``batch_max_points``), the most one gateway hands a partition at once;
            held items are in every checkpoint, so more costs a backlog's drain.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field("fixloop-diagnostics", min_length=1, max_length=64)
    session_expiry_s: int = Field(86_400, ge=0)
    shared_group: str | None = None
    model_path: Path = Path(".fixloop/models/diagnostics.pkl")
    batch_max: int = Field(5_000, ge=1, le=100_000)
    write_scores: bool = True
    train_days: float = Field(7.0, gt=0, le=400)
    train_window_s: int = Field(3_600, ge=60, le=86_400)
    train_sample: float = Field(0.2, gt=0, le=1)
    products_dir: Path | None = None
    generic_scoring: Literal["baseline", "detector"] = "detector"
    lifetime_backfill: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9_109, ge=0, le=65_535)
    partitions: int = Field(0, ge=0, le=4_096)
    lease_url: SecretStr | None = None
    lease_ttl_s: float = Field(15.0, ge=1.0, le=600.0)
    checkpoint_every_s: float = Field(2.0, gt=0, le=600.0)
    checkpoint_max_messages: int = Field(2_000, ge=1, le=60_000)
    reorder_hold_s: float = Field(2.0, ge=0, le=60.0)
    reorder_max_items: int = Field(5_000, ge=1, le=1_000_000)
