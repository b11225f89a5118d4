"""Mosquitto configuration for the bus: broker config, ACL and password file.

This is the one renderer of every Mosquitto file fixloop uses: ``fixloop up`` and the
test fixtures (through :mod:`fixloop.stack`) and the production files in ``docker/``
(``python -m fixloop.broker --docker``) all come from here, so the broker the tests run
is configured like the broker we ship.

Devices connect each as their own user (the device id), with a password derived from
the fleet secret (:func:`wire.protocol.credentials.device_password`); the ACL pins
every device to ``devices/<its id>/...`` with ``%u`` patterns. Services (gateway,
diagnostics, notifier, dashboard) connect as named service users; the dashboard's user
(:data:`DASHBOARD_USER`) may only read ``fleet/#`` (it only follows ``fleet/cases``),
wherever it is listed among the service users.

Accounts live in one of two places: a password file and ACL file written
here (``accounts = "file"``: adding or removing a device means rewriting the file and
reloading the broker), or Mosquitto's dynamic-security plugin (``"dynsec"``), whose
accounts and roles change at run time over MQTT (:mod:`fixloop.dynsec`). For the plugin
this module renders its first configuration file (:func:`render_dynsec_config`) and the
roles that grant what the ACL file grants (:func:`device_acl_rules`,
:data:`SERVICE_ACL_RULES`, ...).

The command line that writes these files is :mod:`fixloop.broker_cli`
(``python -m fixloop.broker`` runs it). This module stays whole (about 730 lines): the
broker config, the ACL file, the password file and the plugin's roles are four
renderings of one set of users and grants, kept side by side so that a grant changed in
one cannot silently differ in another.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from wire.errors import ConfigError
from wire.protocol.credentials import device_password
from wire.protocol.topics import is_valid_device_id

__all__ = [
    "ADMIN_ACL_RULES",
    "ADMIN_ROLE",
    "DASHBOARD_USER",
    "DEFAULT_AUTOSAVE_INTERVAL_S",
    "DEFAULT_MAX_PACKET_SIZE",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_MESSAGES",
    "DEVICE_ROLE_PREFIX",
    "DOCKER_SERVICE_USERS",
    "DYNSEC_ADMIN_USER",
    "GATEWAY_USER",
    "OPS_ACL_RULES",
    "OPS_ROLE",
    "READER_ACL_RULES",
    "READER_ROLE",
    "READ_ONLY_SERVICE_USERS",
    "SERVICE_ACL_RULES",
    "SERVICE_ROLE",
    "STALL_BUDGET_S",
    "STALL_DESIGN_RATE",
    "AclRule",
    "AclType",
    "Listener",
    "check_dynsec_device_id",
    "device_acl_rules",
    "device_credentials",
    "device_role",
    "find_dynsec_plugin",
    "hash_password",
    "render_acl",
    "render_dynsec_config",
    "render_mosquitto_conf",
    "render_password_file",
    "service_role",
]

#: Seconds between saves of Mosquitto's in-memory database. A broker crash loses at most
#: the QoS-1 messages it acknowledged since the last save finished: about this interval
#: plus the time a save takes (README "Delivery guarantees", measured by bench/chaos.py).
DEFAULT_AUTOSAVE_INTERVAL_S: Final = 1
#: The stall budget the queue bounds are sized from: a gateway may be away (or stalled)
#: this long at the design message rate before the broker starts to drop.
STALL_BUDGET_S: Final = 300
#: Design rate of the whole fleet's QoS-1 telemetry, messages per second.
STALL_DESIGN_RATE: Final = 2_000
#: Per-client queue bound: the stall budget at the design rate. Mosquitto's default (1000)
#: drops QoS 1 messages for a slow or briefly offline gateway session within a second;
#: see ARCHITECTURE.md "Delivery and safety rules". Past it the broker drops, and counts
#: the drop in ``$SYS/broker/publish/messages/dropped``, which the gateway reads.
DEFAULT_MAX_QUEUED_MESSAGES: Final = STALL_BUDGET_S * STALL_DESIGN_RATE
#: Per-client queued bytes: the same budget at 512 bytes a message (a reading is 150-400),
#: so the broker's memory (and each save's size) stays bounded too.
DEFAULT_MAX_QUEUED_BYTES: Final = DEFAULT_MAX_QUEUED_MESSAGES * 512
#: Whole MQTT packet limit. Well above the gateway's 16 KiB payload limit, so the gateway
#: (not the broker) sees oversized payloads and reports them on ``fleet/rejected``; still
#: small enough that one client cannot make the broker buffer megabytes per message.
DEFAULT_MAX_PACKET_SIZE: Final = 65536

GATEWAY_USER: Final = "fixloop-gateway"
#: The ops dashboard's service user: it only subscribes to ``fleet/cases``.
DASHBOARD_USER: Final = "fixloop-dashboard"
#: Service users that get read-only grants (:data:`READER_ACL_RULES`) wherever they are
#: listed as service users: the ACL file, the plugin's roles, ``fixloop up``'s broker.
READ_ONLY_SERVICE_USERS: Final = frozenset((DASHBOARD_USER,))
#: Service users of the production deployment, one per service process.
DOCKER_SERVICE_USERS: Final = (
    GATEWAY_USER,
    "fixloop-diagnostics",
    "fixloop-notifier",
    DASHBOARD_USER,
)

#: The account that administers the dynamic-security plugin (and nothing else).
DYNSEC_ADMIN_USER: Final = "fixloop-admin"
#: Role of every backend service (the ACL file's ``user`` block of a service user).
SERVICE_ROLE: Final = "fixloop-service"
#: Role of read-only services (the dashboard): ``fleet/#`` to read, nothing to send.
READER_ROLE: Final = "fixloop-reader"
#: Role of operators (every topic, ``$SYS`` to read).
OPS_ROLE: Final = "fixloop-ops"
#: Role of the plugin's administrators: its control topics only.
ADMIN_ROLE: Final = "fixloop-dynsec-admin"
#: A device's role is this prefix and its id: one role per device, as Mosquitto 2.0's
#: plugin does not substitute ``%u`` in role topics (measured on 2.0.11: a
#: ``devices/%u/telemetry`` grant lets no device publish).
DEVICE_ROLE_PREFIX: Final = "device:"
# Where Debian, Alpine (the eclipse-mosquitto image) and source builds put the plugin.
_DYNSEC_PLUGIN: Final = "mosquitto_dynamic_security.so"
_DYNSEC_PLUGIN_DIRS: Final = ("/usr/lib/*-linux-gnu", "/usr/lib", "/usr/local/lib", "/usr/lib64")

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]


@dataclass(frozen=True, slots=True)
class AclRule:
    """One grant of a dynamic-security role (the plugin's ``acls`` entries).

    Attributes:
        acltype: what it grants: sending (``publishClientSend``), being sent
            (``publishClientReceive``) or subscribing to a filter within ``topic``
            (``subscribePattern``).
        topic: topic or filter it applies to.
        allow: grant (True) or deny.
        priority: higher is checked first (only matters where rules overlap).
    """

    acltype: AclType
    topic: str
    allow: bool = True
    priority: int = 0

    def to_json(self) -> dict[str, object]:
        """The rule as the plugin's JSON (commands and configuration file alike)."""
        return {
            "acltype": self.acltype,
            "topic": self.topic,
            "priority": self.priority,
            "allow": self.allow,
        }


def _read(topic_filter: str, *, shared: bool = False) -> tuple[AclRule, ...]:
    """Subscribe to (and be sent) ``topic_filter``, as the ACL file's ``topic read``.

    With ``shared`` also as an MQTT 5 shared subscription: the plugin checks the whole
    ``$share/<group>/...`` filter (the ACL file checks the topic inside it).
    """
    rules = [
        AclRule("subscribePattern", topic_filter),
        AclRule("publishClientReceive", topic_filter),
    ]
    if shared:
        rules.append(AclRule("subscribePattern", f"$share/+/{topic_filter}"))
    return tuple(rules)


#: What every backend service may do: :func:`render_acl`'s service-user block.
SERVICE_ACL_RULES: Final = (
    *_read("devices/#", shared=True),
    AclRule("publishClientSend", "devices/+/commands"),
    *_read("fleet/#", shared=True),
    AclRule("publishClientSend", "fleet/#"),
    # The broker's count of dropped messages, reported by the gateway.
    *_read("$SYS/broker/publish/messages/dropped"),
)
#: What a read-only service may do: be sent ``fleet/#`` (case changes); no device topic,
#: no command, nothing it could publish.
READER_ACL_RULES: Final = _read("fleet/#")
#: What operators may do: every topic, and ``$SYS`` to read. ``#`` matches no ``$``
#: topic, so operators cannot administer the plugin.
OPS_ACL_RULES: Final = (
    *_read("#"),
    AclRule("publishClientSend", "#"),
    *_read("$SYS/#"),
)
#: The plugin's administrators: send commands, read the responses.
ADMIN_ACL_RULES: Final = (
    *_read("$CONTROL/dynamic-security/#"),
    AclRule("publishClientSend", "$CONTROL/dynamic-security/#"),
)


def service_role(user: str) -> str:
    """The plugin role of a service user: :data:`READER_ROLE` for read-only ones."""
    return READER_ROLE if user in READ_ONLY_SERVICE_USERS else SERVICE_ROLE


def check_dynsec_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be an account of the plugin.

    Any id of the device contract can (``:`` included: the plugin keeps no password
    file); the contract's pattern already excludes ``+``, ``#`` and ``/``, which would
    widen the device's literal grants.

    Raises:
        ConfigError: the id breaks the device id pattern.
    """
    if not is_valid_device_id(device_id):
        raise ConfigError(f"device id {device_id!r} breaks the device id pattern")
    return device_id


def device_role(device_id: str) -> str:
    """Name of the role that holds ``device_id``'s grants."""
    return DEVICE_ROLE_PREFIX + check_dynsec_device_id(device_id)


def device_acl_rules(device_id: str) -> tuple[AclRule, ...]:
    """The grants of one device: :func:`render_acl`'s ``pattern`` lines, for its id.

    It publishes its telemetry, events and status, and reads its own commands.

    Raises:
        ConfigError: the id breaks the device id pattern.
    """
    check_dynsec_device_id(device_id)
    base = f"devices/{device_id}"
    return (
        AclRule("publishClientSend", f"{base}/telemetry"),
        AclRule("publishClientSend", f"{base}/events"),
        AclRule("publishClientSend", f"{base}/status"),
        AclRule("subscribeLiteral", f"{base}/commands"),
        AclRule("publishClientReceive", f"{base}/commands"),
    )


def find_dynsec_plugin(path: str | None = None) -> str:
    """Return the path of Mosquitto's dynamic-security plugin.

    Args:
        path: a given path (checked), or ``None`` to look where packages install it.

    Raises:
        ConfigError: the plugin is not there.
    """
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"dynamic-security plugin {path!r} not found")
        return path
    for pattern in _DYNSEC_PLUGIN_DIRS:
        found = sorted(glob.glob(os.path.join(pattern, _DYNSEC_PLUGIN)))
        if found:
            return found[0]
    raise ConfigError(
        f"Mosquitto's dynamic-security plugin ({_DYNSEC_PLUGIN}) not found; it comes "
        "with Mosquitto 2.0 (apt-get install mosquitto)"
    )


