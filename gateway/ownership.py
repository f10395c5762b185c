"""Who may see which collection: a key sees the collections it created, plus shared ones.

A collection created through the gateway by a non-admin key belongs to that key. One created
by an admin key, or by the operator directly on the RAG service (`appliance ingest`), has no
owner and is shared: every key with the scope may read and search it; only admins change it.
Another key's private collection answers 404, exactly like one that does not exist, so names
do not leak either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.core.errors import not_found, overloaded
from gateway.redis_guard import RedisUnavailable

if TYPE_CHECKING:
    from gateway.keys import Principal
    from gateway.redis_guard import RedisGuard

__all__ = ["OWNERS_KEY", "CollectionOwners", "collection_of"]

OWNERS_KEY = "appliance:collection_owners"


def collection_of(target: str) -> str | None:
    """``/collections/NAME/...`` → NAME; ``/collections`` → None."""
    parts = target.strip("/").split("/")
    return parts[1] if len(parts) > 1 and parts[0] == "collections" and parts[1] else None


class CollectionOwners:
    def __init__(self, guard: RedisGuard) -> None:
        self._guard = guard

    async def owners(self) -> dict[str, str]:
        raw = await self._guard.call(lambda: self._guard.client.hgetall(OWNERS_KEY))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def owner(self, name: str) -> str | None:
        raw = await self._guard.call(lambda: self._guard.client.hget(OWNERS_KEY, name))
        return None if raw is None else _text(raw)

    async def claim(self, name: str, principal: Principal) -> None:
        if "admin" not in principal.scopes:
            await self._guard.call(lambda: self._guard.client.hset(OWNERS_KEY, name, principal.key_id))

    async def release(self, name: str) -> None:
        await self._guard.call(lambda: self._guard.client.hdel(OWNERS_KEY, name))

    async def check(self, name: str, principal: Principal, *, write: bool) -> None:
        """Raise 404 unless ``principal`` may read (or, with ``write``, change) collection ``name``."""
        if "admin" in principal.scopes:
            return
        try:
            owner = await self.owner(name)
        except RedisUnavailable:  # fail closed: without the owner list nobody's documents are exposed
            raise overloaded("Collection access cannot be checked right now; retry shortly.", 2.0) from None
        if owner == principal.key_id or (owner is None and not write):
            return
        if owner is None:
            raise not_found(f"Collection {name!r} is shared; only an admin key can change it.",
                            param="collection", code="collection_not_found")
        raise not_found(f"No collection named {name!r}.", param="collection", code="collection_not_found")

    def visible(self, principal: Principal, owners: dict[str, str], name: str) -> bool:
        owner = owners.get(name)
        return "admin" in principal.scopes or owner is None or owner == principal.key_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
