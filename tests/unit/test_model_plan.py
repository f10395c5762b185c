"""The model catalogue as configured and planned: [models] settings, the GGUF's KV size, the memory budget
and its arithmetic, and which worker serves what (on the real bundled GGUF)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.core.gguf_header import GGUFError, kv_shape
from appliance.core.model_catalogue import CatalogueEntry, entry_bytes
from appliance.core.model_settings import ModelConfig, ModelsSettings, parse_bytes
from appliance.core.settings import ConfigError, load_settings
from appliance.runtime.budget import Budget, fit, host_memory, human_bytes
from appliance.runtime.models import apply_changes, plan_models, read_changes, write_changes
from appliance.runtime.plan import build_plan
from appliance.runtime.protocol import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings
from tests.support.processes import REPO

GIB = 1 << 30
TOKEN = "model-plan-test-internal-token-0123456789abc"


def _settings(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> ModelsSettings:
    config = tmp_path / "appliance.toml"
    config.write_text(text)
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    return load_settings(ModelsSettings)


def test_models_table_and_its_entries_parse_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _settings(tmp_path, """
[models]
memory_budget = "2GiB"
max_swap_wait_s = 12
swap_policy = "fcfs"

[[models.entry]]
alias = "chat"
path = "/srv/a.gguf"
context = 4096
slots = 4

