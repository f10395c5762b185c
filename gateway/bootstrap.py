"""The first admin key: created once, written to ``data_dir/admin_key`` (mode 0600), shown once.

Several gateways may start at the same moment on one data dir: the file is
written with a link trick so the first writer wins, and every gateway makes
sure that key's hash is registered in Redis (unless it was since revoked).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from appliance.core.audit import AuditLog
from gateway.audit_trail import audit
from gateway.keys import KeyLimits, KeyStore, generate_secret

__all__ = ["ensure_admin_key"]

_log = logging.getLogger("gateway.bootstrap")


def _write_once(path: Path, secret: str) -> bool:
    """Write ``secret`` to ``path`` unless it exists; True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


async def ensure_admin_key(keys: KeyStore, data_dir: Path, audit_log: AuditLog | None = None) -> Path:
    path = data_dir / "admin_key"
    created = not path.exists() and _write_once(path, generate_secret())
    secret = path.read_text().strip()
    if not await keys.exists(secret):
        _, view = await keys.create("bootstrap-admin", {"admin", "chat", "embeddings", "collections"}, KeyLimits(),
                                    secret=secret)
        if audit_log is not None:  # no key made it: the gateway itself did
            await audit(audit_log, "system:bootstrap", "key.create", f"key:{view['id']}",
                        detail={"name": "bootstrap-admin", "scopes": "admin,chat,collections,embeddings"})
        _log.warning("bootstrap admin key created; the secret is in the file named here",
                     extra={"path": str(path)})
        if created and sys.stderr.isatty():
            # Shown once, to a human at a terminal only; never to a log file.
            sys.stderr.write(f"\n  Bootstrap admin key (shown once; also in {path}, mode 0600):\n  {secret}\n\n")
    return path
