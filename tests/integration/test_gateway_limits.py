"""Admission against a real Redis, in process: every limit, concurrency slots, expiry, degraded mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from appliance.core.errors import APIError
from gateway.admission import Admission, Ticket
from gateway.keys import KeyLimits, KeyStore, hash_secret
from gateway.redis_guard import RedisGuard
from gateway.resp import PipelinedRedis

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture
async def guard(redis_url: str) -> AsyncIterator[RedisGuard]:
    client = Redis.from_url(redis_url)
    pipe = PipelinedRedis.from_url(redis_url, timeout_s=5)
    yield RedisGuard(client, pipe)
    await pipe.close()
    await client.aclose()


def admission(guard: RedisGuard, **kwargs: object) -> Admission:
    options: dict[str, object] = {"key_cache_ttl_s": 60.0, "fail_open": True, "inflight_ttl_s": 60, **kwargs}
    return Admission(guard, **options)  # type: ignore[arg-type]


async def refused(coro: object) -> APIError:
    with pytest.raises(APIError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


async def test_concurrency_slots_are_exact_and_freed_on_settle(guard: RedisGuard) -> None:
    secret, _ = await KeyStore(guard.client).create("conc", {"chat"}, KeyLimits(max_concurrent=3))
    gate = admission(guard)
    results = await asyncio.gather(*(gate.admit(secret, "chat") for _ in range(10)), return_exceptions=True)
    tickets = [r for r in results if isinstance(r, Ticket)]
    errors = [r for r in results if isinstance(r, APIError)]
    assert len(tickets) == 3 and {e.status for e in errors} == {429}
    assert {e.param for e in errors} == {"concurrency"}
    await asyncio.gather(*(gate.settle(t) for t in tickets))
    await asyncio.gather(*(gate.settle(t) for t in tickets))  # settling twice never frees a slot twice
    again = await asyncio.gather(*(gate.admit(secret, "chat") for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, Ticket) for r in again) == 3


async def test_tokens_per_minute_bucket_blocks_after_spending(guard: RedisGuard) -> None:
    secret, _ = await KeyStore(guard.client).create("tpm", {"chat"}, KeyLimits(tpm=100, tpd=1000))
    gate = admission(guard)
    ticket = await gate.admit(secret, "chat")
    await gate.settle(ticket, prompt_tokens=60, completion_tokens=60)  # overdraws the minute's budget
    error = await refused(gate.admit(secret, "chat"))
    assert error.status == 429 and error.param == "tpm" and int(error.headers["Retry-After"]) >= 1


async def test_tokens_per_day_bucket(guard: RedisGuard) -> None:
    secret, _ = await KeyStore(guard.client).create("tpd", {"chat"}, KeyLimits(tpd=50))
    gate = admission(guard)
    await gate.settle(await gate.admit(secret, "chat"), 30, 30)
    error = await refused(gate.admit(secret, "chat"))
    assert error.param == "tpd" and int(error.headers["Retry-After"]) > 60


async def test_requests_per_minute_headers_count_down(guard: RedisGuard) -> None:
    secret, _ = await KeyStore(guard.client).create("rpm", {"chat"}, KeyLimits(rpm=3))
    gate = admission(guard)
    remaining = [(await gate.admit(secret, "chat")).rate_headers["RateLimit-Remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    error = await refused(gate.admit(secret, "chat"))
    assert error.headers["RateLimit-Limit"] == "3" and 55 <= int(error.headers["Retry-After"]) <= 60


async def test_expired_revoked_and_unknown_keys(guard: RedisGuard) -> None:
    store = KeyStore(guard.client)
    expired, _ = await store.create("old", {"chat"}, KeyLimits(), expires_at=time.time() - 1)
    gate = admission(guard)
    assert (await refused(gate.admit(expired, "chat"))).status == 401
    assert (await refused(gate.admit("sk-app-unknown", "chat"))).status == 401
    live, view = await store.create("live", {"chat"}, KeyLimits())
    await gate.admit(live, "chat")
    await store.revoke(view["id"])
    assert (await refused(gate.admit(live, "chat"))).status == 401


async def test_degraded_mode_uses_recently_verified_keys_only(guard: RedisGuard) -> None:
    secret, _ = await KeyStore(guard.client).create("deg", {"chat"}, KeyLimits(rpm=1))
    other, _ = await KeyStore(guard.client).create("deg2", {"chat"}, KeyLimits())
    gate = admission(guard)
    closed = admission(guard, fail_open=False)
    await gate.admit(secret, "chat")
    await closed.admit(other, "chat")
    await guard.pipe.close()
    guard.pipe._addr = ("127.0.0.1", 9)  # Redis is now unreachable for this client
    ticket = await gate.admit(secret, "chat")  # fail-open: the limit cannot be enforced, the key is known
    assert ticket.principal.name == "deg" and ticket.rate_headers == {}
    assert (await refused(gate.admit(secret, "admin"))).status == 403
    assert (await refused(closed.admit(other, "chat"))).status == 503
    assert (await refused(gate.admit(other, "chat"))).status == 503  # never verified by this gateway


async def test_concurrency_counts_slots_and_settle_frees_them_all(guard: RedisGuard) -> None:
    """A request of k sequences (prompts x n) takes k of the key's concurrency units, atomically; settling it
    frees all k; a request of more sequences than the limit is refused with a 400 (waiting would never admit it)."""
    secret, _ = await KeyStore(guard.client).create("slots", {"chat"}, KeyLimits(max_concurrent=8))
    gate = admission(guard)
    inflight = f"gw:rl:{hash_secret(secret)}:inflight"
    big = await gate.admit(secret, "chat", slots=6)
    assert await guard.client.zcard(inflight) == 6
    results = await asyncio.gather(*(gate.admit(secret, "chat", slots=2) for _ in range(5)), return_exceptions=True)
    tickets = [r for r in results if isinstance(r, Ticket)]
    assert len(tickets) == 1 and {r.param for r in results if isinstance(r, APIError)} == {"concurrency"}
    error = await refused(gate.admit(secret, "chat", slots=3))
    assert (error.status, error.param) == (429, "concurrency")
    await gate.settle(big)
    await gate.settle(big)  # twice: frees nothing more
    assert await guard.client.zcard(inflight) == 2
    await gate.settle(tickets[0])
    assert await guard.client.zcard(inflight) == 0
    too_big = await refused(gate.admit(secret, "chat", slots=9))
    assert (too_big.status, too_big.code, too_big.param) == (400, "too_many_slots", "n")
    assert "9 sequences" in too_big.message and "8 concurrent slots" in too_big.message
    assert await guard.client.zcard(inflight) == 0
    whole = await gate.admit(secret, "chat", slots=8)
    assert await guard.client.zcard(inflight) == 8
    await gate.settle(whole)
    assert await guard.client.zcard(inflight) == 0


async def test_openai_rate_limit_headers_for_requests_and_tokens(guard: RedisGuard) -> None:
    """Admitted and refused requests carry OpenAI's x-ratelimit-* headers beside the RateLimit-* ones: requests per
    minute, and the token bucket that refuses first (here the minute's, the smaller) with its reset."""
    secret, _ = await KeyStore(guard.client).create("oai", {"chat"}, KeyLimits(rpm=5, tpm=100, tpd=10_000))
    gate = admission(guard)
    first = (await gate.admit(secret, "chat")).rate_headers
    assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert first["RateLimit-Remaining"] == "4"
    assert (first["x-ratelimit-limit-tokens"], first["x-ratelimit-remaining-tokens"]) == ("100", "100")
    await gate.settle(await gate.admit(secret, "chat"), prompt_tokens=30, completion_tokens=10)
    after = (await gate.admit(secret, "chat")).rate_headers
    assert after["x-ratelimit-remaining-requests"] == "2"
    assert 60 <= int(after["x-ratelimit-remaining-tokens"]) <= 61  # 40 spent, refilling at 100 a minute
    assert after["x-ratelimit-reset-tokens"].endswith("s") and 23 <= float(after["x-ratelimit-reset-tokens"][:-1]) <= 24
    await gate.settle(await gate.admit(secret, "chat"), prompt_tokens=100)  # overdraws the minute
    error = await refused(gate.admit(secret, "chat"))
    assert (error.status, error.param) == (429, "tpm")
    assert error.headers["x-ratelimit-remaining-tokens"] == "0" and error.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.headers["x-ratelimit-limit-requests"] == "5"


async def test_day_bucket_alone_and_unlimited_keys_send_no_stray_headers(guard: RedisGuard) -> None:
    store = KeyStore(guard.client)
    daily, _ = await store.create("daily", {"chat"}, KeyLimits(tpd=1000))
    headers = (await admission(guard).admit(daily, "chat")).rate_headers
    assert headers == {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000",
                       "x-ratelimit-reset-tokens": "0ms"}
    free, _ = await store.create("free", {"chat"}, KeyLimits())
    assert (await admission(guard).admit(free, "chat")).rate_headers == {}


async def test_a_huge_request_cost_never_stalls_redis(guard: RedisGuard) -> None:
    """A key without a concurrency limit takes no slots, so settling its request of 10^9 sequences (a huge `n`
    where no worker publishes max_choices) removes nothing: it once looped 10^9 times inside Redis, which
    answered BUSY to every other request of every key."""
    secret, _ = await KeyStore(guard.client).create("huge", {"chat"}, KeyLimits())
    limited, _ = await KeyStore(guard.client).create("bounded", {"chat"}, KeyLimits(max_concurrent=4))
    gate = admission(guard)
    ticket = await gate.admit(secret, "chat", slots=10**9)
    await asyncio.wait_for(gate.settle(ticket), 5)
    other = await asyncio.wait_for(gate.admit(limited, "chat", slots=4), 5)  # Redis still answers everyone
    inflight = f"gw:rl:{hash_secret(limited)}:inflight"
    assert await guard.client.zcard(inflight) == 4
    await asyncio.wait_for(gate.settle(other), 5)
    assert await guard.client.zcard(inflight) == 0


async def test_thousands_of_slots_are_taken_and_freed(guard: RedisGuard) -> None:
    """An admin may allow a key thousands of concurrent slots: admitting and settling them stays within Lua's
    bounded unpack (members are added and removed in batches)."""
    secret, _ = await KeyStore(guard.client).create("wide", {"chat"}, KeyLimits(max_concurrent=20_000))
    gate = admission(guard)
    ticket = await gate.admit(secret, "chat", slots=12_345)
    inflight = f"gw:rl:{hash_secret(secret)}:inflight"
    assert await guard.client.zcard(inflight) == 12_345
    await gate.settle(ticket)
    assert await guard.client.zcard(inflight) == 0
