"""`appliance models add|remove|pin` on the running local stack: live, by the rules of `restart inference`.

A change is remembered (``data/run/models.json``), then applied: the worker programs are planned again and
only those whose model changed move: a new program starts and is admitted by the balancer; a program whose
model changed is drained, restarted on its new model and admitted again, one at a time; a program no longer
planned stops (it withdraws, the balancer drains it, it finishes every running request, it exits). The
gateway and the balancer are never restarted. The catalogue in Redis gains an entry before its workers start
and loses one only after its workers drained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from appliance.core.hop import INTERNAL_TOKEN_HEADER
from appliance.core.model_catalogue import entry_bytes
from appliance.core.model_settings import ModelConfig
from appliance.runtime.local.rolling import BalancerView, start_and_admit, worker_replace
from appliance.runtime.model_changes import check_add, check_pin, check_remove, record_add, record_pin, record_remove
from appliance.runtime.models import ModelPlan, models_settings, plan_models, read_changes, write_changes
from appliance.runtime.plan import Program
from appliance.runtime.protocol import ModelChange, ModelRow, RuntimeFailure

if TYPE_CHECKING:
    from appliance.runtime.local.runtime import LocalRuntime

__all__ = ["add_model", "list_models", "pin_model", "remove_model"]

# What makes a worker program serve another model. Not a move: its thread count (it follows the worker count) and
# the sha256 pin the single-model stack's workers gain with a second model (same file; a one-worker stack would
# otherwise restart its only worker); both apply at the next `restart inference`.
_MODEL_ENV = ("APPLIANCE_WORKER_MODEL_PATH", "APPLIANCE_WORKER_MODEL_ALIAS", "APPLIANCE_WORKER_SLOTS",
              "APPLIANCE_WORKER_N_CTX", "APPLIANCE_WORKER_SWAP_HOST", "APPLIANCE_WORKER_INITIAL_MODEL",
              "APPLIANCE_WORKER_MEMORY_BYTES", "APPLIANCE_WORKER_MAIN_GPU")


def _current(runtime: LocalRuntime) -> ModelPlan:
    if not runtime.supervisor.alive():
        raise RuntimeFailure("the stack is not running; `appliance up` first")
    plan = runtime.model_plan()
    if plan is None:
        raise RuntimeFailure("the served model has no catalogue entry (its alias is not a valid model id, or its "
                             "file is not a GGUF this version reads)")
    return plan


def _workers(plan: list[Program]) -> dict[str, Program]:
    return {p.name: p for p in plan if p.stage == "inference"}


def _model_env(program: Program) -> tuple[str | None, ...]:
    return tuple(program.env.get(name) for name in _MODEL_ENV)


def _roll(runtime: LocalRuntime, before: dict[str, Program], *, publish_first: bool) -> tuple[list[str], list[str]]:
    """Move the worker programs to the current plan; (started, stopped) program names."""
    if publish_first:
        runtime.publish_catalogue()
    plan = runtime.plan()
    runtime.write_files(plan)
    supervisor = runtime.supervisor
    added, _changed, removed = supervisor.reload_config()
    after = _workers(plan)
    moved = sorted((n for n in after if n in before and _model_env(after[n]) != _model_env(before[n])),
                   key=lambda n: int(n.rsplit("-", 1)[1]))
    view = BalancerView(f"http://127.0.0.1:{runtime.settings.balancer_port}",
                        runtime.settings.resolved_internal_token())
    started = sorted((n for n in added if n in after), key=lambda n: int(n.rsplit("-", 1)[1]))
    try:
        for name in started:
            supervisor.add_group(name)
            start_and_admit(runtime, view, after[name])
        for name in moved:
            worker_replace(runtime, view, after[name], reload_group=True)
    finally:
        view.close()
    stopped = [n for n in removed if n in before]
    runtime.stop_together(stopped)
    for name in stopped:
        supervisor.remove_group(name)
    if not publish_first:
        runtime.publish_catalogue()
    return started + moved, stopped


def _change(runtime: LocalRuntime, alias: str, action: str, mutate: Any, *, publish_first: bool) -> ModelChange:
    run_dir = runtime.settings.run_dir
    before = _workers(runtime.plan())
    saved = read_changes(run_dir)
    changes = read_changes(run_dir)
    mutate(changes)
    write_changes(run_dir, changes)
    try:
        plan = runtime.model_plan()  # checks the files and the budget before anything moves
        if plan is None:
            raise RuntimeFailure("the catalogue cannot be planned any more")
    except BaseException:
        write_changes(run_dir, saved)
        raise
    try:
        started, stopped = _roll(runtime, before, publish_first=publish_first)
    except (RuntimeFailure, httpx.HTTPError) as exc:
        write_changes(run_dir, saved)
        raise RuntimeFailure(f"{exc}\nthe change is not remembered; `appliance up` brings the workers back to the "
                             "catalogue before it") from None
    return ModelChange(alias, action, plan.fit.message(), started, stopped)


def add_model(runtime: LocalRuntime, config: ModelConfig) -> ModelChange:
    current = _current(runtime)
    check_add(current, config)
    # The whole check (file, sha256 against allowed_sha256, GGUF, budget) before anything is remembered.
    plan_models([*current.configs, config], models_settings(), runtime.settings.run_dir)
    return _change(runtime, config.alias, "added", lambda changes: record_add(changes, config), publish_first=True)


def remove_model(runtime: LocalRuntime, alias: str) -> ModelChange:
    check_remove(_current(runtime), alias)
    return _change(runtime, alias, "removed", lambda changes: record_remove(changes, alias), publish_first=False)


def pin_model(runtime: LocalRuntime, alias: str, pinned: bool) -> ModelChange:
    check_pin(_current(runtime), alias)
    return _change(runtime, alias, "pinned" if pinned else "unpinned",
                   lambda changes: record_pin(changes, alias, pinned), publish_first=True)


def balancer_models(base_url: str, token: str) -> dict[str, dict[str, Any]]:
    """The balancer's /v1/models objects by id (contract C3); empty when it does not answer."""
    try:
        reply = httpx.get(f"{base_url}/v1/models", headers={INTERNAL_TOKEN_HEADER: token}, timeout=5)
        reply.raise_for_status()
        data = reply.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}
    return {str(m["id"]): m for m in data if isinstance(m, dict) and "id" in m}


def list_models(runtime: LocalRuntime) -> list[ModelRow]:
    plan = runtime.model_plan()
    if plan is None:
        return []
    settings = runtime.settings
    live = balancer_models(f"http://127.0.0.1:{settings.balancer_port}", settings.resolved_internal_token())
    return [
        ModelRow(alias=e.alias, resident=e.resident, pinned=e.pinned, workers=e.workers if e.resident == "always"
                 else 0, state=str(live.get(e.alias, {}).get("state", "unknown")), memory_bytes=entry_bytes(e),
                 path=e.path, sha256=e.sha256, serving=list(live.get(e.alias, {}).get("workers") or []))
        for e in plan.entries
    ]
