"""What `appliance models add|remove|pin` may change, and how each change is remembered, on either runtime.

The checks read the running plan (:class:`appliance.runtime.models.ModelPlan`); the ``record_*`` functions edit
the remembered changes of ``data/run/models.json`` (:func:`appliance.runtime.models.read_changes`). How the
workers then move is the runtime's own business (programs or containers).
"""

from __future__ import annotations

from typing import Any

from appliance.core.model_settings import ModelConfig
from appliance.runtime.models import ModelPlan
from appliance.runtime.protocol import RuntimeFailure

__all__ = ["check_add", "check_pin", "check_remove", "record_add", "record_pin", "record_remove"]


def _unknown(alias: str) -> RuntimeFailure:
    return RuntimeFailure(f"no model {alias!r} in the catalogue; `appliance models list` shows them")


def check_add(current: ModelPlan, config: ModelConfig) -> None:
    if current.config(config.alias) is not None:
        raise RuntimeFailure(f"the model {config.alias!r} is already in the catalogue (`appliance models remove` "
                             "it first to change it)")


def check_remove(current: ModelPlan, alias: str) -> None:
    if current.config(alias) is None:
        raise _unknown(alias)
    if len(current.configs) == 1:
        raise RuntimeFailure(f"{alias!r} is the only model: removing it would leave nothing to serve")


def check_pin(current: ModelPlan, alias: str) -> None:
    config = current.config(alias)
    if config is None:
        raise _unknown(alias)
    if config.resident != "on_demand":
        raise RuntimeFailure(f"{alias!r} is resident=always: it is never unloaded, pinning changes nothing")


def record_add(changes: dict[str, Any], config: ModelConfig) -> None:
    """A model added again starts unpinned, whatever its earlier entry was."""
    changes["added"][config.alias] = config.model_dump(mode="json")
    changes["removed"] = [a for a in changes["removed"] if a != config.alias]
    changes["pinned"].pop(config.alias, None)


def record_remove(changes: dict[str, Any], alias: str) -> None:
    """A model added by an earlier change is simply forgotten; one of the configuration is listed as removed."""
    if changes["added"].pop(alias, None) is None:
        changes["removed"] = sorted({*changes["removed"], alias})
    changes["pinned"].pop(alias, None)


def record_pin(changes: dict[str, Any], alias: str, pinned: bool) -> None:
    changes["pinned"][alias] = pinned
