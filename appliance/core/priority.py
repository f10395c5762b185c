"""A request's scheduling class on the internal hop: interactive (someone waits for it) or batch (idle capacity).

The gateway decides it from the key and the request (``gateway.keys``) and sends it in
``X-Appliance-Priority`` (``appliance.core.hop.PRIORITY_HEADER``); the balancer queues by it and forwards
its own reading to the worker, whose scheduler gives interactive prefills precedence over batch decoding.
:meth:`Priority.parse` is the one reading of the header's text, at the worker's edge.
"""

from __future__ import annotations

from enum import IntEnum

from appliance.core.errors import bad_request

__all__ = ["Priority"]


class Priority(IntEnum):
    """Best first: a lower value is served first."""

    INTERACTIVE = 0
    BATCH = 1

    @property
    def wire(self) -> str:
        """The header's text for this class."""
        return self.name.lower()

    @classmethod
    def parse(cls, raw: str | None, *, param: str) -> Priority:
        """The class a header names (absent: interactive); anything else is a 400 naming ``param``."""
        if raw is None:
            return cls.INTERACTIVE
        for member in cls:
            if raw == member.wire:
                return member
        raise bad_request(f"Invalid {param}: it must be 'interactive' or 'batch'.", param=param,
                          code="invalid_priority")
