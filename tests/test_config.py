"""Settings loading: defaults, TOML file, environment precedence, one-line errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from dashboard.settings import DashboardSettings
from fixloop.config import FLEET_SECRET_FILE, ensure_fleet_secret, load_settings
from fixloop.settings import SECTIONS, Settings, StackSettings
from wire.errors import ConfigError

SECRET = "a-fleet-secret-that-is-long-enough"


def _toml(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ./fixloop.toml is read when present: run each test where none is.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(None, {})
    assert settings.stack == StackSettings()
    assert settings.stack.data_dir == Path(".fixloop")
    assert settings.stack.mqtt_port == 0
    assert settings.stack.fleet_secret is None


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[stack]\nmqtt_port = 1883\ndata_dir = "/srv/fixloop"\n')
    settings = load_settings(path, {})
    assert settings.stack.mqtt_port == 1883
    assert settings.stack.data_dir == Path("/srv/fixloop")


def test_environment_overrides_toml_field_by_field(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[stack]\nmqtt_port = 1883\ninflux_port = 8086\n")
    settings = load_settings(path, {"FIXLOOP_STACK__MQTT_PORT": "1884"})
    assert settings.stack.mqtt_port == 1884  # from the environment
    assert settings.stack.influx_port == 8086  # still from the file


def test_environment_names_are_case_insensitive() -> None:
    assert load_settings(None, {"fixloop_stack__mqtt_port": "1999"}).stack.mqtt_port == 1999


def test_a_section_can_come_as_json_from_the_environment() -> None:
    settings = load_settings(None, {"FIXLOOP_STACK": '{"mqtt_port": 2000}'})
    assert settings.stack.mqtt_port == 2000


def test_fixloop_toml_in_the_working_directory_is_used() -> None:
    Path("fixloop.toml").write_text("[stack]\ninflux_port = 9999\n")
    assert load_settings(None, {}).stack.influx_port == 9999


def test_explicit_config_wins_over_fixloop_toml(tmp_path: Path) -> None:
    Path("fixloop.toml").write_text("[stack]\ninflux_port = 9999\n")
    path = _toml(tmp_path, "[stack]\ninflux_port = 7777\n")
    assert load_settings(path, {}).stack.influx_port == 7777


def test_the_process_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIXLOOP_STACK__MQTT_PORT", "1999")
    assert load_settings(None, {}).stack.mqtt_port == 0
    assert Settings().stack.mqtt_port == 0


def test_settings_are_frozen() -> None:
    settings = load_settings(None, {})
    with pytest.raises(ValidationError):
        settings.stack = StackSettings(mqtt_port=1)  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.stack.mqtt_port = 1  # type: ignore[misc]


def test_sections_hook_lists_the_stack_section() -> None:
    assert SECTIONS["stack"] is StackSettings
    assert set(SECTIONS) == set(Settings.model_fields)


def _error(path: Path | None, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ)
    message = str(info.value)
    assert "\n" not in message
    assert "validation error" not in message  # never pydantic's multi-line report
    return message


def test_bad_environment_value_is_one_line_naming_setting_and_source() -> None:
    message = _error(None, {"FIXLOOP_STACK__MQTT_PORT": "70000"})
    assert message == (
        "setting stack.mqtt_port: must be <= 65535 (got 70000) [from FIXLOOP_STACK__MQTT_PORT]"
    )


def test_bad_type_from_environment() -> None:
    message = _error(None, {"FIXLOOP_STACK__INFLUX_PORT": "eighty"})
    assert message == (
        "setting stack.influx_port: must be an integer (got eighty) "
        "[from FIXLOOP_STACK__INFLUX_PORT]"
    )


def test_bad_toml_value_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[stack]\nmqtt_port = -1\n")
    assert _error(path, {}) == f"setting stack.mqtt_port: must be >= 0 (got -1) [from {path}]"


def test_environment_value_that_overrides_a_good_toml_value_is_blamed(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[stack]\nmqtt_port = 1883\n")
    message = _error(path, {"FIXLOOP_STACK__MQTT_PORT": "-5"})
    assert message.endswith("[from FIXLOOP_STACK__MQTT_PORT]")


def test_unknown_settings_are_refused() -> None:
    message = _error(None, {"FIXLOOP_STACK__MQTT_PROT": "1883"})
    assert message == "setting stack.mqtt_prot: unknown setting [from FIXLOOP_STACK__MQTT_PROT]"
    assert _error(None, {"FIXLOOP_STAK__MQTT_PORT": "1"}).startswith("setting stak: unknown")


def test_fixloop_variables_that_are_not_settings_are_left_alone() -> None:
    # No "__": a tool's variable (FIXLOOP_INFLUXD=/usr/bin/influxd), not a setting.
    assert load_settings(None, {"FIXLOOP_INFLUXD": "/usr/bin/influxd"}) == load_settings(None, {})


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[stack]\nfleet_secert = "oops-a-secret-in-a-typo"\n')
    message = _error(path, {})
    assert message == f"setting stack.fleet_secert: unknown setting [from {path}]"
    assert "oops" not in message


def test_several_errors_are_counted_on_the_one_line() -> None:
    message = _error(None, {"FIXLOOP_STACK__MQTT_PORT": "-1", "FIXLOOP_STACK__INFLUX_PORT": "-2"})
    assert message.endswith("(and 1 more)")


def test_invalid_json_section_from_environment() -> None:
    assert _error(None, {"FIXLOOP_STACK": "{oops"}) == (
        "setting stack: not valid JSON [from FIXLOOP_STACK]"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert _error(path, {}) == f"config file {path}: not found"


def test_malformed_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[stack\nmqtt_port = \n")
    assert _error(path, {}).startswith(f"config file {path}: invalid TOML: ")


def test_secrets_are_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    message = _error(None, {"FIXLOOP_STACK__FLEET_SECRET": "short-secret"})
    assert message == (
        "setting stack.fleet_secret: must be at least 16 characters "
        "[from FIXLOOP_STACK__FLEET_SECRET]"
    )
    caplog.set_level("DEBUG")
    settings = load_settings(None, {"FIXLOOP_STACK__FLEET_SECRET": SECRET})
    assert settings.stack.fleet_secret == SecretStr(SECRET)
    for text in (repr(settings), str(settings), settings.model_dump_json(), caplog.text):
        assert SECRET not in text


def test_fleet_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = load_settings(None, {"FIXLOOP_STACK__DATA_DIR": str(data_dir)})
    first = ensure_fleet_secret(settings)
    assert first.stack.fleet_secret is not None
    secret = first.stack.fleet_secret.get_secret_value()
    assert len(secret) >= 32
    kept = data_dir / FLEET_SECRET_FILE
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    second = ensure_fleet_secret(settings)
    assert second.stack.fleet_secret == first.stack.fleet_secret
    assert settings.stack.fleet_secret is None  # the input is unchanged (frozen)


def test_given_fleet_secret_wins_and_is_not_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = load_settings(
        None,
        {"FIXLOOP_STACK__DATA_DIR": str(data_dir), "FIXLOOP_STACK__FLEET_SECRET": SECRET},
    )
    assert ensure_fleet_secret(settings) is settings
    assert not (data_dir / FLEET_SECRET_FILE).exists()


def test_empty_kept_fleet_secret_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / FLEET_SECRET_FILE).write_text("\n")
    settings = load_settings(None, {"FIXLOOP_STACK__DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="empty"):
        ensure_fleet_secret(settings)


def test_the_dashboard_section_from_toml_and_environment(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        '[dashboard]\npublic_url = "https://ops.example.com/ops/"\nlogin_max_failures = 3\n'
        "heartbeat_s = 5\n",
    )
    settings = load_settings(
        path,
        {
            "FIXLOOP_DASHBOARD__LOGIN_MAX_FAILURES": "7",
            "FIXLOOP_DASHBOARD__TRUSTED_PROXIES": '["10.0.0.0/8", "::1"]',
            "FIXLOOP_DASHBOARD__SESSION_IDLE_S": "900",
        },
    )
    dashboard = settings.dashboard
    assert SECTIONS["dashboard"] is DashboardSettings
    assert dashboard.login_max_failures == 7  # the environment wins
    assert dashboard.heartbeat_s == 5.0  # still from the file
    assert dashboard.session_idle_s == 900.0
    assert [str(net) for net in dashboard.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert dashboard.cookie_secure is None
    assert dashboard.secure_cookie(over_tls=False)  # the public URL is https
    forced = load_settings(path, {"FIXLOOP_DASHBOARD__COOKIE_SECURE": "false"}).dashboard
    assert not forced.secure_cookie(over_tls=True)
    defaults = load_settings(None, {}).dashboard
    assert defaults == DashboardSettings()
    assert not defaults.secure_cookie(over_tls=False)
    assert defaults.secure_cookie(over_tls=True)


def test_a_bad_dashboard_setting_is_one_line() -> None:
    assert _error(None, {"FIXLOOP_DASHBOARD__SESSION_IDLE_S": "0"}) == (
        "setting dashboard.session_idle_s: must be > 0.0 (got 0) "
        "[from FIXLOOP_DASHBOARD__SESSION_IDLE_S]"
    )
    assert _error(None, {"FIXLOOP_DASHBOARD__PUBLIC_URL": "ops.example.com"}).startswith(
        "setting dashboard.public_url: "
    )
    assert _error(None, {"FIXLOOP_DASHBOARD__COOKIE_SECUR": "true"}) == (
        "setting dashboard.cookie_secur: unknown setting [from FIXLOOP_DASHBOARD__COOKIE_SECUR]"
    )


def test_a_single_gateway_keeps_its_session_id_and_spool() -> None:
    gateway = load_settings(None, {}).gateway
    assert gateway.instance is None
    assert gateway.session_client_id == "fixloop-gateway"
    assert gateway.instance_spool_dir == gateway.spool_dir


def test_a_gateway_instance_names_its_session_and_spool_from_the_environment() -> None:
    env = {
        "FIXLOOP_GATEWAY__SHARED_GROUP": "ingest",
        "FIXLOOP_GATEWAY__INSTANCE": "gw-1",
        "FIXLOOP_GATEWAY__SPOOL_DIR": "/data/spool",
    }
    gateway = load_settings(None, env).gateway
    assert gateway.shared_group == "ingest"
    assert gateway.session_client_id == "fixloop-gateway-gw-1"
    assert gateway.instance_spool_dir == Path("/data/spool/gw-1")


@pytest.mark.parametrize("name", ["../up", "a/b", " ", "x" * 33, ".hidden"])
def test_a_gateway_instance_must_be_a_plain_name(name: str) -> None:
    message = _error(None, {"FIXLOOP_GATEWAY__INSTANCE": name})
    assert message.startswith("setting gateway.instance:")


def test_a_shared_group_cannot_hold_topic_wildcards() -> None:
    message = _error(None, {"FIXLOOP_GATEWAY__SHARED_GROUP": "in/gest"})
    assert message.startswith("setting gateway.shared_group:")


def test_a_gateway_session_id_stays_within_64_characters() -> None:
    env = {"FIXLOOP_GATEWAY__CLIENT_ID": "c" * 40, "FIXLOOP_GATEWAY__INSTANCE": "i" * 24}
    assert "exceed 64 characters" in _error(None, env)
