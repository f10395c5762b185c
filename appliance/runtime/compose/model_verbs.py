"""`appliance models list|add|remove|pin --runtime compose`: the local runtime's model verbs on containers.

The change is remembered (``data/run/models.json``, as on the local runtime), planned (files under
``data/models``, sha256, budget) and applied by :func:`appliance.runtime.compose.models.apply_plan`: the
gateway, balancer and Redis containers are never touched; worker containers start, move one at a time, or stop
after draining.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from appliance.core.model_catalogue import entry_bytes
from appliance.core.model_settings import ModelConfig
from appliance.runtime.compose.models import apply_plan, compose_model_plan, written_workers
from appliance.runtime.model_changes import check_add, check_pin, check_remove, record_add, record_pin, record_remove
from appliance.runtime.models import ModelPlan, read_changes, write_changes
from appliance.runtime.protocol import ModelChange, ModelRow, RuntimeFailure

if TYPE_CHECKING:
    from appliance.runtime.compose.runtime import ComposeRuntime

__all__ = ["add_model", "list_models", "pin_model", "remove_model"]


def _current(rt: ComposeRuntime) -> ModelPlan:
    plan = compose_model_plan(rt, assemble=True)
    if plan is None:
        raise RuntimeFailure("compose.yaml's model has no catalogue entry: copy it to data/models, or name the "
                             "models in [[models.entry]] of appliance.toml")
    return plan


def _change(rt: ComposeRuntime, alias: str, action: str, mutate: Any, *, publish_first: bool) -> ModelChange:
    run_dir = rt.settings.run_dir
    before = written_workers(rt)
    saved = read_changes(run_dir)
    changes = read_changes(run_dir)
    mutate(changes)
    write_changes(run_dir, changes)
    try:
        plan = _current(rt)
        started, stopped = apply_plan(rt, plan, before, publish_first=publish_first)
    except BaseException:
        write_changes(run_dir, saved)
        raise
    return ModelChange(alias, action, plan.fit.message(), started, stopped)


def add_model(rt: ComposeRuntime, config: ModelConfig) -> ModelChange:
    check_add(_current(rt), config)
    return _change(rt, config.alias, "added", lambda changes: record_add(changes, config), publish_first=True)


def remove_model(rt: ComposeRuntime, alias: str) -> ModelChange:
    check_remove(_current(rt), alias)
    return _change(rt, alias, "removed", lambda changes: record_remove(changes, alias), publish_first=False)


def pin_model(rt: ComposeRuntime, alias: str, pinned: bool) -> ModelChange:
    check_pin(_current(rt), alias)
    return _change(rt, alias, "pinned" if pinned else "unpinned", lambda changes: record_pin(changes, alias, pinned),
                   publish_first=True)


def gateway_models(rt: ComposeRuntime) -> dict[str, dict[str, Any]]:
    """The gateway's /v1/models (the balancer's states, contract C3) with the admin key; empty when unreachable."""
    try:
        key = rt.admin_key_file.read_text().strip()
        url, auth = f"{rt.gateway_url}/v1/models", {"Authorization": f"Bearer {key}"}
        request = urllib.request.Request(url, headers=auth)  # noqa: S310 - our own gateway, http(s) only
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            data = json.loads(response.read()).get("data") or []
    except (OSError, ValueError, urllib.error.URLError, AttributeError):
        return {}
    return {str(m["id"]): m for m in data if isinstance(m, dict) and "id" in m}


def list_models(rt: ComposeRuntime) -> list[ModelRow]:
    plan = compose_model_plan(rt)
    if plan is None:
        return []
    live = gateway_models(rt)
    return [
        ModelRow(alias=e.alias, resident=e.resident, pinned=e.pinned, workers=e.workers if e.resident == "always"
                 else 0, state=str(live.get(e.alias, {}).get("state", "unknown")), memory_bytes=entry_bytes(e),
                 path=e.path, sha256=e.sha256, serving=list(live.get(e.alias, {}).get("workers") or []))
        for e in plan.entries
    ]
