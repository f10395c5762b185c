"""The balancer's swap settings: read from [models] (where the catalogue is configured), the [models] table's
environment names over it, and [balancer] / APPLIANCE_BALANCER_* first."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.settings import ConfigError, load_settings
from balancer.settings import BalancerSettings

TOKEN = "swap-settings-test-token-padded-to-32-characters"


def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, **env: str) -> BalancerSettings:
    config = tmp_path / "appliance.toml"
    config.write_text(toml)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(BalancerSettings, internal_token=TOKEN)


def test_the_models_table_sets_the_swap_policy_and_the_bounded_wait(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    toml = '[models]\nmax_swap_wait_s = 12\nswap_policy = "fcfs"\n\n[[models.entry]]\nalias = "chat"\n'
    loaded = settings(tmp_path, monkeypatch, toml)
    assert (loaded.max_swap_wait_s, loaded.swap_policy) == (12.0, "fcfs")
    assert settings(tmp_path, monkeypatch, toml, APPLIANCE_MODELS_MAX_SWAP_WAIT_S="7").max_swap_wait_s == 7.0
    assert settings(tmp_path, monkeypatch, toml + '\n[balancer]\nmax_swap_wait_s = 5\n').max_swap_wait_s == 5.0
    assert settings(tmp_path, monkeypatch, toml, APPLIANCE_BALANCER_MAX_SWAP_WAIT_S="3",
                    APPLIANCE_MODELS_MAX_SWAP_WAIT_S="7").max_swap_wait_s == 3.0


def test_defaults_and_entries_written_as_an_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = settings(tmp_path, monkeypatch, '[[models]]\nalias = "chat"\n')
    assert (loaded.max_swap_wait_s, loaded.swap_policy, loaded.swap_queue_timeout_s) == (30.0, "grouped", 120.0)


def test_a_bad_value_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="swap_policy"):
        settings(tmp_path, monkeypatch, '[models]\nswap_policy = "lifo"\n')
