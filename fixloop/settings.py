"""Settings models of the composition root: the root ``Settings`` and its sections.

``fixloop`` reads settings once (:func:`fixloop.config.load_settings`, from a TOML file
and the environment) and hands each package its own frozen section. A section is a
frozen pydantic model owned by its package; adding one is one typed field on
:class:`Settings`, e.g. ``mqtt: MqttSettings = Field(default_factory=MqttSettings)``,
after which ``[mqtt]`` in TOML and ``FIXLOOP_MQTT__PORT`` in the environment reach it.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dashboard.settings import DashboardSettings
from device_sim.settings import SimSettings
from diagnostics.settings import DiagnosticsSettings
from gateway.settings import GatewaySettings
from notifier.settings import NotifierSettings
from wire.influx import InfluxSettings
from wire.settings import MqttSettings

__all__ = [
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "SECTIONS",
    "BrokerSettings",
    "Settings",
    "StackSettings",
]

ENV_PREFIX: Final = "FIXLOOP_"
ENV_NESTED_DELIMITER: Final = "__"
_MIN_SECRET_CHARS: Final = 16


class StackSettings(BaseModel):
    """The local stack started by ``fixloop up`` (section ``[stack]``).

    Attributes:
        data_dir: where the stack keeps broker and InfluxDB data, logs and the fleet secret.
        mqtt_port: broker port; ``0`` picks a free port (a fixed one such as 1883 for
            real devices).
        influx_port: InfluxDB HTTP port; ``0`` picks a free port.
        dashboard_port: the ops dashboard's port (on loopback); ``0`` picks a free port.
        fleet_secret: secret device passwords derive from; generated and kept in
            ``data_dir`` on the first ``fixloop up`` when not given.
        demo_fault_every_s: seconds between two faults the demo gives its live fleet
            (each a case within seconds); ``0``: none.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Path(".fixloop")
    mqtt_port: int = Field(default=0, ge=0, le=65535)
    influx_port: int = Field(default=0, ge=0, le=65535)
    dashboard_port: int = Field(default=0, ge=0, le=65535)
    fleet_secret: SecretStr | None = None
    demo_fault_every_s: float = Field(default=120.0, ge=0.0)

    @field_validator("fleet_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < _MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {_MIN_SECRET_CHARS} characters")
        return value


class BrokerSettings(BaseModel):
    """Where the broker keeps its accounts, and how fixloop reaches them (``[broker]``).

    Attributes:
        accounts: ``"file"``: a password file and an ACL file, written by fixloop
            (a new device needs the file written again and the broker reloaded);
            ``"dynsec"``: Mosquitto's dynamic-security plugin, where
            ``fixloop devices credentials`` issues and revokes device accounts while the
            broker runs. ``fixloop up`` starts its broker either way.
        admin_username: the plugin's administrator (role ``fixloop-dynsec-admin``).
        admin_password: its password; the commands then reach the broker of ``[mqtt]``
            (host, port, TLS). Unset: they reach the ``fixloop up`` broker of
            ``stack.data_dir``, whose administrator password derives from the fleet
            secret.
        control_timeout_s: how long a command to the plugin may wait for its answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    accounts: Literal["file", "dynsec"] = "file"
    admin_username: str = Field("fixloop-admin", min_length=1, max_length=64)
    admin_password: SecretStr | None = None
    control_timeout_s: float = Field(10.0, gt=0, le=300)


class Settings(BaseSettings):
    """Root of every setting: one field per section, each a frozen model.

    Built by :func:`fixloop.config.load_settings`; constructing it directly gives the
    defaults plus the keyword arguments only (the process environment is read by the
    entry point alone, see STYLE.md).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        frozen=True,
        extra="forbid",
    )

    stack: StackSettings = Field(default_factory=StackSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    influx: InfluxSettings = Field(default_factory=InfluxSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    sim: SimSettings = Field(default_factory=SimSettings)
    diagnostics: DiagnosticsSettings = Field(default_factory=DiagnosticsSettings)
    notifier: NotifierSettings = Field(default_factory=NotifierSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Use only the values handed in: ``load_settings`` merges file and environment."""
        return (init_settings,)


def _sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            sections[name] = field.annotation
    return sections


#: Section name → model class, derived from :class:`Settings` (for help and checks).
SECTIONS: Final = MappingProxyType(_sections())
