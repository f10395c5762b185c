"""Through the whole stack with the official openai client: two gateways, real Redis, the real balancer,
a real worker with the real model, and the real RAG service with the real embedding model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from appliance.bench.harness import wait_until
from tests.support.gateway_harness import TwoGateways, sse_events, two_gateways
from tests.support.rag_service import TOKEN

pytestmark = pytest.mark.e2e

MODEL = "gemma-3-270m"
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


@pytest.fixture(scope="module")
def stack(model_path: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoGateways]:
    with two_gateways(tmp_path_factory.mktemp("stack"), model_path, redis_url) as running:
        yield running


@pytest.fixture(scope="module")
def key(stack: TwoGateways) -> str:
    return str(stack.gw.create_key("e2e", ("chat", "embeddings", "collections"))["key"])


def test_chat_non_streaming_and_streaming_with_the_openai_client(stack: TwoGateways, key: str) -> None:
    with stack.sdk(key) as sdk:
        models = [m.id for m in sdk.models.list()]
        reply = sdk.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "Name a colour."}])
        chunks = list(sdk.chat.completions.create(model=MODEL, max_tokens=8, temperature=0.7, stream=True,
                                                  messages=[{"role": "user", "content": "Count to five."}]))
        completion = sdk.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert MODEL in models
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert completion.choices[0].text and completion.model == MODEL


def test_key_lifecycle_with_the_openai_client(stack: TwoGateways) -> None:
    created = stack.gw.create_key("short-lived")
    with stack.sdk(created["key"], index=1) as sdk:
        sdk.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        with stack.gw.client(stack.gw.admin_key) as admin:
            assert admin.delete(f"/admin/keys/{created['id']}").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            sdk.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    with stack.sdk("sk-app-wrong") as sdk, pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    with stack.gw.client(created["key"]) as client:
        assert client.get("/admin/keys").status_code == 401


def test_cache_hit_replays_the_real_stream(stack: TwoGateways, key: str) -> None:
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write one word about the sea."}]}
    with stack.gw.client(key) as client:
        first = client.post("/v1/chat/completions", json=body)
        second = client.post("/v1/chat/completions", json=body)
    with stack.gateways[1].client(key) as client:
        third = client.post("/v1/chat/completions", json=body)  # the other gateway shares the cache
    assert [r.headers["x-cache"] for r in (first, second, third)] == ["MISS", "HIT", "HIT"]
    assert second.text == first.text == third.text and sse_events(second.text)[-1] == ("message", "[DONE]")


def test_rate_limit_is_shared_exactly_across_two_gateways(stack: TwoGateways) -> None:
    limited = stack.gw.create_key("twenty", rpm=20)["key"]
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0.5, "messages": [{"role": "user", "content": "Hi"}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {limited}"},
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(client.post(f"{stack.gateways[i % 2].url}/v1/chat/completions", json=body)
                                          for i in range(60)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 20 + [429] * 40
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.headers["ratelimit-limit"] == "20" and r.headers["ratelimit-remaining"] == "0" for r in refused)
    assert {r.json()["error"]["type"] for r in refused} == {"rate_limit_error"}


def test_rag_answer_cites_the_right_document(stack: TwoGateways, key: str) -> None:
    with stack.gw.client(key) as client:
        assert client.post("/v1/collections", json={"name": "e2e-library"}).status_code in (200, 201)
        ids = {}
        for path in sorted(CORPUS.glob("*.*"))[:4]:  # gettysburg, honeybees, lighthouses, sourdough
            with path.open("rb") as handle:
                created = client.post("/v1/collections/e2e-library/documents",
                                      files={"file": (path.name, handle)})
            assert created.status_code in (201, 202), created.text
            ids[path.name] = created.json().get("id")
    with stack.sdk(key) as sdk:
        reply = sdk.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "How do bees tell each other where the flowers are?"}],
            extra_body={"rag": {"collection": "e2e-library", "top_k": 3}})
    citations = (reply.model_extra or {})["citations"]
    assert citations[0]["document_id"] == ids["honeybees.md"]
    assert reply.choices[0].message.content is not None


def test_embeddings_through_the_gateway(stack: TwoGateways, key: str) -> None:
    with stack.sdk(key) as sdk:
        result = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=["first text", "second text"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 384



def _worker_requests(stack: TwoGateways, endpoint: str, status: int) -> float:
    """The worker's own count of requests it answered on ``endpoint`` with ``status``."""
    text = httpx.get(f"{stack.worker}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("appliance_worker_requests_total{") and f'endpoint="{endpoint}"' in line \
                and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_workers_limits_are_published_and_enforced_alike_at_the_gateway(stack: TwoGateways, key: str) -> None:
    """A 3000-token max_tokens request gets the same answer from the gateway as from the worker itself."""
    internal = {"X-Internal-Token": TOKEN}
    published = httpx.get(f"{stack.worker}/v1/models/{MODEL}", headers=internal, timeout=30).json()
    assert (published["context_length"], published["max_tokens"], published["max_choices"]) == (512, 128, 8)
    with stack.sdk(key) as sdk:
        listed = {m.id: m.model_extra for m in sdk.models.list()}
        assert listed[MODEL] is not None and listed[MODEL]["max_tokens"] == 128  # balancer and gateway pass it on
        assert (listed[MODEL] or {})["max_choices"] == 8  # the worker's slots: the largest n
        one = sdk.models.retrieve(MODEL)
        assert one.id == MODEL and one.model_extra is not None and one.model_extra["context_length"] == 512
        assert one.model_extra["max_choices"] == 8
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("no-such-model")
    body = {"model": MODEL, "max_tokens": 3000, "messages": [{"role": "user", "content": "Hi"}]}
    direct = httpx.post(f"{stack.worker}/v1/chat/completions", json=body, headers=internal, timeout=60)
    assert direct.status_code == 400 and direct.json()["error"]["code"] == "max_tokens_exceeded"

    def refused_by_the_gateway_itself() -> bool:
        before = _worker_requests(stack, "/v1/chat/completions", 400)
        with stack.gw.client(key) as client:
            through = client.post("/v1/chat/completions", json=body)
        assert (through.status_code, through.json()) == (direct.status_code, direct.json())
        return _worker_requests(stack, "/v1/chat/completions", 400) == before

    wait_until(refused_by_the_gateway_itself, 30, interval=0.5, what="the gateway's catalog to hold the limits")
    with stack.sdk(key) as sdk:
        at_limit = sdk.chat.completions.create(model=MODEL, max_tokens=128, temperature=0,
                                               messages=[{"role": "user", "content": "Hi"}])
    assert at_limit.choices[0].finish_reason in ("stop", "length")


def test_a_list_of_prompts_through_the_gateway(stack: TwoGateways, key: str) -> None:
    prompts = ["The sky is", "Bread is made of", "Bees make"]
    with stack.sdk(key) as sdk:
        whole = sdk.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
        streamed = list(sdk.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert [c.index for c in whole.choices] == [0, 1, 2] and all(c.text for c in whole.choices)
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(texts)
    assert streamed[-1].usage is not None and whole.usage is not None
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens
