"""Settings: the sample file, unknown and invalid keys, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from floydd.config import ConfigError, load_settings
from tests.conftest import CONFIG


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "floydd.toml"
    path.write_text(text)
    return path


def test_sample_config_matches_embedded_defaults() -> None:
    assert load_settings(CONFIG, environ={}) == load_settings(None, environ={})


def test_default_max_uptime_is_seven_days() -> None:
    assert load_settings(None, environ={}).jobs.default_max_uptime_s == 7 * 24 * 3600


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key server\.prot"):
        load_settings(write(tmp_path, "[server]\nprot = 1\n"), environ={})


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[sever\]"):
        load_settings(write(tmp_path, "[sever]\nport = 1\n"), environ={})


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid value for server\.port"):
        load_settings(write(tmp_path, '[server]\nport = "eighty"\n'), environ={})


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.queue_timeout_s"):
        load_settings(write(tmp_path, "[proxy]\nqueue_timeout_s = 0\n"), environ={})


def test_default_env_must_exist(tmp_path: Path) -> None:
    text = '[jobs]\ndefault_env = "gpu"\n'
    with pytest.raises(ConfigError, match=r"jobs\.default_env"):
        load_settings(write(tmp_path, text), environ={})


def test_env_without_image_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing key envs\.flask\.image"):
        load_settings(write(tmp_path, '[envs.flask]\ndescription = "x"\n'), environ={})


def test_unknown_env_build_key_is_named(tmp_path: Path) -> None:
    text = '[envs.flask]\nimage = "a:b"\n[envs.flask.build]\npackage = ["x"]\n'
    with pytest.raises(ConfigError, match=r"envs\.flask\.build\.package"):
        load_settings(write(tmp_path, text), environ={})


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(write(tmp_path, "[server\n"), environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[server]\nport = 9000\n"), environ={"FLOYDD_SERVER_PORT": "9100"})
    assert settings.server.port == 9100


def test_invalid_environment_override_is_named() -> None:
    with pytest.raises(ConfigError, match="FLOYDD_PROXY_QUEUE_TIMEOUT_S"):
        load_settings(None, environ={"FLOYDD_PROXY_QUEUE_TIMEOUT_S": "soon"})


def test_unknown_environment_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting server\.prot"):
        load_settings(None, environ={"FLOYDD_SERVER_PROT": "1"})


def test_command_line_overrides_environment() -> None:
    settings = load_settings(None, environ={"FLOYDD_SERVER_PORT": "9100"}, **{"server.port": 0})
    assert settings.server.port == 0


def test_base_url_uses_public_url() -> None:
    settings = load_settings(None, environ={"FLOYDD_SERVER_PUBLIC_URL": "https://gpu.example.test/"})
    assert settings.base_url() == "https://gpu.example.test"
