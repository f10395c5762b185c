"""Settings and runtime for a CLI invocation, parsed once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.cli.output import err, fail
from appliance.core.settings import ConfigError, load_settings
from appliance.runtime.local import LocalRuntime
from appliance.runtime.settings import RuntimeSettings

__all__ = ["admin_key", "load", "runtime"]


def load(**overrides: Any) -> RuntimeSettings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_settings(RuntimeSettings, **clean)
    except ConfigError as exc:
        fail(str(exc), code=2)


def _progress(name: str, state: str, detail: str) -> None:
    colour = {"ready": "green", "failed": "red", "stopped": "dim", "starting": "yellow"}.get(state, "cyan")
    if state == "starting" and detail:
        return  # the per-poll detail is shown by the spinner, not as a new line
    err.print(f"  [{colour}]{state:<9}[/] {name} {detail}", highlight=False)


def runtime(settings: RuntimeSettings) -> LocalRuntime:
    return LocalRuntime(settings, _progress)


def admin_key(settings: RuntimeSettings) -> str:
    path: Path = settings.data_dir / "admin_key"
    if not path.is_file():
        fail(f"no admin key at {path}; run `appliance up` first or pass --admin-key")
    return path.read_text().strip()
