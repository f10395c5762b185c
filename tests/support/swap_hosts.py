"""A real swap host (docs/CONTRACTS.md C2) on the bundled GGUF under two catalogue aliases in a real Redis, and
what the balancer tests read from a balancer in front of it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import redis

from appliance.core.model_catalogue import CatalogueEntry, put_entry
from appliance.core.model_files import sha256_file
from tests.support.inference_worker import TOKEN, Worker, spawn_worker

__all__ = ["catalogue_entry", "metric_value", "models_by_id", "put_entries", "swap_host", "write_entries"]


def catalogue_entry(alias: str, model_path: Path, digest: str, *, slots: int, n_ctx: int = 1024,
                    pinned: bool = False) -> CatalogueEntry:
    return CatalogueEntry(alias=alias, path=str(model_path), sha256=digest, size_bytes=model_path.stat().st_size,
                          slots=slots, n_ctx=n_ctx, resident="on_demand", pinned=pinned, kv_bytes_per_token=18432)


async def write_entries(redis_url: str, entries: list[CatalogueEntry]) -> None:
    """Write ``entries`` to the catalogue, signed with the tests' internal token (as ``appliance up`` does)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for entry in entries:
            await put_entry(client, TOKEN, entry)
    finally:
        await client.aclose()


def put_entries(redis_url: str, entries: list[CatalogueEntry]) -> None:
    """:func:`write_entries` outside an event loop."""
    asyncio.run(write_entries(redis_url, entries))


@contextmanager
def swap_host(model_path: Path, redis_url: str, data_dir: Path, aliases: tuple[str, str], *, slots: int,
              **settings: str) -> Iterator[Worker]:
    """One swap host serving the bundled GGUF as either alias (the first loaded at start)."""
    digest = sha256_file(model_path)
    put_entries(redis_url, [catalogue_entry(alias, model_path, digest, slots=slots) for alias in aliases])
    with spawn_worker(model_path, data_dir, swap_host="true", initial_model=aliases[0], redis_url=redis_url,
                      heartbeat_s="0.5", registry_ttl_s="3", withdraw_grace_s="0", speculative="false",
                      **settings) as worker:
        yield worker


async def models_by_id(client: aiohttp.ClientSession, balancer: str, token: str) -> dict[str, dict[str, Any]]:
    async with client.get(f"{balancer}/v1/models", headers={"X-Internal-Token": token}) as response:
        assert response.status == 200, await response.text()
        return {item["id"]: item for item in (await response.json())["data"]}


async def metric_value(client: aiohttp.ClientSession, balancer: str, name: str, **labels: str) -> float:
    """One sample of the balancer's /metrics (0 when absent)."""
    async with client.get(f"{balancer}/metrics") as response:
        text = await response.text()
    wanted = ",".join(f'{key}="{re.escape(value)}"' for key, value in labels.items())
    pattern = rf"^{re.escape(name)}\{{{wanted}\}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
