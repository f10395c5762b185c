"""Server-side records of a sign-in: the pre-auth record (state, nonce, PKCE verifier) and the session.

Both are looked up by the SHA-256 of a random value the browser holds in an HttpOnly cookie, so a Redis dump
holds no cookie that works. A pre-auth record is taken once (read and deleted in one transaction) and lives
``preauth_ttl_s``; its ``binding`` is the hash of the pre-auth cookie, so a callback URL carried to another
browser (login CSRF) finds no match. A session expires after ``session_idle_s`` unused (the Redis TTL,
renewed on each use) and at ``absolute_at`` whatever the use; signing out deletes it, so a replayed cookie
finds nothing. ``gw:user-sessions:<subject>`` lists a user's sessions so that disabling the user ends them all.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway.auth.subject import UserSubject

__all__ = ["COOKIE_VALUE", "PreAuth", "PreAuthStore", "Session", "SessionStore", "digest", "new_secret"]

COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")  # what new_secret() makes; anything else is not looked up
SESSION = "gw:session:"
USER_SESSIONS = "gw:user-sessions:"
PREAUTH = "gw:preauth:"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


@dataclass(frozen=True, slots=True)
class PreAuth:
    nonce: str
    code_verifier: str
    binding: str  # SHA-256 of the pre-auth cookie's value
    return_to: str


class PreAuthStore:
    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def put(self, state: str, record: PreAuth) -> None:
        key = PREAUTH + digest(state)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"nonce": record.nonce, "code_verifier": record.code_verifier,
                                    "binding": record.binding, "return_to": record.return_to})
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def take(self, state: str) -> PreAuth | None:
        """The record for this state, deleted in the same transaction (a second callback finds nothing)."""
        key = PREAUTH + digest(state)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.delete(key)
            raw, _ = await pipe.execute()
        fields = _decoded(raw or {})
        if not fields.get("nonce") or not fields.get("code_verifier") or not fields.get("binding"):
            return None
        return PreAuth(fields["nonce"], fields["code_verifier"], fields["binding"], fields.get("return_to", "/"))


@dataclass(frozen=True, slots=True)
class Session:
    id_digest: str
    subject: UserSubject
    csrf_token: str
    created_at: float
    absolute_at: float
    expires_at: float  # when it ends if unused from now: min(now + idle, absolute_at)


class SessionStore:
    def __init__(self, redis: Redis, *, idle_s: int, absolute_s: int, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._idle_s = idle_s
        self._absolute_s = absolute_s
        self._clock = clock

    async def create(self, subject: UserSubject) -> tuple[str, Session]:
        """A new session: the cookie's value (shown to this browser only) and the record."""
        session_id = new_secret()
        now = self._clock()
        session = Session(digest(session_id), subject, new_secret(), now, now + self._absolute_s,
                          min(now + self._idle_s, now + self._absolute_s))
        key = SESSION + session.id_digest
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"subject": str(subject), "csrf": session.csrf_token,
                                    "created_at": f"{now:.3f}", "absolute_at": f"{session.absolute_at:.3f}"})
            pipe.expire(key, self._idle_s)
            pipe.sadd(USER_SESSIONS + subject, session.id_digest)
            pipe.expire(USER_SESSIONS + subject, self._absolute_s)
            await pipe.execute()
        return session_id, session

    async def resolve(self, session_id: str) -> Session | None:
        """The live session this cookie names (its idle time restarted), or None."""
        if not COOKIE_VALUE.fullmatch(session_id):
            return None
        key = SESSION + digest(session_id)
        fields = _decoded(await self._redis.hgetall(key) or {})
        if not UserSubject.matches(fields.get("subject")) or not fields.get("csrf"):
            return None
        now = self._clock()
        absolute_at = float(fields.get("absolute_at") or 0)
        if now >= absolute_at:
            await self._redis.delete(key)
            return None
        left = min(self._idle_s, absolute_at - now)
        await self._redis.expire(key, max(1, int(left)))
        return Session(digest(session_id), UserSubject(fields["subject"]), fields["csrf"],
                       float(fields.get("created_at") or 0), absolute_at, now + left)

    async def delete(self, session: Session) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(SESSION + session.id_digest)
            pipe.srem(USER_SESSIONS + session.subject, session.id_digest)
            await pipe.execute()

    async def end_all(self, subject: UserSubject) -> int:
        """Delete every session of this user; how many were live."""
        members = [_text(m) for m in await self._redis.smembers(USER_SESSIONS + subject)]
        if not members:
            return 0
        async with self._redis.pipeline(transaction=True) as pipe:
            for member in members:
                pipe.delete(SESSION + member)
            pipe.delete(USER_SESSIONS + subject)
            replies = await pipe.execute()
        return sum(int(reply) for reply in replies[:-1])

    async def count(self, subject: UserSubject) -> int:
        """Live sessions of this user (forgets the ones that expired)."""
        members = [_text(m) for m in await self._redis.smembers(USER_SESSIONS + subject)]
        if not members:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(SESSION + member)
            alive = await pipe.execute()
        dead = [member for member, live in zip(members, alive, strict=True) if not live]
        if dead:
            await self._redis.srem(USER_SESSIONS + subject, *dead)
        return len(members) - len(dead)