# Mosquitto splits password-file lines at ":" and ACL lines at spaces; "+", "#" and "/"
# make mosquitto refuse a "%u" substitution. Device ids (wire.protocol.topics) may
# contain ":", so a device id with ":" cannot be a broker user.
_USER_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
# PBKDF2-SHA512 parameters of mosquitto_passwd 2.0 ("$7$" hashes, see its source
# src/password_mosq.c): 12-byte salt, 64-byte digest, 101 iterations by default.
_PW_SALT_BYTES: Final = 12
_PW_HASH_BYTES: Final = 64
_PW_ITERATIONS: Final = 101
_GENERATED: Final = "# Generated by fixloop.broker; edit fixloop/broker.py, not this file."


@dataclass(frozen=True, slots=True)
class Listener:
    """One broker listener.

    Attributes:
        port: TCP port (1-65535).
        bind_address: address to bind, or ``None`` for every interface.
        certfile: PEM server certificate; with ``keyfile`` it makes a TLS listener.
        keyfile: PEM private key of ``certfile``.
        cafile: PEM CA bundle, only needed to verify client certificates.
        username_as_client_id: every client's id is its user name
            (``use_username_as_clientid``): on a devices' listener a device cannot take
            a service's client id (and push it off the broker), whatever id it sends.
    """

    port: int
    bind_address: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    username_as_client_id: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"broker listener port must be 1-65535 (got {self.port})")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError(f"broker listener {self.port}: certfile and keyfile go together")
        if self.cafile is not None and self.certfile is None:
            raise ConfigError(f"broker listener {self.port}: cafile needs certfile and keyfile")

    @property
    def tls(self) -> bool:
        """Whether this listener speaks TLS."""
        return self.certfile is not None


