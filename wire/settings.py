"""How every stage reaches the MQTT broker (section ``[mqtt]``), shared by all stages.

Built once by ``fixloop`` from a TOML file and ``FIXLOOP_`` variables and passed to
constructors; nothing here reads the environment.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from wire.mqtt import MqttClient, Will

__all__ = ["MqttSettings"]


class MqttSettings(BaseModel):
    """How services reach the MQTT broker (section ``[mqtt]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    connect_timeout_s: float = Field(10.0, gt=0)

    def tls_context(self) -> ssl.SSLContext | None:
        """Return the TLS context to connect with, or None for plain TCP."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        return context

    def secret(self) -> str | None:
        """Return the password in clear, for the connect call only."""
        return self.password.get_secret_value() if self.password else None

    def client(
        self,
        client_id: str,
        *,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        receive_maximum: int = 65_535,
        max_buffered: int = 100_000,
        will: Will | None = None,
        will_on_disconnect: bool = False,
    ) -> MqttClient:
        """Build (not connect) an MQTT client for a service with these settings."""
        return MqttClient(
            self.host,
            self.port,
            client_id=client_id,
            username=self.username,
            password=self.secret(),
            clean_start=clean_start,
            session_expiry_s=session_expiry_s,
            keepalive_s=self.keepalive_s,
            receive_maximum=receive_maximum,
            tls=self.tls_context(),
            connect_timeout_s=self.connect_timeout_s,
            max_buffered=max_buffered,
            will=will,
            will_on_disconnect=will_on_disconnect,
        )

    def session_client(
        self,
        client_id: str,
        *,
        session_expiry_s: int,
        receive_maximum: int = 65_535,
        max_buffered: int = 100_000,
        will: Will | None = None,
    ) -> MqttClient:
        """Build a client that resumes a persistent session (no clean start).

        A will, if given, is published on a clean stop too (DISCONNECT 0x04): a member
        of a shared group says it is down either way (:mod:`wire.adoption`).
        """
        return self.client(
            client_id,
            clean_start=False,
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            max_buffered=max_buffered,
            will=will,
            will_on_disconnect=will is not None,
        )
