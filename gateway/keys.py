"""API keys: created, listed and revoked by admins; stored in Redis only as SHA-256 hashes.

A key is ``sk-app-<43 url-safe chars>`` (256 random bits), so a plain SHA-256
is enough: there is nothing to brute-force. The record lives at
``gw:key:<sha256>``; ``gw:keyids`` maps the public id (``key_…``) to the hash.

Each key has a scheduling ``priority`` (``interactive`` or ``batch``) and a fair-share
``weight``: the gateway passes them with the key's id to the balancer, whose wait queue
shares the workers between keys by weight, interactive work first.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from appliance.core.ids import KeyId

__all__ = [
    "PRIORITIES",
    "SCOPES",
    "KeyLimits",
    "KeyStore",
    "Principal",
    "generate_secret",
    "hash_secret",
    "record_key",
]

SCOPES = frozenset({"chat", "embeddings", "collections", "admin"})
PRIORITIES = ("interactive", "batch")  # best first
# What a request may ask for to lower its own priority (header X-Priority, or OpenAI's service_tier).
_LOWER = frozenset({"batch", "flex", "low"})
MAX_WEIGHT = 1000.0
KEY_PREFIX = "sk-app-"
IDS = "gw:keyids"


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def record_key(digest: str) -> str:
    return f"gw:key:{digest}"


@dataclass(frozen=True, slots=True)
class KeyLimits:
    rpm: int = 0
    tpm: int = 0
    tpd: int = 0
    max_concurrent: int = 0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a verified key's public facts (never the secret)."""

    key_id: str
    name: str
    digest: str
    scopes: frozenset[str]
    models: frozenset[str] = frozenset()
    limits: KeyLimits = field(default_factory=KeyLimits)
    expires_at: float = 0.0
    priority: str = PRIORITIES[0]
    weight: float = 1.0

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @classmethod
    def from_record(cls, digest: str, record: dict[str, str]) -> Principal:
        return cls(
            key_id=record.get("id", ""),
            name=record.get("name", ""),
            digest=digest,
            scopes=_csv(record.get("scopes", "")),
            models=_csv(record.get("models", "")),
            limits=KeyLimits(
                rpm=int(record.get("rpm", 0) or 0),
                tpm=int(record.get("tpm", 0) or 0),
                tpd=int(record.get("tpd", 0) or 0),
                max_concurrent=int(record.get("max_concurrent", 0) or 0),
            ),
            expires_at=float(record.get("expires_at", 0) or 0),
            priority=_priority(record.get("priority", "")),
            weight=_weight(record.get("weight", "")),
        )

    def scheduled_priority(self, asked: object) -> str:
        """The key's priority, or batch when the request asks to be lowered (never raised)."""
        if isinstance(asked, str) and asked.strip().lower() in _LOWER:
            return PRIORITIES[-1]
        return self.priority

    def allows_model(self, model: str) -> bool:
        return not self.models or not model or model in self.models

    def expired(self, now: float) -> bool:
        return self.expires_at > 0 and now >= self.expires_at


def _csv(value: str) -> frozenset[str]:
    return frozenset(item for item in value.split(",") if item)


def _priority(value: str) -> str:
    return value if value in PRIORITIES else PRIORITIES[0]


def _weight(value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        return 1.0
    return weight if 0 < weight <= MAX_WEIGHT else 1.0  # also refuses nan and inf


def public_view(record: dict[str, str]) -> dict[str, Any]:
    """What an admin may see of a key (no hash, no secret)."""
    expires = float(record.get("expires_at", 0) or 0)
    return {
        "id": record.get("id"),
        "name": record.get("name"),
        "hint": record.get("hint"),
        "scopes": sorted(_csv(record.get("scopes", ""))),
        "models": sorted(_csv(record.get("models", ""))),
        "limits": {
            "rpm": int(record.get("rpm", 0) or 0),
            "tpm": int(record.get("tpm", 0) or 0),
            "tpd": int(record.get("tpd", 0) or 0),
            "max_concurrent": int(record.get("max_concurrent", 0) or 0),
        },
        "priority": _priority(record.get("priority", "")),
        "weight": _weight(record.get("weight", "")),
        "created_at": float(record.get("created_at", 0) or 0),
        "expires_at": expires or None,
        "revoked": record.get("revoked") == "1",
    }


class KeyStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(
        self, name: str, scopes: set[str], limits: KeyLimits, *, models: set[str] | None = None,
        expires_at: float = 0.0, secret: str | None = None, priority: str = PRIORITIES[0], weight: float = 1.0,
    ) -> tuple[str, dict[str, Any]]:
        """Store a new key; return the secret (shown once) and its public view."""
        secret = secret or generate_secret()
        digest = hash_secret(secret)
        key_id = "key_" + secrets.token_hex(6)
        record: dict[str, str] = {
            "id": key_id, "name": name, "hint": f"{KEY_PREFIX}…{secret[-4:]}",
            "scopes": ",".join(sorted(scopes)), "models": ",".join(sorted(models or ())),
            "rpm": str(limits.rpm), "tpm": str(limits.tpm), "tpd": str(limits.tpd),
            "max_concurrent": str(limits.max_concurrent),
            "priority": _priority(priority), "weight": repr(_weight(repr(weight))),
            "created_at": f"{time.time():.3f}", "expires_at": f"{expires_at:.3f}", "revoked": "0",
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(record_key(digest), mapping=dict[Any, Any](record))
            pipe.hset(IDS, key_id, digest)
            await pipe.execute()
        return secret, public_view(record)

    async def exists(self, secret: str) -> bool:
        return bool(await self._redis.exists(record_key(hash_secret(secret))))

    async def list(self) -> list[dict[str, Any]]:
        ids = await self._redis.hgetall(IDS)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for digest in ids.values():
                pipe.hgetall(record_key(_text(digest)))
            records = await pipe.execute()
        views = [public_view(_decode(r)) for r in records if r]
        return sorted(views, key=lambda view: view["created_at"])

    async def get(self, key_id: KeyId) -> dict[str, Any] | None:
        digest = await self._redis.hget(IDS, key_id)
        if digest is None:
            return None
        record = await self._redis.hgetall(record_key(_text(digest)))
        return public_view(_decode(record)) if record else None

    async def update(self, key_id: KeyId, fields: dict[str, str]) -> dict[str, Any] | None:
        """Change a key's scheduling or limits (``priority``, ``weight``, ``rpm``...); effective at its next request."""
        digest = await self._redis.hget(IDS, key_id)
        if digest is None:
            return None
        record = record_key(_text(digest))
        if fields:
            await self._redis.hset(record, mapping=dict[Any, Any](fields))
        stored = await self._redis.hgetall(record)
        return public_view(_decode(stored)) if stored else None

    async def revoke(self, key_id: KeyId) -> bool:
        """Mark revoked: the next request with it fails, on every gateway."""
        digest = await self._redis.hget(IDS, key_id)
        if digest is None:
            return False
        await self._redis.hset(
            record_key(_text(digest)), mapping={"revoked": "1", "revoked_at": f"{time.time():.3f}"}
        )
        return True

    async def names(self) -> dict[str, str]:
        """Key id → name, for usage reports."""
        return {view["id"]: view["name"] for view in await self.list()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(record: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in record.items()}