def _check_user(name: str) -> str:
    if _USER_RE.fullmatch(name) is None:
        raise ConfigError(
            f"broker user {name!r}: must be 1-64 of A-Z a-z 0-9 _ . @ - "
            "(':' breaks the password file, '+#/' break ACL patterns)"
        )
    return name


def _check_path(what: str, value: str) -> str:
    if not value or any(c in value for c in "\n\r"):
        raise ConfigError(f"broker {what}: must be a non-empty single-line path (got {value!r})")
    return value


def render_mosquitto_conf(
    *,
    listeners: Sequence[Listener],
    data_dir: str,
    password_file: str | None = None,
    acl_file: str | None = None,
    dynsec_plugin: str | None = None,
    dynsec_config_file: str | None = None,
    persistence: bool = True,
    autosave_interval_s: int = DEFAULT_AUTOSAVE_INTERVAL_S,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_inflight_messages: int = 0,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    log_file: str | None = None,
    connection_messages: bool = False,
    run_as_user: str | None = None,
) -> str:
    """Render ``mosquitto.conf`` for Mosquitto 2.0.

    Args:
        listeners: at least one listener.
        data_dir: directory of the persistence database (``mosquitto.db``).
        password_file: path of the password file as the broker sees it (with
            ``acl_file``: accounts in files).
        acl_file: path of the ACL file as the broker sees it.
        dynsec_plugin: path of the dynamic-security plugin (with
            ``dynsec_config_file``: accounts in the plugin, instead of the two files).
        dynsec_config_file: the plugin's configuration file, which it rewrites at every
            change (so in a folder the broker may write).
        persistence: keep sessions, subscriptions and queued messages across restarts.
        autosave_interval_s: seconds between saves of the in-memory database.
        max_queued_messages: per-client queue bound (``0`` = unbounded).
        max_queued_bytes: per-client bound of queued payload bytes (``0`` = unbounded).
        max_inflight_messages: per-client in-flight QoS 1/2 bound (``0`` = unbounded).
        max_packet_size: largest MQTT packet accepted, in bytes.
        log_file: log to this file, or to stdout when ``None`` (containers).
        connection_messages: log every connect and disconnect.
        run_as_user: user mosquitto switches to when started as root; ``None`` keeps
            mosquitto's default (``mosquitto``).

    Returns:
        The configuration text.

    Raises:
        ConfigError: no listener, a duplicate port, a bad path, a negative bound, or
            not exactly one of the two account stores.
    """
    files = (password_file, acl_file)
    plugin = (dynsec_plugin, dynsec_config_file)
    if None in files and files != (None, None):
        raise ConfigError("broker config: password_file and acl_file go together")
    if None in plugin and plugin != (None, None):
        raise ConfigError("broker config: dynsec_plugin and dynsec_config_file go together")
    if (password_file is None) == (dynsec_plugin is None):
        raise ConfigError(
            "broker config: give either password_file and acl_file, or the dynamic-security "
            "plugin and its config file"
        )
    if not listeners:
        raise ConfigError("broker config: at least one listener is needed")
    ports = [listener.port for listener in listeners]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"broker config: duplicate listener ports {ports}")
    for name, value in (
        ("autosave_interval_s", autosave_interval_s),
        ("max_queued_messages", max_queued_messages),
        ("max_queued_bytes", max_queued_bytes),
        ("max_inflight_messages", max_inflight_messages),
        ("max_packet_size", max_packet_size),
    ):
        if value < 0:
            raise ConfigError(f"broker config {name}: must be >= 0 (got {value})")
    data_dir = _check_path("data_dir", data_dir)
    # Mosquitto before 2.0 appends "mosquitto.db" to persistence_location as is.
    location = data_dir if data_dir.endswith("/") else data_dir + "/"
    lines = [
        _GENERATED,
        "",
        "# Settings apply to every listener: one user database and one ACL for the broker.",
        "per_listener_settings false",
        "# Every client authenticates: devices as their id, services as service users.",
        "allow_anonymous false",
    ]
    if password_file is not None and acl_file is not None:
        lines += [
            f"password_file {_check_path('password_file', password_file)}",
            "# Devices may publish only under their own id (ARCHITECTURE.md, safety rules).",
            f"acl_file {_check_path('acl_file', acl_file)}",
        ]
    elif dynsec_plugin is not None and dynsec_config_file is not None:
        lines += [
            "# Accounts and roles in the dynamic-security plugin: devices are added and",
            "# revoked at run time ($CONTROL/dynamic-security/v1), no reload. Each device's",
            "# role lets it publish only under its own id (ARCHITECTURE.md, safety rules).",
            f"plugin {_check_path('dynsec_plugin', dynsec_plugin)}",
            f"plugin_opt_config_file {_check_path('dynsec_config_file', dynsec_config_file)}",
        ]
    lines += [
        "",
        "# The gateway's QoS 1 session (clean start off) must survive a broker restart.",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {location}",
        "# Mosquitto acknowledges a QoS 1 message before it is on disk and saves its",
        "# whole database every autosave_interval seconds (autosave_on_changes false:",
        "# the interval is time): a crash loses what arrived since the last save ended.",
        f"autosave_interval {autosave_interval_s}",
        "autosave_on_changes false",
        "",
        "# Mosquitto drops queued QoS 1 messages past max_queued_messages (default 1000)",
        "# even for connected slow clients. Both bounds are a stall budget of",
        f"# {STALL_BUDGET_S} s at {STALL_DESIGN_RATE} msg/s (fixloop/broker.py); drops are",
        "# counted in $SYS/broker/publish/messages/dropped, which the gateway reports.",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {max_queued_bytes}",
        "# $SYS counters every 10 s (the gateway's drop gauge lags by at most this).",
        "sys_interval 10",
        "# 0 = no bound for MQTT 3 clients; MQTT 5 clients announce their Receive Maximum.",
        f"max_inflight_messages {max_inflight_messages}",
        "# Clients sending larger packets are disconnected; the gateway refuses payloads",
        "# over 16 KiB itself and reports them, so this only stops abuse.",
        f"max_packet_size {max_packet_size}",
        "# Small telemetry messages: send them now rather than batch them (Nagle).",
        "set_tcp_nodelay true",
        "",
    ]
    if log_file is None:
        lines.append("log_dest stdout")
    else:
        lines.append(f"log_dest file {_check_path('log_file', log_file)}")
    lines += [
        "# One line per connect and disconnect floods the log of a large fleet.",
        f"connection_messages {'true' if connection_messages else 'false'}",
    ]
    if run_as_user is not None:
        lines += [
            "# Started as root, mosquitto would switch to the 'mosquitto' user, which",
            "# cannot read this runner's files.",
            f"user {_check_user(run_as_user)}",
        ]
    for listener in listeners:
        lines.append("")
        bind = "" if listener.bind_address is None else f" {listener.bind_address}"
        lines.append(f"listener {listener.port}{bind}")
        if listener.certfile is not None and listener.keyfile is not None:
            lines += [
                f"certfile {_check_path('certfile', listener.certfile)}",
                f"keyfile {_check_path('keyfile', listener.keyfile)}",
            ]
            if listener.cafile is not None:
                lines.append(f"cafile {_check_path('cafile', listener.cafile)}")
            lines.append("tls_version tlsv1.2")
        if listener.username_as_client_id:
            lines += [
                "# A client's id is its user name here: a device cannot take the client id",
                "# of a service (the broker would close the service's connection).",
                "use_username_as_clientid true",
            ]
    return "\n".join(lines) + "\n"


