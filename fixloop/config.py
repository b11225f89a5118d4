"""Settings loading for the composition root: TOML file, then the environment.

Only ``fixloop``'s entry point calls :func:`load_settings` (with ``os.environ``); every
package gets its section passed into its constructors. Precedence, lowest first:
defaults, the TOML file (``--config PATH``, else ``./fixloop.toml`` if present),
``FIXLOOP_*`` environment variables (``FIXLOOP_STACK__MQTT_PORT=1884``). An empty
variable counts as unset, so a compose file can pass an optional setting as ``${VAR:-}``.

A wrong setting refuses to start with one line naming the setting, the problem and
where the value came from; secrets never appear in it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError

from fixloop.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings
from wire.errors import ConfigError

__all__ = [
    "CASE_STORE_FILE",
    "DEFAULT_CONFIG_FILE",
    "FLEET_SECRET_FILE",
    "MODEL_FILE",
    "ensure_fleet_secret",
    "in_data_dir",
    "load_settings",
]

_LOG = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE: Final = Path("fixloop.toml")
#: File in ``stack.data_dir`` that keeps a generated fleet secret.
FLEET_SECRET_FILE: Final = "fleet_secret"
#: The SQLite case store's file in a data folder.
CASE_STORE_FILE: Final = "cases.sqlite3"
#: The fleet models' file in a data folder.
MODEL_FILE: Final = Path("models") / "diagnostics.pkl"

# Phrases for pydantic's error types: "setting x: must be >= 1 (got 0)".
_BOUNDS: Final = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_PHRASES: Final = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "missing": "is required",
    "extra_forbidden": "unknown setting",
    "model_type": "must be a table of settings",
    "model_attributes_type": "must be a table of settings",
    "dict_type": "must be a table",
    "list_type": "must be a list",
}
# Never echo these: a misspelled key may carry a secret, a missing one has no value.
_NO_INPUT: Final = frozenset({"extra_forbidden", "missing", "model_type", "dict_type"})


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping, not ``os.environ``.

    Only the entry point reads the process environment (STYLE.md); the source's public
    ``env_vars`` (what it parses) is set to the mapping handed in, so no private method
    of pydantic-settings is overridden.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        # an empty value is no value (``FIXLOOP_NOTIFIER__PUSH__NTFY_TOKEN: ${NTFY_TOKEN:-}``)
        super().__init__(settings_cls, env_ignore_empty=True)
        # settings are case-insensitive: pydantic-settings looks up lower-cased names
        self.env_vars = {key.lower(): value for key, value in environ.items() if value != ""}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path}: not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from exc


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_name(loc: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    """Return the environment variable that set ``loc`` (or a table containing it)."""
    upper = {key.upper(): key for key in environ}
    for end in range(len(loc), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(loc[:end]).upper()
        if name in upper:
            return upper[name]
    return None


def _in_table(data: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _is_secret(loc: tuple[str, ...]) -> bool:
    """Whether the field at ``loc`` holds a secret (its value must never be shown)."""
    model: type[BaseModel] = Settings
    annotation: Any = None
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return _mentions_secret(annotation)


def _mentions_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_mentions_secret(arg) for arg in typing.get_args(annotation))


def _describe(error: Mapping[str, Any]) -> str:
    kind = str(error["type"])
    ctx = error.get("ctx") or {}
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"must be {op} {ctx.get(key)}"
    if kind in _PHRASES:
        return _PHRASES[kind]
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _one_line(
    exc: ValidationError, environ: Mapping[str, str], toml: Mapping[str, Any], path: Path | None
) -> str:
    errors = exc.errors()
    error = errors[0]
    loc = tuple(str(part) for part in error["loc"])
    line = f"setting {'.'.join(loc)}: {_describe(error)}"
    env_name = _env_name(loc, environ)
    if error["type"] not in _NO_INPUT and not _is_secret(loc):
        value = error.get("input")
        # Environment values are text: show them as typed, FIXLOOP_X=0 -> "(got 0)".
        from_env = env_name is not None and isinstance(value, str) and value.strip() != ""
        shown = value if from_env else repr(value)
        line += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    if env_name is not None:
        line += f" [from {env_name}]"
    elif path is not None and _in_table(toml, loc):
        line += f" [from {path}]"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line.replace("\n", " ")


def _check_sections(environ: Mapping[str, str]) -> None:
    """Refuse ``FIXLOOP_SECTION__KEY`` variables naming no section: a typo must not pass.

    Variables without ``__`` (``FIXLOOP_INFLUXD`` for a tool, say) are left alone unless
    they name a section.
    """
    for key in environ:
        if not key.upper().startswith(ENV_PREFIX) or ENV_NESTED_DELIMITER not in key:
            continue
        section = key[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower()
        if section not in Settings.model_fields:
            raise ConfigError(f"setting {section}: unknown setting [from {key}]")


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Load settings from a TOML file and ``FIXLOOP_*`` variables of ``environ``.

    Args:
        path: the ``--config`` file; ``None`` uses ``./fixloop.toml`` if it exists.
        environ: the environment (the entry point passes ``os.environ``).

    Returns:
        The frozen settings.

    Raises:
        ConfigError: a missing or malformed file, or a wrong setting (one line naming
            the setting, the problem and its source).
    """
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    toml = _read_toml(path) if path is not None else {}
    _check_sections(environ)
    try:
        env = _MappingEnvSource(Settings, environ)()
    except SettingsError as exc:
        # FIXLOOP_STACK='{not json' and the like: pydantic-settings names the field.
        match = re.search(r'field "([^"]+)"', str(exc))
        field = match.group(1) if match else "?"
        name = _env_name((field,), environ) or f"{ENV_PREFIX}{field.upper()}"
        raise ConfigError(f"setting {field}: not valid JSON [from {name}]") from exc
    try:
        settings = Settings(**_merge(toml, env))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, environ, toml, path)) from exc
    _LOG.debug("settings loaded from %s and the environment", path or "defaults")
    return settings


