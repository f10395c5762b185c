"""`appliance models`: what the CLI passes to the runtime, prints, refuses and audits (a recording runtime; the
real runtimes run in tests/e2e/test_models_local.py and test_compose_appliance.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.cli.app import create_app
from appliance.core.model_settings import ModelConfig
from appliance.runtime.models import read_changes, write_changes
from appliance.runtime.protocol import Intro, ModelChange, ModelRow, RuntimeFailure, Started
from appliance.runtime.settings import RuntimeSettings

REFUSAL = ("the models do not fit: 72.8 GiB does not fit the memory budget of 3.0 GiB ([models] memory_budget):\n"
           "  1 worker x (huge: 241.4 MiB weights + 64 slots x 65536 tokens x 18.0 KiB KV = 72.2 GiB)")


@dataclass
class ModelsRuntime:
    settings: RuntimeSettings
    calls: list[tuple[str, Any]] = field(default_factory=list)
    failure: str | None = None

    def _change(self, verb: str, *args: Any) -> ModelChange:
        self.calls.append((verb, args))
        if self.failure:
            raise RuntimeFailure(self.failure)
        alias = args[0].alias if verb == "add_model" else str(args[0])
        return ModelChange(alias, verb, "1.0 GiB fits", ["inference-3"])

    def intro(self) -> Intro:
        return Intro("Starting", "test")

    def up(self) -> Started:
        return Started("http://gw/", "http://gw/v1", self.settings.data_dir / "admin_key")

    def models(self) -> list[ModelRow]:
        return [ModelRow("chat", "always", False, 2, "loaded", 300 << 20, "/m/a.gguf", "ab" * 32, ["http://w1"]),
                ModelRow("coder", "on_demand", True, 0, "unloaded", 2 << 30, "/m/b.gguf", "cd" * 32)]

    def add_model(self, config: ModelConfig) -> ModelChange:
        return self._change("add_model", config)

    def remove_model(self, alias: str) -> ModelChange:
        return self._change("remove_model", alias)

    def pin_model(self, alias: str, pinned: bool) -> ModelChange:
        return self._change("pin_model", alias, pinned)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CliRunner, Any, ModelsRuntime]:
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    (tmp_path / "empty.toml").write_text("")
    holder: dict[str, ModelsRuntime] = {}

    def runtime_for(settings: RuntimeSettings) -> Any:
        holder.setdefault("rt", ModelsRuntime(settings))
        return holder["rt"]

    app = create_app(runtime_for)
    runtime_for(RuntimeSettings(data_dir=tmp_path / "data"))
    return CliRunner(), app, holder["rt"]


def _audit(rt: ModelsRuntime) -> list[dict[str, Any]]:
    path = rt.settings.data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_list_prints_every_model_and_its_state(cli: tuple[CliRunner, Any, ModelsRuntime]) -> None:
    runner, app, _ = cli
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)["data"]
    assert [(r["alias"], r["state"], r["pinned"]) for r in rows] == [("chat", "loaded", False),
                                                                      ("coder", "unloaded", True)]
    table = runner.invoke(app, ["models", "list"]).stdout
    assert "coder" in table and "swap hosts" in table and "2.0 GiB" in table and "300.0 MiB" in table


def test_add_passes_a_parsed_model_and_audits(cli: tuple[CliRunner, Any, ModelsRuntime], tmp_path: Path) -> None:
    runner, app, rt = cli
    result = runner.invoke(app, ["models", "add", str(tmp_path / "m.gguf"), "--alias", "coder", "--slots", "4",
                                 "--context", "16384", "--on-demand", "--pin", "--allowed-sha256", "AB" * 32,
                                 "--gpu", "1", "--gpu", "0"])
    assert result.exit_code == 0, result.output
    verb, (config,) = rt.calls[-1]
    assert verb == "add_model" and config == ModelConfig(
        alias="coder", path=(tmp_path / "m.gguf").resolve(), slots=4, n_ctx=16384, resident="on_demand", pinned=True,
        allowed_sha256=["ab" * 32], gpus=[1, 0])
    assert [(r["action"], r["target"], r["outcome"]) for r in _audit(rt)] == [("model.add", "coder", "ok")]


def test_a_bad_alias_is_refused_before_the_runtime(cli: tuple[CliRunner, Any, ModelsRuntime]) -> None:
    runner, app, rt = cli
    result = runner.invoke(app, ["models", "add", "/m.gguf", "--alias", "../../etc"])
    assert result.exit_code == 2 and "invalid model: alias" in result.output and rt.calls == []


def test_a_refusal_keeps_its_arithmetic_and_is_audited(cli: tuple[CliRunner, Any, ModelsRuntime]) -> None:
    runner, app, rt = cli
    rt.failure = REFUSAL
    result = runner.invoke(app, ["models", "add", "/m.gguf", "--alias", "huge"])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "([models] memory_budget)" in said and "64 slots x 65536 tokens x 18.0 KiB KV = 72.2 GiB" in said
    assert [(r["action"], r["outcome"]) for r in _audit(rt)] == [("model.add", "refused")]


def test_remove_pin_and_unpin(cli: tuple[CliRunner, Any, ModelsRuntime]) -> None:
    runner, app, rt = cli
    for args in (["remove", "coder"], ["pin", "coder"], ["unpin", "coder"]):
        assert runner.invoke(app, ["models", *args]).exit_code == 0
    assert rt.calls == [("remove_model", ("coder",)), ("pin_model", ("coder", True)), ("pin_model", ("coder", False))]
    assert [r["action"] for r in _audit(rt)] == ["model.remove", "model.pin", "model.pin"]


def test_up_reset_forgets_the_model_changes_too(cli: tuple[CliRunner, Any, ModelsRuntime]) -> None:
    runner, app, rt = cli
    run_dir = rt.settings.run_dir
    write_changes(run_dir, {"added": {}, "removed": ["chat"], "pinned": {}})
    assert runner.invoke(app, ["up"]).exit_code == 0
    assert read_changes(run_dir)["removed"] == ["chat"]
    assert runner.invoke(app, ["up", "--reset"]).exit_code == 0
    assert read_changes(run_dir) == {"added": {}, "removed": [], "pinned": {}}
