"""Sessions and pre-auth records (gateway/auth/sessions.py) on real Redis: idle and absolute expiry, sign-out,
ending every session of a user, single-use pre-auth records, and nothing in Redis that works as a cookie."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar.datastructures import Cookie
from redis.asyncio import Redis

from gateway.auth.sessions import PreAuth, PreAuthStore, SessionStore, digest
from gateway.auth.settings import AuthSettings
from gateway.auth.subject import UserSubject
from gateway.auth.web import new_web_auth
from gateway.keys import KeyLimits, KeyStore

pytestmark = pytest.mark.integration

T = TypeVar("T")
ALICE = UserSubject("alice-0123")


def _run(redis_url: str, scenario: Callable[[Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = Redis.from_url(redis_url, socket_timeout=5)
        try:
            return await scenario(client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_a_session_ends_when_idle_at_its_absolute_end_and_when_deleted(redis_url: str) -> None:
    now = [time.time()]

    async def scenario(redis: Redis) -> dict[str, Any]:
        store = SessionStore(redis, idle_s=60, absolute_s=600, clock=lambda: now[0])
        seen: dict[str, Any] = {}
        cookie, session = await store.create(ALICE)
        seen["resolved"] = await store.resolve(cookie)
        seen["ttl"] = await redis.ttl(f"gw:session:{session.id_digest}")
        now[0] += 590  # used again: the idle time restarts, but never past the absolute end
        seen["late"] = await store.resolve(cookie)
        seen["late_ttl"] = await redis.ttl(f"gw:session:{session.id_digest}")
        now[0] += 11
        seen["after_absolute"] = await store.resolve(cookie)
        seen["record_left"] = await redis.exists(f"gw:session:{session.id_digest}")
        quick = SessionStore(redis, idle_s=1, absolute_s=600)
        idle_cookie, idle = await quick.create(ALICE)
        deadline = time.monotonic() + 10  # unused (a resolve is a use): gone after its 1 s idle time
        while await redis.exists(f"gw:session:{idle.id_digest}") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        seen["after_idle"] = await quick.resolve(idle_cookie)
        out_cookie, out = await quick.create(ALICE)
        await quick.delete(out)
        seen["after_delete"] = await quick.resolve(out_cookie)
        return seen

    seen = _run(redis_url, scenario)
    assert seen["resolved"] is not None and seen["resolved"].subject == ALICE and 0 < seen["ttl"] <= 60
    assert seen["late"] is not None and 0 < seen["late_ttl"] <= 10
    assert seen["after_absolute"] is None and seen["record_left"] == 0
    assert seen["after_idle"] is None and seen["after_delete"] is None


def test_disabling_ends_every_session_of_the_user_only(redis_url: str) -> None:
    async def scenario(redis: Redis) -> tuple[list[bool], bool, int, int]:
        store = SessionStore(redis, idle_s=60, absolute_s=600)
        carol = UserSubject("carol-0123")
        mine = [await store.create(carol) for _ in range(3)]
        other_cookie, _ = await store.create(UserSubject("bob-0123"))
        counted = await store.count(carol)
        ended = await store.end_all(carol)
        gone = [await store.resolve(cookie) is None for cookie, _ in mine]
        return gone, await store.resolve(other_cookie) is not None, ended, counted

    gone, other_alive, ended, counted = _run(redis_url, scenario)
    assert gone == [True, True, True] and other_alive and ended == 3 and counted == 3


def test_a_pre_auth_record_is_taken_once_and_expires(redis_url: str) -> None:
    async def scenario(redis: Redis) -> tuple[Any, Any, int]:
        store = PreAuthStore(redis, ttl_s=30)
        record = PreAuth(nonce="n" * 43, code_verifier="v" * 86, binding=digest("cookie"), return_to="/admin")
        await store.put("state-1", record)
        ttl = await redis.ttl(f"gw:preauth:{digest('state-1')}")
        return await store.take("state-1"), await store.take("state-1"), ttl

    first, second, ttl = _run(redis_url, scenario)
    assert first == PreAuth(nonce="n" * 43, code_verifier="v" * 86, binding=digest("cookie"), return_to="/admin")
    assert second is None and 0 < ttl <= 30


def test_redis_holds_nothing_that_works_as_a_cookie(redis_url: str) -> None:
    async def scenario(redis: Redis) -> tuple[str, bytes, bool]:
        store = SessionStore(redis, idle_s=60, absolute_s=600)
        cookie, _ = await store.create(ALICE)
        dump = b""
        async for key in redis.scan_iter(match="gw:*session*"):
            dump += key + b"\n"
            kind = await redis.type(key)
            if kind == b"hash":
                dump += b"".join(k + v for k, v in (await redis.hgetall(key)).items())
            elif kind == b"set":
                dump += b"".join(await redis.smembers(key))
        not_ours = await store.resolve("x" * 42 + "!") is None
        return cookie, dump, not_ours

    cookie, dump, not_ours = _run(redis_url, scenario)
    assert cookie.encode() not in dump and digest(cookie).encode() in dump and not_ours


def test_cookies_are_secure_and_host_only_under_tls(redis_url: str, tmp_path: Path) -> None:
    async def scenario(redis: Redis) -> list[str]:
        auth = new_web_auth(AuthSettings(), redis, KeyStore(redis), default_limits=KeyLimits(),
                            server_secret="s" * 43, tls=True)
        plain = new_web_auth(AuthSettings(), redis, KeyStore(redis), default_limits=KeyLimits(),
                             server_secret="s" * 43, tls=False)
        made: list[Cookie] = [auth.cookie(auth.session_cookie, "v", 60),
                              plain.cookie(plain.session_cookie, "v", 60)]
        return [cookie.to_header(header="").strip().lower() for cookie in made]

    secure, plain = _run(redis_url, scenario)
    assert secure.startswith("__host-appliance_session=v") and "secure" in secure and "httponly" in secure
    assert "samesite=lax" in secure and "path=/" in secure
    assert plain.startswith("appliance_session=v") and "secure" not in plain
