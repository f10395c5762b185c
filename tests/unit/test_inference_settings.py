"""Worker settings: env names, list parsing, validation messages."""

from __future__ import annotations

import pytest

from appliance.core.settings import ConfigError, load_settings
from inference.settings import WorkerSettings


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(WorkerSettings)
    assert (settings.host, settings.port, settings.slots, settings.n_ctx) == ("127.0.0.1", 8201, 8, 8192)
    assert settings.model_alias == "gemma-3-270m"
    assert settings.n_gpu_layers == -1 and settings.queue_size == 64 and settings.max_tokens_cap == 2048
    assert settings.threads() >= 1


def test_env_lists_accept_json_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "ab" * 32
    monkeypatch.setenv("APPLIANCE_WORKER_ALLOWED_SHA256", f"{digest.upper()}, {'cd' * 32}")
    monkeypatch.setenv("APPLIANCE_WORKER_TENSOR_SPLIT", "[0.25, 0.75]")
    monkeypatch.setenv("APPLIANCE_WORKER_SLOTS", "4")
    settings = load_settings(WorkerSettings)
    assert settings.allowed_sha256 == [digest, "cd" * 32]
    assert settings.tensor_split == [0.25, 0.75]
    assert settings.slots == 4


def test_bad_values_name_the_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_WORKER_ALLOWED_SHA256", "not-a-digest")
    with pytest.raises(ConfigError, match="APPLIANCE_WORKER_ALLOWED_SHA256"):
        load_settings(WorkerSettings)


def test_chat_template_may_name_a_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert WorkerSettings(chat_template=str(path)).template_source() == "{{ messages[0].content }}"
    assert WorkerSettings(chat_template="{{ x }}").template_source() == "{{ x }}"
    assert WorkerSettings().template_source() is None