def render_acl(*, service_users: Sequence[str], admin_users: Sequence[str] = ()) -> str:
    """Render the broker ACL file.

    Devices get only ``pattern`` lines on their own id (``%u``, the user name, never
    ``%c``: grants add up, and a client id is chosen freely by the client, so a ``%c``
    pattern would let any user write another device's topics by picking its id).
    Mosquitto checks shared subscriptions (``$share/group/filter``) against the ACL of
    the topic a message is published on, so ``topic read devices/#`` also covers
    ``$share/gateway/devices/+/telemetry``.

    Args:
        service_users: users of the backend services: read every device topic, send
            commands, talk on ``fleet/#``; those in :data:`READ_ONLY_SERVICE_USERS` (the
            dashboard) only read ``fleet/#``.
        admin_users: operators: read and write every topic, read ``$SYS``.

    Returns:
        The ACL text.

    Raises:
        ConfigError: a user name mosquitto cannot handle, or a user listed twice.
    """
    names = [_check_user(u) for u in (*service_users, *admin_users)]
    if len(set(names)) != len(names):
        raise ConfigError(f"broker ACL: a user is listed twice in {names}")
    lines = [
        _GENERATED,
        "",
        "# Devices (user name = device id) publish only under their own id and read only",
        "# their own commands. Patterns apply to every user.",
        "pattern write devices/%u/telemetry",
        "pattern write devices/%u/events",
        "pattern write devices/%u/status",
        "pattern read devices/%u/commands",
    ]
    for user in service_users:
        if user in READ_ONLY_SERVICE_USERS:
            lines += [
                "",
                f"user {user}",
                "# Follows case changes; sends nothing.",
                "topic read fleet/#",
            ]
            continue
        lines += [
            "",
            f"user {user}",
            "topic read devices/#",
            "topic write devices/+/commands",
            "topic readwrite fleet/#",
            "# The broker's count of dropped messages, reported by the gateway.",
            "topic read $SYS/broker/publish/messages/dropped",
        ]
    for user in admin_users:
        lines += ["", f"user {user}", "topic readwrite #", "topic read $SYS/#"]
    return "\n".join(lines) + "\n"


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = _PW_ITERATIONS
) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does (``$7$``, PBKDF2-SHA512).

    Mosquitto's 101 iterations are few, but device passwords are 144 random bits
    (derived from the fleet secret), so guessing them does not get cheaper in practice.

    Args:
        password: the clear password.
        salt: 12 bytes; random when ``None``.
        iterations: PBKDF2 iterations.

    Returns:
        ``$7$<iterations>$<base64 salt>$<base64 hash>``.
    """
    if salt is None:
        salt = os.urandom(_PW_SALT_BYTES)
    if len(salt) != _PW_SALT_BYTES:
        raise ConfigError(f"password salt must be {_PW_SALT_BYTES} bytes (got {len(salt)})")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _PW_HASH_BYTES)
    salt_b64 = base64.b64encode(salt).decode()
    return f"$7${iterations}${salt_b64}${base64.b64encode(digest).decode()}"


def render_password_file(entries: Mapping[str, str]) -> str:
    """Render a Mosquitto 2.0 password file without the ``mosquitto_passwd`` binary.

    Args:
        entries: user name → clear password.

    Returns:
        One ``user:$7$...`` line per user, sorted by user name.

    Raises:
        ConfigError: a user name mosquitto cannot handle or an empty password.
    """
    lines = []
    for user in sorted(entries):
        password = entries[user]
        if not password:
            raise ConfigError(f"broker user {user!r}: empty password")
        lines.append(f"{_check_user(user)}:{hash_password(password)}")
    return "".join(line + "\n" for line in lines)


def _dynsec_password(password: str) -> dict[str, object]:
    """A password as the plugin stores it: PBKDF2-SHA512 like ``mosquitto_passwd``."""
    if not password:
        raise ConfigError("broker account: empty password")
    salt = os.urandom(_PW_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PW_ITERATIONS, _PW_HASH_BYTES)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _PW_ITERATIONS,
    }


def _role(name: str, rules: Iterable[AclRule]) -> dict[str, object]:
    return {"rolename": name, "acls": [rule.to_json() for rule in rules]}


def render_dynsec_config(
    *,
    admin_password: str,
    service_users: Mapping[str, str] | None = None,
    ops_users: Mapping[str, str] | None = None,
    devices: Mapping[str, str] | None = None,
    logins: Mapping[str, str] | None = None,
    admin_user: str = DYNSEC_ADMIN_USER,
) -> str:
    """Render the dynamic-security plugin's first configuration file.

    What ``mosquitto_ctrl dynsec init`` writes, plus fixloop's roles and accounts, so a
    broker starts with its services (and any devices known up front) able to connect.
    From then on the plugin owns the file: it rewrites it at every change made over
    ``$CONTROL/dynamic-security/v1`` (:mod:`fixloop.dynsec`). Passwords are stored as
    the plugin stores them (PBKDF2-SHA512, random salt).

    The default access is the ACL file's: nothing without a grant, sending and being
    sent alike (Mosquitto's own default lets every client be sent every topic it may
    subscribe to; fixloop grants what each role reads).

    Args:
        admin_password: password of ``admin_user``, who may only send the plugin
            commands.
        service_users: backend services, name → password (role ``fixloop-service``;
            ``fixloop-reader`` for those in :data:`READ_ONLY_SERVICE_USERS`).
        ops_users: operators, name → password (role ``fixloop-ops``).
        devices: device id → password (each with its own role).
        logins: accounts that may only log in (no grants: a broker healthcheck),
            name → password.
        admin_user: name of the plugin's administrator.

    Returns:
        The JSON text.

    Raises:
        ConfigError: a name used twice, a bad device id or an empty password.
    """
    services = dict(service_users or {})
    ops = dict(ops_users or {})
    device_accounts = dict(devices or {})
    bare = dict(logins or {})
    names = [admin_user, *services, *ops, *bare]
    for name in names:
        _check_user(name)
    for device_id in device_accounts:
        check_dynsec_device_id(device_id)
    everyone = [*names, *device_accounts]
    if len(set(everyone)) != len(everyone):
        raise ConfigError(f"dynamic-security accounts: a name is used twice in {sorted(everyone)}")
    clients: list[dict[str, object]] = []

    def account(name: str, password: str, role: str | None, text: str) -> None:
        roles = [] if role is None else [{"rolename": role}]
        clients.append(
            {"username": name, "textname": text, "roles": roles} | _dynsec_password(password)
        )

    account(admin_user, admin_password, ADMIN_ROLE, "administers the dynamic-security plugin")
    for name in sorted(services):
        account(name, services[name], service_role(name), "fixloop service")
    for name in sorted(ops):
        account(name, ops[name], OPS_ROLE, "operator")
    for name in sorted(bare):
        account(name, bare[name], None, "may log in, nothing more")
    roles = [
        _role(ADMIN_ROLE, ADMIN_ACL_RULES),
        _role(SERVICE_ROLE, SERVICE_ACL_RULES),
        _role(READER_ROLE, READER_ACL_RULES),
        _role(OPS_ROLE, OPS_ACL_RULES),
    ]
    for device_id in sorted(device_accounts):
        account(device_id, device_accounts[device_id], device_role(device_id), "device")
        roles.append(_role(device_role(device_id), device_acl_rules(device_id)))
    config = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
    return json.dumps(config, indent=1) + "\n"


def device_credentials(fleet_secret: str, device_ids: Iterable[str]) -> dict[str, str]:
    """Return the broker credentials (device id → password) of ``device_ids``.

    Raises:
        ConfigError: an empty fleet secret, or a device id that breaks the device
            contract or cannot be a broker user name.
    """
    if not fleet_secret:
        raise ConfigError("fleet secret is empty: device passwords cannot be derived")
    credentials: dict[str, str] = {}
    for device_id in device_ids:
        if not is_valid_device_id(device_id):
            raise ConfigError(f"device id {device_id!r} breaks the device id pattern")
        credentials[_check_user(device_id)] = device_password(fleet_secret, device_id)
    return credentials


if __name__ == "__main__":
    # the command line lives in fixloop.broker_cli; ``python -m fixloop.broker`` stays
    from fixloop.broker_cli import main

    raise SystemExit(main())
