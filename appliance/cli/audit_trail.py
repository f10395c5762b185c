"""What CLI processes write to the audit log (actor ``cli:<os user>``), on the file the gateway appends to.

Configuration changes: `appliance up` compares what it started with (every remembered flag's value
and the config file's SHA-256) to what the last recorded ``config.change`` saw, kept in
``data/run/stack.json`` under ``audited_config``; `scale` records the new worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.backup.audit_snapshot import live_audit_path
from appliance.cli.context import REMEMBERED, state_file
from appliance.cli.output import err
from appliance.core.audit import AuditError, AuditLog, DetailValue, cli_actor
from appliance.core.settings import ConfigError, config_path
from appliance.runtime.settings import RuntimeSettings

__all__ = ["cli_audit", "record", "record_config"]

_AUDITED = "audited_config"


def cli_audit(settings: RuntimeSettings) -> AuditLog:
    return AuditLog(live_audit_path(settings))


def record(settings: RuntimeSettings, *, action: str, target: str, outcome: str = "ok",
           detail: Mapping[str, DetailValue] | None = None) -> None:
    """Append one record as this CLI user; a log that cannot be written is a warning, the act is done."""
    log = cli_audit(settings)
    try:
        log.append(actor=cli_actor(), action=action, target=target, outcome=outcome, detail=detail)
        _same_owner_as_its_data(log.path)
    except (AuditError, OSError) as exc:
        err.print(f"[yellow]warning:[/] the audit log could not record {action} ({exc})", highlight=False)


def _same_owner_as_its_data(path: Path) -> None:
    """Run as root, the CLI may be first to create the log; the gateway (compose: the containers' uid) must
    still append to it, so the log and its directory take the owner of the directory that holds them."""
    if os.geteuid() != 0:
        return
    owner = path.parent.parent.stat()
    for made in (path.parent, path):
        if made.stat().st_uid != owner.st_uid:
            os.chown(made, owner.st_uid, owner.st_gid)


def _config_sha256() -> str:
    try:
        found = config_path()
    except ConfigError:
        return ""
    return hashlib.sha256(found.read_bytes()).hexdigest() if found is not None else ""


def _fingerprint(settings: RuntimeSettings) -> dict[str, str]:
    seen = {name: str(getattr(settings, name)) for name in REMEMBERED}
    seen["config_file_sha256"] = _config_sha256()
    seen["runtime"] = settings.runtime
    return seen


def _read_state(settings: RuntimeSettings) -> dict[str, Any]:
    try:
        state = json.loads(state_file(settings).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def record_config(settings: RuntimeSettings) -> None:
    """After `up`: one ``config.change`` when the effective configuration differs from the last one recorded."""
    state = _read_state(settings)
    before = state.get(_AUDITED)
    now = _fingerprint(settings)
    if before == now:
        return
    changed = sorted(name for name in now if not isinstance(before, dict) or before.get(name) != now[name])
    record(settings, action="config.change", target="appliance",
           detail={"changed": ",".join(changed), "first": not isinstance(before, dict),
                   "config_file_sha256": now["config_file_sha256"][:16]})
    state[_AUDITED] = now
    path = state_file(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".audit.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
