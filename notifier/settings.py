"""Settings of the owner loop (section ``[notifier]``), passed in by ``fixloop``."""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from notifier.oidc import url_problem

__all__ = ["NotifierSettings", "OidcSettings", "PushSettings"]

_MIN_LINK_SECRET_CHARS: Final = 32


class PushSettings(BaseModel):
    """The push services (section ``[notifier.push]``).

    A channel kind without its settings is not offered (FCM needs a service account,
    Web Push a VAPID key); ntfy and webhooks need nothing.

    Attributes:
        fcm_service_account: path of the Firebase service account JSON file.
        fcm_base_url: FCM HTTP v1 API root.
        vapid_private_key: Web Push VAPID private key (PEM or base64url raw P-256).
        vapid_subject: contact for push services (``mailto:`` or ``https:``).
        ntfy_token: access token for the ntfy server, if it needs one.
        timeout_s: how long one request to a push service may take.
        attempts: tries per channel before the next one.
        max_failures: failed deliveries in a row after which a channel is retired.
        workers: messages delivered at the same time.
        per_owner: of those, at most this many for one owner (one owner's backlog or
            slow channels cannot take more of the workers).
        per_channel: messages using one channel at the same time.
        message_budget_s: the time one message may take, all channels, retries and
            ``Retry-After`` pauses included; past it the message is recorded as failed.
        webhook_allow_private: let the targets owners give (webhooks, ntfy servers, Web
            Push endpoints) point at internal addresses (loopback, private networks ...)
            and use plain http: for local installs and tests only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fcm_service_account: Path | None = None
    fcm_base_url: str = "https://fcm.googleapis.com"
    vapid_private_key: SecretStr | None = None
    vapid_subject: str = "mailto:service@example.com"
    ntfy_token: SecretStr | None = None
    timeout_s: float = Field(10.0, gt=0, le=120)
    attempts: int = Field(4, ge=1, le=20)
    max_failures: int = Field(10, ge=1, le=1_000)
    workers: int = Field(4, ge=1, le=64)
    per_owner: int = Field(1, ge=1, le=64)
    per_channel: int = Field(1, ge=1, le=64)
    message_budget_s: float = Field(120.0, gt=0, le=3_600)
    webhook_allow_private: bool = False

    @model_validator(mode="after")
    def _share_fits(self) -> PushSettings:
        if self.per_owner > self.workers:
            raise ValueError("per_owner must not exceed workers")
        return self


class OidcSettings(BaseModel):
    """Owners signing in with the manufacturer's identity provider (``[notifier.oidc]``).

    Off while ``issuer`` is unset. On, the owner API takes the provider's OpenID Connect
    access tokens (JWT, RS256 or ES256) beside fixloop's own tokens (see
    :mod:`notifier.oidc`).

    Attributes:
        issuer: the provider's issuer URL, exactly as its tokens' ``iss`` says it.
        audience: what the tokens' ``aud`` must name (the API's identifier there).
        jwks_url: where the provider's signing keys are (none: the ``jwks_uri`` of
            ``{issuer}/.well-known/openid-configuration``).
        leeway_s: clock difference allowed on ``exp``, ``nbf`` and ``iat``.
        jwks_ttl_s: how long fetched keys are used before they are fetched again.
        refetch_min_interval_s: least time between two fetches of the keys (a token
            naming an unknown key fetches them anew, at most this often).
        timeout_s: the longest one request to the provider may take.
        auto_create: a subject linked to no owner becomes a new owner at its first
            request (off: it is refused with 403 until it is linked to an owner).
        allow_http: let ``issuer`` and ``jwks_url`` be plain http (tests and local
            installs only).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str | None = Field(None, max_length=2048)
    audience: str | None = Field(None, min_length=1, max_length=2048)
    jwks_url: str | None = Field(None, max_length=2048)
    leeway_s: float = Field(60.0, ge=0, le=300)
    jwks_ttl_s: float = Field(3_600.0, ge=1, le=7 * 86_400.0)
    refetch_min_interval_s: float = Field(30.0, ge=0, le=3_600)
    timeout_s: float = Field(5.0, gt=0, le=60)
    auto_create: bool = False
    allow_http: bool = False

    @model_validator(mode="after")
    def _usable(self) -> OidcSettings:
        if self.issuer is None:
            if self.audience is not None or self.jwks_url is not None:
                raise ValueError("issuer is needed when audience or jwks_url is set")
            return self
        if self.audience is None:
            raise ValueError("audience is needed with an issuer")
        for name in ("issuer", "jwks_url"):
            url = getattr(self, name)
            problem = None if url is None else url_problem(url, allow_http=self.allow_http)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
        return self