[[models.entry]]
alias = "org/code"
path = "/srv/b.gguf"
resident = "on_demand"
allowed_sha256 = ["AB%s"]
""" % ("ab" * 31), monkeypatch)
    assert models.memory_budget == 2 * GIB and models.max_swap_wait_s == 12 and models.swap_policy == "fcfs"
    chat, code = models.entry
    assert (chat.alias, chat.n_ctx, chat.slots, chat.resident, chat.workers) == ("chat", 4096, 4, "always", 1)
    assert (code.resident, code.allowed_sha256, code.slots_or_default) == ("on_demand", ["ab" * 32], 8)


def test_the_list_form_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = _settings(tmp_path, '[[models]]\nalias = "a"\npath = "/a.gguf"\n\n[[models]]\nalias = "b"\n'
                       'path = "/b.gguf"\n', monkeypatch)
    assert [m.alias for m in models.entry] == ["a", "b"]
    monkeypatch.setenv("APPLIANCE_MODELS_ENTRY", '[{"alias": "c", "path": "/c.gguf", "workers": 2}]')
    monkeypatch.setenv("APPLIANCE_MODELS_MEMORY_BUDGET", "512MiB")
    models = load_settings(ModelsSettings)
    assert [(m.alias, m.workers) for m in models.entry] == [("c", 2)] and models.memory_budget == 512 << 20


@pytest.mark.parametrize(("text", "named"), [
    ('[[models]]\nalias = "a"\npath = "/a"\n[[models]]\nalias = "a"\npath = "/b"\n', "listed twice"),
    ('[[models]]\nalias = "../x"\npath = "/a"\n', "alias"),
    ('[[models]]\nalias = "a"\npath = "/a"\nresident = "sometimes"\n', "resident"),
    ('[[models]]\nalias = "a"\npath = "/a"\nallowed_sha256 = ["nothex"]\n', "64 hex digits"),
    ('[[models]]\nalias = "a"\npath = "/a"\nslots = 0\n', "slots"),
    ('[[models]]\nalias = "a"\npath = "/a"\ngpus = 2\n', "gpus"),
    ('[models]\nmemory_budget = "lots"\n', "memory_budget"),
])
def test_bad_model_configuration_names_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        _settings(tmp_path, text, monkeypatch)


def test_sizes() -> None:
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("16 GB") == 16 * 10**9 and parse_bytes(1024) == 1024
    assert parse_bytes("1.5GiB") == 3 * GIB // 2
    with pytest.raises(ValueError, match="a size"):
        parse_bytes("12 parsecs")
    found = host_memory(None)
    assert found.bytes > 0 and (found.source == "host RAM" or found.source.startswith("GPU memory"))
    assert host_memory(3 * GIB) == Budget(3 * GIB, "[models] memory_budget")


def test_the_kv_size_comes_from_the_gguf_header(model_path: Path, tmp_path: Path) -> None:
    shape = kv_shape(model_path)
    # Gemma 3 270M: 18 layers, 1 KV head of 256: 18 KiB per token (the README's figure).
    assert (shape.architecture, shape.layers, shape.kv_heads, shape.key_length) == ("gemma3", 18, 1, 256)
    assert shape.bytes_per_token == 18 * 1024
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:4096])
    for bad, message in ((cut, "cut short"), (Path(__file__), "not a GGUF"), (tmp_path / "none", "cannot read")):
        with pytest.raises(GGUFError, match=message):
            kv_shape(bad)


def _configs(model_path: Path, copy: Path) -> list[ModelConfig]:
    return [
        ModelConfig(alias="chat", path=model_path, slots=2, n_ctx=2048, workers=2, gpus=[1, 0]),
        ModelConfig(alias="chat-copy", path=copy, slots=2, n_ctx=2048, resident="on_demand"),
        ModelConfig(alias="chat-third", path=model_path, slots=4, n_ctx=4096, resident="on_demand"),
    ]


def test_workers_per_model_and_swap_hosts_from_the_budget(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, copy)
    configs = _configs(model_path, copy)
    run = tmp_path / "run"
    roomy = plan_models(configs, ModelsSettings(), run, budget=Budget(64 * GIB, "test"))
    chat, copied, third = roomy.entries
    assert chat.sha256 == copied.sha256 and chat.size_bytes == model_path.stat().st_size
    assert entry_bytes(chat) == chat.size_bytes + 2 * 2048 * 18432
    # Two resident workers, then one swap host per on_demand entry (the budget allows both), each sized for the
    # largest on_demand entry and starting with a different one.
    assert [(r.entry.alias, r.swap_host) for r in roomy.roles] == [
        ("chat", False), ("chat", False), ("chat-copy", True), ("chat-third", True)]
    assert {r.memory_bytes for r in roomy.roles if r.swap_host} == {entry_bytes(third)}
    tight = Budget(2 * entry_bytes(chat) + entry_bytes(third) + 1, "test")
    assert [r.swap_host for r in plan_models(configs, ModelsSettings(), run, budget=tight).roles] == [
        False, False, True]
    too_small = Budget(2 * entry_bytes(chat) + entry_bytes(third) - 1, "[models] memory_budget")
    with pytest.raises(RuntimeFailure) as refused:
        plan_models(configs, ModelsSettings(), run, budget=too_small)
    message = str(refused.value)
    # The arithmetic, each term named, in MiB/GiB.
    for term in ("does not fit the memory budget", "[models] memory_budget", "2 workers x (chat:", "MiB weights",
                 "2 slots x 2048 tokens x 18.0 KiB KV", "1 swap host x", "largest on_demand entry, chat-third",
                 "total"):
        assert term in message, (term, message)


def test_a_file_not_in_allowed_sha256_is_refused(model_path: Path, tmp_path: Path) -> None:
    config = ModelConfig(alias="chat", path=model_path, allowed_sha256=["00" * 32])
    with pytest.raises(RuntimeFailure, match="allowed_sha256 does not list"):
        plan_models([config], ModelsSettings(), tmp_path, budget=Budget(64 * GIB, "test"))
    missing = ModelConfig(alias="gone", path=tmp_path / "gone.gguf")
    with pytest.raises(RuntimeFailure, match="does not exist"):
        plan_models([missing], ModelsSettings(), tmp_path, budget=Budget(64 * GIB, "test"))


def test_each_worker_program_runs_its_entry(model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, copy)
    models = plan_models(_configs(model_path, copy), ModelsSettings(), tmp_path / "run", budget=Budget(64 * GIB, "t"))
    settings = RuntimeSettings(data_dir=tmp_path / "data", internal_token=TOKEN, worker_threads=1)
    workers = [p for p in build_plan(settings, model_path, models.roles) if p.stage == "inference"]
    assert [w.name for w in workers] == ["inference-1", "inference-2", "inference-3", "inference-4"]
    assert [w.env["APPLIANCE_WORKER_PORT"] for w in workers] == ["8201", "8202", "8203", "8204"]
    assert [w.env.get("APPLIANCE_WORKER_MODEL_ALIAS") or w.env["APPLIANCE_WORKER_INITIAL_MODEL"]
            for w in workers] == ["chat", "chat", "chat-copy", "chat-third"]
    assert [w.env.get("APPLIANCE_WORKER_MODEL_PATH") for w in workers] == [str(model_path.resolve())] * 2 + [None] * 2
    assert {w.env["APPLIANCE_WORKER_ALLOWED_SHA256"] for w in workers[:2]} == {models.entries[0].sha256}
    assert workers[0].env["APPLIANCE_WORKER_N_CTX"] == "2048" and "APPLIANCE_WORKER_SWAP_HOST" not in workers[0].env
    assert [w.env.get("APPLIANCE_WORKER_MAIN_GPU") for w in workers] == ["1", "0", None, None]  # gpus = [1, 0]
    # A swap host takes each entry (file, sha256, slots, n_ctx) from the signed catalogue, so adding an on_demand
    # entry does not restart it; its memory follows the largest on_demand entry.
    assert workers[2].env["APPLIANCE_WORKER_INITIAL_MODEL"] == "chat-copy"
    assert not {"APPLIANCE_WORKER_ALLOWED_SHA256", "APPLIANCE_WORKER_N_CTX"} & set(workers[3].env)
    assert workers[3].env["APPLIANCE_WORKER_SWAP_HOST"] == "true"
    assert workers[3].env["APPLIANCE_WORKER_INITIAL_MODEL"] == "chat-third"
    assert int(workers[3].env["APPLIANCE_WORKER_MEMORY_BYTES"]) == entry_bytes(models.entries[2])


def test_remembered_cli_changes_apply_over_the_file(model_path: Path, tmp_path: Path) -> None:
    base = [ModelConfig(alias="a", path=model_path), ModelConfig(alias="b", path=model_path, resident="on_demand")]
    assert read_changes(tmp_path) == {"added": {}, "removed": [], "pinned": {}}
    write_changes(tmp_path, {"added": {"c": {"alias": "c", "path": str(model_path), "resident": "on_demand"}},
                             "removed": ["a"], "pinned": {"b": True}})
    merged = apply_changes(base, read_changes(tmp_path))
    assert [(m.alias, m.pinned) for m in merged] == [("b", True), ("c", False)]


def test_compose_gets_one_worker_service_per_role(model_path: Path, tmp_path: Path) -> None:
    from appliance.runtime.compose.models import IMAGE_MODEL, render_override, worker_path

    data = tmp_path / "data"
    (data / "models" / "team").mkdir(parents=True)
    copy = data / "models" / "team" / "copy.gguf"
    shutil.copyfile(model_path, copy)
    assert worker_path(copy, data) == "/data/models/team/copy.gguf"
    assert worker_path(data / "models" / model_path.name, data) == IMAGE_MODEL  # the image's own copy
    with pytest.raises(RuntimeFailure, match="outside"):
        worker_path(model_path, data)
    configs = _configs(copy, copy)
    paths = {c.alias: worker_path(c.path, data) for c in configs}
    models = plan_models(configs, ModelsSettings(), tmp_path / "run", budget=Budget(64 * GIB, "t"), worker_paths=paths)
    import json

    services = json.loads(render_override(models, 2).split("\n", 1)[1])["services"]
    assert sorted(services) == ["inference-1", "inference-2", "inference-3", "inference-4"]
    assert list(services["inference-2"]) == ["environment"]  # compose.yaml's own services only get their model
    # A worker compose.yaml does not define is compose.yaml's worker, with its own name and model.
    import yaml

    own = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["inference-1"]
    extra = services["inference-3"]
    assert {k: v for k, v in own.items() if k not in ("build", "environment")} == {
        k: v for k, v in extra.items() if k != "environment"}
    ours = services["inference-1"]["environment"]  # what the model plan sets on every worker
    theirs = {k: v for k, v in own["environment"].items() if k not in ours}
    assert {k: v for k, v in extra["environment"].items() if k in theirs} == theirs
    assert services["inference-2"]["environment"]["APPLIANCE_WORKER_MODEL_PATH"] == "/data/models/team/copy.gguf"
    env = services["inference-4"]["environment"]
    assert env["APPLIANCE_WORKER_ADVERTISE_URL"] == "http://inference-4:8201"
    assert (env["APPLIANCE_WORKER_SWAP_HOST"], env["APPLIANCE_WORKER_INITIAL_MODEL"]) == ("true", "chat-third")


def test_file_facts_are_remembered_until_the_file_changes(model_path: Path, tmp_path: Path) -> None:
    from appliance.runtime.models import describe

    copy = tmp_path / "m.gguf"
    shutil.copyfile(model_path, copy)
    config = ModelConfig(alias="m", path=copy)
    first = describe(config, tmp_path / "run")
    assert describe(config, tmp_path / "run") == first and (tmp_path / "run" / "model_hashes.json").is_file()
    with copy.open("ab") as handle:  # the file changes: hashed again, never the remembered value
        handle.write(b"\0")
    changed = describe(config, tmp_path / "run")
    assert changed.sha256 != first.sha256 and changed.size_bytes == first.size_bytes + 1


_entries = st.lists(st.builds(
    lambda i, size, slots, ctx, kv, workers, on_demand: CatalogueEntry(
        alias=f"m{i}", path="/m.gguf", sha256="ab" * 32, size_bytes=size, slots=slots, n_ctx=ctx,
        kv_bytes_per_token=kv, workers=workers, resident="on_demand" if on_demand else "always"),
    st.integers(0, 10**6), st.integers(0, 64 * GIB), st.integers(1, 256), st.integers(64, 1 << 20),
    st.integers(0, 1 << 20), st.integers(1, 8), st.booleans()), max_size=6, unique_by=lambda e: e.alias)


@given(_entries, st.integers(1, 1 << 44))
def test_the_budget_arithmetic_adds_up(entries: list[CatalogueEntry], budget: int) -> None:
    checked = fit(entries, Budget(budget, "test"))
    on_demand = [e for e in entries if e.resident == "on_demand"]
    resident = sum(entry_bytes(e) * e.workers for e in entries if e.resident == "always")
    largest = max((entry_bytes(e) for e in on_demand), default=0)
    assert checked.used == resident + checked.swap_hosts * largest
    assert checked.fits == (checked.used <= budget)
    assert (checked.swap_hosts >= 1) == bool(on_demand) and checked.swap_hosts <= len(on_demand)
    if checked.fits and on_demand and checked.swap_hosts < len(on_demand):
        assert resident + (checked.swap_hosts + 1) * largest > budget  # as many hosts as the budget allows
    assert checked.lines[-1] == f"total {human_bytes(checked.used)} of {human_bytes(budget)}"


def test_compose_models_add_then_remove_move_only_the_workers(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `models add|remove --runtime compose` asks of the engine (the real engine: test_compose_appliance.py)."""
    from appliance.runtime.compose import ComposeRuntime
    from appliance.runtime.compose.models import override_path
    from tests.support.compose_engine import FakeEngine

    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    (tmp_path / "empty.toml").write_text("")
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    shutil.copyfile(model_path, data / "models" / "second.gguf")
    rt = ComposeRuntime(RuntimeSettings(data_dir=data, compose_file=REPO / "compose.yaml", internal_token=TOKEN),
                        engine=FakeEngine())
    running = {name: {"Id": f"id-{name}", "State": {"Running": True, "Health": {"Status": "healthy"}}}
               for name in ("redis", "inference-1", "inference-2", "balancer", "gateway")}
    monkeypatch.setattr(rt, "containers", lambda: running)
    monkeypatch.setattr(rt, "wait_healthy", lambda names, timeout=None: None)
    config = ModelConfig(alias="chat-b", path=data / "models" / "second.gguf", slots=2)
    change = rt.add_model(config)
    calls = rt.docker.calls  # type: ignore[attr-defined]
    composed = [c[1:] for c in calls if c[0] == "compose" and c[1] == "up"]
    # Both legacy workers gain their model's pin one at a time (each drained first), the third starts.
    assert composed == [("up", "-d", "--no-deps", "inference-3"),
                        ("up", "-d", "--no-deps", "--force-recreate", "-t", "90", "inference-1"),
                        ("up", "-d", "--no-deps", "--force-recreate", "-t", "90", "inference-2")], composed
    assert (change.started, change.stopped) == (["inference-3", "inference-1", "inference-2"], [])
    hset = [c for c in calls if c[0] == "exec" and "HSET" in c]
    assert sorted(c[c.index("HSET") + 2] for c in hset) == ["chat-b", "gemma-3-270m"]  # signed entries, via redis-cli
    assert override_path(rt).is_file() and "inference-3" in rt.files()[-1].read_text()
    running["inference-3"] = running["inference-1"] | {"Id": "id-inference-3"}
    calls.clear()
    change = rt.remove_model("chat-b")
    assert change.stopped == ["inference-3"] and ("stop", "-t", "90", "id-inference-3") in calls
    assert not override_path(rt).exists()  # back to compose.yaml's one model: nothing generated
    assert [c for c in calls if c[0] == "exec" and "HDEL" in c] == []  # (HKEYS answered nothing in the fake)
