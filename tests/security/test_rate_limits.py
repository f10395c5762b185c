"""Rate limits hold across 4 gateway processes sharing Redis, whatever X-Forwarded-For says.

120 requests for a key limited to 30 per minute, spread round-robin over four gateways,
each with a different forged client address: exactly the limit is admitted, the rest get
429 with Retry-After. Wrong keys from rotating addresses stay 401 and do not consume the
real key's budget.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.figures import record_figures
from tests.support.stack import LoopbackAppliance, appliance_stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RPM = 30
REQUESTS = 120


@pytest.fixture(scope="module")
def four_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackAppliance]:
    with appliance_stack(tmp_path_factory.mktemp("ratelimit"), upstream="fake", gateways=4) as stack:
        yield stack


async def _one(client: httpx.AsyncClient, base: str, key: str, index: int) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.{index % 250}.{index // 250}.7",
               "X-Real-IP": f"192.0.2.{index % 250}", "Cache-Control": "no-store"}
    body = {"model": "fake-model", "max_tokens": 4, "messages": [{"role": "user", "content": f"q{index}"}]}
    return await client.post(f"{base}/v1/chat/completions", json=body, headers=headers)


async def test_rpm_is_global_across_gateways_and_ignores_forwarded_for(
    four_gateways: LoopbackAppliance, tmp_path: Path
) -> None:
    stack = four_gateways
    key = stack.create_key("limited", ("chat",), rpm=RPM)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
        # Wrong keys first, from rotating addresses: all 401, and the real key's budget is untouched.
        wrong = await asyncio.gather(*(_one(client, stack.gateways[i % 4], key + "x", i) for i in range(40)))
        responses = await asyncio.gather(*(_one(client, stack.gateways[i % 4], key, i) for i in range(REQUESTS)))
    statuses = Counter(r.status_code for r in responses)
    per_gateway = Counter(stack.gateways.index(str(r.request.url).split("/v1")[0]) for r in responses
                          if r.status_code == 200)
    record_figures("ratelimit_4_gateways", limit_rpm=RPM, requests=REQUESTS, admitted=statuses[200],
                   refused_429=statuses[429], other=sum(v for k, v in statuses.items() if k not in (200, 429)),
                   admitted_per_gateway=dict(per_gateway),
                   wrong_key_statuses=dict(Counter(r.status_code for r in wrong)))
    assert all(r.status_code == 401 for r in wrong)
    assert statuses[200] == RPM, statuses
    assert statuses[429] == REQUESTS - RPM, statuses
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
    assert len(per_gateway) >= 2, "admissions came through several gateways: the limit is shared, not per process"
