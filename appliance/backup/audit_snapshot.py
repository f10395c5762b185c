"""The audit log in a backup: a copy of the log, and its head anchored in the MAC'd manifest.

A restore never rolls the live audit log back (that would delete the records written since the
backup): the archived copy is put in place only on a host that has no audit log yet.
"""

from __future__ import annotations

import os
from pathlib import Path

from appliance.backup.archive import ArchiveWriter
from appliance.backup.manifest import Manifest
from appliance.core.audit import AuditHead, AuditLog, audit_path, log_anchor
from appliance.runtime.settings import RuntimeSettings

__all__ = ["AUDIT_MEMBER", "add_audit_log", "live_audit_path", "manifest_anchor", "restore_audit_log"]

AUDIT_MEMBER = "audit/audit.jsonl"


def live_audit_path(settings: RuntimeSettings) -> Path:
    """The log the gateway and the CLI append to: under the gateway's data dir (``data/gateway`` on compose)."""
    gateway_data = settings.data_dir / "gateway" if settings.runtime == "compose" else settings.data_dir
    return audit_path(gateway_data)


def add_audit_log(writer: ArchiveWriter, path: Path) -> AuditHead | None:
    """Copy the log into the archive and write its head into the manifest (and the structured log)."""
    raw, head = AuditLog(path).snapshot()
    if not raw:
        return None
    writer.add_bytes(AUDIT_MEMBER, raw)
    if head is not None:
        writer.manifest.audit_head = {"seq": head.seq, "hash": head.hash}
        log_anchor(head, "backup")
    return head


def manifest_anchor(manifest: Manifest) -> AuditHead | None:
    """The audit head a (verified) manifest anchors, if the backup had an audit log."""
    found = manifest.audit_head
    if not found:
        return None
    return AuditHead.parse(f"{found.get('seq')}:{found.get('hash')}")


def restore_audit_log(staged: Path, live: Path) -> bool:
    """Move the archived log in when ``live`` does not exist; True when it was."""
    archived = staged / AUDIT_MEMBER
    if not archived.is_file() or live.exists():
        return False
    live.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.replace(archived, live)
    return True
