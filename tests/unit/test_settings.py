from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from appliance.core.entry import CONFIG_ERROR_EXIT, load_or_exit
from appliance.core.settings import CommonSettings, ConfigError, load_settings


class DemoSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_DEMO_")
    toml_section = "demo"

    port: int = 8123
    name: str = "default"


@pytest.fixture
def toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("APPLIANCE_DEMO_PORT", "APPLIANCE_DEMO_NAME", "APPLIANCE_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "appliance.toml"
    path.write_text('data_dir = "/srv/appliance"\n[demo]\nport = 9000\nname = "from-toml"\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    return path


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(DemoSettings)
    assert settings.port == 8123
    assert settings.data_dir == Path("data")


def test_toml_then_env_then_kwargs(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(DemoSettings).port == 9000
    assert load_settings(DemoSettings).data_dir == Path("/srv/appliance")
    monkeypatch.setenv("APPLIANCE_DEMO_PORT", "9100")
    monkeypatch.setenv("APPLIANCE_DATA_DIR", "/elsewhere")
    settings = load_settings(DemoSettings)
    assert (settings.port, settings.name, settings.data_dir) == (9100, "from-toml", Path("/elsewhere"))
    assert load_settings(DemoSettings, port=9200).port == 9200


def test_settings_are_immutable(toml: Path) -> None:
    settings = load_settings(DemoSettings)
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_invalid_value_names_field_and_env(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_DEMO_PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings(DemoSettings)
    message = str(info.value)
    assert "port" in message and "APPLIANCE_DEMO_PORT" in message and "integer" in message


def test_entry_point_prologue_exits_2_naming_the_field(
    toml: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_or_exit(DemoSettings, "demo", configure_logs=False).port == 9000
    monkeypatch.setenv("APPLIANCE_DEMO_PORT", "not-a-port")
    with pytest.raises(SystemExit) as info:
        load_or_exit(DemoSettings, "demo", configure_logs=False)
    assert info.value.code == CONFIG_ERROR_EXIT == 2
    err = capsys.readouterr().err
    assert err.startswith("demo: invalid demo configuration") and "APPLIANCE_DEMO_PORT" in err


def test_broken_toml_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[demo\nport = ")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(DemoSettings)


def test_missing_config_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings(DemoSettings)


def test_internal_token_created_once_with_private_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    monkeypatch.delenv("APPLIANCE_INTERNAL_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(DemoSettings, data_dir=tmp_path)
    token = settings.resolved_internal_token()
    assert len(token) >= 32
    assert settings.resolved_internal_token() == token
    assert (tmp_path / "run" / "internal_token").stat().st_mode & 0o777 == 0o600
    assert "internal_token" not in repr(settings) or token not in repr(settings)
