"""The catalogue in the local stack's Redis: written by `appliance up` and `appliance models`, as the admin user."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from appliance.core.model_catalogue import CATALOGUE_KEY, CatalogueEntry, put_entry, read_catalogue, remove_entry
from appliance.runtime.protocol import RuntimeFailure
from appliance.runtime.settings import RuntimeSettings

__all__ = ["publish", "published"]


def _client(settings: RuntimeSettings) -> Redis:
    return Redis(host="127.0.0.1", port=settings.redis_port, socket_timeout=5, socket_connect_timeout=5,
                 **settings.redis_admin_login())


async def _publish(settings: RuntimeSettings, entries: Sequence[CatalogueEntry], token: str) -> None:
    client = _client(settings)
    try:
        wanted = {e.alias for e in entries}
        for entry in entries:
            await put_entry(client, token, entry)
        stale = await client.hkeys(CATALOGUE_KEY)
        for field in stale:
            alias = field.decode(errors="replace") if isinstance(field, bytes) else field
            if alias not in wanted:
                await remove_entry(client, alias)
    finally:
        await client.aclose()


def publish(settings: RuntimeSettings, entries: Sequence[CatalogueEntry]) -> None:
    """Make the Redis catalogue exactly ``entries`` (signed with the internal token)."""
    try:
        asyncio.run(_publish(settings, entries, settings.resolved_internal_token()))
    except (RedisError, OSError) as exc:
        raise RuntimeFailure(f"could not write the model catalogue to Redis ({type(exc).__name__}: {exc})") from None


async def _read(settings: RuntimeSettings, token: str) -> dict[str, CatalogueEntry]:
    client = _client(settings)
    try:
        return await read_catalogue(client, token)
    finally:
        await client.aclose()


def published(settings: RuntimeSettings) -> dict[str, CatalogueEntry]:
    """The catalogue Redis holds now (verified entries only)."""
    try:
        return asyncio.run(_read(settings, settings.resolved_internal_token()))
    except (RedisError, OSError) as exc:
        raise RuntimeFailure(f"could not read the model catalogue from Redis ({type(exc).__name__}: {exc})") from None
