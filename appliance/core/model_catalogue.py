"""The model catalogue in Redis: every model the appliance may serve, each entry signed.

Hash ``appliance:models``: field = the alias, value = ``{"entry": {...}, "sig": "<hex>"}``. ``sig`` is
HMAC-SHA256 under the internal token over the alias and the entry's canonical JSON (msgspec encodes a
struct's fields in declaration order), so a local process that can write Redis but does not hold the
token cannot point an alias at another file, change its sha256 or its memory figures: a badly signed
entry is dropped by every reader with a warning, as :mod:`appliance.core.registry` drops worker entries.

``appliance up`` writes the catalogue from ``[[models]]`` (or the one-entry catalogue of ``[worker]``);
``appliance models add|remove|pin`` edit it live; swap hosts load entries from it and the balancer
plans swaps from it. :func:`entry_bytes` is the README's sizing rule, the one the budget checks use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Literal

import msgspec

from appliance.core.ids import ModelId

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CATALOGUE_KEY",
    "CatalogueEntry",
    "decode_entry",
    "encode_entry",
    "entry_bytes",
    "put_entry",
    "read_catalogue",
    "read_entry",
    "remove_entry",
]

CATALOGUE_KEY = "appliance:models"
_DOMAIN = b"appliance-model-catalogue-v1"
_SHA256_HEX = frozenset("0123456789abcdef")

log = logging.getLogger(__name__)


class CatalogueEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One servable model. ``path`` is the GGUF as the worker sees it (local: absolute; compose: in the
    models volume); ``sha256`` the file's lowercase hex digest, which the worker checks before loading."""

    alias: str
    path: str
    sha256: str
    size_bytes: int
    slots: int
    n_ctx: int
    resident: Literal["always", "on_demand"]
    workers: int = 1
    pinned: bool = False
    kv_bytes_per_token: int

    def __post_init__(self) -> None:
        problems = []
        if not ModelId.matches(self.alias):
            problems.append(f"alias must be {ModelId.described}")
        if not self.path:
            problems.append("path is empty")
        if len(self.sha256) != 64 or not set(self.sha256) <= _SHA256_HEX:
            problems.append("sha256 must be 64 lowercase hex digits")
        for name in ("size_bytes", "kv_bytes_per_token"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        for name in ("slots", "n_ctx", "workers"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))


class _Signed(msgspec.Struct, frozen=True):
    entry: CatalogueEntry
    sig: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Signed)


def entry_bytes(entry: CatalogueEntry) -> int:
    """Memory one worker of ``entry`` needs: the weights (about the GGUF's size) plus a KV cache of
    ``slots x n_ctx`` tokens at ``kv_bytes_per_token`` each (the README's sizing rule)."""
    return entry.size_bytes + entry.slots * entry.n_ctx * entry.kv_bytes_per_token


def _signature(token: str, alias: str, body: bytes) -> str:
    message = b"\n".join((_DOMAIN, alias.encode(), body))
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def encode_entry(token: str, entry: CatalogueEntry) -> bytes:
    """The signed hash value for ``entry``."""
    body = _encoder.encode(entry)
    return _encoder.encode(_Signed(entry=entry, sig=_signature(token, entry.alias, body)))


def decode_entry(token: str, alias: str, raw: bytes | str) -> CatalogueEntry | None:
    """The entry stored under ``alias`` if it parses, names that alias and carries a valid signature."""
    try:
        signed = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    entry = signed.entry
    if entry.alias != alias:
        return None
    expected = _signature(token, alias, _encoder.encode(entry))
    if not hmac.compare_digest(signed.sig.encode(), expected.encode()):
        return None
    return entry


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def read_catalogue(redis: Redis, token: str) -> dict[str, CatalogueEntry]:
    """Every verified entry by alias; an entry that fails verification is dropped with a warning."""
    raw: dict[bytes | str, bytes | str] = await redis.hgetall(CATALOGUE_KEY)
    catalogue: dict[str, CatalogueEntry] = {}
    for field, value in raw.items():
        alias = _text(field)
        entry = decode_entry(token, alias, value)
        if entry is None:
            log.warning("model catalogue: dropped the entry %r (bad signature or malformed)", alias[:200])
            continue
        catalogue[alias] = entry
    return dict(sorted(catalogue.items()))


async def read_entry(redis: Redis, token: str, alias: str) -> CatalogueEntry | None:
    """One verified entry, or None when absent or badly signed (logged)."""
    value: bytes | str | None = await redis.hget(CATALOGUE_KEY, alias)
    if value is None:
        return None
    entry = decode_entry(token, alias, value)
    if entry is None:
        log.warning("model catalogue: dropped the entry %r (bad signature or malformed)", alias[:200])
    return entry


async def put_entry(redis: Redis, token: str, entry: CatalogueEntry) -> None:
    """Write (or replace) ``entry`` under its alias, signed with ``token``."""
    await redis.hset(CATALOGUE_KEY, entry.alias, encode_entry(token, entry))


async def remove_entry(redis: Redis, alias: str) -> bool:
    """Delete the entry of ``alias``; whether there was one."""
    removed: int = await redis.hdel(CATALOGUE_KEY, alias)
    return removed > 0