def ensure_fleet_secret(settings: Settings) -> Settings:
    """Return ``settings`` with a fleet secret, generating and keeping one if needed.

    A secret given in the settings wins. Otherwise the secret kept in
    ``stack.data_dir/fleet_secret`` (mode 0600) is used, created on first call, so
    device passwords stay the same across ``fixloop up`` runs.

    Raises:
        ConfigError: the kept secret file is unreadable or empty.
    """
    stack = settings.stack
    if stack.fleet_secret is not None:
        return settings
    secret_path = stack.data_dir / FLEET_SECRET_FILE
    if not secret_path.exists():
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another `fixloop up` created it just now: use theirs
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            _LOG.info("generated a fleet secret in %s", secret_path)
    try:
        value = secret_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"fleet secret file {secret_path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"fleet secret file {secret_path}: empty")
    new_stack = stack.model_copy(update={"fleet_secret": SecretStr(value)})
    return settings.model_copy(update={"stack": new_stack})


def in_data_dir(settings: Settings) -> Settings:
    """``settings`` with the case store and the fleet models where ``fixloop up`` keeps them.

    ``[notifier] db_path`` and ``[diagnostics] model_path`` stay as given when set (in
    the file or the environment); otherwise they are ``cases.sqlite3`` and
    ``models/diagnostics.pkl`` in ``stack.data_dir``. The one rule of every command that
    works on a data folder (``fixloop up``, ``train``, the onboarding commands,
    ``dashboard``), so ``fixloop train --data-dir D`` learns from the failures the demo
    on ``D`` recorded and leaves its models where that demo loads them.
    """
    data_dir = settings.stack.data_dir
    notifier = settings.notifier
    diagnostics = settings.diagnostics
    if "db_path" not in notifier.model_fields_set:
        notifier = notifier.model_copy(update={"db_path": data_dir / CASE_STORE_FILE})
    if "model_path" not in diagnostics.model_fields_set:
        diagnostics = diagnostics.model_copy(update={"model_path": data_dir / MODEL_FILE})
    return settings.model_copy(update={"notifier": notifier, "diagnostics": diagnostics})
