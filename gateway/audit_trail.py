"""The gateway's audit records: which key (or signed-in user) did what to what, never a secret or a prompt.

A record the file cannot take (disk full, a damaged tail) does not undo or refuse the act that already
happened: it goes to the structured log as ``audit append failed`` with every field of the record, so
the journal still holds it, and ``appliance audit verify`` names the damage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from appliance.core.audit import AuditError, AuditLog, DetailValue
from gateway.keys import Principal

__all__ = ["AdminViews", "actor_of", "audit"]

_log = logging.getLogger("gateway.audit")


def actor_of(principal: Principal) -> str:
    """``key:<key id>``: the key's id, never its secret."""
    return f"key:{principal.key_id}"


async def audit(log: AuditLog, who: Principal | str, action: str, target: str, *, outcome: str = "ok",
                detail: Mapping[str, DetailValue] | None = None) -> None:
    """Append one record as ``who`` (a key, or an actor name such as ``system:bootstrap``) off the event loop;
    a failure is logged with the record, not raised."""
    actor = who if isinstance(who, str) else actor_of(who)
    try:
        await log.append_async(actor=actor, action=action, target=target, outcome=outcome, detail=detail)
    except (AuditError, OSError, ValueError) as exc:
        _log.error("audit append failed", extra={"audit_actor": actor, "audit_action": action,
                                                 "audit_target": target, "audit_outcome": outcome,
                                                 "audit_detail": dict(detail or {}), "error": str(exc)})


class AdminViews:
    """One ``admin.view`` per viewing, not per poll: an actor's admin read counts as a new view only after
    ``gap_s`` without any (the dashboard polls every few seconds while it is open)."""

    def __init__(self, gap_s: float, limit: int = 4096) -> None:
        self._gap_s = gap_s
        self._last: dict[str, float] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._last)

    def is_new_view(self, actor: str, now: float | None = None) -> bool:
        at = time.monotonic() if now is None else now
        last = self._last.get(actor)
        self._last[actor] = at
        if len(self._last) > self._limit:  # bounded: forget viewers idle for longer than the gap
            self._last = {who: seen for who, seen in self._last.items() if at - seen < self._gap_s}
        return last is None or at - last >= self._gap_s