class NotifierSettings(BaseModel):
    """The notifier service: cases, commands, verification, appointments, owner API.

    Attributes:
        client_id: MQTT client id of the diagnoses consumer (persistent session).
        session_expiry_s: how long the broker keeps that session while we are away.
        db_path: the SQLite case store (unless ``store_url`` is set).
        store_url: a PostgreSQL database for the case store instead of the SQLite file
            (``postgresql://user:password@host:5432/db``; asyncpg's URL options, such as
            ``sslmode``, go in its query).
        store_pool_size: connections to that database at most, per process.
        api_host: where the owner REST API listens.
        api_port: its port (0: a free one).
        public_url: the API's public address, for one-tap action links.
        link_secret: key that signs one-tap action links (at least 32 characters; none:
            a random key per run, so links stop working when the service restarts).
        link_ttl_s: how long a one-tap action link works.
        command_timeout_s: how long to wait for a device's command result.
        retry_after_s: pause before a refused or unanswered command is sent again.
        settle_s: device time after a fix before its scores count.
        verify_window_s: device time the scores must stay healthy to call it fixed.
        verify_timeout_s: wall time after which a check with too little data fails.
        healthy_score: scores below this are healthy.
        max_reschedules: how often an owner may move a booked visit before a person
            agrees a time with them.
        reminder_before_s: how long before a booked visit the owner is reminded of it
            (0: never).
        resume_opened_after_s: wall time after which a case still ``opened`` gets its
            first step from the timers (a campaign's, opened by the standalone dashboard).
        firmware: firmware release to install by product model (``firmware_update``).
        push: the push services.
        oidc: owner sign-in with the manufacturer's identity provider.
        erase_device_data: what an owner's erasure does to their devices' telemetry,
            events and scores in InfluxDB: ``delete`` them, or ``rekey`` them to anonymous
            device ids first (for a manufacturer who keeps device history).
        metrics_host: where ``fixloop notifier`` serves ``/metrics`` and ``/health``
            (``0.0.0.0`` in a container, so the compose network can scrape it).
        metrics_port: their port (0: a free one).
        shared_group: the MQTT 5 shared-subscription group of notifiers side by side:
            each diagnosis goes to one of them (``None``: this notifier takes all).
        instance: this notifier's stable name among several: its diagnoses session is
            ``client_id-instance``, which a restarted instance resumes (the broker keeps
            what it had for a dead shared subscriber for that session only).
        lease_s: how long a notifier's lease on a case lasts, and how long a timer it
            took stays hidden from the others; a dead notifier's cases move on after it.
        adopt_after_s: with ``shared_group`` and ``instance``: a notifier of the group
            that has been down this long has its diagnoses session taken over by the
            first live one by name until it is back (``None``: off; ``wire.adoption``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field("fixloop-notifier", min_length=1, max_length=64)
    shared_group: str | None = Field(None, pattern=r"^[^/+#]+$")
    instance: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,31}$")
    lease_s: float = Field(30.0, ge=1.0, le=3_600.0)
    adopt_after_s: float | None = Field(None, gt=0)
    session_expiry_s: int = Field(86_400, ge=0)
    db_path: Path = Path(".fixloop/cases.sqlite3")
    store_url: SecretStr | None = None
    store_pool_size: int = Field(10, ge=1, le=1_000)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8_088, ge=0, le=65_535)
    public_url: str | None = None
    link_secret: SecretStr | None = None
    link_ttl_s: float = Field(7 * 86_400.0, gt=0, le=90 * 86_400.0)
    command_timeout_s: float = Field(60.0, gt=0, le=3_600)
    retry_after_s: float = Field(300.0, gt=0)
    settle_s: float = Field(600.0, ge=0)
    verify_window_s: float = Field(3_600.0, gt=0)
    verify_timeout_s: float = Field(6 * 3_600.0, gt=0)
    healthy_score: float = Field(0.3, gt=0, lt=1)
    max_reschedules: int = Field(3, ge=0, le=20)
    reminder_before_s: float = Field(86_400.0, ge=0, le=14 * 86_400.0)
    resume_opened_after_s: float = Field(10.0, gt=0, le=3_600.0)
    firmware: dict[str, str] = Field(
        default_factory=lambda: {"washer": "2.4.0", "fridge": "2.4.0", "heat_pump": "2.4.0"}
    )
    push: PushSettings = Field(default_factory=PushSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    erase_device_data: Literal["delete", "rekey"] = "delete"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9_110, ge=0, le=65_535)

    @property
    def session_client_id(self) -> str:
        """The client id of the diagnoses consumer's persistent session.

        ``client_id`` alone for a single notifier, ``client_id-instance`` for one of
        several (two clients with one id push each other off the broker).
        """
        return f"{self.client_id}-{self.instance}" if self.instance else self.client_id

    @model_validator(mode="after")
    def _adoption_named(self) -> NotifierSettings:
        if self.adopt_after_s is not None and not (self.shared_group and self.instance):
            raise ValueError("adopt_after_s needs shared_group and instance")
        return self

    @field_validator("store_url")
    @classmethod
    def _postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().split("://", 1)[0]
            if scheme not in ("postgresql", "postgres"):
                raise ValueError(
                    "must be a PostgreSQL URL (postgresql://user:password@host/db); "
                    "for SQLite set db_path instead"
                )
        return value

    @field_validator("link_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < _MIN_LINK_SECRET_CHARS:
            raise ValueError(f"must be at least {_MIN_LINK_SECRET_CHARS} characters")
        return value
