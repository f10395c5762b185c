"""The signed model catalogue in a real Redis locked like the runtime's (one ACL user per service).

A local process that can write Redis but does not hold the internal token cannot point an alias at
another file: every reader drops an entry whose signature does not match, whatever it changed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from appliance.bench.harness import redis_process
from appliance.core.model_catalogue import (
    CATALOGUE_KEY,
    CatalogueEntry,
    entry_bytes,
    put_entry,
    read_catalogue,
    read_entry,
    remove_entry,
)
from appliance.core.redis_auth import password_file, read_login

pytestmark = pytest.mark.integration

TOKEN = "model-catalogue-test-internal-token-0123456789"
OTHER_TOKEN = "another-internal-token-an-attacker-made-up-0123"
CHAT = CatalogueEntry(alias="chat", path="/srv/models/chat.gguf", sha256="ab" * 32, size_bytes=253 << 20,
                      slots=8, n_ctx=8192, resident="always", kv_bytes_per_token=18432)
CODE = CatalogueEntry(alias="org/code-1.5b", path="/srv/models/code.gguf", sha256="cd" * 32,
                      size_bytes=1 << 30, slots=2, n_ctx=4096, resident="on_demand", kv_bytes_per_token=28672)


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    directory = tmp_path_factory.mktemp("catalogue-redis")
    with redis_process(directory, user="admin") as (_, url):
        yield directory, int(url.rsplit(":", 1)[1].split("/")[0])


@asynccontextmanager
async def _admin(locked_redis: tuple[Path, int]) -> AsyncIterator[Redis]:
    """The CLI's client (the admin user), on an empty catalogue."""
    directory, port = locked_redis
    client = Redis(port=port, socket_timeout=5, **read_login("admin", password_file(directory, "admin")).kwargs())
    await client.delete(CATALOGUE_KEY)
    try:
        yield client
    finally:
        await client.delete(CATALOGUE_KEY)
        await client.aclose()


def _user(locked_redis: tuple[Path, int], user: str) -> redis.Redis:
    directory, port = locked_redis
    return redis.Redis(port=port, socket_timeout=5, **read_login(user, password_file(directory, user)).kwargs())


def test_entry_bytes_is_the_readme_sizing_rule() -> None:
    # Gemma 3 270M at the default slots = 8, n_ctx = 8192: 18 KiB per token is 1.125 GiB of KV cache.
    assert entry_bytes(CHAT) == (253 << 20) + 8 * 8192 * 18432
    assert entry_bytes(CHAT) - CHAT.size_bytes == 1152 << 20


@pytest.mark.parametrize(("field", "value"), [
    ("alias", "../etc"), ("alias", ""), ("sha256", "AB" * 32), ("sha256", "ab"), ("slots", 0),
    ("n_ctx", 0), ("workers", 0), ("size_bytes", -1), ("path", ""), ("resident", "sometimes"),
])
def test_an_invalid_entry_cannot_be_made_or_decoded(field: str, value: object) -> None:
    fields = {**msgspec.structs.asdict(CHAT), field: value}
    with pytest.raises((ValueError, TypeError, msgspec.ValidationError)):
        msgspec.convert(fields, CatalogueEntry)


async def test_entries_round_trip_and_remove(locked_redis: tuple[Path, int]) -> None:
    async with _admin(locked_redis) as admin:
        await put_entry(admin, TOKEN, CHAT)
        await put_entry(admin, TOKEN, CODE)
        assert await read_catalogue(admin, TOKEN) == {"chat": CHAT, "org/code-1.5b": CODE}
        pinned = msgspec.structs.replace(CODE, pinned=True)
        await put_entry(admin, TOKEN, pinned)
        assert await read_entry(admin, TOKEN, CODE.alias) == pinned
        assert await remove_entry(admin, "chat") is True
        assert await remove_entry(admin, "chat") is False
        assert await read_catalogue(admin, TOKEN) == {"org/code-1.5b": pinned}
        assert await read_entry(admin, TOKEN, "chat") is None


async def test_an_entry_altered_or_signed_without_the_token_is_dropped(
    locked_redis: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    async with _admin(locked_redis) as admin:
        await put_entry(admin, TOKEN, CHAT)
        await put_entry(admin, TOKEN, CODE)
        # The attack: rewrite the signed value to point the alias at another file, keeping the signature.
        stored = json.loads(await admin.hget(CATALOGUE_KEY, "chat"))  # type: ignore[misc]
        stored["entry"]["path"] = "/tmp/evil.gguf"
        stored["entry"]["sha256"] = "ee" * 32
        await admin.hset(CATALOGUE_KEY, "chat", json.dumps(stored))  # type: ignore[misc]
        # ...an entry signed with a token the attacker made up, a copy filed under another alias, and garbage.
        await put_entry(admin, OTHER_TOKEN, msgspec.structs.replace(CHAT, alias="forged"))
        await admin.hset(CATALOGUE_KEY, "copy", await admin.hget(CATALOGUE_KEY, CODE.alias))  # type: ignore[misc]
        await admin.hset(CATALOGUE_KEY, "junk", b"\xff{not json")  # type: ignore[misc]
        with caplog.at_level("WARNING", logger="appliance.core.model_catalogue"):
            assert await read_catalogue(admin, TOKEN) == {"org/code-1.5b": CODE}
            assert await read_entry(admin, TOKEN, "chat") is None
        dropped = {r.args[0] for r in caplog.records if isinstance(r.args, tuple)}
        assert dropped >= {"chat", "forged", "copy", "junk"}


async def test_the_balancer_and_workers_read_the_catalogue_but_cannot_write_it(
    locked_redis: tuple[Path, int]
) -> None:
    async with _admin(locked_redis) as admin:
        await put_entry(admin, TOKEN, CHAT)
        # (The worker keeps SET/DEL for its own registry key, and Redis 6.2's ACLs cannot scope a command to one
        # of a user's key patterns; a worker also holds the internal token. It still cannot add or edit an entry.)
        for user in ("balancer", "worker"):
            client = _user(locked_redis, user)
            assert set(client.hgetall(CATALOGUE_KEY)) == {b"chat"}
            assert client.hget(CATALOGUE_KEY, "chat") is not None
            writes = [lambda c: c.hset(CATALOGUE_KEY, "x", "{}"), lambda c: c.hdel(CATALOGUE_KEY, "chat")]
            if user == "balancer":
                writes += [lambda c: c.delete(CATALOGUE_KEY), lambda c: c.set(CATALOGUE_KEY, "x")]
            for write in writes:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    write(client)
            client.close()
        gateway = _user(locked_redis, "gateway")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.hgetall(CATALOGUE_KEY)
        gateway.close()
