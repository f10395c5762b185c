"""Settings and runtime for a CLI invocation, parsed once.

What `appliance up` was told (worker count, model, served name, slots, TLS, listen address, the
config file) is remembered in ``data/run/stack.json`` and applied by every later verb (`scale`,
`restart`, `status`, `keys`, `usage`...), so a restart never quietly falls back to the defaults.
A flag given on the command line wins over the remembered value; `appliance up --reset` forgets them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.cli.output import err, fail
from appliance.core.settings import ConfigError, config_path, load_settings
from appliance.runtime.compose import ComposeRuntime
from appliance.runtime.local import LocalRuntime
from appliance.runtime.protocol import Runtime
from appliance.runtime.settings import RuntimeSettings

__all__ = ["REMEMBERED", "RuntimeFor", "admin_key", "forget", "load", "log", "remember", "runtime", "state_file"]

# RuntimeSettings fields that `up` (and `scale`) remember.
REMEMBERED = (
    "workers",
    "model_path",
    "model_alias",
    "worker_slots",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_names",
    "gateway_host",
)
_CONFIG_KEY = "config"
# How a command gets the runtime its settings name: `runtime` below, or what create_app was given (tests).
RuntimeFor = Callable[[RuntimeSettings], Runtime]


def state_file(settings: RuntimeSettings) -> Path:
    return settings.run_dir / "stack.json"


def _read_state(settings: RuntimeSettings) -> dict[str, Any]:
    path = state_file(settings)
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _parse(overrides: dict[str, Any]) -> RuntimeSettings:
    try:
        return load_settings(RuntimeSettings, **overrides)
    except ConfigError as exc:
        fail(str(exc), code=2)


def load(**overrides: Any) -> RuntimeSettings:
    """Settings from env/appliance.toml, then what `up` remembered, then this command's own flags."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    first = _parse(clean)
    state = _read_state(first)
    remembered_config = state.pop(_CONFIG_KEY, None)
    if remembered_config and not os.environ.get("APPLIANCE_CONFIG") and Path(remembered_config).is_file():
        try:
            here = config_path()
        except ConfigError as exc:
            fail(str(exc), code=2)
        if here is None:  # run from another directory: keep reading the file `up` read
            os.environ["APPLIANCE_CONFIG"] = remembered_config
    saved = {k: v for k, v in state.items() if k in REMEMBERED and v is not None}
    if not saved and not remembered_config:
        return first
    return _parse({**saved, **clean})


def remember(settings: RuntimeSettings, given: dict[str, Any]) -> None:
    """Add the flags a command was given (non-None entries of ``given``) to the remembered state."""
    state = _read_state(settings)
    for key, value in given.items():
        if key in REMEMBERED and value is not None:
            state[key] = (
                [str(v) for v in value]
                if isinstance(value, list)
                else (str(value.resolve()) if isinstance(value, Path) else value)
            )
    try:
        found = config_path()
    except ConfigError:
        found = None
    if found is not None:
        state[_CONFIG_KEY] = str(found.resolve())
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    path = state_file(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def forget(settings: RuntimeSettings) -> None:
    state_file(settings).unlink(missing_ok=True)


def _progress(name: str, state: str, detail: str) -> None:
    colour = {"ready": "green", "failed": "red", "stopped": "dim", "starting": "yellow"}.get(state, "cyan")
    if state == "starting" and detail:
        return  # the per-poll detail is shown by the spinner, not as a new line
    err.print(f"  [{colour}]{state:<9}[/] {name} {detail}", highlight=False)


def log(message: str) -> None:
    err.print(f"  {message}", highlight=False)


def runtime(settings: RuntimeSettings) -> Runtime:
    """The runtime ``settings.runtime`` names, reporting its progress on stderr."""
    if settings.runtime == "compose":
        return ComposeRuntime(settings, log=log)
    return LocalRuntime(settings, _progress)


def admin_key(settings: RuntimeSettings) -> str:
    path: Path = settings.data_dir / "admin_key"
    if not path.is_file():
        fail(f"no admin key at {path}; run `appliance up` first or pass --admin-key")
    return path.read_text().strip()
