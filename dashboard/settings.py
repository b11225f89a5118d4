"""Settings of the ops dashboard (section ``[dashboard]``), passed in by ``fixloop``."""

from __future__ import annotations

from pathlib import Path

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

__all__ = ["DashboardSettings"]


class DashboardSettings(BaseModel):
    """How the ops dashboard behaves.

    Attributes:
        public_url: where ops users reach the dashboard (``https://ops.example.com/ops/``),
            e.g. behind a TLS-terminating proxy; ``None``: only where it is served.
        session_idle_s: a session ends this long after its last request (the live
            stream does not count as use).
        session_max_s: a session ends this long after login, used or not.
        cookie_secure: mark the session cookie ``Secure``: ``None`` (the default) does
            so whenever ``public_url`` is ``https`` or the request came over TLS;
            ``True`` or ``False`` forces it on or off.
        login_max_failures: free failed logins per client address; each further one
            opens a delay that doubles (``login_backoff_s`` up to ``login_max_backoff_s``)
            during which that address is refused without its password being checked.
        login_account_failures: free failed logins per account from all addresses
            together; past them the account's delay applies to addresses it has not
            logged in from lately (it is never locked for everyone).
        login_backoff_s: the first delay.
        login_max_backoff_s: the longest delay.
        login_window_s: quiet time, once the last delay ended, after which failed logins
            are forgotten.
        trusted_proxies: addresses or networks of reverse proxies whose
            ``X-Forwarded-For`` is believed (empty: the client is the peer address, and
            the header is ignored).
        cache_s: how old fleet-wide reads (registry, cases, latest scores) get before
            they are read again behind the answers (case changes on the live feed are
            applied as they come; ``0``: every request reads everything).
        max_points: most points per chart series (InfluxDB downsamples to it).
        max_range_days: the longest chart range.
        heartbeat_s: comment lines on the live stream this often (keeps proxies open).
        healthy_below: scores below this are healthy.
        anomalous_from: scores from this on are anomalous (between: watch).
        silent_after_s: a device not heard from (no reading, no score) for this long is
            shown as silent, whatever its last score said; about three times the
            devices' reporting interval.
        host: where ``fixloop dashboard`` serves the dashboard (``fixloop up`` uses
            ``stack.dashboard_port`` on loopback instead).
        port: its port (0: a free one).
        metrics_host: where ``fixloop dashboard`` serves ``/metrics`` and ``/health``
            (``0.0.0.0`` in a container, so the compose network can scrape it).
        metrics_port: their port (0: a free one).
        client_id: MQTT client id prefix of the ``fleet/cases`` subscription (a random
            suffix keeps several dashboards apart; the subscription is live only).
        users_file: the ops users and their password hashes, managed with
            ``fixloop ops-users``; read again when it changes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_url: AnyHttpUrl | None = None
    session_idle_s: float = Field(3600.0, gt=0)
    session_max_s: float = Field(12 * 3600.0, gt=0)
    cookie_secure: bool | None = None
    login_max_failures: int = Field(5, ge=1)
    login_account_failures: int = Field(20, ge=1)
    login_backoff_s: float = Field(1.0, gt=0)
    login_max_backoff_s: float = Field(900.0, gt=0)
    login_window_s: float = Field(300.0, gt=0)
    trusted_proxies: tuple[IPvAnyNetwork, ...] = ()
    cache_s: float = Field(5.0, ge=0)
    max_points: int = Field(500, ge=10, le=10_000)
    max_range_days: int = Field(400, ge=1)
    heartbeat_s: float = Field(15.0, gt=0)
    healthy_below: float = Field(0.3, gt=0, lt=1)
    anomalous_from: float = Field(0.5, gt=0, le=1)
    silent_after_s: float = Field(900.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8_089, ge=0, le=65_535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9_111, ge=0, le=65_535)
    client_id: str = Field("fixloop-dashboard", min_length=1, max_length=48)
    users_file: Path = Path(".fixloop/ops-users.json")

    @model_validator(mode="after")
    def _check_levels(self) -> DashboardSettings:
        if self.anomalous_from < self.healthy_below:
            raise ValueError("anomalous_from must not be below healthy_below")
        if self.login_max_backoff_s < self.login_backoff_s:
            raise ValueError("login_max_backoff_s must not be below login_backoff_s")
        return self

    def secure_cookie(self, *, over_tls: bool) -> bool:
        """Whether the session cookie is marked ``Secure``.

        Args:
            over_tls: the request reached the dashboard itself over TLS.

        Returns:
            ``cookie_secure`` when set; else whether ``public_url`` is ``https`` or
            ``over_tls``: a browser that reaches the dashboard over HTTPS never sends the
            cookie over plain HTTP, while a plain-HTTP local install still
            gets one.
        """
        if self.cookie_secure is not None:
            return self.cookie_secure
        https = self.public_url is not None and self.public_url.scheme == "https"
        return https or over_tls
