"""Who may see which collection. Access is recorded explicitly, and fails closed.

Each collection the gateway knows of has one access record in Redis (``OWNERS_KEY``, name → value):
its owner, and whether it is shared.

* the owner: a key id (``key_…``; created through the gateway by that non-admin key: it reads and changes
  it) or ``@admin`` (created by an admin key: admin keys only);
* ``:shared`` after the owner: every key with the ``collections`` scope may also read and search it; still
  only its owner and admins change it. Sharing is explicit and only an admin sets it: an admin key creates
  it with ``"shared": true``, or flips it later (``PUT /admin/collections/{name}/sharing``,
  ``appliance collections share``, ``appliance ingest --shared``); taking it back leaves the owner as it was.

A collection with **no** record — made directly on the RAG service (``appliance ingest`` without
``--shared``), or whose record was lost (an AOF window, an interrupted restore) — is admin-only,
never public. Another key's private collection answers 404 exactly like one that does not exist,
so names do not leak either. Every check takes a :class:`~appliance.core.ids.CollectionName`, the
value parsed at the edge, so what is checked is what the RAG service receives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, TypeVar

from appliance.core.errors import APIError, not_found, overloaded
from gateway.redis_guard import RedisUnavailable

if TYPE_CHECKING:
    from appliance.core.ids import CollectionName
    from gateway.keys import Principal
    from gateway.redis_guard import RedisGuard

__all__ = ["ADMIN_ONLY", "OWNERS_KEY", "SHARED", "Access", "CollectionOwners", "access_of", "may_read", "owns"]

T = TypeVar("T")
OWNERS_KEY = "appliance:collection_owners"
SHARED = ":shared"  # a suffix: key ids (key_ + letters and digits) and "@admin" never contain ":"
ADMIN_ONLY = "@admin"
Access = Literal["private", "shared", "admin"]

# Set or clear the shared flag, keeping the owner; a collection without a record gets the admin as owner.
_SET_SHARED = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then current = ARGV[3] end
local owner = string.gsub(current, ARGV[4] .. '$', '')
if ARGV[2] == '1' then owner = owner .. ARGV[4] end
redis.call('HSET', KEYS[1], ARGV[1], owner)
return owner
"""

# Drop a claim only if it is still the one this request made (another creator may have replaced it).
_RELEASE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


def _shared(record: str | None) -> bool:
    return record is not None and record.endswith(SHARED)


def _owner(record: str | None) -> str | None:
    return None if record is None else record.removesuffix(SHARED)


def access_of(record: str | None) -> Access:
    if _shared(record):
        return "shared"
    if record is None or record == ADMIN_ONLY:
        return "admin"
    return "private"


def may_read(principal: Principal, record: str | None) -> bool:
    return principal.is_admin or _shared(record) or owns(principal, record)


def owns(principal: Principal, record: str | None) -> bool:
    """The key is the collection's owner (shared or not)."""
    return bool(principal.key_id) and _owner(record) == principal.key_id


def _record_for(principal: Principal, shared: bool) -> str:
    owner = ADMIN_ONLY if principal.is_admin else principal.key_id
    return owner + SHARED if shared else owner


class CollectionOwners:
    def __init__(self, guard: RedisGuard) -> None:
        self._guard = guard

    async def owners(self) -> dict[str, str]:
        raw = await self._call(lambda: self._guard.client.hgetall(OWNERS_KEY))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def record(self, name: CollectionName) -> str | None:
        raw = await self._call(lambda: self._guard.client.hget(OWNERS_KEY, str(name)))
        return None if raw is None else _text(raw)

    async def claim(self, name: CollectionName, principal: Principal, *, shared: bool) -> str | None:
        """Record the creator before the RAG service creates the collection (so it is never unowned and
        readable in between). Returns the record written, or None when an equal record already stood.
        Another creator's record answers 409; a stale one (its collection gone) is replaced by the caller
        via :meth:`replace` after checking the RAG service."""
        value = _record_for(principal, shared)
        created = await self._call(lambda: self._guard.client.hsetnx(OWNERS_KEY, str(name), value))
        if created:
            return value
        current = await self.record(name)
        if current == value:
            return None
        raise APIError(409, f"Collection {name!r} already exists.", param="name", code="collection_exists")

    async def replace(self, name: CollectionName, principal: Principal, *, shared: bool) -> str:
        value = _record_for(principal, shared)
        await self._call(lambda: self._guard.client.hset(OWNERS_KEY, str(name), value))
        return value

    async def release(self, name: CollectionName, claimed: str | None = None) -> None:
        """Forget a collection's record (it was deleted), or only the claim ``claimed`` when given."""
        if claimed is None:
            await self._call(lambda: self._guard.client.hdel(OWNERS_KEY, str(name)))
        else:
            await self._call(lambda: self._guard.client.eval(_RELEASE_IF, 1, OWNERS_KEY, str(name), claimed))

    async def set_shared(self, name: CollectionName, shared: bool) -> Access:
        record = await self._call(lambda: self._guard.client.eval(
            _SET_SHARED, 1, OWNERS_KEY, str(name), "1" if shared else "0", ADMIN_ONLY, SHARED))
        return access_of(_text(record))

    async def check(self, name: CollectionName, principal: Principal, *, write: bool) -> None:
        """Raise 404 unless ``principal`` may read (or, with ``write``, change) collection ``name``."""
        if principal.is_admin:
            return
        record = await self.record(name)
        if owns(principal, record):
            return
        if _shared(record):
            if not write:
                return
            raise not_found(f"Collection {name!r} is shared; only an admin key can change it.",
                            param="collection", code="collection_not_found")
        raise not_found(f"No collection named {name!r}.", param="collection", code="collection_not_found")

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._guard.call(operation)
        except RedisUnavailable:  # fail closed: without the records nobody's documents are exposed
            raise overloaded("Collection access cannot be checked right now; retry shortly.", 2.0) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
