"""Gateway behaviours that ``tests/integration/test_gateway_api.py`` checks against the fake upstream, here
against a real worker (real model, real token counts) behind the real balancer, over HTTP with real Redis.

One stack for the module (``tests.support.stack``: Redis, one worker, balancer, gateway). Covers usage
accounting with the worker's own counts (whole and streamed answers), the token debit of a streamed
request, the concurrency slot freed when a stream ends and when its client hangs up, scope and model
restrictions, what is and is not cached, request ids, bad input reaching the real worker, and ``n`` choices.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONCURRENCY_TTL_S = 900  # the gateway's default: a slot nobody frees blocks the key this long


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("gw-real"), model_path=model_path, workers=1, rag="none",
                         worker_settings={"slots": "4", "n_ctx": "512"},
                         gateway_settings={"concurrency_ttl_s": str(CONCURRENCY_TTL_S)}) as stack:
        yield stack


def _sdk(stack: LoopbackAppliance, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=120)


def _admin(stack: LoopbackAppliance) -> httpx.Client:
    return httpx.Client(base_url=stack.gateway, timeout=60, headers={"Authorization": f"Bearer {stack.admin_key}"})


def _key(stack: LoopbackAppliance, name: str, scopes: tuple[str, ...] = ("chat",), **extra: Any) -> tuple[str, str]:
    """A new key: (secret, id)."""
    with _admin(stack) as admin:
        response = admin.post("/admin/keys", json={"name": name, "scopes": list(scopes), **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["key"]), str(response.json()["id"])


def _usage(stack: LoopbackAppliance, key_id: str) -> dict[str, int]:
    with _admin(stack) as admin:
        rows = admin.get("/admin/usage", params={"key_id": key_id}).json()["data"]
    return {m: sum(int(r[m]) for r in rows) for m in ("requests", "prompt_tokens", "completion_tokens")}


NO_CACHE = {"Cache-Control": "no-store"}
HELLO = [{"role": "user", "content": "Say hello."}]


def test_usage_accounting_uses_the_workers_own_counts(stack: LoopbackAppliance) -> None:
    secret, key_id = _key(stack, "usage-real", limits={"rpm": 0})
    client = _sdk(stack, secret)
    whole = client.chat.completions.create(model=stack.model, messages=HELLO, max_tokens=9, temperature=0,
                                           extra_headers=NO_CACHE)
    chunks = list(client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Count from one to twenty."}], max_tokens=17,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_headers=NO_CACHE))
    streamed = chunks[-1].usage
    assert whole.usage is not None and streamed is not None
    assert 0 < streamed.completion_tokens <= 17 and 0 < whole.usage.completion_tokens <= 9
    expected = {"requests": 2, "prompt_tokens": whole.usage.prompt_tokens + streamed.prompt_tokens,
                "completion_tokens": whole.usage.completion_tokens + streamed.completion_tokens}
    wait_until(lambda: _usage(stack, key_id) == expected, 30, f"usage {expected}", interval=0.2)


def test_a_streamed_request_debits_its_tokens_per_minute(stack: LoopbackAppliance) -> None:
    """tpm is debited with the stream's real usage after it ends: the very next request is refused (429 tpm),
    and its Retry-After is the time the bucket needs to earn back what the stream used (no other request
    could have emptied it: a request that only refreshes the bucket would pass the old looped check)."""
    tpm = 10
    secret, key_id = _key(stack, "tpm-stream", limits={"rpm": 0, "tpm": tpm})
    client = _sdk(stack, secret)
    chunks = list(client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}, extra_headers=NO_CACHE))
    used = chunks[-1].usage
    assert used is not None and used.total_tokens > 2 * tpm  # the prompt alone is over a dozen tokens
    # Settlement runs after the last chunk; its one script writes the usage row and the debit together.
    wait_until(lambda: _usage(stack, key_id)["requests"] == 1, 30, "the stream settled", interval=0.2)
    with httpx.Client(base_url=stack.gateway, timeout=120) as api:
        refused = api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}", **NO_CACHE},
                           json={"model": stack.model, "messages": HELLO, "max_tokens": 1})
    assert refused.status_code == 429 and refused.json()["error"]["param"] == "tpm", refused.text
    # The bucket is at tpm - total (+ what it refilled since, tpm/60 a second) and admits again at 1 token:
    # Retry-After = (total + 1 - tpm) * 60 / tpm, less the seconds since settlement (allowed: up to 60 s).
    owed_s = (used.total_tokens + 1 - tpm) * 60 / tpm
    assert owed_s - 60 <= int(refused.headers["Retry-After"]) <= owed_s + 1, (refused.headers, used)


def _stream_holds_slot(stack: LoopbackAppliance, secret: str, hang_up_after: int | None) -> None:
    body = {"model": stack.model, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 60 if hang_up_after is None else 400, "stream": True}
    headers = {"Authorization": f"Bearer {secret}", **NO_CACHE}
    with httpx.Client(base_url=stack.gateway, timeout=120) as api, \
            api.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                events += 1
                if events == 1:  # while this stream is open the key's one slot is taken
                    second = api.post("/v1/chat/completions", headers=headers,
                                      json={"model": stack.model, "messages": HELLO, "max_tokens": 1})
                    assert second.status_code == 429 and second.json()["error"]["param"] == "concurrency", second.text
                if hang_up_after is not None and events >= hang_up_after:
                    break  # leaving the block closes the connection mid-stream


@pytest.mark.parametrize("hang_up_after", [None, 3], ids=["stream-ends", "client-hangs-up"])
def test_the_concurrency_slot_is_freed_when_the_stream_ends_or_the_client_leaves(
        stack: LoopbackAppliance, hang_up_after: int | None) -> None:
    secret, _ = _key(stack, f"one-slot-{hang_up_after}", limits={"rpm": 0, "max_concurrent": 1})
    _stream_holds_slot(stack, secret, hang_up_after)
    client = _sdk(stack, secret)

    def admitted() -> bool:
        try:
            client.chat.completions.create(model=stack.model, messages=HELLO, max_tokens=1, extra_headers=NO_CACHE)
        except openai.RateLimitError:
            return False
        return True

    # Freed when the stream is over, not when the slot's TTL runs out (concurrency_ttl_s = 900 s).
    wait_until(admitted, CONCURRENCY_TTL_S / 30, "the slot freed", interval=0.2)


def test_scope_and_model_restrictions_in_front_of_a_real_worker(stack: LoopbackAppliance) -> None:
    embeddings_only, _ = _key(stack, "emb-only", ("embeddings",))
    other_model, _ = _key(stack, "other-model", models=["not-this-model"])
    for secret, message in ((embeddings_only, "'chat' scope"), (other_model, "may not use model")):
        with _sdk(stack, secret) as sdk, pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(model=stack.model, messages=HELLO, max_tokens=1)
        assert message in str(caught.value)
    allowed, _ = _key(stack, "this-model", models=[stack.model])
    reply = _sdk(stack, allowed).chat.completions.create(model=stack.model, messages=HELLO, max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_greedy_answers_are_cached_and_sampled_ones_are_not(stack: LoopbackAppliance) -> None:
    secret, _ = _key(stack, "cache-real")
    body = {"model": stack.model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    with httpx.Client(base_url=stack.gateway, timeout=120, headers={"Authorization": f"Bearer {secret}"}) as api:
        first = api.post("/v1/chat/completions", json={**body, "temperature": 0})
        again = api.post("/v1/chat/completions", json={**body, "temperature": 0})
        sampled = [api.post("/v1/chat/completions", json={**body, "temperature": 1.0}) for _ in range(2)]
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("MISS", "HIT")
    assert again.json()["choices"] == first.json()["choices"] and again.json()["usage"] == first.json()["usage"]
    assert [r.headers["X-Cache"] for r in sampled] == ["BYPASS", "BYPASS"]


def test_request_id_and_bad_input_reach_the_real_worker_as_the_contract_says(stack: LoopbackAppliance) -> None:
    secret, _ = _key(stack, "ids-real")
    with httpx.Client(base_url=stack.gateway, timeout=120, headers={"Authorization": f"Bearer {secret}"}) as api:
        reply = api.post("/v1/chat/completions", headers={"X-Request-Id": "0123456789abcdef0123456789abcdef"},
                         json={"model": stack.model, "messages": HELLO, "max_tokens": 1, "temperature": 0.3})
        assert reply.status_code == 200 and reply.headers["X-Request-Id"] == "0123456789abcdef0123456789abcdef"
        for body, param in (({"model": stack.model, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
                            ({"model": stack.model, "messages": []}, "messages"),
                            ({"model": "no-such-model", "messages": HELLO}, "model")):
            refused = api.post("/v1/chat/completions", json=body)
            assert refused.status_code in (400, 404), (body, refused.text)
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_n_choices_through_the_gateway(stack: LoopbackAppliance) -> None:
    """n choices with the official client through the gateway: one prompt count and every choice's completion
    tokens in the key's usage, choice indices in a stream, the cache keyed on n, and n above the worker's
    slots refused by the gateway itself (the balancer never sees it)."""
    secret, key_id = _key(stack, "n-real", limits={"rpm": 0})
    with _sdk(stack, secret) as client:  # closed: no socket left for the garbage collector
        ask: dict[str, Any] = {"model": stack.model, "messages": [{"role": "user", "content": "Name a fruit."}],
                               "max_tokens": 8, "temperature": 0}
        raw = client.chat.completions.with_raw_response.create(**ask, n=3)
        many = raw.parse()
        answer = many.choices[0].message.content
        assert raw.headers["X-Cache"] == "MISS" and answer
        assert [(c.index, c.message.content) for c in many.choices] == [(i, answer) for i in range(3)]
        hit = client.chat.completions.with_raw_response.create(**ask, n=3)
        assert hit.headers["X-Cache"] == "HIT" and [c.message.content for c in hit.parse().choices] == [answer] * 3
        single = client.chat.completions.with_raw_response.create(**ask)
        assert single.headers["X-Cache"] == "MISS"  # n is part of the cache key
        one = single.parse()
        assert one.choices[0].message.content == answer and len(one.choices) == 1
        texts: dict[int, str] = {}
        with client.chat.completions.create(**ask, n=2, stream=True, extra_headers=NO_CACHE) as stream:
            for chunk in stream:
                assert chunk.usage is None  # the gateway asked for usage and hides it, as the client did not
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        assert texts == {0: answer, 1: answer}
        assert many.usage is not None and one.usage is not None
        assert many.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
        assert many.usage.completion_tokens == 3 * one.usage.completion_tokens
        expected = {"prompt_tokens": 3 * one.usage.prompt_tokens, "completion_tokens": 6 * one.usage.completion_tokens}
        wait_until(lambda: {k: _usage(stack, key_id)[k] for k in expected} == expected, 30, f"usage {expected}",
                   interval=0.2)
        assert (client.models.retrieve(stack.model).model_extra or {}).get("max_choices") == 4  # the worker's slots
        with _admin(stack) as admin:  # /admin/status refreshes the gateway's catalog (the published limits)
            wait_until(lambda: any(w.get("healthy") for w in admin.get("/admin/status").json()["workers"]), 30,
                       "the gateway knows the model's limits", interval=0.5)
        seen = sum(int(w["requests"]) for w in stack.balancer_workers())
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, n=5)
        assert refused.value.status_code == 400 and refused.value.param == "n"
        assert sum(int(w["requests"]) for w in stack.balancer_workers()) == seen
