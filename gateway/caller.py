"""Who a request is for, as every later hop is told: a typed value passed explicitly, never ambient state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER

if TYPE_CHECKING:
    from gateway.keys import Principal

__all__ = ["IDENTITY_HEADERS", "Caller"]

# The hop headers that say who is asking: set from the authenticated key only, never copied from a client.
IDENTITY_HEADERS = frozenset(name.lower() for name in (KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER))


@dataclass(frozen=True, slots=True)
class Caller:
    """The key's id (never the key), its scheduled priority and its fair-share weight."""

    key_id: str
    priority: str
    weight: float

    @classmethod
    def of(cls, principal: Principal, asked_priority: object = None) -> Caller:
        """The caller a verified key makes; ``asked_priority`` may lower it to batch, never raise it."""
        return cls(principal.key_id, principal.scheduled_priority(asked_priority), principal.weight)

    def hop_headers(self) -> dict[str, str]:
        return {KEY_ID_HEADER: self.key_id, PRIORITY_HEADER: self.priority, WEIGHT_HEADER: f"{self.weight:g}"}
