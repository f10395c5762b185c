"""Admission: verify the key, check its scope and model, apply its limits; settle usage after.

One Redis round trip in (``ADMIT``) and one out (``SETTLE``). While Redis is
down, keys verified in the last ``key_cache_ttl_s`` keep working from a local
cache and the limiter fails open or closed as configured.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import itertools
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from appliance.core.errors import APIError, bad_request, forbidden, overloaded, rate_limited, unauthorized
from gateway.keys import Principal, hash_secret, record_key
from gateway.lua import ADMIT, SETTLE
from gateway.redis_guard import RedisGuard, RedisUnavailable
from gateway.resp import Arg, Script

__all__ = ["Admission", "Ticket", "parse_bearer"]

STATS = "gw:stats"
_FIELDS_AT = 8  # the key record's fields follow the status and the limit figures in ADMIT's reply (gateway/lua.py)
_LIMIT_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute", "tpd": "tokens per day",
                "concurrency": "concurrent slots (one per sequence: prompts x n)"}


@dataclass(slots=True)
class Ticket:
    """An admitted request: who, and what must be settled when it ends."""

    principal: Principal
    member: str
    rate_headers: dict[str, str]
    limited: bool
    prefetched: Any = None  # the reply to the command sent along with admission (None: Redis down)
    slots: int = 1  # concurrency units held: the request's cost (prompts x n)


def parse_bearer(header: str | None) -> str:
    if not header:
        raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return token


def usage_key(day: dt.date) -> str:
    return f"gw:usage:{day.isoformat()}"


class Admission:
    def __init__(self, guard: RedisGuard, *, key_cache_ttl_s: float, fail_open: bool, inflight_ttl_s: int,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self._guard = guard
        self._on_refused = on_refused or (lambda _limit: None)
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self._key_cache_ttl_s = key_cache_ttl_s
        self._fail_open = fail_open
        self._inflight_ttl_s = inflight_ttl_s
        self._verified: dict[str, tuple[Principal, float]] = {}
        # In-flight set members: unique across processes without a syscall per request.
        self._member_prefix = secrets.token_hex(6) + ":"
        self._counter = itertools.count()

    async def _run(self, script: Script, keys: list[Arg], args: list[Arg],
                   extra: Sequence[Arg] | None) -> list[Any]:
        """The script (and an extra command, sent in the same write); reload the script if Redis lost it."""
        commands = [script.command(keys, args)] + ([extra] if extra else [])
        replies = await self._guard.call(lambda: self._guard.pipe.execute_many(*commands))
        if Script.missing(replies[0]):
            replies[0] = await self._guard.call(lambda: self._guard.pipe.execute(*script.fallback(keys, args)))
        if isinstance(replies[0], ResponseError):
            raise replies[0]
        return replies

    async def admit(self, secret: str, scope: str, model: str = "", limited: bool = True,
                    extra: Sequence[Arg] | None = None, *, slots: int = 1) -> Ticket:
        """Verify and count the request; ``extra`` (a cache GET) rides in the same round trip.

        ``slots``: what the request occupies (:class:`appliance.core.wire.RequestCost`), the units it takes of
        the key's concurrency limit. The extra command's reply is ``ticket.prefetched`` (None when Redis is
        down)."""
        return await self.admit_digest(hash_secret(secret), scope, model, limited, extra, slots=slots)

    async def admit_digest(self, digest: str, scope: str, model: str = "", limited: bool = True,
                           extra: Sequence[Arg] | None = None, *, slots: int = 1) -> Ticket:
        """:meth:`admit` for a key known by its stored hash (a batch line runs as the key that created the
        batch, whose secret the gateway never keeps): the same checks, limits and counts."""
        slots = max(1, slots)
        member = f"{self._member_prefix}{next(self._counter)}"
        keys: list[Arg] = [record_key(digest), f"gw:rl:{digest}:req", f"gw:rl:{digest}:tpm",
                           f"gw:rl:{digest}:tpd", f"gw:rl:{digest}:inflight"]
        args: list[Arg] = [scope, model, member, self._inflight_ttl_s, "1" if limited else "0", slots]
        try:
            replies = await self._run(self._admit, keys, args, extra)
        except RedisUnavailable:
            return self._admit_degraded(digest, scope, model, member, limited)
        ticket = self._interpret(digest, (scope, model), member, replies[0], limited, slots=slots)
        ticket.prefetched = replies[1] if extra else None
        return ticket

    def _interpret(self, digest: str, wanted: tuple[str, str], member: str, reply: list[Any],
                   limited: bool, *, slots: int = 1) -> Ticket:
        scope, model = wanted
        status = reply[0].decode()
        if status == "unknown":
            self._verified.pop(digest, None)
            raise unauthorized("Invalid API key.")
        fields = [item.decode() for item in reply[_FIELDS_AT:]]
        principal = Principal.from_record(digest, dict(zip(fields[::2], fields[1::2], strict=True)))
        if status in ("revoked", "expired"):
            self._verified.pop(digest, None)
            raise unauthorized(f"API key {status}.")
        # The lookup was by hash; compare once more in constant time as a belt-and-braces check.
        if not hmac.compare_digest(principal.digest, digest):
            raise unauthorized("Invalid API key.")
        self._verified[digest] = (principal, time.monotonic())
        if status in _LIMIT_NAMES or status == "slots":
            self._on_refused("concurrency" if status == "slots" else status)
        _check_status(status, scope, model, reply, slots)
        return Ticket(principal, member, _rate_headers(reply), limited, slots=slots)

    def _admit_degraded(self, digest: str, scope: str, model: str, member: str, limited: bool) -> Ticket:
        cached = self._verified.get(digest)
        if cached is None or time.monotonic() - cached[1] > self._key_cache_ttl_s:
            raise overloaded("The key store is unavailable and this key is not verified yet; retry shortly.", 5)
        principal = cached[0]
        if principal.expired(time.time()):
            raise unauthorized("API key expired.")
        if scope and scope not in principal.scopes:
            raise forbidden(f"This API key lacks the '{scope}' scope.")
        if not principal.allows_model(model):
            raise forbidden(f"This API key may not use model '{model}'.")
        if limited and not self._fail_open:
            raise overloaded("Rate limiter unavailable (fail-closed); retry shortly.", 5)
        return Ticket(principal, member, {}, limited=False)

    async def settle(
        self, ticket: Ticket, prompt_tokens: int = 0, completion_tokens: int = 0,
        cache_result: str = "", extra: Sequence[Arg] | None = None,
    ) -> None:
        """Free the concurrency slot, debit tokens, record usage (and run ``extra``, a cache SET, alongside).

        Never raises on a dead Redis: usage is then lost, and the slot frees itself after its TTL."""
        principal = ticket.principal
        limits = principal.limits
        digest = principal.digest
        keys: list[Arg] = [f"gw:rl:{digest}:tpm", f"gw:rl:{digest}:tpd", f"gw:rl:{digest}:inflight",
                           usage_key(dt.datetime.now(dt.UTC).date()), STATS]
        args: list[Arg] = [
            ticket.member, prompt_tokens + completion_tokens, limits.tpm, limits.tpd, principal.key_id,
            prompt_tokens, completion_tokens, cache_result, "1", ticket.slots,
        ]
        with contextlib.suppress(RedisUnavailable, ResponseError):
            await self._run(self._settle, keys, args, extra)


def _check_status(status: str, scope: str, model: str, reply: list[Any], slots: int = 1) -> None:
    if status == "ok":
        return
    if status == "scope":
        raise forbidden(f"This API key lacks the '{scope}' scope.")
    if status == "model":
        raise forbidden(f"This API key may not use model '{model}'.")
    if status == "slots":
        raise bad_request(f"This request runs {slots} sequences (prompts x n), above this key's limit of "
                          f"{int(reply[2])} concurrent slots.", param="n", code="too_many_slots")
    retry_after = max(1.0, math.ceil(float(reply[1].decode())))
    error = rate_limited(f"Rate limit exceeded: {_LIMIT_NAMES.get(status, status)}.", retry_after,
                         _rate_headers(reply))
    error.param = status
    raise error


def _rate_headers(reply: list[Any]) -> dict[str, str]:
    """The key's limits as headers, from the admission script's reply: the IETF draft's ``RateLimit-*`` and
    OpenAI's ``x-ratelimit-*`` for requests per minute, and OpenAI's ``x-ratelimit-*-tokens`` for the token
    bucket that refuses first (per minute or per day). A limit the key does not have sends no header."""
    headers: dict[str, str] = {}
    limit, remaining, reset = int(reply[2]), int(reply[3]), float(reply[4].decode())
    if limit > 0:
        headers.update({
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(max(0, math.ceil(reset))),
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
            # when the oldest request in the minute's window leaves it (a request can then be made)
            "x-ratelimit-reset-requests": openai_duration(reset),
        })
    tokens, tokens_left, tokens_reset = int(reply[5]), int(reply[6]), float(reply[7].decode())
    if tokens > 0:
        headers.update({
            "x-ratelimit-limit-tokens": str(tokens),
            "x-ratelimit-remaining-tokens": str(tokens_left),
            "x-ratelimit-reset-tokens": openai_duration(tokens_reset),  # until the bucket is full again
        })
    return headers


def openai_duration(seconds: float) -> str:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers spell it: ``250ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def is_rate_limit(error: APIError) -> str | None:
    """The limit's name if this error is a rate-limit refusal (for metrics)."""
    return error.param if error.status == 429 else None
