"""Which models the stack serves and which worker serves what: the catalogue as the runtimes plan it.

The configured models are ``[[models.entry]]`` (:mod:`appliance.core.model_settings`), else the single
model of ``[worker]``/``up --model`` as one resident entry on every worker (``legacy``: its workers get
exactly the environment they always had). What ``appliance models add|remove|pin`` changed on a running
stack is remembered in ``data/run/models.json`` and applied over the file by every later verb, as ``up``'s
flags are in ``stack.json``; ``appliance up --reset`` forgets both.

Worker programs stay ``inference-1..N`` (ports ``worker_base_port + i - 1``): first each resident entry's
workers in catalogue order, then the swap hosts, so `restart inference`, `status` and the balancer's
registry treat them as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.core.gguf_header import GGUFError, kv_shape
from appliance.core.model_catalogue import CatalogueEntry
from appliance.core.model_files import sha256_file
from appliance.core.model_settings import ModelConfig, ModelsSettings
from appliance.core.settings import ConfigError, load_settings
from appliance.runtime.budget import Budget, Fit, fit, host_memory, swap_host_bytes
from appliance.runtime.protocol import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings, WorkerModelView

__all__ = [
    "ModelPlan",
    "WorkerRole",
    "apply_changes",
    "catalogue_plan",
    "describe",
    "forget_changes",
    "models_settings",
    "plan_models",
    "read_changes",
    "write_changes",
]

_CHANGES = "models.json"
_HASHES = "model_hashes.json"


@dataclass(frozen=True)
class WorkerRole:
    """What one worker program runs: a resident entry, or a swap host starting with ``entry`` loaded."""

    entry: CatalogueEntry
    config: ModelConfig
    swap_host: bool = False
    memory_bytes: int = 0
    gpu: int | None = None  # the GPU this worker runs on (the entry's ``gpus``, one worker after another)


@dataclass(frozen=True)
class ModelPlan:
    entries: tuple[CatalogueEntry, ...]
    configs: tuple[ModelConfig, ...]
    roles: tuple[WorkerRole, ...]
    fit: Fit
    legacy: bool  # the single model of [worker]: its workers' environment as before multi-model

    def config(self, alias: str) -> ModelConfig | None:
        return next((c for c in self.configs if c.alias == alias), None)


# -- remembered CLI changes ------------------------------------------------------------------------------


def read_changes(run_dir: Path) -> dict[str, Any]:
    """``{"added": {alias: config}, "removed": [alias], "pinned": {alias: bool}}`` (empty when none)."""
    try:
        state = json.loads((run_dir / _CHANGES).read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict):
        state = {}
    return {"added": dict(state.get("added") or {}), "removed": list(state.get("removed") or []),
            "pinned": dict(state.get("pinned") or {})}


def write_changes(run_dir: Path, changes: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / _CHANGES
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(changes, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def forget_changes(run_dir: Path) -> None:
    (run_dir / _CHANGES).unlink(missing_ok=True)


def apply_changes(configs: Sequence[ModelConfig], changes: dict[str, Any]) -> list[ModelConfig]:
    """The configured models with the remembered adds, removals and pins applied."""
    removed = set(changes["removed"])
    merged = {c.alias: c for c in configs if c.alias not in removed}
    for alias, raw in changes["added"].items():
        try:
            merged[alias] = ModelConfig.model_validate(raw)
        except ValidationError as exc:
            raise RuntimeFailure(f"data/run/{_CHANGES}: the added model {alias!r} is invalid ({exc})") from None
    for alias, pinned in changes["pinned"].items():
        if alias in merged:
            merged[alias] = merged[alias].model_copy(update={"pinned": bool(pinned)})
    return list(merged.values())


# -- one entry from one file -----------------------------------------------------------------------------


def _file_facts(path: Path, run_dir: Path) -> tuple[str, int]:
    """The file's sha256 and KV bytes per token, remembered by (size, mtime, inode) in data/run so `status` and
    `restart` neither rehash many GiB nor walk the GGUF's vocabulary again; the worker checks the hash itself
    before it loads the file."""
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_path = run_dir / _HASHES
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    known = cache.get(key)
    if (isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str)
            and isinstance(known.get("kv_bytes_per_token"), int)):
        return str(known["sha256"]), int(known["kv_bytes_per_token"])
    try:
        kv = kv_shape(path).bytes_per_token
    except GGUFError as exc:
        raise RuntimeFailure(str(exc)) from None
    digest = sha256_file(path)
    cache[key] = {"stamp": stamp, "sha256": digest, "kv_bytes_per_token": kv}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(cache_path)
    return digest, kv


def describe(config: ModelConfig, run_dir: Path, worker_path: str | None = None) -> CatalogueEntry:
    """The catalogue entry of ``config``: the file's size and sha256 (checked against ``allowed_sha256``) and
    its KV bytes per token from the GGUF header. ``worker_path``: the path as the worker sees it (compose)."""
    path = config.path
    if not path.is_file():
        raise RuntimeFailure(f"model {config.alias}: the file {path} does not exist")
    try:
        digest, kv_bytes = _file_facts(path, run_dir)
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"model {config.alias}: {exc}") from None
    if config.allowed_sha256 and digest not in config.allowed_sha256:
        raise RuntimeFailure(
            f"model {config.alias}: the sha256 of {path} is {digest}, which allowed_sha256 does not list"
        )
    return CatalogueEntry(
        alias=config.alias, path=worker_path or str(path.resolve()), sha256=digest, size_bytes=path.stat().st_size,
        slots=config.slots_or_default, n_ctx=config.n_ctx_or_default, resident=config.resident,
        workers=config.workers, pinned=config.pinned, kv_bytes_per_token=kv_bytes,
    )


# -- the plan --------------------------------------------------------------------------------------------


def plan_models(configs: Sequence[ModelConfig], models: ModelsSettings, run_dir: Path, *, legacy: bool = False,
                budget: Budget | None = None, worker_paths: dict[str, str] | None = None) -> ModelPlan:
    """Entries, budget check and worker roles; a catalogue that does not fit is a RuntimeFailure with the
    arithmetic."""
    entries = tuple(describe(c, run_dir, (worker_paths or {}).get(c.alias)) for c in configs)
    checked = fit(entries, budget or host_memory(models.memory_budget), models.swap_hosts)
    if not checked.fits and not legacy:  # the one-model stack of before starts as it always did
        raise RuntimeFailure("the models do not fit: " + checked.message())
    roles: list[WorkerRole] = []
    for entry, config in zip(entries, configs, strict=True):
        if entry.resident == "always":
            gpus = config.gpus
            roles += [WorkerRole(entry, config, gpu=gpus[i % len(gpus)] if gpus else None)
                      for i in range(entry.workers)]
    on_demand = [(e, c) for e, c in zip(entries, configs, strict=True) if e.resident == "on_demand"]
    host_bytes = swap_host_bytes(entries)
    for index in range(checked.swap_hosts):
        entry, config = on_demand[index % len(on_demand)]
        roles.append(WorkerRole(entry, config, swap_host=True, memory_bytes=host_bytes))
    return ModelPlan(entries, tuple(configs), tuple(roles), checked, legacy)


def models_settings() -> ModelsSettings:
    try:
        return load_settings(ModelsSettings)
    except ConfigError as exc:
        raise RuntimeFailure(str(exc)) from None


def legacy_config(settings: RuntimeSettings, served: RuntimeSettings, path: Path) -> ModelConfig | None:
    """The single model of ``[worker]``/``up --model`` as a catalogue entry on every worker (None when its
    alias is not a valid model id: such a stack runs as before, without a catalogue)."""
    try:
        view = load_settings(WorkerModelView)
    except ConfigError as exc:
        raise RuntimeFailure(str(exc)) from None
    try:
        return ModelConfig(alias=served.model_alias or "", path=path, slots=served.worker_slots, n_ctx=view.n_ctx,
                           workers=settings.workers, resident="always")
    except ValidationError:
        return None


def catalogue_plan(settings: RuntimeSettings, served: RuntimeSettings, path: Path,
                   worker_paths: dict[str, str] | None = None) -> ModelPlan | None:
    """The models this stack serves and its workers' roles. The single model of ``[worker]`` is a ``legacy``
    plan, or None when its file cannot be described: that stack runs as it always did."""
    models = models_settings()
    legacy = legacy_config(settings, served, path)
    changes = read_changes(settings.run_dir)
    if not models.entry and legacy is None:
        if changes["added"]:
            raise RuntimeFailure("the served model's alias is not a valid model id, so no model can be added")
        return None
    base = list(models.entry) or ([legacy] if legacy is not None else [])
    configs = apply_changes(base, changes)
    if not configs:
        raise RuntimeFailure("no model left to serve: every configured model was removed (`appliance models add`)")
    is_legacy = not models.entry and legacy is not None and configs == [legacy]
    if is_legacy:
        try:
            return plan_models(configs, models, settings.run_dir, legacy=True, worker_paths=worker_paths)
        except RuntimeFailure:
            return None
    return plan_models(configs, models, settings.run_dir, worker_paths=worker_paths)
