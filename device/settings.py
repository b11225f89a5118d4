"""Settings of one device's connection and store (the device side of the wire).

A device authenticates in one of two ways (README "Device library", "Device
authentication"):

* **password**: the broker user is the device id, the password the one provisioned for
  it (fixloop derives it from the fleet secret, see ``fixloop.broker``); use TLS too
  (:class:`TlsSettings` with the server's CA) on anything but a lab network;
* **client certificate**: :class:`TlsSettings` with ``cert_file``/``key_file``; the
  broker takes the certificate's common name as the user name
  (``use_identity_as_username``), so no password exists that could be guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

from device.contract import DEVICE_ID_PATTERN
from device.errors import DeviceConfigError
from device.store import FsyncPolicy

__all__ = ["DeviceSettings", "TlsSettings"]

_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_PATTERN)
ENV_PREFIX: Final = "FIXLOOP_DEVICE_"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS to the broker.

    Attributes:
        ca_file: PEM bundle of the CA that signed the broker's certificate; ``None``
            trusts the system's CAs.
        cert_file: the device's client certificate (PEM), for certificate login.
        key_file: its private key (PEM).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise DeviceConfigError("tls: cert_file and key_file go together")


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Everything a :class:`~device.client.Device` needs; frozen, checked when built.

    Attributes:
        device_id: the device's id (client id, broker user, topic and payload id).
        host: the broker's host name.
        data_dir: where the device store (outbox, ``seq``, answered commands, OTA state)
            and downloaded firmware images live; must survive reboots.
        port: the broker's port (8883 is usual for TLS).
        username: broker user; the device id when ``None``.
        password: broker password; ``None`` for certificate login.
        tls: TLS settings; ``None`` for plain TCP.
        keepalive_s: MQTT keep-alive.
        session_expiry_s: how long the broker keeps the device's session (and the
            commands sent to it) while it is offline.
        connect_timeout_s: limit on the TCP and TLS handshake and on the CONNACK.
        reconnect_min_s: first reconnect delay; doubles per failed attempt, with jitter.
        reconnect_max_s: largest reconnect delay.
        send_rate_per_s: most messages published per second (backfill after an outage
            goes at this rate, so a fleet coming back does not flood the backend).
        max_inflight: most messages sent and not yet acknowledged.
        max_buffered: outbox bound; past it the oldest messages are dropped and counted.
        fsync: ``always`` (each message survives a power cut) or ``normal``
            (survives a crash of the program); see :mod:`device.store`.
        model: product model, reported in the ``boot`` event.
        firmware: firmware version for the ``boot`` event when no
            :class:`~device.ota.Firmware` hooks are given.
        max_boot_attempts: boots of a new firmware without a verdict before it is rolled
            back (a crash loop).
        max_image_bytes: largest firmware image accepted.
        download_timeout_s: limit on connecting to the image server and on each read.
    """

    device_id: str
    host: str
    data_dir: Path
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86_400
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    send_rate_per_s: float = 50.0
    max_inflight: int = 20
    max_buffered: int = 100_000
    fsync: FsyncPolicy = "always"
    model: str | None = None
    firmware: str | None = None
    max_boot_attempts: int = 3
    max_image_bytes: int = 256 * 1024 * 1024
    download_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if _DEVICE_ID_RE.fullmatch(self.device_id) is None:
            raise DeviceConfigError(f"device_id {self.device_id!r} breaks {DEVICE_ID_PATTERN}")
        if not self.host:
            raise DeviceConfigError("host: the broker's host name is needed")
        if not 1 <= self.port <= 65535:
            raise DeviceConfigError(f"port must be 1-65535 (got {self.port})")
        if self.keepalive_s < 1 or self.session_expiry_s < 0:
            raise DeviceConfigError("keepalive_s must be >= 1 and session_expiry_s >= 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise DeviceConfigError("need 0 < reconnect_min_s <= reconnect_max_s")
        for name in ("connect_timeout_s", "send_rate_per_s", "download_timeout_s"):
            if not getattr(self, name) > 0:
                raise DeviceConfigError(f"{name} must be positive")
        for name in ("max_inflight", "max_buffered", "max_boot_attempts", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise DeviceConfigError(f"{name} must be at least 1")
        if self.fsync not in ("always", "normal"):
            raise DeviceConfigError(f"fsync must be 'always' or 'normal' (got {self.fsync!r})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> Self:
        """Build settings from ``FIXLOOP_DEVICE_*`` variables (a systemd EnvironmentFile).

        Variables: ``ID``, ``HOST``, ``PORT``, ``DATA_DIR``, ``USERNAME``, ``PASSWORD``,
        ``TLS`` (``1`` for TLS with the system CAs), ``CA_FILE``, ``CERT_FILE``,
        ``KEY_FILE``, ``MODEL``, ``FIRMWARE``, ``SEND_RATE_PER_S``, ``FSYNC``. Keyword
        arguments override them.

        Raises:
            DeviceConfigError: a required variable is missing or a value is wrong.
        """

        def get(name: str) -> str | None:
            value = environ.get(ENV_PREFIX + name)
            return value if value else None

        values: dict[str, object] = {}
        for name, key in (("ID", "device_id"), ("HOST", "host"), ("DATA_DIR", "data_dir")):
            value = get(name)
            if value is not None:
                values[key] = Path(value) if key == "data_dir" else value
        for name in ("USERNAME", "PASSWORD", "MODEL", "FIRMWARE", "FSYNC"):
            value = get(name)
            if value is not None:
                values[name.lower()] = value
        try:
            if (port := get("PORT")) is not None:
                values["port"] = int(port)
            if (rate := get("SEND_RATE_PER_S")) is not None:
                values["send_rate_per_s"] = float(rate)
        except ValueError as exc:
            raise DeviceConfigError(f"{ENV_PREFIX}PORT/SEND_RATE_PER_S: {exc}") from exc
        files = {k: get(k.upper()) for k in ("ca_file", "cert_file", "key_file")}
        if get("TLS") in ("1", "true", "yes") or any(files.values()):
            values["tls"] = TlsSettings(**{k: Path(v) for k, v in files.items() if v})
        values.update(overrides)
        missing = [k for k in ("device_id", "host", "data_dir") if k not in values]
        if missing:
            names = ", ".join(ENV_PREFIX + {"device_id": "ID"}.get(k, k.upper()) for k in missing)
            raise DeviceConfigError(f"missing settings: {names}")
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:
            raise DeviceConfigError(f"bad device settings: {exc}") from exc
